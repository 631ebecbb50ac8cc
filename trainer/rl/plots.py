"""PNG plots for MAML-RL: training returns before/after adaptation, and meta-test return vs adaptation step."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.plots import finish  # noqa: E402


def plot_rl_training(log_path: Path, title: str, path: Path, window: int = 10):
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    its = [r["iteration"] for r in records]
    for key, label in (("return_pre", "before adaptation"), ("return_post", "after 1 VPG step")):
        if key not in records[0]:  # --algorithm pretrained samples no post-adaptation round
            continue
        values = [r[key] for r in records]
        ax.plot(its, values, alpha=0.3)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(its, smooth, label=f"{label} ({window}-it mean)", color=ax.lines[-1].get_color())
    ax.set_ylabel("mean return (meta-batch)")
    finish(fig, ax, title, "meta-iteration", path)


def plot_rl_steps(curves: dict[str, dict], title: str, path: Path, tasks: int = 40):
    """curves: label -> {'mean': [...], 'ci95': [...]}. A paper entry has no ci95 (dashed); one read off a figure
    has 'low' and 'high' instead, drawn as a hatched band around its dashed midpoint."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, res in curves.items():
        mean, ci = res["mean"], res.get("ci95")
        steps = range(len(mean))
        line = ax.plot(steps, mean, marker="o", linestyle="--" if ci is None else "-", label=label)[0]
        if ci is not None:
            ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.2)
        elif "low" in res and "high" in res:
            ax.fill_between(steps, res["low"], res["high"], facecolor="none", edgecolor=line.get_color(),
                            hatch="//", alpha=0.5, linewidth=0)
    ax.set_ylabel(f"mean return ({tasks} test goals)")
    ax.set_xticks(range(max(len(r["mean"]) for r in curves.values())))
    finish(fig, ax, title, "adaptation steps (VPG)", path)

