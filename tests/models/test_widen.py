"""models.widen (Net2WiderNet for conv4 checkpoints): at noise 0 the widened model computes the source's function,
checked by adapting and predicting both with the reference (head-only from prototypes and from a meta head, full
MAML, every batch-norm policy, per-step batch-norm weights and running statistics, a filter count that is not a
multiple); noise touches only the copies; bad arguments are refused naming the value, on the CLI with exit 2."""

import pytest
import torch

from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.functional import adapted_keys, init_params
from models.maml import adapt, predict
from models.spec import ModelSpec
from models.widen import main, widen

OMNI = ModelSpec("t-wide", "conv4-omniglot", ways=4, inner_lr=0.3, steps=3, hidden=8, input_shape=(1, 12, 12))
MINI = ModelSpec("t-wide-mini", "conv4-miniimagenet", ways=3, inner_lr=0.2, steps=2, hidden=4,
                 input_shape=(3, 32, 32))


def _model(spec, seed=1, **fields):
    params = init_params(spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    params = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in params.items()}  # non-trivial gamma / beta
    return MetaModel(spec, params, provenance={"iterations": 7}, **fields)


def _task(spec, tasks=2, shots=2, queries=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, spec.ways * shots, *spec.input_shape, generator=g)
    sy = torch.arange(spec.ways).repeat(shots).expand(tasks, -1).contiguous()
    qx = torch.rand(tasks, queries, *spec.input_shape, generator=g)
    return sx, sy, qx


def _served(model, task, bn_policy, steps=None):
    spec = model.spec
    sx, sy, qx = task
    fast = adapt(spec, model.params, sx, sy, spec.steps if steps is None else steps, spec.inner_lr,
                 adapt_keys=adapted_keys(spec, spec.adapt_params), step_bn=model.step_bn,
                 bn_running=model.bn_running if bn_policy == "running" else None).params
    return predict(spec, fast, qx, support_x=sx, bn_policy=bn_policy, bn_running=model.bn_running)


@pytest.mark.parametrize("hidden", [16, 12])
@pytest.mark.parametrize("adapt_params,head_init", [("head", "proto"), ("head", "meta"), ("all", "meta")])
@pytest.mark.parametrize("bn_policy", ["transductive", "support"])
def test_noise_zero_is_the_same_function(hidden, adapt_params, head_init, bn_policy):
    model = _model(OMNI.with_(adapt_params=adapt_params, head_init=head_init))
    wide = widen(model, hidden)
    assert wide.spec.hidden == hidden and wide.params["conv1.weight"].shape == (hidden, hidden, 3, 3)
    task = _task(OMNI)
    steps = [0] if adapt_params == "all" else [0, model.spec.steps]  # full MAML: copies' gradients differ
    for k in steps:
        want, got = _served(model, task, bn_policy, k), _served(wide, task, bn_policy, k)
        assert want.abs().max() > 1.0  # logits that say something
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_flattened_miniimagenet_head_and_per_step_bn_and_running_stats():
    spec = MINI.with_(adapt_params="head", bn_policy="running")
    shapes = {f"bn{i}": 4 for i in range(4)}
    g = torch.Generator().manual_seed(5)
    step_bn = {f"{b}.{w}": 1.0 + 0.3 * torch.randn(2, c, generator=g) for b, c in shapes.items()
               for w in ("weight", "bias")}
    running = {}
    for b, c in shapes.items():
        running[f"{b}.mean"] = 0.1 * torch.randn(2, c, generator=g)
        running[f"{b}.var"] = 0.5 + torch.rand(2, c, generator=g)
    model = _model(spec, step_bn=step_bn, bn_running=running)
    wide = widen(model, 6)
    assert wide.step_bn["bn3.weight"].shape == (2, 6) and wide.bn_running["bn0.var"].shape == (2, 6)
    task = _task(spec)
    for policy in ("running", "transductive", "support"):
        torch.testing.assert_close(_served(wide, task, policy), _served(model, task, policy), atol=1e-4, rtol=1e-4)


def test_noise_moves_only_the_copies_and_keeps_the_function_close(tmp_path):
    model = _model(OMNI.with_(adapt_params="head", head_init="proto"))
    wide = widen(model, 16, noise=0.01, seed=4)
    exact = widen(model, 16)
    for i in range(4):
        w, e = wide.params[f"conv{i}.weight"], exact.params[f"conv{i}.weight"]
        assert torch.equal(w[:8], e[:8])  # the originals (and their shares of the next layer)
        assert not torch.equal(w[8:], e[8:])
        assert (w[8:] - e[8:]).abs().max() < 0.1 * e.abs().max()
    assert torch.equal(widen(model, 16, noise=0.01, seed=4).params["conv2.weight"], wide.params["conv2.weight"])
    task = _task(OMNI)
    want, got = _served(model, task, "transductive"), _served(wide, task, "transductive")
    assert not torch.allclose(got, want, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the provenance says where it came from, and the file round-trips
    path = save_checkpoint(tmp_path / "w.pt", wide)
    back = load_checkpoint(path)
    assert back.spec.hidden == 16
    assert back.provenance["widened_from"] == {"path": "", "name": "t-wide", "hidden": 8, "to": 16, "noise": 0.01,
                                               "seed": 4, "iterations": 7, "commit": None, "note": ""}


@pytest.mark.parametrize("kwargs,message", [
    ({"hidden": 4}, "hidden 4: expected an integer filter count in [8, 4096]"),
    ({"hidden": 16, "noise": -1.0}, "noise -1.0: expected a finite standard deviation >= 0"),
    ({"hidden": 16, "noise": float("nan")}, "noise nan"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        widen(_model(OMNI), **kwargs)


def test_other_architectures_and_meta_sgd_rates_are_refused():
    mlp = ModelSpec("t-mlp", "mlp-sinusoid", ways=1, inner_lr=0.1, steps=1, input_shape=(1,))
    with pytest.raises(ValueError, match="arch 'mlp-sinusoid': expected one of"):
        widen(MetaModel(mlp, init_params(mlp)), 64)
    model = _model(OMNI)
    rates = {k: torch.full_like(v, 0.1) for k, v in model.params.items()}
    with pytest.raises(ValueError, match="per-element Meta-SGD rates"):
        widen(MetaModel(OMNI, model.params, inner_lrs=rates), 16)


def test_cli_writes_the_file_and_exits_2_on_a_bad_value(tmp_path, capsys):
    src = save_checkpoint(tmp_path / "src.pt", _model(OMNI))
    out = tmp_path / "wide.pt"
    assert main([str(src), "--hidden", "12", "--noise", "0.02", "--out", str(out), "--note", "why"]) == 0
    back = load_checkpoint(out)
    assert back.spec.hidden == 12 and back.provenance["widened_from"]["note"] == "why"
    assert back.provenance["widened_from"]["path"] == str(src)
    with pytest.raises(SystemExit) as exc:
        main([str(src), "--hidden", "2", "--out", str(tmp_path / "bad.pt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "hidden 2: expected an integer filter count in [8, 4096]" in err and len(err) < 1000
    assert not (tmp_path / "bad.pt").exists()
