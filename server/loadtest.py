"""`make loadtest`: AdaptAndPredict throughput and latency at 1, 8 and 64 concurrent clients.

Starts `python -m server` on models/zoo (a fresh initialization stands in for a missing omniglot-5w1s, with a
notice; or targets --address), then for each concurrency level runs closed-loop clients (each with its own channel,
on one asyncio loop) for at least --duration seconds and --min-requests completions after --warmup-s seconds, each
sending 5-way 1-shot tasks with 15 queries per class (synthetic uint8 pixels: the work does not depend on them) at
--steps inner steps. Writes loadtest.md (a table) and loadtest.json to --out.
On a GPU box: `python3 -m server.loadtest --out DIR`.
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

from kernels.engine import BACKENDS
from models.runtime import allocator_state, tune_cpu_allocator
from server.client import FastAdaptClient, adapt_and_predict_request
from server.launch import REPO_ROOT, ServerProcess, prepare_model_dir
from server.wire import channel_options, pb_grpc


def make_requests(info: dict, count: int, queries_per_class: int, steps: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    ways, shape = info["ways"], tuple(info["input_shape"])
    requests = []
    for _ in range(count):
        support = rng.integers(0, 256, size=(ways, *shape), dtype=np.uint8)
        query = rng.integers(0, 256, size=(ways * queries_per_class, *shape), dtype=np.uint8)
        labels = rng.permutation(ways)
        requests.append(adapt_and_predict_request(info["name"], support, labels, query, steps=steps, keep=False))
    return requests


class _Level:
    """Shared state of one concurrency level: the measured window and what completed inside it."""

    def __init__(self, warmup_s: float, duration_s: float, min_requests: int):
        self.start_at = time.perf_counter() + warmup_s
        self.min_end = self.start_at + duration_s
        self.min_requests = min_requests
        self.end_at: float | None = None  # set once the window is long enough and holds enough requests
        self.latencies: list[float] = []
        self.batches: list[int] = []
        self.errors: list[str] = []

    def record(self, t0: float, t1: float, batch: int | None, error: str | None) -> None:
        if self.end_at is not None or t1 < self.start_at:
            return
        if error is not None:
            self.errors.append(error)
        else:
            self.latencies.append(t1 - t0)
            self.batches.append(batch)
        if t1 >= self.min_end and len(self.latencies) >= self.min_requests:
            self.end_at = t1


async def _client(address: str, requests: list, level: _Level, timeout: float) -> None:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.FastAdaptStub(channel)
        i = 0
        while level.end_at is None:
            t0 = time.perf_counter()
            try:
                response = await stub.AdaptAndPredict(requests[i % len(requests)], timeout=timeout)
                batch, error = response.adapt.timings.batch_tasks, None
            except grpc.aio.AioRpcError as exc:
                batch, error = None, exc.code().name
            level.record(t0, time.perf_counter(), batch, error)
            i += 1


async def run_level(address: str, requests: list, clients: int, warmup_s: float, duration_s: float, timeout: float,
                    min_requests: int) -> dict:
    """Closed-loop clients; measures completions in [warm-up end, max(duration, min_requests done)]."""
    level = _Level(warmup_s, duration_s, max(min_requests, clients))
    await asyncio.gather(*(_client(address, requests[c::clients] or requests, level, timeout) for c in range(clients)))
    lat = np.asarray(level.latencies) * 1e3
    window = level.end_at - level.start_at
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(level.errors),
        "error_codes": sorted(set(level.errors)),
        "window_s": window,
        "requests_per_s": len(lat) / window,
        # mean and max beside the percentiles: a stall in the top 1% (a capture, a GC pause) hides from p99 of a few
        # hundred samples, but not from requests x mean against the window
        "latency_ms": {**{k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))},
                       "mean": float(lat.mean()), "max": float(lat.max())},
        "mean_batch_tasks": float(np.mean(level.batches)),
    }


def in_process(levels: list[dict], model_dir: Path, name: str, device: str, backend: str, queries_per_class: int,
               steps: int, seconds: float) -> None:
    """Adds `in_process` to each level: the engine's tasks/s at that level's mean batch, through the server's own
    BatchRunner (preprocessing and host copies included, gRPC and the batcher's queue not) and the ratio to it."""
    from kernels.engine import Engine
    from server.registry import ModelRegistry
    from server.runner import BatchRunner, first_failure
    from server.warmup import WarmupPlan, warm_jobs

    engine = Engine(backend, device)
    model = ModelRegistry.from_dir(model_dir, device=engine.device).get(name)
    runner = BatchRunner(engine)
    for level in levels:
        tasks = max(1, round(level["mean_batch_tasks"]))
        jobs = warm_jobs(model, tasks, WarmupPlan((tasks,), 1, queries_per_class, steps))
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 1000):
            t0 = time.perf_counter()
            outcomes = runner(jobs[0].key, jobs)  # returns host arrays: the device work is done
            times.append(time.perf_counter() - t0)
            failed = first_failure(outcomes)
            if failed is not None:
                raise RuntimeError(f"in-process run of {tasks} tasks failed: {failed}")
        call_s = float(np.median(times[1:]))  # the first call may compile or capture
        tasks_per_s = tasks / call_s
        level["in_process"] = {"tasks": tasks, "ms_per_call": call_s * 1e3, "tasks_per_s": tasks_per_s,
                               "served_fraction": level["requests_per_s"] / tasks_per_s}


def format_markdown(meta: dict, levels: list[dict]) -> str:
    lines = [
        f"# Load test: AdaptAndPredict on {meta['model']}",
        "",
        f"{meta['ways']}-way 1-shot, {meta['queries']} queries, {meta['steps']} inner steps, uint8 input; "
        f"server device {meta['device']}, backend {meta['backend']}; each level measured over at least "
        f"{meta['duration_s']:g} s and {meta['min_requests']} requests after {meta['warmup_s']:g} s warm-up; "
        f"host {meta['host']} ({meta['cpus']} CPUs, GPU {meta['gpu'] or 'none'}); torch {meta['torch']}."
        + (f" Allocator: {meta['allocator']}." if meta.get("allocator") else "")
        + (" Weights: FRESH INIT (untrained; the work is the same)." if meta["fresh_init"] else ""),
        "",
        "| clients | requests | errors | requests/s | p50 ms | p90 ms | p99 ms | mean ms | max ms | window s | "
        "mean tasks per engine call | in-process tasks/s at that batch | served / in-process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        lat = r["latency_ms"]
        ip = r.get("in_process")
        own = f"{ip['tasks_per_s']:.1f} | {100 * ip['served_fraction']:.0f}%" if ip else "- | -"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.1f} | {lat['p50']:.1f} | "
            f"{lat['p90']:.1f} | {lat['p99']:.1f} | {lat['mean']:.1f} | {lat['max']:.1f} | {r['window_s']:.2f} | "
            f"{r['mean_batch_tasks']:.1f} | {own} |"
        )
    if any("in_process" in r for r in levels):
        lines += ["", "In-process: the same batches through the server's BatchRunner in the load-test process after "
                      "the server exited (no gRPC, no queueing); DESIGN asks served throughput within 2x of it "
                      "(served / in-process >= 50%)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "loadtest")
    p.add_argument("--address", default=None, help="load an already running server instead of starting one")
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "zoo")
    p.add_argument("--model", default="omniglot-5w1s")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds of load before each level")
    p.add_argument("--warmup", help=argparse.SUPPRESS)  # renamed: `python -m server --warmup` means task counts
    p.add_argument("--min-requests", type=int, default=200,
                   help="extend a level's window until this many requests (at least one per client) completed")
    p.add_argument("--steps", type=int, default=10, help="inner steps (0 = model default)")
    p.add_argument("--queries-per-class", type=int, default=15)
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    p.add_argument("--startup-s", type=float, default=300.0,
                   help="how long the server may take to load and warm up (GPU: compile + capture every bucket)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--server-arg", action="append", default=[], help="extra `python -m server` argument (repeat)")
    p.add_argument("--in-process-s", type=float, default=3.0,
                   help="seconds per level to time the same batches in-process, without gRPC (0: skip)")
    args = p.parse_args(argv)
    if args.warmup is not None:
        p.error("--warmup is now --warmup-s (unmeasured seconds before each level); `python -m server --warmup` "
                "takes the server's warm-up task counts (pass it with --server-arg)")
    tune_cpu_allocator()  # the in-process comparison runs here: the same allocator as the server it is compared with

    with tempfile.TemporaryDirectory(prefix="fastadapt-loadtest-") as scratch:
        server, fresh = None, []
        address = args.address
        info = {"device": "?", "backend": "?"}
        if address is None:
            model_dir, fresh = prepare_model_dir(args.model_dir, [args.model], Path(scratch) / "models")
            for name in fresh:
                print(f"NOTICE: {args.model_dir} has no {name} checkpoint: load-testing a FRESH, UNTRAINED "
                      "initialization of the same architecture (the work per request is the same).")
            # The server warms the load-tested shapes (every batch-size bucket on a GPU) before it opens its port,
            # so the levels measure steady state, not kernel compilation and CUDA-graph capture.
            server = ServerProcess(model_dir, "--device", args.device, "--backend", args.backend,
                                   "--log-level", "warning", "--warmup-models", args.model,
                                   "--warmup-steps", str(args.steps), "--warmup-queries", str(args.queries_per_class),
                                   *args.server_arg, startup_s=args.startup_s)
            address, info = server.address, server.info
        try:
            with FastAdaptClient(address) as client:
                model = client.get_model(args.model)
            requests = make_requests(model, 64, args.queries_per_class, args.steps, seed=0)
            levels = []
            for clients in args.concurrency:
                result = asyncio.run(
                    run_level(address, requests, clients, args.warmup_s, args.duration, args.timeout,
                              args.min_requests)
                )
                levels.append(result)
                print(f"{clients:3d} clients: {result['requests_per_s']:8.1f} req/s, p50 "
                      f"{result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms, mean batch "
                      f"{result['mean_batch_tasks']:.1f}, errors {result['errors']}")
        finally:
            code = server.stop() if server is not None else 0
        if server is not None and args.in_process_s > 0 and code == 0:
            # The same batches without gRPC, in this process, on the same device and backend, after the server
            # has exited: how close the served throughput comes to the engine's own (DESIGN: within 2x).
            in_process(levels, model_dir, args.model, info["device"], info["backend"], args.queries_per_class,
                       args.steps, args.in_process_s)
    meta = {
        "model": args.model, "ways": model["ways"], "queries": model["ways"] * args.queries_per_class,
        "steps": args.steps or model["default_steps"], "device": info["device"], "backend": info["backend"],
        "duration_s": args.duration, "min_requests": args.min_requests, "warmup_s": args.warmup_s,
        "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "fresh_init": bool(fresh), "server_exit_code": code,
        "allocator": allocator_state(),  # the server applies the same tuning at its start
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest.json").write_text(json.dumps({"meta": meta, "levels": levels}, indent=2))
    (args.out / "loadtest.md").write_text(format_markdown(meta, levels))
    print(format_markdown(meta, levels))
    print(f"wrote {args.out / 'loadtest.md'} and {args.out / 'loadtest.json'}")
    errors = sum(r["errors"] for r in levels)
    return 0 if code == 0 and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
