"""Export one adapted network (a task's fast weights) as a standalone ONNX model, built with onnx.helper.

The graph takes `x`: float32 [Q, *input_shape], already preprocessed (the model's preprocessing is written into
metadata_props), and returns `logits` float32 [Q, ways] and their softmax `probabilities`. Weights are baked in as
initializers. Batch norm is explicit arithmetic, following the model's batch-norm policy:
- `support`: the support set's per-channel mean and variance at every layer become constants, so a query's logits do
  not depend on the other queries (as models.maml.predict with the support set);
- `transductive`: mean and (biased) variance of the forwarded batch, computed with ReduceMean.
A model with query views (`ModelSpec.query_views`, models.views) predicts as the server does: the graph pads the
input by repeating its edge pixels, slices every shifted view of each query, forwards all V x Q rows at once and
returns each query's mean logits over its views (the `transductive` policy's statistics are those of all V x Q rows,
as the server's). Opset 17, IR version 8, so any onnxruntime from 1.14 on runs it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from models.functional import BN_EPS, MLP_OMNIGLOT_HIDDEN, MLP_SINUSOID_HIDDEN, bn_layers, param_shapes
from models.spec import SUPPORT_VIEWS, ModelSpec

OPSET = 17
IR_VERSION = 8
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
PROBABILITIES_NAME = "probabilities"


class _Graph:
    """Accumulates nodes and initializers; every op returns the name of its output."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def const_int64(self, name: str, values) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self._count}", **attrs))
        return out


def _batch_norm(g: _Graph, h: str, name: str, params, axes: list[int], shape: tuple[int, ...], stats) -> str:
    """(h - mean) / sqrt(var + eps) * gamma + beta; stats=(mean, var) constants, or None for the batch's own."""
    gamma = g.const(f"{name}.weight", params[f"{name}.weight"].reshape(shape))
    beta = g.const(f"{name}.bias", params[f"{name}.bias"].reshape(shape))
    if stats is not None:
        mean, var = stats
        centred = g.op("Sub", h, g.const(f"{name}.support_mean", mean.reshape(shape)))
        inv_std = g.const(f"{name}.support_inv_std", torch.rsqrt(var.reshape(shape) + BN_EPS))
    else:
        mean = g.op("ReduceMean", h, axes=axes, keepdims=1)
        centred = g.op("Sub", h, mean)
        var = g.op("ReduceMean", g.op("Mul", centred, centred), axes=axes, keepdims=1)
        eps = g.const(f"{name}.eps", np.array(BN_EPS, dtype=np.float32))
        inv_std = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps)))
    return g.op("Add", g.op("Mul", g.op("Mul", centred, inv_std), gamma), beta)


@torch.no_grad()
def _conv4_support_stats(spec: ModelSpec, params, support_x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer batch-norm statistics of the support set, as models.functional computes them with stat_rows."""
    omniglot = spec.arch == "conv4-omniglot"
    h, stats = support_x.float(), []
    for i in range(4):
        h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride=2 if omniglot else 1, padding=1)
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        stats.append((mean, var))
        scale = (params[f"bn{i}.weight"] * torch.rsqrt(var + BN_EPS)).view(1, -1, 1, 1)
        h = F.relu((h - mean.view(1, -1, 1, 1)) * scale + params[f"bn{i}.bias"].view(1, -1, 1, 1))
        if not omniglot:
            h = F.max_pool2d(h, 2)
    return stats


@torch.no_grad()
def _mlp_support_stats(params, support_x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    h, stats = support_x.float().reshape(support_x.shape[0], -1), []
    for i in range(len(MLP_OMNIGLOT_HIDDEN)):
        h = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
        stats.append((mean, var))
        h = F.relu((h - mean) * torch.rsqrt(var + BN_EPS) * params[f"bn{i}.weight"] + params[f"bn{i}.bias"])
    return stats


def _query_views(g: _Graph, spec: ModelSpec) -> str:
    """INPUT_NAME [Q, C, H, W] -> [V * Q, C, H, W], row v * Q + q view v of query q: one edge padding, a slice per
    shift (models.views._shifts in ONNX ops)."""
    offsets = SUPPORT_VIEWS[spec.query_views]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    _, h, w = spec.input_shape
    padded = g.op("Pad", INPUT_NAME, g.const_int64("views.pads", [0, 0, pad, pad, 0, 0, pad, pad]), mode="edge")
    axes = g.const_int64("views.axes", [2, 3])
    views = []
    for v, (dy, dx) in enumerate(offsets):
        starts = g.const_int64(f"views.{v}.starts", [pad - dy, pad - dx])
        ends = g.const_int64(f"views.{v}.ends", [pad - dy + h, pad - dx + w])
        views.append(g.op("Slice", padded, starts, ends, axes))
    return g.op("Concat", *views, axis=0)


def _conv4(g: _Graph, spec: ModelSpec, params, stats) -> str:
    omniglot = spec.arch == "conv4-omniglot"
    h = _query_views(g, spec) if spec.query_view_count > 1 else INPUT_NAME
    for i in range(4):
        w, b = g.const(f"conv{i}.weight", params[f"conv{i}.weight"]), g.const(f"conv{i}.bias", params[f"conv{i}.bias"])
        stride = 2 if omniglot else 1
        h = g.op("Conv", h, w, b, kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1])
        h = _batch_norm(g, h, f"bn{i}", params, [0, 2, 3], (1, -1, 1, 1), None if stats is None else stats[i])
        h = g.op("Relu", h)
        if not omniglot:
            h = g.op("MaxPool", h, kernel_shape=[2, 2], strides=[2, 2])
    if omniglot:
        return g.op("ReduceMean", h, axes=[2, 3], keepdims=0)  # spatial mean -> [Q, hidden]
    return g.op("Flatten", h, axis=1)  # [Q, hidden * 5 * 5], channel-major like torch's reshape


def _mlp(g: _Graph, spec: ModelSpec, params, stats) -> str:
    h = g.op("Flatten", INPUT_NAME, axis=1)
    hidden = MLP_OMNIGLOT_HIDDEN if spec.arch == "mlp-omniglot" else MLP_SINUSOID_HIDDEN
    for i in range(len(hidden)):
        w, b = g.const(f"fc{i}.weight", params[f"fc{i}.weight"]), g.const(f"fc{i}.bias", params[f"fc{i}.bias"])
        h = g.op("Gemm", h, w, b, transB=1)
        if spec.arch == "mlp-omniglot":
            h = _batch_norm(g, h, f"bn{i}", params, [0], (1, -1), None if stats is None else stats[i])
        h = g.op("Relu", h)
    return h


def export_onnx(
    spec: ModelSpec,
    params: dict[str, torch.Tensor],
    *,
    support_x: torch.Tensor | None = None,
    bn_policy: str | None = None,
    metadata: dict[str, str] | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> onnx.ModelProto:
    """One task's adapted network as an ONNX model.

    params: fast weights without task axis (or with a task axis of 1). For the `support` batch-norm policy either
    stats (the adaptation's stored statistics {bn{i}.mean, bn{i}.var} [C], as the server keeps them) or support_x
    (the task's preprocessed support set [N*K, *input_shape], with its support views if the model has them, from
    which they are computed). For `running`, stats:
    the last entry (the final step's) of the checkpoint's running statistics, [C] per layer. bn_policy overrides
    spec.bn_policy.
    metadata: extra metadata_props (e.g. the adaptation id); the model's preprocessing is always written.
    """
    policy = bn_policy or spec.bn_policy
    if policy not in ("support", "transductive", "running"):
        raise ValueError(f"bn_policy {policy!r}, expected 'support', 'transductive' or 'running'")
    expected = param_shapes(spec)
    params = {k: v[0] if v.dim() == len(expected.get(k, ())) + 1 and v.shape[0] == 1 else v for k, v in params.items()}
    for name, shape in expected.items():
        if name not in params or tuple(params[name].shape) != shape:
            got = list(params[name].shape) if name in params else "missing"
            raise ValueError(f"params[{name!r}] is {got}, expected {list(shape)} for {spec.arch} ({spec.name})")
    params = {k: v.detach().float().cpu() for k, v in params.items()}

    has_bn = spec.has_batch_norm
    if has_bn and policy == "running" and stats is None:
        raise ValueError(f"model {spec.name} uses bn_policy 'running': export needs the final step's running "
                         "statistics (stats)")
    if has_bn and policy in ("support", "running") and stats is not None:
        stats = [(stats[f"bn{i}.mean"].detach().float().cpu().reshape(-1),
                  stats[f"bn{i}.var"].detach().float().cpu().reshape(-1)) for i in bn_layers(spec)]
    elif has_bn and policy == "support":
        if support_x is None:
            raise ValueError(f"model {spec.name} uses bn_policy 'support': export needs the task's support set")
        if tuple(support_x.shape[1:]) != spec.input_shape or support_x.shape[0] < 1:
            raise ValueError(
                f"support_x has shape {list(support_x.shape)}, expected [N*K, {', '.join(map(str, spec.input_shape))}]"
            )
        support_x = support_x.detach().float().cpu()
        stats = _conv4_support_stats(spec, params, support_x) if spec.arch.startswith("conv4") else _mlp_support_stats(
            params, support_x
        )
    else:
        stats = None  # transductive (or no batch norm): the query batch's own statistics

    g = _Graph()
    feats = _conv4(g, spec, params, stats) if spec.arch.startswith("conv4") else _mlp(g, spec, params, stats)
    head_w, head_b = g.const("head.weight", params["head.weight"]), g.const("head.bias", params["head.bias"])
    views = spec.query_view_count
    logits = g.op("Gemm", feats, head_w, head_b, transB=1, out=OUTPUT_NAME if views == 1 else None)
    if views > 1:  # [V * Q, ways] view-major -> each query's mean over its views
        by_view = g.op("Reshape", logits, g.const_int64("views.shape", [views, -1, spec.ways]))
        g.op("ReduceMean", by_view, axes=[0], keepdims=0, out=OUTPUT_NAME)
    g.op("Softmax", OUTPUT_NAME, axis=1, out=PROBABILITIES_NAME)

    graph = helper.make_graph(
        g.nodes,
        f"fastadapt_{spec.name}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["Q", *spec.input_shape])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["Q", spec.ways]),
            helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, ["Q", spec.ways]),
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="fastadapt"
    )
    shape = ", ".join(map(str, spec.input_shape))
    model.doc_string = (
        f"fastadapt adapted network of model {spec.name} ({spec.arch}, {spec.ways}-way, batch-norm policy {policy}). "
        f"Input '{INPUT_NAME}': float32 [Q, {shape}], preprocessed: {spec.preprocessing}. "
        f"Outputs '{OUTPUT_NAME}' and '{PROBABILITIES_NAME}': float32 [Q, {spec.ways}]"
        + (f", each query's mean over its {views} views ({spec.query_views})." if views > 1 else ".")
    )
    props = {
        "fastadapt.model": spec.name,
        "fastadapt.arch": spec.arch,
        "fastadapt.ways": str(spec.ways),
        "fastadapt.bn_policy": policy,
        "fastadapt.input": f"{INPUT_NAME}: float32 [Q, {shape}], preprocessed (see fastadapt.preprocessing)",
        "fastadapt.preprocessing": spec.preprocessing,
        "fastadapt.query_views": spec.query_views,
        "fastadapt.spec": json.dumps(spec.to_dict(), sort_keys=True),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model
