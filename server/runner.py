"""What the engine worker thread does with a batch: stack the tasks, call the Engine, split the results per task.

All model math is the Engine's (kernels.engine); this module only converts wire arrays into task-stacked tensors
on the engine's device (uint8 goes over as uint8 and is preprocessed there with models.preprocess) and back.
When the Engine offers a fused `adapt_predict` (adapt + predict in one call) and every task in an AdaptAndPredict
batch has the same number of queries, that one call is used; its time is then all reported as adapt time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.engine import Engine
from models.checkpoint import MetaModel
from models.onnx_export import export_onnx
from models.preprocess import preprocess_uint8
from server.status import ResourceExhausted


def needs_support_stats(model: MetaModel) -> bool:
    """Whether predict needs the support set: the 'support' BN policy on an architecture with batch norm."""
    return model.spec.bn_policy == "support" and model.spec.arch != "mlp-sinusoid"


def first_failure(outcomes: list) -> BaseException | None:
    """The first outcome of a BatchRunner call that is an error (one task's own failure), or None."""
    return next((o for o in outcomes if isinstance(o, BaseException)), None)


def _task_shape(job) -> str:
    if isinstance(job, AdaptJob):
        queries = 0 if job.query_x is None else job.query_x.shape[0]
        return f"{job.support_x.shape[0]} support images, {queries} queries, {job.steps} steps"
    return f"{job.query_x.shape[0]} queries"


@dataclass
class AdaptJob:
    model: MetaModel
    support_x: np.ndarray  # [N*K, *input_shape], uint8 / float16 / float32, validated
    support_y: np.ndarray  # [N*K] int64 in [0, ways)
    steps: int
    lr: float | None  # None: the model's default (or learned) rate
    query_x: np.ndarray | None = None  # [Q, *input_shape] for AdaptAndPredict
    keep: bool = True  # return this task's weights (and support set) for the cache

    @property
    def key(self) -> Hashable:
        return ("adapt", self.model.name, self.support_x.shape[0], self.steps, self.lr)


@dataclass
class AdaptOutcome:
    params: dict[str, torch.Tensor] | None  # this task's fast weights, no task axis (when keep)
    support_x: torch.Tensor | None  # preprocessed support set (when keep and the BN policy needs it)
    support_loss: np.ndarray  # [steps + 1]
    support_accuracy: np.ndarray  # [steps + 1]
    logits: np.ndarray | None  # [Q, ways] when the job had queries
    adapt_s: float
    predict_s: float


@dataclass
class PredictJob:
    model: MetaModel
    params: dict[str, torch.Tensor]  # one task's fast weights, no task axis, on the engine's device
    support_x: torch.Tensor | None
    query_x: np.ndarray  # [Q, *input_shape]

    @property
    def key(self) -> Hashable:
        n = 0 if self.support_x is None else self.support_x.shape[0]
        return ("predict", self.model.name, n, self.query_x.shape[0])


@dataclass
class PredictOutcome:
    logits: np.ndarray  # [Q, ways]
    predict_s: float


class BatchRunner:
    """`runner(key, jobs) -> outcomes`: the batcher's run_batch, executed on the engine's worker thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.device = engine.device

    def __call__(self, key: Hashable, jobs: list) -> list:
        """One outcome per job, in order; an outcome may be an exception, which only that job's caller sees."""
        if key[0] not in ("adapt", "predict"):
            raise ValueError(f"batch key {key!r} has an unknown kind, expected 'adapt' or 'predict'")
        detail = None
        try:
            return self.adapt(jobs) if key[0] == "adapt" else self.predict(jobs)
        except torch.OutOfMemoryError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Out of the except block first: its traceback holds the failed attempt's device tensors, which must be
        # freed before a retry. A batch the device cannot hold is cut in halves (each task's result is independent
        # of its batch-mates); one task that does not fit gets RESOURCE_EXHAUSTED as its own outcome, so its
        # batch-mates still get theirs.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            half = len(jobs) // 2
            return self(key, jobs[:half]) + self(key, jobs[half:])
        job = jobs[0]
        return [ResourceExhausted(
            f"the {self.device.type} device ran out of memory for one task of model {job.model.name!r} "
            f"({_task_shape(job)}): {detail}; expected a smaller task (fewer support or query images)"
        )]

    def to_model_input(self, model: MetaModel, arrays: list[np.ndarray]) -> torch.Tensor:
        """Validated wire arrays (same shape) -> float32 [T, n, *input_shape] on the device, preprocessed."""
        if len({a.dtype for a in arrays}) == 1:
            return self._preprocess(model, torch.from_numpy(np.stack(arrays)).to(self.device))
        return torch.stack([self._preprocess(model, torch.from_numpy(np.array(a)).to(self.device)) for a in arrays])

    @staticmethod
    def _preprocess(model: MetaModel, x: torch.Tensor) -> torch.Tensor:
        return preprocess_uint8(model.spec, x) if x.dtype == torch.uint8 else x.float()

    def adapt(self, jobs: list[AdaptJob]) -> list[AdaptOutcome]:
        """Adapt every job's task in one engine call; predict the queries of the jobs that have them."""
        model, first = jobs[0].model, jobs[0]
        support_x = self.to_model_input(model, [j.support_x for j in jobs])
        support_y = torch.from_numpy(np.stack([j.support_y for j in jobs])).to(self.device)
        query_counts = {None if j.query_x is None else j.query_x.shape[0] for j in jobs}
        fused = getattr(self.engine, "adapt_predict", None)
        logits: dict[int, np.ndarray] = {}
        predict_s: dict[int, float] = {}

        start = time.perf_counter()
        if fused is not None and len(query_counts) == 1 and None not in query_counts:
            # Every task has Q queries: one fused engine call (one graph replay on a GPU backend).
            query_x = self.to_model_input(model, [j.query_x for j in jobs])
            result, out = fused(model, support_x, support_y, query_x, steps=first.steps, lr=first.lr, track=True)
            out = out.float().cpu().numpy()
            logits = {i: out[i] for i in range(len(jobs))}
        else:
            result = self.engine.adapt(model, support_x, support_y, steps=first.steps, lr=first.lr, track=True)
        losses = result.support_loss.float().cpu().numpy()  # [steps + 1, T]; waits for the device
        accs = result.support_accuracy
        accs = np.zeros_like(losses) if accs is None else accs.float().cpu().numpy()
        adapt_s = time.perf_counter() - start
        # Copy what the cache keeps before anything else runs: a graph-captured backend may reuse its output buffers.
        use_support = needs_support_stats(model)
        kept: list[tuple[dict | None, torch.Tensor | None]] = []
        for i, job in enumerate(jobs):
            if not job.keep:
                kept.append((None, None))
                continue
            params = {k: v[i].detach().clone() for k, v in result.params.items()}
            kept.append((params, support_x[i].clone() if use_support else None))

        if not logits:
            self._predict_after_adapt(model, jobs, result.params, support_x if use_support else None, logits,
                                      predict_s)
        return [
            AdaptOutcome(
                params=kept[i][0],
                support_x=kept[i][1],
                support_loss=losses[:, i].copy(),
                support_accuracy=accs[:, i].copy(),
                logits=logits.get(i),
                adapt_s=adapt_s,
                predict_s=predict_s.get(i, 0.0),
            )
            for i in range(len(jobs))
        ]

    def _predict_after_adapt(self, model, jobs, fast_all, support_all, logits: dict, predict_s: dict) -> None:
        """Predict the jobs with queries, one engine call per query count Q."""
        by_queries = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.query_x is not None:
                by_queries[job.query_x.shape[0]].append(i)
        groups = []  # (rows, fast weights, support set) per Q; subsets are copied before any predict runs
        for rows in by_queries.values():
            if len(rows) == len(jobs):
                groups.append((rows, fast_all, support_all))
            else:
                index = torch.tensor(rows, device=self.device)
                fast = {k: v.index_select(0, index) for k, v in fast_all.items()}
                groups.append((rows, fast, None if support_all is None else support_all.index_select(0, index)))
        for rows, fast, support in groups:
            query_x = self.to_model_input(model, [jobs[i].query_x for i in rows])
            start = time.perf_counter()
            out = self.engine.predict(model, fast, query_x, support).float().cpu().numpy()
            seconds = time.perf_counter() - start
            for j, i in enumerate(rows):
                logits[i], predict_s[i] = out[j], seconds

    def predict(self, jobs: list[PredictJob]) -> list[PredictOutcome]:
        model = jobs[0].model
        fast = {k: torch.stack([j.params[k] for j in jobs]) for k in jobs[0].params}
        support = None
        if jobs[0].support_x is not None:
            support = torch.stack([j.support_x for j in jobs])
        query_x = self.to_model_input(model, [j.query_x for j in jobs])
        start = time.perf_counter()
        out = self.engine.predict(model, fast, query_x, support).float().cpu().numpy()
        seconds = time.perf_counter() - start
        return [PredictOutcome(out[i], seconds) for i in range(len(jobs))]

    def export(self, model: MetaModel, params, support_x, metadata: dict[str, str]) -> bytes:
        """One adaptation as a serialized ONNX model (runs on the worker thread: it reads device tensors)."""
        proto = export_onnx(model.spec, params, support_x=support_x, metadata=metadata)
        return proto.SerializeToString()
