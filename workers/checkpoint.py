"""Finding the parts of a Qwen-Image directory and reading the text encoder's config and weights.

Accepts a Qwen-Image / Qwen-Image-Edit directory (text_encoder/, tokenizer/, processor/) or a plain
Qwen2.5-VL directory (config.json, safetensors and tokenizer files side by side).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from broker.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class CheckpointPaths:
    root: str
    text_encoder: str
    tokenizer: str
    processor: str | None


def resolve_checkpoint(model_dir: str) -> CheckpointPaths:
    root = os.path.abspath(os.path.expanduser(model_dir))
    if not os.path.isdir(root):
        raise ModelLoadError(f"model directory {root} does not exist")
    te = os.path.join(root, "text_encoder")
    if os.path.isfile(os.path.join(te, "config.json")):
        tok = os.path.join(root, "tokenizer")
        proc = os.path.join(root, "processor")
        if not os.path.isdir(tok):
            tok = proc if os.path.isdir(proc) else te
        return CheckpointPaths(root, te, tok, proc if os.path.isdir(proc) else None)
    if os.path.isfile(os.path.join(root, "config.json")):
        return CheckpointPaths(root, root, root, root)
    raise ModelLoadError(
        f"{root} is neither a Qwen-Image directory (text_encoder/config.json) nor a Qwen2.5-VL one (config.json)"
    )


@dataclass(frozen=True, slots=True)
class TextConfig:
    """The decoder's shape, read from either config layout (flat legacy fields or text_config)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    mrope_section: tuple[int, int, int]
    head_dim: int = 0
    image_token_id: int = 151655
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of kv heads"
        assert sum(self.mrope_section) * 2 == self.head_dim, (
            f"mrope_section {self.mrope_section} must cover head_dim/2 = {self.head_dim // 2}"
        )


def read_text_config(text_encoder_dir: str) -> TextConfig:
    path = os.path.join(text_encoder_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    try:
        return TextConfig(
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text["num_key_value_heads"],
            vocab_size=text["vocab_size"],
            rope_theta=float(text.get("rope_theta") or rope.get("rope_theta") or 1e6),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            mrope_section=tuple(rope["mrope_section"]),
            head_dim=text.get("head_dim") or 0,
            image_token_id=cfg.get("image_token_id", 151655),
            raw=cfg,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path} lacks {e.args[0]!r}: is this a Qwen2.5-VL text encoder?") from e


def transformers_config(text_encoder_dir: str):
    """The text encoder's config.json as transformers' Qwen2_5_VLConfig, in the form transformers 5 reads quietly.

    Checkpoints saved by transformers 4 (Qwen-Image's among them) repeat the decoder's fields at the top level
    beside `text_config`, `rope_scaling` included. transformers 5 takes the decoder's from `text_config` and, for
    the top-level copy, logs "got key=rope_scaling" and "Unrecognized keys in rope_parameters" on every load. The
    copy is moved into `text_config` here (where it already is, the same values); the file stays as it is."""
    from transformers import Qwen2_5_VLConfig

    path = os.path.join(text_encoder_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if isinstance(cfg.get("text_config"), dict) and "rope_scaling" in cfg:
        text = dict(cfg["text_config"])
        text.setdefault("rope_scaling", cfg.pop("rope_scaling"))
        cfg["text_config"] = text
    return Qwen2_5_VLConfig.from_dict(cfg)


def safetensors_files(text_encoder_dir: str) -> list[str]:
    index = os.path.join(text_encoder_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(text_encoder_dir) if n.endswith(".safetensors"))
    if not names:
        raise ModelLoadError(f"no safetensors files in {text_encoder_dir}")
    return [os.path.join(text_encoder_dir, n) for n in names]


# Checkpoints name the decoder "model.layers.*" (Qwen's release), "model.language_model.layers.*"
# (transformers >= 4.52) or "language_model.model.layers.*"; the vision tower "visual.*" or "model.visual.*".
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_VISION_PREFIXES = ("model.visual.", "visual.")


def canonical_name(name: str) -> str | None:
    """'layers.0.mlp.up_proj.weight' style for the decoder, 'visual.…' for the tower, None for lm_head."""
    for p in _VISION_PREFIXES:
        if name.startswith(p):
            return "visual." + name[len(p):]
    if name.startswith(("lm_head.", "language_model.lm_head.")):
        return None
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def iter_tensors(text_encoder_dir: str, want=lambda canonical: True):
    """Yields (canonical name, tensor) for every wanted weight, reading each file through a memory map."""
    from safetensors import safe_open

    for path in safetensors_files(text_encoder_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                canon = canonical_name(name)
                if canon is not None and want(canon):
                    yield canon, f.get_tensor(name)
