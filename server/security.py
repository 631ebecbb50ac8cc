"""The server's security settings in one place: TLS (server/tls.py) and bearer tokens with quotas (server/auth.py).

`SecurityConfig` is what the command line sets; `Security.from_config` checks every file before the server loads a
model (so a bad file fails the start-up fast, exit 2, naming flag and file) and gives app.py the interceptors, the
port to listen on (TLS or plaintext) and the SIGHUP handler that reloads the tokens.

`--health-port P` opens a second, plaintext port that serves grpc.health.v1 only (the same health state): Kubernetes'
native gRPC probes cannot speak TLS or send tokens, so with --tls-cert they probe this port instead.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from server.auth import AuthConfigError, AuthInterceptor, TokenAuth
from server.telemetry import get_logger
from server.tls import ServerTLS, load_server_tls


@dataclass
class SecurityConfig:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)
    auth_tokens: Path | None = None  # set: every FastAdapt RPC needs `authorization: Bearer <token>`
    token_rps: float = 0.0  # per token, 0 = unlimited
    token_concurrency: int = 0  # per token, 0 = unlimited
    health_port: int = 0  # a plaintext port serving grpc.health.v1 only (for probes that cannot speak TLS); 0 = off


def add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (see server/auth.py, server/tls.py)")
    g.add_argument("--tls-cert", type=Path, metavar="FILE",
                   help="serve TLS with this PEM certificate chain (needs --tls-key)")
    g.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert (unencrypted)")
    g.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                   help="require client certificates signed by this PEM CA (mutual TLS)")
    g.add_argument("--auth-tokens", type=Path, metavar="FILE",
                   help="file of bearer tokens, one per line (# comments; reloaded on SIGHUP): every FastAdapt RPC "
                        "then needs 'authorization: Bearer <token>'; health and reflection stay open")
    g.add_argument("--token-rps", type=float, default=0.0, metavar="R",
                   help="requests/s allowed per token, token bucket with bursts of max(1, R) (0 = unlimited)")
    g.add_argument("--token-concurrency", type=int, default=0, metavar="C",
                   help="requests in flight allowed per token (0 = unlimited)")
    g.add_argument("--health-port", type=int, default=0, metavar="P",
                   help="also serve grpc.health.v1 alone, plaintext, on this port (for Kubernetes gRPC probes, "
                        "which cannot speak TLS; 0 = off)")


def security_config(args: argparse.Namespace) -> SecurityConfig:
    return SecurityConfig(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, auth_tokens=args.auth_tokens,
        token_rps=args.token_rps, token_concurrency=args.token_concurrency, health_port=args.health_port,
    )


class Security:
    def __init__(self, tls: ServerTLS | None, auth: TokenAuth | None, health_port: int = 0):
        self.tls, self.auth, self.health_port = tls, auth, health_port
        self._health_server: grpc.aio.Server | None = None

    @classmethod
    def from_config(cls, config: SecurityConfig) -> Security:
        tls = load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        if not 0 <= config.health_port <= 65535:
            raise ValueError(f"--health-port {config.health_port}, expected a port 1-65535 (0 = off)")
        if config.auth_tokens is None:
            if config.token_rps or config.token_concurrency:
                raise AuthConfigError(
                    f"--token-rps {config.token_rps:g} / --token-concurrency {config.token_concurrency} are quotas "
                    "per token: they need --auth-tokens FILE"
                )
            return cls(tls, None, config.health_port)
        auth = TokenAuth(config.auth_tokens, config.token_rps, config.token_concurrency)
        return cls(tls, auth, config.health_port)

    def bind_metrics(self, registry) -> None:
        if self.auth is not None:
            self.auth.bind_metrics(registry)

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """To go after the StatusInterceptor (see AuthInterceptor)."""
        return [AuthInterceptor(self.auth)] if self.auth is not None else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.credentials())

    async def open_health_port(self, health_servicer, host: str) -> None:
        """With --health-port: serve `health_servicer` (the main port's health state) alone, plaintext."""
        if not self.health_port:
            return
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            server.add_insecure_port(f"{host}:{self.health_port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{self.health_port} (--health-port): {exc}") from exc
        await server.start()
        self._health_server = server

    async def close_health_port(self) -> None:
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None

    def summary(self) -> dict:
        """For the 'serving' log line: what is on, never a secret."""
        return {"tls": self.tls is not None, "mtls": self.tls is not None and self.tls.client_ca is not None,
                "auth_tokens": len(self.auth) if self.auth is not None else 0, "health_port": self.health_port}

    def on_sighup(self) -> None:
        if self.auth is not None:
            self.auth.reload()
        else:
            get_logger().info("SIGHUP: nothing to reload (no --auth-tokens)")
