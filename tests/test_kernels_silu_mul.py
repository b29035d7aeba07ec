import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, rel_l2, seed, tol  # imported first: sets TRITON_INTERPRET
from workers.kernels import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("inter", [8, 24, 40, 96, 1100])  # 1100: several column blocks, a ragged last one
def test_silu_and_mul_matches_ref(dtype, T, inter):
    seed(("silu", dtype, T, inter))
    x = (2.0 * torch.randn(T, 2 * inter, device=DEVICE)).to(dtype)
    ref = silu_and_mul_ref(x)
    out = torch.full((T, inter), float("nan"), device=DEVICE, dtype=dtype)  # catches unwritten elements
    y = silu_and_mul(x, out=out)
    assert y is out and y.dtype == dtype
    assert rel_l2(y, ref) < tol(dtype)


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
