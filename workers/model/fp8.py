"""FP8 linear layers of the text decoder (quantization "fp8"): e4m3 weights with one fp32 scale per output channel,
inputs quantized per token (workers.kernels: Fp8Rows), the GEMM through `torch._scaled_mm` with row-wise scales.

Weights come quantized at load (`weight_to_fp8`): a bf16 or fp32 checkpoint per output row (online, as vLLM's
quantization="fp8"), a pre-quantized one as stored, its per-tensor scale repeated per row. Rows are independent,
so the fused q/k/v and gate/up weights are filled part by part, each part keeping its own scales.

Where `_scaled_mm` is not used (the CPU), `linear_dequantized` computes the same product from the dequantized
operands, (x_q * s_x) @ (w_q * s_w)^T: the CPU runs the quantized numbers, in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from broker.errors import ModelLoadError
from workers.checkpoint import dequantize
from workers.kernels.fp8_quant import AMAX_FLOOR, FP8, FP8_MAX, Fp8Rows

QUANTIZATIONS = ("fp8",)


class Fp8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None])^T + bias. weight [N, K] float8_e4m3fn, weight_scale [N] fp32;
    bias [N] stays in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


def make_linear(in_features: int, out_features: int, bias: bool, fp8: bool) -> nn.Module:
    return Fp8Linear(in_features, out_features, bias) if fp8 else nn.Linear(in_features, out_features, bias=bias)


def check_supported(quantization: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ModelLoadError before any weight is read if `quantization` cannot run on this device."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}: expected one of {QUANTIZATIONS} or null")
    if device.type != "cuda":
        return  # linear_dequantized
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ModelLoadError(f"quantization 'fp8' needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    if dtype != torch.bfloat16:
        raise ModelLoadError(f"quantization 'fp8' on CUDA runs with dtype bfloat16 (torch._scaled_mm's row-wise "
                             f"scaling returns bf16), not {dtype}")


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] (any float dtype) -> (data [N, K] e4m3, scale [N] fp32) with w ~ data * scale[:, None]."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / FP8_MAX
    return (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale  # in place: one fp32 temporary less


def weight_to_fp8(t: Tensor, scale: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """A checkpoint's [N, K] weight on `device` as (data e4m3, scale [N] fp32): an e4m3 weight as stored (scale
    from the checkpoint, [] or [N]; none: 1), any other quantized per output row."""
    if t.dtype == FP8:
        s = torch.ones(()) if scale is None else scale
        return t.to(device), s.to(device=device, dtype=torch.float32).expand(t.shape[0]).contiguous()
    return quantize_weight(dequantize(t.to(device), None if scale is None else scale.to(device)))


# --- the GEMM: x (Fp8Rows [M, K]) @ layer -> [M, N] in out_dtype; `out` (a contiguous [M, N] view) receives it

def linear_scaled_mm(x: Fp8Rows, layer: Fp8Linear, out_dtype: torch.dtype, use_fast_accum: bool = False,
                     out: Tensor | None = None) -> Tensor:
    # x.data [M, K] row-major, weight.t() [K, N] column-major (as _scaled_mm wants its second operand);
    # scale_a [M, 1], scale_b [1, N], both fp32: row-wise scaling; the bias is added in the epilogue
    extra = {} if out is None else {"out": out}
    return torch._scaled_mm(x.data, layer.weight.t(), scale_a=x.scale, scale_b=layer.weight_scale.view(1, -1),
                            bias=layer.bias, out_dtype=out_dtype, use_fast_accum=use_fast_accum, **extra)


def linear_dequantized(x: Fp8Rows, layer: Fp8Linear, out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    w = layer.weight.float() * layer.weight_scale[:, None]  # [N, K]
    y = x.dequantize() @ w.t()  # [M, N] fp32
    if layer.bias is not None:
        y += layer.bias.float()
    if out is None:
        return y.to(out_dtype)
    return out.copy_(y)
