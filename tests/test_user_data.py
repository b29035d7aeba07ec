"""A folder the product did not make is never written into or removed: a downloaded checkpoint at model_dir or
model_path, with the default make_tiny_if_missing, is an error that says what to set, and stays as it was."""

import os
import subprocess
import sys

import pytest

from broker.errors import ModelLoadError
from tests.helpers import REPO, write_config
from workers.make_tiny import MARKER, ensure_tiny, make_tiny


def user_checkpoint(root) -> str:
    """A downloaded Qwen-Image folder, as far as the tools can tell: a config and a weight shard."""
    ckpt = root / "models" / "Qwen-Image"
    (ckpt / "text_encoder").mkdir(parents=True)
    (ckpt / "text_encoder" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (ckpt / "text_encoder" / "model-00001-of-00004.safetensors").write_bytes(os.urandom(4096))
    return str(ckpt)


def snapshot(folder: str) -> dict:
    """Every file under `folder` (and beside it) with its bytes."""
    out = {}
    for base in (folder, os.path.dirname(folder)):
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[path] = f.read()
    return out


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_ensure_tiny_refuses_a_folder_it_did_not_make(tmp_path):
    ckpt = user_checkpoint(tmp_path)
    before = snapshot(ckpt)
    with pytest.raises(ModelLoadError, match="make_tiny_if_missing"):
        ensure_tiny(ckpt)
    with pytest.raises(ModelLoadError, match="did not make"):
        make_tiny(ckpt)
    assert snapshot(ckpt) == before  # not a byte changed, no lock file beside it


def test_ensure_tiny_refuses_a_file_and_an_empty_folder(tmp_path):
    (tmp_path / "model").write_text("mine")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "model", tmp_path / "empty"):
        with pytest.raises(ModelLoadError):
            ensure_tiny(str(path))
    assert (tmp_path / "model").read_text() == "mine"
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("how", ["config", "env"])
def test_encoder_worker_leaves_a_real_checkpoint_alone(tmp_path, how):
    ckpt = user_checkpoint(tmp_path)
    before = snapshot(ckpt)
    if how == "config":
        cfg = write_config(str(tmp_path / "x.json"), model_dir=ckpt)
        proc = run(["-m", "workers", "--config", cfg])
    else:
        proc = run(["-m", "workers"], env={"EB_MODEL_DIR": ckpt, "EB_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    assert "make_tiny_if_missing" in log and "Traceback" not in log
    assert snapshot(ckpt) == before


def test_dit_worker_leaves_a_real_checkpoint_alone(tmp_path):
    ckpt = user_checkpoint(tmp_path)
    before = snapshot(ckpt)
    cfg = write_config(str(tmp_path / "dit.json"), model_path=ckpt, text_encoder_type="service")
    proc = run(["-m", "dit_workers", "--config", cfg])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log
    assert "make_tiny_if_missing" in log and "Traceback" not in log
    assert snapshot(ckpt) == before


def test_make_tiny_command_needs_force_to_replace_a_folder(tmp_path):
    ckpt = user_checkpoint(tmp_path)
    before = snapshot(ckpt)
    proc = run(["-m", "workers.make_tiny", ckpt])
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert snapshot(ckpt) == before
    proc = run(["-m", "workers.make_tiny", ckpt, "--force"])
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(os.path.join(ckpt, MARKER))
    assert not os.path.exists(os.path.join(ckpt, "text_encoder", "model-00001-of-00004.safetensors"))
