"""HalfCheetahVel / HalfCheetahDir on gymnasium's HalfCheetah-v5: rewards from the environment's own state against
hand-computed values, clipping, no termination, goal ranges, seeding, batched = per-episode = gymnasium, and the CLI.

These tests need real MuJoCo physics (headless; no GL): without the wheels they fail, saying how to install them.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.policy import PolicySpec, init_policy, load_policy
from models.policy_adapt import adapt_policy
from trainer.rl.config import RL_CONFIGS, SOURCES, rl_config_from_args
from trainer.rl.halfcheetah import HalfCheetahDir, HalfCheetahVel, load_halfcheetah_v5
from trainer.rl.sampler import sample_trajectories
from trainer.rl.train import RLTrainer, make_env, policy_spec

try:
    import gymnasium  # noqa: F401
    import mujoco  # noqa: F401

    MISSING = ""
except ImportError as exc:
    MISSING = (f"MuJoCo physics unavailable ({exc}): install the pinned wheels with "
               "`.venv/bin/pip install -r requirements.txt` (gymnasium[mujoco], mujoco)")

ROOT = Path(__file__).resolve().parents[2]
SPEC = PolicySpec("hc-test", "halfcheetah-vel", 17, 6, hidden=(8, 8), action_low=-1.0, action_high=1.0)


@pytest.fixture(scope="module", autouse=True)
def physics():
    """Every test here fails (not skips) without the wheels: the half-cheetah environments are part of the project."""
    if MISSING:
        pytest.fail(MISSING, pytrace=False)


@pytest.fixture(scope="module")
def vel():
    return HalfCheetahVel(horizon=200)


@pytest.fixture(scope="module")
def direc():
    return HalfCheetahDir(horizon=200)


def start(env, tasks, batch=1, seed=0):
    tasks = torch.tensor(tasks, dtype=torch.float64).reshape(-1, 1)
    return env.reset(tasks, batch, torch.Generator().manual_seed(seed))


def test_v5_settings_sizes_and_bounds(vel):
    assert (vel.obs_dim, vel.act_dim, vel.action_low, vel.action_high) == (17, 6, -1.0, 1.0)
    assert vel.frame_skip == 5 and vel.model.opt.timestep == 0.01 and vel.dt == pytest.approx(0.05)
    assert vel.ctrl_cost == 0.05 and vel.reset_noise_scale == 0.1 and vel.horizon == 200
    assert (vel.nq, vel.nv, vel.nu) == (9, 9, 6)


def test_reset_draws_v5_noise_and_observes_qpos_without_x_then_qvel(vel):
    obs = start(vel, [0.5, 1.5], batch=4)
    assert obs.shape == (2, 4, 17) and obs.dtype == torch.float32
    dq, dv = vel.qpos - vel.init_qpos, vel.qvel - vel.init_qvel
    assert np.abs(dq).max() <= 0.1 and np.abs(dq).max() > 0.05  # U[-0.1, 0.1]
    assert 0.03 < dv.std() < 0.2  # 0.1 N(0, 1)
    expected = np.concatenate([vel.qpos[..., 1:], vel.qvel], axis=-1).astype(np.float32)
    assert np.array_equal(obs.numpy(), expected)


def test_velocity_reward_is_minus_the_speed_error_minus_the_control_cost(vel):
    start(vel, [0.7])
    x0 = vel.qpos[0, 0, 0]
    obs, reward, done = vel.step(torch.full((1, 1, 6), 0.5))
    v = (vel.qpos[0, 0, 0] - x0) / 0.05
    # control cost 0.05 * 6 * 0.5^2 = 0.075
    assert reward.item() == pytest.approx(-abs(v - 0.7) - 0.075, abs=1e-6)
    assert not done.any()
    x1 = vel.qpos[0, 0, 0]
    _, reward, _ = vel.step(torch.zeros(1, 1, 6))  # no control cost: the reward is the speed error alone
    assert reward.item() == pytest.approx(-abs((vel.qpos[0, 0, 0] - x1) / 0.05 - 0.7), abs=1e-6)


def test_direction_reward_is_the_signed_velocity_minus_the_control_cost(direc):
    start(direc, [1.0, -1.0], seed=3)  # the same initial state for both tasks: copy task 0's onto task 1
    qpos, qvel = direc.qpos.copy(), direc.qvel.copy()
    qpos[1], qvel[1] = qpos[0], qvel[0]
    direc.reset_to(torch.tensor([[1.0], [-1.0]], dtype=torch.float64), qpos, qvel)
    x0 = direc.qpos[:, 0, 0].copy()
    a = torch.tensor([0.2, -0.4, 0.6, -0.8, 1.0, 0.0]).expand(2, 1, 6)
    _, reward, _ = direc.step(a)
    cost = 0.05 * (0.04 + 0.16 + 0.36 + 0.64 + 1.0)  # 0.11
    v = (direc.qpos[:, 0, 0] - x0) / 0.05
    assert v[0] == v[1]  # same state, same action: the same physics
    assert reward[0, 0].item() == pytest.approx(v[0] - cost, abs=1e-6)
    assert reward[1, 0].item() == pytest.approx(-v[0] - cost, abs=1e-6)
    assert (reward[0, 0] + reward[1, 0]).item() == pytest.approx(-2 * 0.11, abs=1e-6)


def test_actions_are_clipped_before_the_physics_and_the_control_cost(vel):
    tasks = torch.tensor([[1.0]], dtype=torch.float64)
    start(vel, [1.0], seed=5)
    qpos, qvel = vel.qpos.copy(), vel.qvel.copy()
    raw = torch.tensor([[[3.0, -2.0, 0.5, 0.0, 1.0, -1.0]]])
    obs_raw, r_raw, _ = vel.step(raw)
    vel.reset_to(tasks, qpos, qvel)
    obs_clip, r_clip, _ = vel.step(raw.clamp(-1, 1))
    assert torch.equal(obs_raw, obs_clip) and torch.equal(r_raw, r_clip)
    vel.reset_to(tasks, qpos, qvel)
    x0 = vel.qpos[0, 0, 0]
    _, r, _ = vel.step(raw)
    v = (vel.qpos[0, 0, 0] - x0) / 0.05
    assert r.item() == pytest.approx(-abs(v - 1.0) - 0.05 * (1 + 1 + 0.25 + 0 + 1 + 1), abs=1e-6)  # cost 0.2125


def test_episodes_equal_gymnasiums_halfcheetah_v5_from_the_same_state(vel):
    start(vel, [1.2], seed=11)
    gym = load_halfcheetah_v5()
    gym.reset(seed=0)
    gym.set_state(vel.qpos[0, 0], vel.qvel[0, 0])
    g = torch.Generator().manual_seed(2)
    for _ in range(15):
        a = torch.rand(1, 1, 6, generator=g) * 2 - 1  # within bounds: gymnasium does not clip before its cost
        obs, reward, _ = vel.step(a)
        gym_obs, _, terminated, truncated, info = gym.step(a[0, 0].double().numpy())
        assert not terminated and not truncated
        assert np.array_equal(np.concatenate([vel.qpos[0, 0, 1:], vel.qvel[0, 0]]), gym_obs)  # bit for bit
        assert np.array_equal(obs[0, 0].numpy(), gym_obs.astype(np.float32))
        # v5's reward is x_velocity - 0.1 |a|^2: ours uses its x_velocity with pytorch-maml-rl's 0.05
        expected = -abs(info["x_velocity"] - 1.2) + 0.5 * info["reward_ctrl"]
        assert reward.item() == pytest.approx(expected, abs=1e-5)


def test_batched_steps_equal_each_episode_stepped_alone(vel):
    tasks = torch.tensor([[0.3], [1.7]], dtype=torch.float64)
    obs = vel.reset(tasks, 3, torch.Generator().manual_seed(4))
    qpos, qvel = vel.qpos.copy(), vel.qvel.copy()
    g = torch.Generator().manual_seed(9)
    actions = [torch.randn(2, 3, 6, generator=g) for _ in range(8)]  # std 1: many coordinates clip
    batched = [vel.step(a)[:2] for a in actions]
    for t in range(2):
        for b in range(3):
            alone = vel.reset_to(tasks[t:t + 1], qpos[t:t + 1, b:b + 1], qvel[t:t + 1, b:b + 1])
            assert torch.equal(alone[0, 0], obs[t, b])
            for a, (obs_all, rew_all) in zip(actions, batched):
                o, r, _ = vel.step(a[t:t + 1, b:b + 1])
                assert torch.equal(o[0, 0], obs_all[t, b]) and torch.equal(r[0, 0], rew_all[t, b])


def test_goal_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    env_v, env_d = make_env(RL_CONFIGS["halfcheetah-vel"]), make_env(RL_CONFIGS["halfcheetah-dir"])
    v = env_v.sample_tasks(4000, g)
    assert v.shape == (4000, 1) and v.dtype == torch.float64
    assert v.min() >= 0.0 and v.max() <= 2.0 and v.min() < 0.01 and v.max() > 1.99
    assert abs(v.mean().item() - 1.0) < 0.03 and abs(v.var().item() - 1 / 3) < 0.02  # U[0, 2]
    d = env_d.sample_tasks(4000, g)
    assert set(d.flatten().tolist()) == {-1.0, 1.0} and abs((d == 1).double().mean().item() - 0.5) < 0.03


def test_no_termination_every_episode_runs_the_horizon(direc):
    env = HalfCheetahDir(horizon=25)
    params = init_policy(SPEC, torch.Generator().manual_seed(0))
    traj = sample_trajectories(env, SPEC, params, torch.tensor([[1.0], [-1.0]], dtype=torch.float64), 3,
                               torch.Generator().manual_seed(1))
    assert traj.lengths.tolist() == [[25] * 3] * 2 and traj.mask.sum().item() == 150
    assert traj.observations.shape == (2, 3, 25, 17) and traj.actions.shape == (2, 3, 25, 6)
    assert traj.actions.abs().max() > 1.5  # stored as sampled, before the environment clips them
    assert torch.isfinite(traj.rewards).all() and (traj.rewards != 0).all()


def test_rounds_are_a_function_of_the_seed(vel):
    params = init_policy(SPEC, torch.Generator().manual_seed(0))
    env = HalfCheetahVel(horizon=12)

    def round_(seed, e):
        g = torch.Generator().manual_seed(seed)
        return sample_trajectories(e, SPEC, params, e.sample_tasks(2, g), 3, g)

    a, b, c = round_(7, env), round_(7, HalfCheetahVel(horizon=12)), round_(8, env)
    for x, y in ((a.observations, b.observations), (a.actions, b.actions), (a.rewards, b.rewards)):
        assert torch.equal(x, y)  # the same seed, a reused or a fresh environment: the same round
    assert not torch.equal(a.observations[:, :, 0], c.observations[:, :, 0])  # the initial states differ


def test_bad_tasks_and_actions_name_the_value(vel, direc):
    with pytest.raises(ValueError, match=r"tasks have shape \[3\], expected \[T, 1\]"):
        vel.reset(torch.zeros(3), 2)
    with pytest.raises(ValueError, match=r"directions \[1.0, 0.5\], expected \+1 or -1"):
        direc.reset(torch.tensor([[1.0], [0.5]]), 2)
    start(vel, [1.0], batch=2)
    with pytest.raises(ValueError, match=r"actions have shape \[1, 2, 5\], expected \[1, 2, 6\]"):
        vel.step(torch.zeros(1, 2, 5))


def test_configs_record_the_paper_settings_and_the_served_spec_carries_the_sizes():
    for name in ("halfcheetah-vel", "halfcheetah-dir"):
        cfg, _ = rl_config_from_args([name])
        assert (cfg.env, cfg.meta_batch, cfg.trajectories, cfg.horizon) == (name, 40, 20, 200)
        assert (cfg.inner_lr, cfg.eval_lr, cfg.max_kl, cfg.hidden_sizes) == (0.1, 0.05, 0.01, (100, 100))
    for key in ("env", "meta_batch", "trajectories", "horizon", "inner_lr", "max_kl", "actions"):
        assert f"halfcheetah.{key}" in SOURCES, key
    env = HalfCheetahVel(horizon=10)
    spec = policy_spec(dataclasses.replace(RL_CONFIGS["halfcheetah-vel"], hidden=8), env)
    assert (spec.obs_dim, spec.act_dim, spec.action_low, spec.action_high) == (17, 6, -1.0, 1.0)
    # the server's inner step (models.policy_adapt.adapt_policy) on one task's trajectories from this environment
    params = init_policy(spec, torch.Generator().manual_seed(0))
    traj = sample_trajectories(env, spec, params, env.sample_tasks(1, torch.Generator().manual_seed(1)), 4,
                               torch.Generator().manual_seed(2))
    result = adapt_policy(spec, params, traj)
    assert result.params["fc0.weight"].shape == (1, 8, 17) and torch.isfinite(result.surrogate).all()
    assert result.surrogate[1, 0] < result.surrogate[0, 0]  # the VPG step lowers the surrogate


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path):
    small = dataclasses.replace(RL_CONFIGS["halfcheetah-dir"], hidden=8, meta_batch=2, trajectories=2, horizon=6,
                                checkpoint_every=1, progress=False)
    straight = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "a"))).train()
    RLTrainer(dataclasses.replace(small, iterations=1, out_dir=str(tmp_path / "b"))).train()
    resumed = RLTrainer(dataclasses.replace(small, iterations=2, out_dir=str(tmp_path / "b")), resume=True).train()
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k]), k
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    log_a = (tmp_path / "a" / "state" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "state" / "log.jsonl").read_text().splitlines()
    assert [strip(x) for x in log_a] == [strip(x) for x in log_b] and len(log_a) == 2


def test_cli_one_iteration_writes_its_log_results_and_policy(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "trainer", "halfcheetah-vel", "--iterations", "1", "--meta_batch", "2",
            "--trajectories", "2", "--horizon", "10", "--hidden", "8", "--eval_tasks", "2", "--eval_trajectories", "2",
            "--progress", "false", "--out_dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (run / "state" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["iteration"] == 1 and math.isfinite(log[0]["return_post"])
    assert log[0]["return_pre"] < 0  # -|v - v_goal| - cost: every reward is negative
    for name in ("results.json", "results.md", "training.png", "meta_test_steps.png", "policy.pt", "state/state.pt"):
        assert (run / name).is_file(), name
    result = json.loads((run / "results.json").read_text())
    assert all(len(r["mean"]) == 4 for r in result["evaluations"].values())
    model = load_policy(run / "policy.pt")
    assert (model.spec.env, model.spec.obs_dim, model.spec.act_dim) == ("halfcheetah-vel", 17, 6)
    assert (model.spec.action_low, model.spec.action_high, model.spec.hidden) == (-1.0, 1.0, (8, 8))
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()  # MuJoCo's load-time deprecation warning is caught


def test_resume_drops_log_records_past_the_saved_state(tmp_path):
    """A run killed between two saves logged iterations it runs again after --resume: each appears once."""
    small = dataclasses.replace(RL_CONFIGS["halfcheetah-dir"], hidden=8, meta_batch=2, trajectories=2, horizon=6,
                                checkpoint_every=2, progress=False, out_dir=str(tmp_path))
    RLTrainer(dataclasses.replace(small, iterations=2)).train()  # state saved at 2
    log = tmp_path / "state" / "log.jsonl"
    with open(log, "a") as f:  # iteration 3 was logged, then the process was killed before the next save
        f.write(json.dumps({"iteration": 3, "return_pre": 0.0}) + "\n")
    RLTrainer(dataclasses.replace(small, iterations=4), resume=True).train()
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads(log.read_text().splitlines()[2])["return_pre"] != 0.0  # the rerun's record, not the dead one's
