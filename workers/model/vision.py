"""Qwen2.5-VL's vision tower for the kernel backend: HF's own module, loaded from the checkpoint's `visual.*` weights.

The module is HF transformers' `Qwen2_5_VisionTransformerPretrainedModel` (patch embed, 32 window/full-attention
blocks, 2x2 patch merger into the decoder's hidden size), built on the meta device and assigned the streamed
weights in the model dtype on the device, so nothing is held twice (its computed buffers, the rotary inverse
frequencies, stay fp32 as HF keeps them). One forward takes every image of a batch:
the tower attends within each image (and each window) by its cu_seqlens, so images never see each other.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from broker.errors import ModelLoadError
from workers.checkpoint import canonical_name, iter_tensors, safetensors_files


class VisionTower:
    """Images' patches in, their merged features (the decoder's hidden size, one row per image-pad token) out."""

    def __init__(self, module, device: torch.device, dtype: torch.dtype):
        self.module = module
        self.device = device
        self.dtype = dtype
        self.merge_size = int(module.spatial_merge_size)
        self.out_dim = int(module.config.out_hidden_size)

    @torch.inference_mode()
    def __call__(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        # pixel_values: [sum t*h*w, C*Tp*P*P] (any float dtype, any device); grid_thw: [n, 3] int
        # -> [sum t*h*w / merge**2, D] in the model dtype, images in order
        pv = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        grid = grid_thw.to(device=self.device, dtype=torch.long)
        out = self.module(pv, grid_thw=grid)
        return out if isinstance(out, Tensor) else out.pooler_output  # a tensor in older transformers

    def parameters_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())


def has_vision_weights(text_encoder_dir: str) -> bool:
    """Whether the checkpoint holds a vision tower (reads the safetensors headers only)."""
    from safetensors import safe_open

    for path in safetensors_files(text_encoder_dir):
        with safe_open(path, framework="pt") as f:
            if any(canonical_name(n) is not None and canonical_name(n).startswith("visual.") for n in f.keys()):
                return True
    return False


def load_vision(text_encoder_dir: str, raw_config: dict, device: torch.device, dtype: torch.dtype,
                attn_implementation: str = "sdpa") -> VisionTower:
    """The tower from `raw_config["vision_config"]` and the checkpoint's `visual.*` (or `model.visual.*`) weights."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vc = dict(raw_config.get("vision_config") or {})
    if not vc:
        raise ModelLoadError(f"{text_encoder_dir}/config.json has no vision_config: no vision tower to load")
    vc.pop("model_type", None)
    config = Qwen2_5_VLVisionConfig(**vc)
    config._attn_implementation = attn_implementation  # what from_pretrained picks for the whole model (sdpa)
    with _parameters_on_meta():  # buffers (the rotary inverse frequencies) are computed for real, in fp32
        module = Qwen2_5_VisionTransformerPretrainedModel(config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {}
    for name, t in iter_tensors(text_encoder_dir, want=lambda n: n.startswith("visual.")):
        key = name[len("visual."):]
        if key not in shapes:
            raise ModelLoadError(f"unexpected vision weight {name!r} in {text_encoder_dir}")
        if tuple(t.shape) != shapes[key]:
            raise ModelLoadError(f"{name!r} has shape {tuple(t.shape)}, the vision config says {shapes[key]}")
        state[key] = t.to(device=device, dtype=dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ModelLoadError(f"{text_encoder_dir} lacks vision weights {missing[:4]} ({len(missing)} in all)")
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device)  # the buffers; the weights are there already
    module.eval().requires_grad_(False)
    return VisionTower(module, device, dtype)


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init cost) and their buffers
    as usual (accelerate's init_empty_weights, without accelerate). Load time only, one thread."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
