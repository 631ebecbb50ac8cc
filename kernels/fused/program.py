"""The fused conv4 inner loop: every kernel launch of one adapt (+ predict) of T tasks at one shape.

Per SGD step: 4 forward launches (conv + bias + BN statistics, previous BN/ReLU/pool folded into the load), 1 head
launch (features, logits, loss, backward into the last conv block, head SGD update) and 4 backward launches (input
gradient + weight gradient + SGD update of one conv block each) = 9 launches, plus 2 memsets per adapt. All
buffers live in the program, so a CUDA graph can capture `launch()` once and replay it (see triton_backend).

Parameters ping-pong between two flat buffers: step s reads set s % 2 (the meta-initialization, task stride 0,
at step 0) and writes the other, so one launch can update a weight that other programs of it still read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.fused.conv_backward import conv_bn_backward_sgd
from kernels.fused.conv_forward import BNInput, conv_bn_forward, conv_out_size
from kernels.fused.head import HeadResult, head_features, head_step
from models.functional import param_shapes
from models.spec import ModelSpec

TRITON_ARCHS = ("conv4-omniglot", "conv4-miniimagenet")


@dataclass(frozen=True)
class LayerGeometry:
    cin: int
    cout: int
    stride: int
    pool_input: bool  # the conv reads maxpool2(relu(bn(previous z)))
    h_in: int  # conv input size (after the pool)
    w_in: int
    hz: int  # size of the tensor it reads (previous z, or the raw image for layer 0)
    wz: int
    ho: int
    wo: int


def conv4_geometry(spec: ModelSpec) -> list[LayerGeometry]:
    if spec.arch not in TRITON_ARCHS:
        raise ValueError(f"model {spec.name}: arch {spec.arch!r} has no fused kernels, expected one of {TRITON_ARCHS}")
    mini = spec.arch == "conv4-miniimagenet"
    stride = 1 if mini else 2
    c, h, w = spec.input_shape
    layers = []
    for i in range(4):
        pool = mini and i > 0
        h_in, w_in = (h // 2, w // 2) if pool else (h, w)
        if h_in < 1 or w_in < 1:
            raise ValueError(f"model {spec.name}: input {spec.input_shape} is too small for 4 conv blocks")
        ho, wo = conv_out_size(h_in, stride), conv_out_size(w_in, stride)
        layers.append(LayerGeometry(c, spec.hidden, stride, pool, h_in, w_in, h, w, ho, wo))
        c, h, w = spec.hidden, ho, wo
    if mini and (h < 2 or w < 2):
        raise ValueError(f"model {spec.name}: input {spec.input_shape} leaves {h}x{w} before the last 2x2 pool")
    return layers


def layer_params(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {"weight": params[f"conv{i}.weight"], "bias": params[f"conv{i}.bias"],
            "gamma": params[f"bn{i}.weight"], "beta": params[f"bn{i}.bias"]}


def layer_lr(lr, i: int):
    return lr if not isinstance(lr, dict) else layer_params(lr, i)


def head_lr(lr):
    return lr if not isinstance(lr, dict) else {"weight": lr["head.weight"], "bias": lr["head.bias"]}


def forward_conv4(spec, geo, params, x, zs, stats, stat_images, precision):
    """Four conv blocks: x [T, B, C, H, W] -> zs[i] [T, B, Ho, Wo, hidden] with statistics stats[i] (zeroed)."""
    for i, g in enumerate(geo):
        in_bn = None if i == 0 else BNInput(stats[i - 1], params[f"bn{i - 1}.weight"], params[f"bn{i - 1}.bias"],
                                            stat_images * geo[i - 1].ho * geo[i - 1].wo)
        conv_bn_forward(
            x if i == 0 else zs[i - 1], params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride=g.stride,
            in_bn=in_bn, pool_input=g.pool_input, stat_images=stat_images, out=zs[i], stats=stats[i],
            precision=precision,
        )


def last_bn(geo, params, stats, stat_images) -> BNInput:
    return BNInput(stats[3], params["bn3.weight"], params["bn3.bias"], stat_images * geo[3].ho * geo[3].wo)


class AdaptProgram:
    """Buffers and launches of `steps` first-order SGD steps (+ optional predict) for T tasks at one shape.

    Set the inputs (`meta`, `lr`, `support_x`, `support_y`, `query_x`), call `launch()`, read `fast` (task-stacked
    fast weights), `loss` / `accuracy` ([steps + 1, T] when track) and `logits` ([T, Q, ways] when queries).
    policy: the BN policy of the predict pass ('support' or 'transductive'); ignored without queries.
    """

    def __init__(self, spec: ModelSpec, tasks: int, support: int, queries: int, steps: int, track: bool,
                 policy: str, precision: str, device: torch.device):
        self.spec, self.tasks, self.support, self.queries = spec, tasks, support, queries
        self.steps, self.track, self.policy, self.precision = steps, track, policy, precision
        self.geo = geo = conv4_geometry(spec)
        self.pool = spec.arch == "conv4-miniimagenet"
        self.shots = max(1, support // spec.ways)
        dev = self.device = torch.device(device)
        act = lambda b: [torch.zeros(tasks, b, g.ho, g.wo, g.cout, device=dev) for g in geo]  # noqa: E731
        self.z, self.dy = act(support), act(support)
        # fp64 statistics, zeroed by launch(): forward [steps + 2] (steps, last support pass, predict), backward [steps]
        self.stats_blob = torch.zeros((2 * steps + 2) * 4 * tasks * 2 * spec.hidden, device=dev, dtype=torch.float64)
        stats = self.stats_blob.view(2 * steps + 2, 4, tasks, 2, spec.hidden)
        self.fwd_stats, self.bwd_sums = stats[: steps + 2], stats[steps + 2:]
        self.track_blob = torch.zeros(2, steps + 1, tasks, device=dev)
        self.loss, self.accuracy = self.track_blob[0], self.track_blob[1]
        shapes = param_shapes(spec)
        numel = sum(math.prod(s) for s in shapes.values())
        self.param_blobs = [torch.zeros(tasks * numel, device=dev) for _ in range(2 if steps > 0 else 1)]
        self.param_sets = [self._views(blob, shapes) for blob in self.param_blobs]
        self.predict_rows = (support + queries if policy == "support" else queries) if queries else 0
        if queries:
            self.zq = act(self.predict_rows)
            self.xcat = (torch.zeros(tasks, self.predict_rows, *spec.input_shape, device=dev)
                         if policy == "support" else None)
            self.logits_all = torch.zeros(tasks, self.predict_rows, spec.ways, device=dev)
        self.meta = self.lr = self.support_x = self.support_y = self.query_x = None

    def _views(self, blob, shapes):
        views, off = {}, 0
        for name, shape in shapes.items():
            n = self.tasks * math.prod(shape)
            views[name] = blob[off: off + n].view(self.tasks, *shape)
            off += n
        return views

    @property
    def final_blob(self) -> torch.Tensor:
        return self.param_blobs[(self.steps - 1) % 2] if self.steps > 0 else self.param_blobs[0]

    @property
    def fast(self) -> dict[str, torch.Tensor]:
        return self.param_sets[(self.steps - 1) % 2] if self.steps > 0 else self.param_sets[0]

    @property
    def logits(self) -> torch.Tensor | None:
        if not self.queries:
            return None
        return self.logits_all[:, self.support:] if self.policy == "support" else self.logits_all

    def launch(self):
        spec, geo, prec = self.spec, self.geo, self.precision
        x, y = self.support_x, self.support_y
        self.stats_blob.zero_()
        if self.track:
            self.track_blob.zero_()
        cur = self.meta
        for s in range(self.steps):
            nxt = self.param_sets[s % 2]
            fwd, bwd = self.fwd_stats[s], self.bwd_sums[s]
            forward_conv4(spec, geo, cur, x, self.z, fwd, self.support, prec)
            head_step(
                self.z[3], last_bn(geo, cur, fwd, self.support), cur["head.weight"], cur["head.bias"],
                pool=self.pool, labels=y, shots=self.shots, write_logits=False, track=self.track, train=True,
                lr=head_lr(self.lr), precision=prec,
                out=HeadResult(loss=self.loss[s], accuracy=self.accuracy[s], dy=self.dy[3], bsum=bwd[3],
                               params={"weight": nxt["head.weight"], "bias": nxt["head.bias"]}),
            )
            for i in range(3, -1, -1):
                g = geo[i]
                in_bn = None if i == 0 else BNInput(fwd[i - 1], cur[f"bn{i - 1}.weight"], cur[f"bn{i - 1}.bias"],
                                                    self.support * geo[i - 1].ho * geo[i - 1].wo)
                conv_bn_backward_sgd(
                    x if i == 0 else self.z[i - 1], self.dy[i], self.z[i], fwd[i], bwd[i], layer_params(cur, i),
                    layer_lr(self.lr, i), stride=g.stride, in_bn=in_bn, pool_input=g.pool_input,
                    input_grad=i > 0, out_params=layer_params(nxt, i),
                    dy_in=self.dy[i - 1] if i > 0 else None, in_bsum=bwd[i - 1] if i > 0 else None,
                    precision=prec,
                )
            cur = nxt
        if self.steps == 0:
            for name, v in self.param_sets[0].items():
                v.copy_(cur[name].expand_as(v))
        support_pass = bool(self.queries) and self.policy == "support"
        if self.track and not support_pass:  # the support loss after the last step needs its own forward
            fwd = self.fwd_stats[self.steps]
            forward_conv4(spec, geo, cur, x, self.z, fwd, self.support, prec)
            head_step(
                self.z[3], last_bn(geo, cur, fwd, self.support), cur["head.weight"], cur["head.bias"],
                pool=self.pool, labels=y, shots=self.shots, write_logits=False, track=True, precision=prec,
                out=HeadResult(loss=self.loss[self.steps], accuracy=self.accuracy[self.steps]),
            )
        if self.queries:
            fwd = self.fwd_stats[self.steps + 1]
            if support_pass:  # query rows behind the support rows, normalized with the support statistics only
                self.xcat[:, : self.support].copy_(x)
                self.xcat[:, self.support:].copy_(self.query_x)
                xin, stat_images = self.xcat, self.support
            else:
                xin, stat_images = self.query_x, self.queries
            forward_conv4(spec, geo, cur, xin, self.zq, fwd, stat_images, prec)
            head_step(
                self.zq[3], last_bn(geo, cur, fwd, stat_images), cur["head.weight"], cur["head.bias"],
                pool=self.pool, labels=y if support_pass and self.track else None, shots=self.shots,
                loss_images=self.support if support_pass else None, write_logits=True,
                track=support_pass and self.track, precision=prec,
                out=HeadResult(logits=self.logits_all, loss=self.loss[self.steps],
                               accuracy=self.accuracy[self.steps]),
            )


def workspace_bytes_per_task(spec: ModelSpec, support: int, queries: int, steps: int, policy: str) -> int:
    """Device memory one task of an AdaptProgram needs (activations dominate), to size task chunks."""
    geo = conv4_geometry(spec)
    per_row = sum(g.ho * g.wo * g.cout for g in geo) * 4
    rows = 2 * support + ((support + queries if policy == "support" else queries) if queries else 0)
    stats = (2 * steps + 2) * 4 * 2 * spec.hidden * 8
    params = 2 * sum(math.prod(s) for s in param_shapes(spec).values()) * 4
    inputs = (support + queries) * math.prod(spec.input_shape) * 4 * 2
    return per_row * rows + stats + params + inputs


def predict_conv4(spec: ModelSpec, fast: dict[str, torch.Tensor], query_x: torch.Tensor,
                  support_x: torch.Tensor | None, policy: str, precision: str) -> torch.Tensor:
    """Query logits [T, Q, ways] from task-stacked (or shared) parameters: 4 forward launches + 1 head launch."""
    geo = conv4_geometry(spec)
    tasks, queries = query_x.shape[:2]
    if policy == "support":
        if support_x is None:
            raise ValueError(f"model {spec.name} uses bn_policy 'support': predict needs the support set")
        xin, stat_images = torch.cat([support_x, query_x], dim=1), support_x.shape[1]
    else:
        xin, stat_images = query_x, queries
    rows = xin.shape[1]
    zs = [torch.empty(tasks, rows, g.ho, g.wo, g.cout, device=query_x.device) for g in geo]
    stats = torch.zeros(4, tasks, 2, spec.hidden, device=query_x.device, dtype=torch.float64)
    forward_conv4(spec, geo, fast, xin, zs, stats, stat_images, precision)
    out = head_step(zs[3], last_bn(geo, fast, stats, stat_images), fast["head.weight"], fast["head.bias"],
                    pool=spec.arch == "conv4-miniimagenet", precision=precision)
    return out.logits[:, rows - queries:]


__all__ = ["AdaptProgram", "TRITON_ARCHS", "conv4_geometry", "head_features", "predict_conv4",
           "workspace_bytes_per_task"]
