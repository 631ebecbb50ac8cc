"""Meta-test evaluation as the paper's Table 4: new tasks, returns after 0, 1, 2, 3 adaptation steps.

Each step samples fresh trajectories with the current policy of every task (the meta-policy at step 0), records their
mean undiscounted return per task, and takes one VPG step on them (alpha = inner_lr for the first step, eval_lr
after, as the paper). Mean over tasks and 95% confidence interval (1.96 std / sqrt(tasks)).

`python -m trainer.rl.evaluate POLICY.pt [POLICY.pt ...] --out DIR [--random]` meta-tests saved policies of any
runs (MAML, pretrained) this way on the same test tasks and writes one results.json / results.md /
meta_test_steps.png with the paper's row. The protocol (environment, horizon, tasks, trajectories, steps, lrs) is
the first policy's run's, from its provenance, so a run's own policy.pt gets exactly its results.json numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import CheckpointError
from models.policy import PolicyModel, PolicySpec, init_policy, load_policy, stack_policy
from trainer.rl.baseline import advantages
from trainer.rl.sampler import sample_trajectories
from trainer.rl.vpg import adapt

TEST_SEED = 1_000_003  # the same test goals and noise for every policy and run


def step_lrs(first: float, later: float, steps: int) -> list[float]:
    return [first] + [later] * (steps - 1)


def evaluate_policy(env, spec: PolicySpec, params: dict[str, torch.Tensor], tasks: int = 40, steps: int = 3,
                    lrs: list[float] | None = None, trajectories: int = 20, discount: float = 0.99,
                    baseline_reg: float = 1e-5, normalize: bool = True, seed: int = TEST_SEED) -> dict:
    """{'mean': [steps + 1], 'ci95': [...], 'per_task': [[tasks] per step], 'goals': [...], ...}."""
    lrs = step_lrs(spec.inner_lr, spec.inner_lr / 2, steps) if lrs is None else list(lrs)
    if len(lrs) != steps:
        raise ValueError(f"evaluation: {len(lrs)} learning rates {lrs}, expected one per step ({steps})")
    generator = torch.Generator().manual_seed(seed)
    goals = env.sample_tasks(tasks, generator)
    # Task-stacked from the start: every forward is the batched one the server runs (models.policy.policy_forward's
    # stacked path), so a served loop on the same noise (server.rl_demo) reproduces this one instead of drifting by
    # rounding (the shared path's matmul rounds differently) until an episode's termination flips. To the bit where
    # the BLAS rounds a task alike in any batch (the Intel Xeon box); MKL on an AMD EPYC rounds some shapes by batch
    # size and alignment (1 ulp), which half-cheetah's contacts amplify over 200 steps.
    fast = stack_policy({k: v.detach() for k, v in params.items()}, tasks)
    per_task = []
    for s in range(steps + 1):
        traj = sample_trajectories(env, spec, fast, goals, trajectories, generator)
        per_task.append(traj.returns().mean(1))
        if s < steps:
            adv = advantages(traj, discount, baseline_reg, normalize)
            fast = adapt(spec, fast, traj, adv, lrs[s])
    return {
        "tasks": tasks, "trajectories": trajectories, "lrs": lrs, "seed": seed,
        "mean": [r.mean().item() for r in per_task],
        "ci95": [1.96 * r.std(unbiased=False).item() / math.sqrt(tasks) for r in per_task],
        "per_task": [[round(x, 3) for x in r.tolist()] for r in per_task],
    }


# ---- python -m trainer.rl.evaluate ----

PROTOCOL_KEYS = ("horizon", "eval_tasks", "eval_trajectories", "eval_steps", "inner_lr", "eval_lr")


def policy_run_config(model: PolicyModel):
    """The RLConfig a policy's run used (its provenance), or its environment's named config if it records none."""
    from trainer.rl.config import RL_CONFIGS, RLConfig, check_config

    saved = dict(model.provenance.get("config") or {})
    base = RL_CONFIGS.get(saved.get("name")) or RL_CONFIGS.get(model.spec.env)
    if base is None:
        raise ValueError(f"environment {model.spec.env!r}, expected one of {sorted(RL_CONFIGS)}")
    known = {f.name for f in dataclasses.fields(RLConfig)}
    return check_config(dataclasses.replace(base, **{k: v for k, v in saved.items() if k in known}))


def policy_label(model: PolicyModel, path) -> str:
    """'MAML (best iterate, runs/x/policy.pt)': the run's algorithm and iterate, as its own results name it."""
    from trainer.rl.config import ALGORITHM_LABELS

    cfg = model.provenance.get("config")
    if not cfg:
        return f"{model.spec.name} ({path})"
    algorithm = cfg.get("algorithm", "maml")  # policies from before --algorithm are MAML's
    name = ALGORITHM_LABELS.get(algorithm, algorithm)
    selected = model.provenance.get("selected")
    return f"{name} ({selected} iterate, {path})" if selected else f"{name} ({path})"


def _policy_facts(model: PolicyModel, path, cfg, protocol: dict, result: dict) -> dict:
    """What the table's row is (run, algorithm, iterate), and whether it reproduces the run's own meta-test."""
    from trainer.rl.config import ALGORITHM_LABELS

    prov = model.provenance
    facts = {"path": str(path), "name": model.spec.name, "algorithm": cfg.algorithm, "selected": prov.get("selected"),
             "iterations": prov.get("iterations"), "best_iteration": prov.get("best_iteration"),
             "train_seconds": prov.get("train_seconds"), "commit": prov.get("commit")}
    own = prov.get("meta_test_protocol")
    recorded = prov.get("meta_test", {}).get(f"{ALGORITHM_LABELS[cfg.algorithm]} ({prov.get('selected')} iterate)")
    if own and recorded and cfg.horizon == protocol["horizon"] and all(
            own.get(k) == protocol[k] for k in ("tasks", "trajectories", "lrs", "seed")):
        facts["reproduces_run"] = recorded["mean"] == result["mean"]
    return facts


def comparison_markdown(result: dict) -> str:
    """The comparison's results.md: the table, what each row is, how it was run, the protocol and any notices."""
    from trainer.rl.main import protocol_text, steps_table

    proto = result["protocol"]
    title = (f"### {result['config']['name']}: meta-test return, {proto['tasks']} new goals, {proto['trajectories']} "
             "trajectories per step, mean ± 95% CI")
    lines = steps_table(title, result["evaluations"], result.get("paper")) + ["", "Policies:", ""]
    for label, f in result["policies"].items():
        if "description" in f:
            lines.append(f"- {label}: {f['description']}")
            continue
        if f.get("iterations") is None:
            lines.append(f"- {label}: `{f['path']}`, no training recorded (a fresh initialization?)")
            continue
        which = f"{f['selected']} (iteration {f['best_iteration']})" if f["selected"] == "best" else f["selected"]
        line = (f"- {label}: `{f['path']}`, {f['algorithm']}, {f['iterations']} iterations in {f['train_seconds']} "
                f"s, evaluated iterate {which}, commit {f['commit']}")
        if "reproduces_run" in f:
            line += ("; the same numbers as its run's own meta-test" if f["reproduces_run"] else
                     "; NOT the numbers its run recorded with this protocol (another commit or machine?)")
        lines.append(line)
    lines += ["", f"Adaptation lrs {proto['lrs']}; horizon {proto['horizon']}; test seed {proto['seed']}; "
              f"{result['eval_seconds']} s on {result['hardware']}, {result['threads']} thread(s).",
              "", "```", result["command"], "```", "",
              protocol_text(proto["env"], [f["algorithm"] for f in result["policies"].values()])]
    lines += [f"\nNOTICE: {n}" for n in result["notices"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.rl.evaluate POLICY.pt [POLICY.pt ...] --out DIR [--random] [--tasks N] ...`."""
    from kernels.bench.flops import cpu_name
    from trainer.rl.main import PAPER, RANDOM_INIT_SEED, paper_curves
    from trainer.rl.plots import plot_rl_steps
    from trainer.rl.train import make_env

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m trainer.rl.evaluate",
                                description="Meta-test saved policies (MAML-RL) on the same test tasks, one table.")
    p.add_argument("policies", nargs="+", type=Path, metavar="POLICY",
                   help="policy.pt files (`python -m trainer navigation-2d ...` writes one per run)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, meta_test_steps.png")
    p.add_argument("--random", action="store_true",
                   help="also evaluate an untrained policy adapted the same way (the runs' 'random initialization')")
    for key, what in (("tasks", "eval_tasks"), ("trajectories", "eval_trajectories"), ("steps", "eval_steps"),
                      ("horizon", "horizon")):
        p.add_argument(f"--{key}", type=int, help=f"default: the first policy's run's {what}")
    p.add_argument("--seed", type=int, default=TEST_SEED, help=f"test tasks and noise (default {TEST_SEED}: the runs')")
    args = p.parse_args(argv)
    for key in ("tasks", "trajectories", "steps", "horizon"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} {getattr(args, key)}, expected >= 1")
    seen = set()
    for path in args.policies:
        if path.resolve() in seen:
            p.error(f"POLICY {path} given twice, expected each policy once")
        seen.add(path.resolve())
    models, cfgs = [], []
    for path in args.policies:
        try:
            models.append(load_policy(path))
            cfgs.append(policy_run_config(models[-1]))
        except CheckpointError as exc:
            p.error(f"POLICY {exc}")
        except ValueError as exc:
            p.error(f"POLICY {path}: {exc}")
    first, cfg = models[0].spec, cfgs[0]
    for path, model in zip(args.policies[1:], models[1:]):
        s = model.spec
        if (s.env, s.obs_dim, s.act_dim) != (first.env, first.obs_dim, first.act_dim):
            p.error(f"POLICY {path}: environment {s.env!r} ({s.obs_dim} -> {s.act_dim}), expected {first.env!r} "
                    f"({first.obs_dim} -> {first.act_dim}) as {args.policies[0]}: every policy is evaluated on the "
                    "first one's test tasks")
    cfg = dataclasses.replace(cfg, eval_tasks=args.tasks or cfg.eval_tasks, horizon=args.horizon or cfg.horizon,
                              eval_trajectories=args.trajectories or cfg.eval_trajectories,
                              eval_steps=args.steps or cfg.eval_steps)
    lrs = step_lrs(cfg.inner_lr, cfg.eval_lr, cfg.eval_steps)
    protocol = {"env": cfg.env, "horizon": cfg.horizon, "tasks": cfg.eval_tasks, "trajectories": cfg.eval_trajectories,
                "steps": cfg.eval_steps, "lrs": lrs, "seed": args.seed, "from": str(args.policies[0])}
    notices = []
    for path, other in zip(args.policies[1:], cfgs[1:]):
        for key in PROTOCOL_KEYS:
            if getattr(other, key) != getattr(cfgs[0], key):
                notices.append(f"{path}'s run used --{key} {getattr(other, key)}, {args.policies[0]}'s "
                               f"{getattr(cfgs[0], key)}: every policy is evaluated with {getattr(cfg, key)} (the "
                               "first policy's run's, or the option)")
    for line in notices:
        print(f"NOTICE: {line}", file=sys.stderr)
    if cfg.threads:  # as the run's own final evaluation (bit-equal sums)
        torch.set_num_threads(cfg.threads)
    env = make_env(cfg)
    start = time.perf_counter()

    def run(spec: PolicySpec, params) -> dict:
        return evaluate_policy(env, spec, params, cfg.eval_tasks, cfg.eval_steps, lrs, cfg.eval_trajectories,
                               spec.discount, spec.baseline_reg, spec.normalize_advantages, args.seed)

    evaluations, policies = {}, {}
    for path, model, model_cfg in zip(args.policies, models, cfgs):
        label = policy_label(model, path)
        evaluations[label] = run(model.spec, model.params)
        policies[label] = _policy_facts(model, path, model_cfg, protocol, evaluations[label])
    if args.random:
        evaluations["random initialization"] = run(first, init_policy(first, torch.Generator().manual_seed(
            RANDOM_INIT_SEED)))
        policies["random initialization"] = {
            "path": None, "algorithm": None, "description": f"an untrained policy of {args.policies[0]}'s architecture "
            f"(Xavier weights, std {first.init_std:g}, seed {RANDOM_INIT_SEED}) adapted the same way"}
    result = {"command": shlex.join(["python", "-m", "trainer.rl.evaluate", *argv]), "protocol": protocol,
              "config": dataclasses.asdict(cfg), "paper": PAPER.get(cfg.env), "policies": policies,
              "evaluations": evaluations, "notices": notices, "hardware": f"{os.cpu_count()}-core {cpu_name()} CPU",
              "threads": torch.get_num_threads(), "eval_seconds": round(time.perf_counter() - start, 1)}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    markdown = comparison_markdown(result)
    (out / "results.md").write_text(markdown)
    # the legend names a run by its folder (runs/<name>/policy.pt) unless two would read the same
    short = {label: label if f["path"] is None else f"{label.split(' (')[0]} ({Path(f['path']).parent.name})"
             for label, f in policies.items()}
    names = short if len(set(short.values())) == len(short) else {label: label for label in policies}
    curves = {names[k]: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in evaluations.items()}
    curves.update(paper_curves(result["paper"]))
    plot_rl_steps(curves, f"{cfg.name} meta-test", out / "meta_test_steps.png", cfg.eval_tasks)
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'meta_test_steps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
