"""Model kinds and loading any bundled model file by its format tag.

- classifier: a `fastadapt-checkpoint` of a classification architecture (Omniglot, mini-ImageNet): support images
  and integer labels in, logits out.
- regressor: a `fastadapt-checkpoint` of a regression architecture (`mlp-sinusoid`): float inputs and float targets
  in, float outputs out (inner loss MSE, models.maml).
- policy: a `fastadapt-policy` file (models.policy): trajectories in (one VPG step, models.policy_adapt), a diagonal
  Gaussian over actions out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.checkpoint import FORMAT, CheckpointError, MetaModel, load_checkpoint
from models.policy import POLICY_FORMAT, PolicyModel, load_policy, policy_param_shapes

KINDS = ("classifier", "regressor", "policy")


def model_kind(model) -> str:
    """'classifier', 'regressor' or 'policy' for a loaded model (MetaModel or PolicyModel)."""
    if isinstance(model, PolicyModel):
        return "policy"
    if isinstance(model, MetaModel):
        return "regressor" if model.spec.is_regression else "classifier"
    raise TypeError(f"{type(model).__name__} is not a model, expected a MetaModel or a PolicyModel")


def file_format(path: str | os.PathLike) -> str | None:
    """The format tag of a model file, or None when it is unreadable or has none."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  any damage: the loader of the default format names it
        return None
    return payload.get("format") if isinstance(payload, dict) else None


def load_model(path: str | os.PathLike, device="cpu") -> MetaModel | PolicyModel:
    """A model file of either format, validated by its own loader; every defect is a CheckpointError naming the
    file (a file that is neither format is reported by the checkpoint loader)."""
    tag = file_format(path)
    if tag == POLICY_FORMAT:
        return load_policy(path, device=device)
    if tag not in (FORMAT, None):
        raise CheckpointError(f"{path}: format tag {tag!r}, expected {FORMAT!r} or {POLICY_FORMAT!r}")
    return load_checkpoint(path, device=device)


def num_parameters(model) -> int:
    if isinstance(model, PolicyModel):
        return sum(int(torch.Size(s).numel()) for s in policy_param_shapes(model.spec).values())
    from models.functional import num_params

    return num_params(model.spec)


__all__ = ["KINDS", "file_format", "load_model", "model_kind", "num_parameters"]
