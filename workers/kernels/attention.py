"""Causal GQA flash attention over packed varlen sequences, each also seeing a shared cached prefix.

Two kernels behind one launcher. The default gives each (sequence, query head) its own query tiles. With
`pack_gqa=True`, the G = Hq / Hk query heads that share a KV head fill one tile together: row r of a
sequence's packed rows is query token r // G of head kv_head * G + r % G, so a sequence of L tokens needs
cdiv(G * L, BLOCK_M) tiles per KV head instead of cdiv(L, BLOCK_M) per query head, and each K/V tile is
loaded once for the group rather than once per head (Qwen2.5-VL-7B: G = 7, prompts of ~100 tokens).
"""

from __future__ import annotations

import torch

from . import _triton_env
from ._triton_env import check_launchable, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    # q: [T, Hq, Dh], k, v: [T, Hk, Dh], cu_seqlens: [B+1], prefix_k/v: [P, Hk, Dh] -> o [T, Hq, Dh]
    del max_seqlen  # the reference reads the lengths themselves
    n_q_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_q_heads // n_kv_heads
    n_prefix = 0 if prefix_k is None else prefix_k.shape[0]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        L = end - start
        if L == 0:
            continue
        ks, vs = k[start:end], v[start:end]
        if n_prefix:
            ks, vs = torch.cat((prefix_k, ks)), torch.cat((prefix_v, vs))
        qf = q[start:end].float().transpose(0, 1)  # [Hq, L, Dh]
        kf = ks.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, P+L, Dh]
        vf = vs.float().repeat_interleave(group, dim=1).transpose(0, 1)
        s = qf @ kf.transpose(1, 2) * scale  # [Hq, L, P+L]
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(n_prefix + L, device=q.device)[None, :]
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
    Q, K, V, PK, PV, O, CU_SEQLENS,
    n_prefix, qk_scale,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(max_seqlen, BLOCK_M), Hq, B); Q, O: [T, Hq, Dh]; K, V: [T, Hk, Dh]; PK, PV: [P, Hk, Dh]
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
def _varlen_attention_packed_kernel(
    Q, K, V, PK, PV, O, CU_SEQLENS,
    n_prefix, qk_scale,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(max_seqlen * G, BLOCK_M), Hk, B); Q, O: [T, Hq, Dh]; K, V: [T, Hk, Dh]; PK, PV: [P, Hk, Dh]
    # a tile's rows are (token, head) pairs, token-major: row r is token r // G of query head kv_head * G + r % G
    GROUP: tl.constexpr = N_Q_HEADS // N_KV_HEADS
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the last tiles see the most keys: launch them first
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen * GROUP:
        return

    q_stride = N_Q_HEADS * HEAD_DIM
    kv_stride = N_KV_HEADS * HEAD_DIM
    rows = m_start + tl.arange(0, BLOCK_M)
    tok = rows // GROUP  # [BLOCK_M] local query positions
    row_ok = rows < seqlen * GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # each row is HEAD_DIM contiguous elements at a multiple of HEAD_DIM: 16-byte loads and stores
    qo_rows = (start + tok).to(tl.int64) * q_stride + (kv_head * GROUP + rows % GROUP) * HEAD_DIM
    q = tl.load(Q + qo_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # keys in one index space c = [prefix ++ own]: c < P is prefix key c, else own key c - P; a row of token t
    # sees c iff c - P <= t (the prefix always). Key tiles start at c = 0 and may hold both kinds: a query tile
    # whose last token is t visits cdiv(P + t + 1, BLOCK_N) of them, not cdiv(P, BLOCK_N) + cdiv(t + 1, BLOCK_N)
    t_first = m_start // GROUP
    n_end = n_prefix + tl.minimum((m_start + BLOCK_M - 1) // GROUP + 1, seqlen)  # keys past the last row's token
    n_full = (n_prefix + t_first + 1) // BLOCK_N * BLOCK_N  # tiles before this are visible to every row
    kv_off = kv_head * HEAD_DIM

    for n in range(0, n_full, BLOCK_N):
        cols = n + offs_n
        k_ptrs, v_ptrs = _kv_ptrs(K, V, PK, PV, start, cols, offs_d, n_prefix, kv_stride, kv_off, HAS_PREFIX)
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, None, False, PRECISION, UPCAST_DOT)

    # the diagonal: causal mask per row's token; c = 0 is in the first tile visited and visible to every row,
    # so m_i is finite before any fully masked row of a tile here (rows past the sequence are never stored)
    for n in range(n_full, n_end, BLOCK_N):
        cols = n + offs_n
        col_ok = cols < n_end
        k_ptrs, v_ptrs = _kv_ptrs(K, V, PK, PV, start, cols, offs_d, n_prefix, kv_stride, kv_off, HAS_PREFIX)
        k = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        visible = (cols[None, :] - n_prefix) <= tok[:, None]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, visible, True, PRECISION, UPCAST_DOT)

    acc = acc / l_i[:, None]
    tl.store(O + qo_rows[:, None] + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _kv_ptrs(K, V, PK, PV, start, cols, offs_d, n_prefix, kv_stride, kv_off, HAS_PREFIX: tl.constexpr):
    # cols: [BLOCK_N] key indices in [prefix ++ own] -> K pointers [Dh, BLOCK_N] (transposed, so q @ k needs no
    # tl.trans) and V pointers [BLOCK_N, Dh]. The prefix/own choice is made on the 2-D pointers: Triton's
    # alignment analysis drops to 1 element through a select of 1-D row pointers (scalar loads, no cp.async),
    # while a select whose condition is constant along Dh keeps the 16-byte loads.
    own = (start + cols - n_prefix).to(tl.int64) * kv_stride + kv_off
    k_ptrs = K + own[None, :] + offs_d[:, None]
    v_ptrs = V + own[:, None] + offs_d[None, :]
    if HAS_PREFIX:
        in_prefix = cols < n_prefix
        pre = cols.to(tl.int64) * kv_stride + kv_off
        k_ptrs = tl.where(in_prefix[None, :], PK + pre[None, :] + offs_d[:, None], k_ptrs)
        v_ptrs = tl.where(in_prefix[:, None], PV + pre[:, None] + offs_d[None, :], v_ptrs)
    return k_ptrs, v_ptrs


def _attention_config(head_dim: int, dtype: torch.dtype, pack_gqa: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N must divide BLOCK_M unless pack_gqa.

    The packed kernel holds the same tiles as the per-head one and takes the same sizes for now: compiled for
    sm_90 (bf16, head_dim 128) it needs 185 registers, no spills, 128 KiB shared memory, 16-byte cp.async
    loads. Whether its short key loops want fewer stages or smaller tiles is for a GPU to say."""
    del pack_gqa  # the same sizes for both kernels until measured
    if _triton_env.INTERPRET:
        # small tiles keep CPU tests quick; BLOCK_N < BLOCK_M like on GPUs, so the diagonal spans two key tiles
        # (packed: with G = 7 a 32-row tile ends mid-token, and holds rows of up to 6 tokens)
        return 32, 16, 1, 1
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMAs, not tensor cores; larger tiles spill registers at head_dim 128 (ptxas, sm_90)
        return 32, 16, 8, 2
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
    pack_gqa: bool = False,
) -> torch.Tensor:
    """Causal attention of each packed sequence over [shared prefix ++ its own keys].

    q: [T, Hq, Dh]; k, v: [T, Hk, Dh] with Hq % Hk == 0; cu_seqlens: [B+1] int32 on q's device;
    max_seqlen: host int >= every sequence length (sizes the grid without a device sync);
    prefix_k, prefix_v: [P, Hk, Dh] or None. Returns o [T, Hq, Dh] in q's dtype.
    pack_gqa: the kernel whose tiles hold the Hq / Hk query heads of a KV head together (module docstring).
    """
    check_launchable(q, "varlen_attention")
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "varlen_attention: q, k, v must be [T, H, Dh]"
    T, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    assert k.shape == (T, n_kv_heads, head_dim) and v.shape == k.shape, (
        f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [{T}, Hk, {head_dim}]"
    )
    assert n_q_heads % n_kv_heads == 0, f"varlen_attention: Hq={n_q_heads} is not a multiple of Hk={n_kv_heads}"
    assert head_dim in (16, 32, 64, 128), f"varlen_attention: head_dim must be 16, 32, 64 or 128, got {head_dim}"
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
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (
        f"varlen_attention: out must be contiguous {tuple(q.shape)} {q.dtype}"
    )
    n_seqs = cu_seqlens.shape[0] - 1
    assert n_seqs < 65536, f"varlen_attention: {n_seqs} sequences exceed the grid's third axis (65535)"
    if T == 0 or n_seqs <= 0 or max_seqlen <= 0:
        return out

    block_m, block_n, num_warps, num_stages = _attention_config(head_dim, q.dtype, pack_gqa)
    if pack_gqa:
        kernel = _varlen_attention_packed_kernel
        grid = (triton.cdiv(max_seqlen * (n_q_heads // n_kv_heads), block_m), n_kv_heads, n_seqs)
    else:
        kernel = _varlen_attention_kernel
        grid = (triton.cdiv(max_seqlen, block_m), n_q_heads, n_seqs)
    has_prefix = n_prefix > 0
    kernel[grid](
        q, k, v,
        prefix_k if has_prefix else k, prefix_v if has_prefix else v,
        out, cu_seqlens,
        n_prefix, scale * _LOG2E,
        N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_PREFIX=has_prefix,
        # fp32 inputs would otherwise run the dots in TF32 and miss an fp32 reference by ~1e-3
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # the interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot; fp32 tiles give the bf16 answer
        UPCAST_DOT=_triton_env.INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out

