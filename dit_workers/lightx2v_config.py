"""LightX2V's Qwen-Image configs (configs/qwen_image/*.json in ModelTC/LightX2V) as a DiT worker reads them: every
key that means something for a Qwen-Image generation is taken as LightX2V's qwen_image runner takes it, as the
default of a request that leaves that part out; a key asking for what this worker can't do stops it with the
reason; the rest are ignored, each with why (`translate` returns them for the config's one warning).

What LightX2V's runner, scheduler and text encoders read, and where it lands here:
  infer_steps                       -> default_steps
  enable_cfg, sample_guide_scale    -> default_true_cfg_scale (enable_cfg false, LightX2V's default: 1, no CFG)
  aspect_ratio (+ aspect_ratios)    -> default_width, default_height of t2i (LightX2V's size table)
  resolution                        -> i2i_resolution (i2i without a size: the last image's aspect at resolution^2)
  seed, negative_prompt             -> default_seed, default_negative_prompt
  text_encoder_type, lightllm_config.{service_url, service_timeout, service_retry, use_shm, shm_prefix}: as they are
  prompt_template_encode(_start_idx), CONDITION_IMAGE_SIZE, USE_IMAGE_ID_IN_PROMPT: checked to be Qwen-Image's,
      which is what every text encoder mode here applies
"""

from __future__ import annotations

import logging

from workers.templates import TEMPLATES

log = logging.getLogger("dit_workers.config")

# The qwen_image runner's t2i sizes, (width, height) by aspect ratio. A config's own `aspect_ratios` adds ratios;
# these five win over it, as in the runner (`as_maps.update(default_aspect_ratios)`).
ASPECT_RATIOS = {"16:9": (1664, 928), "9:16": (928, 1664), "1:1": (1328, 1328), "4:3": (1472, 1140),
                 "3:4": (768, 1024)}
SIZE_UNIT = 16  # Qwen-Image's VAE factor 8 x 2x2 latent packing: LightX2V floors a size to it, so does this
CONDITION_IMAGE_SIZE = 384 * 384  # diffusers' and LightX2V's default: the area an i2i image is encoded at

RUNTIME = "LightX2V's own runtime settings (kernels, caching, offloading, parallelism): diffusers' pipeline runs here"
MODEL = "the checkpoint's config files (transformer/, vae/, scheduler/) describe the model, as LightX2V reads them"
IGNORED = {
    **dict.fromkeys(("attn_type", "rope_type", "feature_caching", "teacache_thresh", "use_ret_steps", "cpu_offload",
                     "offload_granularity", "offload_ratio", "lazy_load", "unload_modules", "parallel", "seq_parallel",
                     "cfg_parallel", "compile", "compile_shapes", "warmup", "use_bfloat16", "do_mm_calib",
                     "dit_quantized", "dit_quant_scheme", "dit_quantized_ckpt", "mm_config"), RUNTIME),
    **dict.fromkeys(("vae_scale_factor", "num_channels_latents", "vae_latents_mean", "vae_latents_std", "vae_z_dim",
                     "transformer_in_channels", "in_channels", "num_layers", "attention_out_dim",
                     "attention_dim_head", "axes_dims_rope", "guidance_embeds", "zero_cond_t", "use_layer3d_rope",
                     "patch_size", "vae_stride"), MODEL),
    **dict.fromkeys(("batchsize", "num_images_per_prompt"), "one image per generation job here"),
    **dict.fromkeys(("max_custom_size", "min_custom_size"),
                    "they bound LightX2V's --target_shape; a request's width and height are bounded by max_side here"),
    "resize_mode": "an i2i request without a size already takes its last image's aspect (LightX2V's adaptive)",
    **dict.fromkeys(("use_lightllm_encoder", "lightllm_url"),
                    "an older LightX2V's LightLLM switch: text_encoder_type and lightllm_config say it here"),
    **dict.fromkeys(("qwen25vl_tokenizer_path", "qwen25vl_processor_path"),
                    "an in-process encoder reads model_path's tokenizer/ and processor/"),
}
LIGHTLLM_USED = ("service_url", "service_timeout", "service_retry", "use_shm", "queue", "shm_prefix")
LIGHTLLM_IGNORED = dict.fromkeys(("use_flash_attention_kernel", "use_rmsnorm_kernel", "use_ffn_kernel"),
                                 "LightLLM's kernel switches: the kernel backend always runs its own Triton kernels")


def translate(raw: dict) -> tuple[dict, dict[str, str]]:
    """(`raw` with LightX2V's keys turned into this worker's, {ignored key: why}). Raises ValueError for a key that
    asks for what this worker can't do, or that says the same thing as one of ours with another value."""
    out, ignored, taken = dict(raw), {}, []

    def take(key: str, ours: dict, note: str) -> None:
        for name, value in ours.items():
            if name in raw and raw[name] != value:
                raise ValueError(f"{key} ({raw.get(key)!r}) and {name} ({raw[name]!r}) both set, to different values")
        out.pop(key, None)
        out.update(ours)
        taken.append(note)

    if raw.get("lora_configs"):
        raise ValueError("lora_configs: this DiT worker loads no LoRA weights; merge them into model_path's "
                         "transformer, or run the config in LightX2V")
    if raw.get("layered"):
        raise ValueError("layered: this DiT worker does not do layered (RGBA layers) generation")
    if "infer_steps" in raw:
        take("infer_steps", {"default_steps": _positive_int(raw, "infer_steps")}, f"infer_steps {raw['infer_steps']}")
    _guidance(raw, out, take)
    if "aspect_ratio" in raw:
        width, height = _t2i_size(raw)
        out.pop("aspect_ratios", None)
        take("aspect_ratio", {"default_width": width, "default_height": height},
             f"aspect_ratio {raw['aspect_ratio']} -> t2i {width}x{height}")
    elif "aspect_ratios" in raw:
        ignored["aspect_ratios"] = "a size table without aspect_ratio to pick from it"
        out.pop("aspect_ratios")
    if "resolution" in raw:
        take("resolution", {"i2i_resolution": _positive_int(raw, "resolution")}, f"resolution {raw['resolution']}")
    if "seed" in raw:
        take("seed", {"default_seed": raw["seed"]}, f"seed {raw['seed']}")
    if "negative_prompt" in raw:
        take("negative_prompt", {"default_negative_prompt": raw["negative_prompt"]},
             f"negative_prompt {raw['negative_prompt']!r}")
    taken += _encoder_checks(raw, out)
    if isinstance(raw.get("lightllm_config"), dict):
        lc = dict(raw["lightllm_config"])
        for key in list(lc):
            if key not in LIGHTLLM_USED:
                ignored["lightllm_config." + key] = LIGHTLLM_IGNORED.get(key, "not a key of this worker's "
                                                                               "lightllm_config")
                del lc[key]
        out["lightllm_config"] = lc
    for key in IGNORED.keys() & raw.keys():
        ignored[key] = IGNORED[key]
        out.pop(key)
    if taken:
        log.info("LightX2V keys honoured (defaults of requests that leave them out): %s", "; ".join(taken))
    return out, ignored


def _positive_int(raw: dict, key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _guidance(raw: dict, out: dict, take) -> None:
    """enable_cfg / sample_guide_scale -> default_true_cfg_scale. LightX2V runs CFG only with enable_cfg true (its
    default is false), then at sample_guide_scale; diffusers' pipeline runs it when true_cfg_scale > 1."""
    if "enable_cfg" not in raw and "sample_guide_scale" not in raw:
        return
    enabled, scale = raw.get("enable_cfg", False), raw.get("sample_guide_scale")
    out.pop("enable_cfg", None)
    if not enabled:
        out.pop("sample_guide_scale", None)
        take("enable_cfg", {"default_true_cfg_scale": 1.0},
             "enable_cfg false: no CFG, the negative prompt is not encoded (true_cfg_scale 1)")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise ValueError(f"enable_cfg is true, so sample_guide_scale must be a number >= 0 (LightX2V reads it), "
                         f"got {scale!r}")
    take("sample_guide_scale", {"default_true_cfg_scale": float(scale)}, f"CFG at sample_guide_scale {scale}")


def _t2i_size(raw: dict) -> tuple[int, int]:
    table = dict(raw.get("aspect_ratios") or {})
    table.update(ASPECT_RATIOS)
    ratio = raw["aspect_ratio"]
    if ratio not in table:
        raise ValueError(f"aspect_ratio {ratio!r} is not one of {', '.join(table)} (LightX2V's sizes, and the "
                         f"config's aspect_ratios)")
    try:
        width, height = (int(v) for v in table[ratio])
    except (TypeError, ValueError):
        raise ValueError(f"aspect_ratios[{ratio!r}] must be [width, height], got {table[ratio]!r}") from None
    # LightX2V's latents are height // 16 * 2 by width // 16 * 2: the image made is floored to 16 pixels
    return max(SIZE_UNIT, width // SIZE_UNIT * SIZE_UNIT), max(SIZE_UNIT, height // SIZE_UNIT * SIZE_UNIT)


def _encoder_checks(raw: dict, out: dict) -> list[str]:
    """The text encoder's keys LightX2V's encoders read: every mode here encodes with Qwen-Image's own templates,
    condition image size and image ids, so a config must say those or nothing."""
    notes = []
    if "prompt_template_encode" in raw:
        template = next((t for t in TEMPLATES.values() if t.text == raw["prompt_template_encode"]), None)
        if template is None:
            raise ValueError("prompt_template_encode is not Qwen-Image's t2i or i2i template, which every text "
                             "encoder mode here applies (workers/templates.py): leave it out, or use Qwen-Image's")
        start = raw.get("prompt_template_encode_start_idx", template.drop_idx)
        if start != template.drop_idx:
            raise ValueError(f"prompt_template_encode_start_idx {start!r} is not {template.drop_idx}, the "
                             f"{template.task} template's prefix length that every text encoder mode here drops")
        notes.append(f"prompt_template_encode: Qwen-Image's {template.task} template")
    elif "prompt_template_encode_start_idx" in raw:
        raise ValueError("prompt_template_encode_start_idx without prompt_template_encode")
    if raw.get("CONDITION_IMAGE_SIZE", CONDITION_IMAGE_SIZE) != CONDITION_IMAGE_SIZE:
        raise ValueError(f"CONDITION_IMAGE_SIZE {raw['CONDITION_IMAGE_SIZE']!r}: i2i images are encoded at "
                         f"{CONDITION_IMAGE_SIZE} pixels (384x384 in area) here, as diffusers' Edit pipeline does")
    if raw.get("USE_IMAGE_ID_IN_PROMPT", True) is not True:
        raise ValueError("USE_IMAGE_ID_IN_PROMPT false: every text encoder mode here names each image "
                         "('Picture 1: ...'), as Qwen-Image-Edit-2509 does")
    for key in ("prompt_template_encode", "prompt_template_encode_start_idx", "CONDITION_IMAGE_SIZE",
                "USE_IMAGE_ID_IN_PROMPT"):
        out.pop(key, None)
    return notes
