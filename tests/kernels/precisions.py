"""Kernel test parametrization shared by the kernel test files."""

import pytest
import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter ignores tl.dot's input precision: only ieee means something on the CPU.
PRECISIONS = ("ieee", "tf32x3", "tf32") if DEV.type == "cuda" else ("ieee",)


def with_precisions(cases):
    """Every case in ieee; the tensor-core precisions (CUDA only) on the full-size (gpu-marked) cases, which keeps
    the number of kernel compilations of a GPU run down."""
    out = []
    for case in cases:
        full = any(m.name == "gpu" for m in case.marks)
        for precision in PRECISIONS if full else ("ieee",):
            out.append(pytest.param(*case.values, precision, id=f"{case.id}-{precision}", marks=case.marks))
    return out
