"""server.rl_demo through a real server: its returns are the trainer's evaluation's on the same goals and noise."""

from __future__ import annotations

import json

import pytest

from models.policy import load_policy
from server import rl_demo
from tests.server.test_kinds import POLICY, ZOO, kclient, kinds_dir, kserver  # noqa: F401  (fixtures)
from trainer.rl.evaluate import evaluate_policy
from trainer.rl.navigation import Navigation2D


def test_rl_demo_through_the_wire_equals_the_trainers_evaluation(kserver, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "rl-demo"
    assert rl_demo.main(["--address", kserver.address, "--goals", "3", "--trajectories", "4", "--steps", "2",
                         "--plot-goals", "2", "--out", str(out), "--progress", "false"]) == 0
    record = json.loads((out / "rl_demo.json").read_text())
    nav = load_policy(ZOO / f"{POLICY}.pt")
    want = evaluate_policy(Navigation2D(), nav.spec, nav.params, tasks=3, steps=2, trajectories=4)
    assert record["lrs"] == want["lrs"] == [0.1, 0.05]
    assert record["mean"] == pytest.approx(want["mean"], abs=1e-3)
    assert record["per_goal"] == pytest.approx(want["per_task"], abs=2e-3)
    assert record["mean"][-1] > record["mean"][0]  # adaptation helps
    assert (out / "rl_demo.png").stat().st_size > 10_000
    md = (out / "rl_demo.md").read_text()
    assert "-40.41" in md and "through the wire" in md
    assert "paper (Finn et al. 2017, MAML)" in capsys.readouterr().out
