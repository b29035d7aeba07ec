"""Condition images on the device (workers.model.image_patches) against what diffusers and Qwen2VLImageProcessor
compute: diffusers' load_image (EXIF orientation, RGB), the Edit pipeline's Lanczos resize to the condition size,
the processor's resize, normalize and patchify. Equal bit for bit, on odd sizes, non-square, grayscale, RGBA,
palette PNG and EXIF-rotated JPEG; and the two resamplers against PIL and torchvision themselves."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from broker.errors import InvalidRequest
from workers import images as I
from workers.model.image_patches import PixelSpec, image_patches, resize_u8


def photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(arr + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(w: int, h: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(photo(w, h, orientation)), "JPEG", quality=90, exif=exif.tobytes())


IMAGES = {
    "odd wide": encoded(Image.fromarray(photo(503, 301, 1))),
    "odd tall": encoded(Image.fromarray(photo(211, 639, 2))),
    "large": encoded(Image.fromarray(photo(1280, 853, 3)), "JPEG", quality=92),
    "small, upscaled": encoded(Image.fromarray(photo(57, 43, 4))),
    "condition size already": encoded(Image.fromarray(photo(480, 288, 5))),
    "grayscale": encoded(Image.fromarray(photo(300, 200, 6)).convert("L")),
    "RGBA": encoded(Image.fromarray(np.dstack([photo(320, 240, 7), photo(320, 240, 8)[..., :1]]), "RGBA")),
    "palette": encoded(Image.fromarray(photo(250, 330, 9)).convert("P", palette=Image.Palette.ADAPTIVE)),
    "EXIF rotate 90": exif_rotated_jpeg(400, 240, 6),
    "EXIF mirror + 270": exif_rotated_jpeg(360, 270, 7),
}


@pytest.fixture(scope="module")
def prep(tiny_dir):
    return I.ImagePreprocessor(f"{tiny_dir}/processor")


def reference_pixels(blob: bytes, processor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """diffusers.utils.load_image, QwenImageEditPlusPipeline's resize, then the processor."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
    from diffusers.utils import load_image

    img = load_image(Image.open(io.BytesIO(blob)))
    w, h = img.size
    if not I.is_condition_size(w, h):  # ours takes condition sizes as they are (workers.images)
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)
        img = VaeImageProcessor(vae_scale_factor=16).resize(img, h, w)
    out = processor(images=[img], return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


@pytest.mark.parametrize("name", list(IMAGES))
def test_device_pixels_equal_diffusers_and_the_processor(prep, name):
    want, grid = reference_pixels(IMAGES[name], prep.processor)
    im = prep.prepare(IMAGES[name], name)
    assert im.grid_thw == grid and im.n_tokens == grid[0] * grid[1] * grid[2] // 4
    got = im.pixel_values(prep.spec)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_exif_orientation_is_applied_before_anything(prep):
    blob = IMAGES["EXIF rotate 90"]
    im = prep.prepare(blob, "rotated")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
    assert im.pixels.shape == (400, 240, 3)  # stored 400 wide, shown 240 wide
    assert np.array_equal(im.pixels.numpy(), np.asarray(upright))
    assert im.condition_size[0] < im.condition_size[1]  # a portrait condition image, as a viewer sees it


@pytest.mark.parametrize("size, out", [((1024, 768), (448, 320)), ((97, 61), (64, 40)), ((300, 300), (384, 384)),
                                       ((640, 200), (640, 210)), ((33, 900), (70, 2000)), ((503, 301), (512, 288)),
                                       ((150, 200), (100, 97))])  # the last two: rows first in Pillow >= 13
def test_lanczos_equals_pils(size, out):
    arr = photo(*size, seed=sum(size))
    want = np.asarray(Image.fromarray(arr).resize(out, Image.Resampling.LANCZOS, reducing_gap=None))
    x = torch.from_numpy(arr).permute(2, 0, 1).double()
    got = resize_u8(x, *out, "lanczos").permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("size, out", [((448, 320), (448, 308)), ((384, 384), (392, 392)), ((97, 61), (84, 56)),
                                       ((1000, 30), (28, 56)), ((100, 200), (110, 90))])  # the last: Pillow 13 would
# resize rows first; torch never does
def test_bicubic_equals_torchvisions_uint8(size, out):
    from torchvision.transforms.v2 import functional as tvF

    t = torch.from_numpy(photo(*size, seed=sum(out))).permute(2, 0, 1).contiguous()
    want = tvF.resize(t, [out[1], out[0]], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    got = resize_u8(t.double(), *out, "bicubic", torch_bits=True)
    assert torch.equal(got, want.double())


def test_spec_is_the_processors(prep):
    p = prep.processor
    spec = prep.spec
    assert spec.torch_resize and spec.image_mean == tuple(p.image_mean) and spec.image_std == tuple(p.image_std)
    assert (spec.min_pixels, spec.max_pixels, spec.rescale_factor) == (3136, 12845056, p.rescale_factor)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (p.patch_size, p.merge_size,
                                                                            p.temporal_patch_size)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for w, h in [(480, 288), (384, 384), (32, 1024), (1024, 32), (3000, 2000), (56, 56)]:
        assert spec.resized(w, h) == smart_resize(h, w, 28, spec.min_pixels, spec.max_pixels)[::-1]


def test_a_jobs_images_decode_in_the_pool_and_equal_one_by_one(tiny_dir):
    blobs = [IMAGES["odd wide"], IMAGES["large"], IMAGES["grayscale"]]
    pooled = I.ImagePreprocessor(f"{tiny_dir}/processor", pool_threads=3)
    (row,) = pooled.prepare_job([blobs + [blobs[0]]])  # 3 distinct images, one repeated
    assert row[0] is row[3]
    single = I.ImagePreprocessor(f"{tiny_dir}/processor")
    for got, b in zip(row, blobs):
        want = single.prepare(b, "x")
        assert got.grid_thw == want.grid_thw and torch.equal(got.pixels, want.pixels)
    assert pooled._pool is not None and single._pool is None


def test_a_bad_image_in_the_pool_fails_its_job_by_name(tiny_dir):
    prep = I.ImagePreprocessor(f"{tiny_dir}/processor", pool_threads=2)
    with pytest.raises(InvalidRequest, match="prompt 0 image 1 .* truncated or corrupt"):
        prep.prepare_job([[IMAGES["odd wide"], IMAGES["large"][:5000], IMAGES["palette"]]])
    (row,) = prep.prepare_job([[IMAGES["odd wide"]]])  # and it keeps serving
    assert row[0].n_tokens > 0


def test_a_call_in_the_pool_may_wait_on_calls_it_hands_the_pool(tiny_dir):
    """One pool prepares image jobs and decodes their images: a waiter runs a call no pool thread has started, so
    a job that waits on its own decodes finishes even while it holds the pool's only thread."""
    prep = I.ImagePreprocessor(f"{tiny_dir}/processor", pool_threads=1)
    blobs = [IMAGES["odd wide"], IMAGES["large"]]
    job = prep.submit(prep.prepare_job, [blobs])
    (row,) = job.future.result(timeout=60)  # run by the pool's one thread, which then waits on both decodes
    assert [im.grid_thw for im in row] == [prep.prepare(b, "x").grid_thw for b in blobs]


def test_patches_on_another_device_type_match_if_any():
    # the same function runs on CUDA where there is one (the worker's device); here, CPU only
    arr = torch.from_numpy(photo(320, 200, 11))
    a = image_patches(arr, (320, 192), PixelSpec(), torch.device("cpu"))
    if torch.cuda.is_available():
        b = image_patches(arr, (320, 192), PixelSpec(), torch.device("cuda")).cpu()
        assert torch.equal(a, b)
    assert a.shape == (14 * 22, 3 * 2 * 14 * 14)
