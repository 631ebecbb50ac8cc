"""The shared adaptation store (server/store.py): replicas sharing a real redis-server serve each other's adaptations
with the same results, a release is seen everywhere within a second, NOT_FOUND says why, and an unreachable store
fails fast and locally. Replicas here are in-process servers (real gRPC, real Redis); tests/server/test_cluster.py
runs them as processes behind Envoy."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import pytest

from models.adaptation import decode
from server.__main__ import parse_args
from server.store import AD_KEY, FATE_KEY, REVALIDATE_S, describe_url, parse_store_url
from tests.server.conftest import TINY_SPECS, random_task

SPEC = TINY_SPECS["tiny-5w"]  # 'support' batch-norm policy: its stored form carries support statistics
NOT_FOUND, UNAVAILABLE = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE


def store_ops(server, op: str, result: str) -> float:
    value = server.metrics.registry.get_sample_value("fastadapt_store_operations_total", {"op": op, "result": result})
    return value or 0.0


@pytest.fixture
def replicas(make_server, redis_server):
    """Two replicas sharing one Redis, and a client for each."""
    from server.client import FastAdaptClient

    a = make_server(adaptation_store=redis_server.url)
    b = make_server(adaptation_store=redis_server.url)
    with FastAdaptClient(a.address, timeout=30) as ca, FastAdaptClient(b.address, timeout=30) as cb:
        yield a, b, ca, cb


def test_an_adaptation_made_on_one_replica_is_served_by_another_with_the_same_results(replicas, redis_server):
    a, b, ca, cb = replicas
    sx, sy, qx = random_task(SPEC, queries=4, seed=1)
    adapted = ca.adapt(SPEC.name, sx, sy)
    assert adapted.shared and adapted.store_warning == ""
    here = ca.predict(adapted.adaptation_id, qx)
    there = cb.predict(adapted.adaptation_id, qx)
    np.testing.assert_array_equal(there.logits, here.logits)
    np.testing.assert_array_equal(there.labels, here.labels)
    assert cb.export_adapted(adapted.adaptation_id) == ca.export_adapted(adapted.adaptation_id)
    # b loaded it from the store once (GETEX), then served it from its near cache
    assert store_ops(b, "get", "hit") == 1 and store_ops(b, "near", "hit") >= 1
    assert a.metrics.registry.get_sample_value("fastadapt_store_latency_seconds_count", {"op": "put"}) == 1

    # Stored form: models/adaptation.py's bytes, decodable against the model's spec, with the idle TTL set.
    raw = redis_server.client()
    blob = raw.get(AD_KEY + adapted.adaptation_id)
    stored = decode(blob, a.registry.get(SPEC.name).spec)
    assert stored.steps == adapted.steps and stored.stats is not None
    assert 0 < raw.pttl(AD_KEY + adapted.adaptation_id) <= a.config.cache_ttl_s * 1e3
    assert raw.get(FATE_KEY + adapted.adaptation_id) == b"issued"

    assert cb.release(adapted.adaptation_id) == adapted.adaptation_bytes  # released on the replica that did not make it
    assert raw.get(AD_KEY + adapted.adaptation_id) is None and raw.get(FATE_KEY + adapted.adaptation_id) == b"released"
    with pytest.raises(grpc.RpcError) as err:  # at once here; on a within REVALIDATE_S (the next test)
        cb.predict(adapted.adaptation_id, qx)
    assert err.value.code() == NOT_FOUND and "was released" in err.value.details()


def test_a_released_id_is_not_found_on_every_replica_within_a_second(replicas):
    a, b, ca, cb = replicas
    sx, sy, qx = random_task(SPEC, seed=2)
    adapted = ca.adapt(SPEC.name, sx, sy)
    cb.predict(adapted.adaptation_id, qx)  # both near caches hold it, freshly confirmed
    ca.predict(adapted.adaptation_id, qx)
    released = time.monotonic()
    ca.release(adapted.adaptation_id)
    while True:  # b's near cache may serve it for at most REVALIDATE_S more
        try:
            cb.predict(adapted.adaptation_id, qx)
        except grpc.RpcError as exc:
            assert exc.code() == NOT_FOUND and "was released" in exc.details(), exc.details()
            break
        assert time.monotonic() - released < 1.0, "a released id was still served after 1 s"
        time.sleep(0.02)
    assert time.monotonic() - released < REVALIDATE_S + 0.5
    with pytest.raises(grpc.RpcError) as err:
        cb.release(adapted.adaptation_id)
    assert err.value.code() == NOT_FOUND and "was released" in err.value.details()


def test_not_found_says_expired_or_evicted_and_unknown_ids_are_unknown(make_server, redis_server):
    from server.client import FastAdaptClient

    a = make_server(adaptation_store=redis_server.url, cache_ttl_s=2.0)
    b = make_server(adaptation_store=redis_server.url, cache_ttl_s=2.0)
    sx, sy, qx = random_task(SPEC, seed=3)
    with FastAdaptClient(a.address, timeout=30) as ca, FastAdaptClient(b.address, timeout=30) as cb:
        adapted = ca.adapt(SPEC.name, sx, sy)
        for _ in range(3):  # used on b every 0.8 s: the idle TTL restarts, it outlives 2 s (margins for a loaded box)
            time.sleep(0.8)
            cb.predict(adapted.adaptation_id, qx)
        time.sleep(3.0)  # idle past the TTL everywhere
        for client in (ca, cb):
            with pytest.raises(grpc.RpcError) as err:
                client.predict(adapted.adaptation_id, qx)
            assert err.value.code() == NOT_FOUND
            assert "expired or was evicted from the shared adaptation store" in err.value.details()
            assert "2 s after last use" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            cb.predict("ad-" + "0" * 24, qx)
        assert err.value.code() == NOT_FOUND and "never issued it" in err.value.details()


def test_a_full_store_evicts_adaptations_instead_of_refusing_them_and_not_found_says_so(make_server, redis_server):
    from server.client import FastAdaptClient

    raw = redis_server.client()
    raw.config_set("maxmemory-policy", "volatile-lru")  # the documented policy
    a = make_server(adaptation_store=redis_server.url)
    b = make_server(adaptation_store=redis_server.url)
    sx, sy, qx = random_task(SPEC, seed=4)
    with FastAdaptClient(a.address, timeout=30) as ca, FastAdaptClient(b.address, timeout=30) as cb:
        first = ca.adapt(SPEC.name, sx, sy)
        size = len(raw.get(AD_KEY + first.adaptation_id))
        raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) + 20 * size)
        more = [ca.adapt(SPEC.name, sx, sy) for _ in range(60)]
        assert all(a.shared for a in more), [a.store_warning for a in more if not a.shared][:1]  # never refused
        ids = [first.adaptation_id] + [a.adaptation_id for a in more]
        assert raw.info("stats")["evicted_keys"] > 0
        kept = [i for i in ids if raw.exists(AD_KEY + i)]
        assert 0 < len(kept) < len(ids)  # (Redis' LRU clock ticks once a second: which ones go is not exact)
        gone = next(i for i in ids if i not in kept)
        with pytest.raises(grpc.RpcError) as err:
            cb.predict(gone, qx)  # b never held it: only the store could answer
        assert err.value.code() == NOT_FOUND
        details = err.value.details()
        assert "expired or was evicted" in details or "never issued" in details, details
        raw.config_set("maxmemory", 0)
        cb.predict(next(i for i in ids if raw.exists(AD_KEY + i)), qx)  # the survivors serve on any replica


def test_concurrent_predicts_of_one_id_load_it_from_the_store_once(replicas):
    a, b, ca, cb = replicas
    sx, sy, qx = random_task(SPEC, seed=5)
    adapted = ca.adapt(SPEC.name, sx, sy)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cb.predict(adapted.adaptation_id, qx).labels, range(16)))
    assert all(np.array_equal(r, results[0]) for r in results)
    assert store_ops(b, "get", "hit") == 1


def test_with_the_store_unreachable_replicas_fail_fast_and_locally_then_reconnect(replicas, redis_server):
    a, b, ca, cb = replicas
    sx, sy, qx = random_task(SPEC, seed=6)
    made_on_a = ca.adapt(SPEC.name, sx, sy)
    assert made_on_a.shared
    redis_server.stop()  # SIGKILL: the store vanishes

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:  # b never held it
        cb.predict(made_on_a.adaptation_id, qx)
    assert time.monotonic() - started < 2.0, "Predict hung on an unreachable store"
    assert err.value.code() == UNAVAILABLE
    assert describe_url(redis_server.url) in err.value.details() and "not held by this replica" in err.value.details()
    ca.predict(made_on_a.adaptation_id, qx)  # a holds it: served from its near cache

    local = ca.adapt(SPEC.name, sx, sy)  # Adapt keeps working, and says the adaptation is not shared
    assert local.adaptation_id and not local.shared
    assert "not shared" in local.store_warning and describe_url(redis_server.url) in local.store_warning
    ca.predict(local.adaptation_id, qx)
    _, prediction = cb.adapt_and_predict(SPEC.name, sx, sy, qx, keep=False)  # skip_cache: never touches the store
    assert prediction.labels.shape == (qx.shape[0],)
    with pytest.raises(grpc.RpcError) as err:  # a shared id cannot be released while the store is away
        ca.release(made_on_a.adaptation_id)
    assert err.value.code() == UNAVAILABLE and "cannot release" in err.value.details()
    assert store_ops(b, "get", "error") >= 1 and b.metrics.registry.get_sample_value("fastadapt_store_up") == 0

    redis_server.start()  # back, empty (no persistence), on the same port
    deadline = time.monotonic() + 5
    while not (again := ca.adapt(SPEC.name, sx, sy)).shared:
        assert time.monotonic() < deadline, f"still not shared 5 s after the store came back: {again.store_warning}"
        time.sleep(0.1)
    cb.predict(again.adaptation_id, qx)
    assert b.metrics.registry.get_sample_value("fastadapt_store_up") == 1
    assert ca.release(local.adaptation_id) == local.adaptation_bytes  # the local-only one is released locally


def test_a_corrupt_stored_adaptation_is_refused_naming_the_store_and_the_problem(replicas, redis_server):
    a, b, ca, cb = replicas
    sx, sy, qx = random_task(SPEC, seed=7)
    adapted = ca.adapt(SPEC.name, sx, sy)
    raw = redis_server.client()
    blob = bytearray(raw.get(AD_KEY + adapted.adaptation_id))
    blob[-40] ^= 0xFF
    raw.set(AD_KEY + adapted.adaptation_id, bytes(blob), px=60_000)
    with pytest.raises(grpc.RpcError) as err:
        cb.predict(adapted.adaptation_id, qx)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "checksum" in err.value.details() and describe_url(redis_server.url) in err.value.details()


def test_the_store_flag_takes_memory_or_a_redis_url_and_never_logs_its_password(capsys):
    assert parse_args([]).adaptation_store == "memory"
    assert parse_args(["--adaptation-store", "redis://10.0.0.5:6380/2"]).adaptation_store == "redis://10.0.0.5:6380/2"
    for bad in ("redis", "http://host:6379/0", "redis://host:6379/x", "redis://:6379/0"):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--adaptation-store", bad])
        assert exit_.value.code == 2
        assert "expected memory or redis://HOST:PORT/DB" in capsys.readouterr().err
    with pytest.raises(ValueError, match="characters"):
        parse_store_url("redis://" + "h" * 500 + ":x")
    assert describe_url("redis://user:s3cret@cache.internal:6390/1") == "redis://cache.internal:6390/1"
    assert describe_url("rediss://:s3cret@cache.internal/0") == "rediss://cache.internal:6379/0"


def test_the_near_cache_keeps_a_loaded_entry_under_its_id_and_counts_its_bytes_once():
    import torch

    from server.cache import Adaptation, AdaptationCache

    cache = AdaptationCache(max_bytes=1000, ttl_s=60)
    first = Adaptation("m", {"w": torch.zeros(50)}, None, steps=1, inner_lr=0.1)
    key = cache.put(first)
    again = Adaptation("m", {"w": torch.ones(50)}, None, steps=1, inner_lr=0.1, shared=True)
    assert cache.put(again, key=key) == key  # reloaded from the store: same id, replaces, no double count
    assert len(cache) == 1 and cache.nbytes == 200 and cache.find(key) is again
    assert cache.find("ad-" + "1" * 24) is None
    assert cache.discard(key, "is gone from the shared adaptation store", "store") and cache.nbytes == 0
    assert not cache.discard(key, "again", "store")
    assert "is gone from the shared adaptation store" in cache.missing_message(key)


def test_the_client_names_the_adaptation_in_x_adaptation_id_metadata(server):
    """Envoy's ring hash (deploy/envoy.yaml) keys on it: calls about one adaptation stay on one replica."""
    from server.client import ADAPTATION_ID_HEADER, FastAdaptClient
    from server.wire import pb_grpc

    seen = []

    class Recorder(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen.append((details.method.rsplit("/", 1)[-1], dict(details.metadata or ())))
            return continuation(details, request)

    sx, sy, qx = random_task(SPEC, seed=8)
    with FastAdaptClient(server.address, timeout=30) as client:
        client.stub = pb_grpc.FastAdaptStub(grpc.intercept_channel(client.channel, Recorder()))
        adapted = client.adapt(SPEC.name, sx, sy)
        client.predict(adapted.adaptation_id, qx)
        client.export_adapted(adapted.adaptation_id)
        client.release(adapted.adaptation_id)
    sent = {method: metadata.get(ADAPTATION_ID_HEADER) for method, metadata in seen}
    assert sent == {"Adapt": None, "Predict": adapted.adaptation_id, "ExportAdapted": adapted.adaptation_id,
                    "Release": adapted.adaptation_id}
    assert not adapted.shared and adapted.store_warning == ""  # --adaptation-store memory: nothing is shared
