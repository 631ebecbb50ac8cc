"""Bearer tokens and per-token quotas on real servers over loopback: refused without a valid token, health and
reflection open, tokens reloaded on SIGHUP, one token over its quota refused while another is served, and no token
ever written to the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.auth import AuthConfigError, TokenBucket, parse_tokens
from server.client import FastAdaptClient, adapt_and_predict_request
from server.launch import REPO_ROOT, ServerProcess
from server.security import Security, SecurityConfig
from server.wire import SERVICE_NAME, pb, pb_grpc
from tests.server.conftest import TINY_SPECS, free_port, random_task

ALICE = "alice-token-6f1d2c3b4a5e6f708192"
BOB = "bob-token-0a9b8c7d6e5f4a3b2c1d"
CAROL = "carol-token-11223344556677889900"
WRONG = "wrong-token-ffeeddccbbaa99887766"

EMPTY_REQUESTS = {
    "Adapt": pb.AdaptRequest(), "Predict": pb.PredictRequest(), "AdaptAndPredict": pb.AdaptAndPredictRequest(),
    "ListModels": pb.ListModelsRequest(), "GetModel": pb.GetModelRequest(), "ExportAdapted": pb.ExportAdaptedRequest(),
    "Release": pb.ReleaseRequest(),
}


def tokens_file(path, *lines: str):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic, as an operator's tooling should write it
    return path


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_fastadapt_rpc_needs_a_valid_bearer_token(make_server, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", "# team tokens", "", ALICE, f"{BOB}  # the batch jobs")
    server = make_server(security=SecurityConfig(auth_tokens=tokens))
    channel = grpc.insecure_channel(server.address)
    for rpc, request in EMPTY_REQUESTS.items():
        method = getattr(pb_stub(channel), rpc)
        for metadata, why in [(None, "missing authorization metadata"),
                              ((("authorization", f"Bearer {WRONG}"),), "the bearer token is not valid"),
                              ((("authorization", f"Basic {ALICE}"),), "not of the form 'Bearer <token>'"),
                              ((("authorization", ALICE),), "not of the form 'Bearer <token>'"),
                              ((("authorization", "Bearer "),), "not of the form 'Bearer <token>'")]:
            with pytest.raises(grpc.RpcError) as caught:
                method(request, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, metadata)
            assert why in caught.value.details() and ALICE not in caught.value.details()
        # With a valid token the same empty request reaches the service, which has its own say about it.
        code = code_of(lambda m=method, r=request: m(r, metadata=(("authorization", f"Bearer {BOB}"),), timeout=10))
        expected = {grpc.StatusCode.OK} if rpc == "ListModels" else {grpc.StatusCode.INVALID_ARGUMENT,
                                                                     grpc.StatusCode.NOT_FOUND}
        assert code in expected, (rpc, code)
    channel.close()
    with FastAdaptClient(server.address, timeout=30, token=ALICE) as c:
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=3)
        adapted, prediction = c.adapt_and_predict("tiny-5w", sx, sy, qx)
        assert prediction.labels.shape == (3,) and c.predict(adapted.adaptation_id, qx).logits.shape == (3, 5)
        assert c.release(adapted.adaptation_id) > 0
    samples = server.metrics.registry.get_sample_value
    assert samples("fastadapt_requests_total", {"rpc": "Adapt", "code": "UNAUTHENTICATED"}) == 5
    assert samples("fastadapt_auth_refusals_total", {"reason": "missing"}) == len(EMPTY_REQUESTS)
    assert samples("fastadapt_auth_refusals_total", {"reason": "malformed"}) == 3 * len(EMPTY_REQUESTS)
    assert samples("fastadapt_auth_tokens") == 2


def pb_stub(channel):
    return pb_grpc.FastAdaptStub(channel)


def test_health_and_reflection_answer_without_a_token(make_server, tmp_path):
    server = make_server(security=SecurityConfig(auth_tokens=tokens_file(tmp_path / "tokens", ALICE)))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
        assert code_of(lambda: pb_stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED


def test_one_token_over_its_rate_is_refused_while_another_is_served(make_server, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", f"{ALICE} name=hammer", f"{BOB} name=steady")
    server = make_server(security=SecurityConfig(auth_tokens=tokens, token_rps=5))
    hammer = FastAdaptClient(server.address, timeout=30, token=ALICE)
    steady = FastAdaptClient(server.address, timeout=30, token=BOB)
    futures = [hammer.stub.ListModels.future(pb.ListModelsRequest(), timeout=30) for _ in range(40)]
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=2)
    steady_codes = []
    for _ in range(4):  # 4 requests in ~0.9 s: within the steady client's own 5/s, while the hammer is refused
        steady_codes.append(code_of(lambda: steady.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)))
        time.sleep(0.3)
    outcomes = []
    for f in futures:
        outcomes.append(f.exception())
    refusals = [e for e in outcomes if e is not None]
    served = len(outcomes) - len(refusals)
    assert steady_codes == [grpc.StatusCode.OK] * 4
    assert 5 <= served <= 15, served  # a burst of 5, plus what refills while the 40 calls arrive
    assert len(refusals) >= 25 and {e.code() for e in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "token 'hammer' is over its request-rate quota of 5 requests/s (--token-rps" in refusals[0].details()
    assert ALICE not in refusals[0].details()
    time.sleep(0.5)  # the bucket refills at 5/s: the hammer is served again
    assert len(hammer.list_models()) == len(TINY_SPECS)
    hammer.close()
    steady.close()
    rate_refusals = server.metrics.registry.get_sample_value("fastadapt_auth_refusals_total", {"reason": "rps"})
    assert rate_refusals == len(refusals)


def test_one_token_over_its_concurrency_is_refused_while_another_is_served(make_server, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", f"{ALICE} name=greedy", f"{BOB} name=polite concurrency=4")
    # Every batch waits 0.6 s, so the first request of each token is still in flight when the others arrive.
    server = make_server(security=SecurityConfig(auth_tokens=tokens, token_concurrency=1), max_wait_ms=600,
                         batch_wait="fixed")
    greedy = FastAdaptClient(server.address, timeout=30, token=ALICE)
    polite = FastAdaptClient(server.address, timeout=30, token=BOB)
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=2)
    request = adapt_and_predict_request("tiny-5w", sx, sy, qx, keep=False)
    first = greedy.stub.AdaptAndPredict.future(request, timeout=30)
    time.sleep(0.15)
    greedy_more = [greedy.stub.AdaptAndPredict.future(request, timeout=30) for _ in range(3)]
    polite_calls = [polite.stub.AdaptAndPredict.future(request, timeout=30) for _ in range(3)]
    assert first.exception() is None and len(first.result().predict.labels) == 2
    for f in greedy_more:
        assert f.exception() is not None and f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("token 'greedy' already has 1 request(s) in flight, its concurrency quota is 1 "
                "(--token-concurrency") in f.exception().details()
    assert all(f.exception() is None for f in polite_calls), [f.exception() for f in polite_calls]
    # Done: the slot is free again.
    assert greedy.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)[1].labels.shape == (2,)
    greedy.close()
    polite.close()


def test_quotas_per_token_in_the_file_override_the_flags(make_server, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", f"{ALICE} name=slow rps=1", f"{BOB} name=free rps=0")
    server = make_server(security=SecurityConfig(auth_tokens=tokens, token_rps=2))
    with FastAdaptClient(server.address, timeout=10, token=ALICE) as slow, \
            FastAdaptClient(server.address, timeout=10, token=BOB) as free:
        assert code_of(slow.list_models) == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as caught:
            slow.list_models()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "token 'slow' is over its request-rate quota of 1 requests/s" in caught.value.details()
        assert all(code_of(free.list_models) == grpc.StatusCode.OK for _ in range(10))


def test_sighup_reloads_tokens_and_no_token_is_ever_logged(tiny_model_dir, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", "# v1", ALICE)
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model_dir, "--auth-tokens", str(tokens), "--token-rps", "100", "--log-level",
                           "debug", log_path=log)
    try:
        alice = FastAdaptClient(server.address, timeout=10, token=ALICE)
        bob = FastAdaptClient(server.address, timeout=10, token=BOB)
        wrong = FastAdaptClient(server.address, timeout=10, token=WRONG)
        assert code_of(alice.list_models) == grpc.StatusCode.OK
        assert code_of(bob.list_models) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(wrong.list_models) == grpc.StatusCode.UNAUTHENTICATED
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
        assert alice.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)[1].labels.shape == (3,)

        tokens_file(tokens, "# v2: alice revoked, bob and carol added", f"{BOB} name=bob", CAROL)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while code_of(bob.list_models) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as caught:
            alice.list_models()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no longer" in caught.value.details()
        with FastAdaptClient(server.address, timeout=10, token=CAROL) as carol:
            assert carol.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)[1].labels.shape == (3,)

        short = "tooshort"
        tokens_file(tokens, BOB, short)  # does not parse: the tokens in force stay
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "auth tokens not reloaded" not in log.read_text():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        assert code_of(bob.list_models) == grpc.StatusCode.OK
        with FastAdaptClient(server.address, timeout=10, token=CAROL) as carol:
            assert code_of(carol.list_models) == grpc.StatusCode.OK
        for c in (alice, bob, wrong):
            c.close()
    finally:
        code = server.stop()
    assert code == 0
    text = log.read_text()
    assert '"event": "auth tokens reloaded"' in text and '"added": 2, "removed": 1' in text
    assert f"{tokens} line 2: the token has 8 characters, expected 16 to 4096" in text
    assert text.count('"code": "UNAUTHENTICATED"') >= 3 and text.count('"code": "OK"') >= 5  # access log is there
    for secret in (ALICE, BOB, CAROL, WRONG, short):
        assert secret not in text, f"a token reached the server log: {secret[:6]}..."


def test_startup_refuses_an_unusable_tokens_file_naming_it(tiny_model_dir, tmp_path):
    missing = tmp_path / "absent-tokens"
    run = subprocess.run([sys.executable, "-m", "server", "--model-dir", str(tiny_model_dir), "--port", "0",
                          "--auth-tokens", str(missing)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--auth-tokens {missing}: no such file" in run.stderr, run.stderr[-2000:]
    empty = tokens_file(tmp_path / "empty", "# nothing yet", "")
    for config, message in [
        (SecurityConfig(auth_tokens=empty), f"--auth-tokens {empty}: holds no tokens"),
        (SecurityConfig(token_rps=5), "--token-rps 5 / --token-concurrency 0 are quotas per token: they need "
                                      "--auth-tokens FILE"),
        (SecurityConfig(auth_tokens=tokens_file(tmp_path / "t", ALICE), token_rps=-1), "--token-rps -1, expected"),
    ]:
        with pytest.raises(AuthConfigError) as caught:
            Security.from_config(config)
        assert message in str(caught.value)


@pytest.mark.parametrize("lines, message", [
    (["short"], "line 1: the token has 5 characters, expected 16 to 4096"),
    (["# c", "", "bad token with spaces"], "line 3: the token has 3 characters"),
    ([ALICE + "!"], "line 1: the token holds a character outside A-Z a-z 0-9"),
    ([ALICE, BOB, ALICE], "line 3: the same token as line 1"),
    ([f"{ALICE} colour=blue"], "line 1: field 'colour=blue', expected name=NAME, rps=R or concurrency=C"),
    ([f"{ALICE} rps=fast"], "line 1: rps='fast', expected a non-negative float"),
    ([f"{ALICE} concurrency=-2"], "line 1: concurrency='-2', expected a non-negative int"),
    ([f"{ALICE} name=x", f"{BOB} name=x"], "line 2: name=x is already used on line 1"),
    ([f"{ALICE} name=a/b"], "line 1: name='a/b', expected 1-64 of"),
])
def test_tokens_file_errors_name_the_line_never_the_token(lines, message):
    with pytest.raises(AuthConfigError) as caught:
        parse_tokens("\n".join(lines), "--auth-tokens t")
    assert message in str(caught.value)
    assert ALICE not in str(caught.value) and BOB not in str(caught.value)


def test_tokens_file_syntax():
    principals = parse_tokens(f"# header\n\n  {ALICE}  \n{BOB} name=jobs rps=2.5 concurrency=3 # trailing\n",
                              "t", rps=10, concurrency=1)
    assert [(p.name, p.rps, p.concurrency) for p in principals] == [("line 3", 10.0, 1), ("jobs", 2.5, 3)]
    assert all(len(p.digest) == 32 for p in principals) and not hasattr(principals[0], "token")


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=4.0, burst=2.0, stamp=100.0)
    assert [bucket.take(100.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.25)  # empty: one request refills in 1/4 s
    assert bucket.take(100.25) == 0.0
    assert bucket.take(110.0) == 0.0 and bucket.take(110.0) == 0.0 and bucket.take(110.0) > 0  # capped at burst 2


def test_concurrent_hammering_from_threads_never_exceeds_the_concurrency_quota(make_server, tmp_path):
    tokens = tokens_file(tmp_path / "tokens", f"{ALICE} name=threads concurrency=2")
    server = make_server(security=SecurityConfig(auth_tokens=tokens), max_wait_ms=50, batch_wait="fixed")
    sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=1)
    codes, lock = [], threading.Lock()

    def worker():
        with FastAdaptClient(server.address, timeout=30, token=ALICE) as c:
            for _ in range(3):
                code = code_of(lambda: c.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False))
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED} and len(codes) == 18
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert server.security.auth._in_flight == {}  # every slot given back


def test_metrics_endpoint_listens_on_its_own_address(make_server, tmp_path):
    """--metrics-host: the Prometheus endpoint can bind elsewhere than gRPC (here 127.0.0.2, gRPC on 127.0.0.1)."""
    import urllib.error
    import urllib.request

    port = free_port()
    make_server(metrics_port=port, metrics_host="127.0.0.2",
                security=SecurityConfig(auth_tokens=tokens_file(tmp_path / "tokens", ALICE)))
    text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read().decode()
    assert "fastadapt_auth_tokens 1.0" in text and ALICE not in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
