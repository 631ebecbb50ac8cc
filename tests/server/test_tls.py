"""TLS and mutual TLS with real certificates made in the test: served calls work, plaintext and untrusted peers are
refused, and bad certificate files stop the start-up naming the flag and the file."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import client as client_cli
from server import demo
from server.client import FastAdaptClient
from server.launch import REPO_ROOT
from server.security import SecurityConfig
from server.tls import TLSConfigError, client_credentials, load_server_tls
from server.wire import SERVICE_NAME, pb, pb_grpc
from tests.server.conftest import TINY_SPECS, free_port, random_task
from tests.server.pki import make_pki

TOKEN = "tls-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def refused(make_client, timeout: float = 5.0) -> grpc.RpcError:
    with make_client() as c, pytest.raises(grpc.RpcError) as caught:
        c.list_models(timeout=timeout)
    return caught.value


def test_tls_server_serves_tls_clients_and_refuses_plaintext_and_untrusted_ones(make_server, pki):
    server = make_server(security=SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key))
    with FastAdaptClient(server.address, timeout=30, ca=pki.ca.cert) as c:
        assert {m["name"] for m in c.list_models()} == set(TINY_SPECS)
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=4)
        adapted, prediction = c.adapt_and_predict("tiny-5w", sx, sy, qx)
        assert prediction.logits.shape == (4, 5) and np.isfinite(prediction.logits).all()
        assert c.predict(adapted.adaptation_id, qx).labels.shape == (4,)
        health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.security.summary() == {"tls": True, "mtls": False, "auth_tokens": 0, "health_port": 0}

    plaintext = refused(lambda: FastAdaptClient(server.address))
    assert plaintext.code() == grpc.StatusCode.UNAVAILABLE
    untrusted = refused(lambda: FastAdaptClient(server.address, ca=pki.rogue_ca.cert))  # a CA that did not sign it
    assert untrusted.code() == grpc.StatusCode.UNAVAILABLE
    # The certificate names localhost and 127.0.0.1; under another name the client must refuse it.
    wrong_name = refused(lambda: FastAdaptClient(server.address, ca=pki.ca.cert, server_name="elsewhere.example"))
    assert wrong_name.code() == grpc.StatusCode.UNAVAILABLE
    with FastAdaptClient(server.address, ca=pki.ca.cert, server_name="localhost") as c:
        assert len(c.list_models(timeout=10)) == len(TINY_SPECS)


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(make_server, pki):
    server = make_server(security=SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key,
                                                 tls_client_ca=pki.ca.cert))
    assert server.security.summary()["mtls"] is True
    with FastAdaptClient(server.address, timeout=30, ca=pki.ca.cert, client_cert=pki.client.cert,
                         client_key=pki.client.key) as c:
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"], queries=2)
        assert c.adapt_and_predict("tiny-5w", sx, sy, qx, keep=False)[1].labels.shape == (2,)
    no_cert = refused(lambda: FastAdaptClient(server.address, ca=pki.ca.cert))
    assert no_cert.code() == grpc.StatusCode.UNAVAILABLE
    rogue = refused(lambda: FastAdaptClient(server.address, ca=pki.ca.cert, client_cert=pki.rogue_client.cert,
                                            client_key=pki.rogue_client.key))
    assert rogue.code() == grpc.StatusCode.UNAVAILABLE
    assert refused(lambda: FastAdaptClient(server.address)).code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_answers_plaintext_probes_of_a_mutual_tls_server(make_server, aio_thread, pki, tmp_path):
    """Kubernetes' gRPC probes cannot speak TLS: --health-port serves the same health state, and nothing else."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    probe_port = free_port()
    server = make_server(security=SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key,
                                                 tls_client_ca=pki.ca.cert, auth_tokens=tokens,
                                                 health_port=probe_port))
    with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.FastAdaptStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the service itself is only behind TLS
        # The probe port reports the main port's health state.
        aio_thread.call(server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_client_cli_over_tls_with_a_token_from_flag_or_environment(make_server, pki, tmp_path, capsys, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = make_server(security=SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key,
                                                 tls_client_ca=pki.ca.cert, auth_tokens=tokens))
    tls = ["--address", server.address, "--ca", str(pki.ca.cert), "--client-cert", str(pki.client.cert),
           "--client-key", str(pki.client.key), "--timeout", "10"]
    assert client_cli.main([*tls, "--token", TOKEN, "models"]) == 0
    assert "tiny-5w\tconv4-omniglot\t5-way" in capsys.readouterr().out
    monkeypatch.setenv(client_cli.TOKEN_ENV, TOKEN)
    assert client_cli.main([*tls, "models"]) == 0
    assert "tiny-mini" in capsys.readouterr().out
    monkeypatch.delenv(client_cli.TOKEN_ENV)
    assert client_cli.main([*tls, "models"]) == 1
    assert "error: UNAUTHENTICATED: missing authorization metadata" in capsys.readouterr().err
    assert client_cli.main([*tls[:-2], "--ca", str(tmp_path / "nowhere.pem"), "models"]) == 2
    assert f"--ca {tmp_path / 'nowhere.pem'}: no such file" in capsys.readouterr().err


def test_demo_runs_against_a_tls_and_token_server(tmp_path, pki, monkeypatch, capsys):
    """The demo's own server started with TLS + tokens; characters are synthetic (decoding Omniglot takes a minute)."""
    rng = np.random.default_rng(0)
    characters = {f"a/c{i}": rng.integers(0, 256, size=(20, 1, 28, 28), dtype=np.uint8) for i in range(25)}
    monkeypatch.setattr(demo, "load_evaluation_characters", lambda root, progress=True: characters)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# demo\n{TOKEN} name=demo\n")
    empty = tmp_path / "zoo"
    empty.mkdir()
    argv = ["--model-dir", str(empty), "--tasks", "2", "--warmup-tasks", "0", "--queries-per-class", "1",
            "--no-progress", "--device", "cpu", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--auth-tokens", str(tokens), "--token", TOKEN, "--ca", str(pki.ca.cert)]
    assert demo.main(argv) == 0
    assert "server stopped with SIGTERM, exit code 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo.main([a for a in argv if a != TOKEN and a != "--token"])  # --auth-tokens without a token for the client
    assert "--auth-tokens needs --token" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing cert", "not pem", "garbage pem", "key of another cert", "no key",
                                  "no cert", "ca without tls", "missing ca", "encrypted key", "expired"])
def test_bad_tls_files_are_refused_naming_flag_and_file(pki, tmp_path, case):
    from cryptography.hazmat.primitives import serialization

    missing, text, garbage = tmp_path / "missing.pem", tmp_path / "text.pem", tmp_path / "garbage.pem"
    text.write_text("hello\n")
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    cert, key = pki.server.cert, pki.server.key
    cases = {
        "missing cert": ((missing, key, None), f"--tls-cert {missing}: no such file"),
        "not pem": ((text, key, None), f"--tls-cert {text}: not a PEM file"),
        "garbage pem": ((garbage, key, None), f"--tls-cert {garbage}: expected PEM certificate(s), cannot parse"),
        "key of another cert": ((cert, pki.client.key, None),
                                f"--tls-key {pki.client.key} does not belong to the first certificate of --tls-cert"),
        "no key": ((cert, None, None), f"--tls-cert {cert} needs --tls-key as well"),
        "no cert": ((None, key, None), f"--tls-key {key} needs --tls-cert as well"),
        "ca without tls": ((None, None, pki.ca.cert), f"--tls-client-ca {pki.ca.cert} needs --tls-cert and --tls-key"),
        "missing ca": ((cert, key, missing), f"--tls-client-ca {missing}: no such file"),
        "encrypted key": ((cert, encrypted, None), f"--tls-key {encrypted}: the private key is encrypted"),
        "expired": ((pki.expired_server.cert, pki.expired_server.key, None),
                    f"--tls-cert {pki.expired_server.cert}: the certificate for CN=localhost is valid from "),
    }
    args, message = cases[case]
    with pytest.raises(TLSConfigError) as caught:
        load_server_tls(*args)
    assert message in str(caught.value) and len(str(caught.value)) <= 400


def test_client_certificate_needs_its_key(pki):
    with pytest.raises(TLSConfigError, match="--client-cert needs --client-key as well"):
        client_credentials(pki.ca.cert, client_cert=pki.client.cert)


def test_server_process_exits_2_naming_the_bad_tls_file(tiny_model_dir, pki):
    """One real start-up (each costs seconds of imports); the other bad files are covered above, in-process."""
    run = subprocess.run([sys.executable, "-m", "server", "--model-dir", str(tiny_model_dir), "--port", "0",
                          "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    message = f"--tls-key {pki.client.key} does not belong to the first certificate of --tls-cert {pki.server.cert}"
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert '"event": "startup failed"' in run.stderr and '"event": "serving"' not in run.stderr
