"""The deployment files in deploy/ hold together: no container runtime runs here, so every file is parsed, every flag
passed to `python -m server` must exist in its --help, and ports, paths and names must agree between the Dockerfile,
the compose file, Envoy, Prometheus and the Kubernetes manifests."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.auth import parse_tokens
from server.wire import SERVICE_NAME, pb

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# Flags the deployment files use before the server has them. Each entry must go as soon as `python -m server --help`
# lists the flag (test_allow_list_only_holds_flags_the_server_still_lacks says so).
NOT_YET_IN_SERVER: dict[str, str] = {}


@pytest.fixture(scope="module")
def server_flags() -> set[str]:
    run = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", run.stdout))


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def value_of(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def check_flags(argv: list[str], server_flags: set[str], where: str) -> None:
    unknown = [f for f in flags_of(argv) if f not in server_flags and f not in NOT_YET_IN_SERVER]
    assert not unknown, f"{where} passes {unknown} to python -m server, whose --help has no such flag"


# ---- Dockerfile -----------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    found = {"FROM": [], "COPY": [], "EXPOSE": [], "ARG": []}
    for op, rest in instructions:
        if op in ("ENTRYPOINT", "CMD"):
            found[op] = json.loads(rest)  # exec form: python is PID 1 and gets SIGTERM / SIGHUP
        elif op in found:
            found[op].append(rest)
    return found


def server_argv(dockerfile: dict) -> list[str]:
    assert dockerfile["ENTRYPOINT"] == ["python", "-m", "server"]
    return dockerfile["CMD"]


def test_dockerfile_runs_the_server_with_the_bundled_models(dockerfile, server_flags):
    argv = server_argv(dockerfile)
    check_flags(argv, server_flags, "deploy/Dockerfile CMD")
    model_dir = value_of(argv, "--model-dir")
    assert list((ROOT / model_dir).glob("*.pt")), f"--model-dir {model_dir}: no bundled checkpoints in the repository"
    copied = {shlex.split(c)[0].rstrip("/") for c in dockerfile["COPY"]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert Path(model_dir).parts[0] in copied and {"server", "protos", "requirements.txt"} <= copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] != "**" or all(f"!{s}/" in ignore or f"!{s}" in ignore for s in copied), \
        "the .dockerignore must let every COPY source into the build context"
    exposed = {int(p) for e in dockerfile["EXPOSE"] for p in e.split()}
    assert exposed == {int(value_of(argv, f)) for f in ("--port", "--health-port", "--metrics-port")}
    assert value_of(argv, "--host") == "0.0.0.0" and value_of(argv, "--metrics-host") == "0.0.0.0"


def test_dockerfile_has_a_cpu_and_a_cuda_variant(dockerfile):
    assert "VARIANT=cpu" in dockerfile["ARG"]
    stages = {f.split()[-1] for f in dockerfile["FROM"] if " AS " in f.upper()}
    assert {"base-cpu", "base-cuda"} <= stages
    assert any(f.startswith("base-${VARIANT}") for f in dockerfile["FROM"])
    cuda_base = next(f for f in dockerfile["FROM"] if f.endswith("base-cuda"))
    assert cuda_base.startswith("nvidia/cuda:")


# ---- compose, Envoy, Prometheus ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load((DEPLOY / "envoy.yaml").read_text())


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def test_every_deploy_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"


def test_compose_runs_redis_two_replicas_envoy_and_prometheus(compose, server_flags):
    services = compose["services"]
    assert {"redis", "fastadapt", "envoy", "prometheus"} <= set(services)
    app = services["fastadapt"]
    assert app["deploy"]["replicas"] == 2
    build = app["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert build["args"]["VARIANT"] in ("cpu", "cuda")
    argv = app["command"]
    check_flags(argv, server_flags, "docker-compose.yml fastadapt command")
    exposed = {int(p) for p in app["expose"]}
    assert {int(value_of(argv, f)) for f in ("--port", "--health-port", "--metrics-port")} <= exposed
    # The shared store is the compose Redis, on the port Redis listens on.
    store = re.fullmatch(r"redis://([\w.-]+):(\d+)/(\d+)", value_of(argv, "--adaptation-store"))
    assert store and store[1] == "redis", value_of(argv, "--adaptation-store")
    redis = services["redis"]
    assert int(value_of(redis["command"], "--port")) == int(store[2]) and store[2] in redis["expose"]
    assert "--maxmemory-policy" in redis["command"]
    # Tokens come from a compose secret, mounted where --auth-tokens reads them.
    tokens = value_of(argv, "--auth-tokens")
    secret = tokens.removeprefix("/run/secrets/")
    assert secret in app["secrets"] and secret in compose["secrets"]
    assert Path(compose["secrets"][secret]["file"]).parent == Path("secrets")
    parse_tokens((DEPLOY / "secrets" / "tokens.example").read_text(), "tokens.example")  # the documented syntax
    health = " ".join(app["healthcheck"]["test"])
    assert f"127.0.0.1:{value_of(argv, '--health-port')}" in health and "HealthStub" in health
    grace = float(value_of(argv, "--grace-s"))
    assert float(app["stop_grace_period"].removesuffix("s")) > grace


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host file (relative to deploy/) of a compose service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = DEPLOY / source
    return out


def published(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def test_compose_mounts_the_envoy_and_prometheus_configs_where_they_are_read(compose):
    envoy = compose["services"]["envoy"]
    files = mounts(envoy)
    config = value_of(envoy["command"], "-c")
    assert files[config].resolve() == (DEPLOY / "envoy.yaml").resolve() and files[config].is_file()
    prom = compose["services"]["prometheus"]
    config = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert mounts(prom)[config].resolve() == (DEPLOY / "prometheus.yml").resolve()


def envoy_routes(envoy: dict) -> list[dict]:
    listener = envoy["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"]]


def test_envoy_balances_grpc_over_the_replicas_with_ring_hash_health_checks_and_retries(envoy, compose):
    app = compose["services"]["fastadapt"]
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    cluster = clusters["fastadapt"]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    endpoints = [e["endpoint"]["address"]["socket_address"] for group in cluster["load_assignment"]["endpoints"]
                 for e in group["lb_endpoints"]]
    assert endpoints == [{"address": "fastadapt", "port_value": int(value_of(app["command"], "--port"))}]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAME

    rpcs = [m.name for m in pb.DESCRIPTOR.services_by_name["FastAdapt"].methods]
    routes = envoy_routes(envoy)
    assert all(r["route"]["cluster"] in clusters for r in routes)

    def route_for(rpc: str) -> dict:
        path = f"/{SERVICE_NAME}/{rpc}"
        for r in routes:
            match = r["match"]
            if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path):
                return r
            if "prefix" in match and path.startswith(match["prefix"]):
                return r
        raise AssertionError(f"no Envoy route for {path}")

    idempotent = {"Predict", "ExportAdapted", "GetModel", "ListModels"}
    assert idempotent < set(rpcs)
    for rpc in rpcs:
        route = route_for(rpc)["route"]
        assert route["hash_policy"] == [{"header": {"header_name": "x-adaptation-id"}}], rpc
        retry_on = route["retry_policy"]["retry_on"].split(",")
        assert ("unavailable" in retry_on) == (rpc in idempotent), rpc
    assert route_for("Health")["route"]["cluster"] == "fastadapt"  # grpc.health.v1 and reflection are routed too

    listener_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    assert {listener_port, admin_port} <= published(compose["services"]["envoy"])


def test_prometheus_scrapes_every_replica_and_envoy(prometheus, compose, envoy):
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    app = compose["services"]["fastadapt"]
    sd = jobs["fastadapt"]["dns_sd_configs"][0]
    assert sd["names"] == ["fastadapt"] and sd["type"] == "A"
    assert sd["port"] == int(value_of(app["command"], "--metrics-port"))
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{admin_port}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert published(compose["services"]["prometheus"]) == {9090}


# ---- Kubernetes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def container(k8s) -> dict:
    deployment = k8s[("Deployment", "fastadapt")]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    return server


def test_k8s_deployment_flags_ports_and_probes_agree(k8s, server_flags):
    deployment = k8s[("Deployment", "fastadapt")]
    pod = deployment["spec"]["template"]
    server = container(k8s)
    assert server["command"] == ["python", "-m", "server"]
    argv = [str(a) for a in server["args"]]
    check_flags(argv, server_flags, "deploy/k8s/deployment.yaml args")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": int(value_of(argv, "--port")), "health": int(value_of(argv, "--health-port")),
                     "metrics": int(value_of(argv, "--metrics-port"))}
    assert "--tls-cert" in argv  # so the kubelet's gRPC probes (no TLS) must use the plaintext health port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == ports["health"], probe
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(value_of(argv, "--grace-s"))
    assert value_of(argv, "--model-dir") == value_of(server_argv_of_image(), "--model-dir")


def server_argv_of_image() -> list[str]:
    for op, rest in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if op == "CMD":
            return json.loads(rest)
    raise AssertionError("deploy/Dockerfile has no CMD")


def test_k8s_secrets_are_mounted_where_the_flags_read_them(k8s):
    server = container(k8s)
    argv = [str(a) for a in server["args"]]
    pod_spec = k8s[("Deployment", "fastadapt")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mount_of = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    for flag in ("--tls-cert", "--tls-key", "--auth-tokens"):
        path = Path(value_of(argv, flag))
        volume = volumes[mount_of[str(path.parent)]]
        secret = k8s[("Secret", volume["secret"]["secretName"])]
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        assert path.name in keys, f"{flag} {path}: the Secret {secret['metadata']['name']} has no key {path.name}"
    assert k8s[("Secret", "fastadapt-tls")]["type"] == "kubernetes.io/tls"
    parse_tokens(k8s[("Secret", "fastadapt-tokens")]["stringData"]["tokens"], "fastadapt-tokens")


def test_k8s_services_and_autoscaler_point_at_the_deployment(k8s):
    deployment = k8s[("Deployment", "fastadapt")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container(k8s)["ports"]}
    grpc_port = next(p["containerPort"] for p in container(k8s)["ports"] if p["name"] == "grpc")
    services = {name: obj for (kind, name), obj in k8s.items() if kind == "Service"}
    assert set(services) == {"fastadapt", "fastadapt-headless"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
        assert any(p["targetPort"] == "grpc" and p["port"] == grpc_port for p in service["spec"]["ports"])
    assert services["fastadapt-headless"]["spec"]["clusterIP"] == "None"
    hpa = k8s[("HorizontalPodAutoscaler", "fastadapt")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == ("Deployment", "fastadapt", "apps/v1")
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_allow_list_only_holds_flags_the_server_still_lacks(server_flags):
    landed = sorted(set(NOT_YET_IN_SERVER) & server_flags)
    assert not landed, f"python -m server --help now lists {landed}: remove them from NOT_YET_IN_SERVER"
