"""The peers: how a user adapts many tasks without fastadapt, written the way each library's users write it.

Every peer computes the same function as the reference (same architecture, inner loss, first-order SGD steps and
batch-norm policy) so its query logits can be cross-checked, but with its own, independent model code:
- `per-task-loop`: an nn.Module cloned per task the way learn2learn's MAML does (`clone_module` + `update_module`:
  parameters replaced by differentiable clones, then by `p - lr * g`), one task at a time.
- `higher`: `higher.innerloop_ctx` with a differentiable SGD, one task at a time (first-order).
- `vmap`: `torch.func` — `functional_call` + `grad`, vmapped over the task axis.
- `grouped-graph`: tasks folded into channels (grouped convolution), the whole adapt + predict captured in one
  CUDA graph (GPU only; `capture=False` runs it eagerly, which the tests use).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.bench.configs import Case
from models.spec import ModelSpec

BN_EPS = 1e-5


class TaskBatchNorm2d(nn.Module):
    """Batch norm without running statistics; `stat_rows=n` normalizes with the first n rows' statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor, stat_rows: int | None = None) -> torch.Tensor:
        if stat_rows is None:
            return F.batch_norm(h, None, None, self.weight, self.bias, training=True, eps=BN_EPS)
        src = h[:stat_rows]
        mean = src.mean(dim=(0, 2, 3), keepdim=True)
        var = src.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        return (h - mean) * torch.rsqrt(var + BN_EPS) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class Conv4(nn.Module):
    """The Conv-4 of Finn et al. as a plain module; parameter names match the fastadapt checkpoint's."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if not spec.arch.startswith("conv4"):
            raise ValueError(f"peer model: arch {spec.arch!r}, expected conv4-omniglot or conv4-miniimagenet")
        self.omniglot = spec.arch == "conv4-omniglot"
        c_in, side, h = spec.input_shape[0], spec.input_shape[1], spec.hidden
        for i in range(4):
            setattr(self, f"conv{i}", nn.Conv2d(c_in if i == 0 else h, h, 3, stride=2 if self.omniglot else 1,
                                                padding=1))
            setattr(self, f"bn{i}", TaskBatchNorm2d(h))
            side = (side - 1) // 2 + 1 if self.omniglot else side // 2
        self.head = nn.Linear(h if self.omniglot else h * side * side, spec.ways)

    def forward(self, x: torch.Tensor, stat_rows: int | None = None) -> torch.Tensor:
        for i in range(4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x), stat_rows))
            if not self.omniglot:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3)) if self.omniglot else x.flatten(1)
        return self.head(x)


def make_module(case: Case) -> Conv4:
    module = Conv4(case.spec).to(case.device)
    module.load_state_dict(case.model.params)
    return module


def _predict_rows(case: Case, t: int | None = None):
    """(rows to forward, stat_rows, first query row) for the case's BN policy; t=None: all tasks."""
    sx = case.support_x if t is None else case.support_x[t]
    qx = case.query_x if t is None else case.query_x[t]
    if case.bn_policy == "support":
        return torch.cat([sx, qx], dim=-4), sx.shape[-4], sx.shape[-4]
    return qx, None, 0


# -- per-task loop, learn2learn style ---------------------------------------------------------------------------
def clone_module(module: nn.Module) -> nn.Module:
    """learn2learn.clone_module: a shallow copy whose parameters are differentiable clones."""
    clone = copy.copy(module)
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._modules = {k: clone_module(m) for k, m in module._modules.items()}
    return clone


def update_module(module: nn.Module, lr: float, grads: dict[nn.Module, list]) -> None:
    """learn2learn.update_module: replace every parameter by `p - lr * g`, module by module."""
    for m in module.modules():
        for (k, p), g in zip(list(m._parameters.items()), grads[m], strict=True):
            m._parameters[k] = p - lr * g


def per_task_loop(case: Case) -> Callable[[], torch.Tensor]:
    module = make_module(case)

    def call():
        outs = []
        for t in range(case.tasks):
            learner = clone_module(module)
            for _ in range(case.steps):
                loss = F.cross_entropy(learner(case.support_x[t]), case.support_y[t], reduction="sum") / case.shots
                grads = torch.autograd.grad(loss, list(learner.parameters()))
                per_module, it = {}, iter(grads)
                for m in learner.modules():
                    per_module[m] = [next(it) for _ in m._parameters]
                update_module(learner, case.lr, per_module)
            rows, stat_rows, first = _predict_rows(case, t)
            with torch.no_grad():
                outs.append(learner(rows, stat_rows)[first:])
        return torch.stack(outs)

    return call


# -- higher -------------------------------------------------------------------------------------------------------
def higher_unavailable() -> str | None:
    try:
        import higher  # noqa: F401
    except Exception as exc:
        return f"cannot import higher: {type(exc).__name__}: {exc} (pip install higher==0.2.1)"
    return None


def higher_loop(case: Case) -> Callable[[], torch.Tensor]:
    import higher

    module = make_module(case)
    opt = torch.optim.SGD(module.parameters(), lr=case.lr)

    def call():
        outs = []
        for t in range(case.tasks):
            with higher.innerloop_ctx(module, opt, track_higher_grads=False) as (fmodel, diffopt):
                for _ in range(case.steps):
                    out = fmodel(case.support_x[t])
                    diffopt.step(F.cross_entropy(out, case.support_y[t], reduction="sum") / case.shots)
                rows, stat_rows, first = _predict_rows(case, t)
                with torch.no_grad():
                    outs.append(fmodel(rows, stat_rows)[first:])
        return torch.stack(outs)

    return call


# -- torch.func vmap ----------------------------------------------------------------------------------------------
def vmap_tasks(case: Case) -> Callable[[], torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    module = make_module(case)
    meta = {k: v.detach() for k, v in module.named_parameters()}

    def loss_fn(params, x, y):
        return F.cross_entropy(functional_call(module, params, (x,)), y, reduction="sum") / case.shots

    task_grads = vmap(grad(loss_fn))
    rows, stat_rows, first = _predict_rows(case)
    task_logits = vmap(lambda params, x: functional_call(module, params, (x,), {"stat_rows": stat_rows})[first:])

    def call():
        params = {k: v.expand(case.tasks, *v.shape) for k, v in meta.items()}
        for _ in range(case.steps):
            grads = task_grads(params, case.support_x, case.support_y)
            params = {k: params[k] - case.lr * grads[k] for k in params}
        with torch.no_grad():
            return task_logits(params, rows)

    return call


# -- grouped convolution in a CUDA graph --------------------------------------------------------------------------
def _grouped_forward(spec: ModelSpec, p: dict, x: torch.Tensor, stat_rows: int | None) -> torch.Tensor:
    """x [T, B, C, H, W] -> logits [T, B, ways]; tasks folded into channels, one grouped conv per layer."""
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:])
    omniglot = spec.arch == "conv4-omniglot"
    for i in range(4):
        w = p[f"conv{i}.weight"]
        h = F.conv2d(h, w.flatten(0, 1), p[f"conv{i}.bias"].flatten(), stride=2 if omniglot else 1, padding=1,
                     groups=tasks)
        src = h if stat_rows is None else h[:stat_rows]
        var, mean = torch.var_mean(src, dim=(0, 2, 3), keepdim=True, correction=0)
        scale = p[f"bn{i}.weight"].reshape(1, -1, 1, 1) * torch.rsqrt(var + BN_EPS)
        h = F.relu((h - mean) * scale + p[f"bn{i}.bias"].reshape(1, -1, 1, 1))
        if not omniglot:
            h = F.max_pool2d(h, 2)
    feats = (h.mean(dim=(2, 3)) if omniglot else h.flatten(2)).reshape(batch, tasks, -1).transpose(0, 1)
    return torch.baddbmm(p["head.bias"].unsqueeze(1), feats, p["head.weight"].transpose(1, 2))


def grouped_graph(case: Case, capture: bool | None = None) -> Callable[[], torch.Tensor]:
    capture = case.device.type == "cuda" if capture is None else capture
    spec, tasks, shots, lr = case.spec, case.tasks, case.shots, case.lr
    static = {"sx": case.support_x.clone(), "sy": case.support_y.clone(), "qx": case.query_x.clone()}
    meta = {k: v.detach().clone() for k, v in case.model.params.items()}
    support = case.support_x.shape[1]

    def adapt_predict():
        fast = {k: v.unsqueeze(0).expand(tasks, *v.shape).clone().requires_grad_(True) for k, v in meta.items()}
        for _ in range(case.steps):
            with torch.enable_grad():
                out = _grouped_forward(spec, fast, static["sx"], None)
                loss = F.cross_entropy(out.flatten(0, 1), static["sy"].flatten(), reduction="sum") / shots
                grads = torch.autograd.grad(loss, list(fast.values()))
            updated = zip(fast.items(), grads, strict=True)
            fast = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in updated}
        with torch.no_grad():
            if case.bn_policy == "support":
                rows = torch.cat([static["sx"], static["qx"]], dim=1)
                return _grouped_forward(spec, fast, rows, support)[:, support:]
            return _grouped_forward(spec, fast, static["qx"], None)

    if not capture:
        return adapt_predict
    side = torch.cuda.Stream(case.device)
    side.wait_stream(torch.cuda.current_stream(case.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            adapt_predict()
    torch.cuda.current_stream(case.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = adapt_predict()

    def call():
        # A real caller brings new tasks each time: copy them into the static inputs, replay, copy the logits out.
        torch._foreach_copy_(list(static.values()), [case.support_x, case.support_y, case.query_x])
        graph.replay()
        return logits.clone()

    return call
