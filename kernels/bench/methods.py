"""The methods the benchmark runs side by side: ours (the engine's backends) and the peers.

A method turns a `Case` into a zero-argument callable that does one full call (adapt all T tasks K steps, then
predict their queries) and returns the query logits [T, Q, ways]. `unavailable(device)` says why a method cannot run
here (missing package, needs CUDA, backend not built); the harness records that reason instead of running it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.bench import peers
from kernels.bench.configs import Case


@dataclass
class Method:
    name: str
    kind: str  # "ours" or "peer"
    make: Callable[[Case], Callable[[], torch.Tensor]]
    describe: str
    check: Callable[[torch.device], str | None] = field(default=lambda device: None)
    per_task: bool = False  # cost grows one task at a time: the harness predicts its time from smaller T
    tolerance: tuple[float, float] | None = None  # (rtol, atol) of its per-task agreement; None: the settings' (1e-4)
    max_error_ratio: float | None = None  # its cross-check verdict's limit (harness.cross_check); None: the settings'

    def unavailable(self, device: torch.device) -> str | None:
        try:
            return self.check(device)
        except Exception as exc:  # a probe that crashes is itself the reason
            return f"{type(exc).__name__}: {exc}"


def _engine(backend: str, device: torch.device, precision: str | None = None):
    from kernels.engine import Engine

    engine = Engine(backend=backend, device=device)
    if precision is not None:  # the fused kernels with tensor-core dot products (accuracy cost: see the cross-check)
        from kernels.engine.fused import TritonBackend

        engine.backend = TritonBackend(device, precision=precision)
    return engine


def backend_logits(backend, case: Case) -> torch.Tensor:
    """One full call of an engine backend on the case: its one-call adapt_predict (fast weights and support
    statistics are returned too, as a server keeps them); the query logits [T, Q, ways]."""
    lr = case.model.inner_lr(case.lr)  # backends take the lr resolved (kernels.engine.protocol)
    return backend.adapt_predict(case.model, case.support_x, case.support_y, case.query_x, case.steps, lr,
                                 track=False, bn_policy=case.bn_policy)[1]


def engine_method(backend: str, precision: str | None = None) -> Method:
    """Engine(backend): the backend's one-call adapt_predict. The first call captures (inside the engine's
    `warming()`: a captured key would otherwise wait for its second call), later calls replay."""

    def check(device: torch.device) -> str | None:
        if backend != "reference" and device.type != "cuda":
            if backend == "triton":
                return "no CUDA: Triton runs only under its interpreter here (TRITON_INTERPRET=1), not a speed path"
            return f"backend {backend!r} needs CUDA (CUDA graphs)"
        try:
            _engine(backend, device, precision)
        except Exception as exc:
            return f"Engine(backend={backend!r}) failed: {type(exc).__name__}: {exc}"
        return None

    def make(case: Case):
        engine = _engine(backend, case.device, precision)
        first = [True]

        def call():
            if first[0]:
                first[0] = False
                with engine.warming():
                    logits = backend_logits(engine.backend, case)
            else:
                logits = backend_logits(engine.backend, case)
            failures = engine.capture_failures()
            if failures:  # the backend fell back to eager launches: not the method this row claims to time
                raise RuntimeError(f"CUDA-graph capture failed, the backend ran eagerly: {failures[0]}")
            return logits

        return call

    describe = {
        "reference": "Engine reference: task-stacked grouped-conv forward, torch autograd, eager",
        "graph": "Engine graph: the reference captured in a CUDA graph per shape bucket",
        "triton": "Engine triton: fused Triton kernels",
    }[backend]
    name, tolerance, max_ratio = backend, None, None
    if precision is not None:
        name, describe = f"{backend}-{precision}", f"{describe}, tl.dot input precision {precision}"
    if precision == "tf32":  # one TF32 pass rounds every dot operand to 10 mantissa bits: its own, wider tolerance
        from kernels.checks.oracles import TF32_MAX_ERROR_RATIO, TOLERANCES

        tolerance, max_ratio = TOLERANCES[(torch.float32, "tf32")], TF32_MAX_ERROR_RATIO
        describe += (f" (cross-checked at error ratio {max_ratio:g}, rtol/atol {tolerance[0]:g}: the accuracy cost is "
                     "the recorded difference)")
    return Method(name, "ours", make, describe, check, tolerance=tolerance, max_error_ratio=max_ratio)


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs CUDA (CUDA graph capture)"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        engine_method("reference"),
        engine_method("triton"),
        engine_method("triton", precision="tf32x3"),
        engine_method("triton", precision="tf32"),
        Method("grouped-graph", "peer", peers.grouped_graph, "grouped conv (tasks in channels) in one CUDA graph",
               _needs_cuda),
        Method("vmap", "peer", peers.vmap_tasks, "torch.func: functional_call + grad, vmapped over tasks"),
        Method("higher", "peer", peers.higher_loop, "higher.innerloop_ctx, one task at a time",
               lambda device: peers.higher_unavailable(), per_task=True),
        Method("per-task-loop", "peer", peers.per_task_loop, "learn2learn-style module clone, one task at a time",
               per_task=True),
        # Last at every point: on the H200 its failed capture was followed by the grouped-graph peer's captured
        # logits disagreeing with the reference, so a failure here no longer precedes the other methods at the
        # same point (later points still follow it; the GPU test that forces a failed capture tells whether a
        # failed capture leaves anything behind at all).
        engine_method("graph"),
    )
}
REFERENCE = "reference"
