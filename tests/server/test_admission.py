"""Admission control and health over a real gRPC server: RPCs and bytes in flight are bounded, health probes pass
while the server is saturated, and a lost device turns health NOT_SERVING and makes `serve` exit non-zero."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import DEVICE_LOST_EXIT, ServerConfig, serve
from server.client import FastAdaptClient, adapt_request
from server.wire import encode, pb
from tests.server.conftest import TINY_SPECS, random_task

SPEC = TINY_SPECS["tiny-5w"]


def concurrent_adapts(address: str, count: int, shots: int = 1) -> list:
    """`count` Adapt calls at once; each result is the response or the grpc.RpcError."""
    def one(i):
        sx, sy, _ = random_task(SPEC, shots=shots, seed=i)
        with FastAdaptClient(address, timeout=30) as client:
            try:
                return client.stub.Adapt(adapt_request("tiny-5w", sx, sy), timeout=30)
            except grpc.RpcError as err:
                return err

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def refusals(results) -> list[grpc.RpcError]:
    return [r for r in results if isinstance(r, grpc.RpcError)]


def test_rpcs_over_the_concurrency_bound_are_refused_naming_it(make_server):
    # Requests wait 400 ms in the batcher for batch-mates, so all of them are in flight together.
    server = make_server(max_concurrent_rpcs=3, max_wait_ms=400, batch_wait="fixed", max_batch=64)
    results = concurrent_adapts(server.address, 8)
    refused = refusals(results)
    assert 1 <= len(refused) <= 5 and len(results) - len(refused) >= 3
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 3 (--max-concurrent-rpcs)" in err.details()
    assert server.admission.rpcs == 0 and server.admission.bytes == 0  # every admitted RPC let go
    with grpc.insecure_channel(server.address) as channel:  # probes are not counted
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_request_bytes_over_the_inflight_bound_are_refused_naming_it(make_server):
    sx, sy, _ = random_task(SPEC, shots=2)
    one_request = adapt_request("tiny-5w", sx, sy).ByteSize()
    server = make_server(max_inflight_bytes=int(one_request * 2.5), max_wait_ms=400, batch_wait="fixed")
    results = concurrent_adapts(server.address, 6, shots=2)
    refused = refusals(results)
    assert len(results) - len(refused) >= 2 and refused
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the limit is {int(one_request * 2.5)} bytes (--max-inflight-bytes)" in err.details()
    assert server.admission.bytes == 0


def test_a_diverging_adaptation_through_the_wire_is_invalid_argument_and_not_cached(client, server):
    sx, sy, qx = random_task(SPEC)
    request = adapt_request("tiny-5w", sx, sy)
    request.inner_lr = 1e30
    before = len(server.cache)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.AdaptAndPredict(pb.AdaptAndPredictRequest(adapt=request, query_x=encode(qx)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "diverged with inner_lr = 1e+30" in err.value.details()
    assert len(server.cache) == before


def break_device(running):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    running.engine.adapt = running.engine.adapt_predict = broken


def test_a_lost_device_turns_health_not_serving(make_server):
    server = make_server()
    break_device(server)
    sx, sy, _ = random_task(SPEC)
    with FastAdaptClient(server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Adapt(adapt_request("tiny-5w", sx, sy), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "illegal memory access" in err.value.details()
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            asyncio.run(asyncio.sleep(0.02))
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_after_a_lost_device_serve_exits_non_zero(tiny_model_dir, monkeypatch):
    """`serve` runs as `python -m server` does (main thread, signal handlers); a sticky CUDA error inside the engine
    (a stand-in raises the driver's message) fails the request UNAVAILABLE and serve returns 70 for the
    orchestrator to restart the replica."""
    import server.app as app

    config = ServerConfig(model_dir=tiny_model_dir, host="127.0.0.1", port=0, device="cpu", backend="reference",
                          grace_s=0.5)
    ready = threading.Event()
    started: dict = {}
    real_start = app.start

    async def start_and_break(cfg):
        running = await real_start(cfg)
        break_device(running)
        started["running"] = running
        ready.set()
        return running

    def client_side():
        ready.wait(60)
        sx, sy, _ = random_task(SPEC)
        with FastAdaptClient(started["running"].address, timeout=30) as client:
            try:
                client.stub.Adapt(adapt_request("tiny-5w", sx, sy), timeout=30)
            except grpc.RpcError as err:
                started["error"] = err

    monkeypatch.setattr(app, "start", start_and_break)
    thread = threading.Thread(target=client_side)
    thread.start()
    code = asyncio.run(serve(config))
    thread.join(30)
    assert code == DEVICE_LOST_EXIT
    assert started["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert "illegal memory access" in started["error"].details()
