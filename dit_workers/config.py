"""The DiT worker's config (configs/dit.json): seed-style `text_encoder_type` + `lightllm_config`, the pipeline's
checkpoint and what a generation request may ask for."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import DEFAULT_REDIS_URL, ClientConfig, from_json_file, normalize_text_encoder_type


@dataclass(slots=True)
class DitWorkerConfig:
    text_encoder_type: str = "service"  # baseline | kernel | service (lightllm_kernel / lightllm_service)
    model_path: str = "../var/tiny"  # a Qwen-Image directory; relative to the config file
    edit_model_path: str | None = None  # a Qwen-Image-Edit(-2509) directory for i2i; None: model_path
    make_tiny_if_missing: bool = True  # the embedded tiny checkpoint and pipeline, written on first run
    device: str = "auto"
    dtype: str | None = None  # the pipeline's (and an in-process encoder's); None: bfloat16 on a GPU, float32 on CPU
    redis_url: str = DEFAULT_REDIS_URL  # where generation jobs come from
    queue: str = "generate"
    max_payload_bytes: int = 64 << 20
    output_dir: str = "../var/images"  # where PNGs go for requests with return_path
    default_steps: int = 50  # a request without steps (diffusers' own default)
    default_width: int | None = None  # a t2i request without a size; None: the pipeline's (1024 for Qwen-Image)
    default_height: int | None = None
    max_steps: int = 200
    max_side: int = 4096  # pixels, either side of the image made
    max_images: int = 4  # i2i input images per request
    max_input_pixels: int = 4096 * 4096  # of one decoded input image
    progress_log_every: int = 0  # a log line every N denoising steps; 0: about ten lines per job
    result_ttl_s: int = 300
    # service_url, service_timeout, service_retry, use_shm; shm_prefix: the encoder workers' (None: $EB_SHM_PREFIX)
    lightllm_config: dict = field(default_factory=dict)
    log_level: str = "INFO"

    def __post_init__(self):
        assert self.default_steps >= 1 and self.max_steps >= self.default_steps, "need 1 <= default_steps <= max_steps"
        assert self.max_images >= 1 and self.max_side >= 16, "max_images >= 1 and max_side >= 16"

    @property
    def encoder_client(self) -> ClientConfig:
        return ClientConfig.from_seed({"lightllm_config": self.lightllm_config, "redis_url": self.redis_url})

    @classmethod
    def from_json(cls, path: str | None, **overrides) -> "DitWorkerConfig":
        cfg = from_json_file(cls, path, ("model_path", "edit_model_path", "output_dir"), **overrides)
        cfg.text_encoder_type = normalize_text_encoder_type(cfg.text_encoder_type)
        return cfg
