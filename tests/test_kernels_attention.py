import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, rel_l2, seed, tol  # noqa: F401  (imports first: sets TRITON_INTERPRET)
from workers.kernels import varlen_attention, varlen_attention_ref

LENS = [[1], [7], [1, 7, 13, 33], [5, 0, 16, 2]]  # single tokens, odd lengths, an empty sequence


def _cu_seqlens(lens: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _inputs(lens, n_prefix, n_q, n_kv, head_dim, dtype, case_seed):
    seed(case_seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, head_dim, device=DEVICE, dtype=dtype) for h in (n_q, n_kv, n_kv))
    pk = pv = None
    if n_prefix:
        pk, pv = (torch.randn(n_prefix, n_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    return q, k, v, pk, pv


def _check(lens, n_prefix, n_q, n_kv, head_dim, dtype, max_seqlen=None, pack_gqa=False):
    q, k, v, pk, pv = _inputs(lens, n_prefix, n_q, n_kv, head_dim, dtype, (lens, n_prefix, n_q, head_dim, dtype))
    cu = _cu_seqlens(lens)
    max_seqlen = max_seqlen or max(lens)
    scale = head_dim**-0.5
    ref = varlen_attention_ref(q, k, v, cu, max_seqlen, scale, pk, pv)
    out = torch.full_like(q, float("nan"))  # unwritten rows stay NaN and fail the comparison
    o = varlen_attention(q, k, v, cu, max_seqlen, scale, pk, pv, out=out, pack_gqa=pack_gqa)
    assert o is out and o.dtype == dtype
    assert not o.isnan().any(), "some output rows were never written"
    assert rel_l2(o, ref) < tol(dtype)
    if pack_gqa:  # and the per-head kernel, which it is to replace, gives the same answer
        assert rel_l2(o, varlen_attention(q, k, v, cu, max_seqlen, scale, pk, pv)) < tol(dtype)


PACK = pytest.mark.parametrize("pack_gqa", [False, True], ids=["per_head", "packed"])


@PACK
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prefix", [0, 5, 34])
@pytest.mark.parametrize("lens", LENS, ids=lambda lens: "-".join(map(str, lens)))
def test_varlen_attention_matches_ref(dtype, n_prefix, lens, pack_gqa):
    _check(lens, n_prefix, n_q=4, n_kv=2, head_dim=16, dtype=dtype, pack_gqa=pack_gqa)


@PACK
@pytest.mark.parametrize(
    "n_q, n_kv, head_dim, dtype",
    [(4, 4, 32, torch.float16), (7, 1, 64, torch.bfloat16), (2, 1, 128, torch.float32),
     (28, 4, 128, torch.bfloat16)],  # the last: Qwen2.5-VL-7B's heads, G = 7
)
def test_varlen_attention_heads_and_head_dims(n_q, n_kv, head_dim, dtype, pack_gqa):
    _check([3, 18], 5, n_q, n_kv, head_dim, dtype, pack_gqa=pack_gqa)


@pytest.mark.parametrize("n_prefix", [0, 34])
def test_varlen_attention_packed_qwen_heads(n_prefix):
    # 28 query heads over 4 KV heads at head_dim 128, fp32 (the tight tolerance): single tokens, odd lengths
    _check([1, 9, 2], n_prefix, 28, 4, 128, torch.float32, pack_gqa=True)


def _set_blocks(monkeypatch, blocks, packed_only=False):
    import importlib

    attention = importlib.import_module("workers.kernels.attention")
    config = attention._attention_config
    monkeypatch.setattr(attention, "_attention_config", lambda head_dim, dtype, pack_gqa: (
        (*blocks, 1, 1) if pack_gqa or not packed_only else config(head_dim, dtype, pack_gqa)))


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 16)], ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_varlen_attention_tile_shapes(monkeypatch, blocks):
    # the GPU configs use BLOCK_M = 2 * BLOCK_N; cover equal tiles and a wider diagonal too
    _set_blocks(monkeypatch, blocks)
    _check([1, 7, 13, 33, 70], 5, 4, 2, 16, torch.float16)


@pytest.mark.parametrize(
    "blocks, n_q, n_kv",
    [((16, 16), 7, 1), ((32, 16), 4, 4), ((16, 32), 6, 2), ((64, 16), 7, 1)],
    ids=["m16-n16-g7", "m32-n16-g1", "m16-n32-g3", "m64-n16-g7"],
)
def test_varlen_attention_packed_tile_shapes(monkeypatch, blocks, n_q, n_kv):
    # packed rows need no BLOCK_N | BLOCK_M; with G = 1 the diagonal spans several key tiles, with G = 7 a
    # tile starts and ends mid-token; P = 21 puts a key tile across the prefix's end
    # the per-head kernel it is compared with keeps its own sizes (it needs BLOCK_N | BLOCK_M)
    _set_blocks(monkeypatch, blocks, packed_only=True)
    _check([1, 7, 13, 33, 40], 21, n_q, n_kv, 16, torch.float16, pack_gqa=True)


@PACK
def test_varlen_attention_max_seqlen_may_overestimate(pack_gqa):
    # the grid comes from a host-side bound; extra query tiles must exit without writing
    _check([3, 9], 5, 4, 2, 16, torch.float32, max_seqlen=50, pack_gqa=pack_gqa)


def test_varlen_attention_rejects_bad_inputs():
    q, k, v, _, _ = _inputs([4], 0, 3, 2, 16, torch.float32, "bad")
    cu = _cu_seqlens([4])
    with pytest.raises(AssertionError, match="multiple"):
        varlen_attention(q, k, v, cu, 4, 0.25)
    q, k, v, _, _ = _inputs([4], 0, 4, 2, 16, torch.float32, "bad")
    with pytest.raises(AssertionError, match="int32"):
        varlen_attention(q, k, v, cu.long(), 4, 0.25)
    with pytest.raises(AssertionError, match="both prefix_k and prefix_v"):
        varlen_attention(q, k, v, cu, 4, 0.25, prefix_k=k)


@pytest.mark.parametrize("n_prefix", [0, 5])
def test_varlen_attention_ref_matches_sdpa(n_prefix):
    # an independent check of the reference: per sequence, SDPA with an explicit prefix-visible causal mask
    lens = [3, 8]
    q, k, v, pk, pv = _inputs(lens, n_prefix, 4, 2, 16, torch.float32, ("sdpa", n_prefix))
    cu = _cu_seqlens(lens)
    ref = varlen_attention_ref(q, k, v, cu, 8, 0.25, pk, pv)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        L = end - start
        ks, vs = k[start:end], v[start:end]
        if n_prefix:
            ks, vs = torch.cat((pk, ks)), torch.cat((pv, vs))
        mask = torch.ones(L, n_prefix + L, dtype=torch.bool, device=DEVICE).tril(diagonal=n_prefix)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), ks.transpose(0, 1).repeat_interleave(2, 0),
            vs.transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask, scale=0.25,
        )
        torch.testing.assert_close(ref[start:end], o.transpose(0, 1), rtol=1e-5, atol=1e-5)
