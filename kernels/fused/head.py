"""The classifier head for T tasks: last BN + ReLU + pooling, linear layer, softmax cross-entropy, its backward
into the last conv block, and the SGD update of the head, in one launch.

Features are built while loading the last conv's pre-BN output z [T, B, H, W, C]: relu(bn(z)) averaged over
H x W (conv4-omniglot) or 2x2 max-pooled and flattened in (c, h, w) order (conv4-miniimagenet), so they never
touch memory. In training mode one program holds all B support rows of a task (B <= 1024): logits, loss,
dlogits = (softmax - onehot) / K (loss = sum of cross-entropy / K as models.maml), the head gradients and the
SGD update, and dL/dfeatures pushed back through the pool / mean and the ReLU to the last conv's dy and its
batch-norm backward sums. Forward-only (predict) launches tile the rows and only write logits, plus the loss
and accuracy of the first LOSS_B rows when asked (the support rows, under the 'support' BN policy).

Reference: models.functional._forward_conv4 (head part) and models.maml.task_losses / task_accuracy.
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
    _bn_scale_shift,
    check_grid_dim,
    check_precision,
    check_stats,
    check_tensor,
    next_pow2,
    task_stride,
)
from kernels.fused.conv_forward import BNInput
from models.functional import BN_EPS

MAX_TRAIN_ROWS = 1024  # a training step holds all of a task's support rows in one program


@triton.jit
def _feature_index(f, H, W, C: tl.constexpr, POOL: tl.constexpr):
    """(channel, element offset inside one image) of flattened feature f (of the pool window's top-left)."""
    if POOL:
        wp = W // 2
        sp = (H // 2) * wp
        c = f // sp
        s = f % sp
        off = ((2 * (s // wp)) * W + 2 * (s % wp)) * C + c
    else:
        c = f
        off = f
    return c, off


@triton.jit
def _head_features(
    z_task, stat_task, gamma_task, beta_task, count, b, bmask, f, fmask, H, W,
    C: tl.constexpr, POOL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, EPS: tl.constexpr,
):
    """[BLOCK_B, BLOCK_F] features of rows b: pool-and-flatten, or the spatial mean, of relu(bn(z))."""
    c, off = _feature_index(f, H, W, C, POOL)
    scale, shift = _bn_scale_shift(*_bn_coeffs(stat_task, gamma_task, beta_task, c, fmask, count, C, EPS))
    m = bmask[:, None] & fmask[None, :]
    if POOL:
        feats = _act_load(z_task, (b * (H * W * C))[:, None] + off[None, :], m, scale[None, :], shift[None, :],
                          W * C, C, True)
    else:
        feats = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
        for s in range(H * W):
            feats += _act_load(z_task, ((b * (H * W) + s) * C)[:, None] + off[None, :], m, scale[None, :],
                               shift[None, :], W * C, C, False)
        feats = feats / (H * W)
    return feats


@triton.jit
def _head_features_backprop(
    dfeats, z_task, dy_task, bsum_task, stat_task, gamma_task, beta_task, count, b, bmask, f, fmask, H, W,
    C: tl.constexpr, POOL: tl.constexpr, BLOCK_F: tl.constexpr, EPS: tl.constexpr,
):
    """dL/dfeatures -> dy of the last conv (stored) and its batch-norm backward sums (accumulated)."""
    c, off = _feature_index(f, H, W, C, POOL)
    mean, rstd, g, be = _bn_coeffs(stat_task, gamma_task, beta_task, c, fmask, count, C, EPS)
    m = bmask[:, None] & fmask[None, :]
    if POOL:
        sdy, sdyx = _act_backprop(
            dfeats, z_task, dy_task, (b * (H * W * C))[:, None] + off[None, :], m, mean[None, :], rstd[None, :],
            g[None, :], be[None, :], W * C, C, True,
        )
        s1 = tl.sum(sdy, axis=0)
        s2 = tl.sum(sdyx, axis=0)
    else:
        da = dfeats / (H * W)
        s1 = tl.zeros([BLOCK_F], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_F], dtype=tl.float32)
        for s in range(H * W):
            sdy, sdyx = _act_backprop(
                da, z_task, dy_task, ((b * (H * W) + s) * C)[:, None] + off[None, :], m, mean[None, :],
                rstd[None, :], g[None, :], be[None, :], W * C, C, False,
            )
            s1 += tl.sum(sdy, axis=0)
            s2 += tl.sum(sdyx, axis=0)
    # Several features share a channel under POOL: the atomics also do that reduction.
    tl.atomic_add(bsum_task + c, s1.to(tl.float64), mask=fmask, sem="relaxed")
    tl.atomic_add(bsum_task + C + c, s2.to(tl.float64), mask=fmask, sem="relaxed")


@triton.jit
def _head_kernel(
    z_ptr,  # [T, B, H, W, C]: last conv's pre-BN output
    stat_ptr,  # fp64 [T, 2, C]: its (sum, sum sq) over `count` rows
    gamma_ptr, beta_ptr,  # [T or 1, C]: its BN affine, task stride gb_st
    hw_ptr, hb_ptr,  # [T or 1, WAYS, F], [T or 1, WAYS]: head, task strides hw_st / hb_st
    y_ptr,  # int64 [T, LOSS_B]: labels of the first LOSS_B rows (NEED_LOSS)
    logits_ptr,  # out [T, B, WAYS] (WRITE_LOGITS)
    loss_ptr, acc_ptr,  # out, accumulated fp32 [T]: sum CE / shots and accuracy of the LOSS_B rows (TRACK)
    dy_ptr,  # out [T, B, H, W, C]: dL/d(last BN output) (TRAIN and BACKPROP)
    bsum_ptr,  # out, accumulated fp64 [T, 2, C]: (sum dy, sum dy * xhat) (TRAIN and BACKPROP)
    hw_new_ptr, hb_new_ptr,  # out [T, WAYS, F], [T, WAYS]: head after one SGD step (TRAIN)
    lr_w_ptr, lr_b_ptr,  # Meta-SGD rates [WAYS, F], [WAYS] (LR_MODE 1); one fp32 device scalar each (LR_MODE 2)
    lr,  # scalar learning rate (LR_MODE 0)
    B, H, W, LOSS_B, count, gb_st, hw_st, hb_st,
    inv_shots,  # 1 / K: the inner loss is the sum of cross-entropy over the support set divided by the shots
    C: tl.constexpr, F: tl.constexpr, WAYS: tl.constexpr, POOL: tl.constexpr,
    NEED_LOSS: tl.constexpr, TRACK: tl.constexpr, TRAIN: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BACKPROP: tl.constexpr, LR_MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, WAYS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < B
    j = tl.arange(0, WAYS_PAD)
    jmask = j < WAYS
    z_task = z_ptr + t * B * H * W * C
    stat_task = stat_ptr + t * 2 * C
    gamma_task = gamma_ptr + t * gb_st
    beta_task = beta_ptr + t * gb_st
    hw_task = hw_ptr + t * hw_st
    logits = tl.zeros([BLOCK_B, WAYS_PAD], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        feats = _head_features(
            z_task, stat_task, gamma_task, beta_task, count, b, bmask, f, fmask, H, W, C, POOL, BLOCK_B, BLOCK_F, EPS
        )
        hwt = tl.load(hw_task + j[None, :] * F + f[:, None], mask=fmask[:, None] & jmask[None, :], other=0.0)
        logits = tl.dot(feats, hwt, logits, input_precision=PRECISION)
    logits += tl.load(hb_ptr + t * hb_st + j, mask=jmask, other=0.0)[None, :]
    if WRITE_LOGITS:
        tl.store(logits_ptr + (t * B + b)[:, None] * WAYS + j[None, :], logits, mask=bmask[:, None] & jmask[None, :])
    if NEED_LOSS:
        lmask = bmask & (b < LOSS_B)
        yv = tl.load(y_ptr + t * LOSS_B + b, mask=lmask, other=0).to(tl.int32)
        masked = tl.where(jmask[None, :], logits, float("-inf"))
        mx = tl.max(masked, axis=1)
        e = tl.exp(masked - mx[:, None])
        se = tl.sum(e, axis=1)
        onehot = j[None, :] == yv[:, None]
        ce = mx + tl.log(se) - tl.sum(tl.where(onehot, logits, 0.0), axis=1)
        if TRACK:
            pred = tl.min(tl.where(masked == mx[:, None], j[None, :], WAYS_PAD), axis=1)  # first max, as argmax
            tl.atomic_add(loss_ptr + t, tl.sum(tl.where(lmask, ce, 0.0), axis=0) * inv_shots, sem="relaxed")
            hits = tl.sum(tl.where(lmask & (pred == yv), 1.0, 0.0), axis=0)
            tl.atomic_add(acc_ptr + t, hits / LOSS_B, sem="relaxed")
        if TRAIN:
            dlog = tl.where(
                lmask[:, None] & jmask[None, :], (e / se[:, None] - onehot.to(tl.float32)) * inv_shots, 0.0
            )
            if LR_MODE == 1:
                lr_b = tl.load(lr_b_ptr + j, mask=jmask, other=0.0)
            elif LR_MODE == 2:
                lr_b = tl.load(lr_b_ptr)
            else:
                lr_b = lr
            hb_old = tl.load(hb_ptr + t * hb_st + j, mask=jmask, other=0.0)
            tl.store(hb_new_ptr + t * WAYS + j, hb_old - lr_b * tl.sum(dlog, axis=0), mask=jmask)
            for f0 in range(0, F, BLOCK_F):
                f = f0 + tl.arange(0, BLOCK_F)
                fmask = f < F
                feats = _head_features(
                    z_task, stat_task, gamma_task, beta_task, count, b, bmask, f, fmask, H, W, C, POOL, BLOCK_B,
                    BLOCK_F, EPS,
                )
                woff = j[:, None] * F + f[None, :]
                wmask = jmask[:, None] & fmask[None, :]
                hw_old = tl.load(hw_task + woff, mask=wmask, other=0.0)
                dw = tl.dot(tl.trans(dlog), feats, input_precision=PRECISION)
                if LR_MODE == 1:
                    lr_w = tl.load(lr_w_ptr + woff, mask=wmask, other=0.0)
                elif LR_MODE == 2:
                    lr_w = tl.load(lr_w_ptr)
                else:
                    lr_w = lr
                tl.store(hw_new_ptr + t * WAYS * F + woff, hw_old - lr_w * dw, mask=wmask)
                if BACKPROP:  # into the last conv block (not for ANIL: the body is not adapted)
                    dfeats = tl.dot(dlog, hw_old, input_precision=PRECISION)
                    _head_features_backprop(
                        dfeats, z_task, dy_ptr + t * B * H * W * C, bsum_ptr + t * 2 * C, stat_task, gamma_task,
                        beta_task, count, b, bmask, f, fmask, H, W, C, POOL, BLOCK_F, EPS,
                    )


@triton.jit
def _prototype_kernel(
    z_ptr,  # [T, B, H, W, C]: last conv's pre-BN output of the support rows
    stat_ptr, gamma_ptr, beta_ptr,  # its BN statistics and affine (as _head_kernel)
    y_ptr,  # int64 [T, B]: support labels
    hw_ptr, hb_ptr,  # out [T, WAYS, F], [T, WAYS]: the prototype head
    B, H, W, count, gb_st,
    C: tl.constexpr, F: tl.constexpr, WAYS: tl.constexpr, POOL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr, WAYS_PAD: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    """Proto-MAML's head of one task: class means mu_c of the support features, weight 2 mu_c, bias -|mu_c|^2."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    bmask = b < B
    j = tl.arange(0, WAYS_PAD)
    jmask = j < WAYS
    z_task = z_ptr + t * B * H * W * C
    stat_task = stat_ptr + t * 2 * C
    yv = tl.load(y_ptr + t * B + b, mask=bmask, other=-1).to(tl.int32)
    onehot = tl.where(yv[:, None] == j[None, :], 1.0, 0.0)  # [BLOCK_B, WAYS_PAD]; padded rows match no class
    counts = tl.maximum(tl.sum(onehot, axis=0), 1.0)  # a class without rows keeps mu = 0
    sq = tl.zeros([WAYS_PAD], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        feats = _head_features(
            z_task, stat_task, gamma_ptr + t * gb_st, beta_ptr + t * gb_st, count, b, bmask, f, fmask, H, W, C,
            POOL, BLOCK_B, BLOCK_F, EPS,
        )
        mu = tl.dot(tl.trans(onehot), feats, input_precision=PRECISION) / counts[:, None]  # [WAYS_PAD, BLOCK_F]
        sq += tl.sum(mu * mu, axis=1)
        tl.store(hw_ptr + t * WAYS * F + j[:, None] * F + f[None, :], 2.0 * mu, mask=jmask[:, None] & fmask[None, :])
    tl.store(hb_ptr + t * WAYS + j, -sq, mask=jmask)


def _check_head_input(z: torch.Tensor, bn: BNInput, pool: bool, precision: str) -> tuple[int, ...]:
    """What every head launcher checks of its input, the last conv's pre-BN output z [T, B, H, W, C] and its batch
    norm: (T, B, H, W, C, the task stride of gamma / beta)."""
    check_precision(precision)
    dev = z.device
    tasks, batch, h, w, c = check_tensor(z, "z", (None,) * 5, device=dev).shape
    check_stats(bn.stats, "bn.stats", tasks, c, dev)
    gb_st = task_stride(bn.gamma, "bn.gamma", tasks, (c,), dev)
    if task_stride(bn.beta, "bn.beta", tasks, (c,), dev) != gb_st:
        raise ValueError("bn.gamma and bn.beta must both have the task axis or both lack it")
    if pool and (h < 2 or w < 2):
        raise ValueError(f"z is {h}x{w}, expected at least 2x2 for the 2x2 max-pool")
    return tasks, batch, h, w, c, gb_st


def prototype_head(z: torch.Tensor, bn: BNInput, labels: torch.Tensor, ways: int, *, pool: bool,
                   out: dict[str, torch.Tensor] | None = None, precision: str = "ieee") -> dict[str, torch.Tensor]:
    """The head Proto-MAML starts from (models.maml.prototype_head), from the last conv's pre-BN output of the
    support rows z [T, B, H, W, C] (features built as the head kernel builds them) and labels int64 [T, B]:
    {'weight': [T, ways, F] = 2 mu, 'bias': [T, ways] = -|mu|^2}, written into `out` when given. One program per
    task holds all B <= 1024 support rows."""
    dev = z.device
    tasks, batch, h, w, c, gb_st = _check_head_input(z, bn, pool, precision)
    if batch > MAX_TRAIN_ROWS:
        raise ValueError(f"the prototypes hold a task's rows in one program: {batch} rows, expected <= "
                         f"{MAX_TRAIN_ROWS}")
    check_tensor(labels, "labels", (tasks, batch), dtype=torch.int64, device=dev)
    feats = head_features(c, h, w, pool)
    shapes = {"weight": (tasks, ways, feats), "bias": (tasks, ways)}
    out = {k: torch.empty(s, device=dev) for k, s in shapes.items()} if out is None else out
    for k, s in shapes.items():
        check_tensor(out.get(k), f"out[{k!r}]", s, device=dev)
    block_b, block_f = head_blocks(batch, feats, True)
    _prototype_kernel[(tasks,)](
        z, bn.stats, bn.gamma, bn.beta, labels, out["weight"], out["bias"], batch, h, w, int(bn.count), gb_st,
        C=c, F=feats, WAYS=ways, POOL=pool, BLOCK_B=block_b, BLOCK_F=block_f, WAYS_PAD=max(16, next_pow2(ways)),
        PRECISION=precision, EPS=BN_EPS, num_warps=4,
    )
    return out


@dataclass
class HeadResult:
    logits: torch.Tensor | None = None  # [T, B, ways]
    loss: torch.Tensor | None = None  # [T]
    accuracy: torch.Tensor | None = None  # [T]
    dy: torch.Tensor | None = None  # [T, B, H, W, C]
    bsum: torch.Tensor | None = None  # fp64 [T, 2, C]
    params: dict[str, torch.Tensor] | None = None  # {'weight': [T, ways, F], 'bias': [T, ways]}


def head_features(channels: int, h: int, w: int, pool: bool) -> int:
    return channels * (h // 2) * (w // 2) if pool else channels


def head_blocks(batch: int, feats: int, train: bool) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_F): training holds all of a task's rows in one program; predict tiles them by 64."""
    block_b = max(16, next_pow2(batch)) if train else max(16, min(64, next_pow2(batch)))
    return block_b, max(16, min(next_pow2(feats), 4096 // block_b))


def head_programs(batch: int, feats: int, train: bool) -> int:
    """Programs per task on grid axis 1 (CUDA caps it at 65535; see kernels.fused.program.max_rows_per_task)."""
    return triton.cdiv(batch, head_blocks(batch, feats, train)[0])


def head_step(
    z: torch.Tensor,
    bn: BNInput,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pool: bool,
    labels: torch.Tensor | None = None,
    shots: int = 1,
    loss_images: int | None = None,
    write_logits: bool = True,
    track: bool = False,
    train: bool = False,
    backprop: bool = True,
    lr: float | torch.Tensor | dict[str, torch.Tensor] | None = None,
    out: HeadResult | None = None,
    precision: str = "ieee",
) -> HeadResult:
    """Head forward (logits), optionally loss/accuracy of the first `loss_images` rows (track), optionally the
    backward + SGD step (train: all rows are labelled support rows), and with backprop the gradient into the last
    conv block (out.dy, out.bsum; train without backprop updates the head alone, as ANIL's inner loop).

    z: [T, B, H, W, C] last conv pre-BN output; bn: its statistics and affine; weight [T or -, ways, F];
    bias [T or -, ways]; labels int64 [T, loss_images]. lr: a float, a 0-dim float32 device tensor (read by the
    kernel, so one captured graph serves every value) or {'weight', 'bias'} Meta-SGD rates. `out` may hold
    preallocated outputs (loss, accuracy and bsum accumulate, so they must start at zero; with pool and an odd
    map, out.dy's last row / column is never written and must hold zeros). Returns the filled HeadResult.
    """
    dev = z.device
    tasks, batch, h, w, c, gb_st = _check_head_input(z, bn, pool, precision)
    feats = head_features(c, h, w, pool)
    ways = weight.shape[-2] if weight.dim() >= 2 else -1
    hw_st = task_stride(weight, "weight", tasks, (ways, feats), dev)
    hb_st = task_stride(bias, "bias", tasks, (ways,), dev)
    loss_images = batch if loss_images is None else loss_images
    need_loss = track or train
    if need_loss:
        if not 0 < loss_images <= batch:
            raise ValueError(f"loss_images={loss_images}, expected 1..{batch}")
        check_tensor(labels, "labels", (tasks, loss_images), dtype=torch.int64, device=dev)
    if train and loss_images != batch:
        raise ValueError(f"train needs every row labelled: loss_images={loss_images}, expected {batch}")
    if train and batch > MAX_TRAIN_ROWS:
        raise ValueError(f"train holds a task's rows in one program: {batch} rows, expected <= {MAX_TRAIN_ROWS}")
    if shots < 1:
        raise ValueError(f"shots={shots}, expected >= 1")
    out = out or HeadResult()
    if write_logits:
        out.logits = torch.empty(tasks, batch, ways, device=dev) if out.logits is None else out.logits
        check_tensor(out.logits, "out.logits", (tasks, batch, ways), device=dev)
    if track:
        for name in ("loss", "accuracy"):
            if getattr(out, name) is None:
                setattr(out, name, torch.zeros(tasks, device=dev))
            check_tensor(getattr(out, name), f"out.{name}", (tasks,), device=dev)
    lr_mode, lr_value, lrs = 0, 0.0, [bn.stats, bn.stats]
    backprop = train and backprop
    if backprop:
        if out.dy is None:  # zeros: with an odd map the pool never writes the last row / column (gradient 0)
            out.dy = torch.zeros_like(z)
        check_tensor(out.dy, "out.dy", tuple(z.shape), device=dev)
        if out.bsum is None:
            out.bsum = torch.zeros(tasks, 2, c, device=dev, dtype=torch.float64)
        check_stats(out.bsum, "out.bsum", tasks, c, dev)
    if train:
        shapes = {"weight": (ways, feats), "bias": (ways,)}
        if out.params is None:
            out.params = {k: torch.empty(tasks, *s, device=dev) for k, s in shapes.items()}
        for k, s in shapes.items():
            check_tensor(out.params.get(k), f"out.params[{k!r}]", (tasks, *s), device=dev)
        if isinstance(lr, dict):
            lr_mode = 1
            lrs = [check_tensor(lr.get(k), f"lr[{k!r}]", s, device=dev) for k, s in shapes.items()]
        elif isinstance(lr, torch.Tensor):  # a device scalar: a captured graph reads the value of each replay
            lr_mode = 2
            lrs = [check_tensor(lr, "lr", (), device=dev)] * 2
        elif lr is None:
            raise ValueError("train=True needs a learning rate")
        else:
            lr_value = float(lr)
    block_b, block_f = head_blocks(batch, feats, train)
    dummy = bn.stats
    grid = (tasks, check_grid_dim(triton.cdiv(batch, block_b), "head rows"))
    _head_kernel[grid](
        z, bn.stats, bn.gamma, bn.beta, weight, bias,
        labels if need_loss else dummy,
        out.logits if write_logits else dummy,
        out.loss if track else dummy, out.accuracy if track else dummy,
        out.dy if backprop else dummy, out.bsum if backprop else dummy,
        out.params["weight"] if train else dummy, out.params["bias"] if train else dummy,
        *lrs, lr_value,
        batch, h, w, loss_images, int(bn.count), gb_st, hw_st, hb_st, 1.0 / shots,
        C=c, F=feats, WAYS=ways, POOL=pool, NEED_LOSS=need_loss, TRACK=track, TRAIN=train,
        WRITE_LOGITS=write_logits, BACKPROP=backprop, LR_MODE=lr_mode, BLOCK_B=block_b, BLOCK_F=block_f,
        WAYS_PAD=max(16, next_pow2(ways)), PRECISION=precision, EPS=BN_EPS, num_warps=4,
    )
    return out
