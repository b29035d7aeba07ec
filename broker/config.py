"""Reading JSON configs: paths inside a config are relative to the config file, `$VAR` and `~` expand."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

DEFAULT_REDIS_URL = "redis://127.0.0.1:6390/0"  # the project's own Redis (Procfile), not the system one

# text_encoder_type values: the seed's lightllm_* names are aliases.
TEXT_ENCODER_TYPES = {
    "baseline": "baseline",
    "kernel": "kernel",
    "service": "service",
    "lightllm_kernel": "kernel",
    "lightllm_service": "service",
}


def load_json(path: str) -> dict:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must hold a JSON object")
    cfg["_config_dir"] = os.path.dirname(path)
    return cfg


def resolve_path(cfg: dict, value: str | None) -> str | None:
    """A path from a config: absolute as written, else relative to the config file's folder."""
    if value is None:
        return None
    value = os.path.expanduser(os.path.expandvars(value))
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(cfg.get("_config_dir", "."), value))


def normalize_text_encoder_type(value: str) -> str:
    try:
        return TEXT_ENCODER_TYPES[value]
    except KeyError:
        raise ValueError(
            f"text_encoder_type {value!r} is not one of {', '.join(TEXT_ENCODER_TYPES)}"
        ) from None


def redis_url_from_env(default: str = DEFAULT_REDIS_URL) -> str:
    return os.environ.get("EB_REDIS_URL", default)


def take_known(cls, data: dict, what: str) -> dict:
    """The keys of `data` that are fields of dataclass `cls`; unknown keys are an error (typos hide bugs)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown key(s) in {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {k: v for k, v in data.items() if k in known}


def from_json_file(cls, path: str, path_fields: tuple[str, ...] = (), **overrides):
    """A config dataclass from a JSON file: unknown keys refused, `path_fields` resolved against the file's
    folder, redis_url from the file or else $EB_REDIS_URL, then the non-None `overrides` (command-line flags)."""
    raw = load_json(path)
    cfg = cls(**take_known(cls, raw, path))
    for name in path_fields:
        setattr(cfg, name, resolve_path(raw, getattr(cfg, name)))
    cfg.redis_url = raw.get("redis_url") or redis_url_from_env(cfg.redis_url)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


@dataclass(slots=True)
class ClientConfig:
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = "encode"
    timeout: float = 30.0
    retries: int = 3
    transport: str = "shm"

    @classmethod
    def from_seed(cls, cfg: dict) -> "ClientConfig":
        """From a seed-style DiT config: lightllm_config.{service_url, service_timeout, service_retry, use_shm}."""
        lc = cfg.get("lightllm_config") or {}
        return cls(
            redis_url=lc.get("service_url") or cfg.get("redis_url") or redis_url_from_env(),
            queue=lc.get("queue") or cfg.get("encode_queue") or "encode",
            timeout=float(lc.get("service_timeout", 30.0)),
            retries=int(lc.get("service_retry", 3)),
            transport="shm" if lc.get("use_shm", True) else "blob",
        )
