"""A packed varlen batch's int32 inputs, built on the host in one buffer and sent with one copy.

Layout of the buffer (all int32), for n_tokens T (padded or not), n_slots B and n_keep K:

    [ input_ids: T | positions: 3 x T (rows t, h, w) | cu_seqlens: B + 1 | keep: K ]

`keep` lists the rows of the model's output to return (the cut at drop_idx done on the device by one gather).
The eager path packs exactly the batch; the CUDA-graph path pads it to a bucket of T tokens and a fixed number of
slots (see graph_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Layout:
    n_tokens: int
    n_slots: int
    n_keep: int

    @property
    def size(self) -> int:
        return 4 * self.n_tokens + self.n_slots + 1 + self.n_keep

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [T], positions [3, T], cu_seqlens [B+1], keep [K]) as views of `buf`."""
        T, B = self.n_tokens, self.n_slots
        ids = buf[:T]
        pos = buf[T:4 * T].view(3, T)
        cu = buf[4 * T:4 * T + B + 1]
        keep = buf[4 * T + B + 1:self.size]
        return ids, pos, cu, keep


@dataclass(slots=True)
class HostBatch:
    """What the model needs, on the host: `buf` follows `layout`; `max_seqlen` is the longest real sequence."""

    buf: torch.Tensor
    layout: Layout
    n_real_tokens: int
    n_seqs: int
    max_seqlen: int


def pack(seqs: list[list[int]], positions: list[np.ndarray], keep_from: list[int] | None,
         n_tokens: int | None = None, n_slots: int | None = None, pad_pos_start: int = 0,
         out: torch.Tensor | None = None) -> HostBatch:
    """seqs: token ids of each sequence (what the model computes); positions: [3, len] int per sequence;
    keep_from: per sequence, the first row to return (None: return every row);
    n_tokens / n_slots: pad to this many tokens / sequence slots (graphs). Padding tokens form one dummy
    sequence in the last slot, empty slots before it have length 0. `out`: a (pinned) int32 buffer to fill."""
    lens = [len(s) for s in seqs]
    T = sum(lens)
    n_tokens = T if n_tokens is None else n_tokens
    n_slots = len(seqs) if n_slots is None else n_slots
    assert T <= n_tokens and len(seqs) <= n_slots, "batch does not fit the padded shape"
    assert n_tokens == T or n_slots > len(seqs), "padding tokens need a free slot for their dummy sequence"
    starts = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    if keep_from is None:
        keep = np.arange(T, dtype=np.int32)
    else:
        keep = np.concatenate([np.arange(s + k, e, dtype=np.int32)
                               for s, e, k in zip(starts[:-1], starts[1:], keep_from)] or [np.zeros(0, np.int32)])
    layout = Layout(n_tokens, n_slots, len(keep))
    if out is None or out.numel() < layout.size:
        out = torch.empty(layout.size, dtype=torch.int32)
    ids, pos, cu, kp = (v.numpy() for v in layout.views(out))
    if T:
        ids[:T] = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=T)
        pos[:, :T] = np.concatenate(positions, axis=1)
    if n_tokens > T:  # the dummy sequence: any valid token, positions after the prefix
        ids[T:] = 0
        pos[:, T:] = pad_pos_start + np.arange(n_tokens - T, dtype=np.int32)
    cu[:len(seqs) + 1] = starts
    cu[len(seqs) + 1:] = T
    cu[-1] = n_tokens
    kp[:] = keep
    return HostBatch(out, layout, T, len(seqs), max(lens, default=0))


def text_positions(start: int, length: int) -> np.ndarray:
    """Text-only M-RoPE positions: three equal rows start .. start + length - 1, as [3, length] int32."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (3, length))


class Staging:
    """A reusable pinned host buffer for the one host-to-device copy per batch.

    Before it is refilled, waits until the copy that last read it has run (usually long done)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buf: torch.Tensor | None = None
        self.event = torch.cuda.Event() if self.pinned else None
        self.used = False

    def acquire(self, n: int) -> torch.Tensor | None:
        if not self.pinned:
            return None  # on the CPU the model reads the host buffer itself: a fresh one per batch
        if self.used:
            self.event.synchronize()
        if self.buf is None or self.buf.numel() < n:
            size = 1 << max(12, (n - 1).bit_length())
            self.buf = torch.empty(size, dtype=torch.int32, pin_memory=True)
        return self.buf

    def to_device(self, host: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """Copies `host` (a prefix of the staging buffer) to `dst` or a new device tensor, without blocking."""
        if not self.pinned:
            return host if dst is None else dst.copy_(host)
        if dst is None:
            dst = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        dst.copy_(host, non_blocking=True)
        self.event.record()
        self.used = True
        return dst
