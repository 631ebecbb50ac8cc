"""2D navigation (the MAML paper's point robot) as cbfinn/maml_rl's `PointEnvRandGoal` and pytorch-maml-rl's
`Navigation2DEnv` define it, batched over tasks x trajectories in torch.

A task is a goal position drawn uniformly from [-0.5, 0.5]^2. The point starts at the origin; an action is a velocity
the environment clips to [-0.1, 0.1] per coordinate (pytorch-maml-rl's `np.clip`; cbfinn reaches the same bounds
through rllab's `normalize` wrapper, which also rescales a policy output in [-1, 1] to them: here, as in
pytorch-maml-rl, the policy acts directly in velocity units). The observation is the position; the reward after a
step is minus the Euclidean distance from the new position to the goal; an episode ends when both coordinates are
strictly within 0.01 of the goal (the step that gets there still counts) or after 100 steps (the time limit both
references register).
"""

from __future__ import annotations

import torch


class Navigation2D:
    """All T x B episodes of one sampling round: `reset(goals, B)` then `step(actions)` until every episode is done."""

    name = "navigation-2d"
    obs_dim = 2
    act_dim = 2

    def __init__(self, low: float = -0.5, high: float = 0.5, max_speed: float = 0.1, tolerance: float = 0.01,
                 horizon: int = 100):
        if not low < high:
            raise ValueError(f"navigation-2d: goal range [{low}, {high}], expected low < high")
        if max_speed <= 0 or tolerance <= 0 or horizon < 1:
            raise ValueError(f"navigation-2d: max_speed={max_speed}, tolerance={tolerance}, horizon={horizon}, "
                             "expected all > 0")
        self.low, self.high, self.max_speed, self.tolerance, self.horizon = low, high, max_speed, tolerance, horizon
        self.action_low, self.action_high = -max_speed, max_speed
        self._goals = self._position = None

    def sample_tasks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n goals [n, 2] ~ U[low, high]^2."""
        return self.low + (self.high - self.low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)

    def reset(self, tasks: torch.Tensor, batch: int) -> torch.Tensor:
        """Start B episodes per goal: observations [T, B, 2] (all at the origin)."""
        if tasks.dim() != 2 or tasks.shape[1] != 2:
            raise ValueError(f"navigation-2d: tasks have shape {list(tasks.shape)}, expected [T, 2] goal positions")
        self._goals = tasks.to(torch.float64).unsqueeze(1)  # [T, 1, 2]
        self._position = torch.zeros(tasks.shape[0], batch, 2, dtype=torch.float64)
        return self._position.to(torch.float32)

    def step(self, actions: torch.Tensor):
        """actions [T, B, 2] (unclipped) -> (observations [T, B, 2], rewards [T, B], done [T, B] bool)."""
        if self._position is None:
            raise RuntimeError("navigation-2d: step() before reset()")
        if actions.shape != self._position.shape:
            raise ValueError(f"navigation-2d: actions have shape {list(actions.shape)}, expected "
                             f"{list(self._position.shape)} ([T, B, 2])")
        velocity = actions.to(torch.float64).clamp(-self.max_speed, self.max_speed)
        self._position = self._position + velocity
        offset = self._position - self._goals
        reward = -torch.linalg.vector_norm(offset, dim=-1)
        done = (offset.abs() < self.tolerance).all(dim=-1)
        return self._position.to(torch.float32), reward.to(torch.float32), done
