"""In-process encoders: `load_encoder(model_dir, backend=...)` returns an object with `.encode(prompts, task)`."""

from __future__ import annotations

import torch

from broker.errors import ModelLoadError
from workers.checkpoint import read_text_config, resolve_checkpoint
from workers.encoders.base import DEFAULT_MAX_PROMPT_TOKENS, EncoderBase, default_dtype

BACKENDS = ("baseline", "kernel")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_encoder(model_dir: str, backend: str = "baseline", device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 image_limits=None, quantization: str | None = None, **options) -> EncoderBase:
    """Loads Qwen-Image's text encoder from `model_dir` (a Qwen-Image directory) with the chosen backend.
    image_limits: a workers.images.ImageLimits for i2i (default: 4 images, 4096x4096 pixels, 8192 a side).
    quantization: None, or "fp8" (kernel backend only: the decoder's linear layers in e4m3)."""
    if quantization is not None and backend != "kernel":
        raise ModelLoadError(f"quantization {quantization!r} needs backend 'kernel', not {backend!r}")
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    paths = resolve_checkpoint(model_dir)
    config = read_text_config(paths.text_encoder)
    tokenizer = load_tokenizer(paths.tokenizer)
    args = (paths, config, tokenizer, device, dtype, max_prompt_tokens)
    if backend == "baseline":
        from workers.encoders.baseline import BaselineEncoder

        encoder = BaselineEncoder(*args)
    elif backend == "kernel":
        from workers.encoders.kernel import KernelEncoder

        encoder = KernelEncoder(*args, quantization=quantization, **options)
    else:
        raise ModelLoadError(f"unknown encoder backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    encoder.configure_images(image_limits)
    return encoder
