"""Recent encodings, content-addressed and bounded in bytes, so a prompt many clients send (a negative prompt
such as " ") is computed once. Keys cover everything the output depends on: the model, the task and its
template (through drop_idx and the token ids, which include the template), and image digests (later)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


def cache_key(model_id: str, task: str, drop_idx: int, ids, image_digests: tuple = ()) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{model_id}\0{task}\0{drop_idx}\0".encode())
    h.update(np.asarray(ids, dtype="<u4").tobytes())
    for d in image_digests:
        h.update(b"\0img" + d)
    return h.digest()


class EncodingCache:
    """An LRU of CPU tensors, at most `max_bytes` in all; 0 turns it off. Not thread-safe: the worker's compute and
    delivery threads share one under Links.cache_lock (workers.stages.links)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, key: bytes) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.nbytes
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
