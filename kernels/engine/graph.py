"""The `graph` engine backend: the reference first-order inner loop (and predict) captured in CUDA graphs.

Launch overhead dominates MAML serving: a 10-step adapt of one Omniglot task is hundreds of small kernels. Capturing
the whole reference loop once per shape bucket and replaying it turns those launches into one. The captured math is the
reference's own (`models.maml.adapt` / `predict` run inside the capture), so results match the `reference` backend.

One bucket per (op, architecture, task count and, where query rows are independent, query count rounded up to the
task_bucket series, N*K, steps, lr type, track, BN policy): inputs are copied into the bucket's static buffers
(support/query images, labels, fast weights, support statistics, the meta-initialization, the learning rate; padding
tasks and rows hold zeros or earlier data, finite either way, and their results are dropped), the graph is replayed,
and the static outputs are sliced and cloned before they are returned (the next replay overwrites them; the server
caches fast weights). The learning rate lives in a device tensor, so a new lr value reuses the bucket; a new lr
*type* (one float vs Meta-SGD per-parameter rates) is another bucket. Warm-up runs on a side stream before capture
(cuDNN autotuning and lazy initialisation must not be captured). Which keys get a bucket and which are kept is
kernels.engine.graph_cache's policy: a key's first call runs eagerly on the caller's tensors, it is captured when it
recurs (at once inside `warming()`), buckets are kept least recently used with warmed ones pinned.

Serving adapts first-order from a meta-initialization that is a constant: no meta-gradient flows out of this backend.
Recipes are captured too: ANIL's and MAML++'s adapted subsets (part of the key) and LSLR's per-step rates (static
inputs copied in like the meta-initialization, their shapes part of the key), through models.maml.adapt's own
recipe options. Recipe options the backend does not know (kernels.engine.reference.needs_reference) run on the
reference backend.
With `capture=False` (the CPU tests) a bucket runs the same function eagerly and copies into the same static output
buffers, so the bucketing, padding and buffer logic is tested without CUDA.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.engine.chunking import default_budget, max_rows, run_chunked, task_chunk
from kernels.engine.graph_cache import GraphCache, query_bucket, task_bucket
from kernels.engine.reference import ReferenceBackend, needs_reference, recipe_options
from kernels.engine.validation import check_adapt, check_predict
from models.checkpoint import MetaModel
from models.maml import AdaptResult, adaptation_stats
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
    arch: tuple  # (arch, input_shape, ways, hidden, bn_policy): what fixes the parameter shapes and the stats
    tasks: int  # task bucket
    support: int  # N*K (0 for predict)
    queries: int  # Q, bucketed where query rows are independent (0 for adapt)
    steps: int
    lr_type: str  # "scalar", "per-param" or "" (predict)
    track: bool
    bn_policy: str
    recipe: tuple = ()  # (adapt_params, ((name, steps), ...) of LSLR's rates[, head_init]): what the loop adapts


def arch_key(spec: ModelSpec) -> tuple:
    # the model's own policy decides whether an adaptation carries support statistics (an output of the graph)
    return (spec.arch, tuple(spec.input_shape), spec.ways, spec.hidden, spec.bn_policy)


def lr_type(lr) -> str:
    if isinstance(lr, dict):
        return "per-param"
    if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
        return "scalar"
    raise TypeError(f"inner lr is {type(lr).__name__}, expected a float or a dict of per-parameter tensors")


def bucket_key(op: str, spec: ModelSpec, tasks: int, support: int, queries: int, steps: int = 0, lr=None,
               track: bool = False, bn_policy: str = "", step_lrs: dict | None = None) -> BucketKey:
    recipe = ()
    if op != "predict" and (spec.adapt_params != "all" or step_lrs is not None):
        recipe = (spec.adapt_params, tuple((k, int(v.shape[0])) for k, v in (step_lrs or {}).items()))
        if spec.head_init != "meta":  # Proto-MAML: the captured loop starts the head at the support prototypes
            recipe += (spec.head_init,)
    return BucketKey(op, arch_key(spec), int(tasks), int(support), int(queries), int(steps),
                     lr_type(lr) if lr is not None else "", bool(track), bn_policy, recipe)



def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _region(static: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The leading corner of a (padded) static buffer that a value of this call fills."""
    return static[tuple(slice(0, s) for s in value.shape)] if static.shape != value.shape else static


class _Bucket:
    """Static inputs, a captured (or eager) function over them, and its static outputs."""

    def __init__(self, device: torch.device, fn: Callable, inputs: dict[str, torch.Tensor], capture: bool):
        self.device, self.fn, self.inputs, self.capture = device, fn, inputs, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.nbytes = 0  # device memory it holds (set by GraphBackend when it is built)
        self.outputs = None
        self._meta_src: list[torch.Tensor] = []
        self._meta_versions: list[int] = []

    def build(self) -> None:
        """Capture (CUDA) or run once eagerly (capture=False); a capture failure propagates to the backend."""
        if self.capture:
            self._capture()
        else:
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
        _copy_all([_region(self.inputs[n], v) for n, v in values.items()], list(values.values()))

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
        parts = [*out.params.values(), out.support_loss, out.support_accuracy, *(out.stats or {}).values()]
        return [p for p in parts if p is not None]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"unexpected graph output {type(out).__name__}")


def _clone_result(res: AdaptResult, tasks: int, keep_fast: bool = True) -> AdaptResult:
    """The first `tasks` tasks of a bucket's static outputs, as tensors of their own."""
    clone = lambda t: None if t is None else t[:, :tasks].clone()  # noqa: E731  [steps + 1, T]
    params = {k: v[:tasks].clone() for k, v in res.params.items()} if keep_fast else {}
    stats = None if res.stats is None else {k: v[:tasks].clone() for k, v in res.stats.items()}
    return AdaptResult(params, clone(res.support_loss), clone(res.support_accuracy), stats=stats)


class GraphBackend:
    """Reference adapt/predict replayed from CUDA graphs, one per shape bucket (see the module docstring)."""

    name = "graph"
    precision = None

    def __init__(self, device: torch.device | str = "cuda", *, capture: bool | None = None,
                 max_buckets: int = DEFAULT_MAX_BUCKETS, budget_bytes: int | None = None,
                 cache_bytes: int | None = None, capture_after: int = 2):
        """budget_bytes: the most one call (task chunk) may use; cache_bytes: what all kept buckets may hold
        together (default twice budget_bytes), least recently used evicted first; capture_after: the sighting of a
        key that builds its bucket."""
        self.device = torch.device(device)
        self.budget_bytes = default_budget(self.device) if budget_bytes is None else int(budget_bytes)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"graph capture needs a CUDA device, got {self.device}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets={max_buckets}, expected >= 1")
        self.max_buckets = max_buckets
        cache_bytes = 2 * self.budget_bytes if cache_bytes is None else int(cache_bytes)
        self.graphs: GraphCache[_Bucket] = GraphCache(max_buckets, cache_bytes, capture_after)
        self._reference = ReferenceBackend(self.device, self.budget_bytes)  # recipes it does not capture
        self._lock = threading.Lock()  # static buffers are shared: one call at a time

    @property
    def buckets(self) -> dict[BucketKey, _Bucket]:
        """The kept buckets, least recently used first."""
        return dict(self.graphs.items())

    @property
    def captures(self) -> int:
        """Buckets built so far (tests and the benchmark read it)."""
        return self.graphs.captures

    @property
    def cache_bytes(self) -> int:
        return self.graphs.max_bytes

    def graph_capacity(self) -> int | None:
        """How many captured buckets this backend keeps (None: it captures nothing)."""
        return self.max_buckets if self.capture else None

    def capture_failures(self) -> list[str]:
        """Why the keys whose CUDA-graph capture failed run eagerly instead."""
        return self.graphs.failures()

    def max_rows(self, spec: ModelSpec) -> int | None:
        return max_rows(spec, self.device)

    def warming(self):
        return self.graphs.warming()

    # -- buckets -----------------------------------------------------------------------------------------------
    def _run_bucket(self, key: BucketKey, fn: Callable, values: dict[str, torch.Tensor], meta: dict,
                    padded: dict[str, tuple]):
        """Run fn over this call's values: eagerly on them (a cold key: returns (outputs, False)), or through the
        key's bucket (returns (its static outputs, True): padded, overwritten by the next replay).
        padded: the static shape of each value that is padded (tasks, query rows)."""
        bucket = self.graphs.get(key)
        if bucket is None:
            if not self.graphs.should_capture(key) or not self.graphs.make_room():
                return fn({**values, **meta}), False
            bucket = self._build(key, fn, values, meta, padded)
            if bucket is None:
                return fn({**values, **meta}), False
        bucket.load(values)
        bucket.load_meta(meta)
        return bucket.run(), True

    def _build(self, key, fn, values, meta, padded) -> _Bucket | None:
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        # zeros: padding tasks and rows must hold finite data and valid labels from the first replay on
        statics = {n: torch.zeros(padded.get(n, v.shape), dtype=v.dtype, device=self.device)
                   for n, v in values.items()}
        statics.update({n: torch.empty(v.shape, dtype=v.dtype, device=self.device) for n, v in meta.items()})
        bucket = _Bucket(self.device, fn, statics, self.capture)
        bucket.load(values)  # warm-up and capture read real values, not uninitialised memory
        bucket.load_meta(meta)
        try:
            bucket.build()
        except torch.OutOfMemoryError:
            raise  # not a capture problem: the caller (server.runner) splits the batch and retries
        except Exception as exc:  # the key still works, eagerly: a failed capture must not fail requests
            why = f"{type(exc).__name__}: {exc}"
            self.graphs.fail(key, why)
            log.warning("CUDA-graph capture failed, this key runs eagerly: %s", why)
            return None
        # What the bucket keeps: its static buffers, outputs and (CUDA) the graph's memory pool.
        bucket.nbytes = (torch.cuda.memory_allocated(self.device) - before if cuda else
                         sum(t.numel() * t.element_size() for t in [*statics.values(), *_flatten(bucket.outputs)]))
        self.graphs.insert(key, bucket, bucket.nbytes)  # not kept (room pinned): serves this call only
        return bucket

    def _check_meta(self, model: MetaModel) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.params.values()):
            raise ValueError(
                f"model {model.name}: its parameters require grad, but the graph backend adapts a constant "
                "meta-initialization (serving: first-order, no meta-gradient); use backend 'reference' to train"
            )

    def _lr_values(self, lr) -> dict[str, torch.Tensor]:
        if isinstance(lr, dict):
            return {f"lr.{k}": v.detach() for k, v in lr.items()}
        if isinstance(lr, torch.Tensor):
            return {"lr": lr.detach().reshape(()).to(device=self.device, dtype=torch.float32)}
        # A device scalar: a new lr value reuses the graph. Built on the device (no host-to-device sync per call).
        return {"lr": torch.full((), float(lr), dtype=torch.float32, device=self.device)}

    # -- the backend interface ---------------------------------------------------------------------------------
    def adapt(self, model: MetaModel, support_x, support_y, steps: int, lr, track: bool) -> AdaptResult:
        if needs_reference(model):
            return self._reference.adapt(model, support_x, support_y, steps, lr, track)
        result, _ = self._adapt_predict(model, support_x, support_y, None, steps, lr, track, None, True)
        return result

    def adapt_predict(self, model: MetaModel, support_x, support_y, query_x, steps: int, lr, track: bool = True,
                      bn_policy: str | None = None, *, keep_fast: bool = True) -> tuple[AdaptResult, torch.Tensor]:
        """Adapt and predict in one replay (the AdaptAndPredict path): (AdaptResult, logits [T, Q, ways]).

        keep_fast=False skips copying the fast weights out (AdaptResult.params is then empty), for callers that do
        not keep the adaptation.
        """
        if needs_reference(model):
            return self._reference.adapt_predict(model, support_x, support_y, query_x, steps, lr, track, bn_policy)
        if query_x is None:
            raise ValueError("adapt_predict needs query_x, got None")
        return self._adapt_predict(model, support_x, support_y, query_x, steps, lr, track, bn_policy, keep_fast)

    def predict(self, model: MetaModel, fast, query_x, stats=None, bn_policy=None) -> torch.Tensor:
        """Large batches run as task chunks (kernels.engine.chunking), each chunk a bucket of its own."""
        if needs_reference(model):  # e.g. the `running` BN policy's per-step statistics
            return self._reference.predict(model, fast, query_x, stats, bn_policy)
        spec = model.spec
        policy = bn_policy or spec.bn_policy
        tasks, stats = check_predict(model, fast, query_x, stats, bn_policy, self.device)
        queries = query_bucket(spec, query_x.shape[1], policy)
        chunk = task_chunk(spec, 0, queries, self.budget_bytes)
        return run_chunked(tasks, chunk, lambda s: self._predict_chunk(
            model, {k: v[s] for k, v in fast.items()}, query_x[s],
            None if stats is None else {k: v[s] for k, v in stats.items()}, policy, chunk))

    def _predict_chunk(self, model: MetaModel, fast, query_x, stats, policy: str, chunk: int) -> torch.Tensor:
        """One bucket's predict; inputs checked by predict()."""
        spec = model.spec
        tasks, queries = query_x.shape[:2]
        padded_t, padded_q = min(task_bucket(tasks), chunk), query_bucket(spec, queries, policy)
        key = bucket_key("predict", spec, padded_t, 0, padded_q, bn_policy=policy)
        names, stat_names = list(fast), list(stats or {})
        values = {"query_x": query_x, **{f"fast.{k}": v.detach() for k, v in fast.items()},
                  **{f"stats.{k}": v for k, v in (stats or {}).items()}}
        padded = {n: (padded_t, *v.shape[1:]) for n, v in values.items()}
        padded["query_x"] = (padded_t, padded_q, *query_x.shape[2:])

        def run(inputs):
            with torch.no_grad():
                params = {k: inputs[f"fast.{k}"] for k in names}
                given = {k: inputs[f"stats.{k}"] for k in stat_names} if stat_names else None
                return reference_predict(spec, params, inputs["query_x"], bn_policy=policy, stats=given)

        with self._lock:
            out, static = self._run_bucket(key, run, values, {}, padded)
            return out[:tasks, :queries].clone() if static else out

    def _adapt_predict(self, model, support_x, support_y, query_x, steps, lr, track, bn_policy, keep_fast):
        """Checks the inputs once, then runs task chunks (kernels.engine.chunking), each a bucket of its own."""
        spec = model.spec
        self._check_meta(model)
        tasks, support, lr = check_adapt(model, support_x, support_y, steps, lr, query_x, self.device,
                                         check_range=self.device.type == "cpu")
        policy = bn_policy or spec.bn_policy
        queries = 0 if query_x is None else query_bucket(spec, query_x.shape[1], policy)
        chunk = task_chunk(spec, support, queries, self.budget_bytes)
        return run_chunked(tasks, chunk, lambda s: self._adapt_predict_chunk(
            model, support_x[s], support_y[s], None if query_x is None else query_x[s], steps, lr, track, policy,
            keep_fast, chunk))

    def _adapt_predict_chunk(self, model, support_x, support_y, query_x, steps, lr, track, policy, keep_fast,
                             chunk):
        """One bucket's adapt (+ predict); inputs checked by _adapt_predict()."""
        spec = model.spec
        tasks, support = support_x.shape[:2]
        predicting = query_x is not None
        queries = query_x.shape[1] if predicting else 0
        padded_t, padded_q = min(task_bucket(tasks), chunk), query_bucket(spec, queries, policy)
        values = {"support_x": support_x, "support_y": support_y}
        padded = {"support_x": (padded_t, *support_x.shape[1:]), "support_y": (padded_t, *support_y.shape[1:])}
        if predicting:
            values["query_x"] = query_x
            padded["query_x"] = (padded_t, padded_q, *query_x.shape[2:])
        values.update(self._lr_values(lr))
        options = recipe_options(model)
        step_lrs = options.pop("step_lrs", None)
        key = bucket_key("adapt_predict" if predicting else "adapt", spec, padded_t, support, padded_q, steps, lr,
                         track, policy if predicting else "", step_lrs)
        names = list(model.params)
        lr_names = list(lr) if isinstance(lr, dict) else None
        rate_names = list(step_lrs or {})

        def run(inputs):
            meta = {k: inputs[f"meta.{k}"] for k in names}
            step_lr = inputs["lr"] if lr_names is None else {k: inputs[f"lr.{k}"] for k in lr_names}
            rates = {k: inputs[f"step_lrs.{k}"] for k in rate_names} if rate_names else None
            res = reference_adapt(spec, meta, inputs["support_x"], inputs["support_y"], steps, step_lr, track=track,
                                  **options, **({"step_lrs": rates} if rates else {}))
            res.stats = adaptation_stats(spec, res.params, inputs["support_x"])  # the model's own policy
            if not predicting:
                return res
            given = res.stats
            if spec.predict_needs_support_stats(policy) != (given is not None):  # a policy other than its own
                given = adaptation_stats(spec, res.params, inputs["support_x"], policy)
            with torch.no_grad():
                return res, reference_predict(spec, res.params, inputs["query_x"], bn_policy=policy, stats=given)

        meta = {f"meta.{k}": v for k, v in model.params.items()}
        meta.update({f"step_lrs.{k}": v for k, v in (step_lrs or {}).items()})  # a checkpoint's constants, as meta
        with self._lock:
            out, static = self._run_bucket(key, run, values, meta, padded)
            res, logits = (out, None) if not predicting else out
            if not static:  # a cold key ran on the caller's tensors: its outputs are already its own
                return (res if keep_fast else AdaptResult({}, res.support_loss, res.support_accuracy,
                                                          stats=res.stats)), logits
            return _clone_result(res, tasks, keep_fast), None if logits is None else logits[:tasks, :queries].clone()
