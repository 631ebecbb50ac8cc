"""The interface every engine backend implements (reference, graph, triton): Engine calls nothing else.

Inputs are task-stacked float32 on the backend's device: support_x [T, N*K, *input_shape], support_y [T, N*K]
int64 (float32 [T, N*K, 1] for a regressor), query_x [T, Q, *input_shape]. `steps` and `lr` arrive resolved:
Engine applies the model's defaults and MetaModel.inner_lr (the one rule: override, Meta-SGD rates or the spec's
rate), so a backend takes lr as given: a float, a 0-dim float32 tensor, or {name: per-element rates}.
Input checks: kernels.engine.validation, once per call.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from models.checkpoint import MetaModel
from models.maml import AdaptResult
from models.spec import ModelSpec


@runtime_checkable
class AdaptBackend(Protocol):
    name: str
    precision: str | None  # the Triton kernels' dot precision; None: torch fp32 (no Triton kernels)

    def adapt(self, model: MetaModel, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, lr,
              track: bool) -> AdaptResult:
        """K first-order SGD steps per task. AdaptResult.params: fast weights [T, ...]; support_loss /
        support_accuracy [steps + 1, T] when track; stats: the support statistics under the adapted weights
        ({bn{i}.mean, bn{i}.var} [T, C]) when the model's BN policy needs them for predict (else None)."""
        ...

    def predict(self, model: MetaModel, fast: dict[str, torch.Tensor], query_x: torch.Tensor,
                stats: dict[str, torch.Tensor] | None = None, bn_policy: str | None = None) -> torch.Tensor:
        """Query logits [T, Q, ways]. stats: AdaptResult.stats, required where the policy normalizes with the
        support statistics (ModelSpec.predict_needs_support_stats); the support rows are never forwarded again."""
        ...

    def adapt_predict(self, model: MetaModel, support_x: torch.Tensor, support_y: torch.Tensor,
                      query_x: torch.Tensor, steps: int, lr, track: bool = True,
                      bn_policy: str | None = None) -> tuple[AdaptResult, torch.Tensor]:
        """adapt + predict in one call (one graph replay where the backend captures): (AdaptResult with stats for
        the model's own policy, logits under bn_policy or the model's)."""
        ...

    def capture_failures(self) -> list[str]:
        """Why CUDA-graph captures failed (those keys run eagerly: right results, launch-bound speed)."""
        ...

    def graph_capacity(self) -> int | None:
        """How many captured programs the backend keeps (None: it captures nothing)."""
        ...

    def max_rows(self, spec: ModelSpec) -> int | None:
        """The most rows per task this backend's kernels take in one forwarded batch on its device (support rows
        in adapt, query rows in predict, support + query rows in the triton backend's adapt_predict): a task is
        safe when support + query rows <= max_rows. None: no limit."""
        ...

    def warming(self) -> AbstractContextManager:
        """Calls inside capture their programs on first use and keep them pinned (the server's warm-up); outside,
        a program is captured only when its key recurs (kernels.engine.graph_cache)."""
        ...
