"""Where a large batch's time goes: torch.profiler over the kernel backend at one token budget, by CUDA kernel.

    python benchmarks/profile_encoder.py --ckpt /tmp/eb-bench-7b [--tokens 16384] [--quantization fp8]

Needs the random 7B checkpoint `benchmarks/encoder.py` builds (it builds one if --ckpt has none). Prints the
top kernels by total CUDA time, grouped into GEMM / attention / norm / rope / silu / copy / other, and the
share of each group: the gap between the kernel backend and a GEMM-only forward, itemized.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = [  # first match wins, on the lower-cased kernel name
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul", "splitk", "f8f8bf16", "scaled_mm")),
    ("attention", ("attn", "attention", "flash", "fmha")),
    ("norm", ("rms_norm",)),
    ("rope", ("rope", "mrope")),
    ("silu_mul", ("silu",)),
    ("quantize", ("quantize_rows",)),  # fp8: the attention output's quantization (the others are fused above)
    ("copy/index", ("copy", "index", "gather", "cat", "elementwise", "fill", "memcpy", "memset")),
]


def group_of(name: str) -> str:
    n = name.lower()
    for g, keys in GROUPS:
        if any(k in n for k in keys):
            return g
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/eb-bench-7b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    args = ap.parse_args()
    import benchmarks.encoder as eb
    from workers.encoders import load_encoder
    from workers.model.qwen2_5_vl_text import ModelArgs

    dev = torch.device("cuda")
    eb.build_checkpoint(args.ckpt, ModelArgs.from_name("qwen2.5-vl-7b"), dev)
    kern = load_encoder(args.ckpt, backend="kernel", device=dev, dtype=torch.bfloat16, quantization=args.quantization)
    tok = kern.tokenizer
    users = eb.random_user_tokens(tok, eb.mix_lengths(4096, seed=2), seed=3)
    batch = eb.token_budget_batches(tok, users, args.tokens)[0]
    n_tok = sum(len(x) - 34 for x in batch.ids)
    for _ in range(3):
        kern.encode_packed(batch)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            kern.encode_packed(batch)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) or 1.0
    by_group = collections.Counter()
    for e in events:
        by_group[group_of(e.key)] += e.self_device_time_total
    per_batch_ms = total / 3 / 1e3
    print(f"\n{len(batch.ids)} prompts, {n_tok} computed tokens per batch; CUDA time {per_batch_ms:.1f} ms a batch "
          f"= {n_tok / per_batch_ms * 1e3:.0f} computed tokens/s if the device never idled")
    print("\n| group | ms a batch | share |\n|---|---|---|")
    for g, us in by_group.most_common():
        print(f"| {g} | {us / 3 / 1e3:.2f} | {us / total:.1%} |")
    print("\n| kernel | group | calls | ms a batch | share |\n|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"| {e.key[:90]} | {group_of(e.key)} | {e.count // 3} | {e.self_device_time_total / 3 / 1e3:.2f} | "
              f"{e.self_device_time_total / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
