import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, check_fp8_rows, rel_l2, seed  # first: sets TRITON_INTERPRET
from workers.kernels import quantize_rows, quantize_rows_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("K", [8, 24, 40, 96, 1100])
def test_quantize_rows_matches_ref(dtype, T, K):
    seed("quant", dtype, T, K)
    # rows of very different magnitudes: each gets its own scale
    x = (torch.randn(T, K, device=DEVICE) * torch.logspace(-3, 3, T, device=DEVICE)[:, None]).to(dtype)
    ref = quantize_rows_ref(x)
    out = quantize_rows(x)
    check_fp8_rows(out, ref, dtype)
    # and it is a quantization of x: e4m3 keeps 3 mantissa bits, a relative step of 1/8 to 1/16
    assert rel_l2(out.dequantize(), x) < 0.05


def test_quantize_rows_ref_is_the_e4m3_rounding():
    # exact e4m3 values scaled by a power of two come back unchanged; the row maximum maps to 448
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    x = torch.stack([grid, grid / 64])  # row 1: a power-of-two multiple of row 0
    q = quantize_rows_ref(x)
    torch.testing.assert_close(q.scale, torch.tensor([[1.0], [1 / 64]]))
    torch.testing.assert_close(q.dequantize(), x, rtol=0, atol=0)
    torch.testing.assert_close(quantize_rows(x.to(DEVICE)).dequantize().cpu(), x, rtol=0, atol=0)


def test_quantize_rows_zero_row_and_outlier():
    x = torch.zeros(3, 40, device=DEVICE)
    x[1, 7] = 1e4  # one outlier: it becomes 448 exactly, the rest of the row 0
    x[2] = torch.linspace(-1, 1, 40)
    out = quantize_rows(x)
    check_fp8_rows(out, quantize_rows_ref(x), torch.float32)
    assert torch.isfinite(out.scale).all() and out.data[0].float().abs().max() == 0
    assert out.data[1, 7].float() == 448.0 and out.dequantize()[1, 7] == pytest.approx(1e4, rel=1e-6)


def test_quantize_rows_slices_and_empty():
    x = torch.randn(5, 24, device=DEVICE)
    out = quantize_rows(x)
    part = out[1:4]
    assert part.shape == (3, 24) and part.scale.shape == (3, 1) and part.scale.is_contiguous()
    torch.testing.assert_close(part.dequantize(), out.dequantize()[1:4])
    empty = quantize_rows(torch.empty(0, 24, device=DEVICE))
    assert empty.data.shape == (0, 24) and empty.scale.shape == (0, 1)


def test_quantize_rows_rejects_bad_inputs():
    with pytest.raises(AssertionError, match="contiguous"):
        quantize_rows(torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(AssertionError, match=r"\[T, K\]"):
        quantize_rows(torch.randn(8, device=DEVICE))
