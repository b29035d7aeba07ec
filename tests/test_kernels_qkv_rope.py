import pytest
import torch

# imported first: sets TRITON_INTERPRET
from tests.kernel_checks import DEVICE, DTYPES, mrope_positions, rel_l2, rope_inv_freq, seed, tol
from workers.kernels import apply_mrope_ref, qkv_rope, qkv_rope_ref

# (Hq, Hk, Dh, mrope_section): the tiny model's, an odd split with Dh/2 not a power of two, the real model's
HEADS = [(4, 2, 16, (2, 3, 3)), (3, 1, 48, (8, 9, 7)), (28, 4, 128, (16, 24, 24))]


def _inputs(T, heads, dtype, pos_dtype, case_seed):
    n_q, n_k, head_dim, _ = heads
    seed(case_seed)
    qkv = torch.randn(T, (n_q + 2 * n_k) * head_dim, device=DEVICE, dtype=dtype)
    return qkv, mrope_positions(T, pos_dtype, text_start=34)  # text after a template prefix


def _poisoned(T, n_q, n_k, head_dim, dtype):
    # unwritten elements stay NaN and fail the checks
    return tuple(torch.full((T, h, head_dim), float("nan"), device=DEVICE, dtype=dtype) for h in (n_q, n_k, n_k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hk{h[1]}-d{h[2]}")
def test_qkv_rope_matches_ref(dtype, T, heads):
    n_q, n_k, head_dim, section = heads
    qkv, pos = _inputs(T, heads, dtype, torch.int64 if T != 3 else torch.int32, ("qkv-rope", dtype, T, heads))
    before = qkv.clone()
    inv_freq = rope_inv_freq(head_dim, 1e6)
    q_ref, k_ref, v_ref = qkv_rope_ref(qkv, pos, inv_freq, section, n_q, n_k)
    # the reference returns contiguous copies (the model keeps k and v for the prefix)
    assert all(t.is_contiguous() for t in (q_ref, k_ref, v_ref)) and v_ref.data_ptr() != qkv.data_ptr()

    out = _poisoned(T, n_q, n_k, head_dim, dtype)
    q, k, v = qkv_rope(qkv, pos, inv_freq, section, n_q, n_k, out=out)
    assert q is out[0] and k is out[1] and v is out[2]
    assert not any(t.isnan().any() for t in (q, k, v)), "some outputs were never written"
    assert rel_l2(q, q_ref) < tol(dtype)
    assert rel_l2(k, k_ref) < tol(dtype)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)  # v is copied bit for bit
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)  # the GEMM output is only read, by either


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_equals_split_then_apply_mrope(dtype):
    # the unfused path it replaces: three contiguous copies, then M-RoPE on q and k; new output tensors
    n_q, n_k, head_dim, section = heads = (4, 2, 16, (2, 3, 3))
    T = 33
    qkv, pos = _inputs(T, heads, dtype, torch.int32, ("split", dtype))
    inv_freq = rope_inv_freq(head_dim, 1e4)
    q, k, v = qkv.split((n_q * head_dim, n_k * head_dim, n_k * head_dim), dim=-1)
    q_ref, k_ref = apply_mrope_ref(q.reshape(T, n_q, head_dim).contiguous(), k.reshape(T, n_k, head_dim).contiguous(),
                                   pos, inv_freq, section)
    q2, k2, v2 = qkv_rope(qkv, pos, inv_freq, section, n_q, n_k)
    assert all(t.is_contiguous() for t in (q2, k2, v2))
    assert (q2.shape, k2.shape, v2.shape) == ((T, n_q, head_dim), (T, n_k, head_dim), (T, n_k, head_dim))
    assert rel_l2(q2, q_ref) < tol(dtype) and rel_l2(k2, k_ref) < tol(dtype)
    torch.testing.assert_close(v2, v.reshape(T, n_k, head_dim), rtol=0, atol=0)


def test_qkv_rope_empty():
    q, k, v = qkv_rope(torch.empty(0, 8 * 16, device=DEVICE), torch.zeros(3, 0, dtype=torch.int64, device=DEVICE),
                       rope_inv_freq(16, 1e4), (2, 3, 3), 4, 2)
    assert q.shape == (0, 4, 16) and k.shape == (0, 2, 16) and v.shape == (0, 2, 16)


def test_qkv_rope_rejects_bad_inputs():
    qkv, pos = _inputs(2, HEADS[0], torch.float32, torch.int64, "bad")
    inv_freq = rope_inv_freq(16, 1e4)
    with pytest.raises(AssertionError, match="width"):
        qkv_rope(qkv, pos, inv_freq, (2, 3, 3), 4, 1)
    with pytest.raises(AssertionError, match="mrope_section"):
        qkv_rope(qkv, pos, inv_freq, (2, 3, 2), 4, 2)
    with pytest.raises(AssertionError, match="positions"):
        qkv_rope(qkv, pos.float(), inv_freq, (2, 3, 3), 4, 2)
    with pytest.raises(AssertionError, match="contiguous"):
        qkv_rope(torch.cat((qkv, qkv), 1)[:, :qkv.shape[1]], pos, inv_freq, (2, 3, 3), 4, 2)
    with pytest.raises(AssertionError, match="out k"):
        out = _poisoned(2, 4, 2, 16, torch.float32)
        qkv_rope(qkv, pos, inv_freq, (2, 3, 3), 4, 2, out=(out[0], out[0], out[2]))
