"""`make demo`: serve the bundled Omniglot models and classify held-out characters through the wire.

Starts `python -m server` on models/zoo (a fresh, untrained initialization stands in for a missing model, with a
notice), reads the Omniglot evaluation alphabets (characters never seen in training) from
${FASTADAPT_OMNIGLOT:-../shared/data/omniglot}/images_evaluation.zip, decodes each PNG, resizes it to 28x28 with
LANCZOS and sends it as uint8 (the server applies the model's preprocessing). Runs seeded tasks of 5-way 1-shot
(omniglot-5w1s) and 20-way 1-shot (omniglot-20w1s), each with a fixed number of query images per class, through
AdaptAndPredict from one client, of two kinds per model: random characters, and within-alphabet tasks (all N
characters from one alphabet, harder: what a user adapting to one new script faces), then prints accuracy with a
95% confidence interval and the round-trip latency percentiles per model and kind, and stops the server with
SIGTERM. `--out DIR` writes DIR/demo.json and DIR/demo.md: the results with the command, the hardware, the device
and the backend (`make demo` writes results/demo/).

Against a TLS + token server: --tls-cert/--tls-key [--tls-client-ca] and --auth-tokens go to the server it starts,
--token (or $FASTADAPT_TOKEN), --ca, --client-cert/--client-key to its client; --ca defaults to --tls-cert (right for
a self-signed certificate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kernels.engine import BACKENDS
from server.client import FastAdaptClient, add_connection_args, connection_kwargs, load_image
from server.launch import REPO_ROOT, ServerProcess, prepare_model_dir
from trainer.data.omniglot import alphabet_of
from trainer.data.sampler import AlphabetGroups, alphabet_groups

DEMO_MODELS = (("omniglot-5w1s", 5, 1), ("omniglot-20w1s", 20, 1))  # (model, ways, shots)
TRAIN_COMMANDS = {"omniglot-5w1s": "make train-omniglot", "omniglot-20w1s": "make train-omniglot-20w"}
OMNIGLOT_INPUT = (1, 28, 28)
_MEMBER = re.compile(r"^images_evaluation/([^/]+)/([^/]+)/[^/]+\.png$")


def omniglot_root() -> Path:
    return Path(os.environ.get("FASTADAPT_OMNIGLOT", REPO_ROOT.parent / "shared" / "data" / "omniglot"))


def load_evaluation_characters(root: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """'alphabet/character' -> uint8 [drawers, 1, 28, 28] for every character of images_evaluation.zip."""
    path = root / "images_evaluation.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set FASTADAPT_OMNIGLOT to the folder holding images_evaluation.zip")
    images = defaultdict(list)
    with zipfile.ZipFile(path) as archive:
        members = sorted(m for m in archive.namelist() if _MEMBER.match(m))
        for member in tqdm(members, desc="decoding Omniglot evaluation PNGs", disable=not progress, unit="img"):
            alphabet, character = _MEMBER.match(member).groups()
            images[f"{alphabet}/{character}"].append(load_image(archive.read(member), OMNIGLOT_INPUT))
    if not images:
        raise ValueError(f"{path} holds no images_evaluation/ALPHABET/CHARACTER/*.png members")
    return {name: np.stack(imgs) for name, imgs in sorted(images.items())}


def sample_task(characters: dict[str, np.ndarray], names: list[str], rng, ways: int, shots: int, queries: int,
                groups: AlphabetGroups | None = None):
    """N random characters; K support and `queries` query drawings of each (distinct drawers). Labels 0..N-1.

    groups (`alphabet_groups` of the names' alphabets): a within-alphabet task, the N characters from one alphabet
    drawn uniformly among those with at least N characters."""
    if groups is None:
        chosen = rng.choice(len(names), size=ways, replace=False)
    else:
        chosen = rng.choice(groups.members[rng.integers(len(groups.names))], size=ways, replace=False)
    support_x, support_y, query_x, query_y = [], [], [], []
    for label, index in enumerate(chosen):
        drawings = characters[names[index]]
        order = rng.permutation(len(drawings))[: shots + queries]
        support_x.append(drawings[order[:shots]])
        query_x.append(drawings[order[shots:]])
        support_y += [label] * shots
        query_y += [label] * queries
    return np.concatenate(support_x), np.asarray(support_y), np.concatenate(query_x), np.asarray(query_y)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval (as MAML papers report)."""
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def run_model(client, characters, model, ways, shots, queries, tasks, seed, warmup, progress=True,
              within_alphabet: bool = False) -> dict:
    names = list(characters)
    if ways > len(names):
        raise ValueError(f"{ways}-way tasks need {ways} characters, the evaluation set has {len(names)}")
    groups = alphabet_groups([alphabet_of(n) for n in names], ways) if within_alphabet else None
    if groups is not None and groups.skipped:
        print(f"NOTICE: {model}: {groups.notice()}")
    kind = "within-alphabet" if within_alphabet else "random"
    smallest = min(len(v) for v in characters.values())
    if shots + queries > smallest:
        raise ValueError(f"{shots} shots + {queries} queries per class, but some characters have only {smallest}")
    warm_rng = np.random.default_rng(seed + 10_000)
    for _ in range(warmup):  # first calls pay one-time costs (allocators, autograd, kernel caches)
        sx, sy, qx, _ = sample_task(characters, names, warm_rng, ways, shots, queries, groups)
        client.adapt_and_predict(model, sx, sy, qx, keep=False)
    rng = np.random.default_rng(seed)
    accuracies, latencies, server_ms = [], [], []
    for _ in tqdm(range(tasks), desc=f"{model}: {kind} {ways}-way {shots}-shot", disable=not progress, unit="task"):
        sx, sy, qx, qy = sample_task(characters, names, rng, ways, shots, queries, groups)
        start = time.perf_counter()
        adapted, prediction = client.adapt_and_predict(model, sx, sy, qx, keep=False)
        latencies.append((time.perf_counter() - start) * 1e3)
        server_ms.append(adapted.timings["total_ms"])
        accuracies.append(float(np.mean(prediction.labels == qy)))
    acc, ci = mean_ci95(accuracies)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    row = {
        "model": model, "ways": ways, "shots": shots, "queries_per_class": queries, "tasks": tasks, "seed": seed,
        "accuracy": acc, "ci95": ci, "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
        "server_ms_p50": float(np.median(server_ms)), "steps": adapted.steps, "task_kind": kind,
    }
    if groups is not None:
        row.update(alphabets=len(groups.names), skipped_alphabets=groups.skipped)
    return row


def format_table(rows: list[dict], fresh: list[str]) -> str:
    lines = [
        "| model | task | queries | accuracy (95% CI) | AdaptAndPredict p50 / p90 / p99 ms | server p50 ms | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['model']} | {r['ways']}-way {r['shots']}-shot"
            f"{' within-alphabet' if r.get('task_kind') == 'within-alphabet' else ''}, {r['steps']} steps | "
            f"{r['queries_per_class']}/class | {100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}% | "
            f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} | {r['server_ms_p50']:.1f} | "
            f"{'FRESH INIT (untrained)' if r['model'] in fresh else 'bundled'} |"
        )
    return "\n".join(lines)


def _commit() -> str | None:
    """The checkout's commit, '+dirty' when it has uncommitted changes; None outside a git checkout."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: str) -> dict:
    """What the numbers were measured on: the host's CPU, and the GPU when the server ran on one."""
    from kernels.bench.flops import cpu_name

    info = {"host": platform.node(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "gpu": None}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_markdown(record: dict) -> str:
    hw, s = record["hardware"], record["settings"]
    where = f"GPU {hw['gpu']}" if hw["gpu"] else f"CPU {hw['cpu']} ({hw['cpus']} cores)"
    fresh = record["fresh_init"]
    lines = [
        "# `make demo`: the bundled Omniglot models through gRPC",
        "",
        f"- Command: `{record['command']}` (commit {record['commit'] or 'unknown'}, {record['finished']})",
        f"- Hardware: {where}, host {hw['host']}, load average at the end {hw['load_average']}; torch "
        f"{record['torch']}",
        f"- Server: device {record['device']}, backend {record['backend']}"
        + (f", precision {record['precision']}" if record.get("precision") else "")
        + f"; stopped with SIGTERM, exit code {record['server_exit_code']}",
        f"- {s['tasks']} seeded tasks per model and task kind (seed {s['seed']}, after {s['warmup_tasks']} untimed "
        f"ones) on the held-out images_evaluation characters, {s['queries_per_class']} query images per class, real "
        "PNGs sent as uint8, one client, AdaptAndPredict round trips over loopback gRPC; accuracy: mean over tasks "
        "with its 95% confidence interval (1.96 standard errors)",
        "- Task kinds: N random characters; `within-alphabet`: all N characters from one alphabet (uniformly among "
        "the alphabets with at least N characters), usually harder: what a user adapting to one new script faces",
    ]
    if fresh:
        lines.append(f"- FRESH, UNTRAINED initializations served for {', '.join(fresh)}: their accuracy says nothing "
                     "about MAML")
    return "\n".join([*lines, "", format_table(record["results"], fresh)]) + "\n"


def write_results(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "demo.md").write_text(format_markdown(record))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "zoo")
    p.add_argument("--omniglot", type=Path, default=None, help="folder of images_evaluation.zip ($FASTADAPT_OMNIGLOT)")
    p.add_argument("--tasks", type=int, default=200, help="tasks per model")
    p.add_argument("--queries-per-class", type=int, default=15, help="query images per class in every task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-tasks", type=int, default=3, help="untimed tasks per model before measuring")
    p.add_argument("--warmup", help=argparse.SUPPRESS)  # renamed: `python -m server --warmup` means task counts
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--out", type=Path, default=None, help="also write DIR/demo.json and DIR/demo.md")
    p.add_argument("--no-progress", action="store_true")
    served = p.add_argument_group("security of the server the demo starts (see python -m server --help)")
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens"):
        served.add_argument(flag, type=Path, metavar="FILE")
    add_connection_args(p)
    args = p.parse_args(argv)
    if args.warmup is not None:
        p.error("--warmup is now --warmup-tasks (untimed tasks per model); `python -m server --warmup` takes the "
                "server's warm-up task counts")
    if args.auth_tokens and not args.token:
        p.error("--auth-tokens needs --token (or $FASTADAPT_TOKEN) for the demo's client")
    if args.tls_cert and not (args.ca or args.tls):
        args.ca = args.tls_cert
    security_args = [a for flag in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens") if getattr(args, flag)
                     for a in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]
    client_kwargs = connection_kwargs(args)
    progress = not args.no_progress

    characters = load_evaluation_characters(args.omniglot or omniglot_root(), progress)
    print(f"Omniglot evaluation set: {len(characters)} held-out characters, "
          f"{sum(len(v) for v in characters.values())} drawings, resized to 28x28 (LANCZOS), sent as uint8")
    with tempfile.TemporaryDirectory(prefix="fastadapt-demo-") as scratch:
        model_dir, fresh = prepare_model_dir(args.model_dir, [m for m, _, _ in DEMO_MODELS], Path(scratch) / "models")
        for name in fresh:
            print(f"NOTICE: {args.model_dir} has no checkpoint for {name}: serving a FRESH, UNTRAINED initialization "
                  f"instead. Its accuracy says nothing about MAML; train one with `{TRAIN_COMMANDS[name]}`.")
        server_args = ["--device", args.device, "--backend", args.backend, "--log-level", "warning", *security_args]
        with ServerProcess(model_dir, *server_args, log_path=Path(scratch) / "server.log",
                           client_kwargs=client_kwargs) as server:
            print(f"server up at {server.address}: device {server.info['device']}, backend {server.info['backend']}")
            rows = []
            with FastAdaptClient(server.address, timeout=120, **client_kwargs) as client:
                served = {m["name"]: m for m in client.list_models()}
                for model, ways, shots in DEMO_MODELS:
                    info = served[model]
                    print(f"{model}: {info['arch']}, {info['ways']}-way, {info['default_steps']} steps at lr "
                          f"{info['default_inner_lr']:g}, batch norm '{info['bn_policy']}', support views "
                          f"'{info['support_views'] or 'none'}', query views '{info['query_views'] or 'none'}'")
                    for within in (False, True):
                        rows.append(run_model(client, characters, model, ways, shots, args.queries_per_class,
                                              args.tasks, args.seed, args.warmup_tasks, progress, within))
            code = server.stop()
    print()
    print(f"{args.tasks} seeded tasks per model and kind (seed {args.seed}), {args.queries_per_class} query images "
          "per class, "
          "one client, AdaptAndPredict round trips over loopback gRPC:")
    print(format_table(rows, fresh))
    print(f"server stopped with SIGTERM, exit code {code}")
    if args.out:
        import torch

        record = {
            "command": shlex.join(["python", "-m", "server.demo", *argv]), "commit": _commit(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(server.info["device"]),
            "device": server.info["device"], "backend": server.info["backend"],
            "precision": server.info.get("precision"), "torch": torch.__version__,
            "settings": {"tasks": args.tasks, "queries_per_class": args.queries_per_class, "seed": args.seed,
                         "warmup_tasks": args.warmup_tasks},
            "results": rows, "fresh_init": fresh, "server_exit_code": code,
        }
        write_results(args.out, record)
        print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.md'}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
