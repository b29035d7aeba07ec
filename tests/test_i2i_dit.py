"""The DiT side of i2i: the embeddings a DiT worker feeds QwenImageEditPlusPipeline are the pipeline's own
encode_prompt on the same condition images, in baseline and kernel modes (service mode: test_dit_pipeline)."""

import io
import types

import pytest
import torch
from PIL import Image, ImageOps

from broker.protocol.schemas import GenerateRequest
from dit_workers import pipeline as P
from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline
from tests.test_dit_pipeline import decode_png, engine_for, input_png
from tests.test_i2i_encoder import IMAGE_TOKEN, rel_l2
from tests.test_image_patches import IMAGES
from workers.encoders import load_encoder


@pytest.fixture(scope="module")
def engines(tiny_dir):
    d = ensure_tiny_pipeline(tiny_dir)
    kernel = engine_for("kernel", d)
    # the torch reference ops: this process runs Triton under its CPU interpreter, far too slow for ~600 tokens
    kernel.embedder.encoder = load_encoder(d, backend="kernel", use_triton=False)
    return {"baseline": engine_for("baseline", d), "kernel": kernel}


def pipeline_encode_prompt(pipe, text_encoder, processor, prompt, images, token_types: bool):
    """QwenImageEditPlusPipeline.encode_prompt's own code, with a text encoder and processor plugged in.
    token_types: hand the model the processor's mm_token_type_ids as diffusers PR #14189 does (issue #14194);
    without them transformers 5 gives the image tokens 1-D positions."""
    from diffusers import QwenImageEditPlusPipeline

    class Encoder:
        dtype = torch.float32

        def __call__(self, **kw):
            if token_types:
                kw["mm_token_type_ids"] = (kw["input_ids"] == IMAGE_TOKEN).int()
            return text_encoder(**kw)

    ns = types.SimpleNamespace(processor=processor, text_encoder=Encoder(),
                               prompt_template_encode=pipe.prompt_template_encode,
                               prompt_template_encode_start_idx=pipe.prompt_template_encode_start_idx)
    ns._extract_masked_hidden = types.MethodType(QwenImageEditPlusPipeline._extract_masked_hidden, ns)
    ns._get_qwen_prompt_embeds = types.MethodType(QwenImageEditPlusPipeline._get_qwen_prompt_embeds, ns)
    with torch.no_grad():
        embeds, mask = QwenImageEditPlusPipeline.encode_prompt(ns, prompt, image=images, device="cpu")
    return embeds[0]


def test_dit_i2i_embeds_are_the_edit_pipelines_encode_prompt(engines, tiny_dir):
    from transformers import Qwen2VLProcessor

    eng = engines["baseline"]
    blobs = [input_png((96, 64)), input_png((50, 170))]
    req = GenerateRequest("make it blue", negative_prompt="blurry", task="i2i", images=blobs, width=64, height=64,
                          steps=2)
    prep = eng.prepare(req)
    pipe = eng.i2i()
    cond = P.condition_images(pipe, [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])
    processor = Qwen2VLProcessor.from_pretrained(f"{tiny_dir}/processor")
    model = eng.embedder.encoder.model
    for prompt, key in (("make it blue", "prompt_embeds"), ("blurry", "negative_prompt_embeds")):
        want = pipeline_encode_prompt(pipe, model, processor, prompt, cond, token_types=True)
        got = prep.kwargs[key][0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # diffusers 0.42 as released (no mm_token_type_ids) puts image tokens at 1-D positions: another answer
    unfixed = pipeline_encode_prompt(pipe, model, processor, "make it blue", cond, token_types=False)
    assert rel_l2(prep.kwargs["prompt_embeds"][0], unfixed) > 1e-3


def test_kernel_mode_i2i_gives_the_baseline_embeddings_and_an_image(engines, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 256 * 256)  # a quick CPU edit
    req = GenerateRequest("make it blue", task="i2i", images=[input_png((96, 64)), input_png((64, 160))], width=64,
                          height=64, steps=2)
    base, kern = engines["baseline"].prepare(req), engines["kernel"].prepare(req)
    assert len(kern.states) == 2  # the prompt and the negative
    for a, b in zip(kern.states, base.states):
        assert a.shape == b.shape and rel_l2(a, b) < 1e-4
    res = engines["kernel"].generate(req)
    assert decode_png(res.png).size == (64, 64) and res.task == "i2i" and res.encoder_mode == "kernel"


def test_input_images_are_decoded_upright():
    # a phone JPEG stored sideways with EXIF "rotate 90": the DiT side sees it (and sends it on) as a viewer does
    blob = IMAGES["EXIF rotate 90"]
    (img,) = P.decode_images([blob], 10**7)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
    assert img.size == (240, 400) and img.tobytes() == upright.tobytes()
