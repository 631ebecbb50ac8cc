"""Recipe A/B at equal CPU time: `python -m trainer.ab [--config omniglot-20w1s] [--cpu-minutes 3] [--arms a,b,...]`.

Every arm meta-trains from the same seeded initialization on the same seeded task stream for the same process CPU
time (one thread: `time.process_time`, so a shared, busy machine slows the wall clock but not the comparison), and is
meta-tested on the same seeded tasks of the meta-test split after every `--eval-every` CPU minutes. Writes
`ab.json`, `README.md` (table and command) and `ab.png` (accuracy vs CPU minutes) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from kernels.bench.flops import cpu_name
from trainer.config import CONFIGS, apply_recipe
from trainer.evaluate import evaluate
from trainer.train import Trainer

# name -> (recipe preset, overrides). Within a few CPU minutes a derivative-order warm-up is first order throughout.
ARMS: dict[str, tuple[str, dict]] = {
    "maml": ("maml", {}),
    "maml+lslr": ("maml+lslr", {}),
    "maml+msl": ("maml+msl", {}),
    "maml++/first-order": ("maml++", {}),  # its derivative-order warm-up phase: first order for 25,000 iterations
    "maml++/second-order": ("maml++", {"first_order_iterations": 0}),  # the 20-way repository config (-1)
    "anil": ("anil", {}),
    "maml+fo-warmup": ("maml+fo-warmup", {}),  # = fomaml within a few minutes
    "maml+per-step-bn": ("maml+per-step-bn", {}),  # BN gamma / beta outer-loop only, a row per inner step
    # the maml++ arms as recorded before per-step BN weights existed (docs/results/recipes-ab*): one shared gamma / beta
    "maml++/first-order/shared-bn": ("maml++", {"per_step_bn": False}),
}


def run_arm(name: str, base, cpu_seconds: float, eval_every: float, eval_tasks: int) -> dict:
    recipe, overrides = ARMS[name]
    cfg = dataclasses.replace(apply_recipe(base, recipe), **overrides)
    trainer = Trainer(cfg)
    learner, sampler = trainer.learner, trainer.samplers["train"]
    points, spent, iteration, next_eval = [], 0.0, 0, eval_every

    def meta_test():
        res = evaluate(trainer.spec, learner.params, trainer.samplers["test"](), eval_tasks, cfg.test_steps,
                       cfg.inner_lr, 100, adapt_keys=learner.adapt_keys, step_lrs=learner.step_lrs,
                       step_bn=learner.step_bn)
        s = cfg.test_steps
        points.append({"cpu_minutes": round(spent / 60, 3), "iterations": iteration,
                       **{p: {"mean": res[p]["mean"][s], "ci95": res[p]["ci95"][s]} for p in ("transductive",
                                                                                               "support")}})
        print(f"  {name}: {iteration} it, {spent / 60:.2f} CPU min: {points[-1]['transductive']['mean']:.2f}% "
              f"transductive, {points[-1]['support']['mean']:.2f}% support", flush=True)

    while spent < cpu_seconds:
        t0 = time.process_time()
        b = sampler.sample(cfg.meta_batch)
        learner.step((b.support_x, b.support_y, b.query_x, b.query_y), 1, iteration)
        spent += time.process_time() - t0
        iteration += 1
        if spent >= next_eval:
            meta_test()
            next_eval += eval_every
    if not points or points[-1]["iterations"] != iteration:
        meta_test()
    return {"recipe": recipe, "overrides": overrides, "config": dataclasses.asdict(cfg), "iterations": iteration,
            "cpu_seconds": round(spent, 1), "seconds_per_iteration": round(spent / max(iteration, 1), 3),
            "points": points}


def write_report(out: Path, result: dict, command: str):
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(result, indent=1))
    steps = result["report_step"]
    lines = [f"# Recipe A/B: {result['config']}, equal CPU time", "",
             f"Each arm: {result['cpu_minutes']} CPU minutes of one thread (process time, niced, on a shared "
             f"{result['cpu']}), same seed, same initialization, same task stream; meta-test on the same "
             f"{result['eval_tasks']} tasks of images_evaluation (background split), accuracy after {steps} inner "
             "steps, 95% CI.", "", f"Command: `{command}`", "",
             "| arm | iterations | s / iteration | transductive % | support % |", "|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        last = arm["points"][-1]
        lines.append(f"| {name} | {arm['iterations']} | {arm['seconds_per_iteration']:.2f} | "
                     f"{last['transductive']['mean']:.2f} ± {last['transductive']['ci95']:.2f} | "
                     f"{last['support']['mean']:.2f} ± {last['support']['ci95']:.2f} |")
    lines += ["", "![accuracy vs CPU minutes](ab.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    plot(result, out / "ab.png")


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, policy in zip(axes, ("transductive", "support")):
        for name, arm in result["arms"].items():
            xs = [0.0] + [p["cpu_minutes"] for p in arm["points"]]
            ys = [result["untrained"][policy]] + [p[policy]["mean"] for p in arm["points"]]
            ax.plot(xs, ys, marker="o", label=f"{name} ({arm['seconds_per_iteration']:.2f} s/it)")
        ax.set_title(f"{result['config']}: BN {policy}")
        ax.set_xlabel("CPU minutes (one thread)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"meta-test accuracy % after {result['report_step']} steps")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-20w1s", choices=sorted(CONFIGS))
    parser.add_argument("--cpu-minutes", type=float, default=3.0)
    parser.add_argument("--eval-every", type=float, default=1.0, help="CPU minutes between meta-tests")
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--out", default="docs/results/recipes-ab")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms {unknown}, expected names from {list(ARMS)}")
    torch.set_num_threads(1)
    base = dataclasses.replace(CONFIGS[args.config], device="cpu", progress=False, final_eval=False,
                               out_dir="/tmp/fastadapt-ab")
    probe = Trainer(dataclasses.replace(base, iterations=0))
    untrained = evaluate(probe.spec, probe.learner.params, probe.samplers["test"](), args.eval_tasks, base.test_steps,
                         base.inner_lr, 100)
    result = {"config": args.config, "cpu_minutes": args.cpu_minutes, "eval_tasks": args.eval_tasks,
              "report_step": base.test_steps, "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
              "torch": torch.__version__,
              "untrained": {p: untrained[p]["mean"][base.test_steps] for p in ("transductive", "support")},
              "arms": {}}
    command = "python -m trainer.ab " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in arms:
        print(f"arm {name}", flush=True)
        result["arms"][name] = run_arm(name, base, args.cpu_minutes * 60, args.eval_every * 60, args.eval_tasks)
        write_report(Path(args.out), result, command.strip())  # after every arm: a cut run keeps what it has
    return 0


if __name__ == "__main__":
    sys.exit(main())
