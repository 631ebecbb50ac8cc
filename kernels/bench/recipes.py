"""`make bench-recipes`: what a checkpoint's recipe costs at serving time: adapt + predict latency of two checkpoints
of the same architecture (e.g. the bundled MAML omniglot-20w1s and an ANIL one), through the same Engine, in one run.

ANIL adapts the head alone: the support features are computed once and only the linear head steps, so its adapt is
one body forward instead of K forwards and backwards of the whole network. Points are interleaved (every repeat runs
each checkpoint once at each task count), so drift on a busy machine hits all alike. A benchmark, never a timed test.
Writes recipes.json and recipes.md to --out.
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

from kernels.engine import Engine
from models.checkpoint import CheckpointError, load_checkpoint
from models.runtime import allocator_state, tune_cpu_allocator


def recipe_of(model) -> str:
    config = model.provenance.get("config") or {}
    return str(model.provenance.get("recipe") or config.get("recipe") or config.get("algorithm") or "maml")


def make_task(spec, tasks: int, shots: int, queries_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n, q = spec.ways * shots, spec.ways * queries_per_class
    support = torch.rand(tasks, n, *spec.input_shape, generator=g)
    labels = torch.arange(spec.ways).repeat_interleave(shots).repeat(tasks, 1)
    query = torch.rand(tasks, q, *spec.input_shape, generator=g)
    return support, labels, query


def run(paths: list[Path], task_counts: list[int], repeats: int, shots: int, queries: int) -> dict:
    engine = Engine("auto")
    models = [load_checkpoint(p, device=engine.device) for p in paths]
    archs = {(m.spec.arch, m.spec.ways, m.spec.input_shape) for m in models}
    if len(archs) != 1:
        raise ValueError(f"the checkpoints have different architectures {sorted(map(str, archs))}, expected one")
    spec = models[0].spec
    cases = {t: make_task(spec, t, shots, queries, seed=t) for t in task_counts}
    samples = {(i, t): [] for i in range(len(models)) for t in task_counts}
    for _ in range(repeats + 2):  # the first two rounds warm up and are not kept
        for t, (sx, sy, qx) in cases.items():
            for i, model in enumerate(models):
                start = time.perf_counter()
                _, logits = engine.adapt_predict(model, sx.to(engine.device), sy.to(engine.device),
                                                 qx.to(engine.device))
                logits.cpu()
                samples[(i, t)].append(time.perf_counter() - start)
    rows = []
    for i, (path, model) in enumerate(zip(paths, models)):
        for t in task_counts:
            kept = np.asarray(samples[(i, t)][2:]) * 1e3
            rows.append({"checkpoint": str(path), "model": model.name, "recipe": recipe_of(model),
                         "adapt_params": model.spec.adapt_params, "steps": model.spec.steps, "tasks": t,
                         "p50_ms": float(np.percentile(kept, 50)), "p90_ms": float(np.percentile(kept, 90))})
    return {"command": "python -m kernels.bench.recipes " + " ".join(sys.argv[1:]),
            "device": str(engine.device), "backend": engine.backend_name, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "allocator": allocator_state(), "shots": shots, "queries_per_class": queries, "repeats": repeats,
            "rows": rows}


def markdown(record: dict) -> str:
    lines = ["# Serving cost of a recipe: adapt + predict, same architecture, one run", "",
             f"Command: `{record['command']}`. Device {record['device']} ({record['backend']} backend, "
             f"{record['threads']} threads, {record['cpu']}, torch {record['torch']}); {record['shots']}-shot, "
             f"{record['queries_per_class']} queries per class, p50 / p90 over {record['repeats']} calls.", "",
             "| model | recipe (adapts) | steps | tasks | p50 ms | p90 ms |", "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['model']} (`{r['checkpoint']}`) | {r['recipe']} ({r['adapt_params']}) | {r['steps']} | "
                     f"{r['tasks']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} |")
    base = {r["tasks"]: r["p50_ms"] for r in record["rows"] if r["checkpoint"] == record["rows"][0]["checkpoint"]}
    lines += ["", "Ratio to the first checkpoint (p50): " + ", ".join(
        f"{r['recipe']} at T={r['tasks']}: {base[r['tasks']] / r['p50_ms']:.2f}x faster"
        for r in record["rows"] if r["checkpoint"] != record["rows"][0]["checkpoint"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench.recipes", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="two or more checkpoints of one architecture")
    p.add_argument("--tasks", default="1,16", help="task counts per call, comma-separated")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5, help="query images per class")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/bench-recipes"))
    args = p.parse_args(argv)
    try:
        tasks = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        p.error(f"--tasks {args.tasks!r}: expected comma-separated task counts, e.g. 1,16")
    if min(tasks) < 1 or args.repeats < 1 or args.shots < 1 or args.queries < 1:
        p.error("--tasks, --repeats, --shots and --queries must be >= 1")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        p.error(f"checkpoint(s) {missing} not found")
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = run(args.checkpoints, tasks, args.repeats, args.shots, args.queries)
    except (CheckpointError, ValueError) as exc:
        p.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps(record, indent=1))
    (args.out / "recipes.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
