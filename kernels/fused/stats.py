"""Batch-norm statistics between the kernels' form and the models' form.

The kernels accumulate fp64 (sum z, sum z^2) per task and channel over `count` rows ([T, 2, C], see
kernels.fused.common); models.functional.support_stats names them per layer as mean and biased variance
(`bn{i}.mean`, `bn{i}.var`, float32 [T, C]), which is what an adaptation keeps for Predict. `bn_moments` turns the
first into the second in one launch (it runs inside the captured adapt program); `moment_sums` goes back, with
count 1 (any count gives the same mean and variance), for a predict that normalizes with stored statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fused.common import check_grid_dim, check_tensor

BLOCK = 1024


@triton.jit
def _moments_kernel(
    stat_ptr,  # fp64 [L, T, 2, C]: (sum, sum sq) of layer l over count_ptr[l] rows
    count_ptr,  # fp64 [L]: rows behind each layer's sums
    mean_ptr,  # out fp32 [L, T, C]
    var_ptr,  # out fp32 [L, T, C]: biased variance
    TC,  # T * C
    C: tl.constexpr, BLOCK: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (task, channel) of this layer
    m = i < TC
    t = i // C
    c = i % C
    base = stat_ptr + layer * 2 * TC + t * 2 * C + c
    n = tl.load(count_ptr + layer)
    mean = tl.load(base, mask=m, other=0.0) / n
    var = tl.maximum(tl.load(base + C, mask=m, other=0.0) / n - mean * mean, 0.0)  # as _bn_coeffs computes it
    tl.store(mean_ptr + layer * TC + i, mean.to(tl.float32), mask=m)
    tl.store(var_ptr + layer * TC + i, var.to(tl.float32), mask=m)


def bn_moments(sums: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 sums [L, T, 2, C] over counts (fp64 [L]) -> float32 [2, L, T, C]: (mean, biased variance) per layer.

    out: optional float32 [2, L, T, C] buffer (a captured program's static output)."""
    dev = sums.device
    layers, tasks, _, channels = check_tensor(sums, "sums", (None, None, 2, None), dtype=torch.float64).shape
    check_tensor(counts, "counts", (layers,), dtype=torch.float64, device=dev)
    if out is None:
        out = torch.empty(2, layers, tasks, channels, device=dev)
    check_tensor(out, "out", (2, layers, tasks, channels), device=dev)
    tc = tasks * channels
    grid = (layers, check_grid_dim(triton.cdiv(tc, BLOCK), "bn_moments blocks"))
    _moments_kernel[grid](sums, counts, out[0], out[1], tc, C=channels, BLOCK=BLOCK, num_warps=4)
    return out


def moments_dict(moments: torch.Tensor, tasks: int | None = None) -> dict[str, torch.Tensor]:
    """[2, L, T, C] -> {bn{i}.mean, bn{i}.var: [T, C]} views (the first `tasks` tasks)."""
    n = moments.shape[2] if tasks is None else tasks
    out = {}
    for i in range(moments.shape[1]):
        out[f"bn{i}.mean"], out[f"bn{i}.var"] = moments[0, i, :n], moments[1, i, :n]
    return out


def moment_sums(stats: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    """{bn{i}.mean, bn{i}.var: [T, C]} -> fp64 [L, T, 2, C] (sum, sum sq) over one row: what BNInput(count=1) reads."""
    mean = torch.stack([stats[f"bn{i}.mean"] for i in range(layers)]).double()
    var = torch.stack([stats[f"bn{i}.var"] for i in range(layers)]).double()
    return torch.stack([mean, torch.addcmul(var, mean, mean)], dim=2).contiguous()
