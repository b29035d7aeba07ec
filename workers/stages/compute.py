"""The compute stage of the encoder worker (the main thread): runs each ready batch of jobs through the encoder and
hands it to delivery.

Distinct sequences run once (identical prompts in a batch, and the same images by digest); repeats of recent
ones come from the encoding cache (Links.cache); the rest run in token-budget chunks, the backend seeing only a
flat batch of token sequences. On a GPU the states are copied to pinned host memory without waiting: the
delivery stage waits for the copy, and keeps the new states in the cache, while the device starts the next
batch. Once a batch is computed its jobs' decoded images are let go of, and their pixels given back to the
worker's budget (workers.pixel_budget), whatever happened to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from workers.batching import split_by_tokens, unique_sequences
from workers.encoders.base import TokenizedPrompts
from workers.encoding_cache import cache_key
from workers.stages.links import Links
from workers.stages.types import Encoded, JobBatch, PreparedJob

log = logging.getLogger("workers")

EXPIRED = "client deadline passed before compute: not computed"


class Compute:
    def __init__(self, encoder, max_batch_tokens: int, links: Links):
        self.encoder = encoder  # its forward half (encode_packed, encode_tokens); intake uses its tokenize
        self.max_batch_tokens = max_batch_tokens
        self.links = links

    def run(self) -> None:
        """The compute thread (the worker's main thread): batches from `links.ready` to `links.done`."""
        while True:
            self.links.device_idle.set()
            batch = self.links.ready.get()
            if batch is None:
                break
            self.links.device_idle.clear()
            self.links.done.put(self.compute(batch))
        self.links.done.put(None)

    def compute(self, batch: JobBatch) -> Encoded:
        try:
            return self._encode(batch)
        finally:
            self.let_go_of_images(batch)

    def let_go_of_images(self, batch: JobBatch) -> None:
        """Drops the jobs' decoded images (delivery needs only their token ids) and releases their pixels."""
        pixels = 0
        for p in batch.jobs:
            if p.tokens.images is not None:
                p.tokens = dataclasses.replace(p.tokens, images=None)
            pixels, p.pixels = pixels + p.pixels, 0
        if pixels:
            self.links.pixels.release(pixels)

    def _encode(self, batch: JobBatch) -> Encoded:
        """Every job's tensors (CPU), computing each distinct sequence once and repeats from the cache;
        or the error of each job whose sequences failed, or whose client's deadline has passed (its client is
        gone: the batch's other jobs run without it)."""
        t0 = time.time()
        outputs, errors = {}, {}
        live = []
        for p in batch.jobs:
            if 0 < p.taken.request.deadline < t0:
                errors[p.taken.job_id] = EXPIRED
            else:
                live.append(p)
        computed = hits = misses = 0
        events, to_cache = [], []  # device-to-host copies in flight; new states for the cache, once copied
        computed_events = []
        vision_before = self._vision_counts()
        groups: dict[tuple[str, int], list[PreparedJob]] = {}  # raw inputs (drop_idx 0) run apart
        for p in live:
            groups.setdefault((p.tokens.task, p.tokens.drop_idx), []).append(p)
        for (task, drop), group in groups.items():
            # a sequence is its ids and its images' digests (i2i: same ids, other images -> another sequence)
            flat = [(p.tokens, i) for p in group for i in range(len(p.tokens.ids))]
            uniq, index = unique_sequences([t.sequence_key(i) for t, i in flat])
            uniq_images = None  # per unique sequence, its images
            if any(p.tokens.has_images for p in group):
                uniq_images = [()] * len(uniq)
                for (t, i), u in zip(flat, index):
                    uniq_images[u] = t.images_of(i)
            if self.links.cache.max_bytes:
                keys = [cache_key(self.encoder.model_id, task, drop, ids, digests) for ids, digests in uniq]
                with self.links.cache_lock:  # delivery fills it
                    states: list[torch.Tensor | None] = [self.links.cache.get(k) for k in keys]
            else:  # no cache: no keys to hash
                keys, states = [None] * len(uniq), [None] * len(uniq)
            hits += sum(s is not None for s in states)
            todo = [i for i, s in enumerate(states) if s is None]
            misses += len(todo)
            failed_seq: dict[int, str] = {}
            for chunk in split_by_tokens([len(uniq[i][0]) for i in todo], self.max_batch_tokens):
                idx = [todo[c] for c in chunk]
                sub_images = None if uniq_images is None else tuple(uniq_images[i] for i in idx)
                try:
                    res, copied = self._run_encoder(TokenizedPrompts(task, [list(uniq[i][0]) for i in idx], drop,
                                                                     sub_images))
                except Exception as e:  # a failing batch fails its jobs, never the worker
                    log.exception("encoder failed on a batch of %d sequence(s)", len(idx))
                    failed_seq.update((i, f"encoder failed: {type(e).__name__}: {e}") for i in idx)
                    continue
                if copied is not None:
                    computed_events.append(copied[0])
                    events.append(copied[1])
                for i, r in zip(idx, res):
                    states[i] = r
                    to_cache.append((keys[i], r))
                    computed += len(uniq[i][0])
            pos = 0
            for p in group:
                idx = index[pos:pos + len(p.tokens.ids)]
                pos += len(idx)
                bad = [failed_seq[i] for i in idx if i in failed_seq]
                if bad:
                    errors[p.taken.job_id] = bad[0]
                else:
                    outputs[p.taken.job_id] = [states[i] for i in idx]
        # Wait until the device has computed the batch (not for its copy to the host): "device idle" must mean
        # it, or the next batch would close at once with whatever little has arrived, queued behind this one.
        for ev in computed_events:
            ev.synchronize()
        vision = [a - b for a, b in zip(self._vision_counts(), vision_before)]
        return Encoded(batch, outputs, errors, t0, (time.time() - t0) * 1e3, computed, hits, misses, *vision,
                       copies=events, to_cache=to_cache, expired=len(batch.jobs) - len(live))

    def _vision_counts(self) -> tuple[int, int]:
        return (getattr(self.encoder, "vision_images_computed", 0), getattr(self.encoder, "vision_images_reused", 0))

    def _run_encoder(self, seqs: TokenizedPrompts) -> tuple[list[torch.Tensor], tuple | None]:
        """The sequences' states as CPU tensors and, on a GPU, the CUDA events (computed, copied): the states hold
        their values once `copied` has passed. With a packing backend: one device-to-host copy into pinned
        memory, which the delivery thread waits for while the device starts the next batch."""
        encode_packed = getattr(self.encoder, "encode_packed", None)
        if encode_packed is None:
            return [r.to("cpu").contiguous() for r in self.encoder.encode_tokens(seqs)], None
        on_gpu = self.encoder.device.type == "cuda"
        if on_gpu:
            self.links.launched.clear()
        try:
            packed, lengths = encode_packed(seqs)
            if packed.device.type != "cuda":
                return list(torch.split(packed, lengths)), None
            computed = torch.cuda.Event()
            computed.record()
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            return list(torch.split(host, lengths)), (computed, copied)
        finally:
            self.links.launched.set()

