"""Qwen2.5-VL's 3-D M-RoPE positions (rows t, h, w) for a sequence with images, as HF's `get_rope_index` gives them.

Text tokens count up by one on all three rows. A run of image tokens at position p, for a grid (t, h, w) of
patches merged m x m, takes positions t: p + [0 .. t/1), h: p + [0 .. h/m), w: p + [0 .. w/m) over the
(t, h/m, w/m) grid in row-major order; the text after it continues at p + max(h, w) / m. (transformers 5.x,
Qwen2_5_VLModel.get_rope_index with get_vision_position_ids; still images use a time interval of 1.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_positions(start: int, grid_thw: Sequence[int], merge: int) -> np.ndarray:
    """[3, t * h/m * w/m] positions of one image's tokens placed at `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def mrope_positions(ids: Sequence[int] | np.ndarray, grids: Sequence[Sequence[int]], image_token_id: int,
                    merge: int) -> np.ndarray:
    """ids: one sequence's token ids [L] with each image's pad tokens expanded; grids: (t, h, w) per image in
    order. Returns [3, L] int32. Each maximal run of image tokens is one image; its length must match its grid."""
    ids = np.asarray(ids)
    L = ids.shape[0]
    is_img = ids == image_token_id
    if not is_img.any():
        if grids:
            raise ValueError(f"{len(grids)} image grid(s) given for a sequence without image tokens")
        return np.broadcast_to(np.arange(L, dtype=np.int32), (3, L)).copy()
    # boundaries of the runs of equal token type: [start, end) per run
    change = np.flatnonzero(is_img[1:] != is_img[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [L]])
    out = np.empty((3, L), dtype=np.int64)
    pos, g = 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        if not is_img[s]:
            out[:, s:e] = np.arange(pos, pos + e - s)
            pos += e - s
            continue
        if g >= len(grids):
            raise ValueError(f"more image-token runs than the {len(grids)} image grid(s) given")
        t, h, w = (int(x) for x in grids[g])
        n = t * (h // merge) * (w // merge)
        if e - s != n:
            raise ValueError(f"image {g}: {e - s} image tokens in the sequence, its grid {(t, h, w)} needs {n}")
        out[:, s:e] = image_positions(pos, (t, h, w), merge)
        pos += max(h, w) // merge
        g += 1
    if g != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) given, {g} image-token run(s) in the sequence")
    return out.astype(np.int32)
