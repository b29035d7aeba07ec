import pytest
import torch

from workers.batching import BatchPolicy, split_by_tokens, unique_sequences
from workers.encoding_cache import EncodingCache, cache_key


def test_unique_sequences_maps_duplicates_to_one():
    seqs = [(1, 2), (3,), (1, 2), (4, 5, 6), (3,)]
    uniq, index = unique_sequences(seqs)
    assert uniq == [(1, 2), (3,), (4, 5, 6)]
    assert [uniq[i] for i in index] == seqs


@pytest.mark.parametrize("lengths, groups", [
    ([5, 3, 8, 2, 2, 9, 1], [[0, 1], [2, 3], [4], [5, 6]]),  # in order, no group over 10 tokens: 8, 10, 2, 10
    ([4, 30, 4], [[0], [1], [2]]),  # a sequence over the budget runs alone
])
def test_split_by_tokens_respects_the_budget(lengths, groups):
    assert split_by_tokens(lengths, 10) == groups


def test_policy_closes_at_the_request_and_token_limits():
    p = BatchPolicy(max_batch_tokens=100, max_batch_requests=4, max_wait_ms=2.0)
    assert p.fits(0, 0, 500)  # an empty batch takes any job
    assert p.fits(3, 50, 50) and not p.fits(3, 50, 51) and not p.fits(4, 10, 1)
    assert p.should_close(4, 10, waited_ms=0, device_idle=False)
    assert p.should_close(2, 100, waited_ms=0, device_idle=False)
    assert not p.should_close(0, 0, waited_ms=1e9, device_idle=True)


def test_policy_runs_a_lone_request_at_once():
    p = BatchPolicy(max_batch_tokens=100, max_batch_requests=4, max_wait_ms=2.0)
    assert p.should_close(1, 10, waited_ms=0.0, device_idle=True)  # nothing says more are coming
    for t in (0.0, 1.0, 2.0):  # requests a second apart
        p.arrived(t)
    assert not p.expect_more() and p.should_close(1, 10, waited_ms=0.0, device_idle=True)


def test_policy_waits_only_while_the_device_is_idle():
    p = BatchPolicy(max_batch_tokens=100, max_batch_requests=4, max_wait_ms=2.0)
    for i in range(10):  # a burst: 0.1 ms apart
        p.arrived(i * 1e-4)
    assert p.expect_more()
    assert not p.should_close(1, 10, waited_ms=1.0, device_idle=True)
    assert p.should_close(1, 10, waited_ms=2.0, device_idle=True)
    assert not p.should_close(1, 10, waited_ms=500.0, device_idle=False)  # busy device: keep growing
    assert p.wait_left_ms(0.5) == 1.5 and p.wait_left_ms(5) == 0


def test_cache_is_bounded_in_bytes_and_counts_hits():
    c = EncodingCache(max_bytes=3 * 40)  # three [10] float32 tensors
    keys = [cache_key("m", "t2i", 34, [i, i + 1]) for i in range(4)]
    for i, k in enumerate(keys):
        c.put(k, torch.full((10,), float(i)))
    assert len(c) == 3 and c.bytes == 120
    assert c.get(keys[0]) is None  # the oldest went first
    assert c.get(keys[3])[0] == 3.0
    assert (c.hits, c.misses) == (1, 1) and c.hit_rate == 0.5


def test_cache_keys_cover_model_task_and_template():
    ids = [151644, 8948, 198]
    k = cache_key("model-a", "t2i", 34, ids)
    assert k != cache_key("model-b", "t2i", 34, ids)
    assert k != cache_key("model-a", "i2i", 34, ids)
    assert k != cache_key("model-a", "t2i", 0, ids)
    assert k != cache_key("model-a", "t2i", 34, ids + [1])
    assert k == cache_key("model-a", "t2i", 34, list(ids))
