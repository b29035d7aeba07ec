"""LightLLM's /generate protocol in front of the broker, so LightX2V's `lightllm_service` text encoder works unchanged.

    python -m broker.http_front [--config configs/http.json] [--host H] [--port 8010] [--redis-url URL] ...

Every POST /generate becomes one raw (already templated) job on the broker queue, batched with the Python
clients' jobs; the answer carries every token's last-layer hidden state, as LightLLM's return-hidden-states
server does. The protocol, as LightX2V's client speaks it (ModelTC/LightX2V,
lightx2v/models/input_encoders/lightllm/qwen25_text_encoder_service.py and shm_client.py):

  request   POST {service_url}/generate  {"inputs": <prompt already in Qwen-Image's template>,
            "parameters": {"do_sample": false, "return_details": true, "max_new_tokens": 1},
            "multimodal_params": {"images": [{"type": "base64", "data": <b64 image>}, ...]}}   (images: i2i only)
  answer    "hidden_states_base64" + "hidden_states_shape": the raw bytes, shape [seq, hidden * itemsize] uint8;
            the client does np.frombuffer(uint8).reshape(shape), then .view(torch.bfloat16) -> [seq, hidden],
            then drops the template's first drop_idx tokens itself.  Or, same host and `use_shm`:
            "shm_hidden_states_name" + "shm_hidden_states_shape", read with
            multiprocessing.shared_memory.SharedMemory(name=...) (which adds the leading "/") as a uint8 array.
  health    GET {service_url}/health -> 200.

The client sends no shared-memory flag (LightLLM's `return_hiddens` branch decides on its side, and its client
falls back to base64 when both come). Here a request chooses with `parameters.use_shm` (true/false), and may add
`parameters.return_base64: true` to get base64 as well; a request that says nothing gets `shm_default`
(off: base64 only; shm: shared memory only, for unmodified clients with use_shm true; both: what LightLLM sends).
Shared memory is used only for a client on this host (its address is loopback or the address it connected to).
Extra field: "hidden_states_dtype" (the worker's dtype: bfloat16 on a GPU, float32 on the CPU tiny default;
LightX2V's client assumes bfloat16). Each shm answer gets a fresh segment of its own (exclusive, 0600) that no
later request touches; the reader unlinks it, and the front's sweeper removes it after shm_ttl_s otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import signal
from dataclasses import dataclass, fields, replace

import torch

from broker.client import EncoderClient
from broker.config import DEFAULT_REDIS_URL, load_json, redis_url_from_env, take_known
from broker.connections import redacted
from broker.enqueue import queue_key
from broker.errors import (BrokerTimeout, BrokerUnavailable, EncodeFailed, InvalidRequest, Overloaded,
                           ResultLost)
from broker.http_server import HttpError, HttpServer, Request, Response, error_response, json_response
from broker.queues import DEFAULT_QUEUE
from broker.results import TORCH_DTYPES
from shm.names import check_prefix

log = logging.getLogger("broker.http_front")

SHM_DEFAULTS = ("off", "shm", "both")
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
REQUEST_ERRORS = ("InvalidRequest", "PromptTooLong")  # worker-side failures the request itself caused


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
    max_queue_depth: int = 0  # queue length past which new jobs are refused (429); 0: EncoderClient's default
    shm_default: str = "off"  # when a request doesn't set parameters.use_shm: off | shm | both
    shm_ttl_s: float = 30.0  # an unread answer segment is swept after this long
    shm_prefix: str = "eb"
    shm_max_bytes: int | None = None  # budget for this front's live segments (beyond it: base64)
    sweep_interval_s: float = 5.0
    log_level: str = "INFO"

    def __post_init__(self):
        if self.shm_default not in SHM_DEFAULTS:
            raise ValueError(f"shm_default must be one of {', '.join(SHM_DEFAULTS)}, not {self.shm_default!r}")
        for name in ("max_body_bytes", "max_inflight", "timeout", "shm_ttl_s", "sweep_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_queue_depth < 0 or self.retries < 0 or not 0 <= self.port < 65536:
            raise ValueError("max_queue_depth and retries must be >= 0, port in [0, 65535]")
        check_prefix(self.shm_prefix)

    @classmethod
    def from_json(cls, path: str) -> "HttpFrontConfig":
        raw = load_json(path)
        cfg = cls(**take_known(cls, raw, path))
        if "redis_url" not in raw:
            cfg.redis_url = redis_url_from_env(cfg.redis_url)
        return cfg


@dataclass(slots=True)
class GenerateCall:
    """One /generate request, checked."""

    inputs: str
    images: list  # decoded image bytes (i2i)
    use_shm: bool | None  # None: the request didn't say
    return_base64: bool


def parse_generate(body: bytes) -> GenerateCall:
    try:
        d = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"body is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise HttpError(422, f"body must be a JSON object, got {type(d).__name__}")
    if "inputs" not in d:
        raise HttpError(422, "body has no 'inputs': send the prompt already formatted with the model's template")
    inputs = d["inputs"]
    if not isinstance(inputs, str) or not inputs:
        raise HttpError(422, f"'inputs' must be a non-empty string, got {type(inputs).__name__} {str(inputs)[:40]!r}")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpError(422, "'parameters' must be a JSON object")
    use_shm, return_b64 = params.get("use_shm"), params.get("return_base64", False)
    if (use_shm is not None and not isinstance(use_shm, bool)) or not isinstance(return_b64, bool):
        raise HttpError(422, "'parameters.use_shm' and 'parameters.return_base64' must be true or false")
    mm = d.get("multimodal_params") or {}
    items = (mm.get("images") or []) if isinstance(mm, dict) else None
    if not isinstance(items, list):
        raise HttpError(422, "'multimodal_params' must be an object whose 'images' is a list")
    return GenerateCall(inputs, [decode_image(i, item) for i, item in enumerate(items)], use_shm, return_b64)


def decode_image(i: int, item) -> bytes:
    """LightLLM's ImageItem: {"type": "base64", "data": <b64>}; URLs are refused (the front fetches nothing)."""
    where = f"multimodal_params.images[{i}]"
    if not isinstance(item, dict) or item.get("type") != "base64" or not isinstance(item.get("data"), str):
        raise HttpError(422, f"{where} must be {{\"type\": \"base64\", \"data\": <base64 image>}}; "
                             "only base64 images are supported")
    try:
        data = base64.b64decode("".join(item["data"].split()), validate=True)  # line breaks allowed, nothing else
    except (binascii.Error, ValueError) as e:
        raise HttpError(400, f"{where}.data is not valid base64: {e}") from None
    if not data:
        raise HttpError(400, f"{where}.data is empty")
    return data


def same_host(req: Request) -> bool:
    """Whether the client can open this host's /dev/shm: it came over loopback or to our own address."""
    if not req.peer or not req.local:
        return False
    try:
        return ipaddress.ip_address(req.peer[0]).is_loopback or req.peer[0] == req.local[0]
    except ValueError:
        return False


def failure_status(message: str) -> int:
    """A worker's failure caused by the request (too long, malformed, images refused) is the client's 422."""
    return 422 if message.split(":", 1)[0].strip() in REQUEST_ERRORS else 500


class HttpFront:
    """The LightLLM-protocol front: routing, admission, one shared EncoderClient, answer encoding, shm sweeping."""

    def __init__(self, cfg: HttpFrontConfig):
        self.cfg = cfg
        self.client = EncoderClient(cfg.redis_url, cfg.queue, timeout=cfg.timeout, retries=cfg.retries,
                                    transport="shm", max_queue_depth=cfg.max_queue_depth, copy=False)
        self.server = HttpServer(self.handle, cfg.max_body_bytes)
        self.inflight = 0
        self.port: int | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> int:
        self.port = await self.server.start(self.cfg.host, self.cfg.port)
        self._sweeper = asyncio.create_task(self._sweep_loop())
        log.info("LightLLM-protocol front on http://%s:%d -> queue %r at %s", self.cfg.host, self.port,
                 self.cfg.queue, redacted(self.cfg.redis_url))
        return self.port

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.server.close()
        await self.client.aclose()
        self.client.close()

    async def handle(self, req: Request) -> Response:
        routes = {"/generate": ("POST",), "/health": ("GET", "HEAD")}
        allowed = routes.get(req.path)
        if allowed is None:
            raise HttpError(404, f"no route {req.path!r}: this server answers POST /generate and GET /health")
        if req.method not in allowed:
            raise HttpError(405, f"{req.path} takes {' or '.join(allowed)}, not {req.method}",
                            headers={"Allow": ", ".join(allowed)})
        return await (self.generate(req) if req.path == "/generate" else self.health())

    async def health(self) -> Response:
        redis_ok, depth, error = False, None, None
        try:
            aredis = self.client.wire.aredis
            redis_ok = bool(await asyncio.wait_for(aredis.ping(), 2.0))
            depth = await asyncio.wait_for(aredis.llen(queue_key(self.cfg.queue)), 2.0)
        except Exception as e:  # any failure to answer means "Redis does not answer"
            error = f"{type(e).__name__}: {str(e) or 'no answer within 2 s'}"
        body = {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "queue": self.cfg.queue,
                "queue_depth": depth, "inflight": self.inflight, "max_inflight": self.cfg.max_inflight}
        if error:
            body["redis_error"] = error
        return json_response(200, body)

    async def generate(self, req: Request) -> Response:
        call = parse_generate(req.body)
        if self.inflight >= self.cfg.max_inflight:
            return error_response(429, f"{self.inflight} requests in flight, the front's max_inflight: "
                                       "retry later", {"Retry-After": "1"})
        self.inflight += 1
        try:
            task = "i2i" if call.images else "t2i"
            images = [call.images] if call.images else None  # one prompt: its list of images
            (states,) = await self.client.aencode([call.inputs], task=task, images=images, raw=True)
        except Overloaded as e:
            return error_response(429, f"overloaded: {e}", {"Retry-After": "1"})
        except InvalidRequest as e:
            return error_response(422, str(e))
        except EncodeFailed as e:
            return error_response(failure_status(str(e)), f"encoder worker refused the request: {e}")
        except BrokerTimeout as e:
            return error_response(504, str(e))
        except BrokerUnavailable as e:
            return error_response(503, str(e))
        except ResultLost as e:
            return error_response(500, str(e))
        finally:
            self.inflight -= 1
        asked = call.use_shm
        mode = self.cfg.shm_default if asked is None else ("shm" if asked else "off")
        use_shm = mode != "off" and same_host(req)
        want_b64 = not use_shm or call.return_base64 or (asked is None and mode == "both")
        return json_response(200, self.answer(states, use_shm, want_b64))

    def answer(self, states: torch.Tensor, use_shm: bool, want_b64: bool) -> dict:
        # states: [seq, hidden] in the worker's dtype -> u8: [seq, hidden * itemsize], LightLLM's wire shape
        u8 = states.contiguous().view(torch.uint8)
        shape = list(u8.shape)
        out = {"generated_text": [""], "prompt_tokens": shape[0], "hidden_states_dtype": DTYPE_NAMES[states.dtype],
               "hidden_states_shape": shape}
        if use_shm:
            seg = self._segment(u8)
            if seg is None:
                want_b64 = True
            else:
                out.update(shm_hidden_states_name=seg.name.lstrip("/"), shm_hidden_states_shape=shape,
                           shm_hidden_states_expires_at=self._expiry(seg.name))
        if want_b64:
            out["hidden_states_base64"] = base64.b64encode(u8.numpy()).decode("ascii")
        return out

    def _segment(self, u8: torch.Tensor):
        """A fresh segment holding `u8`, closed (the name stays until the reader or the sweeper unlinks it)."""
        from shm import ShmError, create_segment

        try:
            seg = create_segment(u8.numel(), self.cfg.shm_ttl_s, self.cfg.shm_prefix,
                                 max_total_bytes=self.cfg.shm_max_bytes)
        except ShmError as e:
            log.warning("no shared memory for this answer (%s); sending base64 instead", e)
            return None
        try:
            seg.write(0, u8)
        except BaseException:
            seg.unlink()
            raise
        finally:
            seg.close()
        return seg

    @staticmethod
    def _expiry(name: str) -> float:
        from shm import SegmentName

        return SegmentName.parse(name).expires_at_ms / 1000

    async def _sweep_loop(self) -> None:
        from shm import sweep

        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
            try:
                removed = await asyncio.to_thread(sweep, self.cfg.shm_prefix, grace_s=10.0)
                if removed:
                    log.info("swept %d unread or orphaned segment(s)", len(removed))
            except Exception:
                log.exception("segment sweep failed")


async def serve(cfg: HttpFrontConfig) -> None:
    front = HttpFront(cfg)
    await front.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing requests in flight")
    await front.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m broker.http_front", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="JSON file with any of the keys below (command-line flags win)")
    for f in fields(HttpFrontConfig):
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       choices=SHM_DEFAULTS if f.name == "shm_default" else None)
    args = p.parse_args(argv)
    cfg = HttpFrontConfig.from_json(args.config) if args.config else HttpFrontConfig(redis_url=redis_url_from_env())
    cfg = replace(cfg, **{f.name: getattr(args, f.name) for f in fields(cfg) if getattr(args, f.name) is not None})
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
