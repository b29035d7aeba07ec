"""Which implementation runs each op of the model: Triton launchers, torch references, or a library kernel.

Chosen once per model from the device and the switches of `KernelOptions`, never per call:
- norms, the fused QKV split + M-RoPE (`qkv_rope`), SiLU-mul: Triton launchers where
  `workers.kernels.triton_available(device)` (CUDA, or the CPU under TRITON_INTERPRET=1); the torch `*_ref`
  functions otherwise, so the kernel backend runs on any machine.
- attention: two choices, one for batches that attend to a cached template prefix (the t2i/i2i default, so
  also the CUDA-graph latency path) and one for batches that don't (raw inputs, prompts that break the
  template, prefix cache off). Only our Triton `varlen_attention` takes the prefix as separate tensors and
  reads it in place; the library kernels (flash-attn's `flash_attn_varlen_func` when installed, else torch's
  `torch.nn.attention.varlen.varlen_attn`, both CUDA-only) need each sequence's keys as [prefix ++ own]: one
  gather of k and v per layer, with cu_seqlens_k and their bottom-right causal alignment making the prefix
  fully visible. For a lone prompt the Triton kernel without the gather was the faster on an H100
  (benchmarks/RESULTS.md, encoder backend run 1). So:

      use_flash_attention_kernel  use_triton_attention | without a prefix   | with a cached prefix
      True (default)              True (default)       | library            | Triton
      True                        False                | library            | library + gather
      False                       either               | Triton             | Triton

  "library" is flash-attn, else torch varlen_attn, else (not on CUDA, not installed, failed its check) Triton.
  "Triton" is its torch reference where Triton can't run (use_triton=False, or a CPU without the
  interpreter); on CUDA a library kernel with the gather is preferred to the reference (a host loop) for
  prefixed batches then. A library kernel is checked once against the reference before it is trusted:
  causal GQA without a prefix, and with one (it then serves prefixed batches only if that passes too).
- batches whose sequences also see segments of earlier keys (a job's shared part: workers.encoders.kernel) run
  on our Triton kernel where Triton runs, else its reference; the library kernels take no segments.
- bidirectional attention (the vision tower: within each window or image, no prefix): our Triton kernel where
  Triton runs, else its torch reference.
- the attention choice is logged in one line; every fallback for a missing dependency says so in one line
  per process.
- the decoder's linear layers (`linear`) and the ops that make their inputs (`rms_norm_act`, `silu_mul_act`,
  `act`): with quantization "fp8" (workers.model.fp8) the inputs are e4m3 rows with per-token scales made by our
  fused Triton kernels (their torch references where Triton can't run), and the GEMM is `torch._scaled_mm` on
  CUDA, its dequantized reference elsewhere; without, they are the bf16 ops and `F.linear`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from workers import kernels
from workers.model import fp8

log = logging.getLogger(__name__)
_logged: set[str] = set()


def log_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


@dataclass(frozen=True, slots=True)
class KernelOptions:
    """Which implementation each op may use; `True` means "the fast kernel if it can run here". For experiments:
    tests and benchmarks compare implementations with them, no config sets them (the defaults serve)."""

    use_triton: bool = True  # False: torch references for norms, rope, silu and (non-library) attention
    use_flash_attention_kernel: bool = True  # flash-attn / torch varlen_attn for batches without a prefix
    use_triton_attention: bool = True  # our Triton varlen_attention for batches with a cached prefix (no gather)
    use_rmsnorm_kernel: bool = True
    use_rope_kernel: bool = True
    use_silu_kernel: bool = True
    ffn_chunk_tokens: int = 4096  # the MLP runs over at most this many tokens at once: bounds its [T, 2I] buffer
    fp8_fast_accum: bool = False  # quantization "fp8" on CUDA: _scaled_mm's use_fast_accum (faster, less exact)

    @classmethod
    def from_options(cls, options: dict) -> "KernelOptions":
        """Takes (pops) the known keys out of `options`."""
        known = {k: type(getattr(cls(), k))(options.pop(k)) for k in list(options) if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(slots=True)
class AttnMeta:
    """Per-forward attention metadata, built once and shared by all layers.

    cu_seqlens: [B+1] int32 (queries); max_seqlen: host int. With a prefix of P tokens and a library kernel:
    cu_seqlens_k = cu_seqlens + P * arange(B+1), max_seqlen_k = max_seqlen + P and kv_index [T + B*P] picks
    each key row from cat(prefix [P], own [T]).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    n_prefix: int = 0
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int = 0
    kv_index: torch.Tensor | None = None


# --- attention backends: (q [T,Hq,Dh], k, v [T,Hk,Dh], meta, scale, prefix_k, prefix_v [P,Hk,Dh]) -> o [T,Hq,Dh]

def _attn_triton(q, k, v, meta: AttnMeta, scale, pk, pv, segments=None):
    return kernels.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale, pk, pv, segments=segments)


def _attn_ref(q, k, v, meta: AttnMeta, scale, pk, pv, segments=None):
    return kernels.varlen_attention_ref(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale, pk, pv,
                                        segments=segments)


def _with_prefix(k, v, meta: AttnMeta, pk, pv):
    # k, v: [T, Hk, Dh] -> [T + B*P, Hk, Dh], each sequence's keys preceded by the prefix
    if pk is None:
        return k, v, meta.cu_seqlens, meta.max_seqlen
    k = torch.cat((pk, k)).index_select(0, meta.kv_index)
    v = torch.cat((pv, v)).index_select(0, meta.kv_index)
    return k, v, meta.cu_seqlens_k, meta.max_seqlen_k


def _make_flash_attn():
    from flash_attn import flash_attn_varlen_func

    def attn(q, k, v, meta: AttnMeta, scale, pk, pv):
        k, v, cu_k, max_k = _with_prefix(k, v, meta, pk, pv)
        return flash_attn_varlen_func(q, k, v, meta.cu_seqlens, cu_k, meta.max_seqlen, max_k,
                                      softmax_scale=scale, causal=True)

    return attn


def _make_torch_varlen():
    from torch.nn.attention.varlen import varlen_attn

    # it logs its backend choice at INFO on every call: 28 lines per forward in a worker logging at INFO
    logging.getLogger("torch.nn.attention.varlen").setLevel(logging.WARNING)
    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:  # torch >= 2.11: causal is window (-1, 0), aligned bottom-right
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:  # torch 2.10
        kwargs["is_causal"] = True
    else:
        raise RuntimeError("torch varlen_attn takes neither window_size nor is_causal")
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    has_scale = "scale" in params

    def attn(q, k, v, meta: AttnMeta, scale, pk, pv):
        k, v, cu_k, max_k = _with_prefix(k, v, meta, pk, pv)
        extra = {"scale": scale} if has_scale else {}  # without it torch uses Dh**-0.5, which is ours
        return varlen_attn(q, k, v, meta.cu_seqlens, cu_k, meta.max_seqlen, max_k, **kwargs, **extra)

    return attn


# library kernels in order of preference: (name, factory raising ImportError when missing), and the devices
# they run on (tests put a stand-in here)
LIBRARY_KERNELS = (("flash_attn", _make_flash_attn), ("torch_varlen", _make_torch_varlen))
LIBRARY_DEVICE_TYPES = ("cuda",)


def _self_check(attn, device, dtype, n_q, n_kv, head_dim, prefix: bool) -> None:
    """Raises if a library kernel disagrees with the reference on causal GQA (with a prefix or without)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lens, n_prefix = [5, 1, 70, 17], 11
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rnd(T, n_q, head_dim), rnd(T, n_kv, head_dim), rnd(T, n_kv, head_dim)
    pk, pv = rnd(n_prefix, n_kv, head_dim), rnd(n_prefix, n_kv, head_dim)
    scale = head_dim**-0.5
    meta = build_attn_meta(cu, max(lens), n_prefix if prefix else 0, T, needs_kv_index=True)
    args = (pk, pv) if prefix else (None, None)
    got = attn(q, k, v, meta, scale, *args).float()
    want = _attn_ref(q, k, v, meta, scale, *args).float()
    err = ((got - want).norm() / want.norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"relative error {err:.3g} against the reference ({'with' if prefix else 'no'} prefix)")


def build_attn_meta(cu_seqlens: torch.Tensor, max_seqlen: int, n_prefix: int, n_tokens: int,
                    needs_kv_index: bool) -> AttnMeta:
    """Device-side only (no host sync), so it can live inside a CUDA graph. cu_seqlens: [B+1] int32."""
    meta = AttnMeta(cu_seqlens, max_seqlen, n_prefix)
    if n_prefix and needs_kv_index:
        n_seqs = cu_seqlens.shape[0] - 1
        steps = torch.arange(n_seqs + 1, device=cu_seqlens.device, dtype=torch.int32)
        meta.cu_seqlens_k = cu_seqlens + n_prefix * steps  # [B+1]
        meta.max_seqlen_k = max_seqlen + n_prefix
        # key row j of the combined layout: sequence b, offset o = j - cu_k[b]; prefix row o if o < P,
        # else own row P + cu_q[b] + o - P of cat(prefix, own)
        j = torch.arange(n_tokens + n_seqs * n_prefix, device=cu_seqlens.device, dtype=torch.int32)
        b = torch.searchsorted(meta.cu_seqlens_k, j, right=True) - 1
        b = b.clamp_(0, n_seqs - 1)
        o = j - meta.cu_seqlens_k[b]
        meta.kv_index = torch.where(o < n_prefix, o, cu_seqlens[b] + o).long()
    return meta


def _linear(x: torch.Tensor, layer: torch.nn.Linear, out: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] -> [M, N]; `out` (a contiguous [M, N] view) receives it
    if out is None:
        return F.linear(x, layer.weight, layer.bias)
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def _unquantized(x: torch.Tensor) -> torch.Tensor:
    return x


class Ops:
    """The op table of one model on one device: `rms_norm`, `qkv_rope`, `silu_mul`, `attention`,
    `bidirectional_attention` (and `mrope`, M-RoPE on q and k already split, which the text model's forward no
    longer calls); and the linear layers with their inputs: `linear(a, layer, out=None)` takes what
    `rms_norm_act` (like rms_norm), `silu_mul_act` (like silu_mul) and `act` (any [T, K] rows) return."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int,
                 options: KernelOptions = KernelOptions(), causal_attention: bool = True,
                 quantization: str | None = None):
        """causal_attention=False: the vision tower's table, whose attention is bidirectional only (no causal
        backend is picked, checked or logged). quantization: None or "fp8" (the decoder's linear layers)."""
        self.options = options
        self.device, self.dtype, self.quantization = device, dtype, quantization
        self.ffn_chunk_tokens = max(1, options.ffn_chunk_tokens)
        triton_ok = kernels.triton_available(device) and options.use_triton
        if not triton_ok and options.use_triton:
            why = "triton is not installed" if not kernels._triton_env.HAS_TRITON else f"no Triton on {device.type}"
            log_once(f"kernel backend: {why} (TRITON_INTERPRET unset); using the torch reference ops")
        self.rms_norm = kernels.rms_norm if triton_ok and options.use_rmsnorm_kernel else kernels.rms_norm_ref
        self.silu_mul = kernels.silu_and_mul if triton_ok and options.use_silu_kernel else kernels.silu_and_mul_ref
        rope_ok = triton_ok and options.use_rope_kernel
        self.qkv_rope = kernels.qkv_rope if rope_ok else kernels.qkv_rope_ref  # new q, k, v
        self.mrope = kernels.apply_mrope if rope_ok else kernels.apply_mrope_ref  # in place / new tensors
        self._bidirectional = kernels.varlen_attention if triton_ok else kernels.varlen_attention_ref
        self._pick_linear(device, dtype, triton_ok)
        if not causal_attention:
            self.attention_names = {"bidirectional": "triton" if triton_ok else "reference"}
            self.attention_name, self.needs_kv_index = self.attention_names["bidirectional"], False
            return
        (self._attn_plain, plain), (self._attn_prefix, prefixed) = self._pick_attention(
            device, dtype, n_heads, n_kv_heads, head_dim, triton_ok)
        self._attn_segments = _attn_triton if triton_ok else _attn_ref
        self.attention_names = {"no_prefix": plain, "prefix": prefixed}
        self.attention_name = plain if plain == prefixed else f"{plain} (prefix: {prefixed})"
        # only the library kernels read cu_seqlens_k / kv_index, and only with a prefix
        self.needs_kv_index = prefixed not in ("triton", "reference")

    def _pick_linear(self, device, dtype, triton_ok: bool) -> None:
        opts = self.options
        if self.quantization is None:
            self.rms_norm_act, self.silu_mul_act, self.act, self.linear = (
                self.rms_norm, self.silu_mul, _unquantized, _linear)
            return
        assert self.quantization == "fp8", f"unknown quantization {self.quantization!r}"
        use_rms, use_silu = triton_ok and opts.use_rmsnorm_kernel, triton_ok and opts.use_silu_kernel
        self.rms_norm_act = kernels.rms_norm_quant if use_rms else kernels.rms_norm_quant_ref
        self.silu_mul_act = kernels.silu_mul_quant if use_silu else kernels.silu_mul_quant_ref
        self.act = kernels.quantize_rows if triton_ok else kernels.quantize_rows_ref
        if device.type == "cuda":
            self.linear = partial(fp8.linear_scaled_mm, out_dtype=dtype, use_fast_accum=opts.fp8_fast_accum)
            gemm = "torch._scaled_mm, row-wise scales" + (", fast accumulation" if opts.fp8_fast_accum else "")
        else:
            self.linear = partial(fp8.linear_dequantized, out_dtype=dtype)
            gemm = "the dequantized reference (fp32)"
        quant = "our Triton kernels" if use_rms and use_silu else "torch references (where Triton is off)"
        log_once(f"fp8 linear layers: GEMMs by {gemm}; activations quantized per token by {quant}")

    def bidirectional_attention(self, q, k, v, cu_seqlens, max_seqlen: int, scale: float):
        # q, k, v: [T, H, Dh]; cu_seqlens: [B+1] int32 -> o [T, H, Dh]: each token sees its whole sequence
        return self._bidirectional(q, k, v, cu_seqlens, max_seqlen, scale, causal=False)

    def attention(self, q, k, v, meta: AttnMeta, scale: float, prefix_k=None, prefix_v=None, segments=None):
        # q: [T, Hq, Dh], k, v: [T, Hk, Dh], prefix_k, prefix_v: [P, Hk, Dh] or None, segments:
        # kernels.Segments or None -> o [T, Hq, Dh] contiguous
        if segments is not None:
            return self._attn_segments(q, k, v, meta, scale, prefix_k, prefix_v, segments)
        if prefix_k is None:
            return self._attn_plain(q, k, v, meta, scale, None, None)
        return self._attn_prefix(q, k, v, meta, scale, prefix_k, prefix_v)

    def _pick_attention(self, device, dtype, n_q, n_kv, head_dim, triton_ok):
        """((fn, name) without a prefix, (fn, name) with a cached prefix): see the module docstring."""
        opts = self.options
        if triton_ok:
            own = (_attn_triton, "triton")
        else:
            own = (_attn_ref, "reference")
        library, library_prefix_ok = None, False
        if opts.use_flash_attention_kernel and device.type in LIBRARY_DEVICE_TYPES:
            library, library_prefix_ok = self._pick_library(device, dtype, n_q, n_kv, head_dim)
        plain = library or own
        if library is not None and library_prefix_ok and not (opts.use_triton_attention and triton_ok):
            prefixed, how = library, "[prefix ++ own] keys gathered per layer"
        else:
            prefixed, how = own, "prefix read in place" if triton_ok else "a host loop per sequence"
        if plain[1] == prefixed[1] == "reference":
            log_once("attention: reference for every batch")
        elif plain[1] == prefixed[1]:
            log_once(f"attention: {plain[1]} for every batch (with a cached prefix: {how})")
        else:
            log_once(f"attention: {plain[1]} for batches without a prefix, {prefixed[1]} for batches with a "
                     f"cached prefix ({how})")
        return plain, prefixed

    def _pick_library(self, device, dtype, n_q, n_kv, head_dim):
        """(fn, name) of the first library kernel that imports and passes its no-prefix check, or None; and
        whether it passed the check with a prefix as well."""
        for name, make in LIBRARY_KERNELS:
            try:
                attn = make()
            except ImportError:
                what = "flash-attn is not installed" if name == "flash_attn" else f"{name} is not available"
                log_once(f"attention: {what}; trying the next backend")
                continue
            except Exception as e:  # an unusable library must not stop the worker
                log_once(f"attention: {name} unusable ({e}); trying the next backend", logging.WARNING)
                continue
            try:
                _self_check(attn, device, dtype, n_q, n_kv, head_dim, prefix=False)
            except Exception as e:
                log_once(f"attention: {name} failed its self-check ({e}); trying the next backend", logging.WARNING)
                continue
            try:
                _self_check(attn, device, dtype, n_q, n_kv, head_dim, prefix=True)
                prefix_ok = True
            except Exception as e:
                log_once(f"attention: {name} failed its self-check with a prefix ({e}); it serves only batches "
                         "without one", logging.WARNING)
                prefix_ok = False
            return (attn, name), prefix_ok
        return None, False
