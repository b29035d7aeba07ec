"""The kernel backend's model: the prefill-only Qwen2.5-VL text decoder (qwen2_5_vl_text), its vision tower
(qwen2_5_vl_vision), condition images to patches on the device (image_patches), the op dispatch (ops), the
host-side batch packing (batch), the CUDA-graph runner (graph_runner, CUDA only) and the FP8 linear layers (fp8)."""

from workers.model.ops import KernelOptions
from workers.model.qwen2_5_vl_text import ModelArgs, PrefixKV, Transformer, load_model

__all__ = ["KernelOptions", "ModelArgs", "PrefixKV", "Transformer", "load_model"]
