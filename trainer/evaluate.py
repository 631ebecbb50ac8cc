"""Meta-test evaluation, the paper's protocol, one function for every model, and a command for any checkpoint.

600 tasks from the meta-test split; after every inner step 0..S the query accuracy (or MSE for regression) is
recorded under the batch-norm policies (transductive, support, and running when the checkpoint carries per-step
running statistics); mean and 95% confidence interval (1.96 std / sqrt(n)).

`python -m trainer.evaluate CHECKPOINT [--tasks 600] [--within-alphabet] [--steps S] [--ways N] [--shots K]
[--queries Q] [--split background|paper] [--seed SEED] [--out DIR]` meta-tests a checkpoint with its own recipe
(adapted parameters, LSLR / Meta-SGD rates, per-step batch-norm weights, support and query views) on the test split
it was trained against (its provenance's split unless --split says otherwise) and writes DIR/results.json,
results.md and meta_test_steps.png, as the trainer's final evaluation does; --support-views / --query-views override
the spec's views. Ways, shots, queries, steps, chunk and seed default to
the checkpoint's training config (the trainer's meta-test seed), so random tasks reproduce the trainer's own
meta-test. --within-alphabet draws all N classes of a task from one alphabet of the test split (alphabets with fewer
than N characters skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from models.functional import HEAD_KEYS, head_logits, stack_params, step_row
from models.maml import adapt, predict_features
from models.spec import SUPPORT_VIEWS, ModelSpec
from models.views import mean_over_views, query_views, support_views

POLICIES = ("transductive", "support", "running")  # running: only for models with bn_running


def _query_metric(spec: ModelSpec, logits, query_y):
    if spec.is_regression:
        return ((logits - query_y) ** 2).mean(dim=(1, 2))
    return (logits.argmax(-1) == query_y).float().mean(1) * 100.0


def _query_logits(spec: ModelSpec, fast, policy: str, qx, sx, bn_running, cache: dict | None) -> torch.Tensor:
    """models.views.predict_on_views on the query views `qx` [T, Q * V, ...], with the features under `policy` kept
    in `cache` (a dict, when only the head adapts) for the next step: the same operations as predict, so the same
    logits."""
    found = None if cache is None else cache.get(policy)
    if found is None:
        found = predict_features(spec, fast, qx, None if policy == "running" else sx, bn_policy=policy,
                                 bn_running=bn_running)
        if cache is not None:
            cache[policy] = found
    return mean_over_views(head_logits(fast, found[0])[:, found[1]:], spec.query_view_count)


def evaluate(spec: ModelSpec, params, sampler, tasks: int, steps: int, lr, chunk: int = 100,
             policies=None, adapt_keys=None, step_lrs=None, bn_running=None, step_bn=None) -> dict:
    """Per-step query accuracy (%) or MSE: {policy: {'mean': [...], 'ci95': [...]}, 'tasks': n, 'metric': ...}.

    params: the meta-initialization (no task axis); lr: float or Meta-SGD per-element rates.
    adapt_keys / step_lrs: the recipe's adapted parameters (ANIL: the head) and LSLR per-step rates, as
    models.maml.adapt takes them; step s uses rate s (the last learned one beyond the trained step count).
    policies: the BN policies to record (None: transductive and support, and running when bn_running is given).
    bn_running: the checkpoint's per-step running statistics ({bn{i}.mean, bn{i}.var} [S, C]). Under `running` the
    adaptation itself normalizes with them (step s: entry min(s, S - 1)), so it is a second chain of fast weights,
    and the queries with the final step's entry, as a served `running` model does.
    step_bn: per-step batch-norm weights ({bn{i}.weight, bn{i}.bias} [S, C], MAML++): step s's support forward
    uses row min(s, S - 1) and every query forward row S - 1, so the accuracy after s steps is that of
    models.maml.adapt(..., s, step_bn=step_bn) followed by predict (what serving with s steps returns).
    The sampler must be seeded for evaluation so every model sees the same tasks.
    """
    if policies is None:
        policies = POLICIES if bn_running is not None else POLICIES[:2]
    if "running" in policies and bn_running is None and not spec.is_regression:
        raise ValueError(f"policy 'running' for model {spec.name}: expected its running statistics (bn_running)")
    if spec.is_regression:
        policies = ("transductive",)  # no batch norm: one number per step
    per_task = {p: [[] for _ in range(steps + 1)] for p in policies}
    params = {k: v.detach() for k, v in params.items()}
    if isinstance(lr, dict):
        lr = {k: v.detach() for k, v in lr.items()}
    if step_lrs is not None:
        step_lrs = {k: v.detach() for k, v in step_lrs.items()}
    if step_bn is not None:
        step_bn = {k: v.detach() for k, v in step_bn.items()}
    recipe = adapt_keys is not None or step_lrs is not None or step_bn is not None
    # ANIL-style recipes move only the head and predict with the final step's batch-norm weights, so the query
    # features under each policy are the same after every step: forwarded once per chunk (the same operations as
    # predict, so the same logits), only the head applied per step
    head_only = adapt_keys is not None and set(adapt_keys) <= set(HEAD_KEYS)
    batch_policies = [p for p in policies if p != "running"]  # adapted with the support batch's statistics
    done = 0
    while done < tasks:
        n = min(chunk, tasks - done)
        b = sampler.sample(n)
        # the model's support views (models.views), as the server adapts: the prototypes, steps and support
        # statistics see the extended support set
        sx, sy = support_views(spec.support_views, b.support_x, b.support_y)
        qx = query_views(spec.query_views, b.query_x)
        features: dict | None = {} if head_only else None
        # The final step's batch-norm weights: what the queries are predicted with after any number of steps
        final = {} if step_bn is None else step_row(step_bn, next(iter(step_bn.values())).shape[0] - 1, n)
        fast = {**stack_params(params, n), **final}
        fast_running = fast if "running" in policies else None
        if spec.head_init == "proto":  # the head starts at the support prototypes (step 0's features), once
            rows = _step_entry(step_bn, 0)
            if batch_policies:
                fast = {**adapt(spec, fast, sx, sy, 0, lr, adapt_keys=adapt_keys, step_bn=rows,
                                head_init="proto").params, **final}
            if fast_running is not None:
                fast_running = {**adapt(spec, fast_running, sx, sy, 0, lr, adapt_keys=adapt_keys,
                                        bn_running=_step_entry(bn_running, 0), step_bn=rows,
                                        head_init="proto").params, **final}
        # Head-only recipes: the whole chain of fast heads from one adapt call from step 0's weights (the support
        # features forwarded once per chunk and per-step entry, the same operations as a 1-step call per step, so the
        # same heads)
        chain = chain_running = None
        if head_only and steps:
            if batch_policies:
                chain = adapt(spec, fast, sx, sy, steps, lr, adapt_keys=adapt_keys, step_lrs=step_lrs,
                              step_bn=step_bn, keep_trajectory=True, head_init="meta").trajectory
            if fast_running is not None:
                chain_running = adapt(spec, fast_running, sx, sy, steps, lr, adapt_keys=adapt_keys,
                                      step_lrs=step_lrs, bn_running=bn_running, step_bn=step_bn,
                                      keep_trajectory=True, head_init="meta").trajectory
        for s in range(steps + 1):
            with torch.no_grad():
                for p in batch_policies:
                    out = _query_logits(spec, fast, p, qx, sx, bn_running, features)
                    per_task[p][s].append(_query_metric(spec, out, b.query_y).cpu())
                if fast_running is not None:
                    out = _query_logits(spec, fast_running, "running", qx, sx, bn_running, features)
                    per_task["running"][s].append(_query_metric(spec, out, b.query_y).cpu())
            if s == steps:
                break
            # step s's entry of each per-step table, as entry 0 of a 1-step run
            if head_only:
                fast = {**chain[s], **final} if chain is not None else fast
                if chain_running is not None:
                    fast_running = {**chain_running[s], **final}
                continue
            rates, rows, entry = (_step_entry(t, s) for t in (step_lrs, step_bn, bn_running))
            if batch_policies and not recipe:
                fast = adapt(spec, fast, sx, sy, 1, lr, head_init="meta").params
            elif batch_policies:
                fast = {**adapt(spec, fast, sx, sy, 1, lr, adapt_keys=adapt_keys,
                                step_lrs=rates, step_bn=rows, head_init="meta").params, **final}
            if fast_running is not None:
                fast_running = {**adapt(spec, fast_running, sx, sy, 1, lr, adapt_keys=adapt_keys,
                                        step_lrs=rates, bn_running=entry, step_bn=rows, head_init="meta").params,
                                **final}
        done += n
    result = {"tasks": tasks, "metric": "mse" if spec.is_regression else "accuracy_percent"}
    for p in policies:
        values = [torch.cat(v) for v in per_task[p]]
        result[p] = {
            "mean": [v.mean().item() for v in values],
            "ci95": [1.96 * v.std(unbiased=False).item() / math.sqrt(len(v)) for v in values],
        }
    return result


def results_markdown(name: str, result: dict, report_steps=(0, 1, 3, 5, 10)) -> str:
    """The per-step table, one column per BN policy evaluated (running only where the model has statistics)."""
    unit = "MSE" if result["metric"] == "mse" else "accuracy %"
    policies = [p for p in POLICIES if p in result]
    lines = [f"### {name}: meta-test {unit}, {result['tasks']} tasks, 95% CI", "",
             "| inner steps | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    n_steps = len(result[policies[0]]["mean"])
    for s in report_steps:
        if s < n_steps:
            cells = [f"{result[p]['mean'][s]:.2f} ± {result[p]['ci95'][s]:.2f}" for p in policies]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- `python -m trainer.evaluate CHECKPOINT`: meta-test any checkpoint ----

TEST_SEED = 1_000_003  # trainer.train.TEST_SEED: the trainer's meta-test tasks (imported lazily there, kept equal)
TASK_KINDS = {False: "random", True: "within-alphabet"}


def recipe_adapt_keys(model) -> tuple[str, ...] | None:
    """The parameters a checkpoint's recipe adapts (None: all of them, the MAML default), as the trainer passes."""
    from models.functional import adapted_keys

    return None if model.spec.adapt_params == "all" else adapted_keys(model.spec, model.spec.adapt_params)


def _hardware(device: torch.device) -> dict:
    from kernels.bench.flops import cpu_name

    return {"host": platform.node(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__}


def _shots_from_name(name: str) -> int | None:
    match = re.search(r"(\d+)w(\d+)s", name)
    return int(match.group(2)) if match else None


def _omniglot_sampler(args, model, warnings: list[str]):
    """The test split the checkpoint was trained against (or --split), and its task sampler."""
    from trainer.data.omniglot import SPLITS, load_omniglot, omniglot_split_alphabets, omniglot_split_indices
    from trainer.data.omniglot import split_info as omniglot_split_info
    from trainer.data.sampler import omniglot_sampler

    recorded = model.provenance.get("split") if isinstance(model.provenance.get("split"), dict) else {}
    recorded = recorded if recorded.get("dataset") == "omniglot" and recorded.get("split") in SPLITS else {}
    if args.split:
        split, source = args.split, "--split"
        if recorded and recorded["split"] != args.split:
            warnings.append(f"--split {args.split} overrides the checkpoint's {recorded['split']} split: its test "
                            "characters may include ones the model was trained on")
    elif recorded:
        split, source = recorded["split"], "the checkpoint's provenance"
    else:
        split, source = "background", "the default (the checkpoint records no split)"
    seed = int(recorded.get("seed", 0)) if recorded.get("split") == split else 0
    data = load_omniglot(args.data_root)
    test = omniglot_split_indices(data, split, seed)["test"]
    info = omniglot_split_info(data, split, seed)
    want = (recorded.get("classes_sha256") or {}).get("test") if recorded.get("split") == split else None
    if want and want != info["classes_sha256"]["test"]:
        warnings.append("the test characters of this copy of Omniglot differ from those the checkpoint records "
                        "(classes_sha256.test): another data set or split seed?")
    alphabets = omniglot_split_alphabets(data, split, seed)["test"]
    sampler = omniglot_sampler(data.images[test], args.ways, args.shots, args.queries, seed=args.seed,
                               device=args.device, alphabets=alphabets, within_alphabet=args.within_alphabet)
    described = {"dataset": "omniglot", "split": split, "split_seed": seed, "source": source,
                 "test_part": "images_evaluation" if split == "background" else "the paper split's test characters",
                 "test_classes": int(len(test)), "test_alphabets": len(set(alphabets)),
                 "classes_sha256_test": info["classes_sha256"]["test"]}
    if args.within_alphabet:
        described["within_alphabet"] = {"alphabets": list(sampler.alphabet_names),
                                        "skipped": sampler.skipped_alphabets}
    return sampler, described


def _other_sampler(args, model):
    if model.spec.is_regression:
        from trainer.data.sinusoid import SinusoidSampler

        return SinusoidSampler(args.shots, args.queries, seed=args.seed, device=args.device), {"dataset": "sinusoid"}
    from trainer.data.miniimagenet import load_miniimagenet, miniimagenet_sampler

    images = load_miniimagenet(args.data_root or os.environ.get("FASTADAPT_MINIIMAGENET", ""), "test")
    sampler = miniimagenet_sampler(images, args.ways, args.shots, args.queries, seed=args.seed, device=args.device)
    return sampler, {"dataset": "miniimagenet", "split": "ravi", "test_classes": int(len(images))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a models/checkpoint.py file")
    p.add_argument("--tasks", type=int, default=600, help="meta-test tasks (default 600)")
    p.add_argument("--within-alphabet", action="store_true",
                   help="draw all N classes of a task from one alphabet of the test split (Omniglot)")
    p.add_argument("--steps", type=int, default=None, help="inner steps 0..S recorded (default: the config's, 10)")
    p.add_argument("--ways", type=int, default=None, help="N (default: the checkpoint spec's ways)")
    p.add_argument("--shots", type=int, default=None, help="K (default: the checkpoint's training config)")
    p.add_argument("--queries", type=int, default=None,
                   help="query examples per class (default: the config's eval_queries, else 1)")
    p.add_argument("--split", choices=("background", "paper"), default=None,
                   help="Omniglot split (default: the one the checkpoint's provenance records, else background)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"task sampler seed (default {TEST_SEED}, the trainer's meta-test tasks)")
    p.add_argument("--chunk", type=int, default=None, help="tasks adapted at once (default: the config's, 100)")
    p.add_argument("--support-views", default=None, choices=tuple(SUPPORT_VIEWS),
                   help="views of every support image adapt sees (models.views; default: the checkpoint spec's)")
    p.add_argument("--query-views", default=None, choices=tuple(SUPPORT_VIEWS),
                   help="views of every query image whose logits predict averages (models.views; default: the "
                        "checkpoint spec's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--data-root", default=None, help="Omniglot (or mini-ImageNet) folder (default $FASTADAPT_OMNIGLOT)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json, results.md, meta_test_steps.png (default results/evaluate/NAME-KIND)")
    return p


def _resolve(p: argparse.ArgumentParser, args, model) -> None:
    """Fill the defaults from the checkpoint, and exit 2 naming any bad value."""
    config = model.provenance.get("config") if isinstance(model.provenance.get("config"), dict) else {}
    spec = model.spec
    args.ways = spec.ways if args.ways is None else args.ways
    args.shots = args.shots if args.shots is not None else config.get("shots") or _shots_from_name(spec.name) or 1
    args.queries = args.queries if args.queries is not None else config.get("eval_queries") or 1
    args.steps = args.steps if args.steps is not None else config.get("eval_steps", 10)
    args.chunk = args.chunk if args.chunk is not None else config.get("eval_chunk", 100)
    args.seed = TEST_SEED if args.seed is None else args.seed
    for name, minimum in (("tasks", 1), ("steps", 0), ("shots", 1), ("queries", 1), ("chunk", 1)):
        if getattr(args, name) < minimum:
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= {minimum}")
    if spec.is_regression:
        if args.within_alphabet:
            p.error(f"--within-alphabet: {args.checkpoint} is a {spec.arch} model, alphabets are Omniglot's")
        args.ways = 1
    elif not 2 <= args.ways <= spec.ways:
        p.error(f"--ways {args.ways}: expected 2..{spec.ways} (the checkpoint's head has {spec.ways} outputs)")
    if args.within_alphabet and not spec.arch.endswith("omniglot"):
        p.error(f"--within-alphabet: {args.checkpoint} is a {spec.arch} model, alphabets are Omniglot's")
    if args.split and not spec.arch.endswith("omniglot"):
        p.error(f"--split {args.split}: Omniglot's splits, but {args.checkpoint} is a {spec.arch} model")
    for option, field in (("--support-views", "support_views"), ("--query-views", "query_views")):
        value = getattr(args, field)
        if value not in (None, getattr(model.spec, field)):
            try:
                model.spec = model.spec.with_(**{field: value})
            except ValueError as exc:  # a non-image architecture
                p.error(f"{option} {value}: {str(exc)[:300]}")


def cli_checkpoint(parser: argparse.ArgumentParser, path: Path, device_name: str):
    """A command line's CHECKPOINT and --device, checked (exit 2 naming the bad one): (the model on the device,
    the device). Shared by this command and trainer.bn_running."""
    from models.checkpoint import CheckpointError, load_checkpoint

    if not path.is_file():
        parser.error(f"CHECKPOINT {path}: no such file")
    try:
        device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                              "cpu" if device_name == "auto" else device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as exc:
        parser.error(f"--device {device_name}: {exc}")
    try:
        return load_checkpoint(path, device=device), device
    except CheckpointError as exc:
        parser.error(f"CHECKPOINT {exc}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    args = p.parse_args(argv)
    from trainer.plots import plot_steps

    model, device = cli_checkpoint(p, args.checkpoint, args.device)
    args.device = device
    _resolve(p, args, model)
    spec, kind, warnings = model.spec, TASK_KINDS[args.within_alphabet], []
    try:
        if spec.arch.endswith("omniglot"):
            sampler, data = _omniglot_sampler(args, model, warnings)
        else:
            sampler, data = _other_sampler(args, model)
    except ValueError as exc:  # the split cannot hold these tasks: ways, shots + queries, alphabets too small
        p.error(f"{kind} {args.ways}-way {args.shots}-shot tasks (queries {args.queries} per class): {exc}")
    groups = getattr(sampler, "groups", None)
    if groups is not None and groups.skipped:
        warnings.append(groups.notice())
    for line in warnings:
        print(f"NOTICE: {line}", file=sys.stderr)
    out = args.out or Path("results") / "evaluate" / f"{args.checkpoint.stem}-{kind}"
    start = time.perf_counter()
    result = evaluate(spec, model.params, sampler, args.tasks, args.steps, model.inner_lr(), args.chunk,
                      adapt_keys=recipe_adapt_keys(model), step_lrs=model.step_lrs, bn_running=model.bn_running,
                      step_bn=model.step_bn)
    seconds = time.perf_counter() - start
    prov = model.provenance
    command = shlex.join(["python", "-m", "trainer.evaluate", *argv])
    result.update({
        "checkpoint": str(args.checkpoint), "iterations": prov.get("iterations"),
        "train_seconds": prov.get("train_seconds"), "device": prov.get("device"), "split": data.get("split"),
        "report_step": spec.steps, "task_kind": kind, "within_alphabet": args.within_alphabet, "ways": args.ways,
        "shots": args.shots, "queries": args.queries, "steps": args.steps, "seed": args.seed, "chunk": args.chunk,
        "recipe": {"adapt_params": spec.adapt_params, "head_init": spec.head_init,
                   "support_views": spec.support_views, "query_views": spec.query_views,
                   "lr": "LSLR per step" if model.step_lrs is not None else
                   "Meta-SGD per element" if model.inner_lrs is not None else float(spec.inner_lr),
                   **({"per_step_bn_steps": model.bn_steps} if model.step_bn is not None else {})},
        "bn_running": None if model.bn_running is None else {
            "steps": model.running_steps, "estimated": model.provenance.get("bn_running")},
        "data": data, "notices": warnings, "command": command, "eval_device": str(device),
        "hardware": _hardware(device), "eval_seconds": round(seconds, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    markdown = evaluation_markdown(spec.name, result)
    (out / "results.md").write_text(markdown)
    plot_steps(result, f"{spec.name} meta-test, {kind} tasks", out / "meta_test_steps.png")
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'meta_test_steps.png'}")
    return 0


def evaluation_markdown(name: str, result: dict) -> str:
    """The results table of `python -m trainer.evaluate`, under what was run: command, checkpoint, tasks, hardware."""
    hw, data, recipe = result["hardware"], result["data"], result["recipe"]
    where = f"GPU {hw['gpu']}" if hw["gpu"] else f"CPU {hw['cpu']} ({hw['cpus']} cores)"
    trained = (f"{result['iterations']} iterations, {result['train_seconds']} s on {result['device']}"
               if result.get("iterations") is not None else "no training recorded (a fresh initialization?)")
    task = "regression" if result["metric"] == "mse" else f"{result['ways']}-way {result['shots']}-shot"
    if data["dataset"] == "omniglot":
        test = (f"Omniglot {data['split']} split, from {data['source']}: {data['test_part']}, "
                f"{data['test_classes']} characters of {data['test_alphabets']} alphabets")
        if result["within_alphabet"]:
            w = data["within_alphabet"]
            test += f"; each task's classes from one of {len(w['alphabets'])} alphabets, uniformly"
            if w["skipped"]:
                test += f" ({len(w['skipped'])} with fewer than {result['ways']} characters skipped)"
    else:
        test = f"{data['dataset']} test split"
    lines = [
        f"# Meta-test of `{result['checkpoint']}`: {result['task_kind']} tasks", "",
        f"- Command: `{result['command']}` ({result['finished']})",
        f"- Checkpoint: `{result['checkpoint']}` ({name}; adapts {recipe['adapt_params']}, inner lr "
        f"{recipe['lr']}{_bn_weights(recipe)}{_adapt_notes(recipe)}; {trained})",
        f"- Tasks: {result['tasks']} {result['task_kind']} {task} tasks, {result['queries']} "
        f"quer{'y' if result['queries'] == 1 else 'ies'} per class, "
        f"seed {result['seed']}, inner steps 0..{result['steps']} (serving default {result['report_step']}); {test}",
        f"- Hardware: {where} on {hw['host']}, device {result['eval_device']}, torch {hw['torch']}; "
        f"{result['eval_seconds']} s",
        *([f"- BN running statistics: {_running_line(result['bn_running'])}"] if result.get("bn_running") else []),
        *(f"- NOTICE: {line}" for line in result["notices"]), "",
    ]
    steps = sorted({0, 1, 3, 5, 10, result["report_step"], result["steps"]})
    return "\n".join(lines) + results_markdown(f"{name}, {result['task_kind']} tasks", result, steps)


def _step_entry(table: dict[str, torch.Tensor] | None, step: int) -> dict[str, torch.Tensor] | None:
    """Entry min(step, S - 1) of a per-step table ({name: [S, ...]}), kept as a table of one step [1, ...]."""
    return None if table is None else {k: v[min(step, v.shape[0] - 1)].unsqueeze(0) for k, v in table.items()}


def _adapt_notes(recipe: dict) -> str:
    """The report's notes on how adapt starts and what it sees: a head started from the support prototypes
    (Proto-MAML) and the support views, where the model has them."""
    views, queries = recipe.get("support_views", "none"), recipe.get("query_views", "none")
    return ((", head started from the support prototypes" if recipe.get("head_init") == "proto" else "")
            + (f", support views {views} ({len(SUPPORT_VIEWS[views])} per image, models.views)" if views != "none"
               else "")
            + (f", query views {queries} (logits averaged over {len(SUPPORT_VIEWS[queries])} per query)"
               if queries != "none" else ""))


def _bn_weights(recipe: dict) -> str:
    """The report's note on per-step batch-norm weights (MAML++ BNWB), where the checkpoint has them."""
    steps = recipe.get("per_step_bn_steps")
    return f", per-step batch-norm weights for {steps} steps" if steps else ""


def _running_line(running: dict) -> str:
    """How the checkpoint's running statistics were estimated, from its provenance (bounded in length)."""
    how = running.get("estimated") or {}
    text = f"{running['steps']} steps; " + (", ".join(f"{k} {v}" for k, v in how.items() if k in (
        "method", "tasks", "updates", "momentum", "split", "variance")) or "no provenance recorded")
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())
