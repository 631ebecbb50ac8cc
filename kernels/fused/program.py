"""The fused conv4 inner loop: every kernel launch of one adapt (+ predict) of T tasks at one shape.

Per SGD step: 4 forward launches (conv + bias + BN statistics, previous BN/ReLU/pool folded into the load), 1 head
launch (features, logits, loss, backward into the last conv block, head SGD update) and 4 backward launches (input
gradient + weight gradient + SGD update of one conv block each) = 9 launches, plus 2 memsets per adapt. All
buffers live in the program, so a CUDA graph can capture `launch()` once and replay it (see kernels.engine.fused).
The last support forward also yields the support statistics under the adapted weights (`moments`, one more launch
turns the kernels' fp64 sums into mean / variance): what a `support`-policy adaptation keeps for Predict.

Parameters ping-pong between two flat buffers: step s reads set s % 2 (the meta-initialization, task stride 0,
at step 0) and writes the other, so one launch can update a weight that other programs of it still read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kernels.fused.common import check_tensor
from kernels.fused.conv_backward import bwd_layout, conv_bn_backward_sgd
from kernels.fused.conv_forward import BNInput, conv_bn_forward, conv_out_size, fwd_programs
from kernels.fused.head import MAX_TRAIN_ROWS, HeadResult, head_features, head_programs, head_step, prototype_head
from kernels.fused.stats import bn_moments, moments_dict
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


def forward_conv4(spec, geo, params, x, zs, stats, stat_images, precision, given=None):
    """Four conv blocks: x [T, B, C, H, W] -> zs[i] [T, B, Ho, Wo, hidden] with statistics stats[i] (zeroed) over
    the first `stat_images` images; or, with `given` (fp64 [4, T, 2, C] sums over one row, see kernels.fused.stats),
    normalized with those statistics and no statistics collected (`stats` is not read)."""
    for i, g in enumerate(geo):
        in_bn = None if i == 0 else bn_input(geo, params, stats if given is None else given, i - 1, stat_images,
                                             given is not None)
        conv_bn_forward(
            x if i == 0 else zs[i - 1], params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride=g.stride,
            in_bn=in_bn, pool_input=g.pool_input, stat_images=stat_images, out=zs[i],
            stats=None if given is not None else stats[i], collect_stats=given is None, precision=precision,
        )


def bn_input(geo, params, stats, i: int, stat_images: int, given: bool = False) -> BNInput:
    """Layer i's batch norm as the next kernel applies it: statistics over stat_images images (given: one row)."""
    count = 1 if given else stat_images * geo[i].ho * geo[i].wo
    return BNInput(stats[i], params[f"bn{i}.weight"], params[f"bn{i}.bias"], count)


def last_bn(geo, params, stats, stat_images, given: bool = False) -> BNInput:
    return bn_input(geo, params, stats, 3, stat_images, given)


@dataclass(frozen=True)
class RecipeRates:
    """A recipe's inner-loop rates as the kernels take them (per-element tensors shaped like one task's parameter,
    as Meta-SGD's): `frozen` parameters are not adapted (rate 0: MAML++'s `no-bn`), `per_step[s]` holds LSLR's
    learned rate of each parameter it lists at step s (models.maml: step s uses entry min(s, S - 1)); every other
    parameter takes the program's lr."""

    frozen: frozenset = frozenset()
    per_step: tuple = ()  # tuple[dict[str, torch.Tensor], ...]

    def tensors(self) -> list[torch.Tensor]:
        return [t for step in self.per_step for t in step.values()]


class AdaptProgram:
    """Buffers and launches of `steps` first-order SGD steps (+ optional predict) for T tasks at one shape.

    Set the inputs (`meta`, `lr`, `support_x`, `support_y`, `query_x`), call `launch()`, read `fast` (task-stacked
    fast weights), `loss` / `accuracy` ([steps + 1, T] when track), `logits` ([T, Q, ways] when queries) and
    `moments` (float32 [2, 4, T, C]: each BN layer's support mean and biased variance under the adapted weights,
    when support_stats; `stats` names them as models.functional.support_stats does).
    policy: the BN policy of the predict pass ('support' or 'transductive'); ignored without queries. Under
    'support' the query rows are independent of each other, so a caller may pad them (the padding is sliced off).
    lr: a float, a 0-dim float32 device tensor (what a captured program holds: a new value needs no new graph) or
    Meta-SGD rates {name: tensor shaped like one task's parameter}.
    head_only: ANIL (spec.adapt_params == 'head'): the body is forwarded once with the meta-initialization and
    only the head takes the K steps (no backward into the conv blocks); with spec.head_init 'proto' (Proto-MAML) the
    head starts at the support prototypes of those features (kernels.fused.head.prototype_head).
    recipe: RecipeRates (frozen parameters, LSLR's per-step rates), applied on top of lr.
    """

    def __init__(self, spec: ModelSpec, tasks: int, support: int, queries: int, steps: int, track: bool,
                 policy: str, precision: str, device: torch.device, support_stats: bool = False,
                 head_only: bool = False, recipe: RecipeRates | None = None):
        self.spec, self.tasks, self.support, self.queries = spec, tasks, support, queries
        self.steps, self.track, self.policy, self.precision = steps, track, policy, precision
        self.support_stats, self.head_only, self.recipe = support_stats, bool(head_only), recipe
        self.geo = geo = conv4_geometry(spec)
        self.pool = spec.arch == "conv4-miniimagenet"
        self.shots = max(1, support // spec.ways)
        dev = self.device = torch.device(device)
        act = lambda b: [torch.zeros(tasks, b, g.ho, g.wo, g.cout, device=dev) for g in geo]  # noqa: E731
        self.z = act(support)
        self.dy = None if self.head_only else act(support)  # gradients into the conv blocks
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
        # 'support' with queries: one pass over the support rows and the query rows behind them (statistics of the
        # support rows only) gives the query logits and the support statistics together.
        self.support_pass = bool(queries) and spec.predict_needs_support_stats(policy)
        self.predict_rows = (support + queries if self.support_pass else queries) if queries else 0
        if queries:
            self.zq = act(self.predict_rows)
            self.xcat = (torch.zeros(tasks, self.predict_rows, *spec.input_shape, device=dev)
                         if self.support_pass else None)
            self.logits_all = torch.zeros(tasks, self.predict_rows, spec.ways, device=dev)
        if support_stats:
            self.moments = torch.zeros(2, 4, tasks, spec.hidden, device=dev)
            self.moment_counts = torch.tensor([float(support * g.ho * g.wo) for g in geo], dtype=torch.float64,
                                              device=dev)
        if recipe is not None:  # rates of the parameters that take the program's lr, refilled by launch()
            self.base_rates = {k: torch.zeros(shape, device=dev) for k, shape in shapes.items()}
            self.zero_rates = {k: torch.zeros(shapes[k], device=dev) for k in recipe.frozen}
        self.meta = self.lr = self.support_x = self.support_y = self.query_x = None

    def split(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views {name: [T, *shape]} of a flat parameter blob laid out as this program's (e.g. a clone of
        final_blob)."""
        return self._views(blob, param_shapes(self.spec))

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
        return self.logits_all[:, self.support:] if self.support_pass else self.logits_all

    @property
    def stats(self) -> dict[str, torch.Tensor] | None:
        return moments_dict(self.moments) if self.support_stats else None

    def step_rates(self) -> list:
        """The rate of every step as the kernels take it: the program's lr, or with a recipe per-element rates
        (filled here from the lr, so a captured graph reads the device scalar's value at each replay)."""
        if self.recipe is None:
            return [self.lr] * self.steps
        per_step, frozen = self.recipe.per_step, self.recipe.frozen
        if isinstance(self.lr, dict):
            base = self.lr
        else:
            base = self.base_rates
            every_step = set.intersection(*map(set, per_step)) if per_step else set()
            for k, buf in base.items():
                if k in frozen or k in every_step:
                    continue  # never read
                if isinstance(self.lr, torch.Tensor):
                    buf.copy_(self.lr.expand_as(buf))
                else:
                    buf.fill_(float(self.lr))
        rates = []
        for s in range(self.steps):
            step = per_step[min(s, len(per_step) - 1)] if per_step else {}
            rates.append({k: self.zero_rates[k] if k in frozen else step.get(k, base[k]) for k in self.base_rates})
        return rates

    def launch(self):
        spec, geo, prec = self.spec, self.geo, self.precision
        x, y = self.support_x, self.support_y
        self.stats_blob.zero_()
        if self.track:
            self.track_blob.zero_()
        rates = self.step_rates()
        if self.head_only:
            return self._launch_head_only(rates)
        cur = self.meta
        for s in range(self.steps):
            nxt = self.param_sets[s % 2]
            fwd, bwd = self.fwd_stats[s], self.bwd_sums[s]
            forward_conv4(spec, geo, cur, x, self.z, fwd, self.support, prec)
            head_step(
                self.z[3], last_bn(geo, cur, fwd, self.support), cur["head.weight"], cur["head.bias"],
                pool=self.pool, labels=y, shots=self.shots, write_logits=False, track=self.track, train=True,
                lr=head_lr(rates[s]), precision=prec,
                out=HeadResult(loss=self.loss[s], accuracy=self.accuracy[s], dy=self.dy[3], bsum=bwd[3],
                               params={"weight": nxt["head.weight"], "bias": nxt["head.bias"]}),
            )
            for i in range(3, -1, -1):
                g = geo[i]
                in_bn = None if i == 0 else bn_input(geo, cur, fwd, i - 1, self.support)
                conv_bn_backward_sgd(
                    x if i == 0 else self.z[i - 1], self.dy[i], self.z[i], fwd[i], bwd[i], layer_params(cur, i),
                    layer_lr(rates[s], i), stride=g.stride, in_bn=in_bn, pool_input=g.pool_input,
                    input_grad=i > 0, out_params=layer_params(nxt, i),
                    dy_in=self.dy[i - 1] if i > 0 else None, in_bsum=bwd[i - 1] if i > 0 else None,
                    precision=prec,
                )
            cur = nxt
        if self.steps == 0:
            for name, v in self.param_sets[0].items():
                v.copy_(cur[name].expand_as(v))
        self._finish(cur, self.steps)

    def _launch_head_only(self, rates):
        """ANIL: one body forward of the support rows with the meta-initialization, then K head steps on its
        features (their statistics are the meta body's at every step); the fast weights are the meta body (per
        task) and the adapted head."""
        spec, geo, prec = self.spec, self.geo, self.precision
        fwd = self.fwd_stats[0]
        forward_conv4(spec, geo, self.meta, self.support_x, self.z, fwd, self.support, prec)
        bn = last_bn(geo, self.meta, fwd, self.support)
        final = self.fast
        for name, v in final.items():
            if not name.startswith("head.") or self.steps == 0:
                v.copy_(self.meta[name].expand_as(v))
        head = {"weight": self.meta["head.weight"], "bias": self.meta["head.bias"]}
        if spec.head_init == "proto":  # Proto-MAML: the head starts at the support prototypes of these features
            start = self.param_sets[1 if self.steps else 0]  # step 0 reads it (written by step 1), or it is final
            head = prototype_head(self.z[3], bn, self.support_y, spec.ways, pool=self.pool, precision=prec,
                                  out={"weight": start["head.weight"], "bias": start["head.bias"]})
        for s in range(self.steps):
            nxt = self.param_sets[s % 2]
            new = {"weight": nxt["head.weight"], "bias": nxt["head.bias"]}
            head_step(
                self.z[3], bn, head["weight"], head["bias"], pool=self.pool, labels=self.support_y, shots=self.shots,
                write_logits=False, track=self.track, train=True, backprop=False, lr=head_lr(rates[s]),
                precision=prec, out=HeadResult(loss=self.loss[s], accuracy=self.accuracy[s], params=new),
            )
            head = new
        if self.track and not self.support_pass:  # the support loss after the last step: the same features
            head_step(
                self.z[3], bn, head["weight"], head["bias"], pool=self.pool, labels=self.support_y, shots=self.shots,
                write_logits=False, track=True, precision=prec,
                out=HeadResult(loss=self.loss[self.steps], accuracy=self.accuracy[self.steps]),
            )
        self._finish(final, 0, forwarded=True)

    def _finish(self, cur, last: int, forwarded: bool = False):
        """After the steps: the support loss and statistics under the adapted weights (`fwd_stats[last]`; a
        forward of their own unless `forwarded`), then the predict pass over the query rows."""
        spec, geo, prec = self.spec, self.geo, self.precision
        x, y = self.support_x, self.support_y
        if not forwarded and not self.support_pass and (self.track or self.support_stats):
            # The support loss after the last step, and / or the support statistics, need their own forward.
            fwd = self.fwd_stats[self.steps]
            forward_conv4(spec, geo, cur, x, self.z, fwd, self.support, prec)
            if self.track:
                head_step(
                    self.z[3], last_bn(geo, cur, fwd, self.support), cur["head.weight"], cur["head.bias"],
                    pool=self.pool, labels=y, shots=self.shots, write_logits=False, track=True, precision=prec,
                    out=HeadResult(loss=self.loss[self.steps], accuracy=self.accuracy[self.steps]),
                )
        if self.queries:
            fwd = self.fwd_stats[self.steps + 1]
            if self.support_pass:  # query rows behind the support rows, normalized with the support statistics only
                self.xcat[:, : self.support].copy_(x)
                self.xcat[:, self.support:].copy_(self.query_x)
                xin, stat_images = self.xcat, self.support
            else:
                xin, stat_images = self.query_x, self.queries
            forward_conv4(spec, geo, cur, xin, self.zq, fwd, stat_images, prec)
            head_step(
                self.zq[3], last_bn(geo, cur, fwd, stat_images), cur["head.weight"], cur["head.bias"],
                pool=self.pool, labels=y if self.support_pass and self.track else None, shots=self.shots,
                loss_images=self.support if self.support_pass else None, write_logits=True,
                track=self.support_pass and self.track, precision=prec,
                out=HeadResult(logits=self.logits_all, loss=self.loss[self.steps],
                               accuracy=self.accuracy[self.steps]),
            )
        if self.support_stats:
            bn_moments(self.fwd_stats[self.steps + 1 if self.support_pass else last], self.moment_counts,
                       out=self.moments)


def workspace_bytes_per_task(spec: ModelSpec, support: int, queries: int, steps: int, policy: str) -> int:
    """Device memory one task of an AdaptProgram needs (activations dominate), to size task chunks. A predict from
    stored statistics forwards the query rows alone: (spec, 0, queries, 0, policy)."""
    geo = conv4_geometry(spec)
    per_row = sum(g.ho * g.wo * g.cout for g in geo) * 4
    predict_rows = ((support + queries if spec.predict_needs_support_stats(policy) else queries) if queries else 0)
    rows = 2 * support + predict_rows
    stats = (2 * steps + 2) * 4 * 2 * spec.hidden * 8
    params = 2 * sum(math.prod(s) for s in param_shapes(spec).values()) * 4
    inputs = (support + queries) * math.prod(spec.input_shape) * 4 * 2
    return per_row * rows + stats + params + inputs


def predict_conv4(spec: ModelSpec, fast: dict[str, torch.Tensor], query_x: torch.Tensor, precision: str,
                  sums: torch.Tensor | None = None) -> torch.Tensor:
    """Query logits [T, Q, ways] from task-stacked (or shared) parameters: 4 forward launches + 1 head launch.

    sums: fp64 [4, T, 2, C] statistics to normalize with (kernels.fused.stats.moment_sums of an adaptation's stored
    support statistics: the query rows alone are forwarded); None: the query batch's own statistics."""
    geo = conv4_geometry(spec)
    tasks, queries = query_x.shape[:2]
    zs = [torch.empty(tasks, queries, g.ho, g.wo, g.cout, device=query_x.device) for g in geo]
    if sums is None:
        stats = torch.zeros(4, tasks, 2, spec.hidden, device=query_x.device, dtype=torch.float64)
    else:
        stats = check_tensor(sums, "sums", (4, tasks, 2, spec.hidden), dtype=torch.float64, device=query_x.device)
    forward_conv4(spec, geo, fast, query_x, zs, stats, queries, precision, given=stats if sums is not None else None)
    out = head_step(zs[3], last_bn(geo, fast, stats, queries, given=sums is not None), fast["head.weight"],
                    fast["head.bias"], pool=spec.arch == "conv4-miniimagenet", precision=precision)
    return out.logits


GRID_LIMIT = 65535  # CUDA's cap on grid axes 1 and 2 (kernels.fused.common.check_grid_dim)


def _rows_fit(spec: ModelSpec, geo, rows: int, device: torch.device) -> bool:
    """Whether every launch of an AdaptProgram / predict over `rows` images of one task stays within the grid limit
    (with one task: the block heuristics shrink tiles, so grids grow, when there are few tasks)."""
    for i, g in enumerate(geo):
        if fwd_programs(rows * g.ho * g.wo, g.cin, g.cout, 1, device) > GRID_LIMIT:
            return False
        lay = bwd_layout(rows, g.h_in, g.w_in, g.ho, g.wo, g.cin, g.cout, g.stride, i == 0, 1, device,
                         input_grad=i > 0)
        if lay.programs > GRID_LIMIT:
            return False
    feats = head_features(geo[3].cout, geo[3].ho, geo[3].wo, spec.arch == "conv4-miniimagenet")
    return head_programs(rows, feats, False) <= GRID_LIMIT


@functools.cache
def max_rows_per_task(spec: ModelSpec, device: torch.device) -> int:
    """The most images one task may forward in one batch (support rows of adapt; support + query rows of
    adapt + predict under 'support'; query rows of a predict) without a launch past CUDA's grid limit, computed
    from the launchers' own block choices. (A training step also holds a task's support rows in one head program:
    at most MAX_TRAIN_ROWS.)"""
    geo = conv4_geometry(spec)
    lo, hi = 0, 1
    while _rows_fit(spec, geo, hi, device):
        lo, hi = hi, hi * 2
        if hi > 1 << 30:
            return lo
    while hi - lo > 1:  # the grids grow with the rows: bisect for the last size that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _rows_fit(spec, geo, mid, device) else (lo, mid)
    return lo


__all__ = [
    "AdaptProgram",
    "MAX_TRAIN_ROWS",
    "RecipeRates",
    "TRITON_ARCHS",
    "conv4_geometry",
    "head_features",
    "max_rows_per_task",
    "predict_conv4",
    "workspace_bytes_per_task",
]
