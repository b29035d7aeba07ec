"""encoder-broker compare: fp8 against the unquantized kernel encoder on the tiny checkpoint, as a user runs it."""

import os
import re
import subprocess
import sys

import pytest

from broker.errors import InvalidRequest
from tests.helpers import REPO
from tests.test_fp8_encoder import PROMPTS
from tests.test_kernel_encoder import rel_l2
from workers.compare import prompt_errors, read_prompts
from workers.encoders import load_encoder


def compare(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TRITON_INTERPRET", None)  # the torch references: what a CPU without the interpreter runs
    return subprocess.run([sys.executable, "-m", "broker.cli", "compare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_compare_prints_per_prompt_and_overall_error(tiny_dir, tmp_path):
    prompts = [p for p in PROMPTS if p]  # "" is a blank line: skipped
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts[:1] + [""] + prompts[1:]) + "\n", encoding="utf-8")
    proc = compare("--quantization", "fp8", "--prompts", str(path), "--model-dir", tiny_dir, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fp8 against the unquantized kernel encoder (float32) on cpu")
    rows = [re.match(r"\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)  (.*)$", line) for line in lines[3:3 + len(prompts)]]
    assert all(rows), lines
    plain = load_encoder(tiny_dir, backend="kernel", use_triton=False)
    quant = load_encoder(tiny_dir, backend="kernel", use_triton=False, quantization="fp8")
    for i, (row, p) in enumerate(zip(rows, prompts)):
        (ref,), (got,) = plain.encode([p]), quant.encode([p])
        assert int(row[1]) == i and int(row[2]) == len(ref)
        assert float(row[3]) == pytest.approx(rel_l2(got, ref), abs=1e-4)
        assert float(row[4]) == pytest.approx(prompt_errors(got, ref)["min_cos"], abs=1e-5)
        assert p.startswith(row[5].removesuffix("..."))
    overall = re.match(r"all 3 prompts, (\d+) tokens: rel L2 ([\d.]+), min cos ([\d.]+)", lines[-1])
    assert overall and int(overall[1]) == sum(int(r[2]) for r in rows)
    assert 0.01 < float(overall[2]) < 0.2 and float(overall[3]) == min(float(r[4]) for r in rows)


def test_compare_refuses_clearly(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InvalidRequest, match="holds no prompt"):
        read_prompts(str(empty))
    proc = compare("--quantization", "fp8", "--prompts", str(empty), "--model-dir", tiny_dir, "--device", "cpu")
    assert proc.returncode == 2 and "holds no prompt" in proc.stderr and "Traceback" not in proc.stderr
    one = tmp_path / "one.txt"
    one.write_text("fox\n", encoding="utf-8")
    proc = compare("--quantization", "fp8", "--prompts", str(one), "--model-dir", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = compare("--quantization", "int4", "--prompts", str(empty))
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr
