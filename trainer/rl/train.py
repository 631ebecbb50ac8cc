"""The MAML-RL meta-training loop: sample a meta-batch, adapt, TRPO meta-update; JSONL log, resumable state.

Each iteration draws `meta_batch` goals, samples `trajectories` trajectories per goal with the meta-policy, takes
the VPG inner step per task, samples as many trajectories with each adapted policy, and makes one TRPO step
through the inner step. Everything random (goals, action noise, initial states) comes from one seeded
torch.Generator whose state is saved with the parameters, so `--resume` continues the uninterrupted run exactly.

`--algorithm pretrained` (the paper's "pretrained" baseline) is the same loop with zero inner steps: each iteration
samples only the pre-update round and makes the same TRPO step on it, the surrogate, KL and line search those of the
policy itself (`meta_update` with the inner lr 0, so theta' = theta exactly and the Jacobian through the "inner step"
is the identity). The best iterate is the one with the best pre-update return, the return it maximizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.policy import PolicyModel, PolicySpec, init_policy
from trainer.rl.baseline import advantages
from trainer.rl.config import RLConfig
from trainer.rl.maml_trpo import MetaBatch, TRPOSettings, trpo_step
from trainer.rl.navigation import Navigation2D
from trainer.rl.sampler import Trajectories, sample_trajectories
from trainer.rl.vpg import adapt
from trainer.train import git_commit

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


def make_env(cfg: RLConfig):
    if cfg.env == "navigation-2d":
        return Navigation2D(horizon=cfg.horizon)
    if cfg.env in ("halfcheetah-vel", "halfcheetah-dir"):  # MuJoCo is imported only for these
        from trainer.rl.halfcheetah import HalfCheetahDir, HalfCheetahVel

        return HalfCheetahVel(horizon=cfg.horizon) if cfg.env == "halfcheetah-vel" else HalfCheetahDir(cfg.horizon)
    raise ValueError(f"env {cfg.env!r}, expected navigation-2d, halfcheetah-vel or halfcheetah-dir")


def policy_spec(cfg: RLConfig, env) -> PolicySpec:
    return PolicySpec(name=cfg.name, env=cfg.env, obs_dim=env.obs_dim, act_dim=env.act_dim, hidden=cfg.hidden_sizes,
                      nonlinearity=cfg.nonlinearity, init_std=cfg.init_std, inner_lr=cfg.inner_lr, steps=1,
                      discount=cfg.discount, baseline="linear-feature", action_low=env.action_low,
                      action_high=env.action_high, baseline_reg=cfg.baseline_reg,
                      normalize_advantages=cfg.normalize_advantages, action_scale=cfg.action_scale)


def trpo_settings(cfg: RLConfig) -> TRPOSettings:
    return TRPOSettings(max_kl=cfg.max_kl, cg_iters=cfg.cg_iters, cg_damping=cfg.cg_damping,
                        ls_max_steps=cfg.ls_max_steps, ls_backtrack_ratio=cfg.ls_backtrack_ratio)


def selection_metric(cfg: RLConfig) -> str:
    """The logged training return the best iterate maximizes: what the algorithm optimizes (SOURCES "select",
    "pretrained.select")."""
    return "return_pre" if cfg.algorithm == "pretrained" else "return_post"


def pretraining_batch(train: Trajectories, train_adv: torch.Tensor) -> MetaBatch:
    """The pretrained baseline's batch: its "validation" round is the pre-update round itself, so the TRPO surrogate
    and KL of `trpo_step` are those of the policy on the trajectories it sampled."""
    return MetaBatch(train, train_adv, train, train_adv)


def meta_update(spec: PolicySpec, params: dict[str, torch.Tensor], batch: MetaBatch, cfg: RLConfig,
                settings: TRPOSettings) -> tuple[dict[str, torch.Tensor], dict]:
    """One outer step: MAML's TRPO through the inner step, or (pretrained) the same TRPO with zero inner steps.

    Zero inner steps is the inner lr 0 without second-order terms: theta' = theta - 0 * grad = theta bit for bit,
    d theta' / d theta = I (maml_trpo's first-order path), so the surrogate, its gradient, the Fisher-vector
    products and the line search are plain TRPO's on `batch.valid` (= the pre-update round, `pretraining_batch`).
    Reusing `trpo_step` keeps one implementation of the trust region for both algorithms.
    """
    if cfg.algorithm == "pretrained":
        return trpo_step(spec, params, batch, 0.0, settings, second_order=False)
    return trpo_step(spec, params, batch, cfg.inner_lr, settings, second_order=not cfg.first_order)


class RLTrainer:
    def __init__(self, cfg: RLConfig, resume: bool = False):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir())
        self.state_dir = self.dir / "state"
        self.env = make_env(cfg)
        self.spec = policy_spec(cfg, self.env)
        self.settings = trpo_settings(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.params = init_policy(self.spec, self.generator)
        self.iteration = 0
        self.train_seconds = 0.0
        self.best = {"return": -float("inf"), "iteration": 0, "params": dict(self.params)}
        self.stop_requested = False  # request_stop(): end after the current meta-iteration, as --max_seconds does
        if resume:
            self._load_state()

    # ---- state ----
    def _save_state(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"iteration": self.iteration, "train_seconds": self.train_seconds, "params": self.params,
                 "best": self.best, "generator": self.generator.get_state(), "config": dataclasses.asdict(self.cfg)}
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_dir / STATE_FILE)

    def _load_state(self):
        path = self.state_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"--resume: no training state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.get("config", {}).get("algorithm", "maml")  # states from before --algorithm: MAML
        if saved != self.cfg.algorithm:
            raise ValueError(f"--resume: the state at {path} was trained with --algorithm {saved}, not "
                             f"{self.cfg.algorithm}; resume it with --algorithm {saved} or use another --out_dir")
        scale = state.get("config", {}).get("action_scale", 1.0)  # states from before the field: 1
        if scale != self.cfg.action_scale:
            raise ValueError(f"--resume: the state at {path} was trained with --action_scale {scale:g}, not "
                             f"{self.cfg.action_scale:g}; resume it with --action_scale {scale:g} or use another "
                             "--out_dir")
        self.iteration, self.train_seconds = state["iteration"], state["train_seconds"]
        self.params, self.best = state["params"], state["best"]
        self.generator.set_state(state["generator"])
        self._truncate_log()

    def _truncate_log(self):
        """Drop log records past the saved state (a run killed between two saves logged iterations it will run
        again), so the resumed log has each iteration once."""
        path = self.state_dir / LOG_FILE
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= self.iteration]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def _log(self, record: dict):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def provenance(self, **extra) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "commit": git_commit(), "iterations": self.iteration,
                "train_seconds": round(self.train_seconds, 1), "best_iteration": self.best["iteration"],
                f"best_train_{selection_metric(self.cfg)}": self.best["return"], "device": "cpu", **extra}

    def policy_model(self, which: str = "best", **provenance) -> PolicyModel:
        params = self.best["params"] if which == "best" else self.params
        return PolicyModel(self.spec, {k: v.detach().clone() for k, v in params.items()},
                           self.provenance(selected=which, **provenance))

    # ---- loop ----
    def sample_meta_batch(self) -> MetaBatch:
        """MAML: the pre-update round, the inner step and the post-update round; pretrained: the pre-update round
        only (`pretraining_batch`), which is all its update reads."""
        cfg, env = self.cfg, self.env
        goals = env.sample_tasks(cfg.meta_batch, self.generator)
        train = sample_trajectories(env, self.spec, self.params, goals, cfg.trajectories, self.generator)
        train_adv = advantages(train, cfg.discount, cfg.baseline_reg, cfg.normalize_advantages)
        if cfg.algorithm == "pretrained":
            return pretraining_batch(train, train_adv)
        fast = adapt(self.spec, self.params, train, train_adv, cfg.inner_lr)
        valid = sample_trajectories(env, self.spec, fast, goals, cfg.trajectories, self.generator)
        valid_adv = advantages(valid, cfg.discount, cfg.baseline_reg, cfg.normalize_advantages)
        return MetaBatch(train, train_adv, valid, valid_adv)

    def request_stop(self) -> None:
        """End after the meta-iteration under way, as if --max_seconds had run out: the state is saved (`python -m
        trainer` calls this on SIGTERM or SIGINT, so a long run is ended early losing nothing but the iteration's
        remainder of time), then the policy and, unless --final_eval false, the evaluation are written."""
        self.stop_requested = True

    def step(self) -> dict:
        batch = self.sample_meta_batch()
        returns = {"return_pre": batch.train.returns().mean().item()}
        if self.cfg.algorithm != "pretrained":
            returns["return_post"] = batch.valid.returns().mean().item()
        score = returns[selection_metric(self.cfg)]
        if score > self.best["return"]:  # the returns of the policy before this update
            self.best = {"return": score, "iteration": self.iteration, "params": dict(self.params)}
        self.params, info = meta_update(self.spec, self.params, batch, self.cfg, self.settings)
        return {**returns, **info}

    def train(self):
        cfg = self.cfg
        print(json.dumps({"config": dataclasses.asdict(cfg), "threads": torch.get_num_threads()}))
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not cfg.progress, desc=cfg.name, unit="it",
                   dynamic_ncols=True)
        start = time.perf_counter()
        while self.iteration < cfg.iterations:
            t0 = time.perf_counter()
            record = {"iteration": self.iteration + 1, **self.step()}
            self.iteration += 1
            self.train_seconds += time.perf_counter() - t0
            record["seconds"] = round(self.train_seconds, 2)
            self._log(record)
            bar.update(1)
            bar.set_postfix(**{k[len("return_"):]: f"{record[k]:.1f}" for k in ("return_pre", "return_post")
                               if k in record}, kl=f"{record['kl_after']:.4f}")
            out_of_time = self.stop_requested or (cfg.max_seconds > 0
                                                  and time.perf_counter() - start > cfg.max_seconds)
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations or out_of_time:
                self._save_state()
            if out_of_time:
                break
        bar.close()
        return self
