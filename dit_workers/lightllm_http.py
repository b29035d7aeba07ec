"""`service_url` http(s)://: the encoder is a LightLLM-protocol server (LightLLM's `return_hiddens` server, or this
project's broker.http.front), spoken to as LightX2V's lightllm_service client speaks to it (broker.http.lightllm):
one POST /generate per prompt with the prompt already in Qwen-Image's template, bfloat16 states back (in a shared
memory segment on the same host with `use_shm`, else base64), the template's drop_idx tokens dropped here."""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from broker.errors import BrokerTimeout, BrokerUnavailable, EncodeFailed, InvalidRequest
from shm import ShmError, read_segment
from workers.templates import template_for

log = logging.getLogger("dit_workers")

RETRY_PAUSE_S = 1.0  # between attempts, as LightX2V's client waits


def is_http_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class LightLLMHttpEmbedder:
    """`service` with an http(s):// service_url. This process loads no encoder weights."""

    mode = "service"

    def __init__(self, service_url: str, timeout: float, retries: int, use_shm: bool):
        self.url = service_url.rstrip("/")
        self.timeout, self.retries, self.use_shm = timeout, max(1, retries), use_shm

    def embed(self, prompts: list[str], task: str, images: list[bytes]) -> list[torch.Tensor]:
        template = template_for(task)
        return [self._encode(template.format(p, len(images)), images)[template.drop_idx:] for p in prompts]

    def _encode(self, text: str, images: list[bytes]) -> torch.Tensor:
        """Every token's [seq, hidden] bfloat16 states of one templated prompt."""
        payload = {"inputs": text, "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1,
                                                  "use_shm": self.use_shm}}
        if images:
            payload["multimodal_params"] = {"images": [{"type": "base64", "data": base64.b64encode(b).decode()}
                                                       for b in images]}
        answer = self._post(json.dumps(payload).encode())
        if self.use_shm and "shm_hidden_states_name" in answer:
            shape = answer["shm_hidden_states_shape"]
            try:  # the server owns the segment's lifetime: read it, never unlink it
                data = read_segment(answer["shm_hidden_states_name"])[:int(np.prod(shape))]
            except ShmError as e:
                if "hidden_states_base64" not in answer:
                    raise EncodeFailed(f"{self.url}: the answer's segment could not be read: {e}") from None
                data, shape = base64.b64decode(answer["hidden_states_base64"]), answer["hidden_states_shape"]
        elif "hidden_states_base64" in answer:
            data, shape = base64.b64decode(answer["hidden_states_base64"]), answer["hidden_states_shape"]
        else:
            raise EncodeFailed(f"{self.url}: the answer has no hidden states (keys: {', '.join(sorted(answer))})")
        u8 = np.frombuffer(bytes(data), dtype=np.uint8).reshape(shape)
        return torch.from_numpy(u8.copy()).view(torch.bfloat16)  # LightLLM's states are bfloat16 bytes

    def _post(self, body: bytes) -> dict:
        last = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(RETRY_PAUSE_S)
            req = urllib.request.Request(f"{self.url}/generate", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                message = _message(e)
                if e.code in (400, 413, 422):  # the request itself: retrying cannot help
                    raise (InvalidRequest if e.code != 422 else EncodeFailed)(f"{self.url}: {e.code} {message}")
                last = BrokerUnavailable(f"{self.url}: {e.code} {message}")
            except TimeoutError:
                last = BrokerTimeout(f"{self.url}: no answer within {self.timeout} s")
            except (urllib.error.URLError, ConnectionError) as e:
                last = BrokerUnavailable(f"cannot reach the LightLLM-protocol server at {self.url}: "
                                         f"{getattr(e, 'reason', e)}")
            log.warning("encode call %d/%d failed: %s", attempt + 1, self.retries, last)
        raise last


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("message", "")
    except Exception:
        return e.reason or ""
