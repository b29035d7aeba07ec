"""LightLLM's /generate protocol in front of the broker, so LightX2V's `lightllm_service` text encoder works unchanged.

    python -m broker.http [--config configs/http.json] [--host H] [--port 8010] [--redis-url URL] ...

FastAPI under uvicorn. Every POST /generate becomes one raw (already templated) job on the broker queue,
batched with the Python clients' jobs; the answer carries every token's last-layer hidden state as bfloat16
bytes, as LightLLM's return-hidden-states server does (the protocol: broker.http.lightllm; the route:
broker.http.generate). Also: GET /health, /liveness, /readiness (200 only while Redis answers and a live worker
serves the queue, else 503: broker.http.readiness), /metrics (Prometheus), /docs (OpenAPI). Settings:
broker.http.config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import fields

import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.client import EncoderClient
from broker.http.answer_segments import AnswerSegments
from broker.http.config import SHM_DEFAULTS, HttpFrontConfig
from broker.http.generate import Generate
from broker.http.lightllm import GenerateAnswer, GenerateBody, HttpError
from broker.http.metrics import FrontMetrics
from broker.http.readiness import HEALTH_TIMEOUT_S, Readiness
from broker.http.serving import AccessLog, TimedH11Protocol, listen
from broker.protocol.connections import redacted

__all__ = ["HttpFront", "HttpFrontConfig", "main", "serve"]

log = logging.getLogger("broker.http_front")

ROUTES = ("/generate", "/health", "/liveness", "/readiness", "/metrics", "/docs", "/openapi.json")
ORPHAN_SWEEP_EVERY = 5  # sweep intervals between scans of /dev/shm for dead creators' segments


def error_response(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    log.warning("%s %s refused with %d: %s", request.method, request.url.path, status, message)
    return JSONResponse({"message": message, "code": status}, status, headers=headers)


class HttpFront:
    """The LightLLM-protocol front: the server, its routes and background tasks around one shared EncoderClient
    (the /generate route: broker.http.generate; whether the queue is served: broker.http.readiness)."""

    def __init__(self, cfg: HttpFrontConfig):
        self.cfg = cfg
        self.client = EncoderClient(cfg.redis_url, cfg.queue, timeout=cfg.timeout, retries=cfg.retries,
                                    transport="shm", max_queue_depth=cfg.max_queue_depth, copy=False,
                                    shm_prefix=cfg.worker_shm_prefix)
        self._depth = float("nan")  # the queue's length at the last scrape
        self.metrics = FrontMetrics(cfg.queue, lambda: self._depth, lambda: self.segments)
        self.segments = AnswerSegments(cfg.shm_ttl_s, cfg.shm_prefix, cfg.shm_max_bytes,
                                       lambda reason: self.metrics.shm_refused.labels(reason).inc())
        self.readiness = Readiness(self.client, cfg)
        self.generate = Generate(cfg, self.client, self.readiness, self.metrics, self.segments)
        self.app = self._build_app()
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def inflight(self) -> int:
        """/generate requests held now."""
        return self.generate.inflight

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
        self._watcher = asyncio.create_task(self.readiness.watch())
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
                **await self.readiness.check()}
        ok = "reason" not in body
        body["status"] = "ok" if ok else "unavailable"
        if not ok:
            log.warning("%s %s: 503: %s", request.method, request.url.path, body["reason"])
        return JSONResponse(body, 200 if ok else 503)


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
