"""Finding the parts of a Qwen-Image directory and reading the text encoder's config and weights.

Accepts a Qwen-Image / Qwen-Image-Edit directory (text_encoder/, tokenizer/, processor/) or a plain
Qwen2.5-VL directory (config.json, safetensors and tokenizer files side by side).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
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


def read_config_json(text_encoder_dir: str) -> tuple[str, dict]:
    """(the path of the text encoder's config.json, its contents); a ModelLoadError if it cannot be read."""
    path = os.path.join(text_encoder_dir, "config.json")
    try:
        with open(path) as f:
            return path, json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def read_text_config(text_encoder_dir: str) -> TextConfig:
    path, cfg = read_config_json(text_encoder_dir)
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

    _path, cfg = read_config_json(text_encoder_dir)
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


# Pre-quantized checkpoints keep a weight in fp8 and its scale in a key beside it; weight = data * scale:
# - ComfyUI's "scaled fp8" single files (a `scaled_fp8` marker tensor, `<layer>.scale_weight` per tensor,
#   `<layer>.scale_input` for a static input scale; high-precision layers may carry a scale of 1 too);
# - compressed-tensors (llm-compressor) and vLLM's fp8 serialization (`<layer>.weight_scale`, per tensor or [N, 1]
#   per output channel; `<layer>.input_scale`).
# Input scales are not read: activations are quantized per token at run time (workers.kernels.fp8_quant).
_WEIGHT_SCALES = ("scale_weight", "weight_scale")
_SKIPPED = ("scale_input", "input_scale") + _WEIGHT_SCALES  # scales are read with their weight
_MARKERS = ("scaled_fp8",)
_UNSUPPORTED = {  # key leaf -> what it is
    "weight_scale_inv": "block-wise fp8 scales",
    "weight_packed": "packed integer weights",
    "weight_zero_point": "asymmetric quantization",
    "qweight": "GPTQ/AWQ integer weights",
}


def iter_scaled_tensors(text_encoder_dir: str, want=lambda canonical: True):
    """Yields (canonical name, tensor, scale) for every wanted tensor, reading each file through a memory map.
    scale: None, or the fp32 weight scale stored beside a `.weight` (shape [] per tensor, [N] per output row);
    an fp8 weight without one gets None (a plain cast, scale 1)."""
    from safetensors import safe_open

    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(p, framework="pt")) for p in safetensors_files(text_encoder_dir)]
        where = {name: f for f in files for name in f.keys()}  # a weight's scale may sit in another shard
        for name, f in where.items():
            base, _, leaf = name.rpartition(".")
            if leaf in _UNSUPPORTED:
                raise ModelLoadError(f"{text_encoder_dir} holds {_UNSUPPORTED[leaf]} ({name!r}): only fp8 weights "
                                     "with per-tensor or per-channel scales load, or an unquantized checkpoint")
            if leaf in _SKIPPED or name in _MARKERS:
                continue
            canon = canonical_name(name)
            if canon is None or not want(canon):
                continue
            t = f.get_tensor(name)
            scale = None
            if leaf == "weight":
                key = next((f"{base}.{s}" for s in _WEIGHT_SCALES if f"{base}.{s}" in where), None)
                if key is not None:
                    scale = weight_scale(where[key].get_tensor(key), t, name)
            yield canon, t, scale


def weight_scale(scale, weight, name: str):
    """A stored scale as fp32 [] (per tensor) or [N] (per output row of an [N, K] weight)."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(())
    n = weight.shape[0]
    if weight.dim() == 2 and tuple(s.shape) in ((n,), (n, 1)):
        return s.reshape(n)
    raise ModelLoadError(f"{name!r} has a scale of shape {tuple(scale.shape)} for a weight of shape "
                         f"{tuple(weight.shape)}: only per-tensor and per-output-channel scales load")


def dequantize(t, scale):
    """A stored weight in fp32: data * scale (per tensor, or per output row)."""
    w = t.float()
    if scale is None:
        return w
    return w * (scale[:, None] if scale.dim() == 1 else scale)


def iter_tensors(text_encoder_dir: str, want=lambda canonical: True):
    """Yields (canonical name, tensor) for every wanted weight, reading each file through a memory map; a
    pre-quantized weight comes dequantized (fp32)."""
    for canon, t, scale in iter_scaled_tensors(text_encoder_dir, want):
        yield canon, (t if scale is None else dequantize(t, scale))


def check_quantization_config(cfg: dict, path: str) -> None:
    """Refuses a checkpoint whose config.json declares a quantization the loader does not read: it reads fp8
    weights with per-tensor or per-channel scales (compressed-tensors' float 8-bit, vLLM's fp8 without blocks)."""
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not q:
        return
    method = q.get("quant_method")
    if method == "fp8" and not q.get("weight_block_size"):
        return
    if method == "compressed-tensors":
        bad = [name for name, group in (q.get("config_groups") or {}).items()
               if (w := group.get("weights") or {}).get("type") != "float" or w.get("num_bits") != 8
               or w.get("strategy") not in ("tensor", "channel")]
        if not bad:
            return
        what = f"compressed-tensors groups {bad} that are not float 8-bit per tensor or per channel"
    elif method == "fp8":
        what = f"block-wise fp8 (weight_block_size {q.get('weight_block_size')})"
    else:
        what = f"quant_method {method!r}"
    raise ModelLoadError(f"{path} is quantized with {what}: the kernel backend loads unquantized checkpoints and "
                         "fp8 ones with per-tensor or per-channel weight scales")
