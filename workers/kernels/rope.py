"""Qwen2.5-VL multimodal RoPE (M-RoPE), applied in place to q and k (rotate_half convention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton_env import check_launchable, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [3, T], inv_freq: [Dh/2] -> cos, sin: [T, Dh/2] fp32
    half = inv_freq.shape[0]
    s0, s1, _ = mrope_section
    j = torch.arange(half, device=positions.device)
    row = (j >= s0).long() + (j >= s0 + s1).long()  # frequency j takes the t, h or w position
    pos = positions.float()[row]  # [Dh/2, T]
    freqs = pos.t() * inv_freq.float()[None, :]
    return freqs.cos(), freqs.sin()


def apply_mrope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, Hq, Dh], k: [T, Hk, Dh], positions: [3, T] -> new (q, k), same shapes and dtypes
    cos, sin = _mrope_cos_sin(positions, inv_freq, mrope_section)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(
    X, t, n_heads, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # X: [T, n_heads, 2*HALF]; rotates all heads of token t in place; cos, sin: [BLOCK_HALF] fp32
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    ptr = X + t * n_heads * (2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    tl.store(ptr, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _mrope_kernel(
    Q, K, POS, INV_FREQ,
    T, n_q_heads, n_k_heads,
    HALF: tl.constexpr, S0: tl.constexpr, S01: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # one program per token; Q: [T, Hq, Dh], K: [T, Hk, Dh], POS: [3, T], INV_FREQ: [Dh/2] fp32
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF
    # frequency j rotates with the temporal, height or width position by its mrope section
    row = (j >= S0).to(tl.int64) + (j >= S01).to(tl.int64)
    pos = tl.load(POS + row * T + t, mask=jmask, other=0).to(tl.float32)
    inv_freq = tl.load(INV_FREQ + j, mask=jmask, other=0.0)
    # computed once per token and shared by every q and k head; fp32 like HF's cos/sin tables
    angle = pos * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    _rotate_heads(Q, t, n_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, t, n_k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def _mrope_config(n_q_heads: int, n_k_heads: int, half: int) -> tuple[int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HK, BLOCK_HALF, num_warps): a token's heads in one block, ~512 elements per warp."""
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(n_q_heads)
    block_hk = triton.next_power_of_2(n_k_heads)
    num_warps = max(1, min(8, block_hq * block_half // 512))
    return block_hq, block_hk, block_half, num_warps


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, Dh] and k [T, Hk, Dh] in place by M-RoPE; returns (q, k).

    positions: [3, T] int (t, h, w rows; equal for text tokens); inv_freq: [Dh/2] fp32;
    mrope_section: (s0, s1, s2) with s0 + s1 + s2 == Dh/2.
    """
    check_launchable(q, "apply_mrope")
    assert q.dim() == 3 and k.dim() == 3, (
        f"apply_mrope: q, k must be [T, H, Dh], got {tuple(q.shape)}, {tuple(k.shape)}"
    )
    T, n_q_heads, head_dim = q.shape
    assert k.shape[0] == T and k.shape[2] == head_dim, (
        f"apply_mrope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or head_dim"
    )
    assert head_dim % 2 == 0, f"apply_mrope: head_dim must be even, got {head_dim}"
    half = head_dim // 2
    assert q.dtype in _DTYPES and k.dtype == q.dtype, f"apply_mrope: q, k dtypes {q.dtype}, {k.dtype}"
    assert q.is_contiguous() and k.is_contiguous(), "apply_mrope: q and k must be contiguous"
    assert positions.shape == (3, T), f"apply_mrope: positions must be [3, {T}], got {tuple(positions.shape)}"
    assert not positions.is_floating_point() and positions.is_contiguous(), (
        f"apply_mrope: positions must be a contiguous integer tensor, got {positions.dtype}"
    )
    assert inv_freq.shape == (half,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous(), (
        f"apply_mrope: inv_freq must be contiguous fp32 [{half}], got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    )
    assert len(mrope_section) == 3 and sum(mrope_section) == half, (
        f"apply_mrope: mrope_section {tuple(mrope_section)} must have 3 parts summing to head_dim/2 = {half}"
    )
    assert q.device == k.device == positions.device == inv_freq.device, "apply_mrope: tensors on different devices"
    if T == 0:
        return q, k

    s0, s1, _ = (int(s) for s in mrope_section)
    block_hq, block_hk, block_half, num_warps = _mrope_config(n_q_heads, k.shape[1], half)
    _mrope_kernel[(T,)](
        q, k, positions, inv_freq,
        T, n_q_heads, k.shape[1],
        HALF=half, S0=s0, S01=s0 + s1,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q, k
