"""The encoder worker's config (configs/encoder.json); every key is optional and documented in the README."""

from __future__ import annotations

from dataclasses import dataclass

from broker.protocol.config import DEFAULT_REDIS_URL, from_json_file
from broker.protocol.queues import DEFAULT_QUEUE

# A text token spans a few characters (about 4 in English, fewer in Chinese); this bound is far above them, so
# only prompts already far over max_prompt_tokens meet it.
PROMPT_CHARS_PER_TOKEN = 32

# Deprecated keys, still read (file and EB_ variable) with a WARNING naming the new one: {old: new}.
RENAMED_KEYS = {"sweep_interval_s": "housekeeping_interval_s"}


QUANTIZATIONS = (None, "fp8")


def check_quantization(value: str | None) -> None:
    if value not in QUANTIZATIONS:
        raise ValueError(f"quantization {value!r} is not one of null, \"fp8\"")


@dataclass(slots=True)
class EncoderWorkerConfig:
    model_dir: str = "../var/tiny"  # a Qwen-Image directory; relative to the config file
    make_tiny_if_missing: bool = True  # create the embedded tiny checkpoint at model_dir on first run
    backend: str = "auto"  # "baseline" | "kernel" | "auto" (kernel on a GPU, baseline on the CPU)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    # kernel backend: "fp8" puts the decoder's linear layers in e4m3 (per-channel weight scales, per-token inputs;
    # README "Quantization"); None: off. With backend "auto" it picks the kernel backend on the CPU too
    quantization: str | None = None
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    max_prompt_tokens: int = 1024  # tokens after the template prefix, per prompt; longer fails that job
    # characters of a prompt, checked before tokenizing it (which costs time by the character); longer fails that
    # job. None: PROMPT_CHARS_PER_TOKEN x max_prompt_tokens
    max_prompt_chars: int | None = None
    max_prompts_per_job: int = 64
    max_payload_bytes: int = 16 << 20  # a job's msgpack payload; larger fails that job
    max_batch_tokens: int = 16384
    max_batch_requests: int = 64
    max_wait_ms: float = 2.0  # how long a batch waits for more jobs after its first, when the device is idle
    max_queue_depth: int = 1024  # jobs waiting in the queue; past it clients get Overloaded at once (0: no bound)
    cache_max_bytes: int = 256 << 20  # recent encodings kept for repeats (0: off)
    max_images_per_job: int = 4  # i2i: distinct images in one job, and images per prompt; more fails that job
    max_image_pixels: int = 4096 * 4096  # an image's declared width x height; larger fails that job undecoded
    max_image_side: int = 8192  # an image's declared width or height
    # decoded image pixels (width x height) the worker holds at once, from decode to the end of compute; an image
    # job waits for room (or fails if over it alone). None: max_images_per_job x max_image_pixels (one largest job)
    max_image_pixels_in_flight: int | None = None
    image_cache_max_bytes: int = 256 << 20  # kernel backend: image features kept on the device by digest (0: off)
    job_heartbeat_ttl_s: int = 10  # a job whose worker is silent this long is retried or failed
    result_ttl_s: int = 60  # how long handles, blobs and segments wait for their client
    shm_prefix: str = "eb"
    shm_max_bytes: int | None = None  # budget for this worker's live segments; None: whatever /dev/shm has
    # how often the worker recovers dead workers' jobs and sweeps its expired segments; the queue bound it
    # publishes lapses after three of these (at least 10 s) without a refresh
    housekeeping_interval_s: float = 5.0
    metrics_port: int = 0  # Prometheus metrics at http://<host>:<port>/metrics (0: off)
    log_level: str = "INFO"

    def __post_init__(self):
        check_quantization(self.quantization)
        if self.max_prompt_chars is None:
            self.max_prompt_chars = PROMPT_CHARS_PER_TOKEN * self.max_prompt_tokens
        if self.max_image_pixels_in_flight is None:
            self.max_image_pixels_in_flight = self.max_images_per_job * self.max_image_pixels
        if self.max_image_pixels_in_flight < 1:
            raise ValueError(f"max_image_pixels_in_flight must be at least 1 (null: max_images_per_job x "
                             f"max_image_pixels), got {self.max_image_pixels_in_flight}")

    @classmethod
    def from_json(cls, path: str | None, **overrides) -> "EncoderWorkerConfig":
        return from_json_file(cls, path, ("model_dir",), renamed=RENAMED_KEYS, **overrides)
