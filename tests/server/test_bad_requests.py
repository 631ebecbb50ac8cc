"""Every bad request gets INVALID_ARGUMENT / NOT_FOUND naming the field, the value and what was expected, and
never disturbs other requests in flight or the cached adaptations."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from server.client import FastAdaptClient, adapt_request
from server.wire import MAX_REQUEST_BYTES, channel_options, encode, pb, pb_grpc
from tests.server.conftest import TINY_SPECS, random_task

SPEC = TINY_SPECS["tiny-5w"]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def good_adapt(**changes) -> pb.AdaptRequest:
    sx, sy, _ = random_task(SPEC)
    request = adapt_request("tiny-5w", sx, sy)
    for key, value in changes.items():
        if isinstance(value, pb.Tensor):
            getattr(request, key).CopyFrom(value)
        elif key == "support_y":
            del request.support_y[:]
            request.support_y.extend(value)
        else:
            setattr(request, key, value)
    return request


def float_support(value: float) -> pb.Tensor:
    x = np.full((5, 1, 28, 28), 0.5, np.float32)
    x[2, 0, 3, 4] = value
    return encode(x)


def without_support() -> pb.AdaptRequest:
    request = good_adapt()
    request.ClearField("support_x")
    return request


ADAPT_CASES = [
    ("unknown model", good_adapt(model="nope"), NOT_FOUND, ["model 'nope' is not served here", "tiny-5w"]),
    ("missing support_x", without_support(), INVALID, ["support_x is missing", "[N*K, 1, 28, 28]"]),
    ("wrong shape", good_adapt(support_x=encode(np.zeros((5, 28, 28), np.uint8))), INVALID,
     ["support_x has shape [5, 28, 28], expected [N*K, 1, 28, 28] for model tiny-5w"]),
    ("wrong size", good_adapt(support_x=encode(np.zeros((5, 1, 32, 32), np.uint8))), INVALID,
     ["support_x has shape [5, 1, 32, 32], expected [N*K, 1, 28, 28]"]),
    ("byte count", good_adapt(support_x=pb.Tensor(dtype=pb.FLOAT32, shape=[5, 1, 28, 28], data=b"\0" * 100)),
     INVALID, ["support_x.data has 100 bytes, expected 15680"]),
    ("dtype", good_adapt(support_x=pb.Tensor(shape=[5, 1, 28, 28], data=b"\0" * 3920)), INVALID,
     ["support_x.dtype is DTYPE_UNSPECIFIED, expected UINT8, FLOAT16 or FLOAT32"]),
    ("no rows", good_adapt(support_x=encode(np.zeros((0, 1, 28, 28), np.uint8)), support_y=[]), INVALID,
     ["support_x has 0 rows (N*K), expected 1 to 1000"]),
    ("label too big", good_adapt(support_y=[0, 1, 2, 3, 5]), INVALID,
     ["support_y[4] = 5, expected a class index in [0, 5) for model tiny-5w"]),
    ("negative label", good_adapt(support_y=[0, -1, 2, 3, 4]), INVALID, ["support_y[1] = -1"]),
    ("label count", good_adapt(support_y=[0, 1, 2, 3]), INVALID, ["support_y has 4 labels, expected 5"]),
    ("class without example", good_adapt(support_y=[0, 1, 2, 3, 3]), INVALID,
     ["no example of class(es) [4]", "every class in [0, 5)"]),
    ("NaN", good_adapt(support_x=float_support(np.nan)), INVALID, ["support_x holds 1 non-finite", "nan"]),
    ("Inf", good_adapt(support_x=float_support(np.inf)), INVALID, ["support_x holds 1 non-finite", "inf"]),
    ("too many steps", good_adapt(steps=101), INVALID, ["steps = 101, expected 0 (the model's default, 2) to 100"]),
    ("negative steps", good_adapt(steps=-1), INVALID, ["steps = -1"]),
    ("negative lr", good_adapt(inner_lr=-0.1), INVALID, ["inner_lr = -0.1, expected a positive finite float32"]),
    ("NaN lr", good_adapt(inner_lr=float("nan")), INVALID, ["inner_lr = nan"]),
    ("Inf lr", good_adapt(inner_lr=float("inf")), INVALID, ["inner_lr = inf"]),
    ("too many support rows", good_adapt(support_x=encode(np.zeros((1001, 1, 28, 28), np.uint8)),
                                         support_y=[i % 5 for i in range(1001)]),
     INVALID, ["support_x has 1001 rows (N*K), expected 1 to 1000"]),
    ("lr beyond float32", good_adapt(inner_lr=1e39), INVALID, ["inner_lr = 1e+39, expected a positive finite float32"]),
    ("rank 70", good_adapt(support_x=pb.Tensor(dtype=pb.UINT8, shape=[1] * 70, data=b"\0")), INVALID,
     ["support_x.shape has 70 dimensions, expected 1 to 8"]),
    ("cost cap", good_adapt(support_x=encode(np.zeros((300, 1, 28, 28), np.uint8)),
                            support_y=[i % 5 for i in range(300)], steps=100),
     INVALID, ["steps = 100 on 300 support rows costs 30000 row-steps, expected at most 25000 (--max-support-steps)"]),
    ("megabyte model name", good_adapt(model="m" * 1_000_000), INVALID,
     ["model 'mmmm", "(1000000 characters) is longer than 128 characters"]),
]


@pytest.mark.parametrize("request_,code,fragments", [c[1:] for c in ADAPT_CASES], ids=[c[0] for c in ADAPT_CASES])
def test_bad_adapt_requests(client, request_, code, fragments):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Adapt(request_, timeout=30)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()


def test_bad_predict_and_combined_requests(client):
    sx, sy, qx = random_task(SPEC)
    adapted = client.adapt("tiny-5w", sx, sy)
    cases = [
        (client.stub.Predict, pb.PredictRequest(query_x=encode(qx)), INVALID, "adaptation_id is empty"),
        (client.stub.Predict, pb.PredictRequest(adaptation_id="ad-x", query_x=encode(qx)), NOT_FOUND,
         "adaptation_id 'ad-x' is unknown"),
        (client.stub.Predict, pb.PredictRequest(adaptation_id=adapted.adaptation_id), INVALID,
         "query_x is missing, expected a Tensor [Q, 1, 28, 28]"),
        (client.stub.Predict,
         pb.PredictRequest(adaptation_id=adapted.adaptation_id, query_x=encode(np.zeros((3, 1, 28), np.uint8))),
         INVALID, "query_x has shape [3, 1, 28], expected [Q, 1, 28, 28]"),
        (client.stub.AdaptAndPredict, pb.AdaptAndPredictRequest(query_x=encode(qx)), INVALID, "adapt is missing"),
        (client.stub.AdaptAndPredict, pb.AdaptAndPredictRequest(adapt=good_adapt()), INVALID, "query_x is missing"),
        (client.stub.AdaptAndPredict, pb.AdaptAndPredictRequest(adapt=good_adapt(model="x"), query_x=encode(qx)),
         NOT_FOUND, "adapt.model 'x' is not served"),
        (client.stub.AdaptAndPredict,
         pb.AdaptAndPredictRequest(adapt=good_adapt(support_y=[0, 1, 2, 3, 9]), query_x=encode(qx)),
         INVALID, "adapt.support_y[4] = 9"),
        (client.stub.GetModel, pb.GetModelRequest(model="nope"), NOT_FOUND, "model 'nope' is not served"),
        (client.stub.ExportAdapted, pb.ExportAdaptedRequest(adaptation_id="ad-x"), NOT_FOUND, "'ad-x' is unknown"),
        (client.stub.Release, pb.ReleaseRequest(adaptation_id="ad-x"), NOT_FOUND, "'ad-x' is unknown"),
    ]
    for method, request, code, fragment in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=30)
        assert err.value.code() == code, (fragment, err.value.details())
        assert fragment in err.value.details()


def test_hostile_strings_get_short_answers(client):
    """Whatever a client sends, a status message stays under 1 KiB (gRPC's metadata limit is 8 KiB)."""
    sx, sy, qx = random_task(SPEC)
    huge = "ad-" + "\u00e9" * 500_000
    for method, request in [
        (client.stub.Predict, pb.PredictRequest(adaptation_id=huge, query_x=encode(qx))),
        (client.stub.Release, pb.ReleaseRequest(adaptation_id=huge)),
        (client.stub.GetModel, pb.GetModelRequest(model=huge)),
        (client.stub.Adapt, good_adapt(model=huge)),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=30)
        assert err.value.code() == INVALID, err.value.details()
        assert "characters) is longer than" in err.value.details()
        assert len(err.value.details().encode()) < 1024


def test_oversized_requests(server):
    """Over MAX_REQUEST_BYTES: INVALID_ARGUMENT naming the size; over the transport limit: gRPC's RESOURCE_EXHAUSTED."""
    spec = TINY_SPECS["tiny-mini"]
    sx, sy, _ = random_task(spec)
    per_image = 3 * 84 * 84 * 4
    big = np.zeros((MAX_REQUEST_BYTES // per_image + 20, 3, 84, 84), np.float32)
    request = pb.AdaptAndPredictRequest(adapt=adapt_request("tiny-mini", sx, sy), query_x=encode(big))
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.FastAdaptStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.AdaptAndPredict(request, timeout=60)
        assert err.value.code() == INVALID
        assert f"the AdaptAndPredict request is {request.ByteSize()} bytes, expected at most {MAX_REQUEST_BYTES}" in (
            err.value.details()
        )
        huger = pb.AdaptAndPredictRequest(adapt=request.adapt, query_x=encode(np.concatenate([big, big])))
        with pytest.raises(grpc.RpcError) as err:
            stub.AdaptAndPredict(huger, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_requests_do_not_disturb_requests_in_flight_or_the_cache(make_server):
    server = make_server(max_wait_ms=200, batch_wait="fixed")  # good requests wait together while bad ones arrive
    with FastAdaptClient(server.address, timeout=60) as client:
        tasks = [random_task(SPEC, queries=3, seed=s) for s in range(4)]
        cached = client.adapt("tiny-5w", *tasks[0][:2])
        before = client.predict(cached.adaptation_id, tasks[0][2]).logits
        alone = [client.adapt_and_predict("tiny-5w", *t, keep=False)[1].logits for t in tasks]

        results, errors = {}, []

        def good(i):
            results[i] = client.adapt_and_predict("tiny-5w", *tasks[i], keep=False)[1].logits

        def bad(request):
            try:
                client.stub.Adapt(request, timeout=60)
            except grpc.RpcError as exc:
                errors.append(exc.code())

        threads = [threading.Thread(target=good, args=(i,)) for i in range(len(tasks))]
        threads += [threading.Thread(target=bad, args=(case[1],)) for case in ADAPT_CASES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(errors) == len(ADAPT_CASES) and grpc.StatusCode.INTERNAL not in errors
        for i, logits in enumerate(alone):
            np.testing.assert_allclose(results[i], logits, atol=1e-5, rtol=1e-5)
        after = client.predict(cached.adaptation_id, tasks[0][2]).logits
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)


def test_client_channel_has_explicit_limits():
    assert dict(channel_options())["grpc.max_receive_message_length"] > MAX_REQUEST_BYTES


def test_an_engine_failure_is_internal_named_and_does_not_kill_the_server(server, client):
    sx, sy, qx = random_task(SPEC)
    run_batch = server.batcher._run_batch

    def broken(key, items):
        raise RuntimeError("device lost")

    server.batcher._run_batch = broken
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.adapt("tiny-5w", sx, sy)
    finally:
        server.batcher._run_batch = run_batch
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error in Adapt: RuntimeError: device lost"
    assert client.adapt_and_predict("tiny-5w", sx, sy, qx)[1].logits.shape == (3, 5)


def test_a_request_over_the_kernels_row_limit_is_refused_in_validation(make_server):
    """The engine reports how many rows per task its kernels take (the CUDA grid limit on a GPU); a request over it
    is INVALID_ARGUMENT naming the fields and the limit, before it reaches the engine."""
    server = make_server()
    server.engine.max_rows = lambda spec: 12  # what the Triton backend would report for a much larger model
    calls = []
    real = server.engine.adapt_predict
    server.engine.adapt_predict = lambda *a, **k: calls.append(1) or real(*a, **k)
    sx, sy, _ = random_task(SPEC, shots=2)  # 10 support rows
    with FastAdaptClient(server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.adapt_and_predict("tiny-5w", sx, sy, np.zeros((3, 1, 28, 28), np.uint8))
        assert err.value.code() == INVALID
        expected = "adapt.support_x (10 rows) + query_x (3 rows) = 13 rows per task, more than the 12"
        assert expected in err.value.details()
        assert not calls
        client.adapt_and_predict("tiny-5w", sx, sy, np.zeros((2, 1, 28, 28), np.uint8))  # 12 rows: served
    assert calls == [1]
