"""The FP8 encoder against bf16, as benchmarks/encoder.py and encoder_i2i.py measure it with --quantization fp8:
the error gate and the table of the issue's targets. Pure Python on the numbers of a run (tested on the CPU)."""

from __future__ import annotations

GIB = 2**30

# the gate: FP8 within 2x of HF bf16's rel L2 against the fp32 reference, and every token's cosine >= 0.99
REL_L2_FACTOR = 2.0
MIN_COS = 0.99
# speed and memory against bf16 in the same run
THROUGHPUT_RATIO = 1.35  # saturated prompts/s, at least
LATENCY_RATIO = 1.05  # one 128-token prompt, at most
WEIGHTS_GIB = 8.0
PEAK_OVER_WEIGHTS_GIB = 1.5
I2I_LATENCY_RATIO = 1.02  # "no slower than bf16", with room for run-to-run noise


def meets_gate(e: dict, hf_bf16: dict) -> bool:
    """`e` and `hf_bf16`: tb.errors() dicts against the fp32 reference."""
    return bool(e["finite"] and e["rel_l2"] <= REL_L2_FACTOR * hf_bf16["rel_l2"] and e["min_cos"] >= MIN_COS)


def t2i_table(r: dict) -> tuple[list[str], dict]:
    """The issue's table from benchmarks/encoder.py's results (with r["fp8"]): markdown lines, and the targets met.
    bf16 is the served configuration (CUDA graphs for the latency, its best token budget for the throughput)."""
    q, c, lat, thr, mem = r["fp8"], r["correctness"], r["latency"], r["throughput"], r["memory"]
    hf = c["hf_bf16"]
    bf16_best = best_throughput(thr, "kernel_")
    fp8_best = best_throughput(q["throughput"], "fp8_")
    lat_bf16, lat_fp8 = lat["kernel_graphs"]["median_ms"], q["latency"]["fp8_graphs"]["median_ms"]
    w_bf16, w_fp8 = mem["weights_bytes"] / GIB, q["memory"]["weights_bytes"] / GIB
    peak_bf16, peak_fp8 = (m.get("peak_allocated_bytes", float("nan")) / GIB for m in (mem, q["memory"]))
    served, fp8_e = c["kernel_bf16"], q["correctness"]["kernel_fp8"]
    targets = {
        f"fp8_prompts_per_s_ge_{THROUGHPUT_RATIO}x_bf16": fp8_best >= THROUGHPUT_RATIO * bf16_best,
        f"fp8_latency_le_{LATENCY_RATIO}x_bf16": lat_fp8 <= LATENCY_RATIO * lat_bf16,
        f"fp8_weights_le_{WEIGHTS_GIB:g}GiB": w_fp8 <= WEIGHTS_GIB,
        f"fp8_peak_le_weights_plus_{PEAK_OVER_WEIGHTS_GIB}GiB": peak_fp8 <= w_fp8 + PEAK_OVER_WEIGHTS_GIB,
        f"fp8_error_rel_l2_le_{REL_L2_FACTOR:g}x_hf_bf16_min_cos_ge_{MIN_COS}": all(
            meets_gate(e, hf) for e in q["correctness"].values()),
    }
    rows = [
        ("saturated prompts/s (t2i mix)", bf16_best, fp8_best, fp8_best / bf16_best,
         f">= {THROUGHPUT_RATIO}x bf16", targets[f"fp8_prompts_per_s_ge_{THROUGHPUT_RATIO}x_bf16"]),
        ("one 128-token prompt, ms", lat_bf16, lat_fp8, lat_fp8 / lat_bf16, f"<= {LATENCY_RATIO}x bf16",
         targets[f"fp8_latency_le_{LATENCY_RATIO}x_bf16"]),
        ("weights, GiB", w_bf16, w_fp8, w_fp8 / w_bf16, f"<= {WEIGHTS_GIB:g}", targets[f"fp8_weights_le_{WEIGHTS_GIB:g}GiB"]),
        ("peak allocated, GiB", peak_bf16, peak_fp8, peak_fp8 / peak_bf16, f"<= weights + {PEAK_OVER_WEIGHTS_GIB}",
         targets[f"fp8_peak_le_weights_plus_{PEAK_OVER_WEIGHTS_GIB}GiB"]),
        ("rel L2 vs fp32 (HF bf16: %.4f)" % hf["rel_l2"], served["rel_l2"], fp8_e["rel_l2"],
         fp8_e["rel_l2"] / served["rel_l2"], f"<= {REL_L2_FACTOR * hf['rel_l2']:.4f}",
         fp8_e["rel_l2"] <= REL_L2_FACTOR * hf["rel_l2"]),
        ("min cos vs fp32", served["min_cos"], fp8_e["min_cos"], None, f">= {MIN_COS}", fp8_e["min_cos"] >= MIN_COS),
    ]
    lines = ["| measure (random 7B weights) | bf16 | fp8 | fp8 / bf16 | target | met |", "|---|---|---|---|---|---|"]
    for name, b, f, ratio, target, met in rows:
        lines.append(f"| {name} | {_num(b)} | {_num(f)} | {'' if ratio is None else f'{ratio:.2f}x'} | {target} | "
                     f"{met} |")
    lines.append("")
    lines.append("| fp8 error vs fp32 | rel L2 | min cos | gate |")
    lines.append("|---|---|---|---|")
    for k, e in q["correctness"].items():
        lines.append(f"| {k} | {e['rel_l2']:.4f} | {e['min_cos']:.5f} | {meets_gate(e, hf)} |")
    return lines, targets


def i2i_targets(r: dict) -> dict:
    """encoder_i2i.py's fp8 targets: its error gate, and latency with 1 and 3 images no slower than bf16."""
    c, lat = r["correctness"], r["latency"]
    out = {f"fp8_error_rel_l2_le_{REL_L2_FACTOR:g}x_hf_bf16_min_cos_ge_{MIN_COS}": all(
        meets_gate(c["kernel_fp8"][k], c["hf_bf16"][k]) for k in ("1_image", "3_images", "cfg_pairs")) and
        meets_gate(c["kernel_fp8"], c["hf_bf16"])}
    for n in ("1_image", "3_images"):
        for kind in ("cold", "warm"):
            out[f"fp8_{kind}_{n}_le_{I2I_LATENCY_RATIO}x_bf16"] = (
                lat[f"fp8_{kind}_{n}"]["median_ms"] <= I2I_LATENCY_RATIO * lat[f"kernel_{kind}_{n}"]["median_ms"])
    return out


def best_throughput(thr: dict, prefix: str) -> float:
    """The best prompts/s among runs named `prefix`<token budget> (not the uncached or attention comparisons)."""
    vals = [v["prompts_per_s"] for k, v in thr.items() if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return max(vals, default=float("nan"))


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
