"""Per-token FP8 quantization of a linear layer's input rows: each row to float8_e4m3fn with one fp32 scale.

scale_t = max(|x_t|) / 448 (floored so an all-zero row gets a finite scale), data_t = x_t / scale_t rounded to
nearest even, so x_t ~ data_t * scale_t. `torch._scaled_mm` takes the scales as `scale_a` ([T, 1] fp32).

`to_e4m3` is shared by the fused kernels (rms_norm_quant, silu_mul_quant): Triton's interpreter converts fp32 to
fp8 wrongly (a rounding carry into the exponent is dropped: 31.9 becomes 16, not 32), so under it the value is
first rounded to the e4m3 grid in fp32, which makes the conversion exact. On the GPU the hardware conversion rounds
to nearest even, as torch's does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_env import INTERPRET, check_launchable, tl, triton
from .rms_norm import row_config

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
AMAX_FLOOR = 1e-12  # a row's |x| maximum is taken as at least this: an all-zero row quantizes to zeros
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Fp8Rows:
    """Rows quantized per token: data [T, K] float8_e4m3fn, scale [T, 1] fp32; row t ~ data[t] * scale[t]."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __getitem__(self, rows: slice) -> "Fp8Rows":
        return Fp8Rows(self.data[rows], self.scale[rows])

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale  # [T, K] fp32


def quantize_rows_ref(x: torch.Tensor) -> Fp8Rows:
    # x: [T, K] -> data [T, K] e4m3, scale [T, 1] fp32
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    return Fp8Rows((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


@triton.jit
def to_e4m3(y, EMULATE_CVT: tl.constexpr):
    # y: fp32 in [-448, 448] -> the nearest e4m3 value (ties to even), still fp32; the caller casts it
    if EMULATE_CVT:
        a = tl.abs(y)
        # binade exponent; values under 2^-6 (subnormals) share the spacing of the smallest normal binade
        e = tl.floor(tl.log2(tl.maximum(a, 0.015625)))
        ulp = tl.exp2(e - 3.0)  # 3 mantissa bits
        r = ((a / ulp + 12582912.0) - 12582912.0) * ulp  # + 1.5 * 2^23: fp32 addition rounds to an integer, even
        y = tl.where(y < 0, -r, r)
    return y


@triton.jit
def _quantize_rows_kernel(
    X, Q, S,
    K,
    BLOCK_K: tl.constexpr, EMULATE_CVT: tl.constexpr,
):
    # one program per row; X, Q: [T, K] contiguous; S: [T] (the [T, 1] scales)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(X + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    store_quantized_row(x, Q, S, row, row * K, cols, mask, EMULATE_CVT)


@triton.jit
def store_quantized_row(y, Q, S, row, base, cols, mask, EMULATE_CVT: tl.constexpr):
    """A whole fp32 row `y` to e4m3 at Q + base, its scale (|max| -> 448) at S + row (rms_norm_quant shares it)."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
    tl.store(S + row, scale)
    q = to_e4m3(tl.clamp(y / scale, -448.0, 448.0), EMULATE_CVT)
    tl.store(Q + base + cols, q.to(Q.dtype.element_ty), mask=mask)


def check_rows(x: torch.Tensor, name: str) -> None:
    check_launchable(x, name)
    assert x.dim() == 2, f"{name}: x must be [T, K], got shape {tuple(x.shape)}"
    assert x.dtype in _DTYPES, f"{name}: unsupported dtype {x.dtype}"
    assert x.is_contiguous(), f"{name}: x must be contiguous"


def empty_rows(T: int, K: int, device: torch.device) -> Fp8Rows:
    return Fp8Rows(torch.empty((T, K), dtype=FP8, device=device), torch.empty((T, 1), dtype=torch.float32,
                                                                            device=device))


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x [T, K] (fp32, fp16 or bf16) -> its rows in e4m3 with one fp32 scale each (see quantize_rows_ref)."""
    check_rows(x, "quantize_rows")
    T, K = x.shape
    out = empty_rows(T, K, x.device)
    if T == 0:
        return out
    block, num_warps = row_config(K)
    _quantize_rows_kernel[(T,)](x, out.data, out.scale, K, BLOCK_K=block, EMULATE_CVT=INTERPRET,
                                num_warps=num_warps)
    return out
