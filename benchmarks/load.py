"""Load benchmark: N client processes, each sending M single-prompt requests, against one encoder worker.

    python benchmarks/load.py [--clients 1,8,64,64x4] [--requests 200] [--backend baseline] [--device cpu]
                              [--tasks-per-process 1] [--redis-server PATH] [--model-dir DIR] [--json OUT]
                              [--standin GIL_MS,WAIT_MS,SEQ_MS]

Starts its own redis-server (no persistence, a free port) and one worker process, measures the same backend
in process first (single-request latency, saturated throughput), then through the broker: throughput, p50/p99
latency, errors, segments left in /dev/shm. The single-request overhead comes from lone requests in blocks that
alternate with the same prompts in process (one window: drift hits both alike), with where their time went.
Prints a markdown table last.
With --tasks-per-process K, each client process runs K asyncio clients (N clients = N/K processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHM_PREFIX = "ebload"  # the worker's segments, which its clients read

# A realistic t2i mix: short to long user prompts (the tiny model's cost barely depends on length).
PROMPTS = [
    "a red fox in snow",
    "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket",
    "neon sign that says 'open late' above a ramen shop, night, wet street reflections, cinematic",
    "isometric illustration of a tiny island village with windmills, pastel colors, soft shadows, highly "
    "detailed, trending on artstation",
    "portrait photo of an elderly fisherman, deep wrinkles, grey beard, knitted cap, overcast light, 85mm",
]


def client_prompt(seed: int, k: int | None, i: int) -> str:
    """Request i of client k in the process seeded `seed`: distinct (no cache hits). In-process runs use the same
    prompts: Qwen2 splits digits one by one, so the suffix alone is ~10 tokens and must match for a fair ratio."""
    suffix = f" #{seed}.{i}" if k is None else f" #{seed}.{k}.{i}"
    return PROMPTS[(seed + (k or 0) + i) % len(PROMPTS)] + suffix


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def client_process(url, n_requests, tasks, seed, out_q, go):
    from broker.client import EncoderClient
    from broker.errors import BrokerError

    out_q.put("ready")  # imports done (seconds with torch): all clients start together
    go.wait()

    async def one_client(c, k):
        lat, errors = [], 0
        for i in range(n_requests):
            prompt = client_prompt(seed, k, i)
            t0 = time.perf_counter()
            try:
                await c.aencode([prompt])
                lat.append((time.perf_counter() - t0) * 1e3)
            except BrokerError:
                errors += 1
        return lat, errors

    async def main():
        c = EncoderClient(url, timeout=300, shm_prefix=SHM_PREFIX)
        try:
            res = await asyncio.gather(*(one_client(c, k) for k in range(tasks)))
        finally:
            await c.aclose()
        return [x for r in res for x in r[0]], sum(r[1] for r in res)

    if tasks == 1:  # the plain sync path, as most DiT workers call it
        c = EncoderClient(url, timeout=300, shm_prefix=SHM_PREFIX)
        lat, errors = [], 0
        for i in range(n_requests):
            prompt = client_prompt(seed, None, i)
            t0 = time.perf_counter()
            try:
                c.encode([prompt])
                lat.append((time.perf_counter() - t0) * 1e3)
            except BrokerError:
                errors += 1
        out_q.put((lat, errors))
        return
    out_q.put(asyncio.run(main()))


def in_process_ms(enc, prompt: str) -> float:
    """One request in process, as a DiT worker with its own encoder runs it (states on the host): its ms."""
    t0 = time.perf_counter()
    enc.encode([prompt])[0].cpu()
    return (time.perf_counter() - t0) * 1e3


def in_process(args):
    """(the encoder, its numbers): single-request latency and saturated throughput in this process. The encoder
    is kept for the paired single-request run (single_requests)."""
    import torch

    from workers.encoders import load_encoder

    enc = load_encoder(args.model_dir, backend=args.backend, device=args.device)
    if args.standin:
        from benchmarks.standin_worker import slow_down

        slow_down(enc, *args.standin)
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        enc.encode([PROMPTS[0] + " warm"])
    sync()
    lat = [in_process_ms(enc, client_prompt(0, None, i)) for i in range(args.single_iters)]  # as the lone client's
    # as a full batch of the most clients' requests (64 processes of 4 tasks, 100 requests each)
    batch = [client_prompt((j % 64) * 1000, j % 4, 50 + j % 50) for j in range(args.batch)]
    enc.encode(batch)
    sync()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < args.saturate_s:
        for t in enc.encode(batch):
            t.cpu()
        n += len(batch)
    thr = n / (time.perf_counter() - t0)
    return enc, {"single_p50_ms": pct(lat, 50), "single_p99_ms": pct(lat, 99), "throughput_rps": thr}


PAIRED_BLOCK = 25  # requests in a row of one kind in single_requests


VIA_DOORBELL = "(share of results by doorbell, 0-1)"


def through_broker(c, prompt: str) -> dict:
    """One request through the broker with client `c`: seconds spent in each stage (one clock: the client's
    timestamps and the worker's per-job timings in the handle)."""
    from broker.results import read_shm

    t0 = time.time()
    handle, via = c.handle_of([prompt])
    t2 = time.time()
    read_shm(handle, prefix=SHM_PREFIX)
    t3 = time.time()
    tm = handle.timings
    rows = {"queue (enqueued -> taken: ENQUEUE, wake-up, TAKE)": tm["queue_ms"] / 1e3,
            "taken -> on the encoder": tm["batch_ms"] / 1e3, "encoder": tm["infer_ms"] / 1e3,
            "encoder done -> handle": tm["deliver_ms"] / 1e3,
            "handle -> client has it (shm write, doorbell or RECORD + XREAD)": t2 - tm["handed_at"],
            "read shm": t3 - t2}
    rows["client: request built, job stamped"] = t3 - t0 - sum(rows.values())
    rows["total"] = t3 - t0
    rows[VIA_DOORBELL] = 1.0 if via == "doorbell" else 0.0  # not a time: single_requests averages it
    return rows


def broker_block_server(url: str, blocks, results) -> None:
    """A lone client in a process of its own, as a DiT worker's: runs each block of prompts it is sent through
    the broker, one request at a time, and sends back their stages (then PING round trips, on None)."""
    from broker.client import EncoderClient

    c = EncoderClient(url, timeout=60, shm_prefix=SHM_PREFIX)
    results.put("ready")
    while (prompts := blocks.get()) is not None:
        results.put([through_broker(c, p) for p in prompts])
    pings = []
    for _ in range(100):  # context: this host's Redis round trip, the unit every stage pays in
        t0 = time.time()
        c.wire.redis.ping()
        pings.append(time.time() - t0)
    c.close()
    results.put(pings)


def single_requests(url: str, n: int, enc) -> dict:
    """A lone request's overhead and where its time goes: n prompts, each sent once through the broker (by a
    lone client in a clean process of its own, as a DiT worker's) and once to `enc` in this process, in
    alternating blocks (PAIRED_BLOCK requests of one, then of the other) so that drift (GPU clocks, host load)
    hits both alike, while each request still follows one of its own kind as in a steady stream. (Alternating
    single requests would let the worker idle through each in-process request: a colder start than a lone
    client's steady stream gives it.) p50 of each broker stage, of the in-process requests, and the overhead."""
    ctx = mp.get_context("spawn")
    blocks, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=broker_block_server, args=(url, blocks, results))
    proc.start()
    assert results.get() == "ready"

    warm = [client_prompt(0, None, i) for i in range(5)]
    for p in warm:
        in_process_ms(enc, p)
    blocks.put(warm)
    results.get()
    stages: dict[str, list[float]] = {}
    local = []
    for start in range(0, n, PAIRED_BLOCK):
        prompts = [client_prompt(0, None, i) for i in range(start, min(n, start + PAIRED_BLOCK))]
        local.extend(in_process_ms(enc, p) for p in prompts)
        blocks.put(prompts)
        for rows in results.get():
            for k, v in rows.items():
                stages.setdefault(k, []).append(v if k == VIA_DOORBELL else v * 1e3)
    blocks.put(None)
    stages["(context) one Redis PING round trip"] = [x * 1e3 for x in results.get()]
    proc.join()
    share = stages.pop(VIA_DOORBELL)
    out = {k: pct(v, 50) for k, v in stages.items()}
    out[VIA_DOORBELL] = statistics.mean(share)
    out["in process, same prompts, alternating blocks"] = pct(local, 50)
    out["overhead (total - in process)"] = out["total"] - out["in process, same prompts, alternating blocks"]
    return out


def start_stack(args, tmp):
    from broker.protocol.queues import DEFAULT_QUEUE
    from tests.helpers import RedisServer, free_port, wait_for_workers, write_config

    port = free_port()
    if args.redis_server:
        os.environ["PATH"] = os.path.dirname(os.path.abspath(args.redis_server)) + os.pathsep + os.environ["PATH"]
    server = RedisServer(port).start()
    prefix = SHM_PREFIX
    cfg = write_config(os.path.join(tmp, "w.json"), model_dir=args.model_dir, make_tiny_if_missing=False,
                       backend=args.backend, device=args.device, redis_url=server.url, queue=DEFAULT_QUEUE,
                       shm_prefix=prefix, max_batch_requests=args.batch, max_queue_depth=0, cache_max_bytes=0, log_level="INFO")
    log = os.path.join(tmp, "worker.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = ["-m", "workers", "--config", cfg]
    if args.standin:
        gil_ms, wait_ms, per_seq_ms = args.standin
        cmd = [os.path.join(REPO, "benchmarks", "standin_worker.py"), "--config", cfg, "--gil-ms", str(gil_ms),
               "--wait-ms", str(wait_ms), "--per-seq-ms", str(per_seq_ms)]
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_for_workers(server.url, 1, proc, log, timeout=600)
    return server, proc, prefix, log


def start_py_spy(out_dir: str, pid: int, clients: int) -> list[subprocess.Popen]:
    """Samples the worker while the clients run, twice over: every thread, idle ones too (where intake, compute
    and output wait), and only the thread holding the GIL (who keeps the others waiting). Collapsed stacks."""
    os.makedirs(out_dir, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", "6", "--rate", "200",
                              "--threads", "--nonblocking", "--format", "raw", "-o",
                              os.path.join(out_dir, f"worker-{clients}c-{mode}.txt"), flag],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            for mode, flag in (("all", "--idle"), ("gil", "--gil"))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,8,64",
                    help="client counts, one run each; PxT: P processes of T asyncio clients each (e.g. 64x4)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tasks-per-process", type=int, default=1)
    ap.add_argument("--backend", default="baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=os.path.join(REPO, "var", "tiny"))
    ap.add_argument("--redis-server", help="path of a redis-server binary (default: from PATH)")
    ap.add_argument("--batch", type=int, default=64, help="in-process batch and the worker's max_batch_requests")
    ap.add_argument("--single-iters", type=int, default=200)
    ap.add_argument("--saturate-s", type=float, default=5.0)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--py-spy-dir", help="sample the worker with py-spy for 6 s at the start of each client count")
    ap.add_argument("--standin", type=lambda v: [float(x) for x in v.split(",")], metavar="GIL_MS,WAIT_MS,SEQ_MS",
                    help="add a GPU-like cost to each forward, in process and in the worker "
                         "(benchmarks/standin_worker.py): GIL held, then waiting, per batch, plus per sequence")
    ap.add_argument("--build-7b", action="store_true",
                    help="build (or reuse) benchmarks/encoder.py's random 7B checkpoint at --model-dir first")
    args = ap.parse_args()

    from workers.make_tiny import ensure_tiny

    if args.build_7b:
        import torch

        from benchmarks.encoder import build_checkpoint
        from workers.model.qwen2_5_vl_text import ModelArgs

        build_checkpoint(args.model_dir, ModelArgs.from_name("qwen2.5-vl-7b"), torch.device(args.device))
    elif args.model_dir == os.path.join(REPO, "var", "tiny"):
        ensure_tiny(args.model_dir)
    print("in-process ...", flush=True)
    enc, local = in_process(args)
    print(f"in-process: single p50 {local['single_p50_ms']:.2f} ms, throughput {local['throughput_rps']:.0f} "
          "prompts/s", flush=True)
    tmp = tempfile.mkdtemp(prefix="eb-load-")
    server, worker, prefix, log = start_stack(args, tmp)
    rows = []
    try:
        stages = single_requests(server.url, args.single_iters, enc)
        del enc  # the worker has the device to itself from here on
        print("one request at a time, p50 of each stage (ms):\n" + "\n".join(f"  {k:52s} {v:8.3f}"
                                                                           for k, v in stages.items()), flush=True)
        ctx = mp.get_context("spawn")
        for spec in args.clients.split(","):
            if "x" in spec:  # PROCESSESxTASKS: that many processes, each with that many asyncio clients
                procs_n, tasks = (int(v) for v in spec.split("x"))
            else:
                tasks = min(args.tasks_per_process, int(spec))
                procs_n = max(1, int(spec) // tasks)
            n = procs_n * tasks
            q, go = ctx.Queue(), ctx.Event()
            procs = [ctx.Process(target=client_process, args=(server.url, args.requests, tasks, i * 1000, q, go))
                     for i in range(procs_n)]
            for p in procs:
                p.start()
            for _ in procs:
                assert q.get() == "ready"
            go.set()
            t0 = time.perf_counter()
            spies = start_py_spy(args.py_spy_dir, worker.pid, n) if args.py_spy_dir else []
            results = [q.get() for _ in procs]
            wall = time.perf_counter() - t0
            for p in procs:
                p.join()
            for spy in spies:
                spy.wait()
            lat = [x for r in results for x in r[0]]
            errors = sum(r[1] for r in results)
            left = [f for f in os.listdir("/dev/shm") if f.startswith(prefix + ".")]
            rows.append({"clients": n, "processes": procs_n, "tasks_per_process": tasks,
                         "requests": len(lat) + errors, "errors": errors, "segments_left": len(left),
                         "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat) if lat else 0,
                         "throughput_rps": len(lat) / wall,
                         "throughput_rps_little": n / (statistics.fmean(lat) / 1e3) if lat else 0})
            r = rows[-1]
            from broker.ops.stats import collect
            from broker.protocol.connections import connect

            st = collect(connect(server.url))
            r["worker_mean_batch_jobs"] = st["mean_batch_jobs"]
            r["worker_batch_histogram"] = st["batch_histogram"]
            print(f"  worker so far: mean batch {st['mean_batch_jobs']} jobs, histogram {st['batch_histogram']}, "
                  f"{st['totals']['results_rung']} results rung; "
                  "last log lines:\n    "
                  + "\n    ".join(open(log).read().splitlines()[-4:]), flush=True)
            print(f"{n} clients: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, "
                  f"~{r['throughput_rps']:.0f} req/s, errors {errors}, segments left {len(left)}", flush=True)
    finally:
        worker.terminate()
        worker.wait(30)
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    overhead = stages["overhead (total - in process)"]
    one_client = rows[0]["p50_ms"] - local["single_p50_ms"] if rows and rows[0]["clients"] == 1 else None
    best = max((r["throughput_rps"] for r in rows), default=0)
    summary = {"in_process": local, "broker": rows, "single_request_stages_ms": stages,
               "single_overhead_p50_ms": overhead, "one_client_p50_minus_in_process_single_p50_ms": one_client,
               "saturated_fraction_of_in_process": best / local["throughput_rps"] if local["throughput_rps"] else None,
               "backend": args.backend, "device": args.device}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print("\n| clients | processes x tasks | requests | errors | segments left | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['processes']} x {r['tasks_per_process']} | {r['requests']} | {r['errors']} | "
              f"{r['segments_left']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_rps']:.0f} |")
    print(f"\nin-process ({args.backend}, {args.device}): single p50 {local['single_p50_ms']:.2f} ms, "
          f"saturated {local['throughput_rps']:.0f} prompts/s (batch {args.batch})")
    print(f"single-request broker overhead (p50, shm, loopback; {args.single_iters} requests in blocks alternating "
          f"with the same in process): {overhead:.2f} ms")
    if one_client is not None:
        print(f"(1-client run p50 - in-process single p50, measured apart: {one_client:.2f} ms)")
    print(f"best broker throughput / in-process: {summary['saturated_fraction_of_in_process']:.2f}")


if __name__ == "__main__":
    main()
