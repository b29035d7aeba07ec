import pytest
import torch

# imported first: sets TRITON_INTERPRET
from tests.kernel_checks import DEVICE, DTYPES, mrope_positions, rel_l2, rope_inv_freq, seed, tol
from workers.kernels import apply_mrope, apply_mrope_ref

# (Hq, Hk, Dh, mrope_section): the tiny model's, an odd split, the real model's
HEADS = [(4, 2, 16, (2, 3, 3)), (3, 1, 32, (5, 6, 5)), (28, 4, 128, (16, 24, 24))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hk{h[1]}-d{h[2]}")
def test_apply_mrope_matches_ref(dtype, T, heads):
    n_q, n_k, head_dim, section = heads
    seed(("rope", dtype, T, heads))
    q, k = (torch.randn(T, n_heads, head_dim, device=DEVICE, dtype=dtype) for n_heads in (n_q, n_k))
    positions = mrope_positions(T, torch.int64 if T != 3 else torch.int32)
    inv_freq = rope_inv_freq(head_dim, 1e6)
    q_ref, k_ref = apply_mrope_ref(q, k, positions, inv_freq, section)

    # in place: every element is rewritten, so there is nothing to poison; the originals must not survive
    q_out, k_out = apply_mrope(q, k, positions, inv_freq, section)
    assert q_out is q and k_out is k
    assert rel_l2(q, q_ref) < tol(dtype)
    assert rel_l2(k, k_ref) < tol(dtype)


def test_apply_mrope_rejects_bad_section():
    q = torch.randn(2, 4, 16, device=DEVICE)
    k = torch.randn(2, 2, 16, device=DEVICE)
    pos = torch.zeros(3, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(AssertionError, match="mrope_section"):
        apply_mrope(q, k, pos, rope_inv_freq(16, 1e4), (2, 3, 2))
    with pytest.raises(AssertionError, match="positions"):
        apply_mrope(q, k, pos.float(), rope_inv_freq(16, 1e4), (2, 3, 3))


def _hf_mrope(q, k, positions, head_dim, section, theta):
    # HF layout: q [1, Hq, T, Dh], positions [3, 1, T]
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    qh, kh = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
    pos = positions[:, None, :]
    if hasattr(hf, "apply_multimodal_rotary_pos_emb"):  # transformers 4.x: sections applied in the function
        freqs = pos[..., None].float() * rope_inv_freq(head_dim, theta)  # [3, 1, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        qo, ko = hf.apply_multimodal_rotary_pos_emb(qh, kh, emb.cos(), emb.sin(), list(section))
    else:  # transformers 5.x: the rotary class recomposes the sections, apply_rotary_pos_emb rotates
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

        n_heads = q.shape[1]
        config = Qwen2_5_VLTextConfig(
            hidden_size=n_heads * head_dim, num_attention_heads=n_heads, num_key_value_heads=k.shape[1],
            num_hidden_layers=1, intermediate_size=32,
            rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
        )
        rotary = hf.Qwen2_5_VLRotaryEmbedding(config).to(DEVICE)
        cos, sin = rotary(qh, pos)
        qo, ko = hf.apply_rotary_pos_emb(qh, kh, cos, sin)
    return qo[0].transpose(0, 1), ko[0].transpose(0, 1)


@pytest.mark.parametrize("heads", HEADS[:2] + [(4, 2, 128, (16, 24, 24))], ids=lambda h: f"d{h[2]}-{h[3]}")
def test_apply_mrope_ref_matches_hf(heads):
    n_q, n_k, head_dim, section = heads
    seed(("rope-hf", heads))
    T, theta = 19, 1e6
    q, k = (torch.randn(T, n_heads, head_dim, device=DEVICE) for n_heads in (n_q, n_k))
    positions = torch.randint(0, 500, (3, T), device=DEVICE)  # all three rows differ
    q_hf, k_hf = _hf_mrope(q, k, positions, head_dim, section, theta)
    q_ref, k_ref = apply_mrope_ref(q, k, positions, rope_inv_freq(head_dim, theta), section)
    torch.testing.assert_close(q_ref, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_ref, k_hf, rtol=1e-6, atol=1e-6)
