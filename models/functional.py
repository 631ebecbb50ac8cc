"""Architectures as pure functions over task-stacked parameters: the reference forward for all T tasks at once.

Every parameter tensor has a leading task axis T (conv weight [T, Cout, Cin, 3, 3], bias [T, Cout], batch-norm
gamma/beta [T, C], linear weight [T, out, in], bias [T, out]). Inputs are [T, B, *input_shape]. The T tasks run in
one call: convolutions fold the tasks into channels (`groups=T`), linear layers are batched matmuls. This module is
the correctness oracle for every kernel and the CPU serving backend.

Batch norm has no running statistics (as in cbfinn/maml): it always normalizes with per-task, per-channel statistics
of the forwarded batch. `stat_rows=n` restricts those statistics to the first n examples of each task, which is how
the `support` policy normalizes query images with the support set's statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.spec import ModelSpec

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


def _conv_bn_relu(h, w, b, gamma, beta, stride, stat_rows, double_backward=False):
    """h: [B, T*Cin, H, W] (tasks folded into channels) -> [B, T*Cout, H', W']."""
    tasks, c_out = w.shape[0], w.shape[1]
    h = F.conv2d(h, w.reshape(tasks * c_out, *w.shape[2:]), b.reshape(-1), stride=stride, padding=1, groups=tasks)
    # Second-order MAML differentiates the graph twice: batch norm folded into one scale and shift per channel is
    # the same function (float64: equal to 1e-14) with a cheaper double backward than the library's fused batch norm
    # on the CPU (second-order 20-way meta-iteration: 2.65 -> 2.35 s, 1 thread). A single backward (serving) is 20%
    # faster with the library's, which stays the default, and on CUDA until measured there.
    fold_all_rows = double_backward and h.device.type == "cpu"
    if stat_rows is None and not fold_all_rows:
        # All rows share statistics: the fused library batch norm (per task x channel over B, H, W).
        out = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=BN_EPS)
        return F.relu(out) if torch.is_grad_enabled() else F.relu_(out)
    mean, var = _batch_stats(h, (0, 2, 3), stat_rows)
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


def _forward_conv4(spec: ModelSpec, params, x, stat_rows, double_backward=False):
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
    omniglot = spec.arch == "conv4-omniglot"
    for i in range(4):
        h = _conv_bn_relu(
            h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], params[f"bn{i}.weight"], params[f"bn{i}.bias"],
            2 if omniglot else 1, stat_rows, double_backward,
        )
        if not omniglot:
            h = _max_pool2(h)
    if omniglot:
        feats = h.mean(dim=(2, 3)).view(batch, tasks, -1)
    else:
        feats = h.reshape(batch, tasks, -1)
    feats = feats.transpose(0, 1)  # [T, B, F]
    return torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))


def _forward_mlp(spec: ModelSpec, params, x, stat_rows):
    tasks, batch = x.shape[:2]
    h = x.reshape(tasks, batch, -1)
    hidden = MLP_OMNIGLOT_HIDDEN if spec.arch == "mlp-omniglot" else MLP_SINUSOID_HIDDEN
    for i in range(len(hidden)):
        h = torch.baddbmm(params[f"fc{i}.bias"].unsqueeze(1), h, params[f"fc{i}.weight"].transpose(1, 2))
        if spec.arch == "mlp-omniglot":
            src = h if stat_rows is None else h[:, :stat_rows]
            mean = src.mean(dim=1, keepdim=True)
            var = src.var(dim=1, keepdim=True, unbiased=False)
            h = (h - mean) * torch.rsqrt(var + BN_EPS) * params[f"bn{i}.weight"].unsqueeze(1) + params[
                f"bn{i}.bias"
            ].unsqueeze(1)
        h = F.relu(h)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))


def forward(spec: ModelSpec, params: dict[str, torch.Tensor], x: torch.Tensor, stat_rows: int | None = None,
            double_backward: bool = False):
    """Logits (or regression outputs) [T, B, ways] for inputs x [T, B, *input_shape] and task-stacked params.

    stat_rows: batch-norm statistics from the first `stat_rows` examples of each task only (None: all of them).
    double_backward: the caller will differentiate the graph twice (second-order inner steps); picks the batch-norm
    formulation that is cheaper to differentiate twice. Same values either way.
    """
    if x.dim() != 2 + len(spec.input_shape) or tuple(x.shape[2:]) != spec.input_shape:
        raise ValueError(
            f"input has shape {list(x.shape)}, expected [T, B, {', '.join(map(str, spec.input_shape))}] "
            f"for model {spec.name}"
        )
    if spec.arch.startswith("conv4"):
        return _forward_conv4(spec, params, x, stat_rows, double_backward)
    return _forward_mlp(spec, params, x, stat_rows)
