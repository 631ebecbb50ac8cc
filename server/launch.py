"""Start a real server subprocess on a free port and stop it with SIGTERM: used by the demo, the load test and
tests. Also prepares a model folder: the bundled checkpoints, plus a fresh (untrained) initialization for any
required model the folder lacks, announced loudly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, MetaModel, save_checkpoint
from models.functional import init_params
from models.kinds import load_model
from models.spec import ModelSpec
from server.client import FastAdaptClient

REPO_ROOT = Path(__file__).resolve().parents[1]

# Specs for a fresh initialization when models/zoo lacks a bundled model (cbfinn/maml's Omniglot settings).
FRESH_SPECS = {
    "omniglot-5w1s": ModelSpec("omniglot-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=5),
    "omniglot-20w1s": ModelSpec("omniglot-20w1s", "conv4-omniglot", ways=20, inner_lr=0.1, steps=5),
}


def zoo_names(model_dir: Path) -> dict[str, Path]:
    """Model name -> checkpoint file for every readable *.pt in model_dir (unreadable ones are skipped)."""
    names = {}
    for path in sorted(Path(model_dir).glob("*.pt")) if Path(model_dir).is_dir() else []:
        try:
            names[load_model(path).spec.name] = path
        except CheckpointError as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
    return names


def prepare_model_dir(model_dir: Path, required: list[str], scratch: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """A folder holding model_dir's checkpoints plus fresh inits of the required names it lacks.

    Returns (folder, names that are fresh inits). Without anything missing the folder is model_dir itself;
    otherwise it is `scratch` (which the caller owns and removes).
    """
    have = zoo_names(model_dir)
    missing = [name for name in required if name not in have]
    if not missing:
        return Path(model_dir), []
    folder = Path(scratch)
    folder.mkdir(parents=True, exist_ok=True)
    for path in have.values():
        os.symlink(path.resolve(), folder / path.name)
    generator = torch.Generator().manual_seed(seed)
    for name in missing:
        spec = FRESH_SPECS[name]
        provenance = {"note": f"fresh initialization (untrained): {model_dir} has no {name} checkpoint"}
        save_checkpoint(folder / f"{name}.pt", MetaModel(spec, init_params(spec, generator), provenance=provenance))
    return folder, missing


class ServerProcess:
    """`python -m server ...` as a subprocess on 127.0.0.1:<free port>; a context manager that SIGTERMs it."""

    def __init__(self, model_dir: Path, *extra: str, log_path: Path | None = None, startup_s: float = 120.0,
                 client_kwargs: dict | None = None, env: dict | None = None):
        """`client_kwargs`: FastAdaptClient keywords (token, ca, ...) to reach a TLS / token server with; `env`:
        variables set for the server on top of this process's environment."""
        self.client_kwargs = dict(client_kwargs or {})
        self._tmp = tempfile.TemporaryDirectory(prefix="fastadapt-server-")
        port_file = Path(self._tmp.name) / "port"
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        cmd = [
            sys.executable, "-m", "server", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), *extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        deadline = time.monotonic() + startup_s
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {startup_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.info = json.loads(port_file.read_text())  # {port, device, backend, models}
        self.port = int(self.info["port"])
        self.address = f"127.0.0.1:{self.port}"
        with FastAdaptClient(self.address, **self.client_kwargs) as client:
            client.wait_ready(timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(Path(self.log_path).read_text().splitlines()[-lines:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for a graceful exit (kill after `timeout`); returns the exit code."""
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()
