"""Named MAML-RL configurations, every setting with its source, and `--key value` overrides.

Sources: "paper" = Finn, Abbeel & Levine 2017 (section 5.3, appendix A.2); "cbfinn" = cbfinn/maml_rl at 9c8e2eb
(maml_examples/maml_trpo_point.py, test_maml_point.py, sandbox/rocky/tf/algos; for the half-cheetah:
cluster_maml_trpo_cheetah.py, test_maml_cheetah.py, rllab/envs/mujoco/half_cheetah_env_rand*.py); "pytorch-maml-rl" =
tristandeleu/pytorch-maml-rl at 21d4ba1 (configs/maml/2d-navigation.yaml, halfcheetah-vel.yaml, halfcheetah-dir.yaml,
maml_rl/). Where they differ, the source column says which one we follow and what the others use. The half-cheetah
configs' own settings are the `halfcheetah.*` entries.

`--algorithm pretrained` trains the paper's "pretrained" baseline with the same loop (trainer/rl/train.py): one
policy trained on the pre-update trajectories of every meta-batch, without the inner step, then adapted at meta-test
with exactly MAML's VPG steps (`SOURCES["algorithm"]`, `SOURCES["pretrained.*"]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from trainer.config import _parse_value


@dataclass
class RLConfig:
    name: str = "navigation-2d"
    env: str = "navigation-2d"
    algorithm: str = "maml"  # maml | pretrained: TRPO on the pre-update trajectories, no inner step (paper baseline)
    hidden: int = 100
    layers: int = 2
    nonlinearity: str = "relu"
    init_std: float = 1.0
    action_scale: float = 1.0  # policy outputs in units of this (rllab normalize): mean = s * MLP, std = s * exp(.)
    inner_lr: float = 0.1
    eval_lr: float = 0.05  # the inner lr of adaptation steps after the first at evaluation
    discount: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True
    baseline_reg: float = 1e-5
    meta_batch: int = 20
    trajectories: int = 20
    horizon: int = 100
    iterations: int = 500
    first_order: bool = False
    max_kl: float = 1e-2
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8
    eval_tasks: int = 40
    eval_steps: int = 3
    eval_trajectories: int = 20
    select: str = "best"  # evaluate the iterate with the best post-adaptation training return (paper) | last
    seed: int = 0
    threads: int = 1  # torch.set_num_threads (0: leave torch's default)
    checkpoint_every: int = 10
    max_seconds: float = 0.0  # stop (state saved, evaluated) after this many seconds of this invocation; 0 = none
    out_dir: str = ""  # default runs/<name>
    final_eval: bool = True
    random_baseline: bool = True  # also evaluate an untrained policy adapted the same way (the paper's baseline)
    progress: bool = True

    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.name}"

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return (self.hidden,) * self.layers


SOURCES = {
    "algorithm": "maml: paper 5.3, MAML-TRPO through one VPG inner step. pretrained: paper 5.3, Fig. 4-5 "
                 "('pretraining one policy on all of the tasks and then fine-tuning'): the same TRPO step (surrogate, "
                 "KL(old || new), conjugate gradient, line search) on the pre-update trajectories of each meta-batch, "
                 "i.e. MAML-TRPO with zero inner steps, then meta-tested with MAML's VPG steps. cbfinn's released "
                 "code trains it as MAMLTRPO(use_maml=False) ('maml0' in test_maml_point.py): the pre-update "
                 "surrogate -mean(log pi * A) of the same run, but one step of rllab's FirstOrderOptimizer (Adam, lr "
                 "1e-3, one full-batch epoch) instead of the trust region, and the post-update round is still "
                 "sampled (unused); here TRPO, so the two algorithms differ only in the inner step",
    "env": "cbfinn point_env_randgoal.py / pytorch-maml-rl navigation.py (see trainer/rl/navigation.py)",
    "hidden": "paper A.2, cbfinn: 2 hidden layers of 100 (pytorch-maml-rl's yaml: 64, 64 tanh)",
    "nonlinearity": "paper A.2, cbfinn: ReLU",
    "init_std": "cbfinn (rllab GaussianMLPPolicy init_std=1), pytorch-maml-rl NormalMLPPolicy init_std=1.0",
    "action_scale": "navigation: 0.1, cbfinn maml_trpo_point.py: TfEnv(normalize(PointEnvRandGoal())), rllab's "
                    "normalize maps a policy output in [-1, 1] to the action box [-0.1, 0.1], i.e. the policy is "
                    "parameterized in units of 0.1 (its init_std 1 is 0.1 in velocity units); the environment still "
                    "receives and clips velocities, and the wire carries them (models.policy.PolicySpec.action_scale)"
                    ". pytorch-maml-rl: no rescaling (1: init std 1 against a 0.1 speed limit, noise-limited near the "
                    "goal, -9.4 after 3 steps here). Half-cheetah: 1 (rllab normalize is the identity on [-1, 1])",
    "inner_lr": "paper 5.3 and pytorch-maml-rl fast-lr: 0.1, in the policy's own (action_scale) units (cbfinn's "
                "released script: 0.5 in the same normalized units; measured here, 100 iterations each: 0.1 reaches "
                "-3.58 / -3.73 after 2 / 3 steps, 0.5 -5.64 / -6.51, docs/results/navigation-2d-scaled*/)",
    "eval_lr": "paper 5.3: halve the learning rate after the first step (cbfinn test_maml_point.py: 0.5 then 0.25)",
    "discount": "cbfinn batch_maml_polopt discount=0.99, pytorch-maml-rl gamma 0.99",
    "gae_lambda": "cbfinn gae_lambda=1, pytorch-maml-rl gae-lambda 1.0: advantages = discounted returns - baseline",
    "normalize_advantages": "cbfinn center_adv=True (per task over all samples; followed), pytorch-maml-rl "
                            "normalize=True (per task, per trajectory weighted)",
    "baseline_reg": "rllab/pytorch-maml-rl LinearFeatureBaseline reg_coeff 1e-5, x10 on failure (5 tries)",
    "meta_batch": "paper A.2: 20 tasks for 2D navigation; pytorch-maml-rl meta-batch-size 20 (cbfinn script: 40)",
    "trajectories": "paper 5.3 (20 trajectories), cbfinn fast_batch_size 20, pytorch-maml-rl fast-batch-size 20",
    "horizon": "cbfinn max_path_length 100, pytorch-maml-rl max_episode_steps 100",
    "iterations": "paper A.2: up to 500 meta-iterations, the best iterate evaluated (cbfinn script n_itr=100, "
                  "pytorch-maml-rl num-batches 500)",
    "first_order": "paper: second-order MAML through the inner step (pytorch-maml-rl first-order false)",
    "max_kl": "paper A.2 and cbfinn meta_step_size 0.01, pytorch-maml-rl max-kl 1e-2",
    "cg_iters": "pytorch-maml-rl cg-iters 10 (rllab ConjugateGradientOptimizer default 10)",
    "cg_damping": "pytorch-maml-rl cg-damping 1e-5 (rllab reg_coeff 1e-5)",
    "ls_max_steps": "pytorch-maml-rl ls-max-steps 15 (rllab max_backtracks 15)",
    "ls_backtrack_ratio": "pytorch-maml-rl ls-backtrack-ratio 0.8 (rllab backtrack_ratio 0.8)",
    "eval_tasks": "paper / cbfinn test_maml_point.py: 40 test goals",
    "eval_steps": "paper Table 4: returns after 0, 1, 2, 3 steps",
    "eval_trajectories": "issue 13: 20 fresh trajectories per step (cbfinn's test script: batch_size 4000 = 40)",
    "select": "paper A.2: the iterate with the best average return during training",
    "kl_direction": "KL(old || new), cbfinn's kl_sym(old, new) and TRPO's definition (pytorch-maml-rl: KL(new || "
                    "old); the same Hessian at the old policy)",
    "surrogate_mean": "mean over each task's steps taken, then over tasks (cbfinn tf.reduce_mean over the task's "
                      "samples; pytorch-maml-rl averages per trajectory first)",
    # ---- --algorithm pretrained (trainer/rl/train.py) ----
    "pretrained.sampling": "one round per meta-iteration: meta_batch tasks x trajectories trajectories with the "
                           "policy itself (MAML samples that round and as many with the adapted policies); the TRPO "
                           "ratio, KL and line search are those of the pre-update policy on it",
    "pretrained.select": "paper A.2 ('the best average return during training'): for pretraining, the mean return "
                         "of the pre-update round, the only return it samples and the one it maximizes (MAML: the "
                         "post-adaptation return)",
    # ---- halfcheetah-vel / halfcheetah-dir (trainer/rl/halfcheetah.py, docs/results/halfcheetah/README.md) ----
    "halfcheetah.env": "gymnasium HalfCheetah-v5 physics (model, frame_skip 5, dt 0.05, reset noise, 17-value "
                       "observation without x) with pytorch-maml-rl's HalfCheetahVel/DirEnv rewards: velocity = "
                       "x displacement of qpos[0] / dt, ctrl cost 0.5 * 1e-1 * sum(clip(a)^2), no termination; "
                       "goal velocity ~ U[0, 2] (paper 5.3, cbfinn post-ICML sample_goals), direction +-1 with "
                       "probability 1/2 (pytorch-maml-rl; cbfinn: U[0, 2] < 1 -> backward)",
    "halfcheetah.actions": "the policy acts in the simulator's units, clipped to [-1, 1] (cbfinn: rllab normalize is "
                           "the identity on [-1, 1]; pytorch-maml-rl: normalization_scale 10, policy output in "
                           "[-10, 10] mapped to [-1, 1], so its init_std 1 is 0.1 here)",
    "halfcheetah.hidden": "paper A.2 and cbfinn cluster_maml_trpo_cheetah.py: (100, 100) ReLU (pytorch-maml-rl's "
                          "yaml: 64, 64 tanh)",
    "halfcheetah.init_std": "cbfinn (MAMLGaussianMLPPolicy init_std 1 in [-1, 1] action units); pytorch-maml-rl 1.0 "
                            "in its x10 action units",
    "halfcheetah.inner_lr": "paper 5.3 (alpha 0.1), cbfinn fast_lr 0.1, pytorch-maml-rl fast-lr 0.1",
    "halfcheetah.eval_lr": "paper A.2: 0.05 after the first step (cbfinn test_maml_cheetah.py: VPG 0.1, then "
                           "0.5 * 0.1)",
    "halfcheetah.meta_batch": "paper A.2: 40 tasks for locomotion; cbfinn cluster script [40, 80]; pytorch-maml-rl "
                              "meta-batch-size 40",
    "halfcheetah.trajectories": "paper 5.3: 20 rollouts per gradient step; cbfinn fast_batch_size 20 (its test "
                                "checkpoint: fbs10); pytorch-maml-rl fast-batch-size 20",
    "halfcheetah.horizon": "paper 5.3: H = 200; cbfinn max_path_length 200 (pytorch-maml-rl's yaml: "
                           "max_episode_steps 100, its wrapper's default 200)",
    "halfcheetah.max_kl": "paper A.2, cbfinn meta_step_size 0.01, pytorch-maml-rl max-kl 1e-2 (cg-iters 10, "
                          "cg-damping 1e-5, ls 15 x 0.8 as navigation)",
    "halfcheetah.iterations": "paper A.2: up to 500 meta-iterations, best iterate evaluated (cbfinn n_itr 1000; "
                              "pytorch-maml-rl num-batches 500)",
    "halfcheetah.eval": "cbfinn test_maml_cheetah.py: 40 test goals, batch_size 4000 = 20 trajectories of 200 steps "
                        "per step, 3 VPG steps (paper Fig. 5: returns after 0-3 steps)",
    "halfcheetah.checkpoint_every": "5 meta-iterations (about 1 min each on one core): a session cut short loses "
                                    "little; --max_seconds also saves when it stops",
}

RL_CONFIGS: dict[str, RLConfig] = {
    # cbfinn's parameterization (SOURCES["action_scale"]): meta-test -34.10 / -10.72 / -3.58 / -3.73 against the
    # paper's -40.41 / -11.68 / -3.33 / -3.23 (docs/results/navigation-2d-scaled/); 1 gave -35.14 / -14.87 / -10.40 /
    # -9.40 (docs/results/navigation-2d/)
    "navigation-2d": RLConfig(action_scale=0.1),
    # the locomotion settings (SOURCES["halfcheetah.*"]); everything else as navigation-2d
    "halfcheetah-vel": RLConfig(name="halfcheetah-vel", env="halfcheetah-vel", meta_batch=40, trajectories=20,
                                horizon=200, inner_lr=0.1, eval_lr=0.05, max_kl=1e-2, iterations=500,
                                checkpoint_every=5),
    "halfcheetah-dir": RLConfig(name="halfcheetah-dir", env="halfcheetah-dir", meta_batch=40, trajectories=20,
                                horizon=200, inner_lr=0.1, eval_lr=0.05, max_kl=1e-2, iterations=500,
                                checkpoint_every=5),
}

ENVIRONMENTS = ("navigation-2d", "halfcheetah-vel", "halfcheetah-dir")
ALGORITHMS = ("maml", "pretrained")
ALGORITHM_LABELS = {"maml": "MAML", "pretrained": "pretrained"}  # how results tables name a run's policy


def check_config(cfg: RLConfig) -> RLConfig:
    if cfg.env not in ENVIRONMENTS:
        raise ValueError(f"--env {cfg.env!r}, expected one of {ENVIRONMENTS}")
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm {cfg.algorithm!r}, expected maml or pretrained")
    if cfg.algorithm == "pretrained" and cfg.first_order:
        raise ValueError("--first_order true with --algorithm pretrained, expected false: pretraining has no inner "
                         "step to differentiate through")
    if cfg.select not in ("best", "last"):
        raise ValueError(f"--select {cfg.select!r}, expected best or last")
    if cfg.nonlinearity not in ("relu", "tanh"):
        raise ValueError(f"--nonlinearity {cfg.nonlinearity!r}, expected relu or tanh")
    if cfg.gae_lambda != 1.0:
        raise ValueError(f"--gae_lambda {cfg.gae_lambda}, expected 1.0 (the only value implemented: returns - "
                         "baseline, as both references use)")
    if not (math.isfinite(cfg.action_scale) and cfg.action_scale > 0):
        raise ValueError(f"--action_scale {cfg.action_scale}, expected a finite value > 0")
    for key in ("meta_batch", "trajectories", "horizon", "hidden", "layers", "eval_tasks", "eval_trajectories"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} {getattr(cfg, key)}, expected >= 1")
    return cfg


def rl_config_from_args(argv: list[str] | None = None) -> tuple[RLConfig, argparse.Namespace]:
    """`CONFIG [--resume] [--zoo PATH] [--key value ...]`: a named RL config with any field overridden."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Meta-train a fastadapt policy (MAML-RL).")
    parser.add_argument("config", choices=sorted(RL_CONFIGS), help="named configuration")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last state")
    parser.add_argument("--zoo", default="", help="also write the evaluated policy to this file (models/zoo/x.pt)")
    args, rest = parser.parse_known_args(argv)
    cfg = dataclasses.replace(RL_CONFIGS[args.config])
    fields = {f.name for f in dataclasses.fields(RLConfig)}
    if len(rest) % 2:
        parser.error(f"overrides are '--key value' pairs, got {rest!r}")
    for key, raw in zip(rest[::2], rest[1::2]):
        name = key[2:].replace("-", "_")
        if not key.startswith("--") or name not in fields:
            parser.error(f"unknown config key {key!r}; expected one of {sorted(fields)}")
        try:
            setattr(cfg, name, _parse_value(raw, getattr(cfg, name)))
        except ValueError as exc:
            parser.error(f"{key}: {exc}")
    try:
        check_config(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, args
