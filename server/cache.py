"""The adaptation cache: adapted weights by id, bounded by bytes and by idle age, least recently used evicted first.

An entry holds one task's fast weights (no task axis) and, for the `support` batch-norm policy, the support set's
per-layer batch-norm statistics under those weights (computed once at adapt time; predict normalizes the queries
with them and never forwards the support set again). Tensors stay on the engine's device. An id that is gone is
answered NOT_FOUND saying why: released, expired, evicted, or never issued.

With a shared store (--adaptation-store redis://..., server/store.py) this cache is the near cache in front of it:
entries loaded from the store keep their id (`put(entry, key=...)`), and an entry says whether the store holds it
too (`shared`) and when the store last confirmed it (`validated`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server.status import InvalidArgument, NotFound, ResourceExhausted, clip

# How many ids of dropped entries are remembered, so NOT_FOUND can say why an id is gone.
FORGOTTEN_IDS_KEPT = 65536
ID_PREFIX = "ad-"
ID_CHARS = len(ID_PREFIX) + 24  # "ad-" + 12 random bytes in hex


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Adaptation:
    model: str  # the model name (spec.name)
    params: dict[str, torch.Tensor]  # one task's fast weights, no task axis
    stats: dict[str, torch.Tensor] | None  # support statistics {bn{i}.mean, bn{i}.var} [C] ('support' policy), or None
    steps: int
    inner_lr: float  # 0.0 when learned per-parameter rates were used
    nbytes: int = 0
    created: float = field(default_factory=time.monotonic)
    last_used: float = 0.0
    shared: bool = False  # the shared store holds it too (server/store.py); False: this replica only
    validated: float = 0.0  # when the shared store last confirmed it still holds it (the cache's clock)

    def __post_init__(self):
        self.nbytes = tensor_bytes([*self.params.values(), *(self.stats or {}).values()])
        self.last_used = self.created


def check_id(key: str, field_name: str = "adaptation_id") -> None:
    """An id longer than any id this server issues is refused without a lookup (and echoed only as a prefix)."""
    if len(key) > ID_CHARS:
        raise InvalidArgument(f"{field_name} {clip(key)} is longer than {ID_CHARS} characters, expected an id "
                              "returned by Adapt or AdaptAndPredict (ad- and 24 hex digits)")


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

    def put(self, entry: Adaptation, key: str | None = None) -> str:
        """Store an adaptation and return its id (a new one unless `key` is given: an entry loaded from the shared
        store keeps its id, replacing any entry under it); evicts least recently used entries to fit the budget."""
        if entry.nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"an adaptation of model {entry.model!r} needs {entry.nbytes} bytes, more than the whole cache "
                f"({self.max_bytes} bytes, --cache-bytes); it cannot be kept"
            )
        key = ID_PREFIX + secrets.token_hex(12) if key is None else key
        with self._lock:
            now = self._clock()
            entry.created = entry.last_used = now
            self._expire(now)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
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
        check_id(key, field_name)
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(self.missing_message(key, field_name))
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry

    def find(self, key: str) -> Adaptation | None:
        """The adaptation under `key` (marked recently used), or None."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = now
                self._entries.move_to_end(key)
            return entry

    def discard(self, key: str, why: str, reason: str) -> bool:
        """Drop `key` if held (NOT_FOUND will then say `why`; `reason` is the eviction metric's label)."""
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key, why, reason)
            return True

    def release(self, key: str, field_name: str = "adaptation_id") -> int:
        """Drop an adaptation; returns the bytes freed. NotFound when it is not there."""
        check_id(key, field_name)
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(self.missing_message(key, field_name))
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

    def missing_message(self, key: str, field_name: str = "adaptation_id") -> str:
        """Why `key` is not here, as this cache knows it: released, expired, evicted, or never issued."""
        if not key:
            return f"{field_name} is empty, expected an id returned by Adapt or AdaptAndPredict"
        why = self._forgotten.get(key)
        if why is not None:
            return f"{field_name} {key!r} {why}; adapt again to get a new id"
        return (
            f"{field_name} {clip(key)} is unknown: this server never issued it (or dropped it long ago); "
            "expected an id returned by Adapt or AdaptAndPredict"
        )
