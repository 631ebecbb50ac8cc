"""The stored form of an adaptation: round trip bit for bit, and every way the bytes can be wrong is refused."""

import struct

import pytest
import torch

from models.adaptation import MAGIC, AdaptationFormatError, decode, encode
from models.functional import init_params, support_stats
from models.maml import adapt
from tests.models.test_functional import SPECS
from tests.models.test_maml import tasks_for


def adapted(policy="support"):
    spec = SPECS["conv4-omniglot"].with_(bn_policy=policy)
    x, y = tasks_for(spec, tasks=1, shots=1)
    fast = adapt(spec, init_params(spec, torch.Generator().manual_seed(0)), x, y, steps=1, lr=0.4).params
    stats = support_stats(spec, fast, x) if policy == "support" else None
    one = lambda d: None if d is None else {k: v[0] for k, v in d.items()}  # noqa: E731
    return spec, one(fast), one(stats)


@pytest.mark.parametrize("policy", ["support", "transductive"])
def test_round_trip_is_bit_exact(policy):
    spec, params, stats = adapted(policy)
    data = encode(spec, params, stats, steps=3, inner_lr=0.4, created=12.5)
    got = decode(data, spec)
    assert (got.model, got.steps, got.inner_lr, got.created) == (spec.name, 3, 0.4, 12.5)
    for k, v in params.items():
        assert torch.equal(got.params[k], v)
    if stats is None:
        assert got.stats is None
    else:
        assert set(got.stats) == set(stats) and all(torch.equal(got.stats[k], v) for k, v in stats.items())
    assert b"pickle" not in data and not data.startswith(b"\x80")  # not a pickle stream


def test_corrupt_truncated_foreign_and_mismatched_bytes_are_refused():
    spec, params, stats = adapted()
    data = encode(spec, params, stats, steps=1, inner_lr=0.4)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    cases = [
        (data[:20], "truncated"),
        (bytes(flipped), "checksum"),
        (b"PICKLE" + data[6:], "expected b'FADAPT'"),
        (data[:6] + struct.pack("<H", 9) + data[8:], "format version 9"),
    ]
    for blob, needle in cases:
        with pytest.raises(AdaptationFormatError, match=needle):
            decode(blob, spec)
    other = spec.with_(ways=4)  # same name, another spec: never decodes against it
    with pytest.raises(AdaptationFormatError, match="belongs to model"):
        decode(data, other)
    assert MAGIC == data[:6]


def test_non_finite_and_wrongly_shaped_tensors_are_refused():
    spec, params, stats = adapted()
    bad = dict(params)
    bad["head.bias"] = torch.full_like(params["head.bias"], float("nan"))
    with pytest.raises(AdaptationFormatError, match="non-finite"):
        decode(encode(spec, bad, stats, 1, 0.4), spec)
    short = dict(params)
    short["head.bias"] = params["head.bias"][:2]
    with pytest.raises(AdaptationFormatError, match="'head.bias' has shape"):
        decode(encode(spec, short, stats, 1, 0.4), spec)
    with pytest.raises(AdaptationFormatError, match="stored stats are"):
        decode(encode(spec, params, None, 1, 0.4), spec)
