"""Reading configs: a JSON file, then EB_<KEY> environment variables (which win), then command-line flags.
Paths inside a config file are relative to the file (in a variable, to the current directory); `$VAR` and `~`
expand; the defaults of keys a config leaves out are relative to ./configs (the tiny model in ./var/tiny), wherever
the file is. Keys a config does not use are named in one WARNING, each with why (LightX2V's configs carry many)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields

from broker.protocol.queues import DEFAULT_QUEUE

log = logging.getLogger("broker.config")
ENV_PREFIX = "EB_"

DEFAULT_REDIS_PORT = 6390  # the project's own Redis (Procfile), not the system one
DEFAULT_REDIS_URL = f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"

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


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def parse_env_value(name: str, raw: str, type_name: str):
    """An EB_<KEY> string as the field's type ("int", "float | None", "bool", "dict", ...)."""
    kinds = [t.strip() for t in type_name.split("|")]
    if "None" in kinds and raw.strip().lower() in ("", "null", "none"):
        return None
    kind = kinds[0]
    try:
        if kind == "bool":
            value = {"1": True, "true": True, "yes": True, "on": True,
                     "0": False, "false": False, "no": False, "off": False}[raw.strip().lower()]
        elif kind in ("int", "float"):
            value = {"int": int, "float": float}[kind](raw)
        elif kind == "dict":
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
        else:
            value = raw
    except (KeyError, ValueError):
        raise ValueError(f"{name}={raw!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}") from None
    return value


def take_known(cls, data: dict, what: str, ignored: dict[str, str] | None = None) -> dict:
    """The keys of `data` that are fields of dataclass `cls`. The others, and those of `ignored` ({key: why}), are
    named in one WARNING, grouped by why ("_"-prefixed keys, comments by convention, are skipped silently)."""
    known = {f.name for f in fields(cls)}
    why = dict(ignored or {})
    for k in data:
        if k not in known and not k.startswith("_"):
            why.setdefault(k, "not a key of this program's config")
    if why:
        groups: dict[str, list[str]] = {}
        for k in sorted(why):
            groups.setdefault(why[k], []).append(k)
        log.warning("%s: ignoring %d key(s): %s", what, len(why),
                    "; ".join(f"{', '.join(keys)}: {reason}" for reason, keys in groups.items()))
    return {k: v for k, v in data.items() if k in known}


def rename_keys(raw: dict, renamed: dict[str, str], what: str) -> dict[str, str]:
    """Moves deprecated keys of `raw` (`renamed`: {old: new}) to their new names (where the new key is set too, it
    wins), with a WARNING for each, file key or EB_<OLD> variable, naming the new one. Returns the variable to read
    for each renamed field: EB_<OLD> where only it is set."""
    env_of = {}
    for old, new in renamed.items():
        if old in raw:
            log.warning("%s: key %s is deprecated; it is now %s", what, old, new)
            raw.setdefault(new, raw.pop(old))
        if env_name(old) in os.environ:
            log.warning("%s is deprecated; it is now %s", env_name(old), env_name(new))
            if env_name(new) not in os.environ:
                env_of[new] = env_name(old)
    return env_of


def from_json_file(cls, path: str | None, path_fields: tuple[str, ...] = (), translate=None,
                   renamed: dict[str, str] | None = None, **overrides):
    """A config dataclass: the JSON file's known keys (or the defaults when `path` is None), then every field's
    EB_<KEY> environment variable, then the non-None `overrides` (command-line flags). `path_fields` are
    resolved against the file's folder (a variable's or a flag's against the current directory). `translate(raw)`
    -> (raw in this config's keys, {ignored key: why}) reads another program's keys (dit_workers.lightx2v_config).
    `renamed` ({old key: new key}) keeps deprecated keys working, in the file and as EB_<OLD>, with a WARNING."""
    raw = load_json(path) if path else {}
    ignored = {}
    if translate is not None:
        raw, ignored = translate(raw)
    env_of = rename_keys(raw, renamed or {}, path or "config")
    values = take_known(cls, raw, path or "config", ignored)
    for name in path_fields:
        if name in values:
            values[name] = resolve_path(raw, values[name])
    cwd = {"_config_dir": os.getcwd()}
    for f in fields(cls):
        var = env_of.get(f.name, env_name(f.name))
        if (env := os.environ.get(var)) is not None:
            values[f.name] = parse_env_value(var, env, str(f.type))
            if f.name in path_fields:
                values[f.name] = resolve_path(cwd, values[f.name])
    for k, v in overrides.items():
        if v is not None:
            values[k] = resolve_path(cwd, v) if k in path_fields else v
    cfg = cls(**values)
    # Defaults are relative to ./configs, never to the file's folder: a config from elsewhere (LightX2V's
    # configs/qwen_image/) must not have the tiny model written beside it.
    home = {"_config_dir": os.path.join(os.getcwd(), "configs")}
    for name in path_fields:
        if name not in values:
            setattr(cfg, name, resolve_path(home, getattr(cfg, name)))
    return cfg


@dataclass(slots=True)
class ClientConfig:
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    timeout: float = 30.0
    retries: int = 3
    transport: str = "shm"
    shm_prefix: str | None = None  # the encoder workers' shm_prefix; None: $EB_SHM_PREFIX, else "eb"

    @classmethod
    def from_seed(cls, cfg: dict) -> "ClientConfig":
        """From a seed-style DiT config: lightllm_config.{service_url, service_timeout, service_retry, use_shm}, and
        our own lightllm_config.shm_prefix (the encoder workers')."""
        lc = cfg.get("lightllm_config") or {}
        return cls(
            redis_url=lc.get("service_url") or cfg.get("redis_url") or redis_url_from_env(),
            queue=lc.get("queue") or cfg.get("encode_queue") or DEFAULT_QUEUE,
            timeout=float(lc.get("service_timeout", 30.0)),
            retries=int(lc.get("service_retry", 3)),
            transport="shm" if lc.get("use_shm", True) else "blob",
            shm_prefix=lc.get("shm_prefix"),
        )
