"""An adaptation's stored form: one task's fast weights plus, for the `support` batch-norm policy, the support set's
per-layer statistics: small, self-contained, and the same bytes wherever it is kept (a shared store between
replicas, a file).

Layout (little-endian), no pickle, nothing executable:
    magic  b"FADAPT"            6 bytes
    format version              uint16
    header length H             uint32
    header                      H bytes of UTF-8 JSON: model name, spec digest, steps, inner_lr, created,
                                and per tensor {name, shape, offset, nbytes} (dtype float32 only)
    tensor data                 the tensors' bytes, back to back, row-major
    SHA-256                     32 bytes over everything above
`decode` refuses anything that does not match bit for bit (truncated, corrupt, another version, tensors out of
bounds, shapes that do not fit the model's spec, non-finite values) with an AdaptationFormatError naming the
problem; a decoded adaptation is as trustworthy as one computed here.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from models.functional import param_shapes, stats_shapes
from models.policy import PolicySpec, policy_param_shapes
from models.spec import ModelSpec

MAGIC = b"FADAPT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<6sHI")
_DIGEST = 32
MAX_HEADER_BYTES = 1 << 20


class AdaptationFormatError(ValueError):
    """Bytes that are not a valid stored adaptation (of the expected model)."""


@dataclass
class StoredAdaptation:
    model: str
    params: dict[str, torch.Tensor]  # one task's fast weights, no task axis
    stats: dict[str, torch.Tensor] | None  # {bn{i}.mean, bn{i}.var} [C], or None (no support statistics needed)
    steps: int
    inner_lr: float  # 0.0: the model's learned rates
    spec_digest: str
    created: float = 0.0  # seconds since the epoch (informational)


def spec_digest(spec: ModelSpec) -> str:
    """A short digest of everything in the spec that shapes an adaptation: an adaptation made for one model never
    decodes against another model that happens to share its name."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def encode(spec: ModelSpec, params: dict[str, torch.Tensor], stats: dict[str, torch.Tensor] | None, steps: int,
           inner_lr: float, created: float = 0.0) -> bytes:
    tensors = [(f"params/{k}", v) for k, v in params.items()] + [(f"stats/{k}", v) for k, v in (stats or {}).items()]
    entries, blobs, offset = [], [], 0
    for name, tensor in tensors:
        data = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy(), dtype="<f4").tobytes()
        entries.append({"name": name, "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"model": spec.name, "spec_digest": spec_digest(spec), "steps": int(steps),
                         "inner_lr": float(inner_lr), "created": float(created), "dtype": "float32",
                         "tensors": entries}, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, spec: ModelSpec, device="cpu") -> StoredAdaptation:
    """Bytes from `encode` back into tensors on `device`, checked against `spec` (the model it must belong to)."""
    data = memoryview(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise AdaptationFormatError(f"stored adaptation has {len(data)} bytes, expected at least "
                                    f"{_PREFIX.size + _DIGEST} (truncated)")
    magic, version, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise AdaptationFormatError(f"stored adaptation starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise AdaptationFormatError(f"stored adaptation has format version {version}, expected {FORMAT_VERSION}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != bytes(digest):
        raise AdaptationFormatError("stored adaptation fails its SHA-256 checksum (corrupt or truncated)")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(body):
        raise AdaptationFormatError(f"stored adaptation header of {header_len} bytes does not fit")
    try:
        header = json.loads(bytes(body[_PREFIX.size:_PREFIX.size + header_len]))
    except ValueError as exc:
        raise AdaptationFormatError(f"stored adaptation header is not JSON: {exc}") from None
    if header.get("model") != spec.name or header.get("spec_digest") != spec_digest(spec):
        raise AdaptationFormatError(f"stored adaptation belongs to model {header.get('model')!r} (spec "
                                    f"{header.get('spec_digest')}), expected {spec.name!r} ({spec_digest(spec)})")
    start = _PREFIX.size + header_len
    tensors = {}
    for entry in header.get("tensors", []):
        shape, offset, nbytes = [int(d) for d in entry["shape"]], int(entry["offset"]), int(entry["nbytes"])
        if nbytes != 4 * math.prod(shape) or offset < 0 or start + offset + nbytes > len(body):
            raise AdaptationFormatError(f"stored tensor {entry['name']!r} {shape} at {offset}+{nbytes} is out of "
                                        "bounds")
        array = np.frombuffer(body, dtype="<f4", count=nbytes // 4, offset=start + offset).reshape(shape)
        if not np.isfinite(array).all():
            raise AdaptationFormatError(f"stored tensor {entry['name']!r} holds non-finite values")
        tensors[entry["name"]] = torch.from_numpy(array.copy()).to(device)
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    stats = {k[len("stats/"):]: v for k, v in tensors.items() if k.startswith("stats/")} or None
    _check_shapes("params", params, _param_shapes(spec))
    if spec.predict_needs_support_stats():
        _check_shapes("stats", stats or {}, stats_shapes(spec))
    elif stats is not None:
        raise AdaptationFormatError(f"stored adaptation has support statistics, model {spec.name} keeps none")
    return StoredAdaptation(spec.name, params, stats, int(header["steps"]), float(header["inner_lr"]),
                            header["spec_digest"], float(header.get("created", 0.0)))


def _param_shapes(spec) -> dict[str, tuple[int, ...]]:
    """The parameters an adaptation of this model holds: a classifier's or regressor's, or a policy's."""
    return policy_param_shapes(spec) if isinstance(spec, PolicySpec) else param_shapes(spec)


def _check_shapes(kind: str, got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> None:
    if set(got) != set(want):
        raise AdaptationFormatError(f"stored {kind} are {sorted(got)}, expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(got[name].shape) != tuple(shape):
            raise AdaptationFormatError(f"stored {kind} {name!r} has shape {list(got[name].shape)}, expected "
                                        f"{list(shape)}")
