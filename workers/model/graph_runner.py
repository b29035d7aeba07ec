"""CUDA graphs for small token counts, the latency path (nano-vllm style: only this runner touches graphs).

A graph freezes every shape and every kernel grid, so each bucket fixes:
- n_tokens N (the bucket): a batch of T <= N real tokens is padded with one dummy sequence of N - T tokens;
- n_slots = max_seqs + 1 sequence slots: cu_seqlens is always [max_seqs + 2]; unused slots have length 0
  and the dummy takes the last one (its outputs are never read);
- max_seqlen = N: the attention grids (Triton's cdiv(max_seqlen, BLOCK_M) x Hq x n_slots, flash's likewise)
  are sized for the worst case; programs of query tiles past a sequence's end exit at once;
- the prefix (its k/v tensors are read in place): graphs are captured per prefix (per task), lazily;
- the input: token ids (t2i), or embeddings (i2i: image features spliced in), a second set of graphs that read
  one static embeddings buffer, filled before each replay by the embedding lookup and the splice.
All buckets read one static int32 input buffer (layout of batch.py, at the bucket's N) and write one static
output buffer; a replay's output is copied out by the gather that keeps the wanted rows.
Batches that fit no bucket run eagerly. On a CPU there is no runner (the encoder builds one only on CUDA;
tests drive its buffer logic on the CPU by replacing `_capture_one` with an eager replay).
"""

from __future__ import annotations

import logging
import time

import torch

from workers.model.batch import HostBatch, Layout, Staging, pack, text_positions
from workers.model.qwen2_5_vl_text import PrefixKV, Transformer

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


class GraphRunner:
    def __init__(self, model: Transformer, device: torch.device, max_tokens: int = 512, max_seqs: int = 16,
                 buckets: tuple[int, ...] | None = None):
        self.model = model
        self.device = device
        self.buckets = tuple(sorted(b for b in (buckets or DEFAULT_BUCKETS) if b <= max_tokens))
        assert self.buckets, f"no CUDA-graph bucket is <= max_tokens={max_tokens}"
        self.max_seqs = max_seqs
        self.n_slots = max_seqs + 1
        top = self.buckets[-1]
        self.static_in = torch.zeros(Layout(top, self.n_slots, top).size, dtype=torch.int32, device=device)
        self.static_out = torch.zeros(top, model.args.dim, dtype=model.tok_embeddings.weight.dtype, device=device)
        self.static_embeds: torch.Tensor | None = None  # [top, D], made with the first embeddings graphs
        # (id(prefix), bucket, reads embeddings) -> graph
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.prefixes: dict[int, PrefixKV | None] = {}  # keeps captured prefixes alive (their ids are keys)
        self.pool = None

    def bucket_for(self, n_tokens: int, n_seqs: int) -> int | None:
        if n_seqs > self.max_seqs or n_tokens == 0:
            return None
        for b in self.buckets:
            if n_tokens <= b:
                return b
        return None

    def pack(self, seqs, positions, keep_from, bucket: int, prefix: PrefixKV | None,
             staging: Staging) -> HostBatch:
        """The batch at the bucket's static layout, in the staging buffer."""
        n_keep = sum(len(s) - k for s, k in zip(seqs, keep_from)) if keep_from else sum(map(len, seqs))
        out = staging.acquire(Layout(bucket, self.n_slots, n_keep).size)
        P = 0 if prefix is None else prefix.length
        return pack(seqs, positions, keep_from, n_tokens=bucket, n_slots=self.n_slots, pad_pos_start=P, out=out)

    def run(self, hb: HostBatch, prefix: PrefixKV | None, staging: Staging, extra_embeds: torch.Tensor | None = None,
            image_token_id: int | None = None) -> torch.Tensor:
        """Replays the bucket's graph on `hb` (from `pack`); returns the kept rows [K, D], a new tensor.
        extra_embeds: [M, D] rows replacing, in order, the embeddings of the `image_token_id` tokens (i2i)."""
        N = hb.layout.n_tokens
        key = (id(prefix), N, extra_embeds is not None)
        if key not in self.graphs:
            self.capture(prefix, embeds=key[2])
        size = hb.layout.size
        staging.to_device(hb.buf[:size], self.static_in[:size])
        if extra_embeds is not None:
            ids = hb.layout.views(self.static_in)[0]  # [N], the dummy sequence's ids are 0, never an image's
            embeds = self.static_embeds[:N]
            torch.index_select(self.model.tok_embeddings.weight, 0, ids, out=embeds)
            embeds.masked_scatter_((ids == image_token_id)[:, None], extra_embeds.to(embeds.dtype))
        self.graphs[key].replay()
        keep = hb.layout.views(self.static_in)[3]
        return self.static_out.index_select(0, keep)

    @torch.inference_mode()
    def capture(self, prefix: PrefixKV | None, embeds: bool = False) -> None:
        """Captures every bucket for this prefix, largest first so the smaller graphs reuse its pool memory;
        embeds: the graphs that read the static embeddings buffer instead of looking up the ids."""
        t0 = time.perf_counter()
        P = 0 if prefix is None else prefix.length
        if embeds and self.static_embeds is None:
            self.static_embeds = torch.zeros_like(self.static_out)
        for N in reversed(self.buckets):
            layout = Layout(N, self.n_slots, 0)
            # a valid stand-in batch: one sequence of N tokens (the slot layout is what the graph freezes)
            host = pack([[0] * N], [text_positions(P, N)], None, n_tokens=N, n_slots=self.n_slots)
            self.static_in[:host.layout.size].copy_(host.buf[:host.layout.size])
            ids, pos, cu, _ = layout.views(self.static_in)

            def step(ids=ids, pos=pos, cu=cu, N=N):
                x = self.static_embeds[:N] if embeds else None  # [N, D]
                self.static_out[:N] = self.model(ids, pos, cu, N, prefix, inputs_embeds=x)  # [N, D]

            self.graphs[(id(prefix), N, embeds)] = self._capture_one(step)
        self.prefixes[id(prefix)] = prefix
        log.info("captured %d CUDA graphs (buckets %s tokens, %d sequences, prefix %d tokens%s) in %.2f s",
                 len(self.buckets), ",".join(map(str, self.buckets)), self.max_seqs, P,
                 ", embeddings in" if embeds else "", time.perf_counter() - t0)

    def _capture_one(self, step):
        """Returns an object whose replay() reruns `step` on the static buffers."""
        step()  # warm-up: Triton compiles, cuBLAS picks its kernels and allocates its workspace
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return graph
