"""Support views: adapt on each support image and copies of it shifted by a pixel or two.

A 1-shot prototype is one image's features; the mean of the features of the image and its small translations is a
steadier estimate of the class (the meta-test, docs/results/support-views/: 20-way 1-shot served 93.51 -> 94.47 with
`cross2`). A model's spec names its views (`ModelSpec.support_views`); adapt then sees V x N*K support rows, each
image's views in a row and labelled as it, before any backend runs: the prototypes, the head's steps, the support
loss and the support batch-norm statistics are all of the extended set. Queries are never changed.

A shifted copy moves the image by (dy, dx) pixels and repeats its edge pixels into the uncovered border (Omniglot's
background is uniform there, in any preprocessing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.spec import SUPPORT_VIEWS, VIEW_ARCHS

__all__ = ["SUPPORT_VIEWS", "VIEW_ARCHS", "shifted", "support_views", "view_count"]

def view_count(name: str) -> int:
    return len(SUPPORT_VIEWS[name])


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x [..., H, W] moved down by dy and right by dx pixels (negative: up / left), edge pixels repeated."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    padded = F.pad(flat, (pad, pad, pad, pad), mode="replicate")
    out = padded[..., pad - dy: pad - dy + h, pad - dx: pad - dx + w]
    return out.reshape(*lead, h, w)


def support_views(name: str, support_x: torch.Tensor, support_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """support_x [T, S, C, H, W], support_y [T, S] (labels, or any per-row tensor [T, S, ...]) ->
    [T, S * V, C, H, W], [T, S * V, ...]: row s * V + v is view v of support row s."""
    if name not in SUPPORT_VIEWS:
        raise ValueError(f"support views {name!r}, expected one of {', '.join(SUPPORT_VIEWS)}")
    offsets = SUPPORT_VIEWS[name]
    if len(offsets) == 1:
        return support_x, support_y
    if support_x.dim() != 5:
        raise ValueError(f"support views {name!r}: support_x has shape {list(support_x.shape)}, expected "
                         "[T, S, C, H, W] images")
    views = torch.stack([shifted(support_x, dy, dx) for dy, dx in offsets], dim=2)  # [T, S, V, C, H, W]
    x = views.flatten(1, 2)
    y = support_y.repeat_interleave(len(offsets), dim=1)
    return x, y
