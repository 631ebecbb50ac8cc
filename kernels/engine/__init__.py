"""The adaptation engine: `adapt` and `predict` for a whole batch of tasks, with interchangeable backends.

- `reference`: torch autograd over the task-stacked reference forward (CPU or GPU).
- `graph`: the reference captured in a CUDA graph per shape bucket (CUDA only).
- `triton`: fused Triton kernels, captured in a CUDA graph (CUDA, or the Triton interpreter on the CPU).
- `auto`: `triton` on CUDA, `reference` on the CPU.

Every backend implements kernels.engine.protocol.AdaptBackend; Engine resolves the defaults (steps, and the inner
lr by MetaModel.inner_lr, the one rule) and calls nothing else. Serving adapts first-order (no graph through the
steps is kept). All backends return the same results to the tolerance stated in tests/kernels, for any number of
tasks: large batches run in task chunks (kernels.engine.chunking). An adaptation carries the support statistics its
predict needs (AdaptResult.stats), so predict never forwards the support rows again.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kernels.engine.precision import check_precision
from kernels.engine.protocol import AdaptBackend
from kernels.engine.reference import ReferenceBackend
from models.checkpoint import MetaModel
from models.maml import AdaptResult
from models.spec import ModelSpec

BACKENDS = ("auto", "reference", "graph", "triton")
__all__ = ["BACKENDS", "AdaptBackend", "Engine", "ReferenceBackend", "make_backend", "resolve_backend"]


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
    """adapt(model, support_x, support_y, steps, lr) -> AdaptResult; predict(model, fast, query_x, stats) -> logits.

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
        self.backend: AdaptBackend = make_backend(self.backend_name, self.device, precision)

    @property
    def precision(self) -> str | None:
        """The Triton kernels' dot precision; None: torch fp32 (no Triton kernels)."""
        return self.backend.precision

    def capture_failures(self) -> list[str]:
        """Why CUDA-graph captures failed (those keys run eagerly: right results, launch-bound speed)."""
        return self.backend.capture_failures()

    def graph_capacity(self) -> int | None:
        return self.backend.graph_capacity()

    def max_rows(self, spec: ModelSpec) -> int | None:
        """The most rows per task (support + query) the backend's kernels take; None: no limit."""
        return self.backend.max_rows(spec)

    def warming(self):
        """`with engine.warming():` calls capture on first use and stay captured (the server's warm-up)."""
        return self.backend.warming()

    @staticmethod
    def _rates(model: MetaModel, lr) -> tuple[MetaModel, object]:
        """The one learning-rate rule (MetaModel.inner_lr / step_rates): a client's override replaces the
        checkpoint's learned rates, per-step ones (LSLR) included."""
        if model.step_lrs is not None and model.step_rates(lr) is None:
            model = dataclasses.replace(model, step_lrs=None)
        return model, model.inner_lr(lr)

    def adapt(self, model: MetaModel, support_x, support_y, steps: int | None = None, lr=None,
              track: bool = True) -> AdaptResult:
        steps = model.spec.steps if steps is None else steps
        model, rate = self._rates(model, lr)
        return self.backend.adapt(model, support_x, support_y, steps, rate, track)

    def predict(self, model: MetaModel, fast, query_x, stats=None, bn_policy=None) -> torch.Tensor:
        """stats: the adaptation's support statistics (AdaptResult.stats) where the BN policy needs them."""
        return self.backend.predict(model, fast, query_x, stats, bn_policy)

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int | None = None, lr=None,
                      track: bool = True, bn_policy=None) -> tuple[AdaptResult, torch.Tensor]:
        """Adapt and predict in one call (one CUDA-graph replay on the graph and triton backends)."""
        steps = model.spec.steps if steps is None else steps
        model, rate = self._rates(model, lr)
        return self.backend.adapt_predict(model, support_x, support_y, query_x, steps, rate, track, bn_policy)
