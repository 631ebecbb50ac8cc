"""The `triton` engine backend: the fused kernels of kernels.fused.program behind the ReferenceBackend interface.

On CUDA the whole K-step adapt (+ predict, with `adapt_predict`) of one shape bucket is captured once in a CUDA
graph and replayed: ~9 launches per step would otherwise cost more in launch overhead than in work at T=1.
A bucket is (model tensors, lr, task count rounded up to 1, 2, 3, 4, 6, 8, 12, ..., support and query sizes,
steps, track, BN policy, precision); captured programs are kept least-recently-used, bounded in count and
bytes. Inputs are copied into the graph's static buffers (padding tasks keep stale but finite data and are
dropped), outputs are copied out, so a replay never aliases a returned tensor.
Task batches larger than the workspace budget are cut into chunks (1024 tasks of mini-ImageNet with 75 queries
need ~70 MB per task for the first layer's activations alone).

On the CPU the same kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernels are
imported): no graphs, just launches; slow, for tests. mlp-* architectures have no fused kernels and run on the
reference path (logged once).

Environment: FASTADAPT_TRITON_PRECISION = ieee (default) | tf32x3 | tf32 selects tl.dot's input precision
(tf32 trades ~1e-3 relative error in logits for tensor-core speed; tf32x3 is near fp32 at 3 tensor-core passes);
FASTADAPT_TRITON_WORKSPACE_MB caps the workspace per chunk (default: a quarter of the GPU's memory, 1 GiB on CPU).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kernels.fused.common import check_precision, kernels_interpreted
from kernels.fused.program import TRITON_ARCHS, AdaptProgram, predict_conv4, workspace_bytes_per_task
from models.checkpoint import MetaModel
from models.functional import param_shapes
from models.maml import AdaptResult
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict

log = logging.getLogger(__name__)


def task_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them) that holds n tasks."""
    b = 1
    while b < n:
        b = b + 1 if b < 2 else (b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3)
    return b


@dataclass
class _Captured:
    program: AdaptProgram  # static inputs, workspace and outputs
    graph: object  # torch.cuda.CUDAGraph (anything with replay())
    nbytes: int  # device memory the program holds


class TritonBackend:
    """Fused-kernel adapt / predict with the interface of kernels.engine.ReferenceBackend (plus adapt_predict)."""

    name = "triton"

    def __init__(self, device: str | torch.device = "cuda", precision: str | None = None,
                 workspace_bytes: int | None = None, use_graphs: bool | None = None, max_graphs: int = 64,
                 check_labels: bool | None = None):
        """check_labels: range-check support_y. None (default): when the labels are in host memory, or on the CPU;
        CUDA labels would cost a device sync per call, which is latency at T=1 (server.validation checks the
        request's labels on the host before they reach the engine). True / False: always / never."""
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
        self.max_graphs = max_graphs
        self.check_labels = check_labels
        self._meta_cache: dict[int, tuple[dict, tuple, dict]] = {}  # id(params) -> (params, tensors, checked)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._uncapturable: dict[tuple, str] = {}  # bucket key -> why its capture failed (then launched eagerly)
        self._lock = threading.Lock()
        self._noted_fallback: set[str] = set()

    # ------------------------------------------------------------------------------------------ public interface

    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        if self._fallback(model):
            return reference_adapt(model.spec, model.params, support_x, support_y, steps, lr, track=track)
        result, _ = self._run(model, support_x, support_y, None, steps, lr, track, None)
        return result

    def predict(self, model: MetaModel, fast, query_x, support_x=None, bn_policy=None) -> torch.Tensor:
        spec = model.spec
        policy = bn_policy or spec.bn_policy
        if self._fallback(model):
            with torch.no_grad():
                return reference_predict(spec, fast, query_x, support_x, bn_policy)
        tasks = self._check_images(model, query_x, "query_x")[0]
        if policy == "support":
            if support_x is None:
                raise ValueError(f"model {spec.name} uses bn_policy 'support': predict needs the support set")
            if self._check_images(model, support_x, "support_x")[0] != tasks:
                raise ValueError(f"support_x has {support_x.shape[0]} tasks, expected {tasks} like query_x")
        fast = self._check_params(model, fast, tasks)
        queries = query_x.shape[1]
        support = support_x.shape[1] if policy == "support" else 0
        chunk = max(1, self.workspace_bytes // workspace_bytes_per_task(spec, 0, queries + support, 0, "transductive"))
        pieces = []
        with torch.no_grad():
            for start in range(0, tasks, chunk):
                sl = slice(start, min(tasks, start + chunk))
                part = {k: v if v.dim() == len(param_shapes(spec)[k]) else v[sl] for k, v in fast.items()}
                pieces.append(predict_conv4(spec, part, query_x[sl].contiguous(), None if support_x is None else
                                            support_x[sl].contiguous(), policy, self.precision).contiguous())
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int | None = None, lr=None,
                      track: bool = True, bn_policy: str | None = None) -> tuple[AdaptResult, torch.Tensor]:
        """adapt + predict in one replay (one CUDA graph): the AdaptAndPredict path. Returns (result, logits)."""
        steps = model.spec.steps if steps is None else steps
        lr = lr if isinstance(lr, dict) else model.inner_lr(lr)  # None / float override, or rates already resolved
        policy = bn_policy or model.spec.bn_policy
        if self._fallback(model):
            result = reference_adapt(model.spec, model.params, support_x, support_y, steps, lr, track=track)
            with torch.no_grad():
                logits = reference_predict(model.spec, result.params, query_x, support_x, policy)
            return result, logits
        return self._run(model, support_x, support_y, query_x, steps, lr, track, policy)

    # ------------------------------------------------------------------------------------------------ internals

    def graph_capacity(self) -> int | None:
        """How many captured programs this backend keeps (None: it captures nothing)."""
        return self.max_graphs if self.use_graphs else None

    def capture_failures(self) -> list[str]:
        """Why the buckets whose CUDA-graph capture failed launch eagerly instead."""
        return list(self._uncapturable.values())

    def _fallback(self, model: MetaModel) -> bool:
        arch = model.spec.arch
        if arch in TRITON_ARCHS:
            return False
        if arch not in self._noted_fallback:
            self._noted_fallback.add(arch)
            log.warning("backend 'triton' has no fused kernels for %s (model %s): using the reference path",
                        arch, model.name)
        return True

    def _check_images(self, model: MetaModel, x, name: str):
        spec = model.spec
        if not isinstance(x, torch.Tensor) or x.dim() != 2 + len(spec.input_shape) or \
                tuple(x.shape[2:]) != spec.input_shape:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {got}, expected [T, N, {', '.join(map(str, spec.input_shape))}] "
                             f"for model {spec.name}")
        if x.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {x.dtype}, expected torch.float32 (preprocessed images)")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}, expected {self.device} (the engine's device)")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} has shape {list(x.shape)}, expected at least one task and one image")
        return x.shape

    def _check_params(self, model: MetaModel, params: dict, tasks: int | None) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in param_shapes(model.spec).items():
            t = params.get(name) if isinstance(params, dict) else None
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"parameters of model {model.name} lack {name!r}")
            ok = tuple(t.shape) == shape or (tasks is not None and tuple(t.shape) == (tasks, *shape))
            if not ok:
                raise ValueError(f"parameter {name} has shape {list(t.shape)}, expected {list(shape)} or "
                                 f"[{tasks if tasks is not None else 'T'}, {', '.join(map(str, shape))}]")
            if t.dtype != torch.float32 or t.device != self.device:
                raise ValueError(f"parameter {name} is {t.dtype} on {t.device}, expected torch.float32 on "
                                 f"{self.device}")
            out[name] = t.detach().contiguous()
        return out

    def _checked_meta(self, model: MetaModel, params: dict | None = None) -> dict[str, torch.Tensor]:
        """_check_params of a meta-initialization (or Meta-SGD rates), remembered while it holds the same tensors:
        at T=1 the per-call Python work is part of the latency."""
        params = model.params if params is None else params
        hit = self._meta_cache.get(id(params))
        if hit is not None and hit[0] is params and all(a is b for a, b in zip(hit[1], params.values())):
            return hit[2]
        checked = self._check_params(model, params, None)
        if len(self._meta_cache) > 16:
            self._meta_cache.clear()
        self._meta_cache[id(params)] = (params, tuple(params.values()), checked)
        return checked

    def _check_inputs(self, model, support_x, support_y, query_x, lr):
        tasks, support = self._check_images(model, support_x, "support_x")[:2]
        if not isinstance(support_y, torch.Tensor) or tuple(support_y.shape) != (tasks, support):
            got = list(support_y.shape) if isinstance(support_y, torch.Tensor) else type(support_y).__name__
            raise ValueError(f"support_y has shape {got}, expected [{tasks}, {support}] like support_x")
        if support_y.dtype != torch.int64 or support_y.device != self.device:
            raise ValueError(f"support_y is {support_y.dtype} on {support_y.device}, expected torch.int64 on "
                             f"{self.device}")
        check = self.check_labels
        if check is None:
            check = self.device.type == "cpu"
        if check:  # one reduction (+ a device sync on CUDA); labels steer no load, only the one-hot
            lo, hi = (int(v) for v in torch.aminmax(support_y))
            if lo < 0 or hi >= model.spec.ways:
                raise ValueError(f"support_y holds labels {lo}..{hi}, expected 0..{model.spec.ways - 1}")
        if query_x is not None and self._check_images(model, query_x, "query_x")[0] != tasks:
            raise ValueError(f"query_x has {query_x.shape[0]} tasks, expected {tasks} like support_x")
        if isinstance(lr, dict):
            lr = self._checked_meta(model, lr)
        elif not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"lr={lr!r}, expected a finite float or Meta-SGD rates per parameter")
        return tasks, support, lr

    def _chunk(self, spec, support, queries, steps, policy) -> int:
        per_task = workspace_bytes_per_task(spec, support, queries, steps, policy or spec.bn_policy)
        return max(1, self.workspace_bytes // per_task)

    def _run(self, model, support_x, support_y, query_x, steps, lr, track, policy):
        if steps < 0:
            raise ValueError(f"steps={steps}, expected >= 0")
        tasks, support, lr = self._check_inputs(model, support_x, support_y, query_x, lr)
        meta = self._checked_meta(model)
        queries = 0 if query_x is None else query_x.shape[1]
        policy = policy or model.spec.bn_policy
        chunk = self._chunk(model.spec, support, queries, steps, policy)
        pieces = []
        for start in range(0, tasks, chunk):
            sl = slice(start, min(tasks, start + chunk))
            sx, sy = support_x[sl].contiguous(), support_y[sl].contiguous()
            qx = None if query_x is None else query_x[sl].contiguous()
            run = self._replay if self.use_graphs else self._launch
            pieces.append(run(model, meta, lr, sx, sy, qx, steps, track, policy, chunk))
        if len(pieces) == 1:
            return pieces[0]
        params = {k: torch.cat([p[0].params[k] for p in pieces]) for k in pieces[0][0].params}
        cat = lambda xs, dim: None if xs[0] is None else torch.cat(xs, dim)  # noqa: E731
        result = AdaptResult(params, cat([p[0].support_loss for p in pieces], 1),
                             cat([p[0].support_accuracy for p in pieces], 1))
        return result, cat([p[1] for p in pieces], 0)

    def _program(self, model, tasks, support, queries, steps, track, policy):
        return AdaptProgram(model.spec, tasks, support, queries, steps, track, policy, self.precision, self.device)

    def _launch(self, model, meta, lr, sx, sy, qx, steps, track, policy, chunk):
        """No graph: launch every kernel now on the caller's tensors."""
        program = self._program(model, sx.shape[0], sx.shape[1], 0 if qx is None else qx.shape[1], steps, track,
                                policy)
        program.meta, program.lr, program.support_x, program.support_y, program.query_x = meta, lr, sx, sy, qx
        with torch.no_grad():
            program.launch()
        result = AdaptResult(program.fast, program.loss if track else None, program.accuracy if track else None)
        return result, program.logits

    def _replay(self, model, meta, lr, sx, sy, qx, steps, track, policy, chunk):
        n, support = sx.shape[:2]
        queries = 0 if qx is None else qx.shape[1]
        padded = min(task_bucket(n), chunk)
        lr_key = ("sgd", float(lr)) if not isinstance(lr, dict) else ("meta-sgd",) + tuple(
            (k, v.data_ptr()) for k, v in lr.items())
        key = (model.spec, tuple((k, v.data_ptr()) for k, v in meta.items()), lr_key, padded, support, queries,
               steps, track, policy if queries else None, self.precision)
        if key in self._uncapturable:  # its capture failed once: launch eagerly, as without graphs
            return self._launch(model, meta, lr, sx, sy, qx, steps, track, policy, chunk)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                nbytes = padded * workspace_bytes_per_task(model.spec, support, queries, steps, policy)
                # Least recently used programs go first: at most max_graphs, and their workspaces together within
                # twice the per-chunk budget (1024-task mini-ImageNet programs hold tens of GB each).
                while self._graphs and (len(self._graphs) >= self.max_graphs or nbytes + sum(
                        e.nbytes for e in self._graphs.values()) > 2 * self.workspace_bytes):
                    self._graphs.popitem(last=False)
                try:
                    entry = self._capture(model, meta, lr, padded, support, queries, steps, track, policy, nbytes)
                except torch.OutOfMemoryError:
                    raise  # not a capture problem: the caller (server.runner) splits the batch and retries
                except Exception as exc:  # a failed capture must not fail requests: this bucket launches eagerly
                    while len(self._uncapturable) >= 256:  # bounded: lr values are part of the key
                        self._uncapturable.pop(next(iter(self._uncapturable)))
                    self._uncapturable[key] = f"{type(exc).__name__}: {exc}"
                    log.warning("CUDA-graph capture failed, this bucket launches eagerly: %s", self._uncapturable[key])
                else:
                    self._graphs[key] = entry
            if entry is not None:
                self._graphs.move_to_end(key)
                p = entry.program
                p.support_x[:n].copy_(sx)
                p.support_y[:n].copy_(sy)
                if qx is not None:
                    p.query_x[:n].copy_(qx)
                entry.graph.replay()
                blob = p.final_blob.clone()
                fast = {k: v[:n] for k, v in p._views(blob, param_shapes(model.spec)).items()}
                # clone, never .contiguous(): a slice that is already contiguous would alias the graph's buffers
                copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
                loss = copy(p.loss[:, :n]) if track else None
                acc = copy(p.accuracy[:, :n]) if track else None
                logits = copy(p.logits[:n]) if queries else None
        if entry is None:
            return self._launch(model, meta, lr, sx, sy, qx, steps, track, policy, chunk)
        return AdaptResult(fast, loss, acc), logits

    def _capture(self, model, meta, lr, tasks, support, queries, steps, track, policy, nbytes) -> _Captured:
        spec, dev = model.spec, self.device
        program = self._program(model, tasks, support, queries, steps, track, policy)
        program.meta, program.lr = meta, lr  # the model's own tensors: their addresses are part of the key
        program.support_x = torch.zeros(tasks, support, *spec.input_shape, device=dev)
        program.support_y = torch.zeros(tasks, support, dtype=torch.int64, device=dev)
        program.query_x = torch.zeros(tasks, queries, *spec.input_shape, device=dev) if queries else None
        return _Captured(program, self._record(program), nbytes)

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
