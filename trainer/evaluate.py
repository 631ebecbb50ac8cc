"""Meta-test evaluation, the paper's protocol, one function for every model.

600 tasks from the meta-test split; after every inner step 0..S the query accuracy (or MSE for regression) is
recorded under both batch-norm policies; mean and 95% confidence interval (1.96 std / sqrt(n)).
"""

from __future__ import annotations

import math

import torch

from models.functional import stack_params
from models.maml import adapt, predict
from models.spec import ModelSpec

POLICIES = ("transductive", "support")


def _query_metric(spec: ModelSpec, logits, query_y):
    if spec.is_regression:
        return ((logits - query_y) ** 2).mean(dim=(1, 2))
    return (logits.argmax(-1) == query_y).float().mean(1) * 100.0


def evaluate(spec: ModelSpec, params, sampler, tasks: int, steps: int, lr, chunk: int = 100,
             policies=POLICIES, adapt_keys=None, step_lrs=None) -> dict:
    """Per-step query accuracy (%) or MSE: {policy: {'mean': [...], 'ci95': [...]}, 'tasks': n, 'metric': ...}.

    params: the meta-initialization (no task axis); lr: float or Meta-SGD per-element rates.
    adapt_keys / step_lrs: the recipe's adapted parameters (ANIL: the head) and LSLR per-step rates, as
    models.maml.adapt takes them; step s uses rate s (the last learned one beyond the trained step count).
    The sampler must be seeded for evaluation so every model sees the same tasks.
    """
    if spec.is_regression:
        policies = ("transductive",)  # no batch norm: one number per step
    per_task = {p: [[] for _ in range(steps + 1)] for p in policies}
    params = {k: v.detach() for k, v in params.items()}
    if isinstance(lr, dict):
        lr = {k: v.detach() for k, v in lr.items()}
    if step_lrs is not None:
        step_lrs = {k: v.detach() for k, v in step_lrs.items()}
    recipe = adapt_keys is not None or step_lrs is not None
    done = 0
    while done < tasks:
        n = min(chunk, tasks - done)
        b = sampler.sample(n)
        fast = stack_params(params, n)
        for s in range(steps + 1):
            with torch.no_grad():
                for p in policies:
                    out = predict(spec, fast, b.query_x, b.support_x, bn_policy=p)
                    per_task[p][s].append(_query_metric(spec, out, b.query_y).cpu())
            if s < steps and not recipe:
                fast = adapt(spec, fast, b.support_x, b.support_y, 1, lr).params
            elif s < steps:
                rates = None if step_lrs is None else {k: v[min(s, v.shape[0] - 1)].reshape(1)
                                                       for k, v in step_lrs.items()}
                fast = adapt(spec, fast, b.support_x, b.support_y, 1, lr, adapt_keys=adapt_keys,
                             step_lrs=rates).params
        done += n
    result = {"tasks": tasks, "metric": "mse" if spec.is_regression else "accuracy_percent"}
    for p in policies:
        values = [torch.cat(v) for v in per_task[p]]
        result[p] = {
            "mean": [v.mean().item() for v in values],
            "ci95": [1.96 * v.std(unbiased=False).item() / math.sqrt(len(v)) for v in values],
        }
    return result


def results_markdown(name: str, result: dict, report_steps=(0, 1, 3, 5, 10)) -> str:
    unit = "MSE" if result["metric"] == "mse" else "accuracy %"
    policies = [p for p in POLICIES if p in result]
    lines = [f"### {name}: meta-test {unit}, {result['tasks']} tasks, 95% CI", "",
             "| inner steps | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    n_steps = len(result[policies[0]]["mean"])
    for s in report_steps:
        if s < n_steps:
            cells = [f"{result[p]['mean'][s]:.2f} ± {result[p]['ci95'][s]:.2f}" for p in policies]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
