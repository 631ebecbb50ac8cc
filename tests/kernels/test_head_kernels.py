"""Head kernel (BN + ReLU + mean / max-pool features, linear, softmax cross-entropy, backward, SGD) against autograd.

Outputs are pre-filled with NaN (accumulated ones with zeros) so an unwritten element fails. Cases: T=1 and 3,
the spatial mean (conv4-omniglot, 2x2 and 1x1 maps) and the 2x2 max-pool + flatten (conv4-miniimagenet, odd
5x5 map), 5 and 20 ways, 1 and 2 shots, float and Meta-SGD learning rates.
"""

import pytest
import torch

from kernels.checks.oracles import TOLERANCES, head_case
from kernels.fused.head import HeadResult, head_step
from tests.kernels.precisions import DEV, PRECISIONS  # noqa: F401
from tests.kernels.precisions import with_precisions as _with_precisions

# tasks, batch, channels, size, ways, pool, shots
CASES = [
    pytest.param(1, 5, 16, 2, 5, False, 1, id="mean2x2-T1-5w1s"),
    pytest.param(3, 10, 16, 1, 5, False, 2, id="mean1x1-T3-5w2s"),
    pytest.param(3, 7, 16, 5, 5, True, 1, id="pool-odd5-T3"),
    pytest.param(1, 20, 24, 4, 20, True, 1, id="pool4-T1-20w1s-c24"),
    pytest.param(4, 100, 64, 2, 20, False, 5, id="omniglot-20w5s", marks=pytest.mark.gpu),
    pytest.param(4, 25, 32, 10, 5, True, 5, id="miniimagenet-5w5s", marks=pytest.mark.gpu),
]


def _close(actual, expected, precision, what, scale=1.0):
    rtol, atol = TOLERANCES[(torch.float32, precision)]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _nan(*shape):
    return torch.full(shape, float("nan"), device=DEV)


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["lr-float", "lr-meta-sgd"])
@pytest.mark.parametrize("tasks,batch,channels,size,ways,pool,shots,precision", _with_precisions(CASES))
def test_train_step_matches_autograd(tasks, batch, channels, size, ways, pool, shots, meta_sgd, precision):
    case = head_case(tasks, batch, channels, size, ways, pool, shots, device=DEV)
    feats = case.weight.shape[-1]
    gen = torch.Generator().manual_seed(2)
    lr = ({"weight": (torch.rand(ways, feats, generator=gen) * 0.5).to(DEV),
           "bias": (torch.rand(ways, generator=gen) * 0.5).to(DEV)} if meta_sgd else 0.4)
    dy = _nan(*case.z.shape)
    if pool:  # rows / columns outside every pool window are the caller's to zero
        dy[:, :, 2 * (size // 2):] = 0
        dy[:, :, :, 2 * (size // 2):] = 0
    out = HeadResult(logits=_nan(tasks, batch, ways), loss=torch.zeros(tasks, device=DEV),
                     accuracy=torch.zeros(tasks, device=DEV), dy=dy,
                     bsum=torch.zeros(tasks, 2, channels, device=DEV, dtype=torch.float64),
                     params={"weight": _nan(tasks, ways, feats), "bias": _nan(tasks, ways)})
    got = head_step(case.z, case.bn, case.weight, case.bias, pool=pool, labels=case.labels, shots=shots,
                    track=True, train=True, lr=lr, out=out, precision=precision)
    assert got is out
    _close(got.logits, case.logits, precision, "logits")
    _close(got.loss, case.ce.sum(1) / shots, precision, "loss")
    accuracy = (case.logits.argmax(-1) == case.labels).float().mean(1)
    assert torch.equal(got.accuracy, accuracy), f"accuracy {got.accuracy} != {accuracy}"
    for k, p in (("weight", case.weight), ("bias", case.bias)):
        rate = lr[k] if meta_sgd else lr
        _close(got.params[k], p - rate * case.grads[k], precision, f"updated head.{k}")
    _close(got.dy, case.dy, precision, "dy of the last conv block")
    _close(got.bsum, case.bsum, precision, "backward sums of the last conv block",
           scale=float(case.bsum.abs().max().clamp(min=1.0)))


@pytest.mark.parametrize("tasks,batch,channels,size,ways,pool,shots", CASES)
def test_forward_tiles_rows_and_scores_the_first_rows(tasks, batch, channels, size, ways, pool, shots):
    """Predict: logits of every row; loss and accuracy of the first (support) rows only."""
    case = head_case(tasks, batch, channels, size, ways, pool, shots, device=DEV)
    first = max(1, batch // 2)
    out = HeadResult(logits=_nan(tasks, batch, ways), loss=torch.zeros(tasks, device=DEV),
                     accuracy=torch.zeros(tasks, device=DEV))
    got = head_step(case.z, case.bn, case.weight, case.bias, pool=pool, labels=case.labels[:, :first].contiguous(),
                    shots=shots, loss_images=first, track=True, out=out)
    _close(got.logits, case.logits, "ieee", "logits")
    _close(got.loss, case.ce[:, :first].sum(1) / shots, "ieee", "loss of the first rows")
    accuracy = (case.logits[:, :first].argmax(-1) == case.labels[:, :first]).float().mean(1)
    _close(got.accuracy, accuracy, "ieee", "accuracy of the first rows")
    assert got.dy is None and got.params is None


def test_max_pool_backward_breaks_ties_like_torch():
    """Equal values in a pool window (flat image regions): the gradient goes to the first, as max_pool2d's."""
    case = head_case(2, 5, 16, 4, 5, True, 1, device=DEV, tied_windows=True)
    assert torch.equal(case.z[:, :, 0, 0], case.z[:, :, 1, 1])
    got = head_step(case.z, case.bn, case.weight, case.bias, pool=True, labels=case.labels, shots=1, train=True,
                    lr=0.1)
    _close(got.dy, case.dy, "ieee", "dy with tied pool windows")


def test_shared_head_parameters_broadcast_over_tasks():
    """A head without the task axis (the meta-initialization at step 0) acts like the same head per task."""
    case = head_case(3, 5, 16, 2, 5, False, 1, device=DEV)
    shared_w, shared_b = case.weight[0].contiguous(), case.bias[0].contiguous()
    got = head_step(case.z, case.bn, shared_w, shared_b, pool=False)
    want = head_step(case.z, case.bn, shared_w.expand(3, -1, -1).contiguous(), shared_b.expand(3, -1).contiguous(),
                     pool=False)
    _close(got.logits, want.logits, "ieee", "shared-head logits")


@pytest.mark.parametrize("mutate,error,words", [
    (lambda a: a.update(z=a["z"].double()), TypeError, ["z", "torch.float32"]),
    (lambda a: a.update(weight=a["weight"][:, :, :3].contiguous()), ValueError, ["weight", "expected"]),
    (lambda a: a.update(labels=a["labels"].int()), TypeError, ["labels", "torch.int64"]),
    (lambda a: a.update(loss_images=2), ValueError, ["train", "loss_images=2"]),
    (lambda a: a.update(lr=None), ValueError, ["learning rate"]),
    (lambda a: a.update(shots=0), ValueError, ["shots=0"]),
    (lambda a: a.update(pool=True, z=a["z"][:, :, :1, :1].contiguous()), ValueError, ["2x2"]),
])
def test_launcher_rejects_bad_input(mutate, error, words):
    case = head_case(1, 5, 16, 2, 5, False, 1, device=DEV)
    args = dict(z=case.z, bn=case.bn, weight=case.weight, bias=case.bias, pool=False, labels=case.labels, shots=1,
                train=True, lr=0.1)
    mutate(args)
    if "loss_images" in args:
        args["labels"] = args["labels"][:, : args["loss_images"]].contiguous()
    with pytest.raises(error) as info:
        head_step(**args)
    for word in words:
        assert word in str(info.value)


def test_a_device_scalar_lr_gives_the_float_lr_update():
    """LR_MODE 2: the rate read from a 0-dim device tensor (what a captured program holds) equals the float rate."""
    case = head_case(2, 6, 16, 2, 3, False, 2, device=DEV)
    run = lambda lr: head_step(case.z, case.bn, case.weight, case.bias, pool=False, labels=case.labels,  # noqa: E731
                               shots=2, train=True, lr=lr)
    by_float, by_tensor = run(0.4), run(torch.tensor(0.4, device=DEV))
    for k in ("weight", "bias"):
        torch.testing.assert_close(by_tensor.params[k], by_float.params[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(by_tensor.dy, by_float.dy, rtol=0, atol=0)
