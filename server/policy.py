"""Policy models (MAML-RL) as a service: validate trajectories and observations, and the worker thread's batch work.

Adapt takes one task's trajectories, collected with the policy being adapted, and runs the inner step the trainer
runs (models.policy_adapt.adapt_policy: discounted returns, the linear feature baseline fitted per task, advantages,
one VPG step); Predict maps observations to the Gaussian over actions (models.policy.policy_forward). No model math
here: this module converts wire arrays into task-stacked tensors, calls models, and splits the results per task.

Batches: concurrent Adapt requests of one model with the same trajectory shape [B, H] and rate run as one call, each
task from its own starting policy (the meta-initialization or an earlier adaptation); Predict requests with the
same number of observations run as one forward.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from models.policy import PolicyModel, policy_forward
from models.policy_adapt import Trajectories, adapt_policy
from server import validation
from server.runner import AdaptOutcome, finite_per_task
from server.status import InvalidArgument
from server.wire import encode, pb

MAX_TRAJECTORIES = 1000  # B per request
MAX_HORIZON = 10_000  # H per request
MAX_TRAJECTORY_STEPS = 200_000  # B x H per request: the cost cap (every padded step is forwarded and backwarded)
OPS = ("policy-adapt", "policy-act")


# ---- validation (event loop, numpy only) ----------------------------------------------------------------------

def _float32(message, field: str, path: str, expected: str) -> np.ndarray:
    array = validation.tensor(message, field, path, f"a FLOAT32 Tensor {expected}")
    if array.dtype != np.float32:
        raise InvalidArgument(f"{path}.dtype is {pb.DType.Name(getattr(message, field).dtype)}, expected FLOAT32 "
                              f"{expected}")
    return array


def _non_finite(array: np.ndarray, valid: np.ndarray, path: str, what: str) -> None:
    """Refuse NaN / Inf where `valid` (broadcastable to array) marks entries that count, naming the first."""
    bad = ~np.isfinite(array) & valid
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(f"{path} holds {int(bad.sum())} non-finite values (NaN or Inf) within the "
                              f"trajectories' lengths, the first at {list(index)} = {array[index]}; expected finite "
                              f"{what}")


def trajectories(request, path: str, model: PolicyModel) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`request.trajectories` as (observations, actions, rewards, lengths), zero past each trajectory's length."""
    spec, field = model.spec, f"{path}trajectories"
    if not request.HasField("trajectories"):
        raise InvalidArgument(f"{field} is missing, expected Trajectories (observations [B, H, {spec.obs_dim}], "
                              f"actions [B, H, {spec.act_dim}], rewards [B, H], lengths) for policy model "
                              f"{model.name}")
    message = request.trajectories
    obs = _float32(message, "observations", f"{field}.observations", f"[B, H, {spec.obs_dim}]")
    if obs.ndim != 3 or obs.shape[2] != spec.obs_dim:
        raise InvalidArgument(f"{field}.observations has shape {list(obs.shape)}, expected [B, H, {spec.obs_dim}] "
                              f"(obs_dim {spec.obs_dim}) for policy model {model.name}")
    b, h = obs.shape[:2]
    if not 1 <= b <= MAX_TRAJECTORIES or not 1 <= h <= MAX_HORIZON or b * h > MAX_TRAJECTORY_STEPS:
        raise InvalidArgument(f"{field}.observations has B = {b} trajectories of H = {h} steps, expected B in [1, "
                              f"{MAX_TRAJECTORIES}], H in [1, {MAX_HORIZON}] and B x H at most "
                              f"{MAX_TRAJECTORY_STEPS}")
    actions = _float32(message, "actions", f"{field}.actions", f"[{b}, {h}, {spec.act_dim}]")
    if actions.shape != (b, h, spec.act_dim):
        raise InvalidArgument(f"{field}.actions has shape {list(actions.shape)}, expected [{b}, {h}, {spec.act_dim}] "
                              f"(B and H of {field}.observations, act_dim {spec.act_dim})")
    rewards = _float32(message, "rewards", f"{field}.rewards", f"[{b}, {h}]")
    if rewards.shape != (b, h):
        raise InvalidArgument(f"{field}.rewards has shape {list(rewards.shape)}, expected [{b}, {h}] (B and H of "
                              f"{field}.observations)")
    lengths = np.asarray(message.lengths, dtype=np.int64)
    if lengths.shape[0] != b:
        raise InvalidArgument(f"{field}.lengths has {lengths.shape[0]} values, expected {b} (one per trajectory)")
    outside = np.flatnonzero((lengths < 1) | (lengths > h))
    if outside.size:
        i = int(outside[0])
        raise InvalidArgument(f"{field}.lengths[{i}] = {lengths[i]}, expected a length in [1, {h}] (H)")
    valid = np.arange(h)[None, :] < lengths[:, None]  # [B, H]
    _non_finite(obs, valid[..., None], f"{field}.observations", "observations")
    _non_finite(actions, valid[..., None], f"{field}.actions", "actions")
    _non_finite(rewards, valid, f"{field}.rewards", "rewards")
    # Entries past a trajectory's length are ignored: zero, as the trainer's sampler leaves them.
    obs = np.where(valid[..., None], obs, np.float32(0))
    actions = np.where(valid[..., None], actions, np.float32(0))
    rewards = np.where(valid, rewards, np.float32(0))
    return obs, actions, rewards, lengths


def observations(message, field: str, path: str, model: PolicyModel, max_rows: int) -> np.ndarray:
    """`message.<field>` as observations [Q, obs_dim] float32, finite."""
    dim = model.spec.obs_dim
    obs = _float32(message, field, path, f"[Q, {dim}] of observations")
    if obs.ndim != 2 or obs.shape[1] != dim:
        raise InvalidArgument(f"{path} has shape {list(obs.shape)}, expected [Q, {dim}] observations (obs_dim {dim}) "
                              f"for policy model {model.name}")
    if not 1 <= obs.shape[0] <= max_rows:
        raise InvalidArgument(f"{path} has {obs.shape[0]} rows (Q), expected 1 to {max_rows} for model {model.name}")
    _non_finite(obs, np.ones((1, 1), dtype=bool), path, "observations")
    return obs


def steps(request, path: str, model: PolicyModel) -> int:
    if request.steps not in (0, 1):
        raise InvalidArgument(f"{path}steps = {request.steps}, expected 0 or 1 for policy model {model.name}: one VPG "
                              "step per batch of trajectories (for the next, sample with the adapted policy and Adapt "
                              "with from_adaptation_id)")
    return 1


# ---- jobs -----------------------------------------------------------------------------------------------------

@dataclass
class PolicyAdaptJob:
    model: PolicyModel
    observations: np.ndarray  # [B, H, obs_dim] float32, zero past each length
    actions: np.ndarray  # [B, H, act_dim]
    rewards: np.ndarray  # [B, H]
    lengths: np.ndarray  # [B] int64 in [1, H]
    steps: int
    lr: float | None  # None: the model's default
    query_x: np.ndarray | None = None  # [Q, obs_dim] for AdaptAndPredict
    keep: bool = True
    start: dict[str, torch.Tensor] | None = None  # an earlier adaptation's parameters (None: the meta-initialization)
    start_id: str = ""
    prior_steps: int = 0  # steps the starting adaptation had taken

    @property
    def key(self) -> Hashable:
        return ("policy-adapt", self.model.name, *self.rewards.shape, self.lr)

    def describe(self) -> str:
        b, h = self.rewards.shape
        queries = 0 if self.query_x is None else self.query_x.shape[0]
        return f"{b} trajectories of {h} steps, {queries} observations"


@dataclass
class PolicyActJob:
    model: PolicyModel
    params: dict[str, torch.Tensor]  # one policy, no task axis, on the engine's device
    query_x: np.ndarray  # [Q, obs_dim]

    @property
    def key(self) -> Hashable:
        return ("policy-act", self.model.name, self.query_x.shape[0])

    def describe(self) -> str:
        return f"{self.query_x.shape[0]} observations"


@dataclass
class Actions:
    mean: np.ndarray  # [Q, act_dim] float32
    log_std: np.ndarray  # [act_dim] float32
    predict_s: float


@dataclass
class PolicyAdaptOutcome(AdaptOutcome):
    actions: Actions | None = None  # the adapted policy on the job's observations (AdaptAndPredict)


# ---- the worker thread ----------------------------------------------------------------------------------------

def run_batch(device: torch.device, key: Hashable, jobs: list) -> list:
    return adapt_batch(device, jobs) if key[0] == "policy-adapt" else act_batch(device, jobs)


def _stack(arrays: list[np.ndarray], device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).to(device)


def _act(model: PolicyModel, params: dict[str, torch.Tensor], obs: list[np.ndarray], device) -> list:
    """Stacked policies [T, ...] on observations [Q, obs_dim] each (same Q): Actions or a refusal per task."""
    start = time.perf_counter()
    with torch.no_grad():
        mean, log_std = policy_forward(model.spec, params, _stack(obs, device))
        ok = finite_per_task([mean, log_std])
        mean, log_std = mean.float().cpu().numpy(), log_std.float().cpu().numpy()
    seconds = time.perf_counter() - start
    return [Actions(mean[i], log_std[i].reshape(-1), seconds) if ok[i] else InvalidArgument(
        f"query_x gives non-finite action means under policy model {model.name!r}: expected observations in the "
        "range the policy was trained on") for i in range(len(obs))]


def act_batch(device, jobs: list[PolicyActJob]) -> list:
    model = jobs[0].model
    params = {k: torch.stack([j.params[k] for j in jobs]) for k in model.params}
    return _act(model, params, [j.query_x for j in jobs], device)


def adapt_batch(device, jobs: list[PolicyAdaptJob]) -> list:
    model, first = jobs[0].model, jobs[0]
    traj = Trajectories(_stack([j.observations for j in jobs], device), _stack([j.actions for j in jobs], device),
                        _stack([j.rewards for j in jobs], device), _stack([j.lengths for j in jobs], device))
    start = {k: torch.stack([(j.start or model.params)[k] for j in jobs]) for k in model.params}
    began = time.perf_counter()
    result = adapt_policy(model.spec, start, traj, first.lr)
    losses = result.surrogate.float().cpu().numpy()  # [2, T]; waits for the device
    weights_ok = finite_per_task(result.params.values())
    adapt_s = time.perf_counter() - began
    lr = model.inner_lr(first.lr)
    outcomes: list = []
    for i, job in enumerate(jobs):
        if not (weights_ok[i] and np.isfinite(losses[:, i]).all()):
            outcomes.append(InvalidArgument(
                f"the adaptation diverged with inner_lr = {lr:g}: the surrogate loss is {losses[0, i]} before and "
                f"{losses[1, i]} after the step of policy model {model.name!r}; expected a smaller inner_lr (or "
                "trajectories sampled from this policy); nothing was kept"))
            continue
        params = {k: v[i].detach().clone() for k, v in result.params.items()}
        actions = None
        if job.query_x is not None:
            actions = _act(model, {k: v.unsqueeze(0) for k, v in params.items()}, [job.query_x], device)[0]
            if isinstance(actions, BaseException):
                outcomes.append(actions)
                continue
        outcomes.append(PolicyAdaptOutcome(
            params=params if job.keep else None, stats=None, support_loss=losses[:, i].copy(),
            support_accuracy=np.zeros(0, dtype=np.float32), logits=None, adapt_s=adapt_s,
            predict_s=0.0 if actions is None else actions.predict_s, actions=actions))
    return outcomes


def actions_response(actions: Actions, timings: pb.Timings) -> pb.PredictResponse:
    return pb.PredictResponse(action_mean=encode(np.ascontiguousarray(actions.mean, dtype=np.float32)),
                              action_log_std=encode(np.ascontiguousarray(actions.log_std, dtype=np.float32)),
                              timings=timings)
