"""The linear feature baseline against numpy least squares, discounted returns and advantages by hand."""

import numpy as np
import pytest
import torch

from trainer.rl.baseline import advantages, baseline_features, discounted_returns, fit_linear_baseline
from trainer.rl.sampler import Trajectories


def random_round(tasks=3, batch=4, horizon=12, seed=0) -> Trajectories:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, horizon + 1, (tasks, batch), generator=g)
    lengths[0, 0] = horizon
    mask = (torch.arange(horizon) < lengths.unsqueeze(-1)).float()
    obs = torch.randn(tasks, batch, horizon, 2, generator=g) * mask.unsqueeze(-1)
    actions = torch.randn(tasks, batch, horizon, 2, generator=g) * mask.unsqueeze(-1)
    rewards = -torch.rand(tasks, batch, horizon, generator=g) * mask
    return Trajectories(obs, actions, rewards, lengths)


def numpy_reference(traj: Trajectories, task: int, discount: float, reg: float):
    """rllab's LinearFeatureBaseline for one task, written with numpy from its definition."""
    rows, targets = [], []
    for b in range(traj.lengths.shape[1]):
        n = int(traj.lengths[task, b])
        o = traj.observations[task, b, :n].double().numpy()
        t = np.arange(n)[:, None] / 100.0
        rows.append(np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones((n, 1))], axis=1))
        r = traj.rewards[task, b, :n].double().numpy()
        ret = np.array([sum(discount ** k * r[i + k] for k in range(n - i)) for i in range(n)])
        targets.append(ret)
    x, y = np.concatenate(rows), np.concatenate(targets)
    # ridge regression as an augmented least-squares problem (an independent route to the same solution)
    coeffs = np.linalg.lstsq(np.vstack([x, np.sqrt(reg) * np.eye(x.shape[1])]),
                             np.concatenate([y, np.zeros(x.shape[1])]), rcond=None)[0]
    return x, y, coeffs


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th step was never taken
    out = discounted_returns(rewards, mask, 0.5)
    assert out.tolist() == [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]


def test_fit_matches_numpy_least_squares_per_task():
    traj = random_round()
    feats = baseline_features(traj)
    returns = discounted_returns(traj.rewards.double(), traj.mask.double(), 0.99)
    coeffs = fit_linear_baseline(feats.reshape(3, -1, 8), returns.reshape(3, -1), 1e-5)
    for t in range(3):
        x, y, ref = numpy_reference(traj, t, 0.99, 1e-5)
        assert np.allclose(coeffs[t].numpy(), ref, rtol=1e-6, atol=1e-8)
        # the padded rows of the batched features are zero: the valid rows are exactly numpy's design matrix
        valid = feats[t][traj.mask[t].bool()].numpy()
        assert np.allclose(valid, x)


def test_advantages_are_returns_minus_baseline_then_standardized():
    traj = random_round(seed=1)
    raw = advantages(traj, 0.99, 1e-5, normalize=False)
    norm = advantages(traj, 0.99, 1e-5, normalize=True)
    for t in range(3):
        x, y, coeffs = numpy_reference(traj, t, 0.99, 1e-5)
        valid = traj.mask[t].bool()
        assert np.allclose(raw[t][valid].numpy(), y - x @ coeffs, atol=1e-5)
        a = norm[t][valid].double()
        assert a.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
        assert torch.equal(norm[t][~valid], torch.zeros((~valid).sum().item()))


def test_singular_normal_equations_need_regularization():
    """X^T X singular (a feature column of zeros): no regularization cannot fit (0 x 10 stays 0); 1e-5 fits, with
    the unused feature's coefficient 0 and the rest the least-squares line."""
    x = torch.zeros(1, 6, 3, dtype=torch.float64)
    x[0, :, 0] = torch.arange(6.0)
    x[0, :, 2] = 1.0
    y = 2 * torch.arange(6.0, dtype=torch.float64).unsqueeze(0) + 1
    with pytest.raises(RuntimeError, match=r"tasks \[0\] have no finite solution even with regularization 0"):
        fit_linear_baseline(x, y, reg=0.0)
    coeffs = fit_linear_baseline(x, y, reg=1e-5)
    assert coeffs[0].tolist() == pytest.approx([2.0, 0.0, 1.0], abs=1e-4)


def test_unsolvable_normal_equations_raise_naming_the_task():
    x = torch.ones(2, 4, 3, dtype=torch.float64)
    y = torch.ones(2, 4, dtype=torch.float64)
    y[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"tasks \[1\] have no finite solution"):
        fit_linear_baseline(x, y, reg=1e-5)
