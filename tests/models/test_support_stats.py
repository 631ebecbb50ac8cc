"""Stored support statistics: predict from the statistics kept at adapt time equals predict that forwards the
support rows again (the old serving path), for every architecture with batch norm, and in float64."""

import pytest
import torch

from models.functional import bn_layers, stats_shapes, support_stats
from models.maml import adapt, adaptation_stats, predict
from tests.models.test_functional import SPECS
from tests.models.test_maml import tasks_for

BN_ARCHS = [a for a in SPECS if SPECS[a].has_batch_norm]


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_predict_from_stats_equals_forwarding_the_support_rows(arch):
    spec = SPECS[arch].with_(bn_policy="support")
    meta = {k: v.double() for k, v in _meta(spec).items()}
    x, y = tasks_for(spec, tasks=3, shots=2)
    q = torch.randn(3, 7, *spec.input_shape, generator=torch.Generator().manual_seed(5)).double()
    fast = adapt(spec, meta, x.double(), y, steps=2, lr=0.1).params
    stats = adaptation_stats(spec, fast, x.double())
    assert set(stats) == set(stats_shapes(spec)) and all(v.shape[0] == 3 for v in stats.values())
    with torch.no_grad():
        old = predict(spec, fast, q, x.double())  # the support rows forwarded in front of the queries
        new = predict(spec, fast, q, stats=stats)  # the queries alone
    torch.testing.assert_close(new, old, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_stats_are_the_support_batch_moments_of_each_layer(arch):
    """An independent reference: layer 0's statistics are the moments of the first conv / linear output."""
    spec = SPECS[arch]
    params = {k: v.unsqueeze(0) for k, v in _meta(spec).items()}
    x, _ = tasks_for(spec, tasks=1, shots=3)
    stats = support_stats(spec, params, x)
    if arch.startswith("conv4"):
        z = torch.nn.functional.conv2d(x[0], params["conv0.weight"][0], params["conv0.bias"][0], padding=1,
                                       stride=2 if arch == "conv4-omniglot" else 1)
        dims = (0, 2, 3)
    else:
        z = x[0].reshape(x.shape[1], -1) @ params["fc0.weight"][0].T + params["fc0.bias"][0]
        dims = (0,)
    torch.testing.assert_close(stats["bn0.mean"][0], z.mean(dim=dims), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["bn0.var"][0], z.var(dim=dims, unbiased=False), atol=1e-5, rtol=1e-4)
    assert len(bn_layers(spec)) * 2 == len(stats)


def test_one_query_no_longer_depends_on_anything_but_the_stats():
    spec = SPECS["conv4-omniglot"].with_(bn_policy="support")
    meta = _meta(spec)
    x, y = tasks_for(spec, tasks=1, shots=1)
    fast = adapt(spec, meta, x, y, steps=1, lr=0.4).params
    stats = adaptation_stats(spec, fast, x)
    q = torch.randn(1, 6, *spec.input_shape)
    with torch.no_grad():
        together = predict(spec, fast, q, stats=stats)
        alone = predict(spec, fast, q[:, 2:3], stats=stats)
    torch.testing.assert_close(alone[0, 0], together[0, 2], atol=1e-5, rtol=1e-5)


def test_transductive_models_keep_no_stats():
    spec = SPECS["conv4-omniglot"].with_(bn_policy="transductive")
    x, y = tasks_for(spec, tasks=1, shots=1)
    assert adaptation_stats(spec, adapt(spec, _meta(spec), x, y, steps=1, lr=0.1).params, x) is None


def test_stats_do_not_grow_with_the_shots_and_are_smaller_than_one_support_image():
    spec = SPECS["conv4-omniglot"].with_(hidden=64)  # the bundled models' width
    stat_floats = sum(s[0] for s in stats_shapes(spec).values())
    assert stat_floats == 2 * 4 * 64  # mean and variance of 64 channels in 4 layers, for any N*K
    assert stat_floats < 28 * 28  # the support images they replace: N*K x 784 floats


def _meta(spec):
    from models.functional import init_params

    params = init_params(spec, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(9)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}  # non-trivial BN gamma/beta
