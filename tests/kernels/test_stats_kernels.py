"""Batch-norm statistics between the kernels' fp64 (sum, sum sq) form and the models' (mean, biased variance)."""

import torch

from kernels.fused.stats import bn_moments, moment_sums, moments_dict
from tests.kernels.precisions import DEV


def test_moments_of_the_sums_are_the_mean_and_biased_variance():
    g = torch.Generator().manual_seed(0)
    rows = [5, 12, 3]  # per layer
    z = [torch.randn(2, n, 17, generator=g, dtype=torch.float64) * 3 + 1 for n in rows]  # [T, rows, C]
    sums = torch.stack([torch.stack([v.sum(1), (v * v).sum(1)], dim=1) for v in z]).to(DEV)  # [L, T, 2, C]
    counts = torch.tensor([float(n) for n in rows], dtype=torch.float64, device=DEV)
    out = torch.full((2, 3, 2, 17), float("nan"), device=DEV)
    assert bn_moments(sums, counts, out) is out
    for i, v in enumerate(z):
        var, mean = torch.var_mean(v, dim=1, correction=0)
        torch.testing.assert_close(out[0, i].double().cpu(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1, i].double().cpu(), var, rtol=1e-5, atol=1e-6)
    stats = moments_dict(out, tasks=1)
    assert sorted(stats) == ["bn0.mean", "bn0.var", "bn1.mean", "bn1.var", "bn2.mean", "bn2.var"]
    assert stats["bn1.var"].shape == (1, 17) and torch.equal(stats["bn1.var"], out[1, 1, :1])


def test_sums_over_one_row_give_back_the_moments():
    g = torch.Generator().manual_seed(1)
    stats = {}
    for i in range(4):
        stats[f"bn{i}.mean"] = torch.randn(3, 8, generator=g).to(DEV)
        stats[f"bn{i}.var"] = torch.rand(3, 8, generator=g).to(DEV)
    sums = moment_sums(stats, 4)
    assert sums.shape == (4, 3, 2, 8) and sums.dtype == torch.float64
    back = moments_dict(bn_moments(sums, torch.ones(4, dtype=torch.float64, device=DEV)))
    for k, v in stats.items():
        torch.testing.assert_close(back[k], v, rtol=1e-6, atol=1e-6, msg=k)
