"""Architectures as pure functions over task-stacked parameters: the reference forward for all T tasks at once.

Every parameter tensor has a leading task axis T (conv weight [T, Cout, Cin, 3, 3], bias [T, Cout], batch-norm
gamma/beta [T, C], linear weight [T, out, in], bias [T, out]). Inputs are [T, B, *input_shape]. The T tasks run in
one call: convolutions fold the tasks into channels (`groups=T`), linear layers are batched matmuls. This module is
the correctness oracle for every kernel and the CPU serving backend.

Batch norm has no running statistics (as in cbfinn/maml): it always normalizes with per-task, per-channel statistics
of the forwarded batch. `stat_rows=n` restricts those statistics to the first n examples of each task, which is how
the `support` policy normalizes query images with the support set's statistics. `support_stats` computes those
statistics once (per layer mean and biased variance, [T, C]), and `forward(..., stats=...)` normalizes with them, so
a served adaptation keeps its statistics and Predict forwards the query rows alone.

The `running` policy (MAML++'s per-step running statistics) passes the same `stats=`: one step's entry of the
checkpoint's `bn_running` ({bn{i}.mean, bn{i}.var} [S, C], see `running_at`), broadcast to the T tasks. MAML++'s
per-step batch-norm weights (`step_bn`, {bn{i}.weight, bn{i}.bias} [S, C]) are ordinary parameters here: the inner
loop puts one step's row into the task-stacked gamma / beta (`step_row`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.spec import ADAPT_PARAMS, ModelSpec

BN_EPS = 1e-5
MLP_OMNIGLOT_HIDDEN = (256, 128, 64, 64)
MLP_SINUSOID_HIDDEN = (40, 40)


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and per-task shapes (no task axis) of an architecture's parameters, in forward order."""
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.arch in ("conv4-omniglot", "conv4-miniimagenet"):
        c_in, h = spec.input_shape[0], spec.hidden
        for i in range(4):
            shapes[f"conv{i}.weight"] = (h, c_in if i == 0 else h, 3, 3)
            shapes[f"conv{i}.bias"] = (h,)
            shapes[f"bn{i}.weight"] = (h,)
            shapes[f"bn{i}.bias"] = (h,)
        features = h if spec.arch == "conv4-omniglot" else h * conv4_miniimagenet_side(spec.input_shape[1]) ** 2
        shapes["head.weight"] = (spec.ways, features)
        shapes["head.bias"] = (spec.ways,)
    else:
        hidden = MLP_OMNIGLOT_HIDDEN if spec.arch == "mlp-omniglot" else MLP_SINUSOID_HIDDEN
        f_in = math.prod(spec.input_shape)
        for i, f_out in enumerate(hidden):
            shapes[f"fc{i}.weight"] = (f_out, f_in)
            shapes[f"fc{i}.bias"] = (f_out,)
            if spec.arch == "mlp-omniglot":
                shapes[f"bn{i}.weight"] = (f_out,)
                shapes[f"bn{i}.bias"] = (f_out,)
            f_in = f_out
        shapes["head.weight"] = (spec.ways, f_in)
        shapes["head.bias"] = (spec.ways,)
    return shapes


def conv4_miniimagenet_side(side: int) -> int:
    for _ in range(4):
        side //= 2
    return side


def num_params(spec: ModelSpec) -> int:
    return sum(math.prod(s) for s in param_shapes(spec).values())


def init_params(spec: ModelSpec, generator: torch.Generator | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """A fresh meta-initialization (no task axis): Xavier-uniform weights, zero biases, BN gamma 1 / beta 0."""
    params = {}
    for name, shape in param_shapes(spec).items():
        if name.endswith(".weight") and len(shape) > 1:
            fan_out = shape[0] * math.prod(shape[2:])
            fan_in = math.prod(shape[1:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            t = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif name.startswith("bn") and name.endswith(".weight"):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        params[name] = t.to(device=device, dtype=torch.float32)
    return params


def stack_params(params: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
    """Broadcast a meta-initialization (no task axis) to T tasks, as a contiguous copy each task can own."""
    return {k: v.unsqueeze(0).expand(tasks, *v.shape).contiguous() for k, v in params.items()}


def task_count(params: dict[str, torch.Tensor]) -> int:
    return next(iter(params.values())).shape[0]


def _batch_stats(h: torch.Tensor, dims: tuple[int, ...], stat_rows: int | None):
    src = h if stat_rows is None else h[:stat_rows]
    var, mean = torch.var_mean(src, dim=dims, keepdim=True, correction=0)
    return mean, var


def _conv_bn_relu(h, w, b, gamma, beta, stride, stat_rows, double_backward=False, given=None, record=None):
    """h: [B, T*Cin, H, W] (tasks folded into channels) -> [B, T*Cout, H', W'].

    given: this layer's (mean, var) [T, Cout] to normalize with instead of batch statistics; record: a list that
    receives the (mean, var) [T, Cout] this layer normalized with."""
    tasks, c_out = w.shape[0], w.shape[1]
    h = F.conv2d(h, w.reshape(tasks * c_out, *w.shape[2:]), b.reshape(-1), stride=stride, padding=1, groups=tasks)
    if given is not None:
        mean, var = given[0].reshape(1, -1, 1, 1), given[1].reshape(1, -1, 1, 1)
        return _normalize_relu(h, mean, var, gamma, beta)
    # Second-order MAML differentiates the graph twice: batch norm folded into one scale and shift per channel is
    # the same function (float64: equal to 1e-14) with a cheaper double backward than the library's fused batch norm
    # on the CPU (second-order 20-way meta-iteration: 2.65 -> 2.35 s, 1 thread). A single backward (serving) is 20%
    # faster with the library's, which stays the default, and on CUDA until measured there.
    fold_all_rows = double_backward and h.device.type == "cpu"
    if stat_rows is None and not fold_all_rows and record is None:
        # All rows share statistics: the fused library batch norm (per task x channel over B, H, W).
        out = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=BN_EPS)
        return F.relu(out) if torch.is_grad_enabled() else F.relu_(out)
    mean, var = _batch_stats(h, (0, 2, 3), stat_rows)
    if record is not None:
        record.append((mean.view(tasks, c_out), var.view(tasks, c_out)))
    return _normalize_relu(h, mean, var, gamma, beta)


def _normalize_relu(h, mean, var, gamma, beta):
    """ReLU(batch norm of h [B, T*C, H, W] with the given statistics [1, T*C, 1, 1])."""
    if not torch.is_grad_enabled():
        # Serving predict: the library's inference-mode normalization (with the statistics computed above it is
        # 4x faster than its training mode on the CPU), then ReLU in place on the tensor this call owns.
        return F.relu_(F.batch_norm(h, mean.flatten(), var.flatten(), gamma.reshape(-1), beta.reshape(-1), eps=BN_EPS))
    scale = gamma.reshape(1, -1, 1, 1) * torch.rsqrt(var + BN_EPS)
    return F.relu(h * scale + (beta.reshape(1, -1, 1, 1) - mean * scale))


def _max_pool2(h: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2 (odd sizes drop the last row / column, as F.max_pool2d).

    Without autograd on the CPU: the maximum of the window's four strided views, the same values as F.max_pool2d
    and 9-11x faster there (80 x 32 x 84 x 84: 47.7 -> 5.5 ms on 2 cores). With autograd, F.max_pool2d: its fused
    backward routes each gradient to the window's first maximum, as the Triton kernels do."""
    if h.device.type != "cpu" or (torch.is_grad_enabled() and h.requires_grad):
        return F.max_pool2d(h, 2)
    c = h[..., : h.shape[-2] // 2 * 2, : h.shape[-1] // 2 * 2]
    return torch.maximum(torch.maximum(c[..., 0::2, 0::2], c[..., 0::2, 1::2]),
                         torch.maximum(c[..., 1::2, 0::2], c[..., 1::2, 1::2]))


HEAD_KEYS = ("head.weight", "head.bias")


def adapted_keys(spec: ModelSpec, which: str = "all") -> tuple[str, ...]:
    """The parameters the inner loop updates: `all` (MAML), `head` (ANIL: the final linear layer), `no-bn`
    (MAML++ repository default: batch-norm gamma/beta are meta-learned but not adapted)."""
    names = tuple(param_shapes(spec))
    if which == "all":
        return names
    if which == "head":
        return HEAD_KEYS
    if which == "no-bn":
        return tuple(k for k in names if k not in bn_param_keys(spec))
    raise ValueError(f"adapt_params {which!r} for model {spec.name}, expected one of {ADAPT_PARAMS}")


def bn_param_keys(spec: ModelSpec) -> tuple[str, ...]:
    """The batch-norm gamma / beta names (bn{i}.weight, bn{i}.bias): the parameters `no-bn` keeps out of the inner
    loop, and the ones per-step batch-norm weights (MAML++ `step_bn`) give a row per inner step."""
    return tuple(k for k in param_shapes(spec) if k.startswith("bn"))


def body_features(spec: ModelSpec, params: dict[str, torch.Tensor], x: torch.Tensor, stat_rows: int | None = None,
                  double_backward: bool = False, stats: dict[str, torch.Tensor] | None = None,
                  record: list | None = None) -> torch.Tensor:
    """The penultimate features [T, B, F] (everything but the linear head): what ANIL's head adapts on.

    stats: per-layer batch-norm statistics to normalize with (see `support_stats`); record: a list that receives
    each batch-norm layer's (mean, var) [T, C]."""
    _check_input(spec, x)
    given = None if stats is None else stats_list(spec, stats)
    if spec.arch.startswith("conv4"):
        return _conv4_features(spec, params, x, stat_rows, double_backward, given, record)
    return _mlp_features(spec, params, x, stat_rows, given, record)


def head_logits(params: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
    """The linear head on features [T, B, F]: logits [T, B, ways] (forward = head_logits(body_features))."""
    return torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))


def _conv4_features(spec: ModelSpec, params, x, stat_rows, double_backward=False, given=None, record=None):
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
    omniglot = spec.arch == "conv4-omniglot"
    for i in range(4):
        h = _conv_bn_relu(
            h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], params[f"bn{i}.weight"], params[f"bn{i}.bias"],
            2 if omniglot else 1, stat_rows, double_backward, None if given is None else given[i], record,
        )
        if not omniglot:
            h = _max_pool2(h)
    if omniglot:
        feats = h.mean(dim=(2, 3)).view(batch, tasks, -1)
    else:
        feats = h.reshape(batch, tasks, -1)
    return feats.transpose(0, 1)  # [T, B, F]


def _mlp_features(spec: ModelSpec, params, x, stat_rows, given=None, record=None):
    tasks, batch = x.shape[:2]
    h = x.reshape(tasks, batch, -1)
    hidden = MLP_OMNIGLOT_HIDDEN if spec.arch == "mlp-omniglot" else MLP_SINUSOID_HIDDEN
    for i in range(len(hidden)):
        h = torch.baddbmm(params[f"fc{i}.bias"].unsqueeze(1), h, params[f"fc{i}.weight"].transpose(1, 2))
        if spec.arch == "mlp-omniglot":
            if given is not None:
                mean, var = given[i][0].unsqueeze(1), given[i][1].unsqueeze(1)
            else:
                src = h if stat_rows is None else h[:, :stat_rows]
                mean = src.mean(dim=1, keepdim=True)
                var = src.var(dim=1, keepdim=True, unbiased=False)
                if record is not None:
                    record.append((mean.squeeze(1), var.squeeze(1)))
            h = (h - mean) * torch.rsqrt(var + BN_EPS) * params[f"bn{i}.weight"].unsqueeze(1) + params[
                f"bn{i}.bias"
            ].unsqueeze(1)
        h = F.relu(h)
    return h


def _check_input(spec: ModelSpec, x: torch.Tensor):
    if x.dim() != 2 + len(spec.input_shape) or tuple(x.shape[2:]) != spec.input_shape:
        raise ValueError(
            f"input has shape {list(x.shape)}, expected [T, B, {', '.join(map(str, spec.input_shape))}] "
            f"for model {spec.name}"
        )


def forward(spec: ModelSpec, params: dict[str, torch.Tensor], x: torch.Tensor, stat_rows: int | None = None,
            double_backward: bool = False, stats: dict[str, torch.Tensor] | None = None):
    """Logits (or regression outputs) [T, B, ways] for inputs x [T, B, *input_shape] and task-stacked params.

    stat_rows: batch-norm statistics from the first `stat_rows` examples of each task only (None: all of them).
    double_backward: the caller will differentiate the graph twice (second-order inner steps); picks the batch-norm
    formulation that is cheaper to differentiate twice. Same values either way.
    stats: normalize every batch-norm layer with these statistics (`support_stats`) instead of the batch's.
    """
    return head_logits(params, body_features(spec, params, x, stat_rows, double_backward, stats))


def bn_layers(spec: ModelSpec) -> list[int]:
    """Indices i of the architecture's batch-norm layers (parameters bn{i}.weight / bn{i}.bias)."""
    return sorted(int(k[2:].split(".")[0]) for k in param_shapes(spec) if k.startswith("bn") and k.endswith(".weight"))


def stats_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and per-task shapes of an adaptation's stored batch-norm statistics: bn{i}.mean and bn{i}.var [C]."""
    shapes = param_shapes(spec)
    out = {}
    for i in bn_layers(spec):
        out[f"bn{i}.mean"] = out[f"bn{i}.var"] = shapes[f"bn{i}.weight"]
    return out


def stats_list(spec: ModelSpec, stats: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    missing = [k for k in stats_shapes(spec) if k not in stats]
    if missing:
        raise ValueError(f"batch-norm statistics for model {spec.name} lack {missing}, expected "
                         f"{list(stats_shapes(spec))}")
    return [(stats[f"bn{i}.mean"], stats[f"bn{i}.var"]) for i in bn_layers(spec)]


def support_stats(spec: ModelSpec, params: dict[str, torch.Tensor], support_x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer batch-norm statistics of the support set under `params` (task-stacked): {bn{i}.mean, bn{i}.var}
    [T, C], biased variance: exactly what `forward(..., stat_rows=N*K)` normalizes the rows behind them with."""
    record: list = []
    body_features(spec, params, support_x, record=record)
    out = {}
    for i, (mean, var) in zip(bn_layers(spec), record):
        out[f"bn{i}.mean"], out[f"bn{i}.var"] = mean.contiguous(), var.contiguous()
    return out


def bn_counts(spec: ModelSpec, rows: int) -> list[int]:
    """Values per task and channel each batch-norm layer's statistics average over for `rows` examples per task
    (rows x the layer's spatial size): what turns a biased batch variance into the unbiased one."""
    if spec.arch == "mlp-omniglot":
        return [rows] * len(bn_layers(spec))
    side, counts = spec.input_shape[1], []
    for _ in bn_layers(spec):
        if spec.arch == "conv4-omniglot":  # 3x3, padding 1, stride 2
            side = (side - 1) // 2 + 1
            counts.append(rows * side * side)
        else:  # conv4-miniimagenet: 3x3, padding 1, stride 1, batch norm before the 2x2 max-pool
            counts.append(rows * side * side)
            side //= 2
    return counts


def batch_stats_record(spec: ModelSpec, record: list, rows: int) -> dict[str, torch.Tensor]:
    """What `body_features(..., record=...)` collected over `rows` examples per task, as running-statistics
    samples: {bn{i}.mean, bn{i}.var} [T, C], detached, the variance unbiased (as torch batch norm accumulates its
    running_var; a single value per channel keeps the biased 0)."""
    out = {}
    for i, n, (mean, var) in zip(bn_layers(spec), bn_counts(spec, rows), record):
        out[f"bn{i}.mean"] = mean.detach().contiguous()
        out[f"bn{i}.var"] = (var.detach() * (n / max(n - 1, 1))).contiguous()
    return out


def step_row(table: dict[str, torch.Tensor], step: int, tasks: int) -> dict[str, torch.Tensor]:
    """Inner step `step`'s row of a per-step table ({name: [S, C]}: the running statistics `bn_running`, MAML++'s
    per-step batch-norm weights `step_bn`): row min(step, S - 1), so a model trained for S steps adapts for more, as
    task-stacked tensors [T, C] (broadcast views: a meta-gradient reaches the row)."""
    return {k: v[min(step, v.shape[0] - 1)].unsqueeze(0).expand(tasks, v.shape[1]) for k, v in table.items()}


running_at = step_row  # the running statistics' name for it (stats=, see the module docstring)
