"""Pieces shared by the fused MAML kernels: batch-norm math as Triton device functions, and host-side checks.

Layout conventions of every kernel in this package (why: channels contiguous so a tile of channels is one
coalesced load and a `tl.dot` operand, tasks on grid axis 0 so each task can carry its own weights):
- activations between layers are the *pre*-batch-norm conv outputs z, NHWC per task: [T, B, H, W, C] fp32;
  batch norm + ReLU (+ 2x2 max-pool) is applied by whichever kernel loads z next, so the normalized activation
  never makes a round trip through memory;
- batch-norm statistics are fp64 [T, 2, C]: (sum z, sum z^2) over the statistic rows, accumulated with atomics
  by the producing kernel from block-local two-pass moments (so E[z^2] - E[z]^2 does not cancel in fp32);
- backward batch-norm sums are fp64 [T, 2, C]: (sum dy, sum dy * xhat) where dy = dL/d(BN output);
- parameters keep the models.functional layout ([T, Cout, Cin, 3, 3] etc.); a parameter without the task axis
  is a meta-initialization shared by all tasks (task stride 0), which saves broadcasting it before step 0.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.engine.precision import PRECISIONS, check_precision  # noqa: F401  (re-exported)


@triton.jit
def _bn_coeffs(stat_ptr, gamma_ptr, beta_ptr, c, cmask, count, C: tl.constexpr, EPS: tl.constexpr):
    """(mean, rstd, gamma, beta) in fp32 at channel indices `c` (any shape).

    stat_ptr: this task's fp64 [2, C] (sum, sum of squares) over `count` rows; gamma_ptr, beta_ptr: this task's [C].
    """
    s1 = tl.load(stat_ptr + c, mask=cmask, other=0.0)
    s2 = tl.load(stat_ptr + C + c, mask=cmask, other=0.0)
    mean = s1 / count
    var = tl.maximum(s2 / count - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + EPS)
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0)
    beta = tl.load(beta_ptr + c, mask=cmask, other=0.0)
    return mean.to(tl.float32), rstd.to(tl.float32), gamma, beta


@triton.jit
def _bn_grad_coeffs(stat_ptr, bsum_ptr, gamma_ptr, c, cmask, count, C: tl.constexpr, EPS: tl.constexpr):
    """(mean, rstd, gamma*rstd, mean(dy), mean(dy*xhat)) in fp32 at channels `c`: what dL/dz needs.

    Batch norm in training mode (biased variance, statistics over all `count` rows):
    dz = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)). bsum_ptr: this task's fp64 [2, C].
    """
    s1 = tl.load(stat_ptr + c, mask=cmask, other=0.0)
    s2 = tl.load(stat_ptr + C + c, mask=cmask, other=0.0)
    mean = s1 / count
    var = tl.maximum(s2 / count - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + EPS)
    sdy = tl.load(bsum_ptr + c, mask=cmask, other=0.0) / count
    sdyx = tl.load(bsum_ptr + C + c, mask=cmask, other=0.0) / count
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0)
    gscale = gamma * rstd.to(tl.float32)
    return mean.to(tl.float32), rstd.to(tl.float32), gscale, sdy.to(tl.float32), sdyx.to(tl.float32)


@triton.jit
def _bn_relu(z, mean, rstd, gamma, beta):
    return tl.maximum((z - mean) * rstd * gamma + beta, 0.0)


@triton.jit
def _bn_scale_shift(mean, rstd, gamma, beta):
    """bn(z) = z * scale + shift: one FMA per element where a kernel only needs the normalized value (the folded
    loads run it ~2-9x per element, and on tensor cores that ALU work, not the dot, bounds the loop). Costs a few
    ulps of |mean * scale| against (z - mean) * rstd * gamma + beta; torch's CPU batch_norm uses this form too."""
    scale = rstd * gamma
    return scale, beta - mean * scale


@triton.jit
def _act_load(z_ptr, off, m, scale, shift, ROW_STEP, PIX_STEP, POOL: tl.constexpr):
    """relu(z * scale + shift) at element offsets `off` (2x2 max-pooled: `off` is the window's top-left, the window
    spans PIX_STEP to the right and ROW_STEP down); 0 where `m` is false, which is the conv's zero padding."""
    a = tl.load(z_ptr + off, mask=m, other=0.0) * scale + shift
    if POOL:
        a = tl.maximum(a, tl.load(z_ptr + off + PIX_STEP, mask=m, other=0.0) * scale + shift)
        a = tl.maximum(a, tl.load(z_ptr + off + ROW_STEP, mask=m, other=0.0) * scale + shift)
        a = tl.maximum(a, tl.load(z_ptr + off + ROW_STEP + PIX_STEP, mask=m, other=0.0) * scale + shift)
    return tl.where(m, tl.maximum(a, 0.0), 0.0)


@triton.jit
def _dy_store(da, z, mean, rstd, gamma, beta, dy_ptr, off, m):
    """dL/dy = da where y = bn(z) > 0 (ReLU backward as torch: gradient only where the output is positive)."""
    xhat = (z - mean) * rstd
    y = xhat * gamma + beta
    dy = tl.where(m & (y > 0), da, 0.0)
    tl.store(dy_ptr + off, dy, mask=m)
    return dy, dy * xhat


@triton.jit
def _act_backprop(da, z_ptr, dy_ptr, off, m, mean, rstd, gamma, beta, ROW_STEP, PIX_STEP, POOL: tl.constexpr):
    """Backward of `_act_load`: from da = dL/d(relu(bn(z))) [pooled], store dy = dL/d(bn(z)) at every (window)
    position of `off` and return the tiles (dy, dy * xhat) summed over the window, for the BN backward sums.

    Max-pool routes the gradient to the first maximum of the window in (0,0), (0,1), (1,0), (1,1) order, as
    torch's max_pool2d does; pool positions outside every window (odd sizes) are never written (stay zero).
    """
    if POOL:
        z0 = tl.load(z_ptr + off, mask=m, other=0.0)
        z1 = tl.load(z_ptr + off + PIX_STEP, mask=m, other=0.0)
        z2 = tl.load(z_ptr + off + ROW_STEP, mask=m, other=0.0)
        z3 = tl.load(z_ptr + off + ROW_STEP + PIX_STEP, mask=m, other=0.0)
        best = _bn_relu(z0, mean, rstd, gamma, beta)
        a1 = _bn_relu(z1, mean, rstd, gamma, beta)
        k = tl.where(a1 > best, 1, 0)
        best = tl.maximum(best, a1)
        a2 = _bn_relu(z2, mean, rstd, gamma, beta)
        k = tl.where(a2 > best, 2, k)
        best = tl.maximum(best, a2)
        a3 = _bn_relu(z3, mean, rstd, gamma, beta)
        k = tl.where(a3 > best, 3, k)
        dy0, dyx0 = _dy_store(tl.where(k == 0, da, 0.0), z0, mean, rstd, gamma, beta, dy_ptr, off, m)
        dy1, dyx1 = _dy_store(tl.where(k == 1, da, 0.0), z1, mean, rstd, gamma, beta, dy_ptr, off + PIX_STEP, m)
        dy2, dyx2 = _dy_store(tl.where(k == 2, da, 0.0), z2, mean, rstd, gamma, beta, dy_ptr, off + ROW_STEP, m)
        dy3, dyx3 = _dy_store(
            tl.where(k == 3, da, 0.0), z3, mean, rstd, gamma, beta, dy_ptr, off + ROW_STEP + PIX_STEP, m
        )
        sdy = dy0 + dy1 + dy2 + dy3
        sdyx = dyx0 + dyx1 + dyx2 + dyx3
    else:
        z = tl.load(z_ptr + off, mask=m, other=0.0)
        sdy, sdyx = _dy_store(da, z, mean, rstd, gamma, beta, dy_ptr, off, m)
    return sdy, sdyx


# ---------------------------------------------------------------------------------------------------- host side


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 on the CPU), cached: block-size heuristics ask per launch."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def kernels_interpreted() -> bool:
    """True when this package's kernels were decorated under TRITON_INTERPRET=1 (and so can run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_bn_relu, InterpretedFunction)


def check_tensor(t, name: str, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Shape (None = any size), dtype, contiguity and device of a launcher argument, with an error naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} is {type(t).__name__}, expected a torch.Tensor")
    if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {list(t.shape)}, expected [{want}]")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (strides {t.stride()}), expected a contiguous tensor")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other operands")
    return t


def task_stride(t, name: str, tasks: int, shape: tuple[int, ...], device=None) -> int:
    """A parameter is [*shape] (one meta-initialization for all tasks: stride 0) or [T, *shape] (stride numel)."""
    if isinstance(t, torch.Tensor) and t.dim() == len(shape):
        check_tensor(t, name, shape, device=device)
        return 0
    check_tensor(t, name, (tasks, *shape), device=device)
    return math.prod(shape)


def check_stats(t, name: str, tasks: int, channels: int, device=None) -> torch.Tensor:
    return check_tensor(t, name, (tasks, 2, channels), dtype=torch.float64, device=device)


def check_grid_dim(n: int, what: str) -> int:
    """CUDA caps grid axes 1 and 2 at 65535 blocks; say which size to reduce instead of failing in the driver."""
    if n > 65535:
        raise ValueError(f"{what} needs {n} blocks on grid axis 1, expected <= 65535: split the batch")
    return n
