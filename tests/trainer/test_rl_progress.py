"""python -m trainer.rl.progress: windowed training returns and seconds per iteration of a run's log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.rl.progress import progress

ROOT = Path(__file__).resolve().parents[2]


def write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_windows_average_the_returns_and_time_the_iterations():
    # 5 iterations: pre 1..5, post pre + 10 * i, cumulative seconds 3, 6, 9, then 19, 29 (a slower machine)
    records = [{"iteration": i, "return_pre": float(i), "return_post": float(i + 10 * i),
                "seconds": [3.0, 6.0, 9.0, 19.0, 29.0][i - 1]} for i in range(1, 6)]
    rows = progress(records, window=3)
    assert [(r["first"], r["last"], r["iterations"]) for r in rows] == [(1, 3, 3), (4, 5, 2)]
    assert rows[0]["return_pre"] == pytest.approx(2.0) and rows[1]["return_pre"] == pytest.approx(4.5)
    assert rows[0]["return_post"] == pytest.approx(22.0) and rows[1]["gain"] == pytest.approx(45.0)
    assert rows[0]["seconds_per_iteration"] == pytest.approx(3.0)
    assert rows[1]["seconds_per_iteration"] == pytest.approx(10.0)


def test_pretrained_logs_have_no_post_column():
    rows = progress([{"iteration": 1, "return_pre": -5.0}, {"iteration": 2, "return_pre": -3.0}], window=25)
    assert rows == [{"first": 1, "last": 2, "iterations": 2, "return_pre": -4.0}]


def test_cli_writes_json_and_markdown(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [{"iteration": i, "return_pre": -10.0 + i, "return_post": -5.0 + i,
                                              "seconds": 2.0 * i} for i in range(1, 5)])
    out = subprocess.run([sys.executable, "-m", "trainer.rl.progress", str(log), "--out", str(tmp_path / "p"),
                          "--window", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "p" / "progress.json").read_text())
    assert [r["return_post"] for r in data["rows"]] == [-3.5, -1.5]
    md = (tmp_path / "p" / "progress.md").read_text()
    assert "| 1-2 | -8.5 | -3.5 | +5.0 | 2.0 |" in md and "| 3-4 | -6.5 | -1.5 | +5.0 | 2.0 |" in md


@pytest.mark.parametrize("content, args, message", [
    (None, [], "does not exist, expected a run's state/log.jsonl"),
    ("", [], "no records"),
    ("not json\n", [], "not JSON"),
    ('{"iteration": 1}\n', [], "expected a training record"),
    ('{"iteration": 1, "return_pre": 0}\n', ["--window", "0"], "window 0, expected at least 1"),
])
def test_bad_input_exits_2_naming_it(tmp_path, content, args, message):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    out = subprocess.run([sys.executable, "-m", "trainer.rl.progress", str(log), "--out", str(tmp_path / "p")] + args,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
