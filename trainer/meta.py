"""Meta-learning algorithms: MAML (second order), first-order MAML and Meta-SGD, one batched call per meta-batch.

All tasks of a meta-batch go through the task-stacked reference inner loop (models.maml.adapt) at once; the outer
update is Adam. On CUDA the whole meta-iteration (inner steps, meta-gradient, clipping, all-reduce-free Adam with
`capturable=True`) is captured once in a CUDA graph and replayed: the sampler writes each new batch into the graph's
static input buffers.

With `bn_running` (MAML++ BNRS) the learner also keeps per-step batch-norm running statistics: every task's support
forward at inner step s updates entry s as torch batch norm updates its running mean / var (momentum 0.1: running =
0.9 running + 0.1 batch, the variance unbiased), tasks in meta-batch order, as MAML++'s per-task loop does. They are
estimated, not learned: the meta-loss still normalizes with batch statistics.

With `per_step_bn` (MAML++ BNWB) the batch-norm gamma / beta are leaves `step_bn` [inner_steps, C], one row per inner
step, learned by the outer loop (the inner loop never adapts them). The parameters' own bn{i}.weight / bias are then
no optimizer leaves (nothing reaches them); they mirror the last row after every update, so `params` alone predict
as the final step does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from models.functional import adapted_keys, bn_param_keys, init_params, stats_shapes
from models.maml import adapt, predict, task_accuracy, task_losses
from models.spec import ModelSpec
from models.views import support_views
from trainer.config import TrainConfig


class MetaLearner:
    def __init__(self, cfg: TrainConfig, spec: ModelSpec, device: torch.device, generator: torch.Generator):
        self.cfg, self.spec, self.device = cfg, spec, device
        self.params = {k: v.to(device).requires_grad_(True) for k, v in init_params(spec, generator).items()}
        self.inner_lrs = None
        if cfg.algorithm == "metasgd":
            self.inner_lrs = {k: torch.full_like(v, cfg.inner_lr).requires_grad_(True) for k, v in self.params.items()}
        self.adapt_keys = adapted_keys(spec, cfg.adapt_params) if cfg.adapt_params != "all" else None
        self.step_lrs = None
        if cfg.lslr:  # MAML++ LSLR: one rate per adapted parameter tensor and inner step, initialised at inner_lr
            keys = self.adapt_keys or tuple(self.params)
            self.step_lrs = {k: torch.full((cfg.inner_steps,), cfg.inner_lr, device=device).requires_grad_(True)
                             for k in keys}
        self.bn_running = None  # BNRS: {bn{i}.mean, bn{i}.var} [inner_steps, C], torch batch norm's initial 0 / 1
        self.bn_updates = 0  # tasks averaged into every step's entry so far
        self._recorded = None  # the last meta-loss's per-step support statistics, applied by the update
        if cfg.bn_running and spec.has_batch_norm:
            self.bn_running = {k: torch.full((cfg.inner_steps, c), 1.0 if k.endswith(".var") else 0.0, device=device)
                               for k, (c,) in stats_shapes(spec).items()}
        self.step_bn = None  # BNWB: {bn{i}.weight, bn{i}.bias} [inner_steps, C]
        if cfg.per_step_bn:
            if not spec.has_batch_norm:
                raise ValueError(f"per_step_bn for {spec.name}: per-step batch-norm weights, but {spec.arch} has no "
                                 "batch norm; expected per_step_bn=False")
            if cfg.adapt_params not in ("no-bn", "head"):
                raise ValueError(f"per_step_bn with adapt_params {cfg.adapt_params!r} for {spec.name}: the inner "
                                 "loop would adapt the batch-norm weights; expected adapt_params no-bn or head")
            if cfg.inner_steps < 1:
                raise ValueError(f"per_step_bn with inner_steps {cfg.inner_steps} for {spec.name}: a row per inner "
                                 "step, expected inner_steps >= 1")
            self.step_bn = {k: self.params[k].detach().unsqueeze(0).repeat(cfg.inner_steps, 1).requires_grad_(True)
                            for k in bn_param_keys(spec)}
            for k in self.step_bn:
                self.params[k].requires_grad_(False)
        leaves = [v for k, v in self.params.items() if self.step_bn is None or k not in self.step_bn]
        leaves += list(self.inner_lrs.values()) if self.inner_lrs else []
        leaves += list(self.step_lrs.values()) if self.step_lrs else []
        leaves += list(self.step_bn.values()) if self.step_bn else []
        capturable = device.type == "cuda" and cfg.cuda_graph
        self.optimizer = torch.optim.Adam(leaves, lr=cfg.meta_lr, capturable=capturable)
        self._graph = None
        self._static = None

    # ---- the math of one meta-iteration ----
    def meta_loss(self, support_x, support_y, query_x, query_y, iteration: int | None = None):
        """Mean query loss over the tasks after the inner loop, and the mean query accuracy (a 0-dim tensor).

        iteration: the 0-based meta-iteration, for the recipes' schedules (multi-step loss weights, derivative order).
        The inner loop adapts on the spec's support views (models.views), as the server does.
        """
        support_x, support_y = support_views(self.spec.support_views, support_x, support_y)
        if self.cfg.uses_recipe:
            return self._recipe_meta_loss(support_x, support_y, query_x, query_y, iteration or 0)
        lr = self.inner_lrs if self.inner_lrs is not None else self.cfg.inner_lr
        fast = adapt(self.spec, self.params, support_x, support_y, self.cfg.inner_steps, lr,
                     second_order=self.cfg.second_order).params
        out = predict(self.spec, fast, query_x, support_x, bn_policy=self.cfg.bn_policy)
        if self.spec.is_regression:
            losses = task_losses(self.spec, out, query_y)
            acc = torch.zeros((), device=out.device)
        else:
            # Outer loss: mean cross-entropy over all query examples (Adam makes the scale immaterial).
            losses = torch.nn.functional.cross_entropy(
                out.reshape(-1, self.spec.ways), query_y.reshape(-1), reduction="none").view(out.shape[:2]).mean(1)
            acc = task_accuracy(out.detach(), query_y).mean()
        return losses.mean(), acc

    def _query_loss(self, fast, support_x, query_x, query_y):
        out = predict(self.spec, fast, query_x, support_x, bn_policy=self.cfg.bn_policy)
        if self.spec.is_regression:
            return task_losses(self.spec, out, query_y).mean(), torch.zeros((), device=out.device)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, self.spec.ways), query_y.reshape(-1))
        return loss, task_accuracy(out.detach(), query_y).mean()

    def _recipe_meta_loss(self, support_x, support_y, query_x, query_y, iteration: int):
        cfg = self.cfg
        weights = msl_weights(cfg.inner_steps, iteration // cfg.epoch_iterations, cfg.msl_epochs)
        lr = self.inner_lrs if self.inner_lrs is not None else cfg.inner_lr
        record = [] if self.bn_running is not None else None
        res = adapt(self.spec, self.params, support_x, support_y, cfg.inner_steps, lr,
                    second_order=cfg.second_order_at(iteration), adapt_keys=self.adapt_keys, step_lrs=self.step_lrs,
                    keep_trajectory=weights is not None, record_stats=record, step_bn=self.step_bn)
        self._recorded = record
        if weights is None:
            return self._query_loss(res.params, support_x, query_x, query_y)
        # Multi-step loss: the query loss after every inner step, weighted (MAML++); accuracy after the last step.
        total = 0.0
        for w, fast in zip(weights, res.trajectory):
            loss, acc = self._query_loss(fast, support_x, query_x, query_y)
            total = total + w * loss
        return total, acc

    def _backward_and_update(self, batch, world: int, iteration: int | None = None):
        if self.cfg.cosine_lr and iteration is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(self.cfg.meta_lr, self.cfg.min_meta_lr, iteration, self.cfg.iterations,
                                        self.cfg.cosine_start)
        loss, acc = self.meta_loss(*batch, iteration=iteration) if self.cfg.uses_recipe else self.meta_loss(*batch)
        self._update_running(world)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        # (a head started at the prototypes, Proto-MAML, gets no gradient: grad None, skipped by Adam)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        if self.cfg.clip_grad > 0:
            for g in grads:
                g.clamp_(-self.cfg.clip_grad, self.cfg.clip_grad)
        self.optimizer.step()
        self.sync_bn_rows()
        return loss.detach(), acc

    def set_step_bn(self, source: dict[str, torch.Tensor]) -> None:
        """Per-step batch-norm weights from another model's step_bn ([S', C]): step s takes its row min(s, S' - 1),
        the row adapt would use (init_from a checkpoint trained with them)."""
        with torch.no_grad():
            for k, v in self.step_bn.items():
                rows = [min(s, source[k].shape[0] - 1) for s in range(v.shape[0])]
                v.copy_(source[k].to(v.device)[rows])
        self.sync_bn_rows()

    def reset_step_bn(self) -> None:
        """Every step's batch-norm weights from the parameters' own (after init_from a model without step_bn)."""
        with torch.no_grad():
            for k, v in self.step_bn.items():
                v.copy_(self.params[k].detach().unsqueeze(0).expand_as(v))

    def sync_bn_rows(self) -> None:
        """The parameters' bn{i}.weight / bias := the last row of step_bn: what a reader that ignores the per-step
        weights (and a checkpoint's `params`) predicts with, the final step's."""
        if self.step_bn is None:
            return
        with torch.no_grad():
            for k, v in self.step_bn.items():
                self.params[k].copy_(v[-1])

    def _update_running(self, world: int) -> None:
        """Fold the last meta-loss's per-step support statistics into the running averages: one torch-batch-norm
        update per task, in meta-batch order (ranks hold consecutive slices, so they gather them in rank order)."""
        recorded, self._recorded = self._recorded, None
        if not recorded or self.bn_running is None:
            return
        keys = list(self.bn_running)
        with torch.no_grad():
            flat = torch.cat([stats[k] for stats in recorded for k in keys], dim=1)  # [T_rank, steps * sum(C)]
            if world > 1:
                parts = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(parts, flat.contiguous())
                flat = torch.cat(parts)
            tasks, m = flat.shape[0], self.cfg.bn_momentum
            # (1 - m)^T r + sum_t m (1 - m)^(T - 1 - t) x_t: T sequential updates r <- (1 - m) r + m x_t in one step
            weights = m * (1 - m) ** torch.arange(tasks - 1, -1, -1, device=flat.device, dtype=flat.dtype)
            folded = (weights[:, None] * flat).sum(0)
            offset = 0
            for step in range(len(recorded)):
                for k in keys:
                    entry = self.bn_running[k][step]
                    entry.mul_((1 - m) ** tasks).add_(folded[offset: offset + entry.numel()])
                    offset += entry.numel()
        self.bn_updates += tasks

    def step(self, batch, world: int = 1, iteration: int | None = None):
        """One meta-update on batch = (support_x, support_y, query_x, query_y); returns (loss, accuracy) tensors.

        iteration: the 0-based meta-iteration (the recipes' schedules; a recipe run is never graph-captured, since
        its loss weights, derivative order and meta lr change with the iteration)."""
        use_graph = self.device.type == "cuda" and self.cfg.cuda_graph and world == 1 and not self.cfg.uses_recipe
        if not use_graph:
            return self._backward_and_update(batch, world, iteration)
        if self._graph is None:
            try:
                self._capture(batch)
            except RuntimeError as exc:  # keep training without the graph rather than lose the run
                print(f"warning: CUDA graph capture failed ({exc}); continuing without it")
                self.cfg.cuda_graph = False
                self._graph = None
                return self._backward_and_update(batch, world)
        for dst, src in zip(self._static, batch):
            dst.copy_(src, non_blocking=True)
        self._graph.replay()
        return self._static_out

    def _capture(self, batch):
        """Warm up on a side stream (the real first updates), then capture one whole meta-iteration."""
        self._static = [b.clone() for b in batch]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._backward_and_update(self._static, 1)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._backward_and_update(self._static, 1)

    # ---- state ----
    def state_dict(self) -> dict:
        return {
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "inner_lrs": None if self.inner_lrs is None else {k: v.detach().cpu() for k, v in self.inner_lrs.items()},
            "optimizer": self.optimizer.state_dict(),
            **({"step_lrs": {k: v.detach().cpu() for k, v in self.step_lrs.items()}} if self.step_lrs else {}),
            **({"bn_running": {k: v.cpu() for k, v in self.bn_running.items()}, "bn_updates": self.bn_updates}
               if self.bn_running is not None else {}),
            **({"step_bn": {k: v.detach().cpu() for k, v in self.step_bn.items()}} if self.step_bn else {}),
        }

    def load_state_dict(self, state: dict):
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            if self.inner_lrs is not None:
                for k, v in state["inner_lrs"].items():
                    self.inner_lrs[k].copy_(v)
            if self.step_lrs is not None:
                if "step_lrs" not in state:
                    raise ValueError(f"the training state has no LSLR rates, expected {sorted(self.step_lrs)} "
                                     "(was it saved by a run without --lslr?)")
                for k, v in state["step_lrs"].items():
                    self.step_lrs[k].copy_(v)
            if self.bn_running is not None:
                if "bn_running" not in state:
                    raise ValueError(f"the training state has no running statistics, expected "
                                     f"{sorted(self.bn_running)} (was it saved by a run without --bn_running true?)")
                for k, v in state["bn_running"].items():
                    self.bn_running[k].copy_(v)
                self.bn_updates = int(state.get("bn_updates", 0))
            if self.step_bn is not None:
                if "step_bn" not in state:
                    raise ValueError(f"the training state has no per-step batch-norm weights, expected "
                                     f"{sorted(self.step_bn)} (was it saved by a run without --per_step_bn true? "
                                     "Resume it with --per_step_bn false: the maml++ preset turns them on)")
                for k, v in state["step_bn"].items():
                    self.step_bn[k].copy_(v)
            elif "step_bn" in state:
                raise ValueError(f"the training state has per-step batch-norm weights {sorted(state['step_bn'])}, "
                                 "but this run has per_step_bn off; expected --per_step_bn true to resume it")
        self.optimizer.load_state_dict(state["optimizer"])
        self._graph = None  # Adam's state tensors were replaced: capture again


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float] | None:
    """MAML++ multi-step loss: per-step query-loss weights at `epoch`, or None once the anneal is over (then only the
    last step's loss counts, as plain MAML).

    As get_per_step_loss_importance_vector in AntreasAntoniou/HowToTrainYourMAMLPytorch: all weights start at 1/S;
    each non-final weight decays by 1/(S * msl_epochs) per epoch down to 0.03/S, the final one grows by (S - 1) times
    that, up to 1 - (S - 1) * 0.03/S. The weights always sum to 1.
    """
    if msl_epochs <= 0 or epoch >= msl_epochs:
        return None
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


def cosine_lr(start: float, end: float, iteration: int, iterations: int, first: int = 0) -> float:
    """The meta lr at `iteration`: `start` until iteration `first`, then a cosine down to `end` at `iterations`."""
    frac = min(max((iteration - first) / max(iterations - first, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))
