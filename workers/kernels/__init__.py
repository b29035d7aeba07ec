"""Triton kernels of the prefill-only Qwen2.5-VL text decoder, each with its torch reference.

Call a launcher when `triton_available(tensor)` and its `*_ref` otherwise. On the CPU the launchers run only
under TRITON_INTERPRET=1 set before this package is imported.
"""

from ._triton_env import triton_available
from .attention import Segments, varlen_attention, varlen_attention_ref
from .fp8_quant import Fp8Rows, quantize_rows, quantize_rows_ref
from .qkv_rope import qkv_rope, qkv_rope_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rms_norm_quant import rms_norm_quant, rms_norm_quant_ref
from .rope import apply_mrope, apply_mrope_ref
from .silu_mul import silu_and_mul, silu_and_mul_ref
from .silu_mul_quant import silu_mul_quant, silu_mul_quant_ref

__all__ = [
    "Fp8Rows",
    "Segments",
    "apply_mrope",
    "apply_mrope_ref",
    "qkv_rope",
    "qkv_rope_ref",
    "quantize_rows",
    "quantize_rows_ref",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_quant",
    "rms_norm_quant_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "silu_mul_quant",
    "silu_mul_quant_ref",
    "triton_available",
    "varlen_attention",
    "varlen_attention_ref",
]
