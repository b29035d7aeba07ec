"""The LightLLM-protocol HTTP front (FastAPI under uvicorn), driven the way LightX2V's lightllm_service client
drives it, against a real Redis and a real encoder worker; the front itself runs in this process on a free port
(its own event loop). tests/test_lightx2v_client.py parses answers exactly as LightX2V does, in a reader process."""

import asyncio
import base64
import contextlib
import http.client
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import redis
import torch

from broker.http.front import HttpFront, HttpFrontConfig
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import (RedisServer, eventually, free_port, scrape, shm_names, start_process, start_worker,
                           stop_process, wait_for_workers)
from workers.serve_loop import ServeLoop

# Qwen-Image's templates as LightX2V's configs carry them (prompt_template_encode / _start_idx): the client
# formats the prompt itself and slices the first drop_idx states off the answer.
T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
T2I_DROP_IDX = 34
I2I_DROP_IDX = 64


class FrontThread:
    """An HttpFront on a free port, serving from its own event loop in a background thread; as a context manager,
    stopped on the way out."""

    def __init__(self, **cfg):
        cfg.setdefault("shm_prefix", "ebh" + uuid.uuid4().hex[:6])  # its own: a front sweeps its prefix as it starts
        self.cfg = HttpFrontConfig(host="127.0.0.1", port=0, **cfg)
        self.loop = asyncio.new_event_loop()
        self.front: HttpFront | None = None
        self.port = None
        self.error = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.front = HttpFront(self.cfg)
                self.port = self.loop.run_until_complete(self.front.start())
            except BaseException as e:  # reported by the constructor below
                self.error = e
                return
            finally:
                ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30) and self.error is None, self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.front.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def front(encoder_worker):
    with FrontThread(redis_url=encoder_worker["url"], queue="encode", worker_shm_prefix=encoder_worker["prefix"],
                     max_body_bytes=1 << 20, client_timeout_s=1.0, shm_default="both") as f:  # tests read both forms
        yield f


def call(port, method, path, body=None, headers=None):
    """(status, JSON answer, headers) of one request on a new connection, as requests.post would make it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def generate(port, prompt, **extra):
    """POST /generate of `prompt` in the t2i template, as LightX2V sends it: (status, JSON answer, headers)."""
    return call(port, "POST", "/generate", lightx2v_payload(T2I_TEMPLATE.format(prompt), **extra))


def lightx2v_payload(text, images=(), **extra):
    """The request LightX2V's LightLLMServiceTextEncoder._call_service sends (`extra`: our optional parameters)."""
    payload = {"inputs": text, "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1,
                                              **extra}}
    if images:
        payload["multimodal_params"] = {"images": [{"type": "base64", "data": base64.b64encode(b).decode()}
                                                   for b in images]}
    return payload


def decode_answer(result, use_shm):
    """[seq, hidden] bfloat16 states from a uint8 [seq, hidden * 2] buffer (shared memory, read through its file in
    /dev/shm so that this test process registers nothing with multiprocessing's resource tracker; else base64)."""
    assert result["hidden_states_dtype"] == "bfloat16"
    if use_shm:
        with open(f"/dev/shm/{result['shm_hidden_states_name']}", "rb") as f:
            data = f.read()
        shape = result["shm_hidden_states_shape"]
    else:
        data, shape = base64.b64decode(result["hidden_states_base64"]), result["hidden_states_shape"]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()).view(torch.bfloat16)


def close(got, want):
    """`want` in the worker's float32, `got` as sent: bfloat16 (one rounding, maybe one ulp apart)."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)


def metric(port, name, **labels):
    """The value of the first sample `name` with (at least) `labels` on the front's /metrics (0 when absent)."""
    for (sample, sample_labels), value in scrape(port).items():
        if sample == name and labels.items() <= dict(sample_labels).items():
            return value
    return 0.0


def test_base64_answer_is_the_baseline_encoding(front, baseline):
    prompt = "a red fox in snow"
    templated = T2I_TEMPLATE.format(prompt)
    status, result, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated, use_shm=False))
    assert status == 200, result
    assert "shm_hidden_states_name" not in result  # asked for base64 alone
    full = decode_answer(result, use_shm=False)
    hidden = baseline.config.hidden_size
    assert result["hidden_states_shape"] == [full.shape[0], hidden * 2]  # LightLLM's uint8 shape of bfloat16
    assert result["prompt_tokens"] == full.shape[0]
    (want_full,) = baseline.encode_tokens(baseline.tokenize([templated], raw=True))
    close(full, want_full)
    (want,) = baseline.encode([prompt])
    close(full[T2I_DROP_IDX:], want)


def test_by_default_an_answer_is_base64_alone_unless_shm_is_asked_for(encoder_worker):
    """LightX2V never sends use_shm: by default no segment is written for it, even on this host."""
    with FrontThread(redis_url=encoder_worker["url"], queue="encode", worker_shm_prefix=encoder_worker["prefix"]) as f:
        assert f.cfg.shm_default == "off"
        status, result, _ = generate(f.port, "base64, please")
        assert status == 200 and "hidden_states_base64" in result, result
        assert not any(k.startswith("shm_") for k in result) and shm_names(f.cfg.shm_prefix) == []
        _, asked, _ = generate(f.port, "base64, please", use_shm=True)  # a client that asks gets a segment
        assert shm_names(f.cfg.shm_prefix) == [asked["shm_hidden_states_name"]]
        assert torch.equal(decode_answer(asked, use_shm=True), decode_answer(result, use_shm=False))


def test_answer_with_both_and_the_front_unlinks_its_segments(front):
    """shm_default both, LightLLM's answer: base64 and a segment, so clients with use_shm on or off both parse it.
    The reader never unlinks (LightX2V doesn't): the front does, at the segment's expiry or when it stops."""
    status, both, _ = generate(front.port, "shared memory, please")
    assert status == 200, both
    name = both["shm_hidden_states_name"]
    assert name in shm_names(front.cfg.shm_prefix)
    assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    assert both["shm_hidden_states_shape"] == both["hidden_states_shape"]
    assert torch.equal(decode_answer(both, use_shm=True), decode_answer(both, use_shm=False))
    assert both["shm_hidden_states_expires_at"] <= time.time() + front.cfg.shm_ttl_s + 1

    _, only_shm, _ = generate(front.port, "shared memory, please", use_shm=True)
    assert "hidden_states_base64" not in only_shm  # no base64 computed when shared memory serves and none asked
    assert only_shm["shm_hidden_states_name"] != name  # every answer its own segment
    assert torch.equal(decode_answer(only_shm, use_shm=True), decode_answer(both, use_shm=False))
    _, with_b64, _ = generate(front.port, "shared memory, please", use_shm=True, return_base64=True)
    assert "hidden_states_base64" in with_b64 and "shm_hidden_states_name" in with_b64
    assert metric(front.port, "encoder_broker_http_results_total", transport="both") >= 2
    assert metric(front.port, "encoder_broker_http_live_segments") >= 3


def test_segments_expire_and_a_budget_bounds_them(encoder_worker):
    with FrontThread(redis_url=encoder_worker["url"], queue="encode", worker_shm_prefix=encoder_worker["prefix"],
                     shm_ttl_s=1.0, sweep_interval_s=0.2, shm_default="both") as f:
        status, first, _ = generate(f.port, "left unread")
        assert status == 200 and "hidden_states_base64" in first, first
        size = os.stat(f"/dev/shm/{first['shm_hidden_states_name']}").st_size
        assert shm_names(f.cfg.shm_prefix) == [first["shm_hidden_states_name"]]
        assert eventually(lambda: shm_names(f.cfg.shm_prefix) == [])  # unlinked by the front at its expiry

    with FrontThread(redis_url=encoder_worker["url"], queue="encode", worker_shm_prefix=encoder_worker["prefix"],
                     shm_max_bytes=size + size // 2, shm_default="both") as g:
        _, a, _ = generate(g.port, "left unread")
        _, b, _ = generate(g.port, "left unread")
        assert "shm_hidden_states_name" in a and "shm_hidden_states_name" not in b, (a.keys(), b.keys())
        assert torch.equal(decode_answer(b, use_shm=False), decode_answer(a, use_shm=True))  # base64 alone
        assert metric(g.port, "encoder_broker_http_shm_refused_total", reason="budget") == 1
        assert metric(g.port, "encoder_broker_http_live_segment_bytes") == size
        assert shm_names(g.cfg.shm_prefix) == [a["shm_hidden_states_name"]]
    assert shm_names(g.cfg.shm_prefix) == []  # a graceful stop unlinks what it still held


def front_process(url, prefix, log_path, worker_prefix):
    """`python -m broker.http` on a free port (its answers' segments under `prefix`, reading the results of
    workers whose shm_prefix is `worker_prefix`), once it answers: (process, port)."""
    port = free_port()
    proc = start_process(["-m", "broker.http", "--port", str(port), "--redis-url", url, "--shm-prefix", prefix,
                          "--worker-shm-prefix", worker_prefix, "--shm-ttl-s", "1", "--shm-default", "both"],
                         log_path)
    assert eventually(lambda: _answers(port) or proc.poll() is not None, timeout=60) and proc.poll() is None, \
        open(log_path).read()
    return proc, port


def _answers(port) -> bool:
    try:
        return call(port, "GET", "/liveness")[0] == 200
    except OSError:
        return False


def test_a_restarted_front_removes_what_a_killed_one_left(encoder_worker, tmp_path):
    prefix = "ebk" + uuid.uuid4().hex[:6]
    proc, port = front_process(encoder_worker["url"], prefix, tmp_path / "front.log", encoder_worker["prefix"])
    try:
        status, result, _ = generate(port, "orphan")
        assert status == 200 and shm_names(prefix) == [result["shm_hidden_states_name"]]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(1.2)  # past the orphan's expiry: nobody is left to unlink it
    assert shm_names(prefix) == [result["shm_hidden_states_name"]]
    with FrontThread(redis_url=encoder_worker["url"], queue="encode", shm_prefix=prefix,
                     worker_shm_prefix=encoder_worker["prefix"]):
        assert shm_names(prefix) == []  # swept as the new front started


def test_sigterm_stops_the_front_gracefully(encoder_worker, tmp_path):
    prefix = "ebg" + uuid.uuid4().hex[:6]
    proc, port = front_process(encoder_worker["url"], prefix, tmp_path / "front.log", encoder_worker["prefix"])
    try:
        status, result, _ = generate(port, "graceful")
        assert status == 200 and shm_names(prefix) == [result["shm_hidden_states_name"]]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert shm_names(prefix) == []  # unlinked on the way out
    assert "stopping: unlinking 1 answer segment(s)" in open(tmp_path / "front.log").read()


def test_ctrl_c_stops_the_front_and_its_redis_quietly(tmp_path):
    """Ctrl-C under honcho signals Redis and the front at once: the front stops as it does on SIGTERM, exits 0 and
    logs no error."""
    server = RedisServer().start()
    log = tmp_path / "front.log"
    proc = start_process(["-m", "broker.http", "--port", str(free_port()), "--redis-url", server.url,
                          "--shm-prefix", "ebc" + uuid.uuid4().hex[:6]], log)
    try:
        assert eventually(lambda: "LightLLM-protocol front on" in open(log).read() or proc.poll() is not None,
                          timeout=60) and proc.poll() is None, open(log).read()
        server.proc.terminate()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        stop_process(proc)
        server.cleanup()
    said = open(log).read()
    assert "stopping: unlinking" in said and "Traceback" not in said and "ERROR" not in said, said


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not JSON"),
    (b"[" * 100000, 400, "nested too deeply"),  # the JSON decoder's recursion: once a 500
    (b"[1, 2]", 422, "JSON object"),
    ({"parameters": {"max_new_tokens": 1}}, 422, "no 'inputs'"),
    ({"inputs": 5}, 422, "non-empty string"),
    ({"inputs": ""}, 422, "non-empty string"),
    ({"inputs": "x", "parameters": {"use_shm": "yes"}}, 422, "true or false"),
    ({"inputs": "x", "multimodal_params": {"images": [{"type": "base64", "data": "no*base64!"}]}}, 400, "base64"),
    ({"inputs": "x", "multimodal_params": {"images": [{"type": "url", "data": "http://x/a.png"}]}}, 422,
     "only base64"),
    ({"inputs": T2I_TEMPLATE.format(" fox" * (TEST_MAX_PROMPT_TOKENS + 1))}, 422, "max_prompt_tokens"),
])
def test_bad_requests_get_a_clear_4xx(front, body, status, says):
    got, result, _ = call(front.port, "POST", "/generate", body)
    assert got == status and says in result["message"], result


def test_wrong_paths_methods_and_sizes(front):
    assert call(front.port, "GET", "/generate_stream")[0] == 404
    status, result, headers = call(front.port, "GET", "/generate")
    assert status == 405 and headers["allow"] == "POST" and "POST" in result["message"]
    assert call(front.port, "POST", "/health", b"{}")[0] == 405

    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as s:  # a body too large, never sent:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        status, _, body = read_response(s.makefile("rb"))  # refused from the header alone
        assert status == 413 and "max_body_bytes" in json.loads(body)["message"]

    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as s:  # chunked: counted as it comes
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * (256 << 10)
        try:
            for _ in range(8):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the front answered and closed before the rest
        assert read_response(s.makefile("rb"))[0] == 413


def test_chunked_body_is_read(front):
    body = json.dumps(lightx2v_payload(T2I_TEMPLATE.format("sent in chunks"), use_shm=False)).encode()
    with socket.create_connection(("127.0.0.1", front.port), timeout=60) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (body[:10], body[10:]):
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        s.sendall(b"0\r\n\r\n")
        status, _, answer = read_response(s.makefile("rb"))
        assert status == 200 and "hidden_states_base64" in json.loads(answer)


def test_slow_clients_are_timed_out(front):
    """client_timeout_s (1 s here) bounds a request's head and then its body; the connection is not held."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes never come
        status, _, body = read_response(s.makefile("rb"))
        assert status == 408 and "client_timeout_s" in json.loads(body)["message"]
    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as s:
        f = s.makefile("rb")
        for _ in range(4):  # a head trickled byte by byte, never finished
            try:
                s.sendall(b"G")
            except (BrokenPipeError, ConnectionResetError):  # the front closed it already: what is tested
                break
            time.sleep(0.5)
        try:
            assert f.read() == b""  # closed by the front, no answer: the head never came
        except ConnectionResetError:
            pass  # closed with our unread bytes pending: a reset, still no answer
    # the front still answers (503 only says whether a worker is live at this moment, which other tests vary)
    assert call(front.port, "GET", "/liveness")[0] in (200, 503)


def test_access_log_and_refusals_are_logged(front, caplog):
    caplog.set_level(logging.INFO, logger="broker.http_front")
    status, result, _ = generate(front.port, "logged", use_shm=False)
    assert status == 200
    assert call(front.port, "POST", "/generate", {"inputs": 5})[0] == 422
    assert eventually(lambda: len([r for r in caplog.records if r.name == "broker.http_front.access"]) >= 2)
    access = [r.getMessage() for r in caplog.records if r.name == "broker.http_front.access"]
    assert any(m.startswith("POST /generate 200 ") and " ms prompts=1 tokens=%d" % result["prompt_tokens"] in m
               for m in access), access
    assert any(m.startswith("POST /generate 422 ") for m in access), access
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "broker.http_front"]
    assert any("422" in r.getMessage() and "'inputs' must be a non-empty string" in r.getMessage()
               for r in refusals), [r.getMessage() for r in refusals]


def test_openapi_and_docs(front):
    status, schema, _ = call(front.port, "GET", "/openapi.json")
    assert status == 200
    assert schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/GenerateBody"}
    assert "inputs" in schema["components"]["schemas"]["GenerateBody"]["properties"]
    assert {"/health", "/liveness", "/readiness", "/metrics"} <= set(schema["paths"])
    with urllib.request.urlopen(f"http://127.0.0.1:{front.port}/docs", timeout=30) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()


@contextlib.contextmanager
def stalled_worker(url, queue):
    """A worker that serves `queue` as far as /health can tell (registered, heart-beating) but takes no job:
    requests to it stay in flight (as behind a worker busy with a long batch)."""
    loop = ServeLoop(url, queue, 1 << 20)
    loop.ensure_registered()
    try:
        yield loop
    finally:
        loop.unregister()


def test_graceful_shutdown_finishes_requests_in_flight(encoder_worker):
    """A request held (its worker takes nothing) when the front is told to stop still gets its answer (here the
    broker's timeout, 504), not a reset connection; new connections are refused meanwhile."""
    queue = "stalled-" + uuid.uuid4().hex[:6]
    with stalled_worker(encoder_worker["url"], queue):
        f = FrontThread(redis_url=encoder_worker["url"], queue=queue, timeout=3.0)
        t, held = hold_one_request(f, lambda: f.front.inflight == 1)
        stopping = threading.Thread(target=f.stop)
        stopping.start()
        assert eventually(lambda: not _answers(f.port))
        t.join(30)
        stopping.join(30)
    assert held["answer"][0] == 504, held


def read_response(f):
    """(status, headers, body) of one response read from a socket file."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def test_keep_alive_and_expect_continue(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=60) as s:
        f = s.makefile("rb")
        for _ in range(2):  # two requests on one connection
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(f)
            health = json.loads(body)
            assert status == 200 and headers.get("connection", "keep-alive") == "keep-alive"
            assert health["redis"] is True and health["queue"] == "encode" and health["live_workers"] >= 1
        body = json.dumps(lightx2v_payload(T2I_TEMPLATE.format("curl sends Expect"))).encode()
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                  % len(body))
        assert read_response(f)[0] == 100
        s.sendall(body)
        status, _, body = read_response(f)
        assert status == 200 and "hidden_states_base64" in json.loads(body)


def hold_one_request(f, until):
    """Sends one request to a front whose queue's worker takes nothing, in a thread; returns once `until()` holds."""
    held = {}
    t = threading.Thread(target=lambda: held.update(answer=generate(f.port, "held")))
    t.start()
    assert eventually(until, interval=0.02)
    return t, held


def test_overload_answers_429(encoder_worker):
    url = encoder_worker["url"]
    stalled = "stalled-" + uuid.uuid4().hex[:8]  # a queue whose worker takes nothing: requests stay in flight
    r = redis.Redis.from_url(url)
    with (stalled_worker(url, stalled), stalled_worker(url, stalled + "-q"),
          FrontThread(redis_url=url, queue=stalled, max_inflight=1, timeout=2.0) as by_inflight,
          FrontThread(redis_url=url, queue=stalled + "-q", max_queue_depth=1, timeout=2.0) as by_queue):
        t1, held1 = hold_one_request(by_inflight, lambda: by_inflight.front.inflight == 1)
        t2, held2 = hold_one_request(by_queue, lambda: r.llen(f"rq:queue:{stalled}-q") == 1)
        status, result, headers = generate(by_inflight.port, "x")
        assert status == 429 and "max_inflight" in result["message"] and headers["retry-after"] == "1"
        status, result, _ = generate(by_queue.port, "x")
        assert status == 429 and "queue" in result["message"], result
        t1.join(30)
        t2.join(30)
        for held in (held1, held2):  # nobody served them: the broker's timeout is the client's 504
            assert held["answer"][0] == 504, held


def test_health_is_503_unless_redis_and_a_live_worker_serve(encoder_worker):
    with FrontThread(redis_url=f"redis://127.0.0.1:{free_port()}/0", retries=0, timeout=5.0) as f:
        for path in ("/health", "/liveness", "/readiness"):
            status, health, _ = call(f.port, "GET", path)
            assert status == 503 and health["redis"] is False and "cannot reach Redis" in health["reason"], health
        status, result, _ = generate(f.port, "x")
        assert status == 503 and "cannot reach Redis" in result["message"], result
    with FrontThread(redis_url=encoder_worker["url"], queue="nobody-" + uuid.uuid4().hex[:6]) as g:
        status, health, _ = call(g.port, "GET", "/readiness")
        assert status == 503 and health["redis"] is True and "no live worker" in health["reason"], health


def test_generate_without_a_live_worker_is_refused_at_once_and_served_once_one_starts(tiny_dir, tmp_path):
    server = RedisServer().start()
    queue, prefix = "later-" + uuid.uuid4().hex[:6], "ebl" + uuid.uuid4().hex[:6]
    proc = None
    # The front would hold a request for 600 s (the HTTP call gives up after 60): only a refusal answers in time.
    try:
        with FrontThread(redis_url=server.url, queue=queue, timeout=600.0, worker_shm_prefix=prefix) as f:
            status, result, headers = generate(f.port, "nobody serves this")
            health = call(f.port, "GET", "/health")[1]
            assert status == 503 and result == {"message": health["reason"], "code": 503}, result
            assert health["reason"] == f"no live worker serves queue {queue!r}" and headers["retry-after"] == "1"
            assert redis.Redis.from_url(server.url).llen(f"rq:queue:{queue}") == 0  # refused, never queued
            assert metric(f.port, "encoder_broker_http_jobs_total", outcome="unavailable") == 1
            proc, log = start_worker(tmp_path, "later", model_dir=tiny_dir, backend="baseline", device="cpu",
                                     redis_url=server.url, queue=queue, max_prompt_tokens=TEST_MAX_PROMPT_TOKENS,
                                     shm_prefix=prefix)
            wait_for_workers(server.url, 1, proc, log, queue=queue)
            status, result, _ = generate(f.port, "a worker serves this", use_shm=False)
            assert status == 200 and "hidden_states_base64" in result, result
            # A Redis restarted empty has no worker until they register again: meanwhile a request is held, then
            # served, not refused.
            server.proc.kill()
            server.proc.wait()
            server.start()
            status, result, _ = generate(f.port, "served after a restart", use_shm=False)
            assert status == 200 and "hidden_states_base64" in result, result
    finally:
        if proc is not None:
            stop_process(proc)
        server.cleanup()


def test_metrics_count_jobs_by_outcome(front):
    before = metric(front.port, "encoder_broker_http_jobs_total", outcome="ok")
    refused = metric(front.port, "encoder_broker_http_jobs_total", outcome="refused")
    for text in ("one", "two"):
        assert generate(front.port, text)[0] == 200
    assert call(front.port, "POST", "/generate", {"inputs": ""})[0] == 422
    assert metric(front.port, "encoder_broker_http_jobs_total", outcome="ok") == before + 2
    assert metric(front.port, "encoder_broker_http_jobs_total", outcome="refused") == refused + 1
    assert metric(front.port, "encoder_broker_http_request_duration_seconds_count") >= 2
    assert metric(front.port, "encoder_broker_http_prompt_tokens_sum") > 0
    assert metric(front.port, "encoder_broker_queue_depth", queue="encode") == 0
    assert metric(front.port, "encoder_broker_http_requests_total", path="/generate", status="422") >= 1


def test_i2i_images_reach_the_encoder(front, baseline):
    from PIL import Image

    from workers.templates import I2I

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, format="BMP")  # LightX2V sends BMP
    image = buf.getvalue()
    prompt = "make it blue"
    status, result, _ = call(front.port, "POST", "/generate", lightx2v_payload(I2I.format(prompt, 1), [image]))
    assert status == 200, result
    (want,) = baseline.encode([prompt], task="i2i", images=[[image]])
    close(decode_answer(result, use_shm=False)[I2I_DROP_IDX:], want)
