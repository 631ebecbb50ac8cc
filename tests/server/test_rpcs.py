"""Every RPC over loopback against a real grpc.aio server."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import init_params
from models.preprocess import preprocess_uint8
from server.client import FastAdaptClient
from tests.server.conftest import TINY_SPECS, random_task

TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_list_and_get_models(client):
    models = {m["name"]: m for m in client.list_models()}
    assert set(models) == set(TINY_SPECS)
    info = client.get_model("tiny-5w")
    spec = TINY_SPECS["tiny-5w"]
    assert info["input_shape"] == spec.input_shape and info["ways"] == spec.ways
    assert info["input_dtype"] == "UINT8" and info["accepted_dtypes"] == ["UINT8", "FLOAT16", "FLOAT32"]
    assert (info["default_steps"], info["default_inner_lr"]) == (spec.steps, pytest.approx(spec.inner_lr))
    assert info["bn_policy"] == "support" and info["preprocessing"] == spec.preprocessing
    assert info["provenance"] == {"note": "fresh init for tests"} and info["num_params"] > 0
    assert models["tiny-5w-td"]["bn_policy"] == "transductive"


def test_adapt_then_predict_equals_adapt_and_predict(client):
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], shots=2, queries=4)
    adapted = client.adapt("tiny-5w", sx, sy)
    assert adapted.adaptation_id and adapted.steps == 2 and adapted.inner_lr == pytest.approx(0.1)
    assert adapted.support_loss.shape == (3,) and adapted.support_accuracy.shape == (3,)
    assert adapted.adaptation_bytes > 0 and adapted.timings["batch_tasks"] == 1
    assert adapted.support_loss[-1] < adapted.support_loss[0]
    prediction = client.predict(adapted.adaptation_id, qx)
    assert prediction.logits.shape == (4, 5) and prediction.logits.dtype == np.float32
    np.testing.assert_array_equal(prediction.labels, prediction.logits.argmax(-1))
    np.testing.assert_allclose(prediction.probabilities.sum(-1), 1.0, atol=1e-5)
    both_adapted, both = client.adapt_and_predict("tiny-5w", sx, sy, qx)
    np.testing.assert_allclose(both.logits, prediction.logits, **TOL)
    np.testing.assert_allclose(both_adapted.support_loss, adapted.support_loss, **TOL)
    assert both_adapted.adaptation_id not in ("", adapted.adaptation_id)


def test_steps_and_learning_rate_overrides(client):
    sx, sy, _ = random_task(TINY_SPECS["tiny-5w"])
    adapted = client.adapt("tiny-5w", sx, sy, steps=5, inner_lr=0.01)
    assert adapted.steps == 5 and adapted.inner_lr == pytest.approx(0.01) and adapted.support_loss.shape == (6,)
    default = client.adapt("tiny-5w", sx, sy)
    assert default.support_loss[0] == pytest.approx(adapted.support_loss[0], rel=1e-5)  # same start, other path
    assert default.support_loss[1] != pytest.approx(adapted.support_loss[1], rel=1e-3)


def test_float_input_is_taken_as_preprocessed(client):
    spec = TINY_SPECS["tiny-5w"]
    sx, sy, qx = random_task(spec, queries=3)
    as_float = lambda x: preprocess_uint8(spec, torch.from_numpy(x)).numpy()  # noqa: E731
    _, from_uint8 = client.adapt_and_predict("tiny-5w", sx, sy, qx)
    _, from_float = client.adapt_and_predict("tiny-5w", as_float(sx), sy, as_float(qx))
    np.testing.assert_allclose(from_float.logits, from_uint8.logits, **TOL)


def test_float16_input_equals_the_same_values_in_float32(client):
    spec = TINY_SPECS["tiny-5w"]
    sx, sy, qx = random_task(spec, queries=3, dtype=np.float16)
    _, half = client.adapt_and_predict("tiny-5w", sx, sy, qx)
    _, single = client.adapt_and_predict("tiny-5w", sx.astype(np.float32), sy, qx.astype(np.float32))
    np.testing.assert_allclose(half.logits, single.logits, **TOL)


def test_support_policy_query_logits_do_not_depend_on_other_queries(client):
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=6)
    adapted = client.adapt("tiny-5w", sx, sy)
    together = client.predict(adapted.adaptation_id, qx).logits
    alone = client.predict(adapted.adaptation_id, qx[2:3]).logits
    np.testing.assert_allclose(alone[0], together[2], **TOL)


def test_skip_cache_returns_no_id(client, server):
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
    before = len(server.cache)
    adapted, prediction = client.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)
    assert adapted.adaptation_id == "" and adapted.adaptation_bytes == 0 and prediction.logits.shape == (3, 5)
    assert len(server.cache) == before


def test_release_frees_the_adaptation(client, server):
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
    adapted = client.adapt("tiny-5w", sx, sy)
    assert server.cache.nbytes >= adapted.adaptation_bytes
    assert client.release(adapted.adaptation_id) == adapted.adaptation_bytes
    with pytest.raises(grpc.RpcError) as err:
        client.predict(adapted.adaptation_id, qx)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "was released" in err.value.details()


@pytest.mark.parametrize("model", ["tiny-5w", "tiny-5w-td", "tiny-mini"])
def test_exported_onnx_matches_predict(client, model):
    spec = TINY_SPECS[model]
    sx, sy, qx = random_task(spec, queries=5, seed=3)
    adapted = client.adapt(model, sx, sy)
    expected = client.predict(adapted.adaptation_id, qx).logits
    data = client.export_adapted(adapted.adaptation_id)
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["fastadapt.adaptation_id"] == adapted.adaptation_id
    assert props["fastadapt.preprocessing"] == spec.preprocessing
    x = preprocess_uint8(spec, torch.from_numpy(qx)).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": x})
    assert np.abs(expected).max() > 1e-3, "degenerate logits would make the comparison vacuous"
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_meta_sgd_model_uses_its_learned_rates_unless_overridden(make_server, tmp_path):
    spec = TINY_SPECS["tiny-5w"].with_(name="tiny-metasgd")
    params = init_params(spec, torch.Generator().manual_seed(0))
    rates = {k: torch.full_like(v, 0.05) for k, v in params.items()}
    save_checkpoint(tmp_path / "m.pt", MetaModel(spec, params, inner_lrs=rates))
    server = make_server(model_dir=tmp_path)

    sx, sy, _ = random_task(spec)
    with FastAdaptClient(server.address) as client:
        assert client.get_model("tiny-metasgd")["learned_inner_lr"] is True
        learned = client.adapt("tiny-metasgd", sx, sy)
        same_as_float = client.adapt("tiny-metasgd", sx, sy, inner_lr=0.05)
        other = client.adapt("tiny-metasgd", sx, sy, inner_lr=0.2)
    assert learned.inner_lr == 0.0 and same_as_float.inner_lr == pytest.approx(0.05)
    np.testing.assert_allclose(learned.support_loss, same_as_float.support_loss, **TOL)
    assert not np.allclose(other.support_loss[1:], learned.support_loss[1:], rtol=1e-3)
