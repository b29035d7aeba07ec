"""benchmarks/quantized.py's table and targets on made-up numbers, and the benchmarks' --quantization flag."""

import subprocess
import sys

import pytest

from benchmarks.quantized import best_throughput, i2i_targets, meets_gate, t2i_table
from tests.helpers import REPO

GIB = 2**30


def err(rel_l2: float, min_cos: float) -> dict:
    return {"rel_l2": rel_l2, "min_cos": min_cos, "mean_cos": 1.0, "finite": True}


def t2i_results(fp8_prompts_per_s=760.0, fp8_ms=7.0, fp8_rel=0.09, fp8_cos=0.995, fp8_weights=7.1,
                fp8_peak=8.4) -> dict:
    return {
        "correctness": {"hf_bf16": err(0.0525, 0.998), "kernel_bf16": err(0.05, 0.998)},
        "latency": {"kernel_graphs": {"median_ms": 6.8}},
        "throughput": {"kernel_8192": {"prompts_per_s": 540.0}, "kernel_16384": {"prompts_per_s": 556.0},
                       "kernel_16384_uncached": {"prompts_per_s": 900.0},  # not served: not the bf16 figure
                       "hf_bs64": {"prompts_per_s": 72.5}},
        "memory": {"weights_bytes": 13.3 * GIB, "peak_allocated_bytes": 14.5 * GIB},
        "fp8": {
            "correctness": {"kernel_fp8": err(fp8_rel, fp8_cos), "kernel_fp8_singles": err(fp8_rel, fp8_cos)},
            "latency": {"fp8_graphs": {"median_ms": fp8_ms}},
            "throughput": {"fp8_8192": {"prompts_per_s": fp8_prompts_per_s - 10},
                           "fp8_16384": {"prompts_per_s": fp8_prompts_per_s}},
            "memory": {"weights_bytes": fp8_weights * GIB, "peak_allocated_bytes": fp8_peak * GIB},
        },
    }


def test_t2i_table_judges_the_issue_targets():
    lines, targets = t2i_table(t2i_results())
    assert all(targets.values()), targets
    assert lines[0].startswith("| measure (random 7B weights) | bf16 | fp8 |")
    row = next(line for line in lines if line.startswith("| saturated prompts/s"))
    assert "| 556.0 | 760.0 | 1.37x | >= 1.35x bf16 | True |" in row
    assert any(line.startswith("| rel L2 vs fp32 (HF bf16: 0.0525) |") and "<= 0.1050" in line for line in lines)


@pytest.mark.parametrize("change,target", [
    (dict(fp8_prompts_per_s=700.0), "fp8_prompts_per_s_ge_1.35x_bf16"),
    (dict(fp8_ms=7.2), "fp8_latency_le_1.05x_bf16"),
    (dict(fp8_weights=8.2, fp8_peak=9.0), "fp8_weights_le_8GiB"),
    (dict(fp8_peak=8.7), "fp8_peak_le_weights_plus_1.5GiB"),
    (dict(fp8_rel=0.11), "fp8_error_rel_l2_le_2x_hf_bf16_min_cos_ge_0.99"),
    (dict(fp8_cos=0.985), "fp8_error_rel_l2_le_2x_hf_bf16_min_cos_ge_0.99"),
])
def test_t2i_table_each_target_can_fail(change, target):
    _, targets = t2i_table(t2i_results(**change))
    assert [k for k, v in targets.items() if not v] == [target]


def test_gate_and_best_throughput():
    hf = err(0.05, 0.998)
    assert meets_gate(err(0.1, 0.99), hf) and not meets_gate(err(0.1001, 0.999), hf)
    assert not meets_gate(dict(err(0.01, 0.999), finite=False), hf)
    assert best_throughput({"fp8_8192": {"prompts_per_s": 1.0}, "fp8_gemm_only": {"prompts_per_s": 9.0}},
                           "fp8_") == 1.0


def test_i2i_targets():
    subsets = {k: err(0.06, 0.997) for k in ("1_image", "3_images", "cfg_pairs")}
    c = {"hf_bf16": dict(err(0.06, 0.997), **subsets), "kernel_fp8": dict(err(0.1, 0.995), **subsets)}
    lat = {f"{t}_{kind}_{n}": {"median_ms": 10.0} for t in ("kernel", "fp8") for kind in ("cold", "warm")
           for n in ("1_image", "3_images")}
    assert all(i2i_targets({"correctness": c, "latency": lat}).values())
    lat["fp8_warm_3_images"]["median_ms"] = 10.5
    c["kernel_fp8"]["3_images"] = err(0.13, 0.995)
    failed = [k for k, v in i2i_targets({"correctness": c, "latency": lat}).items() if not v]
    assert failed == ["fp8_error_rel_l2_le_2x_hf_bf16_min_cos_ge_0.99", "fp8_warm_3_images_le_1.02x_bf16"]


@pytest.mark.parametrize("script", ["benchmarks/encoder.py", "benchmarks/encoder_i2i.py"])
def test_benchmarks_take_the_flag(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--quantization {fp8}" in proc.stdout and "--fp8-fast-accum" in proc.stdout
