"""`python -m server --model-dir models/zoo --host 127.0.0.1 --port 50051 [--device ...] [--backend ...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

from kernels.engine import BACKENDS
from kernels.engine.precision import PRECISIONS
from models.runtime import tune_cpu_allocator
from server.app import ServerConfig, serve
from server.batcher import WAIT_POLICIES
from server.security import add_security_args, security_config
from server.store import parse_store_url
from server.telemetry import configure, get_logger
from server.validation import Limits
from server.warmup import WarmupError


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m server", description="fastadapt gRPC inference server")
    p.add_argument("--model-dir", type=Path, default=d.model_dir, help="folder of *.pt checkpoints")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port, help="0: any free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help="once serving, write JSON {port, device, backend, models} here")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="Triton kernels' dot products: ieee (fp32, default), tf32x3 (3 TF32 passes, fp32-level "
                        "logits, 2.4x faster at 1 task on an H200), tf32 (one pass, ~1e-3 relative error)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most tasks per engine call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="longest a request waits to be batched")
    p.add_argument("--batch-wait", default=d.batch_wait, choices=WAIT_POLICIES,
                   help="adaptive: wait for as many requests as the key's last batch had (a lone client never "
                        "waits); fixed: wait for --max-batch or --max-wait-ms")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs,
                   help="FastAdapt RPCs in flight before RESOURCE_EXHAUSTED (health checks are not counted)")
    p.add_argument("--max-inflight-bytes", type=int, default=d.max_inflight_bytes,
                   help="request bytes in flight (validating, queued or computing) before RESOURCE_EXHAUSTED "
                        "(default: an eighth of physical memory)")
    p.add_argument("--strict-models", action="store_true",
                   help="refuse to start when a checkpoint in --model-dir cannot be loaded (default: serve the others "
                        "and report it not ready)")
    p.add_argument("--max-steps", type=int, default=d.limits.max_steps, help="most inner steps a request may ask")
    p.add_argument("--max-support-steps", type=int, default=d.limits.max_support_steps,
                   help="cost cap: support rows x inner steps of one request")
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes, help="adaptation cache budget in bytes")
    p.add_argument("--cache-ttl-s", type=float, default=d.cache_ttl_s, help="drop adaptations unused this long")
    p.add_argument("--adaptation-store", default=d.adaptation_store, metavar="memory|redis://HOST:PORT/DB",
                   help="where adaptations live: memory (this process only, the default) or a Redis shared by every "
                        "replica, with this process's cache in front of it (server/store.py)")
    p.add_argument("--max-support", type=int, default=d.limits.max_support, help="largest N*K accepted")
    p.add_argument("--max-queries", type=int, default=d.limits.max_queries, help="largest Q accepted")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus HTTP port (0 = off)")
    p.add_argument("--metrics-host", default=d.metrics_host,
                   help="address the metrics endpoint listens on (default: the same as --host)")
    p.add_argument("--grace-s", type=float, default=d.grace_s, help="how long in-flight RPCs may finish on SIGTERM")
    p.add_argument("--warmup", default=d.warmup,
                   help="task counts to run per model before serving: auto (GPU graph backends: every bucket up to 64; "
                        "CPU: 1), none, or e.g. 1,8,64")
    p.add_argument("--warmup-shots", type=int, default=d.warmup_shots, help="support images per class in the warm-up")
    p.add_argument("--warmup-queries", type=int, default=d.warmup_queries,
                   help="query images per class in the warm-up (0: adapt only)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="inner steps in the warm-up (0: default)")
    p.add_argument("--warmup-models", default=d.warmup_models, help="comma-separated models to warm (default: all)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_security_args(p)
    a = p.parse_args(argv)
    check_flags(p, a)
    configure(a.log_level)
    return ServerConfig(
        model_dir=a.model_dir, host=a.host, port=a.port, device=a.device, backend=a.backend, precision=a.precision,
        max_batch=a.max_batch,
        max_wait_ms=a.max_wait_ms, batch_wait=a.batch_wait, max_queue=a.max_queue, cache_bytes=a.cache_bytes,
        cache_ttl_s=a.cache_ttl_s, adaptation_store=a.adaptation_store,
        limits=Limits(max_support=a.max_support, max_queries=a.max_queries, max_steps=a.max_steps,
                      max_support_steps=a.max_support_steps),
        max_concurrent_rpcs=a.max_concurrent_rpcs, max_inflight_bytes=a.max_inflight_bytes,
        strict_models=a.strict_models,
        metrics_port=a.metrics_port, grace_s=a.grace_s, port_file=a.port_file, warmup=a.warmup,
        warmup_shots=a.warmup_shots, warmup_queries=a.warmup_queries, warmup_steps=a.warmup_steps,
        warmup_models=a.warmup_models, metrics_host=a.metrics_host, security=security_config(a),
    )


# Flags that must be >= 1, and ports (0 = any free port for --port, off for --metrics-port).
POSITIVE_FLAGS = ("max_batch", "max_queue", "cache_bytes", "max_support", "max_queries", "max_concurrent_rpcs",
                  "max_steps", "max_support_steps")


def check_flags(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Out-of-range flags exit 2 naming the flag, the value and what was expected (argparse.error)."""
    for name in ("port", "metrics_port"):
        value = getattr(a, name)
        if not 0 <= value <= 65535:
            parser.error(f"--{name.replace('_', '-')} {value}: expected a TCP port in 1..65535 (or 0)")
    for name in POSITIVE_FLAGS:
        value = getattr(a, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")
    if a.max_inflight_bytes is not None and a.max_inflight_bytes < 1:
        parser.error(f"--max-inflight-bytes {a.max_inflight_bytes}: expected an integer >= 1")
    for name in ("max_wait_ms", "grace_s"):  # the warm-up flags are checked with the warm-up plan
        if getattr(a, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a number >= 0")
    try:
        parse_store_url(a.adaptation_store)
    except ValueError as exc:
        parser.error(str(exc))
    if not a.cache_ttl_s > 0:
        parser.error(f"--cache-ttl-s {a.cache_ttl_s}: expected seconds > 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible on this machine (torch.cuda.is_available() is "
                     "False); expected --device cpu or auto")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    tune_cpu_allocator()  # before the engine thread starts: it must share the tuned heap (see models.runtime)
    try:
        return asyncio.run(serve(config))
    except (OSError, ValueError, NotImplementedError, WarmupError) as exc:  # start-up: folder, port, warm-up ...
        get_logger().error("startup failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return 2


if __name__ == "__main__":
    sys.exit(main())
