"""Task chunks for the torch backends (`reference`, `graph`): large batches run as several calls.

The task-stacked forward folds tasks into channels, so one call's tensors grow with T: 1,024 tasks of 20-way 1-shot
Omniglot predicted with 300 queries make a first-layer activation of 320 x 65,536 x 14 x 14 = 4.1e9 elements, past
the 32-bit indexing limit of the GPU convolution kernels (PyTorch's grouped convolution fails there), and 1,024
mini-ImageNet tasks with 75 queries need ~75 GB for one activation. A backend asks `task_chunk` how many tasks fit in
one call and `run_chunked` runs the slices and joins the results; each task's result does not depend on the others,
so chunking changes nothing but the peak size. (The Triton backend sizes its own chunks from its workspace.)

Budget: FASTADAPT_REFERENCE_WORKSPACE_MB, else a quarter of the GPU's memory, else a quarter of the host's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from models.maml import AdaptResult
from models.spec import ModelSpec

INDEX_LIMIT = 2**31 - 1  # elements a tensor may hold for 32-bit index math in the GPU kernels


def default_budget(device: torch.device | str | None) -> int:
    mb = os.environ.get("FASTADAPT_REFERENCE_WORKSPACE_MB")
    if mb:
        return int(float(mb) * 2**20)
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


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


def _rows(support: int, queries: int, policy: str) -> int:
    return (support + queries if policy == "support" else queries) if queries else 0


def largest_tensor_elements(spec: ModelSpec, support: int, queries: int, policy: str) -> int:
    """Elements one task adds to the largest activation of a call (tasks are folded into channels)."""
    rows = max(support, _rows(support, queries, policy), 1)
    return rows * max(max(conv4_row_elements(spec)), math.prod(spec.input_shape))


def task_bytes(spec: ModelSpec, support: int, queries: int, policy: str) -> int:
    """Peak bytes one task adds to a call. First-order adaptation keeps one step's autograd graph: conv output, BN
    output and ReLU output (+ pool) of every block for the support rows; predict holds about three activations of
    the widest block at a time."""
    per_row = conv4_row_elements(spec)
    image = math.prod(spec.input_shape)
    predict_rows = _rows(support, queries, policy)
    return 4 * (4 * sum(per_row) * support + 3 * max(per_row) * predict_rows + image * (support + queries))


def task_chunk(spec: ModelSpec, support: int, queries: int, policy: str, budget_bytes: int) -> int:
    """Most tasks one call may take: every tensor under INDEX_LIMIT elements and the call within budget_bytes.

    support / queries: rows per task (queries = 0 for adapt alone); policy: the BN policy of the predict.
    """
    if not spec.arch.startswith("conv4"):
        return 1 << 30  # the MLP's activations are a few hundred floats a row
    by_index = INDEX_LIMIT // largest_tensor_elements(spec, support, queries, policy)
    by_memory = budget_bytes // max(task_bytes(spec, support, queries, policy), 1)
    return max(1, min(by_index, by_memory))


def check_task_counts(tasks: int, source: str, **tensors) -> None:
    """Before slicing: every tensor must have `tasks` on its leading axis (a slice would hide a mismatch)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise ValueError(f"{name} is {type(t).__name__}, expected a tensor with {tasks} tasks on its first axis")
        if t.shape[0] != tasks:
            raise ValueError(f"{name} has shape {list(t.shape)}: {t.shape[0]} tasks, expected {tasks} (as {source})")


def _join(results: list) -> AdaptResult | torch.Tensor | tuple:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, tuple):
        return tuple(None if parts[0] is None else _join(list(parts)) for parts in zip(*results, strict=True))
    params = {k: torch.cat([r.params[k] for r in results]) for k in first.params}
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=1)  # noqa: E731  [steps + 1, T]
    return AdaptResult(params, cat([r.support_loss for r in results]), cat([r.support_accuracy for r in results]))


def run_chunked(tasks: int, chunk: int, fn: Callable[[slice], object]):
    """fn(slice of tasks) for consecutive slices of at most `chunk` tasks, joined along the task axis.

    fn returns an AdaptResult (losses [steps + 1, T]), a tensor [T, ...], or a tuple of those (None allowed).
    """
    if tasks <= chunk:
        return fn(slice(0, tasks))
    return _join([fn(slice(start, min(tasks, start + chunk))) for start in range(0, tasks, chunk)])
