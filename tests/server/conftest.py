"""Fixtures for server tests: tiny fresh checkpoints, and real grpc.aio servers on free loopback ports.

In-process servers run on one event loop in a background thread (shared by the whole session), so tests can use
the blocking client and still look inside the server (cache, batcher) where a test needs to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import init_params
from models.spec import ModelSpec
from server.app import ServerConfig, start
from server.client import FastAdaptClient

ZOO_DIR = Path(__file__).resolve().parents[2] / "models" / "zoo"

# Tiny fresh models: realism is not the point here, speed is.
TINY_SPECS = {
    "tiny-5w": ModelSpec("tiny-5w", "conv4-omniglot", ways=5, inner_lr=0.1, steps=2, bn_policy="support", hidden=8),
    "tiny-5w-td": ModelSpec(
        "tiny-5w-td", "conv4-omniglot", ways=5, inner_lr=0.1, steps=2, bn_policy="transductive", hidden=8
    ),
    "tiny-mini": ModelSpec("tiny-mini", "conv4-miniimagenet", ways=5, inner_lr=0.05, steps=1, hidden=4),
}


def write_models(folder: Path, specs=None, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for spec in specs or TINY_SPECS.values():
        model = MetaModel(spec, init_params(spec, generator), provenance={"note": "fresh init for tests"})
        save_checkpoint(folder / f"{spec.name}.pt", model)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_models(tmp_path_factory.mktemp("zoo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AioThread:
    """One asyncio loop in a daemon thread; `call(coro)` runs a coroutine there and waits for its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-server-loop", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def aio_thread():
    runner = AioThread()
    yield runner
    runner.close()


@pytest.fixture
def make_server(aio_thread, tiny_model_dir):
    """make_server(**config overrides) -> RunningServer on 127.0.0.1:<free port>; stopped after the test."""
    started = []

    def make(**overrides):
        config = ServerConfig(model_dir=tiny_model_dir, host="127.0.0.1", port=0, device="cpu", backend="reference")
        config = dataclasses.replace(config, **overrides)
        running = aio_thread.call(start(config))
        started.append(running)
        return running

    yield make
    for running in started:
        aio_thread.call(running.stop(0.5))


@pytest.fixture
def serve_zoo(make_server, tmp_path):
    """serve_zoo(name) -> (client, server): a real server on loopback serving only the bundled models/zoo/<name>.pt."""
    clients = []

    def serve(name: str):
        shutil.copyfile(ZOO_DIR / f"{name}.pt", tmp_path / f"{name}.pt")
        server = make_server(model_dir=tmp_path)
        clients.append(FastAdaptClient(server.address, timeout=120))
        return clients[-1], server

    yield serve
    for c in clients:
        c.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def client(server):
    with FastAdaptClient(server.address, timeout=30) as c:
        yield c


def random_task(spec: ModelSpec, shots: int = 1, queries: int = 3, seed: int = 0, dtype=np.uint8):
    """A random task for `spec`: support [N*K, ...] with labels covering every class, queries [Q, ...]."""
    rng = np.random.default_rng(seed)
    n = spec.ways * shots
    shape = spec.input_shape
    if dtype == np.uint8:
        support = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        query = rng.integers(0, 256, size=(queries, *shape), dtype=np.uint8)
    else:
        support = rng.random((n, *shape), dtype=np.float32).astype(dtype)
        query = rng.random((queries, *shape), dtype=np.float32).astype(dtype)
    labels = rng.permutation(np.arange(n) % spec.ways)
    return support, labels, query


@pytest.fixture
def redis_server():
    """A real, empty redis-server on a free loopback port (no persistence), killed after the test. Missing
    redis-server fails the test saying how to install it: the shared-store tests never pass vacuously."""
    from server.cluster import ComponentMissing, RedisProcess

    try:
        process = RedisProcess()
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with process:
        yield process
