"""scripts/seconds_until.sh, the stop time of every long-run script: seconds to the next HH:MM UTC less a margin,
never 0 or less (the trainer's 'no limit'), and bad arguments exit 2 naming them; rl_long_run.sh passes a bad
STOP_AT's error on."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "seconds_until.sh"


def call(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def _seconds_to(stop: dt.datetime) -> float:
    return (stop - dt.datetime.now(dt.UTC)).total_seconds()


def test_seconds_to_the_next_occurrence_less_the_margin():
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    ahead = now + dt.timedelta(hours=2)  # later today or early tomorrow: either way about 2 h away
    out = call(ahead.strftime("%H:%M"), "90")
    assert out.returncode == 0, out.stderr
    assert abs(int(out.stdout) - (_seconds_to(ahead) - 90)) <= 2
    behind = now - dt.timedelta(hours=1)  # passed: its next occurrence is tomorrow, about 23 h away
    out = call(behind.strftime("%H:%M"))
    assert abs(int(out.stdout) - (_seconds_to(behind + dt.timedelta(days=1)) - 30)) <= 2


def test_inside_the_margin_it_is_one_second_not_the_trainers_no_limit():
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)  # 60-120 s away
    out = call(soon.strftime("%H:%M"), "600")
    assert out.returncode == 0 and out.stdout.strip() == "1"


@pytest.mark.parametrize("args,message", [
    (("25:00",), "stop time '25:00', expected HH:MM (UTC)"),
    (("7pm",), "stop time '7pm', expected HH:MM (UTC)"),
    (("12:00", "-5"), "margin '-5', expected whole seconds >= 0"),
    ((), "usage:"),
    (("12:00", "30", "x"), "(got 3 arguments)"),
])
def test_bad_arguments_exit_2_naming_them(args, message):
    out = call(*args)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_a_long_run_script_stops_on_a_bad_stop_time_before_training(tmp_path):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), STOP_AT="99:99")
    env.pop("MAX_SECONDS", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "rl_long_run.sh"), "navigation-2d", "00:00"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "stop time '99:99', expected HH:MM (UTC)" in out.stderr
    assert not (tmp_path / "run").exists()
