"""The `triton` engine backend: the fused kernels of kernels.fused.program (kernels.engine.protocol.AdaptBackend).

On CUDA the whole K-step adapt (+ predict, with `adapt_predict`) of one key is captured once in a CUDA graph and
replayed: ~9 launches per step would otherwise cost more in launch overhead than in work at T=1. A key is what the
program's shapes and flags depend on: the model's tensors, the lr *kind* (one rate, or the model's Meta-SGD rates),
the task count and (under the `support` BN policy, where query rows are independent) the query count rounded up to
1, 2, 3, 4, 6, 8, 12, ... (task_bucket), the support size, steps, track, BN policy and precision. Never a value:
the lr lives in the program's device scalar, refilled before each replay. Captures follow kernels.engine.graph_cache:
a key's first call launches eagerly (no padding, nothing kept), it is captured when it recurs (or at once inside
`warming()`), and programs are kept least-recently-used, bounded in count and bytes, warmed ones pinned. Inputs are
copied into the program's static buffers (padding rows and tasks keep stale but finite data and are dropped),
outputs are copied out, so a replay never aliases a returned tensor.
Task batches larger than the workspace budget are cut into chunks (1024 tasks of mini-ImageNet with 75 queries
need ~70 MB per task for the first layer's activations alone).

The support statistics a `support`-policy adaptation keeps (AdaptResult.stats) come out of the program's last
support forward; predict takes them back (kernels.fused.stats.moment_sums) and forwards the query rows alone.

On the CPU the same kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernels are
imported): no graphs, just launches; slow, for tests. Recipes run fused: ANIL (`adapt_params` 'head': one body
forward, K head steps), MAML++'s `no-bn` (batch-norm parameters frozen: rate 0) and LSLR's learned per-step rates
(per-element rate buffers of the model, kernels.fused.program.RecipeRates). mlp-* architectures and recipes the
kernels do not implement (anything else recipe_options names) run on the reference backend (logged once).

Environment: FASTADAPT_TRITON_PRECISION = ieee (default) | tf32x3 | tf32 selects tl.dot's input precision
(tf32 trades ~1e-3 relative error in logits for tensor-core speed; tf32x3 is near fp32 at 3 tensor-core passes);
FASTADAPT_TRITON_WORKSPACE_MB caps the workspace per chunk (default: a quarter of the GPU's memory, 1 GiB on CPU).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from kernels.engine.chunking import run_chunked
from kernels.engine.graph_cache import GraphCache, query_bucket, task_bucket
from kernels.engine.reference import ReferenceBackend, needs_reference, recipe_options
from kernels.engine.validation import check_adapt, check_predict, check_tensor
from kernels.fused.common import check_precision, kernels_interpreted
from kernels.fused.program import (
    TRITON_ARCHS,
    AdaptProgram,
    RecipeRates,
    max_rows_per_task,
    predict_conv4,
    workspace_bytes_per_task,
)
from kernels.fused.stats import moment_sums, moments_dict
from models.checkpoint import MetaModel
from models.functional import adapted_keys, param_shapes
from models.maml import AdaptResult
from models.spec import ModelSpec

log = logging.getLogger(__name__)
__all__ = ["TritonBackend", "task_bucket"]


@dataclass
class _Captured:
    program: AdaptProgram  # static inputs, workspace and outputs
    graph: object  # torch.cuda.CUDAGraph (anything with replay())


class TritonBackend:
    """Fused-kernel adapt / predict / adapt_predict (see the module docstring)."""

    name = "triton"

    def __init__(self, device: str | torch.device = "cuda", precision: str | None = None,
                 workspace_bytes: int | None = None, use_graphs: bool | None = None, max_graphs: int = 64,
                 check_labels: bool | None = None, capture_after: int = 2):
        """check_labels: range-check support_y. None (default): on the CPU; CUDA labels would cost a device sync per
        call, which is latency at T=1 (server.validation checks the request's labels on the host before they reach
        the engine). True / False: always / never. capture_after: the sighting of a key that captures it."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1" or not kernels_interpreted():
                raise RuntimeError(
                    "backend 'triton' on the CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                    "kernels are imported (or use backend 'reference')"
                )
        elif self.device.type != "cuda":
            raise ValueError(f"backend 'triton' runs on CUDA (or the CPU interpreter), got device {self.device}")
        self.precision = check_precision(precision or os.environ.get("FASTADAPT_TRITON_PRECISION", "ieee"))
        if workspace_bytes is None:
            mb = os.environ.get("FASTADAPT_TRITON_WORKSPACE_MB")
            if mb:
                workspace_bytes = int(float(mb) * 2**20)
            elif self.device.type == "cuda":
                workspace_bytes = torch.cuda.get_device_properties(self.device).total_memory // 4
            else:
                workspace_bytes = 2**30
        self.workspace_bytes = int(workspace_bytes)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("use_graphs=True needs a CUDA device")
        self.check_labels = check_labels
        # Captured programs: their workspaces together within twice the per-chunk budget (1024-task mini-ImageNet
        # programs hold tens of GB each).
        self.graphs: GraphCache[_Captured] = GraphCache(max_graphs, 2 * self.workspace_bytes, capture_after)
        self._reference = ReferenceBackend(self.device)  # what has no fused kernels
        self._meta_cache: dict[int, tuple[dict, tuple, dict]] = {}  # id(params) -> (params, tensors, checked)
        self._recipe_cache: dict[int, tuple[dict, tuple, RecipeRates]] = {}  # id(step_lrs) -> (..., rates)
        self._lock = threading.Lock()
        self._noted_fallback: set[str] = set()

    # ------------------------------------------------------------------------------------------ public interface

    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        if self._fallback(model):
            return self._reference.adapt(model, support_x, support_y, steps, lr, track)
        result, _ = self._run(model, support_x, support_y, None, steps, lr, track, model.spec.bn_policy)
        return result

    def predict(self, model: MetaModel, fast, query_x, stats=None, bn_policy=None) -> torch.Tensor:
        """Query rows alone: normalized with the adaptation's stored statistics (`support` policy) or their own."""
        if self._fallback(model):
            return self._reference.predict(model, fast, query_x, stats, bn_policy)
        spec = model.spec
        tasks, stats = check_predict(model, fast, query_x, stats, bn_policy, self.device, shared_ok=True)
        fast = {k: fast[k].detach().contiguous() for k in param_shapes(spec)}
        sums = None if stats is None else moment_sums(stats, 4)  # fp64 [4, T, 2, C]
        queries = query_x.shape[1]
        chunk = max(1, self.workspace_bytes // workspace_bytes_per_task(spec, 0, queries, 0, "transductive"))
        pieces = []
        with torch.no_grad():
            for start in range(0, tasks, chunk):
                sl = slice(start, min(tasks, start + chunk))
                part = {k: v if v.dim() == len(param_shapes(spec)[k]) else v[sl] for k, v in fast.items()}
                pieces.append(predict_conv4(spec, part, query_x[sl].contiguous(), self.precision,
                                            None if sums is None else sums[:, sl].contiguous()).contiguous())
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int, lr, track: bool = True,
                      bn_policy: str | None = None) -> tuple[AdaptResult, torch.Tensor]:
        """adapt + predict in one replay (one CUDA graph): the AdaptAndPredict path. Returns (result, logits)."""
        if self._fallback(model):
            return self._reference.adapt_predict(model, support_x, support_y, query_x, steps, lr, track, bn_policy)
        if query_x is None:
            raise ValueError("adapt_predict needs query_x, got None")
        return self._run(model, support_x, support_y, query_x, steps, lr, track, bn_policy or model.spec.bn_policy)

    def capture_failures(self) -> list[str]:
        """Why the keys whose CUDA-graph capture failed launch eagerly instead."""
        return self.graphs.failures()

    def graph_capacity(self) -> int | None:
        """How many captured programs this backend keeps (None: it captures nothing)."""
        return self.graphs.max_entries if self.use_graphs else None

    def max_rows(self, spec: ModelSpec) -> int | None:
        """Rows per task and forwarded batch within CUDA's grid limit, from the launchers' block choices."""
        if spec.arch not in TRITON_ARCHS:
            return self._reference.max_rows(spec)
        return max_rows_per_task(spec, self.device)

    def warming(self):
        return self.graphs.warming()

    # ------------------------------------------------------------------------------------------------ internals

    def _fallback(self, model: MetaModel) -> bool:
        arch = model.spec.arch
        if arch in TRITON_ARCHS and not needs_reference(model):
            return False
        recipe = recipe_options(model)
        what = arch if arch not in TRITON_ARCHS else f"{arch} with {', '.join(sorted(recipe))}"
        if what not in self._noted_fallback:
            self._noted_fallback.add(what)
            log.warning("backend 'triton' has no fused kernels for %s (model %s): using the reference path",
                        what, model.name)
        return True

    def _recipe(self, model: MetaModel) -> RecipeRates | None:
        """The model's recipe rates as per-element buffers on the device, built once per model (the step rates are
        a checkpoint's constants: a captured graph reads them at their addresses, part of the key). None: plain
        MAML / Meta-SGD, or ANIL with no per-step rates (the head-only program reads lr as it is)."""
        spec, step_lrs = model.spec, model.step_lrs
        frozen = frozenset()
        if spec.adapt_params not in ("all", "head"):
            frozen = frozenset(param_shapes(spec)) - set(adapted_keys(spec, spec.adapt_params))
        if step_lrs is None:
            return RecipeRates(frozen) if frozen else None
        shapes = param_shapes(spec)
        hit = self._recipe_cache.get(id(step_lrs))
        if hit is not None and hit[0] is step_lrs and all(a is b for a, b in zip(hit[1], step_lrs.values())):
            return hit[2]
        count = max(v.shape[0] for v in step_lrs.values())
        per_step = tuple(
            {k: torch.full(shapes[k], float(v[min(s, v.shape[0] - 1)]), device=self.device)
             for k, v in step_lrs.items()} for s in range(count))
        rates = RecipeRates(frozen, per_step)
        if len(self._recipe_cache) > 16:
            self._recipe_cache.clear()
        self._recipe_cache[id(step_lrs)] = (step_lrs, tuple(step_lrs.values()), rates)
        return rates

    def _checked_meta(self, model: MetaModel, params: dict | None = None) -> dict[str, torch.Tensor]:
        """The meta-initialization (or Meta-SGD rates) checked and contiguous, remembered while it holds the same
        tensors: at T=1 the per-call Python work is part of the latency."""
        params = model.params if params is None else params
        hit = self._meta_cache.get(id(params))
        if hit is not None and hit[0] is params and all(a is b for a, b in zip(hit[1], params.values())):
            return hit[2]
        checked = {}
        for name, shape in param_shapes(model.spec).items():
            t = params.get(name) if isinstance(params, dict) else None
            if t is None:
                raise ValueError(f"parameters of model {model.name} lack {name!r}")
            checked[name] = check_tensor(model, name, t, shape, torch.float32, self.device).detach().contiguous()
        if len(self._meta_cache) > 16:
            self._meta_cache.clear()
        self._meta_cache[id(params)] = (params, tuple(params.values()), checked)
        return checked

    def _run(self, model, support_x, support_y, query_x, steps, lr, track, policy):
        spec = model.spec
        check_range = self.device.type == "cpu" if self.check_labels is None else self.check_labels
        tasks, support, lr = check_adapt(model, support_x, support_y, steps, lr, query_x, self.device, check_range)
        if isinstance(lr, dict):
            lr = self._checked_meta(model, lr)
        meta = self._checked_meta(model)
        queries = 0 if query_x is None else query_x.shape[1]
        padded_q = query_bucket(spec, queries, policy) if self.use_graphs else queries
        chunk = max(1, self.workspace_bytes // workspace_bytes_per_task(spec, support, padded_q, steps, policy))
        run = self._replay if self.use_graphs else self._launch

        def piece(sl):
            qx = None if query_x is None else query_x[sl].contiguous()
            return run(model, meta, lr, support_x[sl].contiguous(), support_y[sl].contiguous(), qx, steps, track,
                       policy, chunk)

        return run_chunked(tasks, chunk, piece)

    def _program(self, model, tasks, support, queries, steps, track, policy) -> AdaptProgram:
        return AdaptProgram(model.spec, tasks, support, queries, steps, track, policy, self.precision, self.device,
                            support_stats=model.spec.predict_needs_support_stats(),
                            head_only=model.spec.adapt_params == "head", recipe=self._recipe(model))

    def _launch(self, model, meta, lr, sx, sy, qx, steps, track, policy, chunk):
        """No graph: launch every kernel now on the caller's tensors (exact sizes, nothing kept)."""
        program = self._program(model, sx.shape[0], sx.shape[1], 0 if qx is None else qx.shape[1], steps, track,
                                policy)
        program.meta, program.lr, program.support_x, program.support_y, program.query_x = meta, lr, sx, sy, qx
        with torch.no_grad():
            program.launch()
        result = AdaptResult(program.fast, program.loss if track else None, program.accuracy if track else None,
                             stats=program.stats)
        return result, program.logits

    def _key(self, model, meta, lr, tasks, support, queries, steps, track, policy) -> tuple:
        lr_key = "scalar" if not isinstance(lr, dict) else ("meta-sgd",) + tuple(
            (k, v.data_ptr()) for k, v in lr.items())
        recipe = self._recipe(model)  # (model.spec says which parameters adapt)
        recipe_key = None if recipe is None else (recipe.frozen, tuple(t.data_ptr() for t in recipe.tensors()))
        return (model.spec, tuple((k, v.data_ptr()) for k, v in meta.items()), lr_key, tasks, support, queries,
                steps, track, policy if queries else None, self.precision, recipe_key)

    def _replay(self, model, meta, lr, sx, sy, qx, steps, track, policy, chunk):
        spec = model.spec
        n, support = sx.shape[:2]
        queries = 0 if qx is None else qx.shape[1]
        padded, padded_q = min(task_bucket(n), chunk), query_bucket(spec, queries, policy)
        key = self._key(model, meta, lr, padded, support, padded_q, steps, track, policy)
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None and self.graphs.should_capture(key):
                nbytes = padded * workspace_bytes_per_task(spec, support, padded_q, steps, policy)
                if self.graphs.make_room(nbytes):
                    try:
                        entry = self._capture(model, meta, lr, padded, support, padded_q, steps, track, policy)
                    except torch.OutOfMemoryError:
                        raise  # not a capture problem: the caller (server.runner) splits the batch and retries
                    except Exception as exc:  # a failed capture must not fail requests: this key launches eagerly
                        why = f"{type(exc).__name__}: {exc}"
                        self.graphs.fail(key, why)
                        log.warning("CUDA-graph capture failed, this key launches eagerly: %s", why)
                    else:
                        self.graphs.insert(key, entry, nbytes)  # not kept (room pinned): used for this call only
            if entry is not None:
                return self._run_captured(entry, spec, lr, sx, sy, qx, n, queries, track)
        return self._launch(model, meta, lr, sx, sy, qx, steps, track, policy, chunk)

    @staticmethod
    def _run_captured(entry: _Captured, spec, lr, sx, sy, qx, n, queries, track):
        p = entry.program
        if not isinstance(lr, dict):
            if isinstance(lr, torch.Tensor):
                p.lr.copy_(lr)
            else:
                p.lr.fill_(lr)
        p.support_x[:n].copy_(sx)
        p.support_y[:n].copy_(sy)
        if qx is not None:
            p.query_x[:n, :queries].copy_(qx)
        entry.graph.replay()
        fast = {k: v[:n] for k, v in p.split(p.final_blob.clone()).items()}
        # clone, never .contiguous(): a slice that is already contiguous would alias the graph's buffers
        copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
        loss = copy(p.loss[:, :n]) if track else None
        acc = copy(p.accuracy[:, :n]) if track else None
        stats = moments_dict(copy(p.moments[:, :, :n])) if p.support_stats else None
        logits = copy(p.logits[:n, :queries]) if queries else None
        return AdaptResult(fast, loss, acc, stats=stats), logits

    def _capture(self, model, meta, lr, tasks, support, queries, steps, track, policy) -> _Captured:
        spec, dev = model.spec, self.device
        program = self._program(model, tasks, support, queries, steps, track, policy)
        program.meta = meta  # the model's own tensors: their addresses are part of the key
        # Meta-SGD: the model's rates (addresses in the key); one rate: the program's device scalar, set per replay
        program.lr = lr if isinstance(lr, dict) else torch.full((), float(lr), dtype=torch.float32, device=dev)
        program.support_x = torch.zeros(tasks, support, *spec.input_shape, device=dev)
        program.support_y = torch.zeros(tasks, support, dtype=torch.int64, device=dev)
        program.query_x = torch.zeros(tasks, queries, *spec.input_shape, device=dev) if queries else None
        return _Captured(program, self._record(program))

    def _record(self, program: AdaptProgram):
        """Compile (warm-up run on a side stream), then capture every launch of `program` in a CUDA graph."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():  # compiles every kernel outside the capture
            program.launch()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            program.launch()
        return graph
