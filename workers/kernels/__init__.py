"""Triton kernels of the prefill-only Qwen2.5-VL text decoder, each with its torch reference.

Call a launcher when `triton_available(tensor)` and its `*_ref` otherwise. On the CPU the launchers run only
under TRITON_INTERPRET=1 set before this package is imported.
"""

from ._triton_env import triton_available
from .attention import Segments, varlen_attention, varlen_attention_ref
from .qkv_rope import qkv_rope, qkv_rope_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import apply_mrope, apply_mrope_ref
from .silu_mul import silu_and_mul, silu_and_mul_ref

__all__ = [
    "Segments",
    "apply_mrope",
    "apply_mrope_ref",
    "qkv_rope",
    "qkv_rope_ref",
    "rms_norm",
    "rms_norm_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "triton_available",
    "varlen_attention",
    "varlen_attention_ref",
]
