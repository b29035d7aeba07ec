"""What every kernel test shares: the device, the dtypes, per-dtype tolerances, the error measure, the seeding.

Imported before `workers.kernels`: without a GPU, Triton must run in its interpreter, and triton.jit picks
compiled or interpreted when the kernel modules are imported."""

import itertools
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from workers.kernels import _triton_env

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    if dtype == torch.bfloat16 and _triton_env.INTERPRET:
        return 2e-2  # the interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even
    return 1e-2


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def seed(*parts) -> None:
    """Random inputs per parameter case, different for every case and reproducible when one fails."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE's inverse frequencies: [Dh/2], fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=DEVICE) / head_dim))


def mrope_positions(T: int, pos_dtype: torch.dtype, text_start: int = 0) -> torch.Tensor:
    """[3, T]: distinct t/h/w rows like image tokens, the first T // 2 text-like (equal rows from text_start)."""
    pos = torch.randint(0, 300, (3, T), device=DEVICE)
    pos[:, :T // 2] = text_start + torch.arange(T // 2, device=DEVICE)
    return pos.to(pos_dtype)


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    """[B + 1] int32: where each sequence of a packed batch starts, then the total."""
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def fp8_tol(dtype: torch.dtype) -> float:
    """Quantized rows against their reference, dequantized: a few values may land on the neighbouring e4m3 step
    (an fp32 division rounded differently, or the input rounded differently before it, as tol() allows)."""
    if dtype == torch.float32:
        return 1e-5
    if dtype == torch.bfloat16 and _triton_env.INTERPRET:
        return 4e-2  # bf16 truncated, not rounded, before quantizing: some values cross an e4m3 rounding boundary
    return 1e-2


def check_fp8_rows(out, ref, x_dtype: torch.dtype) -> None:
    """`out` and `ref` (kernels.Fp8Rows) agree: layout, dtypes, scales, and the dequantized values."""
    T, K = ref.data.shape
    assert out.data.shape == (T, K) and out.data.dtype == torch.float8_e4m3fn and out.data.is_contiguous()
    assert out.scale.shape == (T, 1) and out.scale.dtype == torch.float32 and out.scale.is_contiguous()
    assert rel_l2(out.scale, ref.scale) < tol(x_dtype)
    assert rel_l2(out.dequantize(), ref.dequantize()) < fp8_tol(x_dtype)
    assert out.data.float().abs().amax() <= 448.0
