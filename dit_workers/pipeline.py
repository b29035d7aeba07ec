"""Feeding encoder outputs to diffusers' Qwen-Image pipelines, which run here without a text encoder.

The pipelines are loaded with `text_encoder=None` and `tokenizer=None` (and `processor=None` for Edit): given
`prompt_embeds`, they never tokenize or encode. What they would have computed themselves is rebuilt from the
encoder's per-prompt states exactly as `_get_qwen_prompt_embeds` does after its forward (zero-padded to the
longest, a ones/zeros mask), and the i2i condition images are resized exactly as QwenImageEditPlusPipeline
resizes them before its processor.
"""

from __future__ import annotations

import io
import logging
import os

import torch

from broker.errors import InvalidRequest, ModelLoadError
from broker.ops.extras import require
from dit_workers.make_tiny_pipeline import MARKER as TINY_PIPELINE_MARKER

log = logging.getLogger("dit_workers")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return dtype


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)  # the worker logs its own progress lines
    return pipe


def weight_loading(diffusers, model_path: str) -> dict:
    """from_pretrained's `low_cpu_mem_usage`: diffusers loads weights straight into an empty model only through
    accelerate. Without it diffusers falls back to building the model (random weights) and then loading, with a
    multi-line warning on every load; asking for that way outright loads the same weights without it. A real
    checkpoint pays for that way in time and host memory, so one line says so; the tiny one does not."""
    lean = diffusers.utils.is_accelerate_available()
    if not lean and not os.path.exists(os.path.join(model_path, TINY_PIPELINE_MARKER)):
        log.warning("accelerate is not installed: diffusers builds %s's transformer with random weights before "
                    "loading its own (slower, about twice the host memory); `pip install accelerate` avoids that",
                    model_path)
    return {"low_cpu_mem_usage": lean}


def load_t2i(model_path: str, device: torch.device, dtype: torch.dtype):
    """QwenImagePipeline from a Qwen-Image directory, without its text encoder and tokenizer."""
    diffusers = require("diffusers", "a DiT worker")
    try:
        pipe = diffusers.QwenImagePipeline.from_pretrained(model_path, text_encoder=None, tokenizer=None, dtype=dtype,
                                                           **weight_loading(diffusers, model_path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a Qwen-Image pipeline (transformer/, vae/, scheduler/, model_index.json) "
                             f"from {model_path}: {e}") from None
    return _quiet(pipe.to(device))


def load_i2i(edit_model_path: str | None, t2i, device: torch.device, dtype: torch.dtype):
    """QwenImageEditPlusPipeline: its own checkpoint (Qwen-Image-Edit-2509's transformer differs from
    Qwen-Image's), or, without one, the t2i pipeline's components shared (the tiny default)."""
    diffusers = require("diffusers", "a DiT worker")
    QwenImageEditPlusPipeline = diffusers.QwenImageEditPlusPipeline
    if edit_model_path is None:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # from_pipe's dtype pass warns about an empty fp32 module list
        try:
            return _quiet(QwenImageEditPlusPipeline.from_pipe(t2i, processor=None))
        finally:
            diffusers_logging.set_verbosity(level)
    try:
        pipe = QwenImageEditPlusPipeline.from_pretrained(edit_model_path, text_encoder=None, tokenizer=None,
                                                         processor=None, dtype=dtype,
                                                         **weight_loading(diffusers, edit_model_path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a Qwen-Image-Edit pipeline from {edit_model_path}: {e}") from None
    return _quiet(pipe.to(device))


def size_unit(pipe) -> int:
    """Width and height must be multiples of this: the VAE's downsampling times the 2x2 latent packing."""
    return pipe.vae_scale_factor * 2


def pad_embeds(states: list[torch.Tensor], dtype: torch.dtype, device: torch.device):
    """Per-prompt [L_i, D] states -> (embeds [B, L, D] zero-padded to the longest, mask [B, L] int64 of ones
    and zeros), as `_get_qwen_prompt_embeds` builds them from its split hidden states."""
    longest = max(s.shape[0] for s in states)
    embeds = torch.stack([torch.cat([s, s.new_zeros(longest - s.shape[0], s.shape[1])]) for s in states])
    mask = torch.zeros(len(states), longest, dtype=torch.long)
    for i, s in enumerate(states):
        mask[i, : s.shape[0]] = 1
    return embeds.to(device=device, dtype=dtype), mask.to(device)


def decode_images(blobs: list[bytes], max_pixels: int) -> list:
    """Encoded input images -> RGB PIL images, EXIF orientation applied (as diffusers' load_image does); anything
    else is a clear InvalidRequest naming the image."""
    from PIL import Image, ImageOps

    out = []
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as probe:
                fmt, size = probe.format, probe.size
                if fmt not in IMAGE_FORMATS:
                    raise InvalidRequest(f"image {i} is {fmt}; send PNG, JPEG or WebP")
                if size[0] * size[1] > max_pixels:
                    raise InvalidRequest(f"image {i} is {size[0]}x{size[1]}, over max_input_pixels {max_pixels}")
                probe.load()
                out.append(ImageOps.exif_transpose(probe).convert("RGB"))  # a phone photo as a viewer sees it
        except InvalidRequest:
            raise
        except Exception as e:  # PIL raises many types for bad bytes (UnidentifiedImageError, OSError, ...)
            raise InvalidRequest(f"image {i} ({len(blob)} bytes) is not a readable PNG, JPEG or WebP image: "
                                 f"{type(e).__name__}: {e}") from None
    return out


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at aspect `ratio`, sides multiples of 32: diffusers' Edit pipeline's
    (and LightX2V's) rule for condition images and for an i2i output without a size."""
    edit_plus = require("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus", "a DiT worker")
    width, height = edit_plus.calculate_dimensions(area, ratio)[:2]
    return int(width), int(height)


def condition_images(pipe, images: list) -> list:
    """What QwenImageEditPlusPipeline hands its processor: each image resized to about 384x384 in area, sides
    multiples of 32, with the pipeline's own image processor."""
    edit_plus = require("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus", "a DiT worker")
    CONDITION_IMAGE_SIZE = edit_plus.CONDITION_IMAGE_SIZE

    out = []
    for img in images:
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.size[0] / img.size[1])
        out.append(pipe.image_processor.resize(img, h, w))
    return out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def call_kwargs(states: list[torch.Tensor], *, dtype: torch.dtype, device: torch.device, width: int | None,
                height: int | None, steps: int, seed: int, true_cfg_scale: float, images: list | None) -> dict:
    """The pipeline call for [prompt] or [prompt, negative] states: each side is its own batch of one, as the
    pipeline encodes them (so no padding happens for a single request, and the mask is all ones)."""
    embeds, mask = pad_embeds(states[:1], dtype, device)
    kw = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=float(true_cfg_scale),
              num_inference_steps=steps, width=width, height=height,
              generator=torch.Generator(device="cpu").manual_seed(seed))
    if len(states) > 1:
        neg, neg_mask = pad_embeds(states[1:2], dtype, device)
        kw.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
    if images is not None:
        kw["image"] = images
    return kw
