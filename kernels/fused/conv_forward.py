"""Forward 3x3 convolution for T tasks at once, each with its own weights, fused with its neighbours.

One launch per layer: load the previous layer's pre-BN output z_prev, apply its batch norm + ReLU (+ 2x2
max-pool) on the fly, convolve (implicit GEMM, `tl.dot` over (tap, input-channel) chunks), add the bias, store
the new pre-BN output z and atomically accumulate its per-task per-channel batch statistics. The first layer
(Cin = 1 or 3) reads the raw NCHW input with an outer-product (non-dot) loop over its 9*Cin taps, since a K of
9 or 27 would waste most of a tl.dot.

Reference: models.functional._conv_bn_relu (grouped conv with groups=T); the BN here has no running stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused.common import (
    _act_load,
    _bn_coeffs,
    _bn_scale_shift,
    check_grid_dim,
    check_precision,
    check_stats,
    check_tensor,
    next_pow2,
    sm_count,
    task_stride,
)
from models.functional import BN_EPS


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # IN_MODE 0: raw input [T, B, CIN, H_IN, W_IN]; else previous pre-BN output [T, B, HZ, WZ, CIN]
    in_stat_ptr,  # fp64 [T, 2, CIN]: (sum, sum sq) of x over in_count rows (IN_MODE > 0)
    in_gamma_ptr,  # [T or 1, CIN]: previous BN scale, task stride in_gb_st (IN_MODE > 0)
    in_beta_ptr,  # [T or 1, CIN]: previous BN shift, task stride in_gb_st (IN_MODE > 0)
    w_ptr,  # [T or 1, COUT, CIN, 3, 3], task stride w_st
    b_ptr,  # [T or 1, COUT], task stride b_st
    z_ptr,  # out [T, B, HO, WO, COUT]: conv + bias (pre-BN), NHWC
    stat_ptr,  # out, accumulated: fp64 [T, 2, COUT] (sum, sum sq) of z over the first STAT_B images of each task
    B, H_IN, W_IN,  # images per task; conv input size (after the 2x2 pool when IN_MODE == 2)
    HZ, WZ,  # stored size of x (= H_IN, W_IN unless pooled)
    HO, WO,  # output size
    STAT_B,  # images per task that contribute to the statistics (the support set under the 'support' policy)
    in_count,  # rows behind in_stat (int)
    in_gb_st, w_st, b_st,  # task strides (0: one meta-initialization for all tasks)
    CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr,
    IN_MODE: tl.constexpr,  # 0 raw input, 1 bn+relu of x, 2 maxpool2(bn+relu of x)
    COLLECT_STATS: tl.constexpr,  # accumulate stat_ptr (False: the caller normalizes with statistics it has)
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_c = tl.program_id(2)
    hwo = HO * WO
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # output rows (b, oh, ow) of this task
    pmask = p < B * hwo
    b = p // hwo
    oh = (p % hwo) // WO
    ow = p % WO
    co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    w_task = w_ptr + t * w_st
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    if IN_MODE == 0:
        x_task = x_ptr + t * B * CIN * H_IN * W_IN
        for ci in tl.static_range(CIN):
            for kh in tl.static_range(3):
                ih = oh * STRIDE + (kh - 1)
                for kw in tl.static_range(3):
                    iw = ow * STRIDE + (kw - 1)
                    m = pmask & (ih >= 0) & (ih < H_IN) & (iw >= 0) & (iw < W_IN)
                    xv = tl.load(x_task + ((b * CIN + ci) * H_IN + ih) * W_IN + iw, mask=m, other=0.0)
                    wv = tl.load(w_task + co * (CIN * 9) + (ci * 9 + kh * 3 + kw), mask=comask, other=0.0)
                    acc += xv[:, None] * wv[None, :]
    else:
        z_in = x_ptr + t * B * HZ * WZ * CIN
        for ci0 in tl.static_range(0, CIN, BLOCK_CI):
            ci = ci0 + tl.arange(0, BLOCK_CI)
            cimask = ci < CIN
            mean, rstd, gam, bet = _bn_coeffs(
                in_stat_ptr + t * 2 * CIN, in_gamma_ptr + t * in_gb_st, in_beta_ptr + t * in_gb_st,
                ci, cimask, in_count, CIN, EPS,
            )
            scale, shift = _bn_scale_shift(mean, rstd, gam, bet)
            for tap in range(9):  # a runtime loop: unrolling 9 dots multiplies compile time, not speed
                ih = oh * STRIDE + (tap // 3 - 1)
                iw = ow * STRIDE + (tap % 3 - 1)
                valid = pmask & (ih >= 0) & (ih < H_IN) & (iw >= 0) & (iw < W_IN)
                m = valid[:, None] & cimask[None, :]
                if IN_MODE == 2:
                    off = ((b * HZ + 2 * ih) * WZ + 2 * iw) * CIN
                else:
                    off = ((b * HZ + ih) * WZ + iw) * CIN
                a = _act_load(z_in, off[:, None] + ci[None, :], m, scale[None, :], shift[None, :], WZ * CIN, CIN,
                              IN_MODE == 2)
                wt = tl.load(
                    w_task + co[None, :] * (CIN * 9) + ci[:, None] * 9 + tap,
                    mask=cimask[:, None] & comask[None, :], other=0.0,
                )
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + t * b_st + co, mask=comask, other=0.0)[None, :]
    tl.store(z_ptr + (t * B * hwo + p)[:, None] * COUT + co[None, :], acc, mask=pmask[:, None] & comask[None, :])
    if COLLECT_STATS:
        # Batch statistics: block-local two-pass moments, combined across blocks in fp64 (see kernels.fused.common).
        srow = pmask & (b < STAT_B)
        n = tl.sum(srow.to(tl.int32), axis=0)
        sm = srow[:, None] & comask[None, :]
        s1 = tl.sum(tl.where(sm, acc, 0.0), axis=0)
        d = tl.where(sm, acc - (s1 / tl.maximum(n, 1).to(tl.float32))[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        s1d = s1.to(tl.float64)
        q = m2.to(tl.float64) + s1d * s1d / tl.maximum(n, 1).to(tl.float64)
        amask = comask & ((co * 0 + n) > 0)  # (vector form: the interpreter rejects a broadcast scalar mask)
        tl.atomic_add(stat_ptr + t * 2 * COUT + co, s1d, mask=amask, sem="relaxed")
        tl.atomic_add(stat_ptr + t * 2 * COUT + COUT + co, q, mask=amask, sem="relaxed")


@dataclass(frozen=True)
class BNInput:
    """The batch norm + ReLU (+ pool) a kernel applies while loading a pre-BN activation z [T, B, H, W, C].

    stats: fp64 [T, 2, C] (sum, sum of squares) over `count` rows; gamma, beta: [C] (shared) or [T, C].
    """

    stats: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    count: int


def conv_out_size(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1


def fwd_blocks(rows: int, cin: int, cout: int, tasks: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CI, BLOCK_CO), powers of two >= 16: 64-row tiles (128 for the cheap first layer), never much
    taller than the layer; on a GPU the tiles shrink while the grid would leave SMs idle (few tasks)."""
    block_co = max(16, min(64, next_pow2(cout)))
    block_ci = max(16, min(64, next_pow2(cin)))
    if device.type != "cuda":
        return 256, block_ci, block_co  # the interpreter pays per program and per op, not per element
    block_p = min(128 if cin < 16 else 64, max(16, next_pow2(rows)))  # 20 rows in a 64-row tile waste 69%
    target = 2 * sm_count(device)
    while block_p > 16 and tasks * triton.cdiv(rows, block_p) * triton.cdiv(cout, block_co) < target:
        block_p //= 2
    while block_co > 16 and tasks * triton.cdiv(rows, block_p) * triton.cdiv(cout, block_co) < target:
        block_co //= 2
    return block_p, block_ci, block_co


def fwd_programs(pixels: int, cin: int, cout: int, tasks: int, device: torch.device) -> int:
    """Programs per task on grid axis 1 for `pixels` output rows (images x Ho x Wo); CUDA caps it at 65535."""
    return triton.cdiv(pixels, fwd_blocks(pixels, cin, cout, tasks, device)[0])


def conv_bn_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: int,
    in_bn: BNInput | None = None,
    pool_input: bool = False,
    stat_images: int | None = None,
    out: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    collect_stats: bool = True,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z = conv3x3(act(x), weight, padding 1, stride) + bias for every task, and z's batch statistics.

    x: raw input [T, B, Cin, H, W] when `in_bn` is None, else the previous layer's pre-BN output [T, B, H, W, Cin]
      on which relu(bn(.)) (then a 2x2 max-pool if `pool_input`) is applied while loading.
    weight [T or -, Cout, Cin, 3, 3], bias [T or -, Cout]: no task axis = one meta-initialization for all tasks.
    stat_images: statistics over the first `stat_images` images of each task (default all B).
    out: optional [T, B, Ho, Wo, Cout] buffer; stats: optional fp64 [T, 2, Cout] buffer, which must hold zeros
    (the kernel accumulates into it). collect_stats=False: z only (a predict that normalizes with statistics it
    already has); `stats` is then not read and None is returned for it. Returns (z [T, B, Ho, Wo, Cout], stats).
    """
    check_precision(precision)
    if stride not in (1, 2):
        raise ValueError(f"stride={stride}, expected 1 or 2")
    dev = x.device
    if in_bn is None:
        if pool_input:
            raise ValueError("pool_input=True needs in_bn: the pool applies to relu(bn(x)) of a previous layer")
        check_tensor(x, "x", (None, None, None, None, None), device=dev)
        tasks, batch, cin, h_in, w_in = x.shape
        hz, wz = h_in, w_in
        mode = 0
    else:
        check_tensor(x, "x", (None, None, None, None, None), device=dev)
        tasks, batch, hz, wz, cin = x.shape
        h_in, w_in = (hz // 2, wz // 2) if pool_input else (hz, wz)
        mode = 2 if pool_input else 1
        check_stats(in_bn.stats, "in_bn.stats", tasks, cin, dev)
        if task_stride(in_bn.gamma, "in_bn.gamma", tasks, (cin,), dev) != task_stride(
            in_bn.beta, "in_bn.beta", tasks, (cin,), dev
        ):
            raise ValueError("in_bn.gamma and in_bn.beta must both have the task axis or both lack it")
        if not 0 < in_bn.count:
            raise ValueError(f"in_bn.count={in_bn.count}, expected > 0 rows behind the statistics")
    if batch < 1 or h_in < 1 or w_in < 1:
        raise ValueError(f"x has shape {list(x.shape)}, expected at least one image of at least 1x1 pixels")
    cout = weight.shape[-4] if weight.dim() >= 4 else -1
    w_st = task_stride(weight, "weight", tasks, (cout, cin, 3, 3), dev)
    b_st = task_stride(bias, "bias", tasks, (cout,), dev)
    ho, wo = conv_out_size(h_in, stride), conv_out_size(w_in, stride)
    stat_images = batch if stat_images is None else stat_images
    if not 0 < stat_images <= batch:
        raise ValueError(f"stat_images={stat_images}, expected 1..{batch} (images per task)")
    if out is None:
        out = torch.empty(tasks, batch, ho, wo, cout, device=dev, dtype=torch.float32)
    check_tensor(out, "out", (tasks, batch, ho, wo, cout), device=dev)
    if not collect_stats:
        stats = None
    elif stats is None:
        stats = torch.zeros(tasks, 2, cout, device=dev, dtype=torch.float64)
    if stats is not None:
        check_stats(stats, "stats", tasks, cout, dev)
    block_p, block_ci, block_co = fwd_blocks(batch * ho * wo, cin, cout, tasks, dev)
    grid = (tasks, check_grid_dim(triton.cdiv(batch * ho * wo, block_p), "conv_bn_forward rows"),
            triton.cdiv(cout, block_co))
    dummy = out if stats is None and in_bn is None else (stats if stats is not None else in_bn.stats)
    _conv_fwd_kernel[grid](
        x,
        dummy if in_bn is None else in_bn.stats,
        dummy if in_bn is None else in_bn.gamma,
        dummy if in_bn is None else in_bn.beta,
        weight, bias, out, dummy if stats is None else stats,
        batch, h_in, w_in, hz, wz, ho, wo, stat_images,
        1 if in_bn is None else int(in_bn.count),
        0 if in_bn is None else (0 if in_bn.gamma.dim() == 1 else cin),
        w_st, b_st,
        CIN=cin, COUT=cout, STRIDE=stride, IN_MODE=mode, COLLECT_STATS=stats is not None,
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        PRECISION=precision, EPS=BN_EPS, num_warps=4,
    )
    return out, stats
