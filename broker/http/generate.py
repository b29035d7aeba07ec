"""POST /generate: LightLLM's request read within the front's limits, admitted (max_inflight, a live worker),
encoded through the front's EncoderClient as one raw (already templated) job, and answered with the hidden
states as base64, an answer segment, or both (broker.http.lightllm).

Shared memory: a request chooses with `parameters.use_shm` (and `parameters.return_base64` to add base64); one
that says nothing gets `shm_default`. LightX2V never says (its `use_shm` only decides what it reads), so the default
is `off`: base64 alone, no segment written for a reader that may never open it, none held in /dev/shm, no resource
tracker warnings in the reader's process. `both` (LightLLM's answer: base64 and a segment) saves same-host readers
with `use_shm` the base64 work. Only a client on this host gets a segment (its address is loopback or the one it
connected to). Segments live shm_ttl_s, within shm_max_bytes (broker.http.answer_segments).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time

from fastapi import Request
from fastapi.responses import Response

from broker.client import EncoderClient
from broker.errors import (BrokerError, BrokerTimeout, BrokerUnavailable, EncodeFailed, InvalidRequest, Overloaded,
                           ProtocolError, RedisRefused, ResultLost)
from broker.http.answer_segments import AnswerSegments
from broker.http.config import HttpFrontConfig
from broker.http.lightllm import (HttpError, answer_fields, base64_field, failure_status, parse_generate, shm_fields,
                                  wire_bytes)
from broker.http.metrics import FrontMetrics
from broker.http.readiness import Readiness

log = logging.getLogger("broker.http_front")


class Generate:
    """The /generate route of one front; `inflight` counts the requests it holds (max_inflight bounds them)."""

    def __init__(self, cfg: HttpFrontConfig, client: EncoderClient, readiness: Readiness, metrics: FrontMetrics,
                 segments: AnswerSegments):
        self.cfg = cfg
        self.client = client
        self.readiness = readiness
        self.metrics = metrics
        self.segments = segments
        self.inflight = 0

    async def __call__(self, request: Request) -> Response:
        """The answer to one POST /generate, or an HttpError saying why not."""
        outcome = "refused"
        try:
            call = parse_generate(await self._read_body(request))
            if self.inflight >= self.cfg.max_inflight:
                outcome = "overloaded"
                raise HttpError(429, f"{self.inflight} requests in flight, the front's max_inflight: retry later",
                                {"Retry-After": "1"})
            if (reason := await self.readiness.refusal()) is not None:
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


def same_host(request: Request) -> bool:
    """Whether the client can open this host's /dev/shm: it came over loopback or to our own address."""
    peer, local = request.client, request.scope.get("server")
    if not peer or not local:
        return False
    try:
        return ipaddress.ip_address(peer.host).is_loopback or peer.host == local[0]
    except ValueError:
        return False
