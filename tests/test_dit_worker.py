"""The DiT worker gets a prompt's and a negative prompt's embeddings through the broker in one call, and makes an
image from them (the tiny pipeline; see test_dit_pipeline.py for the pipeline itself)."""

import uuid

import msgpack
import pytest
import torch

from broker.errors import EncodeFailed
from broker.generation import GenerationClient
from dit_workers.worker import checksum
from tests.helpers import start_worker, stop_process, wait_for_workers
from tests.test_http_front import front_process


def start_dit_worker(folder, tiny_dir, url: str, queue: str, service_url: str, encoder_prefix: str):
    """A DiT worker process serving `queue`, its prompts encoded by the service at `service_url` (by encoder workers
    whose shm_prefix is `encoder_prefix`, when it is Redis): (process, log)."""
    return start_worker(folder, "dit", "dit_workers", text_encoder_type="lightllm_service", model_path=tiny_dir,
                        redis_url=url, queue=queue, device="cpu",
                        lightllm_config={"service_url": service_url, "service_timeout": 30, "service_retry": 1,
                                         "use_shm": True, "shm_prefix": encoder_prefix})


@pytest.fixture(scope="module")
def dit_worker(encoder_worker, tiny_dir, tmp_path_factory):
    url = encoder_worker["url"]
    proc, log = start_dit_worker(tmp_path_factory.mktemp("dit-worker"), tiny_dir, url, "generate", url,
                                 encoder_worker["prefix"])
    wait_for_workers(url, 2, proc, log)  # the encoder worker and this one
    yield {"url": url, "proc": proc, "log": log}
    stop_process(proc)


def test_generation_job_reports_broker_embeddings(dit_worker, baseline):
    client = GenerationClient(dit_worker["url"], timeout=60)
    res = client.generate("a lighthouse at dusk", negative_prompt=" ", width=64, height=64, steps=2)
    want = baseline.encode(["a lighthouse at dusk", " "])
    assert res.encoder_mode == "service"
    assert res.embeds_shapes == [list(t.shape) for t in want]
    assert res.embeds_checksum == pytest.approx(checksum(want), rel=1e-5)
    assert res.png.startswith(b"\x89PNG") and (res.width, res.height) == (64, 64)


def test_bad_generation_request_fails_that_job(dit_worker):
    client = GenerationClient(dit_worker["url"], timeout=60)
    deadline = client.wire.deadline()
    bad_task = msgpack.packb({"version": 1, "prompt": "x", "task": "zzz"})
    with pytest.raises(EncodeFailed, match="unknown task 'zzz'"):
        client.wait(client.wire.submit(bad_task, deadline), deadline)
    no_prompt = msgpack.packb({"version": 1})
    with pytest.raises(EncodeFailed, match="missing a field.*prompt"):
        client.wait(client.wire.submit(no_prompt, deadline), deadline)
    res = client.generate("still alive", width=64, height=64, steps=2)
    assert len(res.embeds_shapes) == 2


def test_a_dit_worker_process_speaks_lightllm_http_to_the_front_process(encoder_worker, baseline, tiny_dir,
                                                                        tmp_path):
    """LightX2V's meaning of an http:// service_url, as processes: DiT worker -> HTTP front -> encoder worker."""
    url = encoder_worker["url"]
    front, port = front_process(url, "ebh" + uuid.uuid4().hex[:6], tmp_path / "front.log",
                                encoder_worker["prefix"])
    proc, log = start_dit_worker(tmp_path, tiny_dir, url, "generate_http", f"http://127.0.0.1:{port}",
                                 encoder_worker["prefix"])
    try:
        wait_for_workers(url, 1, proc, log, queue="generate_http")
        client = GenerationClient(url, queue="generate_http", timeout=60)
        res = client.generate("a lighthouse at dusk", negative_prompt=" ", width=64, height=64, steps=2)
        want = baseline.encode(["a lighthouse at dusk", " "])
        assert res.encoder_mode == "service"
        assert res.embeds_shapes == [list(t.shape) for t in want]
        # LightLLM's protocol carries bf16: the checksum of what came back, not of the float32 states
        assert res.embeds_checksum == pytest.approx(checksum([t.to(torch.bfloat16) for t in want]), rel=1e-3)
        assert res.png.startswith(b"\x89PNG") and (res.width, res.height) == (64, 64)
        assert "POST /generate 200" in open(tmp_path / "front.log").read()  # it went through the front
    finally:
        stop_process(proc)
        stop_process(front)
