"""The DiT worker's config (configs/dit.json): seed-style `text_encoder_type` + `lightllm_config`, the pipeline's
checkpoint and what a generation request may ask for. A LightX2V Qwen-Image config works as it is: its keys mean
what they mean to LightX2V (dit_workers.lightx2v_config)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from broker.protocol.config import (DEFAULT_REDIS_URL, ClientConfig, env_name, from_json_file, load_json,
                                    normalize_text_encoder_type)
from broker.protocol.queues import DEFAULT_GENERATE_QUEUE
from dit_workers import lightx2v_config
from workers.config import check_quantization

log = logging.getLogger("dit_workers.config")
PATH_FIELDS = ("model_path", "edit_model_path", "output_dir")


@dataclass(slots=True)
class DitWorkerConfig:
    # baseline | kernel | service (lightllm_kernel / lightllm_service); None (not set): baseline, as LightX2V reads
    # a config without it
    text_encoder_type: str | None = None
    model_path: str = "../var/tiny"  # a Qwen-Image directory; relative to the config file
    edit_model_path: str | None = None  # a Qwen-Image-Edit(-2509) directory for i2i; None: model_path
    make_tiny_if_missing: bool = True  # the embedded tiny checkpoint and pipeline, written on first run
    device: str = "auto"
    dtype: str | None = None  # the pipeline's (and an in-process encoder's); None: bfloat16 on a GPU, float32 on CPU
    # `kernel` mode: "fp8" puts the in-process encoder's decoder linear layers in e4m3, as the encoder worker's key
    # of that name does; None: off. Behind the broker the encoder workers' own config sets it
    quantization: str | None = None
    redis_url: str = DEFAULT_REDIS_URL  # where generation jobs come from
    queue: str = DEFAULT_GENERATE_QUEUE
    max_payload_bytes: int = 64 << 20
    output_dir: str = "../var/images"  # where PNGs go for requests with return_path
    default_steps: int = 50  # a request without steps (diffusers' own default)
    default_width: int | None = None  # a t2i request without a size; None: the pipeline's (1024 for Qwen-Image)
    default_height: int | None = None
    default_true_cfg_scale: float = 4.0  # a request without true_cfg_scale; at most 1: no CFG, no negative prompt
    default_seed: int = 0  # a request without a seed
    default_negative_prompt: str = " "  # a request without a negative prompt
    i2i_resolution: int = 1024  # an i2i request without a size: its last image's aspect at about this^2 pixels
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
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"default_steps (LightX2V's infer_steps) {self.default_steps} must be in 1..max_steps "
                             f"{self.max_steps}")
        assert self.max_images >= 1 and self.max_side >= 16, "max_images >= 1 and max_side >= 16"
        if isinstance(self.default_seed, bool) or not isinstance(self.default_seed, int) \
                or not 0 <= self.default_seed < 2**63:
            raise ValueError(f"default_seed (LightX2V's seed) must be an integer in [0, 2**63), got "
                             f"{self.default_seed!r}")
        if not isinstance(self.default_negative_prompt, str):
            raise ValueError(f"default_negative_prompt (LightX2V's negative_prompt) must be a string, got "
                             f"{self.default_negative_prompt!r}")
        if not self.default_true_cfg_scale >= 0 or self.i2i_resolution < 16:
            raise ValueError("default_true_cfg_scale must be >= 0 and i2i_resolution >= 16")
        if self.text_encoder_type is None:
            log.warning("text_encoder_type is not set: 'baseline', the text encoder loaded in this DiT process, as "
                        "LightX2V reads a config without it; set it to 'lightllm_service' (or EB_TEXT_ENCODER_TYPE, "
                        "--text-encoder-type) to use the shared encoder behind the broker")
            self.text_encoder_type = "baseline"
        self.text_encoder_type = normalize_text_encoder_type(self.text_encoder_type)
        check_quantization(self.quantization)
        if self.quantization is not None and self.text_encoder_type != "kernel":
            where = ("set it in the encoder workers' config (configs/encoder.json), which loads the encoder"
                     if self.text_encoder_type == "service" else "the baseline (HF) encoder is not quantized")
            raise ValueError(f"quantization {self.quantization!r} needs text_encoder_type 'kernel', not "
                             f"{self.text_encoder_type!r}: {where}")

    @property
    def encoder_client(self) -> ClientConfig:
        return ClientConfig.from_seed({"lightllm_config": self.lightllm_config, "redis_url": self.redis_url})

    @classmethod
    def from_json(cls, path: str | None, **overrides) -> "DitWorkerConfig":
        """From `path` (ours or a LightX2V config), then EB_<KEY> variables, then the non-None `overrides`."""
        cfg = from_json_file(cls, path, PATH_FIELDS, translate=lightx2v_config.translate, **overrides)
        given = (path and "model_path" in load_json(path)) or env_name("model_path") in os.environ \
            or overrides.get("model_path") is not None
        if not given and cfg.make_tiny_if_missing:
            log.warning("model_path is not set (LightX2V takes it as --model_path; here: the config's model_path, "
                        "EB_MODEL_PATH or --model-path): the embedded tiny checkpoint at %s", cfg.model_path)
        return cfg
