"""The fused QKV projection's output split into q, k, v heads, with M-RoPE applied to q and k, in one launch.

Replaces, per layer, three `.reshape(...).contiguous()` copies and the in-place M-RoPE kernel: the [T, q + 2kv]
GEMM output is read once and q, k, v are written once (q and k rotated, v copied bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton_env import check_launchable, tl, triton
from .rope import apply_mrope_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def qkv_rope_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    n_q_heads: int,
    n_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv: [T, (Hq + 2Hk) * Dh], positions: [3, T], inv_freq: [Dh/2] -> q [T, Hq, Dh], k, v [T, Hk, Dh], contiguous
    T = qkv.shape[0]
    head_dim = 2 * inv_freq.shape[0]
    q, k, v = qkv.split((n_q_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    q, k = apply_mrope_ref(q.reshape(T, n_q_heads, head_dim), k.reshape(T, n_kv_heads, head_dim),
                           positions, inv_freq, mrope_section)  # new contiguous tensors
    return q, k, v.reshape(T, n_kv_heads, head_dim).contiguous()


@triton.jit
def _qkv_rope_kernel(
    QKV, Q, K, V, POS, INV_FREQ,
    T,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    S0: tl.constexpr, S01: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # grid (T, cdiv(Hq + 2Hk, BLOCK_H)); QKV: [T, (Hq + 2Hk) * Dh]; Q: [T, Hq, Dh]; K, V: [T, Hk, Dh];
    # POS: [3, T]; INV_FREQ: [Dh/2] fp32. Program (t, b) moves heads b*BLOCK_H ... of token t, counted along
    # QKV's row: q heads 0..Hq-1, then k heads, then v heads.
    HEAD_DIM = 2 * HALF
    N_HEADS = N_Q_HEADS + 2 * N_KV_HEADS
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF

    # frequency j rotates with the temporal, height or width position by its mrope section (fp32, like HF)
    row = (j >= S0).to(tl.int64) + (j >= S01).to(tl.int64)
    pos = tl.load(POS + row * T + t, mask=jmask, other=0).to(tl.float32)
    angle = pos * tl.load(INV_FREQ + j, mask=jmask, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]

    mask = (heads[:, None] < N_HEADS) & jmask[None, :]
    src = QKV + t * (N_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)  # first half of each head, [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    r1 = (f1 * cos - f2 * sin).to(Q.dtype.element_ty)
    r2 = (f2 * cos + f1 * sin).to(Q.dtype.element_ty)

    is_q = heads < N_Q_HEADS
    is_k = (heads >= N_Q_HEADS) & (heads < N_Q_HEADS + N_KV_HEADS)
    is_v = (heads >= N_Q_HEADS + N_KV_HEADS) & (heads < N_HEADS)
    # each head goes to exactly one of q, k, v; the other two stores are masked off (offsets kept in range)
    q_head = tl.where(is_q, heads, 0)
    k_head = tl.where(is_k, heads - N_Q_HEADS, 0)
    v_head = tl.where(is_v, heads - N_Q_HEADS - N_KV_HEADS, 0)
    q_dst = Q + t * (N_Q_HEADS * HEAD_DIM) + q_head[:, None] * HEAD_DIM + j[None, :]
    k_dst = K + t * (N_KV_HEADS * HEAD_DIM) + k_head[:, None] * HEAD_DIM + j[None, :]
    v_dst = V + t * (N_KV_HEADS * HEAD_DIM) + v_head[:, None] * HEAD_DIM + j[None, :]
    q_mask = mask & is_q[:, None]
    k_mask = mask & is_k[:, None]
    v_mask = mask & is_v[:, None]
    tl.store(q_dst, r1, mask=q_mask)
    tl.store(q_dst + HALF, r2, mask=q_mask)
    tl.store(k_dst, r1, mask=k_mask)
    tl.store(k_dst + HALF, r2, mask=k_mask)
    tl.store(v_dst, x1, mask=v_mask)
    tl.store(v_dst + HALF, x2, mask=v_mask)


def _qkv_rope_config(n_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): ~1024 elements per program (8 heads at Dh 128: 5 programs per token of
    the 7B's 36 heads), 4 warps = 128 lanes x 8 elements, one 16-byte access per lane per half at 16 bits."""
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 512 // block_half))
    num_warps = max(1, min(8, block_h * 2 * block_half // 256))
    return block_h, block_half, num_warps


def qkv_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    n_q_heads: int,
    n_kv_heads: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (Hq + 2Hk) * Dh] into q [T, Hq, Dh] and k [T, Hk, Dh] rotated by M-RoPE and v [T, Hk, Dh].

    qkv: contiguous, q columns first, then k, then v (the fused projection's output, bias included);
    positions: [3, T] int (t, h, w rows; equal for text tokens); inv_freq: [Dh/2] fp32 (gives Dh);
    mrope_section: (s0, s1, s2) with s0 + s1 + s2 == Dh/2. Same results as `apply_mrope_ref` on the split.
    out: (q, k, v) contiguous buffers to write, else new ones. qkv is only read.
    """
    check_launchable(qkv, "qkv_rope")
    assert qkv.dim() == 2, f"qkv_rope: qkv must be [T, (Hq + 2Hk) * Dh], got shape {tuple(qkv.shape)}"
    T, width = qkv.shape
    half = inv_freq.shape[0] if inv_freq.dim() == 1 else -1
    head_dim = 2 * half
    n_heads = n_q_heads + 2 * n_kv_heads
    assert n_q_heads > 0 and n_kv_heads > 0 and width == n_heads * head_dim, (
        f"qkv_rope: qkv width {width} != (Hq={n_q_heads} + 2 * Hk={n_kv_heads}) * Dh={head_dim}"
    )
    assert qkv.dtype in _DTYPES, f"qkv_rope: unsupported dtype {qkv.dtype}"
    assert qkv.is_contiguous(), "qkv_rope: qkv must be contiguous"
    assert positions.shape == (3, T), f"qkv_rope: positions must be [3, {T}], got {tuple(positions.shape)}"
    assert not positions.is_floating_point() and positions.is_contiguous(), (
        f"qkv_rope: positions must be a contiguous integer tensor, got {positions.dtype}"
    )
    assert inv_freq.dtype == torch.float32 and inv_freq.is_contiguous(), (
        f"qkv_rope: inv_freq must be contiguous fp32 [Dh/2], got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    )
    assert len(mrope_section) == 3 and sum(mrope_section) == half, (
        f"qkv_rope: mrope_section {tuple(mrope_section)} must have 3 parts summing to head_dim/2 = {half}"
    )
    assert qkv.device == positions.device == inv_freq.device, "qkv_rope: tensors on different devices"
    shapes = ((T, n_q_heads, head_dim), (T, n_kv_heads, head_dim), (T, n_kv_heads, head_dim))
    if out is None:
        out = tuple(torch.empty(s, dtype=qkv.dtype, device=qkv.device) for s in shapes)
    for name, o, s in zip("qkv", out, shapes):
        assert o.shape == s and o.dtype == qkv.dtype and o.is_contiguous() and o.device == qkv.device, (
            f"qkv_rope: out {name} must be contiguous {s} {qkv.dtype} on {qkv.device}, got {tuple(o.shape)} {o.dtype}"
        )
    q, k, v = out
    if T == 0:
        return q, k, v

    s0, s1, _ = (int(s) for s in mrope_section)
    block_h, block_half, num_warps = _qkv_rope_config(n_heads, half)
    _qkv_rope_kernel[(T, triton.cdiv(n_heads, block_h))](
        qkv, q, k, v, positions, inv_freq,
        T,
        N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads, HALF=half,
        S0=s0, S01=s0 + s1,
        BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q, k, v
