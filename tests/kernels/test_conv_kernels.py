"""Conv-block kernels (forward; input gradient + weight gradient + fused SGD) against the torch/autograd oracle.

Outputs are pre-filled with NaN, so an element a kernel forgets to write fails the comparison. Cases cover T=1
and T=3, odd spatial sizes, stride 1 and 2, the raw-input layer with Cin 1 and 3 (non-dot path), dot-path Cin
with masked tails (20, 80: two Cin blocks), shared (meta) and task-stacked parameters, and the 2x2 max-pool.
On CUDA the same cases run compiled, plus full-size shapes (marked gpu).
"""

import pytest
import torch

from kernels.checks.oracles import TOLERANCES, conv_block_case
from kernels.fused.conv_backward import conv_bn_backward_sgd
from kernels.fused.conv_forward import BNInput, conv_bn_forward
from tests.kernels.precisions import DEV, PRECISIONS  # noqa: F401
from tests.kernels.precisions import with_precisions as _with_precisions

# tasks, batch, cin, cout, size, stride, mode (0 raw, 1 bn+relu, 2 bn+relu+pool), shared params, stat images
CASES = [
    pytest.param(1, 2, 1, 16, 9, 2, 0, False, None, id="raw-cin1-s2-T1"),
    pytest.param(3, 2, 3, 16, 7, 1, 0, True, 1, id="raw-cin3-s1-T3-shared-stat1"),
    pytest.param(3, 2, 16, 16, 7, 2, 1, False, None, id="bn-cin16-s2-T3"),
    pytest.param(1, 3, 20, 24, 5, 1, 1, True, 2, id="bn-cin20-cout24-s1-T1-shared-stat2"),
    pytest.param(3, 2, 16, 16, 9, 1, 2, False, None, id="pool-odd9-s1-T3"),
    pytest.param(1, 2, 16, 16, 11, 2, 2, True, 1, id="pool-odd11-s2-T1-shared"),
    pytest.param(1, 1, 80, 72, 3, 2, 1, False, None, id="bn-cin80-cout72-two-blocks"),
]
FULL_CASES = [  # the real layers: conv4-omniglot (hidden 64, 28x28, stride 2), conv4-miniimagenet (32, 84x84, pool)
    pytest.param(8, 20, 1, 64, 28, 2, 0, True, None, id="omniglot-layer1", marks=pytest.mark.gpu),
    pytest.param(8, 20, 64, 64, 14, 2, 1, False, None, id="omniglot-layer2", marks=pytest.mark.gpu),
    pytest.param(8, 80, 64, 64, 4, 2, 1, False, 5, id="omniglot-layer4-predict", marks=pytest.mark.gpu),
    pytest.param(4, 5, 3, 32, 84, 1, 0, False, None, id="mini-layer1", marks=pytest.mark.gpu),
    pytest.param(4, 5, 32, 32, 84, 1, 2, False, None, id="mini-layer2", marks=pytest.mark.gpu),
    pytest.param(4, 80, 32, 32, 21, 1, 2, True, 5, id="mini-layer4-predict", marks=pytest.mark.gpu),
]


def _close(actual, expected, precision, what, scale=1.0):
    rtol, atol = TOLERANCES[(torch.float32, precision)]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _stats_scale(stats):
    """Sums over many rows: compare them relative to their own magnitude per channel."""
    return float(stats.abs().max().clamp(min=1.0))


@pytest.mark.parametrize("tasks,batch,cin,cout,size,stride,mode,shared,stat_images,precision",
                         _with_precisions(CASES + FULL_CASES))
def test_forward_matches_torch(tasks, batch, cin, cout, size, stride, mode, shared, stat_images, precision):
    case = conv_block_case(tasks, batch, cin, cout, size, stride, mode, shared=shared, stat_images=stat_images,
                           device=DEV)
    out = torch.full_like(case.z, float("nan"))
    stats = torch.zeros_like(case.stats)
    z, got_stats = conv_bn_forward(
        case.x, case.params["weight"], case.params["bias"], stride=stride, in_bn=case.in_bn, pool_input=mode == 2,
        stat_images=stat_images, out=out, stats=stats, precision=precision,
    )
    assert z is out and got_stats is stats
    _close(z, case.z, precision, "z")
    _close(got_stats, case.stats, precision, "statistics", scale=_stats_scale(case.stats))


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["lr-float", "lr-meta-sgd"])
@pytest.mark.parametrize("tasks,batch,cin,cout,size,stride,mode,shared,stat_images,precision",
                         _with_precisions(CASES + FULL_CASES))
def test_backward_sgd_matches_autograd(tasks, batch, cin, cout, size, stride, mode, shared, stat_images, meta_sgd,
                                       precision):
    if meta_sgd and DEV.type == "cpu" and cin > 16:
        pytest.skip("Meta-SGD is exercised on the small cases on the CPU (interpreter time)")
    case = conv_block_case(tasks, batch, cin, cout, size, stride, mode, shared=shared, device=DEV)
    shapes = {k: v.shape[-(v.dim() - (0 if shared else 1)):] for k, v in case.params.items()}
    gen = torch.Generator().manual_seed(1)
    lr = {k: (torch.rand(s, generator=gen) * 0.5).to(DEV) for k, s in shapes.items()} if meta_sgd else 0.3
    out_params = {k: torch.full((tasks, *s), float("nan"), device=DEV) for k, s in shapes.items()}
    dy_in = in_bsum = None
    if mode > 0:
        dy_in = torch.full_like(case.dy_in, float("nan"))
        if mode == 2:  # positions outside every pool window are the caller's to zero (see the launcher)
            hz, wz = case.dy_in.shape[2:4]
            dy_in[:, :, 2 * (hz // 2):] = 0
            dy_in[:, :, :, 2 * (wz // 2):] = 0
        in_bsum = torch.zeros_like(case.in_bsum)
    new, got_dy_in, got_in_bsum = conv_bn_backward_sgd(
        case.x, case.dy, case.z, case.stats, case.bsum, case.params, lr, stride=stride, in_bn=case.in_bn,
        pool_input=mode == 2, input_grad=mode > 0, out_params=out_params, dy_in=dy_in, in_bsum=in_bsum,
        precision=precision,
    )
    assert new is out_params
    # The conv bias feeds batch norm, whose mean subtraction cancels it: the kernel copies it bit for bit.
    assert torch.equal(new["bias"], case.params["bias"].expand_as(new["bias"]))
    for k, p in case.params.items():
        rate = lr[k] if meta_sgd else lr
        expected = p - rate * case.grads[k]  # p broadcasts over tasks when shared
        grad_scale = max(1.0, float(case.grads[k].abs().max()) / 100)  # tolerance follows the gradient's size
        _close(new[k], expected.expand_as(new[k]), precision, f"updated {k}", scale=grad_scale)
    if mode > 0:
        _close(got_dy_in, case.dy_in, precision, "dy of the previous layer")
        _close(got_in_bsum, case.in_bsum, precision, "backward sums of the previous layer",
               scale=_stats_scale(case.in_bsum))


def test_weight_grad_only_and_input_grad_only_split_the_work():
    """The two halves of the fused launch also run alone, and together give the same as separately."""
    case = conv_block_case(2, 2, 16, 16, 6, 2, 1, device=DEV)
    new, dy_none, bsum_none = conv_bn_backward_sgd(case.x, case.dy, case.z, case.stats, case.bsum, case.params, 0.5,
                                                   stride=2, in_bn=case.in_bn, input_grad=False)
    assert dy_none is None and bsum_none is None
    _close(new["weight"], case.params["weight"] - 0.5 * case.grads["weight"], "ieee", "weight (weight-grad only)")
    none, dy_in, in_bsum = conv_bn_backward_sgd(case.x, case.dy, case.z, case.stats, case.bsum, case.params, 0.5,
                                                stride=2, in_bn=case.in_bn, weight_grad=False)
    assert none is None
    _close(dy_in, case.dy_in, "ieee", "dy (input-grad only)")
    _close(in_bsum, case.in_bsum, "ieee", "backward sums (input-grad only)", scale=_stats_scale(case.in_bsum))


def _fwd_args():
    case = conv_block_case(1, 2, 16, 16, 5, 1, 1, device=DEV)
    return case, dict(x=case.x, weight=case.params["weight"], bias=case.params["bias"])


@pytest.mark.parametrize("mutate,error,words", [
    (lambda a: a.update(x=a["x"].double()), TypeError, ["x", "torch.float32"]),
    (lambda a: a.update(x=a["x"].transpose(2, 3)), ValueError, ["x", "contiguous"]),
    (lambda a: a.update(weight=a["weight"][:, :, :8]), ValueError, ["weight", "expected"]),
    (lambda a: a.update(bias=a["bias"][:, :3]), ValueError, ["bias", "expected"]),
    (lambda a: a.update(stride=3), ValueError, ["stride=3"]),
    (lambda a: a.update(precision="bf16"), ValueError, ["precision", "ieee"]),
    (lambda a: a.update(stats=torch.zeros(1, 2, 16, device=DEV)), TypeError, ["stats", "float64"]),
    (lambda a: a.update(stat_images=3), ValueError, ["stat_images=3"]),
    (lambda a: a.update(in_bn=None, pool_input=True), ValueError, ["pool_input"]),
])
def test_forward_launcher_rejects_bad_input(mutate, error, words):
    case, args = _fwd_args()
    args.update(stride=1, in_bn=case.in_bn)
    mutate(args)
    with pytest.raises(error) as info:
        conv_bn_forward(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("mutate,error,words", [
    (lambda a: a.update(dy=a["dy"].double()), TypeError, ["dy", "torch.float32"]),
    (lambda a: a.update(z=a["z"][:, :1]), ValueError, ["z", "expected"]),
    (lambda a: a.update(bsum=a["bsum"].float()), TypeError, ["bsum", "float64"]),
    (lambda a: a.update(lr={"weight": torch.ones(16, 16, 3, 3, device=DEV)}), TypeError, ["lr['bias']"]),
    (lambda a: a.update(in_bn=None), ValueError, ["in_bn"]),
    (lambda a: a.update(dy=a["dy"][:, :, :2].contiguous(), z=a["z"][:, :, :2].contiguous()), ValueError,
     ["spatial size"]),
])
def test_backward_launcher_rejects_bad_input(mutate, error, words):
    case = conv_block_case(1, 2, 16, 16, 5, 1, 1, device=DEV)
    args = dict(x=case.x, dy=case.dy, z=case.z, stats=case.stats, bsum=case.bsum, params=case.params, lr=0.1,
                stride=1, in_bn=case.in_bn)
    mutate(args)
    with pytest.raises(error) as info:
        conv_bn_backward_sgd(**args)
    for word in words:
        assert word in str(info.value)


def test_a_device_scalar_lr_gives_the_float_lr_update():
    """LR_MODE 2: the rate read from a 0-dim device tensor (what a captured program holds) equals the float rate."""
    case = conv_block_case(2, 2, 16, 16, 6, 2, 1, device=DEV)
    args = (case.x, case.dy, case.z, case.stats, case.bsum, case.params)
    by_float, dy_float, _ = conv_bn_backward_sgd(*args, 0.3, stride=2, in_bn=case.in_bn)
    by_tensor, dy_tensor, _ = conv_bn_backward_sgd(*args, torch.tensor(0.3, device=DEV), stride=2, in_bn=case.in_bn)
    for k in by_float:
        torch.testing.assert_close(by_tensor[k], by_float[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(dy_tensor, dy_float, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lr has shape \[1\], expected \[\]"):
        conv_bn_backward_sgd(*args, torch.tensor([0.3], device=DEV), stride=2, in_bn=case.in_bn)


def test_forward_without_statistics_writes_the_same_outputs():
    """collect_stats=False (a predict normalizing with stored statistics): same z, no statistics touched."""
    case = conv_block_case(2, 3, 16, 16, 5, 1, 1, device=DEV)
    z, stats = conv_bn_forward(case.x, case.params["weight"], case.params["bias"], stride=1, in_bn=case.in_bn)
    out = torch.full_like(z, float("nan"))
    z2, none = conv_bn_forward(case.x, case.params["weight"], case.params["bias"], stride=1, in_bn=case.in_bn,
                               out=out, collect_stats=False)
    assert none is None and z2 is out
    torch.testing.assert_close(z2, z, rtol=0, atol=0)


def test_forward_statistics_accumulate_into_the_given_buffer():
    """Statistics are atomically added (the step program zeroes them once): a second launch doubles them."""
    case = conv_block_case(2, 2, 1, 16, 7, 2, 0, device=DEV)
    stats = torch.zeros_like(case.stats)
    for _ in range(2):
        conv_bn_forward(case.x, case.params["weight"], case.params["bias"], stride=2, stats=stats)
    _close(stats, 2 * case.stats, "ieee", "twice-accumulated statistics", scale=_stats_scale(case.stats))


def test_bn_input_count_must_be_positive():
    case = conv_block_case(1, 2, 16, 16, 5, 1, 1, device=DEV)
    bad = BNInput(case.in_bn.stats, case.in_bn.gamma, case.in_bn.beta, 0)
    with pytest.raises(ValueError, match="count=0"):
        conv_bn_forward(case.x, case.params["weight"], case.params["bias"], stride=1, in_bn=bad)


def test_conv_bias_gradient_is_zero_under_batch_norm_in_float64():
    """Why the kernel may copy the conv bias: a per-channel constant added before batch norm is removed again by its
    batch-mean subtraction (whichever rows the statistics come from), so the bias changes no output and its
    float64 autograd gradient is rounding; the head bias, which no BN follows, gets a real gradient."""
    from models.functional import forward, init_params
    from models.maml import task_losses
    from models.spec import ModelSpec

    spec = ModelSpec("conv4-omniglot", "conv4-omniglot", ways=5, inner_lr=0.4, steps=1, hidden=16,
                     input_shape=(1, 9, 9))
    g = torch.Generator().manual_seed(3)
    params = {k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).unsqueeze(0)
              .requires_grad_(True) for k, v in init_params(spec, g).items()}
    x = torch.rand(1, 10, 1, 9, 9, generator=g, dtype=torch.float64)
    y = torch.arange(5).repeat(2).unsqueeze(0)
    for stat_rows in (None, 5):
        loss = task_losses(spec, forward(spec, params, x, stat_rows), y).sum()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        assert grads["head.bias"].abs().max() > 1e-3
        for i in range(4):
            bias, weight = grads[f"conv{i}.bias"].abs().max(), grads[f"conv{i}.weight"].abs().max()
            assert weight > 1e-6, f"conv{i}.weight has no gradient: the check would prove nothing"
            assert bias < 1e-12 * weight, (stat_rows, i, float(bias), float(weight))
