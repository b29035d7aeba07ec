"""Wire formats: the encode request a client enqueues and the handle a worker returns. msgpack, versioned."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import msgpack

from broker.errors import InvalidRequest, ProtocolError

SCHEMA_VERSION = 1
TASKS = ("t2i", "i2i")
TRANSPORTS = ("shm", "blob")
DTYPES = ("bfloat16", "float16", "float32")
# a doorbell's name (broker.protocol.doorbell): the prefix, the client's pid, 16 random hex digits
BELL_PREFIX = "eb-bell-"
BELL_NAME = re.compile(r"eb-bell-[0-9]+-[0-9a-f]{16}")


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, what: str):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be msgpack bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"{what} is not valid msgpack: {e}") from None


def validate_prompts(prompts) -> list[str]:
    """A non-empty list (or tuple) of strings, else InvalidRequest naming what is wrong."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise InvalidRequest(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidRequest("prompts is empty: send at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidRequest(f"prompt {i} is a {type(p).__name__}, not a string")
        check_text(p, f"prompt {i}")
    return list(prompts)


def check_text(text: str, what: str) -> None:
    """InvalidRequest unless `text` can go on the wire as UTF-8: a lone surrogate (e.g. "\\ud800", which a JSON
    escape or a bad decode can make) cannot be encoded, nor tokenized."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"{what} is not valid Unicode text: {text[e.start]!r} at character {e.start} is a "
                                 "lone surrogate, which has no UTF-8 encoding") from None


def validate_deadline(deadline) -> None:
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline != deadline:
        raise InvalidRequest(f"deadline must be a number (unix seconds, 0 for none), got {deadline!r}")


def is_bell_name(name) -> bool:
    return isinstance(name, str) and BELL_NAME.fullmatch(name) is not None


def as_dict(obj) -> dict:
    """A wire dataclass's fields, shallow (dataclasses.asdict deep-copies every list and bytes: slow)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def decode(cls, data: bytes, what: str):
    """An instance of wire dataclass `cls` from msgpack bytes, or ProtocolError saying what is wrong."""
    try:
        return cls(**_fields_of(cls, unpackb(data, what), what))
    except TypeError as e:
        raise ProtocolError(f"{what} is missing a field: {e}") from None


def _fields_of(cls, d: dict, what: str) -> dict:
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(d).__name__}")
    version = d.get("version")
    if version != SCHEMA_VERSION:
        raise ProtocolError(f"{what} has schema version {version!r}; this encoder-broker speaks {SCHEMA_VERSION}")
    known = cls.__dataclass_fields__
    return {k: v for k, v in d.items() if k in known}


@dataclass(slots=True)
class EncodeRequest:
    """One job: prompts that share a task, encoded together (i2i: a prompt and its negative, each with its images)."""

    prompts: list
    task: str = "t2i"
    images: list = field(default_factory=list)  # i2i: per prompt, a list of encoded images (bytes); t2i: []
    max_tokens: int | None = None  # a per-job limit under the worker's own
    transport: str = "shm"
    client_host: str = ""
    deadline: float = 0.0  # unix seconds after which the client has given up; 0 = none
    raw: bool = False  # prompts are already templated model inputs; every token's state is returned
    bell: str = ""  # the client's doorbell (broker.protocol.doorbell), rung with the handle of a shm result; "" = none
    version: int = SCHEMA_VERSION

    def validate(self) -> "EncodeRequest":
        """Checks what can be checked without the model; raises InvalidRequest with the reason."""
        validate_prompts(self.prompts)
        if self.task not in TASKS:
            raise InvalidRequest(f"unknown task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.transport not in TRANSPORTS:
            raise InvalidRequest(f"unknown transport {self.transport!r}: expected one of {', '.join(TRANSPORTS)}")
        self._validate_images()
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        validate_deadline(self.deadline)
        if not isinstance(self.raw, bool):
            raise InvalidRequest(f"raw must be true or false, got {self.raw!r}")
        if self.bell and not is_bell_name(self.bell):
            raise InvalidRequest(f"bell {self.bell!r} is not a doorbell name (eb-bell-<pid>-<16 hex digits>)")
        return self

    def _validate_images(self) -> None:
        imgs = self.images
        if not isinstance(imgs, list):
            raise InvalidRequest(f"images must be a list (one list of encoded images per prompt), "
                                 f"got {type(imgs).__name__}")
        if self.task == "t2i":
            if any(imgs):
                raise InvalidRequest("task 't2i' takes no images; send task='i2i' to encode prompts with images")
            return
        if len(imgs) != len(self.prompts):
            raise InvalidRequest(f"task 'i2i' needs one list of images per prompt: {len(self.prompts)} prompt(s), "
                                 f"{len(imgs)} list(s) in images")
        for i, row in enumerate(imgs):
            if not isinstance(row, list):
                raise InvalidRequest(f"images[{i}] is a {type(row).__name__}, not a list of encoded images "
                                     "(one list per prompt)")
            if not row:
                raise InvalidRequest(f"task 'i2i' needs at least one image per prompt; prompt {i} has none")
            for j, b in enumerate(row):
                if not isinstance(b, (bytes, bytearray)) or not b:
                    what = "empty bytes" if isinstance(b, (bytes, bytearray)) else f"a {type(b).__name__}"
                    raise InvalidRequest(f"images[{i}][{j}] is {what}, not an encoded image (PNG, JPEG, WebP, BMP)")

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "EncodeRequest":
        return decode(cls, data, "encode request")


@dataclass(slots=True)
class Handle:
    """Where a job's hidden states are: one shm segment or one Redis blob holding every prompt back to back."""

    transport: str  # "shm" | "blob"
    location: str  # shm segment name, or Redis key of the blob
    dtype: str
    shapes: list  # [[L_i, D], ...] per prompt, in request order
    offsets: list  # byte offset of each prompt's states inside the segment / blob data
    nbytes: int
    expires_at: float  # unix seconds; after it the sweeper (shm) or Redis (blob) may drop the data
    # the job's way through the worker: queue_ms (enqueued -> taken), batch_ms (taken -> on the encoder: checks,
    # tokenizing, batching, waiting for the device), infer_ms (its batch on the encoder), deliver_ms (encoder done
    # -> the delivery thread at this job: copy to the host, earlier jobs of the batch), batch_jobs, handed_at (unix s,
    # just before its data was written and its result recorded)
    timings: dict = field(default_factory=dict)
    worker: str = ""
    version: int = SCHEMA_VERSION

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Handle":
        h = decode(cls, data, "result handle")
        if h.transport not in TRANSPORTS or h.dtype not in DTYPES or len(h.shapes) != len(h.offsets):
            raise ProtocolError(f"result handle is malformed: {h!r}")
        return h


@dataclass(slots=True)
class Blob:
    """The blob transport's payload in Redis: the same bytes a segment would hold, plus their layout."""

    dtype: str
    shapes: list
    offsets: list
    data: bytes
    version: int = SCHEMA_VERSION

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Blob":
        return decode(cls, data, "result blob")


@dataclass(slots=True)
class GenerateRequest:
    """A DiT generation job: what a user of QwenImagePipeline (t2i) / QwenImageEditPlusPipeline (i2i) passes.

    `width`, `height`, `steps`, `seed`, `true_cfg_scale` and `negative_prompt` left out (None) take the worker's
    defaults (its config's default_*: 1024x1024, 50 steps, seed 0, 4.0 and " " unless it says otherwise); 0 is
    refused for a size or steps, never read as a default."""

    prompt: str
    negative_prompt: str | None = None  # None: the worker's default_negative_prompt (" ")
    task: str = "t2i"
    images: list = field(default_factory=list)  # i2i input images, encoded bytes (PNG, JPEG, WebP); t2i: none
    width: int | None = None  # pixels, a multiple of the pipeline's unit (16 for Qwen-Image); None: default
    height: int | None = None
    steps: int | None = None  # denoising steps; None: the worker's default_steps
    seed: int | None = None  # None: the worker's default_seed (0)
    true_cfg_scale: float | None = None  # > 1 runs classifier-free guidance with the negative prompt; None: 4.0
    output_dir: str = ""  # the worker writes the PNG into this folder and returns its path
    return_path: bool = False  # a path under the worker's own output_dir instead of the PNG's bytes
    debug: bool = False  # the result carries what the worker process holds (modules, encoder weights, memory)
    deadline: float = 0.0
    version: int = SCHEMA_VERSION

    def validate(self) -> "GenerateRequest":
        validate_deadline(self.deadline)
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, (str, type(None))):
            raise InvalidRequest("prompt and negative_prompt must be strings (negative_prompt None: the worker's)")
        check_text(self.prompt, "prompt")
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "negative_prompt")
        if self.task not in TASKS:
            raise InvalidRequest(f"unknown task {self.task!r}: expected one of {', '.join(TASKS)}")
        if not isinstance(self.images, list) or not all(isinstance(b, (bytes, bytearray)) for b in self.images):
            raise InvalidRequest("images must be a list of encoded image bytes (PNG, JPEG or WebP)")
        if self.task == "i2i" and not self.images:
            raise InvalidRequest("task 'i2i' needs at least one input image in images")
        if self.task == "t2i" and self.images:
            raise InvalidRequest("task 't2i' takes no images; send task='i2i' to edit an image")
        for name in ("width", "height", "steps"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise InvalidRequest(f"{name} must be a positive integer, or left out (None) for the worker's "
                                     f"default; got {v!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        cfg = self.true_cfg_scale
        if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or
                                not 0 <= cfg < float("inf")):
            raise InvalidRequest(f"true_cfg_scale must be a finite number >= 0 or None, got {cfg!r}")
        if not isinstance(self.output_dir, str):
            raise InvalidRequest("output_dir must be a string (a folder path, or empty)")
        check_text(self.output_dir, "output_dir")
        for name in ("return_path", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false, got {getattr(self, name)!r}")
        return self

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "GenerateRequest":
        return decode(cls, data, "generate request")


def per_prompt_images(images, n_prompts: int) -> list:
    """The `images` argument of EncoderClient.encode as EncodeRequest.images: None -> []; a flat list of encoded
    images -> the same list for every prompt (a prompt and its negative); a list of lists -> as given."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)) and images and all(isinstance(b, (bytes, bytearray)) for b in images):
        return [list(images) for _ in range(n_prompts)]
    if isinstance(images, tuple):
        images = list(images)
    if isinstance(images, list):
        return [list(row) if isinstance(row, tuple) else row for row in images]
    return images  # validate() says what is wrong with it


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(slots=True)
class GenerateResult:
    """What a DiT worker returns: the image (PNG bytes or a path) and what it was made from."""

    embeds_shapes: list  # [[L, D] of the prompt, [L, D] of the negative prompt]
    embeds_checksum: float  # sum of |x| over both, in float64: cheap evidence of what the pipeline received
    encoder_mode: str
    png: bytes = b""  # the image, unless it was written to `path`
    path: str = ""
    width: int = 0  # of the image made
    height: int = 0
    task: str = "t2i"
    steps: int = 0
    seed: int = 0
    true_cfg_scale: float = 0.0  # the guidance it ran with (at most 1: none)
    timings: dict = field(default_factory=dict)  # encode_ms, denoise_ms, png_ms, total_ms
    debug: dict = field(default_factory=dict)  # when asked: the worker process's modules, encoder weights, memory
    version: int = SCHEMA_VERSION

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "GenerateResult":
        return decode(cls, data, "generate result")
