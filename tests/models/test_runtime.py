"""models.runtime: large tensors stop coming from (and going back to) mmap once the allocator is tuned."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import ctypes, json, sys, threading
import torch
from models.runtime import allocator_state, tune_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
before = allocator_state()
state = tune_cpu_allocator()
assert tune_cpu_allocator() == state  # idempotent
seen = {}

def work(name):
    x = torch.ones(64, 1024, 1024)  # 256 MiB: far over glibc's largest mmap threshold
    info = libc.mallinfo2()
    seen[name] = {"mmapped": info.hblkhd, "heap": info.arena, "sum": float(x[0, 0, :8].sum())}
    del x

work("main")
t = threading.Thread(target=work, args=("thread",))  # the server's engine thread allocates too
t.start(); t.join()
print(json.dumps({"before": before, "state": state, "seen": seen}))
"""


def _probe(env_value=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FASTADAPT_MALLOC_TUNING", None)
    if env_value is not None:
        env["FASTADAPT_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")


@glibc
def test_tuned_allocator_serves_large_tensors_from_the_heap_in_every_thread():
    res = _probe()
    assert res["before"].startswith("allocator untouched (not requested)")
    assert "M_MMAP_MAX=0" in res["state"]
    for name in ("main", "thread"):
        seen = res["seen"][name]
        assert seen["sum"] == 8.0
        assert seen["mmapped"] < 64 << 20, f"{name}: {seen['mmapped']} bytes still mmapped"
        assert seen["heap"] >= 256 << 20, f"{name}: heap of {seen['heap']} bytes cannot hold the 256 MiB tensor"


@glibc
def test_untuned_allocator_mmaps_large_tensors_and_the_switch_is_named():
    res = _probe("0")
    assert res["state"] == "allocator untouched (FASTADAPT_MALLOC_TUNING=0)"
    assert res["seen"]["main"]["mmapped"] >= 256 << 20  # the reference: glibc's default behaviour
