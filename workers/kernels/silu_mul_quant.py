"""SiLU(gate) * up over the fused gate_up output, quantized per token to FP8, in one kernel.

A row of the 7B's intermediate (18944 wide) does not fit one block's registers, so each program walks its row
twice: the first pass finds the row's |y| maximum (its scale), the second recomputes y and stores it quantized
(the second read mostly hits L2). y is rounded to x's dtype first, as silu_and_mul returns it: the result is
exactly quantize_rows(silu_and_mul(x)).
"""

from __future__ import annotations

import torch

from ._triton_env import INTERPRET, tl, triton
from .fp8_quant import Fp8Rows, check_rows, empty_rows, quantize_rows_ref, to_e4m3
from .silu_mul import silu_and_mul_ref


def silu_mul_quant_ref(x: torch.Tensor) -> Fp8Rows:
    # x: [T, 2I] -> e4m3 [T, I] + scales [T, 1]
    return quantize_rows_ref(silu_and_mul_ref(x))


@triton.jit
def _silu_mul_quant_kernel(
    X, Q, S,
    I,
    BLOCK: tl.constexpr, EMULATE_CVT: tl.constexpr,
):
    # one program per row; X: [T, 2I], Q: [T, I] e4m3, both contiguous; S: [T]
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * 2 * I
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < I
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + I + cols, mask=mask, other=0.0).to(tl.float32)
        y = (gate * tl.sigmoid(gate) * up).to(X.dtype.element_ty).to(tl.float32)  # masked lanes: 0
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(S + row, scale)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < I
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + I + cols, mask=mask, other=0.0).to(tl.float32)
        y = (gate * tl.sigmoid(gate) * up).to(X.dtype.element_ty).to(tl.float32)
        q = to_e4m3(tl.clamp(y / scale, -448.0, 448.0), EMULATE_CVT)
        tl.store(Q + row * I + cols, q.to(Q.dtype.element_ty), mask=mask)


def _silu_mul_quant_config(inter: int, max_block: int) -> tuple[int, int]:
    """(BLOCK, num_warps): column blocks of up to `max_block`, 8 halves per lane per load."""
    block = min(max_block, triton.next_power_of_2(inter))
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


def silu_mul_quant(x: torch.Tensor, *, max_block: int = 4096) -> Fp8Rows:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I] (fp32, fp16 or bf16), rounded to x's dtype, quantized per row to
    e4m3 -> Fp8Rows [T, I]. max_block: the widest column block a program loads at once (tests lower it to cover
    rows of several blocks at small sizes)."""
    check_rows(x, "silu_mul_quant")
    T, two_i = x.shape
    assert two_i % 2 == 0, f"silu_mul_quant: last dim must be even (gate and up halves), got {two_i}"
    inter = two_i // 2
    out = empty_rows(T, inter, x.device)
    if T == 0 or inter == 0:
        return out
    block, num_warps = _silu_mul_quant_config(inter, max_block)
    _silu_mul_quant_kernel[(T,)](x, out.data, out.scale, inter, BLOCK=block, EMULATE_CVT=INTERPRET,
                                 num_warps=num_warps)
    return out
