"""Backward of one conv -> batch norm -> ReLU (-> pool) block for T tasks, with the SGD update fused in.

One launch per layer runs two kinds of programs side by side (a horizontal fusion: fewer launches per step):
- input-gradient programs: dz = BN-backward(dy) recomputed on the fly from (dy, z, statistics), then
  dx = conv_transpose(dz, W) (implicit GEMM with tl.dot over (tap, Cout) chunks); the epilogue pushes dx back
  through the previous layer's [max-pool,] ReLU to store that layer's dy and to accumulate its BN backward sums;
- weight-gradient programs: dW[tap] = act(x)[shifted rows]^T @ dz (tl.dot over rows), then W_new = W - lr * dW,
  and for (tap 0, first Cin block) also the BN gamma/beta: dgamma = sum(dy * xhat), dbeta = sum(dy). The conv
  bias is copied unchanged: a per-channel constant added before batch norm is removed again by BN's batch-mean
  subtraction, so the bias changes no output and its gradient sum(dz) is exactly zero. Autograd returns float
  rounding noise there (~1e-7 * sum|dz|; mini-ImageNet's 35,000 rows per channel make it ~1e-3); the kernel
  neither spends a reduction on it nor adds the noise to the weights.
Both kinds read the current parameters and write the next ones into another buffer (the caller ping-pongs), so
no program can see a half-updated weight. Layer 1 (raw input, Cin 1 or 3) only needs the weight gradient; its
M dimension is the 9*Cin taps padded to a power of two >= 16 (TAPS_PAD), a small price on a small GEMM.

Reference: autograd through models.functional._conv_bn_relu; BN backward in training mode (biased variance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused.common import (
    _act_backprop,
    _act_load,
    _bn_coeffs,
    _bn_grad_coeffs,
    _bn_scale_shift,
    check_grid_dim,
    check_precision,
    check_stats,
    check_tensor,
    next_pow2,
    sm_count,
    task_stride,
)
from kernels.fused.conv_forward import BNInput, conv_out_size
from models.functional import BN_EPS


@triton.jit
def _dz_tile(dy_ptr, z_ptr, off, m, mean, rstd, gscale, mdy, mdyx):
    """dL/dz of batch norm from dL/dy at element offsets `off`; 0 where `m` is false."""
    dy = tl.load(dy_ptr + off, mask=m, other=0.0)
    z = tl.load(z_ptr + off, mask=m, other=0.0)
    return tl.where(m, gscale * (dy - mdy - (z - mean) * rstd * mdyx), 0.0)


@triton.jit
def _dz_rows(r0, rows, hwo, WO, dy_task, z_task, co, comask, mean, rstd, gs, mdy, mdyx, COUT: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """Output rows r0 .. r0 + BLOCK_R of one task's `rows` (images x hwo positions): (row mask, image, output row,
    output column, dz tile [BLOCK_R, BLOCK_CO])."""
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < rows
    dz = _dz_tile(
        dy_task, z_task, r[:, None] * COUT + co[None, :], rmask[:, None] & comask[None, :],
        mean[None, :], rstd[None, :], gs[None, :], mdy[None, :], mdyx[None, :],
    )
    return rmask, r // hwo, (r % hwo) // WO, r % WO, dz


@triton.jit
def _dx_tap(acc, dy_task, z_task, w_task, b, oh, ow, valid, co, comask, ci, cimask, tap, mean, rstd, gs, mdy, mdyx,
            HO, WO, CIN: tl.constexpr, COUT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += dz[rows through `tap`] @ W[tap]^T for one Cout block."""
    m = valid[:, None] & comask[None, :]
    dz = _dz_tile(
        dy_task, z_task, (((b * HO + oh) * WO + ow) * COUT)[:, None] + co[None, :], m,
        mean[None, :], rstd[None, :], gs[None, :], mdy[None, :], mdyx[None, :],
    )
    wt = tl.load(w_task + co[:, None] * (CIN * 9) + ci[None, :] * 9 + tap, mask=comask[:, None] & cimask[None, :],
                 other=0.0)
    return tl.dot(dz, wt, acc, input_precision=PRECISION)


@triton.jit
def _conv_dx_program(
    pid_r, pid_c, t, dy_ptr, z_ptr, stat_ptr, bsum_ptr, gamma_ptr, gb_st, count, w_ptr, w_st,
    zin_ptr, in_stat_ptr, in_gamma_ptr, in_beta_ptr, in_gb_st, in_count, dyin_ptr, in_bsum_ptr,
    B, H_IN, W_IN, HZ, WZ, HO, WO, N_RB,
    CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, POOL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr,
):
    """Rows (b, ih, iw) of the conv input grid x channels ci: dx, then dy of the previous layer.

    Stride 2: rows are grouped by parity (ih % 2, iw % 2) = (ph, pw), N_RB row blocks per class; an input row of
    parity ph is reached only by the taps kh = 1 (ph 0) or kh in {0, 2} (ph 1), so each class runs 1, 2, 2 or 4
    taps instead of 9 mostly-masked ones (the masked version does 4x the useful work).
    """
    ci = pid_c * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < CIN
    dy_task = dy_ptr + t * B * HO * WO * COUT
    z_task = z_ptr + t * B * HO * WO * COUT
    w_task = w_ptr + t * w_st
    acc = tl.zeros([BLOCK_R, BLOCK_CI], dtype=tl.float32)
    if STRIDE == 2:
        cls = pid_r // N_RB
        ph = cls // 2
        pw = cls % 2
        hc = (H_IN + 1) // 2
        wc = (W_IN + 1) // 2
        r = (pid_r % N_RB) * BLOCK_R + tl.arange(0, BLOCK_R)
        b = r // (hc * wc)
        i = (r % (hc * wc)) // wc
        j = r % wc
        ih = 2 * i + ph
        iw = 2 * j + pw
        rmask = (r < B * hc * wc) & (ih < H_IN) & (iw < W_IN)
        for co0 in tl.static_range(0, COUT, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            comask = co < COUT
            mean, rstd, gs, mdy, mdyx = _bn_grad_coeffs(
                stat_ptr + t * 2 * COUT, bsum_ptr + t * 2 * COUT, gamma_ptr + t * gb_st, co, comask, count, COUT,
                EPS,
            )
            for uh in range(1 + ph):
                kh = (1 - ph) + 2 * uh * ph
                oh = (ih + 1 - kh) // 2  # >= 0 for these taps
                for uw in range(1 + pw):
                    kw = (1 - pw) + 2 * uw * pw
                    ow = (iw + 1 - kw) // 2
                    acc = _dx_tap(acc, dy_task, z_task, w_task, b, oh, ow, rmask & (oh < HO) & (ow < WO), co, comask,
                                  ci, cimask, kh * 3 + kw, mean, rstd, gs, mdy, mdyx, HO, WO, CIN, COUT, PRECISION)
    else:
        hwi = H_IN * W_IN
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < B * hwi
        b = r // hwi
        ih = (r % hwi) // W_IN
        iw = r % W_IN
        for co0 in tl.static_range(0, COUT, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            comask = co < COUT
            mean, rstd, gs, mdy, mdyx = _bn_grad_coeffs(
                stat_ptr + t * 2 * COUT, bsum_ptr + t * 2 * COUT, gamma_ptr + t * gb_st, co, comask, count, COUT,
                EPS,
            )
            for tap in range(9):  # a runtime loop: unrolling 9 dots multiplies compile time, not speed
                oh = ih + (1 - tap // 3)  # the output row that reads input row ih through this tap
                ow = iw + (1 - tap % 3)
                valid = rmask & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
                acc = _dx_tap(acc, dy_task, z_task, w_task, b, oh, ow, valid, co, comask, ci, cimask, tap, mean,
                              rstd, gs, mdy, mdyx, HO, WO, CIN, COUT, PRECISION)
    mean_i, rstd_i, g_i, be_i = _bn_coeffs(
        in_stat_ptr + t * 2 * CIN, in_gamma_ptr + t * in_gb_st, in_beta_ptr + t * in_gb_st, ci, cimask,
        in_count, CIN, EPS,
    )
    if POOL:
        off = ((b * HZ + 2 * ih) * WZ + 2 * iw) * CIN
    else:
        off = ((b * HZ + ih) * WZ + iw) * CIN
    task_off = t * B * HZ * WZ * CIN
    sdy, sdyx = _act_backprop(
        acc, zin_ptr + task_off, dyin_ptr + task_off, off[:, None] + ci[None, :],
        rmask[:, None] & cimask[None, :], mean_i[None, :], rstd_i[None, :], g_i[None, :], be_i[None, :],
        WZ * CIN, CIN, POOL,
    )
    tl.atomic_add(in_bsum_ptr + t * 2 * CIN + ci, tl.sum(sdy, axis=0).to(tl.float64), mask=cimask, sem="relaxed")
    tl.atomic_add(
        in_bsum_ptr + t * 2 * CIN + CIN + ci, tl.sum(sdyx, axis=0).to(tl.float64), mask=cimask, sem="relaxed"
    )


@triton.jit
def _sgd_bias_bn(
    t, co, comask, bsum_ptr, b_ptr, gamma_ptr, beta_ptr, b_st, gb_st, b_new_ptr, gamma_new_ptr, beta_new_ptr,
    lr_g_ptr, lr_be_ptr, lr, COUT: tl.constexpr, LR_MODE: tl.constexpr,
):
    """bias unchanged (its gradient is exactly 0, see the module docstring); gamma -= lr * sum(dy * xhat);
    beta -= lr * sum(dy)."""
    dgamma = tl.load(bsum_ptr + t * 2 * COUT + COUT + co, mask=comask, other=0.0).to(tl.float32)
    dbeta = tl.load(bsum_ptr + t * 2 * COUT + co, mask=comask, other=0.0).to(tl.float32)
    if LR_MODE == 1:
        lr_g = tl.load(lr_g_ptr + co, mask=comask, other=0.0)
        lr_be = tl.load(lr_be_ptr + co, mask=comask, other=0.0)
    elif LR_MODE == 2:
        lr_g = tl.load(lr_g_ptr)
        lr_be = lr_g
    else:
        lr_g = lr
        lr_be = lr
    old_b = tl.load(b_ptr + t * b_st + co, mask=comask, other=0.0)
    tl.store(b_new_ptr + t * COUT + co, old_b, mask=comask)
    old_g = tl.load(gamma_ptr + t * gb_st + co, mask=comask, other=0.0)
    tl.store(gamma_new_ptr + t * COUT + co, old_g - lr_g * dgamma, mask=comask)
    old_be = tl.load(beta_ptr + t * gb_st + co, mask=comask, other=0.0)
    tl.store(beta_new_ptr + t * COUT + co, old_be - lr_be * dbeta, mask=comask)


@triton.jit
def _conv_dw_program(
    pid_k, pid_c, t, x_ptr, in_stat_ptr, in_gamma_ptr, in_beta_ptr, in_gb_st, in_count,
    dy_ptr, z_ptr, stat_ptr, bsum_ptr, count,
    w_ptr, b_ptr, gamma_ptr, beta_ptr, w_st, b_st, gb_st,
    w_new_ptr, b_new_ptr, gamma_new_ptr, beta_new_ptr, lr_w_ptr, lr_g_ptr, lr_be_ptr, lr,
    B, H_IN, W_IN, HZ, WZ, HO, WO,
    CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, IN_MODE: tl.constexpr, LR_MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, TAPS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    """IN_MODE 0: all 9*CIN taps x a Cout block; else one tap (pid_k) x a (Cin block, Cout block) pair."""
    n_co: tl.constexpr = (COUT + BLOCK_CO - 1) // BLOCK_CO
    co = (pid_c % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    ci_blk = pid_c // n_co
    hwo = HO * WO
    dy_task = dy_ptr + t * B * hwo * COUT
    z_task = z_ptr + t * B * hwo * COUT
    mean, rstd, gs, mdy, mdyx = _bn_grad_coeffs(
        stat_ptr + t * 2 * COUT, bsum_ptr + t * 2 * COUT, gamma_ptr + t * gb_st, co, comask, count, COUT, EPS
    )
    if IN_MODE == 0:
        k = tl.arange(0, TAPS_PAD)  # flattened (ci, kh, kw), the weight's own order
        kmask = k < CIN * 9
        kci = k // 9
        kh = (k % 9) // 3
        kw = k % 3
        x_task = x_ptr + t * B * CIN * H_IN * W_IN
        acc = tl.zeros([TAPS_PAD, BLOCK_CO], dtype=tl.float32)
        for r0 in range(0, B * hwo, BLOCK_R):
            rmask, b, oh, ow, dz = _dz_rows(r0, B * hwo, hwo, WO, dy_task, z_task, co, comask, mean, rstd, gs, mdy,
                                            mdyx, COUT, BLOCK_R)
            ih = oh[:, None] * STRIDE + kh[None, :] - 1
            iw = ow[:, None] * STRIDE + kw[None, :] - 1
            valid = rmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H_IN) & (iw >= 0) & (iw < W_IN)
            patches = tl.load(
                x_task + ((b[:, None] * CIN + kci[None, :]) * H_IN + ih) * W_IN + iw, mask=valid, other=0.0
            )
            acc = tl.dot(tl.trans(patches), dz, acc, input_precision=PRECISION)
        woff = co[None, :] * (CIN * 9) + k[:, None]
        wmask = kmask[:, None] & comask[None, :]
        owns_bias = ci_blk == 0
    else:
        tap = pid_k
        kh = tap // 3
        kw = tap % 3
        ci = ci_blk * BLOCK_CI + tl.arange(0, BLOCK_CI)
        cimask = ci < CIN
        scale_i, shift_i = _bn_scale_shift(*_bn_coeffs(
            in_stat_ptr + t * 2 * CIN, in_gamma_ptr + t * in_gb_st, in_beta_ptr + t * in_gb_st, ci, cimask,
            in_count, CIN, EPS,
        ))
        zin_task = x_ptr + t * B * HZ * WZ * CIN
        acc = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=tl.float32)
        for r0 in range(0, B * hwo, BLOCK_R):
            rmask, b, oh, ow, dz = _dz_rows(r0, B * hwo, hwo, WO, dy_task, z_task, co, comask, mean, rstd, gs, mdy,
                                            mdyx, COUT, BLOCK_R)
            ih = oh * STRIDE + kh - 1
            iw = ow * STRIDE + kw - 1
            valid = rmask & (ih >= 0) & (ih < H_IN) & (iw >= 0) & (iw < W_IN)
            if IN_MODE == 2:
                off = ((b * HZ + 2 * ih) * WZ + 2 * iw) * CIN
            else:
                off = ((b * HZ + ih) * WZ + iw) * CIN
            a = _act_load(zin_task, off[:, None] + ci[None, :], valid[:, None] & cimask[None, :], scale_i[None, :],
                          shift_i[None, :], WZ * CIN, CIN, IN_MODE == 2)
            acc = tl.dot(tl.trans(a), dz, acc, input_precision=PRECISION)
        woff = co[None, :] * (CIN * 9) + ci[:, None] * 9 + tap
        wmask = cimask[:, None] & comask[None, :]
        owns_bias = (tap == 0) & (ci_blk == 0)
    if LR_MODE == 1:
        lr_w = tl.load(lr_w_ptr + woff, mask=wmask, other=0.0)
    elif LR_MODE == 2:
        lr_w = tl.load(lr_w_ptr)
    else:
        lr_w = lr
    old_w = tl.load(w_ptr + t * w_st + woff, mask=wmask, other=0.0)
    tl.store(w_new_ptr + t * (COUT * CIN * 9) + woff, old_w - lr_w * acc, mask=wmask)
    if owns_bias:
        _sgd_bias_bn(
            t, co, comask, bsum_ptr, b_ptr, gamma_ptr, beta_ptr, b_st, gb_st, b_new_ptr, gamma_new_ptr,
            beta_new_ptr, lr_g_ptr, lr_be_ptr, lr, COUT, LR_MODE,
        )


@triton.jit
def _conv_bwd_kernel(
    x_ptr,  # layer input: raw [T, B, CIN, H_IN, W_IN] (IN_MODE 0) or previous pre-BN output [T, B, HZ, WZ, CIN]
    in_stat_ptr, in_gamma_ptr, in_beta_ptr,  # previous BN: fp64 [T, 2, CIN], [T or 1, CIN] x2 (IN_MODE > 0)
    dy_ptr,  # [T, B, HO, WO, COUT]: dL/d(this layer's BN output)
    z_ptr,  # [T, B, HO, WO, COUT]: this layer's pre-BN output
    stat_ptr,  # fp64 [T, 2, COUT]: this layer's (sum, sum sq) over all rows
    bsum_ptr,  # fp64 [T, 2, COUT]: (sum dy, sum dy * xhat)
    w_ptr, b_ptr, gamma_ptr, beta_ptr,  # current [T or 1, COUT, CIN, 3, 3], [T or 1, COUT] x3
    w_new_ptr, b_new_ptr, gamma_new_ptr, beta_new_ptr,  # out: next [T, COUT, CIN, 3, 3], [T, COUT] x3
    lr_w_ptr, lr_g_ptr, lr_be_ptr,  # Meta-SGD rates shaped like one task's parameter (LR_MODE 1), or one fp32
    # device scalar each (LR_MODE 2); the conv bias's rate has nothing to scale (its gradient is exactly 0)
    dyin_ptr,  # out [T, B, HZ, WZ, CIN]: dL/d(previous BN output) (HAS_DX)
    in_bsum_ptr,  # out, accumulated: fp64 [T, 2, CIN] previous layer's backward sums (HAS_DX)
    lr,  # scalar learning rate (LR_MODE 0)
    B, H_IN, W_IN, HZ, WZ, HO, WO,
    count, in_count,  # rows behind stat_ptr / in_stat_ptr
    w_st, b_st, gb_st, in_gb_st,  # task strides of the current parameters (0 = shared meta-initialization)
    N_DX,  # programs on axis 1 that compute the input gradient; the rest compute weight gradients
    N_RB,  # row blocks of the input gradient (per parity class at stride 2)
    N_DX_C: tl.constexpr,  # Cin blocks of the input-gradient programs
    N_DW_C: tl.constexpr,  # (Cin block, Cout block) pairs of the weight-gradient programs
    CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, IN_MODE: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows of an input-gradient tile
    BLOCK_K: tl.constexpr,  # rows per reduction step of a weight-gradient program
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, TAPS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    if HAS_DX:
        if pid < N_DX:
            _conv_dx_program(
                pid // N_DX_C, pid % N_DX_C, t, dy_ptr, z_ptr, stat_ptr, bsum_ptr, gamma_ptr, gb_st, count, w_ptr,
                w_st, x_ptr, in_stat_ptr, in_gamma_ptr, in_beta_ptr, in_gb_st, in_count, dyin_ptr, in_bsum_ptr,
                B, H_IN, W_IN, HZ, WZ, HO, WO, N_RB, CIN, COUT, STRIDE, IN_MODE == 2, BLOCK_R, BLOCK_CI, BLOCK_CO,
                PRECISION, EPS,
            )
    if HAS_DW:
        if pid >= N_DX:
            q = pid - N_DX
            _conv_dw_program(
                q // N_DW_C, q % N_DW_C, t, x_ptr, in_stat_ptr, in_gamma_ptr, in_beta_ptr, in_gb_st, in_count,
                dy_ptr, z_ptr, stat_ptr, bsum_ptr, count, w_ptr, b_ptr, gamma_ptr, beta_ptr, w_st, b_st, gb_st,
                w_new_ptr, b_new_ptr, gamma_new_ptr, beta_new_ptr, lr_w_ptr, lr_g_ptr, lr_be_ptr, lr,
                B, H_IN, W_IN, HZ, WZ, HO, WO, CIN, COUT, STRIDE, IN_MODE, LR_MODE, BLOCK_K, BLOCK_CI, BLOCK_CO,
                TAPS_PAD, PRECISION, EPS,
            )


def bwd_blocks(rows_in: int, rows_out: int, cin: int, cout: int, tasks: int, device: torch.device,
               first_layer: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_CI, BLOCK_CO), powers of two >= 16.

    A launch lasts as long as its longest program, so when the grid cannot fill the GPU (few tasks) tiles shrink
    until it can: row tiles of the input gradient first, then the channel tiles that split the weight gradient.
    Layer 1's weight gradient has 16-wide tiles (9*Cin taps), so it takes longer row steps.
    """
    block_ci = max(16, min(64, next_pow2(cin)))
    block_co = max(16, min(64, next_pow2(cout)))
    if device.type != "cuda":
        return 256, 256, block_ci, block_co  # the interpreter pays per program and per op, not per element
    block_r = 64
    block_k = min(256 if first_layer else 64, max(16, next_pow2(rows_out)))  # no 64-row steps over 20 rows
    target = 2 * sm_count(device)
    while block_r > 16 and tasks * triton.cdiv(rows_in, block_r) * triton.cdiv(cin, block_ci) < target:
        block_r //= 2
    taps, ci_blocks = (1, 1) if first_layer else (9, triton.cdiv(cin, block_ci))
    while block_co > 16 and tasks * taps * ci_blocks * triton.cdiv(cout, block_co) < target:
        block_co //= 2
    while not first_layer and block_ci > 16 and \
            tasks * 9 * triton.cdiv(cin, block_ci) * triton.cdiv(cout, block_co) < target:
        block_ci //= 2
    return block_r, block_k, block_ci, block_co


@dataclass(frozen=True)
class BwdLayout:
    """Grid axis 1 of one backward launch: n_dx input-gradient programs (n_rb row blocks x n_dx_c Cin blocks, x4
    parity classes at stride 2), then the weight-gradient programs (taps x n_dw_c channel-block pairs)."""

    blocks: tuple[int, int, int, int]  # BLOCK_R, BLOCK_K, BLOCK_CI, BLOCK_CO
    n_dx: int
    n_rb: int
    n_dx_c: int
    n_dw_c: int
    programs: int


def bwd_layout(batch: int, h_in: int, w_in: int, ho: int, wo: int, cin: int, cout: int, stride: int,
               first_layer: bool, tasks: int, device: torch.device, input_grad: bool = True,
               weight_grad: bool = True) -> BwdLayout:
    blocks = bwd_blocks(batch * h_in * w_in, batch * ho * wo, cin, cout, tasks, device, first_layer=first_layer)
    block_r, _, block_ci, block_co = blocks
    n_dx_c = triton.cdiv(cin, block_ci)
    if stride == 2:  # 4 parity classes of ceil(H/2) x ceil(W/2) rows each (see _conv_dx_program)
        n_rb = triton.cdiv(batch * triton.cdiv(h_in, 2) * triton.cdiv(w_in, 2), block_r)
        n_dx = 4 * n_rb * n_dx_c if input_grad else 0
    else:
        n_rb = triton.cdiv(batch * h_in * w_in, block_r)
        n_dx = n_rb * n_dx_c if input_grad else 0
    n_dw_c = (1 if first_layer else n_dx_c) * triton.cdiv(cout, block_co)
    n_dw = (1 if first_layer else 9) * n_dw_c if weight_grad else 0
    return BwdLayout(blocks, n_dx, n_rb, n_dx_c, n_dw_c, n_dx + n_dw)


LR_KEYS = ("weight", "bias", "gamma", "beta")


def conv_bn_backward_sgd(
    x: torch.Tensor,
    dy: torch.Tensor,
    z: torch.Tensor,
    stats: torch.Tensor,
    bsum: torch.Tensor,
    params: dict[str, torch.Tensor],
    lr: float | torch.Tensor | dict[str, torch.Tensor],
    *,
    stride: int,
    in_bn: BNInput | None = None,
    pool_input: bool = False,
    input_grad: bool = True,
    weight_grad: bool = True,
    out_params: dict[str, torch.Tensor] | None = None,
    dy_in: torch.Tensor | None = None,
    in_bsum: torch.Tensor | None = None,
    precision: str = "ieee",
):
    """Backward of z = conv(act(x)) + b -> y = bn(z), and one SGD step on (weight, bias, gamma, beta).

    x: the layer input as conv_bn_forward took it (raw [T, B, Cin, H, W] when in_bn is None, else the previous
      pre-BN output [T, B, HZ, WZ, Cin]). dy: dL/dy [T, B, Ho, Wo, Cout]; z: pre-BN output, same shape.
    stats: fp64 [T, 2, Cout] forward (sum, sum sq) over all rows; bsum: fp64 [T, 2, Cout] (sum dy, sum dy*xhat).
    params: current 'weight' [T or -, Cout, Cin, 3, 3], 'bias', 'gamma', 'beta' [T or -, Cout].
    lr: a float, a 0-dim float32 device tensor (read by the kernel, so one captured graph serves every value), or
      per-element rates {'weight', 'bias', 'gamma', 'beta'} shaped like one task's parameters.
    input_grad: also compute dL/d(previous BN output) into dy_in [T, B, HZ, WZ, Cin] and accumulate the previous
      layer's backward sums into in_bsum (fp64 [T, 2, Cin], must start at zero); needs in_bn. With pool_input
      and an odd HZ or WZ, the last row / column of dy_in lies in no pool window and is never written: it must
      hold zeros (its gradient), as an allocated dy_in does.
    Returns (next params dict or None, dy_in or None, in_bsum or None).
    """
    check_precision(precision)
    if stride not in (1, 2):
        raise ValueError(f"stride={stride}, expected 1 or 2")
    if not (input_grad or weight_grad):
        raise ValueError("nothing to do: input_grad and weight_grad are both False")
    dev = dy.device
    check_tensor(x, "x", (None,) * 5, device=dev)
    check_tensor(dy, "dy", (None,) * 5, device=dev)
    tasks, batch, ho, wo, cout = dy.shape
    if in_bn is None:
        if input_grad or pool_input:
            raise ValueError("input_grad / pool_input need in_bn (the raw network input has no gradient here)")
        _, _, cin, h_in, w_in = check_tensor(x, "x", (tasks, batch, None, None, None), device=dev).shape
        hz, wz = h_in, w_in
        mode = 0
    else:
        _, _, hz, wz, cin = check_tensor(x, "x", (tasks, batch, None, None, None), device=dev).shape
        h_in, w_in = (hz // 2, wz // 2) if pool_input else (hz, wz)
        mode = 2 if pool_input else 1
        check_stats(in_bn.stats, "in_bn.stats", tasks, cin, dev)
        if task_stride(in_bn.gamma, "in_bn.gamma", tasks, (cin,), dev) != task_stride(
            in_bn.beta, "in_bn.beta", tasks, (cin,), dev
        ):
            raise ValueError("in_bn.gamma and in_bn.beta must both have the task axis or both lack it")
    if (conv_out_size(h_in, stride), conv_out_size(w_in, stride)) != (ho, wo):
        raise ValueError(
            f"dy has spatial size {ho}x{wo}, expected {conv_out_size(h_in, stride)}x{conv_out_size(w_in, stride)} "
            f"for a {h_in}x{w_in} input at stride {stride}"
        )
    check_tensor(z, "z", tuple(dy.shape), device=dev)
    check_stats(stats, "stats", tasks, cout, dev)
    check_stats(bsum, "bsum", tasks, cout, dev)
    w_st = task_stride(params["weight"], "params['weight']", tasks, (cout, cin, 3, 3), dev)
    b_st = task_stride(params["bias"], "params['bias']", tasks, (cout,), dev)
    gb_st = task_stride(params["gamma"], "params['gamma']", tasks, (cout,), dev)
    if task_stride(params["beta"], "params['beta']", tasks, (cout,), dev) != gb_st:
        raise ValueError("params['gamma'] and params['beta'] must both have the task axis or both lack it")
    shapes = {"weight": (cout, cin, 3, 3), "bias": (cout,), "gamma": (cout,), "beta": (cout,)}
    if isinstance(lr, dict):  # every rate is checked; the conv bias's is not read (its gradient is exactly 0)
        lr_mode, lr_value = 1, 0.0
        rates = {k: check_tensor(lr.get(k), f"lr[{k!r}]", shapes[k], device=dev) for k in LR_KEYS}
    elif isinstance(lr, torch.Tensor):
        lr_mode, lr_value = 2, 0.0
        rates = dict.fromkeys(LR_KEYS, check_tensor(lr, "lr", (), device=dev))
    else:
        lr_mode, lr_value = 0, float(lr)
        rates = dict.fromkeys(LR_KEYS, stats)
    if weight_grad:
        if out_params is None:
            out_params = {k: torch.empty(tasks, *shapes[k], device=dev) for k in LR_KEYS}
        for k in LR_KEYS:
            check_tensor(out_params.get(k), f"out_params[{k!r}]", (tasks, *shapes[k]), device=dev)
    if input_grad:
        if dy_in is None:
            dy_in = torch.zeros(tasks, batch, hz, wz, cin, device=dev)
        check_tensor(dy_in, "dy_in", (tasks, batch, hz, wz, cin), device=dev)
        if in_bsum is None:
            in_bsum = torch.zeros(tasks, 2, cin, device=dev, dtype=torch.float64)
        check_stats(in_bsum, "in_bsum", tasks, cin, dev)
    lay = bwd_layout(batch, h_in, w_in, ho, wo, cin, cout, stride, mode == 0, tasks, dev, input_grad, weight_grad)
    block_r, block_k, block_ci, block_co = lay.blocks
    n_dx, n_rb, n_dx_c, n_dw_c = lay.n_dx, lay.n_rb, lay.n_dx_c, lay.n_dw_c
    grid = (tasks, check_grid_dim(lay.programs, "conv_bn_backward_sgd programs"))
    new = out_params if weight_grad else {k: stats for k in LR_KEYS}
    prev = in_bn if in_bn is not None else BNInput(stats, stats, stats, 1)
    _conv_bwd_kernel[grid](
        x, prev.stats, prev.gamma, prev.beta, dy, z, stats, bsum,
        params["weight"], params["bias"], params["gamma"], params["beta"],
        new["weight"], new["bias"], new["gamma"], new["beta"], rates["weight"], rates["gamma"], rates["beta"],
        dy_in if input_grad else stats, in_bsum if input_grad else stats, lr_value,
        batch, h_in, w_in, hz, wz, ho, wo, batch * ho * wo, int(prev.count),
        w_st, b_st, gb_st, 0 if in_bn is None or in_bn.gamma.dim() == 1 else cin,
        n_dx, n_rb, N_DX_C=n_dx_c, N_DW_C=n_dw_c,
        CIN=cin, COUT=cout, STRIDE=stride, IN_MODE=mode, LR_MODE=lr_mode,
        HAS_DX=input_grad, HAS_DW=weight_grad,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        TAPS_PAD=max(16, next_pow2(9 * cin)), PRECISION=precision, EPS=BN_EPS, num_warps=4,
    )
    return (out_params if weight_grad else None), dy_in, in_bsum
