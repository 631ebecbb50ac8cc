"""`python -m trainer navigation-2d [--resume] [--zoo models/zoo/navigation-2d.pt] [--key value ...]`.

Meta-trains (MAML + TRPO), then evaluates the selected iterate and an untrained policy on the same 40 test goals,
and writes `results.json`, `results.md`, `training.png`, `meta_test_steps.png` and `policy.pt` to the run folder
(state and log under `state/`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from kernels.bench.flops import cpu_name
from models.policy import init_policy, save_policy
from trainer.rl.config import SOURCES, rl_config_from_args
from trainer.rl.evaluate import evaluate_policy, step_lrs
from trainer.rl.plots import plot_rl_steps, plot_rl_training
from trainer.rl.train import LOG_FILE, RLTrainer

# Finn et al. 2017, Table 4 (appendix): 2D navigation, MAML, average return after 0, 1, 2, 3 gradient steps.
PAPER = {"navigation-2d": {"mean": [-40.41, -11.68, -3.33, -3.23]}}
RANDOM_INIT_SEED = 12345
PROTOCOL_NOTE = (
    "each test goal (40, drawn once from a fixed seed, the same for every policy) gets 20 fresh trajectories per "
    "step; a step is one VPG update on the previous step's trajectories (lr 0.1, then 0.05 as the paper); the "
    "return is the undiscounted sum of rewards over a trajectory, averaged over its 20 trajectories, then over "
    "the goals (95% CI over goals). The environment follows pytorch-maml-rl's port of cbfinn's point env: actions "
    "are velocities clipped to [-0.1, 0.1]; cbfinn's own script instead rescales a policy output in [-1, 1] "
    "(rllab `normalize`), uses inner lr 0.5 in those units, meta-batch 40 and 100 meta-iterations, and its test "
    "script 40 trajectories per step. 'random initialization' is an untrained policy (Xavier weights, std 1) "
    "adapted the same way."
)




def evaluate(trainer: RLTrainer, params) -> dict:
    cfg = trainer.cfg
    return evaluate_policy(trainer.env, trainer.spec, params, cfg.eval_tasks, cfg.eval_steps,
                           step_lrs(cfg.inner_lr, cfg.eval_lr, cfg.eval_steps), cfg.eval_trajectories, cfg.discount,
                           cfg.baseline_reg, cfg.normalize_advantages)


def results_markdown(result: dict) -> str:
    cfg, runs = result["config"], result["evaluations"]
    steps = len(next(iter(runs.values()))["mean"])
    paper = result.get("paper")
    header = ["policy"] + [f"{s} step{'s' if s != 1 else ''}" for s in range(steps)]
    lines = [f"### {cfg['name']}: meta-test return, {cfg['eval_tasks']} new goals, {cfg['eval_trajectories']} "
             "trajectories per step, mean ± 95% CI", "", "| " + " | ".join(header) + " |",
             "|---|" + "---|" * steps]
    for label, res in runs.items():
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in zip(res["mean"], res["ci95"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if paper:
        lines.append("| paper (Finn et al. 2017, Table 4) | " + " | ".join(f"{m:.2f}" for m in paper["mean"]) + " |")
    t = result["training"]
    lines += ["", f"Adaptation lrs {result['lrs']}; {t['iterations']} meta-iterations in {t['train_seconds']:.0f} s "
              f"({t['seconds_per_iteration']:.2f} s per meta-iteration) on {result['hardware']}, "
              f"{t['threads']} thread(s); evaluated iterate: {t['selected']} (iteration {t['evaluated_iteration']})."]
    if result.get("command"):
        lines += ["", "```", result["command"], "```"]
    lines += ["", "Protocol: " + PROTOCOL_NOTE, "", "Every setting and its source: `results.json` -> `sources`."]
    if result.get("notes"):
        lines += ["", "Reading: " + result["notes"]]
    return "\n".join(lines) + "\n"


def final_evaluation(trainer: RLTrainer, command: str) -> dict:
    cfg, run = trainer.cfg, trainer.dir
    t0 = time.perf_counter()
    selected = trainer.policy_model(cfg.select)
    evaluations = {f"MAML ({cfg.select} iterate)": evaluate(trainer, selected.params)}
    if cfg.select == "best":
        evaluations["MAML (last iterate)"] = evaluate(trainer, trainer.params)
    if cfg.random_baseline:
        random_params = init_policy(trainer.spec, torch.Generator().manual_seed(RANDOM_INIT_SEED))
        evaluations["random initialization"] = evaluate(trainer, random_params)
    result = {
        "config": selected.provenance["config"], "sources": SOURCES, "command": command,
        "hardware": f"{os.cpu_count()}-core {cpu_name()} CPU",
        "lrs": step_lrs(cfg.inner_lr, cfg.eval_lr, cfg.eval_steps), "paper": PAPER.get(cfg.env),
        "training": {"iterations": trainer.iteration, "train_seconds": round(trainer.train_seconds, 1),
                     "seconds_per_iteration": trainer.train_seconds / max(trainer.iteration, 1),
                     "threads": torch.get_num_threads(), "selected": cfg.select,
                     "evaluated_iteration": trainer.best["iteration"] if cfg.select == "best" else trainer.iteration,
                     "best_train_return_post": trainer.best["return"], "commit": selected.provenance["commit"]},
        "evaluations": evaluations,
    }
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(result, indent=1))
    (run / "results.md").write_text(results_markdown(result))
    curves = {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in evaluations.items()}
    if result["paper"]:
        curves["paper MAML"] = result["paper"]
    plot_rl_steps(curves, f"{cfg.name} meta-test", run / "meta_test_steps.png")
    if (trainer.state_dir / LOG_FILE).exists():
        plot_rl_training(trainer.state_dir / LOG_FILE, f"{cfg.name} meta-training", run / "training.png")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = rl_config_from_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = RLTrainer(cfg, resume=args.resume).train()
    provenance = {}
    if cfg.final_eval:
        result = final_evaluation(trainer, "python -m trainer " + " ".join(argv))
        print(results_markdown(result))
        provenance["meta_test"] = {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in result["evaluations"].items()}
        provenance["meta_test_protocol"] = {"tasks": cfg.eval_tasks, "trajectories": cfg.eval_trajectories,
                                            "lrs": result["lrs"], "seed": next(iter(result["evaluations"].values()))
                                            ["seed"]}
    path = save_policy(trainer.dir / "policy.pt", trainer.policy_model(cfg.select, **provenance))
    if args.zoo:
        Path(args.zoo).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.zoo)
        print(f"bundled {path} -> {args.zoo}")
    return 0
