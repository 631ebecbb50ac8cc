"""Reference inner loop: K plain-SGD steps for all T tasks at once, with torch autograd.

Inner loss as cbfinn/maml: for classification the sum of per-example cross-entropy over the support set divided
by K (the shots), i.e. N x the mean cross-entropy, so the paper's inner learning rates mean what they meant there.
For regression, the mean squared error. Tasks are independent, so the gradient of the sum of the T task losses
gives every task its own gradient in one backward pass.

Batch norm normalizes the support forward of every inner step with the support batch's own statistics, except under
the `running` policy (MAML++'s per-step running statistics, `bn_running`): step s normalizes with entry
min(s, S - 1) of the checkpoint's statistics and predict with the last entry, the one of the final step (as MAML++
normalizes the target set after the last update with the statistics of that step).

MAML++'s per-step batch-norm weights (`step_bn`, {bn{i}.weight, bn{i}.bias} [S, C]: a learned gamma / beta for every
inner step, never adapted) work the same way: the support forward of step s uses row min(s, S - 1), and the fast
weights adapt returns hold the last row, so predict needs nothing besides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.functional import (
    HEAD_KEYS,
    batch_stats_record,
    bn_param_keys,
    body_features,
    forward,
    head_logits,
    param_shapes,
    running_at,
    step_row,
    support_stats,
)
from models.spec import ModelSpec


@dataclass
class AdaptResult:
    params: dict[str, torch.Tensor]  # fast weights, task-stacked [T, ...]
    support_loss: torch.Tensor | None = None  # [steps + 1, T]: before each step, and after the last
    support_accuracy: torch.Tensor | None = None  # [steps + 1, T] (classification only)
    trajectory: list[dict[str, torch.Tensor]] | None = None  # keep_trajectory: the fast weights after each step
    # The support set's per-layer batch-norm statistics under the adapted weights, {bn{i}.mean, bn{i}.var} [T, C],
    # when the BN policy normalizes queries with them (models.functional.support_stats; filled by the engine)
    stats: dict[str, torch.Tensor] | None = None


def task_losses(spec: ModelSpec, out: torch.Tensor, y: torch.Tensor, shots: int | None = None) -> torch.Tensor:
    """Per-task inner losses [T]. out: [T, B, ways]; y: [T, B] int64 labels (or [T, B, 1] float targets)."""
    if spec.is_regression:
        return ((out - y) ** 2).mean(dim=(1, 2))
    tasks, batch, ways = out.shape
    ce = F.cross_entropy(out.reshape(tasks * batch, ways), y.reshape(-1), reduction="none").view(tasks, batch)
    k = shots if shots is not None else max(1, batch // ways)
    return ce.sum(dim=1) / k


def task_accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=-1) == y).float().mean(dim=1)


def adapt(
    spec: ModelSpec,
    params: dict[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    lr: float | dict[str, torch.Tensor],
    *,
    second_order: bool = False,
    track: bool = False,
    adapt_keys: tuple[str, ...] | list[str] | None = None,
    step_lrs: dict[str, torch.Tensor] | None = None,
    keep_trajectory: bool = False,
    bn_running: dict[str, torch.Tensor] | None = None,
    record_stats: list | None = None,
    step_bn: dict[str, torch.Tensor] | None = None,
    head_init: str | None = None,
) -> AdaptResult:
    """K SGD steps from `params` on each task's support set, all T tasks in one batched call.

    params: a meta-initialization without task axis (broadcast to T) or task-stacked [T, ...].
    support_x: [T, N*K, *input_shape]; support_y: [T, N*K].
    lr: a float, a 0-dim tensor (kept on the device: CUDA-graph capture), or per-parameter tensors (Meta-SGD)
      shaped like the meta-initialization.
    second_order: keep the graph through the inner gradients (MAML); otherwise the inner gradients are constants
      (first-order MAML; and serving, where `params` need not require grad at all).
    track: also return the support loss and accuracy before every step and after the last.
    adapt_keys: the parameters the inner loop updates (None: all). The others stay at the meta-initialization (broadcast
      views, still carrying the meta-gradient). Only the head (`models.functional.HEAD_KEYS`): ANIL; the body's
      features of the support set are then computed once and only the linear head steps.
    step_lrs: LSLR (MAML++): per-parameter, per-step rates, `{name: tensor [S]}`; step i uses entry min(i, S - 1),
      so a model trained with S steps can be adapted for more. Parameters it does not name use `lr`.
    keep_trajectory: also return the fast weights after every step (the multi-step loss needs them).
    bn_running: the `running` policy: the checkpoint's per-step statistics {bn{i}.mean, bn{i}.var} [S, C]; step i
      normalizes with entry min(i, S - 1) instead of the support batch's statistics.
    record_stats: a list that receives, for every step, the support batch's statistics of that step's forward
      (`models.functional.batch_stats_record`: {bn{i}.mean, bn{i}.var} [T, C], unbiased variance, detached): what
      the running statistics are estimated from. Not with bn_running (those forwards use no batch statistics).
    step_bn: per-step batch-norm weights (MAML++), {bn{i}.weight, bn{i}.bias} [S, C]: the support forward of step i
      uses row min(i, S - 1) in place of the parameters' gamma / beta (the meta-gradient flows to the rows used),
      and the fast weights returned hold row S - 1, the final step's (also for 0 steps, and when fewer than S steps
      run: what the model predicts with after any number of steps). A trajectory entry after step i holds row
      min(i, S - 1), the step's own, as MAML++'s per-step target losses use it. Their keys must not be adapted.
    head_init: how the head starts (None: the spec's `head_init`). 'proto' (Proto-MAML): before the first step the
      head is replaced by the support set's class prototypes in the body's feature space (`prototype_head`, step 0's
      support features), differentiably, so the meta-gradient reaches the body through the prototypes too;
      'meta': from `params`' head (pass it to continue an adaptation one step at a time).
    """
    proto = (head_init or spec.head_init) == "proto"
    if (proto or adapt_keys is not None or step_lrs is not None or keep_trajectory or bn_running is not None
            or record_stats is not None or step_bn is not None):
        return _adapt_recipe(spec, params, support_x, support_y, steps, lr, second_order=second_order, track=track,
                             adapt_keys=adapt_keys, step_lrs=step_lrs, keep_trajectory=keep_trajectory,
                             bn_running=bn_running, record_stats=record_stats, step_bn=step_bn, proto=proto)
    tasks = support_x.shape[0]
    first = next(iter(params))
    needs_meta_grad = params[first].requires_grad
    if params[first].dim() == len(param_shapes(spec)[first]):  # a meta-initialization: broadcast to T tasks
        fast = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
    else:
        fast = dict(params)
    if not needs_meta_grad:
        fast = {k: v.detach().clone().requires_grad_(True) for k, v in fast.items()}
    shots = max(1, support_x.shape[1] // spec.ways)
    losses, accs = [], []
    with torch.enable_grad():
        for _ in range(steps):
            out = forward(spec, fast, support_x, double_backward=second_order)
            per_task = task_losses(spec, out, support_y, shots)
            if track:
                _record(spec, out.detach(), per_task.detach(), support_y, losses, accs)
            grads = torch.autograd.grad(per_task.sum(), list(fast.values()), create_graph=second_order)
            if not needs_meta_grad:
                # Serving: the fast weights are leaves this function owns, so update them in place, in one
                # multi-tensor op, and reuse them as the next step's leaves.
                with torch.no_grad():
                    weights = [w.detach() for w in fast.values()]
                    if isinstance(lr, dict):
                        torch._foreach_sub_(weights, torch._foreach_mul([lr[k] for k in fast], grads))
                    elif isinstance(lr, torch.Tensor):  # a device scalar (CUDA-graph backends): never read it back
                        torch._foreach_sub_(weights, torch._foreach_mul(grads, lr))
                    else:
                        torch._foreach_add_(weights, grads, alpha=-lr)
                fast = {k: w.requires_grad_(True) for k, w in zip(fast, weights)}
            elif isinstance(lr, dict):
                fast = {k: w - lr[k] * g for (k, w), g in zip(fast.items(), grads)}
            else:
                fast = {k: w - lr * g for (k, w), g in zip(fast.items(), grads)}
    if not needs_meta_grad:
        fast = {k: v.detach() for k, v in fast.items()}
    if steps == 0:  # broadcast views of the meta-initialization become per-task tensors (serving already cloned)
        fast = {k: v.contiguous() for k, v in fast.items()}
    result = AdaptResult(fast)
    if track:
        with torch.no_grad():
            out = forward(spec, fast, support_x)
            _record(spec, out, task_losses(spec, out, support_y, shots), support_y, losses, accs)
        _finish_tracking(result, losses, accs)
    return result


def _record(spec: ModelSpec, out, per_task, support_y, losses: list, accs: list) -> None:
    """Track one step: the per-task support loss and (classification) accuracy before the update."""
    losses.append(per_task)
    if not spec.is_regression:
        accs.append(task_accuracy(out, support_y))


def _finish_tracking(result: AdaptResult, losses: list, accs: list) -> None:
    result.support_loss = torch.stack(losses)  # [steps + 1, T]
    result.support_accuracy = torch.stack(accs) if accs else None


def _step_rates(keys, lr, step_lrs, step: int) -> list:
    """The rate of each adapted parameter at inner step `step`: a float, a 0-dim tensor or per-element tensors."""
    rates = []
    for k in keys:
        if step_lrs is not None and k in step_lrs:
            rates.append(step_lrs[k][min(step, step_lrs[k].shape[0] - 1)])
        elif isinstance(lr, dict):
            rates.append(lr[k])
        else:
            rates.append(lr)
    return rates


def _adapt_recipe(spec, params, support_x, support_y, steps, lr, *, second_order, track, adapt_keys, step_lrs,
                  keep_trajectory, bn_running=None, record_stats=None, step_bn=None, proto=False) -> AdaptResult:
    """adapt() with the recipe options: a subset of adapted parameters (ANIL), per-step rates (LSLR), trajectory,
    per-step running statistics (or recording the batch statistics they are estimated from), per-step batch-norm
    weights, a head started from the support prototypes."""
    shapes = param_shapes(spec)
    keys = list(shapes) if adapt_keys is None else list(adapt_keys)
    unknown = sorted(set(keys) - set(shapes))
    if unknown or not keys:
        raise ValueError(f"adapt_keys {keys!r} for model {spec.name}: expected a non-empty subset of {list(shapes)}")
    if step_lrs is not None:
        for k, v in step_lrs.items():
            if k not in shapes or v.dim() != 1 or v.shape[0] < 1:
                raise ValueError(f"step_lrs[{k!r}] has shape {list(v.shape)}, expected [steps] for a parameter "
                                 f"of {spec.name} ({list(shapes)})")
    if bn_running is not None and record_stats is not None:
        raise ValueError(f"adapt of model {spec.name}: record_stats records batch statistics, but bn_running "
                         "normalizes with stored ones; expected one of them")
    bn_steps = None if step_bn is None else _check_step_bn(spec, step_bn, keys)
    if not spec.has_batch_norm:
        bn_running = record_stats = None  # nothing to normalize (mlp-sinusoid)
    tasks = support_x.shape[0]
    first = next(iter(params))
    needs_meta_grad = params[first].requires_grad
    if params[first].dim() == len(shapes[first]):
        fast = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
    else:
        fast = dict(params)
    if not needs_meta_grad:
        fast = {k: v.detach().clone().requires_grad_(k in keys) for k, v in fast.items()}
    shots = max(1, support_x.shape[1] // spec.ways)
    head_only = set(keys) <= set(HEAD_KEYS)
    losses, accs, trajectory = [], [], []
    # ANIL: the body does not change in the inner loop, so its support features (and their batch statistics) are
    # computed once, once per distinct entry of the running statistics and row of the per-step BN weights.
    features: dict[tuple[int, int], tuple[torch.Tensor, list]] = {}
    row = 0  # the row of step_bn that fast's gamma / beta hold

    def with_row(weights: dict, r: int) -> dict:
        nonlocal row
        row = r
        return {**weights, **step_row(step_bn, r, tasks)}

    def support_features(step: int, record: list | None = None, double_backward: bool = False) -> torch.Tensor:
        stats = None if bn_running is None else running_at(bn_running, step, tasks)
        if not head_only:
            return body_features(spec, fast, support_x, double_backward=double_backward, stats=stats, record=record)
        key = (0 if bn_running is None else min(step, next(iter(bn_running.values())).shape[0] - 1), row)
        if key not in features:
            seen: list = []
            features[key] = (body_features(spec, fast, support_x, stats=stats,
                                           record=seen if record_stats is not None else None), seen)
        if record is not None:
            record.extend(features[key][1])
        return features[key][0]

    def support_forward(step: int, record: list | None = None, double_backward: bool = False) -> torch.Tensor:
        return head_logits(fast, support_features(step, record, double_backward))

    if proto:  # Proto-MAML: the head starts at the prototypes of step 0's support features
        if bn_steps is not None:
            fast = with_row(fast, 0)
        head = prototype_head(support_features(0), support_y, spec.ways)
        if not needs_meta_grad:
            head = {k: v.detach().requires_grad_(k in keys) for k, v in head.items()}
        fast = {**fast, **head}

    with torch.enable_grad():
        for step in range(steps):
            if bn_steps is not None:  # this step's gamma / beta: its forward and the trajectory entry after it
                fast = with_row(fast, min(step, bn_steps - 1))
            record = None if record_stats is None else []
            out = support_forward(step, record, second_order)
            if record is not None:
                record_stats.append(batch_stats_record(spec, record, support_x.shape[1]))
            per_task = task_losses(spec, out, support_y, shots)
            if track:
                _record(spec, out.detach(), per_task.detach(), support_y, losses, accs)
            grads = torch.autograd.grad(per_task.sum(), [fast[k] for k in keys], create_graph=second_order)
            rates = _step_rates(keys, lr, step_lrs, step)
            updated = {k: fast[k] - r * g for k, r, g in zip(keys, rates, grads)}
            if not needs_meta_grad:
                updated = {k: v.detach().requires_grad_(True) for k, v in updated.items()}
            fast = {**fast, **updated}
            if keep_trajectory:
                trajectory.append(fast)
    if bn_steps is not None:  # what the adaptation predicts with: the final step's row
        fast = with_row(fast, bn_steps - 1)
    if not needs_meta_grad:
        fast = {k: v.detach() for k, v in fast.items()}
        trajectory = [{k: v.detach() for k, v in t.items()} for t in trajectory]
    # Parameters that did not adapt (or no step at all) are broadcast views: give every task its own tensor.
    fast = {k: v if (k in keys and steps) else v.contiguous() for k, v in fast.items()}
    result = AdaptResult(fast, trajectory=trajectory if keep_trajectory else None)
    if track:
        with torch.no_grad():
            out = support_forward(steps)
            _record(spec, out, task_losses(spec, out, support_y, shots), support_y, losses, accs)
        _finish_tracking(result, losses, accs)
    return result


def prototype_head(features: torch.Tensor, support_y: torch.Tensor, ways: int) -> dict[str, torch.Tensor]:
    """Proto-MAML's head (Triantafillou et al. 2020) from support features [T, S, F] and labels [T, S]: the class
    means mu_c [T, N, F] give weight 2 mu_c and bias -|mu_c|^2, so logit_c(f) = -|f - mu_c|^2 + |f|^2, a Euclidean
    nearest-centroid classifier. A class without support rows gets mu_c = 0 (the server rejects such support sets)."""
    onehot = F.one_hot(support_y, ways).to(features.dtype)  # [T, S, N]
    counts = onehot.sum(1).clamp_min(1.0)  # [T, N]
    mu = torch.bmm(onehot.transpose(1, 2), features) / counts.unsqueeze(-1)
    return {"head.weight": 2.0 * mu, "head.bias": -(mu * mu).sum(-1)}


def _check_step_bn(spec: ModelSpec, step_bn: dict[str, torch.Tensor], keys: list[str]) -> int:
    """Per-step batch-norm weights: batch-norm gamma / beta names, [S, C] with one S >= 1 for all, none adapted.
    Returns S."""
    shapes, names = param_shapes(spec), bn_param_keys(spec)
    unknown = sorted(set(step_bn) - set(names))
    if unknown or not step_bn:
        raise ValueError(f"step_bn {sorted(step_bn)!r} for model {spec.name}: expected a non-empty subset of its "
                         f"batch-norm weights {list(names)}")
    adapted = sorted(set(step_bn) & set(keys))
    if adapted:
        raise ValueError(f"step_bn {adapted!r} for model {spec.name}: these are also adapted in the inner loop; "
                         "per-step batch-norm weights are meta-learned only, expected adapt_keys without them "
                         "(adapt_params no-bn or head)")
    counts = set()
    for k, v in step_bn.items():
        if v.dim() != 2 or v.shape[0] < 1 or v.shape[1] != shapes[k][0]:
            raise ValueError(f"step_bn[{k!r}] has shape {list(v.shape)}, expected [steps, {shapes[k][0]}] for "
                             f"model {spec.name}")
        counts.add(v.shape[0])
    if len(counts) > 1:
        raise ValueError(f"step_bn for model {spec.name} holds {sorted(counts)} steps, expected one step count for "
                         "all of its tensors")
    return counts.pop()


def predict(
    spec: ModelSpec,
    fast: dict[str, torch.Tensor],
    query_x: torch.Tensor,
    support_x: torch.Tensor | None = None,
    bn_policy: str | None = None,
    *,
    stats: dict[str, torch.Tensor] | None = None,
    bn_running: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Query logits [T, Q, ways] under the model's batch-norm policy (or `bn_policy` to override it).

    `support`: queries are normalized with the support set's statistics, so a query's logits do not depend on the
    other queries: given as `stats` (`adaptation_stats`, computed once at adapt time; serving) or computed here by
    forwarding the query rows behind `support_x` (training: differentiable through the statistics).
    `transductive`: the query batch's own statistics.
    `running`: the last entry (the final step's) of the checkpoint's per-step statistics `bn_running`
    ({bn{i}.mean, bn{i}.var} [S, C]); every query is normalized on its own, without support set or neighbours.
    """
    features, skip = predict_features(spec, fast, query_x, support_x, bn_policy, stats=stats, bn_running=bn_running)
    return head_logits(fast, features)[:, skip:]


def predict_features(
    spec: ModelSpec,
    fast: dict[str, torch.Tensor],
    query_x: torch.Tensor,
    support_x: torch.Tensor | None = None,
    bn_policy: str | None = None,
    *,
    stats: dict[str, torch.Tensor] | None = None,
    bn_running: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """What `predict` (the same arguments) applies the head to: the features [T, R, F] of the rows it forwards and
    how many leading rows are not queries (the support rows forwarded for their statistics), so that
    `predict(...) == head_logits(fast, features)[:, skip:]`. The features depend on the body alone: an adaptation
    that only moves the head (ANIL) predicts every step from one call of this."""
    if spec.uses_running_stats(bn_policy):
        if bn_running is None:
            raise ValueError(f"model {spec.name} uses bn_policy 'running': predict needs the checkpoint's per-step "
                             "running statistics (bn_running); expected MetaModel.bn_running")
        steps = next(iter(bn_running.values())).shape[0]
        return body_features(spec, fast, query_x, stats=running_at(bn_running, steps - 1, query_x.shape[0])), 0
    if spec.predict_needs_support_stats(bn_policy):
        if stats is not None:
            return body_features(spec, fast, query_x, stats=stats), 0
        if support_x is None:
            raise ValueError(f"model {spec.name} uses bn_policy 'support': predict needs the support statistics "
                             "(stats) or the support set")
        n = support_x.shape[1]
        return body_features(spec, fast, torch.cat([support_x, query_x], dim=1), stat_rows=n), n
    return body_features(spec, fast, query_x), 0


def adaptation_stats(spec: ModelSpec, fast: dict[str, torch.Tensor], support_x: torch.Tensor,
                     bn_policy: str | None = None) -> dict[str, torch.Tensor] | None:
    """What predict needs besides the fast weights: the support statistics under the adapted weights when the
    policy normalizes with them (None otherwise: `transductive`, and `running`, whose statistics are the
    checkpoint's, not the adaptation's). Computed once, without autograd."""
    if not spec.predict_needs_support_stats(bn_policy):
        return None
    with torch.no_grad():
        return support_stats(spec, fast, support_x)


__all__ = ["AdaptResult", "adapt", "adaptation_stats", "predict", "prototype_head", "task_losses", "task_accuracy"]
