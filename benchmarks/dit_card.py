"""One card, a real-size DiT and its text encoder together: seconds per image, the encoder's share of them, and each
process's GPU memory, with the encoder in the DiT process and behind the broker.

    python3 benchmarks/dit_card.py --build-7b --model-path /tmp/eb-bench-7b --device cuda \
        --width 1024 --height 1024 --steps 8 --runs 3 [--modes baseline,service,service-fp8] [--json F]
    .venv/bin/python benchmarks/dit_card.py --dit-layers 1 --small-dims --width 64 --height 64 --steps 1 --runs 1
        # the CPU stand-in: the same code path at toy shapes, with the tiny encoder of var/tiny

The DiT worker's engine (dit_workers.engine.DitEngine, as a DiT worker runs it) gets a Qwen-Image-shaped pipeline:
diffusers' QwenImageTransformer2DModel with Qwen/Qwen-Image's released transformer config (QWEN_IMAGE_TRANSFORMER)
and AutoencoderKLQwenImage with its released VAE config, both with random weights drawn on the device (nothing of
the 20B transformer is written to disk), and Qwen-Image's scheduler. Random weights compute
exactly as much as trained ones, so seconds and memory are real; the images are noise. The text encoder is the
checkpoint at --model-path (--build-7b: benchmarks/encoder.py's random Qwen2.5-VL-7B-shaped one, whose vision
tower is tiny: t2i never runs it).

Modes, each in fresh processes, one after the other (the card is free between them):
  baseline     the encoder in the DiT process, HF transformers, bf16: as diffusers' pipeline runs it
  kernel       the encoder in the DiT process, our kernel backend, bf16 (kernel-fp8: with quantization "fp8")
  service      the encoder behind the broker: an encoder worker (kernel backend, bf16) on the same GPU
  service-fp8  the same with the encoder worker's quantization "fp8"

Each mode makes one warm-up generation, then --runs generations, each with its own prompt (a realistic t2i prompt,
so every prompt is encoded; the negative prompt " " is the worker's default and, behind the broker, comes from the
encoder worker's cache after the first job, as in production). The split is taken with torch.cuda.synchronize()
at its boundaries, here in the benchmark: encode (the embedder's call), denoise (from the first denoising step to
the last one's end), VAE decode (the rest of the pipeline call: unpacking, decode, to PIL) and PNG. GPU memory:
the DiT process's torch allocations (after loading, peak while generating), and each process's used memory as
nvidia-smi reports it (--query-compute-apps; where it shows no process of ours, the card's used memory
differenced around each process's start and exit instead). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIB = 1 << 20

# Qwen/Qwen-Image transformer/config.json (its `pooled_projection_dim`: 768 is not an argument of the diffusers
# class, which ignores it); the same values are QwenImageTransformer2DModel's defaults.
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
# Qwen/Qwen-Image vae/config.json (latents_mean/latents_std: the class's defaults are the released values).
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
SMALL_DIMS = dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6))

# name: (the DiT worker's text_encoder_type, the encoder's quantization: the DiT worker's own in `kernel` mode, the
# encoder worker's behind the broker)
MODES = {"baseline": ("baseline", None), "kernel": ("kernel", None), "kernel-fp8": ("kernel", "fp8"),
         "service": ("service", None), "service-fp8": ("service", "fp8")}
ENCODER_OF = {"baseline": "HF transformers, in the DiT process", "kernel": "kernel backend, in the DiT process",
              "service": "encoder worker (kernel backend) beside it"}


# --- the pipeline: random weights drawn on the device -------------------------------------------------------------

def fill_random_(model, seed: int) -> None:
    """Every parameter drawn in place on its own device, in name order, as make_tiny_pipeline.fill_deterministic
    scales them (norm scales near one, small biases, weights ~ 1/sqrt(fan-in)): activations stay finite through
    60 layers, and no host copy of the weights is ever made."""
    import torch

    gens = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):
                p.normal_(1.0, 0.1, generator=gen)
            elif leaf == "bias":
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(max(1, math.prod(p.shape[1:]))), generator=gen)


def build_on_device(cls, config: dict, device, dtype, seed: int):
    """`cls(**config)` with its parameters made on `device` in `dtype` from the start (a 20B model in fp32 would
    not fit the card), then filled with random values."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    fill_random_(model, seed)
    return model.eval().requires_grad_(False)


def transformer_config(args, text_dim: int) -> dict:
    cfg = dict(QWEN_IMAGE_TRANSFORMER, num_layers=args.dit_layers, joint_attention_dim=text_dim)
    return dict(cfg, **SMALL_DIMS) if args.small_dims else cfg


def random_t2i_loader(args):
    """A stand-in for dit_workers.pipeline.load_t2i: the same QwenImagePipeline (no text encoder, no tokenizer),
    its transformer and VAE built from config with random weights on the device instead of read from disk."""
    from dit_workers import pipeline as P
    from dit_workers.make_tiny_pipeline import QWEN_IMAGE_SCHEDULER, TINY_VAE, encoder_hidden_size

    def load_t2i(model_path, device, dtype):
        import diffusers

        transformer = build_on_device(diffusers.QwenImageTransformer2DModel,
                                      transformer_config(args, encoder_hidden_size(model_path)), device, dtype, 1)
        vae = build_on_device(diffusers.AutoencoderKLQwenImage, TINY_VAE if args.small_dims else QWEN_IMAGE_VAE,
                              device, dtype, 2)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
        pipe = diffusers.QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                           transformer=transformer)
        return P._quiet(pipe.to(device))

    return load_t2i


# --- one mode: a DiT process --------------------------------------------------------------------------------------

def child(args) -> None:
    import torch

    from benchmarks.encoder import REAL_PROMPTS
    from broker.protocol.schemas import GenerateRequest
    from dit_workers import pipeline as P
    from dit_workers.census import encoder_census, encoder_param_shapes
    from dit_workers.config import DitWorkerConfig
    from dit_workers.engine import DitEngine
    from workers.checkpoint import resolve_checkpoint

    mode = args.child
    text_encoder_type, quantization = MODES[mode]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    P.load_t2i = random_t2i_loader(args)  # the engine's only way to its pipeline; the rest runs as in a worker
    cfg = DitWorkerConfig(text_encoder_type=text_encoder_type, model_path=args.model_path,
                          quantization=quantization if text_encoder_type == "kernel" else None,
                          make_tiny_if_missing=False, device=device, redis_url=args.redis_url,
                          lightllm_config={"service_url": args.redis_url, "service_timeout": 600})
    t0 = time.perf_counter()
    engine = DitEngine(cfg, device)
    sync()
    load_s = time.perf_counter() - t0
    transformer = engine.t2i.transformer
    dit_params = sum(p.numel() for p in transformer.parameters())
    loaded = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()} if cuda else {}

    marks = {}
    embed = engine.embedder.embed

    def timed_embed(*a, **k):
        sync()
        t = time.perf_counter()
        out = embed(*a, **k)
        sync()
        marks["encode_s"] = time.perf_counter() - t
        return out

    def progress(step, steps):
        if step == 0 or step == steps:
            sync()
            marks["denoise_start" if step == 0 else "denoise_end"] = time.perf_counter()

    engine.embedder.embed = timed_embed

    def generate(i: int) -> dict:
        prompt = REAL_PROMPTS[i % len(REAL_PROMPTS)] + ("" if i < len(REAL_PROMPTS) else f" (variation {i})")
        req = GenerateRequest(prompt, width=args.width, height=args.height, steps=args.steps, seed=i)
        marks.clear()
        sync()
        t = time.perf_counter()
        res = engine.generate(req, progress=progress)
        end = time.perf_counter()
        png_s = res.timings["png_ms"] / 1e3
        out = {"total_s": end - t, "encode_s": marks["encode_s"],
               "denoise_s": marks["denoise_end"] - marks["denoise_start"],
               "decode_s": end - marks["denoise_end"] - png_s, "png_s": png_s,
               "prompt_tokens": res.embeds_shapes[0][0], "size": [res.width, res.height]}
        out["other_s"] = out["total_s"] - out["encode_s"] - out["denoise_s"] - out["decode_s"] - png_s
        print(f"[{mode}] generation {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k.endswith("_s")),
              file=sys.stderr, flush=True)
        return out

    warmup = generate(0)
    if cuda:
        warmup["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()  # loading and the first generation
        torch.cuda.reset_peak_memory_stats()
    gens = [generate(i + 1) for i in range(args.runs)]
    census = encoder_census(encoder_param_shapes(resolve_checkpoint(args.model_path).text_encoder),
                            engine.pipeline_modules())
    print(json.dumps({
        "mode": mode, "device": device, "dtype": str(engine.dtype).replace("torch.", ""), "pid": os.getpid(),
        "load_s": load_s, "warmup": warmup, "gens": gens,
        "dit_params": dit_params, "dit_bytes": dit_params * transformer.dtype.itemsize,
        "dit_config": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
        "vae_params": sum(p.numel() for p in engine.t2i.vae.parameters()),
        "cuda_loaded": loaded, "cuda_peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_reserved": torch.cuda.memory_reserved() if cuda else None,
        "gpu_apps": gpu_apps() if cuda else None, "card_used": card_used() if cuda else None,
        "encoder_tensor_bytes": census["encoder_tensor_bytes"], "encoder_modules": census["encoder_modules"],
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
    }, default=str))


# --- the card's memory, as nvidia-smi sees it ---------------------------------------------------------------------

def nvidia_smi(*query: str) -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines() if out.returncode == 0 else None


def gpu_apps() -> dict[int, int] | None:
    """{pid: used bytes} of every process on the card (PIDs as the driver sees them: another PID namespace's in
    some containers)."""
    lines = nvidia_smi("--query-compute-apps=pid,used_memory")
    if lines is None:
        return None
    apps = {}
    for line in lines:
        pid, used = (x.strip() for x in line.split(","))
        if pid.isdigit() and used.isdigit():
            apps[int(pid)] = int(used) * MIB
    return apps


def card_used() -> int | None:
    """GPU 0's used memory, every process's and the driver's."""
    lines = nvidia_smi("--query-gpu=memory.used", "-i", "0")
    return int(lines[0]) * MIB if lines else None


def driver_pid(apps: dict | None, pid: int, exclude=()) -> int | None:
    """`pid` as nvidia-smi lists it: itself, or, where it lists other PIDs than ours (another PID namespace), the one
    process it lists beside `exclude`."""
    if not apps:
        return None
    if pid in apps:
        return pid
    rest = [p for p in apps if p not in exclude]
    return rest[0] if len(rest) == 1 else None


# --- the run ------------------------------------------------------------------------------------------------------

def build_checkpoint(args) -> None:
    """benchmarks/encoder.py's random 7B-shaped encoder checkpoint, in its own process: this one keeps no CUDA
    context or cached blocks on the card it measures."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from benchmarks.encoder import build_checkpoint; "
            "from workers.model.qwen2_5_vl_text import ModelArgs; build_checkpoint(sys.argv[1], "
            "ModelArgs.from_name('qwen2.5-vl-7b'), torch.device('cuda' if torch.cuda.is_available() else 'cpu'))")
    subprocess.run([sys.executable, "-c", code, args.model_path, REPO], check=True)


def start_encoder_worker(args, server, quantization: str | None):
    from tests.helpers import start_process, wait_for_workers, write_config

    cfg = write_config(os.path.join(server.dir, "encoder.json"), model_dir=args.model_path, make_tiny_if_missing=False,
                       backend="kernel", device=args.device, quantization=quantization, redis_url=server.url)
    log = os.path.join(server.dir, f"encoder-{quantization or 'bf16'}.log")
    proc = start_process(["-m", "workers", "--config", cfg], log)
    wait_for_workers(server.url, 1, proc, log, timeout=900)
    return proc, log


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def run_mode(mode: str, args, server) -> dict:
    """One mode: its encoder worker (service modes), then a DiT process; the card's memory around each."""
    text_encoder_type, quantization = MODES[mode]
    row = {"card_idle": card_used()}
    enc = None
    try:
        if text_encoder_type == "service":
            print(f"=== {mode}: encoder worker loading", file=sys.stderr, flush=True)
            enc, _ = start_encoder_worker(args, server, quantization)
            row["encoder_pid"] = enc.pid
            row["encoder_apps"], row["card_encoder_loaded"] = gpu_apps(), card_used()
        print(f"=== {mode}: DiT process", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--redis-url", server.url,
               *passthrough(args)]
        out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"{mode}: the DiT process exited with {out.returncode}")
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        if enc is not None:
            row["card_encoder_after"] = card_used()  # the DiT process has exited; the encoder worker still holds
    finally:
        if enc is not None:
            stop(enc)
    row["card_freed"] = card_used()
    return row


def passthrough(args) -> list[str]:
    out = ["--model-path", args.model_path, "--device", args.device, "--width", str(args.width), "--height",
           str(args.height), "--steps", str(args.steps), "--runs", str(args.runs), "--dit-layers",
           str(args.dit_layers)]
    return out + (["--small-dims"] if args.small_dims else [])


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def mib(v) -> str:
    return "-" if v is None else f"{v / MIB:,.0f}"


def memory_of(row: dict) -> tuple:
    """(DiT process, encoder worker) used bytes from nvidia-smi's process list (the encoder worker's PID: the one
    process listed while it ran alone), else from the card's used memory differenced around the processes' starts
    and exits; and which of the two it was."""
    apps = row.get("gpu_apps")
    enc = driver_pid(row.get("encoder_apps"), row["encoder_pid"]) if row.get("encoder_pid") else None
    dit = driver_pid(apps, row["pid"], exclude={enc})
    if dit is not None:
        return apps[dit], (apps.get(enc) if enc is not None else None), "nvidia-smi's process list"
    if row.get("card_used") is None:
        return None, None, None
    if row.get("encoder_pid"):
        return (row["card_used"] - row["card_encoder_after"], row["card_encoder_after"] - row["card_idle"],
                "the card's used memory, differenced")
    return row["card_used"] - row["card_idle"], None, "the card's used memory, differenced"


def encoder_label(row: dict) -> str:
    te, quantization = MODES[row["mode"]]
    return f"{ENCODER_OF[te]}, {quantization or row['dtype']}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def report(rows: list[dict], args) -> None:
    import dataclasses

    from dit_workers.config import DitWorkerConfig

    r0 = rows[0]
    cfg_scale = {f.name: f.default for f in dataclasses.fields(DitWorkerConfig)}["default_true_cfg_scale"]
    c = r0["dit_config"]
    print(f"\nOne card, DiT and text encoder: {r0['gpu_name'] or r0['device']}, {r0['dtype']}, "
          f"{args.width}x{args.height}, {args.steps} steps, true_cfg_scale {cfg_scale} "
          f"(two transformer passes a step), median (mean) of {args.runs} generations after a warm-up")
    print(f"DiT: QwenImageTransformer2DModel, {c['num_layers']} layers, {c['num_attention_heads']} heads x "
          f"{c['attention_head_dim']}, joint_attention_dim {c['joint_attention_dim']} ({count(r0['dit_params'])} "
          f"parameters, {r0['dit_bytes'] / 2**30:.2f} GiB); VAE: AutoencoderKLQwenImage, "
          f"{'the tiny one' if args.small_dims else 'the released config'} ({count(r0['vae_params'])}); both random "
          f"weights made on the device. Text encoder: {os.path.abspath(args.model_path)} (random weights).")
    print("| mode | text encoder | s / image | encode s | encode share | denoise s | VAE decode s | PNG s | "
          "DiT process GPU (MiB) | DiT process torch: after load / peak (MiB) | encoder worker GPU (MiB) | "
          "card used, both (MiB) | encoder weights in the DiT process (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    hows, mem = set(), {}
    for r in rows:
        g = r["gens"]
        dit, encoder, how = memory_of(r)
        hows.add(how)
        mem[r["mode"]] = dit
        loaded = (r["cuda_loaded"] or {}).get("allocated")
        total, encode = median(g, "total_s"), median(g, "encode_s")
        print(f"| {r['mode']} | {encoder_label(r)} | {total:.2f} ({mean(g, 'total_s'):.2f}) | {encode:.3f} "
              f"({mean(g, 'encode_s'):.3f}) | {encode / total:.1%} ({mean(g, 'encode_s') / mean(g, 'total_s'):.1%}) | "
              f"{median(g, 'denoise_s'):.2f} | {median(g, 'decode_s'):.2f} | {median(g, 'png_s'):.2f} | {mib(dit)} | "
              f"{mib(loaded)} / {mib(r['cuda_peak_allocated'])} | "
              f"{mib(encoder)} | {mib(r['card_used'])} | {r['encoder_tensor_bytes'] / MIB:,.0f} |")
    if hows - {None}:
        print(f"Per-process GPU memory from {', '.join(sorted(hows - {None}))}; 'card used' is the card's at the end "
              "of the mode's generations, both processes on it.")
    print(f"Prompt tokens after the template: {sorted({x['prompt_tokens'] for r in rows for x in r['gens']})}. "
          "Encode is the prompt and its negative in one call (behind the broker one job, whose negative ' ' comes "
          "from the encoder worker's cache after the first). Denoise is the steps' transformer passes and "
          "scheduler; VAE decode the rest of the pipeline call. Random weights: noise images at a real image's cost.")
    base = next((r for r in rows if r["mode"] == "baseline"), None)
    for r in rows:
        line = (f"{r['mode']}: load {r['load_s']:.1f} s, warm-up generation {r['warmup']['total_s']:.2f} s, card "
                f"used before {mib(r['card_idle'])} MiB, after {mib(r['card_freed'])} MiB")
        if base is not None and r is not base:
            line += f"; s / image {median(r['gens'], 'total_s') / median(base['gens'], 'total_s'):.3f}x baseline's"
            if mem.get(r["mode"]) is not None and mem.get("baseline") is not None:
                line += f", DiT process GPU {mib(mem[r['mode']] - mem['baseline'])} MiB against baseline's"
        print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/dit_card.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=os.path.join(REPO, "var", "tiny"),
                    help="the text encoder's Qwen-Image directory (text_encoder/, tokenizer/)")
    ap.add_argument("--build-7b", action="store_true",
                    help="build (or reuse) at --model-path the random 7B-shaped encoder checkpoint")
    ap.add_argument("--modes", default="baseline,service,service-fp8", help=f"of {', '.join(MODES)}")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="generations measured per mode, after one warm-up")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dit-layers", type=int, default=QWEN_IMAGE_TRANSFORMER["num_layers"])
    ap.add_argument("--small-dims", action="store_true",
                    help="2 heads of 16 and the tiny VAE: a CPU stand-in through the same code")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}: expected some of {', '.join(MODES)}")
    if args.build_7b:
        build_checkpoint(args)
    elif args.model_path == os.path.join(REPO, "var", "tiny"):
        from workers.make_tiny import ensure_tiny

        ensure_tiny(args.model_path)

    from tests.helpers import RedisServer

    server = RedisServer().start()  # the service modes' broker
    try:
        rows = [run_mode(mode, args, server) for mode in modes]
    finally:
        server.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1, default=str)
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
