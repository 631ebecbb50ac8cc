"""server.cache: byte budget, idle expiry, LRU order, and NOT_FOUND messages that say why an id is gone."""

from __future__ import annotations

import pytest
import torch

from server.cache import Adaptation, AdaptationCache
from server.status import InvalidArgument, NotFound, ResourceExhausted


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def entry(nbytes: int, model: str = "m") -> Adaptation:
    return Adaptation(model, {"w": torch.zeros(nbytes // 4)}, None, steps=1, inner_lr=0.1)


def test_least_recently_used_is_evicted_first_to_fit_the_budget():
    evictions = []
    cache = AdaptationCache(max_bytes=1000, ttl_s=60, clock=Clock(), on_evict=evictions.append)
    a, b = cache.put(entry(400)), cache.put(entry(400))
    cache.get(a)  # a is now more recent than b
    c = cache.put(entry(400))
    assert len(cache) == 2 and cache.nbytes == 800
    assert cache.get(a) and cache.get(c)
    with pytest.raises(NotFound, match=r"adaptation_id '.*' was evicted from the cache \(least recently used"):
        cache.get(b)
    assert evictions == ["lru"]


def test_entries_expire_after_ttl_of_idleness():
    clock = Clock()
    cache = AdaptationCache(max_bytes=1000, ttl_s=10, clock=clock)
    a, b = cache.put(entry(100)), cache.put(entry(100))
    clock.now = 8
    cache.get(a)  # used: its idle time restarts
    clock.now = 15
    assert cache.get(a).model == "m"
    with pytest.raises(NotFound, match="expired"):
        cache.get(b)
    assert len(cache) == 1 and cache.nbytes == 100


def test_release_and_unknown_ids():
    cache = AdaptationCache(max_bytes=1000, ttl_s=10, clock=Clock())
    a = cache.put(entry(100))
    assert cache.release(a) == 100 and cache.nbytes == 0
    with pytest.raises(NotFound, match="was released"):
        cache.get(a)
    with pytest.raises(NotFound, match="'nope' is unknown"):
        cache.release("nope")
    with pytest.raises(NotFound, match="adaptation_id is empty"):
        cache.get("")


def test_entry_larger_than_the_cache_is_refused():
    cache = AdaptationCache(max_bytes=100, ttl_s=10)
    with pytest.raises(ResourceExhausted, match="needs 400 bytes, more than the whole cache"):
        cache.put(entry(400))


def test_bytes_count_weights_and_support_statistics():
    stats = {"bn0.mean": torch.zeros(8), "bn0.var": torch.zeros(8)}
    e = Adaptation("m", {"w": torch.zeros(10), "b": torch.zeros(2, 3)}, stats, 1, 0.1)
    assert e.nbytes == (10 + 6 + 16) * 4


def test_overlong_ids_are_refused_and_echoed_as_a_short_prefix():
    cache = AdaptationCache(max_bytes=1000, ttl_s=10)
    huge = "ad-" + "x" * 1_000_000
    for call in (cache.get, cache.release):
        with pytest.raises(InvalidArgument) as info:
            call(huge)
        assert "longer than 27 characters" in info.value.message and len(info.value.message) < 300
