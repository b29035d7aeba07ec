"""Which device each worker takes: `auto` spreads workers over the visible GPUs by their index, which comes from
$EB_WORKER_INDEX or from honcho's process name; the worker reports it in `broker stats`."""

from __future__ import annotations

import pytest
from honcho.environ import expand_processes

from broker.ops.stats import collect, format_stats
from workers.devices import describe, pick_device, worker_index
from workers.serve_loop import ServeLoop


@pytest.mark.parametrize("gpus, want", [(0, ["cpu"] * 4), (1, ["cuda:0"] * 4), (2, ["cuda:0", "cuda:1"] * 2),
                                        (4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"])])
def test_auto_spreads_workers_over_the_visible_gpus(gpus, want):
    assert [pick_device("auto", i, gpus) for i in range(4)] == want
    if gpus:
        assert [pick_device("cuda", i, gpus) for i in range(4)] == want


def test_named_devices_are_taken_as_they_are_and_checked(monkeypatch):
    assert pick_device("cpu", 3, 2) == "cpu"
    assert pick_device("cuda:1", 0, 2) == "cuda:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match=r"2 GPU\(s\) are visible.*CUDA_VISIBLE_DEVICES='4,5'"):
        pick_device("cuda:2", 0, 2)
    with pytest.raises(ValueError, match="no GPU is visible"):
        pick_device("cuda", 0, 0)
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda, cuda:N"):
        pick_device("gpu1", 0, 2)


def test_the_index_comes_from_eb_worker_index_or_honchos_process_name():
    assert worker_index({}) == 0
    assert worker_index({"HONCHO_PROCESS_NAME": "encoder.3"}) == 2
    assert worker_index({"HONCHO_PROCESS_NAME": "encoder.3", "EB_WORKER_INDEX": "7"}) == 7
    assert worker_index({"HONCHO_PROCESS_NAME": "encoder"}) == 0
    with pytest.raises(ValueError, match="whole number"):
        worker_index({"EB_WORKER_INDEX": "-1"})


def test_honcho_c_encoder_3_gives_three_indices_and_two_gpus_both_used():
    """The environment honcho itself builds for `honcho start -c encoder=3` (honcho.environ.expand_processes)."""
    procs = expand_processes({"redis": "redis-server", "encoder": "python -m workers"}, concurrency={"encoder": 3},
                             env={}, port=5000)
    envs = [p.env for p in procs if p.name.startswith("encoder.")]
    assert [worker_index(e) for e in envs] == [0, 1, 2]
    assert [pick_device("auto", worker_index(e), 2) for e in envs] == ["cuda:0", "cuda:1", "cuda:0"]


def test_a_renumbered_gpu_is_described_with_the_one_behind_it():
    assert describe("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}) == "cuda:1 (CUDA_VISIBLE_DEVICES 3)"
    assert describe("cuda:1", {}) == "cuda:1"
    assert describe("cpu", {"CUDA_VISIBLE_DEVICES": "2,3"}) == "cpu"


def test_stats_show_each_workers_device(redis_server):
    loop = ServeLoop(redis_server.url, "devices", 1 << 20)
    loop.device = "cuda:1 (CUDA_VISIBLE_DEVICES 3)"
    loop.ensure_registered()
    try:
        s = collect(loop.connection, "devices")
        assert [w["device"] for w in s["workers"]] == ["cuda:1 (CUDA_VISIBLE_DEVICES 3)"]
        assert f"pid {s['workers'][0]['pid']} on cuda:1 (CUDA_VISIBLE_DEVICES 3)" in format_stats(s)
    finally:
        loop.unregister()
