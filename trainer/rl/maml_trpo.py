"""The meta-update: TRPO (Schulman et al. 2015) on the post-adaptation surrogate, as in the MAML paper.

For a meta-batch of tasks with training trajectories D (from the meta-policy theta) and validation trajectories D'
(from the adapted policies theta'_i = theta - alpha grad L_i(theta; D_i)), TRPO minimizes
    L(theta) = mean_i -mean_t [pi_theta'_i(a_t|s_t) / pi_old'_i(a_t|s_t)] A'_t      over D'_i
subject to KL = mean_i mean_t KL(pi_old'_i || pi_theta'_i) <= max_kl, both differentiated through the inner step
(cbfinn/maml_rl's `MAMLNPO`, pytorch-maml-rl's `MAMLTRPO.step`). The step direction solves F s = grad L by
conjugate gradient, F the Hessian of the KL at theta (Fisher-vector products by double backpropagation through the
inner step, plus damping); it is scaled to 0.5 s^T F s = max_kl and backtracked until the surrogate decreases and
the KL is within the bound (else theta is kept).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from models.policy import PolicySpec, gaussian_kl, gaussian_log_prob, policy_forward, stack_policy
from trainer.rl.sampler import Trajectories
from trainer.rl.vpg import adapt, masked_task_mean, reinforce_loss


@dataclass(frozen=True)
class TRPOSettings:
    max_kl: float = 1e-2
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8

    def __post_init__(self):
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise ValueError(f"max_kl={self.max_kl}, expected a positive finite number")
        if self.cg_iters < 1 or self.ls_max_steps < 1 or self.cg_damping < 0:
            raise ValueError(f"cg_iters={self.cg_iters}, ls_max_steps={self.ls_max_steps}, "
                             f"cg_damping={self.cg_damping}, expected >= 1, >= 1, >= 0")
        if not 0 < self.ls_backtrack_ratio < 1:
            raise ValueError(f"ls_backtrack_ratio={self.ls_backtrack_ratio}, expected in (0, 1)")


@dataclass
class MetaBatch:
    """One meta-iteration's data: training (pre-adaptation) and validation (post-adaptation) rounds, advantages."""

    train: Trajectories
    train_adv: torch.Tensor
    valid: Trajectories
    valid_adv: torch.Tensor


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i: i + v.numel()].view_as(v)
        i += v.numel()
    if i != vector.numel():
        raise ValueError(f"flat vector has {vector.numel()} elements, expected {i} for parameters {list(like)}")
    return out


def adapted_params(spec: PolicySpec, params, batch: MetaBatch, lr: float, second_order: bool = True):
    """theta'_i for every task, differentiable in theta: exactly (second order) or straight-through (first order,
    FOMAML: the meta-gradient is taken at theta' as if theta' - theta were constant)."""
    if second_order:
        return adapt(spec, params, batch.train, batch.train_adv, lr, create_graph=True)
    stacked = stack_policy(params, batch.train.tasks)
    if lr == 0:  # no inner step (the pretrained baseline): theta' = theta, no inner gradient to compute
        return stacked
    fast = adapt(spec, params, batch.train, batch.train_adv, lr, create_graph=False)
    return {k: stacked[k] + (fast[k] - stacked[k]).detach() for k in fast}


def surrogate(spec: PolicySpec, params, batch: MetaBatch, lr: float, old=None, second_order: bool = True):
    """(loss, kl, old): the TRPO surrogate and mean KL(old || new) over the validation steps, mean over tasks.

    old: the validation action distributions (mean, log_std) of the policy being improved; None takes the current
    ones (detached), where the ratio is 1 and the KL 0 but both carry their derivatives.
    """
    fast = adapted_params(spec, params, batch, lr, second_order)
    mean, log_std = policy_forward(spec, fast, batch.valid.observations)
    if old is None:
        old = (mean.detach(), log_std.detach())
    actions, mask = batch.valid.actions, batch.valid.mask
    ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - gaussian_log_prob(*old, actions))
    loss = -masked_task_mean(ratio * batch.valid_adv, mask).mean()
    kl = masked_task_mean(gaussian_kl(old[0], old[1], mean, log_std), mask).mean()
    return loss, kl, old


class MetaObjective:
    """The surrogate at theta, its gradient and Fisher-vector products, split at the adapted parameters theta'.

    With J_i = d theta'_i / d theta = I - alpha H_i (H_i the Hessian of task i's inner loss), the Hessian of the
    mean KL at theta is sum_i J_i^T F'_i J_i, F'_i its Hessian in theta'_i: the other term of the chain rule,
    (d KL / d theta') d^2 theta' / d theta^2, vanishes because the KL is minimal (zero) at the old policy. So a
    product needs two inner Hessian-vector products (through the kept graph of the inner gradient) and one KL
    Hessian product of a plain MLP, never the third derivatives that differentiating grad KL through the inner
    step twice would build (3x faster here). The test suite checks it against the explicit Hessian.
    """

    def __init__(self, spec: PolicySpec, params: dict[str, torch.Tensor], batch: MetaBatch, lr: float,
                 second_order: bool = True):
        self.lr, self.second_order = lr, second_order
        self.theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.stacked = stack_policy(self.theta, batch.train.tasks)
        inner = reinforce_loss(spec, self.stacked, batch.train, batch.train_adv).sum()
        self.inner_grad = torch.autograd.grad(inner, list(self.stacked.values()), create_graph=second_order)
        self.fast = {k: (v - lr * g).detach().requires_grad_(True)
                     for (k, v), g in zip(self.stacked.items(), self.inner_grad)}
        mean, log_std = policy_forward(spec, self.fast, batch.valid.observations)
        self.old = (mean.detach(), log_std.detach())
        actions, mask = batch.valid.actions, batch.valid.mask
        ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - gaussian_log_prob(*self.old, actions))
        self.loss = -masked_task_mean(ratio * batch.valid_adv, mask).mean()
        kl = masked_task_mean(gaussian_kl(self.old[0], self.old[1], mean, log_std), mask).mean()
        fast = list(self.fast.values())
        loss_grad = torch.autograd.grad(self.loss, fast, retain_graph=True)
        self.kl_grad = torch.autograd.grad(kl, fast, create_graph=True)
        self.grad = flatten(self.vjp(loss_grad))

    def _inner_hvp(self, w: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """H_i w_i for every task, w stacked [T, ...] per parameter."""
        dot = sum((g * x).sum() for g, x in zip(self.inner_grad, w))
        return torch.autograd.grad(dot, list(self.stacked.values()), retain_graph=True)

    def jvp(self, v: torch.Tensor) -> list[torch.Tensor]:
        """J_i v for every task: a flat theta-space vector -> stacked theta'-space tensors."""
        w = [x.expand_as(s) for x, s in zip(unflatten(v, self.theta).values(), self.stacked.values())]
        if not self.second_order:
            return w
        return [x - self.lr * h for x, h in zip(w, self._inner_hvp(w))]

    def vjp(self, w) -> list[torch.Tensor]:
        """sum_i J_i^T w_i: stacked theta'-space tensors -> theta-space tensors."""
        if not self.second_order:
            return [x.sum(0) for x in w]
        return [(x - self.lr * h).sum(0) for x, h in zip(w, self._inner_hvp(list(w)))]

    def fisher_vector_product(self, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """(d^2 KL / d theta^2) v + damping v at the old policy."""
        u = self.jvp(v)
        dot = sum((g * x).sum() for g, x in zip(self.kl_grad, u))
        f = torch.autograd.grad(dot, list(self.fast.values()), retain_graph=True)
        return flatten(self.vjp(f)).detach() + damping * v


def conjugate_gradient(matvec, b: torch.Tensor, iters: int = 10, residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve A x = b for symmetric positive definite A given as a product (x starts at 0)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr.item() < residual_tol:
            break
        z = matvec(p)
        alpha = rr / (p @ z)
        x += alpha * p
        r -= alpha * z
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_step(spec: PolicySpec, params: dict[str, torch.Tensor], batch: MetaBatch, lr: float,
              settings: TRPOSettings = TRPOSettings(), second_order: bool = True):
    """One meta-update: (new parameters, detached; info). Returns the old parameters when no step is accepted."""
    objective = MetaObjective(spec, params, batch, lr, second_order)
    loss, grad, old = objective.loss.item(), objective.grad, objective.old
    fvp = functools.partial(objective.fisher_vector_product, damping=settings.cg_damping)
    direction = conjugate_gradient(fvp, grad, settings.cg_iters)
    shs = 0.5 * (direction @ fvp(direction))
    info = {"loss_before": loss, "grad_norm": grad.norm().item(), "ls_steps": -1, "loss_after": loss,
            "kl_after": 0.0}
    if not (torch.isfinite(shs) and shs > 0):
        info["rejected"] = f"s^T F s = {shs.item():g}, expected a positive finite curvature"
        return {k: v.detach() for k, v in params.items()}, info
    full_step = direction / torch.sqrt(shs / settings.max_kl)
    info["expected_improve"] = (grad @ full_step).item()
    theta = flatten(objective.theta.values()).detach()
    like = objective.theta
    del objective, fvp  # free the graphs before the line search
    fraction = 1.0
    for i in range(settings.ls_max_steps):
        candidate = unflatten(theta - fraction * full_step, like)
        with torch.no_grad():
            new_loss, new_kl, _ = surrogate(spec, candidate, batch, lr, old, second_order=False)
        if new_loss.item() < info["loss_before"] and new_kl.item() < settings.max_kl:
            info.update(ls_steps=i, loss_after=new_loss.item(), kl_after=new_kl.item(), step_fraction=fraction)
            return {k: v.detach().clone() for k, v in candidate.items()}, info
        fraction *= settings.ls_backtrack_ratio
    info["rejected"] = f"no improving step within KL {settings.max_kl} after {settings.ls_max_steps} backtracks"
    return {k: v.detach() for k, v in params.items()}, info

