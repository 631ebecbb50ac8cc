"""`make predict-cost`: what one-image Predict costs on a 5-shot adaptation against a 1-shot one, and how many
bytes an adaptation holds, with the support statistics stored at adapt time ("stats") against forwarding the
support rows again at every Predict ("support rows", how the server served until the stored form).

Two measurements, in one run so the ratios compare like with like:
- in-process, on the engine: `predict` of one query image from stored statistics vs `models.maml.predict` with
  the support rows in front of the query (the old path), interleaved, for N-way 1-shot and 5-shot adaptations;
- through gRPC on loopback: a real server (`server.app.start`) answers one-image Predict on 1-shot and 5-shot
  adaptations (the stored form only; the old path is gone from the server).
Bytes: the stored form (fast weights + statistics) vs the old entry (fast weights + preprocessed support images).
A benchmark, never a timed test. Writes predict_cost.json and predict_cost.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kernels.engine import Engine
from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.maml import predict as reference_predict
from models.preprocess import preprocess_uint8
from models.runtime import allocator_state, tune_cpu_allocator
from server.app import ServerConfig, start
from server.cache import tensor_bytes
from server.client import FastAdaptClient

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
CASES = (("omniglot-5w1s", 5), ("omniglot-20w1s", 20))  # (bundled model, ways); both served with BN 'support'


def p50_ms(samples: list[float]) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, 50))


def task(ways: int, shots: int, seed: int):
    rng = np.random.default_rng(seed)
    support = rng.integers(0, 256, size=(ways * shots, 1, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(ways), shots)
    query = rng.integers(0, 256, size=(1, 1, 28, 28), dtype=np.uint8)
    return support, labels, query


def in_process(model: MetaModel, engine: Engine, repeats: int) -> dict:
    """Both shot counts and both methods interleaved in one loop, so drift on a busy machine hits all alike."""
    spec = model.spec
    cases = {}
    for shots in (1, 5):
        support, labels, query = task(spec.ways, shots, seed=shots)
        sx = preprocess_uint8(spec, torch.from_numpy(support))[None]
        qx = preprocess_uint8(spec, torch.from_numpy(query))[None]
        result = engine.adapt(model, sx, torch.from_numpy(labels)[None])
        cases[shots] = (sx, qx, result.params, result.stats)
    timings = {(shots, method): [] for shots in (1, 5) for method in ("stats", "support rows")}
    with torch.no_grad():
        for _ in range(repeats):
            for shots, (sx, qx, fast, stats) in cases.items():
                t0 = time.perf_counter()
                engine.predict(model, fast, qx, stats)
                t1 = time.perf_counter()
                reference_predict(spec, fast, qx, sx)
                t2 = time.perf_counter()
                timings[(shots, "stats")].append(t1 - t0)
                timings[(shots, "support rows")].append(t2 - t1)
    out = {}
    for shots, (sx, _, fast, stats) in cases.items():
        weights = tensor_bytes(fast.values())
        out[f"{model.name} {shots}-shot"] = {
            "predict_p50_ms": {m: p50_ms(timings[(shots, m)]) for m in ("stats", "support rows")},
            "adaptation_bytes": {"stats": weights + tensor_bytes(stats.values()),
                                 "support rows": weights + sx.numel() * 4},
        }
    return out


async def through_the_wire(model_dir: Path, names: list[str], repeats: int) -> dict:
    config = ServerConfig(model_dir=model_dir, host="127.0.0.1", port=0, device="cpu", backend="reference",
                          warmup="none")
    running = await start(config)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _wire_client, running.address, names, repeats)
    finally:
        await running.stop(1.0)


def _wire_client(address: str, names: list[str], repeats: int) -> dict:
    out = {}
    with FastAdaptClient(address, timeout=60) as client:
        for name in names:
            ways = client.get_model(name)["ways"]
            adapted = {}
            for shots in (1, 5):
                support, labels, query = task(ways, shots, seed=shots)
                adapted[shots] = client.adapt(name, support, labels)
            samples = {1: [], 5: []}
            for i in range(repeats + 5):  # 1-shot and 5-shot alternate; the first 5 rounds are not timed
                for shots, a in adapted.items():
                    t0 = time.perf_counter()
                    client.predict(a.adaptation_id, query)
                    if i >= 5:
                        samples[shots].append(time.perf_counter() - t0)
            for shots, a in adapted.items():
                out[f"{name} {shots}-shot"] = {"predict_p50_ms": p50_ms(samples[shots]),
                                               "adaptation_bytes": int(a.adaptation_bytes)}
    return out


def served_models(folder: Path) -> list[str]:
    """The bundled models, served with BN 'support' (the 20-way model was meta-trained transductive)."""
    names = []
    for name, _ in CASES:
        model = load_checkpoint(ZOO / f"{name}.pt")
        if model.spec.bn_policy != "support":
            model = dataclasses.replace(model, spec=model.spec.with_(bn_policy="support"))  # recipe fields kept
        save_checkpoint(folder / f"{name}.pt", model)
        names.append(name)
    return names


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def run(repeats: int) -> dict:
    engine = Engine("reference", "cpu")
    record = {"command": "python -m server.predict_cost " + " ".join(sys.argv[1:]),
              "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "allocator": allocator_state()},
              "repeats": repeats, "in_process": {}, "wire": {}}
    with tempfile.TemporaryDirectory() as tmp:
        names = served_models(Path(tmp))
        for name in names:
            model = load_checkpoint(Path(tmp) / f"{name}.pt")
            record["in_process"].update(in_process(model, engine, repeats))
        record["wire"] = asyncio.run(through_the_wire(Path(tmp), names, repeats))
    for name in names:
        one, five = record["in_process"][f"{name} 1-shot"], record["in_process"][f"{name} 5-shot"]
        record["in_process"][f"{name} 5-shot / 1-shot"] = {
            "predict_p50": {k: ratio(five["predict_p50_ms"][k], one["predict_p50_ms"][k])
                            for k in one["predict_p50_ms"]},
            "adaptation_bytes": {k: ratio(five["adaptation_bytes"][k], one["adaptation_bytes"][k])
                                 for k in one["adaptation_bytes"]},
        }
        w1, w5 = record["wire"][f"{name} 1-shot"], record["wire"][f"{name} 5-shot"]
        record["wire"][f"{name} 5-shot / 1-shot"] = {
            "predict_p50": ratio(w5["predict_p50_ms"], w1["predict_p50_ms"]),
            "adaptation_bytes": ratio(w5["adaptation_bytes"], w1["adaptation_bytes"])}
    return record


def markdown(record: dict) -> str:
    lines = ["# One-image Predict: stored support statistics vs support rows re-forwarded", "",
             f"Command: `{record['command']}`; {record['repeats']} Predicts per point, p50. Hardware: "
             f"{record['hardware']}", "", "## In-process (engine, reference backend)", "",
             "| adaptation | Predict p50 ms, stats | Predict p50 ms, support rows | bytes, stats | "
             "bytes, support rows |",
             "|---|---|---|---|---|"]
    for key, row in record["in_process"].items():
        if "/" in key:
            continue
        lines.append(f"| {key} | {row['predict_p50_ms']['stats']:.3f} | {row['predict_p50_ms']['support rows']:.3f} "
                     f"| {row['adaptation_bytes']['stats']:,} | {row['adaptation_bytes']['support rows']:,} |")
    lines += ["", "| ratio 5-shot / 1-shot | Predict p50, stats | Predict p50, support rows | bytes, stats | "
              "bytes, support rows |", "|---|---|---|---|---|"]
    for key, row in record["in_process"].items():
        if "/" in key:
            lines.append(f"| {key} | {row['predict_p50']['stats']} | {row['predict_p50']['support rows']} | "
                         f"{row['adaptation_bytes']['stats']} | {row['adaptation_bytes']['support rows']} |")
    lines += ["", "## Through gRPC on loopback (the server keeps the stored form)", "",
              "| adaptation | Predict p50 ms | adaptation_bytes |", "|---|---|---|"]
    for key, row in record["wire"].items():
        if "/" in key:
            lines.append(f"| {key} | {row['predict_p50']} (ratio) | {row['adaptation_bytes']} (ratio) |")
        else:
            lines.append(f"| {key} | {row['predict_p50_ms']:.3f} | {row['adaptation_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.predict_cost", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/predict-cost"), help="folder for the JSON and markdown")
    p.add_argument("--repeats", type=int, default=200, help="Predicts timed per point")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected >= 1")
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    record = run(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict_cost.json").write_text(json.dumps(record, indent=1))
    (args.out / "predict_cost.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
