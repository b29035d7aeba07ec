"""LightX2V's lightllm_service client, unchanged in every mode: a reader process that parses answers exactly as
LightX2V does (tests/lightx2v_reader.py: uint8 viewed as bfloat16, multiprocessing.shared_memory opened and closed,
never unlinked) against real encoder workers in float32, float16 and bfloat16, over shared memory and base64."""

import functools
import logging
import os
import subprocess
import sys
import uuid

import pytest
import torch

from broker.client import EncoderClient
from broker.errors import EncodeFailed
from dit_workers.config import DitWorkerConfig
from dit_workers.embeddings import make_embedder
from dit_workers.lightllm_http import LightLLMHttpEmbedder
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import REPO, eventually, shm_names, start_worker, stop_process, wait_for_workers, write_config
from tests.test_http_front import T2I_DROP_IDX, T2I_TEMPLATE, FrontThread
from workers.encoders import load_encoder

PROMPTS = ["a red fox in snow", "a lighthouse at dusk, long exposure"]
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def fronts(tiny_dir, redis_server, tmp_path_factory):
    """One worker per dtype, each on its own queue, each with its own front (shm_ttl_s 2 s; shm_default both, so
    that a reader with use_shm gets segments)."""
    d = tmp_path_factory.mktemp("lightx2v")
    queues = {dtype: f"lx-{dtype}-{uuid.uuid4().hex[:6]}" for dtype in DTYPES}
    prefix = "ebw" + uuid.uuid4().hex[:6]  # the workers' result segments
    procs = [start_worker(d, dtype, model_dir=tiny_dir, backend="baseline", device="cpu", dtype=dtype,
                          redis_url=redis_server.url, queue=queues[dtype], max_prompt_tokens=TEST_MAX_PROMPT_TOKENS,
                          shm_prefix=prefix) for dtype in DTYPES]
    out = {}
    try:
        for i, (proc, log) in enumerate(procs):
            wait_for_workers(redis_server.url, i + 1, proc, log)
        for dtype, queue in queues.items():
            out[dtype] = FrontThread(redis_url=redis_server.url, queue=queue, worker_shm_prefix=prefix, shm_ttl_s=2.0,
                                     sweep_interval_s=0.2, shm_default="both")
        yield out
    finally:
        for f in out.values():
            f.stop()
        for proc, _ in procs:
            stop_process(proc)


def read_as_lightx2v(url: str, use_shm: bool, tmp_path) -> dict:
    out = str(tmp_path / f"read-{use_shm}.pt")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "lightx2v_reader.py"), url,
                          "1" if use_shm else "0", str(T2I_DROP_IDX), out,
                          *[T2I_TEMPLATE.format(p) for p in PROMPTS]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**torch.load(out), "stderr": run.stderr}


@functools.cache
def in_process(tiny_dir: str, dtype: str) -> list[torch.Tensor]:
    return load_encoder(tiny_dir, backend="baseline", device="cpu", dtype=dtype,
                        max_prompt_tokens=TEST_MAX_PROMPT_TOKENS).encode(PROMPTS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "base64"])
def test_lightx2v_reads_what_the_encoder_computed(fronts, tiny_dir, dtype, use_shm, tmp_path):
    front = fronts[dtype]
    got = read_as_lightx2v(f"http://127.0.0.1:{front.port}", use_shm, tmp_path)
    assert [s["via"] for s in got["seen"]] == (["shm"] * len(PROMPTS) if use_shm else ["base64"] * len(PROMPTS))
    if use_shm:  # read and closed, never unlinked by the reader while it runs: the front owns the lifetime
        assert all(s["exists_after_close"] for s in got["seen"])
        # Whether or not the reader's resource tracker unlinked them as it exited, none outlives its expiry.
        assert eventually(lambda: shm_names(front.cfg.shm_prefix) == [] and front.front.segments.live == 0,
                          timeout=20)

    for states, want, ref in zip(got["states"], in_process(tiny_dir, dtype), in_process(tiny_dir, "float32")):
        assert states.dtype == torch.bfloat16 and states.shape == (1, *want.shape)  # [1, L, 64]: not [1, L, 128]
        # What the worker computed, as bfloat16 (one rounding: maybe one ulp apart)...
        torch.testing.assert_close(states[0].float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)
        # ...and so the model's float32 states within that dtype's precision (float16 bytes viewed as bfloat16
        # would be far off).
        rel = (states[0].float() - ref).norm() / ref.norm()
        assert rel < {"float32": 4e-3, "float16": 1e-2, "bfloat16": 2e-2}[dtype], rel


def test_by_default_lightx2v_pays_for_no_segment_and_exits_quietly(encoder_worker, tiny_dir, tmp_path):
    """LightX2V with use_shm on never says so in its request: the default front answers it in base64, which it
    reads, so no segment is written and its process exits without resource_tracker warnings. With `both`, each
    segment it opens is registered with its resource tracker (multiprocessing.shared_memory does that for every
    segment it opens, and only the opener's own unlink() undoes it), which warns about each at exit: the front
    can't hand a segment's lifetime over without that."""
    with FrontThread(redis_url=encoder_worker["url"], queue="encode",
                     worker_shm_prefix=encoder_worker["prefix"]) as front:
        got = read_as_lightx2v(f"http://127.0.0.1:{front.port}", True, tmp_path)
        assert [s["via"] for s in got["seen"]] == ["base64"] * len(PROMPTS)
        assert "resource_tracker" not in got["stderr"], got["stderr"]
        assert front.front.metrics.results.labels("shm")._value.get() == 0 and shm_names(front.cfg.shm_prefix) == []
    with FrontThread(redis_url=encoder_worker["url"], queue="encode", shm_default="both",
                     worker_shm_prefix=encoder_worker["prefix"]) as front:
        got = read_as_lightx2v(f"http://127.0.0.1:{front.port}", True, tmp_path)
        assert [s["via"] for s in got["seen"]] == ["shm"] * len(PROMPTS)
        assert "resource_tracker" in got["stderr"]  # the cost of `both` that the default avoids
    for states, want in zip(got["states"], in_process(tiny_dir, "float32")):
        torch.testing.assert_close(states[0].float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)


def lightx2v_qwen_image_config(path, service_url: str, model_path: str) -> str:
    """A config in LightX2V's Qwen-Image service format, keys this project does not use included."""
    return write_config(path, infer_steps=8, sample_guide_scale=4.0, enable_cfg=True, attn_type="flash_attn3",
                        vae_scale_factor=8, prompt_template_encode=T2I_TEMPLATE, prompt_template_encode_start_idx=34,
                        text_encoder_type="lightllm_service", model_path=model_path, make_tiny_if_missing=False,
                        device="cpu", lightllm_config={"service_url": service_url, "service_timeout": 30,
                                                       "service_retry": 2, "use_shm": True})


def test_a_lightx2v_config_as_it_is_speaks_http_to_the_front(encoder_worker, baseline, tiny_dir, tmp_path, caplog):
    with FrontThread(redis_url=encoder_worker["url"], queue="encode",
                     worker_shm_prefix=encoder_worker["prefix"]) as front:
        path = lightx2v_qwen_image_config(str(tmp_path / "qwen_image_t2i_service.json"),
                                          f"http://127.0.0.1:{front.port}", tiny_dir)
        with caplog.at_level(logging.INFO, logger="broker.config"):
            cfg = DitWorkerConfig.from_json(path)
        ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
        assert len(ignored) == 1 and "attn_type" in ignored[0] and "vae_scale_factor" in ignored[0]
        assert "infer_steps" not in ignored[0] and "prompt_template_encode" not in ignored[0]  # honoured
        assert cfg.text_encoder_type == "service" and cfg.default_steps == 8

        embedder = make_embedder(cfg, "cpu")
        assert isinstance(embedder, LightLLMHttpEmbedder) and embedder.use_shm
        prompts = ["a red fox in snow", " "]
        got = embedder.embed(prompts, "t2i", [])
        for g, want in zip(got, baseline.encode(prompts)):
            assert g.dtype == torch.bfloat16 and g.shape == want.shape
            torch.testing.assert_close(g.float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)
        assert front.front.metrics.results.labels("shm")._value.get() == 2  # read from shared memory
        with pytest.raises(EncodeFailed, match="max_prompt_tokens"):  # a 422 is not retried
            embedder.embed([" fox" * (TEST_MAX_PROMPT_TOKENS + 1)], "t2i", [])


def test_encoder_client_refuses_an_http_service_url(tmp_path, tiny_dir):
    path = lightx2v_qwen_image_config(str(tmp_path / "c.json"), "http://127.0.0.1:8010", tiny_dir)
    with pytest.raises(ValueError, match="LightLLM"):
        EncoderClient.from_config(path)
