"""Decoded images to the vision tower's patches, on the device: the Edit pipeline's resize to the condition size,
Qwen2-VL's resize to whole patches, rescale + normalize, patchify. Equal bit for bit to diffusers + the processor.

What it reproduces, per image (H x W x 3 uint8, decoded and EXIF-oriented on the CPU):
1. diffusers' QwenImageEditPlusPipeline: PIL `resize((cw, ch), LANCZOS)` to the condition size, skipped when the
   image already has one (workers.images.condition_size).
2. Qwen2VLImageProcessor: `smart_resize` to sides multiple of patch * merge, bicubic with antialias on uint8
   (torchvision on a CPU tensor: torch's uint8 antialiased kernel), rescale by 1/255 and normalize by the CLIP
   mean and std fused as the processor fuses them, then its patchify (merge-unit order, each patch repeated over
   the temporal patch size).

Both resizes are the same machine: separable fixed-point resampling (PIL's Resample.c, which torch's uint8 kernel
follows). Per axis, coefficients are computed in double (filter over the source pixels each output pixel covers,
normalized to sum 1), scaled to integers (PIL: 22 fractional bits; torch: the most bits that keep them in int16);
each pass's output is (sum + half) >> bits clipped to 0..255; columns first, then rows (Pillow 13 does rows first
when the height shrinks much more than the width: `resize_u8` follows whichever Pillow is installed).
Here a pass is one float64 matmul with the integer coefficient matrix: every product and partial sum is an integer
below 2^53, so the sum is exact in any order, and floor + clamp finish it as the C code does. The coefficients
come from numpy on the host (cached per size pair); the device builds the dense matrix from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

PIL_BITS = 22  # Resample.c: PRECISION_BITS = 32 - 8 - 2


@dataclass(frozen=True, slots=True)
class PixelSpec:
    """The image processor's settings that decide the pixels (read from the checkpoint's processor/)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    torch_resize: bool = True  # the processor resizes with torch (torchvision backend), else with PIL

    @classmethod
    def from_processor(cls, p) -> "PixelSpec":
        """From a loaded Qwen2VLImageProcessor (torchvision backend or PIL)."""
        from broker.errors import ModelLoadError

        size = getattr(p, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        min_pixels = getattr(p, "min_pixels", None) or get("shortest_edge")
        max_pixels = getattr(p, "max_pixels", None) or get("longest_edge")
        resample = int(getattr(p, "resample", 3))
        if not (p.do_resize and p.do_rescale and p.do_normalize) or resample != 3 or not (min_pixels and max_pixels):
            raise ModelLoadError(f"image processor {type(p).__name__}: only Qwen2-VL's resize (bicubic), rescale "
                                 f"and normalize are implemented; got resize={p.do_resize} resample={resample} "
                                 f"rescale={p.do_rescale} normalize={p.do_normalize}")
        names = [c.__name__ for c in type(p).__mro__]
        return cls(int(p.patch_size), int(p.temporal_patch_size), int(p.merge_size), int(min_pixels),
                   int(max_pixels), tuple(float(x) for x in p.image_mean), tuple(float(x) for x in p.image_std),
                   float(p.rescale_factor), any("Torchvision" in n or n.endswith("Fast") for n in names))

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes a width x height image to: Qwen2-VL's smart_resize."""
        # (HF refuses aspect ratios over 200; condition sizes never come near: workers.images.condition_size)
        factor = self.patch_size * self.merge_size
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return w_bar, h_bar

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patches of a condition image of width x height."""
        w, h = self.resized(width, height)
        return 1, h // self.patch_size, w // self.patch_size


# --- the resampling coefficients (host) -----------------------------------------------------------------------

def _lanczos3(x: np.ndarray) -> np.ndarray:
    # PIL: sinc(x) * sinc(x / 3) on [-3, 3), sinc(x) = sin(pi x) / (pi x)
    def sinc(v):
        y = v * math.pi
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(v == 0.0, 1.0, np.sin(y) / y)

    return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), 0.0)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    # Keys' cubic with a = -0.5 (PIL's bicubic and torch's antialiased one)
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"lanczos": (_lanczos3, 3.0), "bicubic": (_cubic, 2.0)}


@lru_cache(maxsize=256)
def resample_coefficients(in_size: int, out_size: int, kind: str,
                          torch_bits: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(first source index [out], integer coefficients [out, k] as float64, fractional bits) of one axis, as
    Resample.c's precompute_coeffs and normalize_coeffs_8bpc compute them (torch_bits: torch's int16 precision)."""
    filt, support = FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    w = filt((x[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(x[None, :] < xmax[:, None], w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed left to right, as the C loop does
    w = np.divide(w, total, out=w.copy(), where=total != 0.0)
    bits = PIL_BITS
    if torch_bits:  # UpSampleKernel.cpp: the largest precision (< 22) whose max weight still fits int16
        top = w.max()
        bits = 0
        while bits < 22 and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
            bits += 1
    q = np.where(w < 0, np.trunc(-0.5 + w * (1 << bits)), np.trunc(0.5 + w * (1 << bits)))
    return xmin, q, bits


def _resample(x: Tensor, out_size: int, dim: int, kind: str, torch_bits: bool) -> Tensor:
    # x: [3, H, W] float64 of integers 0..255 -> the same with size out_size along dim (1: rows, 2: columns)
    in_size = x.shape[dim]
    xmin, q, bits = resample_coefficients(in_size, out_size, kind, torch_bits)
    idx = _to_device(np.minimum(xmin[:, None] + np.arange(q.shape[1]), in_size - 1), x.device)
    coef = torch.zeros(out_size, in_size, dtype=torch.float64, device=x.device)
    coef.scatter_add_(1, idx, _to_device(q, x.device))  # [out, in]; clipped taps carry 0
    y = torch.matmul(coef, x) if dim == 1 else torch.matmul(x, coef.t())
    return y.add_(1 << (bits - 1)).div_(1 << bits).floor_().clamp_(0, 255)


def _to_device(a: np.ndarray, device: torch.device) -> Tensor:
    # through pinned memory on CUDA: a copy from pageable memory would wait for the device's queued work
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def resize_u8(x: Tensor, width: int, height: int, kind: str, torch_bits: bool = False) -> Tensor:
    """x: [3, H, W] float64 holding uint8 values -> [3, height, width] likewise: PIL's (torch_bits=False) or torch's
    uint8 antialiased resampling. An axis whose size is kept is not touched; columns go first, except where this
    PIL resizes rows first (Pillow >= 13, for heights cut by more than twice what the width loses)."""
    _, h, w = x.shape
    rows_first = not torch_bits and height < h and h - height > 2 * (w - width) and pil_rows_first()
    if rows_first and h != height:
        x = _resample(x, height, 1, kind, torch_bits)
    if w != width:
        x = _resample(x, width, 2, kind, torch_bits)
    if not rows_first and h != height:
        x = _resample(x, height, 1, kind, torch_bits)
    return x


@lru_cache(maxsize=1)
def pil_rows_first() -> bool:
    """Whether the installed Pillow does the vertical pass first when the height shrinks by more than twice what
    the width loses (Pillow PR 9549, in 13.0; before, columns always went first). Asked once, of PIL itself, on a
    12 x 20 image that the two orders resize differently."""
    from PIL import Image

    src = (np.arange(12 * 20 * 3, dtype=np.int64) * 7919 % 251).astype(np.uint8).reshape(20, 12, 3)
    want = np.asarray(Image.fromarray(src).resize((11, 10), Image.Resampling.LANCZOS))
    x = torch.from_numpy(src.astype(np.float64)).permute(2, 0, 1)
    rows = _resample(_resample(x, 10, 1, "lanczos", False), 11, 2, "lanczos", False)
    cols = _resample(_resample(x, 11, 2, "lanczos", False), 10, 1, "lanczos", False)
    got_rows, got_cols = (np.array_equal(t.permute(1, 2, 0).numpy(), want) for t in (rows, cols))
    assert got_rows != got_cols, "the probe image must tell the two pass orders apart"
    return got_rows


# --- normalize + patchify ----------------------------------------------------------------------------------------

def patchify(x: Tensor, spec: PixelSpec) -> Tensor:
    """x: [3, h, w] float32 normalized, h and w multiples of patch * merge -> [gh * gw, C*Tp*P*P] in the processor's
    order: merge unit by merge unit, each patch (C, Tp, P, P) flat with the frame repeated Tp times."""
    P, m, Tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    C, h, w = x.shape
    gh, gw = h // P, w // P
    p = x.reshape(C, gh // m, m, P, gw // m, m, P).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    return p.unsqueeze(5).expand(-1, -1, -1, -1, -1, Tp, -1, -1).reshape(gh * gw, C * Tp * P * P)


def image_patches(pixels: Tensor, condition_size: tuple[int, int], spec: PixelSpec, device: torch.device) -> Tensor:
    """pixels: [H, W, 3] uint8 (CPU), the decoded image; condition_size: (width, height) of the Edit pipeline's
    resize. Returns [gh * gw, C*Tp*P*P] float32 on `device`: Qwen2VLImageProcessor's pixel_values for the image."""
    if device.type == "cuda" and not pixels.is_pinned():
        pixels = pixels.pin_memory()  # workers.images pins them in the decode pool; here only if it did not
    x = pixels.to(device, non_blocking=True).permute(2, 0, 1).to(torch.float64)  # [3, H, W]
    cw, ch = condition_size
    x = resize_u8(x, cw, ch, "lanczos")
    rw, rh = spec.resized(cw, ch)
    x = resize_u8(x, rw, rh, "bicubic", torch_bits=spec.torch_resize)
    mean, std = _mean_std(spec, device)
    x = (x.to(torch.float32) - mean) / std
    return patchify(x, spec)


@lru_cache(maxsize=8)
def _mean_std(spec: PixelSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    # the processor's fused rescale + normalize: mean and std scaled by 1 / rescale_factor in fp32, [3, 1, 1] each
    mean = torch.tensor(spec.image_mean, dtype=torch.float32) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std, dtype=torch.float32) * (1.0 / spec.rescale_factor)
    return mean.view(3, 1, 1).to(device), std.view(3, 1, 1).to(device)
