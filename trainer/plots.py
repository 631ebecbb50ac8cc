"""PNG plots: query accuracy (or MSE) vs inner step, and the training curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_steps(result: dict, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in ("transductive", "support", "running"):
        if policy not in result:
            continue
        mean, ci = result[policy]["mean"], result[policy]["ci95"]
        steps = range(len(mean))
        label = "MAML" if result["metric"] == "mse" else f"BN {policy}"  # regression models have no batch norm
        ax.plot(steps, mean, marker="o", label=label)
        ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.2)
    ax.set_ylabel("query MSE" if result["metric"] == "mse" else "query accuracy (%)")
    finish(fig, ax, title, "inner SGD steps", path)


def plot_training(log_path: Path, title: str, path: Path):
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        return
    regression = all(r["train_acc"] == 0 for r in records)  # the trainer logs -MSE as validation for regression
    fig, ax = plt.subplots(figsize=(5, 3.5))
    key, label = ("train_loss", "meta-train query MSE") if regression else ("train_acc", "meta-train query acc (%)")
    ax.plot([r["iteration"] for r in records], [r[key] for r in records], label=label)
    val = [(r["iteration"], -r["val"] if regression else r["val"]) for r in records if r.get("val") == r.get("val")
           and "val" in r]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation MSE" if regression else "validation acc (%)")
    finish(fig, ax, title, "meta-iteration", path)


def finish(fig, ax, title: str, xlabel: str, path: Path):
    """Label, grid, legend and save a figure (shared by the classifier and RL plots)."""
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
