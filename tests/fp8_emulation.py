"""The FP8 decoder's math written out on HF's model, for the CPU tests to check the kernel backend against.

Written independently of workers.model.fp8 and workers.kernels: torch's own e4m3 cast, per output channel for the
weights and per token for every decoder linear layer's input (q/k/v, o, gate/up, down), the rest of HF's
Qwen2.5-VL (embeddings, norms, attention, the vision tower) unchanged and in fp32."""

from __future__ import annotations

import torch
from torch import nn

from workers.encoders import load_encoder

E4M3 = torch.float8_e4m3fn
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Each row of x (its last dim) on the e4m3 grid scaled to the row's |max| -> 448, back in x's dtype."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return ((x.float() / scale).clamp(-448.0, 448.0).to(E4M3).float() * scale).to(x.dtype)


def decoder_linears(model: nn.Module):
    """(name, module) of every decoder linear layer of an HF Qwen2.5-VL model (not the vision tower, not lm_head)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DECODER_LINEARS and "visual" not in n]


def emulated_encoder(model_dir: str, weights: dict[str, torch.Tensor] | None = None):
    """The baseline (HF, fp32, CPU) with the decoder's linear inputs fake-quantized per token, and its weights
    fake-quantized per output channel, or replaced by `weights` (decoder layer suffix like
    'layers.0.self_attn.q_proj' -> [N, K]) where a pre-quantized checkpoint already fixed them."""
    enc = load_encoder(model_dir, backend="baseline")
    linears = decoder_linears(enc.model)
    assert len(linears) == 7 * enc.config.num_layers
    with torch.no_grad():
        for name, m in linears:
            if weights is None:
                m.weight.copy_(fake_quant(m.weight))
            else:
                key = name[name.index("layers."):]
                m.weight.copy_(weights[key])
            m.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0]),) + args[1:])
    return enc
