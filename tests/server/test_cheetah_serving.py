"""The bundled half-cheetah policy (models/zoo/halfcheetah-vel.pt) served over loopback by a real server.

References: trainer.rl's sampler on real MuJoCo physics (HalfCheetah-v5), its baseline and VPG step, and
models.policy.policy_forward. The loop a client runs (act with the meta-policy, Adapt on the trajectories, act with
the adapted policy) must adapt the policy toward each goal velocity, as the trainer's meta-test says it does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from models.policy import load_policy, policy_forward
from server import rl_demo
from tests.server.conftest import TINY_SPECS, ZOO_DIR
from trainer.rl.baseline import advantages
from trainer.rl.evaluate import evaluate_policy
from trainer.rl.halfcheetah import HalfCheetahVel
from trainer.rl.sampler import sample_trajectories
from trainer.rl.vpg import adapt as vpg_adapt

ROOT = Path(__file__).resolve().parents[2]
NAME = "halfcheetah-vel"
HORIZON = "10"  # rl_demo's episodes when it is compared with the trainer goal by goal (the docstring says why)
ZOO = ZOO_DIR / f"{NAME}.pt"
RESULTS = ROOT / "docs" / "results" / NAME / "results.json"


@pytest.fixture(scope="module")
def cheetah():
    return load_policy(ZOO)


@pytest.fixture
def cclient(serve_zoo):
    return serve_zoo(NAME)


def send(client, traj, inner_lr: float = 0.0, from_id: str = ""):
    return client.adapt_policy(NAME, traj.observations[0].numpy(), traj.actions[0].numpy(), traj.rewards[0].numpy(),
                               traj.lengths[0].numpy(), inner_lr=inner_lr, from_adaptation_id=from_id)


def test_the_bundled_policy_is_the_500_iteration_run_it_says(cheetah, cclient):
    client, _ = cclient
    info = client.get_model(NAME)
    assert info["kind"] == "policy" and (info["observation_size"], info["action_size"]) == (17, 6)
    assert (info["action_low"], info["action_high"]) == (pytest.approx(-1.0), pytest.approx(1.0))
    assert info["default_inner_lr"] == pytest.approx(0.1) and info["discount"] == pytest.approx(0.99)
    prov = cheetah.provenance
    assert prov["iterations"] == 500 and prov["config"]["name"] == NAME and prov["selected"] == "best"
    results = json.loads(RESULTS.read_text())  # the run's own meta-test of this iterate
    assert results["training"]["evaluated_iteration"] == prov["best_iteration"]


def test_served_step_on_cheetah_trajectories_equals_the_trainers(cheetah, cclient):
    client, server = cclient
    env = HalfCheetahVel(horizon=25)
    goal = torch.tensor([[1.2]], dtype=torch.float64)
    traj = sample_trajectories(env, cheetah.spec, cheetah.params, goal, 4, torch.Generator().manual_seed(7))
    adapted = send(client, traj)
    want = vpg_adapt(cheetah.spec, cheetah.params, traj, advantages(traj, 0.99, 1e-5, True), 0.1)
    got = {k: v.cpu() for k, v in server.cache.find(adapted.adaptation_id).params.items()}
    for name in want:
        torch.testing.assert_close(got[name], want[name][0], atol=1e-5, rtol=1e-4)
    assert sum((want[k][0] - cheetah.params[k]).abs().sum().item() for k in want) > 1e-3  # it moved
    obs = traj.observations[0, :, 10].numpy()
    actions = client.act(obs, adaptation_id=adapted.adaptation_id)
    mean, log_std = policy_forward(cheetah.spec, {k: v[0] for k, v in want.items()}, torch.from_numpy(obs))
    np.testing.assert_allclose(actions.mean, mean.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(actions.log_std, log_std.numpy(), atol=1e-6)


def test_one_served_step_adapts_the_cheetah_toward_its_goal_velocity(cheetah, cclient):
    client, _ = cclient
    env = HalfCheetahVel()  # the paper's horizon, 200 steps
    goals = torch.tensor([[0.2], [1.8]], dtype=torch.float64)  # slow and fast: the meta-policy suits neither
    with ThreadPoolExecutor(max_workers=2) as pool:  # the demo's client: every action from Predict
        policies = rl_demo.WirePolicies(client, NAME, 2, pool)
        before = rl_demo.sample_through_the_wire(env, policies, goals, 20, torch.Generator().manual_seed(11))
        policies.adapt(before, 0.1)  # one Adapt per goal on its 20 trajectories
        after = rl_demo.sample_through_the_wire(env, policies, goals, 20, torch.Generator().manual_seed(12))
    pre, post = before.returns().mean(1), after.returns().mean(1)
    # 2026-12-03, the 500-iteration policy: -129.9 -> -62.7 (0.2 m/s) and -269.7 -> -234.4 (1.8 m/s); the
    # meta-test over 40 goals gains 39 points in one step (docs/results/halfcheetah-vel/results.md)
    assert torch.all(post > pre + 10), (pre.tolist(), post.tolist())


def test_rl_demo_adapts_the_cheetah_through_the_wire_as_the_trainer_evaluates(cheetah, cclient, tmp_path, capsys):
    """server.rl_demo on the cheetah: the trainer's evaluation's returns on the same goals and noise, its plot.

    Over 10-step episodes: float32 matmuls may round in the last bit with the batch a request lands in on the server
    (MKL on an AMD EPYC does, 6e-8 on the first action), and 200 steps of MuJoCo contacts amplify one bit into another
    trajectory (0.05 to 135 apart per goal; the batching varies with timing). Over 10 steps (AMD EPYC) the served
    returns equal the trainer's before the step and differ by 0.001 after it (0.003 at 15 steps, 0.095 at 25), while a
    step with lr 0.09 for 0.1 moves them by 0.06 and 0.26, and other noise by 3 to 11.
    """
    client, server = cclient
    out = tmp_path / "demo"
    assert rl_demo.main(["--address", server.address, "--model", NAME, "--goals", "2", "--trajectories", "3",
                         "--steps", "1", "--horizon", HORIZON, "--plot-goals", "2", "--out", str(out),
                         "--progress", "false"]) == 0
    record = json.loads((out / "rl_demo.json").read_text())
    want = evaluate_policy(HalfCheetahVel(horizon=int(HORIZON)), cheetah.spec, cheetah.params, tasks=2, steps=1,
                           trajectories=3)
    goals = HalfCheetahVel().sample_tasks(2, torch.Generator().manual_seed(rl_demo.TEST_SEED))
    assert record["goal_positions"] == [[round(v, 4) for v in g] for g in goals.tolist()]  # the evaluation's goals
    assert record["env"] == NAME and record["lrs"] == want["lrs"] == [0.1]
    assert (record["horizon"], record["config_horizon"]) == (int(HORIZON), 200)
    for got, expected in zip(record["per_goal"], want["per_task"], strict=True):
        assert got == pytest.approx(expected, abs=0.01)
    assert record["trainer"] is None  # the trainer evaluated 200-step episodes: nothing to compare with
    assert (out / "rl_demo.png").stat().st_size > 10_000
    md = (out / "rl_demo.md").read_text()
    assert "through the wire" in md and f"episodes of {HORIZON} steps (the config trains and evaluates 200" in md
    assert "paper (Finn" not in md  # the paper's returns are of 200-step episodes


def test_rl_demo_at_the_config_horizon_sets_the_trainer_and_paper_rows_beside(cclient, tmp_path, capsys):
    """The default episodes are the config's (200 steps): the table has the trainer's evaluation and the paper."""
    client, server = cclient
    out = tmp_path / "demo"
    assert rl_demo.main(["--address", server.address, "--model", NAME, "--goals", "1", "--trajectories", "2",
                         "--steps", "0", "--out", str(out), "--progress", "false"]) == 0
    record = json.loads((out / "rl_demo.json").read_text())
    assert record["horizon"] == record["config_horizon"] == 200 and record["trainer"]["row"] == "MAML (best iterate)"
    md = (out / "rl_demo.md").read_text()
    assert "≈ -140 to -130" in md and "trainer's evaluation (MAML (best iterate), 40 goals)" in md  # Fig. 5, read off


def test_rl_demo_refuses_a_negative_horizon(capsys):
    with pytest.raises(SystemExit) as exit_:
        rl_demo.main(["--address", "127.0.0.1:1", "--model", NAME, "--horizon", "-3"])
    assert exit_.value.code == 2 and "--horizon -3 >= 0" in capsys.readouterr().err


def test_rl_demo_refuses_a_model_that_is_not_a_policy(cclient, make_server, tiny_model_dir, capsys):
    server = make_server(model_dir=tiny_model_dir)
    name = next(iter(TINY_SPECS))
    with pytest.raises(SystemExit) as exit_:
        rl_demo.main(["--address", server.address, "--model", name, "--goals", "1", "--progress", "false"])
    assert exit_.value.code == 2 and f"model {name} is a classifier, expected a policy" in capsys.readouterr().err
