"""LightX2V's Qwen-Image configs as it ships them (tests/data/lightx2v, their source in its README) given to a DiT
worker: the steps, size, guidance, seed and negative prompt the pipeline receives are what LightX2V would run,
the text encoder is the one LightX2V would use, and what is ignored is named once, with why."""

import json
import logging
import os
import shutil
import uuid

import pytest
import torch

from broker.generation import GenerationClient
from broker.protocol.schemas import GenerateRequest
from dit_workers.config import DitWorkerConfig
from dit_workers.engine import DitEngine
from dit_workers.lightllm_http import LightLLMHttpEmbedder
from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline
from tests.helpers import REPO, start_process, stop_process, wait_for_workers
from tests.test_dit_pipeline import input_png
from tests.test_http_front import FrontThread
from tests.test_startup_log import LOG_LINE

DATA = os.path.join(REPO, "tests", "data", "lightx2v")
SERVICE_KEYS = {"text_encoder_type": "lightllm_service",  # what LightX2V's service guide adds to a config
                "lightllm_config": {"service_url": "http://localhost:8010", "service_timeout": 30, "service_retry": 3,
                                    "use_shm": True}}


def shipped(name: str, tmp_path, **changes) -> str:
    """The shipped config's path; with `changes`, a copy of it with those keys set (what a user would edit)."""
    path = os.path.join(DATA, name)
    if not changes:
        return path
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    out = tmp_path / f"{uuid.uuid4().hex[:6]}-{name}"
    out.write_text(json.dumps(cfg, indent=4))
    return str(out)


def read(path: str, caplog, **overrides) -> tuple[DitWorkerConfig, list[str]]:
    """The config as `encoder-broker dit --config PATH --model-path ...` reads it, and its warnings."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cfg = DitWorkerConfig.from_json(path, **overrides)
    return cfg, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def pipeline_dir(tiny_dir):
    return ensure_tiny_pipeline(tiny_dir)


def test_t2i_2512_as_shipped(pipeline_dir, caplog):
    cfg, warnings = read(os.path.join(DATA, "qwen_image_t2i_2512.json"), caplog, model_path=pipeline_dir)
    assert (cfg.default_steps, cfg.default_true_cfg_scale) == (50, 4.0)
    assert (cfg.default_width, cfg.default_height) == (1664, 928)  # LightX2V's 16:9
    assert cfg.text_encoder_type == "baseline"  # LightX2V's meaning of a config without text_encoder_type...
    (ignored, encoder) = warnings  # ...said at start, with the ignored keys in one line
    assert "ignoring 1 key(s): attn_type: LightX2V's own runtime settings" in ignored
    assert "text_encoder_type is not set: 'baseline'" in encoder and "lightllm_service" in encoder


@pytest.mark.parametrize("name", ["qwen_image_i2i_2511.json", "qwen_image_i2i_2511_service.json",
                                  "qwen_image_i2i_2511_kernel.json"])
def test_i2i_2511_with_and_without_the_text_encoder_keys(name, pipeline_dir, caplog):
    cfg, warnings = read(os.path.join(DATA, name), caplog, model_path=pipeline_dir)
    assert (cfg.default_steps, cfg.default_true_cfg_scale, cfg.i2i_resolution) == (40, 4.0, 1024)
    assert (cfg.default_width, cfg.default_height) == (None, None)  # i2i: from the input image
    ignored = [w for w in warnings if "ignoring" in w]
    assert len(ignored) == 1 and "attn_type" in ignored[0] and "resize_mode" in ignored[0]
    if name.endswith("_service.json"):
        assert cfg.text_encoder_type == "service" and len(warnings) == 1
        cc = cfg.encoder_client
        assert (cc.redis_url, cc.timeout, cc.retries, cc.transport) == ("http://localhost:8010", 30.0, 3, "shm")
        assert "vae_scale_factor" in ignored[0]  # read from the checkpoint's vae/, as LightX2V does
    elif name.endswith("_kernel.json"):
        assert cfg.text_encoder_type == "kernel" and len(warnings) == 1
        assert "lightllm_config.use_flash_attention_kernel, lightllm_config.use_rmsnorm_kernel: LightLLM's" \
               in ignored[0]
    else:
        assert cfg.text_encoder_type == "baseline" and len(warnings) == 2


def test_what_this_worker_cannot_do_stops_it_with_the_reason(tmp_path, caplog):
    with pytest.raises(ValueError, match="lora_configs: this DiT worker loads no LoRA"):
        read(os.path.join(DATA, "qwen_image_t2i_2512_distill.json"), caplog)
    other_template = shipped("qwen_image_t2i_2512.json", tmp_path, prompt_template_encode="{}")
    with pytest.raises(ValueError, match="not Qwen-Image's t2i or i2i template"):
        read(other_template, caplog)
    with pytest.raises(ValueError, match="aspect_ratio '5:4' is not one of"):
        read(shipped("qwen_image_t2i_2512.json", tmp_path, aspect_ratio="5:4"), caplog)


def test_without_model_path_the_tiny_checkpoint_is_not_written_beside_the_config(tmp_path, caplog, monkeypatch):
    """LightX2V passes model_path on its command line: its configs carry none. The default goes to ./var/tiny,
    never next to the config's folder (configs/var/tiny in a LightX2V checkout), and the log says so."""
    lightx2v = tmp_path / "LightX2V" / "configs" / "qwen_image"
    lightx2v.mkdir(parents=True)
    path = shutil.copy(os.path.join(DATA, "qwen_image_i2i_2511_service.json"), lightx2v)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg, warnings = read(path, caplog)
    assert cfg.model_path == str(tmp_path / "elsewhere" / "var" / "tiny")
    assert cfg.output_dir == str(tmp_path / "elsewhere" / "var" / "images")
    assert any("model_path is not set" in w and cfg.model_path in w for w in warnings)
    cfg, warnings = read(path, caplog, model_path=str(tmp_path / "qwen-image"))  # --model-path
    assert cfg.model_path == str(tmp_path / "qwen-image") and not any("model_path is not" in w for w in warnings)


def test_the_pipeline_receives_what_lightx2v_would_run(pipeline_dir, baseline, tmp_path):
    """t2i_2512 (plus a seed and a negative prompt, which LightX2V reads from a config too) and i2i_2511, each with
    a request that leaves everything but the prompt out."""
    path = shipped("qwen_image_t2i_2512.json", tmp_path, seed=42, negative_prompt="blurry, low quality")
    engine = DitEngine(DitWorkerConfig.from_json(path, model_path=pipeline_dir, device="cpu"), "cpu")
    kw = engine.prepare(GenerateRequest("a red fox in snow")).kwargs
    assert (kw["num_inference_steps"], kw["width"], kw["height"], kw["true_cfg_scale"]) == (50, 1664, 928, 4.0)
    assert kw["generator"].initial_seed() == 42
    (want_neg,) = baseline.encode(["blurry, low quality"])
    torch.testing.assert_close(kw["negative_prompt_embeds"][0], want_neg, rtol=1e-5, atol=1e-5)
    kw = engine.prepare(GenerateRequest("a red fox", seed=3, true_cfg_scale=1.0, width=64, height=64, steps=2)).kwargs
    assert (kw["num_inference_steps"], kw["width"], kw["true_cfg_scale"]) == (2, 64, 1.0)  # a request's own win
    assert kw["generator"].initial_seed() == 3 and "negative_prompt_embeds" not in kw

    i2i = DitEngine(DitWorkerConfig.from_json(os.path.join(DATA, "qwen_image_i2i_2511.json"),
                                              model_path=pipeline_dir, device="cpu"), "cpu")
    kw = i2i.prepare(GenerateRequest("make it blue", task="i2i", images=[input_png((96, 64))])).kwargs
    # the last image's 3:2 at about 1024x1024, sides multiples of 32: LightX2V's and diffusers' rule
    assert (kw["num_inference_steps"], kw["width"], kw["height"], kw["true_cfg_scale"]) == (40, 1248, 832, 4.0)
    assert "negative_prompt_embeds" in kw


def test_enable_cfg_false_means_no_guidance(pipeline_dir, tmp_path):
    path = shipped("qwen_image_t2i_2512.json", tmp_path, enable_cfg=False)
    engine = DitEngine(DitWorkerConfig.from_json(path, model_path=pipeline_dir, device="cpu"), "cpu")
    kw = engine.prepare(GenerateRequest("a red fox")).kwargs
    assert kw["true_cfg_scale"] == 1.0 and "negative_prompt_embeds" not in kw  # the negative is not even encoded


def test_a_dit_worker_runs_the_i2i_2511_service_config_through_the_front(encoder_worker, pipeline_dir, tmp_path):
    """`encoder-broker dit --config qwen_image_i2i_2511_service.json --model-path DIR`, its service_url pointed at
    the front as LightX2V's guide says: a job that leaves out steps and guidance runs 40 steps at CFG 4.0, and the
    worker's start-up log is one screen of its own lines."""
    url = encoder_worker["url"]
    queue = "lx-" + uuid.uuid4().hex[:6]
    with FrontThread(redis_url=url, queue="encode", worker_shm_prefix=encoder_worker["prefix"]) as front:
        path = shipped("qwen_image_i2i_2511_service.json", tmp_path,
                       lightllm_config={**SERVICE_KEYS["lightllm_config"],
                                        "service_url": f"http://127.0.0.1:{front.port}"})
        log = str(tmp_path / "dit.log")
        env = {"EB_REDIS_URL": url, "EB_QUEUE": queue, "EB_DEVICE": "cpu"}
        proc = start_process(["-m", "dit_workers", "--config", path, "--model-path", pipeline_dir], log, env=env)
        try:
            wait_for_workers(url, 1, proc, log, queue=queue)
            res = GenerationClient(url, queue=queue, timeout=300).generate("a red fox", width=64, height=64)
        finally:
            stop_process(proc)
    assert (res.steps, res.true_cfg_scale, res.seed, res.encoder_mode) == (40, 4.0, 0, "service")
    assert (res.width, res.height) == (64, 64) and len(res.embeds_shapes) == 2
    text = open(log).read()
    assert all(LOG_LINE.match(line) for line in text.splitlines()), text  # no library noise (accelerate, bars)
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "ignoring 3 key(s)" in warnings[0], warnings
    assert "LightX2V keys honoured" in text and "infer_steps 40" in text
    assert "step 40/40" in text


def test_t2i_2512_with_the_service_keys_speaks_http(tmp_path, caplog):
    cfg, warnings = read(shipped("qwen_image_t2i_2512.json", tmp_path, **SERVICE_KEYS), caplog)
    assert cfg.text_encoder_type == "service" and (cfg.default_steps, cfg.default_width) == (50, 1664)
    from dit_workers.embeddings import make_embedder

    embedder = make_embedder(cfg, "cpu")
    assert isinstance(embedder, LightLLMHttpEmbedder) and embedder.url == "http://localhost:8010"
