"""`python -m models.variant`: a checkpoint's tensors under another name and serving defaults, served as such."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import MetaModel, load_checkpoint, save_checkpoint
from models.functional import HEAD_KEYS, init_params, param_shapes
from models.maml import adapt, adaptation_stats, predict
from models.preprocess import preprocess_uint8
from models.spec import ModelSpec
from models.variant import main
from server.client import FastAdaptClient
from tests.server.conftest import random_task

SOURCE = ModelSpec("tiny-20w1s", "conv4-omniglot", ways=4, inner_lr=0.3, steps=2, bn_policy="support", hidden=8,
                   adapt_params="head")


@pytest.fixture
def source(tmp_path):
    g = torch.Generator().manual_seed(5)
    rates = {k: torch.tensor([0.2, 0.1]) for k in HEAD_KEYS}
    model = MetaModel(SOURCE, init_params(SOURCE, g), provenance={"iterations": 123, "commit": "abc"},
                      step_lrs=rates)
    return save_checkpoint(tmp_path / "src.pt", model), model


def test_a_variant_keeps_every_tensor_and_records_its_source(tmp_path, source, capsys):
    path, model = source
    out = tmp_path / "zoo" / "tiny-20w5s.pt"
    assert main([str(path), "--name", "tiny-20w5s", "--steps", "4", "--out", str(out), "--note", "5 shots"]) == 0
    assert "tiny-20w5s (4-way, 4 steps at lr 0.3" in capsys.readouterr().out
    got = load_checkpoint(out)
    assert got.spec == SOURCE.with_(name="tiny-20w5s", steps=4)
    for k in param_shapes(SOURCE):
        assert torch.equal(got.params[k], model.params[k]), k
    assert all(torch.equal(got.step_lrs[k], model.step_lrs[k]) for k in HEAD_KEYS)
    assert got.provenance["iterations"] == 123
    assert got.provenance["variant_of"] == {"path": str(path), "name": "tiny-20w1s", "steps": 2, "inner_lr": 0.3,
                                            "bn_policy": "support", "head_init": "meta", "iterations": 123,
                                            "commit": "abc", "note": "5 shots", "ways": 4, "support_views": "none",
                                               "query_views": "none"}


def test_a_variant_with_support_views_adapts_on_them(tmp_path, source, capsys):
    path, model = source
    out = tmp_path / "zoo" / "tiny-views.pt"
    assert main([str(path), "--name", "tiny-views", "--support-views", "cross2", "--out", str(out)]) == 0
    assert "support views cross2" in capsys.readouterr().out
    got = load_checkpoint(out)
    assert got.spec == SOURCE.with_(name="tiny-views", support_views="cross2") and got.spec.support_view_count == 9
    assert got.provenance["variant_of"]["support_views"] == "none"


@pytest.mark.parametrize("argv,message", [
    (["--name", "x", "--steps", "-1"], "steps -1: expected >= 0"),
    (["--name", "a/b"], "name 'a/b': expected a model name"),
    (["--name", "x", "--inner-lr", "nan"], "inner_lr nan: expected a finite rate > 0"),
    (["--name", "x", "--support-views", "all"], "support_views 'all': expected one of ['none', 'cross2']"),
    (["--name", "x", "--bn-policy", "batch"], "bn_policy 'batch': expected one of"),
    (["--name", "x", "--head-init", "mean"], "head_init 'mean': expected one of"),
])
def test_bad_arguments_exit_2_naming_the_value(tmp_path, source, capsys, argv, message):
    path, _ = source
    with pytest.raises(SystemExit) as exc:
        main([str(path), *argv, "--out", str(tmp_path / "v.pt")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "v.pt").exists()


def test_a_missing_source_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "none.pt"), "--name", "x", "--out", str(tmp_path / "v.pt")])
    assert exc.value.code == 2 and "no such checkpoint file" in capsys.readouterr().err


def test_the_server_adapts_a_variant_with_its_own_default_steps_on_more_shots(make_server, tmp_path, source):
    path, model = source
    zoo = tmp_path / "zoo"
    assert main([str(path), "--name", "tiny-20w5s", "--steps", "4", "--out", str(zoo / "tiny-20w5s.pt")]) == 0
    server = make_server(model_dir=zoo)
    sx, sy, qx = random_task(SOURCE, shots=3, queries=5)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-20w5s", sx, sy, qx)
        info = client.get_model("tiny-20w5s")
    assert adapted.steps == 4 and info["default_steps"] == 4
    assert "tiny-20w1s" in info["provenance"]["variant_of"]  # the provenance map holds JSON strings
    x = preprocess_uint8(SOURCE, torch.from_numpy(sx))[None]
    q = preprocess_uint8(SOURCE, torch.from_numpy(qx))[None]
    y = torch.from_numpy(sy.astype(np.int64))[None]
    fast = adapt(SOURCE, model.params, x, y, 4, 0.3, adapt_keys=HEAD_KEYS, step_lrs=model.step_lrs).params
    with torch.no_grad():
        want = predict(SOURCE, fast, q, stats=adaptation_stats(SOURCE, fast, x))[0].numpy()
    np.testing.assert_allclose(prediction.logits, want, atol=1e-5, rtol=1e-5)
    two = adapt(SOURCE, model.params, x, y, 2, 0.3, adapt_keys=HEAD_KEYS, step_lrs=model.step_lrs).params
    assert not torch.allclose(two["head.weight"], fast["head.weight"], atol=1e-4)  # the step count matters here


def test_a_proto_head_variant_of_an_anil_model_and_of_a_maml_one(tmp_path, source, capsys):
    """--head-init proto: the same tensors, adapted from the support prototypes; a MAML (all-parameter) source is
    refused (exit 2, naming its adapt_params)."""
    path, model = source
    out = tmp_path / "p.pt"
    assert main([str(path), "--name", "tiny-proto", "--head-init", "proto", "--out", str(out)]) == 0
    assert "head_init proto" in capsys.readouterr().out
    got = load_checkpoint(out)
    assert got.spec == SOURCE.with_(name="tiny-proto", head_init="proto")
    assert got.provenance["variant_of"]["head_init"] == "meta"
    maml = save_checkpoint(tmp_path / "maml.pt", MetaModel(SOURCE.with_(adapt_params="all"), model.params))
    with pytest.raises(SystemExit) as exc:
        main([str(maml), "--name", "x", "--head-init", "proto", "--out", str(tmp_path / "x.pt")])
    assert exc.value.code == 2 and "adapt_params 'all'" in capsys.readouterr().err


def test_a_fewer_ways_proto_variant_serves_the_body_as_a_nearest_centroid_classifier(make_server, tmp_path, source,
                                                                                      capsys):
    """--ways 2 --head-init proto of a 4-way ANIL model: the body's tensors, the head's first 2 rows; served over
    loopback on 2-way tasks, its 0-step logits are an independent nearest-centroid's (|f|^2 - |f - mu_c|^2 on the body
    features, via cdist), and its default steps are the reference adapt's from the prototypes."""
    path, model = source
    zoo = tmp_path / "zoo"
    assert main([str(path), "--name", "tiny-2w", "--ways", "2", "--head-init", "proto", "--steps", "3",
                 "--out", str(zoo / "tiny-2w.pt")]) == 0
    assert "tiny-2w (2-way, 3 steps" in capsys.readouterr().out
    got = load_checkpoint(zoo / "tiny-2w.pt")
    assert got.spec == SOURCE.with_(name="tiny-2w", ways=2, steps=3, head_init="proto")
    assert got.provenance["variant_of"]["ways"] == 4
    for key, value in model.params.items():
        assert torch.equal(got.params[key], value[:2] if key in HEAD_KEYS else value), key
    spec = got.spec
    server = make_server(model_dir=zoo)
    sx, sy, qx = random_task(spec, shots=3, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-2w", sx, sy, qx)
    assert adapted.steps == 3
    x = preprocess_uint8(spec, torch.from_numpy(sx))[None]
    q = preprocess_uint8(spec, torch.from_numpy(qx))[None]
    y = torch.from_numpy(sy.astype(np.int64))
    wide = spec.with_(ways=spec.hidden)  # the body's features under the support statistics, read off an identity head
    zero = adapt(spec, got.params, x, y[None], 0, spec.inner_lr, adapt_keys=HEAD_KEYS).params  # [1, ...] per task
    body = {**zero, "head.weight": torch.eye(spec.hidden)[None], "head.bias": torch.zeros(1, spec.hidden)}
    with torch.no_grad():
        stats = adaptation_stats(wide, body, x)
        fs, fq = predict(wide, body, x, stats=stats)[0], predict(wide, body, q, stats=stats)[0]
        at_zero = predict(spec, zero, q, stats=adaptation_stats(spec, zero, x))[0]
    mu = torch.stack([fs[y == c].mean(0) for c in range(2)])
    want = (fq * fq).sum(1, keepdim=True) - torch.cdist(fq, mu) ** 2
    torch.testing.assert_close(at_zero, want, atol=1e-3, rtol=1e-3)
    fast = adapt(spec, got.params, x, y[None], 3, spec.inner_lr, adapt_keys=HEAD_KEYS, step_lrs=got.step_lrs).params
    with torch.no_grad():
        want3 = predict(spec, fast, q, stats=adaptation_stats(spec, fast, x))[0].numpy()
    np.testing.assert_allclose(prediction.logits, want3, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--ways", "2"], "ways 2 with head_init 'meta': expected head_init 'proto'"),
    (["--ways", "5", "--head-init", "proto"], "ways 5: expected 2..4 (model tiny-20w1s is 4-way"),
    (["--ways", "1", "--head-init", "proto"], "ways 1: expected 2..4"),
])
def test_bad_ways_exit_2_naming_the_value(tmp_path, source, capsys, argv, message):
    path, _ = source
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--name", "x", *argv, "--out", str(tmp_path / "v.pt")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "v.pt").exists()
