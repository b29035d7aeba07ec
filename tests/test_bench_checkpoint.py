"""The benchmarks' random checkpoint is built only in a folder that is new, empty or of their own making: a path
to anything else (a real checkpoint, the tiny default) is refused and left as it is."""

import os

import pytest

from benchmarks.encoder import BUILT_HERE, checkpoint_is_built


def test_a_folder_the_benchmarks_did_not_write_is_refused_untouched(tmp_path):
    ckpt = tmp_path / "Qwen-Image"
    (ckpt / "text_encoder").mkdir(parents=True)
    (ckpt / "text_encoder" / "model.safetensors").write_bytes(b"weights")
    (ckpt / ".complete").write_text("someone else's marker\n")
    with pytest.raises(SystemExit, match="did not write"):
        checkpoint_is_built(str(ckpt), "abc123")
    assert (ckpt / "text_encoder" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(os.listdir(ckpt)) == [".complete", "text_encoder"]


def test_a_new_folder_is_made_and_one_of_its_own_is_rebuilt(tmp_path):
    ckpt = tmp_path / "bench"
    assert not checkpoint_is_built(str(ckpt), "abc123")
    assert (ckpt / BUILT_HERE).exists() and (ckpt / "text_encoder").is_dir()
    (ckpt / "text_encoder" / "stale.safetensors").write_bytes(b"old")
    (ckpt / ".complete").write_text("abc123\n")
    assert checkpoint_is_built(str(ckpt), "abc123")  # same shapes: reused as it is
    assert (ckpt / "text_encoder" / "stale.safetensors").exists()
    assert not checkpoint_is_built(str(ckpt), "def456")  # other shapes: its own folder, emptied
    assert os.listdir(ckpt / "text_encoder") == [] and not (ckpt / ".complete").exists()


def test_an_empty_folder_is_used(tmp_path):
    assert not checkpoint_is_built(str(tmp_path), "abc123")
    assert (tmp_path / BUILT_HERE).exists()
