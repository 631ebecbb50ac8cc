"""Meta-training throughput: fastadapt's batched meta-iteration against a per-task loop, in the same run.

`python -m trainer.throughput [--config omniglot-5w1s] [--algorithm maml] [--iters 20] [--out DIR]`
Methods: `per-task loop` (learn2learn/higher style: every task adapts its own parameter copies one after the other,
then one Adam step), `batched` (all tasks in one task-stacked call) and, on CUDA, `batched + CUDA graph` (the whole
meta-iteration captured once and replayed). Reports ms per meta-iteration, meta-iterations/s and tasks/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.functional import forward
from models.runtime import tune_cpu_allocator
from trainer.config import CONFIGS
from trainer.meta import MetaLearner
from trainer.train import model_spec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, q = cfg.ways * cfg.shots, cfg.ways * cfg.queries
    sx = torch.rand(cfg.meta_batch, n, 1, 28, 28, generator=g).to(device)
    qx = torch.rand(cfg.meta_batch, q, 1, 28, 28, generator=g).to(device)
    sy = torch.arange(cfg.ways).repeat_interleave(cfg.shots).repeat(cfg.meta_batch, 1).to(device)
    qy = torch.arange(cfg.ways).repeat_interleave(cfg.queries).repeat(cfg.meta_batch, 1).to(device)
    return sx, sy, qx, qy


def per_task_step(learner: MetaLearner, batch):
    """One meta-iteration the learn2learn way: a Python loop over tasks, each with its own [1, ...] weights."""
    cfg, spec = learner.cfg, learner.spec
    sx, sy, qx, qy = batch
    learner.optimizer.zero_grad(set_to_none=False)
    for t in range(sx.shape[0]):
        fast = {k: v.unsqueeze(0) for k, v in learner.params.items()}
        for _ in range(cfg.inner_steps):
            loss = F.cross_entropy(forward(spec, fast, sx[t:t + 1])[0], sy[t], reduction="sum") / cfg.shots
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=cfg.second_order)
            fast = {k: w - cfg.inner_lr * g for (k, w), g in zip(fast.items(), grads)}
        (F.cross_entropy(forward(spec, fast, qx[t:t + 1])[0], qy[t]) / sx.shape[0]).backward()
    learner.optimizer.step()


def measure(fn, iters, device, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def run(config: str, algorithm: str, iters: int, device: torch.device, meta_batch: int = 0) -> dict:
    cfg = dataclasses.replace(CONFIGS[config], algorithm=algorithm, device=str(device))
    cfg.meta_batch = meta_batch or cfg.meta_batch
    batch = _batch(cfg, device)
    rows = []
    methods = [("per-task loop", False, True), ("batched", False, False)]
    if device.type == "cuda":
        methods.append(("batched + CUDA graph", True, False))
    for name, graph, loop in methods:
        learner = MetaLearner(dataclasses.replace(cfg, cuda_graph=graph), model_spec(cfg), device,
                              torch.Generator().manual_seed(0))
        fn = (lambda lr=learner: per_task_step(lr, batch)) if loop else (lambda lr=learner: lr.step(batch))
        n = max(3, iters // 4) if loop else iters
        sec = measure(fn, n, device)
        rows.append({"method": name, "ms_per_iteration": sec * 1e3, "iterations_per_s": 1 / sec,
                     "tasks_per_s": cfg.meta_batch / sec, "timed_iterations": n})
    base = rows[0]["ms_per_iteration"]
    for r in rows:
        r["speedup_vs_per_task_loop"] = base / r["ms_per_iteration"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"config": config, "algorithm": algorithm, "meta_batch": cfg.meta_batch, "device": name, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"### Meta-training throughput: {res['config']} ({res['algorithm']}, meta-batch {res['meta_batch']}) "
             f"on {res['device']}", "", "| method | ms / meta-iteration | meta-iterations/s | tasks/s | speed-up |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['ms_per_iteration']:.2f} | {r['iterations_per_s']:.1f} | "
                     f"{r['tasks_per_s']:.0f} | {r['speedup_vs_per_task_loop']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="omniglot-5w1s", choices=[k for k in CONFIGS if k.startswith("omniglot")])
    p.add_argument("--algorithm", default="maml", choices=["maml", "fomaml"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--meta-batch", type=int, default=0, help="0: the config's")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/train_throughput")
    a = p.parse_args(argv)
    tune_cpu_allocator()  # both methods run in this process, with the allocator the trainer uses
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    res = run(a.config, a.algorithm, a.iters, device, a.meta_batch)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{a.config}_{a.algorithm}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
