"""The meta-update's math on a tiny float64 policy: inner VPG gradient, meta-gradient and Fisher-vector product
against finite differences and an explicit Hessian; conjugate gradient; the TRPO step's KL bound."""

import dataclasses

import pytest
import torch

from models.policy import PolicySpec, init_policy
from trainer.rl.maml_trpo import (
    MetaBatch,
    MetaObjective,
    TRPOSettings,
    conjugate_gradient,
    flatten,
    surrogate,
    trpo_step,
    unflatten,
)
from trainer.rl.sampler import Trajectories
from trainer.rl.vpg import adapt, reinforce_loss

SPEC = PolicySpec("tiny", "navigation-2d", 2, 2, hidden=(4, 3), init_std=0.7)
LR = 0.3


def tiny_round(seed, tasks=2, batch=3, horizon=5, dtype=torch.float64) -> tuple[Trajectories, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, horizon + 1, (tasks, batch), generator=g)
    mask = (torch.arange(horizon) < lengths.unsqueeze(-1)).to(dtype)
    obs = torch.randn(tasks, batch, horizon, 2, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    actions = torch.randn(tasks, batch, horizon, 2, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    adv = torch.randn(tasks, batch, horizon, generator=g, dtype=dtype) * mask
    return Trajectories(obs, actions, torch.zeros(tasks, batch, horizon, dtype=dtype), lengths), adv


def tiny_problem(seed=0):
    params = init_policy(SPEC, torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1),
                                       dtype=torch.float64) for k, v in params.items()}  # nonzero biases too
    train, train_adv = tiny_round(seed + 2)
    valid, valid_adv = tiny_round(seed + 3)
    return params, MetaBatch(train, train_adv, valid, valid_adv)


def central_difference(f, theta: torch.Tensor, eps=1e-6) -> torch.Tensor:
    out = torch.zeros_like(theta)
    for i in range(theta.numel()):
        d = torch.zeros_like(theta)
        d[i] = eps
        out[i] = (f(theta + d) - f(theta - d)) / (2 * eps)
    return out


def test_inner_step_is_minus_lr_times_the_finite_difference_gradient_of_each_tasks_surrogate():
    params, batch = tiny_problem()
    fast = adapt(SPEC, params, batch.train, batch.train_adv, LR)
    theta = flatten(params.values())
    for t in range(2):
        one = batch.train.task(t)
        adv = batch.train_adv[t:t + 1]
        fd = central_difference(lambda x, one=one, adv=adv: reinforce_loss(SPEC, unflatten(x, params), one, adv)
                                .item(), theta)
        step = (theta - flatten(v[t] for v in fast.values())) / LR
        assert torch.allclose(step, fd, rtol=1e-6, atol=1e-8), (step - fd).abs().max()


def test_surrogate_gradient_matches_finite_differences_through_the_inner_step():
    params, batch = tiny_problem(1)
    objective = MetaObjective(SPEC, params, batch, LR)
    theta = flatten(params.values())

    def loss(x):
        with torch.no_grad():
            return surrogate(SPEC, unflatten(x, params), batch, LR, objective.old, second_order=False)[0].item()

    fd = central_difference(loss, theta)
    assert torch.allclose(objective.grad, fd, rtol=1e-5, atol=1e-8), (objective.grad - fd).abs().max()
    # the first-order variant differs: it drops the inner Hessian from the chain rule
    first = MetaObjective(SPEC, params, batch, LR, second_order=False).grad
    assert (first - fd).abs().max() > 1e-3


def test_fisher_vector_product_equals_the_explicit_hessian_of_the_kl():
    params, batch = tiny_problem(2)
    objective = MetaObjective(SPEC, params, batch, LR)
    theta = flatten(params.values())

    def kl(x):
        return surrogate(SPEC, unflatten(x, params), batch, LR, objective.old, second_order=True)[1]

    hessian = torch.autograd.functional.hessian(kl, theta)
    assert kl(theta.clone().requires_grad_(True)).item() == pytest.approx(0.0, abs=1e-14)
    n = theta.numel()
    products = torch.stack([objective.fisher_vector_product(e) for e in torch.eye(n, dtype=torch.float64)], 1)
    assert torch.allclose(products, hessian, rtol=1e-7, atol=1e-10), (products - hessian).abs().max()
    assert torch.linalg.eigvalsh(hessian).min() > -1e-10  # a Fisher matrix: positive semi-definite
    # the inner step matters: the product without its Jacobian (first order) is far from this Hessian
    first = MetaObjective(SPEC, params, batch, LR, second_order=False)
    ones = torch.ones(n, dtype=torch.float64)
    assert (first.fisher_vector_product(ones) - hessian @ ones).abs().max() > 1.0
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(objective.fisher_vector_product(v, damping=0.1), hessian @ v + 0.1 * v, atol=1e-10)


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=12)  # n iterations solve an n-dimensional system
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    few = conjugate_gradient(lambda v: a @ v, b, iters=3)
    assert (a @ few - b).norm() < b.norm()  # fewer iterations: a partial but improving solution


@pytest.mark.parametrize("max_kl", [1e-2, 1e-6])
def test_trpo_step_decreases_the_surrogate_within_the_kl_bound(max_kl):
    params, batch = tiny_problem(3)
    settings = TRPOSettings(max_kl=max_kl)
    new, info = trpo_step(SPEC, params, batch, LR, settings)
    assert "rejected" not in info and info["ls_steps"] >= 0
    objective = MetaObjective(SPEC, params, batch, LR)
    with torch.no_grad():
        loss, kl, _ = surrogate(SPEC, new, batch, LR, objective.old, second_order=False)
    assert loss.item() < objective.loss.item()
    assert 0 < kl.item() < max_kl
    assert info["kl_after"] == pytest.approx(kl.item(), rel=1e-9)
    if max_kl == 1e-6:  # a tiny trust region: the quadratic model 0.5 s^T F s is exact
        assert info["ls_steps"] <= 1  # the full step lands on the bound, up to the cubic term
        assert kl.item() == pytest.approx(max_kl * info["step_fraction"] ** 2, rel=0.02)


def test_trpo_keeps_the_parameters_when_no_step_improves():
    params, batch = tiny_problem(4)
    batch = dataclasses.replace(batch, valid_adv=torch.zeros_like(batch.valid_adv))  # a flat surrogate
    new, info = trpo_step(SPEC, params, batch, LR, TRPOSettings(ls_max_steps=3))
    assert "rejected" in info
    assert all(torch.equal(new[k], params[k]) for k in params)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_kl=0"):
        TRPOSettings(max_kl=0)
    with pytest.raises(ValueError, match=r"ls_backtrack_ratio=1.5, expected in \(0, 1\)"):
        TRPOSettings(ls_backtrack_ratio=1.5)
