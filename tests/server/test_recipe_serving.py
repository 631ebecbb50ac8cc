"""The server adapts with exactly what a checkpoint's recipe says: ANIL adapts the head alone, LSLR uses its learned
per-step rates (unless the client overrides the rate), per-step batch-norm weights their row of each step, and GetModel
reports the recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import HEAD_KEYS, adapted_keys, init_params, param_shapes
from models.maml import adapt, adaptation_stats, predict
from models.preprocess import preprocess_uint8
from models.spec import ModelSpec
from server.client import FastAdaptClient
from tests.server.conftest import random_task

ANIL = ModelSpec("tiny-anil", "conv4-omniglot", ways=5, inner_lr=0.3, steps=3, bn_policy="support", hidden=8,
                 adapt_params="head")
LSLR = ModelSpec("tiny-lslr", "conv4-omniglot", ways=5, inner_lr=0.3, steps=2, bn_policy="support", hidden=8)


def recipe_models(folder):
    folder.mkdir()
    g = torch.Generator().manual_seed(4)
    anil = MetaModel(ANIL, init_params(ANIL, g), provenance={"recipe": "anil"})
    rates = {k: torch.tensor([0.05 * (i + 1), 0.02 * (i + 1)]) for i, k in enumerate(param_shapes(LSLR))}
    lslr = MetaModel(LSLR, init_params(LSLR, g), provenance={"recipe": "maml++"}, step_lrs=rates)
    for model in (anil, lslr):
        save_checkpoint(folder / f"{model.name}.pt", model)
    return anil, lslr


def reference(model: MetaModel, sx, sy, qx, lr=None, **options):
    spec = model.spec
    x = preprocess_uint8(spec, torch.from_numpy(sx))[None]
    q = preprocess_uint8(spec, torch.from_numpy(qx))[None]
    y = torch.from_numpy(sy.astype(np.int64))[None]
    result = adapt(spec, model.params, x, y, spec.steps, lr if lr is not None else spec.inner_lr, track=True,
                   **options)
    with torch.no_grad():
        logits = predict(spec, result.params, q, stats=adaptation_stats(spec, result.params, x))
    return result, logits[0].numpy()


@pytest.fixture
def recipe_server(make_server, tmp_path):
    anil, lslr = recipe_models(tmp_path / "zoo")
    return make_server(model_dir=tmp_path / "zoo"), anil, lslr


def test_anil_adapts_only_the_head(recipe_server):
    server, anil, _ = recipe_server
    sx, sy, qx = random_task(ANIL, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-anil", sx, sy, qx)
        info = client.get_model("tiny-anil")
    want, logits = reference(anil, sx, sy, qx, adapt_keys=HEAD_KEYS)
    np.testing.assert_allclose(prediction.logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(adapted.support_loss, want.support_loss[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    (entry,) = [server.cache.get(adapted.adaptation_id)]
    for k, v in entry.params.items():  # the body is the meta-initialization, untouched; the head moved
        assert torch.equal(v, anil.params[k]) == (k not in HEAD_KEYS), k
    assert info["recipe"] == "anil" and info["adapt_params"] == "head"


def test_lslr_uses_its_per_step_rates_and_an_override_replaces_them(recipe_server):
    server, _, lslr = recipe_server
    sx, sy, qx = random_task(LSLR, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        _, learned = client.adapt_and_predict("tiny-lslr", sx, sy, qx)
        adapted, overridden = client.adapt_and_predict("tiny-lslr", sx, sy, qx, inner_lr=0.2)
        info = client.get_model("tiny-lslr")
    _, want_learned = reference(lslr, sx, sy, qx, step_lrs=lslr.step_lrs)
    _, want_override = reference(lslr, sx, sy, qx, lr=0.2)
    np.testing.assert_allclose(learned.logits, want_learned, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(overridden.logits, want_override, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want_learned, want_override, atol=1e-3)  # the two rules really differ here
    assert adapted.inner_lr == pytest.approx(0.2)
    assert info["learned_inner_lr"] and info["recipe"] == "maml++"


def test_per_step_batch_norm_weights_are_served_and_reported(make_server, tmp_path):
    """MAML++ BNWB: step s adapts with its own gamma / beta row (the last one beyond them), predicts with the last."""
    spec = LSLR.with_(name="tiny-bnwb", adapt_params="no-bn", steps=3)
    g = torch.Generator().manual_seed(6)
    shapes = param_shapes(spec)
    step_bn = {k: (1.0 if k.endswith(".weight") else 0.0) + 0.5 * torch.randn(2, shapes[k][0], generator=g)
               for k in shapes if k.startswith("bn")}
    params = {**init_params(spec, g), **{k: v[-1].clone() for k, v in step_bn.items()}}
    model = MetaModel(spec, params, provenance={"recipe": "maml++"}, step_bn=step_bn)
    (tmp_path / "zoo").mkdir()
    save_checkpoint(tmp_path / "zoo" / "tiny-bnwb.pt", model)
    server = make_server(model_dir=tmp_path / "zoo")
    sx, sy, qx = random_task(spec, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-bnwb", sx, sy, qx)
        again = client.predict(adapted.adaptation_id, qx)
        info = client.get_model("tiny-bnwb")
    want, logits = reference(model, sx, sy, qx, adapt_keys=adapted_keys(spec, "no-bn"), step_bn=step_bn)
    _, ignored = reference(model, sx, sy, qx, adapt_keys=adapted_keys(spec, "no-bn"))
    np.testing.assert_allclose(prediction.logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(again.logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(adapted.support_loss, want.support_loss[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    assert not np.allclose(ignored, logits, atol=1e-3)  # the per-step rows really change the adaptation
    assert info["per_step_bn_steps"] == 2 and info["adapt_params"] == "no-bn" and info["recipe"] == "maml++"


def test_a_proto_head_model_is_served_from_the_support_prototypes_and_reported(make_server, tmp_path):
    """head_init proto (Proto-ANIL): served logits are the reference's, whose head starts at the prototypes (not the
    checkpoint's head: a second checkpoint with another head serves the same logits), and GetModel says so."""
    spec = ANIL.with_(name="tiny-proto", head_init="proto")
    params = init_params(spec, torch.Generator().manual_seed(5))
    other = {**params, "head.weight": params["head.weight"] * -3.0, "head.bias": params["head.bias"] + 1.0}
    (tmp_path / "zoo").mkdir()
    model = MetaModel(spec, params, provenance={"recipe": "proto-anil"})
    save_checkpoint(tmp_path / "zoo" / "tiny-proto.pt", model)
    save_checkpoint(tmp_path / "zoo" / "tiny-proto-b.pt", MetaModel(spec.with_(name="tiny-proto-b"), other))
    server = make_server(model_dir=tmp_path / "zoo")
    sx, sy, qx = random_task(spec, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        _, prediction = client.adapt_and_predict("tiny-proto", sx, sy, qx)
        _, other_prediction = client.adapt_and_predict("tiny-proto-b", sx, sy, qx)
        info = client.get_model("tiny-proto")
        plain = client.get_model("tiny-proto-b")
    _, logits = reference(model, sx, sy, qx, adapt_keys=HEAD_KEYS)
    np.testing.assert_allclose(prediction.logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(other_prediction.logits, logits, atol=1e-5, rtol=1e-5)
    _, meta_logits = reference(model, sx, sy, qx, adapt_keys=HEAD_KEYS, head_init="meta")
    assert not np.allclose(meta_logits, logits, atol=1e-3)
    assert info["head_init"] == "proto" and info["recipe"] == "proto-anil" and info["adapt_params"] == "head"
    assert plain["head_init"] == "proto"
