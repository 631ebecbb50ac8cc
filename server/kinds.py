"""The service for every model kind: classifiers, regressors (sinusoid) and policies (MAML-RL).

server.service handles the classifier's common paths; it hands this module what differs by kind:
- Adapt from an earlier adaptation (`from_adaptation_id`: multi-step adaptation, every kind), a regressor's
  support set (FLOAT32 support_x [N*K, in_dim] + support_targets [N*K, out_dim]) and a policy's trajectories
  (server.policy);
- Predict with a model's meta-initialization (empty adaptation_id + model), a regressor's outputs and a policy's
  action distribution;
- ModelInfo's kind, sizes, discount and baseline.
A request that carries the fields of another kind (trajectories for a classifier, support_y for a policy, ...) is
refused with INVALID_ARGUMENT naming the field. Every job still runs on the engine's one worker thread through the
batcher (server.runner dispatches the policy jobs to server.policy).
"""

from __future__ import annotations

import time

import numpy as np

from models.kinds import model_kind
from models.policy import PolicyModel
from server import policy, validation
from server.runner import AdaptJob, PredictJob
from server.status import InvalidArgument, clip
from server.wire import encode, pb

__all__ = ["adapt_and_predict", "adapt_job", "check_exportable", "describe", "model_kind", "policy_info", "predict",
           "predict_target", "routes_elsewhere"]

# Fields each kind's AdaptRequest uses besides model, steps, inner_lr and from_adaptation_id.
ADAPT_FIELDS = {"classifier": ("support_x", "support_y"), "regressor": ("support_x", "support_targets"),
                "policy": ("trajectories",)}
ALL_ADAPT_FIELDS = ("support_x", "support_y", "support_targets", "trajectories")


def _is_set(request, field: str) -> bool:
    return len(request.support_y) > 0 if field == "support_y" else request.HasField(field)


def _check_fields(request, path: str, model, kind: str) -> None:
    for field in ALL_ADAPT_FIELDS:
        if field not in ADAPT_FIELDS[kind] and _is_set(request, field):
            expected = " and ".join(f"{path}{f}" for f in ADAPT_FIELDS[kind])
            raise InvalidArgument(f"{path}{field} is set, but model {model.name} is a {kind}: expected {expected} "
                                  f"(ModelInfo.kind says which fields a model takes)")


# ---- which model, from where ----------------------------------------------------------------------------------

def routes_elsewhere(registry, request, path: str = "adapt.") -> bool:
    """Whether an AdaptRequest is served here rather than by the classifier path of server.service."""
    if request.from_adaptation_id or request.HasField("trajectories") or request.HasField("support_targets"):
        return True  # from an adaptation, or fields of another kind (refused here, naming them)
    return model_kind(registry.get(request.model, f"{path}model")) != "classifier"


async def _start(service, request, path: str):
    """(model, the adaptation to start from or None) of an AdaptRequest."""
    if not request.from_adaptation_id:
        return service.registry.get(request.model, f"{path}model"), None
    entry = await service.store.get(request.from_adaptation_id, f"{path}from_adaptation_id")
    if request.model and request.model != entry.model:
        raise InvalidArgument(f"{path}from_adaptation_id {clip(request.from_adaptation_id)} is an adaptation of model "
                              f"{entry.model!r}, but {path}model is {clip(request.model)}: expected the same model (or "
                              f"an empty {path}model)")
    return service.registry.get(entry.model, f"the model of {path}from_adaptation_id"), entry


async def predict_target(service, request):
    """(adaptation entry or None for the meta-initialization, model) of a PredictRequest."""
    if not request.adaptation_id:
        if not request.model:
            raise InvalidArgument("adaptation_id is empty, expected an id returned by Adapt or AdaptAndPredict (or "
                                  "model, to predict with that model's meta-initialization)")
        return None, service.registry.get(request.model, "model")
    entry = await service.store.get(validation.adaptation_id(request))
    if request.model and request.model != entry.model:
        raise InvalidArgument(f"adaptation_id {clip(request.adaptation_id)} is an adaptation of model {entry.model!r}, "
                              f"but model is {clip(request.model)}: expected the same model (or an empty model)")
    return entry, service.registry.get(entry.model)


# ---- regressors -----------------------------------------------------------------------------------------------

def regressor_inputs(message, field: str, path: str, model, rows: str, max_rows: int) -> np.ndarray:
    """FLOAT32 inputs [n, *input_shape] of a regressor (uint8 pixels mean nothing to it)."""
    if message.HasField(field) and getattr(message, field).dtype != pb.FLOAT32:
        shape = validation.shape_text(rows, model)
        raise InvalidArgument(f"{path}.dtype is {pb.DType.Name(getattr(message, field).dtype)}, expected FLOAT32 "
                              f"{shape} for regressor model {model.name} ({model.spec.preprocessing})")
    return validation.images(message, field, path, model, rows, max_rows)


def support_targets(request, path: str, model, rows: int) -> np.ndarray:
    out_dim, field = model.spec.ways, f"{path}support_targets"
    y = validation.tensor(request, "support_targets", field, f"a FLOAT32 Tensor [{rows}, {out_dim}] (one target per "
                          f"{path}support_x row) for regressor model {model.name}")
    if y.dtype != np.float32 or y.shape != (rows, out_dim):
        raise InvalidArgument(f"{field} is {pb.DType.Name(request.support_targets.dtype)} {list(y.shape)}, expected "
                              f"FLOAT32 [{rows}, {out_dim}] (one target per {path}support_x row) for regressor model "
                              f"{model.name}")
    validation.finite(y, field, "targets")
    return y


# ---- adapt ----------------------------------------------------------------------------------------------------

def _job(service, request, path: str, model, entry, query, keep: bool):
    kind, limits = model_kind(model), service.limits
    _check_fields(request, path, model, kind)
    lr = validation.inner_lr(request, path, model)
    if kind == "policy":
        obs, actions, rewards, lengths = policy.trajectories(request, path, model)
        job = policy.PolicyAdaptJob(model, obs, actions, rewards, lengths, policy.steps(request, path, model), lr,
                                    query, keep)
    else:
        if kind == "regressor":
            x = regressor_inputs(request, "support_x", f"{path}support_x", model, "N*K", limits.max_support)
            y = support_targets(request, path, model, x.shape[0])
        else:
            x, y = validation.support_set(request, path, model, limits)
        steps = validation.steps(request, path, model, limits, x.shape[0])
        rows = validation.support_rows(model, path, x.shape[0])
        if query is not None:
            rows.update(validation.query_rows(model, query.shape[0]))
        validation.kernel_rows(model, service.runner.max_rows(model), **rows)
        job = AdaptJob(model, x, y, steps, lr, query, keep)
    if entry is not None:
        job.start, job.start_id, job.prior_steps = entry.params, request.from_adaptation_id, entry.steps
    return job


async def adapt_job(service, request, path: str = "", query=None, keep: bool = True):
    """The job of an AdaptRequest of any kind, from the meta-initialization or from_adaptation_id."""
    model, entry = await _start(service, request, path)
    return _job(service, request, path, model, entry, query, keep)


def _query(request, field: str, model, limits):
    kind = model_kind(model)
    if kind == "policy":
        return policy.observations(request, field, field, model, limits.max_queries)
    if kind == "regressor":
        return regressor_inputs(request, field, field, model, "Q", limits.max_queries)
    return validation.images(request, field, field, model, "Q", limits.max_queries)


async def adapt_and_predict(service, request, start: float) -> pb.AdaptAndPredictResponse:
    """AdaptAndPredict of a regressor or a policy, or from an earlier adaptation."""
    model, entry = await _start(service, request.adapt, "adapt.")
    query = _query(request, "query_x", model, service.limits)
    job = _job(service, request.adapt, "adapt.", model, entry, query, not request.skip_cache)
    batched = await service.batcher.submit(job.key, job)
    adapted, timings = await service._adapt_response(job, batched, start)
    return pb.AdaptAndPredictResponse(adapt=adapted, predict=_predict_response(service, model, batched.result,
                                                                               timings))


# ---- predict --------------------------------------------------------------------------------------------------

def _predict_response(service, model, result, timings: pb.Timings) -> pb.PredictResponse:
    kind = model_kind(model)
    if kind == "policy":
        return policy.actions_response(result if isinstance(result, policy.Actions) else result.actions, timings)
    if kind == "regressor":
        return pb.PredictResponse(outputs=encode(np.ascontiguousarray(result.logits, dtype=np.float32)),
                                  timings=timings)
    return service._predict_response(result.logits, timings)


async def predict(service, request, model, entry, start: float) -> pb.PredictResponse:
    """Predict with an adaptation of a regressor or policy, or with any model's meta-initialization (entry None)."""
    kind = model_kind(model)
    query = _query(request, "query_x", model, service.limits)
    params = model.params if entry is None else entry.params
    if kind == "policy":
        job = policy.PolicyActJob(model, params, query)
    else:
        if entry is None and model.spec.predict_needs_support_stats():
            raise InvalidArgument(f"model {model.name} normalizes queries with a support set's batch-norm statistics "
                                  "(bn_policy 'support'): its meta-initialization has none; expected an adaptation_id "
                                  "from Adapt")
        validation.kernel_rows(model, service.runner.max_rows(model), **validation.query_rows(model, query.shape[0]))
        job = PredictJob(model, params, None if entry is None else entry.stats, query)
    batched = await service.batcher.submit(job.key, job)
    result = batched.result
    timings = pb.Timings(queue_ms=batched.queue_s * 1e3, predict_ms=result.predict_s * 1e3,
                         total_ms=(time.perf_counter() - start) * 1e3, batch_tasks=batched.batch_size)
    return _predict_response(service, model, result, timings)


def check_exportable(model) -> None:
    kind = model_kind(model)
    if kind != "classifier":
        raise InvalidArgument(f"adaptation_id is an adaptation of {kind} model {model.name}: ONNX export serves "
                              "classifiers")


# ---- model info -----------------------------------------------------------------------------------------------

def describe(model, info: pb.ModelInfo) -> pb.ModelInfo:
    """A classifier's or regressor's ModelInfo with its kind (and a regressor's sizes and dtypes)."""
    kind = model_kind(model)
    info.kind = kind
    if kind == "regressor":
        info.output_size = model.spec.ways
        info.input_dtype = pb.FLOAT32
        del info.accepted_dtypes[:]
        info.accepted_dtypes.append(pb.FLOAT32)
        info.bn_policy = "none"
    return info


def policy_info(model: PolicyModel, limits, summary: dict[str, str], provenance_json: str,
                num_params: int) -> pb.ModelInfo:
    spec = model.spec
    baseline = spec.baseline
    if spec.baseline == "linear-feature":
        advantages = "standardized" if spec.normalize_advantages else "raw"
        baseline += f" (ridge {spec.baseline_reg:g}, advantages {advantages})"
    return pb.ModelInfo(
        name=spec.name, arch=f"gaussian-mlp-{'x'.join(map(str, spec.hidden))}-{spec.nonlinearity}", ways=0,
        input_shape=[spec.obs_dim], input_dtype=pb.FLOAT32, accepted_dtypes=[pb.FLOAT32], default_steps=spec.steps,
        default_inner_lr=spec.inner_lr, learned_inner_lr=False, bn_policy="none",
        preprocessing=f"{spec.env}: observations [Q, {spec.obs_dim}] float32 as the environment returns them",
        provenance=summary, provenance_json=provenance_json, num_params=num_params, max_steps=1,
        max_support=0, max_queries=limits.max_queries, ready=True,
        recipe="fomaml-trpo" if (model.provenance.get("config") or {}).get("first_order") else "maml-trpo",
        adapt_params="all",
        max_support_steps=0, kind="policy", observation_size=spec.obs_dim, action_size=spec.act_dim,
        discount=spec.discount, baseline=baseline, action_low=spec.action_low,
        action_high=spec.action_high, max_trajectories=policy.MAX_TRAJECTORIES,
        max_horizon=policy.MAX_HORIZON)
