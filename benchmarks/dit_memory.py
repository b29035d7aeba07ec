"""Memory of one DiT worker process with the text encoder in it (`baseline`, `kernel`) or behind the broker
(`service`): RSS after loading, after one generation, and at peak; CUDA memory where there is a GPU; and what the
process holds of the encoder (dit_workers.census).

    .venv/bin/python benchmarks/dit_memory.py [--model-path var/tiny] [--modes baseline,service]
        [--width 256 --height 256 --steps 4] [--device auto] [--build-7b]

Each mode runs in a fresh process (a real DitWorker, its generate() called directly) against a Redis started
here; `service` also gets an encoder worker, whose own RSS is printed for context. On a GPU, `service` also
reports what each of the two processes holds of the card, both on one GPU as in `honcho start -c encoder=1,dit=1`
(nvidia-smi's used memory, CUDA contexts and cached blocks included: the encoder worker's alone, after it served the
DiT job and after a 64-prompt batch; the DiT worker's as the rise while it ran). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIB = 1 << 20


def child(args) -> None:
    """One DiT worker process: load, generate once, report."""
    import torch

    from broker.protocol.schemas import GenerateRequest
    from dit_workers.census import cuda_bytes, rss_bytes
    from dit_workers.config import DitWorkerConfig
    from dit_workers.worker import DitWorker

    start = rss_bytes()["rss_bytes"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DitWorkerConfig(text_encoder_type=args.child, model_path=args.model_path, device=device,
                          redis_url=args.redis_url,
                          lightllm_config={"service_url": args.redis_url, "service_timeout": 120})
    t0 = time.time()
    worker = DitWorker(cfg, device)
    loaded = {**rss_bytes(), **cuda_bytes(), "load_s": time.time() - t0}
    t0 = time.time()
    res = worker.generate(GenerateRequest("a red fox in snow, watercolor", width=args.width, height=args.height,
                                          steps=args.steps, debug=True))
    census = res.debug
    print(json.dumps({"mode": args.child, "device": device, "rss_start": start, "loaded": loaded,
                      "card_used_bytes": card_used_bytes() if device.startswith("cuda") else None,
                      "after_job": {k: census[k] for k in census if k.endswith("_bytes")},
                      "job_s": time.time() - t0, "encoder_modules": len(census["encoder_modules"]),
                      "encoder_tensor_bytes": census["encoder_tensor_bytes"], "size": [res.width, res.height]}))


def run_mode(mode: str, args, redis_url: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model-path", args.model_path,
           "--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
           "--device", args.device]
    cmd += ["--redis-url", redis_url]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def card_used_bytes() -> int | None:
    """GPU 0's used memory as nvidia-smi reports it (every process's, contexts included); None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out.stdout.split()[0]) * MIB if out.returncode == 0 else None


def encoder_batch(url: str) -> None:
    """One 64-prompt job of about 200 tokens a prompt: the encoder worker's activations at a full batch."""
    from broker.client import EncoderClient

    words = "a lighthouse on a cliff at dusk, waves, gulls, warm light, oil painting, ".split()
    prompts = [" ".join(words[(i + k) % len(words)] for k in range(160)) + f" #{i}" for i in range(64)]
    EncoderClient(url, timeout=300).encode(prompts)


def mib(v) -> str:
    return "-" if v is None else f"{v / MIB:.0f}"


def build_7b_pipeline(root: str) -> None:
    """A pipeline whose text encoder has the real 7B shape (random weights, benchmarks/encoder.py's checkpoint)
    and whose transformer and VAE are the tiny ones: the encoder's share of a DiT worker's memory is what differs
    between the modes, and a 20B random transformer would only add the same ~41 GB to each."""
    import torch

    from benchmarks.encoder import build_checkpoint
    from dit_workers.make_tiny_pipeline import write_pipeline_parts
    from workers.model.qwen2_5_vl_text import ModelArgs

    a = ModelArgs.from_name("qwen2.5-vl-7b")
    build_checkpoint(root, a, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not os.path.exists(os.path.join(root, "model_index.json")):
        write_pipeline_parts(root, a.dim)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/dit_memory.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=os.path.join(REPO, "var", "tiny"))
    ap.add_argument("--modes", default="baseline,service")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--build-7b", action="store_true",
                    help="build (or reuse) at --model-path a pipeline with a 7B-shaped random text encoder and the "
                         "tiny transformer and VAE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline, is_tiny_encoder_dir

    if args.build_7b:
        build_7b_pipeline(args.model_path)
    elif not os.path.exists(os.path.join(args.model_path, "model_index.json")) or is_tiny_encoder_dir(args.model_path):
        ensure_tiny_pipeline(args.model_path)
    modes = args.modes.split(",")
    rows, encoder_rss, card = [], None, {}
    server = enc_proc = None
    try:
        from tests.helpers import RedisServer, start_process, wait_for_workers, write_config

        server = RedisServer().start()  # every DitWorker registers with a Redis; only `service` encodes through it
        card["before"] = card_used_bytes()
        if "service" in modes:
            cfg = write_config(os.path.join(server.dir, "encoder.json"), model_dir=args.model_path,
                               make_tiny_if_missing=False, backend="auto", device=args.device, redis_url=server.url)
            log = os.path.join(server.dir, "encoder.log")
            enc_proc = start_process(["-m", "workers", "--config", cfg], log)
            wait_for_workers(server.url, 1, enc_proc, log, timeout=600)
            card["encoder_loaded"] = card_used_bytes()
        for mode in modes:
            rows.append(run_mode(mode, args, server.url))
            if mode == "service":
                encoder_rss = proc_rss(enc_proc.pid)
                card["both"] = rows[-1]["card_used_bytes"]
                card["encoder_after_dit_job"] = card_used_bytes()
                encoder_batch(server.url)
                card["encoder_after_64_prompts"] = card_used_bytes()
    finally:
        if enc_proc is not None:
            enc_proc.terminate()
            enc_proc.wait(30)
        if server is not None:
            server.cleanup()

    print(f"DiT worker memory, {os.path.basename(os.path.abspath(args.model_path))}, {args.width}x{args.height}, "
          f"{args.steps} steps, device {rows[0]['device']}")
    print("| mode | RSS at start (MiB) | RSS loaded | RSS after 1 job | peak RSS | CUDA allocated | CUDA peak | "
          "encoder tensors in process (MiB) | encoder module classes | load s | job s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["after_job"]
        print(f"| {r['mode']} | {mib(r['rss_start'])} | {mib(r['loaded']['rss_bytes'])} | {mib(a['rss_bytes'])} | "
              f"{mib(a['rss_peak_bytes'])} | {mib(a.get('cuda_allocated_bytes'))} | "
              f"{mib(a.get('cuda_peak_allocated_bytes'))} | {r['encoder_tensor_bytes'] / MIB:.1f} | "
              f"{r['encoder_modules']} | {r['loaded']['load_s']:.1f} | {r['job_s']:.1f} |")
    if encoder_rss is not None:
        print(f"(the shared encoder worker process serving `service`: RSS {mib(encoder_rss)} MiB)")
    if None not in card.values() and "both" in card:
        base = card["before"]
        print("\nOne GPU, an encoder worker and a DiT worker (`service`) on it, nvidia-smi's used memory (MiB): "
              "encoder worker loaded | after the DiT job | after a 64-prompt batch | DiT worker beside it")
        print(f"| {mib(card['encoder_loaded'] - base)} | {mib(card['encoder_after_dit_job'] - base)} | "
              f"{mib(card['encoder_after_64_prompts'] - base)} | {mib(card['both'] - card['encoder_after_dit_job'])} |")
        print(f"card memory: {json.dumps({k: v // MIB for k, v in card.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
