import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, cu_seqlens, rel_l2, seed, tol  # imported first: sets TRITON_INTERPRET
from workers.kernels import Segments, varlen_attention, varlen_attention_ref
from workers.kernels import attention as attention_module

LENS = [[1], [7], [1, 7, 13, 33], [5, 0, 16, 2]]  # single tokens, odd lengths, an empty sequence


def _inputs(lens, n_prefix, n_q, n_kv, head_dim, dtype, case_seed):
    seed(case_seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, head_dim, device=DEVICE, dtype=dtype) for h in (n_q, n_kv, n_kv))
    pk = pv = None
    if n_prefix:
        pk, pv = (torch.randn(n_prefix, n_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    return q, k, v, pk, pv


def _check(lens, n_prefix, n_q, n_kv, head_dim, dtype, max_seqlen=None, causal=True, seg_lens=None):
    """The kernel against the reference on fresh inputs (with segments of seg_lens: see _segments); returns the
    reference's output and the inputs."""
    q, k, v, pk, pv = _inputs(lens, n_prefix, n_q, n_kv, head_dim, dtype,
                              (lens, n_prefix, n_q, head_dim, dtype, causal, seg_lens))
    segments = None if seg_lens is None else _segments(seg_lens, n_kv, head_dim, dtype, (lens, seg_lens, dtype))
    cu = cu_seqlens(lens)
    max_seqlen = max_seqlen or max(lens)
    scale = head_dim**-0.5
    ref = varlen_attention_ref(q, k, v, cu, max_seqlen, scale, pk, pv, causal=causal, segments=segments)
    out = torch.full_like(q, float("nan"))  # unwritten rows stay NaN and fail the comparison
    o = varlen_attention(q, k, v, cu, max_seqlen, scale, pk, pv, out=out, causal=causal, segments=segments)
    assert o is out and o.dtype == dtype
    assert not o.isnan().any(), "some output rows were never written"
    assert rel_l2(o, ref) < tol(dtype)
    return ref, (q, k, v, pk, pv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prefix", [0, 5, 34])
@pytest.mark.parametrize("lens", LENS, ids=lambda lens: "-".join(map(str, lens)))
def test_varlen_attention_matches_ref(dtype, n_prefix, lens):
    _check(lens, n_prefix, n_q=4, n_kv=2, head_dim=16, dtype=dtype)


@pytest.mark.parametrize(
    "n_q, n_kv, head_dim, dtype",
    [(4, 4, 32, torch.float16), (7, 1, 64, torch.bfloat16), (2, 1, 128, torch.float32),
     (28, 4, 128, torch.bfloat16)],  # the last: Qwen2.5-VL-7B's heads, G = 7
)
def test_varlen_attention_heads_and_head_dims(n_q, n_kv, head_dim, dtype):
    _check([3, 18], 5, n_q, n_kv, head_dim, dtype)


def _set_blocks(monkeypatch, blocks):
    monkeypatch.setattr(attention_module, "_attention_config", lambda head_dim, dtype, causal=True: (*blocks, 1, 1))


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 16)], ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_varlen_attention_tile_shapes(monkeypatch, blocks):
    # the GPU configs use BLOCK_M = 2 * BLOCK_N; cover equal tiles and a wider diagonal too
    _set_blocks(monkeypatch, blocks)
    _check([1, 7, 13, 33, 70], 5, 4, 2, 16, torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_varlen_attention_max_seqlen_may_overestimate(causal):
    # the grid comes from a host-side bound; extra query tiles must exit without writing
    _check([3, 9], 0 if not causal else 5, 4, 2, 16, torch.float32, max_seqlen=50, causal=causal)


# --- segments: earlier keys a sequence sees after the prefix (a job's shared part, computed once) ------------------

def _segments(seg_lens, n_kv, head_dim, dtype, case_seed):
    """A buffer holding the segments in reverse order with gaps (so starts matter); a length of 0: no segment.
    Sequences 0 and 1 share one segment when both have the same length."""
    seed("segments", case_seed)
    starts, at = [0] * len(seg_lens), 3
    for b in reversed(range(len(seg_lens))):
        if b == 0 and len(seg_lens) > 1 and seg_lens[0] == seg_lens[1]:
            starts[0] = starts[1]
            continue
        starts[b], at = at, at + seg_lens[b] + 2
    sk, sv = (torch.randn(at, n_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    as_dev = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)
    return Segments(sk, sv, as_dev(starts), as_dev(seg_lens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prefix", [0, 5])
@pytest.mark.parametrize("lens, seg_lens", [([1], [9]), ([7, 3], [21, 21]), ([5, 0, 16, 2], [0, 40, 17, 1]),
                                            ([1, 7, 13, 33], [33, 0, 70, 16])],
                         ids=lambda x: "-".join(map(str, x)))
def test_varlen_attention_with_segments_matches_ref(dtype, n_prefix, lens, seg_lens):
    ref, (q, k, v, pk, pv) = _check(lens, n_prefix, 4, 2, 16, dtype, seg_lens=seg_lens)
    if any(seg_lens):  # the segments change the answer
        assert rel_l2(varlen_attention_ref(q, k, v, cu_seqlens(lens), max(lens), 0.25, pk, pv), ref) > 1e-2


@pytest.mark.parametrize("n_prefix", [0, 5])
def test_segments_are_the_sequences_own_earlier_tokens(n_prefix):
    # the reference's meaning, checked against whole sequences: attention over [segment ++ own] as one causal
    # sequence gives, on its last rows, what the own rows get with the segment passed separately
    seg_lens, lens = [6, 11], [3, 8]
    whole_lens = [a + b for a, b in zip(seg_lens, lens)]
    q, k, v, pk, pv = _inputs(whole_lens, n_prefix, 4, 2, 16, torch.float32, ("whole", n_prefix))
    whole = varlen_attention_ref(q, k, v, cu_seqlens(whole_lens), 19, 0.25, pk, pv)
    own = torch.cat([torch.arange(s + a, s + a + n) for s, a, n in zip([0, 9], seg_lens, lens)])
    seg = torch.cat([torch.arange(s, s + a) for s, a in zip([0, 9], seg_lens)])
    segments = Segments(k[seg].contiguous(), v[seg].contiguous(),
                        torch.tensor([0, 6], dtype=torch.int32, device=DEVICE),
                        torch.tensor(seg_lens, dtype=torch.int32, device=DEVICE))
    got = varlen_attention_ref(q[own], k[own].contiguous(), v[own].contiguous(), cu_seqlens(lens), 8, 0.25, pk, pv,
                               segments=segments)
    assert rel_l2(got, whole[own]) < 1e-6


def test_segments_are_checked():
    q, k, v, _, _ = _inputs([4, 2], 0, 4, 2, 16, torch.float32, "bad segments")
    cu = cu_seqlens([4, 2])
    good = _segments([3, 1], 2, 16, torch.float32, "bad")
    with pytest.raises(AssertionError, match="int32"):
        varlen_attention(q, k, v, cu, 4, 0.25, segments=Segments(good.k, good.v, good.start.long(), good.length))
    with pytest.raises(AssertionError, match="must be \\[S, 2, 16\\]"):
        varlen_attention(q, k, v, cu, 4, 0.25, segments=Segments(good.k[:, :1], good.v[:, :1], good.start,
                                                                 good.length))
    with pytest.raises(AssertionError, match="no segments"):
        varlen_attention(q, k, v, cu, 4, 0.25, causal=False, segments=good)


# --- bidirectional (the vision tower: windows of 64 patches, whole images; MHA, head_dim 80) ---------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", LENS + [[64, 64, 16, 33]], ids=lambda lens: "-".join(map(str, lens)))
def test_bidirectional_attention_matches_ref(dtype, lens):
    _check(lens, 0, n_q=2, n_kv=2, head_dim=16, dtype=dtype, causal=False)


@pytest.mark.parametrize(
    "n_heads, head_dim, dtype",
    [(2, 80, torch.float32), (3, 80, torch.bfloat16), (2, 40, torch.float16), (1, 128, torch.float32),
     (2, 24, torch.float32)],  # 80: Qwen2.5-VL's vision heads (1280 / 16), padded to a 128-wide tile
)
def test_bidirectional_attention_head_dims(n_heads, head_dim, dtype):
    _check([1, 17, 40], 0, n_heads, n_heads, head_dim, dtype, causal=False)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (64, 16)], ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_bidirectional_attention_tile_shapes(monkeypatch, blocks):
    # BLOCK_N need not divide BLOCK_M; lengths below, at and across a key tile's end
    _set_blocks(monkeypatch, blocks)
    _check([1, 16, 31, 32, 50], 0, 2, 2, 16, torch.float16, causal=False)


def test_bidirectional_attention_differs_from_causal():
    # the flag reaches the kernel: the same inputs give other rows than causal attention (all but each
    # sequence's last row see keys after them)
    q, k, v, _, _ = _inputs([5, 7], 0, 2, 2, 16, torch.float32, "flag")
    cu = cu_seqlens([5, 7])
    bi = varlen_attention(q, k, v, cu, 7, 0.25, causal=False)
    ca = varlen_attention(q, k, v, cu, 7, 0.25)
    assert torch.allclose(bi[[4, 11]], ca[[4, 11]], atol=1e-5)
    assert rel_l2(bi, ca) > 0.1


def test_varlen_attention_rejects_bad_inputs():
    q, k, v, _, _ = _inputs([4], 0, 3, 2, 16, torch.float32, "bad")
    cu = cu_seqlens([4])
    with pytest.raises(AssertionError, match="multiple"):
        varlen_attention(q, k, v, cu, 4, 0.25)
    q, k, v, _, _ = _inputs([4], 0, 4, 2, 16, torch.float32, "bad")
    with pytest.raises(AssertionError, match="int32"):
        varlen_attention(q, k, v, cu.long(), 4, 0.25)
    with pytest.raises(AssertionError, match="both prefix_k and prefix_v"):
        varlen_attention(q, k, v, cu, 4, 0.25, prefix_k=k)
    with pytest.raises(AssertionError, match="no prefix"):
        varlen_attention(q, k, v, cu, 4, 0.25, prefix_k=k[:1], prefix_v=v[:1], causal=False)
    q, k, v, _, _ = _inputs([4], 0, 2, 2, 20, torch.float32, "bad")
    with pytest.raises(AssertionError, match="multiple of 8"):
        varlen_attention(q, k, v, cu, 4, 0.25, causal=False)


@pytest.mark.parametrize("n_prefix, causal", [(0, True), (5, True), (0, False)])
def test_varlen_attention_ref_matches_sdpa(n_prefix, causal):
    # an independent check of the reference: per sequence, SDPA with an explicit prefix-visible causal mask
    lens = [3, 8]
    q, k, v, pk, pv = _inputs(lens, n_prefix, 4, 2, 16, torch.float32, ("sdpa", n_prefix))
    cu = cu_seqlens(lens)
    ref = varlen_attention_ref(q, k, v, cu, 8, 0.25, pk, pv, causal=causal)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        L = end - start
        ks, vs = k[start:end], v[start:end]
        if n_prefix:
            ks, vs = torch.cat((pk, ks)), torch.cat((pv, vs))
        mask = torch.ones(L, n_prefix + L, dtype=torch.bool, device=DEVICE)
        if causal:
            mask = mask.tril(diagonal=n_prefix)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), ks.transpose(0, 1).repeat_interleave(2, 0),
            vs.transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask, scale=0.25,
        )
        torch.testing.assert_close(ref[start:end], o.transpose(0, 1), rtol=1e-5, atol=1e-5)
