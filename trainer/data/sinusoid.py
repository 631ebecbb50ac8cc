"""Sinusoid regression tasks (Finn et al. 2017, section 5.1), drawn on the device.

Each task is y = A sin(x - phase) with amplitude A ~ U[0.1, 5], phase ~ U[0, pi] and inputs x ~ U[-5, 5], as
cbfinn/maml's data generator. K support and Q query points per task are drawn independently from the same task.
"""

from __future__ import annotations

import math

import torch

from trainer.data.sampler import GeneratorState, TaskBatch, check_count

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator, device) -> torch.Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


class SinusoidSampler(GeneratorState):
    """K-shot (`shots`) sinusoid regression tasks with `queries` query points each; state_dict() resumes bit for bit."""

    def __init__(self, shots: int, queries: int, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(seed, device)
        self.shots = check_count("shots", shots, 1)
        self.queries = check_count("queries", queries, 0)

    def sample(self, tasks: int) -> TaskBatch:
        """support_x/support_y float32 [T, K, 1], query_x/query_y [T, Q, 1], amplitude/phase [T]."""
        tasks = check_count("tasks", tasks, 1)
        g, device = self.generator, self.device
        amplitude = _uniform((tasks,), AMPLITUDE_RANGE, g, device)
        phase = _uniform((tasks,), PHASE_RANGE, g, device)
        x = _uniform((tasks, self.shots + self.queries, 1), INPUT_RANGE, g, device)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        self.tasks_sampled += tasks
        k = self.shots
        return TaskBatch(
            support_x=x[:, :k].contiguous(),
            support_y=y[:, :k].contiguous(),
            query_x=x[:, k:].contiguous(),
            query_y=y[:, k:].contiguous(),
            amplitude=amplitude,
            phase=phase,
        )

    def __repr__(self) -> str:
        return f"SinusoidSampler(shots={self.shots}, queries={self.queries}, seed={self.seed}, device={self.device})"
