"""How long after the HTTP front writes an answer's segment a LightX2V-style reader opens it: the figure that
`shm_ttl_s` must cover (broker.http.answer_segments). Clients read as LightX2V's lightllm_service client does (POST,
parse the JSON, open with multiprocessing.shared_memory, copy, close), `--clients` threads at once.

    python benchmarks/shm_read_gap.py --url http://127.0.0.1:8010 --ttl 10 [--clients 8] [--requests 200]

The written time is the segment's expiry (`shm_hidden_states_expires_at`) less the front's shm_ttl_s (`--ttl`,
as configured); p50/p99/max of written -> opened, in milliseconds, and how many segments were already gone.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from multiprocessing import resource_tracker, shared_memory

import numpy as np

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")


def client(url: str, ttl: float, n: int, gaps: list, gone: list) -> None:
    body = json.dumps({"inputs": TEMPLATE.format("a red fox in snow, long exposure"),
                       "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1}}).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        if "shm_hidden_states_name" not in answer:
            gone.append("no segment in the answer")
            continue
        try:
            seg = shared_memory.SharedMemory(name=answer["shm_hidden_states_name"])
        except FileNotFoundError:
            gone.append(answer["shm_hidden_states_name"])
            continue
        opened = time.time()
        np.ndarray(tuple(answer["shm_hidden_states_shape"]), np.uint8, seg.buf).copy()
        seg.close()
        resource_tracker.unregister(seg._name, "shared_memory")  # this benchmark's process leaves them to the front
        gaps.append((opened - (answer["shm_hidden_states_expires_at"] - ttl)) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8010")
    ap.add_argument("--ttl", type=float, default=10.0, help="the front's shm_ttl_s")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="per client")
    args = ap.parse_args()
    gaps, gone = [], []
    threads = [threading.Thread(target=client, args=(args.url, args.ttl, args.requests, gaps, gone))
               for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g = np.sort(np.array(gaps))
    print(f"{len(g)} segments read, {len(gone)} gone or missing; written -> opened: p50 {np.percentile(g, 50):.2f} "
          f"ms, p99 {np.percentile(g, 99):.2f} ms, max {g.max():.2f} ms (clock: the front's and this host's)")


if __name__ == "__main__":
    main()
