"""Flash attention over packed varlen sequences: causal GQA with a shared cached prefix (the text decoder), or
bidirectional within each sequence (the vision tower's windows and images).

Causal sequences may also see a segment of earlier keys of their own, between the prefix and their keys: the
part a job's prompts share (a CFG pair's template and images), computed once in an earlier forward. Sequence b
sees rows start[b] .. start[b] + length[b] of a `Segments`' k and v (length 0: none).

One launcher, two kernels: `_varlen_attention_kernel` (causal, each sequence also sees the prefix) and
`_bidirectional_attention_kernel` (every token of a sequence sees all of it, no prefix). The bidirectional one
takes any head_dim up to 128 (the vision tower's is 80): its tiles are padded to the next power of two, the padded
columns loaded as zeros and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _triton_env
from ._triton_env import check_launchable, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@dataclass(slots=True)
class Segments:
    """Earlier keys some sequences see after the prefix: k, v [S, Hk, Dh]; start, length [B] int32 on the device
    (sequence b sees rows start[b] .. start[b] + length[b])."""

    k: torch.Tensor
    v: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    causal: bool = True,
    segments: Segments | None = None,
) -> torch.Tensor:
    # q: [T, Hq, Dh], k, v: [T, Hk, Dh], cu_seqlens: [B+1], prefix_k/v: [P, Hk, Dh] -> o [T, Hq, Dh]
    # causal=False: each token sees its whole sequence (and the prefix, if any)
    del max_seqlen  # the reference reads the lengths themselves
    n_q_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_q_heads // n_kv_heads
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    seg = None if segments is None else (segments.start.tolist(), segments.length.tolist())
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        L = end - start
        if L == 0:
            continue
        ks, vs = k[start:end], v[start:end]
        if seg is not None and seg[1][b]:
            s0, n = seg[0][b], seg[1][b]
            ks, vs = torch.cat((segments.k[s0:s0 + n], ks)), torch.cat((segments.v[s0:s0 + n], vs))
        if prefix_k is not None:
            ks, vs = torch.cat((prefix_k, ks)), torch.cat((prefix_v, vs))
        n_prefix = ks.shape[0] - L  # keys before the sequence's own: all visible
        qf = q[start:end].float().transpose(0, 1)  # [Hq, L, Dh]
        kf = ks.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, P+L, Dh]
        vf = vs.float().repeat_interleave(group, dim=1).transpose(0, 1)
        s = qf @ kf.transpose(1, 2) * scale  # [Hq, L, P+L]
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(n_prefix + L, device=q.device)[None, :]
        if causal:
            s = s.masked_fill(j - n_prefix > i, float("-inf"))  # the prefix is always visible
        out[start:end] = (s.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k, v, qk_scale, mask,
    APPLY_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # q: [BLOCK_M, D], k: [D, BLOCK_N], v: [BLOCK_N, D]; online softmax in base 2, fp32 state
    if UPCAST_DOT:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if APPLY_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    # each row sees a key in the first tile it visits (prefix key 0 or its own diagonal), so m_i is finite
    # from then on and a fully masked row in a later tile gets p = 0, not NaN
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _varlen_attention_kernel(
    Q, K, V, PK, PV, SK, SV, SEG_START, SEG_LEN, O, CU_SEQLENS,
    n_prefix, qk_scale,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(max_seqlen, BLOCK_M), Hq, B); Q, O: [T, Hq, Dh]; K, V: [T, Hk, Dh]; PK, PV: [P, Hk, Dh];
    # SK, SV: [S, Hk, Dh], SEG_START, SEG_LEN: [B]
    # the last query tiles see the most keys: launch them first so the long programs don't trail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // (N_Q_HEADS // N_KV_HEADS)

    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return

    q_stride = N_Q_HEADS * HEAD_DIM
    kv_stride = N_KV_HEADS * HEAD_DIM
    offs_m = m_start + tl.arange(0, BLOCK_M)  # local query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q_ptrs = Q + (start + offs_m).to(tl.int64)[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    # K is read transposed, [Dh, BLOCK_N], so q @ k needs no tl.trans
    k_base = K + start.to(tl.int64) * kv_stride + kv_head * HEAD_DIM + offs_d[:, None]
    v_base = V + start.to(tl.int64) * kv_stride + kv_head * HEAD_DIM + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if HAS_PREFIX:
        # every query sees the whole prefix; only its last tile has keys past P
        pk_base = PK + kv_head * HEAD_DIM + offs_d[:, None]
        pv_base = PV + kv_head * HEAD_DIM + offs_d[None, :]
        for n in range(0, n_prefix, BLOCK_N):
            cols = n + offs_n
            col_ok = cols < n_prefix
            k = tl.load(pk_base + cols[None, :] * kv_stride, mask=col_ok[None, :], other=0.0)
            v = tl.load(pv_base + cols[:, None] * kv_stride, mask=col_ok[:, None], other=0.0)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k, v, qk_scale, col_ok[None, :], True, PRECISION, UPCAST_DOT
            )

    if HAS_SEGMENTS:
        # the sequence's segment of earlier keys, all visible; its first tile holds key 0 (m_i stays finite)
        seg_start = tl.load(SEG_START + seq).to(tl.int64)
        seg_len = tl.load(SEG_LEN + seq)
        sk_base = SK + seg_start * kv_stride + kv_head * HEAD_DIM + offs_d[:, None]
        sv_base = SV + seg_start * kv_stride + kv_head * HEAD_DIM + offs_d[None, :]
        for n in range(0, seg_len, BLOCK_N):
            cols = n + offs_n
            col_ok = cols < seg_len
            k = tl.load(sk_base + cols[None, :] * kv_stride, mask=col_ok[None, :], other=0.0)
            v = tl.load(sv_base + cols[:, None] * kv_stride, mask=col_ok[:, None], other=0.0)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k, v, qk_scale, col_ok[None, :], True, PRECISION, UPCAST_DOT
            )

    # own keys strictly before this query tile: fully visible and in bounds (BLOCK_N divides BLOCK_M)
    for n in range(0, m_start, BLOCK_N):
        cols = n + offs_n
        k = tl.load(k_base + cols[None, :] * kv_stride)
        v = tl.load(v_base + cols[:, None] * kv_stride)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, None, False, PRECISION, UPCAST_DOT)

    # the diagonal tiles: causal mask; key tiles past the last query of this tile are skipped
    hi = tl.minimum(m_start + BLOCK_M, seqlen)
    for n in range(m_start, hi, BLOCK_N):
        cols = n + offs_n
        col_ok = cols < seqlen
        k = tl.load(k_base + cols[None, :] * kv_stride, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * kv_stride, mask=col_ok[:, None], other=0.0)
        visible = (cols[None, :] <= offs_m[:, None]) & col_ok[None, :]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, True, PRECISION, UPCAST_DOT)

    acc = acc / l_i[:, None]
    o_ptrs = O + (start + offs_m).to(tl.int64)[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bidirectional_attention_kernel(
    Q, K, V, O, CU_SEQLENS,
    qk_scale,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(max_seqlen, BLOCK_M), Hq, B); Q, O: [T, Hq, Dh]; K, V: [T, Hk, Dh]; BLOCK_D >= Dh, a power of 2
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // (N_Q_HEADS // N_KV_HEADS)

    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return

    q_stride = N_Q_HEADS * HEAD_DIM
    kv_stride = N_KV_HEADS * HEAD_DIM
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # padded columns load as 0: they add nothing to q.k and are not stored
    row_ok = offs_m < seqlen

    q_ptrs = Q + (start + offs_m).to(tl.int64)[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + start.to(tl.int64) * kv_stride + kv_head * HEAD_DIM + offs_d[:, None]  # [Dh, BLOCK_N]
    v_base = V + start.to(tl.int64) * kv_stride + kv_head * HEAD_DIM + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # whole key tiles unmasked, then the last partial one; every tile visited holds at least one key, so m_i is
    # finite after the first and rows past the sequence (never stored) stay NaN-free
    n_full = seqlen // BLOCK_N * BLOCK_N
    for n in range(0, n_full, BLOCK_N):
        cols = n + offs_n
        k = tl.load(k_base + cols[None, :] * kv_stride, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * kv_stride, mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, None, False, PRECISION, UPCAST_DOT)
    if n_full < seqlen:
        cols = n_full + offs_n
        col_ok = cols < seqlen
        k = tl.load(k_base + cols[None, :] * kv_stride, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * kv_stride, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, col_ok[None, :], True, PRECISION,
                                     UPCAST_DOT)

    acc = acc / l_i[:, None]
    o_ptrs = O + (start + offs_m).to(tl.int64)[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

def _attention_config(head_dim: int, dtype: torch.dtype, causal: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); for the causal kernel BLOCK_N must divide BLOCK_M."""
    if _triton_env.INTERPRET:
        # small tiles keep CPU tests quick; BLOCK_N < BLOCK_M like on GPUs, so the diagonal spans two key tiles
        return 32, 16, 1, 1
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMAs, not tensor cores; larger tiles spill registers at head_dim 128 (ptxas, sm_90)
        return 32, 16, 8, 2
    if not causal:
        # the vision tower's windows are 64 tokens (8x8 patches): one tile of queries, one of keys
        return 64, 64, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3  # head_dim 128 on sm_90: 128 KiB shared memory, 192 registers, no spills


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    causal: bool = True,
    segments: Segments | None = None,
) -> torch.Tensor:
    """Attention of each packed sequence over [shared prefix ++ its segment ++ its own keys], causal; or, with
    causal=False, over its own keys only, every token seeing the whole sequence (no prefix, no segments).

    q: [T, Hq, Dh]; k, v: [T, Hk, Dh] with Hq % Hk == 0; cu_seqlens: [B+1] int32 on q's device;
    max_seqlen: host int >= every sequence length (sizes the grid without a device sync);
    prefix_k, prefix_v: [P, Hk, Dh] or None; segments: see `Segments`, or None. Returns o [T, Hq, Dh] in q's dtype.
    head_dim: 16, 32, 64 or 128 when causal; any multiple of 8 up to 128 when not.
    """
    check_launchable(q, "varlen_attention")
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "varlen_attention: q, k, v must be [T, H, Dh]"
    T, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    assert k.shape == (T, n_kv_heads, head_dim) and v.shape == k.shape, (
        f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [{T}, Hk, {head_dim}]"
    )
    assert n_q_heads % n_kv_heads == 0, f"varlen_attention: Hq={n_q_heads} is not a multiple of Hk={n_kv_heads}"
    if causal:
        assert head_dim in (16, 32, 64, 128), f"varlen_attention: head_dim must be 16, 32, 64 or 128, got {head_dim}"
    else:
        assert head_dim % 8 == 0 and 16 <= head_dim <= 128, (
            f"varlen_attention: head_dim must be a multiple of 8 in [16, 128] (bidirectional), got {head_dim}")
        assert prefix_k is None and prefix_v is None and segments is None, (
            "varlen_attention: causal=False takes no prefix and no segments")
    assert q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, (
        f"varlen_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must match (fp32, fp16 or bf16)"
    )
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), "varlen_attention: q, k, v must be contiguous"
    assert cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device, (
        f"varlen_attention: cu_seqlens must be int32 [B+1] on {q.device}, got {cu_seqlens.dtype} on {cu_seqlens.device}"
    )
    assert (prefix_k is None) == (prefix_v is None), "varlen_attention: give both prefix_k and prefix_v or neither"
    n_prefix = 0
    if prefix_k is not None:
        n_prefix = prefix_k.shape[0]
        assert prefix_k.shape == (n_prefix, n_kv_heads, head_dim) and prefix_v.shape == prefix_k.shape, (
            f"varlen_attention: prefix_k {tuple(prefix_k.shape)}, prefix_v {tuple(prefix_v.shape)} "
            f"must be [P, {n_kv_heads}, {head_dim}]"
        )
        assert prefix_k.dtype == q.dtype and prefix_v.dtype == q.dtype, "varlen_attention: prefix dtype != q dtype"
        assert prefix_k.is_contiguous() and prefix_v.is_contiguous(), "varlen_attention: prefix must be contiguous"
    if segments is not None:
        sk, sv = segments.k, segments.v
        assert sk.dim() == 3 and sk.shape[1:] == (n_kv_heads, head_dim) and sv.shape == sk.shape, (
            f"varlen_attention: segment keys {tuple(sk.shape)}, values {tuple(sv.shape)} must be [S, {n_kv_heads}, "
            f"{head_dim}]")
        assert sk.dtype == q.dtype and sv.dtype == q.dtype, "varlen_attention: segment dtype != q dtype"
        assert sk.is_contiguous() and sv.is_contiguous(), "varlen_attention: segments must be contiguous"
        n = cu_seqlens.shape[0] - 1
        for t in (segments.start, segments.length):
            assert t.shape == (n,) and t.dtype == torch.int32 and t.device == q.device, (
                f"varlen_attention: segment start and length must be int32 [{n}] on {q.device}")
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (
        f"varlen_attention: out must be contiguous {tuple(q.shape)} {q.dtype}"
    )
    n_seqs = cu_seqlens.shape[0] - 1
    assert n_seqs < 65536, f"varlen_attention: {n_seqs} sequences exceed the grid's third axis (65535)"
    if T == 0 or n_seqs <= 0 or max_seqlen <= 0:
        return out

    block_m, block_n, num_warps, num_stages = _attention_config(head_dim, q.dtype, causal)
    grid = (triton.cdiv(max_seqlen, block_m), n_q_heads, n_seqs)
    common = dict(
        N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
        # fp32 inputs would otherwise run the dots in TF32 and miss an fp32 reference by ~1e-3
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # the interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot; fp32 tiles give the bf16 answer
        UPCAST_DOT=_triton_env.INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not causal:
        _bidirectional_attention_kernel[grid](
            q, k, v, out, cu_seqlens, scale * _LOG2E, BLOCK_D=triton.next_power_of_2(head_dim), **common)
        return out
    has_prefix = n_prefix > 0
    seg = segments or Segments(k, v, cu_seqlens, cu_seqlens)  # placeholders, never read
    _varlen_attention_kernel[grid](
        q, k, v,
        prefix_k if has_prefix else k, prefix_v if has_prefix else v,
        seg.k, seg.v, seg.start, seg.length,
        out, cu_seqlens,
        n_prefix, scale * _LOG2E,
        HAS_PREFIX=has_prefix, HAS_SEGMENTS=segments is not None, **common,
    )
    return out
