"""Task chunks for the torch backends (`reference`, `graph`): large batches run as several calls.

The task-stacked forward folds tasks into channels, so one call's tensors grow with T: 1,024 tasks of 20-way 1-shot
Omniglot predicted with 300 queries make a first-layer activation of 300 x 65,536 x 14 x 14 = 3.9e9 elements, past
the 32-bit indexing limit of the GPU convolution kernels (PyTorch's grouped convolution fails there), and 1,024
mini-ImageNet tasks with 75 queries need ~75 GB for one activation. A backend asks `task_chunk` how many tasks fit in
one call and `run_chunked` runs the slices and joins the results; each task's result does not depend on the others,
so chunking changes nothing but the peak size. Predict forwards the query rows alone (the `support` policy
normalizes them with the adaptation's stored statistics), so its rows are the queries under either policy.
(The Triton backend sizes its own chunks from its workspace.)

Budget: FASTADAPT_REFERENCE_WORKSPACE_MB, else a quarter of the GPU's memory, else CPU_BUDGET_BYTES (32 MiB) on the
CPU. On the CPU the budget is a speed setting as much as a memory cap: AdaptAndPredict of 64 tasks of the bundled
view models runs 2.3x faster in chunks near the caches than as one call over 6 GiB of activations, and no slower
where the rows are few (`make bench-workspace`, docs/results/bench-workspace/); a task larger than the budget still
runs, as a chunk of one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from models.maml import AdaptResult
from models.spec import ModelSpec

INDEX_LIMIT = 2**31 - 1  # elements a tensor may hold for 32-bit index math in the GPU kernels
CPU_BUDGET_BYTES = 32 * 2**20  # the CPU default: the fastest of 6 GiB .. 8 MiB at 64 tasks (bench-workspace)


def default_budget(device: torch.device | str | None) -> int:
    mb = os.environ.get("FASTADAPT_REFERENCE_WORKSPACE_MB")
    if mb:
        return int(float(mb) * 2**20)
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return CPU_BUDGET_BYTES


def conv4_row_elements(spec: ModelSpec) -> list[int]:
    """Elements of each conv block's output for one image (pre-pool), conv4 architectures."""
    omniglot = spec.arch == "conv4-omniglot"
    _, h, w = spec.input_shape
    sizes = []
    for _ in range(4):
        if omniglot:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 3x3, stride 2, padding 1
            sizes.append(h * w * spec.hidden)
        else:
            sizes.append(h * w * spec.hidden)  # 3x3, stride 1, padding 1, then a 2x2 max-pool
            h, w = h // 2, w // 2
    return sizes


def largest_tensor_elements(spec: ModelSpec, support: int, queries: int) -> int:
    """Elements one task adds to the largest activation of a call (tasks are folded into channels). A predict
    forwards the query rows alone (under the `support` policy it normalizes with the adaptation's stored
    statistics), so adapt and predict are separate passes: the larger of the two counts."""
    rows = max(support, queries, 1)
    return rows * max(max(conv4_row_elements(spec)), math.prod(spec.input_shape))


def task_bytes(spec: ModelSpec, support: int, queries: int) -> int:
    """Peak bytes one task adds to a call. First-order adaptation keeps one step's autograd graph: conv output, BN
    output and ReLU output (+ pool) of every block for the support rows; predict (and the support-statistics pass
    after the last step) holds about three activations of the widest block at a time."""
    per_row = conv4_row_elements(spec)
    image = math.prod(spec.input_shape)
    return 4 * (4 * sum(per_row) * support + 3 * max(per_row) * max(support, queries) + image * (support + queries))


def task_chunk(spec: ModelSpec, support: int, queries: int, budget_bytes: int) -> int:
    """Most tasks one call may take: every tensor under INDEX_LIMIT elements and the call within budget_bytes.

    support / queries: rows per task (queries = 0 for adapt alone, support = 0 for predict alone).
    """
    if not spec.arch.startswith("conv4"):
        return 1 << 30  # the MLP's activations are a few hundred floats a row
    by_index = INDEX_LIMIT // largest_tensor_elements(spec, support, queries)
    by_memory = budget_bytes // max(task_bytes(spec, support, queries), 1)
    return max(1, min(by_index, by_memory))


def max_rows(spec: ModelSpec, device: torch.device) -> int | None:
    """Most rows one task may forward in one call of the torch backends: on CUDA one task's largest activation must
    stay under INDEX_LIMIT (task chunks cannot split a task); None on the CPU (no such limit)."""
    if torch.device(device).type != "cuda" or not spec.arch.startswith("conv4"):
        return None
    return INDEX_LIMIT // largest_tensor_elements(spec, 1, 0)


def _join(results: list) -> AdaptResult | torch.Tensor | tuple:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, tuple):
        return tuple(None if parts[0] is None else _join(list(parts)) for parts in zip(*results, strict=True))
    params = {k: torch.cat([r.params[k] for r in results]) for k in first.params}
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=1)  # noqa: E731  [steps + 1, T]
    stats = None if first.stats is None else {k: torch.cat([r.stats[k] for r in results]) for k in first.stats}
    return AdaptResult(params, cat([r.support_loss for r in results]), cat([r.support_accuracy for r in results]),
                       stats=stats)


def run_chunked(tasks: int, chunk: int, fn: Callable[[slice], object]):
    """fn(slice of tasks) for consecutive slices of at most `chunk` tasks, joined along the task axis.

    fn returns an AdaptResult (losses [steps + 1, T]), a tensor [T, ...], or a tuple of those (None allowed).
    """
    if tasks <= chunk:
        return fn(slice(0, tasks))
    return _join([fn(slice(start, min(tasks, start + chunk))) for start in range(0, tasks, chunk)])
