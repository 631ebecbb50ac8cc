"""Checks of the fused kernels outside the test suite: the GPU self-test (`python -m kernels.checks.gpu_selftest`),
the compile check (`python -m kernels.checks.compile_check`), and the float64 oracles and tolerance table
(`oracles`) that the self-test, the benchmark and the tests share."""
