"""The wire format shared by server and client: the generated stubs, tensor encoding, and message-size limits.

The stubs are generated with `-I protos` (see server.protogen), so protos/ goes on sys.path and they import as
`fastadapt.v1`. Tensors travel as row-major little-endian bytes + shape + dtype.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

PROTOS_DIR = Path(__file__).resolve().parents[1] / "protos"
if str(PROTOS_DIR) not in sys.path:
    sys.path.insert(0, str(PROTOS_DIR))

from fastadapt.v1 import fastadapt_pb2 as pb  # noqa: E402
from fastadapt.v1 import fastadapt_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc", "SERVICE_NAME", "channel_options", "encode", "decode", "TensorFormatError"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FastAdapt"].full_name  # "fastadapt.v1.FastAdapt"

NUMPY_DTYPES = {pb.UINT8: np.dtype("u1"), pb.FLOAT16: np.dtype("<f2"), pb.FLOAT32: np.dtype("<f4")}
DTYPE_NAMES = {v: pb.DType.Name(v) for v in pb.DType.values()}


def task_pixel_bytes(ways: int, shots: int, queries: int, input_shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Bytes of pixel data in one AdaptAndPredict request: (N*K support + Q query) images of input_shape."""
    return (ways * shots + queries) * math.prod(input_shape) * itemsize


# The largest task the limits are sized for: 20-way 5-shot 84x84 RGB with 300 queries, float32.
SIZING_TASK = {"ways": 20, "shots": 5, "queries": 300, "input_shape": (3, 84, 84), "itemsize": 4}
SIZING_TASK_BYTES = task_pixel_bytes(**SIZING_TASK)  # 33,868,800 bytes (32.3 MiB)
MIB = 1 << 20
# Requests up to this size are served; 36 MiB leaves ~11% above the sizing task for labels, framing and slack.
MAX_REQUEST_BYTES = 36 * MIB
# gRPC's own limit: between MAX_REQUEST_BYTES and this the server answers INVALID_ARGUMENT naming the size;
# beyond it gRPC answers RESOURCE_EXHAUSTED before the request reaches the service.
TRANSPORT_LIMIT_BYTES = 64 * MIB
assert SIZING_TASK_BYTES + MIB < MAX_REQUEST_BYTES < TRANSPORT_LIMIT_BYTES


MAX_RANK = 8  # dimensions a wire Tensor may have (images are 4-D); numpy refuses more than 64


def channel_options(limit: int = TRANSPORT_LIMIT_BYTES) -> list[tuple[str, int]]:
    """gRPC options with explicit message-size limits, for both the server and the client channel."""
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def encode(array: np.ndarray) -> pb.Tensor:
    """A numpy array (uint8, float16 or float32, any byte order) as a wire Tensor."""
    array = np.asarray(array)
    for code, dtype in NUMPY_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            return pb.Tensor(dtype=code, shape=list(array.shape), data=data)
    raise TypeError(f"cannot send an array of dtype {array.dtype}: expected uint8, float16 or float32")


class TensorFormatError(ValueError):
    """A wire Tensor whose dtype, shape or byte count is inconsistent."""


def decode(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A wire Tensor as a read-only numpy array (a view of the message bytes); `field` names it in errors."""
    if tensor.dtype not in NUMPY_DTYPES:
        name = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        raise TensorFormatError(f"{field}.dtype is {name}, expected UINT8, FLOAT16 or FLOAT32")
    if not 1 <= len(tensor.shape) <= MAX_RANK:
        raise TensorFormatError(f"{field}.shape has {len(tensor.shape)} dimensions, expected 1 to {MAX_RANK}")
    shape = [int(d) for d in tensor.shape]
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"{field}.shape is {shape}, expected non-negative dimensions (e.g. [N, C, H, W])")
    dtype = NUMPY_DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorFormatError(
            f"{field}.data has {len(tensor.data)} bytes, expected {expected} for shape {shape} and dtype "
            f"{DTYPE_NAMES[tensor.dtype]} ({dtype.itemsize} byte(s) per element)"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
