"""Qwen2.5-VL's text decoder, prefill only, over packed varlen batches: the kernel backend's model.

gpt-fast style: one file, a dataclass of model args, fused `wqkv` (+ bias) and `w13` (gate, up) built from the
checkpoint's separate projections at load, modules built on the meta device and assigned tensors streamed from
the mmap'ed safetensors straight into their device buffers. No lm_head, no KV cache beyond the template prefix's,
no per-layer outputs: `forward` returns the final norm's output (= HF's `hidden_states[-1]`).

quantization "fp8" (workers.model.fp8): the four linear layers of each block hold e4m3 weights with per-output-
channel scales, and their inputs are quantized per token by the op that makes them (the norms, SiLU-mul, and the
attention output's own quantization before wo). Embeddings, norm weights, attention and the returned hidden states
stay in the model dtype. `ops.linear` takes either kind of input, so the forward is the same code for both.

Notation: T packed tokens, B sequences, D hidden, Hq / Hk query / kv heads, Dh head dim, I intermediate,
P cached prefix tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from broker.errors import ModelLoadError
from workers.checkpoint import TextConfig, check_quantization_config, dequantize, iter_scaled_tensors
from workers.kernels import Segments
from workers.model import fp8
from workers.model.ops import KernelOptions, Ops, build_attn_meta


@dataclass(slots=True)
class ModelArgs:
    dim: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    q_size: int = field(init=False)
    kv_size: int = field(init=False)

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of kv heads"
        assert sum(self.mrope_section) * 2 == self.head_dim, "mrope_section must cover head_dim / 2"
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim

    @classmethod
    def from_text_config(cls, c: TextConfig) -> "ModelArgs":
        return cls(dim=c.hidden_size, n_layers=c.num_layers, n_heads=c.num_heads, n_kv_heads=c.num_kv_heads,
                   head_dim=c.head_dim, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                   rope_theta=c.rope_theta, norm_eps=c.rms_norm_eps, mrope_section=tuple(c.mrope_section))

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**PRESETS[name])


PRESETS = {
    "qwen2.5-vl-7b": {},  # the dataclass defaults: Qwen-Image's text encoder
    "tiny": dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=160,
                 mrope_section=(2, 3, 3)),  # workers.make_tiny
}


@dataclass(slots=True)
class PrefixKV:
    """Keys (after RoPE) and values of a shared token prefix, per layer: k, v [n_layers, P, Hk, Dh]."""

    token_ids: tuple[int, ...]
    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SegmentKV:
    """Keys and values of an earlier forward over the same layers (its kv_out: per layer (k, v) [S, Hk, Dh]),
    and the rows of them each sequence of this forward sees after the prefix: start, length [B] int32."""

    kv: list[tuple[Tensor, Tensor]]
    start: Tensor
    length: Tensor

    def layer(self, i: int) -> Segments:
        return Segments(*self.kv[i], self.start, self.length)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, fp8_linear: bool = False):
        super().__init__()
        self.args = args
        self.wqkv = fp8.make_linear(args.dim, args.q_size + 2 * args.kv_size, True, fp8_linear)
        self.wo = fp8.make_linear(args.q_size, args.dim, False, fp8_linear)
        self.scale = args.head_dim**-0.5

    def forward(self, x, positions: Tensor, inv_freq: Tensor, meta, ops: Ops,
                prefix: tuple[Tensor, Tensor] | None, kv_out: list | None, segments: Segments | None) -> Tensor:
        # x: [T, D] as ops.rms_norm_act returns it, positions: [3, T] -> [T, D]
        a = self.args
        qkv = ops.linear(x, self.wqkv)  # [T, q + 2kv], the bias added by the GEMM
        # one kernel: heads split out contiguous, M-RoPE on q and k -> q [T, Hq, Dh], k, v [T, Hk, Dh]
        q, k, v = ops.qkv_rope(qkv, positions, inv_freq, a.mrope_section, a.n_heads, a.n_kv_heads)
        if kv_out is not None:
            kv_out.append((k, v))
        pk, pv = prefix if prefix is not None else (None, None)
        o = ops.attention(q, k, v, meta, self.scale, pk, pv, segments)  # [T, Hq, Dh], contiguous
        return ops.linear(ops.act(o.reshape(-1, a.q_size)), self.wo)  # the reshape is a view: no copy


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, fp8_linear: bool = False):
        super().__init__()
        self.dim = args.dim
        self.w13 = fp8.make_linear(args.dim, 2 * args.intermediate_size, False, fp8_linear)  # gate rows, then up
        self.w2 = fp8.make_linear(args.intermediate_size, args.dim, False, fp8_linear)

    def forward(self, x, ops: Ops) -> Tensor:
        # x: [T, D] as ops.rms_norm_act returns it -> [T, 2I] -> [T, I] -> [T, D]; in row chunks so a big batch
        # never holds all of [T, 2I]
        T, chunk = x.shape[0], ops.ffn_chunk_tokens
        if T <= chunk:
            return ops.linear(ops.silu_mul_act(ops.linear(x, self.w13)), self.w2)
        out = torch.empty((T, self.dim), dtype=ops.dtype, device=ops.device)
        for s in range(0, T, chunk):
            act = ops.silu_mul_act(ops.linear(x[s:s + chunk], self.w13))  # [c, I]
            ops.linear(act, self.w2, out=out[s:s + chunk])
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, fp8_linear: bool = False):
        super().__init__()
        self.attention = Attention(args, fp8_linear)
        self.feed_forward = FeedForward(args, fp8_linear)
        self.attention_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)
        self.eps = args.norm_eps

    def forward(self, h: Tensor, residual: Tensor | None, positions: Tensor, inv_freq: Tensor, meta, ops: Ops,
                prefix, kv_out, segments) -> tuple[Tensor, Tensor]:
        # h: the last sublayer's output [T, D]; residual: the stream before it [T, D] (None before layer 0)
        if residual is None:
            residual = h
            x, _ = ops.rms_norm_act(h, self.attention_norm.weight, self.eps)
        else:
            x, residual = ops.rms_norm_act(h, self.attention_norm.weight, self.eps, residual)  # add + norm
        h = self.attention(x, positions, inv_freq, meta, ops, prefix, kv_out, segments)
        x, residual = ops.rms_norm_act(h, self.ffn_norm.weight, self.eps, residual)  # add + norm
        return self.feed_forward(x, ops), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, quantization: str | None = None):
        super().__init__()
        self.args = args
        self.quantization = quantization  # None or "fp8": the blocks' linear layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, quantization == "fp8") for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.inv_freq: Tensor | None = None  # [Dh/2] fp32, set by setup()
        self.ops: Ops | None = None

    def setup(self, device: torch.device, dtype: torch.dtype, options: KernelOptions = KernelOptions()) -> None:
        """After the weights are in place: RoPE frequencies (as HF computes them) and the op table."""
        a = self.args
        self.inv_freq = (1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float) / a.head_dim))
                         ).to(device)
        self.ops = Ops(device, dtype, a.n_heads, a.n_kv_heads, a.head_dim, options, quantization=self.quantization)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.tok_embeddings(input_ids)  # [T] -> [T, D]

    def forward(self, input_ids: Tensor, positions: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                prefix_kv: PrefixKV | None = None, inputs_embeds: Tensor | None = None,
                kv_out: list | None = None, segments: SegmentKV | None = None) -> Tensor:
        """input_ids: [T] int; positions: [3, T] int (t, h, w; equal rows for text); cu_seqlens: [B+1] int32;
        max_seqlen: host int >= every length; prefix_kv: keys/values every sequence also attends to (its
        positions must start after it); inputs_embeds: [T, D] instead of the embedding lookup (images spliced
        in); kv_out: a list that receives each layer's (k, v) [T, Hk, Dh]; segments: earlier keys the sequences
        see after the prefix (their positions must follow them). Returns the final norm's [T, D]."""
        ops = self.ops
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
        P = 0 if prefix_kv is None else prefix_kv.length
        meta = build_attn_meta(cu_seqlens, max_seqlen, P, h.shape[0], ops.needs_kv_index)
        residual = None
        for i, layer in enumerate(self.layers):
            prefix = None if prefix_kv is None else (prefix_kv.k[i], prefix_kv.v[i])
            seg = None if segments is None else segments.layer(i)
            h, residual = layer(h, residual, positions, self.inv_freq, meta, ops, prefix, kv_out, seg)
        h, _ = ops.rms_norm(h, self.norm.weight, self.args.norm_eps, residual, store_residual=False)  # [T, D]
        return h

    @torch.inference_mode()
    def compute_prefix(self, token_ids: list[int]) -> PrefixKV:
        """Runs the prefix as one sequence at positions 0..P-1 and keeps every layer's k (after RoPE) and v."""
        dev = self.inv_freq.device
        P = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.int32, device=dev)
        pos = torch.arange(P, dtype=torch.int32, device=dev).expand(3, P).contiguous()
        cu = torch.tensor([0, P], dtype=torch.int32, device=dev)
        kv: list = []
        self.forward(ids, pos, cu, P, kv_out=kv)
        return PrefixKV(tuple(token_ids), torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]))


# --- loading -----------------------------------------------------------------------------------------------------

_FUSED = {  # checkpoint suffix -> (our suffix, part index)
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", 0),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", 1),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", 2),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
}
_RENAMED = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _n_parts(ours: str) -> int:
    return 3 if ".wqkv." in ours else 2 if ".w13." in ours else 1


def _part_sizes(args: ModelArgs, ours: str) -> tuple[int, ...]:
    if ".wqkv." in ours:
        return (args.q_size, args.kv_size, args.kv_size)
    return (args.intermediate_size, args.intermediate_size)


def load_state_dict(args: ModelArgs, text_encoder_dir: str, device: torch.device, dtype: torch.dtype,
                    quantization: str | None = None) -> dict:
    """Streams the decoder's tensors (mmap'ed) into device tensors; q/k/v and gate/up land in their fused buffer's
    rows at once, so nothing is held twice. Checks that every weight was found with the right shape.
    quantization "fp8": the linear weights become e4m3 + per-row scales (fp8.weight_to_fp8), part by part; else
    a pre-quantized checkpoint's weights are dequantized to `dtype`."""
    meta = Transformer_on_meta(args, quantization).state_dict()
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    out: dict[str, Tensor] = {}
    filled: dict[str, set[int]] = {}
    for name, t, scale in iter_scaled_tensors(text_encoder_dir, want=lambda n: not n.startswith("visual.")):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in _TOP:
            ours, part = _TOP[name], None
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            if rest in _FUSED:
                ours, part = _FUSED[rest]
                ours = f"layers.{idx}.{ours}"
            elif rest in _RENAMED:
                ours, part = f"layers.{idx}.{_RENAMED[rest]}", None
            else:
                raise ModelLoadError(f"unexpected decoder weight {name!r} in {text_encoder_dir}")
        else:
            raise ModelLoadError(f"unexpected weight {name!r} in {text_encoder_dir}")
        if ours not in shapes:
            raise ModelLoadError(f"{name!r} does not fit a model of {args.n_layers} layers")
        sizes = (shapes[ours][0],) if part is None else _part_sizes(args, ours)
        part = part or 0
        want = (sizes[part],) + shapes[ours][1:]
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{name!r} has shape {tuple(t.shape)}, the config says {want}")
        rows = slice(sum(sizes[:part]), sum(sizes[:part + 1]))
        if meta[ours].dtype == fp8.FP8:
            data, row_scales = fp8.weight_to_fp8(t, scale, device)
            _fill(out, meta, ours + "_scale", rows, row_scales, device, torch.float32)
            filled.setdefault(ours + "_scale", set()).add(part)
        else:
            data = t if scale is None else dequantize(t, scale)
        _fill(out, meta, ours, rows, data, device, dtype)
        filled.setdefault(ours, set()).add(part)
    missing = [k for k in shapes if len(filled.get(k, ())) != _n_parts(k)]
    if missing:
        raise ModelLoadError(f"{text_encoder_dir} lacks decoder weights for {missing[:4]} ({len(missing)} in all)")
    return out


def _fill(out: dict, meta: dict, key: str, rows: slice, t: Tensor, device, dtype) -> None:
    """Copies `t` into rows `rows` of out[key], made on first use with meta[key]'s shape, in `dtype` (e4m3 data
    and fp32 scales keep theirs)."""
    buf = out.get(key)
    if buf is None:
        keep = meta[key].dtype == fp8.FP8 or key.endswith(".weight_scale")
        buf = out[key] = torch.empty(meta[key].shape, device=device, dtype=meta[key].dtype if keep else dtype)
    buf[rows].copy_(t)


def Transformer_on_meta(args: ModelArgs, quantization: str | None = None) -> Transformer:
    with torch.device("meta"):
        return Transformer(args, quantization)


def load_model(text_encoder_dir: str, config: TextConfig, device: torch.device, dtype: torch.dtype,
               options: KernelOptions = KernelOptions(), quantization: str | None = None) -> Transformer:
    """Builds the model on the meta device and assigns the streamed weights; ready to run on `device`.
    quantization: None (weights in `dtype`) or "fp8" (workers.model.fp8)."""
    fp8.check_supported(quantization, device, dtype)
    check_quantization_config(config.raw, text_encoder_dir)
    args = ModelArgs.from_text_config(config)
    model = Transformer_on_meta(args, quantization)
    model.load_state_dict(load_state_dict(args, text_encoder_dir, device, dtype, quantization), strict=True,
                          assign=True)
    model.eval().requires_grad_(False)
    model.setup(device, dtype, options)
    return model
