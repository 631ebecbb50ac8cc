"""Compile every kernel specialization the triton backend launches, for a GPU architecture, on a machine without one.

    python -m kernels.checks.compile_check [--arch 90] [--precisions ieee,tf32x3,tf32] [--usage] [--only NAME]

The Triton interpreter (the CPU test path) accepts code the GPU compiler rejects (loop-carried type changes,
non-power-of-two aranges, dot shapes under 16, ...). This runs the real AdaptProgram / predict sequence for the
full-size models with the launches intercepted, collects each distinct (kernel, argument types, constexprs) with the
block sizes a CUDA device would get, and compiles it with triton.compile for `cuda:<arch>` (PTX and cubin through
the bundled ptxas). With --usage it also prints registers and local (spill) bytes per thread. Exit status 1 on
any failure.
Must run without TRITON_INTERPRET (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.fused.common as common
from kernels.fused.program import AdaptProgram, predict_conv4
from models.functional import init_params
from models.spec import ModelSpec

_DTYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32"}


def _signature(fn, args, kwargs):
    names = fn.arg_names
    sig, constexprs = {}, {}
    values = dict(zip(names, args)) | kwargs
    for i, name in enumerate(names):
        v = values[name]
        if i in fn.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = _DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__} is not handled")
    return sig, constexprs


@contextmanager
def intercept(found: dict):
    """Record launches instead of running them; block-size heuristics see a 132-SM CUDA device."""
    jit_cls = triton.runtime.jit.JITFunction
    saved = (jit_cls.__getitem__, common._sm_count)

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            sig, constexprs = _signature(fn, args, kwargs)
            key = (fn.__name__, tuple(sorted(sig.items())),
                   tuple(sorted((k[0], str(v)) for k, v in constexprs.items())))
            found.setdefault(key, (fn, sig, constexprs))
        return launch

    jit_cls.__getitem__ = getitem
    common._sm_count = lambda index: 132
    try:
        yield
    finally:
        jit_cls.__getitem__, common._sm_count = saved


def collect(precisions) -> dict:
    found: dict = {}
    cuda = torch.device("cuda", 0)
    specs = [
        (ModelSpec("o5", "conv4-omniglot", ways=5, inner_lr=0.4, steps=2), 1, 75),
        (ModelSpec("o20", "conv4-omniglot", ways=20, inner_lr=0.1, steps=2), 5, 20),
        (ModelSpec("m5", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=2), 1, 75),
    ]
    import kernels.fused.conv_backward as cg
    import kernels.fused.conv_forward as ck

    blocks = (ck.fwd_blocks, cg.bwd_blocks)
    ck.fwd_blocks = lambda *a: blocks[0](*a[:-1], cuda)
    cg.bwd_blocks = lambda *a, first_layer=False: blocks[1](*a[:-1], cuda, first_layer=first_layer)
    try:
        with intercept(found):
            for spec, shots, queries in specs:  # on the meta device: shapes only, nothing allocated
                meta = {k: v.to("meta") for k, v in init_params(spec).items()}
                lrs = {k: torch.empty_like(v) for k, v in meta.items()}
                for tasks in (1, 1024):
                    support = spec.ways * shots
                    sx = torch.empty(tasks, support, *spec.input_shape, device="meta")
                    qx = torch.empty(tasks, queries, *spec.input_shape, device="meta")
                    sy = torch.empty(tasks, support, dtype=torch.int64, device="meta")
                    for precision in precisions:
                        # one rate as a float (eager launches) and as a device scalar (captured programs), and
                        # Meta-SGD rates; adapt_predict and adapt alone, each with the support statistics out
                        lr_scalar = torch.empty((), device="meta")
                        for policy, lr, q in (("support", 0.1, qx), ("support", lr_scalar, qx),
                                              ("transductive", lrs, qx), ("support", lr_scalar, None)):
                            p = AdaptProgram(spec, tasks, support, 0 if q is None else queries, 2, True, policy,
                                             precision, "meta", support_stats=True)
                            p.meta, p.lr, p.support_x, p.support_y, p.query_x = meta, lr, sx, sy, q
                            p.launch()
                        stacked = {k: v.expand(tasks, *v.shape).contiguous() for k, v in meta.items()}
                        sums = torch.empty(4, tasks, 2, spec.hidden, device="meta", dtype=torch.float64)
                        predict_conv4(spec, stacked, qx, precision, sums)  # from stored statistics
                        predict_conv4(spec, stacked, qx, precision)  # transductive
    finally:
        ck.fwd_blocks, cg.bwd_blocks = blocks
    return found


def _resource_usage(cubin: bytes) -> str:
    """Registers / local (spill) memory per thread from the cubin, via the cuobjdump that ships with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return f"{regs.group(1) if regs else '?'} regs, {local.group(1) if local else '?'} B local"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--precisions", default="ieee,tf32x3,tf32")
    ap.add_argument("--usage", action="store_true", help="print registers and local (spill) bytes per thread")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or common.kernels_interpreted():
        print("unset TRITON_INTERPRET: the kernels must be JIT functions to be compiled")
        return 2
    found = collect(args.precisions.split(","))
    print(f"{len(found)} distinct kernel specializations; compiling for cuda:{args.arch}", flush=True)
    failures = 0
    for (name, _, _), (fn, sig, constexprs) in sorted(found.items(), key=lambda kv: kv[0][0]):
        if args.only not in name:
            continue
        short = ", ".join(f"{fn.arg_names[i]}={v}" for (i,), v in sorted(constexprs.items())
                          if fn.arg_names[i] not in ("EPS",))
        t0 = time.time()
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", args.arch, 32))
            info = _resource_usage(compiled.asm["cubin"]) if args.usage else ""
            print(f"ok    {name:20s} {time.time() - t0:5.1f}s {info:32s} {short}", flush=True)
        except Exception as exc:
            failures += 1
            print(f"FAIL  {name:20s} {short}\n      {str(exc).strip()[:2000]}", flush=True)
    print("all compiled" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
