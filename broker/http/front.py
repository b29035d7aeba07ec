"""LightLLM's /generate protocol in front of the broker, so LightX2V's `lightllm_service` text encoder works unchanged.

    python -m broker.http [--config configs/http.json] [--host H] [--port 8010] [--redis-url URL] ...

FastAPI under uvicorn. Every POST /generate becomes one raw (already templated) job on the broker queue,
batched with the Python clients' jobs; the answer carries every token's last-layer hidden state as bfloat16
bytes, as LightLLM's return-hidden-states server does (the protocol: broker.http.lightllm). Also: GET /health,
/liveness, /readiness (200 only while Redis answers and a live worker serves the queue, else 503), /metrics
(Prometheus), /docs (OpenAPI). While Redis answers and no live worker serves the queue, /generate is refused at
once with 503 and /health's reason (the front looks in the background, SERVING_CHECK_S, so a served request pays
no extra round trip), rather than held until its timeout.

Shared memory: a request chooses with `parameters.use_shm` (and `parameters.return_base64` to add base64); one
that says nothing gets `shm_default`. LightX2V never says (its `use_shm` only decides what it reads), so the default
is `off`: base64 alone, no segment written for a reader that may never open it, none held in /dev/shm, no resource
tracker warnings in the reader's process. `both` (LightLLM's answer: base64 and a segment) saves same-host readers
with `use_shm` the base64 work. Only a client on this host gets a segment (its address is loopback or the one it
connected to). Segments live shm_ttl_s, within shm_max_bytes (broker.http.answer_segments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, fields

import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.http.answer_segments import AnswerSegments
from broker.client import EncoderClient
from broker.protocol.config import DEFAULT_REDIS_URL, from_json_file
from broker.protocol.connections import redacted, unreachable
from broker.errors import (BrokerError, BrokerTimeout, BrokerUnavailable, EncodeFailed, InvalidRequest, Overloaded,
                           ProtocolError, RedisRefused, ResultLost)
from broker.http.metrics import FrontMetrics
from broker.http.serving import AccessLog, TimedH11Protocol, listen
from broker.http.lightllm import (GenerateAnswer, GenerateBody, HttpError, answer_fields, base64_field, failure_status,
                             parse_generate, shm_fields, wire_bytes)
from broker.protocol.queues import DEFAULT_QUEUE
from shm.names import check_prefix

log = logging.getLogger("broker.http_front")

SHM_DEFAULTS = ("off", "shm", "both")
ROUTES = ("/generate", "/health", "/liveness", "/readiness", "/metrics", "/docs", "/openapi.json")
HEALTH_TIMEOUT_S = 2.0
SERVING_CHECK_S = 0.5  # how often the front looks whether a live worker serves its queue (HttpFront._watch_serving)
ORPHAN_SWEEP_EVERY = 5  # sweep intervals between scans of /dev/shm for dead creators' segments


@dataclass(slots=True)
class HttpFrontConfig:
    host: str = "127.0.0.1"
    port: int = 8010
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    timeout: float = 30.0  # seconds per request, end to end (queueing + encoding)
    retries: int = 3  # re-runs of a job whose worker died; Redis connection retries
    max_body_bytes: int = 16 << 20
    max_inflight: int = 256  # /generate requests held at once; past it: 429
    max_queue_depth: int = 0  # queue length past which new jobs are refused (429); 0: the workers' bound
    client_timeout_s: float = 10.0  # a request's head, and then its body, must arrive within this long
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this long
    shutdown_grace_s: float = 10.0  # on SIGTERM/SIGINT, requests in flight get this long to finish
    shm_default: str = "off"  # when a request doesn't set parameters.use_shm (LightX2V never does): off | shm | both
    shm_ttl_s: float = 10.0  # an answer's segment is unlinked this long after it is written
    shm_prefix: str = "eb"  # of the front's answer segments
    worker_shm_prefix: str | None = None  # the encoder workers' shm_prefix (None: $EB_SHM_PREFIX, else "eb")
    shm_max_bytes: int = 256 << 20  # the front's live answer segments; past it answers go as base64 (0: no shm)
    sweep_interval_s: float = 1.0
    worker_stale_s: float = 15.0  # a worker whose RQ heartbeat is older than this does not count as serving
    log_level: str = "INFO"

    def __post_init__(self):
        if self.shm_default not in SHM_DEFAULTS:
            raise ValueError(f"shm_default must be one of {', '.join(SHM_DEFAULTS)}, not {self.shm_default!r}")
        for name in ("max_body_bytes", "max_inflight", "timeout", "shm_ttl_s", "sweep_interval_s",
                     "client_timeout_s", "keep_alive_s", "worker_stale_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if min(self.max_queue_depth, self.retries, self.shm_max_bytes, self.shutdown_grace_s) < 0 \
                or not 0 <= self.port < 65536:
            raise ValueError("max_queue_depth, retries, shm_max_bytes and shutdown_grace_s must be >= 0, "
                             "port in [0, 65535]")
        check_prefix(self.shm_prefix)
        if self.worker_shm_prefix is not None:
            check_prefix(self.worker_shm_prefix)

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "HttpFrontConfig":
        """From `path` (or defaults), then EB_<KEY> environment variables, then the non-None `overrides`."""
        return from_json_file(cls, path, **overrides)


def same_host(request: Request) -> bool:
    """Whether the client can open this host's /dev/shm: it came over loopback or to our own address."""
    peer, local = request.client, request.scope.get("server")
    if not peer or not local:
        return False
    try:
        return ipaddress.ip_address(peer.host).is_loopback or peer.host == local[0]
    except ValueError:
        return False


def error_response(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    log.warning("%s %s refused with %d: %s", request.method, request.url.path, status, message)
    return JSONResponse({"message": message, "code": status}, status, headers=headers)


class HttpFront:
    """The LightLLM-protocol front: routes, admission, one shared EncoderClient, answers, answer segments."""

    def __init__(self, cfg: HttpFrontConfig):
        self.cfg = cfg
        self.client = EncoderClient(cfg.redis_url, cfg.queue, timeout=cfg.timeout, retries=cfg.retries,
                                    transport="shm", max_queue_depth=cfg.max_queue_depth, copy=False,
                                    shm_prefix=cfg.worker_shm_prefix)
        self.inflight = 0
        self._depth = float("nan")  # the queue's length at the last scrape
        self.metrics = FrontMetrics(cfg.queue, lambda: self._depth, lambda: self.segments)
        self.segments = AnswerSegments(cfg.shm_ttl_s, cfg.shm_prefix, cfg.shm_max_bytes,
                                       lambda reason: self.metrics.shm_refused.labels(reason).inc())
        self.app = self._build_app()
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        # /health's reason while Redis answers and no live worker serves the queue (then /generate is refused at
        # once), else None; kept fresh by _watch_serving.
        self._no_worker: str | None = None
        self._redis_run_id: str | None = None  # the Redis last looked at, and when another one took its place
        self._redis_changed_at = float("-inf")

    # -- serving -----------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Serves in a task of the running loop; returns the port (useful with port 0)."""
        sock = listen(self.cfg.host, self.cfg.port)
        self.port = sock.getsockname()[1]
        protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"head_timeout_s": self.cfg.client_timeout_s})
        config = uvicorn.Config(self.app, http=protocol, lifespan="on", access_log=False, log_config=None,
                                timeout_keep_alive=self.cfg.keep_alive_s,
                                timeout_graceful_shutdown=self.cfg.shutdown_grace_s)
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("LightLLM-protocol front on http://%s:%d -> queue %r at %s (shm %s, answers' segments %.0f s, "
                 "budget %d bytes)", self.cfg.host, self.port, self.cfg.queue, redacted(self.cfg.redis_url),
                 self.cfg.shm_default, self.cfg.shm_ttl_s, self.cfg.shm_max_bytes)
        return self.port

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        """uvicorn runs this around serving: on a signal it stops accepting, lets requests in flight finish
        (shutdown_grace_s), then leaves this, before it re-raises the signal."""
        self.segments.sweep_orphans()  # what a front killed before us left behind
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self._watcher = asyncio.create_task(self._watch_serving())
        try:
            yield
        finally:
            log.info("stopping: unlinking %d answer segment(s), closing connections", self.segments.live)
            self._sweeper.cancel()
            self._watcher.cancel()
            self.segments.close()
            await self.client.aclose()
            self.client.close()

    async def wait(self) -> None:
        """Until the server stops (uvicorn's signal handlers stop it when this runs in the main thread)."""
        await self._serving

    async def close(self) -> None:
        """Stops accepting, lets requests in flight finish (shutdown_grace_s), then releases everything."""
        if self._server is not None:
            self._server.should_exit = True
            await self._serving
            self._server = None

    async def _sweep_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
            n += 1
            try:
                self.segments.expire()
                if n % ORPHAN_SWEEP_EVERY == 0:
                    removed = await asyncio.to_thread(self.segments.sweep_orphans)
                    if removed:
                        log.info("swept %d expired or orphaned segment(s)", len(removed))
            except Exception:
                log.exception("segment sweep failed")

    # -- routes ------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="encoder-broker HTTP front", version="1", lifespan=self.lifespan,
                      description="LightLLM's /generate protocol (hidden states of Qwen2.5-VL's last layer) in "
                                  "front of the encoder-broker queue.")

        @app.exception_handler(HttpError)
        async def http_error(request: Request, e: HttpError):
            return error_response(request, e.status, e.message, e.headers)

        @app.exception_handler(StarletteHTTPException)
        async def starlette_error(request: Request, e: StarletteHTTPException):
            message = {404: f"no route {request.url.path!r}: this server answers POST /generate, GET /health, "
                            "/liveness, /readiness, /metrics and /docs",
                       405: f"{request.url.path} takes {(e.headers or {}).get('Allow', '')}, not "
                            f"{request.method}"}.get(e.status_code, str(e.detail))
            return error_response(request, e.status_code, message, e.headers)

        @app.post("/generate", response_model=GenerateAnswer, summary="encode one templated prompt",
                  openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                      "schema": {"$ref": "#/components/schemas/GenerateBody"}}}}})
        async def generate(request: Request):
            return await self.generate(request)

        for path in ("/health", "/liveness", "/readiness"):
            app.add_api_route(path, self.health, methods=["GET"], operation_id=path.strip("/"),
                              summary="200 while Redis answers and a live worker serves the queue, else 503")
            app.add_api_route(path, self.health, methods=["HEAD"], include_in_schema=False)

        @app.get("/metrics", summary="Prometheus metrics")
        async def metrics():
            self._depth = await self._queue_depth()
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        def openapi():
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                body = GenerateBody.model_json_schema(ref_template="#/components/schemas/{model}")
                components = schema.setdefault("components", {}).setdefault("schemas", {})
                components.update(body.pop("$defs", {}))
                components["GenerateBody"] = body
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi
        return AccessLog(app, self.metrics.requests, ROUTES)

    async def _queue_depth(self) -> float:
        try:
            return await asyncio.wait_for(self.client.aqueue_depth(), HEALTH_TIMEOUT_S)
        except Exception:  # Redis down: the gauge says NaN rather than a stale figure
            return float("nan")

    async def health(self, request: Request):
        """LightLLM's health routes, all three: 503 unless Redis answers and a live worker serves the queue."""
        body = {"queue": self.cfg.queue, "inflight": self.inflight, "max_inflight": self.cfg.max_inflight,
                **await self._check_serving()}
        ok = "reason" not in body
        body["status"] = "ok" if ok else "unavailable"
        if not ok:
            log.warning("%s %s: 503: %s", request.method, request.url.path, body["reason"])
        return JSONResponse(body, 200 if ok else 503)

    async def _check_serving(self) -> dict:
        """What /health tells: whether Redis answers, the queue's depth and live workers, and a `reason` when the
        front can't serve. Notes in _no_worker whether to refuse /generate at once: only while Redis answers and no
        live worker serves the queue. Not while Redis is out of reach (the client rides out a restart), nor for
        worker_stale_s after another Redis took its place (restarted empty, a replica promoted): its workers
        register again within a heartbeat, and a request held meanwhile is served."""
        body = {"redis": False, "queue_depth": None, "live_workers": 0}
        try:
            state = await asyncio.wait_for(self.client.aqueue_state(self.cfg.worker_stale_s), HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure to answer means "Redis does not answer"
            if not str(e):
                body["reason"] = f"cannot reach Redis at {redacted(self.cfg.redis_url)}: no answer within " \
                                 f"{HEALTH_TIMEOUT_S} s"
            else:
                body["reason"] = str(e) if isinstance(e, BrokerError) else unreachable(self.cfg.redis_url, e)
            self._no_worker = None
            return body
        body.update(redis=True, queue_depth=state.depth, live_workers=state.live_workers)
        now = time.monotonic()
        if self._redis_run_id not in (None, state.redis_run_id):
            self._redis_changed_at = now
        self._redis_run_id = state.redis_run_id
        if not state.live_workers:
            body["reason"] = f"no live worker serves queue {self.cfg.queue!r}"
        settled = now - self._redis_changed_at >= self.cfg.worker_stale_s
        self._no_worker = body.get("reason") if settled else None
        return body

    async def _watch_serving(self) -> None:
        while True:
            await self._check_serving()
            await asyncio.sleep(SERVING_CHECK_S)

    async def _no_live_worker(self) -> str | None:
        """/health's reason if no live worker serves the queue now, else None. Free while one does; while none
        did at the last look, looked at again, so a worker that has just started serves this request."""
        if self._no_worker is None:
            return None
        await self._check_serving()
        return self._no_worker

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused from the header alone: the body is never read
            raise HttpError(413, f"request body of {declared} bytes is over this server's limit of {limit} bytes "
                                 "(max_body_bytes)")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"request body over this server's limit of {limit} bytes (max_body_bytes)")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.cfg.client_timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {self.cfg.client_timeout_s} s "
                                 "(client_timeout_s)") from None
        return b"".join(chunks)

    async def generate(self, request: Request) -> Response:
        outcome = "refused"
        try:
            call = parse_generate(await self._read_body(request))
            if self.inflight >= self.cfg.max_inflight:
                outcome = "overloaded"
                raise HttpError(429, f"{self.inflight} requests in flight, the front's max_inflight: retry later",
                                {"Retry-After": "1"})
            if (reason := await self._no_live_worker()) is not None:
                outcome = "unavailable"
                raise HttpError(503, reason, {"Retry-After": "1"})
            outcome, states = await self._encode(call)
        except _Refusal as e:
            outcome = e.outcome
            raise
        finally:
            if outcome != "ok":
                self.metrics.jobs.labels(outcome).inc()
        u8 = wire_bytes(states)
        request.state.prompts, request.state.tokens = 1, u8.shape[0]
        asked = call.use_shm
        mode = self.cfg.shm_default if asked is None else ("shm" if asked else "off")
        use_shm = mode != "off" and self.cfg.shm_max_bytes > 0 and same_host(request)
        want_b64 = not use_shm or call.return_base64 or (asked is None and mode == "both")
        out = answer_fields(u8)
        if use_shm:
            seg = self.segments.write(u8.numpy())
            if seg is None:
                want_b64 = True
            else:
                out.update(shm_fields(*seg, u8))
        if want_b64:
            out.update(base64_field(u8))
        transport = "both" if want_b64 and "shm_hidden_states_name" in out else ("base64" if want_b64 else "shm")
        self.metrics.results.labels(transport).inc()
        self.metrics.jobs.labels("ok").inc()
        self.metrics.prompts.inc()
        self.metrics.tokens.observe(u8.shape[0])
        return Response(json.dumps(out), media_type="application/json")

    async def _encode(self, call):
        """("ok", states [seq, hidden] in the worker's dtype), or an HttpError saying why not."""
        self.inflight += 1
        t0 = time.perf_counter()
        try:
            task = "i2i" if call.images else "t2i"
            images = [call.images] if call.images else None  # one prompt: its list of images
            (states,) = await self.client.aencode([call.inputs], task=task, images=images, raw=True)
            self.metrics.latency.observe(time.perf_counter() - t0)
            return "ok", states
        except Overloaded as e:
            raise _Refusal("overloaded", 429, f"overloaded: {e}", {"Retry-After": "1"}) from None
        except InvalidRequest as e:
            raise _Refusal("refused", 422, str(e)) from None
        except EncodeFailed as e:
            status = failure_status(str(e))
            raise _Refusal("refused" if status == 422 else "failed", status,
                           f"encoder worker refused the request: {e}") from None
        except BrokerTimeout as e:
            raise _Refusal("timeout", 504, str(e)) from None
        except (BrokerUnavailable, RedisRefused) as e:
            raise _Refusal("unavailable", 503, str(e)) from None
        except (ResultLost, ProtocolError) as e:  # the worker's answer (or what stands for it) could not be read
            raise _Refusal("failed", 502, f"the encoder's result could not be read: {e}") from None
        except BrokerError as e:
            raise _Refusal("failed", 500, f"{type(e).__name__}: {e}") from None
        except Exception as e:  # a bug: logged with its traceback, answered in JSON as every failure is
            log.exception("POST /generate failed")
            raise _Refusal("failed", 500, f"internal error: {type(e).__name__}: {e}") from None
        finally:
            self.inflight -= 1


class _Refusal(HttpError):
    """An HttpError for a request the broker did not answer, with its outcome's metric label."""

    def __init__(self, outcome: str, status: int, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.outcome = outcome


async def serve(cfg: HttpFrontConfig) -> None:
    front = HttpFront(cfg)
    await front.start()
    await front.wait()  # until SIGINT/SIGTERM (see HttpFront.lifespan)


def main(argv=None, prog: str = "python -m broker.http") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="JSON file with any of the keys below (then EB_<KEY> variables, then flags)")
    for f in fields(HttpFrontConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       choices=SHM_DEFAULTS if f.name == "shm_default" else None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = HttpFrontConfig.load(args.config, **{f.name: getattr(args, f.name) for f in fields(HttpFrontConfig)})
    logging.getLogger().setLevel(cfg.log_level)
    try:
        asyncio.run(serve(cfg))
    except ValueError as e:  # a taken port, a bad setting: one line, no traceback
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: uvicorn raises SIGINT again once it has stopped gracefully
        pass
    # Stopped: connections closed, segments unlinked. Skip the interpreter's finalization of torch's modules
    # (seconds), as the workers do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
