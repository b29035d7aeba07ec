"""RMSNorm fused with the residual add, with HF Qwen2RMSNorm's rounding points."""

from __future__ import annotations

import torch

from ._triton_env import check_launchable, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    *, store_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # x, residual: [T, D]; weight: [D] -> y [T, D], residual_out [T, D] (None without residual or store_residual)
    dtype = x.dtype
    residual_out = None
    if residual is not None:
        # HF adds the residual stream in the model dtype: one rounding after an exact fp32 add.
        x = (x.float() + residual.float()).to(dtype)
        residual_out = x if store_residual else None
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    y = (h * torch.rsqrt(var + eps)).to(dtype)
    # HF rounds the normalized row to the input dtype before the weight multiply, then rounds again.
    y = (weight.float() * y.float()).to(dtype)
    return y, residual_out


@triton.jit
def residual_rms_norm_row(X, R, W, R_OUT, base, cols, mask, D, eps,
                          HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr):
    """One row of x [+ residual] normalized and weighted, fp32 holding the values rounded as rms_norm_ref rounds;
    the sum stored to R_OUT with STORE_RESIDUAL (rms_norm_quant shares it)."""
    x = tl.load(X + base + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + base + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        if STORE_RESIDUAL:
            tl.store(R_OUT + base + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / D
    rstd = tl.rsqrt(var + eps)
    y = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return (w * y).to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, R_OUT,
    D, eps,
    BLOCK_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
):
    # one program per row; X, R, Y, R_OUT: [T, D] contiguous; W: [D]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    base = row * D
    y = residual_rms_norm_row(X, R, W, R_OUT, base, cols, mask, D, eps, HAS_RESIDUAL, STORE_RESIDUAL)
    tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


def row_config(d: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for a kernel that holds a whole row of `d` in one block (rms_norm, the fp8 row
    quantizations): enough warps for 16-byte loads across it."""
    block_d = triton.next_power_of_2(d)
    num_warps = 4
    if block_d >= 2048:
        num_warps = 8
    if block_d >= 8192:
        num_warps = 16
    return block_d, num_warps


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    store_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = RMSNorm(x [+ residual]) * weight; with a residual, also returns the rounded sum (the new residual).

    x, residual: [T, D]; weight: [D]; all one dtype (fp32, fp16 or bf16). `out` / `residual_out` may alias
    `x` / `residual` (each row is read before it is written). store_residual=False: the sum is not written
    (the last norm of a model) and None is returned in its place.
    """
    check_launchable(x, "rms_norm")
    assert x.dim() == 2, f"rms_norm: x must be [T, D], got shape {tuple(x.shape)}"
    T, D = x.shape
    assert x.dtype in _DTYPES, f"rms_norm: unsupported dtype {x.dtype}"
    assert x.is_contiguous(), "rms_norm: x must be contiguous"
    assert weight.shape == (D,), f"rms_norm: weight must be [{D}], got {tuple(weight.shape)}"
    assert weight.dtype == x.dtype, f"rms_norm: weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert weight.is_contiguous() and weight.device == x.device, "rms_norm: weight must be contiguous, on x's device"
    if residual is not None and not store_residual:
        assert residual_out is None, "rms_norm: residual_out given with store_residual=False"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), "
            f"got {tuple(residual.shape)}, {residual.dtype}"
        )
        assert residual.is_contiguous() and residual.device == x.device, "rms_norm: residual must be contiguous"
        if residual_out is None and store_residual:
            residual_out = torch.empty_like(x)
        assert residual_out is None or (
            residual_out.shape == x.shape and residual_out.dtype == x.dtype and residual_out.is_contiguous())
    else:
        assert residual_out is None, "rms_norm: residual_out given without residual"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), (
        f"rms_norm: out must be contiguous {tuple(x.shape)} {x.dtype}"
    )
    if T == 0:
        return out, residual_out

    block_d, num_warps = row_config(D)
    _rms_norm_kernel[(T,)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else out,
        D, eps,
        BLOCK_D=block_d, HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=residual_out is not None,
        num_warps=num_warps,
    )
    return out, residual_out
