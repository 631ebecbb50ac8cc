"""What the server reports about itself: Prometheus metrics and structured (JSON line) logs.

Metrics live on their own registry per server instance (so several servers can share a process) and are exposed over
HTTP by `ServerMetrics.start_http(port)` (--metrics-port; 0 = off): requests by RPC and status code, latency
histograms, batch sizes, queue depth, cache entries / bytes / evictions, adaptation throughput and the shared
adaptation store's hits / misses / errors and latency. Logs are one JSON object per line on stderr, with the event's
fields at the top level.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LOGGER_NAME = "fastadapt.server"
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """`{"ts": ..., "level": "info", "logger": ..., "event": <message>, **extra fields}`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def configure(level: str = "info", stream=None) -> logging.Logger:
    """Send the server's logs to `stream` (stderr) as JSON lines at `level`."""
    logger = get_logger()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r}, expected one of debug, info, warning, error")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(numeric)
    logger.propagate = False
    return logger


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fastadapt_requests", "RPCs answered, by method and gRPC status code", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "fastadapt_request_latency_seconds", "Server-side RPC latency", ["rpc"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tasks = Histogram(
            "fastadapt_batch_tasks", "Tasks per engine call, by kind (adapt / predict)", ["kind"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("fastadapt_queue_depth", "Requests waiting for the engine", registry=r)
        self.cache_entries = Gauge("fastadapt_cache_entries", "Adaptations in the cache", registry=r)
        self.cache_bytes = Gauge("fastadapt_cache_bytes", "Bytes held by cached adaptations", registry=r)
        self.cache_evictions = Counter(
            "fastadapt_cache_evictions", "Adaptations dropped, by reason (lru / ttl / released)", ["reason"],
            registry=r,
        )
        self.task_steps = Counter(
            "fastadapt_adaptation_task_steps", "Inner SGD steps run, summed over tasks (rate() = steps/s)", registry=r
        )
        self.steps_per_second = Gauge(
            "fastadapt_adaptation_steps_per_second", "Task-steps per second of the last adapt batch", registry=r
        )
        # The shared adaptation store (server/store.py, --adaptation-store redis://...).
        self.store_ops = Counter(
            "fastadapt_store_operations", "Adaptation store calls by op (get / touch / put / release / fate / ping; "
            "near: near-cache lookups) and result (hit / miss / ok / error)", ["op", "result"], registry=r,
        )
        self.store_latency = Histogram(
            "fastadapt_store_latency_seconds", "Adaptation store call latency, by op", ["op"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.store_up = Gauge("fastadapt_store_up", "1 while the shared adaptation store answers (0: unreachable, "
                              "or --adaptation-store memory)", registry=r)
        self._http = None

    def observe_rpc(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.latency.labels(rpc=rpc).observe(seconds)

    def observe_batch(self, kind: str, tasks: int) -> None:
        self.batch_tasks.labels(kind=kind).observe(tasks)

    def observe_adapt(self, tasks: int, steps: int, seconds: float) -> None:
        self.task_steps.inc(tasks * steps)
        if seconds > 0:
            self.steps_per_second.set(tasks * steps / seconds)

    def bind(self, cache, batcher) -> None:
        """Read cache and queue gauges at scrape time."""
        self.cache_entries.set_function(lambda: len(cache))
        self.cache_bytes.set_function(lambda: cache.nbytes)
        self.queue_depth.set_function(lambda: batcher.queued)

    def start_http(self, port: int, host: str = "0.0.0.0") -> None:
        if port:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
