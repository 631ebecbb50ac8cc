"""`python -m server.rl_demo`: a client that controls agents (2D navigation, half-cheetah) adapts their policy
through the wire.

For each goal (drawn as the trainer's evaluation draws them: trainer.rl.evaluate's seed and order), the client
1. asks the server for the action distribution of the meta-policy (Predict with `model` and no adaptation id) at
   every step of B trajectories it runs in the policy's environment (trainer.rl.navigation, or
   trainer.rl.halfcheetah on MuJoCo; the client samples a ~ N(mean, std^2) and the environment clips it),
2. sends those trajectories to Adapt (one VPG step on the server; lr 0.1, then 0.05 with from_adaptation_id for the
   later steps, as the paper and the trainer's evaluation),
3. acts with the adapted policy (Predict with the new adaptation id) to collect the next B trajectories, and repeats
   for --steps steps.
It prints the mean return per step with its 95% CI beside the paper's (Finn et al. 2017, 2D navigation, MAML:
-40.41 / -11.68 / -3.33 / -3.23; half-cheetah: values read off its Fig. 5) and the trainer's own evaluation of the
bundled checkpoint (TRAINER_RESULTS: models/zoo/<env>.pt is that run's best iterate). With the defaults (40 goals,
20 trajectories, seed 1000003, the config's horizon) the goals and the action noise are the trainer's evaluation's,
and both run the same task-stacked forward, so the two rows agree (goal by goal on 2D navigation; on half-cheetah the
means, as rl_demo.md explains). `--horizon H` runs shorter episodes (a quick look; no trainer or paper row then).
`--model` picks the policy (navigation-2d, halfcheetah-vel, ...); its environment is the one the server names in
ModelInfo.preprocessing. `--out DIR` writes rl_demo.json, rl_demo.md and rl_demo.png (navigation: the trajectories
of a few goals before and after adaptation; half-cheetah: their forward velocity over time against the goal).
Without --address it starts `python -m server` on models/zoo and stops it at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from server.client import FastAdaptClient, add_connection_args, connection_kwargs
from server.demo import hardware
from server.launch import REPO_ROOT, ServerProcess
from trainer.rl.config import ENVIRONMENTS, RL_CONFIGS
from trainer.rl.evaluate import TEST_SEED, step_lrs
from trainer.rl.main import PAPER, paper_cells
from trainer.rl.sampler import Trajectories, rollout
from trainer.rl.train import make_env

# The trainer's evaluation of each bundled policy (models/zoo/<env>.pt is that run's best iterate)
TRAINER_RESULTS = {
    "navigation-2d": REPO_ROOT / "docs" / "results" / "navigation-2d-scaled" / "results.json",
    "halfcheetah-vel": REPO_ROOT / "docs" / "results" / "halfcheetah-vel" / "results.json",
    "halfcheetah-dir": REPO_ROOT / "docs" / "results" / "halfcheetah-dir" / "results.json",
}
TRAINER_ROW = "MAML (best iterate)"  # results.json -> training: the bundled policy is the best iterate
FORWARD_VELOCITY = 8  # half-cheetah observation: qpos[1:] (8 values), then qvel; qvel[0] is the forward velocity


def model_env(info: dict) -> str:
    """The environment the server says a policy acts in (ModelInfo.preprocessing starts with it)."""
    env = info["preprocessing"].split(":", 1)[0]
    if env not in ENVIRONMENTS:
        raise ValueError(f"model {info['name']} acts in {env[:80]!r}, expected one of {', '.join(ENVIRONMENTS)}")
    return env


class WirePolicies:
    """One policy per goal, all served: the meta-policy (id "") or each goal's latest adaptation."""

    def __init__(self, client: FastAdaptClient, model: str, goals: int, pool: ThreadPoolExecutor):
        self.client, self.model, self.pool = client, model, pool
        self.ids = [""] * goals
        self.calls, self.seconds = 0, 0.0

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [T, B, obs_dim] -> mean [T, B, act_dim], log_std [T, 1, act_dim], one concurrent Predict per goal."""
        start = time.perf_counter()
        out = list(self.pool.map(lambda i: self.client.act(obs[i].numpy(), adaptation_id=self.ids[i],
                                                           model=self.model if not self.ids[i] else ""),
                                 range(len(self.ids))))
        self.calls += len(out)
        self.seconds += time.perf_counter() - start
        return (torch.from_numpy(np.stack([a.mean for a in out])),
                torch.from_numpy(np.stack([a.log_std for a in out])).unsqueeze(1))

    def adapt(self, traj: Trajectories, lr: float) -> list:
        """One Adapt per goal on its trajectories, from its current policy; the new ids replace the old."""
        def one(i):
            return self.client.adapt_policy(self.model, traj.observations[i].numpy(), traj.actions[i].numpy(),
                                            traj.rewards[i].numpy(), traj.lengths[i].numpy(), inner_lr=lr,
                                            from_adaptation_id=self.ids[i])

        adapted = list(self.pool.map(one, range(len(self.ids))))
        self.ids = [a.adaptation_id for a in adapted]
        return adapted


def sample_through_the_wire(env, policies: WirePolicies, goals: torch.Tensor, batch: int,
                            generator: torch.Generator) -> Trajectories:
    """trainer.rl.sampler.sample_trajectories with the served policies: the same loop, the same noise draws."""
    return rollout(env, policies.act, goals, batch, generator)


def positions(traj: Trajectories, goal: int) -> list[np.ndarray]:
    """Each trajectory's path from the origin: [length + 1, 2] (an observation is the position before the step)."""
    paths = []
    for b in range(traj.lengths.shape[1]):
        n = int(traj.lengths[goal, b])
        obs = traj.observations[goal, b, :n].numpy()
        last = obs[-1] + np.clip(traj.actions[goal, b, n - 1].numpy(), -0.1, 0.1)
        paths.append(np.vstack([obs, last]))
    return paths


def velocities(traj: Trajectories, goal: int) -> list[np.ndarray]:
    """Each half-cheetah trajectory's forward velocity (qvel[0]) at every step: [length]."""
    return [traj.observations[goal, b, : int(traj.lengths[goal, b]), FORWARD_VELOCITY].numpy()
            for b in range(traj.lengths.shape[1])]


def run(client: FastAdaptClient, model: str, goals: int, trajectories: int, steps: int, seed: int,
        plot_goals: int, progress: bool = True, horizon: int = 0) -> tuple[dict, list]:
    """The demo's rounds; `horizon` 0 runs the episodes as the policy's config trains and evaluates them."""
    info = client.get_model(model)
    if info["kind"] != "policy":
        raise ValueError(f"model {model} is a {info['kind']}, expected a policy (ListModels says which are)")
    env_name = model_env(info)
    cfg = RL_CONFIGS[env_name]  # the environment as its config trains and evaluates it (horizon)
    env = make_env(dataclasses.replace(cfg, horizon=horizon) if horizon else cfg)
    keep = positions if env_name == "navigation-2d" else velocities
    generator = torch.Generator().manual_seed(seed)
    tasks = env.sample_tasks(goals, generator)
    lrs = step_lrs(info["default_inner_lr"], info["default_inner_lr"] / 2, steps)
    per_step, kept, adapt_ms = [], [], []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(goals, 64)) as pool:
        policies = WirePolicies(client, model, goals, pool)
        for s in tqdm(range(steps + 1), desc="rounds (sample, adapt)", disable=not progress):
            traj = sample_through_the_wire(env, policies, tasks, trajectories, generator)
            per_step.append(traj.returns().mean(1))
            kept.append([keep(traj, g) for g in range(min(plot_goals, goals))])
            if s < steps:
                adapted = policies.adapt(traj, lrs[s])
                adapt_ms.append(float(np.median([a.timings["total_ms"] for a in adapted])))
    wall = time.perf_counter() - start
    record = {
        "model": model, "env": env_name, "goals": goals, "trajectories": trajectories, "steps": steps, "lrs": lrs,
        "seed": seed, "horizon": env.horizon, "config_horizon": cfg.horizon,
        "mean": [r.mean().item() for r in per_step],
        "ci95": [1.96 * r.std(unbiased=False).item() / math.sqrt(goals) for r in per_step],
        "per_goal": [[round(x, 3) for x in r.tolist()] for r in per_step],
        "goal_positions": [[round(v, 4) for v in g] for g in tasks.tolist()],
        "wall_s": round(wall, 2), "predict_calls": policies.calls,
        "predict_ms_per_round_trip_step": round(1e3 * policies.seconds / (policies.calls / goals), 2),
        "adapt_ms_median_per_step": [round(v, 2) for v in adapt_ms],
        "model_info": {k: info[k] for k in ("kind", "observation_size", "action_size", "discount", "baseline",
                                            "default_inner_lr", "action_low", "action_high")},
    }
    return record, kept


def trainer_evaluation(env: str) -> dict | None:
    path = TRAINER_RESULTS[env]
    if not path.is_file():
        return None
    row = json.loads(path.read_text()).get("evaluations", {}).get(TRAINER_ROW)
    return None if row is None else {"row": TRAINER_ROW, "per_task": row["per_task"],
                                     **{k: row[k] for k in ("tasks", "trajectories", "lrs", "seed", "mean", "ci95")}}


def full_episodes(record: dict) -> bool:
    """Whether the demo ran the episodes its policy's config trains and evaluates (the trainer's and the paper's)."""
    return record["horizon"] == record["config_horizon"]


def table(record: dict) -> str:
    steps = record["steps"]
    head = "| | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in range(steps + 1)) + " |"
    rows = [head, "|---" * (steps + 2) + "|"]
    cells = [f"{m:.2f} ± {c:.2f}" for m, c in zip(record["mean"], record["ci95"])]
    rows.append(f"| through the wire (this demo, {record['goals']} goals) | " + " | ".join(cells) + " |")
    trainer = record.get("trainer")
    if trainer:
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in zip(trainer["mean"], trainer["ci95"])][: steps + 1]
        rows.append(f"| trainer's evaluation ({trainer['row']}, {trainer['tasks']} goals) | " + " | ".join(cells)
                    + " |")
    if full_episodes(record):  # the paper's episodes
        paper = PAPER[record["env"]]
        label = "paper (Finn et al. 2017, MAML" + (", Fig. 5, read off, approximate)" if paper.get("approximate")
                                                   else ")")
        rows.append(f"| {label} | " + " | ".join(paper_cells(paper)[: steps + 1]) + " |")
    return "\n".join(rows)


def plot(kept: list, record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if record["env"] != "navigation-2d":
        return plot_cheetah(kept, record, path, plt)
    goals = len(kept[0])
    rounds = [0, len(kept) - 1]
    fig, axes = plt.subplots(len(rounds), goals, figsize=(3.2 * goals, 6.4), squeeze=False)
    for r, s in enumerate(rounds):
        for g in range(goals):
            ax = axes[r][g]
            for path_xy in kept[s][g]:
                ax.plot(path_xy[:, 0], path_xy[:, 1], lw=0.7, alpha=0.6)
            gx, gy = record["goal_positions"][g]
            ax.plot([0], [0], "ko", ms=4)
            ax.plot([gx], [gy], "r*", ms=12)
            ax.set_xlim(-0.8, 0.8)
            ax.set_ylim(-0.8, 0.8)
            ax.set_aspect("equal")
            ax.set_title(f"goal {g}: {'meta-policy' if s == 0 else f'after {s} steps'}\n"
                         f"return {record['per_goal'][s][g]:.1f}", fontsize=9)
    fig.suptitle(f"2D navigation through the wire: {record['trajectories']} trajectories per goal, before and after "
                 "adaptation (black: start, red: goal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cheetah(kept: list, record: dict, path: Path, plt) -> None:
    """Forward velocity over time of each goal's trajectories, meta-policy (grey) and after the last step (colour)."""
    goals, last = len(kept[0]), len(kept) - 1
    fig, axes = plt.subplots(1, goals, figsize=(3.4 * goals, 3.4), squeeze=False, sharey=True)
    for g in range(goals):
        ax = axes[0][g]
        for s, style in ((0, {"color": "0.6", "alpha": 0.5}), (last, {"color": "C0", "alpha": 0.5})):
            for v in kept[s][g]:
                ax.plot(np.arange(len(v)), v, lw=0.6, **style)
        goal = record["goal_positions"][g][0]
        target = goal if record["env"] == "halfcheetah-vel" else None
        if target is not None:
            ax.axhline(target, color="r", ls="--", lw=1)
        what = f"goal {goal:.2f} m/s" if target is not None else ("forward" if goal > 0 else "backward")
        ax.set_title(f"{what}: return {record['per_goal'][0][g]:.0f} -> {record['per_goal'][last][g]:.0f}",
                     fontsize=9)
        ax.set_xlabel("time step")
    axes[0][0].set_ylabel("forward velocity qvel[0] (m/s)")
    fig.suptitle(f"{record['model']} through the wire: {record['trajectories']} trajectories per goal, meta-policy "
                 f"(grey) and after {last} step{'s' if last != 1 else ''} (blue)"
                 + (", goal red" if record["env"] == "halfcheetah-vel" else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    return "\n".join([
        f"### rl_demo: {record['model']} adapted through the wire, return per adaptation step (mean ± 95% CI)", "",
        table(record), "",
        f"{record['goals']} goals x {record['trajectories']} trajectories per step, adaptation lrs {record['lrs']}, "
        f"seed {record['seed']}, episodes of {record['horizon']} steps"
        + ("" if full_episodes(record) else
           f" (the config trains and evaluates {record['config_horizon']}: no trainer or paper row)")
        + f"; {record['predict_calls']} Predict calls, {record['wall_s']} s wall on "
        f"{record['hardware']} (server: {record['server']}).", "",
        "```", record["command"], "```", "",
        "Each round the client runs its agents with the served policy (Predict at every time step; it samples the "
        "actions, the environment clips them), then sends each goal's trajectories to Adapt, starting from that "
        "goal's previous adaptation (from_adaptation_id). The trainer's row is its evaluation of the same "
        "checkpoint on the same goals and noise (when the demo runs its defaults)"
        + (f": every goal's return per step matches it within {record['max_abs_diff_per_goal_vs_trainer']:.3g} "
           "(returns rounded to 3 decimals)." if "max_abs_diff_per_goal_vs_trainer" in record else ".")
        + ("" if record["env"] == "navigation-2d" else
           " The served forward and VPG step run on the tasks that share a batch on the server, the trainer's on "
           "all 40 at once; float32 matmuls may round differently with the batch size and memory alignment (MKL "
           "on an AMD EPYC differs in the last bit before adaptation, an Intel Xeon did not), and the adapted "
           "weights differ in the last bits (within 1e-5, tests/server/test_cheetah_serving.py). 200 steps of "
           "contact-rich MuJoCo physics amplify that into a different trajectory: per goal the returns differ, the "
           "means agree within a fraction of the CI; over short episodes (--horizon 25) they agree goal by goal."),
        ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.rl_demo", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="", help="a running server (default: start one on --model-dir)")
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "zoo")
    p.add_argument("--model", default="navigation-2d")
    p.add_argument("--goals", type=int, default=40, help="goals or tasks (the trainer's evaluation: 40)")
    p.add_argument("--trajectories", type=int, default=20, help="per goal and step")
    p.add_argument("--steps", type=int, default=3, help="adaptation steps")
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--plot-goals", type=int, default=4)
    p.add_argument("--horizon", type=int, default=0,
                   help="steps per episode (default 0: the policy's config's, as the trainer evaluates it)")
    p.add_argument("--out", type=Path, default=None, help="write rl_demo.json, rl_demo.md, rl_demo.png here")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--progress", choices=("true", "false"), default="true")
    add_connection_args(p)
    args = p.parse_args(argv)
    if args.goals < 1 or args.trajectories < 1 or args.steps < 0 or args.horizon < 0:
        p.error(f"--goals {args.goals} and --trajectories {args.trajectories} must be >= 1, --steps {args.steps} and "
                f"--horizon {args.horizon} >= 0")
    kwargs = connection_kwargs(args)
    with tempfile.TemporaryDirectory(prefix="fastadapt-rl-demo-") as scratch:
        server = None
        if not args.address:
            server = ServerProcess(args.model_dir, "--warmup", "none", log_path=Path(scratch) / "server.log",
                                   client_kwargs=kwargs)
        try:
            address = args.address or server.address
            with FastAdaptClient(address, timeout=args.timeout, **kwargs) as client:
                try:
                    record, kept = run(client, args.model, args.goals, args.trajectories, args.steps, args.seed,
                                       args.plot_goals, args.progress == "true", args.horizon)
                except ValueError as e:  # not a policy, or one of an environment this demo does not run
                    p.error(str(e)[:300])
        finally:
            if server is not None:
                server.stop()
    record["server"] = (f"{server.info.get('device')} / {server.info.get('backend')}" if server is not None
                        else address)
    machine = hardware(str(server.info.get("device", "cpu")) if server is not None else "cpu")
    record["hardware"] = f"{machine['cpu']} ({machine['cpus']} CPUs, load average {machine['load_average']})"
    record["command"] = "python -m server.rl_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    record["paper"] = PAPER[record["env"]]
    # the trainer evaluated the config's episodes: a demo of other lengths has nothing to compare with
    record["trainer"] = trainer = trainer_evaluation(record["env"]) if full_episodes(record) else None
    per_task = trainer.pop("per_task") if trainer is not None else None
    same = trainer is not None and all(trainer[k] == record[k] for k in ("seed", "trajectories", "lrs")) and \
        trainer["tasks"] == record["goals"]
    if same:  # the same goals and noise: every goal's returns should match the trainer's
        record["max_abs_diff_per_goal_vs_trainer"] = max(
            abs(a - b) for s in range(record["steps"] + 1) for a, b in zip(record["per_goal"][s], per_task[s]))
    print(table(record))
    print(f"{record['goals']} goals x {record['trajectories']} trajectories, lrs {record['lrs']}: "
          f"{record['predict_calls']} Predict calls in {record['wall_s']} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rl_demo.json").write_text(json.dumps(record, indent=1))
        (args.out / "rl_demo.md").write_text(markdown(record))
        plot(kept, record, args.out / "rl_demo.png")
        print(f"wrote {args.out}/rl_demo.json, rl_demo.md, rl_demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
