"""Where the FP8 encoder's error comes from, on a card: the FP8 math written out on HF's fp32 model
(tests/fp8_emulation.py: e4m3 per output channel for the decoder's linear weights, per token for their inputs,
everything else fp32) against plain fp32, and the kernel FP8 encoder against both. If the kernel matches the
emulation, the error is the quantization's own on these weights, not a bug of the kernels.

    python benchmarks/fp8_error.py --ckpt /tmp/eb-bench-7b [--prompts 8]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPTS = [
    "a red fox in snow",
    "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket",
    "neon sign that says 'open late' above a ramen shop, night, wet street reflections, cinematic",
    "portrait photo of an elderly fisherman, deep wrinkles, grey beard, knitted cap, overcast light, 85mm",
    "isometric illustration of a tiny island village with windmills, pastel colors, soft shadows",
    "a bowl of ramen",
    "an astronaut riding a horse on the moon, photorealistic, dramatic rim light, 35mm film grain",
    "minimalist poster: the word HELLO in bold red letters on a cream background",
]


def flat(states: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.double().cpu() for s in states])


def errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    g, r = flat(got), flat(ref)
    cos = torch.nn.functional.cosine_similarity(g, r, dim=-1)
    return f"rel L2 {((g - r).norm() / r.norm()).item():.4f}, min cos {cos.min().item():.5f}"


def encode(enc, prompts):
    with torch.no_grad():
        return [s.float().cpu() for s in enc.encode(prompts, task="t2i")]


def free(enc) -> None:
    del enc
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    args = ap.parse_args()
    from tests.fp8_emulation import decoder_linears, fake_quant
    from workers.encoders import load_encoder

    prompts = PROMPTS[:args.prompts]
    enc = load_encoder(args.ckpt, backend="baseline", device="cuda", dtype="float32")
    ref = encode(enc, prompts)
    with torch.no_grad():
        for _name, m in decoder_linears(enc.model):
            m.weight.copy_(fake_quant(m.weight))
            m.register_forward_pre_hook(lambda _m, a: (fake_quant(a[0]),) + a[1:])
    emu = encode(enc, prompts)
    free(enc)
    enc = load_encoder(args.ckpt, backend="kernel", device="cuda", quantization="fp8")
    fp8 = encode(enc, prompts)
    free(enc)
    enc = load_encoder(args.ckpt, backend="kernel", device="cuda")
    bf16 = encode(enc, prompts)
    print(f"fp8 math emulated in fp32 vs fp32:  {errors(emu, ref)}")
    print(f"kernel fp8 vs fp32:                 {errors(fp8, ref)}")
    print(f"kernel fp8 vs the emulation:        {errors(fp8, emu)}")
    print(f"kernel bf16 vs fp32:                {errors(bf16, ref)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
