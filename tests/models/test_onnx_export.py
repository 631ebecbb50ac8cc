"""models.onnx_export: the exported adapted network reproduces models.maml.predict in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.functional import BN_EPS, init_params
from models.maml import adapt, predict
from models.onnx_export import INPUT_NAME, OUTPUT_NAME, PROBABILITIES_NAME, export_onnx
from models.spec import ModelSpec
from models.views import predict_on_views

CASES = [
    ("conv4-omniglot", 8, "support"),
    ("conv4-omniglot", 8, "transductive"),
    ("conv4-miniimagenet", 4, "support"),
    ("conv4-miniimagenet", 4, "transductive"),
    ("mlp-omniglot", 0, "support"),
    ("mlp-omniglot", 0, "transductive"),
    ("mlp-sinusoid", 0, "support"),
]


def adapted_task(arch: str, hidden: int, policy: str, seed: int = 0, queries: int = 7):
    spec = ModelSpec(f"t-{arch}", arch, ways=5, inner_lr=0.05, steps=2, bn_policy=policy, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    params = init_params(spec, g)
    support_x = torch.rand(1, 10, *spec.input_shape, generator=g)
    query_x = torch.rand(1, queries, *spec.input_shape, generator=g)
    support_y = torch.rand(1, 10, 1, generator=g) if spec.is_regression else torch.arange(5).repeat(2)[None]
    fast = adapt(spec, params, support_x, support_y, spec.steps, spec.inner_lr).params
    return spec, fast, support_x, query_x


def run_onnx(model: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME, PROBABILITIES_NAME], {INPUT_NAME: x.numpy()})


@pytest.mark.parametrize("arch,hidden,policy", CASES)
def test_onnx_matches_reference_predict(arch, hidden, policy):
    spec, fast, support_x, query_x = adapted_task(arch, hidden, policy)
    expected = predict(spec, fast, query_x, support_x)[0]
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()}, support_x=support_x[0])
    logits, probabilities = run_onnx(model, query_x[0])
    assert logits.shape == (query_x.shape[1], spec.ways)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(probabilities, torch.softmax(expected, -1).numpy(), atol=1e-5, rtol=0)


def test_support_policy_query_does_not_depend_on_other_queries():
    spec, fast, support_x, query_x = adapted_task("conv4-omniglot", 8, "support")
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()}, support_x=support_x[0])
    together = run_onnx(model, query_x[0])[0]
    alone = run_onnx(model, query_x[0, :1])[0]
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5, rtol=0)


def test_transductive_policy_uses_the_batch_statistics():
    spec, fast, support_x, query_x = adapted_task("conv4-omniglot", 8, "transductive")
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()})
    together = run_onnx(model, query_x[0])[0]
    alone = run_onnx(model, query_x[0, :2])[0]
    assert not np.allclose(alone[0], together[0], atol=1e-4), "a transductive query should see its batch's statistics"


def test_support_statistics_are_constants_in_the_graph():
    spec, fast, support_x, _ = adapted_task("conv4-omniglot", 8, "support")
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()}, support_x=support_x[0])
    reductions = [list(n.attribute[0].ints) for n in model.graph.node if n.op_type == "ReduceMean"]
    batch_reductions = [axes for axes in reductions if axes != [2, 3]]
    assert batch_reductions == [], "support-policy batch norm must not reduce over the query batch"
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = torch.nn.functional.conv2d(support_x[0], fast["conv0.weight"][0], fast["conv0.bias"][0], stride=2, padding=1)
    np.testing.assert_allclose(constants["bn0.support_mean"].reshape(-1), conv.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    inv_std = torch.rsqrt(conv.var(dim=(0, 2, 3), unbiased=False) + BN_EPS)
    np.testing.assert_allclose(constants["bn0.support_inv_std"].reshape(-1), inv_std.numpy(), rtol=1e-5)
    assert {f"bn{i}.support_mean" for i in range(4)} <= set(constants)


def test_metadata_documents_preprocessing_and_shapes():
    spec, fast, support_x, _ = adapted_task("conv4-omniglot", 8, "support")
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()}, support_x=support_x[0], metadata={"x.id": "abc"})
    props = {p.key: p.value for p in model.metadata_props}
    assert props["fastadapt.preprocessing"] == spec.preprocessing
    assert props["fastadapt.bn_policy"] == "support" and props["x.id"] == "abc"
    assert "[Q, 1, 28, 28]" in props["fastadapt.input"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "Q" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert model.opset_import[0].version == 17


def test_support_policy_without_support_set_is_refused():
    spec, fast, _, _ = adapted_task("conv4-omniglot", 8, "support")
    with pytest.raises(ValueError, match="needs the task's support set"):
        export_onnx(spec, {k: v[0] for k, v in fast.items()})


def test_wrong_parameter_shape_is_refused_by_name():
    spec, fast, support_x, _ = adapted_task("conv4-omniglot", 8, "support")
    params = {k: v[0] for k, v in fast.items()}
    params["head.weight"] = params["head.weight"][:3]
    with pytest.raises(ValueError, match=r"params\['head.weight'\] is \[3, 8\], expected \[5, 8\]"):
        export_onnx(spec, params, support_x=support_x[0])


@pytest.mark.parametrize("arch,hidden,policy", [("conv4-omniglot", 8, "support"), ("conv4-omniglot", 8, "transductive"),
                                                ("conv4-miniimagenet", 4, "support")])
def test_query_views_average_the_logits_of_every_shifted_view(arch, hidden, policy):
    spec, fast, support_x, query_x = adapted_task(arch, hidden, policy)
    spec = spec.with_(query_views="cross2")
    expected = predict_on_views(spec, fast, query_x, support_x)[0]  # the server's 9 rows per query, averaged
    model = export_onnx(spec, {k: v[0] for k, v in fast.items()}, support_x=support_x[0])
    logits, probabilities = run_onnx(model, query_x[0])
    assert logits.shape == (query_x.shape[1], spec.ways)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(probabilities, torch.softmax(expected, -1).numpy(), atol=1e-5, rtol=0)
    plain = predict(spec.with_(query_views="none"), fast, query_x, support_x)[0]
    assert (plain - expected).abs().max() > 1e-3, "the views must change the logits, or the check is vacuous"
    props = {p.key: p.value for p in model.metadata_props}
    assert props["fastadapt.query_views"] == "cross2"
