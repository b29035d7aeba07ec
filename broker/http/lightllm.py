"""LightLLM's /generate protocol, as LightX2V's `lightllm_service` text encoder speaks it: the request checked,
the answer built. No I/O here (broker.http.generate serves it; broker.http.answer_segments holds its shared memory).

The protocol (ModelTC/LightX2V, lightx2v/models/input_encoders/lightllm/qwen25_text_encoder_service.py and
shm_client.py; LightLLM's `return_hiddens` branch serves it):

  request   POST {service_url}/generate  {"inputs": <prompt already in Qwen-Image's template>,
            "parameters": {"do_sample": false, "return_details": true, "max_new_tokens": 1},
            "multimodal_params": {"images": [{"type": "base64", "data": <b64 image>}, ...]}}   (images: i2i only)
  answer    "hidden_states_base64" + "hidden_states_shape": every token's last-layer states as bfloat16 bytes,
            shape [seq, hidden * 2] uint8; the client does np.frombuffer(uint8).reshape(shape), then
            .view(torch.bfloat16) -> [seq, hidden], and drops the template's first drop_idx tokens itself.
            Same host: "shm_hidden_states_name" + "shm_hidden_states_shape", the same bytes in a segment that
            the client opens with multiprocessing.shared_memory.SharedMemory(name=...), copies and closes
            (never unlinks: LightLLM's server owns a segment's lifetime).
  health    GET {service_url}/health -> 200 when it can serve.

LightX2V views the bytes as bfloat16 whatever else the answer says, so the states always go as bfloat16
(a float32 or float16 worker's states are converted); "hidden_states_dtype" says so, as LightLLM states it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

WIRE_DTYPE = torch.bfloat16
WIRE_DTYPE_NAME = "bfloat16"
REQUEST_ERRORS = ("InvalidRequest", "PromptTooLong")  # worker-side failures the request itself caused


class HttpError(Exception):
    """Answer with `status` and a JSON {"message", "code"}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(slots=True)
class GenerateCall:
    """One /generate request, checked."""

    inputs: str
    images: list[bytes]  # decoded image bytes (i2i)
    use_shm: bool | None  # None: the request didn't say
    return_base64: bool


# For the OpenAPI page only: requests are parsed by parse_generate, which bounds what pydantic would not (depth).
class ImageItem(BaseModel):
    type: str = Field("base64", description="only 'base64' is served")
    data: str = Field(description="the image file (PNG, JPEG, WebP, BMP), base64")


class GenerateParameters(BaseModel):
    use_shm: bool | None = Field(None, description="answer in shared memory (same host); default: shm_default")
    return_base64: bool = Field(False, description="with use_shm: base64 as well")
    model_config = {"extra": "allow"}  # do_sample, return_details, max_new_tokens: accepted, not used


class MultimodalParams(BaseModel):
    images: list[ImageItem] = []


class GenerateBody(BaseModel):
    inputs: str = Field(description="the prompt, already in Qwen-Image's (or Qwen-Image-Edit's) template")
    parameters: GenerateParameters = GenerateParameters()
    multimodal_params: MultimodalParams = MultimodalParams()


class GenerateAnswer(BaseModel):
    generated_text: list[str]
    prompt_tokens: int
    hidden_states_dtype: str = Field(WIRE_DTYPE_NAME, description="always bfloat16, as LightLLM sends")
    hidden_states_shape: list[int] = Field(description="[seq, hidden * 2] (uint8 bytes)")
    hidden_states_base64: str | None = None
    shm_hidden_states_name: str | None = None
    shm_hidden_states_shape: list[int] | None = None
    shm_hidden_states_expires_at: float | None = Field(None, description="seconds since the epoch")


def parse_generate(body: bytes) -> GenerateCall:
    try:
        d = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"body is not JSON: {e}") from None
    except RecursionError:  # '[' * 100000: the decoder recurses once per level
        raise HttpError(400, "body is not JSON this server reads: nested too deeply") from None
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


def failure_status(message: str) -> int:
    """A worker's failure caused by the request (too long, malformed, images refused) is the client's 422."""
    return 422 if message.split(":", 1)[0].strip() in REQUEST_ERRORS else 500


def wire_bytes(states: torch.Tensor) -> torch.Tensor:
    """[seq, hidden] states in any float dtype -> [seq, hidden * 2] uint8: their bfloat16 bytes."""
    return states.to(WIRE_DTYPE).contiguous().view(torch.uint8)


def answer_fields(u8: torch.Tensor) -> dict:
    """The fields every answer has, for bfloat16 bytes `u8` [seq, hidden * 2]."""
    shape = list(u8.shape)
    return {"generated_text": [""], "prompt_tokens": shape[0], "hidden_states_dtype": WIRE_DTYPE_NAME,
            "hidden_states_shape": shape}


def base64_field(u8: torch.Tensor) -> dict:
    return {"hidden_states_base64": base64.b64encode(u8.numpy()).decode("ascii")}


def shm_fields(name: str, expires_at: float, u8: torch.Tensor) -> dict:
    return {"shm_hidden_states_name": name.lstrip("/"), "shm_hidden_states_shape": list(u8.shape),
            "shm_hidden_states_expires_at": expires_at}
