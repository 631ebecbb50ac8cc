"""The `graph` engine backend: the reference first-order inner loop (and predict) captured in CUDA graphs.

Launch overhead dominates MAML serving: a 10-step adapt of one Omniglot task is hundreds of small kernels. Capturing
the whole reference loop once per shape bucket and replaying it turns those launches into one. The captured math is the
reference's own (`models.maml.adapt` / `predict` run inside the capture), so results match the `reference` backend.

One bucket per (architecture, T, N*K, Q, steps, lr type, track, BN policy): inputs are copied into the bucket's static
buffers (support/query images, labels, the meta-initialization, the learning rate), the graph is replayed, and the
static outputs are cloned before they are returned (the next replay overwrites them; the server caches fast weights).
The learning rate lives in a device tensor, so a new lr value reuses the bucket; a new lr *type* (one float vs
Meta-SGD per-parameter rates) is another bucket. Warm-up runs on a side stream before capture (cuDNN autotuning and
lazy initialisation must not be captured). Buckets are kept in an LRU of `max_buckets`.

Serving adapts first-order from a meta-initialization that is a constant: no meta-gradient flows out of this backend.
With `capture=False` (the CPU tests) a bucket runs the same function eagerly and copies into the same static output
buffers, so the bucketing and buffer logic is tested without CUDA.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.engine.chunking import check_task_counts, default_budget, run_chunked, task_chunk
from models.checkpoint import MetaModel
from models.maml import AdaptResult
from models.maml import adapt as reference_adapt
from models.maml import predict as reference_predict
from models.spec import ModelSpec

WARMUP_ITERS = 3
log = logging.getLogger(__name__)
DEFAULT_MAX_BUCKETS = 16


@dataclass(frozen=True)
class BucketKey:
    """What a captured graph depends on: shapes, step count, lr type, tracking, BN policy (never values)."""

    op: str  # "adapt", "predict" or "adapt_predict"
    arch: tuple  # (arch, input_shape, ways, hidden): everything that fixes the parameter shapes
    tasks: int
    support: int  # N*K (0 for a predict that does not need the support set)
    queries: int  # Q (0 for adapt)
    steps: int
    lr_type: str  # "scalar", "per-param" or "" (predict)
    track: bool
    bn_policy: str


def arch_key(spec: ModelSpec) -> tuple:
    return (spec.arch, tuple(spec.input_shape), spec.ways, spec.hidden)


def lr_type(lr) -> str:
    if isinstance(lr, dict):
        return "per-param"
    if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
        return "scalar"
    raise TypeError(f"inner lr is {type(lr).__name__}, expected a float or a dict of per-parameter tensors")


def bucket_key(op: str, spec: ModelSpec, tasks: int, support: int, queries: int, steps: int = 0, lr=None,
               track: bool = False, bn_policy: str = "") -> BucketKey:
    return BucketKey(op, arch_key(spec), int(tasks), int(support), int(queries), int(steps),
                     lr_type(lr) if lr is not None else "", bool(track), bn_policy)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


class _Bucket:
    """Static inputs, a captured (or eager) function over them, and its static outputs."""

    def __init__(self, device: torch.device, fn: Callable, inputs: dict[str, torch.Tensor], capture: bool):
        self.device, self.fn, self.inputs, self.capture = device, fn, inputs, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None  # why this bucket runs eagerly although capture was asked for
        self.nbytes = 0  # device memory it holds (set by GraphBackend when it is built)
        self.outputs = None
        self._meta_src: list[torch.Tensor] = []
        self._meta_versions: list[int] = []

    def build(self) -> None:
        if self.capture:
            try:
                self._capture()
                return
            except torch.OutOfMemoryError:
                raise  # not a capture problem: the caller (server.runner) splits the batch and retries
            except Exception as exc:  # the bucket still works, eagerly: a failed capture must not fail requests
                self.capture_error = f"{type(exc).__name__}: {exc}"
                self.graph = None
                log.warning("CUDA-graph capture failed, this bucket runs eagerly: %s", self.capture_error)
        self.outputs = self.fn(self.inputs)

    def _capture(self) -> None:
        # Warm up on a side stream: cuDNN autotuning, lazy inits and allocator growth must not land in the graph.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self.fn(self.inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self.fn(self.inputs)
        self.graph = graph

    def load(self, values: dict[str, torch.Tensor]) -> None:
        _copy_all([self.inputs[n] for n in values], list(values.values()))

    def load_meta(self, values: dict[str, torch.Tensor]) -> None:
        """Copy the meta-initialization in unless it is the very same, unmodified tensors as the last call."""
        tensors = list(values.values())
        versions = [t._version for t in tensors]
        same = len(tensors) == len(self._meta_src) and all(a is b for a, b in zip(tensors, self._meta_src, strict=True))
        if same and versions == self._meta_versions:
            return
        _copy_all([self.inputs[n] for n in values], [t.detach() for t in tensors])
        self._meta_src, self._meta_versions = tensors, versions

    def run(self):
        if self.graph is not None:
            self.graph.replay()
        else:  # eager stand-in for a replay: recompute, then overwrite the static outputs as a replay would
            _copy_all(_flatten(self.outputs), _flatten(self.fn(self.inputs)))
        return self.outputs


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, AdaptResult):
        parts = [*out.params.values(), out.support_loss, out.support_accuracy]
        return [p for p in parts if p is not None]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"unexpected graph output {type(out).__name__}")


def _clone_result(res: AdaptResult, keep_fast: bool = True) -> AdaptResult:
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    params = {k: v.clone() for k, v in res.params.items()} if keep_fast else {}
    return AdaptResult(params, clone(res.support_loss), clone(res.support_accuracy))


class GraphBackend:
    """Reference adapt/predict replayed from CUDA graphs, one per shape bucket (see the module docstring)."""

    name = "graph"

    def __init__(self, device: torch.device | str = "cuda", *, capture: bool | None = None,
                 max_buckets: int = DEFAULT_MAX_BUCKETS, budget_bytes: int | None = None,
                 cache_bytes: int | None = None):
        """budget_bytes: the most one call (task chunk) may use; cache_bytes: what all kept buckets may hold
        together (default twice budget_bytes), least recently used evicted first."""
        self.device = torch.device(device)
        self.budget_bytes = default_budget(self.device) if budget_bytes is None else int(budget_bytes)
        self.cache_bytes = 2 * self.budget_bytes if cache_bytes is None else int(cache_bytes)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"graph capture needs a CUDA device, got {self.device}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets={max_buckets}, expected >= 1")
        self.max_buckets = max_buckets
        self.buckets: OrderedDict[BucketKey, _Bucket] = OrderedDict()
        self.captures = 0  # buckets built so far (tests and the benchmark read it)
        self._lock = threading.Lock()  # static buffers are shared: one call at a time

    def graph_capacity(self) -> int | None:
        """How many captured buckets this backend keeps (None: it captures nothing)."""
        return self.max_buckets if self.capture else None

    def capture_failures(self) -> list[str]:
        """Why the kept buckets that asked for a CUDA graph run eagerly instead."""
        return [b.capture_error for b in self.buckets.values() if b.capture_error]

    # -- buckets -----------------------------------------------------------------------------------------------
    def _run_bucket(self, key: BucketKey, fn: Callable, values: dict[str, torch.Tensor], meta: dict):
        """Find or build the bucket, copy this call's values into its static inputs, replay; returns the outputs."""
        bucket = self.buckets.get(key)
        if bucket is None:
            cuda = self.device.type == "cuda"
            before = torch.cuda.memory_allocated(self.device) if cuda else 0
            statics = {n: torch.empty(v.shape, dtype=v.dtype, device=self.device) for n, v in values.items()}
            statics.update({n: torch.empty(v.shape, dtype=v.dtype, device=self.device) for n, v in meta.items()})
            bucket = _Bucket(self.device, fn, statics, self.capture)
            bucket.load(values)  # warm-up and capture read real values, not uninitialised memory
            bucket.load_meta(meta)
            bucket.build()
            # What the bucket keeps: its static buffers, outputs and (CUDA) the graph's memory pool.
            bucket.nbytes = (torch.cuda.memory_allocated(self.device) - before if cuda else
                             sum(t.numel() * t.element_size() for t in [*statics.values(), *_flatten(bucket.outputs)]))
            self.buckets[key] = bucket
            self.captures += 1
            # Least recently used go first: at most max_buckets, and together within cache_bytes (a 1,024-task
            # bucket alone can hold a quarter of the GPU), never the bucket just built.
            while len(self.buckets) > 1 and (len(self.buckets) > self.max_buckets or sum(
                    b.nbytes for b in self.buckets.values()) > self.cache_bytes):
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        bucket.load(values)
        bucket.load_meta(meta)
        return bucket.run()

    def _check(self, model: MetaModel, name: str, x, dims: tuple, dtype: torch.dtype) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} is {type(x).__name__}, expected a torch.Tensor")
        if x.dim() != len(dims) or any(d is not None and s != d for s, d in zip(x.shape, dims, strict=True)):
            want = ", ".join("*" if d is None else str(d) for d in dims)
            raise ValueError(f"{name} has shape {list(x.shape)}, expected [{want}] for model {model.name}")
        if x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype} for model {model.name}")

    def _check_meta(self, model: MetaModel) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.params.values()):
            raise ValueError(
                f"model {model.name}: its parameters require grad, but the graph backend adapts a constant "
                "meta-initialization (serving: first-order, no meta-gradient); use backend 'reference' to train"
            )

    def _lr_values(self, lr) -> dict[str, torch.Tensor]:
        if isinstance(lr, dict):
            return {f"lr.{k}": v.detach() for k, v in lr.items()}
        # A device scalar: a new lr value reuses the graph. Built on the device (no host-to-device sync per call).
        return {"lr": torch.full((), float(lr), dtype=torch.float32, device=self.device)}

    # -- the backend interface ---------------------------------------------------------------------------------
    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        result, _ = self._adapt_predict(model, support_x, support_y, None, steps, lr, track, None, True)
        return result

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int | None = None, lr=None,
                      track: bool = True, bn_policy: str | None = None, *,
                      keep_fast: bool = True) -> tuple[AdaptResult, torch.Tensor]:
        """Adapt and predict in one replay (the AdaptAndPredict path): (AdaptResult, logits [T, Q, ways]).

        steps / lr default to the model's (as Engine.adapt resolves them); keep_fast=False skips copying the fast
        weights out (AdaptResult.params is then empty), for callers that do not keep the adaptation.
        """
        if query_x is None:
            raise ValueError("adapt_predict needs query_x, got None")
        steps = model.spec.steps if steps is None else steps
        lr = lr if isinstance(lr, dict) else model.inner_lr(lr)
        return self._adapt_predict(model, support_x, support_y, query_x, steps, lr, track, bn_policy, keep_fast)

    def predict(self, model: MetaModel, fast, query_x, support_x=None, bn_policy=None) -> torch.Tensor:
        """Large batches run as task chunks (kernels.engine.chunking), each chunk a bucket of its own."""
        spec = model.spec
        policy = bn_policy or spec.bn_policy
        needs_support = policy == "support" and spec.arch != "mlp-sinusoid"
        if needs_support and support_x is None:
            raise ValueError(f"model {spec.name} uses bn_policy 'support': predict needs the support set")
        tasks = next(iter(fast.values())).shape[0]
        self._check(model, "query_x", query_x, (tasks, None, *spec.input_shape), torch.float32)
        check_task_counts(tasks, "the fast weights", support_x=support_x,
                          **{f"fast[{k!r}]": v for k, v in fast.items()})
        if needs_support:
            self._check(model, "support_x", support_x, (tasks, None, *spec.input_shape), torch.float32)
        else:
            support_x = None  # not read: its statistics are not used
        support = 0 if support_x is None else support_x.shape[1]
        chunk = task_chunk(spec, support, query_x.shape[1], policy, self.budget_bytes)
        return run_chunked(tasks, chunk, lambda s: self._predict_chunk(
            model, {k: v[s] for k, v in fast.items()}, query_x[s], None if support_x is None else support_x[s],
            policy))

    def _predict_chunk(self, model: MetaModel, fast, query_x, support_x, policy: str) -> torch.Tensor:
        """One bucket's predict; inputs checked by predict()."""
        spec = model.spec
        tasks = query_x.shape[0]
        values = {"query_x": query_x}
        if support_x is not None:
            values["support_x"] = support_x
        support = 0 if support_x is None else support_x.shape[1]
        key = bucket_key("predict", spec, tasks, support, query_x.shape[1], bn_policy=policy)
        names = list(fast)
        values.update({f"fast.{k}": v.detach() for k, v in fast.items()})

        def run(inputs):
            with torch.no_grad():
                params = {k: inputs[f"fast.{k}"] for k in names}
                return reference_predict(spec, params, inputs["query_x"], inputs.get("support_x"), policy)

        with self._lock:
            return self._run_bucket(key, run, values, {}).clone()

    def _adapt_predict(self, model, support_x, support_y, query_x, steps, lr, track, bn_policy, keep_fast):
        """Checks the inputs once, then runs task chunks (kernels.engine.chunking), each a bucket of its own."""
        spec = model.spec
        self._check_meta(model)
        if steps < 0:
            raise ValueError(f"steps={steps}, expected >= 0")
        self._check(model, "support_x", support_x, (None, None, *spec.input_shape), torch.float32)
        tasks, support = support_x.shape[:2]
        check_task_counts(tasks, "support_x", support_y=support_y)
        if spec.is_regression:
            self._check(model, "support_y", support_y, (tasks, support, 1), torch.float32)
        else:
            self._check(model, "support_y", support_y, (tasks, support), torch.int64)
        if query_x is not None:
            self._check(model, "query_x", query_x, (tasks, None, *spec.input_shape), torch.float32)
        queries = 0 if query_x is None else query_x.shape[1]
        chunk = task_chunk(spec, support, queries, bn_policy or spec.bn_policy, self.budget_bytes)
        return run_chunked(tasks, chunk, lambda s: self._adapt_predict_chunk(
            model, support_x[s], support_y[s], None if query_x is None else query_x[s], steps, lr, track, bn_policy,
            keep_fast))

    def _adapt_predict_chunk(self, model, support_x, support_y, query_x, steps, lr, track, bn_policy, keep_fast):
        """One bucket's adapt (+ predict); inputs checked by _adapt_predict()."""
        spec = model.spec
        tasks, support = support_x.shape[:2]
        policy = bn_policy or spec.bn_policy
        values = {"support_x": support_x, "support_y": support_y}
        if query_x is not None:
            values["query_x"] = query_x
        values.update(self._lr_values(lr))
        predicting = query_x is not None
        key = bucket_key("adapt_predict" if predicting else "adapt", spec, tasks, support,
                         query_x.shape[1] if predicting else 0, steps, lr, track, policy if predicting else "")
        names = list(model.params)
        lr_names = list(lr) if isinstance(lr, dict) else None

        def run(inputs):
            meta = {k: inputs[f"meta.{k}"] for k in names}
            step_lr = inputs["lr"] if lr_names is None else {k: inputs[f"lr.{k}"] for k in lr_names}
            res = reference_adapt(spec, meta, inputs["support_x"], inputs["support_y"], steps, step_lr, track=track)
            if not predicting:
                return res
            with torch.no_grad():
                return res, reference_predict(spec, res.params, inputs["query_x"], inputs["support_x"], policy)

        meta = {f"meta.{k}": v for k, v in model.params.items()}
        with self._lock:
            out = self._run_bucket(key, run, values, meta)
            if not predicting:
                return _clone_result(out, keep_fast), None
            res, logits = out
            return _clone_result(res, keep_fast), logits.clone()
