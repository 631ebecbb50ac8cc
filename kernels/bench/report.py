"""Benchmark outputs from the results dict: DIR/bench.json, DIR/bench.md, DIR/bench_<config>.png.

`summarize` adds the speed-ups (ours over the best peer that passed the cross-check, per config and T) and the
"reference vs per-task loop" ratio. Everything here is a function of bench.json, so `python -m kernels.bench
--replot DIR` redraws the table and plots on a machine that has matplotlib when the benchmark box had none.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _points(results: list[dict]) -> dict[tuple[str, int], list[dict]]:
    points: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in results:
        points[(r["config"], r["tasks"])].append(r)
    return points


def _trusted(r: dict) -> bool:
    return r["status"] == "ok" and r.get("crosscheck", {}).get("status") != "fail"


def summarize(data: dict) -> dict:
    """Speed-ups, the reference / per-task-loop ratio and cross-check counts; annotates the ours' records too."""
    speedups, ratios = [], []
    crosscheck: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (config, tasks), recs in _points(data["results"]).items():
        peers = [r for r in recs if r["kind"] == "peer" and _trusted(r)]
        best = min(peers, key=lambda r: r["ms_per_call"]) if peers else None
        row = {"config": config, "tasks": tasks, "best_peer": best["method"] if best else None,
               "best_peer_ms": best["ms_per_call"] if best else None, "ours": {}}
        for r in recs:
            if r["status"] == "ok":
                crosscheck[r["method"]][r.get("crosscheck", {}).get("status", "n/a")] += 1
            if r["kind"] != "ours" or r["status"] != "ok":
                continue
            r["best_peer"] = row["best_peer"]
            r["speedup_vs_best_peer"] = best["ms_per_call"] / r["ms_per_call"] if best else None
            row["ours"][r["method"]] = r["speedup_vs_best_peer"]
        speedups.append(row)
        by_name = {r["method"]: r for r in recs if r["status"] == "ok"}
        if "reference" in by_name and "per-task-loop" in by_name:
            ref, loop = by_name["reference"]["ms_per_call"], by_name["per-task-loop"]["ms_per_call"]
            ratios.append({"config": config, "tasks": tasks, "reference_ms": ref, "per_task_loop_ms": loop,
                           "per_task_loop_over_reference": loop / ref})
    statuses: dict[str, int] = defaultdict(int)
    for r in data["results"]:
        statuses[r["status"]] += 1
    return {"device": data["device"]["name"], "speedups": speedups, "reference_vs_per_task_loop": ratios,
            "crosscheck": {k: dict(v) for k, v in crosscheck.items()}, "verdicts": verdicts(data),
            "statuses": dict(statuses)}


def verdicts(data: dict) -> list[dict]:
    """Per config and method: pass when the cross-check passed at every point it was judged at (harness.cross_check:
    the float64 error ratio). A method wrong on some tasks fails however many others are right."""
    pooled: dict[tuple[str, str], dict] = {}
    for r in data["results"]:
        c = r.get("crosscheck", {})
        if r["status"] != "ok" or c.get("status") in (None, "oracle", "n/a"):
            continue
        acc = pooled.setdefault((r["config"], r["method"]), {"points": 0, "failed": 0, "within": 0, "tasks": 0,
                                                              "worst_ratio": None, "limit": c.get("max_error_ratio")})
        acc["points"] += 1
        acc["failed"] += c["status"] != "pass"
        acc["within"] += c.get("n_within", 0)
        acc["tasks"] += c.get("n_tasks", 0)
        if "error_ratio" in c:
            acc["worst_ratio"] = max(acc["worst_ratio"] or 0.0, c["error_ratio"])
    return [{"config": config, "method": method, "points": a["points"], "points_failed": a["failed"],
             "worst_error_ratio": a["worst_ratio"], "max_error_ratio": a["limit"], "tasks_within": a["within"],
             "tasks": a["tasks"], "verdict": "fail" if a["failed"] else "pass"}
            for (config, method), a in pooled.items()]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def _mem(r: dict) -> str:
    if r.get("peak_mem_mb") is not None:
        return f"{r['peak_mem_mb']:.0f}"
    return f"{r['rss_max_mb']:.0f} RSS" if r.get("rss_max_mb") is not None else "-"


def _check(r: dict, default_atol: float | None = None) -> str:
    c = r.get("crosscheck", {})
    # a method judged at its own tolerance (triton-tf32) says so in its cell
    own = f" {c['atol']:g}" if "atol" in c and default_atol is not None and c["atol"] != default_atol else ""
    if "error_ratio" in c:
        judged = f"ratio {c['error_ratio']:.2g} (limit {c['max_error_ratio']:g})"
    else:
        judged = c.get("judged_by", "")
    if "tasks_within" in c:
        return (f"{c['status']}: {judged}; {c['tasks_within']} tasks within tol{own}, max {c['max_abs_diff']:.1e}, "
                f"argmax {100 * c['argmax_agreement']:.2f}%")
    return c.get("status", "-") + (f" ({c['note']})" if c.get("note") and c.get("status") == "fail" else "")


def markdown(data: dict) -> str:
    dev, summary = data["device"], data.get("summary") or summarize(data)
    s = data["settings"]
    versions = f"torch {dev['torch']}, triton {dev.get('triton')}"
    versions += f", CUDA {dev['cuda']}" if dev.get("cuda") else ""
    peak = f"{dev['peak_tflops']} TFLOP/s ({dev['peak_source']})" if dev.get("peak_tflops") else dev["peak_source"]
    cpu = f" {dev['threads']} torch threads, load average at start {dev['load_average']}." if "threads" in dev else ""
    cpu += f" Allocator (every method, same process): {dev['allocator']}." if dev.get("allocator") else ""
    lines = [
        f"# fastadapt benchmark: {dev['name']}",
        "",
        f"- Device: **{dev['name']}** ({versions}); precision {data['precision']}.{cpu}",
        f"- Peak used for % of peak: {peak}.",
        "- One call = adapt all T tasks K first-order SGD steps on their support sets, then predict their queries.",
        f"- ms/call: median of up to {s['repeats']} timed calls (stopping after {s['case_time_s']} s) after warm-up; "
        "wall time, CUDA-synchronized. TFLOP/s: analytic conv + linear FLOPs (2 per MAC, backward 2x forward "
        "except the first layer): a lower bound.",
        "- vs best peer: the fastest peer's ms/call over ours, among peers that did not fail the cross-check there.",
        "- query acc: accuracy on the synthetic query sets (prototype + noise images): adaptation really happens.",
        f"- Cross-check: the reference adaptation is rerun in float64 on up to {s.get('oracle_tasks', '?')} tasks per "
        "point (evenly spaced, first and last included); a method passes when its logits there are at most "
        f"{s.get('max_error_ratio', '?')}x as far from float64 as the float32 reference's (the test suite's "
        "criterion; a method may set its own limit). Also shown: tasks within "
        f"atol {s['atol']} / rtol {s['rtol']} of the reference, the largest difference and argmax agreement.",
        f"- Elapsed {data.get('elapsed_s', '?')} s; global budget {s['budget_s']} s, max_call_s {s['max_call_s']}.",
    ]
    unavailable = {r["method"]: r["error"] for r in data["results"] if r["status"] == "unavailable"}
    for name, why in unavailable.items():
        lines.append(f"- Unavailable here: **{name}**: {why}")
    points = _points(data["results"])
    for cfg_name, cfg in data["configs"].items():
        lines += ["", f"## {cfg_name}: {cfg['describe']}, BN {cfg['bn_policy']} "
                      f"({cfg['flops_per_task'] / 1e6:.1f} MFLOP per task per call)", "",
                  "| T | method | ms/call | ms/task | tasks/s | peak mem MB | TFLOP/s | % peak | query acc | "
                  "cross-check | vs best peer |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        missing = []
        for (config, tasks), recs in points.items():
            if config != cfg_name:
                continue
            for r in recs:
                if r["status"] != "ok":
                    if r["status"] != "unavailable":
                        missing.append(f"- T={tasks} {r['method']}: {r['status']}: {r.get('error', '')}")
                    continue
                vs = r.get("speedup_vs_best_peer")
                vs_txt = f"{vs:.2f}x ({r['best_peer']})" if vs else "-"
                lines.append(
                    f"| {tasks} | {r['method']} ({r['kind']}) | {_fmt(r['ms_per_call'])} | {_fmt(r['ms_per_task'])} | "
                    f"{_fmt(r['tasks_per_s'])} | {_mem(r)} | {_fmt(r['tflops'])} | {_fmt(r.get('pct_peak'), 2)} | "
                    f"{_fmt(r.get('query_accuracy'), 3)} | {_check(r, s['atol'])} | {vs_txt} |"
                )
        if missing:
            lines += ["", "Not measured:", *missing]
        measured = any(r["config"] == cfg_name and r["status"] == "ok" for r in data["results"])
        if measured and data.get("plots") == "written":
            lines += ["", f"![tasks/s vs T, {cfg_name}, {dev['name']}](bench_{cfg_name}.png)"]
    if summary["verdicts"]:
        lines += ["", "## Cross-check verdicts (pass: every point of the config passed)", "",
                  "| config | method | points failed | worst float64 error ratio (limit) | tasks within tolerance | "
                  "verdict |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| {v['config']} | {v['method']} | {v['points_failed']}/{v['points']} | "
                  f"{_fmt(v['worst_error_ratio'], 2)} ({_fmt(v['max_error_ratio'])}) | "
                  f"{v['tasks_within']}/{v['tasks']} | **{v['verdict']}** |" for v in summary["verdicts"]]
    ratios = summary["reference_vs_per_task_loop"]
    if ratios:
        lines += ["", f"## reference vs per-task loop on {dev['name']}", "",
                  "| config | T | per-task loop ms | reference ms | loop / reference |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['config']} | {r['tasks']} | {_fmt(r['per_task_loop_ms'])} | {_fmt(r['reference_ms'])} | "
                  f"{r['per_task_loop_over_reference']:.2f}x |" for r in ratios]
    if data.get("plots_note"):
        lines += ["", f"Plots: {data['plots_note']}"]
    return "\n".join(lines) + "\n"


def plot(data: dict, out_dir: Path) -> list[Path]:
    """bench_<config>.png: tasks/s vs T, log-log, one line per method (ours solid, peers dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for cfg_name, cfg in data["configs"].items():
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        kinds = {}
        for r in data["results"]:
            if r["config"] == cfg_name and r["status"] == "ok":
                series[r["method"]].append((r["tasks"], r["tasks_per_s"]))
                kinds[r["method"]] = r["kind"]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if kinds[name] == "ours" else "--s", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tasks per call (T)")
        ax.set_ylabel("tasks / s (adapt + predict)")
        ax.set_title(f"{cfg_name}: {cfg['describe']}\n{data['device']['name']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"bench_{cfg_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(data: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    data["summary"] = summarize(data)
    try:
        plot(data, out_dir)
        data["plots"], data["plots_note"] = "written", ""
    except ImportError as exc:
        data["plots"] = "not written"
        data["plots_note"] = (f"not drawn ({exc}); draw them elsewhere with `python -m kernels.bench --replot "
                              f"{out_dir}` from bench.json")
    (out_dir / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    (out_dir / "bench.md").write_text(markdown(data))


def replot(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    data = json.loads((out_dir / "bench.json").read_text())
    write_all(data, out_dir)
    return data
