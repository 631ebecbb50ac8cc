"""The benchmark loop: every method on every (config, T) point, timed, measured, cross-checked, never crashing.

Per point the reference runs first, then the same adaptation in float64 on up to `oracle_tasks` of the tasks (all of
them, or evenly spaced ones covering the first and the last: every chunk and padding region). Every other method is
judged as the test suite judges the kernels (kernels.checks.oracles): its logits' distance to the float64 truth in
units of the float32 reference's own distance, at most `max_error_ratio` (20: a correct float32 method is 1-5x, a
bug 1e3x); the per-task agreement with the reference at atol/rtol 1e-4 is recorded beside it.
A method is warmed up (the first call also captures graphs / compiles kernels), then timed over up to `repeats`
calls (CUDA-synchronized wall time, median), stopping early once `case_time_s` is spent.
A method that is unavailable, fails (OOM, any error) or would not fit the time limits is recorded with the reason.
Time limits: `max_call_s` skips a method whose call, predicted linearly in T from its last measured point, would take
longer; `budget_s` is a global budget after which the remaining points are recorded as skipped.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kernels.bench import report
from kernels.bench.configs import CONFIGS, BenchConfig, make_case, make_model
from kernels.bench.flops import adapt_predict_flops, device_info
from kernels.bench.methods import METHODS, REFERENCE, Method
from kernels.checks.oracles import MAX_ERROR_RATIO, float64_logits, logits_error_ratio
from models.checkpoint import MetaModel


@dataclass
class BenchSettings:
    matrix: dict[str, list[int]]  # config name -> task counts T
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    device: str = "auto"
    repeats: int = 10
    warmup: int = 2
    budget_s: float | None = 240.0
    max_call_s: float = 10.0
    case_time_s: float = 2.0
    seed: int = 0
    bn_policy: str | None = None  # None: each config's own ("support", the serving default)
    peak_tflops: float | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    max_error_ratio: float = MAX_ERROR_RATIO  # cross-check verdict: see cross_check (a method may set its own)
    oracle_tasks: int = 32  # tasks per point adapted again in float64 for the verdict (all when T is at most this)
    progress: bool = True

    def __post_init__(self):
        for name, tasks in self.matrix.items():
            if name not in CONFIGS:
                raise ValueError(f"config {name!r} is unknown, expected one of {sorted(CONFIGS)}")
            if not tasks or any(int(t) < 1 for t in tasks):
                raise ValueError(f"config {name!r}: task counts {tasks}, expected a non-empty list of T >= 1")
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError(f"repeats={self.repeats}, warmup={self.warmup}: expected both >= 1")
        if self.oracle_tasks < 1 or not self.max_error_ratio > 0:
            raise ValueError(f"oracle_tasks={self.oracle_tasks}, max_error_ratio={self.max_error_ratio}: expected "
                             ">= 1 and > 0")


def _device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    kind = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) else type(exc).__name__
    return f"{kind}: {text[0][:300] if text else ''}"


class _Progress:
    """tqdm when it is installed (the bare GPU box may not have it), else one line per point."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="bench", unit="case", file=sys.stderr)
            except ImportError:
                pass

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])
            self.bar.update(1)
        elif self.enabled:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _measure(method: Method, case, settings: BenchSettings, deadline: float | None) -> dict:
    """Warm up, time, and return the metrics plus the last call's logits (under key 'logits')."""
    device = case.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    call = method.make(case)
    logits = call()
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(settings.warmup - 1 if first_ms < 1000 else 0):
        call()
    _sync(device)
    times = []
    for _ in range(settings.repeats):
        t0 = time.perf_counter()
        logits = call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if sum(times) > settings.case_time_s * 1e3 or (deadline is not None and time.perf_counter() > deadline):
            break
    out = {"first_call_ms": first_ms, "repeats": len(times), "ms_per_call": statistics.median(times),
           "ms_min": min(times), "logits": logits.detach()}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mem_mb"] = None
        out["rss_max_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    return out


def oracle_indices(tasks: int, count: int) -> torch.Tensor:
    """Up to `count` task indices evenly spaced over [0, tasks), the first and the last included."""
    if tasks <= count:
        return torch.arange(tasks)
    return torch.linspace(0, tasks - 1, count).round().long().unique()


@dataclass
class Oracle:
    """The float64 truth for some of a point's tasks, and the float32 reference's logits for the same tasks."""

    index: torch.Tensor  # task indices [n] into the point's batch
    ref32: torch.Tensor  # [n, Q, ways]
    ref64: torch.Tensor  # [n, Q, ways] float64


def float64_oracle(case, ref32: torch.Tensor, count: int) -> Oracle:
    """The case's reference adaptation again in float64 on `count` of its tasks (see oracle_indices)."""
    index = oracle_indices(case.tasks, count).to(case.device)
    ref64 = float64_logits(case.spec, case.model.params, case.support_x[index], case.support_y[index],
                           case.query_x[index], case.steps, case.lr, case.bn_policy)
    return Oracle(index, ref32[index], ref64)


def cross_check(logits: torch.Tensor, ref: torch.Tensor | None, atol: float = 1e-4, rtol: float = 1e-4,
                ref_note: str = "", oracle: Oracle | None = None, max_ratio: float = MAX_ERROR_RATIO) -> dict:
    """Query logits [T, Q, ways] against the reference's; the verdict from the float64 oracle when there is one.

    With an oracle: pass when max|logits - float64| over the oracle's tasks is at most `max_ratio` times the float32
    reference's own max|ref - float64| (+ 1e-5), the suite's criterion (kernels.checks.oracles.adapt_error_ratio):
    it scales with how much rounding the K steps amplify on these tasks, so a fixed tolerance need not be loose for
    one task and tight for another, and a method that is wrong on any checked task fails, however many others are
    right. Without one (the float64 run failed): pass only when every task is within atol + rtol * |ref|.
    Recorded either way: the tasks within that tolerance of the reference, the largest difference, argmax agreement.
    """
    if ref is None:
        return {"status": "n/a", "note": ref_note or "no reference logits at this point"}
    if logits.shape != ref.shape:
        return {"status": "fail", "note": f"logits shape {list(logits.shape)}, reference {list(ref.shape)}"}
    if not torch.isfinite(logits).all():
        return {"status": "fail", "note": "non-finite logits"}
    logits, ref = logits.float(), ref.float()
    diff = (logits - ref).abs()
    within = (diff <= atol + rtol * ref.abs()).flatten(1).all(dim=1)
    per_task = diff.flatten(1).max(dim=1).values
    out = {"max_abs_diff": float(per_task.max()), "median_task_diff": float(per_task.median()),
           "tasks_within": f"{int(within.sum())}/{within.numel()}", "n_within": int(within.sum()),
           "n_tasks": within.numel(), "fraction_within": float(within.float().mean()),
           "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), "atol": atol,
           "rtol": rtol}
    if oracle is None:
        out.update(status="pass" if bool(within.all()) else "fail", judged_by="tolerance")
        return out
    ratio = logits_error_ratio(logits[oracle.index], oracle.ref32, oracle.ref64)
    out.update(status="pass" if ratio <= max_ratio else "fail", judged_by="float64 error ratio",
               error_ratio=ratio, max_error_ratio=max_ratio, oracle_tasks=int(oracle.index.numel()))
    return out


def run_bench(settings: BenchSettings, out_dir: str | Path, methods: list[Method] | None = None) -> dict:
    """Run the matrix, write DIR/bench.json (after every point), bench.md and bench_<config>.png; return the dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(settings.device)
    if device.type == "cuda":  # every method must compute the same fp32 function (and the peak is the fp32 one)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if methods is None:
        unknown = [m for m in settings.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods {unknown} are unknown, expected some of {list(METHODS)}")
        methods = [METHODS[m] for m in settings.methods]
    methods = sorted(methods, key=lambda m: m.name != REFERENCE)  # the oracle runs first at every point
    start = time.perf_counter()
    deadline = None if settings.budget_s is None else start + settings.budget_s
    data = {
        "device": device_info(device, settings.peak_tflops),
        "precision": "fp32, TF32 off (cuDNN and matmul)" if device.type == "cuda" else "fp32",
        "settings": {k: v for k, v in asdict(settings).items() if k != "progress"},
        "methods": {m.name: {"kind": m.kind, "describe": m.describe} for m in methods},
        "configs": {},
        "results": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    reasons = {m.name: m.unavailable(device) for m in methods}
    progress = _Progress(sum(len(t) for t in settings.matrix.values()) * len(methods), settings.progress)
    try:
        states: dict[str, _ConfigState] = {}
        for tasks, cfg_name in run_order(settings.matrix):
            if cfg_name not in states:
                states[cfg_name] = _prepare_config(data, cfg_name, settings, device)
            _run_point(data, states[cfg_name], tasks, methods, reasons, settings, device, deadline, progress,
                       out_dir)
            report.write_all(data, out_dir)
    finally:
        progress.close()
        data["elapsed_s"] = round(time.perf_counter() - start, 2)
        data["summary"] = report.summarize(data)
        report.write_all(data, out_dir)
    return data


def run_order(matrix: dict[str, list[int]]) -> list[tuple[int, str]]:
    """(T, config) points breadth-first: every config at the smallest T before any config at the next, so a time
    budget that runs out leaves a table with every config at the small T rather than one config at every T (the
    first H200 run spent its budget on omniglot-5w1s and never reached 20-way or mini-ImageNet)."""
    rank = {name: i for i, name in enumerate(matrix)}
    return sorted(((int(t), name) for name, ts in matrix.items() for t in set(ts)), key=lambda p: (p[0], rank[p[1]]))


@dataclass
class _ConfigState:
    name: str
    config: BenchConfig
    model: MetaModel
    flops: float
    last: dict = field(default_factory=dict)  # method -> (T, ms) of its last measured point


def _prepare_config(data, cfg_name, settings, device) -> _ConfigState:
    config = CONFIGS[cfg_name]
    model = make_model(config, device, settings.seed, settings.bn_policy)
    spec = model.spec
    flops = adapt_predict_flops(spec, config.support, config.queries, config.steps, spec.bn_policy)
    data["configs"][cfg_name] = {**config.to_dict(), "bn_policy": spec.bn_policy, "describe": config.describe(),
                                 "flops_per_task": flops}
    return _ConfigState(cfg_name, config, model, flops)


def _run_point(data, state, tasks, methods, reasons, settings, device, deadline, progress, out_dir):
    cfg_name, config, model, flops, last = state.name, state.config, state.model, state.flops, state.last
    case, case_error = None, None
    try:
        case = make_case(config, model, tasks, device, settings.seed)
    except Exception as exc:
        case_error = f"building the tasks failed: {_error(exc)}"
    ref, ref_note, oracle = None, "the reference did not run at this point", None
    for method in methods:
        rec = {"config": cfg_name, "tasks": tasks, "method": method.name, "kind": method.kind}
        now = time.perf_counter()
        predicted = None
        if method.name in last:
            t_prev, ms_prev = last[method.name]
            predicted = ms_prev * tasks / t_prev / 1e3
        if reasons[method.name]:
            rec.update(status="unavailable", error=reasons[method.name])
        elif case_error:
            rec.update(status="failed", error=case_error)
        elif deadline is not None and now > deadline:
            rec.update(status="skipped", error=f"global time budget of {settings.budget_s:g} s spent")
        elif predicted is not None and predicted > settings.max_call_s:
            t_prev = last[method.name][0]
            rec.update(status="skipped", error=f"predicted {predicted:.1f} s per call (from T={t_prev}) > "
                                               f"max_call_s={settings.max_call_s:g}")
        elif predicted is not None and deadline is not None and now + 2 * predicted > deadline:
            rec.update(status="skipped", error=f"predicted {predicted:.1f} s per call: warm-up + one timed call "
                                               "would overrun the global time budget")
        else:
            try:
                m = _measure(method, case, settings, deadline)
            except Exception as exc:
                rec.update(status="failed", error=_error(exc))
                m = None
            if m is not None:
                logits = m.pop("logits")
                ms = m["ms_per_call"]
                rec.update(status="ok", **m, ms_per_task=ms / tasks, tasks_per_s=tasks / (ms / 1e3))
                tflops = flops * tasks / (ms / 1e3) / 1e12
                peak = data["device"].get("peak_tflops")
                rec.update(tflops=tflops, pct_peak=100 * tflops / peak if peak else None)
                last[method.name] = (tasks, ms)
                if case.query_y is not None and logits.shape[:2] == case.query_y.shape:
                    rec["query_accuracy"] = float((logits.argmax(-1) == case.query_y).float().mean())
                if method.name == REFERENCE:
                    finite = bool(torch.isfinite(logits).all())
                    ref = logits if finite else None
                    ref_note = "reference logits are not finite" if not finite else ""
                    rec["crosscheck"] = {"status": "oracle" if finite else "fail", "note": ref_note or "the oracle"}
                    if finite:
                        try:
                            oracle = float64_oracle(case, logits, settings.oracle_tasks)
                            rec["crosscheck"]["oracle_tasks"] = int(oracle.index.numel())
                        except Exception as exc:  # recorded; the others are then judged by the tolerance alone
                            rec["crosscheck"]["note"] = f"the float64 run failed ({_error(exc)}): tolerance only"
                else:
                    rtol, atol = method.tolerance or (settings.rtol, settings.atol)
                    limit = method.max_error_ratio or settings.max_error_ratio
                    rec["crosscheck"] = cross_check(logits, ref, atol, rtol, ref_note, oracle, limit)
                del logits
            _free(device)
        if method.name == REFERENCE and rec["status"] != "ok":
            ref_note = f"the reference was {rec['status']}: {rec.get('error', '')}"
        data["results"].append(rec)
        (out_dir / "bench.json").write_text(json.dumps(data, indent=1, default=str))
        progress.step(f"{cfg_name} T={tasks} {method.name}: {rec['status']}")
    del case, ref, oracle
    _free(device)
