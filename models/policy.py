"""Gaussian MLP policies (MAML-RL) as pure functions over parameter dicts, and their checkpoint format.

A policy maps observations to a diagonal Gaussian over actions: the mean is an MLP (the paper: 2 hidden layers of
100 ReLU units), the log standard deviation is one learned vector, independent of the state (cbfinn/maml_rl's
MAMLGaussianMLPPolicy, pytorch-maml-rl's NormalMLPPolicy). Parameters are a dict of tensors, either shared
(`fc0.weight` [H, obs_dim]) or task-stacked with a leading task axis T (`fc0.weight` [T, H, obs_dim]) so the inner
step of many tasks runs in one call, as the classifiers in `models.functional` do.

The checkpoint is its own small format (`fastadapt-policy`): `models.checkpoint` is keyed to `ModelSpec`'s
classifier/regressor architectures (ways, batch-norm policy, `models.functional.param_shapes`), and a policy has
none of those. The file holds a format name and version, the policy spec, the tensors and provenance, and is read
with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, atomic_save

POLICY_FORMAT = "fastadapt-policy"
POLICY_FORMAT_VERSION = 1


def _relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU as x * 1[x > 0]: the same values and derivatives as F.relu, but its second and third derivatives (MAML's
    meta-gradient and Fisher products differentiate through an inner gradient) are plain multiplications by a
    constant mask instead of `threshold_backward` chains (Fisher-vector product on the CPU: 0.64 -> 0.5 s)."""
    if not torch.is_grad_enabled():
        return F.relu(x)
    return x * (x > 0).to(x.dtype)


NONLINEARITIES = {"relu": _relu, "tanh": torch.tanh}
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild, adapt and serve a policy (its tensors aside).

    `inner_lr`, `discount`, `baseline`, `baseline_reg` and `normalize_advantages` are what an adaptation step needs
    (VPG with that baseline: models.policy_adapt.adapt_policy); `action_low` and `action_high` are the bounds the
    environment clips actions to (the policy's samples are not clipped). Checkpoints written before `baseline_reg`
    and `normalize_advantages` were recorded here were trained with their defaults (rllab's 1e-5, cbfinn's
    `center_adv`).

    `action_scale` s is the parameterization of rllab's `normalize` wrapper, which cbfinn/maml_rl's point
    environment runs under: the network's outputs are in units of s (mean = s * MLP(obs), std = s * exp(log_std)),
    so `init_std` and `min_std` are in those units too, while every action the policy emits, takes log-probabilities
    of, or reports (Predict's action_mean / action_log_std) is in the environment's own units. The VPG gradient with
    respect to the parameters is that of the normalized policy (log pi differs by the constant -act_dim * log s), so
    an inner step at lr alpha is the normalized policy's step at alpha. 1 (the default, and every checkpoint from
    before the field) is the identity.
    """

    name: str
    env: str
    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...] = (100, 100)
    nonlinearity: str = "relu"
    init_std: float = 1.0
    min_std: float = 1e-6
    inner_lr: float = 0.1
    steps: int = 1
    discount: float = 0.99
    baseline: str = "linear-feature"
    action_low: float = -math.inf
    action_high: float = math.inf
    baseline_reg: float = 1e-5
    normalize_advantages: bool = True
    action_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"policy spec {self.name!r}: nonlinearity {self.nonlinearity!r}, "
                             f"expected one of {sorted(NONLINEARITIES)}")
        if self.obs_dim < 1 or self.act_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"policy spec {self.name!r}: obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
                             f"hidden={self.hidden}, expected positive sizes")
        if not (self.init_std > 0 and self.min_std > 0):
            raise ValueError(f"policy spec {self.name!r}: init_std={self.init_std}, min_std={self.min_std}, "
                             "expected > 0")
        if not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise ValueError(f"policy spec {self.name!r}: action_scale={self.action_scale}, expected a finite "
                             "value > 0")

    @property
    def kind(self) -> str:
        return "policy"

    def predict_needs_support_stats(self, policy: str | None = None) -> bool:
        """A policy has no batch norm: an adaptation is its parameters alone (models.adaptation)."""
        return False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        return cls(**d)


def policy_param_shapes(spec: PolicySpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes (no task axis) of a policy's parameters, in forward order."""
    shapes: dict[str, tuple[int, ...]] = {}
    f_in = spec.obs_dim
    for i, f_out in enumerate(spec.hidden):
        shapes[f"fc{i}.weight"] = (f_out, f_in)
        shapes[f"fc{i}.bias"] = (f_out,)
        f_in = f_out
    shapes["head.weight"] = (spec.act_dim, f_in)
    shapes["head.bias"] = (spec.act_dim,)
    shapes["log_std"] = (spec.act_dim,)
    return shapes


def init_policy(spec: PolicySpec, generator: torch.Generator | None = None, dtype=torch.float32,
                device="cpu") -> dict[str, torch.Tensor]:
    """Xavier-uniform weights, zero biases, log-std log(init_std) (pytorch-maml-rl's `weight_init`; cbfinn's TF
    policy also uses Glorot-uniform weights and zero biases)."""
    params = {}
    for name, shape in policy_param_shapes(spec).items():
        if name.endswith(".weight"):
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))
            t = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        elif name == "log_std":
            t = torch.full(shape, math.log(spec.init_std))
        else:
            t = torch.zeros(shape)
        params[name] = t.to(device=device, dtype=dtype)
    return params


def stack_policy(params: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
    """Shared parameters broadcast to T tasks (an expanded view: autograd gives each task its own gradient)."""
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def is_stacked(spec: PolicySpec, params: dict[str, torch.Tensor]) -> bool:
    dims = params["head.weight"].dim()
    if dims not in (2, 3):
        raise ValueError(f"policy {spec.name}: head.weight has shape {list(params['head.weight'].shape)}, expected "
                         f"[act_dim, hidden] or [T, act_dim, hidden]")
    return dims == 3


def policy_forward(spec: PolicySpec, params: dict[str, torch.Tensor], obs: torch.Tensor):
    """The action distribution: (mean [..., act_dim], log_std broadcastable to mean).

    Shared params: obs [..., obs_dim], log_std [act_dim]. Task-stacked params: obs [T, ..., obs_dim] (task t uses
    parameters t), log_std [T, 1, ..., 1, act_dim]. log_std is clamped below at log(min_std), as both references.
    Both are in the environment's units: scaled by `spec.action_scale` when it is not 1.
    """
    mean, log_std = _forward(spec, params, obs)
    if spec.action_scale != 1.0:
        mean, log_std = mean * spec.action_scale, log_std + math.log(spec.action_scale)
    return mean, log_std


def _forward(spec: PolicySpec, params: dict[str, torch.Tensor], obs: torch.Tensor):
    if obs.shape[-1] != spec.obs_dim:
        raise ValueError(f"policy {spec.name}: observations have shape {list(obs.shape)}, expected [..., "
                         f"{spec.obs_dim}]")
    act = NONLINEARITIES[spec.nonlinearity]
    layers = [f"fc{i}" for i in range(len(spec.hidden))] + ["head"]
    min_log_std = math.log(spec.min_std)
    if not is_stacked(spec, params):
        h = obs
        for i, name in enumerate(layers):
            h = F.linear(h, params[f"{name}.weight"], params[f"{name}.bias"])
            h = act(h) if i < len(layers) - 1 else h
        return h, params["log_std"].clamp(min=min_log_std)
    tasks = params["head.weight"].shape[0]
    if obs.dim() < 2 or obs.shape[0] != tasks:
        raise ValueError(f"policy {spec.name}: observations have shape {list(obs.shape)}, expected [{tasks}, ..., "
                         f"{spec.obs_dim}] for parameters stacked over {tasks} tasks")
    lead = obs.shape[1:-1]
    h = obs.reshape(tasks, -1, spec.obs_dim)
    for i, name in enumerate(layers):
        h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
        h = act(h) if i < len(layers) - 1 else h
    log_std = params["log_std"].clamp(min=min_log_std).reshape(tasks, *([1] * len(lead)), spec.act_dim)
    return h.reshape(tasks, *lead, spec.act_dim), log_std


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the action dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the action dimension."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


# ---- checkpoint ----

@dataclass
class PolicyModel:
    """A meta-trained policy: spec + tensors (no task axis) + provenance (config, iterations, results)."""

    spec: PolicySpec
    params: dict[str, torch.Tensor]
    provenance: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    # The inner rate, resolved as MetaModel does: a client's override (0 / None = none) wins over the spec default.
    has_learned_lr = False

    def inner_lr(self, override: float | None = None) -> float:
        return float(override) if override else float(self.spec.inner_lr)

    def reported_lr(self, override: float | None = None) -> float:
        return self.inner_lr(override)


def save_policy(path: str | os.PathLike, model: PolicyModel) -> Path:
    """Write atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": POLICY_FORMAT, "format_version": POLICY_FORMAT_VERSION, "spec": model.spec.to_dict(),
               "params": {k: v.detach().cpu().to(torch.float32).contiguous() for k, v in model.params.items()},
               "provenance": model.provenance}
    return atomic_save(payload, path)


def load_policy(path: str | os.PathLike, device="cpu") -> PolicyModel:
    """Load and validate a policy checkpoint; every defect is a `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such policy checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt / unsafe pickles raise many types
        raise CheckpointError(f"{path}: not a readable policy checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != POLICY_FORMAT:
        raise CheckpointError(f"{path}: not a fastadapt policy checkpoint (missing format tag {POLICY_FORMAT!r})")
    if payload.get("format_version") != POLICY_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {payload.get('format_version')!r}, expected "
                              f"{POLICY_FORMAT_VERSION}")
    try:
        spec = PolicySpec.from_dict(payload["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid policy spec: {exc}") from exc
    params = payload.get("params")
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: 'params' is {type(params).__name__}, expected a dict of tensors")
    expected = policy_param_shapes(spec)
    if set(params) != set(expected):
        raise CheckpointError(f"{path}: params do not fit policy {spec.hidden} {spec.obs_dim}->{spec.act_dim}: "
                              f"missing {sorted(set(expected) - set(params))}, "
                              f"unexpected {sorted(set(params) - set(expected))}")
    for name, shape in expected.items():
        t = params[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: params.{name} is {got}, expected {list(shape)} torch.float32")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: params.{name} holds NaN or Inf values")
    return PolicyModel(spec, {k: v.to(device) for k, v in params.items()}, payload.get("provenance") or {})
