"""SIGTERM ends a long `python -m trainer` run gracefully: at a log point, state saved, final evaluation written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_stops_at_a_log_point_saves_and_evaluates(tmp_path, omniglot_root):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "trainer", "omniglot-5w1s", "--recipe", "anil", "--hidden", "8", "--meta_batch", "2",
            "--iterations", "1000000", "--log_every", "5", "--val_every", "10", "--val_tasks", "10", "--val_classes",
            "20", "--eval_tasks", "20", "--eval_steps", "2", "--device", "cpu", "--progress", "false",
            "--data_root", str(omniglot_root), "--out_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists():  # training has started (the first log point)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no log point within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM: stopping at the next log point" in stderr
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert 0 < state["iteration"] < 1_000_000 and state["iteration"] % 5 == 0
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["iteration"] == state["iteration"] and "val" in last  # the stop validates, as the clock's does
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == 20 and "meta-test accuracy" in stdout


@pytest.mark.slow
def test_sigterm_ends_a_policy_run_after_the_iteration_under_way_and_saves_it(tmp_path):
    """The MAML-RL trainer (half-cheetah runs take a minute per meta-iteration): the state after the last logged
    iteration is saved, though it is no multiple of checkpoint_every, and the policy is written."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "trainer", "navigation-2d", "--iterations", "1000000", "--meta_batch", "2",
            "--trajectories", "2", "--hidden", "8", "--checkpoint_every", "1000", "--final_eval", "false",
            "--progress", "false", "--out_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "state" / "log.jsonl").exists():  # the first meta-iteration is done
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no meta-iteration within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM: stopping after the meta-iteration under way" in stderr
    state = torch.load(out / "state" / "state.pt", map_location="cpu", weights_only=True)
    log = [json.loads(line) for line in (out / "state" / "log.jsonl").read_text().splitlines()]
    assert 1 <= state["iteration"] < 1000 and log[-1]["iteration"] == state["iteration"] == len(log)
    assert (out / "policy.pt").is_file() and not (out / "results.json").exists()  # --final_eval false
