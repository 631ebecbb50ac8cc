"""One-shot GPU check of the fused kernels: compile every kernel at full size, compare with torch, time adapt.

    python -m kernels.checks.gpu_selftest [--out results/selftest.json] [--precisions ieee,tf32x3,tf32] [--jobs 8]
                                   [--no-timing]

Prints one line per check (PASS / FAIL / ERROR with the first lines of a compile error) and a timing table:
omniglot 5-way 1-shot, 10 steps, 75 queries, at T=1 (latency) and T=1024 (throughput), through the CUDA-graph
path (TritonBackend.adapt_predict), per tl.dot precision. Checks run in `--jobs` worker processes: Triton compiles
one specialization at a time per process and they share the on-disk cache, so this mostly divides compile time.
A compile error in one check does not hide the others. Exit status 1 when any check fails.

Dry run of this script on a machine without a GPU (interpreter, tiny shapes, minutes):
    TRITON_INTERPRET=1 FASTADAPT_SELFTEST_DEVICE=cpu python -m kernels.checks.gpu_selftest --tiny --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from kernels.checks.oracles import TOLERANCES, adapt_error_ratio, conv_block_case, exact_torch, head_case
from kernels.engine.fused import TritonBackend
from kernels.fused.conv_backward import conv_bn_backward_sgd
from kernels.fused.conv_forward import conv_bn_forward
from kernels.fused.head import head_step
from models.checkpoint import MetaModel
from models.functional import init_params
from models.spec import ModelSpec

DEV = torch.device(os.environ.get("FASTADAPT_SELFTEST_DEVICE", "cuda"))
RATIO = 20.0  # fused adapt at most 20x as far from float64 as torch's float32 (seen 1.2-4.6x; a bug gives 1e3x+)

# name, tasks, batch, cin, cout, size, stride, mode (0 raw, 1 bn, 2 bn+pool), stat images (None = all)
BLOCKS = [
    ("omniglot-l1", 64, 5, 1, 64, 28, 2, 0, None),
    ("omniglot-l2", 64, 5, 64, 64, 14, 2, 1, None),
    ("omniglot-l3-20way", 64, 20, 64, 64, 7, 2, 1, None),
    ("omniglot-l4-predict", 16, 80, 64, 64, 4, 2, 1, 5),
    ("mini-l1", 8, 5, 3, 32, 84, 1, 0, None),
    ("mini-l2", 8, 5, 32, 32, 84, 1, 2, None),
    ("mini-l4-predict", 8, 80, 32, 32, 21, 1, 2, 5),
]
# name, tasks, batch, channels, size, ways, pool, shots
HEADS = [("omniglot-head-5w1s", 64, 5, 64, 2, 5, False, 1), ("omniglot-head-20w5s", 16, 100, 64, 2, 20, False, 5),
         ("mini-head-5w1s", 16, 5, 32, 10, 5, True, 1)]
TINY_BLOCKS = [("tiny-l1", 2, 2, 1, 16, 9, 2, 0, None), ("tiny-l2-pool", 2, 2, 16, 16, 7, 1, 2, 1)]
TINY_HEADS = [("tiny-head", 2, 5, 16, 2, 5, False, 1), ("tiny-head-pool", 2, 5, 16, 4, 5, True, 1)]


def _spec(arch, ways, inner_lr, steps, tiny):
    extra = {}
    if tiny:
        extra = dict(hidden=16, input_shape=(1, 9, 9) if arch == "conv4-omniglot" else (3, 20, 20))
    return ModelSpec(arch, arch, ways=ways, inner_lr=inner_lr, steps=steps, **extra)


def _err(actual, expected, precision, scale=1.0):
    """(max |a - e| / (atol*scale + rtol*|e|), max |a - e|): the first must be <= 1 to pass."""
    rtol, atol = TOLERANCES[(torch.float32, precision)]
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf"), float("nan")
    diff = (a - e).abs()
    return float((diff / (atol * scale + rtol * e.abs())).max()), float(diff.max())


def check_block(name, tasks, batch, cin, cout, size, stride, mode, stat_images, precision):
    worst = {}
    with exact_torch():
        case = conv_block_case(tasks, batch, cin, cout, size, stride, mode, stat_images=stat_images, device=DEV)
    z, stats = conv_bn_forward(case.x, case.params["weight"], case.params["bias"], stride=stride, in_bn=case.in_bn,
                               pool_input=mode == 2, stat_images=stat_images, precision=precision)
    worst["z"] = _err(z, case.z, precision)
    worst["stats"] = _err(stats, case.stats, precision, float(case.stats.abs().max().clamp(min=1)))
    with exact_torch():
        case = conv_block_case(tasks, batch, cin, cout, size, stride, mode, device=DEV)
    new, dy_in, in_bsum = conv_bn_backward_sgd(case.x, case.dy, case.z, case.stats, case.bsum, case.params, 0.3,
                                               stride=stride, in_bn=case.in_bn, pool_input=mode == 2,
                                               input_grad=mode > 0, precision=precision)
    for k, p in case.params.items():
        # The conv bias feeds BN, which cancels it: its true gradient is 0 and the kernel copies it, while torch's
        # float32 autograd returns rounding noise for it (up to 1e-3 over mini-ImageNet's 35,000 rows): compare
        # with the exact value, the old bias.
        expected = p.expand_as(new[k]) if k == "bias" else p - 0.3 * case.grads[k]
        worst[f"new {k}"] = _err(new[k], expected, precision, max(1.0, float(case.grads[k].abs().max()) / 100))
    if mode > 0:
        worst["dy_in"] = _err(dy_in, case.dy_in, precision)
        worst["in_bsum"] = _err(in_bsum, case.in_bsum, precision, float(case.in_bsum.abs().max().clamp(min=1)))
    return worst


def check_head(name, tasks, batch, channels, size, ways, pool, shots, precision):
    with exact_torch():
        case = head_case(tasks, batch, channels, size, ways, pool, shots, device=DEV)
    out = head_step(case.z, case.bn, case.weight, case.bias, pool=pool, labels=case.labels, shots=shots,
                    track=True, train=True, lr=0.4, precision=precision)
    return {
        "logits": _err(out.logits, case.logits, precision),
        "loss": _err(out.loss, case.ce.sum(1) / shots, precision),
        "dy": _err(out.dy, case.dy, precision),
        "bsum": _err(out.bsum, case.bsum, precision, float(case.bsum.abs().max().clamp(min=1))),
        "new weight": _err(out.params["weight"], case.weight - 0.4 * case.grads["weight"], precision),
        "new bias": _err(out.params["bias"], case.bias - 0.4 * case.grads["bias"], precision),
    }


def _model(spec, seed):
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in init_params(spec, g).items()}
    return MetaModel(spec, params).to(DEV)


def _tasks(spec, tasks, queries, seed):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, spec.ways, *spec.input_shape, generator=g).to(DEV)
    sy = torch.arange(spec.ways).expand(tasks, -1).contiguous().to(DEV)
    return sx, sy, torch.rand(tasks, queries, *spec.input_shape, generator=g).to(DEV)


def check_adapt(arch, tiny, precision):
    """Whole adapt + predict (CUDA graph), 8 tasks, 10 steps (5 for mini), 75 queries, against float64 truth in
    units of torch's float32 error (ratio <= RATIO passes; see block_reference.adapt_error_ratio)."""
    steps = 10 if arch == "conv4-omniglot" else 5
    spec = _spec(arch, 5, 0.4 if arch == "conv4-omniglot" else 0.01, steps, tiny)
    model = _model(spec, 1)
    sx, sy, qx = _tasks(spec, 2 if tiny else 8, 3 if tiny else 75, 2)
    got, logits = TritonBackend(DEV, precision=precision).adapt_predict(model, sx, sy, qx, steps, spec.inner_lr,
                                                                        track=True)
    ratios = adapt_error_ratio(spec, model.params, sx, sy, qx, steps, spec.inner_lr, spec.bn_policy, got.params,
                               logits)
    limit = RATIO if precision != "tf32" else 1000.0  # tf32 is reported, not held to float32 accuracy
    return {k: (v / limit, v) for k, v in ratios.items()}


def time_adapt(arch, tasks, precision, tiny, steps=10, queries=75, reps=20):
    spec = _spec(arch, 5, 0.4, steps, tiny)
    model = _model(spec, 3)
    if tiny:
        tasks, queries, steps, reps = min(tasks, 2), 3, 1, 1
    sx, sy, qx = _tasks(spec, tasks, queries, 4)
    backend = TritonBackend(DEV, precision=precision)
    call = lambda: backend.adapt_predict(model, sx, sy, qx, steps, spec.inner_lr, track=False)  # noqa: E731
    with backend.warming():
        call()  # compile + capture
    call()
    reps = max(1 if tiny else 3, reps if tasks <= 64 else reps // 4)
    cuda = DEV.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / reps
    graph_ms = None
    entry = next(iter(backend.graphs.entries()), None)
    if cuda and entry is not None and len(backend.graphs) == 1:
        t0 = time.perf_counter()
        for _ in range(reps):
            entry.graph.replay()
        sync()
        graph_ms = (time.perf_counter() - t0) * 1e3 / reps
    return {"ms_per_call": ms, "graph_replay_ms": graph_ms, "tasks_per_s": tasks / ms * 1e3}


CHECKS = {"block": check_block, "head": check_head, "adapt": check_adapt}


def run_check(key, kind, args):
    """One check, in a worker process: (key, status, detail, record, seconds)."""
    t0 = time.time()
    try:
        worst = CHECKS[kind](*args)
        ok = all(ratio <= 1.0 for ratio, _ in worst.values())
        bad = max(worst.items(), key=lambda kv: kv[1][0])
        detail = f"worst {bad[0]}: {bad[1][0]:.2f} of the limit (value {bad[1][1]:.2e})"
        record = {"status": "PASS" if ok else "FAIL", "worst": {k: list(v) for k, v in worst.items()}}
    except Exception as exc:  # a compile error must not hide the other kernels
        detail = " | ".join(traceback.format_exception_only(exc)[-1].strip().splitlines()[:3])[:400]
        record = {"status": "ERROR", "error": traceback.format_exc()[-4000:]}
    return key, record["status"], detail, record, time.time() - t0


def plan(precisions, tiny):
    jobs = []
    for prec in precisions:
        for spec in TINY_BLOCKS if tiny else BLOCKS:
            jobs.append((f"block {spec[0]} [{prec}]", "block", (*spec, prec)))
        for spec in TINY_HEADS if tiny else HEADS:
            jobs.append((f"head {spec[0]} [{prec}]", "head", (*spec, prec)))
        for arch in ("conv4-omniglot", "conv4-miniimagenet"):
            jobs.append((f"adapt+predict {arch} [{prec}]", "adapt", (arch, tiny, prec)))
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--precisions", default="ieee,tf32x3,tf32")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="worker processes for checks")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small shapes: a dry run of this script without a GPU")
    args = ap.parse_args(argv)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu_selftest needs CUDA (or FASTADAPT_SELFTEST_DEVICE=cpu TRITON_INTERPRET=1 with --tiny)")
        return 2
    import triton

    precisions = args.precisions.split(",")
    name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (Triton interpreter)"
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "checks": {}, "timing": {}}
    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}", flush=True)
    ok = True
    jobs = plan(precisions, args.tiny)
    t_start = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_check, *job) for job in jobs]
        for fut in as_completed(futures):
            key, status, detail, record, seconds = fut.result()
            report["checks"][key] = record
            ok &= status == "PASS"
            print(f"{status:5s} {key:48s} {seconds:6.1f}s  {detail}", flush=True)
    print(f"checks: {time.time() - t_start:.0f}s wall", flush=True)
    if not args.no_timing:
        print("timing: omniglot 5-way 1-shot, 10 steps, 75 queries, CUDA graph (targets: T=1 <= 0.25 ms, "
              "T=1024 >= 70000 tasks/s)", flush=True)
        for prec in precisions:
            for tasks in (1, 1024):
                key = f"omniglot-5w1s T={tasks} [{prec}]"
                try:
                    t = time_adapt("conv4-omniglot", tasks, prec, args.tiny)
                    report["timing"][key] = t
                    replay = "-" if t["graph_replay_ms"] is None else f"{t['graph_replay_ms']:.3f}"
                    print(f"  {key:40s} {t['ms_per_call']:9.3f} ms/call  replay {replay} ms  "
                          f"{t['tasks_per_s']:12.0f} tasks/s", flush=True)
                except Exception as exc:
                    report["timing"][key] = {"error": traceback.format_exc()[-4000:]}
                    print(f"  {key:40s} ERROR {str(exc).splitlines()[0][:200]}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print("ALL PASS" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
