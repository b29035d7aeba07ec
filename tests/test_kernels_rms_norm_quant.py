import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, check_fp8_rows, rel_l2, seed, tol  # first: sets TRITON_INTERPRET
from workers.kernels import quantize_rows_ref, rms_norm_quant, rms_norm_quant_ref, rms_norm_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("D", [8, 24, 40, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_matches_ref(dtype, T, D, with_residual):
    seed("rms-quant", dtype, T, D, with_residual)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    weight = (1.0 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    residual = torch.randn(T, D, device=DEVICE, dtype=dtype) if with_residual else None
    ref, r_ref = rms_norm_quant_ref(x, weight, 1e-6, residual)
    r_out = torch.full_like(x, float("nan")) if with_residual else None  # unwritten elements stay NaN
    out, r = rms_norm_quant(x, weight, 1e-6, residual, residual_out=r_out)
    check_fp8_rows(out, ref, dtype)
    if with_residual:
        assert r is r_out and rel_l2(r, r_ref) < tol(dtype)
    else:
        assert r is None and r_ref is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_quant_model_width_in_place_residual(dtype):
    # the real hidden size (3584); the residual stream updated in place, as the decoder layers do
    seed("rms-quant-3584", dtype)
    T, D = 3, 3584
    x, residual = (torch.randn(T, D, device=DEVICE, dtype=dtype) for _ in range(2))
    weight = torch.randn(D, device=DEVICE, dtype=dtype)
    ref, r_ref = rms_norm_quant_ref(x, weight, 1e-6, residual)
    out, r = rms_norm_quant(x, weight, 1e-6, residual, residual_out=residual)
    assert r is residual and rel_l2(r, r_ref) < tol(dtype)
    check_fp8_rows(out, ref, dtype)


def test_rms_norm_quant_ref_is_quantized_rms_norm():
    seed("rms-quant-ref")
    x, residual, weight = torch.randn(5, 40), torch.randn(5, 40), torch.randn(40)
    q, r = rms_norm_quant_ref(x, weight, 1e-6, residual)
    y, r2 = rms_norm_ref(x, weight, 1e-6, residual)
    want = quantize_rows_ref(y)
    torch.testing.assert_close(r, r2, rtol=0, atol=0)
    torch.testing.assert_close(q.scale, want.scale, rtol=0, atol=0)
    torch.testing.assert_close(q.dequantize(), want.dequantize(), rtol=0, atol=0)
    assert rel_l2(q.dequantize(), y) < 0.05


def test_rms_norm_quant_empty_and_bad_inputs():
    out, r = rms_norm_quant(torch.empty(0, 24, device=DEVICE), torch.ones(24, device=DEVICE), 1e-6)
    assert out.data.shape == (0, 24) and r is None
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(AssertionError, match="weight must be"):
        rms_norm_quant(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(AssertionError, match="residual_out given without residual"):
        rms_norm_quant(x, torch.ones(8, device=DEVICE), 1e-6, residual_out=torch.empty_like(x))
