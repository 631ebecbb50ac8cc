"""The captured programs of a graph backend (`graph` and `triton`): which keys get one, and which are kept.

A key says what a captured program depends on (shapes, steps, flags, never request values such as the lr). Policy:
- **capture on recurrence**: a key's first call runs eagerly (launches on the caller's tensors, nothing kept);
  its `capture_after`-th sighting (default the 2nd) captures. A client sweeping a shape or flag therefore costs
  eager launches, never a capture stall on the engine thread or an eviction. Sightings of uncaptured keys are
  remembered in a bounded LRU (`max_cold_keys`).
- **warming**: inside `with cache.warming():` (the server's warm-up, the benchmark's first call) a key captures on
  its first sighting and its entry is *pinned*.
- **bounded LRU**: at most `max_entries` entries and `max_bytes` together, least recently used evicted first;
  a capture outside warming may evict only unpinned entries, so warmed programs stay. When the room is held by
  pinned entries the key runs eagerly. An empty cache always takes one entry (however large).
- **failures**: a key whose capture failed (not out of memory) runs eagerly from then on, with the reason kept for
  `failures()` (bounded).
The cache holds entries; capturing, replaying and eager runs are the backend's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

E = TypeVar("E")


def task_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them) that holds n: the sizes a
    captured program is built for (task counts, and query counts where query rows are independent), so at most a
    third of a padded batch is padding and a sweep of sizes meets few keys."""
    b = 1
    while b < n:
        b = b + 1 if b < 2 else (b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3)
    return b


def query_bucket(spec, queries: int, policy: str | None) -> int:
    """Query rows a captured program holds: bucketed where the rows are independent of each other (normalized with
    the support statistics, ModelSpec.predict_needs_support_stats); under `transductive` they make the batch
    statistics, so exactly `queries` (padding rows would enter them)."""
    return task_bucket(queries) if queries and spec.predict_needs_support_stats(policy) else queries


@dataclass
class _Slot(Generic[E]):
    entry: E
    nbytes: int
    pinned: bool


class GraphCache(Generic[E]):
    def __init__(self, max_entries: int, max_bytes: int, capture_after: int = 2, max_cold_keys: int = 4096,
                 max_failures: int = 256):
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}, expected >= 1")
        if capture_after < 1:
            raise ValueError(f"capture_after={capture_after}, expected >= 1 (1: capture on first use)")
        self.max_entries, self.max_bytes, self.capture_after = max_entries, int(max_bytes), capture_after
        self.max_cold_keys, self.max_failures = max_cold_keys, max_failures
        self._slots: OrderedDict[Hashable, _Slot[E]] = OrderedDict()
        self._seen: OrderedDict[Hashable, int] = OrderedDict()  # sightings of keys without an entry
        self._failed: OrderedDict[Hashable, str] = OrderedDict()
        self._warming = 0
        self.captures = 0  # entries inserted so far (tests and the benchmark read it)

    # -- lookup ----------------------------------------------------------------------------------------------
    def get(self, key: Hashable) -> E | None:
        """The key's entry (now the most recently used), or None."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        return slot.entry

    def should_capture(self, key: Hashable) -> bool:
        """Count one sighting of a key that has no entry; True when this call should capture it."""
        if key in self._failed:
            return False
        if self._warming:
            self._seen.pop(key, None)
            return True
        seen = self._seen.pop(key, 0) + 1
        if seen >= self.capture_after:
            return True
        self._seen[key] = seen
        while len(self._seen) > self.max_cold_keys:
            self._seen.popitem(last=False)
        return False

    # -- insertion and eviction -------------------------------------------------------------------------------
    def make_room(self, nbytes: int = 0) -> bool:
        """Evict least recently used entries (only unpinned ones outside warming) until one more entry of `nbytes`
        fits; False when it cannot (pinned entries hold the room): the caller then runs the key eagerly."""
        while self._slots and not self._fits(nbytes):
            victim = next((k for k, s in self._slots.items() if self._warming or not s.pinned), None)
            if victim is None:
                return False
            del self._slots[victim]
        return True

    def insert(self, key: Hashable, entry: E, nbytes: int) -> bool:
        """Keep a captured entry (after make_room; evicts again if its real size is larger). False when it could not
        be kept: the caller uses it for this call only."""
        self._seen.pop(key, None)
        self.captures += 1
        if not self.make_room(nbytes):
            return False
        self._slots[key] = _Slot(entry, int(nbytes), self._warming > 0)
        return True

    def _fits(self, nbytes: int) -> bool:
        return len(self._slots) < self.max_entries and self.nbytes + nbytes <= self.max_bytes

    # -- failures ---------------------------------------------------------------------------------------------
    def fail(self, key: Hashable, why: str) -> None:
        self._seen.pop(key, None)
        self._failed[key] = why
        while len(self._failed) > self.max_failures:
            self._failed.popitem(last=False)

    def failed(self, key: Hashable) -> bool:
        return key in self._failed

    def failures(self) -> list[str]:
        return list(self._failed.values())

    # -- warming ----------------------------------------------------------------------------------------------
    @contextmanager
    def warming(self):
        """Inside: every new key captures on first sight and its entry is pinned (the server's warm-up)."""
        self._warming += 1
        try:
            yield
        finally:
            self._warming -= 1

    # -- introspection ----------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values())

    def keys(self) -> list:
        return list(self._slots)

    def entries(self) -> list[E]:
        return [s.entry for s in self._slots.values()]

    def items(self) -> Iterator[tuple[Hashable, E]]:
        return ((k, s.entry) for k, s in self._slots.items())

    def pinned(self, key: Hashable) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.pinned

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots
