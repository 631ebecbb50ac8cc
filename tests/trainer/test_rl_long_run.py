"""scripts/rl_long_run.sh: starts a policy run, resumes it on the next call, and meta-tests each stop's best iterate."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rl_long_run.sh"
TINY = ["--iterations", "{n}", "--meta_batch", "2", "--trajectories", "2", "--hidden", "8", "--eval_tasks", "2",
        "--eval_trajectories", "2"]


def run(tmp_path: Path, iterations: int, config: str = "navigation-2d"):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), MAX_SECONDS="600", OMP_NUM_THREADS="1")
    argv = ["bash", str(SCRIPT), config, "00:00"] + [a.format(n=iterations) for a in TINY]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_starts_then_resumes_and_meta_tests_each_stop(tmp_path):
    first = run(tmp_path, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(tmp_path, 2)  # the state exists: --resume, one more iteration
    assert second.returncode == 0, second.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "state" / "state.pt", weights_only=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "state" / "log.jsonl").read_text().splitlines()]
    assert state["iteration"] == 2 and [r["iteration"] for r in log] == [1, 2]
    for stop in (1, 2):
        result = json.loads((tmp_path / "run" / f"interim-{stop}" / "results.json").read_text())
        (row,) = result["evaluations"].values()
        assert len(row["mean"]) == 4 and all(m < 0 for m in row["mean"])  # navigation: minus distances
        assert (tmp_path / "run" / f"interim-{stop}" / "training.png").stat().st_size > 0
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())  # the whole log, rewritten each stop
    assert [(r["first"], r["last"]) for r in progress["rows"]] == [(1, 2)]
    assert progress["rows"][0]["return_pre"] == sum(r["return_pre"] for r in log) / 2


def test_bad_arguments_exit_2_naming_them(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "omniglot-5w1s", "00:00"], capture_output=True, text=True)
    assert bad.returncode == 2 and "CONFIG omniglot-5w1s, expected navigation-2d" in bad.stderr
    short = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert short.returncode == 2 and "got 0 arguments" in short.stderr
