"""kernels.bench.workspace: one checkpoint's AdaptAndPredict through the CPU reference backend at several workspace
budgets (a benchmark harness: what is checked here is what it measures and refuses, never a timing)."""

import json

import pytest
import torch

from kernels.bench.workspace import main
from models.checkpoint import MetaModel, save_checkpoint
from models.functional import init_params
from models.spec import ModelSpec


def tiny(tmp_path, **changes):
    spec = ModelSpec("tiny", "conv4-omniglot", ways=3, inner_lr=0.2, steps=2, hidden=8, **changes)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, MetaModel(spec, init_params(spec, torch.Generator().manual_seed(0))))
    return path


def test_every_budget_is_measured_on_the_same_rows_and_gives_the_same_logits(tmp_path):
    path = tiny(tmp_path, support_views="cross2", query_views="cross2", adapt_params="head", head_init="proto")
    out = tmp_path / "out"
    assert main([str(path), "--budgets", "64,0.05", "--tasks", "4", "--queries", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    record = json.loads((out / "workspace.json").read_text())
    # the server's rows: 3 support images x 9 views, 6 queries x 9 views
    assert record["rows_per_task"] == {"support": 27, "query": 54}
    assert [r["budget_mib"] for r in record["rows"]] == [64, 0.05]
    chunks = [r["tasks_per_chunk"] for r in record["rows"]]
    assert chunks[0] == 4 and chunks[1] < 4  # the small budget really cuts the batch
    assert all(r["p50_ms"] > 0 for r in record["rows"])
    assert record["rows"][1]["max_abs_logit_diff"] < 1e-4  # chunking changes nothing but the peak size
    assert "| 0.05 |" in (out / "workspace.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "32,x"], "--budgets '32,x': expected comma-separated MiB"),
    (["--budgets", "0"], "--budgets '0': expected budgets > 0 MiB"),
    (["--tasks", "0"], "--tasks, --shots, --queries and --repeats must be >= 1"),
])
def test_bad_arguments_exit_2_naming_the_value(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny(tmp_path)), *argv, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
