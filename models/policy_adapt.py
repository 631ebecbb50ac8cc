"""A policy's inner step, VPG, as pure functions over trajectories: the one implementation the trainer and the server
both call, so a served adaptation is the trainer's inner step bit for bit.

- `Trajectories`: one round padded to the horizon: observations [T, B, H, obs_dim], actions [T, B, H, act_dim] as the
  policy sampled them (before the environment clips them), rewards [T, B, H], lengths [T, B]; entries past a
  trajectory's length are zero. The server's `Trajectories` message carries one task of it ([B, H, ...]).
- Discounted returns, the linear feature baseline fitted per task, and the advantages: rllab's
  `LinearFeatureBaseline` (Duan et al. 2016, supplementary 2) as cbfinn/maml_rl and pytorch-maml-rl use it: per task,
  a ridge regression of the discounted returns on the features [obs, obs^2, t/100, (t/100)^2, (t/100)^3, 1] of every
  step taken, regularization 1e-5 multiplied by 10 (up to five tries) while the solution is not finite.
  Observations are not clipped (pytorch-maml-rl; rllab clips them to [-10, 10], which 2D navigation never reaches in
  100 steps of at most 0.1). The normal equations are solved in float64 (rllab fits in numpy float64), all tasks in
  one batched solve.
- The surrogate: per task L(theta) = -mean over the steps taken of log pi_theta(a_t | s_t) * A_t (cbfinn/maml_rl's
  `-tf.reduce_mean(logli * adv)` over the task's flattened samples; pytorch-maml-rl averages per trajectory first,
  the same when the lengths are equal). Its gradient is the policy gradient; the inner step is one SGD step
  theta' = theta - alpha * grad L on every parameter, the log-std included (both references).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.policy import PolicySpec, gaussian_log_prob, is_stacked, policy_forward, stack_policy

REG_TRIES = 5


@dataclass
class Trajectories:
    observations: torch.Tensor  # [T, B, H, obs_dim] float32
    actions: torch.Tensor  # [T, B, H, act_dim] float32, unclipped policy samples
    rewards: torch.Tensor  # [T, B, H] float32
    lengths: torch.Tensor  # [T, B] int64, in [1, H]

    @property
    def tasks(self) -> int:
        return self.rewards.shape[0]

    @property
    def horizon(self) -> int:
        return self.rewards.shape[2]

    @property
    def mask(self) -> torch.Tensor:
        """[T, B, H] float32: 1 on the steps each trajectory took."""
        steps = torch.arange(self.horizon, device=self.lengths.device)
        return (steps < self.lengths.unsqueeze(-1)).to(self.rewards.dtype)

    def returns(self) -> torch.Tensor:
        """Undiscounted return of every trajectory [T, B] (rllab's AverageReturn averages these)."""
        return self.rewards.sum(-1)

    def task(self, t: int) -> Trajectories:
        """Task t alone, as a round of one task."""
        return Trajectories(*(x[t: t + 1] for x in (self.observations, self.actions, self.rewards, self.lengths)))


# ---- returns, baseline, advantages ----

def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """R_t = sum_k discount^k r_{t+k} within each trajectory: rewards, mask [..., H] -> [..., H]."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] * mask[..., t] + discount * running
        out[..., t] = running
    return out * mask


def baseline_features(traj: Trajectories) -> torch.Tensor:
    """[T, B, H, 2 * obs_dim + 4] float64, zero on the steps past each trajectory's length."""
    mask = traj.mask.to(torch.float64).unsqueeze(-1)
    obs = traj.observations.to(torch.float64)
    t = torch.arange(traj.horizon, dtype=torch.float64, device=obs.device).view(1, 1, -1, 1) / 100.0 * mask
    return torch.cat([obs, obs ** 2, t, t ** 2, t ** 3, mask], dim=-1) * mask


def fit_linear_baseline(features: torch.Tensor, returns: torch.Tensor, reg: float = 1e-5) -> torch.Tensor:
    """Per-task ridge coefficients [T, F] for features [T, N, F] and targets [T, N] (padded rows all zero)."""
    features, returns = features.to(torch.float64), returns.to(torch.float64)
    xtx = features.transpose(1, 2) @ features
    xty = (features.transpose(1, 2) @ returns.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(features.shape[-1], dtype=torch.float64, device=features.device)
    coeffs = torch.full_like(xty, float("nan"))
    regs = torch.full((features.shape[0],), float(reg), dtype=torch.float64, device=features.device)
    todo = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    for _ in range(REG_TRIES):
        idx = todo.nonzero().squeeze(-1)
        sol, info = torch.linalg.solve_ex(xtx[idx] + regs[idx, None, None] * eye, xty[idx])
        ok = (info == 0) & torch.isfinite(sol).all(-1)
        coeffs[idx[ok]] = sol[ok]
        todo[idx[ok]] = False
        if not todo.any():
            return coeffs
        regs[todo] *= 10
    bad = todo.nonzero().squeeze(-1).tolist()
    raise RuntimeError(f"linear baseline: the normal equations of tasks {bad} have no finite solution even with "
                       f"regularization {regs[todo].max().item():g} (expected a full-rank X^T X; non-finite "
                       "observations or returns?)")


def advantages(traj: Trajectories, discount: float, reg: float = 1e-5, normalize: bool = True) -> torch.Tensor:
    """A_t = R_t - V(s_t) [T, B, H] float32 with V the task's fitted baseline (GAE with lambda 1 is exactly this).

    normalize: standardize per task over all the steps taken, as cbfinn's `center_adv` (mean and population std of
    the task's flattened samples, + 1e-8). pytorch-maml-rl also standardizes per task, weighting each trajectory
    equally instead of each step; the two agree whenever the trajectories have the same length.
    """
    mask = traj.mask.to(torch.float64)
    returns = discounted_returns(traj.rewards.to(torch.float64), mask, discount)
    feats = baseline_features(traj)
    n_tasks, n_feat = feats.shape[0], feats.shape[-1]
    coeffs = fit_linear_baseline(feats.reshape(n_tasks, -1, n_feat), returns.reshape(n_tasks, -1), reg)
    values = (feats @ coeffs.view(n_tasks, 1, n_feat, 1)).squeeze(-1)
    adv = (returns - values) * mask
    if normalize:
        count = mask.sum(dim=(1, 2), keepdim=True)
        mean = adv.sum(dim=(1, 2), keepdim=True) / count
        std = torch.sqrt((((adv - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / count)
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv.to(torch.float32)


# ---- the surrogate and the step ----

def masked_task_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each task's steps taken: [T, B, H] -> [T]."""
    return (values * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))


def reinforce_loss(spec: PolicySpec, params: dict[str, torch.Tensor], traj: Trajectories,
                   adv: torch.Tensor) -> torch.Tensor:
    """The per-task REINFORCE surrogate [T] (params shared or stacked over the T tasks)."""
    mean, log_std = policy_forward(spec, params, traj.observations)
    logp = gaussian_log_prob(mean, log_std, traj.actions)
    return -masked_task_mean(logp * adv, traj.mask)


def vpg_step(spec: PolicySpec, params: dict[str, torch.Tensor], traj: Trajectories, adv: torch.Tensor, lr: float,
             create_graph: bool = False) -> dict[str, torch.Tensor]:
    """One VPG step for each of the T tasks: parameters stacked [T, ...].

    params: shared (the meta-initialization, broadcast to the tasks) or already stacked (a later step).
    create_graph: keep the graph through the step (second-order MAML's meta-gradient and Fisher products).
    """
    stacked = params if is_stacked(spec, params) else stack_policy(params, traj.tasks)
    if not create_graph:
        stacked = {k: v.detach().requires_grad_(True) for k, v in stacked.items()}
    with torch.enable_grad():
        loss = reinforce_loss(spec, stacked, traj, adv).sum()  # tasks are independent: sum -> per-task gradients
        grads = torch.autograd.grad(loss, list(stacked.values()), create_graph=create_graph)
    out = {k: v - lr * g for (k, v), g in zip(stacked.items(), grads)}
    return out if create_graph else {k: v.detach() for k, v in out.items()}


@dataclass
class PolicyAdaptResult:
    params: dict[str, torch.Tensor]  # the adapted policies, stacked [T, ...]
    surrogate: torch.Tensor  # [2, T]: the surrogate loss on the trajectories before and after the step


def adapt_policy(spec: PolicySpec, params: dict[str, torch.Tensor], traj: Trajectories,
                 lr: float | None = None) -> PolicyAdaptResult:
    """The inner step as the spec defines it (serving): advantages with the spec's discount, baseline regularization
    and normalization, then one VPG step at `lr` (None: spec.inner_lr) from `params` (shared or stacked [T, ...]).
    Exactly `vpg_step(spec, params, traj, advantages(traj, spec.discount, spec.baseline_reg,
    spec.normalize_advantages), lr)`, plus the surrogate before and after (without autograd)."""
    if spec.baseline != "linear-feature":
        raise ValueError(f"policy {spec.name}: baseline {spec.baseline!r}, expected 'linear-feature'")
    lr = spec.inner_lr if lr is None else float(lr)
    adv = advantages(traj, spec.discount, spec.baseline_reg, spec.normalize_advantages)
    fast = vpg_step(spec, params, traj, adv, lr)
    with torch.no_grad():
        before = reinforce_loss(spec, params, traj, adv)
        after = reinforce_loss(spec, fast, traj, adv)
    return PolicyAdaptResult(fast, torch.stack([before, after]))


__all__ = ["PolicyAdaptResult", "Trajectories", "adapt_policy", "advantages", "baseline_features",
           "discounted_returns", "fit_linear_baseline", "masked_task_mean", "reinforce_loss", "vpg_step"]
