"""Discounted returns, the linear feature baseline fitted per task, and the advantages the policy gradient uses.

The implementation lives in models.policy_adapt (rllab's `LinearFeatureBaseline` as cbfinn/maml_rl and
pytorch-maml-rl use it; see there), so the server's inner step and the trainer's are one code path.
"""

from __future__ import annotations

from models.policy_adapt import REG_TRIES, advantages, baseline_features, discounted_returns, fit_linear_baseline

__all__ = ["REG_TRIES", "advantages", "baseline_features", "discounted_returns", "fit_linear_baseline"]
