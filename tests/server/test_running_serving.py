"""A `running`-policy checkpoint (per-step batch-norm running statistics) served end to end: Adapt, Predict of one
query by adaptation id, AdaptAndPredict and ExportAdapted all normalize with the checkpoint's statistics."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from models.checkpoint import MetaModel, save_checkpoint
from models.functional import init_params, stats_shapes
from models.maml import adapt, predict
from models.preprocess import preprocess_uint8
from models.spec import ModelSpec
from server.client import FastAdaptClient
from tests.server.conftest import random_task

SPEC = ModelSpec("tiny-running", "conv4-omniglot", ways=5, inner_lr=0.1, steps=2, bn_policy="running", hidden=8)


def test_a_running_model_is_served_with_its_statistics(make_server, tmp_path):
    g = torch.Generator().manual_seed(3)
    running = {k: torch.rand(2, c, generator=g) + 0.5 if k.endswith(".var") else 0.1 * torch.randn(2, c, generator=g)
               for k, (c,) in stats_shapes(SPEC).items()}
    model = MetaModel(SPEC, init_params(SPEC, g), bn_running=running, provenance={"bn_running": {"tasks": 1}})
    save_checkpoint(tmp_path / "zoo" / "tiny-running.pt", model)
    server = make_server(model_dir=tmp_path / "zoo")
    sx, sy, qx = random_task(SPEC, queries=4)
    with FastAdaptClient(server.address, timeout=30) as client:
        info = client.get_model("tiny-running")
        adapted = client.adapt("tiny-running", sx, sy)
        one = client.predict(adapted.adaptation_id, qx[2:3]).logits
        _, together = client.adapt_and_predict("tiny-running", sx, sy, qx)
        onnx_model = client.export_adapted(adapted.adaptation_id)
    x = preprocess_uint8(SPEC, torch.from_numpy(sx))[None]
    q = preprocess_uint8(SPEC, torch.from_numpy(qx))[None]
    want = adapt(SPEC, model.params, x, torch.from_numpy(sy.astype(np.int64))[None], 2, 0.1, track=True,
                 bn_running=running)
    with torch.no_grad():
        logits = predict(SPEC, want.params, q, bn_running=running)[0].numpy()
    assert info["bn_policy"] == "running"
    np.testing.assert_allclose(adapted.support_loss, want.support_loss[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(together.logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(one[0], logits[2], atol=1e-5, rtol=1e-5)  # a single query, alone
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    (exported,) = session.run(["logits"], {"x": q[0].numpy()})
    np.testing.assert_allclose(exported, logits, atol=1e-4, rtol=0)
