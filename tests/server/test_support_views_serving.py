"""A model with support views (models.views) is served as its spec says: the server adapts on every support image and
its shifts, its predictions equal the in-process adapt and predict on that extended set (support batch-norm
statistics included), a later Predict reuses those statistics, GetModel names the views, the row-step limit counts
the rows adapt forwards, and an exported ONNX adaptation predicts on the query views as the server does."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import HEAD_KEYS, init_params
from models.maml import adapt, adaptation_stats, predict
from models.preprocess import preprocess_uint8
from models.spec import ModelSpec
from models.views import predict_on_views, support_views
from server.client import FastAdaptClient
from server.validation import Limits
from tests.server.conftest import random_task

VIEWS = ModelSpec("tiny-views", "conv4-omniglot", ways=5, inner_lr=0.2, steps=2, bn_policy="support", hidden=8,
                  adapt_params="head", head_init="proto", support_views="cross2")


@pytest.fixture
def views_model(tmp_path):
    (tmp_path / "zoo").mkdir()
    model = MetaModel(VIEWS, init_params(VIEWS, torch.Generator().manual_seed(5)), provenance={"recipe": "proto-anil"})
    save_checkpoint(tmp_path / "zoo" / "tiny-views.pt", model)
    return tmp_path / "zoo", model


def test_the_server_adapts_on_the_views_and_predicts_as_in_process(views_model, make_server):
    folder, model = views_model
    server = make_server(model_dir=folder)
    sx, sy, qx = random_task(VIEWS, shots=2, queries=6, seed=3)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-views", sx, sy, qx)
        again = client.predict(adapted.adaptation_id, qx)  # with the statistics the cache kept
        info = client.get_model("tiny-views")
    x = preprocess_uint8(VIEWS, torch.from_numpy(sx))[None]
    y = torch.from_numpy(sy.astype(np.int64))[None]
    vx, vy = support_views("cross2", x, y)
    want = adapt(VIEWS, model.params, vx, vy, VIEWS.steps, VIEWS.inner_lr, track=True, adapt_keys=HEAD_KEYS)
    with torch.no_grad():
        logits = predict(VIEWS, want.params, preprocess_uint8(VIEWS, torch.from_numpy(qx))[None],
                         stats=adaptation_stats(VIEWS, want.params, vx))[0].numpy()
    np.testing.assert_allclose(prediction.logits, logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(again.logits, logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(adapted.support_loss, want.support_loss[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    # without the views the prototypes, and so the logits, are others
    plain = adapt(VIEWS, model.params, x, y, VIEWS.steps, VIEWS.inner_lr, adapt_keys=HEAD_KEYS)
    with torch.no_grad():
        other = predict(VIEWS, plain.params, preprocess_uint8(VIEWS, torch.from_numpy(qx))[None],
                        stats=adaptation_stats(VIEWS, plain.params, x))[0].numpy()
    assert np.abs(other - logits).max() > 1e-3
    assert info["support_views"] == "cross2" and info["head_init"] == "proto"


def test_the_row_step_limit_counts_the_views(views_model, make_server):
    folder, _ = views_model
    # 10 support rows x 2 steps = 20 row-steps would fit; with 9 views each it is 180
    server = make_server(model_dir=folder, limits=Limits(max_support_steps=100))
    sx, sy, _ = random_task(VIEWS, shots=2, seed=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.adapt("tiny-views", sx, sy)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("steps = 2 on 90 support rows (9 support views of each image) costs 180 row-steps, expected at most 100"
            in err.value.details())


def test_the_server_averages_the_query_views_as_the_evaluation_does(tmp_path, make_server):
    spec = VIEWS.with_(name="tiny-qviews", query_views="cross2")
    (tmp_path / "zoo").mkdir()
    model = MetaModel(spec, init_params(spec, torch.Generator().manual_seed(7)), provenance={"recipe": "proto-anil"})
    save_checkpoint(tmp_path / "zoo" / "tiny-qviews.pt", model)
    server = make_server(model_dir=tmp_path / "zoo")
    sx, sy, qx = random_task(spec, shots=1, queries=4, seed=8)
    with FastAdaptClient(server.address, timeout=30) as client:
        adapted, prediction = client.adapt_and_predict("tiny-qviews", sx, sy, qx)
        again = client.predict(adapted.adaptation_id, qx)
        info = client.get_model("tiny-qviews")
        exported = client.export_adapted(adapted.adaptation_id)
    x = preprocess_uint8(spec, torch.from_numpy(sx))[None]
    y = torch.from_numpy(sy.astype(np.int64))[None]
    vx, vy = support_views("cross2", x, y)
    want = adapt(spec, model.params, vx, vy, spec.steps, spec.inner_lr, adapt_keys=HEAD_KEYS)
    with torch.no_grad():
        logits = predict_on_views(spec, want.params, preprocess_uint8(spec, torch.from_numpy(qx))[None], vx,
                                  bn_policy="support")[0].numpy()
    assert prediction.logits.shape == (qx.shape[0], spec.ways)
    np.testing.assert_allclose(prediction.logits, logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(again.logits, logits, atol=1e-4, rtol=1e-4)
    assert info["query_views"] == "cross2"
    # the exported ONNX adaptation averages over the same views in onnxruntime
    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"x": preprocess_uint8(spec, torch.from_numpy(qx)).numpy()})
    np.testing.assert_allclose(onnx_logits, logits, atol=1e-4, rtol=1e-4)
