"""Configs: a file, then EB_<KEY> environment variables (which win), then flags; unknown keys ignored, named once."""

import logging
import os

import pytest

from broker.http.front import HttpFrontConfig
from broker.protocol.config import from_json_file
from tests.helpers import write_config
from workers.config import EncoderWorkerConfig


def test_environment_wins_over_the_file(tmp_path, monkeypatch):
    path = write_config(str(tmp_path / "encoder.json"), max_batch_tokens=100, redis_url="redis://file:1/0",
                        shm_max_bytes=5, model_dir="models/a")
    monkeypatch.setenv("EB_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("EB_REDIS_URL", "redis://env:2/0")
    monkeypatch.setenv("EB_SHM_MAX_BYTES", "null")
    monkeypatch.setenv("EB_MAKE_TINY_IF_MISSING", "off")
    monkeypatch.setenv("EB_MAX_WAIT_MS", "0.5")
    cfg = EncoderWorkerConfig.from_json(path, queue="flag-q")
    assert (cfg.max_batch_tokens, cfg.redis_url, cfg.shm_max_bytes, cfg.make_tiny_if_missing, cfg.max_wait_ms) == \
        (4096, "redis://env:2/0", None, False, 0.5)
    assert cfg.queue == "flag-q"  # a flag wins over both
    assert cfg.model_dir == os.path.join(str(tmp_path), "models/a")  # a file's path: relative to the file
    monkeypatch.setenv("EB_MODEL_DIR", "elsewhere")
    assert EncoderWorkerConfig.from_json(path).model_dir == os.path.join(os.getcwd(), "elsewhere")


def test_without_a_file_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("EB_SHM_DEFAULT", "both")
    monkeypatch.setenv("EB_PORT", "9123")
    cfg = HttpFrontConfig.load(None)
    assert (cfg.shm_default, cfg.port, cfg.max_inflight) == ("both", 9123, 256)
    assert EncoderWorkerConfig.from_json(None).model_dir == os.path.join(os.getcwd(), "var", "tiny")


def test_a_bad_variable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EB_MAX_BATCH_TOKENS", "lots")
    with pytest.raises(ValueError, match="EB_MAX_BATCH_TOKENS='lots' is not an int"):
        EncoderWorkerConfig.from_json(None)


def test_unknown_keys_are_named_in_one_warning(tmp_path, caplog):
    path = write_config(str(tmp_path / "http.json"), port=8011, infer_steps=40, attn_type="flash_attn3",
                        _comment="skipped")
    with caplog.at_level(logging.INFO, logger="broker.config"):
        cfg = from_json_file(HttpFrontConfig, path)
    assert cfg.port == 8011
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "broker.config"]
    assert len(lines) == 1 and lines[0][0] == "WARNING", lines
    assert "ignoring 2 key(s): attn_type, infer_steps: not a key of this program's config" in lines[0][1], lines


def test_defaults_left_out_of_a_file_are_relative_to_dot_configs_not_to_the_file(tmp_path, monkeypatch):
    """A config kept elsewhere (LightX2V's configs/qwen_image/) must not get the tiny model written beside it."""
    path = write_config(str(tmp_path / "far" / "away.json") if (tmp_path / "far").mkdir() is None else "",
                        max_batch_tokens=100)
    monkeypatch.chdir(tmp_path)
    assert EncoderWorkerConfig.from_json(path).model_dir == str(tmp_path / "var" / "tiny")


def test_sweep_interval_s_is_a_deprecated_name_of_housekeeping_interval_s(tmp_path, monkeypatch, caplog):
    """The old key still sets the interval, from a file or as EB_SWEEP_INTERVAL_S, with one WARNING naming the new
    key; the new key wins where both are set."""
    path = write_config(str(tmp_path / "encoder.json"), sweep_interval_s=0.5)
    with caplog.at_level(logging.INFO, logger="broker.config"):
        assert EncoderWorkerConfig.from_json(path).housekeeping_interval_s == 0.5
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "broker.config"]
    assert len(lines) == 1 and lines[0][0] == "WARNING", lines
    assert "sweep_interval_s is deprecated" in lines[0][1] and "housekeeping_interval_s" in lines[0][1], lines

    both = write_config(str(tmp_path / "both.json"), sweep_interval_s=0.5, housekeeping_interval_s=2.0)
    assert EncoderWorkerConfig.from_json(both).housekeeping_interval_s == 2.0

    caplog.clear()
    monkeypatch.setenv("EB_SWEEP_INTERVAL_S", "0.25")
    with caplog.at_level(logging.INFO, logger="broker.config"):
        assert EncoderWorkerConfig.from_json(both).housekeeping_interval_s == 0.25  # a variable beats the file
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "broker.config"]
    assert len(lines) == 2 and all(level == "WARNING" for level, _ in lines), lines
    assert any("EB_SWEEP_INTERVAL_S is deprecated; it is now EB_HOUSEKEEPING_INTERVAL_S" in m for _, m in lines)
    monkeypatch.setenv("EB_HOUSEKEEPING_INTERVAL_S", "3")
    assert EncoderWorkerConfig.from_json(None).housekeeping_interval_s == 3.0
