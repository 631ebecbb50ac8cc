"""The batched reference inner loop against per-task autograd loops and finite differences."""

import pytest
import torch
import torch.nn.functional as F

from models.functional import init_params
from models.maml import adapt, predict
from models.spec import ModelSpec
from tests.models.test_functional import SPECS, single_task_forward


def per_task_loop(spec, meta, x, y, steps, lr):
    """How learn2learn/higher adapt: one task at a time, its own copy of the weights, plain autograd."""
    results = []
    for t in range(x.shape[0]):
        w = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
        for _ in range(steps):
            out = single_task_forward(spec, w, x[t])
            if spec.is_regression:
                loss = F.mse_loss(out, y[t])
            else:
                loss = F.cross_entropy(out, y[t], reduction="sum") / (x.shape[1] // spec.ways)
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(w.items(), grads)}
        results.append({k: v.detach() for k, v in w.items()})
    return results


def tasks_for(spec, tasks, shots=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = spec.ways * shots
    x = torch.randn(tasks, n, *spec.input_shape, generator=g)
    if spec.is_regression:
        y = torch.randn(tasks, n, 1, generator=g)
    else:
        y = torch.arange(spec.ways).repeat_interleave(shots).repeat(tasks, 1)
    return x, y


@pytest.mark.parametrize("arch", ["conv4-omniglot", "conv4-miniimagenet", "mlp-omniglot", "mlp-sinusoid"])
def test_batched_adapt_equals_per_task_loops(arch):
    spec = SPECS[arch]
    meta = init_params(spec, torch.Generator().manual_seed(0))
    x, y = tasks_for(spec, tasks=3)
    result = adapt(spec, meta, x, y, steps=3, lr=0.1, track=True)
    expected = per_task_loop(spec, meta, x, y, steps=3, lr=0.1)
    for t in range(3):
        for k in meta:
            torch.testing.assert_close(result.params[k][t], expected[t][k], atol=2e-5, rtol=1e-4)
    assert result.support_loss.shape == (4, 3)
    if not spec.is_regression:
        assert result.support_accuracy.shape == (4, 3)


def test_adapt_lowers_support_loss_and_leaves_meta_init_untouched():
    spec = SPECS["conv4-omniglot"]
    meta = init_params(spec, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in meta.items()}
    x, y = tasks_for(spec, tasks=2, shots=1)
    result = adapt(spec, meta, x, y, steps=5, lr=0.1, track=True)
    assert (result.support_loss[-1] < result.support_loss[0]).all()
    for k in meta:
        assert torch.equal(meta[k], before[k])
        assert not result.params[k].requires_grad


def test_meta_sgd_per_element_learning_rates():
    spec = SPECS["mlp-sinusoid"]
    meta = init_params(spec, torch.Generator().manual_seed(0))
    x, y = tasks_for(spec, tasks=2)
    lrs = {k: torch.full_like(v, 0.05) for k, v in meta.items()}
    lrs["head.bias"].zero_()  # a zero rate freezes that tensor
    scalar = adapt(spec, meta, x, y, steps=2, lr=0.05)
    per_element = adapt(spec, meta, x, y, steps=2, lr=lrs)
    assert torch.equal(per_element.params["head.bias"], meta["head.bias"].expand(2, -1))
    assert not torch.allclose(per_element.params["head.bias"], scalar.params["head.bias"])


def _meta_loss(spec, meta, sx, sy, qx, qy, second_order):
    fast = adapt(spec, meta, sx, sy, steps=2, lr=0.1, second_order=second_order).params
    out = predict(spec, fast, qx, sx, bn_policy="transductive")
    return F.cross_entropy(out.reshape(-1, spec.ways), qy.reshape(-1))


def test_second_order_meta_gradient_matches_finite_differences():
    spec = ModelSpec("tiny", "conv4-omniglot", ways=3, inner_lr=0.1, steps=2, hidden=4)
    # Random (non-zero) biases keep every ReLU input away from exactly 0, where finite differences see a kink.
    g = torch.Generator().manual_seed(0)
    meta = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).double().requires_grad_(True)
            for k, v in init_params(spec, g).items()}
    sx, sy = (t.double() if t.is_floating_point() else t for t in tasks_for(spec, tasks=2, shots=2))
    qx, qy = (t.double() if t.is_floating_point() else t for t in tasks_for(spec, tasks=2, shots=2, seed=1))
    loss = _meta_loss(spec, meta, sx, sy, qx, qy, second_order=True)
    grads = torch.autograd.grad(loss, list(meta.values()))
    g = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in meta.items()}
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, meta))
    eps = 1e-6  # float64; at 8x8 inputs batch norm over a handful of values is too ill-conditioned for this check
    with torch.no_grad():
        plus = {k: v + eps * direction[k] for k, v in meta.items()}
        minus = {k: v - eps * direction[k] for k, v in meta.items()}
    numeric = (_meta_loss(spec, plus, sx, sy, qx, qy, True) - _meta_loss(spec, minus, sx, sy, qx, qy, True)) / (2 * eps)
    assert abs(analytic.item() - numeric.item()) <= 1e-6 * max(1.0, abs(numeric.item())) * 10
    # First-order MAML drops the Hessian term: its gradient must differ measurably from the true one.
    fo = torch.autograd.grad(_meta_loss(spec, meta, sx, sy, qx, qy, False), list(meta.values()))
    fo_dir = sum((gr * direction[k]).sum() for gr, k in zip(fo, meta))
    assert abs(fo_dir.item() - numeric.item()) > 1e-4


def test_predict_support_policy_needs_support_set():
    spec = SPECS["conv4-omniglot"]
    meta = init_params(spec)
    x, y = tasks_for(spec, tasks=1, shots=1)
    fast = adapt(spec, meta, x, y, steps=1, lr=0.1).params
    with pytest.raises(ValueError, match="needs the support statistics"):
        predict(spec, fast, x)


def test_device_scalar_learning_rate_equals_float():
    """CUDA-graph backends pass the lr as a 0-dim device tensor, so a new value reuses the graph."""
    spec = SPECS["conv4-omniglot"]
    meta = init_params(spec, torch.Generator().manual_seed(0))
    x, y = tasks_for(spec, tasks=2, shots=1)
    as_float = adapt(spec, meta, x, y, steps=2, lr=0.1).params
    as_tensor = adapt(spec, meta, x, y, steps=2, lr=torch.tensor(0.1)).params
    for k in meta:
        torch.testing.assert_close(as_tensor[k], as_float[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("lr_kind", ["float", "device-scalar", "meta-sgd"])
def test_serving_adapt_and_predict_never_read_device_values_on_the_host(lr_kind):
    """CUDA-graph capture forbids host reads of device values (a sync): under FakeTensorMode any such read raises.

    This is how a device-scalar lr once broke the graph backend's capture (an implicit `.item()` in the SGD update).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = SPECS["conv4-omniglot"]
    meta = init_params(spec)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, q = torch.rand(2, 10, 1, 28, 28), torch.rand(2, 7, 1, 28, 28)
        y = torch.arange(5).repeat_interleave(2).repeat(2, 1)
        lr = {"float": 0.1, "device-scalar": torch.full((), 0.1),
              "meta-sgd": {k: torch.full_like(v, 0.1) for k, v in meta.items()}}[lr_kind]
        result = adapt(spec, meta, x, y, 2, lr, track=True)
        logits = predict(spec, result.params, q, x)
    assert logits.shape == (2, 7, 5) and result.support_loss.shape == (3, 2)
