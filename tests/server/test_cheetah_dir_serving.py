"""The bundled half-cheetah direction policy (models/zoo/halfcheetah-dir.pt) served over loopback by a real server.

The meta-policy cannot know which way its task wants it to run (forward or backward, reward +-forward velocity); one
VPG step on its own trajectories must tell it. References: the trainer's sampler on real MuJoCo physics
(HalfCheetah-v5) and its meta-test of the same checkpoint (docs/results/halfcheetah-dir/results.json).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.policy import load_policy
from server import rl_demo
from tests.server.conftest import ZOO_DIR
from trainer.rl.halfcheetah import HalfCheetahDir

ROOT = Path(__file__).resolve().parents[2]
NAME = "halfcheetah-dir"
ZOO = ZOO_DIR / f"{NAME}.pt"
RESULTS = ROOT / "docs" / "results" / NAME / "results.json"


@pytest.fixture(scope="module")
def cheetah():
    return load_policy(ZOO)


@pytest.fixture
def cclient(serve_zoo):
    return serve_zoo(NAME)


def test_the_bundled_direction_policy_is_the_500_iteration_run_it_says(cheetah, cclient):
    client, _ = cclient
    info = client.get_model(NAME)
    assert info["kind"] == "policy" and (info["observation_size"], info["action_size"]) == (17, 6)
    assert info["default_inner_lr"] == pytest.approx(0.1) and info["discount"] == pytest.approx(0.99)
    assert info["preprocessing"].startswith(f"{NAME}:")  # what rl_demo builds its environment from
    prov = cheetah.provenance
    assert prov["iterations"] == 500 and prov["config"]["name"] == NAME and prov["config"]["env"] == NAME
    results = json.loads(RESULTS.read_text())  # the run's own meta-test of this iterate
    assert results["training"]["evaluated_iteration"] == prov["best_iteration"]


def test_one_served_step_turns_the_cheetah_the_way_its_task_wants(cheetah, cclient):
    client, _ = cclient
    env = HalfCheetahDir()  # the paper's horizon, 200 steps
    goals = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # forward and backward
    with ThreadPoolExecutor(max_workers=2) as pool:  # the demo's client: every action from Predict
        policies = rl_demo.WirePolicies(client, NAME, 2, pool)
        before = rl_demo.sample_through_the_wire(env, policies, goals, 10, torch.Generator().manual_seed(21))
        policies.adapt(before, 0.1)  # one Adapt per direction on its 10 trajectories
        after = rl_demo.sample_through_the_wire(env, policies, goals, 10, torch.Generator().manual_seed(22))
    pre, post = before.returns().mean(1), after.returns().mean(1)
    # The meta-test over 40 tasks: -47.76 before and 289.56 after one step (docs/results/halfcheetah-dir/results.md);
    # 2026-12-03, here with 10 trajectories: forward gains about +80, backward about +190
    assert torch.all(post > pre + 50), (pre.tolist(), post.tolist())
