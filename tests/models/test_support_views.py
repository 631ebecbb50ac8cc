"""Support views (models.views, ModelSpec.support_views): adapt on every support image and its small shifts.

Checked against an independent shift (index arithmetic with clamped edges, one pixel at a time), for the layout adapt
sees (view v of row s at s * V + v, labelled as row s), for what a Proto-ANIL head becomes (the nearest centroid of
the views' mean features), for the evaluation (the extended support set is what it adapts on), and for the spec
(old specs load as 'none', bad values are refused naming the value).
"""

import numpy as np
import pytest
import torch

from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.functional import adapted_keys, body_features, init_params, stack_params
from models.maml import adapt, predict
from models.spec import SUPPORT_VIEWS, ModelSpec
from models.views import mean_over_views, predict_on_views, query_views, shifted, support_views
from trainer.evaluate import evaluate

SPEC = ModelSpec("tiny-views", "conv4-omniglot", ways=4, inner_lr=0.3, steps=2, hidden=8, input_shape=(1, 12, 12),
                 adapt_params="head", head_init="proto", support_views="cross2")


def _reference_shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[i, j] = x[i - dy, j - dx], the index clamped into the image (the edge pixel repeated)."""
    h, w = x.shape[-2:]
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


@pytest.mark.parametrize("dy, dx", [(1, 0), (-1, 0), (2, 0), (0, -2), (0, 1), (1, -2)])
def test_a_shift_moves_the_image_and_repeats_its_edge(dy, dx):
    x = torch.rand(2, 3, 1, 7, 9, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(shifted(x, dy, dx).numpy(), _reference_shift(x.numpy(), dy, dx))


def test_views_follow_each_row_and_keep_its_label():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 5, 1, 12, 12, generator=g), torch.randint(0, 4, (2, 5), generator=g)
    vx, vy = support_views("cross2", x, y)
    offsets = SUPPORT_VIEWS["cross2"]
    assert len(offsets) == 9 and offsets[0] == (0, 0) and len(set(offsets)) == 9
    assert vx.shape == (2, 45, 1, 12, 12) and vy.shape == (2, 45)
    for s in range(5):
        for v, (dy, dx) in enumerate(offsets):
            np.testing.assert_array_equal(vx[:, s * 9 + v].numpy(), _reference_shift(x[:, s].numpy(), dy, dx))
            assert torch.equal(vy[:, s * 9 + v], y[:, s])
    same_x, same_y = support_views("none", x, y)
    assert same_x is x and same_y is y


def test_a_proto_head_on_views_is_the_nearest_centroid_of_the_views_mean_features():
    g = torch.Generator().manual_seed(2)
    params = init_params(SPEC, g)
    sx = torch.rand(3, 8, 1, 12, 12, generator=g)
    sy = torch.stack([torch.randperm(4, generator=g).repeat(2) for _ in range(3)])
    vx, vy = support_views(SPEC.support_views, sx, sy)
    fast = adapt(SPEC, params, vx, vy, 0, SPEC.inner_lr, adapt_keys=adapted_keys(SPEC, "head")).params
    feats = body_features(SPEC, stack_params(params, 3), vx)  # batch statistics of the 72 rows
    mu = torch.stack([torch.stack([feats[t][vy[t] == c].mean(0) for c in range(4)]) for t in range(3)])
    torch.testing.assert_close(fast["head.weight"], 2 * mu)
    plain = adapt(SPEC, params, sx, sy, 0, SPEC.inner_lr, adapt_keys=adapted_keys(SPEC, "head")).params
    assert (plain["head.weight"] - fast["head.weight"]).abs().max() > 1e-3  # the views changed the prototypes


class _Tasks:
    """A fixed list of tasks, in the sampler's interface."""

    def __init__(self, batches):
        self.batches = list(batches)

    def sample(self, n):
        return self.batches.pop(0)


class _Batch:
    def __init__(self, sx, sy, qx, qy):
        self.support_x, self.support_y, self.query_x, self.query_y = sx, sy, qx, qy


def test_the_evaluation_adapts_on_the_views_as_the_server_does():
    g = torch.Generator().manual_seed(3)
    params = init_params(SPEC, g)
    sx = torch.rand(4, 4, 1, 12, 12, generator=g)
    sy = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])
    qx, qy = torch.rand(4, 8, 1, 12, 12, generator=g), torch.randint(0, 4, (4, 8), generator=g)
    keys = adapted_keys(SPEC, "head")
    with_views = evaluate(SPEC, params, _Tasks([_Batch(sx, sy, qx, qy)]), 4, 2, SPEC.inner_lr, adapt_keys=keys)
    vx, vy = support_views("cross2", sx, sy)
    plain = SPEC.with_(support_views="none")
    by_hand = evaluate(plain, params, _Tasks([_Batch(vx, vy, qx, qy)]), 4, 2, SPEC.inner_lr, adapt_keys=keys)
    without = evaluate(plain, params, _Tasks([_Batch(sx, sy, qx, qy)]), 4, 2, SPEC.inner_lr, adapt_keys=keys)
    assert with_views["support"] == by_hand["support"] and with_views["transductive"] == by_hand["transductive"]
    assert with_views["support"] != without["support"]


def test_the_spec_keeps_its_views_and_old_specs_have_none(tmp_path):
    params = init_params(SPEC, torch.Generator().manual_seed(4))
    save_checkpoint(tmp_path / "m.pt", MetaModel(SPEC, params))
    assert load_checkpoint(tmp_path / "m.pt").spec.support_views == "cross2" and SPEC.support_view_count == 9
    old = SPEC.to_dict()
    del old["support_views"]
    assert ModelSpec.from_dict(old).support_views == "none" and ModelSpec.from_dict(old).support_view_count == 1


def test_bad_views_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"support_views 'grid7', expected one of \('none', 'cross2'\)"):
        SPEC.with_(support_views="grid7")
    with pytest.raises(ValueError, match="support_views 'cross2' with arch 'mlp-sinusoid': shifted views need image"):
        ModelSpec("s", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1, support_views="cross2")
    with pytest.raises(ValueError, match=r"support views 'grid7', expected one of none, cross2"):
        support_views("grid7", torch.zeros(1, 1, 1, 4, 4), torch.zeros(1, 1))


def test_query_views_average_the_logits_of_each_query_and_its_shifts():
    """Query views (ModelSpec.query_views): row q * V + v is view v of query q, and the evaluation's logits are the
    mean over a query's views of those predicted for each shifted copy alone (the support policy: one query never
    sees another)."""
    g = torch.Generator().manual_seed(6)
    spec = SPEC.with_(query_views="cross2")
    qx = torch.rand(2, 3, 1, 12, 12, generator=g)
    rows = query_views("cross2", qx)
    assert rows.shape == (2, 27, 1, 12, 12) and query_views("none", qx) is qx
    for q in range(3):
        for v, (dy, dx) in enumerate(SUPPORT_VIEWS["cross2"]):
            np.testing.assert_array_equal(rows[:, q * 9 + v].numpy(), _reference_shift(qx[:, q].numpy(), dy, dx))
    params = init_params(spec, g)
    sx = torch.rand(2, 4, 1, 12, 12, generator=g)
    sy = torch.stack([torch.randperm(4, generator=g) for _ in range(2)])
    vx, vy = support_views("cross2", sx, sy)
    fast = adapt(spec, params, vx, vy, 1, spec.inner_lr, adapt_keys=adapted_keys(spec, "head")).params
    with torch.no_grad():
        got = predict_on_views(spec, fast, qx, vx, bn_policy="support")
        each = torch.stack([predict(spec, fast, shifted(qx, dy, dx), vx, bn_policy="support")
                            for dy, dx in SUPPORT_VIEWS["cross2"]]).mean(0)
        plain = predict(spec, fast, qx, vx, bn_policy="support")
    np.testing.assert_allclose(got.numpy(), each.numpy(), atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="28 logit rows per task, expected a multiple of the 9 query views"):
        mean_over_views(torch.zeros(1, 28, 4), 9)
    with pytest.raises(ValueError, match="query_views 'cross2' with arch 'mlp-sinusoid': shifted views need image"):
        ModelSpec("s", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1, query_views="cross2")
    old = spec.to_dict()
    del old["query_views"]
    assert ModelSpec.from_dict(old).query_views == "none" and spec.query_view_count == 9
