"""The task-stacked reference forward against an independent single-task oracle built from plain torch layers."""

import pytest
import torch
import torch.nn.functional as F

from models.functional import BN_EPS, forward, init_params, num_params, param_shapes, stack_params
from models.spec import ModelSpec

SPECS = {
    "conv4-omniglot": ModelSpec("t-omni", "conv4-omniglot", ways=5, inner_lr=0.4, steps=1, hidden=8),
    "conv4-miniimagenet": ModelSpec("t-mini", "conv4-miniimagenet", ways=3, inner_lr=0.01, steps=5, hidden=4,
                                    input_shape=(3, 32, 32)),
    "mlp-omniglot": ModelSpec("t-mlp", "mlp-omniglot", ways=5, inner_lr=0.4, steps=1),
    "mlp-sinusoid": ModelSpec("t-sin", "mlp-sinusoid", ways=1, inner_lr=0.01, steps=1),
}


def single_task_forward(spec, p, x, stat_rows=None):
    """One task, no task axis: torch layers only (F.conv2d without groups, F.batch_norm on the stat rows)."""

    def bn(h, gamma, beta):
        src = h if stat_rows is None else h[:stat_rows]
        dims = [0] + list(range(2, h.dim()))
        mean = src.mean(dim=dims)
        var = src.var(dim=dims, unbiased=False)
        shape = [1, -1] + [1] * (h.dim() - 2)
        return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS) * gamma.view(shape) + beta.view(shape)

    if spec.arch.startswith("conv4"):
        h = x
        for i in range(4):
            stride = 2 if spec.arch == "conv4-omniglot" else 1
            h = F.conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=stride, padding=1)
            h = F.relu(bn(h, p[f"bn{i}.weight"], p[f"bn{i}.bias"]))
            if spec.arch == "conv4-miniimagenet":
                h = F.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3)) if spec.arch == "conv4-omniglot" else h.flatten(1)
    else:
        h = x.flatten(1)
        i = 0
        while f"fc{i}.weight" in p:
            h = F.linear(h, p[f"fc{i}.weight"], p[f"fc{i}.bias"])
            if f"bn{i}.weight" in p:
                h = bn(h, p[f"bn{i}.weight"], p[f"bn{i}.bias"])
            h = F.relu(h)
            i += 1
    return F.linear(h, p["head.weight"], p["head.bias"])


def random_task_params(spec, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = stack_params(init_params(spec, g), tasks)
    # Perturb every task differently so a mix-up between tasks cannot pass.
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("stat_rows", [None, 3])
def test_task_stacked_forward_equals_single_task_forwards(arch, stat_rows):
    spec = SPECS[arch]
    tasks, batch = 3, 7
    # float64: with 3 statistics rows an MLP's batch norm amplifies float32 rounding beyond 1e-5.
    params = {k: v.double() for k, v in random_task_params(spec, tasks).items()}
    x = torch.randn(tasks, batch, *spec.input_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = forward(spec, params, x, stat_rows=stat_rows)
    assert out.shape == (tasks, batch, spec.ways)
    for t in range(tasks):
        expected = single_task_forward(spec, {k: v[t] for k, v in params.items()}, x[t], stat_rows)
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_parameter_counts_match_cbfinn():
    omni = ModelSpec("omniglot-5w1s", "conv4-omniglot", ways=5, inner_lr=0.4, steps=1)
    assert num_params(omni) == 112_261
    assert num_params(omni.with_(ways=20)) == 113_236
    mini = ModelSpec("mini", "conv4-miniimagenet", ways=5, inner_lr=0.01, steps=5)
    assert param_shapes(mini)["head.weight"] == (5, 800)


def test_forward_names_bad_input_shape():
    spec = SPECS["conv4-omniglot"]
    params = random_task_params(spec, 2)
    with pytest.raises(ValueError, match=r"expected \[T, B, 1, 28, 28\] for model t-omni"):
        forward(spec, params, torch.zeros(2, 5, 28, 28))


def test_support_policy_isolates_queries_and_transductive_does_not():
    spec = SPECS["conv4-omniglot"]
    params = random_task_params(spec, 2)
    g = torch.Generator().manual_seed(3)
    support = torch.rand(2, 5, 1, 28, 28, generator=g)
    queries = torch.rand(2, 6, 1, 28, 28, generator=g)
    other = queries.clone()
    other[:, 1:] = torch.rand(2, 5, 1, 28, 28, generator=g)  # change every query but the first

    def support_logits(q):
        return forward(spec, params, torch.cat([support, q], 1), stat_rows=5)[:, 5:]

    torch.testing.assert_close(support_logits(queries)[:, 0], support_logits(other)[:, 0], atol=1e-6, rtol=0)
    diff = (forward(spec, params, queries)[:, 0] - forward(spec, params, other)[:, 0]).abs().max()
    assert diff > 1e-3, "transductive batch norm should let the other queries change the first one's logits"


@pytest.mark.parametrize("stat_rows", [None, 3])
def test_double_backward_formulation_is_the_same_function_to_second_order(stat_rows):
    """The folded batch norm used under second-order MAML: same values, gradients and gradients of gradients as
    the library's batch norm, in float64."""
    spec = ModelSpec("t", "conv4-omniglot", ways=3, inner_lr=0.4, steps=1, hidden=6, input_shape=(1, 9, 9))
    g = torch.Generator().manual_seed(2)
    base = {k: v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
            for k, v in stack_params(init_params(spec, g), 2).items()}
    x = torch.rand(2, 6, 1, 9, 9, generator=g, dtype=torch.float64)
    results = []
    for double_backward in (False, True):
        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        out = forward(spec, params, x, stat_rows, double_backward=double_backward)
        grads = torch.autograd.grad((out ** 2).sum(), list(params.values()), create_graph=True)
        second = torch.autograd.grad(sum((gr ** 2).sum() for gr in grads), list(params.values()))
        results.append((out, grads, second))
    (out_a, grads_a, second_a), (out_b, grads_b, second_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    scale = max(float(t.detach().abs().max()) for t in grads_a + second_a)
    for a, b in zip(grads_a + second_a, grads_b + second_b, strict=True):  # conv-bias entries are ~0: atol by scale
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11 * scale)
    assert max(float(s.abs().max()) for s in second_a) > 1e-3  # the second derivatives are not trivially zero


@pytest.mark.parametrize("size", [(8, 8), (9, 11), (21, 21), (2, 3)])
def test_cpu_max_pool_equals_max_pool2d_with_ties_and_odd_sizes(size):
    from models.functional import _max_pool2

    g = torch.Generator().manual_seed(3)
    h = torch.rand(3, 5, *size, generator=g)
    h[:, :2] = 0.0  # whole windows of equal values (ReLU zeros)
    h[:, 2, : size[0] // 2] = 0.5
    expected = F.max_pool2d(h, 2)
    with torch.no_grad():
        got = _max_pool2(h)
    assert torch.equal(got, expected)
    # With autograd it is max_pool2d itself: the gradient goes to each window's first maximum.
    hr = h.clone().requires_grad_(True)
    upstream = torch.rand(expected.shape, generator=g)
    (grad,) = torch.autograd.grad(_max_pool2(hr), hr, upstream)
    (ref,) = torch.autograd.grad(F.max_pool2d(hr, 2), hr, upstream)
    assert torch.equal(grad, ref)


@pytest.mark.parametrize("arch", ["conv4-omniglot", "conv4-miniimagenet"])
@pytest.mark.parametrize("stat_rows", [None, 4])
def test_serving_forward_without_autograd_equals_the_differentiable_forward(arch, stat_rows):
    """Predict runs without autograd (inference-mode batch norm, ReLU in place, strided max-pool): same logits as
    the forward adaptation differentiates, and the caller's input is left untouched."""
    spec = SPECS[arch]
    params = random_task_params(spec, 2)
    x = torch.rand(2, 9, *spec.input_shape, generator=torch.Generator().manual_seed(2))
    x_before = x.clone()
    with torch.no_grad():
        served = forward(spec, params, x, stat_rows=stat_rows)
    grad_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    differentiable = forward(spec, grad_params, x, stat_rows=stat_rows)
    assert differentiable.requires_grad
    if stat_rows is None:  # the same library batch norm either way: bit for bit
        assert torch.equal(served, differentiable.detach())
    else:  # inference-mode normalization vs the folded scale + shift: rounding only
        torch.testing.assert_close(served, differentiable.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x_before)
