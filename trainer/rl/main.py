"""`python -m trainer navigation-2d [--resume] [--zoo models/zoo/navigation-2d.pt] [--key value ...]`.

Meta-trains (MAML + TRPO, or with `--algorithm pretrained` the paper's pretrained baseline: the same TRPO without
the inner step), then evaluates the selected iterate and an untrained policy on the same 40 test goals, and writes
`results.json`, `results.md`, `training.png`, `meta_test_steps.png` and `policy.pt` to the run folder (state and
log under `state/`). `python -m trainer.rl.evaluate` tabulates saved policies of several runs the same way.
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
from trainer.rl.config import ALGORITHM_LABELS, SOURCES, rl_config_from_args
from trainer.rl.evaluate import evaluate_policy, step_lrs
from trainer.rl.plots import plot_rl_steps, plot_rl_training
from trainer.rl.train import LOG_FILE, RLTrainer, selection_metric
from trainer.stop import stop_on_signals


def _cheetah_paper(low: list[float], high: list[float]) -> dict:
    """A row read off a figure: the range [low, high] per step, `mean` its midpoint (what the plot draws)."""
    return {"label": "paper MAML (Finn et al. 2017, Fig. 5, read off, approximate)", "approximate": True,
            "low": low, "high": high, "mean": [(a + b) / 2 for a, b in zip(low, high)]}


# The paper's MAML row per environment, returns after 0, 1, 2, 3 gradient steps. 2D navigation: Finn et al. 2017,
# Table 4 (appendix), exact. Half-cheetah: not tabulated in the paper; approximate values read off its Figure 5 as
# docs/results/halfcheetah/README.md gives them (ranges; re-read arXiv 1703.03400v3 before quoting them as a bar).
PAPER = {
    "navigation-2d": {"label": "paper MAML (Finn et al. 2017, Table 4)", "mean": [-40.41, -11.68, -3.33, -3.23]},
    "halfcheetah-vel": _cheetah_paper([-140.0, -80.0, -75.0, -75.0], [-130.0, -70.0, -55.0, -55.0]),
    "halfcheetah-dir": _cheetah_paper([0.0, 300.0, 300.0, 300.0], [0.0, 300.0, 400.0, 400.0]),
}
RANDOM_INIT_SEED = 12345


def _cheetah_note(task: str, paper: str) -> str:
    return (
        f"each test task ({task}; 40, drawn once from a fixed seed, the same for every policy) gets 20 fresh "
        "trajectories of 200 steps per step; a step is one VPG update on the previous step's trajectories (lr 0.1, "
        "then 0.05 as the paper, cbfinn test_maml_cheetah.py); the return is the undiscounted sum of rewards over a "
        "trajectory, averaged over its 20 trajectories, then over the tasks (95% CI over tasks). The environment is "
        "gymnasium HalfCheetah-v5's physics (MuJoCo 4) with pytorch-maml-rl's HalfCheetahVel/Dir rewards (velocity "
        "= root x displacement / dt, control cost 0.05 |clip(a)|^2, no termination; "
        "docs/results/halfcheetah/README.md): the paper's reward terms, coefficients, horizon and dt, but another "
        "engine version, model file, observation (17 values, no torso position) and velocity (cbfinn: the torso's "
        "centre-of-mass velocity), so the returns are on the paper's scale, not bit-comparable with it. The paper "
        "tabulates no half-cheetah numbers: its row holds approximate values read off its Figure 5 (ranges, from "
        f"descriptions of the figure; re-read arXiv 1703.03400v3 before quoting them as a bar): {paper}. "
        "'random initialization' is an untrained policy (Xavier weights, std 1) adapted the same way."
    )


# How each environment's meta-test is run and how it relates to the paper's (results.md "Protocol:").
PROTOCOL_NOTES = {
    "navigation-2d": (
        "each test goal (40, drawn once from a fixed seed, the same for every policy) gets 20 fresh trajectories per "
        "step; a step is one VPG update on the previous step's trajectories (lr 0.1, then 0.05 as the paper); the "
        "return is the undiscounted sum of rewards over a trajectory, averaged over its 20 trajectories, then over "
        "the goals (95% CI over goals). The environment is cbfinn's point env (pytorch-maml-rl's port): actions are "
        "velocities clipped to [-0.1, 0.1]. The policy is parameterized as cbfinn's under rllab `normalize` when "
        "the run's action_scale is 0.1 (the navigation-2d config's: outputs in units of the speed limit, init std "
        "1 there = 0.1 in velocity units) and in velocity units, as pytorch-maml-rl, when it is 1 (results.json -> "
        "config). cbfinn's script also uses inner lr 0.5 in the normalized units, meta-batch 40 and 100 "
        "meta-iterations, and its test script 40 trajectories per step. 'random initialization' is an untrained "
        "policy (Xavier weights, init std) adapted the same way."
    ),
    "halfcheetah-vel": _cheetah_note(
        "goal velocity ~ U[0, 2]",
        "MAML about -130 to -140 before adaptation, -70 to -80 after 1 step, -55 to -75 after 2-3; pretrained about "
        "-150 to -160, to about -130; oracle about -60"),
    "halfcheetah-dir": _cheetah_note(
        "direction +1 or -1, each with probability 1/2",
        "MAML about 0 before adaptation, about 300 after 1 step, 300-400 after 2-3; pretrained about 0, to about "
        "50; oracle about 400"),
}
# What a row of a non-MAML run is (added to the environment's note).
ALGORITHM_NOTES = {
    "pretrained": (
        "'pretrained' is the paper's baseline (section 5.3, Fig. 4-5): one policy trained with the same TRPO step on "
        "the pre-update trajectories of each meta-batch (no inner step; `sources` -> `algorithm`), its best iterate "
        "chosen by the pre-update training return, then adapted with exactly the VPG steps above. The paper row is "
        "MAML's."
    ),
}


def paper_cells(paper: dict) -> list[str]:
    """Exact values as they are printed in the paper; values read off a figure as their range."""
    if not paper.get("approximate"):
        return [f"{m:.2f}" for m in paper["mean"]]
    return [f"≈ {lo:g}" if lo == hi else f"≈ {lo:g} to {hi:g}" for lo, hi in zip(paper["low"], paper["high"])]


def steps_table(title: str, evaluations: dict[str, dict], paper: dict | None) -> list[str]:
    """The markdown table of mean ± 95% CI per adaptation step, one row per policy, then the paper's row."""
    steps = len(next(iter(evaluations.values()))["mean"])
    header = ["policy"] + [f"{s} step{'s' if s != 1 else ''}" for s in range(steps)]
    lines = [title, "", "| " + " | ".join(header) + " |", "|---|" + "---|" * steps]
    for label, res in evaluations.items():
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in zip(res["mean"], res["ci95"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if paper:  # results.json files from before the per-environment rows have no label: navigation's Table 4
        label = paper.get("label", "paper (Finn et al. 2017, Table 4)")
        lines.append(f"| {label} | " + " | ".join(paper_cells(paper)[:steps]) + " |")
    return lines


def protocol_text(env: str, algorithms=()) -> str:
    notes = [PROTOCOL_NOTES.get(env, f"no protocol note for environment {env!r}.")]
    notes += [ALGORITHM_NOTES[a] for a in dict.fromkeys(algorithms) if a in ALGORITHM_NOTES]
    return "Protocol: " + " ".join(notes)


def paper_curves(paper: dict | None) -> dict[str, dict]:
    """The paper row as plot_rl_steps draws it (none, or one dashed curve; a read-off range as a band)."""
    if not paper:
        return {}
    label = "paper MAML (approximate, Fig. 5)" if paper.get("approximate") else "paper MAML"
    return {label: {k: paper[k] for k in ("mean", "low", "high") if k in paper}}


def evaluate(trainer: RLTrainer, params) -> dict:
    cfg = trainer.cfg
    return evaluate_policy(trainer.env, trainer.spec, params, cfg.eval_tasks, cfg.eval_steps,
                           step_lrs(cfg.inner_lr, cfg.eval_lr, cfg.eval_steps), cfg.eval_trajectories, cfg.discount,
                           cfg.baseline_reg, cfg.normalize_advantages)


def results_markdown(result: dict) -> str:
    cfg, runs = result["config"], result["evaluations"]
    title = (f"### {cfg['name']}: meta-test return, {cfg['eval_tasks']} new goals, {cfg['eval_trajectories']} "
             "trajectories per step, mean ± 95% CI")
    lines = steps_table(title, runs, result.get("paper"))
    t = result["training"]
    lines += ["", f"Adaptation lrs {result['lrs']}; {t['iterations']} meta-iterations in {t['train_seconds']:.0f} s "
              f"({t['seconds_per_iteration']:.2f} s per meta-iteration) on {result['hardware']}, "
              f"{t['threads']} thread(s); evaluated iterate: {t['selected']} (iteration {t['evaluated_iteration']})."]
    if result.get("command"):
        lines += ["", "```", result["command"], "```"]
    lines += ["", protocol_text(cfg["env"], [cfg.get("algorithm", "maml")]), "",
              "Every setting and its source: `results.json` -> `sources`."]
    if result.get("notes"):
        lines += ["", "Reading: " + result["notes"]]
    return "\n".join(lines) + "\n"


def final_evaluation(trainer: RLTrainer, command: str) -> dict:
    cfg, run = trainer.cfg, trainer.dir
    t0 = time.perf_counter()
    selected = trainer.policy_model(cfg.select)
    name = ALGORITHM_LABELS[cfg.algorithm]
    evaluations = {f"{name} ({cfg.select} iterate)": evaluate(trainer, selected.params)}
    if cfg.select == "best":
        evaluations[f"{name} (last iterate)"] = evaluate(trainer, trainer.params)
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
                     f"best_train_{selection_metric(cfg)}": trainer.best["return"],
                     "commit": selected.provenance["commit"]},
        "evaluations": evaluations,
    }
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(result, indent=1))
    (run / "results.md").write_text(results_markdown(result))
    curves = {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in evaluations.items()}
    curves.update(paper_curves(result["paper"]))
    plot_rl_steps(curves, f"{cfg.name} meta-test", run / "meta_test_steps.png", cfg.eval_tasks)
    if (trainer.state_dir / LOG_FILE).exists():
        kind = "pretraining" if cfg.algorithm == "pretrained" else "meta-training"
        plot_rl_training(trainer.state_dir / LOG_FILE, f"{cfg.name} {kind}", run / "training.png")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = rl_config_from_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = RLTrainer(cfg, resume=args.resume)
    with stop_on_signals(trainer, "after the meta-iteration under way, then saving the state and the policy"):
        trainer.train()
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
