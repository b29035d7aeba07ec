"""How long one notification takes to reach a process that has been idle, by each way a worker can tell a client
its result is ready: a Redis script's XADD to a client blocked in XREAD (the RQ result stream), or a datagram
to the client's doorbell socket (broker.protocol.doorbell) while the same XREAD is pending beside it. Then a whole
~250 KB result from the start of its fill to the client's copy: rung after the fill (as now), or with an early ring
before it (the client wakes during the fill and stays awake for the result's ring).

    python benchmarks/hops.py [--redis-server PATH] [--n 400] [--idle-ms 8]

The sender waits `idle-ms` between notifications (a lone client's rhythm: the receiver sleeps through the
encoder's time and wakes cold); p50/p90 of send -> the receiver has it, in microseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

XADD_SCRIPT = "return redis.call('XADD', KEYS[1], '*', 'type', '1', 'return_value', ARGV[1])"


def receiver(url: str, bell_name: str, mode: str, n: int, ready, out) -> None:
    from broker.protocol.connections import connect

    r = connect(url)
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bell.bind("\0" + bell_name)
    conn = r.connection_pool.get_connection()
    ready.put(1)
    got = []
    for i in range(n):
        key = f"hop:{i}"
        conn.send_command("XREAD", "COUNT", 1, "BLOCK", 5000, "STREAMS", key, "0-0")
        if mode == "redis":
            conn.read_response()
            got.append(time.perf_counter())
        else:
            select.select([bell, conn._sock], [], [], 5.0)
            bell.recv(65536)
            got.append(time.perf_counter())
            conn.read_response()  # the XADD behind the datagram
        ready.put(i)
    out.put(got)


RESULT_MODES = ("ring after fill", "early ring")  # a ~250 KB result: filled, rung, read by the client


def result_receiver(bell_name: str, n: int, ready, out) -> None:
    from broker.protocol.schemas import Handle
    from broker.results import read_shm

    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bell.bind("\0" + bell_name)
    ready.put(1)
    done = []
    for i in range(n):
        select.select([bell], [], [], 5.0)
        msg = bell.recv(65536)
        if msg == b"soon":  # woken early: stay awake until the result is rung
            bell.setblocking(False)
            while True:
                try:
                    msg = bell.recv(65536)
                    break
                except BlockingIOError:
                    pass
            bell.setblocking(True)
        rows = RESULT_BYTES // 7168
        read_shm(Handle(transport="shm", location=msg.decode(), dtype="bfloat16", shapes=[[rows, 3584]],
                        offsets=[0], nbytes=RESULT_BYTES, expires_at=time.time() + 30), prefix="ebhops")
        done.append(time.perf_counter())
        ready.put(i)
    out.put(done)


RESULT_BYTES = 35 * 7168  # one 35-token prompt's states, 7B


def run_result(mode: str, n: int, idle_s: float) -> list[float]:
    """us from the worker starting to write the result's segment to the client holding a copy."""
    from shm import write_segment

    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    name = f"eb-hops-{os.getpid()}-result"
    proc = ctx.Process(target=result_receiver, args=(name, n, ready, out))
    proc.start()
    ready.get()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    data = os.urandom(RESULT_BYTES)
    started = []
    for _ in range(n):
        time.sleep(idle_s)
        t = time.perf_counter()
        if mode == "early ring":
            sock.sendto(b"soon", "\0" + name)
        segment = write_segment(RESULT_BYTES, 30, "ebhops", [(0, data)])
        sock.sendto(segment.encode(), "\0" + name)
        started.append(t)
        ready.get()
    done = out.get()
    proc.join()
    return [(d - s) * 1e6 for d, s in zip(done, started)]


def run(url: str, mode: str, n: int, idle_s: float) -> list[float]:
    from broker.protocol.connections import connect

    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    name = f"eb-hops-{os.getpid()}-{mode}"
    proc = ctx.Process(target=receiver, args=(url, name, mode, n, ready, out))
    proc.start()
    ready.get()
    r = connect(url)
    xadd = r.register_script(XADD_SCRIPT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    payload = b"x" * 300
    sent = []
    for i in range(n):
        time.sleep(idle_s)
        t = time.perf_counter()
        if mode == "redis":
            xadd(keys=[f"hop:{i}"], args=[payload])
        else:
            sock.sendto(payload, "\0" + name)
            xadd(keys=[f"hop:{i}"], args=[payload])
        sent.append(t)
        ready.get()
    got = out.get()
    proc.join()
    r.delete(*[f"hop:{i}" for i in range(n)])
    return [(g - s) * 1e6 for g, s in zip(got, sent)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-server", default="")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--idle-ms", type=float, default=8.0)
    args = ap.parse_args()
    from tests.helpers import RedisServer, free_port

    if args.redis_server:
        os.environ["PATH"] = os.path.dirname(os.path.abspath(args.redis_server)) + os.pathsep + os.environ["PATH"]
    server = RedisServer(free_port()).start()
    try:
        print(f"| way ({args.n} notifications, {args.idle_ms} ms apart) | p50 us | p90 us |")
        print("|---|---|---|")
        for rnd in range(2):
            for mode in ("redis", "doorbell"):
                lat = run(server.url, mode, args.n, args.idle_ms / 1e3)[10:]
                print(f"| {mode} (round {rnd + 1}) | {pct(lat, 50):.0f} | {pct(lat, 90):.0f} |", flush=True)
        print("\n| a ~250 KB result, fill start -> the client has its copy | p50 us | p90 us |")
        print("|---|---|---|")
        for rnd in range(2):
            for mode in RESULT_MODES:
                lat = run_result(mode, args.n, args.idle_ms / 1e3)[10:]
                print(f"| {mode} (round {rnd + 1}) | {pct(lat, 50):.0f} | {pct(lat, 90):.0f} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
