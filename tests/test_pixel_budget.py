"""The worker's budget for decoded image pixels in flight (workers.pixel_budget), on its own, and its config key."""

import threading

import pytest

from workers.config import EncoderWorkerConfig
from workers.pixel_budget import PixelBudget


def test_acquire_and_release_count_and_keep_the_peak():
    b = PixelBudget(100)
    assert b.try_acquire(60) and b.try_acquire(40)
    assert (b.in_use, b.peak) == (100, 100)
    b.release(60)
    assert b.try_acquire(10)
    assert (b.in_use, b.peak) == (50, 100)
    b.release(50)
    assert (b.in_use, b.peak) == (0, 100)


def test_no_room_reserves_nothing():
    b = PixelBudget(100)
    assert b.try_acquire(70)
    assert not b.try_acquire(31)
    assert not b.acquire(31, timeout=0.05)  # nobody releases: the bounded wait ends without room
    assert not b.wait_for_room(31, timeout=0.05)
    assert b.in_use == 70 and b.peak == 70
    assert b.try_acquire(30) and b.in_use == 100


def test_a_waiting_acquire_gets_room_once_another_thread_releases():
    b = PixelBudget(100)
    assert b.try_acquire(80)
    got = []
    waiter = threading.Thread(target=lambda: got.append(b.acquire(50)))
    waiter.start()
    b.release(80)
    waiter.join(30)
    assert got == [True] and b.in_use == 50 and b.peak == 80
    room = threading.Thread(target=lambda: got.append(b.wait_for_room(100, timeout=30)))
    room.start()
    b.release(50)
    room.join(30)
    assert got == [True, True] and b.in_use == 0  # wait_for_room reserves nothing


def test_it_never_goes_negative_or_past_its_capacity():
    b = PixelBudget(100)
    assert b.try_acquire(30)
    with pytest.raises(RuntimeError, match="released twice"):
        b.release(31)
    with pytest.raises(ValueError):
        b.release(-1)
    assert b.in_use == 30
    with pytest.raises(ValueError, match="can never fit"):
        b.try_acquire(101)  # would wait forever: the intake refuses such a job instead
    with pytest.raises(ValueError, match="can never fit"):
        b.acquire(101, timeout=1)
    with pytest.raises(ValueError):
        b.try_acquire(-5)
    assert b.in_use == 30
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_the_config_key_defaults_to_one_largest_job_and_reads_its_variable(monkeypatch):
    cfg = EncoderWorkerConfig.from_json(None)
    assert cfg.max_image_pixels_in_flight == cfg.max_images_per_job * cfg.max_image_pixels
    monkeypatch.setenv("EB_MAX_IMAGE_PIXELS_IN_FLIGHT", "123456")
    assert EncoderWorkerConfig.from_json(None).max_image_pixels_in_flight == 123456
    monkeypatch.setenv("EB_MAX_IMAGE_PIXELS_IN_FLIGHT", "0")
    with pytest.raises(ValueError, match="max_image_pixels_in_flight must be at least 1"):
        EncoderWorkerConfig.from_json(None)
