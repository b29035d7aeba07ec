"""The kernel backend: our packed-varlen Qwen2.5-VL text decoder with a template prefix cache and CUDA graphs.

Per batch: the host packs token ids, M-RoPE positions, cu_seqlens and the rows to keep into one int32 buffer
(one non-blocking copy), the model runs over the packed tokens (only the user part when the template prefix's
keys and values are cached), one gather cuts at drop_idx, and the prompts come back as views of one [sum L_i, D]
tensor. Nothing in between waits for the device.

i2i: the batch's distinct images (by digest of their bytes) that are not in the image-feature cache run through
our vision tower (workers.model.qwen2_5_vl_vision) in one packed forward; their features replace the image-pad
rows' embeddings in order, and the sequences get Qwen2.5-VL's 3-D M-RoPE positions (workers.model.mrope_positions).
The template prefix is text, at positions 0..P-1 on all three rows, so its cached keys and values serve i2i
sequences too.

A job's prompts that share their images (a CFG pair: the prompt and " ") also share every token up to where the
prompts' text begins: the template, the pictures, their image tokens. An eager batch computes such a shared
part once: a first forward runs one copy of each group's shared part and keeps its keys and values, a second runs
every sequence's own tokens, which see their group's part as earlier keys (kernels.Segments). Causal attention
makes the shared rows the same for every member, so each member's output takes them from the first forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from broker.errors import InvalidRequest, ModelLoadError
from workers.encoders.base import EncoderBase, TokenizedPrompts
from workers.encoding_cache import EncodingCache
from workers.images import PreparedImage
from workers.model.batch import HostBatch, Staging, pack, text_positions
from workers.model.mrope_positions import mrope_positions
from workers.model.ops import KernelOptions, log_once
from workers.model.qwen2_5_vl_text import PrefixKV, SegmentKV, load_model
from workers.templates import template_for

log = logging.getLogger(__name__)

# a shared part shorter than this is computed per sequence: a second forward's launches cost more than it saves
MIN_SHARED_TOKENS = 64
# Switches for experiments, not for configs: tests and benchmarks flip the encoder's attributes of the same
# name (prefix_cache, share_job_prefixes) to compare against the plain computation.
PREFIX_CACHE = True  # the template prefix's keys and values computed once per task and reused
SHARE_JOB_PREFIXES = True  # a job's prompts' shared part computed once (see above)
CUDA_GRAPHS = True  # on CUDA: captured graphs for small eager batches (workers.model.graph_runner's buckets)


@dataclass(frozen=True, slots=True)
class SharedPart:
    """Sequences `members` of a batch agree on `length` tokens after the prefix, image tokens included."""

    members: tuple[int, ...]
    length: int


def shared_parts(batch: TokenizedPrompts, P: int, image_token_id: int,
                 min_tokens: int = MIN_SHARED_TOKENS) -> list[SharedPart]:
    """Groups of two or more sequences with the same images whose ids agree from P on for at least `min_tokens`,
    past their last image token; each member keeps at least one token of its own."""
    by_images: dict[tuple[bytes, ...], list[int]] = {}
    for i in range(len(batch.ids)):
        images = batch.images_of(i)
        if images:
            by_images.setdefault(tuple(im.digest for im in images), []).append(i)
    parts = []
    for members in by_images.values():
        if len(members) < 2:
            continue
        seqs = [batch.ids[i] for i in members]
        end = min(map(len, seqs)) - 1
        first = np.asarray(seqs[0][P:end])
        differ = np.zeros(len(first), dtype=bool)
        for s in seqs[1:]:
            differ |= np.asarray(s[P:end]) != first
        n = int(differ.argmax()) if differ.any() else len(first)
        if n >= min_tokens and not any(image_token_id in s[P + n:] for s in seqs):
            parts.append(SharedPart(tuple(members), n))
    return parts


class KernelEncoder(EncoderBase):
    """Options: image_cache_max_bytes (256 MiB of image features kept on the device, by image digest; 0: off),
    quantization (None; "fp8": the decoder's linear layers in e4m3, workers.model.fp8), and the switches of
    workers.model.ops.KernelOptions (tests and benchmarks pick implementations with them). The vision tower is
    loaded when the checkpoint has processor/ and visual.* weights."""

    backend = "kernel"

    def __init__(self, paths, config, tokenizer, device, dtype, max_prompt_tokens, **options):
        super().__init__(paths, config, tokenizer, device, dtype, max_prompt_tokens)
        options = dict(options)
        self.prefix_cache = PREFIX_CACHE
        self.share_job_prefixes = SHARE_JOB_PREFIXES
        self.quantization = options.pop("quantization", None)
        self.feature_cache = EncodingCache(int(options.pop("image_cache_max_bytes", 256 << 20)))
        kernel_options = KernelOptions.from_options(options)
        if options:
            raise ModelLoadError(f"unknown kernel encoder options: {', '.join(sorted(options))}")
        self.model = load_model(paths.text_encoder, config, device, dtype, kernel_options, self.quantization)
        self.vision = None
        if paths.processor is not None:
            from workers.model.qwen2_5_vl_vision import has_vision_weights, load_vision

            if has_vision_weights(paths.text_encoder):
                self.vision = load_vision(paths.text_encoder, config.raw, device, dtype, kernel_options)
        self.staging = Staging(device)
        self._prefix_ids = {
            task: tuple(tokenizer(template_for(task).prefix, add_special_tokens=False)["input_ids"])
            for task in ("t2i", "i2i")
        }
        self._prefixes: dict[str, PrefixKV] = {}
        self.graphs = None
        if CUDA_GRAPHS and device.type == "cuda":
            from workers.model.graph_runner import GraphRunner

            self.graphs = GraphRunner(self.model, device)
        if device.type == "cuda":
            self.warmup()

    def warmup(self, task: str = "t2i") -> None:
        """Computes the task's prefix keys and values and captures its CUDA graphs before the first request."""
        prefix = self.prefix_for(task) if self.prefix_cache else None
        if self.graphs is not None:
            self.graphs.capture(prefix)
        if self.vision is not None:
            self.vision.warmup()
            i2i_prefix = self.prefix_for("i2i") if self.prefix_cache else None
            if self.graphs is not None:  # i2i batches: the graphs that read spliced embeddings
                self.graphs.capture(i2i_prefix, embeds=True)

    def configure_images(self, limits=None, feature_cache_max_bytes: int | None = None) -> None:
        super().configure_images(limits, feature_cache_max_bytes)
        if feature_cache_max_bytes is not None:
            self.feature_cache = EncodingCache(feature_cache_max_bytes)

    def _check_i2i_available(self) -> None:
        if self.vision is None:
            raise InvalidRequest("this kernel encoder has no vision tower loaded (the checkpoint has no processor/ "
                                 "or no visual.* weights): it encodes text only")

    def image_features(self, images: list[PreparedImage]) -> dict[bytes, torch.Tensor]:
        """Features [n_tokens, D] on the device per distinct digest among `images` (occurrences, in order):
        from the cache, or from one vision forward over all the missing ones."""
        feats: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, PreparedImage] = {}
        for im in images:
            if im.digest in feats or im.digest in todo:
                continue
            hit = self.feature_cache.get(im.digest)
            if hit is not None:
                feats[im.digest] = hit
            else:
                todo[im.digest] = im
        if todo:
            run = list(todo.values())
            spec = self.images.spec  # resize, normalize, patchify on the device (workers.model.image_patches)
            pixel_values = torch.cat([im.pixel_values(spec, self.device) for im in run])  # [sum t*h*w, C*Tp*P*P]
            with torch.inference_mode():
                out = self.vision(pixel_values, [im.grid_thw for im in run])  # [sum n_tokens, D]
            for im, f in zip(run, torch.split(out, [im.n_tokens for im in run])):
                feats[im.digest] = f
                if self.feature_cache.max_bytes:
                    self.feature_cache.put(im.digest, f.clone())  # its own storage, not a view of the batch
        self.vision_images_computed += len(todo)
        self.vision_images_reused += len(images) - len(todo)
        return feats

    def image_inputs(self, batch: TokenizedPrompts) -> tuple[list[np.ndarray], torch.Tensor]:
        """(per sequence [3, len] M-RoPE positions, [N, D] image features in image-pad order) for an i2i batch."""
        self._check_i2i_available()
        images = [im for i in range(len(batch.ids)) for im in batch.images_of(i)]
        feats = self.image_features(images)
        extra = torch.cat([feats[im.digest] for im in images])  # [N image tokens, D]
        merge, pad = self.vision.args.merge_size, self.config.image_token_id
        positions = [mrope_positions(ids, [im.grid_thw for im in batch.images_of(i)], pad, merge)
                     for i, ids in enumerate(batch.ids)]
        return positions, extra

    def prefix_for(self, task: str) -> PrefixKV:
        """The task's template prefix keys and values, computed on first use and kept for the process."""
        prefix = self._prefixes.get(task)
        if prefix is None:
            prefix = self._prefixes[task] = self.model.compute_prefix(list(self._prefix_ids[task]))
        return prefix

    def _usable_prefix(self, batch: TokenizedPrompts) -> PrefixKV | None:
        if not self.prefix_cache:
            return None
        want = self._prefix_ids.get(batch.task)
        P = batch.drop_idx
        if want is None or len(want) != P:
            return None
        for ids in batch.ids:
            if len(ids) < P or tuple(ids[:P]) != want:
                # e.g. a prompt that starts with a newline: BPE merges it into the template's last token
                log_once(f"prefix cache: a {batch.task} sequence does not start with the template prefix; "
                         "such batches run uncached", logging.DEBUG)
                return None
        return self.prefix_for(batch.task)

    @torch.inference_mode()
    def encode_packed(self, batch: TokenizedPrompts, positions: list[np.ndarray] | None = None,
                      extra_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Returns (packed [sum L_i, D] on the device, lengths L_i): prompt i is rows sum(L_<i) ... + L_i.

        positions: per sequence, [3, len(ids_i)] M-RoPE positions of the whole templated sequence (default:
        text positions 0..len-1 on all three rows); extra_embeds: [N, D] rows replacing, in order, the
        embeddings of the image-pad tokens after the prefix (HF's masked_scatter). Both are for images; left
        out for a batch with images, they are computed here (vision tower, feature cache, M-RoPE positions).
        """
        if extra_embeds is None and batch.has_images:
            image_positions, extra_embeds = self.image_inputs(batch)
            positions = positions if positions is not None else image_positions
        prefix = self._usable_prefix(batch)
        P = 0 if prefix is None else prefix.length
        drop = batch.drop_idx
        seqs = [ids[P:] for ids in batch.ids]  # the tokens the model computes
        if positions is None:
            pos = [text_positions(P, len(s)) for s in seqs]
        else:
            pos = [np.ascontiguousarray(p)[:, P:] for p in positions]
        lengths = [len(ids) - drop for ids in batch.ids]
        keep_from = None if P == drop else [drop - P] * len(seqs)
        if sum(lengths) == 0:
            return torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device), lengths

        bucket = None
        if self.graphs is not None:
            bucket = self.graphs.bucket_for(sum(map(len, seqs)), len(seqs))
        if bucket is not None:
            hb = self.graphs.pack(seqs, pos, keep_from, bucket, prefix, self.staging)
            return self.graphs.run(hb, prefix, self.staging, extra_embeds, self.config.image_token_id), lengths

        parts = shared_parts(batch, P, self.config.image_token_id) if self.share_job_prefixes else []
        if parts:
            return self._encode_sharing(batch, parts, seqs, pos, drop - P, prefix, extra_embeds), lengths
        return self._forward_eager(seqs, pos, prefix, extra_embeds, keep_from), lengths

    def _encode_sharing(self, batch: TokenizedPrompts, parts: list[SharedPart], seqs, pos, keep_from: int,
                        prefix: PrefixKV | None, extra_embeds: torch.Tensor | None) -> torch.Tensor:
        """Two forwards (see the module docstring): each part once, then every sequence's own tokens after it.
        seqs, pos: what each sequence computes (after the prefix); keep_from: its first row returned."""
        n_seqs = len(seqs)
        part_of = {i: (g, part.length) for g, part in enumerate(parts) for i in part.members}
        # image rows of extra_embeds, per sequence, in image-pad order
        n_pads = [sum(im.n_tokens for im in batch.images_of(i)) for i in range(n_seqs)]
        pad_at = np.concatenate([[0], np.cumsum(n_pads)]).tolist()

        def image_rows(seq_ids):
            if extra_embeds is None:
                return None
            rows = [extra_embeds[pad_at[i]:pad_at[i + 1]] for i in seq_ids if n_pads[i]]
            return torch.cat(rows) if rows else None

        firsts = [part.members[0] for part in parts]
        kv: list = []
        out1 = self._forward_eager([seqs[i][:part.length] for i, part in zip(firsts, parts)],
                                   [pos[i][:, :part.length] for i, part in zip(firsts, parts)],
                                   prefix, image_rows(firsts), None, kv_out=kv)
        part_at = np.concatenate([[0], np.cumsum([part.length for part in parts])]).tolist()
        own = [part_of.get(i, (None, 0)) for i in range(n_seqs)]  # (part, its length) per sequence
        seg_start = [part_at[g] if g is not None else 0 for g, _ in own]
        seg_len = [n for _, n in own]
        segments = SegmentKV(kv, self._device_int32(seg_start), self._device_int32(seg_len))
        out2 = self._forward_eager([s[n:] for s, (_, n) in zip(seqs, own)], [p[:, n:] for p, (_, n) in zip(pos, own)],
                                   prefix, image_rows([i for i in range(n_seqs) if i not in part_of]), None,
                                   segments=segments)
        # each sequence's rows from keep_from on: its part's (from the first forward), then its own
        T1, at2, rows = out1.shape[0], 0, []
        for i, s in enumerate(seqs):
            g, n = own[i]
            if g is not None:
                rows.append(np.arange(part_at[g] + min(keep_from, n), part_at[g] + n))
            rows.append(T1 + at2 + np.arange(max(keep_from - n, 0), len(s) - n))
            at2 += len(s) - n
        keep = self._device_int32(np.concatenate(rows)).long()
        return torch.cat((out1, out2)).index_select(0, keep)

    def _forward_eager(self, seqs, pos, prefix, image_rows, keep_from, kv_out=None, segments=None) -> torch.Tensor:
        """One forward over exactly `seqs`: [T, D], or the rows from keep_from on of each sequence."""
        hb = self._pack_eager(seqs, pos, keep_from)
        dev = self.staging.to_device(hb.buf[:hb.layout.size])
        ids, positions_t, cu, keep = hb.layout.views(dev)
        inputs_embeds = None
        if image_rows is not None:
            inputs_embeds = self.model.embed(ids)
            mask = (ids == self.config.image_token_id)[:, None]  # [T, 1]
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_rows.to(inputs_embeds.dtype))
        out = self.model(ids, positions_t, cu, hb.max_seqlen, prefix, inputs_embeds=inputs_embeds,
                         kv_out=kv_out, segments=segments)  # [T, D]
        return out if keep_from is None else out.index_select(0, keep)  # [sum L_i, D]: the cut at drop_idx

    def _device_int32(self, values) -> torch.Tensor:
        host = torch.as_tensor(np.asarray(values, dtype=np.int32))
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the queued forwards
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    def _pack_eager(self, seqs, pos, keep_from) -> HostBatch:
        T = sum(map(len, seqs))
        n_keep = T - sum(keep_from) if keep_from else T
        out = self.staging.acquire(4 * T + len(seqs) + 1 + n_keep)
        return pack(seqs, pos, keep_from, out=out)

    @torch.inference_mode()
    def encode_tokens(self, batch: TokenizedPrompts) -> list[torch.Tensor]:
        packed, lengths = self.encode_packed(batch)
        return list(torch.split(packed, lengths))
