"""The LightLLM-protocol HTTP front, driven the way LightX2V's lightllm_service client drives it, against a real
Redis and a real encoder worker; the front itself runs in this process on a free port (its own event loop)."""

import asyncio
import base64
import http.client
import inspect
import io
import json
import os
import socket
import threading
import time
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from broker.http_front import HttpFront, HttpFrontConfig
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import free_port, shm_names

# Qwen-Image's templates as LightX2V's configs carry them (prompt_template_encode / _start_idx): the client
# formats the prompt itself and slices the first drop_idx states off the answer.
T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
T2I_DROP_IDX = 34
I2I_DROP_IDX = 64
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FrontThread:
    """An HttpFront on a free port, serving from its own event loop in a background thread."""

    def __init__(self, **cfg):
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

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.front.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def front(encoder_worker):
    f = FrontThread(redis_url=encoder_worker["url"], queue="encode", max_body_bytes=1 << 20,
                    shm_prefix="ebh" + uuid.uuid4().hex[:6])
    yield f
    f.stop()


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


def lightx2v_payload(text, images=(), **extra):
    """The request LightX2V's LightLLMServiceTextEncoder._call_service sends (`extra`: our optional parameters)."""
    payload = {"inputs": text, "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1,
                                              **extra}}
    if images:
        payload["multimodal_params"] = {"images": [{"type": "base64", "data": base64.b64encode(b).decode()}
                                                   for b in images]}
    return payload


def decode_answer(result, use_shm, unlink=True):
    """[seq, hidden] states decoded as LightX2V's client decodes them: a uint8 [seq, hidden*itemsize] buffer
    (shared memory via multiprocessing.shared_memory, else base64) viewed as the states' dtype. LightX2V views
    as bfloat16 unconditionally; the CPU tiny worker runs float32, so the dtype comes from hidden_states_dtype."""
    if use_shm and "shm_hidden_states_name" in result:
        seg = shared_memory.SharedMemory(name=result["shm_hidden_states_name"])
        arr = np.ndarray(tuple(result["shm_hidden_states_shape"]), dtype=np.uint8, buffer=seg.buf).copy()
        seg.close()
        if unlink:
            seg.unlink()
    else:
        data = base64.b64decode(result["hidden_states_base64"])
        arr = np.frombuffer(data, dtype=np.uint8).reshape(result["hidden_states_shape"]).copy()
    return torch.from_numpy(arr).view(DTYPES[result["hidden_states_dtype"]])


def close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_base64_answer_is_the_baseline_encoding(front, baseline):
    prompt = "a red fox in snow"
    templated = T2I_TEMPLATE.format(prompt)
    status, result, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated))
    assert status == 200, result
    assert "shm_hidden_states_name" not in result  # nobody asked for shared memory
    full = decode_answer(result, use_shm=False)
    hidden = baseline.config.hidden_size
    assert result["hidden_states_shape"] == [full.shape[0], hidden * full.element_size()]  # LightLLM's uint8 shape
    assert result["prompt_tokens"] == full.shape[0]
    (want_full,) = baseline.encode_tokens(baseline.tokenize([templated], raw=True))
    close(full, want_full)
    (want,) = baseline.encode([prompt])
    close(full[T2I_DROP_IDX:], want)


def test_shm_answer_agrees_with_base64_and_reader_unlinks_it(front, baseline):
    templated = T2I_TEMPLATE.format("shared memory, please")
    _, by_b64, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated))
    status, by_shm, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated, use_shm=True))
    assert status == 200, by_shm
    assert "hidden_states_base64" not in by_shm  # no base64 computed when shared memory serves and none asked
    name = by_shm["shm_hidden_states_name"]
    assert shm_names(front.cfg.shm_prefix) == [name]
    assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    assert torch.equal(decode_answer(by_shm, use_shm=True), decode_answer(by_b64, use_shm=False))
    assert not os.path.exists(f"/dev/shm/{name}")  # read, then unlinked by the client

    # Both when asked; every answer gets its own segment, never one a client may still be reading.
    _, both, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated, use_shm=True, return_base64=True))
    _, again, _ = call(front.port, "POST", "/generate", lightx2v_payload(templated, use_shm=True))
    assert both["shm_hidden_states_name"] != again["shm_hidden_states_name"]
    assert torch.equal(decode_answer(both, use_shm=False), decode_answer(both, use_shm=True))
    assert torch.equal(decode_answer(again, use_shm=True), decode_answer(by_b64, use_shm=False))
    assert shm_names(front.cfg.shm_prefix) == []


def test_unread_segments_are_swept_after_expiry(encoder_worker):
    """An unmodified LightX2V client sends no shm flag: shm_default 'both' gives it both, as LightLLM does; the
    answer's segment, never read or unlinked, is gone once it expires."""
    f = FrontThread(redis_url=encoder_worker["url"], queue="encode", shm_default="both", shm_ttl_s=1.0,
                    sweep_interval_s=0.2, shm_prefix="ebs" + uuid.uuid4().hex[:6])
    try:
        status, result, _ = call(f.port, "POST", "/generate", lightx2v_payload(T2I_TEMPLATE.format("left unread")))
        assert status == 200 and "hidden_states_base64" in result, result
        name = result["shm_hidden_states_name"]
        assert shm_names(f.cfg.shm_prefix) == [name]
        deadline = time.time() + 20
        while shm_names(f.cfg.shm_prefix) and time.time() < deadline:
            time.sleep(0.1)
        assert shm_names(f.cfg.shm_prefix) == []
    finally:
        f.stop()


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not JSON"),
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

    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", str(2 << 20))  # refused from the header alone: the body is never read
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "max_body_bytes" in json.loads(r.read())["message"]
    conn.close()

    for head, status in [(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
                         (b"POST /generate HTTP/1.1\r\nHost: x\r\n\r\n", 411),
                         (b"NONSENSE\r\n\r\n", 400),
                         (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431)]:
        with socket.create_connection(("127.0.0.1", front.port), timeout=30) as s:
            s.sendall(head)
            assert read_response(s.makefile("rb"))[0] == status


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
            assert status == 200 and headers["connection"] == "keep-alive"
            assert health["redis"] is True and health["queue"] == "encode"
        body = json.dumps(lightx2v_payload(T2I_TEMPLATE.format("curl sends Expect"))).encode()
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                  % len(body))
        assert read_response(f)[0] == 100
        s.sendall(body)
        status, _, body = read_response(f)
        assert status == 200 and "hidden_states_base64" in json.loads(body)


def hold_one_request(f, until):
    """Sends one request to a front whose queue has no worker, in a thread; returns once `until()` holds."""
    held = {}
    t = threading.Thread(target=lambda: held.update(answer=call(f.port, "POST", "/generate",
                                                                 lightx2v_payload(T2I_TEMPLATE.format("held")))))
    t.start()
    deadline = time.time() + 20
    while not until() and time.time() < deadline:
        time.sleep(0.02)
    assert until()
    return t, held


def test_overload_answers_429(encoder_worker):
    import redis

    stalled = "stalled-" + uuid.uuid4().hex[:8]  # a queue no worker serves: requests stay in flight
    by_inflight = FrontThread(redis_url=encoder_worker["url"], queue=stalled, max_inflight=1, timeout=2.0)
    by_queue = FrontThread(redis_url=encoder_worker["url"], queue=stalled + "-q", max_queue_depth=1, timeout=2.0)
    r = redis.Redis.from_url(encoder_worker["url"])
    try:
        t1, held1 = hold_one_request(by_inflight, lambda: by_inflight.front.inflight == 1)
        t2, held2 = hold_one_request(by_queue, lambda: r.llen(f"rq:queue:{stalled}-q") == 1)
        status, result, headers = call(by_inflight.port, "POST", "/generate", lightx2v_payload("x"))
        assert status == 429 and "max_inflight" in result["message"] and headers["retry-after"] == "1"
        status, result, _ = call(by_queue.port, "POST", "/generate", lightx2v_payload("x"))
        assert status == 429 and "queue" in result["message"], result
        t1.join(30)
        t2.join(30)
        for held in (held1, held2):  # nobody served them: the broker's timeout is the client's 504
            assert held["answer"][0] == 504, held
    finally:
        by_inflight.stop()
        by_queue.stop()


def test_redis_down_is_503_and_health_says_so():
    f = FrontThread(redis_url=f"redis://127.0.0.1:{free_port()}/0", retries=0, timeout=5.0)
    try:
        status, health, _ = call(f.port, "GET", "/health")
        assert status == 200 and health["redis"] is False and health["status"] == "degraded"
        status, result, _ = call(f.port, "POST", "/generate", lightx2v_payload(T2I_TEMPLATE.format("x")))
        assert status == 503 and "cannot reach Redis" in result["message"], result
    finally:
        f.stop()


def encoders_take_images(encoder) -> bool:
    return "images" in inspect.signature(encoder.encode).parameters


def test_i2i_images_reach_the_encoder(front, baseline):
    if not encoders_take_images(baseline):
        pytest.skip("the encoders take no images yet (issue 5): their encode() has no 'images' parameter; "
                    "until then the worker refuses i2i jobs and the front answers 422 with its message")
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
