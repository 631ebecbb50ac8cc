"""`python -m server` as a real process: SIGTERM finishes in-flight work and exits 0; startup errors are named."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from server.client import FastAdaptClient, adapt_and_predict_request
from server.launch import REPO_ROOT, ServerProcess
from tests.server.conftest import TINY_SPECS, random_task

pytestmark = pytest.mark.slow  # real server processes: 8-33 s per test on the 2-core box (`make test-fast` skips)


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tiny_model_dir, tmp_path):
    # Requests wait 1.5 s in the batcher, so they are surely in flight when SIGTERM arrives.
    server = ServerProcess(tiny_model_dir, "--max-wait-ms", "1500", "--batch-wait", "fixed", "--grace-s", "20",
                           log_path=tmp_path / "server.log")
    try:
        client = FastAdaptClient(server.address, timeout=30)
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
        in_flight = [client.stub.AdaptAndPredict.future(adapt_and_predict_request("tiny-5w", sx, sy, qx), timeout=30)
                     for _ in range(3)]
        time.sleep(0.4)
        server.terminate()
        responses = [f.result(timeout=30) for f in in_flight]
        assert all(r.predict.logits.shape == [3, 5] for r in responses)
        code = server.proc.wait(timeout=30)
        assert code == 0, server.log_tail()
        with FastAdaptClient(server.address, timeout=2) as late:
            try:
                late.list_models()
                raise AssertionError("the server still answers after exiting")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        server.stop()
    events = [json.loads(line)["event"] for line in (tmp_path / "server.log").read_text().splitlines()
              if line.startswith("{")]
    assert events.index("serving") < events.index("shutting down") < events.index("stopped")
    assert events.count("rpc") >= 3


def test_startup_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nowhere"
    run = subprocess.run([sys.executable, "-m", "server", "--model-dir", str(missing), "--port", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f"--model-dir {missing} is not a directory" in run.stderr
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "server", "--model-dir", str(tmp_path), "--port", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f"{tmp_path / 'broken.pt'}: not a readable checkpoint" in run.stderr


def test_served_results_match_between_processes(tiny_model_dir, server):
    """The subprocess server and the in-process one compute the same thing from the same checkpoint."""
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w-td"], queries=4, seed=7)
    with ServerProcess(tiny_model_dir) as process, FastAdaptClient(process.address) as remote, \
            FastAdaptClient(server.address) as local:
        a = remote.adapt_and_predict("tiny-5w-td", sx, sy, qx)[1].logits
        b = local.adapt_and_predict("tiny-5w-td", sx, sy, qx)[1].logits
        assert process.stop() == 0
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_precision_flag_reaches_the_engine_and_a_wrong_one_is_named(tiny_model_dir, tmp_path):
    from server.__main__ import parse_args

    assert parse_args(["--precision", "tf32x3"]).precision == "tf32x3"
    assert parse_args([]).precision is None
    run = subprocess.run([sys.executable, "-m", "server", "--model-dir", str(tiny_model_dir), "--port", "0",
                          "--device", "cpu", "--backend", "reference", "--precision", "tf32"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "precision 'tf32' is an option of the triton backend, the backend is 'reference'" in run.stderr
