"""LightX2V's lightllm_service client, unchanged in every mode: a reader process that parses answers exactly as
LightX2V does (tests/lightx2v_reader.py: uint8 viewed as bfloat16, multiprocessing.shared_memory opened and closed,
never unlinked) against real encoder workers in float32, float16 and bfloat16, over shared memory and base64."""

import functools
import os
import subprocess
import sys
import uuid

import pytest
import torch

from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import REPO, eventually, shm_names, start_process, stop_process, wait_for_workers, write_config
from tests.test_http_front import T2I_DROP_IDX, T2I_TEMPLATE, FrontThread

PROMPTS = ["a red fox in snow", "a lighthouse at dusk, long exposure"]
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def fronts(tiny_dir, redis_server, tmp_path_factory):
    """One worker per dtype, each on its own queue, each with its own front (shm_ttl_s 2 s)."""
    d = tmp_path_factory.mktemp("lightx2v")
    procs, out = [], {}
    for dtype in DTYPES:
        queue = f"lx-{dtype}-{uuid.uuid4().hex[:6]}"
        cfg = write_config(str(d / f"{dtype}.json"), model_dir=tiny_dir, backend="baseline", device="cpu",
                           dtype=dtype, redis_url=redis_server.url, queue=queue,
                           max_prompt_tokens=TEST_MAX_PROMPT_TOKENS, shm_prefix="ebw" + uuid.uuid4().hex[:6])
        log = str(d / f"{dtype}.log")
        procs.append((start_process(["-m", "workers", "--config", cfg], log), log, queue))
    try:
        for i, (proc, log, queue) in enumerate(procs):
            wait_for_workers(redis_server.url, i + 1, proc, log)
        for dtype, (_, _, queue) in zip(DTYPES, procs):
            out[dtype] = FrontThread(redis_url=redis_server.url, queue=queue, shm_ttl_s=2.0, sweep_interval_s=0.2,
                                     shm_prefix="ebx" + uuid.uuid4().hex[:6])
        yield out
    finally:
        for f in out.values():
            f.stop()
        for proc, _, _ in procs:
            stop_process(proc)


def read_as_lightx2v(url: str, use_shm: bool, tmp_path) -> dict:
    out = str(tmp_path / f"read-{use_shm}.pt")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "lightx2v_reader.py"), url,
                          "1" if use_shm else "0", str(T2I_DROP_IDX), out,
                          *[T2I_TEMPLATE.format(p) for p in PROMPTS]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@functools.cache
def in_process(tiny_dir: str, dtype: str) -> list[torch.Tensor]:
    from workers.encoders import load_encoder

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
