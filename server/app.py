"""Assemble and run the gRPC server: engine, models, batcher, cache, servicer, health, reflection, metrics.

`start(config)` returns a running server (tests run it in-process on a free port); `serve(config)` runs one until
SIGTERM or SIGINT and then shuts down gracefully: health turns NOT_SERVING, no new RPCs are accepted, in-flight
RPCs get `grace_s` seconds to finish, queued batches are drained, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kernels.engine import Engine
from models.runtime import allocator_state
from server.admission import DEFAULT_MAX_RPCS, Admission
from server.batcher import DynamicBatcher
from server.cache import AdaptationCache
from server.registry import ModelRegistry
from server.runner import BatchRunner
from server.security import Security, SecurityConfig
from server.service import FastAdaptService
from server.status import StatusInterceptor
from server.store import describe_url, open_adaptations
from server.telemetry import ServerMetrics, get_logger
from server.validation import Limits
from server.warmup import make_plan, warm_up
from server.wire import MAX_REQUEST_BYTES, SERVICE_NAME, TRANSPORT_LIMIT_BYTES, channel_options, pb_grpc

DEVICE_LOST_EXIT = 70  # the exit status after a sticky device error


@dataclass
class ServerConfig:
    model_dir: Path = Path("models/zoo")
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see port_file)
    device: str = "auto"
    backend: str = "auto"
    precision: str | None = None  # triton dots: ieee | tf32x3 | tf32 (None: $FASTADAPT_TRITON_PRECISION or ieee)
    max_batch: int = 256
    max_wait_ms: float = 1.0
    batch_wait: str = "adaptive"
    max_queue: int = 4096
    max_concurrent_rpcs: int = DEFAULT_MAX_RPCS  # FastAdapt RPCs in flight (server.admission)
    max_inflight_bytes: int | None = None  # request bytes in flight; None: an eighth of physical memory
    strict_models: bool = False  # refuse to start when a checkpoint cannot be loaded (default: serve the others)
    cache_bytes: int = 1 << 30
    cache_ttl_s: float = 600.0
    adaptation_store: str = "memory"  # or redis://HOST:PORT/DB: shared by replicas, cache in front (server/store.py)
    limits: Limits = field(default_factory=Limits)
    metrics_port: int = 0  # 0: off
    metrics_host: str = ""  # where the metrics endpoint listens; empty: the same as host
    grace_s: float = 30.0
    port_file: Path | None = None  # written once serving: JSON {port, device, backend, models, warmup_s}
    warmup: str = "auto"  # task counts run per model before the port opens: auto | none | 1,2,4 (server/warmup.py)
    warmup_shots: int = 1
    warmup_queries: int = 15  # per class
    warmup_steps: int = 0  # 0: each model's default
    warmup_models: str = ""  # comma-separated; empty: all
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS, tokens, quotas (server/security.py)


@dataclass
class RunningServer:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    engine: Engine
    registry: ModelRegistry
    batcher: DynamicBatcher
    cache: AdaptationCache
    metrics: ServerMetrics
    health: health.aio.HealthServicer
    warmup: dict = field(default_factory=dict)  # {model: {task count: seconds}} of the start-up warm-up
    device_lost: asyncio.Event | None = None  # set after a sticky device error (health is then NOT_SERVING)
    admission: Admission | None = None
    watcher: asyncio.Future | None = None
    security: Security | None = None
    store: object | None = None  # where adaptations live (server/store.py): LocalAdaptations or SharedAdaptations

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        grace_s = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.batcher.close()
        self.metrics.stop_http()
        if self.security is not None:
            await self.security.close_health_port()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.store is not None:
            await self.store.close()


async def start(config: ServerConfig) -> RunningServer:
    log = get_logger()
    if config.limits.max_request_bytes > TRANSPORT_LIMIT_BYTES:
        raise ValueError(
            f"max_request_bytes={config.limits.max_request_bytes}, expected at most the transport limit "
            f"{TRANSPORT_LIMIT_BYTES}"
        )
    security = Security.from_config(config.security)  # every TLS / token file is checked before a model loads
    engine = Engine(config.backend, config.device, config.precision)
    plan = make_plan(config.warmup, config.warmup_shots, config.warmup_queries, engine.backend_name,
                     engine.device.type, config.max_batch, config.warmup_steps, config.warmup_models)
    metrics = ServerMetrics()
    security.bind_metrics(metrics.registry)
    admission = Admission(config.max_concurrent_rpcs, config.max_inflight_bytes)
    loop = asyncio.get_running_loop()
    device_lost = asyncio.Event()  # set (from the worker thread) after a sticky device error
    runner = BatchRunner(engine, on_fatal=lambda exc: loop.call_soon_threadsafe(device_lost.set))
    batcher = DynamicBatcher(
        runner,
        max_batch=config.max_batch,
        max_wait_s=config.max_wait_ms / 1e3,
        wait_policy=config.batch_wait,
        max_queue=config.max_queue,
        on_batch=lambda key, size: metrics.observe_batch(key[0], size),
    )
    # Every torch operation of the server runs on the batcher's one worker thread, loading included. On the CPU
    # a second thread that has run a parallel torch op keeps its own OpenMP team, and two teams on the cores make
    # both throttle their spin-waits: a 5-way 1-shot adapt + predict measured 28 ms on the thread that ran torch
    # first and 70 ms on any other (2-core VM), the served rate halved.
    try:
        registry = await batcher.run_exclusive(ModelRegistry.from_dir, config.model_dir, engine.device,
                                                config.strict_models)
    except BaseException:
        await batcher.close()
        raise
    cache = AdaptationCache(
        config.cache_bytes, config.cache_ttl_s, on_evict=lambda why: metrics.cache_evictions.labels(reason=why).inc()
    )
    metrics.bind(cache, batcher)
    store = open_adaptations(config.adaptation_store, cache, registry, batcher, engine.device, metrics,
                             config.cache_ttl_s)
    await store.start()  # a store that does not answer yet is logged, not fatal: adaptations then stay local
    service = FastAdaptService(registry, batcher, runner, cache, metrics, config.limits, store=store)
    # Before the port opens: the first clients must not pay kernel compilation and CUDA-graph capture.
    started = time.perf_counter()
    try:
        with engine.warming():  # warm-up programs are captured on first use and pinned (kernels.engine.graph_cache)
            warmed = await warm_up(plan, registry, runner, batcher)
    except Exception:
        await batcher.close()
        raise
    warmup_s = round(time.perf_counter() - started, 3)
    if warmed:
        log.info("warmed up", extra={"seconds": warmup_s, "tasks": list(plan.tasks), "shots": plan.shots,
                                     "queries_per_class": plan.queries, "steps": plan.steps or "model default",
                                     "per_model_s": warmed})

    server = grpc.aio.server(
        # auth after (inside) status: its refusals are answered, counted and logged like any other
        interceptors=[StatusInterceptor(metrics, admission), *security.interceptors],
        options=[*channel_options(TRANSPORT_LIMIT_BYTES), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_FastAdaptServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving_once_the_device_is_lost():
        await device_lost.wait()
        log.error("device lost: health NOT_SERVING", extra={"error": str(runner.lost)})
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    watcher = asyncio.ensure_future(not_serving_once_the_device_is_lost())
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = security.add_port(server, f"{config.host}:{config.port}")  # TLS when --tls-cert is set
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {config.host}:{config.port} (--host/--port): {exc}") from exc
    await server.start()
    await security.open_health_port(health_servicer, config.host)  # --health-port: plaintext health for probes
    metrics.start_http(config.metrics_port, config.metrics_host or config.host)
    if config.port_file is not None:  # for launchers: where and how the server runs, written once it serves
        ready = {"port": port, "device": str(engine.device), "backend": engine.backend_name,
                 "precision": engine.precision, "models": registry.names(),
                 "warmup_s": warmup_s, "adaptation_store": describe_url(config.adaptation_store)}
        tmp = Path(f"{config.port_file}.tmp")
        tmp.write_text(json.dumps(ready) + "\n")
        os.replace(tmp, config.port_file)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    settings["adaptation_store"] = describe_url(config.adaptation_store)  # never log the store's password
    log.info(
        "serving",
        extra={
            "address": f"{config.host}:{port}",
            "device": str(engine.device),
            "backend": engine.backend_name,
            "precision": engine.precision,
            "models": registry.names(),
            "allocator": allocator_state(),
            "max_request_bytes": MAX_REQUEST_BYTES,
            "transport_limit_bytes": TRANSPORT_LIMIT_BYTES,
            "config": settings,
            "security": security.summary(),
        },
    )
    running = RunningServer(config, server, port, engine, registry, batcher, cache, metrics, health_servicer, warmed,
                            security=security, store=store)
    running.device_lost, running.admission, running.watcher = device_lost, admission, watcher
    return running


async def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM / SIGINT, then stop gracefully; returns the process exit code."""
    log = get_logger()
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.security.on_sighup)  # reload --auth-tokens
    lost = asyncio.ensure_future(running.device_lost.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), lost], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down", extra={"grace_s": config.grace_s, "queued": running.batcher.queued,
                                     "device_lost": lost.done()})
    await running.stop()
    log.info("stopped")
    # A lost device: exit non-zero (EX_SOFTWARE) so that an orchestrator restarts the replica.
    return DEVICE_LOST_EXIT if lost.done() else 0
