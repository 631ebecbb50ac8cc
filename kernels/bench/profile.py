"""Where one adapt + predict call spends its time: a per-kernel (GPU) or per-operator (CPU) profile.

    python -m kernels.bench.profile [--config omniglot-5w1s] [--tasks 1,128] [--backend auto] [--precision ieee]
                                    [--calls 5] [--out results/profile]

For each T it times the call as served (`graph ms`: the CUDA-graph replay on a GPU backend) and profiles the same
call launched eagerly (torch.profiler; kernels inside a graph replay are not always attributed), then writes
DIR/profile.json and DIR/profile.md: per kernel (or CPU operator) the launches per call, device (or CPU self) time
per call and its share, and the device's busy time against the served call's wall time: what is left is launch
gaps and host work, the part a fused or persistent kernel removes. The benchmark says how fast; this says why.
Same cases as `make bench` (kernels.bench.configs), so the numbers line up with its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kernels.bench.configs import CONFIGS, make_case, make_model
from kernels.bench.methods import backend_logits
from kernels.engine import BACKENDS, Engine
from kernels.engine.precision import PRECISIONS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(backend, case, calls: int) -> float:
    for _ in range(2):
        backend_logits(backend, case)
    _sync(case.device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        backend_logits(backend, case)
        _sync(case.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _us(evt, *names) -> float:
    for name in names:
        value = getattr(evt, name, None)
        if value:
            return float(value)
    return 0.0


def profile_rows(backend, case, calls: int) -> tuple[list[dict], float, str]:
    """Per-kernel (CUDA) or per-operator (CPU) rows for `calls` eager calls: (rows, busy us per call, what)."""
    cuda = case.device.type == "cuda"
    backend_logits(backend, case)  # compiled and allocated before the profile
    _sync(case.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            backend_logits(backend, case)
        _sync(case.device)
    rows = []
    for evt in prof.key_averages():
        if cuda:
            if "cuda" not in str(getattr(evt, "device_type", "")).lower():
                continue
            us = _us(evt, "self_device_time_total", "self_cuda_time_total")
        else:
            us = _us(evt, "self_cpu_time_total")
        if us <= 0:
            continue
        rows.append({"name": evt.key, "per_call": evt.count / calls, "us_per_call": us / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    busy = sum(r["us_per_call"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_call"] / busy if busy else 0.0
    return rows, busy, "GPU kernels" if cuda else "CPU operators (self time)"


def eager_twin(backend):
    """The same backend without CUDA graphs (so the profiler sees each kernel), or the backend itself."""
    if backend.graph_capacity() is None:  # captures nothing
        return backend
    if backend.name == "triton":
        from kernels.engine.fused import TritonBackend

        return TritonBackend(backend.device, precision=backend.precision, use_graphs=False)
    from kernels.engine.graph import GraphBackend

    return GraphBackend(backend.device, capture=False, budget_bytes=backend.budget_bytes)


def run(config: str, task_counts: list[int], backend: str, device: str, calls: int, precision: str | None,
        top: int) -> dict:
    engine = Engine(backend, device)
    served = engine.backend
    if precision is not None:
        if engine.backend_name != "triton":
            raise ValueError(f"--precision {precision} is a triton backend option, the backend is "
                             f"{engine.backend_name!r}")
        from kernels.engine.fused import TritonBackend

        served = TritonBackend(engine.device, precision=precision)
    profiled = eager_twin(served)
    cfg = CONFIGS[config]
    model = make_model(cfg, engine.device)
    out = {"config": config, "describe": cfg.describe(), "backend": engine.backend_name,
           "precision": served.precision, "device": str(engine.device),
           "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "CPU",
           "torch": torch.__version__, "calls": calls, "points": []}
    for tasks in task_counts:
        case = make_case(cfg, model, tasks, engine.device)
        wall = _wall_ms(served, case, calls)
        eager_wall = _wall_ms(profiled, case, calls) if profiled is not served else wall
        rows, busy_us, what = profile_rows(profiled, case, calls)
        out["points"].append({
            "tasks": tasks, "served_ms": wall, "eager_ms": eager_wall, "busy_ms": busy_us / 1e3, "what": what,
            "busy_share_of_served": busy_us / 1e3 / wall if wall else None, "launches_per_call": sum(
                r["per_call"] for r in rows), "rows": rows[:top], "rows_total": len(rows),
        })
    return out


def to_markdown(data: dict) -> str:
    lines = [f"# Profile: {data['describe']}", "",
             f"{data['device_name']}, backend {data['backend']}"
             + (f" ({data['precision']})" if data["precision"] else "")
             + f", torch {data['torch']}, median of {data['calls']} calls.", ""]
    for p in data["points"]:
        lines += [f"## T = {p['tasks']}", "",
                  f"served call {p['served_ms']:.3f} ms; eager call {p['eager_ms']:.3f} ms; {p['what']} busy "
                  f"{p['busy_ms']:.3f} ms per call ({100 * (p['busy_share_of_served'] or 0):.0f}% of the served "
                  f"call), {p['launches_per_call']:.0f} launches / operators per call", "",
                  "| kernel / operator | per call | us per call | share |", "|---|---|---|---|"]
        for r in p["rows"]:
            name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
            lines.append(f"| `{name}` | {r['per_call']:g} | {r['us_per_call']:.1f} | {100 * r['share']:.1f}% |")
        if p["rows_total"] > len(p["rows"]):
            lines.append(f"| ({p['rows_total'] - len(p['rows'])} more) | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="omniglot-5w1s", choices=sorted(CONFIGS))
    p.add_argument("--tasks", default="1,128", help="comma-separated task counts")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="triton tl.dot precision (default ieee)")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="rows per point in the table")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/profile"))
    a = p.parse_args(argv)
    try:
        tasks = [int(t) for t in a.tasks.split(",")]
        if not tasks or min(tasks) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--tasks {a.tasks!r}: expected comma-separated task counts >= 1, such as 1,128")
    if a.calls < 1:
        p.error(f"--calls {a.calls}: expected >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = None if a.device == "auto" else a.device
    data = run(a.config, tasks, a.backend, device, a.calls, a.precision, a.top)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.json").write_text(json.dumps(data, indent=1))
    md = to_markdown(data)
    (a.out / "profile.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
