"""Start-up warm-up: run every model once per expected batch size before the server takes requests.

On a GPU backend the first call of each shape bucket compiles kernels and captures a CUDA graph (seconds); a
server that skips this pays it inside its first requests (the 64-client load test on an H200 spent its whole window
in it). The warm-up runs one AdaptAndPredict batch of blank uint8 images per (model, task count) through the same
BatchRunner the batcher uses, on the engine's worker thread, before the port opens, so the first client sees
steady-state latency. Shapes: N ways x `shots` support images, N x `queries` query images, `steps` inner steps (0:
the model's default) at the model's default learning rate; `models` limits it to some models (default: all). The
buckets a client with other shapes uses are built on first use, as before.

`tasks`: "auto" (the Triton backend on CUDA: every task bucket 1, 2, 3, 4, 6, 8, ... up to min(max_batch, 64), which
covers every batch size up to there since batches are padded to the next bucket; other backends: T=1 only, to pay
the first-call costs: the `graph` backend captures per exact task count, so list the counts to warm), "none", or a
comma-separated list of task counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.kinds import model_kind
from server.batcher import DynamicBatcher
from server.registry import ModelRegistry
from server.runner import AdaptJob, BatchRunner, first_failure
from server.telemetry import get_logger

AUTO_MAX_TASKS = 64


class WarmupError(RuntimeError):
    """The warm-up could not run a planned batch: the server does not start (exit status 2, the reason logged)."""


@dataclass(frozen=True)
class WarmupPlan:
    tasks: tuple[int, ...]  # task counts per model, ascending
    shots: int = 1  # support images per class
    queries: int = 15  # query images per class
    steps: int = 0  # 0: each model's default
    models: tuple[str, ...] = ()  # empty: every served model


def bucket_sizes(limit: int) -> list[int]:
    """The task-count buckets of the Triton backend (1, 2, 3, 4, 6, 8, 12, 16, ...) up to limit."""
    from kernels.engine.fused import task_bucket

    sizes, n = [], 1
    while n <= limit:
        sizes.append(n)
        n = task_bucket(n + 1)
    return sizes


def parse_tasks(value: str, backend: str, device: str, max_batch: int) -> tuple[int, ...]:
    """'auto' | 'none' | '1,2,4' -> task counts; refuses anything else, naming the value."""
    text = value.strip().lower()
    if text == "none":
        return ()
    if text == "auto":
        if device == "cuda" and backend == "triton":
            return tuple(bucket_sizes(min(max_batch, AUTO_MAX_TASKS)))
        return (1,)
    counts = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            n = 0
        if not 1 <= n <= max_batch:
            raise ValueError(
                f"--warmup {value!r}: {part.strip()!r} is not a task count in [1, max_batch={max_batch}], expected "
                "'auto', 'none' or comma-separated counts such as 1,8,64"
            )
        counts.append(n)
    return tuple(sorted(set(counts)))


def make_plan(value: str, shots: int, queries: int, backend: str, device: str, max_batch: int, steps: int = 0,
              models: str = "") -> WarmupPlan:
    if steps < 0:
        raise ValueError(f"--warmup-steps {steps}, expected >= 0 (0: each model's default)")
    if shots < 1:
        raise ValueError(f"--warmup-shots {shots}, expected >= 1 support image per class")
    if queries < 0:
        raise ValueError(f"--warmup-queries {queries}, expected >= 0 query images per class")
    names = tuple(n.strip() for n in models.split(",") if n.strip())
    return WarmupPlan(parse_tasks(value, backend, device, max_batch), shots, queries, steps, names)


def warm_jobs(model, tasks: int, plan: WarmupPlan) -> list[AdaptJob]:
    spec = model.spec
    support_x = np.zeros((spec.ways * plan.shots, *spec.input_shape), dtype=np.uint8)
    support_y = np.tile(np.arange(spec.ways, dtype=np.int64), plan.shots)
    query_x = np.zeros((spec.ways * plan.queries, *spec.input_shape), dtype=np.uint8) if plan.queries else None
    steps = plan.steps or spec.steps
    return [AdaptJob(model, support_x, support_y, steps, None, query_x, keep=False) for _ in range(tasks)]


def graph_capacity(backend) -> int | None:
    """How many captured programs the engine backend keeps (None: it captures nothing)."""
    capacity = getattr(backend, "graph_capacity", None)
    return capacity() if capacity is not None else None


def capacity_warning(plan: WarmupPlan, models: int, capacity: int | None) -> str | None:
    """A warning when the warm-up would capture more programs than the backend keeps (the first ones get evicted)."""
    wanted = models * len(plan.tasks)
    if capacity is None or wanted <= capacity:
        return None
    return (f"the warm-up captures {wanted} programs ({models} models x {len(plan.tasks)} task counts) but the backend "
            f"keeps {capacity}: the least recently used are evicted and captured again on first use; warm fewer "
            "(--warmup-models, --warmup 1,8,64)")


async def warm_up(plan: WarmupPlan, registry: ModelRegistry, runner: BatchRunner, batcher: DynamicBatcher) -> dict:
    """Run the plan on the engine's worker thread; returns {model: {task count: seconds}}."""

    def run_all() -> dict:
        report: dict[str, dict[int, float]] = {}
        for name in plan.models or registry.names():
            model = registry.get(name)
            report[name] = {}
            if model_kind(model) != "classifier":
                continue  # regressors and policies run the torch reference path: nothing to compile or capture
            for tasks in plan.tasks:
                start = time.perf_counter()
                jobs = warm_jobs(model, tasks, plan)
                try:
                    outcomes = runner(jobs[0].key, jobs)
                except Exception as exc:
                    raise WarmupError(f"warm-up of model {name!r} with {tasks} tasks failed: "
                                      f"{type(exc).__name__}: {exc} (--warmup none skips the warm-up)") from exc
                if len(outcomes) != tasks:
                    raise WarmupError(f"warm-up of model {name!r} with {tasks} tasks returned {len(outcomes)} results")
                failed = first_failure(outcomes)
                if failed is not None:  # e.g. one task that does not fit in the device's memory
                    raise WarmupError(f"warm-up of model {name!r} with {tasks} tasks failed: {failed} (--warmup "
                                      "none skips the warm-up; smaller --warmup counts or queries may fit)")
                report[name][tasks] = round(time.perf_counter() - start, 4)
        return report

    unknown = [n for n in plan.models if n not in registry.names()]
    if unknown:
        raise ValueError(f"--warmup-models {','.join(plan.models)}: {unknown} not served here, expected some of "
                         f"{registry.names()}")
    if not plan.tasks:
        return {}
    warning = capacity_warning(plan, len(plan.models or registry.names()), graph_capacity(runner.engine.backend))
    if warning:
        get_logger().warning("warm-up exceeds the graph cache", extra={"detail": warning})
    return await batcher.run_exclusive(run_all)
