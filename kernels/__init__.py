"""fastadapt's kernels, by role:

- `kernels.fused`: the fused Triton kernels of the inner loop and their launchers (imports triton);
- `kernels.engine`: `Engine` and its interchangeable backends (`protocol.AdaptBackend`: `reference`, `graph`,
  `fused` = triton), their one input check (`validation`), the captured-program cache both graph backends share
  (`graph_cache`), task chunking and the Triton precisions (triton is imported lazily, so the server's CLI and the
  CPU paths never need it);
- `kernels.bench`: the benchmark against the peers (`python -m kernels.bench`) and the profiler
  (`python -m kernels.bench.profile`);
- `kernels.checks`: the GPU self-test, the compile check and the float64 oracles.

The layout conventions every kernel follows are in `kernels.fused.common`.
"""
