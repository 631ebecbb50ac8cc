"""Request validation: decode the wire tensors and check them against the model before any work is queued.

Every refusal is an InvalidArgument whose message names the field, the value and what was expected, e.g.
`support_x has shape [5, 28, 28], expected [N*K, 1, 28, 28] for model omniglot-5w1s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.checkpoint import MetaModel
from server.status import InvalidArgument
from server.wire import MAX_REQUEST_BYTES, TensorFormatError, decode

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Limits:
    max_steps: int = 100
    max_support: int = 1000  # N*K rows
    max_queries: int = 1000  # Q rows
    max_request_bytes: int = MAX_REQUEST_BYTES
    # The cost cap: support rows x inner steps of one request (each step forwards and backwards every support row).
    # 20-way 5-shot at 100 steps is 10,000; the default leaves 2.5x that.
    max_support_steps: int = 25_000

    def __post_init__(self):
        for name in ("max_steps", "max_support", "max_queries", "max_request_bytes", "max_support_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}, expected >= 1")


def check_request_size(request, rpc: str, limits: Limits) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidArgument(
            f"the {rpc} request is {size} bytes, expected at most {limits.max_request_bytes} bytes "
            "(sized for a 20-way 5-shot 84x84 RGB task with 300 float32 queries); split the query set"
        )


def shape_text(rows: str, model: MetaModel) -> str:
    return "[" + ", ".join([rows, *map(str, model.spec.input_shape)]) + "]"


def tensor(message, field: str, path: str, expected: str) -> np.ndarray:
    """Decode the wire Tensor `message.<field>`; missing or malformed is INVALID_ARGUMENT (`expected`: what it
    should have been, e.g. "a FLOAT32 Tensor [B, H, 2]"); `path` is the field's full name in messages."""
    if not message.HasField(field):
        raise InvalidArgument(f"{path} is missing, expected {expected}")
    try:
        return decode(getattr(message, field), path)
    except TensorFormatError as exc:
        raise InvalidArgument(str(exc)) from None


def finite(array: np.ndarray, path: str, what: str) -> None:
    """Refuse NaN / Inf in a decoded float array, naming the first."""
    if array.dtype.kind != "f":
        return
    ok = np.isfinite(array)
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))
        raise InvalidArgument(
            f"{path} holds {bad.size} non-finite values (NaN or Inf), the first at flat index {bad[0]} = "
            f"{array.reshape(-1)[bad[0]]}; expected finite {what}"
        )


def images(message, field: str, path: str, model: MetaModel, rows: str, max_rows: int) -> np.ndarray:
    """Decode `message.<field>` as [rows, *input_shape] images; `path` is the field's full name in messages."""
    expected = shape_text(rows, model)
    array = tensor(message, field, path, f"a Tensor {expected} of UINT8, FLOAT16 or FLOAT32")
    shape = model.spec.input_shape
    if array.ndim != 1 + len(shape) or tuple(array.shape[1:]) != shape:
        raise InvalidArgument(f"{path} has shape {list(array.shape)}, expected {expected} for model {model.name}")
    n = array.shape[0]
    if not 1 <= n <= max_rows:
        raise InvalidArgument(f"{path} has {n} rows ({rows}), expected 1 to {max_rows} for model {model.name}")

    finite(array, path, "preprocessed input")
    return array


def support_set(request, path: str, model: MetaModel, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """The AdaptRequest's support set: images [N*K, ...] and int64 labels [N*K] covering every class."""
    x = images(request, "support_x", f"{path}support_x", model, "N*K", limits.max_support)
    ways = model.spec.ways
    y = np.asarray(request.support_y, dtype=np.int64)
    if y.shape[0] != x.shape[0]:
        raise InvalidArgument(
            f"{path}support_y has {y.shape[0]} labels, expected {x.shape[0]} (one per {path}support_x row)"
        )
    outside = np.flatnonzero((y < 0) | (y >= ways))
    if outside.size:
        i = outside[0]
        raise InvalidArgument(
            f"{path}support_y[{i}] = {y[i]}, expected a class index in [0, {ways}) for model {model.name} "
            f"({ways}-way)"
        )
    counts = np.bincount(y, minlength=ways)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise InvalidArgument(
            f"{path}support_y has no example of class(es) {empty.tolist()}; model {model.name} is {ways}-way and "
            f"every class in [0, {ways}) needs at least one support example"
        )
    return x, y


def support_rows(model: MetaModel, path: str, rows: int) -> dict[str, int]:
    """The support rows adapt forwards, for kernel_rows: N*K, times the model's support views (models.views)."""
    views = model.spec.support_view_count
    return {f"{path}support_x": rows} if views == 1 else {f"{path}support_x x {views} support views": rows * views}


def query_rows(model: MetaModel, rows: int) -> dict[str, int]:
    """The query rows predict forwards, for kernel_rows: Q, times the model's query views (models.views)."""
    views = model.spec.query_view_count
    return {"query_x": rows} if views == 1 else {f"query_x x {views} query views": rows * views}


def kernel_rows(model: MetaModel, max_rows: int | None, **rows: int) -> None:
    """The engine's kernels take at most `max_rows` rows per task in one call (the CUDA grid limit; None: no
    limit): refuse a request over it here, naming the fields, instead of failing inside the engine."""
    total = sum(rows.values())
    if max_rows is not None and total > max_rows:
        fields = " + ".join(f"{name} ({n} rows)" for name, n in rows.items())
        raise InvalidArgument(f"{fields} = {total} rows per task, more than the {max_rows} the engine's kernels take "
                              f"for model {model.name} on this device (CUDA grid limit); expected fewer rows")


def steps(request, path: str, model: MetaModel, limits: Limits, support_rows: int = 1) -> int:
    """The request's inner steps (0: the model's default), refused past max_steps or past max_support_steps row-steps
    over the rows adapt forwards: `support_rows` (N*K) times the model's support views."""
    views = model.spec.support_view_count
    support_rows *= views
    value = request.steps
    if not 0 <= value <= limits.max_steps:
        raise InvalidArgument(
            f"{path}steps = {value}, expected 0 (the model's default, {model.spec.steps}) to {limits.max_steps}"
        )
    value = value or model.spec.steps
    if support_rows * value > limits.max_support_steps:
        raise InvalidArgument(
            f"{path}steps = {value} on {support_rows} support rows"
            f"{f' ({views} support views of each image)' if views > 1 else ''} costs "
            f"{support_rows * value} row-steps, expected at "
            f"most {limits.max_support_steps} (--max-support-steps): fewer steps or a smaller support set"
        )
    return value


def inner_lr(request, path: str, model: MetaModel) -> float | None:
    """The requested rate, or None for the model's default (0 on the wire)."""
    value = request.inner_lr
    if value == 0:
        return None
    if not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
        default = "its learned rates" if model.has_learned_lr else f"{model.spec.inner_lr:g}"
        raise InvalidArgument(
            f"{path}inner_lr = {value}, expected a positive finite float32 (at most {FLOAT32_MAX:.4g}; or 0 for the "
            f"model's default, {default})"
        )
    return float(value)


def adaptation_id(request) -> str:
    if not request.adaptation_id:
        raise InvalidArgument("adaptation_id is empty, expected an id returned by Adapt or AdaptAndPredict")
    return request.adaptation_id
