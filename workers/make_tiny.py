"""Writes the embedded tiny default: a deterministic, random-weight Qwen-Image text-encoder directory.

Laid out as the Qwen-Image and Qwen-Image-Edit repositories are, so the loading code that reads it reads a real
checkpoint unchanged:

    OUTDIR/text_encoder/config.json        Qwen2_5_VLForConditionalGeneration, legacy flat text fields
    OUTDIR/text_encoder/model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json (legacy key names)
    OUTDIR/tokenizer/                      the real Qwen2 tokenizer (see workers.tiny_tokenizer)
    OUTDIR/processor/                      Qwen2-VL processor files, for the i2i path

    python -m workers.make_tiny OUTDIR [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

# Text model: head_dim 16, so the M-RoPE sections [16, 24, 24] of head_dim 128 scale to [2, 3, 3].
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=152064,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    hidden_act="silu",
)
TINY_MROPE_SECTION = [2, 3, 3]
TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    in_channels=3,
    hidden_act="silu",
    tokens_per_second=2,
)
SPECIAL_IDS = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
)
SEED = 20251126
MARKER = ".complete"  # written last, so a half-written directory is never taken for a finished one


def text_encoder_config() -> dict:
    """The config.json of Qwen-Image's text_encoder, with tiny sizes (flat text fields, as transformers 4.5x wrote)."""
    rope = {"type": "default", "rope_type": "default", "mrope_section": TINY_MROPE_SECTION}
    text = dict(TINY_TEXT, rope_scaling=rope, model_type="qwen2_5_vl_text", **SPECIAL_IDS)
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        use_sliding_window=False,
        max_window_layers=TINY_TEXT["num_hidden_layers"],
        **TINY_TEXT,
        rope_scaling=rope,
        **SPECIAL_IDS,
        text_config=text,
        vision_config=dict(TINY_VISION, model_type="qwen2_5_vl", initializer_range=0.02),
    )


def tiny_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes in the legacy layout Qwen-Image ships (model.layers.*, visual.*, lm_head)."""
    t, v = TINY_TEXT, TINY_VISION
    d, inter = t["hidden_size"], t["intermediate_size"]
    hd = d // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t["vocab_size"], d)}
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (t["vocab_size"], d)

    vd, vi = v["hidden_size"], v["intermediate_size"]
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    shapes["visual.patch_embed.proj.weight"] = (vd, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (vd,),
            p + "norm2.weight": (vd,),
            p + "attn.qkv.weight": (3 * vd, vd),
            p + "attn.qkv.bias": (3 * vd,),
            p + "attn.proj.weight": (vd, vd),
            p + "attn.proj.bias": (vd,),
            p + "mlp.gate_proj.weight": (vi, vd),
            p + "mlp.gate_proj.bias": (vi,),
            p + "mlp.up_proj.weight": (vi, vd),
            p + "mlp.up_proj.bias": (vi,),
            p + "mlp.down_proj.weight": (vd, vi),
            p + "mlp.down_proj.bias": (vd,),
        })
    merged = vd * v["spatial_merge_size"] ** 2
    shapes.update({
        "visual.merger.ln_q.weight": (vd,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v["out_hidden_size"], merged),
        "visual.merger.mlp.2.bias": (v["out_hidden_size"],),
    })
    assert patch > 0
    return shapes


def tiny_state_dict():
    """Random weights from a fixed seed, drawn in name order, so every run gives the same bytes."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for name, shape in sorted(tiny_state_dict_shapes().items()):
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # not all ones, so a skipped norm weight shows
        elif name.endswith(".bias"):
            w = 0.05 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            w = torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            w = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = w.to(torch.bfloat16)
    return out


def write_sharded_safetensors(state: dict, outdir: str, shards: int = 2) -> None:
    """Sharded like the real checkpoint (model-0000i-of-0000n + index), so the index path is exercised."""
    from safetensors.torch import save_file

    names = sorted(state)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(outdir, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def write_processor(tokenizer, outdir: str) -> None:
    """Qwen-Image-Edit's processor/: image-processor settings plus the tokenizer files."""
    os.makedirs(outdir, exist_ok=True)
    tokenizer.save_pretrained(outdir)
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": TINY_VISION["patch_size"],
        "temporal_patch_size": TINY_VISION["temporal_patch_size"],
        "merge_size": TINY_VISION["spatial_merge_size"],
    }
    with open(os.path.join(outdir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)


def not_ours(outdir: str) -> str | None:
    """Why `outdir` may not be written: None when it is missing or a finished tiny checkpoint (ours), else the
    reason. A folder we did not make may be a user's real checkpoint: it is never written into or removed."""
    if not os.path.lexists(outdir) or os.path.exists(os.path.join(outdir, MARKER)):
        return None
    what = "a folder" if os.path.isdir(outdir) else "a file"
    return (f"{outdir} is {what} that encoder-broker did not make (it has no {MARKER!r} marker of the embedded "
            "tiny checkpoint), so it is left as it is. To load a real Qwen-Image checkpoint from it, set "
            "make_tiny_if_missing to false (EB_MAKE_TINY_IF_MISSING=false); for the tiny default, point model_dir "
            "(model_path for a DiT worker) at a folder that does not exist yet; to replace it with the tiny "
            "checkpoint, run `encoder-broker make-tiny --force` on it")


def make_tiny(outdir: str, force: bool = False) -> str:
    """Writes the tiny checkpoint into `outdir` (atomically: a temp dir renamed into place) and returns it. A path
    that exists and is not a finished tiny checkpoint is a ModelLoadError, unless `force` (the user asked to
    replace it)."""
    outdir = os.path.abspath(outdir)
    if os.path.exists(os.path.join(outdir, MARKER)) and not force:
        return outdir
    reason = not_ours(outdir)
    if reason is not None and not force:
        from broker.errors import ModelLoadError

        raise ModelLoadError(reason)
    from workers.tiny_tokenizer import build_qwen2_tokenizer

    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        te = os.path.join(tmp, "text_encoder")
        os.makedirs(te)
        with open(os.path.join(te, "config.json"), "w") as f:
            json.dump(text_encoder_config(), f, indent=2)
        write_sharded_safetensors(tiny_state_dict(), te)
        tokenizer = build_qwen2_tokenizer()
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        write_processor(tokenizer, os.path.join(tmp, "processor"))
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"seed {SEED}\n")
        if os.path.isdir(outdir) and not os.path.islink(outdir):  # ours, or --force
            shutil.rmtree(outdir)
        elif os.path.lexists(outdir):
            os.remove(outdir)
        os.rename(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def ensure_tiny(outdir: str) -> str:
    """Creates the tiny checkpoint on first use; later calls return at once. Processes starting together
    (honcho starts the encoder and DiT workers at once) take turns on a lock file, so one writes it. A path that
    exists and is not the tiny checkpoint is a ModelLoadError: it is never touched."""
    import fcntl

    from broker.errors import ModelLoadError

    outdir = os.path.abspath(outdir)
    if os.path.exists(os.path.join(outdir, MARKER)):
        return outdir
    if (reason := not_ours(outdir)) is not None:
        raise ModelLoadError(reason)
    os.makedirs(os.path.dirname(outdir), exist_ok=True)
    # O_CREAT without O_TRUNC: an existing file of that name is only locked, never emptied.
    fd = os.open(outdir + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return make_tiny(outdir, force=False)
    finally:
        os.close(fd)


def main(argv=None, prog: str = "python -m workers.make_tiny") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--force", action="store_true", help="rewrite even if a finished copy is there, or replace "
                    "a folder it did not make (its contents are deleted)")
    args = ap.parse_args(argv)
    from broker.errors import ModelLoadError

    try:
        print(make_tiny(args.outdir, force=args.force))
    except ModelLoadError as e:
        print(f"make-tiny: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
