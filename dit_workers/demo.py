"""python -m dit_workers.demo --config CONFIG: submit a few prompts to the DiT workers and print what came back,
next to the shapes the in-process encoder gives for the same prompts. Then waits (honcho keeps running)."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from broker.errors import BrokerError
from broker.generation import GenerationClient
from dit_workers.config import DitWorkerConfig

DEMO_PROMPTS = [
    "a red fox in snow",
    "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket",
    "neon sign that says 'encoder-broker' 🦊",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_workers.demo")
    ap.add_argument("--config", required=True)
    ap.add_argument("--once", action="store_true", help="exit after printing instead of waiting")
    args = ap.parse_args(argv)
    cfg = DitWorkerConfig.from_json(args.config)
    client = GenerationClient(cfg.redis_url, queue=cfg.queue, timeout=300)
    results = None
    for attempt in range(120):  # workers may still be loading: keep asking for up to a minute
        try:
            jobs = [client.submit(p, negative_prompt=" ") for p in DEMO_PROMPTS]
            results = [client.wait(*j) for j in jobs]
            break
        except BrokerError as e:
            print(f"demo: waiting for the services ({e})", flush=True)
            time.sleep(0.5)
    if results is None:
        print("demo: gave up", flush=True)
        return 1

    from workers.encoders import load_encoder

    reference = load_encoder(cfg.model_path, backend="baseline")
    ok = True
    for prompt, res in zip(DEMO_PROMPTS, results):
        want = [list(t.shape) for t in reference.encode([prompt, " "])]
        match = want == res.embeds_shapes
        ok &= match
        print(f"demo: {prompt[:50]!r}: prompt {res.embeds_shapes[0]}, negative {res.embeds_shapes[1]}, "
              f"checksum {res.embeds_checksum:.3f}, encoder {res.encoder_mode}, "
              f"in-process shapes {'match' if match else f'DIFFER: {want}'}", flush=True)
    print(f"demo: {'all shapes match the in-process encoder' if ok else 'MISMATCH'}", flush=True)
    if not args.once:
        signal.pause()  # honcho stops every process when one exits: stay up until stopped
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
