"""Meta-test evaluation as the paper's Table 4: new tasks, returns after 0, 1, 2, 3 adaptation steps.

Each step samples fresh trajectories with the current policy of every task (the meta-policy at step 0), records their
mean undiscounted return per task, and takes one VPG step on them (alpha = inner_lr for the first step, eval_lr
after, as the paper). Mean over tasks and 95% confidence interval (1.96 std / sqrt(tasks)).
"""

from __future__ import annotations

import math

import torch

from models.policy import PolicySpec
from trainer.rl.baseline import advantages
from trainer.rl.sampler import sample_trajectories
from trainer.rl.vpg import adapt

TEST_SEED = 1_000_003  # the same test goals and noise for every policy and run


def step_lrs(first: float, later: float, steps: int) -> list[float]:
    return [first] + [later] * (steps - 1)


def evaluate_policy(env, spec: PolicySpec, params: dict[str, torch.Tensor], tasks: int = 40, steps: int = 3,
                    lrs: list[float] | None = None, trajectories: int = 20, discount: float = 0.99,
                    baseline_reg: float = 1e-5, normalize: bool = True, seed: int = TEST_SEED) -> dict:
    """{'mean': [steps + 1], 'ci95': [...], 'per_task': [[tasks] per step], 'goals': [...], ...}."""
    lrs = step_lrs(spec.inner_lr, spec.inner_lr / 2, steps) if lrs is None else list(lrs)
    if len(lrs) != steps:
        raise ValueError(f"evaluation: {len(lrs)} learning rates {lrs}, expected one per step ({steps})")
    generator = torch.Generator().manual_seed(seed)
    goals = env.sample_tasks(tasks, generator)
    fast = {k: v.detach() for k, v in params.items()}
    per_task = []
    for s in range(steps + 1):
        traj = sample_trajectories(env, spec, fast, goals, trajectories, generator)
        per_task.append(traj.returns().mean(1))
        if s < steps:
            adv = advantages(traj, discount, baseline_reg, normalize)
            fast = adapt(spec, fast, traj, adv, lrs[s])
    return {
        "tasks": tasks, "trajectories": trajectories, "lrs": lrs, "seed": seed,
        "mean": [r.mean().item() for r in per_task],
        "ci95": [1.96 * r.std(unbiased=False).item() / math.sqrt(tasks) for r in per_task],
        "per_task": [[round(x, 3) for x in r.tolist()] for r in per_task],
    }
