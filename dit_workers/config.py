"""The DiT worker's config (configs/dit.json): seed-style `text_encoder_type` + `lightllm_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import (DEFAULT_REDIS_URL, ClientConfig, load_json, normalize_text_encoder_type,
                           redis_url_from_env, resolve_path, take_known)


@dataclass(slots=True)
class DitWorkerConfig:
    text_encoder_type: str = "service"  # baseline | kernel | service (lightllm_kernel / lightllm_service)
    model_path: str = "../var/tiny"  # a Qwen-Image directory; relative to the config file
    make_tiny_if_missing: bool = True
    device: str = "auto"
    redis_url: str = DEFAULT_REDIS_URL  # where generation jobs come from
    queue: str = "generate"
    max_payload_bytes: int = 64 << 20
    output_dir: str = "../var/images"
    lightllm_config: dict = field(default_factory=dict)  # service_url, service_timeout, service_retry, use_shm
    log_level: str = "INFO"

    @property
    def encoder_client(self) -> ClientConfig:
        return ClientConfig.from_seed({"lightllm_config": self.lightllm_config, "redis_url": self.redis_url})

    @classmethod
    def from_json(cls, path: str, **overrides) -> "DitWorkerConfig":
        raw = load_json(path)
        cfg = cls(**take_known(cls, raw, path))
        cfg.text_encoder_type = normalize_text_encoder_type(cfg.text_encoder_type)
        cfg.model_path = resolve_path(raw, cfg.model_path)
        cfg.output_dir = resolve_path(raw, cfg.output_dir)
        cfg.redis_url = raw.get("redis_url") or redis_url_from_env(cfg.redis_url)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg
