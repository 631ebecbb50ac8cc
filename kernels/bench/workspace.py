"""`make bench-workspace`: adapt + predict latency of the CPU reference backend at several workspace budgets.

The torch backends cut a batch of tasks into chunks whose activations fit a byte budget (kernels/engine/chunking.py).
On the CPU a smaller chunk is faster, not only smaller: its working set stays in the caches and the allocator reuses
the same pages, where one call over every task streams gigabytes through memory. This measures one checkpoint's
AdaptAndPredict (`Engine.adapt_predict`, the server's fused path) at each budget on the same tasks, points
interleaved (every repeat runs each budget once) so drift hits all alike, and checks that the logits do not depend on
the budget (chunking changes nothing but the peak size). A benchmark, never a timed test. Writes workspace.json and
workspace.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kernels.bench.recipes import make_task
from kernels.engine.chunking import task_bytes, task_chunk
from kernels.engine.reference import ReferenceBackend
from models.checkpoint import CheckpointError, load_checkpoint
from models.runtime import allocator_state, tune_cpu_allocator
from models.views import query_views, support_views

MIB = 2**20


def run(path: Path, budgets_mib: list[float], tasks: int, shots: int, queries: int, repeats: int) -> dict:
    model = load_checkpoint(path)
    spec = model.spec
    sx, sy, qx = make_task(spec, tasks, shots, queries, seed=0)
    # the rows the server hands the engine: the model's support and query views (models.views)
    sx, sy = support_views(spec.support_views, sx, sy)
    qx = query_views(spec.query_views, qx)
    backends = {b: ReferenceBackend("cpu", budget_bytes=int(b * MIB)) for b in budgets_mib}
    samples: dict[float, list[float]] = {b: [] for b in budgets_mib}
    logits: dict[float, torch.Tensor] = {}
    for round_ in range(repeats + 1):  # the first round warms up and is not kept
        for b, backend in backends.items():
            start = time.perf_counter()
            _, out = backend.adapt_predict(model, sx, sy, qx, spec.steps, spec.inner_lr, track=False)
            seconds = time.perf_counter() - start
            if round_:
                samples[b].append(seconds)
            logits.setdefault(b, out)
    first = logits[budgets_mib[0]]
    rows = []
    for b in budgets_mib:
        kept = np.asarray(samples[b]) * 1e3
        rows.append({"budget_mib": b, "tasks_per_chunk": min(tasks, task_chunk(spec, sx.shape[1], qx.shape[1],
                                                                             int(b * MIB))),
                     "p50_ms": float(np.percentile(kept, 50)), "min_ms": float(kept.min()),
                     "max_abs_logit_diff": float((logits[b] - first).abs().max())})
    return {"command": "python -m kernels.bench.workspace " + " ".join(sys.argv[1:]), "checkpoint": str(path),
            "model": spec.name, "steps": spec.steps, "support_views": spec.support_views,
            "query_views": spec.query_views, "tasks": tasks, "shots": shots, "queries_per_class": queries,
            "rows_per_task": {"support": int(sx.shape[1]), "query": int(qx.shape[1])},
            "task_mib": task_bytes(spec, sx.shape[1], qx.shape[1]) / MIB, "repeats": repeats,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "allocator": allocator_state(), "rows": rows}


def markdown(record: dict) -> str:
    lines = ["# CPU reference backend: AdaptAndPredict latency by workspace budget, one run", "",
             f"Command: `{record['command']}`. {record['model']} (`{record['checkpoint']}`), {record['tasks']} tasks "
             f"per call, {record['shots']}-shot, {record['queries_per_class']} queries per class, {record['steps']} "
             f"steps, support views {record['support_views']}, query views {record['query_views']} "
             f"({record['rows_per_task']['support']} support and {record['rows_per_task']['query']} query rows per "
             f"task, {record['task_mib']:.1f} MiB of activations per task); {record['threads']} threads, "
             f"{record['cpu']}, torch {record['torch']}; p50 and min over {record['repeats']} calls per budget, "
             "interleaved.", "",
             "| budget MiB | tasks per chunk | p50 ms | min ms | vs the first budget | max abs logit diff |",
             "|---|---|---|---|---|---|"]
    base = record["rows"][0]["p50_ms"]
    for r in record["rows"]:
        lines.append(f"| {r['budget_mib']:g} | {r['tasks_per_chunk']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{base / r['p50_ms']:.2f}x | {r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench.workspace", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a models/checkpoint.py file")
    p.add_argument("--budgets", default="6144,128,32,8",
                   help="workspace budgets in MiB, comma-separated (the first is the baseline of the ratios)")
    p.add_argument("--tasks", type=int, default=64, help="tasks per call")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15, help="query images per class")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/bench-workspace"))
    args = p.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets {args.budgets!r}: expected comma-separated MiB, e.g. 6144,32")
    if not budgets or min(budgets) <= 0:
        p.error(f"--budgets {args.budgets!r}: expected budgets > 0 MiB")
    if min(args.tasks, args.shots, args.queries, args.repeats) < 1:
        p.error("--tasks, --shots, --queries and --repeats must be >= 1")
    if not args.checkpoint.is_file():
        p.error(f"checkpoint {str(args.checkpoint)!r} not found")
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = run(args.checkpoint, budgets, args.tasks, args.shots, args.queries, args.repeats)
    except (CheckpointError, ValueError) as exc:
        p.error(str(exc)[:500])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workspace.json").write_text(json.dumps(record, indent=1))
    (args.out / "workspace.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
