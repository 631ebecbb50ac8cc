"""Input checks of every engine backend: one place, one wording.

Each backend calls `check_adapt` / `check_predict` once per call, before any chunking or slicing (a slice would
hide a task-count mismatch). The server validates requests first (server.validation) and answers
INVALID_ARGUMENT; these checks guard the engine's own callers (trainer, bench, tests) and name the tensor, its
shape and what was expected:
`support_x has shape [5, 28, 28], expected [*, *, 1, 28, 28] for model omniglot-5w1s`.
"""

from __future__ import annotations

import math

import torch

from models.checkpoint import MetaModel
from models.functional import param_shapes, stats_shapes

ResolvedLR = float | torch.Tensor | dict  # what MetaModel.inner_lr returns, or a 0-dim device tensor


def _dims(dims) -> str:
    return ", ".join("*" if d is None else str(d) for d in dims)


def check_tensor(model: MetaModel, name: str, x, dims: tuple, dtype: torch.dtype, device=None) -> torch.Tensor:
    """x has len(dims) axes, each equal to its entry (None: any size >= 1), the dtype, and the device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} is {type(x).__name__}, expected a torch.Tensor [{_dims(dims)}] for model "
                        f"{model.name}")
    if x.dim() != len(dims) or any(s != d if d is not None else s < 1 for s, d in zip(x.shape, dims)):
        raise ValueError(f"{name} has shape {list(x.shape)}, expected [{_dims(dims)}] for model {model.name}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype} for model {model.name}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the engine's device)")
    return x


def check_images(model: MetaModel, name: str, x, tasks: int | None = None, device=None) -> torch.Tensor:
    """Preprocessed inputs [T, B, *input_shape] float32 (T = tasks when given)."""
    return check_tensor(model, name, x, (tasks, None, *model.spec.input_shape), torch.float32, device)


def check_labels(model: MetaModel, y, tasks: int, rows: int, device=None, check_range: bool = False):
    """support_y: int64 class labels [T, N*K], or float32 targets [T, N*K, 1] for a regressor. check_range reads
    the labels (a device sync on CUDA; server.validation has range-checked requests on the host)."""
    spec = model.spec
    if spec.is_regression:
        return check_tensor(model, "support_y", y, (tasks, rows, 1), torch.float32, device)
    check_tensor(model, "support_y", y, (tasks, rows), torch.int64, device)
    if check_range:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= spec.ways:
            raise ValueError(f"support_y holds labels {lo}..{hi}, expected 0..{spec.ways - 1} for model {model.name}")
    return y


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r}, expected >= 0 inner steps (an int)")
    return steps


def check_lr(model: MetaModel, lr, device=None) -> ResolvedLR:
    """An inner lr already resolved by MetaModel.inner_lr (Engine does it; backends never re-resolve): a finite
    float, a 0-dim float32 tensor, or Meta-SGD rates {name: tensor shaped like one task's parameter}."""
    if isinstance(lr, dict):
        for name, shape in param_shapes(model.spec).items():
            rate = lr.get(name)
            if rate is None:
                raise ValueError(f"Meta-SGD rates for model {model.name} lack {name!r}, expected one per parameter")
            check_tensor(model, f"lr[{name!r}]", rate, shape, torch.float32, device)
        return lr
    if isinstance(lr, torch.Tensor):
        check_tensor(model, "lr", lr, (), torch.float32, device)
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"lr={lr!r}, expected a finite float, a 0-dim tensor or Meta-SGD rates per parameter "
                         "(resolved by MetaModel.inner_lr)")
    return float(lr)


def check_fast(model: MetaModel, fast, tasks: int, device=None, shared_ok: bool = False) -> dict:
    """Task-stacked weights [T, *shape] per parameter (shared_ok: also [*shape], one set for all tasks)."""
    if not isinstance(fast, dict):
        raise TypeError(f"fast weights are {type(fast).__name__}, expected a dict of tensors for model {model.name}")
    for name, shape in param_shapes(model.spec).items():
        t = fast.get(name)
        if t is None:
            raise ValueError(f"fast weights of model {model.name} lack {name!r}")
        if shared_ok and isinstance(t, torch.Tensor) and t.dim() == len(shape):
            check_tensor(model, f"fast[{name!r}]", t, shape, torch.float32, device)
        else:
            check_tensor(model, f"fast[{name!r}]", t, (tasks, *shape), torch.float32, device)
    return fast


def check_stats(model: MetaModel, stats, tasks: int, device=None) -> dict:
    """An adaptation's support statistics (AdaptResult.stats): bn{i}.mean / bn{i}.var, float32 [T, C]."""
    if not isinstance(stats, dict):
        raise TypeError(f"stats are {type(stats).__name__}, expected the adaptation's support statistics "
                        f"(AdaptResult.stats) for model {model.name}")
    for name, shape in stats_shapes(model.spec).items():
        t = stats.get(name)
        if t is None:
            raise ValueError(f"stats of model {model.name} lack {name!r}, expected {list(stats_shapes(model.spec))}")
        check_tensor(model, f"stats[{name!r}]", t, (tasks, *shape), torch.float32, device)
    return stats


def check_adapt(model: MetaModel, support_x, support_y, steps, lr, query_x=None, device=None,
                check_range: bool = False) -> tuple[int, int, ResolvedLR]:
    """adapt / adapt_predict inputs; returns (tasks, support rows, lr)."""
    check_steps(steps)
    check_images(model, "support_x", support_x, device=device)
    tasks, support = support_x.shape[:2]
    check_labels(model, support_y, tasks, support, device, check_range)
    if query_x is not None:
        check_images(model, "query_x", query_x, tasks, device)
    return tasks, support, check_lr(model, lr, device)


def check_predict(model: MetaModel, fast, query_x, stats, bn_policy, device=None, shared_ok: bool = False):
    """predict inputs; returns (tasks, stats or None). Statistics are required exactly where the policy normalizes
    with them (ModelSpec.predict_needs_support_stats) and ignored elsewhere; `running` needs the model's own
    running statistics instead."""
    check_images(model, "query_x", query_x, device=device)
    tasks = query_x.shape[0]
    check_fast(model, fast, tasks, device, shared_ok)
    if model.spec.uses_running_stats(bn_policy) and getattr(model, "bn_running", None) is None:
        raise ValueError(f"bn_policy 'running' for model {model.name}, which has no running statistics "
                         "(MetaModel.bn_running); expected 'support' or 'transductive', or a model with them")
    if not model.spec.predict_needs_support_stats(bn_policy):
        return tasks, None
    if stats is None:
        raise ValueError(f"model {model.name} uses bn_policy 'support': predict needs the adaptation's support "
                         "statistics (stats=AdaptResult.stats)")
    return tasks, check_stats(model, stats, tasks, device)
