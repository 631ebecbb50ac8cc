"""Pure-torch oracles for single fused kernels: one conv block (forward, and backward by autograd) and the head.

The kernel tests and kernels.checks.gpu_selftest compare every launcher with these. They use only F.conv2d (grouped,
tasks folded into channels as models.functional does), F.batch_norm / explicit batch statistics, F.max_pool2d
and autograd, so they share no code with the kernels. Layouts follow the kernels: activations NHWC per task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.fused.conv_forward import BNInput
from models.functional import BN_EPS


def moments(z: torch.Tensor, images: int | None = None) -> torch.Tensor:
    """fp64 [T, 2, C] (sum, sum of squares) of z [T, B, H, W, C] over the first `images` images."""
    zz = (z if images is None else z[:, :images]).reshape(z.shape[0], -1, z.shape[-1]).double()
    return torch.stack([zz.sum(1), (zz * zz).sum(1)], 1)


def bn_normalize(z: torch.Tensor, bn: BNInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(xhat, y = gamma * xhat + beta) for z [T, B, H, W, C] under the statistics in `bn`."""
    mean = bn.stats[:, 0] / bn.count
    rstd = 1.0 / torch.sqrt(bn.stats[:, 1] / bn.count - mean * mean + BN_EPS)
    view = lambda v: v.float().reshape(v.shape[0] if v.dim() == 2 else 1, 1, 1, 1, -1)  # noqa: E731
    xhat = (z - view(mean)) * view(rstd)
    return xhat, xhat * view(bn.gamma) + view(bn.beta)


def _grouped_conv(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """a [T, B, Cin, H, W] -> [T, B, Cout, Ho, Wo], each task with its own weight [T, Cout, Cin, 3, 3]."""
    tasks, batch = a.shape[:2]
    h = a.transpose(0, 1).reshape(batch, -1, *a.shape[3:])
    out = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1), stride=stride, padding=1,
                   groups=tasks)
    return out.view(batch, tasks, -1, *out.shape[2:]).transpose(0, 1)


@dataclass
class BlockCase:
    """Inputs of one conv block and what autograd says about it (tensors in the kernels' layouts)."""

    x: torch.Tensor  # raw [T, B, Cin, H, W] or previous pre-BN z [T, B, HZ, WZ, Cin]
    in_bn: BNInput | None
    y_in: torch.Tensor | None  # previous BN output (pre-ReLU) [T, B, HZ, WZ, Cin], requires grad
    xhat_in: torch.Tensor | None
    params: dict[str, torch.Tensor]  # weight, bias, gamma, beta (task-stacked or shared)
    z: torch.Tensor  # [T, B, Ho, Wo, Cout] conv + bias
    stats: torch.Tensor  # fp64 [T, 2, Cout] over the stat images
    dy: torch.Tensor  # random upstream gradient dL/d(BN output) [T, B, Ho, Wo, Cout]
    bsum: torch.Tensor  # fp64 [T, 2, Cout] (sum dy, sum dy * xhat)
    grads: dict[str, torch.Tensor]  # dL/d params, task-stacked
    dy_in: torch.Tensor | None  # dL/d y_in
    in_bsum: torch.Tensor | None  # fp64 [T, 2, Cin]


def conv_block_case(tasks, batch, cin, cout, size, stride, mode, *, shared=False, stat_images=None,
                    generator=None, device="cpu") -> BlockCase:
    """A random block: mode 0 raw input, 1 previous BN + ReLU, 2 previous BN + ReLU + 2x2 max-pool.

    Loss = sum(dy * bn(z)) with batch statistics over all rows (as in adapt), so autograd gives exactly what the
    backward kernel must produce; `z`/`stats` honour `stat_images` for the forward comparison.
    """
    g = generator or torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lead = () if shared else (tasks,)
    if mode == 0:
        x = rnd(tasks, batch, cin, size, size)
        a, in_bn, y_in, xhat_in = x, None, None, None
    else:
        x = rnd(tasks, batch, size, size, cin) * 1.5 + 0.4
        in_bn = BNInput(moments(x), torch.rand(*lead, cin, generator=g) + 0.5, rnd(*lead, cin) * 0.3,
                        batch * size * size)
        xhat_in, y_in = bn_normalize(x, in_bn)
        y_in = y_in.detach().requires_grad_(True)
        a = F.relu(y_in).permute(0, 1, 4, 2, 3)
        if mode == 2:
            a = F.max_pool2d(a.reshape(-1, cin, size, size), 2).view(tasks, batch, cin, size // 2, size // 2)
    params = {"weight": rnd(*lead, cout, cin, 3, 3) * (2.0 / (9 * cin)) ** 0.5, "bias": rnd(*lead, cout) * 0.1,
              "gamma": torch.rand(*lead, cout, generator=g) + 0.5, "beta": rnd(*lead, cout) * 0.3}
    # Per-task leaves even for shared parameters: each task's own gradient is what the SGD step uses.
    full = {k: (v.unsqueeze(0).expand(tasks, *v.shape) if shared else v).clone().requires_grad_(True)
            for k, v in params.items()}
    zc = _grouped_conv(a, full["weight"], full["bias"], stride)  # [T, B, Cout, Ho, Wo]
    ho = zc.shape[-1]
    hb = zc.transpose(0, 1).reshape(batch, tasks * cout, ho, ho)
    y = F.batch_norm(hb, None, None, full["gamma"].reshape(-1), full["beta"].reshape(-1), training=True,
                     eps=BN_EPS)
    z = zc.permute(0, 1, 3, 4, 2).contiguous().detach()
    dy = rnd(tasks, batch, ho, ho, cout)
    # .contiguous(): torch 2.13's CPU batch_norm backward is wrong for a channels-last-strided grad_output when
    # B == 1 (a reshape of the permuted dy can be one), which would make the oracle, not the kernel, wrong.
    (y * dy.permute(1, 0, 4, 2, 3).reshape(batch, tasks * cout, ho, ho).contiguous()).sum().backward()
    all_stats = moments(z)
    xhat, _ = bn_normalize(z, BNInput(all_stats, params["gamma"], params["beta"], batch * ho * ho))
    bsum = torch.stack([dy.reshape(tasks, -1, cout).double().sum(1),
                        (dy * xhat).reshape(tasks, -1, cout).double().sum(1)], 1)
    dy_in = in_bsum = None
    if mode > 0:
        dy_in = y_in.grad
        in_bsum = torch.stack([dy_in.reshape(tasks, -1, cin).double().sum(1),
                               (dy_in * xhat_in).reshape(tasks, -1, cin).double().sum(1)], 1)
    to = lambda t: None if t is None else t.detach().to(device)  # noqa: E731
    return BlockCase(
        x=to(x), in_bn=None if in_bn is None else BNInput(*(to(t) for t in (in_bn.stats, in_bn.gamma, in_bn.beta)),
                                                          in_bn.count),
        y_in=to(y_in), xhat_in=to(xhat_in), params={k: to(v) for k, v in params.items()}, z=to(z),
        stats=to(moments(z, stat_images)), dy=to(dy), bsum=to(bsum),
        grads={k: to(v.grad) for k, v in full.items()},
        dy_in=to(dy_in), in_bsum=to(in_bsum),
    )


@dataclass
class HeadCase:
    z: torch.Tensor  # [T, B, H, W, C]
    bn: BNInput
    weight: torch.Tensor  # [T, ways, F]
    bias: torch.Tensor
    labels: torch.Tensor  # int64 [T, B]
    logits: torch.Tensor  # [T, B, ways]
    ce: torch.Tensor  # [T, B] per-row cross-entropy
    dy: torch.Tensor  # dL/d(last BN output) for L = sum_t sum CE / shots
    bsum: torch.Tensor
    grads: dict[str, torch.Tensor]  # 'weight', 'bias'


def head_case(tasks, batch, channels, size, ways, pool, shots, *, generator=None, device="cpu",
              tied_windows=False) -> HeadCase:
    """tied_windows: every 2x2 window holds one repeated value (as flat image regions give), so the max-pool
    backward must pick the first position of a tie, as torch does."""
    g = generator or torch.Generator().manual_seed(0)
    z = torch.randn(tasks, batch, size, size, channels, generator=g) * 1.5 + 0.3
    if tied_windows:
        z = z[:, :, ::2, ::2].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :size, :size].contiguous()
    bn = BNInput(moments(z), torch.rand(tasks, channels, generator=g) + 0.5,
                 torch.randn(tasks, channels, generator=g) * 0.3, batch * size * size)
    xhat, y = bn_normalize(z, bn)
    y = y.detach().requires_grad_(True)
    a = F.relu(y).permute(0, 1, 4, 2, 3)  # [T, B, C, H, W]
    if pool:
        feats = F.max_pool2d(a.reshape(-1, channels, size, size), 2).reshape(tasks, batch, -1)
    else:
        feats = a.mean(dim=(3, 4))
    weight = (torch.randn(tasks, ways, feats.shape[-1], generator=g) * 0.3).requires_grad_(True)
    bias = torch.randn(tasks, ways, generator=g).requires_grad_(True)
    logits = torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))
    labels = torch.randint(0, ways, (tasks, batch), generator=g)
    ce = F.cross_entropy(logits.reshape(-1, ways), labels.reshape(-1), reduction="none").view(tasks, batch)
    (ce.sum() / shots).backward()
    bsum = torch.stack([y.grad.reshape(tasks, -1, channels).double().sum(1),
                        (y.grad * xhat).reshape(tasks, -1, channels).double().sum(1)], 1)
    to = lambda t: t.detach().to(device)  # noqa: E731
    return HeadCase(to(z), BNInput(to(bn.stats), to(bn.gamma), to(bn.beta), bn.count), to(weight), to(bias),
                    to(labels), to(logits), to(ce), to(y.grad), to(bsum),
                    {"weight": to(weight.grad), "bias": to(bias.grad)})


# (dtype, tl.dot input precision) -> (rtol, atol) for kernel vs oracle. The kernels only take float32; ieee and
# tf32x3 differ from torch only in summation order (~1e-6 relative per reduction, grown by a few layers and
# steps); tf32 rounds each dot operand to 10 mantissa bits (~5e-4 relative per product).
TOLERANCES = {
    (torch.float32, "ieee"): (1e-4, 1e-4),
    (torch.float32, "tf32x3"): (1e-4, 1e-4),
    (torch.float32, "tf32"): (2e-2, 2e-2),
}


# adapt_error_ratio / logits_error_ratio limits: float32 kernels and peers at most 20x as far from float64 as torch's
# own float32 (seen 1.2-4.6x; a bug gives 1e3x and more); one TF32 pass is reported against a looser limit.
MAX_ERROR_RATIO = 20.0
TF32_MAX_ERROR_RATIO = 1000.0


class exact_torch:
    """Context: torch's own float32 convs / matmuls in full fp32 (cuDNN convs default to TF32 on Ampere+)."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def adapt_error_ratio(spec, params, support_x, support_y, query_x, steps, lr, policy, got_params, got_logits,
                      floor: float = 1e-5) -> dict[str, float]:
    """How far a fused adaptation is from float64 truth, in units of the float32 reference's own distance to it.

    Errors grow step by step (each SGD step feeds the previous rounding back, more so with BN over few rows and a
    large lr), so a fixed tolerance is either loose for 1 step or flaky for 10. The float32 reference sets the
    scale instead: ratio = max|fused - ref64| / (max|ref32 - ref64| + floor); about 1 means "as accurate as torch".
    """
    from models.maml import adapt as reference_adapt
    from models.maml import predict as reference_predict

    with exact_torch(), torch.no_grad():
        r32 = reference_adapt(spec, params, support_x, support_y, steps, lr)
        l32 = reference_predict(spec, r32.params, query_x, support_x, policy)
        lr64 = {k: v.double() for k, v in lr.items()} if isinstance(lr, dict) else lr
        r64 = reference_adapt(spec, {k: v.double() for k, v in params.items()}, support_x.double(), support_y, steps,
                              lr64)
        l64 = reference_predict(spec, r64.params, query_x.double(), support_x.double(), policy)
    ratios = {}
    for k, truth in r64.params.items():
        ratios[k] = float((got_params[k].double() - truth).abs().max()) / (
            float((r32.params[k].double() - truth).abs().max()) + floor)
    ratios["logits"] = logits_error_ratio(got_logits, l32, l64, floor)
    return ratios


def float64_logits(spec, params, support_x, support_y, query_x, steps, lr, policy) -> torch.Tensor:
    """Query logits [T, Q, ways] of the reference adaptation run in float64: the truth a float32 run is judged by."""
    from models.maml import adapt as reference_adapt
    from models.maml import predict as reference_predict

    with torch.no_grad():
        lr64 = {k: v.double() for k, v in lr.items()} if isinstance(lr, dict) else lr
        r64 = reference_adapt(spec, {k: v.double() for k, v in params.items()}, support_x.double(), support_y, steps,
                              lr64)
        return reference_predict(spec, r64.params, query_x.double(), support_x.double(), policy)


def logits_error_ratio(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, floor: float = 1e-5) -> float:
    """max|got - ref64| / (max|ref32 - ref64| + floor): as adapt_error_ratio, for logits alone (the benchmark's
    methods return nothing else). Non-finite logits give inf."""
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref64).abs().max()) / (float((ref32.double() - ref64).abs().max()) + floor)
