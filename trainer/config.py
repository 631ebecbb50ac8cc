"""Named training configurations (the paper's protocol), a dataclass with `--key value` overrides."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from models.spec import SUPPORT_VIEWS, VIEW_ARCHS


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
    # Hard tasks in meta-training (Omniglot): this share of each meta-batch draws all N classes from one alphabet of
    # the train split (alphabets with fewer than N characters are skipped), the rest are random tasks; 0 = random only.
    # Meta-test and validation are unchanged (random tasks; `python -m trainer.evaluate --within-alphabet` for hard).
    train_within_alphabet: float = 0.0
    # Each of a character's four rotations a class of its own in meta-training (Vinyals et al. 2016, Snell et al. 2017:
    # 4x the classes, and a task may hold a character beside its rotation); needs rotate, random tasks only.
    rotation_classes: bool = False
    # Augmentation in meta-training: every train image moved by its own random (dy, dx) in [-s, s]^2 pixels, edge
    # pixels repeated (trainer.data.sampler, shift); 0 = none. Validation and the meta-test are unchanged.
    train_shift: int = 0
    # More of it: every train image warped by its own rotation in [-d, d] degrees (train_tilt; not the 90-degree class
    # rotations) and a stretch of each axis in [1 - z, 1 + z] (train_scale), after the shift (trainer.data.sampler,
    # warped); 0 = none.
    train_tilt: float = 0.0
    train_scale: float = 0.0
    # Views of every support image the inner loop adapts on (models.views: none, cross2), in meta-training, validation
    # and the meta-test; the checkpoint's spec carries them, so the server adapts the same way.
    support_views: str = "none"
    seed: int = 0
    device: str = "auto"
    cuda_graph: bool = True  # capture the whole meta-iteration (inner loop, meta-gradient, Adam) in one CUDA graph
    val_every: int = 1000
    val_tasks: int = 200
    eval_tasks: int = 600
    eval_chunk: int = 100  # tasks adapted at once during evaluation
    checkpoint_every: int = 2000
    checkpoint_seconds: float = 0.0  # also save the training state this often (wall seconds); 0 = by iterations only
    log_every: int = 100
    out_dir: str = ""  # default runs/<name>
    data_root: str = ""  # default: $FASTADAPT_OMNIGLOT or ../shared/data/omniglot
    hidden: int = 0  # conv filters (0: the architecture's default)
    max_seconds: float = 0.0  # stop (checkpointed, evaluated) after this many seconds of this invocation; 0 = none
    final_eval: bool = True
    progress: bool = True
    # ---- recipes (see RECIPES; every default keeps plain MAML / FOMAML / Meta-SGD exactly as before) ----
    recipe: str = "maml"  # the preset the switches below came from (provenance): maml | anil | maml++ | ...
    adapt_params: str = "all"  # inner loop updates: all | head (ANIL) | no-bn (MAML++: BN gamma/beta outer-loop only)
    lslr: bool = False  # MAML++ LSLR: a learned inner lr per adapted parameter tensor and inner step
    msl_epochs: int = 0  # MAML++ multi-step loss with annealed per-step weights for this many epochs; 0 = off
    epoch_iterations: int = 500  # MAML++'s epoch (total_iter_per_epoch): the unit of the MSL anneal
    cosine_lr: bool = False  # MAML++: meta lr cosine-annealed from meta_lr to min_meta_lr over `iterations`
    min_meta_lr: float = 1e-5
    # The cosine starts here (meta_lr constant before it): a long run resumed at iteration I anneals over I..iterations
    # with --cosine_lr true --cosine_start I (Adam's saved lr is overridden every iteration while the cosine is on).
    cosine_start: int = 0
    first_order_iterations: int = 0  # MAML++ derivative-order annealing: first order before this iteration
    init_from: str = ""  # start from this checkpoint's parameters instead of a fresh initialization (provenance)
    # MAML++ BNRS: per-step batch-norm running statistics, an exponential moving average (torch batch norm's momentum
    # convention) of every inner step's support-forward batch statistics, one update per task, saved into the
    # checkpoints (MetaModel.bn_running). Training still normalizes with batch statistics; --serve_bn_policy running
    # serves with the averages.
    bn_running: bool = False
    bn_momentum: float = 0.1
    # MAML++ BNWB: per-step batch-norm weights, a meta-learned gamma / beta for every inner step (inner_steps rows,
    # initialised from the initialization's), saved into the checkpoints (MetaModel.step_bn). Needs batch norm kept
    # out of the inner loop: adapt_params no-bn (or head).
    per_step_bn: bool = False
    # Proto-MAML (Triantafillou et al. 2020): the inner loop starts the head at the support prototypes (models.maml.
    # prototype_head) instead of the meta-learned head; meta | proto. With adapt_params head: Proto-ANIL.
    head_init: str = "meta"
    extra: dict = field(default_factory=dict)

    @property
    def second_order(self) -> bool:
        return self.algorithm in ("maml", "metasgd")

    @property
    def uses_recipe(self) -> bool:
        """Any switch beyond plain MAML / FOMAML / Meta-SGD (those keep their original code path bit for bit)."""
        return (self.adapt_params != "all" or self.lslr or self.msl_epochs > 0 or self.cosine_lr
                or self.first_order_iterations > 0 or self.bn_running or self.per_step_bn
                or self.head_init != "meta")

    def second_order_at(self, iteration: int) -> bool:
        """Derivative-order annealing: first order before `first_order_iterations`, the algorithm's order after."""
        return self.second_order and iteration >= self.first_order_iterations

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


# Recipes: presets of the switches above, applied before any `--key value` override.
# - anil: Raghu, Raghu, Bengio & Vinyals 2020, "Rapid learning or feature reuse?": only the head adapts in the inner
#   loop (same steps / inner lr / meta-batch as MAML; second order through the head's steps).
# - maml++: Antoniou, Edwards & Storkey 2019, "How to train your MAML", settings as in the authors' repository
#   AntreasAntoniou/HowToTrainYourMAMLPytorch, experiment_config/omniglot_maml++_20_way_1_shot_5_*.json and
#   few_shot_learning_system.py: LSLR initialised at the inner lr (init_inner_loop_learning_rate 0.1), multi-step loss
#   for multi_step_loss_num_epochs=20 epochs of total_iter_per_epoch=500 iterations, Adam lr 1e-3 cosine-annealed to
#   min_learning_rate 1e-5 over total_epochs=250 (125,000 iterations), batch-norm gamma/beta not adapted in the inner
#   loop (enable_inner_loop_optimizable_bn_params false), meta-batch 16, 5 steps. Derivative-order annealing: the paper
#   uses first order for the first 50 epochs (25,000 iterations); its 20-way config sets
#   first_order_to_second_order_epoch=-1 (second order throughout). Deviations here: the inner loss is our sum/K
#   (= N x mean CE, as cbfinn/maml and our inner lr), the cosine is per iteration rather than per epoch, and per-step
#   running statistics (BNRS) are an option (--bn_running true) rather than part of this preset. Per-step batch-norm
#   weights (BNWB: learnable_bn_gamma / learnable_bn_beta with per_step_bn_statistics, a gamma / beta row per step)
#   are part of it; the runs recorded before they existed (docs/results/recipes-ab*) are this preset with
#   --per_step_bn false.
RECIPES: dict[str, dict] = {
    "maml": {},
    "anil": {"adapt_params": "head"},
    "proto-anil": {"adapt_params": "head", "head_init": "proto"},  # ANIL with the head started at the prototypes
    "maml++": {"adapt_params": "no-bn", "lslr": True, "msl_epochs": 20, "epoch_iterations": 500, "cosine_lr": True,
               "min_meta_lr": 1e-5, "first_order_iterations": 25_000, "per_step_bn": True},
    # ablation arms (A/B): one MAML++ ingredient at a time on top of MAML
    "maml+lslr": {"lslr": True},
    "maml+msl": {"msl_epochs": 20, "epoch_iterations": 500},
    "maml+fo-warmup": {"first_order_iterations": 25_000},
    "maml+per-step-bn": {"adapt_params": "no-bn", "per_step_bn": True},  # BN outside the inner loop, a row per step
}


def apply_recipe(cfg: TrainConfig, name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}, expected one of {sorted(RECIPES)}")
    return dataclasses.replace(cfg, recipe=name, **RECIPES[name])


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


def config_keys_help() -> str:
    """The --key value overrides, one per TrainConfig field with its default: generated, so it lists every field."""
    lines = ["config keys (--key value, or --key-with-dashes value) with TrainConfig's defaults;",
             "each named config overrides some of them (trainer/config.py):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"  --{f.name} {f.type} (default {default!r})")
    if RECIPES:
        lines.append(f"recipes (--recipe NAME, applied before the other keys): {', '.join(sorted(RECIPES))}")
    return "\n".join(lines)


def _has_batch_norm(arch: str) -> bool:
    from models.spec import ModelSpec

    try:
        return ModelSpec(name="probe", arch=arch, ways=1, inner_lr=0.0, steps=0).has_batch_norm
    except ValueError:  # an unknown architecture: refused where the model is built, with its own message
        return True


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """`CONFIG [--resume] [--key value ...]`: a named config with any field overridden."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Meta-train a fastadapt model.",
                                     epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=sorted(CONFIGS), help="named configuration")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last state")
    parser.add_argument("--zoo", default="", help="also write the best checkpoint to this file (e.g. models/zoo/x.pt)")
    args, rest = parser.parse_known_args(argv)
    cfg = dataclasses.replace(CONFIGS[args.config])
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if "--recipe" in rest:  # the preset first, so every other override wins over it
        at = rest.index("--recipe")
        raw = rest[at + 1] if at + 1 < len(rest) else ""
        try:
            cfg = apply_recipe(cfg, raw)
        except ValueError as exc:
            parser.error(f"--recipe: {exc}")
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
    if cfg.adapt_params not in ("all", "head", "no-bn"):
        parser.error(f"--adapt_params {cfg.adapt_params!r}, expected all, head or no-bn")
    if cfg.head_init not in ("meta", "proto"):
        parser.error(f"--head_init {cfg.head_init!r}, expected meta or proto")
    if cfg.head_init == "proto" and (cfg.adapt_params != "head" or cfg.dataset == "sinusoid"):
        parser.error(f"--head_init proto with --adapt_params {cfg.adapt_params!r} on {cfg.dataset}: the prototypes "
                     "are computed once from a fixed body; expected --adapt_params head on a classification data set")
    if cfg.bn_policy not in ("transductive", "support"):
        parser.error(f"--bn_policy {cfg.bn_policy!r}: meta-training normalizes with batch statistics, expected "
                     "transductive or support (serve with running: --bn_running true --serve_bn_policy running)")
    if cfg.serve_bn_policy not in ("transductive", "support", "running"):
        parser.error(f"--serve_bn_policy {cfg.serve_bn_policy!r}, expected transductive, support or running")
    if cfg.serve_bn_policy == "running" and not cfg.bn_running:
        parser.error("--serve_bn_policy running serves with per-step running statistics; expected --bn_running true "
                     "to estimate them")
    if cfg.cosine_lr and not 0 <= cfg.cosine_start < cfg.iterations:
        parser.error(f"--cosine_start {cfg.cosine_start}: the cosine anneals from it to --iterations "
                     f"{cfg.iterations}, expected 0 <= cosine_start < iterations")
    if cfg.bn_running and not 0 < cfg.bn_momentum <= 1:
        parser.error(f"--bn_momentum {cfg.bn_momentum}: expected 0 < momentum <= 1")
    if cfg.per_step_bn and not _has_batch_norm(cfg.arch):
        parser.error(f"--per_step_bn true: per-step batch-norm weights, but arch {cfg.arch!r} has no batch norm; "
                     "expected a conv4-* or mlp-omniglot model, or --per_step_bn false")
    if cfg.per_step_bn and cfg.adapt_params not in ("no-bn", "head"):
        parser.error(f"--per_step_bn true with --adapt_params {cfg.adapt_params!r}: the inner loop would adapt the "
                     "batch-norm weights that are meta-learned per step; expected --adapt_params no-bn (or head)")
    if not 0.0 <= cfg.train_within_alphabet <= 1.0:
        parser.error(f"--train_within_alphabet {cfg.train_within_alphabet}: the share of each meta-batch drawn within "
                     "one alphabet, expected a number in [0, 1]")
    if cfg.train_within_alphabet > 0 and cfg.dataset != "omniglot":
        parser.error(f"--train_within_alphabet {cfg.train_within_alphabet} on {cfg.dataset}: alphabets are "
                     "Omniglot's, expected 0")
    if cfg.rotation_classes and (not cfg.rotate or cfg.train_within_alphabet > 0 or cfg.dataset != "omniglot"):
        parser.error(f"--rotation_classes true with --rotate {cfg.rotate}, --train_within_alphabet "
                     f"{cfg.train_within_alphabet} on {cfg.dataset}: expected --rotate true, random tasks "
                     "(--train_within_alphabet 0) on omniglot")
    if cfg.train_shift and (cfg.dataset != "omniglot" or not cfg.arch.startswith("conv4")
                            or not 0 < cfg.train_shift <= 4):
        parser.error(f"--train_shift {cfg.train_shift} with {cfg.dataset} / {cfg.arch}: expected 0, or 1-4 pixels "
                     "for an Omniglot conv4 model")
    if (cfg.train_tilt or cfg.train_scale) and (
            cfg.dataset != "omniglot" or not cfg.arch.startswith("conv4")
            or not 0 <= cfg.train_tilt <= 45 or not 0 <= cfg.train_scale < 0.5):
        parser.error(f"--train_tilt {cfg.train_tilt} --train_scale {cfg.train_scale} with {cfg.dataset} / {cfg.arch}: "
                     "expected degrees in [0, 45] and an axis stretch in [0, 0.5) for an Omniglot conv4 model")
    if cfg.support_views not in SUPPORT_VIEWS:
        parser.error(f"--support_views {cfg.support_views!r}, expected one of {', '.join(SUPPORT_VIEWS)}")
    if cfg.support_views != "none" and cfg.arch not in VIEW_ARCHS:
        parser.error(f"--support_views {cfg.support_views} with arch {cfg.arch}: shifted views need image inputs, "
                     f"expected one of {', '.join(VIEW_ARCHS)}")
    if cfg.algorithm == "metasgd" and dataclasses.replace(cfg, bn_running=False).uses_recipe:
        parser.error("--algorithm metasgd learns its own per-element rates; combine recipes with maml or fomaml")
    return cfg, args
