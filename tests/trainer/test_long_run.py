"""scripts/long_run.sh: a run from a checkpoint, meta-tested at its stop, its model copied into the run folder: the
best-validation checkpoint, or the last one when the run has no validation (--val_classes 0)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--iterations", "2", "--meta_batch", "2", "--eval_tasks", "10", "--eval_steps", "1", "--val_tasks", "10",
        "--val_every", "1", "--log_every", "1", "--checkpoint_every", "1"]


@pytest.mark.parametrize("val_classes, model_from", [("20", "best"), ("0", "last")])
def test_the_run_folder_gets_the_best_model_or_the_last_without_validation(tmp_path, val_classes, model_from):
    run = tmp_path / "run"
    env = dict(os.environ, MAX_SECONDS="600", OMP_NUM_THREADS="1", RECIPE="proto-anil")
    argv = ["bash", str(ROOT / "scripts" / "long_run.sh"), "omniglot-5w1s", str(run),
            str(ROOT / "models" / "zoo" / "omniglot-5w1s.pt"), "00:00", *TINY, "--val_classes", val_classes]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    def strict(constant):  # json.loads takes NaN and Infinity; the log must be JSON every parser reads
        raise AssertionError(f"log.jsonl holds {constant}")

    log = [json.loads(line, parse_constant=strict) for line in (run / "state" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    assert ["val" in r for r in log] == [model_from == "best"] * 2  # no validation split, no "val"
    assert (run / "state" / "best.pt").exists() == (model_from == "best")
    assert not (run / "state" / "last.pt").exists()  # removed once copied
    model = torch.load(run / "model.pt", weights_only=False)
    assert model["provenance"]["iterations"] in ((1, 2) if model_from == "best" else (2,))
    result = json.loads((run / "results.json").read_text())
    assert result["transductive"]["mean"][0] > 20  # a 5-way model from the bundled body: far above chance
