"""i2i condition images on the worker: checked decoding on the CPU, the rest on the device.

Per image, in the intake thread or the image pool (`ImagePreprocessor.submit`: PIL lets go of the GIL while it
decodes, so a job's distinct images, and several image jobs, are prepared side by side):

1. `decode_image`: PIL opens only PNG, JPEG, WebP or BMP (LightX2V's client sends BMP); the size the header
   declares is checked (non-zero, at most `max_pixels` and `max_side`) before a single pixel is decoded; truncated
   or corrupt data fails at decode; EXIF orientation is applied first, then the result is RGB (as diffusers'
   `load_image` does: `ImageOps.exif_transpose`, then `convert("RGB")`).
2. `condition_size`: diffusers' QwenImageEditPlusPipeline size, `calculate_dimensions(384 * 384, w / h)` (sides
   rounded to multiples of 32). An image that already has a condition size (one `calculate_dimensions` can
   return: sides multiples of 32 within rounding of 384*384 in area) is taken as it is: DiT workers and LightX2V
   send condition images, and resizing those a second time is not a no-op (e.g. 416x384 -> 384x384), so the
   encoding would no longer be the pipeline's.
3. The grid: the checkpoint's Qwen2-VL image processor settings (`processor/`) give the patches (t, h, w) the
   condition image becomes, and so the t*h*w / merge_size**2 `<|image_pad|>` tokens it takes.

The pixels themselves (the pipeline's Lanczos resize, the processor's bicubic resize, normalize, patchify) are
computed on the device by workers.model.image_patches, equal bit for bit to PIL and the processor.

Images are identified by the digest of their encoded bytes: the same bytes in a job (a prompt and its negative)
are decoded once, and recent ones are kept decoded (bounded in bytes) for repeats across jobs.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from broker.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
CONDITION_IMAGE_AREA = 384 * 384  # diffusers' pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_images: int = 4  # distinct images per job, and images per prompt
    max_pixels: int = 4096 * 4096  # declared width x height of an encoded image
    max_side: int = 8192  # declared width or height

    def __post_init__(self):
        assert self.max_images >= 1 and self.max_pixels >= 1 and self.max_side >= 1, "image limits must be positive"


@dataclass(frozen=True, slots=True, eq=False)
class PreparedImage:
    """One decoded condition image, ready for the device's resize and patchify."""

    digest: bytes  # SHA-256 of the encoded bytes (20 bytes of it): identity for dedupe and caches
    grid_thw: tuple[int, int, int]  # patches (t, h, w) before the 2x2 merge
    n_tokens: int  # <|image_pad|> tokens it takes in the sequence: t*h*w / merge**2
    pixels: torch.Tensor  # [H, W, 3] uint8, CPU: decoded, EXIF-oriented, RGB, at its encoded size
    condition_size: tuple[int, int]  # (width, height) the Edit pipeline resizes it to

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()

    def pixel_values(self, spec, device: torch.device | str = "cpu") -> torch.Tensor:
        """[t*h*w, C*Tp*P*P] float32 on `device`: the image processor's output for this image."""
        from workers.model.image_patches import image_patches

        return image_patches(self.pixels, self.condition_size, spec, torch.device(device))


def image_digest(blob: bytes) -> bytes:
    # SHA-256, not blake2b: with the SHA extensions of today's server CPUs it hashes about twice as fast, and the
    # intake hashes every image's bytes; collision-resistant all the same (it is a cache identity)
    return hashlib.sha256(bytes(blob)).digest()[:20]


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


def open_image(blob, where: str, limits: ImageLimits):
    """Encoded bytes -> a PIL image of which only the header is read, its declared size checked; or
    InvalidRequest naming `where` and the reason."""
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
    _check_size(*img.size, where, limits)
    return img


def decode_image(blob, where: str, limits: ImageLimits):
    """Encoded bytes -> an RGB PIL image, EXIF orientation applied, or InvalidRequest naming `where` and the
    reason. The declared size is checked before any pixel data is decoded."""
    from PIL import ImageOps

    img = open_image(blob, where, limits)
    w, h = img.size
    try:
        img.load()  # truncated or corrupt data fails here (PIL's LOAD_TRUNCATED_IMAGES is left off)
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)  # the picture as a viewer shows it; sides may swap
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


def condition_size(w: int, h: int, where: str = "image") -> tuple[int, int]:
    """(width, height) of what QwenImageEditPlusPipeline hands its processor for a w x h image (module docstring);
    its resize (PIL Lanczos, VaeImageProcessor.resize) runs on the device (workers.model.image_patches)."""
    if is_condition_size(w, h):
        return w, h
    cw, ch = calculate_dimensions(CONDITION_IMAGE_AREA, w / h)
    if cw < 32 or ch < 32:
        raise InvalidRequest(f"{where} is {w}x{h}: its aspect ratio is too extreme for a condition image "
                             f"({cw}x{ch} at about 384x384 in area)")
    return cw, ch


# --- Qwen2.5-VL's preprocessing ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PoolCall:
    """A call handed to the image pool. Its waiter helps: `result` runs the call on the waiting thread itself if
    no pool thread has started it. So a call in the pool may wait on calls it handed to the same pool (an image
    job's prepare on its images' decodes) without a deadlock: it only ever waits on calls that are running."""

    future: Future
    fn: Callable
    args: tuple

    def result(self):
        if self.future.cancel():  # still queued: nobody will run it but this thread
            return self.fn(*self.args)
        return self.future.result()


class ImagePreprocessor:
    """Turns encoded images into PreparedImages: decoded on the CPU (side by side in its pool, started on first
    use), the grid from the checkpoint's image processor settings (loaded on first use). Thread-safe; keeps recent
    PreparedImages by digest, at most `cache_max_bytes` of decoded pixels."""

    def __init__(self, processor_dir: str | None, limits: ImageLimits = ImageLimits(),
                 cache_max_bytes: int = 64 << 20, pool_threads: int | None = None):
        self.processor_dir = processor_dir
        # pixels in pinned memory (set for a CUDA device): the compute thread's copy to the device then neither
        # waits for the device nor copies on the host
        self.pin_memory = False
        self.limits = limits
        self.cache_max_bytes = cache_max_bytes
        # the one pool's threads: image jobs' prepare and their images' decodes
        self.pool_threads = pool_threads or max(1, min(8, os.cpu_count() or 1))
        self._processor = None
        self._spec = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # the decoded-image cache and starting the pool
        # loading the processor: transformers' lazy imports are not thread-safe, and a job's first images decode
        # side by side in the pool
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[bytes, PreparedImage] = OrderedDict()
        self._cache_bytes = 0

    @property
    def processor(self):
        """HF's image processor of the checkpoint: its settings decide the pixels (and it is the tests' reference)."""
        if self._processor is None:
            if self.processor_dir is None:
                raise InvalidRequest("this checkpoint has no processor/ directory (Qwen-Image-Edit's image "
                                     "processor settings): it encodes text only, i2i is not available")
            with self._load_lock:
                if self._processor is None:
                    from transformers import AutoImageProcessor

                    self._processor = AutoImageProcessor.from_pretrained(self.processor_dir)
        return self._processor

    @property
    def spec(self):
        """The processor's settings as a workers.model.image_patches.PixelSpec."""
        if self._spec is None:
            from workers.model.image_patches import PixelSpec

            self._spec = PixelSpec.from_processor(self.processor)
        return self._spec

    @property
    def merge_size(self) -> int:
        return self.spec.merge_size

    def decode(self, blob: bytes, where: str, digest: bytes) -> PreparedImage:
        """Decodes one image (no cache): checks, EXIF orientation, RGB, its condition size and grid."""
        img = decode_image(blob, where, self.limits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's buffer is read-only; nothing writes these pixels
            pixels = torch.from_numpy(np.asarray(img))  # [H, W, 3] uint8
        if self.pin_memory:
            pixels = pixels.pin_memory()
        cw, ch = condition_size(*img.size, where)
        spec = self.spec
        t, h, w = grid = spec.grid(cw, ch)
        return PreparedImage(digest, grid, t * h * w // (spec.merge_size ** 2), pixels, (cw, ch))

    def prepare(self, blob: bytes, where: str, digest: bytes | None = None) -> PreparedImage:
        digest = digest or image_digest(blob)
        hit = self._cached(digest)
        if hit is None:
            hit = self.decode(blob, where, digest)
            self._remember(hit)
        return hit

    def _cached(self, digest: bytes) -> PreparedImage | None:
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
            return hit

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

    def submit(self, fn: Callable, *args) -> PoolCall:
        """`fn(*args)` handed to the image pool (the worker's intake prepares several image jobs there)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.pool_threads, thread_name_prefix="images")
            pool = self._pool
        return PoolCall(pool.submit(fn, *args), fn, args)

    def prepare_job(self, per_prompt: list[list]) -> list[tuple[PreparedImage, ...]]:
        """One job's images, one list per prompt: limits checked, the same bytes prepared once; the distinct
        images not in the cache decoded side by side in the pool (PIL releases the GIL while it decodes)."""
        digests = [[image_digest(b) for b in imgs] for imgs in per_prompt]  # types checked by per_prompt_images
        self._check_counts(per_prompt)
        todo: dict[bytes, tuple[bytes, str]] = {}
        done: dict[bytes, PreparedImage] = {}
        for i, (imgs, row) in enumerate(zip(per_prompt, digests)):
            for j, (b, d) in enumerate(zip(imgs, row)):
                if d not in done and d not in todo:
                    hit = self._cached(d)
                    if hit is not None:
                        done[d] = hit
                    else:
                        todo[d] = (b, f"prompt {i} image {j}")
        self._check_counts(per_prompt, len(done) + len(todo))
        if len(todo) > 1:
            calls = {d: self.submit(self.decode, b, where, d) for d, (b, where) in todo.items()}
            decoded = {d: c.result() for d, c in calls.items()}  # the first failure (in order) fails the job
        else:
            decoded = {d: self.decode(b, where, d) for d, (b, where) in todo.items()}
        for p in decoded.values():
            self._remember(p)
        done.update(decoded)
        return [tuple(done[d] for d in row) for row in digests]

    def declared_pixels(self, per_prompt: list[list]) -> int:
        """Width x height summed over a job's distinct images as their headers declare, no pixel decoded: what
        `prepare_job` will hold decoded (3 bytes a pixel). Refuses, with the same InvalidRequest, what
        `prepare_job` would refuse before decoding: too many images, a header that is no image's or declares
        too large a size."""
        self._check_counts(per_prompt)
        distinct: dict[bytes, str] = {}
        for i, imgs in enumerate(per_prompt):
            for j, b in enumerate(imgs):
                distinct.setdefault(bytes(b), f"prompt {i} image {j}")
        self._check_counts(per_prompt, len(distinct))
        total = 0
        for b, where in distinct.items():
            w, h = open_image(b, where, self.limits).size  # EXIF rotation and RGB keep width x height
            total += w * h
        return total

    def _check_counts(self, per_prompt: list[list], n_distinct: int = 0) -> None:
        lim = self.limits.max_images
        for i, imgs in enumerate(per_prompt):
            if len(imgs) > lim:
                raise InvalidRequest(f"prompt {i} has {len(imgs)} images, over max_images_per_job {lim}")
        if n_distinct > lim:
            raise InvalidRequest(f"{n_distinct} distinct images in one job, over max_images_per_job {lim}")
