"""Memory of one DiT worker process with the text encoder in it (`baseline`, `kernel`) or behind the broker
(`service`): RSS after loading, after one generation, and at peak; CUDA memory where there is a GPU; and what the
process holds of the encoder (dit_workers.census).

    .venv/bin/python benchmarks/dit_memory.py [--model-path var/tiny] [--modes baseline,service]
        [--width 256 --height 256 --steps 4] [--device auto] [--build-7b]

Each mode runs in a fresh process (a real DitWorker, its generate() called directly) against a Redis started
here; `service` also gets an encoder worker, whose own RSS is printed for context. Prints a Markdown table.
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

    from broker.schemas import GenerateRequest
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
    rows, encoder_rss = [], None
    server = enc_proc = None
    try:
        from tests.helpers import RedisServer, start_process, wait_for_workers, write_config

        server = RedisServer().start()  # every DitWorker registers with a Redis; only `service` encodes through it
        if "service" in modes:
            cfg = write_config(os.path.join(server.dir, "encoder.json"), model_dir=args.model_path,
                               backend="auto", device=args.device, redis_url=server.url)
            log = os.path.join(server.dir, "encoder.log")
            enc_proc = start_process(["-m", "workers", "--config", cfg], log)
            wait_for_workers(server.url, 1, enc_proc, log, timeout=600)
        for mode in modes:
            rows.append(run_mode(mode, args, server.url))
            if mode == "service":
                encoder_rss = proc_rss(enc_proc.pid)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
