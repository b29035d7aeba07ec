"""Shared test plumbing: a real redis-server on a free port, real worker processes, raw job writing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import redis
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.environ.get("EB_TEST_TINY_DIR", os.path.join(REPO, "var", "tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server: no persistence, its own port and folder. With `password`, it asks for a password
    made as the project's own Redis makes it (broker.ops.redis_server), in `password_file`."""

    def __init__(self, port: int | None = None, password: bool = False):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="eb-redis-")
        self.proc: subprocess.Popen | None = None
        self.password_file = os.path.join(self.dir, "password") if password else None

    @property
    def url(self) -> str:
        """The URL without any credential (with a password: the one $EB_REDIS_PASSWORD_FILE completes)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def password(self) -> str | None:
        return open(self.password_file).read().strip() if self.password_file else None

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/setup does it)")
        if self.password_file:
            from broker.ops.redis_server import ensure_credential, write_config

            args = [write_config(os.path.join(self.dir, "redis.conf"), ensure_credential(self.password_file),
                                 self.port, workdir=self.dir, persist=False)]
        else:
            args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.dir]
        self.proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port, password=self.password)
        for _ in range(200):
            try:
                if r.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def write_config(path: str, **values) -> str:
    with open(path, "w") as f:
        json.dump(values, f)
    return path


def stage_worker(encoder, tiny_dir: str, redis_url: str, folder, name: str, **values):
    """An EncoderWorker object on `encoder` (its threads not started, for tests that drive its stages one at a time)
    on a queue and shm prefix of its own; `values`: more config keys."""
    from workers.config import EncoderWorkerConfig
    from workers.worker import EncoderWorker

    cfg = write_config(os.path.join(str(folder), "w.json"), model_dir=tiny_dir, backend="baseline", device="cpu",
                       redis_url=redis_url, queue=f"{name}-" + uuid.uuid4().hex[:8],
                       shm_prefix="eb" + name[0] + uuid.uuid4().hex[:6], cache_max_bytes=0, max_wait_ms=0, **values)
    return EncoderWorker(EncoderWorkerConfig.from_json(cfg), encoder)


def stage_worker_client(worker):
    """A client of `worker`'s queue, reading under its shm prefix."""
    from broker.client import EncoderClient

    return EncoderClient(worker.config.redis_url, queue=worker.queue, timeout=30, shm_prefix=worker.config.shm_prefix)


def start_process(args: list[str], log_path: str, env: dict | None = None, argv: list[str] | None = None,
                  cwd: str = REPO) -> subprocess.Popen:
    """`python ARGS` (or `argv` as it is) in `cwd`, its output in log_path."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("TRITON_INTERPRET", None)
    log = open(log_path, "w")
    return subprocess.Popen(argv or [sys.executable, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=full_env)


def wait_for_workers(url: str, count: int, proc: subprocess.Popen, log_path: str, timeout: float = 120.0,
                     queue: str | None = None) -> None:
    """Until `count` RQ workers are registered (on `queue`, or in all) (a worker registers after loading its
    model)."""
    r = redis.Redis.from_url(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        if r.scard(f"rq:workers:{queue}" if queue else "rq:workers") >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"worker did not register within {timeout}s:\n{open(log_path).read()[-4000:]}")


def eventually(check, timeout=20.0, interval=0.05) -> bool:
    """Whether `check()` comes true within `timeout` seconds (the timeout only bounds a wait)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def start_worker(folder, name: str, module: str = "workers", env: dict | None = None,
                 **config) -> tuple[subprocess.Popen, str]:
    """`python -m MODULE --config FOLDER/NAME.json`, that config holding `config`: (process, its log's path)."""
    path = os.path.join(folder, name)
    config_path = write_config(path + ".json", **config)
    return start_process(["-m", module, "--config", config_path], path + ".log", env=env), path + ".log"


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shm_names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix + "."))


def submit_prompt(client, prompt: str, bell: str = "") -> tuple[str, float]:
    """Enqueues `prompt` as EncoderClient.encode does (a shm result, rung to `bell` if named): (job id, deadline)."""
    from broker.protocol.host import host_id
    from broker.protocol.schemas import EncodeRequest

    deadline = client.wire.deadline()
    req = EncodeRequest(prompts=[prompt], client_host=host_id(), deadline=deadline, bell=bell)
    return client.wire.submit(req.validate().to_msgpack(), deadline), deadline


def assert_encoded(got, prompt: str, baseline) -> None:
    """`got` is bit for bit what the in-process baseline makes of `prompt`, in got's dtype."""
    assert torch.equal(got, baseline.encode([prompt])[0].to(got.dtype))


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of the /metrics page on `port`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Workers:
    """Encoder worker processes on one test Redis, each with its own config."""

    def __init__(self, tiny_dir, redis_url, tmp_path):
        self.tiny_dir, self.url, self.tmp = tiny_dir, redis_url, tmp_path
        self.procs = []
        self.prefix = "ebf" + uuid.uuid4().hex[:6]

    def start(self, queue="encode", **cfg):
        """A worker, once it serves `queue`; `cfg` overrides the defaults below."""
        before = redis.Redis.from_url(self.url).scard(f"rq:workers:{queue}")
        values = dict(model_dir=self.tiny_dir, backend="baseline", device="cpu", redis_url=self.url, queue=queue,
                      shm_prefix=self.prefix, housekeeping_interval_s=0.5, job_heartbeat_ttl_s=2, result_ttl_s=30)
        proc, log = start_worker(self.tmp, f"w{len(self.procs)}", **{**values, **cfg})
        self.procs.append(proc)
        wait_for_workers(self.url, before + 1, proc, log, queue=queue)
        return proc

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            stop_process(p)


def restart(server: RedisServer) -> None:
    """kill -9, then a fresh Redis on the same port (no persistence: empty)."""
    server.proc.kill()
    server.proc.wait()
    server.start()
