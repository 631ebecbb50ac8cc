"""The checkpoint format: one file holding a format version, the model spec, tensors and provenance.

Loaded with `torch.load(..., weights_only=True)`: a checkpoint can never run code. Every way a file can be wrong
(missing, truncated, not a checkpoint, another format version, tensors that do not fit the spec, non-finite values,
another architecture than the caller expects) is refused with a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.functional import bn_param_keys, param_shapes, stats_shapes
from models.spec import ModelSpec

FORMAT = "fastadapt-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or not what the caller expected."""


@dataclass
class MetaModel:
    """A meta-initialization: spec + tensors (no task axis) + optional Meta-SGD learning rates + provenance."""

    spec: ModelSpec
    params: dict[str, torch.Tensor]
    inner_lrs: dict[str, torch.Tensor] | None = None  # Meta-SGD: one learned inner lr per parameter element
    provenance: dict = field(default_factory=dict)
    # LSLR (MAML++): one learned inner lr per adapted parameter and inner step, {name: tensor [steps]}; None: not used
    step_lrs: dict[str, torch.Tensor] | None = None
    # BNRS (MAML++): per-layer, per-step batch-norm running statistics, {bn{i}.mean, bn{i}.var: tensor [S, C]}, S the
    # inner steps they were estimated for (provenance["bn_running"] says how); what the `running` policy normalizes
    # with. None: not estimated.
    bn_running: dict[str, torch.Tensor] | None = None
    # BNWB (MAML++): per-step batch-norm weights, {bn{i}.weight, bn{i}.bias: tensor [S, C]}, meta-learned, never
    # adapted; inner step s uses row min(s, S - 1). `params`' own bn{i}.weight / bias hold row S - 1, so whatever
    # ignores this field predicts as the final step does. None: one gamma / beta for all steps.
    step_bn: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        if self.spec.uses_running_stats() and self.bn_running is None:
            raise ValueError(f"model {self.spec.name} has bn_policy 'running' but no running statistics (bn_running); "
                             "expected them estimated (python -m trainer.bn_running, or training with --bn_running "
                             "true) or another bn_policy")
        if self.step_bn is not None and self.spec.adapt_params == "all":
            raise ValueError(f"model {self.spec.name} has per-step batch-norm weights (step_bn) but adapt_params "
                             "'all' adapts the batch-norm weights in the inner loop; expected adapt_params no-bn or "
                             "head")

    @property
    def bn_steps(self) -> int | None:
        """S, the inner steps with their own batch-norm weights (None: the model has no step_bn)."""
        return None if not self.step_bn else int(next(iter(self.step_bn.values())).shape[0])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running_steps(self) -> int | None:
        """S, the inner steps the running statistics were estimated for (None: the model has none)."""
        return None if not self.bn_running else int(next(iter(self.bn_running.values())).shape[0])

    def to(self, device) -> MetaModel:
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return MetaModel(self.spec, move(self.params), move(self.inner_lrs), self.provenance, move(self.step_lrs),
                         move(self.bn_running), move(self.step_bn))

    # Learning-rate resolution, the one place it happens: an override (a client's inner_lr; 0 / None = none) wins,
    # then the checkpoint's learned rates (Meta-SGD per element, or LSLR per layer and step), then the spec default.
    @property
    def has_learned_lr(self) -> bool:
        return self.inner_lrs is not None or self.step_lrs is not None

    def inner_lr(self, override: float | None = None):
        """The inner learning rate to adapt with: a float override, the learned Meta-SGD rates, or the default
        (LSLR models: the default for parameters without per-step rates; see `step_rates`)."""
        if override:
            return float(override)
        return self.inner_lrs if self.inner_lrs is not None else self.spec.inner_lr

    def step_rates(self, override: float | None = None) -> dict[str, torch.Tensor] | None:
        """LSLR's learned per-step rates, unless the client overrides the rate."""
        return None if override else self.step_lrs

    def reported_lr(self, override: float | None = None) -> float:
        """The rate a response reports: the override, 0.0 for learned rates, or the default."""
        if override:
            return float(override)
        return 0.0 if self.has_learned_lr else float(self.spec.inner_lr)


def save_checkpoint(path: str | os.PathLike, model: MetaModel) -> Path:
    """Write atomically (temporary file + rename) so a crash never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "params": {k: v.detach().cpu().contiguous() for k, v in model.params.items()},
        "inner_lrs": None if model.inner_lrs is None else {k: v.detach().cpu() for k, v in model.inner_lrs.items()},
        "provenance": model.provenance,
    }
    if model.step_lrs is not None:  # only written when used, so files without it stay readable by older code
        payload["step_lrs"] = {k: v.detach().cpu().contiguous() for k, v in model.step_lrs.items()}
    if model.bn_running is not None:  # likewise optional
        payload["bn_running"] = {k: v.detach().cpu().contiguous() for k, v in model.bn_running.items()}
    if model.step_bn is not None:  # likewise optional
        payload["step_bn"] = {k: v.detach().cpu().contiguous() for k, v in model.step_bn.items()}
    return atomic_save(payload, path)


def atomic_save(payload: dict, path: Path) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_tensors(path, spec: ModelSpec, tensors, what: str):
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: '{what}' is {type(tensors).__name__}, expected a dict of tensors")
    expected = param_shapes(spec)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: '{what}' does not fit architecture {spec.arch} with {spec.ways} ways: "
            f"missing {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: '{what}.{name}' has shape {got}, expected {list(shape)} for {spec.arch}")
        if t.dtype != torch.float32:
            raise CheckpointError(f"{path}: '{what}.{name}' has dtype {t.dtype}, expected torch.float32")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: '{what}.{name}' holds NaN or Inf values")


def _check_step_lrs(path, spec: ModelSpec, step_lrs):
    shapes = param_shapes(spec)
    if not isinstance(step_lrs, dict) or not step_lrs:
        raise CheckpointError(f"{path}: 'step_lrs' is {type(step_lrs).__name__}, expected a non-empty dict of tensors")
    for name, t in step_lrs.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: 'step_lrs.{name}' names no parameter of {spec.arch}; expected one of "
                                  f"{list(shapes)}")
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.float32:
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: 'step_lrs.{name}' is {got}, expected a float32 tensor [steps]")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: 'step_lrs.{name}' holds NaN or Inf values")


def _check_bn_running(path, spec: ModelSpec, running):
    """{bn{i}.mean, bn{i}.var}: float32 [S, C] for every batch-norm layer, one S >= 1 for all, finite, var >= 0."""
    expected = stats_shapes(spec)
    if not expected:
        raise CheckpointError(f"{path}: 'bn_running' is given, but {spec.arch} has no batch norm; expected none")
    if not isinstance(running, dict):
        raise CheckpointError(f"{path}: 'bn_running' is {type(running).__name__}, expected a dict of tensors")
    missing, extra = sorted(set(expected) - set(running)), sorted(set(running) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: 'bn_running' does not fit {spec.arch}: missing {missing}, unexpected "
                              f"{extra[:8]}")
    steps = None
    for name, (channels,) in expected.items():
        t = running[name]
        if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != channels
                or t.dtype != torch.float32):
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: 'bn_running.{name}' is {got}, expected a float32 tensor [steps, "
                                  f"{channels}]")
        if steps is not None and t.shape[0] != steps:
            raise CheckpointError(f"{path}: 'bn_running.{name}' holds {t.shape[0]} steps, the other layers {steps}; "
                                  "expected one step count for all")
        steps = t.shape[0]
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: 'bn_running.{name}' holds NaN or Inf values")
        if name.endswith(".var") and (t < 0).any():
            raise CheckpointError(f"{path}: 'bn_running.{name}' holds a negative variance ({t.min().item():.3g}), "
                                  "expected >= 0")


def _check_step_bn(path, spec: ModelSpec, step_bn):
    """{bn{i}.weight, bn{i}.bias}: float32 [S, C] for every batch-norm layer, one S >= 1 for all, finite; a recipe
    that keeps them out of the inner loop (adapt_params no-bn or head)."""
    shapes = param_shapes(spec)
    expected = bn_param_keys(spec)
    if not expected:
        raise CheckpointError(f"{path}: 'step_bn' is given, but {spec.arch} has no batch norm; expected none")
    if spec.adapt_params == "all":
        raise CheckpointError(f"{path}: 'step_bn' is given, but adapt_params 'all' adapts the batch-norm weights in "
                              "the inner loop; expected adapt_params no-bn or head")
    if not isinstance(step_bn, dict):
        raise CheckpointError(f"{path}: 'step_bn' is {type(step_bn).__name__}, expected a dict of tensors")
    missing, extra = sorted(set(expected) - set(step_bn)), sorted(set(step_bn) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: 'step_bn' does not fit {spec.arch}: missing {missing}, unexpected "
                              f"{extra[:8]}")
    steps = None
    for name in expected:
        t, (channels,) = step_bn[name], shapes[name]
        if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != channels
                or t.dtype != torch.float32):
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: 'step_bn.{name}' is {got}, expected a float32 tensor [steps, "
                                  f"{channels}]")
        if steps is not None and t.shape[0] != steps:
            raise CheckpointError(f"{path}: 'step_bn.{name}' holds {t.shape[0]} steps, the other tensors {steps}; "
                                  "expected one step count for all")
        steps = t.shape[0]
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: 'step_bn.{name}' holds NaN or Inf values")


def load_checkpoint(path: str | os.PathLike, *, expect_arch: str | None = None, device="cpu") -> MetaModel:
    """Load and validate a checkpoint; `expect_arch` refuses a file of another architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / corrupt / unsafe pickles
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastadapt checkpoint (missing format tag {FORMAT!r})")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    try:
        spec = ModelSpec.from_dict(payload["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model spec: {exc}") from exc
    if expect_arch is not None and spec.arch != expect_arch:
        raise CheckpointError(f"{path}: architecture {spec.arch!r}, expected {expect_arch!r}")
    _check_tensors(path, spec, payload.get("params"), "params")
    inner_lrs = payload.get("inner_lrs")
    if inner_lrs is not None:
        _check_tensors(path, spec, inner_lrs, "inner_lrs")
    step_lrs = payload.get("step_lrs")
    if step_lrs is not None:
        _check_step_lrs(path, spec, step_lrs)
    bn_running = payload.get("bn_running")
    if bn_running is not None:
        _check_bn_running(path, spec, bn_running)
    elif spec.uses_running_stats():
        raise CheckpointError(f"{path}: bn_policy 'running' but no 'bn_running' statistics; expected them estimated "
                              "(python -m trainer.bn_running) or another bn_policy")
    step_bn = payload.get("step_bn")
    if step_bn is not None:
        _check_step_bn(path, spec, step_bn)
    model = MetaModel(spec, payload["params"], inner_lrs, payload.get("provenance") or {}, step_lrs, bn_running,
                      step_bn)
    return model.to(device)
