"""The Gaussian MLP policy: forward, log-density and KL against torch.distributions; the checkpoint format."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from models.checkpoint import CheckpointError
from models.policy import (
    PolicyModel,
    PolicySpec,
    gaussian_kl,
    gaussian_log_prob,
    init_policy,
    load_policy,
    policy_forward,
    policy_param_shapes,
    save_policy,
    stack_policy,
)

SPEC = PolicySpec("nav", "navigation-2d", 2, 2)


def test_shapes_and_initialization_follow_the_paper():
    shapes = policy_param_shapes(SPEC)
    assert shapes == {"fc0.weight": (100, 2), "fc0.bias": (100,), "fc1.weight": (100, 100), "fc1.bias": (100,),
                      "head.weight": (2, 100), "head.bias": (2,), "log_std": (2,)}
    p = init_policy(SPEC, torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / 200)
    assert p["fc1.weight"].abs().max() <= bound and p["fc1.weight"].abs().max() > 0.9 * bound  # Xavier uniform
    assert torch.equal(p["fc0.bias"], torch.zeros(100)) and torch.equal(p["log_std"], torch.zeros(2))  # std 1


def test_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, a = (torch.randn(5, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    s1, s2 = (torch.randn(2, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    d1, d2 = Independent(Normal(m1, s1.exp()), 1), Independent(Normal(m2, s2.exp()), 1)
    assert torch.allclose(gaussian_log_prob(m1, s1, a), d1.log_prob(a), atol=1e-12)
    assert torch.allclose(gaussian_kl(m1, s1, m2, s2), kl_divergence(d1, d2), atol=1e-12)


def test_stacked_forward_equals_each_task_alone_and_clamps_the_std():
    g = torch.Generator().manual_seed(1)
    tasks = [init_policy(SPEC, g) for _ in range(3)]
    tasks[2]["log_std"] = torch.tensor([-20.0, 0.3])  # below log(1e-6): clamped
    stacked = {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}
    obs = torch.randn(3, 4, 5, 2, generator=g)
    mean, log_std = policy_forward(SPEC, stacked, obs)
    assert mean.shape == (3, 4, 5, 2) and log_std.shape == (3, 1, 1, 2)
    for i, t in enumerate(tasks):
        m, s = policy_forward(SPEC, t, obs[i])
        assert torch.allclose(mean[i], m, atol=1e-6) and torch.equal(log_std[i, 0, 0], s)
    assert log_std[2, 0, 0].tolist() == pytest.approx([math.log(1e-6), 0.3])
    same = policy_forward(SPEC, stack_policy(tasks[0], 3), obs)[0]
    assert torch.allclose(same[1], policy_forward(SPEC, tasks[0], obs[1])[0], atol=1e-6)


def test_forward_rejects_wrong_shapes_naming_them():
    p = init_policy(SPEC)
    with pytest.raises(ValueError, match=r"observations have shape \[4, 3\], expected \[..., 2\]"):
        policy_forward(SPEC, p, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"expected \[2, ..., 2\] for parameters stacked over 2 tasks"):
        policy_forward(SPEC, stack_policy(p, 2), torch.zeros(3, 5, 2))


def test_checkpoint_round_trip_and_rejections(tmp_path):
    model = PolicyModel(SPEC, init_policy(SPEC, torch.Generator().manual_seed(0)), {"iterations": 7})
    path = save_policy(tmp_path / "p.pt", model)
    back = load_policy(path)
    assert back.spec == SPEC and back.provenance == {"iterations": 7}
    assert all(torch.equal(back.params[k], model.params[k]) for k in model.params)

    with pytest.raises(CheckpointError, match="no such policy checkpoint"):
        load_policy(tmp_path / "missing.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trunc.pt: not a readable policy checkpoint"):
        load_policy(tmp_path / "trunc.pt")
    torch.save({"format": "fastadapt-checkpoint"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastadapt policy checkpoint"):
        load_policy(tmp_path / "other.pt")
    bad = dict(model.params, **{"fc1.weight": torch.zeros(100, 99)})
    save_policy(tmp_path / "shape.pt", PolicyModel(SPEC, bad))
    with pytest.raises(CheckpointError, match=r"params.fc1.weight is \[100, 99\] torch.float32, expected \[100, 100\]"):
        load_policy(tmp_path / "shape.pt")
    nan = dict(model.params, **{"log_std": torch.tensor([0.0, float("nan")])})
    save_policy(tmp_path / "nan.pt", PolicyModel(SPEC, nan))
    with pytest.raises(CheckpointError, match="params.log_std holds NaN"):
        load_policy(tmp_path / "nan.pt")


def test_spec_validation_names_the_value():
    with pytest.raises(ValueError, match="nonlinearity 'gelu'"):
        PolicySpec("x", "navigation-2d", 2, 2, nonlinearity="gelu")
    assert PolicySpec.from_dict(SPEC.to_dict()) == SPEC


SCALED = PolicySpec("nav", "navigation-2d", 2, 2, hidden=(8, 8), action_scale=0.1)


def test_action_scale_puts_the_gaussian_in_environment_units():
    unit = PolicySpec("nav", "navigation-2d", 2, 2, hidden=(8, 8))
    g = torch.Generator().manual_seed(2)
    p = init_policy(SCALED, g)
    p["log_std"] = torch.tensor([0.2, -0.4])
    obs = torch.randn(3, 5, 2, generator=g)
    mean, log_std = policy_forward(SCALED, p, obs)
    m1, s1 = policy_forward(unit, p, obs)
    assert torch.allclose(mean, 0.1 * m1, atol=1e-7) and torch.allclose(log_std, s1 + math.log(0.1), atol=1e-6)
    stacked = stack_policy(p, 3)
    ms, ss = policy_forward(SCALED, stacked, obs)
    assert torch.allclose(ms, mean, atol=1e-7) and torch.allclose(ss[:, 0], log_std.expand(3, 2), atol=1e-7)
    # init_std is in the policy's own units: 1 there is 0.1 in velocity units, as cbfinn's normalized point env
    assert torch.allclose(policy_forward(SCALED, init_policy(SCALED), obs)[1].exp(), torch.full((2,), 0.1))


def test_a_vpg_step_of_a_scaled_policy_is_the_normalized_policys_step():
    """rllab's normalize: the policy sees actions divided by the scale. Its VPG step on those equals ours on the
    environment's actions (the log-densities differ by a constant), and differs from an unscaled policy's."""
    from models.policy_adapt import Trajectories, advantages, vpg_step

    unit = PolicySpec("nav", "navigation-2d", 2, 2, hidden=(8, 8))
    g = torch.Generator().manual_seed(3)
    p = init_policy(SCALED, g)
    obs = torch.randn(2, 4, 6, 2, generator=g)
    actions = 0.1 * torch.randn(2, 4, 6, 2, generator=g)  # velocities, as a client sends them
    traj = Trajectories(obs, actions, -torch.rand(2, 4, 6, generator=g), torch.tensor([[6, 3, 6, 1], [2, 6, 6, 5]]))
    adv = advantages(traj, 0.99)
    ours = vpg_step(SCALED, p, traj, adv, 0.1)
    normalized = vpg_step(unit, p, Trajectories(obs, actions / 0.1, traj.rewards, traj.lengths), adv, 0.1)
    plain = vpg_step(unit, p, traj, adv, 0.1)
    for k in ours:
        torch.testing.assert_close(ours[k], normalized[k], atol=1e-6, rtol=1e-5)
    assert max((ours[k] - plain[k]).abs().max().item() for k in ours) > 1e-2


def test_action_scale_round_trips_and_old_checkpoints_read_as_unscaled(tmp_path):
    model = PolicyModel(SCALED, init_policy(SCALED, torch.Generator().manual_seed(0)))
    assert load_policy(save_policy(tmp_path / "s.pt", model)).spec.action_scale == 0.1
    old = SCALED.to_dict()
    del old["action_scale"]  # written before the field existed
    assert PolicySpec.from_dict(old).action_scale == 1.0
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"action_scale={bad}, expected a finite value > 0"):
            PolicySpec("x", "navigation-2d", 2, 2, action_scale=bad)
