"""`python -m kernels.bench --out DIR [--matrix auto|gpu|cpu|tiny] [...]`: run the benchmark, write its files."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from kernels.bench.configs import CONFIGS, MATRICES
from kernels.bench.harness import BenchSettings, run_bench
from kernels.bench.methods import METHODS
from kernels.bench.report import replot
from kernels.checks.oracles import MAX_ERROR_RATIO
from models.runtime import tune_cpu_allocator

BUDGET_ENV = "FASTADAPT_BENCH_BUDGET_S"


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated task counts like 1,16,128") from exc


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} unknown, expected some of {sorted(choices)}")
        return names

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (bench.json, bench.md, bench_<config>.png)")
    p.add_argument("--replot", action="store_true", help="only redraw bench.md and the plots from OUT/bench.json")
    p.add_argument("--matrix", default="auto", choices=["auto", *MATRICES],
                   help="auto: gpu with CUDA, else cpu (the reduced CPU matrix)")
    p.add_argument("--configs", type=_names(CONFIGS), help="only these configs (comma-separated)")
    p.add_argument("--tasks", type=_ints, help="task counts T for every config (overrides the matrix's)")
    p.add_argument("--methods", type=_names(METHODS), default=list(METHODS), help="comma-separated")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--repeats", type=int, help="timed calls per point (default 20 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    env_budget = os.environ.get(BUDGET_ENV)
    p.add_argument("--budget-s", type=float, default=float(env_budget) if env_budget else 240.0,
                   help=f"global time budget in seconds, then the rest is skipped (env {BUDGET_ENV}; 0 = none)")
    p.add_argument("--max-call-s", type=float, help="skip a method whose predicted call exceeds this (10 GPU, 30 CPU)")
    p.add_argument("--case-time-s", type=float, default=2.0, help="stop timing a point after this many seconds")
    p.add_argument("--bn-policy", choices=["support", "transductive"], help="override every config's BN policy")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, for %% of peak where the table has none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-error-ratio", type=float, default=MAX_ERROR_RATIO,
                   help="cross-check: a method's logits at most this many times as far from the float64 reference "
                        "as the float32 reference's (default %(default)g)")
    p.add_argument("--oracle-tasks", type=int, default=32,
                   help="tasks per point rerun in float64 for the cross-check (default %(default)d)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot(args.out)
        print(f"redrew {args.out}/bench.md and plots")
        return 0
    tune_cpu_allocator()  # every method runs in this process: same allocator for ours and the peers
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = (args.device == "auto" and torch.cuda.is_available()) or str(args.device).startswith("cuda")
    matrix_name = args.matrix if args.matrix != "auto" else ("gpu" if gpu else "cpu")
    matrix = dict(MATRICES[matrix_name])
    if args.configs:
        matrix = {c: matrix.get(c, MATRICES["gpu"].get(c, [1])) for c in args.configs}
    if args.tasks:
        matrix = {c: list(args.tasks) for c in matrix}
    settings = BenchSettings(
        matrix=matrix, methods=args.methods, device=args.device,
        repeats=args.repeats or (20 if gpu else 5), warmup=args.warmup,
        budget_s=args.budget_s or None, max_call_s=args.max_call_s or (10.0 if gpu else 30.0),
        case_time_s=args.case_time_s, seed=args.seed, max_error_ratio=args.max_error_ratio,
        oracle_tasks=args.oracle_tasks, bn_policy=args.bn_policy,
        peak_tflops=args.peak_tflops,
        progress=not args.no_progress,
    )
    data = run_bench(settings, args.out)
    print((os.path.join(args.out, "bench.md") + "\n") + open(os.path.join(args.out, "bench.md")).read())
    failed = [v for v in data["summary"]["verdicts"] if v["verdict"] != "pass"]
    for v in failed:
        print(f"CROSS-CHECK FAILED: {v['config']} {v['method']}: {v['points_failed']}/{v['points']} points, worst "
              f"float64 error ratio {v['worst_error_ratio']} (limit {v['max_error_ratio']}; see bench.md)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
