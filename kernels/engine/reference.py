"""The `reference` engine backend: torch autograd over the task-stacked reference forward (CPU or GPU).

Batches too large for one call run in task chunks (kernels.engine.chunking: the 32-bit index limit of GPU
convolutions, and a memory budget). The recipe of a model (ANIL's adapted parameters, MAML++'s per-step rates) is
its checkpoint's: `recipe_options` passes it to models.maml.adapt, here and in the graph backend. A model served
under the `running` BN policy (per-step running statistics), or with per-step batch-norm weights (MAML++ `step_bn`),
is a recipe too: the graph and triton backends, which fall back to this path for any recipe they do not implement,
then serve it here.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kernels.engine.chunking import default_budget, max_rows, run_chunked, task_chunk
from kernels.engine.validation import check_adapt, check_predict
from models.checkpoint import MetaModel
from models.functional import adapted_keys
from models.maml import AdaptResult, adaptation_stats
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict
from models.spec import ModelSpec

# recipe_options keys that the graph and triton backends implement (adapted subsets, LSLR's per-step rates); a model
# with any other option (bn_running, step_bn) runs on the reference path there (`needs_reference`)
KERNEL_RECIPE = frozenset({"adapt_keys", "step_lrs"})


def needs_reference(model: MetaModel) -> bool:
    """Whether the model's recipe has an option the graph and triton backends do not implement."""
    return bool(set(recipe_options(model)) - KERNEL_RECIPE)


def recipe_options(model: MetaModel) -> dict:
    """models.maml.adapt's recipe keywords for this model: none for plain MAML / Meta-SGD.

    A `running`-policy model adds its per-step running statistics (`bn_running`): the graph and triton backends
    have no program that normalizes with stored statistics during adaptation, so this entry is also what sends
    them to the reference path. Likewise per-step batch-norm weights (`step_bn`): their programs take one gamma /
    beta for every step."""
    options = {}
    if model.spec.adapt_params != "all":
        options["adapt_keys"] = adapted_keys(model.spec, model.spec.adapt_params)
    if getattr(model, "step_lrs", None) is not None:
        options["step_lrs"] = model.step_lrs
    if model.spec.uses_running_stats() and getattr(model, "bn_running", None) is not None:
        options["bn_running"] = model.bn_running
    if getattr(model, "step_bn", None) is not None:
        options["step_bn"] = model.step_bn
    return options


class ReferenceBackend:
    """Torch autograd over the task-stacked forward (kernels.engine.protocol.AdaptBackend)."""

    name = "reference"
    precision = None

    def __init__(self, device: torch.device | str | None = None, budget_bytes: int | None = None):
        self.device = torch.device(device or "cpu")
        self.budget_bytes = default_budget(device) if budget_bytes is None else int(budget_bytes)

    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        tasks, support, lr = check_adapt(model, support_x, support_y, steps, lr,
                                         check_range=support_x.device.type == "cpu")
        return self._adapt(model, support_x, support_y, steps, lr, track, support)

    def _adapt(self, model, support_x, support_y, steps, lr, track, support) -> AdaptResult:
        spec, options = model.spec, recipe_options(model)
        chunk = task_chunk(spec, support, 0, self.budget_bytes)

        def run(s):
            result = reference_adapt(spec, model.params, support_x[s], support_y[s], steps, lr, track=track,
                                     **options)
            result.stats = adaptation_stats(spec, result.params, support_x[s])
            return result

        return run_chunked(support_x.shape[0], chunk, run)

    def predict(self, model: MetaModel, fast, query_x, stats=None, bn_policy=None) -> torch.Tensor:
        """stats: the adaptation's support statistics (AdaptResult.stats) where the BN policy needs them."""
        tasks, stats = check_predict(model, fast, query_x, stats, bn_policy)
        return self._predict(model, fast, query_x, stats, bn_policy)

    def _predict(self, model, fast, query_x, stats, bn_policy) -> torch.Tensor:
        spec = model.spec
        chunk = task_chunk(spec, 0, query_x.shape[1], self.budget_bytes)
        with torch.no_grad():
            return run_chunked(query_x.shape[0], chunk, lambda s: reference_predict(
                spec, {k: v[s] for k, v in fast.items()}, query_x[s], bn_policy=bn_policy,
                stats=None if stats is None else {k: v[s] for k, v in stats.items()},
                bn_running=getattr(model, "bn_running", None)))

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int, lr, track: bool = True,
                      bn_policy=None) -> tuple[AdaptResult, torch.Tensor]:
        tasks, support, lr = check_adapt(model, support_x, support_y, steps, lr, query_x,
                                         check_range=support_x.device.type == "cpu")
        result = self._adapt(model, support_x, support_y, steps, lr, track, support)
        stats = result.stats
        if bn_policy is not None and model.spec.predict_needs_support_stats(bn_policy) != (stats is not None):
            stats = adaptation_stats(model.spec, result.params, support_x, bn_policy)  # a policy other than its own
        return result, self._predict(model, result.params, query_x, stats, bn_policy)

    def capture_failures(self) -> list[str]:
        return []

    def graph_capacity(self) -> int | None:
        return None

    def max_rows(self, spec: ModelSpec) -> int | None:
        return max_rows(spec, self.device)

    def warming(self):
        return nullcontext()
