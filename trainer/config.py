"""Named training configurations (the paper's protocol), a dataclass with `--key value` overrides."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    name: str = "omniglot-5w1s"
    dataset: str = "omniglot"  # omniglot | miniimagenet | sinusoid
    arch: str = "conv4-omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 1  # query examples per class in meta-training (cbfinn/maml: K for Omniglot)
    eval_queries: int = 1  # query examples per class at meta-test
    algorithm: str = "maml"  # maml (second order) | fomaml | metasgd
    inner_lr: float = 0.4
    inner_steps: int = 1  # inner SGD steps in meta-training
    eval_steps: int = 10  # meta-test accuracy is reported after every inner step 0..eval_steps
    test_steps: int = 3  # the step count the paper reports; the serving default
    # Inner loss: sum of the support set's cross-entropy divided by K (= N x mean CE), as cbfinn/maml, so the paper's
    # inner learning rates mean what they meant there. Regression: mean squared error.
    inner_loss: str = "sum/K"
    meta_batch: int = 32
    meta_lr: float = 1e-3
    iterations: int = 60_000
    clip_grad: float = 0.0  # clip each meta-gradient element to [-c, c] (cbfinn: 10 for mini-ImageNet); 0 = off
    bn_policy: str = "transductive"  # query normalization in meta-training/eval (the paper's); serving uses 'support'
    serve_bn_policy: str = "support"
    split: str = "background"  # paper | background (Omniglot)
    val_classes: int = 100  # classes of the meta-train split held out for validation
    rotate: bool = True  # cbfinn: each class in a task gets a random multiple of 90 degrees (meta-train only)
    seed: int = 0
    device: str = "auto"
    cuda_graph: bool = True  # capture the whole meta-iteration (inner loop, meta-gradient, Adam) in one CUDA graph
    val_every: int = 1000
    val_tasks: int = 200
    eval_tasks: int = 600
    eval_chunk: int = 100  # tasks adapted at once during evaluation
    checkpoint_every: int = 2000
    log_every: int = 100
    out_dir: str = ""  # default runs/<name>
    data_root: str = ""  # default: $FASTADAPT_OMNIGLOT or ../shared/data/omniglot
    hidden: int = 0  # conv filters (0: the architecture's default)
    max_seconds: float = 0.0  # stop (checkpointed, evaluated) after this many seconds of this invocation; 0 = none
    final_eval: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def second_order(self) -> bool:
        return self.algorithm in ("maml", "metasgd")

    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.name}"


def _omniglot(name, ways, shots, inner_lr, steps, meta_batch):
    return TrainConfig(name=name, ways=ways, shots=shots, queries=shots, eval_queries=shots, inner_lr=inner_lr,
                       inner_steps=steps, test_steps=3 if ways == 5 else 5, meta_batch=meta_batch)


CONFIGS: dict[str, TrainConfig] = {
    "omniglot-5w1s": _omniglot("omniglot-5w1s", 5, 1, 0.4, 1, 32),
    "omniglot-5w5s": _omniglot("omniglot-5w5s", 5, 5, 0.4, 1, 32),
    "omniglot-20w1s": _omniglot("omniglot-20w1s", 20, 1, 0.1, 5, 16),
    "omniglot-20w5s": _omniglot("omniglot-20w5s", 20, 5, 0.1, 5, 16),
    "miniimagenet-5w1s": TrainConfig(
        name="miniimagenet-5w1s", dataset="miniimagenet", arch="conv4-miniimagenet", ways=5, shots=1, queries=15,
        eval_queries=15, inner_lr=0.01, inner_steps=5, eval_steps=10, test_steps=10, meta_batch=4, clip_grad=10.0,
        rotate=False, split="ravi", val_classes=0),
    "miniimagenet-5w5s": TrainConfig(
        name="miniimagenet-5w5s", dataset="miniimagenet", arch="conv4-miniimagenet", ways=5, shots=5, queries=15,
        eval_queries=15, inner_lr=0.01, inner_steps=5, eval_steps=10, test_steps=10, meta_batch=4, clip_grad=10.0,
        rotate=False, split="ravi", val_classes=0),
    "sinusoid": TrainConfig(
        name="sinusoid", dataset="sinusoid", arch="mlp-sinusoid", ways=1, shots=10, queries=10, eval_queries=10,
        inner_lr=0.01, inner_steps=1, eval_steps=10, test_steps=10, meta_batch=25, iterations=70_000, rotate=False,
        split="none", val_classes=0, bn_policy="transductive"),
}


def _parse_value(raw: str, current):
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    return raw


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """`CONFIG [--resume] [--key value ...]`: a named config with any field overridden."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Meta-train a fastadapt model.")
    parser.add_argument("config", choices=sorted(CONFIGS), help="named configuration")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last state")
    parser.add_argument("--zoo", default="", help="also write the best checkpoint to this file (e.g. models/zoo/x.pt)")
    args, rest = parser.parse_known_args(argv)
    cfg = dataclasses.replace(CONFIGS[args.config])
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--") or i + 1 >= len(rest):
            parser.error(f"overrides are '--key value' pairs, got {rest[i:]!r}")
        name = key[2:].replace("-", "_")
        if name not in fields or name == "extra":
            parser.error(f"unknown config key {key!r}; expected one of {sorted(k for k in fields if k != 'extra')}")
        try:
            setattr(cfg, name, _parse_value(rest[i + 1], getattr(cfg, name)))
        except ValueError as exc:
            parser.error(f"{key}: {exc}")
        i += 2
    if cfg.algorithm not in ("maml", "fomaml", "metasgd"):
        parser.error(f"--algorithm {cfg.algorithm!r}, expected maml, fomaml or metasgd")
    return cfg, args
