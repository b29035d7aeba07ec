import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, rel_l2, seed, tol  # imported first: sets TRITON_INTERPRET
from workers.kernels import rms_norm, rms_norm_ref, triton_available


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("D", [8, 24, 40, 96])
@pytest.mark.parametrize("residual_mode", ["none", "stored", "not stored"])  # not stored: the model's final norm
def test_rms_norm_matches_ref(dtype, T, D, residual_mode):
    seed("rms", dtype, T, D, residual_mode)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    weight = (1.0 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    residual = None if residual_mode == "none" else torch.randn(T, D, device=DEVICE, dtype=dtype)
    store = residual_mode != "not stored"
    y_ref, r_ref = rms_norm_ref(x, weight, 1e-6, residual, store_residual=store)

    out = torch.full_like(x, float("nan"))  # unwritten elements stay NaN and fail the comparison
    r_out = torch.full_like(x, float("nan")) if residual_mode == "stored" else None
    y, r = rms_norm(x, weight, 1e-6, residual, out=out, residual_out=r_out, store_residual=store)

    assert y is out and y.dtype == dtype
    assert rel_l2(y, y_ref) < tol(dtype)
    if residual_mode == "stored":
        assert r is r_out
        assert rel_l2(r, r_ref) < tol(dtype)
    else:  # no residual, or its sum normalized but not kept
        assert r is None and r_ref is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_model_width_in_place_residual(dtype):
    # the real hidden size (3584, not a power of two); the residual stream is updated in place
    seed("rms-3584", dtype)
    T, D = 3, 3584
    x, residual = (torch.randn(T, D, device=DEVICE, dtype=dtype) for _ in range(2))
    weight = torch.randn(D, device=DEVICE, dtype=dtype)
    y_ref, r_ref = rms_norm_ref(x, weight, 1e-6, residual)
    y, r = rms_norm(x, weight, 1e-6, residual, residual_out=residual)
    assert r is residual
    assert rel_l2(y, y_ref) < tol(dtype)
    assert rel_l2(r, r_ref) < tol(dtype)


def test_rms_norm_empty():
    x = torch.empty(0, 24, device=DEVICE)
    y, r = rms_norm(x, torch.ones(24, device=DEVICE), 1e-6)
    assert y.shape == (0, 24) and r is None


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(AssertionError, match="weight must be"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(AssertionError, match="contiguous"):
        rms_norm(x.t(), torch.ones(4, device=DEVICE), 1e-6)
    with pytest.raises(AssertionError, match="dtype"):
        rms_norm(x, torch.ones(8, device=DEVICE, dtype=torch.float16), 1e-6)
    with pytest.raises(AssertionError, match="store_residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, torch.zeros_like(x), residual_out=torch.empty_like(x),
                 store_residual=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_ref_matches_hf(dtype):
    # the reference reproduces HF's decoder layer: bf16 residual add, then Qwen2RMSNorm
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    seed("rms-hf", dtype)
    T, D = 5, 40
    norm = Qwen2_5_VLRMSNorm(D, eps=1e-6).to(DEVICE, dtype)
    x, residual = (torch.randn(T, D, device=DEVICE, dtype=dtype) for _ in range(2))
    h = residual + x
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D))
        y_hf = norm(h)
    y, r = rms_norm_ref(x, norm.weight.detach(), 1e-6, residual)
    torch.testing.assert_close(r, h, rtol=0, atol=0)
    torch.testing.assert_close(y, y_hf, rtol=0, atol=0)


def test_triton_available_here():
    # these tests run the launchers on DEVICE, so the model code would pick them too
    assert triton_available(DEVICE)
    assert triton_available(torch.empty(1, device=DEVICE))
    assert not triton_available("meta")
