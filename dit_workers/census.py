"""What this process holds: memory (RSS, CUDA) and whether any text-encoder weights live in it.

`service` mode promises that a DiT worker loads no encoder weights. `encoder_census` checks that from the inside,
over every object the garbage collector tracks (torch tensors and modules are tracked): modules of an encoder
class (HF's Qwen2_5_VL*), modules from the encoder's packages (ours, HF's qwen2_vl / qwen2_5_vl) that hold
encoder-shaped parameters or buffers, and tensors shaped like the encoder's parameters that no pipeline module
owns (its [vocab, hidden] embedding table above all). A parameter-free module from those packages is not an
encoder: transformers >= 5.25 with the `kernels` package wraps functions such as `apply_rotary_pos_emb` in one.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections import Counter

import torch

ENCODER_CLASS_PREFIXES = ("Qwen2_5_VL", "Qwen2VL")
ENCODER_MODULE_PREFIXES = ("workers.model", "workers.encoders", "transformers.models.qwen2_5_vl",
                           "transformers.models.qwen2_vl")


def rss_bytes() -> dict:
    """Current and peak resident set size of this process (Linux /proc)."""
    out = {}
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_bytes" if key == "VmRSS" else "rss_peak_bytes"] = int(value.split()[0]) * 1024
    return out


def cuda_bytes() -> dict:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_allocated_bytes": torch.cuda.memory_allocated(), "cuda_reserved_bytes": torch.cuda.memory_reserved(),
            "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def encoder_param_shapes(text_encoder_dir: str) -> set[tuple[int, ...]]:
    """Shapes of the encoder checkpoint's 2-D and larger weights, read from the safetensors headers only."""
    from safetensors import safe_open

    from workers.checkpoint import safetensors_files

    shapes = set()
    for path in safetensors_files(text_encoder_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) >= 2:
                    shapes.add(shape)
    return shapes


def _is_encoder_module(obj: torch.nn.Module, encoder_shapes: set[tuple[int, ...]]) -> bool:
    cls = type(obj)
    if cls.__name__.startswith(ENCODER_CLASS_PREFIXES):
        return True
    if not cls.__module__.startswith(ENCODER_MODULE_PREFIXES):
        return False
    tensors = list(obj.parameters()) + list(obj.buffers())
    return any(tuple(t.shape) in encoder_shapes for t in tensors)


def _torch_objects() -> list:
    """Every module and tensor the garbage collector tracks."""
    out = []
    with warnings.catch_warnings():  # isinstance on deprecated module-level aliases warns (torch.distributed)
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, (torch.nn.Module, torch.Tensor)):
                    out.append(obj)
            except Exception:  # a proxy whose __class__ misbehaves is not a weight
                continue
    return out


def encoder_census(encoder_shapes: set[tuple[int, ...]], pipeline_modules: list) -> dict:
    """Modules and tensors of the whole process. `encoder_tensors` counts tensors of an encoder weight's shape
    that are not parameters of `pipeline_modules` (the DiT's own modules may share a shape by chance)."""
    gc.collect()
    own = {id(p) for m in pipeline_modules if m is not None for p in m.parameters()}
    own_shapes = {tuple(p.shape) for m in pipeline_modules if m is not None for p in m.parameters()}
    suspicious = encoder_shapes - own_shapes
    classes, encoder_modules = Counter(), set()
    encoder_tensors, encoder_tensor_bytes, params = 0, 0, 0
    for obj in _torch_objects():
        if isinstance(obj, torch.nn.Module):
            classes[type(obj).__name__] += 1
            if _is_encoder_module(obj, encoder_shapes):
                encoder_modules.add(f"{type(obj).__module__}.{type(obj).__name__}")
            continue
        if isinstance(obj, torch.nn.Parameter):
            params += obj.numel()
        if id(obj) not in own and tuple(obj.shape) in suspicious:
            encoder_tensors += 1
            encoder_tensor_bytes += obj.numel() * obj.element_size()
    return {"module_classes": sorted(classes), "encoder_modules": sorted(encoder_modules),
            "encoder_tensors": encoder_tensors, "encoder_tensor_bytes": encoder_tensor_bytes,
            "parameters": params, **rss_bytes(), **cuda_bytes()}
