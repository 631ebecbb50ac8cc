"""Concurrency: 64 clients at once get what each would get alone; cancellation and deadlines free their slots;
the adaptation cache evicts by bytes (LRU) and by idle age."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from server.client import FastAdaptClient, adapt_request
from tests.server.conftest import TINY_SPECS, random_task

SPEC = TINY_SPECS["tiny-5w"]


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_64_concurrent_clients_each_get_the_result_they_get_alone(make_server):
    server = make_server(max_wait_ms=50)
    tasks = [random_task(SPEC, shots=1, queries=4, seed=100 + i) for i in range(64)]
    barrier = threading.Barrier(64)
    together: dict[int, tuple] = {}
    failures: list[BaseException] = []

    def one_client(i):
        try:
            with FastAdaptClient(server.address, timeout=120) as client:
                client.wait_ready()
                barrier.wait(timeout=60)
                together[i] = client.adapt_and_predict("tiny-5w", *tasks[i])
        except BaseException as exc:  # reported below, with the thread's own error
            failures.append(exc)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not failures, failures[:3]
    assert len(together) == 64
    sizes = [a.timings["batch_tasks"] for a, _ in together.values()]
    assert max(sizes) > 1, "no requests were coalesced"

    with FastAdaptClient(server.address, timeout=60) as client:
        for i, (sx, sy, qx) in enumerate(tasks):
            adapted, prediction = client.adapt_and_predict("tiny-5w", sx, sy, qx)
            assert adapted.timings["batch_tasks"] == 1
            shared_adapted, shared_prediction = together[i]
            np.testing.assert_allclose(shared_adapted.support_loss, adapted.support_loss, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(shared_prediction.logits, prediction.logits, atol=1e-5, rtol=1e-5)
            # the cached weights of the shared batch predict like the lone adaptation
            cached = client.predict(shared_adapted.adaptation_id, qx).logits
            np.testing.assert_allclose(cached, prediction.logits, atol=1e-5, rtol=1e-5)


def test_deadline_and_cancel_free_the_slot_before_any_work(make_server):
    server = make_server(max_wait_ms=3000, batch_wait="fixed", max_queue=1)
    sx, sy, _ = random_task(SPEC)
    with FastAdaptClient(server.address, timeout=30) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.adapt("tiny-5w", sx, sy, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2
        assert wait_for(lambda: server.batcher.queued == 0), "the expired request still holds its queue slot"

        future = client.stub.Adapt.future(adapt_request("tiny-5w", sx, sy), timeout=30)
        assert wait_for(lambda: server.batcher.queued == 1)
        with pytest.raises(grpc.RpcError) as err:  # the single slot is taken
            client.adapt("tiny-5w", sx, sy, timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in err.value.details()
        future.cancel()
        assert wait_for(lambda: server.batcher.queued == 0), "the cancelled request still holds its queue slot"
        assert server.batcher.batches_run == 0, "cancelled requests must not reach the engine"

        adapted = client.adapt("tiny-5w", sx, sy, timeout=30)  # the freed slot serves the next request
        assert adapted.adaptation_id and server.batcher.batches_run == 1
    codes = {sample.labels.get("code") for metric in server.metrics.requests.collect() for sample in metric.samples}
    assert {"DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "OK"} <= codes


def test_cache_evicts_least_recently_used_to_fit_its_bytes(make_server):
    probe = make_server()
    sx, sy, qx = random_task(SPEC)
    with FastAdaptClient(probe.address) as client:
        size = client.adapt("tiny-5w", sx, sy).adaptation_bytes
    server = make_server(cache_bytes=int(2.5 * size))
    with FastAdaptClient(server.address) as client:
        a = client.adapt("tiny-5w", sx, sy).adaptation_id
        b = client.adapt("tiny-5w", sx, sy).adaptation_id
        client.predict(a, qx)  # a is now the most recently used
        c = client.adapt("tiny-5w", sx, sy).adaptation_id
        assert len(server.cache) == 2 and server.cache.nbytes == 2 * size
        client.predict(a, qx)
        client.predict(c, qx)
        with pytest.raises(grpc.RpcError) as err:
            client.predict(b, qx)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"adaptation_id '{b}' was evicted from the cache (least recently used" in err.value.details()


def test_cache_expires_idle_adaptations(make_server):
    server = make_server(cache_ttl_s=0.5)
    sx, sy, qx = random_task(SPEC)
    with FastAdaptClient(server.address) as client:
        a = client.adapt("tiny-5w", sx, sy).adaptation_id
        time.sleep(0.8)
        with pytest.raises(grpc.RpcError) as err:
            client.predict(a, qx)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.export_adapted(a)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_device_out_of_memory_is_resource_exhausted_and_the_server_keeps_serving(make_server, monkeypatch):
    import torch

    from kernels.engine import Engine

    real = Engine.adapt_predict

    def tight(self, model, support_x, *args, **kwargs):  # a device that holds one task of at most 5 queries
        if support_x.shape[0] > 1 or args[1].shape[1] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, model, support_x, *args, **kwargs)

    server = make_server(warmup="none")
    monkeypatch.setattr(Engine, "adapt_predict", tight)
    spec = TINY_SPECS["tiny-5w"]
    with FastAdaptClient(server.address, timeout=30) as client:
        sx, sy, qx = random_task(spec, queries=9, seed=1)
        with pytest.raises(grpc.RpcError) as err:
            client.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ran out of memory for one task of model 'tiny-5w' (5 support images, 9 queries" in err.value.details()
        sx, sy, qx = random_task(spec, queries=5, seed=2)
        _, prediction = client.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)
        assert prediction.logits.shape == (5, spec.ways)
