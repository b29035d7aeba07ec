"""SiLU(gate) * up over the fused gate_up projection output (gate first, up second)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_env import check_launchable, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2I] -> [T, I]
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(
    X, OUT,
    I,
    BLOCK: tl.constexpr,
):
    # grid (T, cdiv(I, BLOCK)); X: [T, 2I], OUT: [T, I], both contiguous
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    x_row = X + row * 2 * I
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * I + cols, y.to(OUT.dtype.element_ty), mask=mask)


def _silu_and_mul_config(inter: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 columns = 4 warps x 32 lanes x 8 halves, one 16-byte load per lane per operand."""
    block = min(1024, triton.next_power_of_2(inter))
    num_warps = max(1, min(4, block // 256))
    return block, num_warps


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I] (fp32, fp16 or bf16), computed in fp32 -> [T, I] in x's dtype."""
    check_launchable(x, "silu_and_mul")
    assert x.dim() == 2, f"silu_and_mul: x must be [T, 2I], got shape {tuple(x.shape)}"
    T, two_i = x.shape
    assert two_i % 2 == 0, f"silu_and_mul: last dim must be even (gate and up halves), got {two_i}"
    assert x.dtype in _DTYPES, f"silu_and_mul: unsupported dtype {x.dtype}"
    assert x.is_contiguous(), "silu_and_mul: x must be contiguous"
    inter = two_i // 2
    if out is None:
        out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    assert out.shape == (T, inter) and out.dtype == x.dtype and out.is_contiguous() and out.device == x.device, (
        f"silu_and_mul: out must be contiguous [{T}, {inter}] {x.dtype}"
    )
    if T == 0 or inter == 0:
        return out

    block, num_warps = _silu_and_mul_config(inter)
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](x, out, inter, BLOCK=block, num_warps=num_warps)
    return out
