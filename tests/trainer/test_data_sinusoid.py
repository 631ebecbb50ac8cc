"""SinusoidSampler: shapes, the cbfinn/maml ranges, the task function, determinism and resume."""

import math

import pytest
import torch

from trainer.data import SinusoidSampler


def test_shapes_and_dtypes():
    batch = SinusoidSampler(shots=5, queries=7, seed=0).sample(3)
    for name, points in (("support", 5), ("query", 7)):
        for axis in ("x", "y"):
            value = getattr(batch, f"{name}_{axis}")
            assert value.shape == (3, points, 1) and value.dtype == torch.float32 and value.is_contiguous()
    assert batch.amplitude.shape == batch.phase.shape == (3,)
    assert batch.classes is None


def test_ranges_and_task_function():
    batch = SinusoidSampler(shots=10, queries=10, seed=1).sample(4000)
    amplitude, phase = batch.amplitude, batch.phase
    assert 0.1 <= amplitude.min() < 0.2 and 4.9 < amplitude.max() <= 5.0
    assert 0.0 <= phase.min() < 0.05 and math.pi - 0.05 < phase.max() <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
    assert abs(x.mean().item()) < 0.05 and abs(amplitude.mean().item() - 2.55) < 0.1
    expected = amplitude.double()[:, None, None] * torch.sin(x.double() - phase.double()[:, None, None])
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)
    # support and query come from the same task: the same amplitude bounds them
    assert (y.abs().amax(dim=(1, 2)) <= amplitude + 1e-6).all()


def test_deterministic_and_resumable(tmp_path):
    a, b, c = SinusoidSampler(5, 5, seed=3), SinusoidSampler(5, 5, seed=3), SinusoidSampler(5, 5, seed=4)
    first_a, first_b = a.sample(8), b.sample(8)
    assert torch.equal(first_a.support_y, first_b.support_y) and torch.equal(first_a.phase, first_b.phase)
    assert not torch.equal(first_a.amplitude, c.sample(8).amplitude)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    want = a.sample(16)
    resumed = SinusoidSampler(5, 5, seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    got = resumed.sample(16)
    assert resumed.tasks_sampled == 24
    assert torch.equal(got.support_x, want.support_x) and torch.equal(got.query_y, want.query_y)


@pytest.mark.parametrize("kwargs, message", [({"shots": 0}, "shots=0"), ({"queries": -2}, "queries=-2")])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidSampler(**{"shots": 5, "queries": 5, **kwargs})
    with pytest.raises(ValueError, match="tasks=0"):
        SinusoidSampler(5, 5).sample(0)
