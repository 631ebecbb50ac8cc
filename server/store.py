"""Where adaptations live between the Adapt that made them and the calls that use them (--adaptation-store).

`memory` (the default): the in-process AdaptationCache (server/cache.py) alone; an id is known to its replica only.

`redis://HOST:PORT/DB`: every kept adaptation is also written, in its stored form (models/adaptation.py: versioned,
checksummed, no pickle), to Redis under `fastadapt:ad:<id>` with the idle TTL (`SET ... PX`, refreshed by every
read: `GETEX ... PX`, `PEXPIRE`), so any replica sharing the store serves Predict, ExportAdapted and Release for any
id. The in-process cache stays in front as a near cache. `fastadapt:id:<id>` records an id's fate ("issued", then
"released"), kept FATE_GRACE_S longer than the adaptation (its TTL restarted with the adaptation's), so that NOT_FOUND
can still say released / expired or evicted / never issued. Redis' `maxmemory-policy` should be `volatile-lru`: every
key has a TTL, and a full store then evicts the least recently used adaptations (and their small fate records, which
are read together with them) instead of refusing writes.

Consistency: Adapt answers only after the store acknowledged the write (`shared: true`), so an id a client holds is
readable everywhere. A near-cache entry the store confirmed less than REVALIDATE_S ago is served as is; an older one
is re-checked (`PEXPIRE`, which also refreshes its TTL) and dropped when the store no longer has it: a released id
is NOT_FOUND on every replica within REVALIDATE_S.

Failures: every store call has short socket timeouts, and after a failure the store is not tried again for
RETRY_AFTER_S (calls in between fail at once), then the next call reconnects. While it is unreachable:
Adapt keeps the adaptation on this replica and says so (`shared: false`, `store_warning`, a warning log line);
Predict / ExportAdapted of an id this replica holds are served from the near cache; of any other id they are
UNAVAILABLE naming the store; Release of a shared id is UNAVAILABLE (releasing it here alone would let the other
replicas keep serving it); AdaptAndPredict with skip_cache never touches the store.

Threads: Redis I/O runs on the event loop (redis.asyncio); encoding and decoding (checksum, copies) run on a small
thread pool of their own, on CPU tensors; moving tensors to or from a GPU runs on the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from models.adaptation import MAGIC, AdaptationFormatError, decode, encode
from server.cache import Adaptation, AdaptationCache, check_id
from server.status import Internal, NotFound, Unavailable, clip
from server.telemetry import ServerMetrics, get_logger

CONNECT_TIMEOUT_S = 0.5  # connecting to Redis
IO_TIMEOUT_S = 1.0  # one command's reply
RETRY_AFTER_S = 0.5  # after a failure, calls fail at once this long; the next one then reconnects
REVALIDATE_S = 0.5  # a shared near-cache entry confirmed by the store this recently is served without asking it
# (or a quarter of the idle TTL, if shorter: a re-check restarts the TTL in the store, which must not lapse meanwhile)
FATE_GRACE_S = 3600  # how long an id's fate ("issued" / "released") outlives its adaptation
AD_KEY = "fastadapt:ad:"
FATE_KEY = "fastadapt:id:"
ERROR_CHARS = 200


class StoreUnavailable(Unavailable):
    """The shared adaptation store did not answer (or refused the call)."""


@dataclass
class Kept:
    """What Adapt reports about a kept adaptation."""

    adaptation_id: str
    nbytes: int
    shared: bool  # readable by every replica sharing the store
    warning: str = ""  # why not, when it is not


def parse_store_url(value: str) -> str:
    """`memory`, or a redis:// (rediss://: TLS) URL naming host, port and database; ValueError otherwise."""
    if value == "memory":
        return value
    expected = "expected memory or redis://HOST:PORT/DB (rediss:// for TLS)"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--adaptation-store {clip(value)}: {exc}; {expected}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"--adaptation-store {clip(value)}: {expected}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"--adaptation-store {clip(value)}: database {clip(db)} is not a number; {expected}")
    if port == 0:
        raise ValueError(f"--adaptation-store {clip(value)}: port 0; {expected}")
    return value


def describe_url(url: str) -> str:
    """The store's address without credentials (for logs and messages)."""
    if url == "memory":
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}/{parts.path.strip('/') or '0'}"


def stored_header(blob: bytes) -> dict:
    """The JSON header of a stored adaptation, read without decoding its tensors (models/adaptation.py's layout)."""
    prefix = struct.Struct("<6sHI")
    if len(blob) < prefix.size:
        raise AdaptationFormatError(f"stored adaptation has {len(blob)} bytes, expected a header (truncated)")
    magic, _, length = prefix.unpack_from(blob, 0)
    if magic != MAGIC or prefix.size + length > len(blob):
        raise AdaptationFormatError(f"stored adaptation starts with {bytes(magic)!r} and a {length}-byte header, "
                                    f"expected {MAGIC!r} and a header that fits its {len(blob)} bytes")
    try:
        return json.loads(bytes(blob[prefix.size:prefix.size + length]))
    except ValueError as exc:
        raise AdaptationFormatError(f"stored adaptation header is not JSON: {exc}") from None


def stored_tensor_bytes(blob: bytes) -> int:
    """Bytes of the tensors a stored adaptation holds (what Release reports as freed)."""
    return sum(int(t["nbytes"]) for t in stored_header(blob).get("tensors", []))


class LocalAdaptations:
    """`--adaptation-store memory`: the in-process cache alone."""

    url = "memory"

    def __init__(self, cache: AdaptationCache):
        self.cache = cache

    async def start(self) -> None:
        pass

    async def put(self, entry: Adaptation, spec) -> Kept:
        return Kept(self.cache.put(entry), entry.nbytes, shared=False)

    async def get(self, key: str, field_name: str = "adaptation_id") -> Adaptation:
        return self.cache.get(key, field_name)

    async def release(self, key: str, field_name: str = "adaptation_id") -> int:
        return self.cache.release(key, field_name)

    async def close(self) -> None:
        pass


class RedisStore:
    """Stored adaptations by id in Redis, with an idle TTL; every failure is a StoreUnavailable naming the store."""

    def __init__(self, url: str, ttl_s: float, metrics: ServerMetrics, clock=time.monotonic):
        self.url, self.name = parse_store_url(url), describe_url(url)
        self.ttl_ms = max(1, round(ttl_s * 1e3))
        self.fate_ms = self.ttl_ms + FATE_GRACE_S * 1000
        self.metrics, self._clock = metrics, clock
        # One quick retry: a pooled connection that died with a restarted Redis is replaced at once.
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=IO_TIMEOUT_S,
                                             retry=Retry(NoBackoff(), 1), retry_on_timeout=False)
        self._down_until = 0.0
        self._last_error = ""
        self.up = True
        metrics.store_up.set(1)
        self._log = get_logger()

    async def _call(self, op: str, command, classify=None):
        if self._clock() < self._down_until:
            self.metrics.store_ops.labels(op=op, result="error").inc()
            raise StoreUnavailable(f"the adaptation store {self.name} is unreachable ({self._last_error})")
        start = time.perf_counter()
        try:
            result = await command()
        except (RedisError, OSError) as exc:
            self.metrics.store_ops.labels(op=op, result="error").inc()
            self._last_error = f"{type(exc).__name__}: {str(exc)[:ERROR_CHARS]}"
            self._down_until = self._clock() + RETRY_AFTER_S
            if self.up:
                self.up = False
                self.metrics.store_up.set(0)
                self._log.error("adaptation store unreachable", extra={"store": self.name, "op": op,
                                                                       "error": self._last_error})
            raise StoreUnavailable(f"the adaptation store {self.name} is unreachable ({self._last_error})") from None
        finally:
            self.metrics.store_latency.labels(op=op).observe(time.perf_counter() - start)
        if not self.up:
            self.up = True
            self.metrics.store_up.set(1)
            self._log.info("adaptation store reachable again", extra={"store": self.name})
        self.metrics.store_ops.labels(op=op, result=classify(result) if classify else "ok").inc()
        return result

    async def ping(self) -> None:
        await self._call("ping", self.redis.ping)

    async def write(self, key: str, blob: bytes) -> None:
        async def command():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(AD_KEY + key, blob, px=self.ttl_ms)
                pipe.set(FATE_KEY + key, b"issued", px=self.fate_ms)
                return await pipe.execute()

        await self._call("put", command)

    async def read(self, key: str) -> bytes | None:
        """The stored bytes (and their TTL restarted), or None when the store does not hold `key`."""
        async def command():
            async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
                pipe.getex(AD_KEY + key, px=self.ttl_ms)
                pipe.pexpire(FATE_KEY + key, self.fate_ms)
                return (await pipe.execute())[0]

        return await self._call("get", command, lambda blob: "miss" if blob is None else "hit")

    async def touch(self, key: str) -> bool:
        """Whether the store still holds `key` (its TTL restarted)."""
        async def command():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.pexpire(AD_KEY + key, self.ttl_ms)
                pipe.pexpire(FATE_KEY + key, self.fate_ms)
                return bool((await pipe.execute())[0])

        return await self._call("touch", command, lambda held: "hit" if held else "miss")

    async def remove(self, key: str) -> bytes | None:
        """Delete `key` and record it released, atomically; the bytes it held, or None when there were none."""
        async def command():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.getdel(AD_KEY + key)
                pipe.set(FATE_KEY + key, b"released", px=FATE_GRACE_S * 1000)
                return (await pipe.execute())[0]

        return await self._call("release", command, lambda blob: "miss" if blob is None else "hit")

    async def fate(self, key: str) -> str | None:
        """'issued' (the adaptation then expired or was evicted), 'released', or None (never issued, or long ago)."""
        value = await self._call("fate", lambda: self.redis.get(FATE_KEY + key))
        return None if value is None else value.decode("utf-8", "replace")

    async def close(self) -> None:
        await self.redis.aclose()


def _to_cpu(params: dict, stats: dict | None) -> tuple[dict, dict | None]:
    return ({k: v.cpu() for k, v in params.items()},
            None if stats is None else {k: v.cpu() for k, v in stats.items()})


def _to_device(params: dict, stats: dict | None, device: torch.device) -> tuple[dict, dict | None]:
    return ({k: v.to(device) for k, v in params.items()},
            None if stats is None else {k: v.to(device) for k, v in stats.items()})


class SharedAdaptations:
    """`--adaptation-store redis://...`: the near cache in front of a RedisStore (see the module docstring)."""

    def __init__(self, cache: AdaptationCache, store: RedisStore, registry, batcher, device: torch.device,
                 metrics: ServerMetrics, clock=time.monotonic):
        self.cache, self.store, self.registry, self.batcher = cache, store, registry, batcher
        self.device, self.metrics, self._clock = torch.device(device), metrics, clock
        self.url = store.name
        self.revalidate_s = min(REVALIDATE_S, store.ttl_ms / 4e3)
        # Encoding / decoding (SHA-256, copies) off the event loop; CPU tensors only, no parallel torch ops.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastadapt-store")
        self._loading: dict[str, asyncio.Future] = {}  # id -> the load from the store in flight
        self._log = get_logger()

    async def start(self) -> None:
        try:
            await self.store.ping()
            self._log.info("adaptation store connected", extra={"store": self.url})
        except StoreUnavailable as exc:
            self._log.warning("adaptation store unreachable at start-up: adaptations stay on this replica until it "
                              "answers", extra={"store": self.url, "error": exc.message})

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def put(self, entry: Adaptation, spec) -> Kept:
        key = self.cache.put(entry)  # usable here at once; ResourceExhausted when it cannot fit at all
        try:
            params, stats = entry.params, entry.stats
            if self.device.type != "cpu":  # device -> host copies belong to the engine's thread
                params, stats = await self.batcher.run_exclusive(_to_cpu, params, stats)
            blob = await self._off_loop(encode, spec, params, stats, entry.steps, entry.inner_lr, time.time())
            await self.store.write(key, blob)
        except StoreUnavailable as exc:
            warning = f"adaptation {key} is kept on this replica only, not shared with other replicas: {exc.message}"
            self._log.warning("adaptation not shared", extra={"adaptation_id": key, "store": self.url,
                                                              "error": exc.message})
            return Kept(key, entry.nbytes, shared=False, warning=warning)
        entry.shared, entry.validated = True, self._clock()
        return Kept(key, entry.nbytes, shared=True)

    async def get(self, key: str, field_name: str = "adaptation_id") -> Adaptation:
        check_id(key, field_name)
        if not key:
            return self.cache.get(key, field_name)  # NOT_FOUND: the id is empty
        entry = self.cache.find(key)
        if entry is not None:
            self.metrics.store_ops.labels(op="near", result="hit").inc()
            if not entry.shared or self._clock() - entry.validated <= self.revalidate_s:
                return entry
            try:
                held = await self.store.touch(key)
            except StoreUnavailable:
                return entry  # the store cannot say otherwise: serve what this replica holds
            if held:
                entry.validated = self._clock()
                return entry
            self.cache.discard(key, "is gone from the shared adaptation store", "store")
            raise NotFound(await self._gone_message(key, field_name))
        self.metrics.store_ops.labels(op="near", result="miss").inc()
        load = self._loading.get(key)
        if load is None:  # concurrent calls for one id share one load
            load = self._loading[key] = asyncio.ensure_future(self._load(key, field_name))
            load.add_done_callback(lambda done: (self._loading.pop(key, None),
                                                 done.cancelled() or done.exception()))
        return await asyncio.shield(load)

    async def _load(self, key: str, field_name: str) -> Adaptation:
        try:
            blob = await self.store.read(key)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{field_name} {key!r} is not held by this replica and {exc.message}; retry "
                                   "once the store is back (or on the replica that made it)") from None
        if blob is None:
            raise NotFound(await self._gone_message(key, field_name))
        try:
            model = self.registry.get(str(stored_header(blob).get("model", "")), f"the model of {field_name}")
            stored = await self._off_loop(decode, blob, model.spec, "cpu")
        except AdaptationFormatError as exc:
            raise Internal(f"the adaptation store {self.url} holds an unusable adaptation under {key!r}: "
                           f"{exc}") from None
        params, stats = stored.params, stored.stats
        if self.device.type != "cpu":  # host -> device copies belong to the engine's thread
            params, stats = await self.batcher.run_exclusive(_to_device, params, stats, self.device)
        entry = Adaptation(stored.model, params, stats, stored.steps, stored.inner_lr, shared=True)
        self.cache.put(entry, key=key)
        entry.validated = self._clock()
        return entry

    async def release(self, key: str, field_name: str = "adaptation_id") -> int:
        check_id(key, field_name)
        entry = self.cache.find(key) if key else None
        if entry is not None and not entry.shared:
            return self.cache.release(key, field_name)  # this replica's alone: the store never had it
        if not key:
            return self.cache.release(key, field_name)  # NOT_FOUND: the id is empty
        try:
            blob = await self.store.remove(key)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"cannot release {field_name} {key!r}: {exc.message}; releasing it on this "
                                   "replica alone would leave the others serving it, retry once the store is "
                                   "back") from None
        if blob is None:  # released elsewhere (or expired) before this call
            self.cache.discard(key, "is gone from the shared adaptation store", "store")
            raise NotFound(await self._gone_message(key, field_name))
        if entry is not None:
            self.cache.discard(key, "was released", "released")
            return entry.nbytes
        return stored_tensor_bytes(blob)

    async def _gone_message(self, key: str, field_name: str) -> str:
        try:
            fate = await self.store.fate(key)
        except StoreUnavailable:
            fate = None
        if fate == "released":
            return f"{field_name} {key!r} was released; adapt again to get a new id"
        if fate == "issued":
            return (f"{field_name} {key!r} expired or was evicted from the shared adaptation store (entries expire "
                    f"{self.store.ttl_ms / 1e3:g} s after last use, --cache-ttl-s; a full store evicts the least "
                    "recently used); adapt again to get a new id")
        return self.cache.missing_message(key, field_name)

    async def close(self) -> None:
        await self.store.close()
        self._pool.shutdown(wait=False)


def open_adaptations(url: str, cache: AdaptationCache, registry, batcher, device, metrics: ServerMetrics,
                     ttl_s: float):
    """The adaptation store `--adaptation-store url` names, with `cache` in front."""
    if parse_store_url(url) == "memory":
        return LocalAdaptations(cache)
    return SharedAdaptations(cache, RedisStore(url, ttl_s, metrics), registry, batcher, device, metrics)
