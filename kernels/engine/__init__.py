"""The adaptation engine: `adapt` and `predict` for a whole batch of tasks, with interchangeable backends.

- `reference`: torch autograd over the task-stacked reference forward (CPU or GPU).
- `graph`: the reference captured in a CUDA graph per shape bucket (CUDA only).
- `triton`: fused Triton kernels, captured in a CUDA graph (CUDA, or the Triton interpreter on the CPU).
- `auto`: `triton` on CUDA, `reference` on the CPU.

Serving adapts first-order (no graph through the steps is kept). All backends return the same results to the
tolerance stated in tests/kernels, for any number of tasks: large batches run in task chunks (kernels.engine.chunking).
"""

from __future__ import annotations

import os

import torch

from kernels.engine.chunking import check_task_counts, default_budget, run_chunked, task_chunk
from kernels.engine.precision import check_precision
from models.checkpoint import MetaModel
from models.maml import AdaptResult
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict

BACKENDS = ("auto", "reference", "graph", "triton")


class ReferenceBackend:
    """Torch autograd over the task-stacked forward; batches too large for one call run in task chunks
    (kernels.engine.chunking: the 32-bit index limit of GPU convolutions, and a memory budget)."""

    name = "reference"

    def __init__(self, device: torch.device | str | None = None, budget_bytes: int | None = None):
        self.budget_bytes = default_budget(device) if budget_bytes is None else int(budget_bytes)

    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        spec = model.spec
        check_task_counts(support_x.shape[0], "support_x", support_y=support_y)
        chunk = task_chunk(spec, support_x.shape[1], 0, spec.bn_policy, self.budget_bytes)
        return run_chunked(support_x.shape[0], chunk, lambda s: reference_adapt(
            spec, model.params, support_x[s], support_y[s], steps, lr, track=track))

    def predict(self, model: MetaModel, fast, query_x, support_x=None, bn_policy=None) -> torch.Tensor:
        spec = model.spec
        check_task_counts(query_x.shape[0], "query_x", support_x=support_x, **{f"fast[{k!r}]": v for k, v in
                                                                               fast.items()})
        support = 0 if support_x is None else support_x.shape[1]
        chunk = task_chunk(spec, support, query_x.shape[1], bn_policy or spec.bn_policy, self.budget_bytes)
        with torch.no_grad():
            return run_chunked(query_x.shape[0], chunk, lambda s: reference_predict(
                spec, {k: v[s] for k, v in fast.items()}, query_x[s], None if support_x is None else support_x[s],
                bn_policy))


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown, expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend in ("graph",) and device.type != "cuda":
        raise ValueError(f"backend {backend!r} needs a CUDA device, got {device}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend 'triton' needs a CUDA device, got {device}; on the CPU it runs only under the Triton "
            "interpreter (TRITON_INTERPRET=1, slow: for tests)"
        )
    return backend


def make_backend(name: str, device: torch.device, precision: str | None = None):
    if name == "reference":
        return ReferenceBackend(device)
    if name == "graph":
        from kernels.engine.graph import GraphBackend

        return GraphBackend(device)
    if name == "triton":
        from kernels.engine.fused import TritonBackend

        return TritonBackend(device, precision=precision)
    raise NotImplementedError(f"backend {name!r} is not built yet")


class Engine:
    """adapt(model, support_x, support_y, steps, lr) -> fast params; predict(model, fast, query_x) -> logits.

    Inputs are task-stacked and already preprocessed float32 on the engine's device:
    support_x [T, N*K, *input_shape], support_y [T, N*K] int64, query_x [T, Q, *input_shape].
    """

    def __init__(self, backend: str = "auto", device: str | torch.device | None = None,
                 precision: str | None = None):
        """precision: the Triton kernels' dot-product precision (ieee | tf32x3 | tf32; default ieee or
        $FASTADAPT_TRITON_PRECISION). Refused with another backend the caller chose; with `auto` it only applies
        where auto picks triton (the same command line serves on a CPU box)."""
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.backend_name = resolve_backend(backend, self.device)
        if precision is not None:
            check_precision(precision)
            if self.backend_name != "triton":
                if backend != "auto":
                    raise ValueError(f"precision {precision!r} is an option of the triton backend, the backend is "
                                     f"{self.backend_name!r}; expected --backend triton (or auto on a GPU)")
                precision = None
        self.backend = make_backend(self.backend_name, self.device, precision)
        self.precision = getattr(self.backend, "precision", None)  # None: torch fp32 (no Triton kernels)

    def capture_failures(self) -> list[str]:
        """Why CUDA-graph captures failed (those buckets run eagerly: right results, launch-bound speed)."""
        report = getattr(self.backend, "capture_failures", None)  # backends without graphs have none
        return report() if report is not None else []

    def adapt(self, model: MetaModel, support_x, support_y, steps: int | None = None, lr=None, track: bool = True):
        steps = model.spec.steps if steps is None else steps
        return self.backend.adapt(model, support_x, support_y, steps, model.inner_lr(lr), track)

    def predict(self, model: MetaModel, fast, query_x, support_x=None, bn_policy=None) -> torch.Tensor:
        return self.backend.predict(model, fast, query_x, support_x, bn_policy)

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int | None = None, lr=None,
                      track: bool = True, bn_policy=None) -> tuple[AdaptResult, torch.Tensor]:
        """Adapt and predict in one call (one CUDA-graph replay on the graph and triton backends)."""
        steps = model.spec.steps if steps is None else steps
        fused = getattr(self.backend, "adapt_predict", None)
        if fused is not None:
            return fused(model, support_x, support_y, query_x, steps=steps, lr=lr, track=track, bn_policy=bn_policy)
        result = self.adapt(model, support_x, support_y, steps, lr, track)
        return result, self.predict(model, result.params, query_x, support_x, bn_policy)
