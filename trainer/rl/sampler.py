"""Trajectory sampling: every task x trajectory of a round at once, one loop over time steps.

`Trajectories` holds a round padded to the horizon: observations [T, B, H, obs_dim], actions [T, B, H, act_dim] as
the policy sampled them (before the environment clips them), rewards [T, B, H] and lengths [T, B]; entries past a
trajectory's length are zero (models.policy_adapt.Trajectories). This is also the layout the server's `Trajectories`
message carries (one task).
"""

from __future__ import annotations

import torch

from models.policy import PolicySpec, policy_forward
from models.policy_adapt import Trajectories  # the layout lives in models: the server's inner step reads it too

__all__ = ["Trajectories", "rollout", "sample_trajectories"]


def sample_trajectories(env, spec: PolicySpec, params: dict[str, torch.Tensor], tasks: torch.Tensor, batch: int,
                        generator: torch.Generator) -> Trajectories:
    """B trajectories per task with the policy `params` (shared, or stacked over the T tasks).

    Action noise (and an environment's initial-state noise) comes from `generator` (CPU), so a round is a function
    of the parameters and the generator state.
    """
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        return rollout(env, lambda obs: policy_forward(spec, params, obs), tasks, batch, generator)


def rollout(env, act, tasks: torch.Tensor, batch: int, generator: torch.Generator) -> Trajectories:
    """The sampling loop for any policy: `act(obs [T, B, obs_dim]) -> (mean, log_std)`, Gaussian actions drawn from
    `generator` (the trainer's policy forward, or a served policy through the wire: the same noise draws)."""
    n_tasks, horizon = tasks.shape[0], env.horizon
    # an environment with a random initial state (half-cheetah) draws it from the same generator, before any action
    random_start = getattr(env, "reset_uses_generator", False)
    obs = env.reset(tasks, batch, generator) if random_start else env.reset(tasks, batch)
    observations = torch.zeros(n_tasks, batch, horizon, env.obs_dim)
    actions = torch.zeros(n_tasks, batch, horizon, env.act_dim)
    rewards = torch.zeros(n_tasks, batch, horizon)
    lengths = torch.zeros(n_tasks, batch, dtype=torch.int64)
    alive = torch.ones(n_tasks, batch, dtype=torch.bool)
    for t in range(horizon):
        mean, log_std = act(obs)
        noise = torch.randn(mean.shape, generator=generator)
        action = mean + torch.exp(log_std) * noise
        keep = alive.unsqueeze(-1)
        observations[:, :, t] = torch.where(keep, obs, 0.0)
        actions[:, :, t] = torch.where(keep, action, 0.0)
        obs, reward, done = env.step(action)
        rewards[:, :, t] = torch.where(alive, reward, 0.0)
        lengths += alive.to(torch.int64)
        alive = alive & ~done
        if not alive.any():
            break
    return Trajectories(observations, actions, rewards, lengths)
