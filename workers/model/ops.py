"""Which implementation runs each op of the model: Triton launchers, torch references, or a library kernel.

Chosen once per model from the device and the config switches, never per call:
- Triton launchers where `workers.kernels.triton_available(device)` (CUDA, or the CPU under TRITON_INTERPRET=1);
  the torch `*_ref` functions otherwise, so the kernel backend runs on any machine.
- attention: flash-attn's `flash_attn_varlen_func` when installed, else torch's
  `torch.nn.attention.varlen.varlen_attn` on CUDA, else our Triton `varlen_attention`, else its reference.
  A library kernel is checked once against the reference (GQA and prefix included) before it is trusted.
- every fallback taken for a missing dependency says so in exactly one log line per process.

The library kernels take no separate prefix: each sequence's keys become [prefix ++ own keys] (one gather per layer)
with cu_seqlens_k, and their causal mask is aligned bottom-right, which makes the prefix fully visible.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from workers import kernels

log = logging.getLogger(__name__)
_logged: set[str] = set()


def log_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


@dataclass(frozen=True, slots=True)
class KernelOptions:
    """The seed's switches; `True` means "the fast kernel if it can run here"."""

    use_triton: bool = True  # False: torch references for norms, rope, silu and (non-library) attention
    use_flash_attention_kernel: bool = True  # flash-attn / torch varlen_attn before our Triton attention
    use_triton_attention: bool = False  # force our Triton varlen_attention (reference where Triton can't run)
    use_rmsnorm_kernel: bool = True
    use_rope_kernel: bool = True
    use_silu_kernel: bool = True
    ffn_chunk_tokens: int = 4096  # the MLP runs over at most this many tokens at once: bounds its [T, 2I] buffer

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

def _attn_triton(q, k, v, meta: AttnMeta, scale, pk, pv):
    return kernels.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale, pk, pv)


def _attn_ref(q, k, v, meta: AttnMeta, scale, pk, pv):
    return kernels.varlen_attention_ref(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale, pk, pv)


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


def _self_check(attn, device, dtype, n_q, n_kv, head_dim) -> None:
    """Raises if a library kernel disagrees with the reference on causal GQA with and without a prefix."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lens, n_prefix = [5, 1, 70, 17], 11
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rnd(T, n_q, head_dim), rnd(T, n_kv, head_dim), rnd(T, n_kv, head_dim)
    pk, pv = rnd(n_prefix, n_kv, head_dim), rnd(n_prefix, n_kv, head_dim)
    scale = head_dim**-0.5
    for prefix in (False, True):
        meta = build_attn_meta(cu, max(lens), n_prefix if prefix else 0, T, needs_kv_index=True)
        args = (pk, pv) if prefix else (None, None)
        got = attn(q, k, v, meta, scale, *args).float()
        want = _attn_ref(q, k, v, meta, scale, *args).float()
        err = ((got - want).norm() / want.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"relative error {err:.3g} against the reference (prefix={prefix})")


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


class Ops:
    """The op table of one model on one device: `rms_norm`, `mrope`, `silu_mul`, `attention`."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int,
                 options: KernelOptions = KernelOptions()):
        self.options = options
        self.ffn_chunk_tokens = max(1, options.ffn_chunk_tokens)
        triton_ok = kernels.triton_available(device) and options.use_triton
        if not triton_ok and options.use_triton:
            why = "triton is not installed" if not kernels._triton_env.HAS_TRITON else f"no Triton on {device.type}"
            log_once(f"kernel backend: {why} (TRITON_INTERPRET unset); using the torch reference ops")
        self.rms_norm = kernels.rms_norm if triton_ok and options.use_rmsnorm_kernel else kernels.rms_norm_ref
        self.silu_mul = kernels.silu_and_mul if triton_ok and options.use_silu_kernel else kernels.silu_and_mul_ref
        if triton_ok and options.use_rope_kernel:
            self.mrope = kernels.apply_mrope  # in place
        else:
            self.mrope = kernels.apply_mrope_ref  # returns new tensors
        self.attention, self.attention_name = self._pick_attention(
            device, dtype, n_heads, n_kv_heads, head_dim, triton_ok)
        # only the library kernels read cu_seqlens_k / kv_index
        self.needs_kv_index = self.attention_name in ("flash_attn", "torch_varlen")

    def _pick_attention(self, device, dtype, n_q, n_kv, head_dim, triton_ok):
        fallback = (_attn_triton, "triton") if triton_ok else (_attn_ref, "reference")
        opts = self.options
        if opts.use_triton_attention or not opts.use_flash_attention_kernel:
            return fallback
        if device.type != "cuda":
            return fallback  # both library kernels are CUDA-only: no log line needed for the expected case
        for name, make in (("flash_attn", _make_flash_attn), ("torch_varlen", _make_torch_varlen)):
            try:
                attn = make()
            except ImportError:
                what = "flash-attn is not installed" if name == "flash_attn" else "torch has no varlen_attn"
                log_once(f"attention: {what}; trying the next backend")
                continue
            except Exception as e:  # noqa: BLE001 - an unusable library must not stop the worker
                log_once(f"attention: {name} unusable ({e}); trying the next backend", logging.WARNING)
                continue
            try:
                _self_check(attn, device, dtype, n_q, n_kv, head_dim)
            except Exception as e:  # noqa: BLE001
                log_once(f"attention: {name} failed its self-check ({e}); trying the next backend", logging.WARNING)
                continue
            log_once(f"attention: using {name}")
            return attn, name
        log_once(f"attention: using {fallback[1]} varlen attention")
        return fallback
