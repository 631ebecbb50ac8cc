"""A long MAML-RL run's progress from its training log: windowed means of the meta-batch returns.

`python -m trainer.rl.progress RUN/state/log.jsonl --out RUN/progress [--window 25]` writes progress.json and
progress.md: for every window of meta-iterations, the mean training return before adaptation (the meta-policy's
round), after the inner VPG step (the adapted policies' round; absent for --algorithm pretrained), their difference
(what one step buys), and the seconds of training per meta-iteration (from the log's cumulative `seconds`, which a
resumed run continues). These are training returns on the meta-batch's own tasks, not a meta-test: that is
`python -m trainer.rl.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _load(log: Path) -> list[dict]:
    records = []
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{log}:{n}: not JSON ({str(e)[:80]}), expected one record per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int) or "return_pre" not in rec:
            raise ValueError(f"{log}:{n}: {line[:80]!r}, expected a training record with iteration and return_pre")
        records.append(rec)
    if not records:
        raise ValueError(f"{log}: no records, expected a run's state/log.jsonl")
    return records


def progress(records: list[dict], window: int) -> list[dict]:
    """One row per window of `window` consecutive records (the last may be shorter)."""
    if window < 1:
        raise ValueError(f"window {window}, expected at least 1 meta-iteration")
    rows, before = [], 0.0  # cumulative training seconds at the end of the previous window
    for start in range(0, len(records), window):
        chunk = records[start: start + window]
        row = {"first": chunk[0]["iteration"], "last": chunk[-1]["iteration"], "iterations": len(chunk),
               "return_pre": sum(r["return_pre"] for r in chunk) / len(chunk)}
        if all("return_post" in r for r in chunk):
            row["return_post"] = sum(r["return_post"] for r in chunk) / len(chunk)
            row["gain"] = row["return_post"] - row["return_pre"]
        if all("seconds" in r for r in chunk):
            row["seconds_per_iteration"] = (chunk[-1]["seconds"] - before) / len(chunk)
            before = chunk[-1]["seconds"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str, command: str) -> str:
    post = all("return_post" in r for r in rows)
    timed = all("seconds_per_iteration" in r for r in rows)
    head = ["meta-iterations", "before adaptation"] + (["after 1 VPG step", "gain"] if post else []) + \
        (["s / iteration"] if timed else [])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['first']}-{r['last']}", f"{r['return_pre']:.1f}"]
        if post:
            cells += [f"{r['return_post']:.1f}", f"{r['gain']:+.1f}"]
        if timed:
            cells.append(f"{r['seconds_per_iteration']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean training return per window (on the meta-batch's own tasks: not a meta-test). "
              "Seconds: training time per meta-iteration on whatever machine ran that window (the log's cumulative "
              "`seconds`).", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m trainer.rl.progress", description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="a run's state/log.jsonl")
    p.add_argument("--out", type=Path, required=True, help="folder for progress.json and progress.md")
    p.add_argument("--window", type=int, default=25, help="meta-iterations per row (default 25)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if not args.log.is_file():
        p.error(f"log {str(args.log)[:200]} does not exist, expected a run's state/log.jsonl")
    try:
        rows = progress(_load(args.log), args.window)
    except ValueError as e:
        p.error(str(e)[:300])
    title = args.title or f"{args.log.parent.parent.name}: training return per {args.window} meta-iterations"
    command = "python -m trainer.rl.progress " + shlex.join([str(a) for a in argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "progress.json").write_text(json.dumps({"log": str(args.log), "window": args.window,
                                                         "command": command, "rows": rows}, indent=1) + "\n")
    (args.out / "progress.md").write_text(markdown(rows, title, command))
    print(markdown(rows, title, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
