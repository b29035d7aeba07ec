"""Which device a worker takes: `cpu`, `cuda:N`, or `auto`/`cuda` spread over the GPUs this process can see by a
worker index, so that `honcho start -c encoder=N` puts N workers on N GPUs.

The index is $EB_WORKER_INDEX, else honcho's process number: honcho names each process `<type>.<n>` (n from 1) in
$HONCHO_PROCESS_NAME (honcho/environ.py, expand_processes; it also sets PORT = base + 100 x type + n - 1, which
needs the base to read back, so the name is used). GPU numbers are those torch sees: within
$CUDA_VISIBLE_DEVICES when it is set."""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("workers")
WORKER_INDEX_ENV = "EB_WORKER_INDEX"
_HONCHO_NAME = re.compile(r".+\.([1-9][0-9]*)")


def worker_index(env=os.environ) -> int:
    """This worker's index (0 when nothing gives one)."""
    raw = env.get(WORKER_INDEX_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(f"${WORKER_INDEX_ENV} must be a whole number >= 0, got {raw!r}")
        return int(raw)
    m = _HONCHO_NAME.fullmatch(env.get("HONCHO_PROCESS_NAME", ""))
    return int(m[1]) - 1 if m else 0


def pick_device(name: str, index: int, gpu_count: int) -> str:
    """The device for config value `name` of the worker with `index` on a host where `gpu_count` GPUs are visible:
    `auto` -> cuda:<index mod count> (cpu without GPUs); `cuda` -> the same, and an error without GPUs;
    `cuda:N` -> itself, N checked; `cpu` -> cpu."""
    if name == "cpu":
        return name
    if name in ("auto", "cuda"):
        if gpu_count == 0:
            if name == "cuda":
                raise ValueError("device 'cuda' asked for, but no GPU is visible" + _visible_note())
            return "cpu"
        return f"cuda:{index % gpu_count}"
    m = re.fullmatch(r"cuda:([0-9]+)", name)
    if m is None:
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if int(m[1]) >= gpu_count:
        raise ValueError(f"device {name!r} asked for, but {gpu_count} GPU(s) are visible (cuda:0 to "
                         f"cuda:{gpu_count - 1})" + _visible_note())
    return name


def describe(device: str, env=os.environ) -> str:
    """`device` as a log line and `broker stats` show it: with the physical GPU behind it when
    $CUDA_VISIBLE_DEVICES renumbers them."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if not device.startswith("cuda:") or visible is None:
        return device
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    n = int(device.split(":")[1])
    return f"{device} (CUDA_VISIBLE_DEVICES {ids[n]})" if n < len(ids) else device


def _visible_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={visible!r}: numbers are within that list)" if visible is not None else ""


def worker_device(name: str) -> str:
    """The device of this worker process for config value `name` (see pick_device), made torch's current device
    (streams, CUDA graphs and kernels that take the current device then use it too), and logged."""
    import torch

    index = worker_index()
    device = pick_device(name, index, torch.cuda.device_count())
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    log.info("worker index %d (%s): device %r -> %s", index, _index_source(), name, describe(device))
    return device


def _index_source() -> str:
    if os.environ.get(WORKER_INDEX_ENV, "").strip():
        return f"${WORKER_INDEX_ENV}"
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    return f"honcho process {name}" if _HONCHO_NAME.fullmatch(name) else "no index given"
