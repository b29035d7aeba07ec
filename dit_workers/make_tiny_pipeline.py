"""Adds a tiny, random, deterministic Qwen-Image diffusion pipeline to the embedded tiny checkpoint.

Next to the tiny text encoder that `workers.make_tiny` writes (text_encoder/, tokenizer/, processor/, never
touched here), this writes what diffusers' `QwenImagePipeline.from_pretrained` reads besides the encoder:

    OUTDIR/transformer/   QwenImageTransformer2DModel: 2 layers, 2 heads of 16, joint_attention_dim = encoder hidden
    OUTDIR/vae/           AutoencoderKLQwenImage: base_dim 16, one res block per stage, 8x spatial compression
    OUTDIR/scheduler/     FlowMatchEulerDiscreteScheduler with Qwen-Image's own settings
    OUTDIR/model_index.json  as the Qwen/Qwen-Image repository has it (text_encoder/tokenizer point at the folders)

The VAE keeps Qwen-Image's 8x compression and 16 latent channels, so the pipeline's size unit stays 16 pixels
(VAE scale factor 8 x patch 2) and its latent statistics are the real ones. Weights are drawn from a fixed seed
in name order: the same bytes on every run.

    python -m dit_workers.make_tiny_pipeline OUTDIR [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

SEED = 20251127
MARKER = ".pipeline-complete"  # written last; the text-encoder part has its own marker (workers.make_tiny)
PARTS = ("scheduler", "vae", "transformer")  # folders this module owns; model_index.json is renamed in last

TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
# Qwen/Qwen-Image scheduler/scheduler_config.json (the settings that differ from diffusers' defaults, and the rest).
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                            stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                            use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def encoder_hidden_size(model_dir: str) -> int:
    """The text encoder's hidden size: the transformer's joint_attention_dim must equal it."""
    from workers.checkpoint import read_text_config, resolve_checkpoint

    return read_text_config(resolve_checkpoint(model_dir).text_encoder).hidden_size


def fill_deterministic(model, seed: int) -> None:
    """Overwrites every parameter from one generator, in name order (independent of diffusers' init order)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):  # norm scales: near one, not exactly
                w = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf == "bias":
                w = 0.02 * torch.randn(p.shape, generator=gen)
            else:
                w = torch.randn(p.shape, generator=gen) / math.sqrt(max(1, math.prod(p.shape[1:])))
            p.copy_(w)


def write_pipeline_parts(outdir: str, hidden_size: int) -> None:
    """Writes transformer/, vae/, scheduler/ and model_index.json into `outdir` (which must exist)."""
    from broker.ops.extras import require

    diffusers = require("diffusers", "the tiny Qwen-Image pipeline")
    transformer = diffusers.QwenImageTransformer2DModel(joint_attention_dim=hidden_size, **TINY_TRANSFORMER)
    fill_deterministic(transformer, SEED)
    transformer.save_pretrained(os.path.join(outdir, "transformer"), safe_serialization=True)
    vae = diffusers.AutoencoderKLQwenImage(**TINY_VAE)
    fill_deterministic(vae, SEED + 1)
    vae.save_pretrained(os.path.join(outdir, "vae"), safe_serialization=True)
    diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER).save_pretrained(os.path.join(outdir, "scheduler"))
    with open(os.path.join(outdir, "model_index.json"), "w") as f:
        json.dump(dict(MODEL_INDEX, _diffusers_version=diffusers.__version__), f, indent=2, sort_keys=True)


def is_tiny_encoder_dir(model_dir: str) -> bool:
    from workers.make_tiny import MARKER as ENCODER_MARKER

    return os.path.exists(os.path.join(model_dir, ENCODER_MARKER))


def make_tiny_pipeline(model_dir: str, force: bool = False) -> str:
    """Adds the pipeline parts to a tiny checkpoint directory: each built in a temp dir beside them, then renamed
    in (folders first, model_index.json, then the marker), so a reader never sees a half-written part."""
    model_dir = os.path.abspath(model_dir)
    if os.path.exists(os.path.join(model_dir, MARKER)) and not force:
        return model_dir
    if not is_tiny_encoder_dir(model_dir):
        from broker.errors import ModelLoadError

        raise ModelLoadError(f"{model_dir} is not the embedded tiny checkpoint (no {MARKER!r} from workers.make_tiny): "
                             "the tiny pipeline is only added to it; give a real Qwen-Image directory instead")
    tmp = tempfile.mkdtemp(prefix=".pipeline-", dir=model_dir)
    try:
        write_pipeline_parts(tmp, encoder_hidden_size(model_dir))
        for part in PARTS:
            dst = os.path.join(model_dir, part)
            if os.path.exists(dst):  # a previous run stopped before its marker, or --force
                shutil.rmtree(dst)
            os.rename(os.path.join(tmp, part), dst)
        os.replace(os.path.join(tmp, "model_index.json"), os.path.join(model_dir, "model_index.json"))
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"seed {SEED}\n")
        os.replace(os.path.join(tmp, MARKER), os.path.join(model_dir, MARKER))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def ensure_tiny_pipeline(model_dir: str) -> str:
    """The tiny checkpoint with its pipeline: the encoder part first (workers.make_tiny.ensure_tiny), then the
    pipeline parts. Processes starting together take turns on a lock file; later calls return at once."""
    import fcntl

    from workers.make_tiny import ensure_tiny

    model_dir = ensure_tiny(model_dir)
    if os.path.exists(os.path.join(model_dir, MARKER)):
        return model_dir
    with open(model_dir + ".pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_tiny_pipeline(model_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_workers.make_tiny_pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("outdir", help="the tiny checkpoint directory (its text encoder is created first if missing)")
    ap.add_argument("--force", action="store_true", help="rewrite the pipeline parts even if they are there")
    args = ap.parse_args(argv)
    if args.force:
        from workers.make_tiny import ensure_tiny

        print(make_tiny_pipeline(ensure_tiny(args.outdir), force=True))
    else:
        print(ensure_tiny_pipeline(args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
