"""kernels.bench.recipes: runs two checkpoints of one architecture through one Engine and reports both (a benchmark
harness: what is checked here is what it measures and refuses, never a timing)."""

import json

import pytest
import torch

from kernels.bench.recipes import main
from models.checkpoint import MetaModel, save_checkpoint
from models.functional import init_params
from models.spec import ModelSpec


def tiny(tmp_path, name, **changes):
    spec = ModelSpec(name, "conv4-omniglot", ways=3, inner_lr=0.2, steps=2, hidden=8, **changes)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, MetaModel(spec, init_params(spec, torch.Generator().manual_seed(0)),
                                    provenance={"recipe": "anil" if changes else "maml"}))
    return path


def test_both_checkpoints_are_measured_at_every_task_count(tmp_path):
    maml, anil = tiny(tmp_path, "m"), tiny(tmp_path, "a", adapt_params="head")
    assert main([str(maml), str(anil), "--tasks", "1,2", "--repeats", "1", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "recipes.json").read_text())
    assert [(r["recipe"], r["adapt_params"], r["tasks"]) for r in record["rows"]] == [
        ("maml", "all", 1), ("maml", "all", 2), ("anil", "head", 1), ("anil", "head", 2)]
    assert all(r["p50_ms"] > 0 for r in record["rows"])
    assert "anil at T=2" in (tmp_path / "out" / "recipes.md").read_text()


def test_checkpoints_of_different_architectures_are_refused(tmp_path, capsys):
    other = ModelSpec("w", "conv4-omniglot", ways=4, inner_lr=0.2, steps=2, hidden=8)
    save_checkpoint(tmp_path / "w.pt", MetaModel(other, init_params(other)))
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny(tmp_path, "m")), str(tmp_path / "w.pt"), "--repeats", "1", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "different architectures" in capsys.readouterr().err
