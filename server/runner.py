"""What the engine worker thread does with a batch: stack the tasks, call the Engine, split the results per task.

All model math is the Engine's (kernels.engine); this module only converts wire arrays into task-stacked tensors
on the engine's device (uint8 goes over as uint8 and is preprocessed there with models.preprocess) and back.
When every task in an AdaptAndPredict batch has the same number of queries, the Engine's fused `adapt_predict` (one
call; one graph replay on a GPU backend) is used; its time is then all reported as adapt time.

Failure isolation: each task's result is its own. A batch whose engine call raises is cut in halves until the
failing task is alone (out of memory: RESOURCE_EXHAUSTED; anything else: INTERNAL naming the task), so its
batch-mates get their results. A task whose support loss, weights or logits are not finite is refused with
INVALID_ARGUMENT naming inner_lr (or the input) and the step where it diverged; nothing non-finite is returned
or kept. A sticky device error (an illegal address, a device-side assert: the CUDA context is lost) fails the
whole batch and calls `on_fatal`, so the server turns NOT_SERVING and exits for its orchestrator to restart it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.engine import Engine
from models.checkpoint import MetaModel
from models.functional import running_at
from models.onnx_export import export_onnx
from models.preprocess import preprocess_uint8
from models.views import mean_over_views, query_views, support_views
from server.status import Internal, InvalidArgument, ResourceExhausted, Unavailable

# Messages of CUDA errors after which the context is unusable: every later call fails too (retrying is pointless).
STICKY_DEVICE_ERRORS = ("illegal memory access", "illegal address", "device-side assert",
                        "unspecified launch failure", "misaligned address", "an illegal instruction",
                        "uncorrectable ECC", "CUDA error: unknown error")


def is_sticky_device_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in STICKY_DEVICE_ERRORS)


class DeviceLost(Unavailable):
    """The device is in an unrecoverable state; this replica stops serving (retry on another)."""


def first_failure(outcomes: list) -> BaseException | None:
    """The first outcome of a BatchRunner call that is an error (one task's own failure), or None."""
    return next((o for o in outcomes if isinstance(o, BaseException)), None)


def _task_shape(job) -> str:
    if hasattr(job, "describe"):  # policy jobs (server.policy)
        return job.describe()
    if isinstance(job, AdaptJob):
        queries = 0 if job.query_x is None else job.query_x.shape[0]
        return f"{job.support_x.shape[0]} support images, {queries} queries, {job.steps} steps"
    return f"{job.query_x.shape[0]} queries"


@dataclass
class AdaptJob:
    model: MetaModel
    support_x: np.ndarray  # [N*K, *input_shape], uint8 / float16 / float32, validated
    support_y: np.ndarray  # [N*K] int64 in [0, ways); a regressor: float32 targets [N*K, out_dim]
    steps: int
    lr: float | None  # None: the model's default (or learned) rate
    query_x: np.ndarray | None = None  # [Q, *input_shape] for AdaptAndPredict
    keep: bool = True  # return this task's weights (and support statistics) for the cache
    # from_adaptation_id: the weights to start from instead of the meta-initialization (no task axis, on the device),
    # that adaptation's id (tasks of one batch share their start) and the steps it had taken
    start: dict[str, torch.Tensor] | None = None
    start_id: str = ""
    prior_steps: int = 0

    @property
    def key(self) -> Hashable:
        return ("adapt", self.model.name, self.support_x.shape[0], self.steps, self.lr, self.start_id)


@dataclass
class AdaptOutcome:
    params: dict[str, torch.Tensor] | None  # this task's fast weights, no task axis (when keep)
    stats: dict[str, torch.Tensor] | None  # its support statistics [C] per BN layer (when keep and the policy needs)
    support_loss: np.ndarray  # [steps + 1]
    support_accuracy: np.ndarray  # [steps + 1]
    logits: np.ndarray | None  # [Q, ways] when the job had queries
    adapt_s: float
    predict_s: float


@dataclass
class PredictJob:
    model: MetaModel
    params: dict[str, torch.Tensor]  # one task's fast weights, no task axis, on the engine's device
    stats: dict[str, torch.Tensor] | None  # its support statistics (the `support` BN policy), or None
    query_x: np.ndarray  # [Q, *input_shape]

    @property
    def key(self) -> Hashable:
        return ("predict", self.model.name, self.query_x.shape[0])


@dataclass
class PredictOutcome:
    logits: np.ndarray  # [Q, ways]
    predict_s: float


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def finite_per_task(tensors) -> np.ndarray:
    """[T] bool on the host: every element of task t of every tensor [T, ...] (torch, on any device) is finite."""
    flags = [torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) for t in tensors if t is not None]
    return torch.stack(flags).all(dim=0).cpu().numpy()


def finite_rows(array: np.ndarray) -> np.ndarray:
    """[T] bool: task t of a host array [T, ...] (logits already copied back) is finite."""
    return np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)


def _select(tensors: dict | None, index: torch.Tensor) -> dict | None:
    return None if tensors is None else {k: v.index_select(0, index) for k, v in tensors.items()}


def divergence(job: AdaptJob, losses: np.ndarray, weights_finite: bool) -> InvalidArgument | None:
    """The refusal for a task whose adaptation left the finite numbers (None when it did not)."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size == 0 and weights_finite:
        return None
    lr = "the model's default inner_lr" if job.lr is None else f"inner_lr = {job.lr:g}"
    if bad.size and bad[0] == 0:
        return InvalidArgument(
            f"support_x gives a non-finite support loss ({losses[0]}) before the first step of model "
            f"{job.model.name!r}: expected inputs in the model's preprocessed range ({job.model.spec.preprocessing})")
    where = f"the support loss is {losses[bad[0]]} after step {bad[0]}" if bad.size else \
        f"the weights are not finite after step {job.steps}"
    return InvalidArgument(
        f"the adaptation diverged with {lr}: {where} of {job.steps}; expected a smaller inner_lr (or inputs in the "
        f"model's preprocessed range); nothing was kept")


def non_finite_logits(model: MetaModel, field: str = "query_x") -> InvalidArgument:
    return InvalidArgument(f"{field} gives non-finite logits under model {model.name!r}: expected inputs in the "
                           f"model's preprocessed range ({model.spec.preprocessing})")


class BatchRunner:
    """`runner(key, jobs) -> outcomes`: the batcher's run_batch, executed on the engine's worker thread."""

    def __init__(self, engine: Engine, on_fatal=None):
        self.engine = engine
        self.device = engine.device
        self.lost: DeviceLost | None = None  # set once a sticky device error was seen: every later call fails fast
        self.on_fatal = on_fatal or (lambda exc: None)  # called (on the worker thread) with that error
        self._max_rows: dict[str, int | None] = {}

    def __call__(self, key: Hashable, jobs: list) -> list:
        """One outcome per job, in order; an outcome may be an exception, which only that job's caller sees."""
        from server import policy  # here, not at the top: server.policy builds on this module

        if key[0] not in ("adapt", "predict", *policy.OPS):
            raise ValueError(f"batch key {key!r} has an unknown kind, expected 'adapt', 'predict' or one of "
                             f"{policy.OPS}")
        if self.lost is not None:
            return [self.lost] * len(jobs)
        oom, failure = False, None
        try:
            if key[0] in policy.OPS:
                return policy.run_batch(self.device, key, jobs)
            return self.adapt(jobs) if key[0] == "adapt" else self.predict(jobs)
        except torch.OutOfMemoryError as exc:
            oom, failure = True, _first_line(exc)
        except Exception as exc:  # noqa: BLE001  one task's failure must stay its own: isolate it below
            if is_sticky_device_error(exc):
                self.lost = DeviceLost(f"the {self.device.type} device failed and this replica stops serving "
                                       f"({_first_line(exc)}); retry on another replica")
                self.on_fatal(exc)
                return [self.lost] * len(jobs)
            failure = f"{type(exc).__name__}: {_first_line(exc)}"
        # Out of the except block first: its traceback holds the failed attempt's device tensors, which must be
        # freed before a retry. The batch is cut in halves (each task's result is independent of its batch-mates)
        # until the task that fails is alone; it gets its error as its own outcome, its batch-mates their results.
        if self.device.type == "cuda" and oom:
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            half = len(jobs) // 2
            return self(key, jobs[:half]) + self(key, jobs[half:])
        job = jobs[0]
        if oom:
            return [ResourceExhausted(
                f"the {self.device.type} device ran out of memory for one task of model {job.model.name!r} "
                f"({_task_shape(job)}): {failure}; expected a smaller task (fewer support or query images)"
            )]
        return [Internal(f"the engine failed on this task of model {job.model.name!r} ({_task_shape(job)}): "
                         f"{failure}")]

    def max_rows(self, model: MetaModel) -> int | None:
        """Rows per task the engine's kernels take for this model (None: no limit); computed once per model."""
        if model.name not in self._max_rows:
            self._max_rows[model.name] = self.engine.max_rows(model.spec)
        return self._max_rows[model.name]

    def to_model_input(self, model: MetaModel, arrays: list[np.ndarray]) -> torch.Tensor:
        """Validated wire arrays (same shape) -> float32 [T, n, *input_shape] on the device, preprocessed."""
        if len({a.dtype for a in arrays}) == 1:
            return self._preprocess(model, torch.from_numpy(np.stack(arrays)).to(self.device))
        return torch.stack([self._preprocess(model, torch.from_numpy(np.array(a)).to(self.device)) for a in arrays])

    def query_input(self, model: MetaModel, arrays: list[np.ndarray]) -> torch.Tensor:
        """Validated query arrays -> [T, Q * V, *input_shape]: each query and its views (models.views; V = 1 without
        query views), whose logits `mean_over_views` folds back to one row per query."""
        return query_views(model.spec.query_views, self.to_model_input(model, arrays))

    @staticmethod
    def query_logits(model: MetaModel, out: torch.Tensor) -> np.ndarray:
        """The engine's logits of `query_input` rows -> float32 [T, Q, ways] on the host, one row per query."""
        return mean_over_views(out.float(), model.spec.query_view_count).cpu().numpy()

    @staticmethod
    def _preprocess(model: MetaModel, x: torch.Tensor) -> torch.Tensor:
        return preprocess_uint8(model.spec, x) if x.dtype == torch.uint8 else x.float()

    def adapt(self, jobs: list[AdaptJob]) -> list:
        """Adapt every job's task in one engine call; predict the queries of the jobs that have them."""
        model, first = jobs[0].model, jobs[0]
        if first.start is not None:  # from_adaptation_id: the batch's tasks share their start (the batch key says so)
            model = dataclasses.replace(model, params=first.start)
        support_x = self.to_model_input(model, [j.support_x for j in jobs])
        support_y = torch.from_numpy(np.stack([j.support_y for j in jobs])).to(self.device)
        # the model's support views (models.views): every backend adapts on the extended set
        support_x, support_y = support_views(model.spec.support_views, support_x, support_y)
        query_counts = {None if j.query_x is None else j.query_x.shape[0] for j in jobs}
        logits: dict[int, np.ndarray] = {}
        predict_s: dict[int, float] = {}

        start = time.perf_counter()
        if len(query_counts) == 1 and None not in query_counts:
            # Every task has Q queries: one fused engine call (one graph replay on a GPU backend).
            query_x = self.query_input(model, [j.query_x for j in jobs])
            result, out = self.engine.adapt_predict(model, support_x, support_y, query_x, steps=first.steps,
                                                    lr=first.lr, track=True)
            out = self.query_logits(model, out)
            logits_ok = finite_rows(out)
            logits = {i: out[i] for i in range(len(jobs))}
        else:
            result = self.engine.adapt(model, support_x, support_y, steps=first.steps, lr=first.lr, track=True)
            logits_ok = None
        losses = result.support_loss.float().cpu().numpy()  # [steps + 1, T]; waits for the device
        accs = result.support_accuracy
        accs = np.zeros((0, losses.shape[1]), np.float32) if accs is None else accs.float().cpu().numpy()
        stats = result.stats
        weights_ok = finite_per_task([*result.params.values(), *(stats or {}).values()])
        adapt_s = time.perf_counter() - start
        refused = {i: divergence(job, losses[:, i], bool(weights_ok[i])) for i, job in enumerate(jobs)}
        refused = {i: why for i, why in refused.items() if why is not None}
        # Copy what the cache keeps before anything else runs: a graph-captured backend may reuse its output buffers.
        kept: list[tuple[dict | None, dict | None]] = []
        for i, job in enumerate(jobs):
            if not job.keep or i in refused:
                kept.append((None, None))
                continue
            params = {k: v[i].detach().clone() for k, v in result.params.items()}
            kept.append((params, None if stats is None else {k: v[i].detach().clone() for k, v in stats.items()}))

        if not logits:
            logits_ok = self._predict_after_adapt(model, jobs, result.params, stats, logits, predict_s)
        outcomes = []
        for i in range(len(jobs)):
            if i in refused:
                outcomes.append(refused[i])
            elif logits_ok is not None and i in logits and not logits_ok[i]:
                outcomes.append(non_finite_logits(model))
            else:
                outcomes.append(AdaptOutcome(
                    params=kept[i][0], stats=kept[i][1], support_loss=losses[:, i].copy(),
                    support_accuracy=accs[:, i].copy(), logits=logits.get(i), adapt_s=adapt_s,
                    predict_s=predict_s.get(i, 0.0)))
        return outcomes

    def _predict_after_adapt(self, model, jobs, fast_all, stats_all, logits: dict, predict_s: dict) -> np.ndarray:
        """Predict the jobs with queries, one engine call per query count Q; returns [T] bool: logits finite."""
        finite = np.ones(len(jobs), dtype=bool)
        by_queries = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.query_x is not None:
                by_queries[job.query_x.shape[0]].append(i)
        groups = []  # (rows, fast weights, statistics) per Q; subsets are copied before any predict runs
        for rows in by_queries.values():
            if len(rows) == len(jobs):
                groups.append((rows, fast_all, stats_all))
            else:
                index = torch.tensor(rows, device=self.device)
                groups.append((rows, _select(fast_all, index), _select(stats_all, index)))
        for rows, fast, stats in groups:
            query_x = self.query_input(model, [jobs[i].query_x for i in rows])
            start = time.perf_counter()
            out = self.engine.predict(model, fast, query_x, stats)
            out = self.query_logits(model, out)
            ok = finite_rows(out)
            seconds = time.perf_counter() - start
            for j, i in enumerate(rows):
                logits[i], predict_s[i], finite[i] = out[j], seconds, ok[j]
        return finite

    def predict(self, jobs: list[PredictJob]) -> list:
        model = jobs[0].model
        fast = {k: torch.stack([j.params[k] for j in jobs]) for k in jobs[0].params}
        stats = None
        if jobs[0].stats is not None:
            stats = {k: torch.stack([j.stats[k] for j in jobs]) for k in jobs[0].stats}
        query_x = self.query_input(model, [j.query_x for j in jobs])
        start = time.perf_counter()
        out = self.engine.predict(model, fast, query_x, stats)
        out = self.query_logits(model, out)
        ok = finite_rows(out)
        seconds = time.perf_counter() - start
        return [PredictOutcome(out[i], seconds) if ok[i] else non_finite_logits(model) for i in range(len(jobs))]

    def export(self, model: MetaModel, params, stats, metadata: dict[str, str]) -> bytes:
        """One adaptation as a serialized ONNX model (runs on the worker thread: it reads device tensors). A
        `running`-policy model's statistics are its checkpoint's, the final step's entry, not the adaptation's."""
        if model.spec.uses_running_stats():
            stats = running_at(model.bn_running, model.running_steps - 1, 1)
        proto = export_onnx(model.spec, params, stats=stats, metadata=metadata)
        return proto.SerializeToString()
