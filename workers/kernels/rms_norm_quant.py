"""RMSNorm fused with the residual add and the per-token FP8 quantization of its output, in one pass over a row.

The normalized row is rounded as rms_norm rounds it (HF's rounding points, in x's dtype), then quantized as
quantize_rows quantizes: the result is exactly quantize_rows(rms_norm(...)) with one read and one write of a row.
"""

from __future__ import annotations

import torch

from ._triton_env import INTERPRET, tl, triton
from .fp8_quant import Fp8Rows, check_rows, empty_rows, quantize_rows_ref, store_quantized_row
from .rms_norm import residual_rms_norm_row, rms_norm_ref, row_config


def rms_norm_quant_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> tuple[Fp8Rows, torch.Tensor | None]:
    # x, residual: [T, D]; weight: [D] -> y (e4m3 [T, D] + scales [T, 1]), residual_out [T, D] (None without residual)
    y, residual_out = rms_norm_ref(x, weight, eps, residual)
    return quantize_rows_ref(y), residual_out


@triton.jit
def _rms_norm_quant_kernel(
    X, R, W, Q, S, R_OUT,
    D, eps,
    BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EMULATE_CVT: tl.constexpr,
):
    # one program per row; X, R, R_OUT: [T, D] contiguous; W: [D]; Q: [T, D] e4m3; S: [T]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    base = row * D
    y = residual_rms_norm_row(X, R, W, R_OUT, base, cols, mask, D, eps, HAS_RESIDUAL, HAS_RESIDUAL)
    store_quantized_row(y, Q, S, row, base, cols, mask, EMULATE_CVT)


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    *, residual_out: torch.Tensor | None = None,
) -> tuple[Fp8Rows, torch.Tensor | None]:
    """RMSNorm(x [+ residual]) * weight, quantized per row to e4m3; with a residual, also the rounded sum (the new
    residual, which `residual_out` may alias `residual` for).

    x, residual: [T, D]; weight: [D]; all one dtype (fp32, fp16 or bf16) -> (Fp8Rows [T, D], residual_out or None).
    """
    check_rows(x, "rms_norm_quant")
    T, D = x.shape
    assert weight.shape == (D,), f"rms_norm_quant: weight must be [{D}], got {tuple(weight.shape)}"
    assert weight.dtype == x.dtype, f"rms_norm_quant: weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert weight.is_contiguous() and weight.device == x.device, "rms_norm_quant: weight must be contiguous, on x's device"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous(), (
            f"rms_norm_quant: residual must be contiguous {tuple(x.shape)} {x.dtype}"
        )
        if residual_out is None:
            residual_out = torch.empty_like(x)
        assert residual_out.shape == x.shape and residual_out.dtype == x.dtype and residual_out.is_contiguous()
    else:
        assert residual_out is None, "rms_norm_quant: residual_out given without residual"
    out = empty_rows(T, D, x.device)
    if T == 0:
        return out, residual_out
    block_d, num_warps = row_config(D)
    _rms_norm_quant_kernel[(T,)](
        x, residual if residual is not None else x, weight, out.data, out.scale,
        residual_out if residual_out is not None else x,
        D, eps,
        BLOCK_D=block_d, HAS_RESIDUAL=residual is not None, EMULATE_CVT=INTERPRET, num_warps=num_warps,
    )
    return out, residual_out
