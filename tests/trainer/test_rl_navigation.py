"""2D navigation: rewards, clipping and termination against hand-computed cases; batched sampling; seeding."""

import math

import pytest
import torch

from models.policy import PolicySpec, init_policy, policy_forward
from trainer.rl.navigation import Navigation2D
from trainer.rl.sampler import sample_trajectories

SPEC = PolicySpec("nav-test", "navigation-2d", 2, 2, hidden=(8, 8))


def one_task_mean(p, obs):
    """The 2-hidden-layer ReLU MLP written out for one task (the reference for the stacked forward)."""
    h = torch.relu(obs @ p["fc0.weight"].T + p["fc0.bias"])
    h = torch.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def test_reset_starts_every_episode_at_the_origin():
    env = Navigation2D()
    obs = env.reset(torch.tensor([[0.3, -0.2], [0.0, 0.4]]), 3)
    assert obs.shape == (2, 3, 2) and torch.equal(obs, torch.zeros(2, 3, 2))


def test_step_clips_each_coordinate_and_rewards_minus_the_distance_after_the_step():
    env = Navigation2D()
    env.reset(torch.tensor([[0.3, -0.2]]), 2)
    # episode 0: (0.5, -0.05) clips to (0.1, -0.05); episode 1: (-0.3, 0.02) clips to (-0.1, 0.02)
    obs, reward, done = env.step(torch.tensor([[[0.5, -0.05], [-0.3, 0.02]]]))
    assert torch.allclose(obs, torch.tensor([[[0.1, -0.05], [-0.1, 0.02]]]))
    expected = [-math.hypot(0.3 - 0.1, -0.2 + 0.05), -math.hypot(0.3 + 0.1, -0.2 - 0.02)]  # -0.25, -0.4566
    assert reward[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(-0.25)
    assert not done.any()
    obs, reward, _ = env.step(torch.tensor([[[0.1, -0.1], [0.0, 0.0]]]))  # positions accumulate
    assert torch.allclose(obs, torch.tensor([[[0.2, -0.15], [-0.1, 0.02]]]))
    assert reward[0, 0].item() == pytest.approx(-math.hypot(0.1, 0.05), abs=1e-6)


def test_done_needs_both_coordinates_strictly_within_the_tolerance():
    env = Navigation2D()
    goals = torch.tensor([[0.05, 0.05]])
    env.reset(goals, 4)
    actions = torch.tensor([[[0.05, 0.05],     # exactly on the goal
                             [0.045, 0.055],    # 0.005 off on both: inside
                             [0.05, 0.065],     # y 0.015 off: outside
                             [0.061, 0.05]]])   # x 0.011 off: outside
    _, reward, done = env.step(actions)
    assert done[0].tolist() == [True, True, False, False]
    assert reward[0, 0].item() == pytest.approx(0.0, abs=1e-7)


def test_time_limit_and_termination_in_sampled_trajectories():
    """A policy aimed straight at a reachable goal stops there; one that cannot reach it runs the 100 steps."""
    env = Navigation2D()
    spec = PolicySpec("nav-test", "navigation-2d", 2, 2, hidden=(4,), min_std=1e-8)
    params = {k: torch.zeros_like(v) for k, v in init_policy(spec).items()}
    params["head.bias"] = torch.tensor([0.1, 0.1])  # mean velocity (0.1, 0.1) in any state
    params["log_std"] = torch.full((2,), math.log(1e-8))  # (almost) deterministic
    goals = torch.tensor([[0.3, 0.3], [-0.4, 0.2]])
    traj = sample_trajectories(env, spec, params, goals, 2, torch.Generator().manual_seed(0))
    assert traj.lengths.tolist() == [[3, 3], [100, 100]]
    mask = traj.mask
    assert mask[0].sum().item() == 6 and mask[1].sum().item() == 200
    assert torch.equal(traj.rewards[0, :, 3:], torch.zeros(2, 97))  # nothing past a trajectory's end
    expected = [-math.hypot(0.2, 0.2), -math.hypot(0.1, 0.1), 0.0]
    assert traj.rewards[0, 0, :3].tolist() == pytest.approx(expected, abs=1e-6)
    # the observation at step t is the position before action t
    assert torch.allclose(traj.observations[0, 0, :3], torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.2, 0.2]]), atol=1e-6)
    # the unreachable goal: the point moves (0.1, 0.1) per step for 100 steps
    t = torch.arange(1, 101, dtype=torch.float64)
    far = -torch.sqrt((0.1 * t + 0.4) ** 2 + (0.1 * t - 0.2) ** 2)
    assert traj.returns()[1, 0].item() == pytest.approx(far.sum().item(), rel=1e-5)


def test_actions_are_stored_unclipped():
    env = Navigation2D()
    spec = PolicySpec("nav-test", "navigation-2d", 2, 2, hidden=(4,))
    params = init_policy(spec, torch.Generator().manual_seed(0))  # std 1: most samples exceed 0.1
    traj = sample_trajectories(env, spec, params, torch.tensor([[0.2, 0.2]]), 4, torch.Generator().manual_seed(1))
    assert traj.actions.abs().max() > 0.5
    step = traj.observations[0, :, 1] - traj.observations[0, :, 0]
    assert torch.allclose(step, traj.actions[0, :, 0].clamp(-0.1, 0.1), atol=1e-6)


def test_goals_are_uniform_in_the_square():
    goals = Navigation2D().sample_tasks(4000, torch.Generator().manual_seed(0))
    assert goals.shape == (4000, 2)
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.mean(0).abs().max() < 0.02 and (goals.var(0) - 1 / 12).abs().max() < 0.005


def test_sampling_is_a_function_of_the_seed():
    env = Navigation2D()
    params = init_policy(SPEC, torch.Generator().manual_seed(0))

    def round_(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_trajectories(env, SPEC, params, env.sample_tasks(3, g), 5, g)

    a, b, c = round_(7), round_(7), round_(8)
    for x, y in ((a.observations, b.observations), (a.actions, b.actions), (a.rewards, b.rewards)):
        assert torch.equal(x, y)
    assert not torch.equal(a.actions, c.actions)


def test_stacked_parameters_act_per_task():
    """Task-stacked parameters give each task its own policy: the same as sampling each task alone."""
    env = Navigation2D()
    g = torch.Generator().manual_seed(3)
    per_task = [init_policy(SPEC, g) for _ in range(2)]
    stacked = {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}
    goals = env.sample_tasks(2, g)
    both = sample_trajectories(env, SPEC, stacked, goals, 3, torch.Generator().manual_seed(5))
    mean_alone = torch.stack([one_task_mean(p, both.observations[t]) for t, p in enumerate(per_task)])
    mean, _ = policy_forward(SPEC, stacked, both.observations)
    assert torch.allclose(mean, mean_alone, atol=1e-6)


def test_bad_shapes_name_the_value():
    env = Navigation2D()
    with pytest.raises(ValueError, match=r"tasks have shape \[3\], expected \[T, 2\]"):
        env.reset(torch.zeros(3), 2)
    env.reset(torch.zeros(1, 2), 2)
    with pytest.raises(ValueError, match=r"actions have shape \[1, 3, 2\], expected \[1, 2, 2\]"):
        env.step(torch.zeros(1, 3, 2))
