"""server.wire: tensor encoding round trips, malformed tensors are named, and the size limits fit the sizing task."""

from __future__ import annotations

import numpy as np
import pytest

from server.wire import (
    MAX_REQUEST_BYTES,
    SIZING_TASK_BYTES,
    TRANSPORT_LIMIT_BYTES,
    TensorFormatError,
    decode,
    encode,
    pb,
    task_pixel_bytes,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.dtype(">f4")])
def test_round_trip(dtype):
    rng = np.random.default_rng(0)
    x = (rng.random((3, 1, 4, 5)) * 200).astype(dtype)
    t = encode(x)
    assert list(t.shape) == [3, 1, 4, 5]
    y = decode(t, "x")
    assert y.dtype.itemsize == np.dtype(dtype).itemsize and y.dtype.byteorder in "<|="
    np.testing.assert_array_equal(y, x)


def test_encode_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float64"):
        encode(np.zeros((2, 2)))


def test_decode_names_the_field_and_the_expected_byte_count():
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(TensorFormatError, match=r"query_x.data has 20 bytes, expected 24 for shape \[2, 3\]"):
        decode(t, "query_x")
    with pytest.raises(TensorFormatError, match="query_x.dtype is DTYPE_UNSPECIFIED"):
        decode(pb.Tensor(shape=[1]), "query_x")
    with pytest.raises(TensorFormatError, match="query_x.shape"):
        decode(pb.Tensor(dtype=pb.UINT8, shape=[-1, 2]), "query_x")


def test_limits_fit_the_sizing_task():
    # 20-way 5-shot 84x84 RGB with 300 queries, float32: (100 + 300) * 3 * 84 * 84 * 4 bytes.
    assert SIZING_TASK_BYTES == (100 + 300) * 3 * 84 * 84 * 4 == task_pixel_bytes(20, 5, 300, (3, 84, 84))
    request = pb.AdaptAndPredictRequest(
        adapt=pb.AdaptRequest(
            model="miniimagenet-20w5s",
            support_x=encode(np.zeros((100, 3, 84, 84), np.float32)),
            support_y=[i % 20 for i in range(100)],
        ),
        query_x=encode(np.zeros((300, 3, 84, 84), np.float32)),
    )
    assert SIZING_TASK_BYTES < request.ByteSize() <= MAX_REQUEST_BYTES < TRANSPORT_LIMIT_BYTES
