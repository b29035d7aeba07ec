"""encoder-broker compare --quantization fp8 --prompts FILE: a quantized encoder against the unquantized one, on your
checkpoint and your prompts.

Both are the kernel backend on one device, loaded one after the other (never both at once): the reference in the
model dtype (bf16 on a GPU, fp32 on the CPU, or --dtype), then the quantized one. Per prompt it prints the relative
L2 error of the hidden states, ||q - ref|| / ||ref||, and the lowest cosine similarity over its tokens; then the
same over all tokens. Random weights have no real outliers: on real weights, this is where the error is measured.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time

import torch
import torch.nn.functional as F

from broker.errors import InvalidRequest, ModelLoadError
from workers.model.fp8 import QUANTIZATIONS


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 file; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\r\n") for line in f]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InvalidRequest(f"{path} holds no prompt (one per line)")
    return prompts


def prompt_errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """got, ref: [L, D] -> rel L2 over the whole prompt, and its tokens' lowest cosine similarity."""
    g, r = got.double(), ref.double()
    cos = F.cosine_similarity(g, r, dim=-1)
    return {"tokens": r.shape[0], "rel_l2": ((g - r).norm() / r.norm()).item(),
            "min_cos": cos.min().item() if len(cos) else float("nan")}


def summary(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> dict:
    g, r = torch.cat(outs).double(), torch.cat(refs).double()
    cos = F.cosine_similarity(g, r, dim=-1)
    return {"prompts": len(refs), "tokens": r.shape[0], "rel_l2": ((g - r).norm() / r.norm()).item(),
            "min_cos": cos.min().item(), "mean_cos": cos.mean().item()}


def encode_all(encoder, prompts: list[str], images: list[bytes] | None, batch_size: int) -> list[torch.Tensor]:
    task = "i2i" if images else "t2i"
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        outs += [o.float().cpu() for o in encoder.encode(chunk, task=task, images=images or None)]
    return outs


def weights_gib(encoder) -> float:
    return sum(p.numel() * p.element_size() for p in encoder.model.parameters()) / 2**30


def run(model_dir: str, prompts: list[str], quantization: str, device: str, dtype: str | None = None,
        images: list[bytes] | None = None, batch_size: int = 16, out=sys.stdout) -> dict:
    """Loads, encodes and prints; returns {"per_prompt": [...], "summary": {...}, "weights_gib": {...}}."""
    from workers.encoders import load_encoder

    results: dict = {"weights_gib": {}, "seconds": {}}
    encoded = {}
    for name, q in (("reference", None), (quantization, quantization)):
        t = time.perf_counter()
        # on a GPU the quantized encoder runs in bf16 (its GEMMs return bf16), whatever the reference's dtype
        q_dtype = "bfloat16" if q is not None and device.startswith("cuda") else dtype
        enc = load_encoder(model_dir, backend="kernel", device=device, dtype=q_dtype, quantization=q)
        results["weights_gib"][name] = weights_gib(enc)
        encoded[name] = encode_all(enc, prompts, images, batch_size)
        results["seconds"][name] = time.perf_counter() - t
        results.setdefault("dtype", str(enc.dtype).replace("torch.", ""))
        del enc  # before the next model loads: one model on the device at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    refs, outs = encoded["reference"], encoded[quantization]
    results["per_prompt"] = [prompt_errors(o, r) for o, r in zip(outs, refs)]
    results["summary"] = summary(outs, refs)
    print_report(results, prompts, quantization, model_dir, device, out)
    return results


def print_report(results: dict, prompts: list[str], quantization: str, model_dir: str, device: str, out) -> None:
    w, s = results["weights_gib"], results["summary"]
    print(f"{quantization} against the unquantized kernel encoder ({results['dtype']}) on {device}, {model_dir}",
          file=out)
    print(f"weights: {w['reference']:.3g} GiB unquantized, {w[quantization]:.3g} GiB {quantization}", file=out)
    print(f"{'#':>4} {'tokens':>6} {'rel L2':>8} {'min cos':>8}  prompt", file=out)
    for i, (e, p) in enumerate(zip(results["per_prompt"], prompts)):
        text = p if len(p) <= 60 else p[:57] + "..."
        print(f"{i:>4} {e['tokens']:>6} {e['rel_l2']:>8.4f} {e['min_cos']:>8.5f}  {text}", file=out)
    worst = max(range(len(prompts)), key=lambda i: results["per_prompt"][i]["rel_l2"])
    print(f"all {s['prompts']} prompts, {s['tokens']} tokens: rel L2 {s['rel_l2']:.4f}, min cos {s['min_cos']:.5f}, "
          f"mean cos {s['mean_cos']:.5f}; worst prompt #{worst} (rel L2 "
          f"{results['per_prompt'][worst]['rel_l2']:.4f})", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="encoder-broker compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantization", required=True, choices=QUANTIZATIONS)
    ap.add_argument("--prompts", required=True, help="a UTF-8 text file, one prompt per line")
    ap.add_argument("--model-dir", help="a Qwen-Image directory (default: the encoder config's model_dir)")
    ap.add_argument("--config", help="an encoder worker config to take model_dir, device and dtype from")
    ap.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's, auto)")
    ap.add_argument("--dtype", help="the reference's dtype (default: bfloat16 on a GPU, float32 on the CPU; "
                                    "float32 on a GPU compares against an fp32 reference)")
    ap.add_argument("--image", action="append", default=[],
                    help="an image file; given, every prompt is encoded as i2i with these images (repeatable)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per encode call")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from workers.config import EncoderWorkerConfig
    from workers.devices import worker_device

    try:
        cfg = EncoderWorkerConfig.from_json(args.config, model_dir=args.model_dir, device=args.device,
                                            dtype=args.dtype)
        prompts = read_prompts(args.prompts)
        images = [open(p, "rb").read() for p in args.image]
        run(cfg.model_dir, prompts, args.quantization, worker_device(cfg.device), cfg.dtype, images,
            max(1, args.batch_size))
    except (ModelLoadError, InvalidRequest, OSError, ValueError) as e:
        print(f"encoder-broker compare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
