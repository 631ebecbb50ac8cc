"""The fast-adaptation benchmark: our engine backends against the peers a user would pick, side by side.

`python -m kernels.bench --out DIR` (`make bench`) writes DIR/bench.json, DIR/bench.md and DIR/bench_<config>.png.
A benchmark, never a timed test: the tests only check that the harness runs and cross-checks on a tiny config.
"""

from kernels.bench.configs import CONFIGS, MATRICES, BenchConfig
from kernels.bench.harness import BenchSettings, run_bench
from kernels.bench.methods import METHODS, Method

__all__ = ["CONFIGS", "MATRICES", "METHODS", "BenchConfig", "BenchSettings", "Method", "run_bench"]
