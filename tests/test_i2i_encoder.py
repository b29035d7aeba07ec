"""i2i in process: both backends against HF called the way QwenImageEditPlusPipeline calls it (tiny checkpoint,
CPU, fp32); the M-RoPE positions against HF's get_rope_index; the condition resize and preprocessing against
diffusers and the Qwen2-VL processor; bad images refused with clear errors."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from broker.errors import InvalidRequest
from broker.protocol.schemas import EncodeRequest, per_prompt_images
from tests.test_kernel_encoder import EagerRunner, rel_l2
from workers import images as I
from workers.encoders import load_encoder
from workers.encoders.kernel import shared_parts
from workers.encoding_cache import EncodingCache
from workers.images import ImageLimits
from workers.model.mrope_positions import mrope_positions
from workers.templates import I2I

# QwenImageEditPlusPipeline.prompt_template_encode and its start index, as diffusers 0.42 writes them
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
EDIT_DROP_IDX = 64
IMAGE_TOKEN = 151655


def noise_png(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    # smooth blobs plus noise: closer to a photo than white noise, cheap to make
    base = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


WIDE, TALL, SQUARE = noise_png(500, 300, 1), noise_png(200, 640, 2), noise_png(96, 96, 3)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(f"{tiny_dir}/processor")  # what the Edit pipeline loads


def condition_images(blobs):
    """QwenImageEditPlusPipeline.__call__'s resize, with diffusers' own functions."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    vae_proc = VaeImageProcessor(vae_scale_factor=16)  # the pipeline's: vae_scale_factor * 2
    out = []
    for b in blobs:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.size[0] / img.size[1])
        out.append(vae_proc.resize(img, h, w))
    return out


def edit_plus_reference(model, processor, prompt: str, blobs) -> torch.Tensor:
    """QwenImageEditPlusPipeline._get_qwen_prompt_embeds for one prompt, written out: Picture-i template,
    processor(text, images, padding), model(..., output_hidden_states), hidden_states[-1], masked split, drop 64.
    Plus `mm_token_type_ids`, which diffusers 0.42 drops (issue #14194): without it transformers 5 gives image
    tokens 1-D positions instead of the 3-D M-RoPE ones the model was trained with."""
    images = condition_images(blobs)
    pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(blobs)))
    inputs = processor(text=[EDIT_TEMPLATE.format(pictures + prompt)], images=images, padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=inputs["mm_token_type_ids"], output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    (split,) = torch.split(out.hidden_states[-1][mask], mask.sum(dim=1).tolist(), dim=0)
    return split[EDIT_DROP_IDX:]


CASES = {
    "one wide image": ("make the sky purple", [WIDE]),
    "three images": ("put the cat from picture 2 on the sofa of picture 1, in the style of picture 3",
                     [WIDE, TALL, SQUARE]),
    "one tall image, empty prompt": ("", [TALL]),
}


@pytest.fixture(scope="module")
def kern(tiny_dir):
    return load_encoder(tiny_dir, backend="kernel", use_triton=False)


@pytest.fixture(scope="module")
def want(baseline, processor):
    return {name: edit_plus_reference(baseline.model, processor, p, imgs) for name, (p, imgs) in CASES.items()}


def test_templates_are_the_pipelines():
    assert I2I.text == EDIT_TEMPLATE and I2I.drop_idx == EDIT_DROP_IDX


def test_tokens_and_pixels_equal_the_processors(baseline, processor):
    prompt, blobs = CASES["three images"]
    batch = baseline.tokenize([prompt], "i2i", images=[blobs])
    pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(3))
    ref = processor(text=[EDIT_TEMPLATE.format(pictures + prompt)], images=condition_images(blobs),
                    return_tensors="pt")
    assert batch.ids[0] == ref["input_ids"][0].tolist()
    imgs = batch.images_of(0)
    assert [im.grid_thw for im in imgs] == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    spec = baseline.images.spec
    assert torch.equal(torch.cat([im.pixel_values(spec) for im in imgs]), ref["pixel_values"])
    assert [im.n_tokens for im in imgs] == [t * h * w // 4 for t, h, w in ref["image_grid_thw"].tolist()]
    assert batch.text_lengths[0] == len(batch.ids[0]) - EDIT_DROP_IDX - sum(im.n_tokens for im in imgs)


@pytest.mark.parametrize("case", list(CASES))
def test_baseline_equals_the_edit_pipelines_encoding(baseline, want, case):
    prompt, blobs = CASES[case]
    (got,) = baseline.encode([prompt], task="i2i", images=[blobs])
    assert got.shape == want[case].shape
    torch.testing.assert_close(got, want[case], rtol=1e-5, atol=1e-5)


def test_kernel_equals_the_edit_pipelines_encoding(kern, want):
    names = list(CASES)
    got = kern.encode([CASES[n][0] for n in names], task="i2i", images=[CASES[n][1] for n in names])  # one batch
    for name, g in zip(names, got):
        assert g.shape == want[name].shape and g.dtype == want[name].dtype
        assert rel_l2(g, want[name]) < 1e-4, name


def test_cfg_pair_batched_equals_one_by_one(baseline, kern, processor):
    blobs = [WIDE, TALL]
    prompts = ["make it blue", " "]
    ref = [edit_plus_reference(baseline.model, processor, p, blobs) for p in prompts]
    for enc in (baseline, kern):
        got = enc.encode(prompts, task="i2i", images=blobs)  # a flat list: the same images for both prompts
        for g, w in zip(got, ref):
            assert g.shape == w.shape and rel_l2(g, w) < 1e-4, enc.backend


def test_kernel_prefix_cache_serves_i2i_and_equals_uncached(kern, monkeypatch):
    batch = kern.tokenize(["make the sky purple", "x"], "i2i", images=[[WIDE], [TALL, SQUARE]])
    assert kern._usable_prefix(batch) is kern.prefix_for("i2i") and kern.prefix_for("i2i").length == 64
    cached, lengths = kern.encode_packed(batch)
    monkeypatch.setattr(kern, "prefix_cache", False)
    uncached, lengths2 = kern.encode_packed(batch)
    assert lengths == lengths2 == batch.output_lengths
    assert rel_l2(cached, uncached) < 1e-5


def test_kernel_runs_each_image_through_the_vision_tower_once(kern, monkeypatch):
    monkeypatch.setattr(kern, "feature_cache", EncodingCache(64 << 20))
    c0, r0 = kern.vision_images_computed, kern.vision_images_reused
    calls = []
    real = kern.vision.__call__

    class Spy:
        args = kern.vision.args

        def __call__(self, pixel_values, grids):
            calls.append(len(grids))
            return real(pixel_values, grids)

    monkeypatch.setattr(kern, "vision", Spy())
    first = kern.encode(["make it blue", " "], task="i2i", images=[WIDE, TALL])  # a CFG pair, 2 images each
    assert calls == [2]  # one forward over the two distinct images
    assert (kern.vision_images_computed - c0, kern.vision_images_reused - r0) == (2, 2)
    again = kern.encode(["make it green", " "], task="i2i", images=[TALL, WIDE])
    assert calls == [2]  # both from the feature cache
    assert (kern.vision_images_computed - c0, kern.vision_images_reused - r0) == (2, 6)
    monkeypatch.setattr(kern, "feature_cache", EncodingCache(0))  # off: computed again, same answer
    assert [rel_l2(a, b) for a, b in zip(kern.encode(["make it blue", " "], task="i2i", images=[WIDE, TALL]),
                                         first)] == [0.0, 0.0]
    assert calls == [2, 2] and again[1].shape[0] == first[1].shape[0]


def test_raw_i2i_input_returns_every_token(baseline):
    raw = I2I.format("make it blue", 2)
    (got,) = baseline.encode_tokens(baseline.tokenize([raw], "i2i", raw=True, images=[[WIDE, TALL]]))
    (cut,) = baseline.encode(["make it blue"], task="i2i", images=[[WIDE, TALL]])
    assert got.shape[0] == cut.shape[0] + EDIT_DROP_IDX
    torch.testing.assert_close(got[EDIT_DROP_IDX:], cut, rtol=1e-5, atol=1e-5)


# -- M-RoPE positions vs HF's get_rope_index -------------------------------------------------------------------

def layout(rng, parts):
    """parts: ints (text runs of that length) and (t, h, w) grids (an image's pad tokens, merge 2)."""
    ids, grids = [], []
    for p in parts:
        if isinstance(p, int):
            ids += rng.integers(0, 151000, p).tolist()
        else:
            grids.append(p)
            ids += [IMAGE_TOKEN] * (p[0] * p[1] * p[2] // 4)
    return ids, grids


@pytest.mark.parametrize("parts_list", [
    [[5, (1, 4, 6), 7]],  # text, one non-square image, text
    [[64, 10, (1, 4, 4), 3, (1, 6, 2), 3, (1, 2, 8), 9]],  # the template's shape: three images
    [[(1, 8, 4), 5]],  # an image first, text after
    [[3, (1, 28, 28)]],  # an image last (a 392x392 condition image's grid)
    [[64, 8, (1, 22, 34), 5], [64, 3, (1, 40, 14), 2, (1, 4, 4), 30]],  # a right-padded batch of two
])
def test_mrope_positions_equal_hf_get_rope_index(baseline, parts_list):
    rng = np.random.default_rng(len(str(parts_list)))
    seqs = [layout(rng, parts) for parts in parts_list]
    L = max(len(ids) for ids, _ in seqs)
    input_ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, (ids, _) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    grids = torch.tensor([g for _, gs in seqs for g in gs])
    want, _ = baseline.model.model.get_rope_index(input_ids, (input_ids == IMAGE_TOKEN).int(), image_grid_thw=grids,
                                                  attention_mask=mask)
    for i, (ids, gs) in enumerate(seqs):
        got = mrope_positions(ids, gs, IMAGE_TOKEN, 2)
        assert got.shape == (3, len(ids)) and got.dtype == np.int32
        assert np.array_equal(got, want[:, i, :len(ids)].numpy())


def test_mrope_positions_refuse_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="needs 6"):
        mrope_positions([1, IMAGE_TOKEN, IMAGE_TOKEN, 2], [(1, 4, 6)], IMAGE_TOKEN, 2)
    with pytest.raises(ValueError, match="1 image grid"):
        mrope_positions([1, 2, 3], [(1, 2, 2)], IMAGE_TOKEN, 2)


# -- condition images ----------------------------------------------------------------------------------------

def test_condition_resize_is_the_pipelines_and_condition_images_pass_unchanged():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    for w in range(40, 3000, 37):
        for h in (45, 64, 300, 384, 416, 641, 1024, 2999):
            cw, ch = calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)
            assert I.calculate_dimensions(I.CONDITION_IMAGE_AREA, w / h) == (cw, ch)
            if cw and ch:
                assert I.is_condition_size(cw, ch), (w, h)  # what the DiT side sends is taken as it is
    assert not I.is_condition_size(500, 300) and not I.is_condition_size(384, 383)
    (want,) = condition_images([WIDE])
    assert I.condition_size(500, 300) == want.size == (480, 288)
    assert I.condition_size(480, 288) == (480, 288)  # already a condition size: not resized again
    assert I.condition_size(416, 384) == (416, 384)  # one that calculate_dimensions would map to 384x384


def test_jpeg_webp_bmp_and_other_modes_decode(baseline):
    for fmt in ("JPEG", "WEBP", "BMP"):
        batch = baseline.tokenize(["x"], "i2i", images=[[noise_png(200, 120, 5, fmt)]])
        assert batch.images_of(0)[0].grid_thw[1:] == (20, 34)  # 480x288 -> smart_resize 476x280 / 14
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(buf, "PNG")
    assert baseline.tokenize(["x"], "i2i", images=[[buf.getvalue()]]).images_of(0)[0].n_tokens > 0


# -- bad images ------------------------------------------------------------------------------------------------

def png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


BAD = [
    (WIDE[: len(WIDE) // 2], "cannot be decoded, truncated or corrupt"),
    (png_header_only(0, 10), "declares a size of 0x10"),
    (png_header_only(100000, 100000), "over max_image_side 8192"),
    (png_header_only(5000, 5000), "25000000 pixels, over max_image_pixels 16777216"),
    (b"definitely not an image", "is not a readable PNG, JPEG, WebP or BMP image"),
    (noise_png(8, 8, fmt="GIF"), "is not a readable PNG, JPEG, WebP or BMP image"),
    (noise_png(4000, 4, 1), "aspect ratio is too extreme"),
    (b"", "is empty"),
]


@pytest.mark.parametrize("blob, message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_images_are_refused_clearly(baseline, blob, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        baseline.encode(["x", "y"], task="i2i", images=[[WIDE], [TALL, blob]])
    assert "prompt 1 image 1" in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="i2i"), "'i2i' needs at least one image per prompt; prompt 0"),
    (dict(task="i2i", images=[[WIDE], []]), "prompt 1 has none"),
    (dict(task="t2i", images=[WIDE]), "'t2i' takes no images"),
    (dict(task="i2i", images=[[WIDE]]), "images holds 1 list"),
    (dict(task="i2i", images=[[noise_png(64, 64, s) for s in range(5)], [WIDE]]), "prompt 0 has 5 images, over"),
    (dict(task="i2i", images=[[noise_png(64, 64, s) for s in range(3)], [noise_png(64, 64, s) for s in range(3, 5)]]),
     "5 distinct images in one job, over max_images_per_job 4"),
    (dict(task="i2i", images=[["not bytes"], [WIDE]]), r"images\[0\]\[0\] is a str"),
])
def test_bad_image_arguments_are_refused_clearly(baseline, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        baseline.encode(["x", "y"], **kwargs)


def test_image_pads_must_match_the_images(baseline):
    with pytest.raises(InvalidRequest, match="holds 2 <|image_pad|> token.*for 1 image"):
        baseline.encode(["<|vision_start|><|image_pad|><|vision_end|> sneaky"], task="i2i", images=[WIDE])
    with pytest.raises(InvalidRequest, match="holds 1 <|image_pad|> token.*for 2 image.*raw input"):
        baseline.tokenize([I2I.format("x", 1)], "i2i", raw=True, images=[[WIDE, TALL]])
    with pytest.raises(InvalidRequest, match="side by side"):
        baseline.tokenize(["<|image_pad|><|image_pad|>"], "i2i", raw=True, images=[[WIDE, TALL]])


def test_the_text_limit_does_not_count_image_tokens(baseline):
    (out,) = baseline.encode(["fox " * 60], task="i2i", images=[[WIDE, TALL, SQUARE]])  # ~600 image tokens
    assert out.shape[0] > baseline.max_prompt_tokens
    with pytest.raises(InvalidRequest, match="over the limit of 96"):
        baseline.encode(["fox " * 200], task="i2i", images=[[WIDE]])


def test_image_limits_are_configurable(baseline):
    baseline.configure_images(ImageLimits(max_images=1, max_pixels=100 * 100, max_side=200))
    try:
        with pytest.raises(InvalidRequest, match="over max_images_per_job 1"):
            baseline.tokenize(["x"], "i2i", images=[[WIDE, TALL]])
        with pytest.raises(InvalidRequest, match="over max_image_side 200"):
            baseline.tokenize(["x"], "i2i", images=[[noise_png(300, 20, 9)]])
        with pytest.raises(InvalidRequest, match="over max_image_pixels 10000"):
            baseline.tokenize(["x"], "i2i", images=[[noise_png(150, 150, 9)]])
    finally:
        baseline.configure_images(ImageLimits())


# -- the wire format -------------------------------------------------------------------------------------------

def test_request_images_are_one_list_per_prompt():
    ok = EncodeRequest(prompts=["a", "b"], task="i2i", images=[[b"x"], [b"y", b"z"]]).validate()
    assert EncodeRequest.from_msgpack(ok.to_msgpack()) == ok
    assert per_prompt_images([b"x", b"y"], 2) == [[b"x", b"y"], [b"x", b"y"]]  # the CFG-pair shorthand
    assert per_prompt_images(None, 2) == [] and per_prompt_images(([b"x"], (b"y",)), 2) == [[b"x"], [b"y"]]
    for images, task, message in [
        ([b"x"], "t2i", "'t2i' takes no images"),
        ([], "i2i", "one list of images per prompt: 2 prompt"),
        ([[b"x"]], "i2i", "2 prompt\\(s\\), 1 list"),
        ([b"x", b"y"], "i2i", "images\\[0\\] is a bytes, not a list"),
        ([[b"x"], []], "i2i", "prompt 1 has none"),
        ([[b"x"], [7]], "i2i", "images\\[1\\]\\[0\\] is a int"),
        ([[b"x"], [b""]], "i2i", "images\\[1\\]\\[0\\] is empty bytes"),
        ("x", "i2i", "images must be a list"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            EncodeRequest(prompts=["a", "b"], task=task, images=images).validate()


def test_kernel_i2i_through_the_graph_runner_equals_eager(kern, monkeypatch):
    """i2i batches replay the graphs that read spliced embeddings (an eager stand-in for replay on the CPU): the
    same rows as the eager path, with and without the prefix cache, in buckets and past the largest."""
    monkeypatch.setattr(kern, "feature_cache", EncodingCache(0))
    cases = [(["make the sky purple"], [[WIDE]]), (["x", " "], [[TALL, SQUARE], [TALL, SQUARE]]),
             (["put it on the sofa"], [[WIDE, TALL, SQUARE]])]  # the last: more tokens than the largest bucket
    runner = EagerRunner(kern.model, torch.device("cpu"), max_tokens=256, max_seqs=3)
    for prefix_cache in (True, False):
        monkeypatch.setattr(kern, "prefix_cache", prefix_cache)
        for prompts, images in cases:
            batch = kern.tokenize(prompts, "i2i", images=images)
            monkeypatch.setattr(kern, "graphs", None)
            want, want_lengths = kern.encode_packed(batch)
            monkeypatch.setattr(kern, "graphs", runner)
            got, lengths = kern.encode_packed(batch)
            assert lengths == want_lengths and rel_l2(got, want) < 1e-6, (prefix_cache, prompts)
    captured = {(k[0], k[2]) for k in runner.graphs}
    assert captured == {(id(kern.prefix_for("i2i")), True), (id(None), True)}


def test_shared_parts_group_prompts_with_the_same_images(kern):
    prompts = ["make it blue", " ", "make it red", "make it blue", "a different picture"]
    images = [[WIDE, TALL], [WIDE, TALL], [WIDE, TALL], [TALL, WIDE], [SQUARE]]
    batch = kern.tokenize(prompts, "i2i", images=images)
    P = kern.prefix_for("i2i").length
    parts = shared_parts(batch, P, IMAGE_TOKEN)
    assert [p.members for p in parts] == [(0, 1, 2)]  # the same images in another order share nothing
    (part,) = parts
    n_image_tokens = sum(im.n_tokens for im in batch.images_of(0))
    assert part.length > n_image_tokens  # the pictures' text and their image tokens
    for i in part.members:  # the part ends where the prompts' text begins
        assert batch.ids[i][P:P + part.length] == batch.ids[0][P:P + part.length]
        assert IMAGE_TOKEN not in batch.ids[i][P + part.length:]
    assert len({batch.ids[i][P + part.length] for i in part.members}) > 1
    assert shared_parts(batch, P, IMAGE_TOKEN, min_tokens=part.length + 1) == []
    twins = kern.tokenize(["same", "same"], "i2i", images=[SQUARE])  # each keeps a token of its own
    (p2,) = shared_parts(twins, P, IMAGE_TOKEN)
    assert p2.length == len(twins.ids[0]) - P - 1


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_kernel_computes_a_jobs_shared_part_once_with_the_same_answer(kern, monkeypatch, prefix_cache):
    """CFG pairs, a group of three, a prompt alone with its images and one whose images nobody shares: the two
    forwards give what one forward over every whole sequence gives, and the first forward runs each part once."""
    monkeypatch.setattr(kern, "feature_cache", EncodingCache(0))
    monkeypatch.setattr(kern, "prefix_cache", prefix_cache)
    prompts = ["make it blue", " ", "put the cat on the sofa", " ", "the same", "the same", "alone", "x"]
    images = [[WIDE, TALL], [WIDE, TALL], [SQUARE], [SQUARE], [SQUARE], [TALL], [WIDE], [TALL]]
    batch = kern.tokenize(prompts, "i2i", images=images)
    tokens = []
    real = kern.model.forward

    def spy(ids, *args, **kwargs):
        tokens.append(ids.shape[0])
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(kern.model, "forward", spy)
    monkeypatch.setattr(kern, "share_job_prefixes", False)
    want, want_lengths = kern.encode_packed(batch)
    monkeypatch.setattr(kern, "share_job_prefixes", True)
    got, lengths = kern.encode_packed(batch)
    assert lengths == want_lengths == batch.output_lengths
    assert rel_l2(got, want) < 1e-5
    whole, first, second = tokens
    P = kern.prefix_for("i2i").length if prefix_cache else 0
    parts = {p.members: p.length for p in shared_parts(batch, P, IMAGE_TOKEN)}
    assert set(parts) == {(0, 1), (2, 3, 4), (5, 7)}
    assert first == sum(parts.values())
    assert second == whole - sum(n * len(m) for m, n in parts.items())  # each member's own tokens only
    for a, b in zip(torch.split(got, lengths), kern.encode(prompts, task="i2i", images=images)):
        assert rel_l2(a, b) < 1e-5  # through encode as well

