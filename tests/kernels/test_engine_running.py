"""The engine serves `running`-policy models (per-step running statistics): the reference backend adapts and predicts
with the checkpoint's statistics, keeps no support statistics, and the graph and triton backends fall back to it
(kernels.engine.reference.recipe_options names the statistics)."""

from __future__ import annotations

import pytest
import torch

from kernels.engine import Engine
from kernels.engine.fused import TritonBackend
from kernels.engine.graph import GraphBackend
from kernels.engine.reference import ReferenceBackend, recipe_options
from models.checkpoint import MetaModel
from models.functional import init_params, stack_params, stats_shapes
from models.maml import adapt, predict
from models.spec import ModelSpec

SPEC = ModelSpec("tiny-running", "conv4-omniglot", ways=3, inner_lr=0.4, steps=3, hidden=8, bn_policy="running")


def running_model(spec=SPEC, steps=2) -> MetaModel:
    g = torch.Generator().manual_seed(1)
    running = {k: torch.rand(steps, c, generator=g) + 0.5 if k.endswith(".var") else 0.1 * torch.randn(steps, c,
                                                                                                        generator=g)
               for k, (c,) in stats_shapes(spec).items()}
    return MetaModel(spec, init_params(spec, torch.Generator().manual_seed(0)), bn_running=running)


def tasks(n=2, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(n, 3, 1, 28, 28, generator=g)
    sy = torch.stack([torch.randperm(3, generator=g) for _ in range(n)])
    return sx, sy, torch.rand(n, queries, 1, 28, 28, generator=g)


def test_recipe_options_name_the_statistics_only_under_the_running_policy():
    model = running_model()
    assert recipe_options(model)["bn_running"] is model.bn_running
    served_support = MetaModel(SPEC.with_(bn_policy="support"), model.params, bn_running=model.bn_running)
    assert recipe_options(served_support) == {}  # statistics carried, not used: the fused paths stay


def test_reference_engine_adapts_and_predicts_with_the_checkpoints_statistics():
    model = running_model()
    engine = Engine("reference")
    sx, sy, qx = tasks()
    result = engine.adapt(model, sx, sy)
    want = adapt(SPEC, model.params, sx, sy, SPEC.steps, SPEC.inner_lr, track=True, bn_running=model.bn_running)
    for k, v in want.params.items():
        torch.testing.assert_close(result.params[k], v, atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(result.support_loss, want.support_loss, atol=1e-5, rtol=1e-5)
    assert result.stats is None  # nothing per adaptation: predict needs the model's statistics only
    logits = engine.predict(model, result.params, qx)
    with torch.no_grad():
        torch.testing.assert_close(logits, predict(SPEC, want.params, qx, bn_running=model.bn_running),
                                   atol=1e-5, rtol=1e-5)
    alone = engine.predict(model, {k: v[:1] for k, v in result.params.items()}, qx[:1, 3:4])
    torch.testing.assert_close(alone[0, 0], logits[0, 3], atol=1e-5, rtol=1e-5)  # one query, no neighbours
    _, fused = engine.adapt_predict(model, sx, sy, qx)
    torch.testing.assert_close(fused, logits, atol=1e-5, rtol=1e-5)
    meta = engine.predict(model, stack_params(model.params, 2), qx)  # Predict from the meta-initialization
    torch.testing.assert_close(meta, predict(SPEC, stack_params(model.params, 2), qx, bn_running=model.bn_running))


def test_an_override_to_running_needs_a_model_with_statistics():
    model = MetaModel(SPEC.with_(bn_policy="transductive"), init_params(SPEC))
    sx, sy, qx = tasks()
    fast = Engine("reference").adapt(model, sx, sy).params
    with pytest.raises(ValueError, match="bn_policy 'running' for model tiny-running, which has no running statistics"):
        Engine("reference").predict(model, fast, qx, bn_policy="running")


@pytest.mark.parametrize("backend", [lambda: GraphBackend("cpu", capture=False), lambda: TritonBackend("cpu")],
                         ids=["graph", "triton"])
def test_graph_and_triton_backends_fall_back_to_the_reference_path(backend):
    model, b, ref = running_model(), backend(), ReferenceBackend("cpu")
    sx, sy, qx = tasks()
    got, logits = b.adapt_predict(model, sx, sy, qx, SPEC.steps, SPEC.inner_lr)
    want, want_logits = ref.adapt_predict(model, sx, sy, qx, SPEC.steps, SPEC.inner_lr)
    torch.testing.assert_close(logits, want_logits)
    for k, v in want.params.items():
        torch.testing.assert_close(got.params[k], v, msg=k)
    adapted = b.adapt(model, sx, sy, SPEC.steps, SPEC.inner_lr, True)
    torch.testing.assert_close(adapted.support_loss, want.support_loss)
    assert adapted.stats is None
    # Predict by adaptation id: the backend's own predict also falls back (one query, no support rows)
    torch.testing.assert_close(b.predict(model, adapted.params, qx[:, :1]), ref.predict(model, adapted.params,
                                                                                         qx[:, :1]))
