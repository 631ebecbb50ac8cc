"""Per-step batch-norm running statistics (MAML++ BNRS) for an existing checkpoint, estimated post hoc.

`python -m trainer.bn_running CHECKPOINT --out NEW.pt [--tasks 500] [--steps S] [--seed SEED] [--chunk C]
[--policy running|support|transductive] [--name NAME] [--device D] [--data-root DIR]` adapts the checkpoint with
its own recipe (adapted parameters, LSLR / Meta-SGD rates, per-step batch-norm weights) on `--tasks` meta-training
tasks, drawn as its training drew them (the meta-train classes of its split, its ways, shots and rotations), and
records the support batch's statistics of every inner step 0..S-1; entry s of `bn_running` is their plain mean over
the tasks, the variance unbiased as torch batch norm accumulates its running_var. Per-step body weights give
per-step statistics; under ANIL (only the head adapts) every step gets the body's same statistics (unless per-step
batch-norm weights change the body from step to step).

The new checkpoint holds the same tensors plus `bn_running`, its spec's bn_policy set to --policy (default running)
and its name to --name (default NAME-running, so it can be served beside the original), and records how the
statistics were estimated in provenance["bn_running"]. The input file is never replaced. Exit 2 naming any bad
argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shlex
import sys
import time
from pathlib import Path

import torch

from models.functional import stats_shapes
from models.maml import adapt
from models.spec import BN_POLICIES

ESTIMATE_SEED = 1_000_081  # task sampler seed of the estimate: tasks drawn independently of training's own stream


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.bn_running", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a models/checkpoint.py file")
    p.add_argument("--out", type=Path, required=True, help="the new checkpoint to write (never CHECKPOINT itself)")
    p.add_argument("--tasks", type=int, default=500, help="meta-training tasks averaged over (default 500)")
    p.add_argument("--steps", type=int, default=None,
                   help="inner steps S with an entry each (default: the spec's serving steps)")
    p.add_argument("--seed", type=int, default=ESTIMATE_SEED, help=f"task sampler seed (default {ESTIMATE_SEED})")
    p.add_argument("--chunk", type=int, default=100, help="tasks adapted at once (default 100)")
    p.add_argument("--policy", default="running", help=f"bn_policy of the new checkpoint, one of {BN_POLICIES} "
                                                       "(default running)")
    p.add_argument("--name", default=None, help="model name of the new checkpoint (default NAME-running)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--data-root", default=None, help="Omniglot (or mini-ImageNet) folder (default $FASTADAPT_OMNIGLOT)")
    return p


def training_config(model, data_root: str | None, device: str):
    """The checkpoint's training config (provenance), or the named config of its spec, for its task sampler."""
    from trainer.config import CONFIGS, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recorded = model.provenance.get("config") if isinstance(model.provenance.get("config"), dict) else {}
    base = CONFIGS.get(model.spec.name, TrainConfig(arch=model.spec.arch, ways=model.spec.ways))
    if not recorded and model.spec.arch == "conv4-miniimagenet":
        base = dataclasses.replace(base, dataset="miniimagenet", split="ravi", val_classes=0, rotate=False)
    cfg = dataclasses.replace(base, **{k: v for k, v in recorded.items() if k in fields and k != "extra"})
    return dataclasses.replace(cfg, ways=model.spec.ways, device=device, data_root=data_root or "",
                               hidden=model.spec.hidden)


def estimate(model, sampler, tasks: int, steps: int, chunk: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The plain mean over `tasks` sampled tasks of every inner step's support batch statistics (unbiased variance),
    adapting with the model's recipe: ({bn{i}.mean, bn{i}.var} float32 [steps, C], diagnostics).

    diagnostics["between_task_variance_ratio"]: per layer, the channel mean of Var_tasks(task mean) / mean_tasks(task
    variance) at step 0: how much wider than the within-task variance the population of single queries is."""
    from trainer.evaluate import recipe_adapt_keys

    keys = list(stats_shapes(model.spec))
    sums = {k: torch.zeros(steps, c, dtype=torch.float64) for k, (c,) in stats_shapes(model.spec).items()}
    squares = {k: torch.zeros(c, dtype=torch.float64) for k, (c,) in stats_shapes(model.spec).items()
               if k.endswith(".mean")}
    done = 0
    while done < tasks:
        n = min(chunk, tasks - done)
        b = sampler.sample(n)
        record: list = []
        adapt(model.spec, model.params, b.support_x, b.support_y, steps, model.inner_lr(),
              adapt_keys=recipe_adapt_keys(model), step_lrs=model.step_lrs, record_stats=record,
              step_bn=model.step_bn)
        for s, stats in enumerate(record):
            for k in keys:
                sums[k][s] += stats[k].double().sum(0).cpu()
        for k in squares:
            squares[k] += record[0][k].double().pow(2).sum(0).cpu()
        done += n
    means = {k: (v / tasks).float().contiguous() for k, v in sums.items()}
    ratio = {}
    for k in squares:
        layer = k.split(".")[0]
        spread = (squares[k] / tasks - (sums[k][0] / tasks) ** 2).clamp_min(0) * tasks / max(tasks - 1, 1)
        ratio[layer] = round(float((spread / (sums[f"{layer}.var"][0] / tasks).clamp_min(1e-12)).mean()), 4)
    return means, {"between_task_variance_ratio": ratio}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    args = p.parse_args(argv)
    from models.checkpoint import save_checkpoint
    from trainer.evaluate import cli_checkpoint
    from trainer.train import build_samplers, git_commit

    for name, minimum in (("tasks", 1), ("chunk", 1)):
        if getattr(args, name) < minimum:
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= {minimum}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: expected an integer >= 1 (one entry per inner step)")
    if args.policy not in BN_POLICIES:
        p.error(f"--policy {args.policy!r}: expected one of {BN_POLICIES}")
    if args.out.suffix != ".pt":
        p.error(f"--out {args.out}: expected a .pt file (the server serves *.pt)")
    if args.out.exists() and args.out.resolve() == args.checkpoint.resolve():
        p.error(f"--out {args.out} is CHECKPOINT itself: expected a new file (the input is never replaced)")
    if args.name is not None and not 0 < len(args.name) <= 128:
        p.error(f"--name {args.name[:40]!r}...: expected 1..128 characters")
    model, device = cli_checkpoint(p, args.checkpoint, args.device)
    spec = model.spec
    if not spec.has_batch_norm:
        p.error(f"CHECKPOINT {args.checkpoint}: a {spec.arch} model has no batch norm, expected conv4-* or "
                "mlp-omniglot")
    steps = spec.steps if args.steps is None else args.steps
    if steps < 1:
        p.error(f"CHECKPOINT {args.checkpoint}: serving steps {steps}; expected --steps >= 1")
    cfg = training_config(model, args.data_root, str(device))
    cfg = dataclasses.replace(cfg, seed=args.seed)
    try:
        samplers, split = build_samplers(cfg, device)
    except (ValueError, OSError) as exc:
        p.error(f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot meta-training tasks ({cfg.split} split): {exc}")
    start = time.perf_counter()
    running, diagnostics = estimate(model, samplers["train"], args.tasks, steps, args.chunk)
    seconds = time.perf_counter() - start
    name = args.name or (spec.name if spec.name.endswith("-running") else f"{spec.name}-running")
    provenance = dict(model.provenance)
    provenance["bn_running"] = {
        "method": "post-hoc mean over tasks", "tasks": args.tasks, "steps": steps, "seed": args.seed,
        "dataset": cfg.dataset, "split": cfg.split, "part": "train (the meta-training classes)",
        "ways": cfg.ways, "shots": cfg.shots, "rotate": cfg.rotate, "adapt_params": spec.adapt_params,
        "lr": "LSLR per step" if model.step_lrs is not None else
        "Meta-SGD per element" if model.inner_lrs is not None else float(spec.inner_lr),
        "source": "support forward of inner steps 0..S-1 under batch statistics, as in meta-training",
        "variance": "unbiased batch variance (as torch batch norm's running_var)", **diagnostics,
        "from_checkpoint": str(args.checkpoint), "from_sha256": _sha256(args.checkpoint),
        "from_name": spec.name, "from_bn_policy": spec.bn_policy,
        "split_classes_sha256_train": (split.get("classes_sha256") or {}).get("train"),
        "command": shlex.join(["python", "-m", "trainer.bn_running", *argv]), "commit": git_commit(),
        "device": str(device), "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # every tensor field of the source (MetaModel.to), with the new statistics, spec and provenance
    new = dataclasses.replace(model.to("cpu"), spec=spec.with_(name=name, bn_policy=args.policy),
                              provenance=provenance, bn_running=running)
    save_checkpoint(args.out, new)
    print(f"wrote {args.out}: model {name!r}, bn_policy {args.policy}, running statistics for {steps} steps x "
          f"{len(running) // 2} batch-norm layers from {args.tasks} {cfg.ways}-way {cfg.shots}-shot tasks of the "
          f"{cfg.split} split's meta-training classes in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
