"""Operations: standard health checking, server reflection, Prometheus metrics, JSON-line logs."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server.client import FastAdaptClient
from server.telemetry import JsonLineFormatter, configure, get_logger
from tests.server.conftest import TINY_SPECS, free_port, random_task


def test_health_serving_for_server_and_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "fastadapt.v1.FastAdapt"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"fastadapt.v1.FastAdapt", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("fastadapt.v1.FastAdapt")
        assert {m.name for m in service.methods} >= {"Adapt", "Predict", "AdaptAndPredict", "ExportAdapted"}
        tensor = pool.FindMessageTypeByName("fastadapt.v1.Tensor")
        assert [f.name for f in tensor.fields] == ["dtype", "shape", "data"]


def test_prometheus_metrics_over_http(make_server):
    port = free_port()
    server = make_server(metrics_port=port)
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
    with FastAdaptClient(server.address) as client:
        client.adapt_and_predict("tiny-5w", sx, sy, qx)
        with pytest.raises(grpc.RpcError):
            client.adapt("nope", sx, sy)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'fastadapt_requests_total{code="OK",rpc="AdaptAndPredict"} 1.0' in text
    assert 'fastadapt_requests_total{code="NOT_FOUND",rpc="Adapt"} 1.0' in text
    assert 'fastadapt_request_latency_seconds_count{rpc="AdaptAndPredict"} 1.0' in text
    assert 'fastadapt_batch_tasks_count{kind="adapt"} 1.0' in text
    assert "fastadapt_cache_entries 1.0" in text
    assert "fastadapt_cache_bytes " in text and "fastadapt_cache_bytes 0.0" not in text
    assert f"fastadapt_adaptation_task_steps_total {float(TINY_SPECS['tiny-5w'].steps)}" in text
    assert "fastadapt_adaptation_steps_per_second " in text and "fastadapt_queue_depth 0.0" in text


def test_logs_are_json_lines_with_fields():
    stream = io.StringIO()
    logger = configure("info", stream)
    try:
        logger.info("rpc", extra={"rpc": "Adapt", "code": "OK", "ms": 1.5})
        logger.debug("hidden")
        line = json.loads(stream.getvalue().strip())
        assert line["event"] == "rpc" and line["rpc"] == "Adapt" and line["ms"] == 1.5 and line["level"] == "info"
        assert stream.getvalue().count("\n") == 1
        record = logging.makeLogRecord({"msg": "boom", "levelname": "ERROR", "name": "x"})
        assert json.loads(JsonLineFormatter().format(record))["event"] == "boom"
    finally:
        get_logger().handlers.clear()


def test_access_log_records_each_rpc_with_its_code(server, caplog_json):
    sx, sy, _ = random_task(TINY_SPECS["tiny-5w"])
    with FastAdaptClient(server.address) as client:
        client.adapt("tiny-5w", sx, sy)
        with pytest.raises(grpc.RpcError):
            client.adapt("tiny-5w", sx, sy, steps=500)
    lines = [json.loads(line) for line in caplog_json.getvalue().splitlines()]
    rpcs = [(line["rpc"], line["code"]) for line in lines if line["event"] == "rpc"]
    assert ("Adapt", "OK") in rpcs and ("Adapt", "INVALID_ARGUMENT") in rpcs
    refused = next(line for line in lines if line.get("code") == "INVALID_ARGUMENT")
    assert "steps = 500" in refused["details"]


@pytest.fixture
def caplog_json():
    stream = io.StringIO()
    configure("info", stream)
    yield stream
    get_logger().handlers.clear()


def test_all_torch_work_runs_on_the_one_engine_thread(server):
    """Loading, adapting and predicting share one OS thread: on the CPU a second thread that runs parallel torch ops
    gets its own OpenMP team, and two teams throttle each other (measured: 28 -> 70 ms per 5-way call)."""
    import threading

    engine_threads = []
    original_adapt, original_predict = server.engine.adapt, server.engine.predict

    def adapt(*args, **kwargs):
        engine_threads.append(threading.get_ident())
        return original_adapt(*args, **kwargs)

    def predict(*args, **kwargs):
        engine_threads.append(threading.get_ident())
        return original_predict(*args, **kwargs)

    server.engine.adapt, server.engine.predict = adapt, predict
    try:
        spec = TINY_SPECS["tiny-5w"]
        sx, sy, qx = random_task(spec)
        with FastAdaptClient(server.address, timeout=30) as client:
            adapted = client.adapt(spec.name, sx, sy)
            client.predict(adapted.adaptation_id, qx)
    finally:
        server.engine.adapt, server.engine.predict = original_adapt, original_predict
    worker = server.batcher.worker_ident
    assert worker is not None and worker != threading.get_ident()
    assert server.registry.loaded_on == worker
    assert len(engine_threads) >= 2 and set(engine_threads) == {worker}
