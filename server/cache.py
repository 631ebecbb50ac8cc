"""The adaptation cache: adapted weights by id, bounded by bytes and by idle age, least recently used evicted first.

An entry holds one task's fast weights (no task axis) and, for the `support` batch-norm policy, the preprocessed
support set that predict normalizes queries with. Tensors stay on the engine's device. An id that is gone is
answered NOT_FOUND saying why: released, expired, evicted, or never issued.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server.status import NotFound, ResourceExhausted

# How many ids of dropped entries are remembered, so NOT_FOUND can say why an id is gone.
FORGOTTEN_IDS_KEPT = 65536


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Adaptation:
    model: str  # the model name (spec.name)
    params: dict[str, torch.Tensor]  # one task's fast weights, no task axis
    support_x: torch.Tensor | None  # preprocessed [N*K, *input_shape] (for the 'support' BN policy), or None
    steps: int
    inner_lr: float  # 0.0 when learned per-parameter rates were used
    nbytes: int = 0
    created: float = field(default_factory=time.monotonic)
    last_used: float = 0.0

    def __post_init__(self):
        self.nbytes = tensor_bytes([*self.params.values(), self.support_x])
        self.last_used = self.created


class AdaptationCache:
    """Thread-safe LRU of adaptations with a byte budget and an idle time-to-live (seconds since last use)."""

    def __init__(self, max_bytes: int, ttl_s: float, clock=time.monotonic, on_evict=None):
        if max_bytes <= 0:
            raise ValueError(f"cache max_bytes={max_bytes}, expected > 0")
        if not ttl_s > 0:
            raise ValueError(f"cache ttl_s={ttl_s}, expected > 0 seconds")
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._entries: OrderedDict[str, Adaptation] = OrderedDict()
        self._forgotten: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict or (lambda reason: None)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, entry: Adaptation) -> str:
        """Store an adaptation and return its new id; evicts least recently used entries to fit the budget."""
        if entry.nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"an adaptation of model {entry.model!r} needs {entry.nbytes} bytes, more than the whole cache "
                f"({self.max_bytes} bytes, --cache-bytes); it cannot be kept"
            )
        key = "ad-" + secrets.token_hex(12)
        with self._lock:
            now = self._clock()
            entry.created = entry.last_used = now
            self._expire(now)
            while self._bytes + entry.nbytes > self.max_bytes:
                old_id, _ = next(iter(self._entries.items()))
                self._drop(
                    old_id,
                    f"was evicted from the cache (least recently used; the cache holds at most {self.max_bytes} "
                    "bytes, --cache-bytes)",
                    "lru",
                )
            self._entries[key] = entry
            self._bytes += entry.nbytes
        return key

    def get(self, key: str, field_name: str = "adaptation_id") -> Adaptation:
        """The adaptation under `key` (marks it recently used), or NotFound saying why it is not there."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(self._missing_message(key, field_name))
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry

    def release(self, key: str, field_name: str = "adaptation_id") -> int:
        """Drop an adaptation; returns the bytes freed. NotFound when it is not there."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(self._missing_message(key, field_name))
            self._drop(key, "was released", "released")
            return entry.nbytes

    def expire(self) -> None:
        with self._lock:
            self._expire(self._clock())

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            idle = now - entry.last_used
            if idle <= self.ttl_s:
                break  # LRU order: every later entry was used more recently
            self._drop(key, f"expired (unused for {idle:.0f} s; entries expire {self.ttl_s:g} s after last use)", "ttl")

    def _drop(self, key: str, why: str, reason: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self._forgotten[key] = why
        while len(self._forgotten) > FORGOTTEN_IDS_KEPT:
            self._forgotten.popitem(last=False)
        self._on_evict(reason)

    def _missing_message(self, key: str, field_name: str) -> str:
        if not key:
            return f"{field_name} is empty, expected an id returned by Adapt or AdaptAndPredict"
        why = self._forgotten.get(key)
        if why is not None:
            return f"{field_name} {key!r} {why}; adapt again to get a new id"
        return (
            f"{field_name} {key!r} is unknown: this server never issued it (or dropped it long ago); "
            "expected an id returned by Adapt or AdaptAndPredict"
        )
