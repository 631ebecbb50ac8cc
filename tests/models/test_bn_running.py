"""The `running` BN policy (MAML++'s per-step running statistics): predict and adapt normalize with the checkpoint's
per-step statistics, checked against a one-task forward written with torch layers; the recorded batch statistics the
statistics are estimated from; the checkpoint field's round trip and every way it can be malformed."""

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import BN_EPS, HEAD_KEYS, init_params, running_at, stats_shapes
from models.maml import adapt, adaptation_stats, predict, task_losses
from models.spec import ModelSpec
from tests.models.test_functional import SPECS

BN_ARCHS = [a for a in SPECS if SPECS[a].has_batch_norm]
SPEC = ModelSpec("t-run", "conv4-omniglot", ways=3, inner_lr=0.4, steps=2, hidden=4, bn_policy="running")


def task_forward(spec, p, x, given=None, record=None):
    """One task, no task axis, torch layers only. given: [(mean, var)] per batch-norm layer to normalize with
    (else the batch's biased statistics); record: receives each layer's batch (mean, unbiased var)."""

    def bn(i, h):
        dims = [0] + list(range(2, h.dim()))
        if record is not None:
            record.append((h.mean(dim=dims), h.var(dim=dims, unbiased=True)))
        mean, var = given[i] if given is not None else (h.mean(dim=dims), h.var(dim=dims, unbiased=False))
        shape = [1, -1] + [1] * (h.dim() - 2)
        gamma, beta = p[f"bn{i}.weight"].view(shape), p[f"bn{i}.bias"].view(shape)
        return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS) * gamma + beta

    if spec.arch.startswith("conv4"):
        h = x
        for i in range(4):
            stride = 2 if spec.arch == "conv4-omniglot" else 1
            h = F.relu(bn(i, F.conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=stride, padding=1)))
            if spec.arch == "conv4-miniimagenet":
                h = F.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3)) if spec.arch == "conv4-omniglot" else h.flatten(1)
    else:
        h = x.flatten(1)
        for i in range(4):
            h = F.relu(bn(i, F.linear(h, p[f"fc{i}.weight"], p[f"fc{i}.bias"])))
    return F.linear(h, p["head.weight"], p["head.bias"])


def _meta(spec, seed=2):
    params = init_params(spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(9)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}  # non-trivial BN gamma/beta


def _running(spec, steps, seed=4):
    """Distinct statistics per step (so a wrong entry shows), variances well away from 0."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(steps, c, generator=g) + 0.5) if k.endswith(".var") else torch.randn(steps, c, generator=g)
            for k, (c,) in stats_shapes(spec).items()}


def _entry(running, s, spec):
    return [(running[f"bn{i}.mean"][s], running[f"bn{i}.var"][s]) for i in range(len(stats_shapes(spec)) // 2)]


def _images(spec, tasks, rows, seed=5):
    return torch.randn(tasks, rows, *spec.input_shape, generator=torch.Generator().manual_seed(seed))


def test_the_policy_needs_no_support_stats_and_running_ones_instead():
    assert not SPEC.predict_needs_support_stats() and SPEC.uses_running_stats()
    assert SPEC.with_(bn_policy="support").uses_running_stats("running")
    assert not SPECS["mlp-sinusoid"].with_(bn_policy="running").uses_running_stats()  # no batch norm at all
    fast = {k: v.unsqueeze(0) for k, v in _meta(SPEC).items()}
    assert adaptation_stats(SPEC, fast, _images(SPEC, 1, 3)) is None


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_predict_of_one_query_is_the_hand_normalization_with_the_final_steps_statistics(arch):
    spec = SPECS[arch].with_(bn_policy="running")
    meta = {k: v.double() for k, v in _meta(spec).items()}
    running = {k: v.double() for k, v in _running(spec, steps=3).items()}
    q = _images(spec, 1, 1).double()
    got = predict(spec, {k: v.unsqueeze(0) for k, v in meta.items()}, q, bn_running=running)
    want = task_forward(spec, meta, q[0], given=_entry(running, 2, spec))  # entry S - 1: the final step's
    torch.testing.assert_close(got[0], want, atol=1e-10, rtol=1e-10)
    other = task_forward(spec, meta, q[0], given=_entry(running, 0, spec))
    assert (other - want).abs().max() > 1e-3  # the entries differ enough for a wrong one to show


def test_a_querys_logits_do_not_depend_on_the_other_queries_in_its_batch():
    meta = _meta(SPEC)
    running = _running(SPEC, steps=2)
    sx, sy = _images(SPEC, 2, 3), torch.arange(3).repeat(2, 1)
    fast = adapt(SPEC, meta, sx, sy, 2, 0.4, bn_running=running).params
    q = _images(SPEC, 2, 6, seed=7)
    with torch.no_grad():
        together = predict(SPEC, fast, q, bn_running=running)
        alone = predict(SPEC, fast, q[:, 4:5], bn_running=running)
        others = predict(SPEC, fast, torch.cat([q[:, 4:5], 10 * torch.rand_like(q[:, :3])], dim=1),
                         bn_running=running)
    torch.testing.assert_close(alone[:, 0], together[:, 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(others[:, 0], together[:, 4], atol=1e-5, rtol=1e-5)
    transductive = predict(SPEC, fast, q, bn_policy="transductive")
    assert (transductive[:, 4] - together[:, 4]).abs().max() > 1e-3  # batch statistics would have mixed them


@pytest.mark.parametrize("adapt_keys", [None, HEAD_KEYS])
def test_adapt_step_s_normalizes_with_entry_min_s_and_the_last(adapt_keys):
    """Three steps with statistics for two: steps 0, 1, 2 use entries 0, 1, 1; one task by hand, in float64."""
    spec = SPEC.with_(adapt_params="all" if adapt_keys is None else "head")
    meta = {k: v.double() for k, v in _meta(spec).items()}
    running = {k: v.double() for k, v in _running(spec, steps=2).items()}
    sx, sy = _images(spec, 2, 3).double(), torch.tensor([[0, 1, 2], [2, 0, 1]])
    res = adapt(spec, meta, sx, sy, 3, 0.1, adapt_keys=adapt_keys, bn_running=running, track=True)
    for t in range(2):
        w = {k: v.clone().requires_grad_(adapt_keys is None or k in adapt_keys) for k, v in meta.items()}
        losses = []
        for s in range(3):
            out = task_forward(spec, w, sx[t], given=_entry(running, min(s, 1), spec))
            loss = F.cross_entropy(out, sy[t], reduction="sum")  # sum / K with K = 1
            losses.append(loss.item())
            keys = [k for k in w if w[k].requires_grad]
            grads = torch.autograd.grad(loss, [w[k] for k in keys])
            w = {**w, **{k: (w[k] - 0.1 * g).detach().requires_grad_(True) for k, g in zip(keys, grads)}}
        final = task_forward(spec, w, sx[t], given=_entry(running, 1, spec))
        losses.append(F.cross_entropy(final, sy[t], reduction="sum").item())
        for k, v in w.items():
            torch.testing.assert_close(res.params[k][t], v.detach(), atol=1e-10, rtol=1e-10, msg=k)
        torch.testing.assert_close(res.support_loss[:, t], torch.tensor(losses, dtype=torch.float64))


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_recorded_statistics_are_each_steps_batch_moments_with_the_unbiased_variance(arch):
    spec = SPECS[arch]
    meta = {k: v.double() for k, v in _meta(spec).items()}
    sx = _images(spec, 2, spec.ways).double()
    sy = torch.arange(spec.ways).repeat(2, 1)
    record: list = []
    lr = spec.inner_lr
    adapt(spec, meta, sx, sy, 2, lr, record_stats=record)
    assert len(record) == 2
    for t in range(2):
        w = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
        for s in range(2):
            moments: list = []
            out = task_forward(spec, w, sx[t], record=moments)
            for i, (mean, var) in enumerate(moments):
                torch.testing.assert_close(record[s][f"bn{i}.mean"][t], mean.detach(), atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(record[s][f"bn{i}.var"][t], var.detach(), atol=1e-10, rtol=1e-10)
            loss = task_losses(spec, out.unsqueeze(0), sy[t:t + 1])[0]
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(w.items(), grads)}
    with pytest.raises(ValueError, match="record_stats records batch statistics, but bn_running"):
        adapt(spec, meta, sx, sy, 1, lr, record_stats=[], bn_running=_running(spec, 1))


def test_predict_without_the_statistics_is_refused():
    fast = {k: v.unsqueeze(0) for k, v in _meta(SPEC).items()}
    with pytest.raises(ValueError, match="uses bn_policy 'running': predict needs the checkpoint's per-step running"):
        predict(SPEC, fast, _images(SPEC, 1, 2))


def test_running_at_clamps_to_the_last_entry_and_broadcasts_to_the_tasks():
    running = _running(SPEC, steps=2)
    got = running_at(running, 7, tasks=3)
    assert got["bn0.mean"].shape == (3, 4) and torch.equal(got["bn0.mean"][2], running["bn0.mean"][1])


# ---- the checkpoint field --------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = MetaModel(SPEC, init_params(SPEC, torch.Generator().manual_seed(0)), bn_running=_running(SPEC, 3),
                      provenance={"bn_running": {"method": "test"}})
    return save_checkpoint(tmp_path / "r.pt", model), model


def test_round_trip_keeps_the_statistics(saved):
    path, model = saved
    loaded = load_checkpoint(path)
    assert loaded.spec == SPEC and loaded.running_steps == 3 and loaded.provenance["bn_running"]["method"] == "test"
    assert set(loaded.bn_running) == set(stats_shapes(SPEC))
    for k, v in model.bn_running.items():
        assert torch.equal(loaded.bn_running[k], v), k
    assert loaded.to("cpu").bn_running is not None


def test_checkpoints_without_the_field_still_load(tmp_path):
    spec = SPEC.with_(bn_policy="support")
    path = save_checkpoint(tmp_path / "old.pt", MetaModel(spec, init_params(spec)))
    assert "bn_running" not in torch.load(path, weights_only=True)  # not written when unused
    model = load_checkpoint(path)
    assert model.bn_running is None and model.running_steps is None


def _rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def _stats(**changes):
    stats = _running(SPEC, 3)
    stats.update(changes)
    return {k: v for k, v in stats.items() if v is not None}


@pytest.mark.parametrize("bad,text", [
    (_stats(**{"bn2.var": None}), r"'bn_running' does not fit conv4-omniglot: missing \['bn2.var'\], unexpected \[\]"),
    (_stats(**{"bn9.mean": torch.zeros(3, 4)}), r"'bn_running' does not fit conv4-omniglot: missing \[\], "
                                                r"unexpected \['bn9.mean'\]"),
    (_stats(**{"bn1.mean": torch.zeros(3, 5)}), r"'bn_running.bn1.mean' is \[3, 5\] torch.float32, expected a "
                                                r"float32 tensor \[steps, 4\]"),
    (_stats(**{"bn1.mean": torch.zeros(4)}), r"'bn_running.bn1.mean' is \[4\] torch.float32"),
    (_stats(**{"bn1.mean": torch.zeros(0, 4)}), r"'bn_running.bn1.mean' is \[0, 4\]"),
    (_stats(**{"bn0.var": torch.ones(3, 4, dtype=torch.float64)}), r"'bn_running.bn0.var' is \[3, 4\] torch.float64"),
    (_stats(**{"bn3.var": torch.ones(2, 4)}), r"'bn_running.bn3.var' holds 2 steps, the other layers 3"),
    (_stats(**{"bn0.mean": torch.tensor([[float("nan")] * 4] * 3)}), r"'bn_running.bn0.mean' holds NaN or Inf"),
    (_stats(**{"bn2.var": -torch.ones(3, 4)}), r"'bn_running.bn2.var' holds a negative variance \(-1\), expected >= 0"),
    ([1, 2], r"'bn_running' is list, expected a dict of tensors"),
    ({"bn0.mean": "x", **{k: v for k, v in _running(SPEC, 3).items() if k != "bn0.mean"}},
     r"'bn_running.bn0.mean' is str, expected a float32 tensor"),
])
def test_malformed_statistics_are_refused_naming_the_field(saved, bad, text):
    path, _ = saved
    _rewrite(path, bn_running=bad)
    with pytest.raises(CheckpointError, match=r"r.pt: " + text):
        load_checkpoint(path)


def test_running_policy_without_the_field_is_refused(saved, tmp_path):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    del payload["bn_running"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="r.pt: bn_policy 'running' but no 'bn_running' statistics"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="model t-run has bn_policy 'running' but no running statistics"):
        MetaModel(SPEC, init_params(SPEC))


def test_statistics_on_an_architecture_without_batch_norm_are_refused(tmp_path):
    spec = SPECS["mlp-sinusoid"]
    path = save_checkpoint(tmp_path / "sin.pt", MetaModel(spec, init_params(spec)))
    _rewrite(path, bn_running={"bn0.mean": torch.zeros(1, 40)})
    with pytest.raises(CheckpointError, match="sin.pt: 'bn_running' is given, but mlp-sinusoid has no batch norm"):
        load_checkpoint(path)
