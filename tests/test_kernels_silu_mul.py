import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # triton.jit picks compiled or interpreted when the kernel modules are imported: set it before that
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from workers.kernels import _triton_env, silu_and_mul, silu_and_mul_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    if dtype == torch.bfloat16 and _triton_env.INTERPRET:
        return 2e-2  # the interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even
    return 1e-2


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("inter", [8, 24, 40, 96, 1100])  # 1100: several column blocks, a ragged last one
def test_silu_and_mul_matches_ref(dtype, T, inter):
    torch.manual_seed(zlib.crc32(repr(("silu", dtype, T, inter)).encode()))
    x = (2.0 * torch.randn(T, 2 * inter, device=DEVICE)).to(dtype)
    ref = silu_and_mul_ref(x)
    out = torch.full((T, inter), float("nan"), device=DEVICE, dtype=dtype)  # catches unwritten elements
    y = silu_and_mul(x, out=out)
    assert y is out and y.dtype == dtype
    assert _rel_l2(y, ref) < _tol(dtype)


def test_silu_and_mul_ref_matches_torch():
    # gate first, up second: the fused gate_up weight is cat(gate, up)
    torch.manual_seed(0)
    x = torch.randn(5, 48, device=DEVICE)
    torch.testing.assert_close(silu_and_mul_ref(x), torch.nn.functional.silu(x[:, :24]) * x[:, 24:])


def test_silu_and_mul_rejects_bad_inputs():
    with pytest.raises(AssertionError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous"):
        silu_and_mul(torch.randn(8, 4, device=DEVICE).t())
