"""Meta-learning algorithms: MAML (second order), first-order MAML and Meta-SGD, one batched call per meta-batch.

All tasks of a meta-batch go through the task-stacked reference inner loop (models.maml.adapt) at once; the outer
update is Adam. On CUDA the whole meta-iteration (inner steps, meta-gradient, clipping, all-reduce-free Adam with
`capturable=True`) is captured once in a CUDA graph and replayed: the sampler writes each new batch into the graph's
static input buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.functional import init_params
from models.maml import adapt, predict, task_accuracy, task_losses
from models.spec import ModelSpec
from trainer.config import TrainConfig


class MetaLearner:
    def __init__(self, cfg: TrainConfig, spec: ModelSpec, device: torch.device, generator: torch.Generator):
        self.cfg, self.spec, self.device = cfg, spec, device
        self.params = {k: v.to(device).requires_grad_(True) for k, v in init_params(spec, generator).items()}
        self.inner_lrs = None
        if cfg.algorithm == "metasgd":
            self.inner_lrs = {k: torch.full_like(v, cfg.inner_lr).requires_grad_(True) for k, v in self.params.items()}
        leaves = list(self.params.values()) + (list(self.inner_lrs.values()) if self.inner_lrs else [])
        capturable = device.type == "cuda" and cfg.cuda_graph
        self.optimizer = torch.optim.Adam(leaves, lr=cfg.meta_lr, capturable=capturable)
        self._graph = None
        self._static = None

    # ---- the math of one meta-iteration ----
    def meta_loss(self, support_x, support_y, query_x, query_y):
        """Mean query loss over the tasks after the inner loop, and the mean query accuracy (a 0-dim tensor)."""
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

    def _backward_and_update(self, batch, world: int):
        loss, acc = self.meta_loss(*batch)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
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
        return loss.detach(), acc

    def step(self, batch, world: int = 1):
        """One meta-update on batch = (support_x, support_y, query_x, query_y); returns (loss, accuracy) tensors."""
        use_graph = self.device.type == "cuda" and self.cfg.cuda_graph and world == 1
        if not use_graph:
            return self._backward_and_update(batch, world)
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
        }

    def load_state_dict(self, state: dict):
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            if self.inner_lrs is not None:
                for k, v in state["inner_lrs"].items():
                    self.inner_lrs[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self._graph = None  # Adam's state tensors were replaced: capture again
