"""Support views: adapt on each support image and copies of it shifted by a pixel or two.

A 1-shot prototype is one image's features; the mean of the features of the image and its small translations is a
steadier estimate of the class (the meta-test, docs/results/support-views/: 20-way 1-shot served 93.51 -> 94.47 with
`cross2`). A model's spec names its views (`ModelSpec.support_views`); adapt then sees V x N*K support rows, each
image's views in a row and labelled as it, before any backend runs: the prototypes, the head's steps, the support
loss and the support batch-norm statistics are all of the extended set.

Query views (`ModelSpec.query_views`) are the same shifts at predict time: every query image is forwarded with its
views and its logits are the mean of theirs, a test-time ensemble (docs/results/query-views/). Each query is still
predicted from itself and the adaptation alone under the `support` policy; Predict forwards V x Q rows.

A shifted copy moves the image by (dy, dx) pixels and repeats its edge pixels into the uncovered border (Omniglot's
background is uniform there, in any preprocessing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.maml import predict
from models.spec import SUPPORT_VIEWS, VIEW_ARCHS

__all__ = ["SUPPORT_VIEWS", "VIEW_ARCHS", "mean_over_views", "predict_on_views", "query_views", "shifted",
           "support_views"]


def _shifts(x: torch.Tensor, offsets) -> list[torch.Tensor]:
    """x [..., H, W] moved by each (dy, dx) of `offsets`, edge pixels repeated: one padding, a slice per shift."""
    h, w = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    if pad == 0:
        return [x for _ in offsets]
    lead = x.shape[:-2]
    padded = F.pad(x.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="replicate")
    return [padded[..., pad - dy: pad - dy + h, pad - dx: pad - dx + w].reshape(*lead, h, w) for dy, dx in offsets]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x [..., H, W] moved down by dy and right by dx pixels (negative: up / left), edge pixels repeated."""
    return _shifts(x, ((dy, dx),))[0]


def _check(name: str, x: torch.Tensor, what: str) -> tuple[tuple[int, int], ...]:
    if name not in SUPPORT_VIEWS:
        raise ValueError(f"{what} views {name!r}, expected one of {', '.join(SUPPORT_VIEWS)}")
    offsets = SUPPORT_VIEWS[name]
    if len(offsets) > 1 and x.dim() != 5:
        raise ValueError(f"{what} views {name!r}: {what}_x has shape {list(x.shape)}, expected [T, S, C, H, W] images")
    return offsets


def support_views(name: str, support_x: torch.Tensor, support_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """support_x [T, S, C, H, W], support_y [T, S] (labels, or any per-row tensor [T, S, ...]) ->
    [T, S * V, C, H, W], [T, S * V, ...]: row s * V + v is view v of support row s."""
    offsets = _check(name, support_x, "support")
    if len(offsets) == 1:
        return support_x, support_y
    return _view_rows(support_x, offsets), support_y.repeat_interleave(len(offsets), dim=1)


def query_views(name: str, query_x: torch.Tensor) -> torch.Tensor:
    """query_x [T, Q, C, H, W] -> [T, Q * V, C, H, W]: row q * V + v is view v of query q (the input itself for
    'none')."""
    offsets = _check(name, query_x, "query")
    if len(offsets) == 1:
        return query_x
    return _view_rows(query_x, offsets)


def _view_rows(x: torch.Tensor, offsets) -> torch.Tensor:
    """[T, S, C, H, W] -> [T, S * V, C, H, W], row s * V + v view v of row s."""
    return torch.stack(_shifts(x, offsets), dim=2).flatten(1, 2)  # [T, S, V, C, H, W]


def mean_over_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """[T, Q * V, ...] logits of `query_views` rows -> [T, Q, ...]: each query's mean over its V views."""
    if views == 1:
        return logits
    t, rows = logits.shape[:2]
    if rows % views:
        raise ValueError(f"{rows} logit rows per task, expected a multiple of the {views} query views")
    return logits.reshape(t, rows // views, views, *logits.shape[2:]).mean(2)


def predict_on_views(spec, fast, query_x: torch.Tensor, support_x: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
    """models.maml.predict under the model's query views, as the server predicts: query_x [T, Q, ...] -> logits
    [T, Q, ways], each query's the mean of its views' (plain predict without query views). kwargs go to predict."""
    out = predict(spec, fast, query_views(spec.query_views, query_x), support_x, **kwargs)
    return mean_over_views(out, spec.query_view_count)
