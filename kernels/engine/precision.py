"""The Triton kernels' dot-product precisions (no Triton import: the engine and the server CLI name them too).

- ieee: fp32 products and accumulation (the default);
- tf32x3: each fp32 operand split into a TF32 high part and a TF32 remainder, three TF32 tensor-core passes:
  fp32-level results (H200: max logit difference 6e-6 at one task) at tensor-core speed;
- tf32: one TF32 pass (~1e-3 relative error), measured by the bench's `triton-tf32` method.
"""

from __future__ import annotations

PRECISIONS = ("ieee", "tf32x3", "tf32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown, expected one of {PRECISIONS}")
    return precision
