"""The DiT worker runs diffusers' Qwen-Image pipelines on the tiny random pipeline, fed by the three encoder modes.

CPU, small sizes and few steps. `service` goes through the real Redis, encoder worker and a DiT worker process;
`baseline` and `kernel` run the same engine in this process.
"""

import hashlib
import io
import json
import os
import shutil
import threading
import time

import msgpack
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from broker.errors import EncodeFailed, InvalidRequest
from broker.generation import GenerationClient
from broker.protocol.schemas import GenerateRequest
from dit_workers.census import encoder_census, encoder_param_shapes
from dit_workers.config import DitWorkerConfig
from dit_workers.embeddings import ServiceEmbedder, image_support
from dit_workers.engine import DitEngine, checksum
from dit_workers.make_tiny_pipeline import MARKER, MODEL_INDEX, PARTS, ensure_tiny_pipeline
from dit_workers.pipeline import pad_embeds
from dit_workers.worker import DitWorker, JobHeartbeat
from tests.helpers import start_worker, stop_process, wait_for_workers

PROMPT = "a red fox in snow, watercolor"
SMALL = dict(width=128, height=96, steps=3, seed=7)


@pytest.fixture(scope="module")
def pipeline_dir(tiny_dir):
    return ensure_tiny_pipeline(tiny_dir)


def engine_for(mode: str, model_path: str):
    return DitEngine(DitWorkerConfig(text_encoder_type=mode, model_path=model_path, device="cpu"), "cpu")


@pytest.fixture(scope="module")
def baseline_engine(pipeline_dir):
    return engine_for("baseline", pipeline_dir)


@pytest.fixture(scope="module")
def kernel_engine(pipeline_dir):
    return engine_for("kernel", pipeline_dir)


@pytest.fixture(scope="module")
def dit_service(encoder_worker, pipeline_dir, tmp_path_factory):
    """A DiT worker process in `service` mode (seed alias) on the test Redis, next to the encoder worker."""
    d = tmp_path_factory.mktemp("dit-service")
    url = encoder_worker["url"]
    before = redis.Redis.from_url(url).scard("rq:workers")
    proc, log = start_worker(d, "dit", "dit_workers", text_encoder_type="lightllm_service", model_path=pipeline_dir,
                             redis_url=url, queue="generate-pipeline", device="cpu", output_dir=str(d / "images"),
                             progress_log_every=1, lightllm_config={"service_url": url, "service_timeout": 30,
                                                                    "service_retry": 1, "use_shm": True,
                                                                    "shm_prefix": encoder_worker["prefix"]})
    wait_for_workers(url, before + 1, proc, log)
    client = GenerationClient(url, queue="generate-pipeline", timeout=120)
    yield {"url": url, "proc": proc, "log": log, "client": client, "images": str(d / "images")}
    client.close()
    stop_process(proc)


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def file_digests(root: str, names) -> dict:
    out = {}
    for name in names:
        path = os.path.join(root, name)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs)
        for f in files:
            with open(f, "rb") as fh:
                out[os.path.relpath(f, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# -- the tiny pipeline ---------------------------------------------------------------------------------------
def test_tiny_pipeline_is_deterministic_idempotent_and_leaves_the_encoder_alone(pipeline_dir, tmp_path):
    fresh = str(tmp_path / "tiny")
    os.makedirs(fresh)
    encoder_parts = ["text_encoder", "tokenizer", "processor", ".complete"]
    for name in encoder_parts:
        src = os.path.join(pipeline_dir, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(fresh, name))
    before = file_digests(fresh, encoder_parts)
    assert ensure_tiny_pipeline(fresh) == fresh
    assert file_digests(fresh, encoder_parts) == before
    pipeline_parts = [*PARTS, "model_index.json"]
    assert file_digests(fresh, pipeline_parts) == file_digests(pipeline_dir, pipeline_parts)  # same bytes
    marker = os.path.join(fresh, MARKER)
    stamp = os.stat(marker).st_mtime_ns
    assert ensure_tiny_pipeline(fresh) == fresh and os.stat(marker).st_mtime_ns == stamp
    index = json.load(open(os.path.join(fresh, "model_index.json")))
    assert {k: v for k, v in index.items() if not k.startswith("_diffusers")} == MODEL_INDEX
    te = json.load(open(os.path.join(fresh, "text_encoder", "config.json")))
    tr = json.load(open(os.path.join(fresh, "transformer", "config.json")))
    assert tr["joint_attention_dim"] == te["hidden_size"] == 64


# -- embeddings ----------------------------------------------------------------------------------------------
def test_baseline_embeds_equal_the_pipelines_own_encode_prompt(baseline_engine, pipeline_dir):
    from diffusers import QwenImagePipeline

    full = QwenImagePipeline.from_pretrained(pipeline_dir, dtype=torch.float32)  # with its text encoder
    prep = baseline_engine.prepare(GenerateRequest(PROMPT, negative_prompt="blurry, low quality", **SMALL))
    kw = prep.kwargs
    with torch.no_grad():
        want, want_mask = full.encode_prompt(PROMPT, device="cpu")
        want_neg, _ = full.encode_prompt("blurry, low quality", device="cpu")
    assert want_mask is None  # diffusers drops an all-ones mask; ours is that all-ones mask
    assert kw["prompt_embeds"].shape == want.shape and bool(kw["prompt_embeds_mask"].all())
    torch.testing.assert_close(kw["prompt_embeds"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["negative_prompt_embeds"], want_neg, rtol=1e-5, atol=1e-5)
    assert kw["negative_prompt_embeds_mask"].shape == want_neg.shape[:2]


def test_pad_embeds_matches_diffusers_padding():
    states = [torch.randn(5, 8), torch.randn(3, 8)]
    embeds, mask = pad_embeds(states, torch.float32, torch.device("cpu"))
    assert embeds.shape == (2, 5, 8) and mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert torch.equal(embeds[1, :3], states[1]) and not embeds[1, 3:].any()


def test_kernel_mode_gives_the_same_embeddings_and_image(baseline_engine, kernel_engine):
    req = GenerateRequest(PROMPT, **SMALL)
    base, kern = baseline_engine.prepare(req), kernel_engine.prepare(req)
    for b, k in zip(base.states, kern.states):
        assert b.shape == k.shape
        rel = (k.float() - b.float()).norm() / b.float().norm()
        assert rel < 1e-4, f"kernel vs baseline relative L2 {rel:.2e}"
    img_b = pixels(decode_png(baseline_engine.generate(req).png))
    img_k = pixels(decode_png(kernel_engine.generate(req).png))
    assert np.abs(img_b - img_k).max() <= 2


def test_kernel_mode_takes_the_configs_fp8_quantization(pipeline_dir, kernel_engine):
    """`quantization: "fp8"` reaches the in-process kernel encoder: e4m3 decoder layers, the FP8 encoder's own
    embeddings (near the unquantized ones, not equal), and a generation from them."""
    cfg = DitWorkerConfig(text_encoder_type="lightllm_kernel", quantization="fp8", model_path=pipeline_dir,
                          device="cpu")
    engine = DitEngine(cfg, "cpu")
    enc = engine.embedder.encoder
    assert (engine.mode, enc.quantization) == ("kernel", "fp8")
    assert enc.model.layers[0].feed_forward.w2.weight.dtype == torch.float8_e4m3fn
    req = GenerateRequest(PROMPT, **SMALL)
    fp8_states, plain_states = engine.prepare(req).states, kernel_engine.prepare(req).states
    for q, p in zip(fp8_states, plain_states):
        assert q.shape == p.shape
        rel = float((q.float() - p.float()).norm() / p.float().norm())
        assert 1e-4 < rel < 0.3, f"fp8 vs unquantized relative L2 {rel:.2e}"
    assert decode_png(engine.generate(req).png).size == (128, 96)


def test_quantization_is_fp8_and_for_the_kernel_mode_only(monkeypatch):
    with pytest.raises(ValueError, match="quantization 'int4' is not one of null, \"fp8\""):
        DitWorkerConfig(text_encoder_type="kernel", quantization="int4")
    with pytest.raises(ValueError, match="needs text_encoder_type 'kernel', not 'baseline'"):
        DitWorkerConfig(text_encoder_type="baseline", quantization="fp8")
    with pytest.raises(ValueError, match="not 'service': set it in the encoder workers' config"):
        DitWorkerConfig(text_encoder_type="lightllm_service", quantization="fp8")
    assert DitWorkerConfig(text_encoder_type="kernel").quantization is None  # off by default
    monkeypatch.setenv("EB_TEXT_ENCODER_TYPE", "lightllm_kernel")
    monkeypatch.setenv("EB_QUANTIZATION", "fp8")
    assert DitWorkerConfig.from_json(None).quantization == "fp8"
    monkeypatch.setenv("EB_TEXT_ENCODER_TYPE", "baseline")
    with pytest.raises(ValueError, match="needs text_encoder_type 'kernel'"):
        DitWorkerConfig.from_json(None)


def test_baseline_mode_generates_a_png_of_the_requested_size(baseline_engine):
    steps = []
    res = baseline_engine.generate(GenerateRequest(PROMPT, **SMALL), progress=lambda s, n: steps.append((s, n)))
    img = decode_png(res.png)
    assert img.size == (128, 96) and (res.width, res.height) == (128, 96)
    assert res.encoder_mode == "baseline" and res.steps == 3 and len(res.embeds_shapes) == 2
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    again = baseline_engine.generate(GenerateRequest(PROMPT, **SMALL))
    assert again.png == res.png  # same seed, same bytes
    other = baseline_engine.generate(GenerateRequest("a blue whale at night", **SMALL))
    assert other.png != res.png  # the prompt's embeddings reach the image
    no_cfg = baseline_engine.generate(GenerateRequest(PROMPT, true_cfg_scale=1.0, **SMALL))
    assert len(no_cfg.embeds_shapes) == 1 and no_cfg.png != res.png  # no guidance: the negative is not encoded


def test_the_census_sees_an_in_process_encoder(baseline_engine, pipeline_dir):
    """The check that `service` mode passes must fail when an encoder is loaded (here, baseline's)."""
    census = encoder_census(encoder_param_shapes(os.path.join(pipeline_dir, "text_encoder")),
                            baseline_engine.pipeline_modules())
    assert any("Qwen2_5_VL" in m for m in census["encoder_modules"])
    assert census["encoder_tensors"] > 0 and census["rss_bytes"] > 0


# -- service mode through Redis ------------------------------------------------------------------------------
def test_service_mode_end_to_end_matches_baseline_and_holds_no_encoder(dit_service, baseline_engine, baseline):
    res = dit_service["client"].generate(PROMPT, debug=True, **SMALL)
    assert res.encoder_mode == "service"
    img = decode_png(res.png)
    assert img.size == (128, 96)
    want = baseline.encode([PROMPT, " "])
    assert res.embeds_shapes == [list(t.shape) for t in want]
    assert res.embeds_checksum == pytest.approx(checksum(want), rel=1e-5)
    local = decode_png(baseline_engine.generate(GenerateRequest(PROMPT, **SMALL)).png)
    assert np.abs(pixels(img) - pixels(local)).max() <= 2  # same embeddings, same seed: the same picture
    census = res.debug
    assert census["encoder_modules"] == [], census["encoder_modules"]
    assert census["encoder_tensors"] == 0 and census["encoder_tensor_bytes"] == 0
    assert "QwenImageTransformer2DModel" in census["module_classes"]
    assert not any(c.startswith("Qwen2_5_VL") for c in census["module_classes"])


def test_progress_meta_reaches_the_client(dit_service):
    client = dit_service["client"]
    job_id, deadline = client.submit(PROMPT, width=64, height=64, steps=6)
    seen = []
    while time.time() < deadline:
        p = client.progress(job_id)
        if p and (not seen or p != seen[-1]):
            seen.append(p)
        if p.get("step") == 6:
            break
        time.sleep(0.01)
    res = client.wait(job_id, deadline)
    assert res.steps == 6 and seen and seen[-1] == {"step": 6, "steps": 6}
    assert [p["step"] for p in seen] == sorted(p["step"] for p in seen)
    assert client.progress(job_id) == {"step": 6, "steps": 6}
    calls = []
    client.generate(PROMPT, width=64, height=64, steps=4, on_progress=calls.append)
    assert all(c["steps"] == 4 for c in calls)
    assert f"job {job_id}: step 6/6" in open(dit_service["log"]).read()


def test_in_process_worker_keeps_a_long_jobs_heartbeat(baseline_engine, redis_server, monkeypatch):
    """While a job runs, its started-registry deadline moves forward (else recovery would take it for dead)."""
    monkeypatch.setattr(JobHeartbeat, "interval_s", 0.05)
    cfg = DitWorkerConfig(text_encoder_type="baseline", model_path=baseline_engine.cfg.model_path,
                          redis_url=redis_server.url, queue="generate-heartbeat")
    worker = DitWorker(cfg, "cpu", engine=baseline_engine)
    client = GenerationClient(redis_server.url, queue="generate-heartbeat", timeout=60)
    job_id, deadline = client.submit(PROMPT, width=128, height=128, steps=12)
    deadlines, running = set(), threading.Event()

    def watch():  # the job's deadline in RQ's started registry, as another worker's recovery sees it
        r = redis.Redis.from_url(redis_server.url)
        while not running.is_set():
            for member, score in r.zrange(worker.source.keys.started, 0, -1, withscores=True):
                if member.decode().startswith(job_id):
                    deadlines.add(score)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        worker.handle(worker.source.wait_and_take(1, 30, 5.0))
    finally:
        running.set()
        watcher.join()
    res = client.wait(job_id, deadline)
    assert res.steps == 12 and client.progress(job_id) == {"step": 12, "steps": 12}
    assert len(deadlines) >= 2, deadlines  # pushed forward while it ran
    assert worker.connection.zcard(worker.source.keys.started) == 0  # recorded: no longer held
    client.close()


def test_path_results(dit_service):
    client = dit_service["client"]
    res = client.generate(PROMPT, width=64, height=80, steps=2, return_path=True)
    assert res.png == b"" and os.path.dirname(res.path) == dit_service["images"]
    assert decode_png(open(res.path, "rb").read()).size == (64, 80)
    res = client.generate(PROMPT, width=96, height=64, steps=2, output_dir="run-7/batch a")
    assert os.path.dirname(res.path) == os.path.join(dit_service["images"], "run-7", "batch a")
    assert decode_png(open(res.path, "rb").read()).size == (96, 64)


def test_bad_requests_fail_clearly_and_the_worker_keeps_serving(dit_service, tmp_path):
    client = dit_service["client"]
    with pytest.raises(EncodeFailed, match="width 100 is not a multiple of 16.*try 96 or 112"):
        client.generate(PROMPT, width=100, height=64, steps=2)
    with pytest.raises(EncodeFailed, match="height 72 is not a multiple of 16"):
        client.generate(PROMPT, width=64, height=72, steps=2)
    with pytest.raises(InvalidRequest, match="steps must be a positive integer, or left out"):
        client.submit(PROMPT, steps=0)  # refused before sending
    with pytest.raises(InvalidRequest, match="'i2i' needs at least one input image"):
        client.submit(PROMPT, task="i2i")
    wire = client.wire
    deadline = wire.deadline()
    raw = {"version": 1, "prompt": PROMPT, "width": 64, "height": 64}
    for extra, message in [({"steps": 0}, "steps must be a positive integer"),
                           ({"steps": 2, "task": "i2i"}, "'i2i' needs at least one input image"),
                           ({"steps": 2, "task": "i2i", "images": [b"definitely not an image"]},
                            "image 0 .* is not a readable PNG, JPEG or WebP image"),
                           ({"steps": 2, "output_dir": str(tmp_path)}, "got the absolute path"),
                           ({"steps": 2, "output_dir": "a/../../escape"}, "leaves the worker's output_dir"),
                           ({"steps": 10_000}, "steps 10000 is over max_steps")]:
        job = wire.submit(msgpack.packb({**raw, **extra}), deadline)
        with pytest.raises(EncodeFailed, match=message):
            client.wait(job, deadline)
    res = client.generate("still alive", width=64, height=64, steps=2)
    assert decode_png(res.png).size == (64, 64)
    assert dit_service["proc"].poll() is None


# -- i2i ----------------------------------------------------------------------------------------------------
def input_png(size=(96, 64)) -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class RecordingEmbedder:
    """Stands in for an image-capable encoder: records what it is asked, returns fixed states."""

    mode = "stub"

    def __init__(self):
        self.calls = []

    def embed(self, prompts, task, images):
        self.calls.append((list(prompts), task, list(images)))
        gen = torch.Generator().manual_seed(len(self.calls))
        return [torch.randn(9 + i, 64, generator=gen) for i in range(len(prompts))]


def test_i2i_plumbing_condition_images_and_the_edit_pipeline(baseline_engine, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    # The Edit pipeline VAE-encodes each input at about 1024x1024; 256x256 keeps this CPU test quick.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 256 * 256)
    stub = RecordingEmbedder()
    monkeypatch.setattr(baseline_engine, "embedder", stub)
    res = baseline_engine.generate(GenerateRequest("make it blue", task="i2i", images=[input_png()], width=64,
                                                   height=64, steps=2))
    assert decode_png(res.png).size == (64, 64) and res.task == "i2i"
    (prompts, task, images), = stub.calls
    assert prompts == ["make it blue", " "] and task == "i2i" and len(images) == 1
    cond = decode_png(images[0])  # what QwenImageEditPlusPipeline hands its processor: ~384x384 in area
    assert cond.size[0] % 32 == 0 and cond.size[1] % 32 == 0
    assert abs(cond.size[0] * cond.size[1] - 384 * 384) < 0.1 * 384 * 384
    assert abs(cond.size[0] / cond.size[1] - 96 / 64) < 0.1
    assert baseline_engine.i2i().transformer is baseline_engine.t2i.transformer  # shared, not loaded twice


def test_i2i_end_to_end_through_the_broker(dit_service, encoder_worker):
    cfg = DitWorkerConfig(lightllm_config={"service_url": encoder_worker["url"], "service_timeout": 30,
                                           "shm_prefix": encoder_worker["prefix"]})
    assert image_support(ServiceEmbedder(cfg)) is None  # the probe a DiT worker can send the broker
    res = dit_service["client"].generate("make it blue", task="i2i", images=[input_png()], width=64, height=64,
                                         steps=2)
    assert decode_png(res.png).size == (64, 64) and res.task == "i2i"

