"""Soak: encoder workers and clients for a while, one worker SIGKILLed (and restarted) and Redis restarted twice
meanwhile; counts what was lost.

    python benchmarks/soak.py [--duration 300] [--workers 2] [--clients 8] [--redis-restarts 2] [--persist]
                              [--transport shm|blob|async|http] [--backend baseline] [--device cpu]
                              [--model-dir var/tiny] [--max-rel-err 1e-3] [--json OUT]

Everything runs on this host: its own redis-server asking for a password (made as the Procfile's Redis makes it,
broker.ops.redis_server), the encoder worker processes (`python -m workers`, worker i with EB_WORKER_INDEX=i; the tiny
model on the CPU by default), and client processes that each send one prompt at a time, their own prompts only,
and check every result against the in-process CPU encoder's output for that prompt (same shape, relative L2 error
under --max-rel-err). How clients send (--transport): `shm` EncoderClient.encode, results in shared memory (with
the doorbell); `blob` EncoderClient.encode, results as Redis blobs; `async` EncoderClient.aencode in one event
loop a client; `http` POST /generate to an HTTP front (`python -m broker.http`, started here on the soak's
Redis) as LightX2V's LightLLM-protocol client does, the prompt templated, every token's bfloat16 state read from
the answer's base64. At a quarter of the run worker 0 is SIGKILLed and started again; Redis is SIGKILLed and
started again (same port, same password) at evenly spaced times after that. Without --persist Redis keeps nothing,
so a restart drops every job it held and the clients must enqueue theirs again; with --persist it writes every
command to an append-only file first, and comes back with them.

Counted: results right, wrong (shape or values off: another prompt's states, or corrupt ones), requests that
failed (by error type, by the event they came after, and their most common messages), segments of the workers'
prefix left in /dev/shm when the clients stop and again after result_ttl_s plus a sweep, jobs left in Redis's queue
and started registry, tracebacks in the worker logs. Prints a table; exits 1 when anything was lost, wrong or left.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PREFIX = "ebsoak"
TRANSPORTS = ("shm", "blob", "async", "http")
RESULT_TTL_S = 10
SWEEP_S = 1.0
PROMPTS_PER_CLIENT = 16
PROMPTS = [
    "a red fox in snow",
    "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket",
    "neon sign that says 'open late' above a ramen shop, night, wet street reflections, cinematic",
    "portrait photo of an elderly fisherman, deep wrinkles, grey beard, knitted cap, overcast light, 85mm",
]


def client_prompts(k: int) -> list[str]:
    """Client k's own prompts: no other client sends them, so a result that is another's shows as wrong."""
    return [f"soak client {k} prompt {j}: {PROMPTS[(k + j) % len(PROMPTS)]}" for j in range(PROMPTS_PER_CLIENT)]


def rel_err(got, want) -> float:
    import torch

    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    return float(torch.linalg.vector_norm((got - want).double()) / torch.linalg.vector_norm(want.double()).clamp_min(
        1e-30))


class HttpFailure(Exception):
    """A /generate answer other than 200."""


class Outcomes:
    """One client's tally: results right or wrong (against `want`, by prompt index), failures, latencies."""

    def __init__(self, t0: float, want: list, max_rel_err: float):
        self.t0, self.want, self.max_rel_err = t0, want, max_rel_err
        self.counts = collections.Counter()
        self.errors: list[tuple[float, str, str]] = []
        self.worst, self.latencies = 0.0, []
        self.slowest = (0.0, 0.0)  # (latency, when it was sent, from the start) of the slowest result

    def got(self, j: int, states, started: float) -> None:
        self.latencies.append(time.time() - started)
        self.slowest = max(self.slowest, (self.latencies[-1], started - self.t0))
        err = rel_err(states, self.want[j])
        if err > self.max_rel_err:
            self.counts["wrong"] += 1
        else:
            self.counts["ok"] += 1
            self.worst = max(self.worst, err)

    def failed(self, e: Exception) -> float:
        """Records `e`; how long to wait before the next request."""
        self.errors.append((round(time.time() - self.t0, 2), type(e).__name__, str(e)[:300]))
        return 0.2 if type(e).__name__ in ("BrokerUnavailable", "HttpFailure") else 0.0

    def summary(self, k: int) -> dict:
        return {"client": k, "ok": self.counts["ok"], "wrong": self.counts["wrong"], "errors": self.errors,
                "worst_rel_err": self.worst, "latencies": self.latencies, "slowest": self.slowest}


def http_sender(front_url: str, timeout: float):
    """POST /generate of a templated prompt, as LightX2V's lightllm_service client sends it: its [L, D] bfloat16
    states (every token's, the template's too), read from the answer's base64."""
    import base64
    import http.client
    from urllib.parse import urlsplit

    import numpy as np
    import torch

    from workers.templates import T2I

    where = urlsplit(front_url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout + 10)

    def send(prompt: str):
        payload = {"inputs": T2I.format(prompt),
                   "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1}}
        try:
            conn.request("POST", "/generate", body=json.dumps(payload), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException):
            conn.close()  # a new connection next time
            raise
        if r.status != 200:
            raise HttpFailure(f"HTTP {r.status}: {body[:200].decode(errors='replace')}")
        answer = json.loads(body)
        data = np.frombuffer(base64.b64decode(answer["hidden_states_base64"]), dtype=np.uint8)
        return torch.from_numpy(data.reshape(answer["hidden_states_shape"]).copy()).view(torch.bfloat16)

    return send


def client_main(k: int, url: str, front_url: str, transport: str, model_dir: str, start_file: str, duration: float,
                timeout: float, retries: int, max_rel_err: float, ready, out) -> None:
    """Client k: loads the reference states of its prompts, says it is ready, waits for the run's start time
    (written to `start_file` once every client is ready), then sends one prompt at a time until the run ends."""
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from broker.client import EncoderClient
    from workers.encoders import load_encoder
    from workers.templates import T2I

    prompts = client_prompts(k)
    encoder = load_encoder(model_dir, backend="baseline", device="cpu")
    if transport == "http":  # the front answers every token's state, in bfloat16
        want = [encoder.encode_tokens(encoder.tokenize([T2I.format(p)], raw=True))[0].to(torch.bfloat16)
                for p in prompts]
    else:  # one at a time: the reference for each prompt alone
        want = [encoder.encode([p])[0] for p in prompts]
    del encoder
    ready.put(k)
    while not os.path.exists(start_file):
        time.sleep(0.02)
    with open(start_file) as f:
        t0 = float(f.read())
    outcomes = Outcomes(t0, want, max_rel_err)
    if transport == "http":
        send = http_sender(front_url, timeout)
        client = None
    else:
        client = EncoderClient(url, timeout=timeout, retries=retries, shm_prefix=PREFIX,
                               transport="blob" if transport == "blob" else "shm")
        send = lambda p: client.encode([p])[0]
    if transport == "async":
        asyncio.run(async_loop(client, prompts, outcomes, t0 + duration))
    else:
        i = 0
        while time.time() < t0 + duration:
            j = i % len(prompts)
            i += 1
            start = time.time()
            try:
                states = send(prompts[j])
            except Exception as e:  # BrokerError, HttpFailure, a broken connection: counted as lost
                time.sleep(outcomes.failed(e))
                continue
            outcomes.got(j, states, start)
    if client is not None:
        client.close()
    out.put(outcomes.summary(k))


async def async_loop(client, prompts: list[str], outcomes: Outcomes, until: float) -> None:
    """One prompt at a time through EncoderClient.aencode, in this one event loop."""
    i = 0
    while time.time() < until:
        j = i % len(prompts)
        i += 1
        start = time.time()
        try:
            (states,) = await client.aencode([prompts[j]])
        except Exception as e:
            await asyncio.sleep(outcomes.failed(e))
            continue
        outcomes.got(j, states, start)
    await client.aclose()


class SoakRedis:
    """A redis-server on a fixed port that asks for a password, SIGKILLed and started again on demand."""

    def __init__(self, port: int, folder: str, persist: bool):
        from broker.ops.redis_server import ensure_credential, write_config

        self.port, self.folder = port, folder
        self.password_file = os.path.join(folder, "password")
        self.password = ensure_credential(self.password_file)
        self.conf = write_config(os.path.join(folder, "redis.conf"), self.password, port, workdir=folder,
                                 persist=False)
        if persist:  # later lines win: every write reaches the append-only file before its reply
            with open(self.conf, "a") as f:
                f.write("appendonly yes\nappendfsync always\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"  # the password comes from $EB_REDIS_PASSWORD_FILE

    @property
    def authed_url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([shutil.which("redis-server"), self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port, password=self.password)
        for _ in range(500):
            try:
                if r.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def start_worker(i: int, cfg: str, folder: str, env: dict) -> tuple[subprocess.Popen, str]:
    log = os.path.join(folder, f"worker{i}-{int(time.time())}.log")
    proc = subprocess.Popen([sys.executable, "-m", "workers", "--config", cfg], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(env, EB_WORKER_INDEX=str(i)))
    return proc, log


def start_front(redis_url: str, folder: str, env: dict, timeout: float, retries: int) -> tuple:
    """`python -m broker.http` on a free port of this host, once it answers /liveness with 200 (Redis up,
    a worker serving): (process, its URL, its log). Its answers' segments carry the workers' prefix, so they are
    counted with theirs."""
    import urllib.error
    import urllib.request

    from tests.helpers import free_port

    port, log = free_port(), os.path.join(folder, "http_front.log")
    proc = subprocess.Popen([sys.executable, "-m", "broker.http", "--port", str(port), "--redis-url", redis_url,
                             "--shm-prefix", PREFIX, "--worker-shm-prefix", PREFIX, "--timeout", str(timeout),
                             "--retries", str(retries)], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the HTTP front exited with {proc.returncode}:\n{open(log).read()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/liveness", timeout=5) as r:
                if r.status == 200:
                    return proc, url, log
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the HTTP front did not answer within 120 s:\n{open(log).read()[-4000:]}")


def shm_left() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX + "."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--redis-restarts", type=int, default=2)
    ap.add_argument("--transport", choices=TRANSPORTS, default="shm", help="how clients send (see above)")
    ap.add_argument("--persist", action="store_true", help="Redis keeps its data across restarts (AOF, fsync always)")
    ap.add_argument("--backend", default="baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=os.path.join(REPO, "var", "tiny"))
    ap.add_argument("--timeout", type=float, default=30.0, help="each request's timeout, end to end")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--max-rel-err", type=float, default=1e-3,
                    help="a result further than this from the CPU float32 reference is wrong (bf16 GPU workers: 0.05)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from broker.protocol.connections import PASSWORD_FILE_ENV, connect
    from broker.protocol.keys import QueueKeys
    from broker.protocol.queues import DEFAULT_QUEUE
    from tests.helpers import free_port, wait_for_workers, write_config
    from workers.make_tiny import ensure_tiny

    if args.model_dir == os.path.join(REPO, "var", "tiny"):
        ensure_tiny(args.model_dir)
    if shm_left():
        sys.exit(f"segments named {PREFIX}.* are already in /dev/shm: remove them first (python -m shm sweep)")
    folder = tempfile.mkdtemp(prefix="eb-soak-")
    server = SoakRedis(free_port(), folder, args.persist)
    server.start()
    os.environ[PASSWORD_FILE_ENV] = server.password_file  # every process below: workers, clients, this one
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cfg = write_config(os.path.join(folder, "encoder.json"), model_dir=args.model_dir, backend=args.backend,
                       device=args.device, redis_url=server.url, shm_prefix=PREFIX, result_ttl_s=RESULT_TTL_S,
                       housekeeping_interval_s=SWEEP_S, cache_max_bytes=0, max_queue_depth=0)
    workers = [start_worker(i, cfg, folder, env) for i in range(args.workers)]
    logs = [log for _, log in workers]
    for proc, log in workers:
        wait_for_workers(server.authed_url, args.workers, proc, log, timeout=600)
    front, front_url = None, ""
    if args.transport == "http":
        front, front_url, front_log = start_front(server.url, folder, env, args.timeout, args.retries)
        logs.append(front_log)

    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    start_file = os.path.join(folder, "start")
    procs = [ctx.Process(target=client_main, args=(k, server.url, front_url, args.transport, args.model_dir, start_file,
                                                   args.duration, args.timeout, args.retries, args.max_rel_err, ready,
                                                   out))
             for k in range(args.clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.time()
    with open(start_file + ".tmp", "w") as f:
        f.write(repr(t0))
    os.replace(start_file + ".tmp", start_file)

    events = []
    schedule = [(0.25 * args.duration, "kill worker 0")]
    schedule += [((0.25 + 0.75 * (n + 1) / (args.redis_restarts + 1)) * args.duration, "restart redis")
                 for n in range(args.redis_restarts)]
    for at, what in schedule:
        time.sleep(max(0.0, t0 + at - time.time()))
        events.append((round(time.time() - t0, 1), what))
        if what == "kill worker 0":
            proc, _ = workers[0]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            workers[0] = start_worker(0, cfg, folder, env)
            logs.append(workers[0][1])
        else:
            server.kill()
            time.sleep(1.0)
            server.start()

    results = [out.get(timeout=args.duration + args.timeout * (args.retries + 2) + 120) for _ in procs]
    for p in procs:
        p.join(30)
    wall = time.time() - t0
    left_at_end = shm_left()
    time.sleep(RESULT_TTL_S + 3 * SWEEP_S)
    left_after_sweep = shm_left()
    r = connect(server.url)
    q = QueueKeys(DEFAULT_QUEUE)
    in_redis = {"queued": r.llen(q.queue), "started": r.zcard(q.started)}
    if front is not None:
        front.send_signal(signal.SIGTERM)
        front.wait(60)
    for proc, _ in workers:
        proc.send_signal(signal.SIGTERM)
    for proc, _ in workers:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    server.kill()

    errors = [e for res in results for e in res["errors"]]
    by_type = collections.Counter(kind for _, kind, _ in errors)
    lat = sorted(x for res in results for x in res["latencies"])
    summary = {
        "load_s": args.duration, "duration_s": round(wall, 1), "workers": args.workers, "clients": args.clients,
        "persist": args.persist, "transport": args.transport,
        "events": events, "ok": sum(res["ok"] for res in results), "wrong": sum(res["wrong"] for res in results),
        "failed": len(errors), "failed_by_type": dict(by_type),
        "failed_by_phase": failed_by_phase(events, errors),
        "error_messages": collections.Counter(f"{kind}: {msg}" for _, kind, msg in errors).most_common(8),
        "worst_rel_err": max(res["worst_rel_err"] for res in results),
        "p50_ms": round(lat[len(lat) // 2] * 1e3, 1) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 1) if lat else None,
        "slowest": [round(x, 2) for x in max(res["slowest"] for res in results)],
        "segments_left_at_end": len(left_at_end), "segments_left_after_sweep": len(left_after_sweep),
        "jobs_left_in_redis": in_redis, "worker_logs": logs,
        "worker_log_tracebacks": sum(open(log).read().count("Traceback") for log in logs),
    }
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    bad = summary["failed"] or summary["wrong"] or summary["segments_left_after_sweep"] or any(in_redis.values())
    return 1 if bad else 0


def failed_by_phase(events: list, errors: list) -> list:
    """[(phase, failures in it)]: from the start to the first event, then from each event to the next."""
    starts = [(0.0, "start")] + list(events)
    phases = []
    for n, (at, what) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else float("inf")
        phases.append((f"{what} ({at} s)", sum(1 for t, _, _ in errors if at <= t < end)))
    return phases


def print_table(s: dict) -> None:
    print(f"\nsoak: {s['workers']} workers, {s['clients']} {s['transport']} clients, {s['load_s']:g} s of load (the last "
          f"client done at {s['duration_s']} s), Redis {'persistent' if s['persist'] else 'without persistence'}")
    print("events: " + ", ".join(f"{what} at {at} s" for at, what in s["events"]))
    rows = [
        ("results right", s["ok"]),
        ("results wrong (shape or values off)", s["wrong"]),
        ("requests failed (lost)", s["failed"]),
        *((f"  {kind}", n) for kind, n in s["failed_by_type"].items()),
        *((f"  failing after {phase}", n) for phase, n in s["failed_by_phase"]),
        ("segments left when the clients stopped", s["segments_left_at_end"]),
        (f"segments left after result_ttl_s ({RESULT_TTL_S} s) and a sweep", s["segments_left_after_sweep"]),
        ("jobs left in Redis (queued, started)", f"{s['jobs_left_in_redis']['queued']}, "
                                                 f"{s['jobs_left_in_redis']['started']}"),
        ("worst relative L2 error of a right result", f"{s['worst_rel_err']:.2e}"),
        ("latency p50 / p99 (ms)", f"{s['p50_ms']} / {s['p99_ms']}"),
        ("slowest result (s, sent at s)", f"{s['slowest'][0]} (at {s['slowest'][1]})"),
        ("tracebacks in worker logs", s["worker_log_tracebacks"]),
    ]
    print("\n| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for msg, n in s["error_messages"]:
        print(f"{n} x {msg}")


if __name__ == "__main__":
    sys.exit(main())
