"""i2i condition images on the worker: checked decoding, the Edit pipeline's resize, Qwen2.5-VL's preprocessing.

Per image, in the intake thread (never on the device's critical path):

1. `decode_image`: PIL opens only PNG, JPEG, WebP or BMP (LightX2V's client sends BMP); the size the header
   declares is checked (non-zero, at most `max_pixels` and `max_side`) before a single pixel is decoded; truncated
   or corrupt data fails at decode; the result is RGB.
2. `to_condition_image`: diffusers' QwenImageEditPlusPipeline resize, `calculate_dimensions(384 * 384, w / h)`
   (sides rounded to multiples of 32) with its VaeImageProcessor's Lanczos resize. An image that already has a
   condition size (one `calculate_dimensions` can return: sides multiples of 32 within rounding of 384*384 in
   area) is taken as it is: DiT workers and LightX2V send condition images, and resizing those a second time is
   not a no-op (e.g. 416x384 -> 384x384), so the encoding would no longer be the pipeline's.
3. `ImagePreprocessor.prepare`: the checkpoint's own Qwen2-VL image processor (`processor/`, loaded by
   transformers as the pipeline's Qwen2VLProcessor loads it) -> pixel_values [t*h*w, C*2*14*14] and grid (t, h, w);
   the image then takes t*h*w / merge_size**2 `<|image_pad|>` tokens.

Images are identified by the digest of their encoded bytes: the same bytes in a job (a prompt and its negative)
are decoded once, and recent ones are kept preprocessed (bounded in bytes) for repeats across jobs.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from broker.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
CONDITION_IMAGE_AREA = 384 * 384  # diffusers' pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_images: int = 4  # distinct images per job, and images per prompt
    max_pixels: int = 4096 * 4096  # declared width x height of an encoded image
    max_side: int = 8192  # declared width or height

    def __post_init__(self):
        assert self.max_images >= 1 and self.max_pixels >= 1 and self.max_side >= 1, "image limits must be positive"


@dataclass(frozen=True, slots=True, eq=False)
class PreparedImage:
    """One condition image ready for the vision tower."""

    digest: bytes  # blake2b of the encoded bytes: identity for dedupe and caches
    grid_thw: tuple[int, int, int]  # patches (t, h, w) before the 2x2 merge
    n_tokens: int  # <|image_pad|> tokens it takes in the sequence: t*h*w / merge**2
    pixel_values: torch.Tensor  # [t*h*w, C*Tp*P*P] float32, CPU: the image processor's output

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


def image_digest(blob: bytes) -> bytes:
    return hashlib.blake2b(bytes(blob), digest_size=20).digest()


def per_prompt_images(images, n_prompts: int) -> list[list]:
    """`images` as one list per prompt: None -> no images; a flat list of encoded images -> the same images for
    every prompt (a prompt and its negative); a list of lists -> as given (one per prompt)."""
    if images is None:
        return [[] for _ in range(n_prompts)]
    if isinstance(images, (bytes, bytearray, memoryview, str)) or not isinstance(images, (list, tuple)):
        raise InvalidRequest(f"images must be a list (one list of encoded images per prompt), "
                             f"got {type(images).__name__}")
    if images and all(isinstance(x, (bytes, bytearray, memoryview)) for x in images):
        return [list(images) for _ in range(n_prompts)]
    if len(images) != n_prompts:
        raise InvalidRequest(f"images holds {len(images)} list(s) for {n_prompts} prompt(s): send one list of "
                             "encoded images per prompt, or one flat list for the same images in every prompt")
    out = []
    for i, imgs in enumerate(images):
        if not isinstance(imgs, (list, tuple)):
            raise InvalidRequest(f"images[{i}] is a {type(imgs).__name__}: each prompt's images are a list of "
                                 "encoded image bytes (PNG, JPEG, WebP or BMP)")
        for j, b in enumerate(imgs):
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise InvalidRequest(f"images[{i}][{j}] is a {type(b).__name__}, not encoded image bytes")
        out.append(list(imgs))
    return out


# --- decoding ----------------------------------------------------------------------------------------------------

def _png_declared_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if `blob` is not a PNG. PIL refuses a zero size without saying
    so; reading it here gives that refusal a clear message."""
    if len(blob) >= 24 and blob[:8] == _PNG_SIGNATURE and blob[12:16] == b"IHDR":
        return struct.unpack(">II", blob[16:24])
    return None


def _check_size(w: int, h: int, where: str, limits: ImageLimits) -> None:
    if w <= 0 or h <= 0:
        raise InvalidRequest(f"{where} declares a size of {w}x{h}: an image needs at least one pixel")
    if max(w, h) > limits.max_side:
        raise InvalidRequest(f"{where} declares {w}x{h}, a side over max_image_side {limits.max_side}")
    if w * h > limits.max_pixels:
        raise InvalidRequest(f"{where} declares {w}x{h} = {w * h} pixels, over max_image_pixels {limits.max_pixels}")


def decode_image(blob, where: str, limits: ImageLimits):
    """Encoded bytes -> an RGB PIL image, or InvalidRequest naming `where` and the reason. The declared size is
    checked before any pixel data is decoded."""
    from PIL import Image

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidRequest(f"{where} is a {type(blob).__name__}, not encoded image bytes")
    blob = bytes(blob)
    if not blob:
        raise InvalidRequest(f"{where} is empty (0 bytes)")
    declared = _png_declared_size(blob)
    if declared is not None:
        _check_size(*declared, where, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower bound applies below
            img = Image.open(io.BytesIO(blob), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise InvalidRequest(f"{where} declares a size over max_image_pixels {limits.max_pixels}: {e}") from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, ... for bytes that are no image
        raise InvalidRequest(f"{where} ({len(blob)} bytes) is not a readable PNG, JPEG, WebP or BMP image: "
                             f"{type(e).__name__}: {e}") from None
    w, h = img.size
    _check_size(w, h, where, limits)
    try:
        img.load()  # truncated or corrupt data fails here (PIL's LOAD_TRUNCATED_IMAGES is left off)
        rgb = img.convert("RGB") if img.mode != "RGB" else img
    except Exception as e:
        raise InvalidRequest(f"{where} ({len(blob)} bytes, {img.format} {w}x{h}) cannot be decoded, truncated or "
                             f"corrupt: {type(e).__name__}: {e}") from None
    return rgb


# --- the Edit pipeline's resize --------------------------------------------------------------------------------

def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """diffusers' pipeline_qwenimage_edit_plus.calculate_dimensions: (width, height), multiples of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def is_condition_size(w: int, h: int, area: int = CONDITION_IMAGE_AREA) -> bool:
    """Whether calculate_dimensions(area, r) returns (w, h) for some aspect ratio r: sides multiples of 32 whose
    +-16 rounding box brackets `area` (the product of the unrounded sides is always exactly `area`)."""
    return (w >= 32 and h >= 32 and w % 32 == 0 and h % 32 == 0
            and (w - 16) * (h - 16) <= area <= (w + 16) * (h + 16))


def to_condition_image(img, where: str = "image"):
    """What QwenImageEditPlusPipeline hands its processor for `img` (see the module docstring)."""
    from PIL import Image

    w, h = img.size
    if is_condition_size(w, h):
        return img
    cw, ch = calculate_dimensions(CONDITION_IMAGE_AREA, w / h)
    if cw < 32 or ch < 32:
        raise InvalidRequest(f"{where} is {w}x{h}: its aspect ratio is too extreme for a condition image "
                             f"({cw}x{ch} at about 384x384 in area)")
    # VaeImageProcessor.resize: PIL resize to (width, height), Lanczos, reducing_gap None (its defaults)
    return img.resize((cw, ch), resample=Image.Resampling.LANCZOS, reducing_gap=None)


# --- Qwen2.5-VL's preprocessing ----------------------------------------------------------------------------------

class ImagePreprocessor:
    """Turns encoded images into PreparedImages with the checkpoint's image processor (loaded on first use).
    Thread-safe; keeps recent PreparedImages by digest, at most `cache_max_bytes` of pixel values."""

    def __init__(self, processor_dir: str | None, limits: ImageLimits = ImageLimits(),
                 cache_max_bytes: int = 64 << 20):
        self.processor_dir = processor_dir
        self.limits = limits
        self.cache_max_bytes = cache_max_bytes
        self._processor = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, PreparedImage] = OrderedDict()
        self._cache_bytes = 0

    @property
    def processor(self):
        if self._processor is None:
            if self.processor_dir is None:
                raise InvalidRequest("this checkpoint has no processor/ directory (Qwen-Image-Edit's image "
                                     "processor settings): it encodes text only, i2i is not available")
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self.processor_dir)
        return self._processor

    @property
    def merge_size(self) -> int:
        return int(self.processor.merge_size)

    def preprocess(self, img) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A condition image -> (pixel_values [t*h*w, C*Tp*P*P] float32, grid (t, h, w))."""
        out = self.processor(images=[img], return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
        return out["pixel_values"].contiguous(), grid

    def prepare(self, blob: bytes, where: str, digest: bytes | None = None) -> PreparedImage:
        digest = digest or image_digest(blob)
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
                return hit
        img = to_condition_image(decode_image(blob, where, self.limits), where)
        pixel_values, grid = self.preprocess(img)
        merge = self.merge_size
        t, h, w = grid
        prepared = PreparedImage(digest, grid, t * h * w // (merge * merge), pixel_values)
        self._remember(prepared)
        return prepared

    def _remember(self, p: PreparedImage) -> None:
        if p.nbytes > self.cache_max_bytes:
            return
        with self._lock:
            if p.digest in self._cache:
                return
            self._cache[p.digest] = p
            self._cache_bytes += p.nbytes
            while self._cache_bytes > self.cache_max_bytes:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    def prepare_job(self, per_prompt: list[list]) -> list[tuple[PreparedImage, ...]]:
        """One job's images, one list per prompt: limits checked, the same bytes prepared once."""
        lim = self.limits.max_images
        digests = [[image_digest(b) for b in imgs] for imgs in per_prompt]  # types checked by per_prompt_images
        for i, imgs in enumerate(per_prompt):
            if len(imgs) > lim:
                raise InvalidRequest(f"prompt {i} has {len(imgs)} images, over max_images_per_job {lim}")
        n_distinct = len({d for row in digests for d in row})
        if n_distinct > lim:
            raise InvalidRequest(f"{n_distinct} distinct images in one job, over max_images_per_job {lim}")
        done: dict[bytes, PreparedImage] = {}
        out = []
        for i, (imgs, row) in enumerate(zip(per_prompt, digests)):
            for j, (b, d) in enumerate(zip(imgs, row)):
                if d not in done:
                    done[d] = self.prepare(b, f"prompt {i} image {j}", d)
            out.append(tuple(done[d] for d in row))
        return out
