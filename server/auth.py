"""Bearer tokens and per-token quotas for the FastAdapt service.

`--auth-tokens FILE` turns authentication on: every FastAdapt RPC then needs the metadata
`authorization: Bearer <token>` with a token listed in FILE, or it is answered UNAUTHENTICATED before its request
is even parsed. grpc.health.v1 and server reflection stay open, so load-balancer and Kubernetes probes work.

The file holds one token per line; blank lines and `#` comments are ignored. A token may be followed by fields that
override the server-wide quotas for it and name it in logs and error messages:

    # fastadapt tokens: python -c 'import secrets; print(secrets.token_urlsafe(32))'
    Hk3k0QyX0m1f2lU2nU7cF1hB8l6J5k9cW3m0QyX0m1f
    pX2b9yZ3Vq7w8e1r4t6y0u2i5o7p9a1s3d5f7g9h1j3  name=batch-jobs rps=50 concurrency=8

Tokens are 16 to 4096 characters of the RFC 6750 token alphabet (A-Z a-z 0-9 - . _ ~ + / =). The file is re-read on
SIGHUP; a file that does not parse leaves the tokens in force unchanged (and says why in the log). Tokens are compared
in constant time (hmac.compare_digest of SHA-256 digests, over every token) and never logged; logs and errors name a
token by its `name=` or, without one, by its line number.

Quotas (`--token-rps R`, `--token-concurrency C`, 0 = unlimited, or rps= / concurrency= per token): each token has its
own token bucket (R requests per second, bursts of up to max(1, R)) and its own count of requests in flight, so one
client over its quota is answered RESOURCE_EXHAUSTED naming the limit while every other token is served as before.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import Counter, Gauge

from server.status import RequestError, ResourceExhausted
from server.telemetry import get_logger
from server.wire import SERVICE_NAME

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
_NAME = re.compile(r"^[A-Za-z0-9._@:-]{1,64}$")
_PREFIX = f"/{SERVICE_NAME}/"
GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class Unauthenticated(RequestError):
    code = grpc.StatusCode.UNAUTHENTICATED


class AuthConfigError(ValueError):
    """An --auth-tokens file or quota flag that cannot be used; the message never holds a token."""


@dataclass(frozen=True)
class Principal:
    """One token of the file: its digest (the token itself is not kept), its name and its quotas (0 = unlimited)."""

    digest: bytes
    name: str
    rps: float
    concurrency: int


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _number(value: str, key: str, where: str, kind):
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise AuthConfigError(f"{where}: {key}={value[:40]!r}, expected a non-negative {kind.__name__} (0 = unlimited)")
    return number


def parse_tokens(text: str, source: str, rps: float = 0.0, concurrency: int = 0) -> list[Principal]:
    """The principals of a tokens file's text; `source` names the file in errors, rps/concurrency are the defaults."""
    principals, seen_digests, seen_names = [], {}, {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        token, *fields = line.split()
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise AuthConfigError(
                f"{where}: the token has {len(token)} characters, expected {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                f"(make one with {GENERATE_HINT})"
            )
        if not _TOKEN.match(token):
            raise AuthConfigError(f"{where}: the token holds a character outside A-Z a-z 0-9 - . _ ~ + / = (RFC 6750)")
        name, token_rps, token_concurrency = f"line {number}", rps, concurrency
        for item in fields:
            key, sep, value = item.partition("=")
            if not sep or key not in ("name", "rps", "concurrency"):
                raise AuthConfigError(
                    f"{where}: field {item[:40]!r}, expected name=NAME, rps=R or concurrency=C after the token"
                )
            if key == "name":
                if not _NAME.match(value):
                    raise AuthConfigError(f"{where}: name={value[:40]!r}, expected 1-64 of A-Z a-z 0-9 . _ @ : -")
                name = value
            elif key == "rps":
                token_rps = _number(value, key, where, float)
            else:
                token_concurrency = _number(value, key, where, int)
        digest = _digest(token)
        if digest in seen_digests:
            raise AuthConfigError(f"{where}: the same token as line {seen_digests[digest]}, expected each token once")
        if name in seen_names:
            raise AuthConfigError(f"{where}: name={name} is already used on line {seen_names[name]}")
        seen_digests[digest], seen_names[name] = number, number
        principals.append(Principal(digest, name, float(token_rps), int(token_concurrency)))
    return principals


def read_tokens(path: Path, rps: float = 0.0, concurrency: int = 0) -> list[Principal]:
    source = f"--auth-tokens {path}"
    if not path.is_file():
        raise AuthConfigError(f"{source}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"{source}: cannot read it as UTF-8 text ({exc})"[:300]) from exc
    principals = parse_tokens(text, source, rps, concurrency)
    if not principals:
        raise AuthConfigError(f"{source}: holds no tokens, expected one token per line (make one with {GENERATE_HINT})")
    return principals


@dataclass
class TokenBucket:
    """`rate` requests per second with bursts of up to `burst`; `take()` says how long to wait (0: admitted)."""

    rate: float
    burst: float
    stamp: float = field(default_factory=time.monotonic)
    level: float | None = None  # requests that may go now; None: a full bucket

    def __post_init__(self):
        if self.level is None:
            self.level = self.burst

    def take(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class TokenAuth:
    """The tokens in force (reloadable) and each token's quota state. Runs on the server's event loop only."""

    def __init__(self, path: Path, rps: float = 0.0, concurrency: int = 0):
        if not math.isfinite(rps) or rps < 0:
            raise AuthConfigError(f"--token-rps {rps}, expected a non-negative number of requests/s (0 = unlimited)")
        if concurrency < 0:
            raise AuthConfigError(f"--token-concurrency {concurrency}, expected a non-negative count (0 = unlimited)")
        self.path, self.rps, self.concurrency = Path(path), rps, concurrency
        self._log = get_logger()
        self._principals: tuple[Principal, ...] = tuple(read_tokens(self.path, rps, concurrency))
        self._buckets: dict[bytes, TokenBucket] = {}
        self._in_flight: dict[bytes, int] = {}
        self._refusals = None

    def bind_metrics(self, registry) -> None:
        """Export the token count and the refusals by reason on a server's Prometheus registry."""
        Gauge("fastadapt_auth_tokens", "Tokens in force (--auth-tokens)", registry=registry).set_function(
            lambda: len(self._principals)
        )
        self._refusals = Counter(
            "fastadapt_auth_refusals", "FastAdapt RPCs refused before the service, by reason "
            "(missing / malformed / invalid token, rps / concurrency quota)", ["reason"], registry=registry,
        )

    def __len__(self) -> int:
        return len(self._principals)

    def reload(self) -> bool:
        """Re-read the tokens file (SIGHUP). On any error the tokens in force stay as they are; False then."""
        try:
            principals = tuple(read_tokens(self.path, self.rps, self.concurrency))
        except AuthConfigError as exc:
            self._log.error("auth tokens not reloaded, the previous tokens stay in force", extra={"error": str(exc)})
            return False
        old = {p.digest for p in self._principals}
        new = {p.digest for p in principals}
        self._principals = principals
        for digest in list(self._buckets):  # removed tokens, and tokens whose rate changed, start afresh
            if digest not in new or self._buckets[digest].rate != self._find(digest).rps:
                del self._buckets[digest]
        self._log.info("auth tokens reloaded", extra={"file": str(self.path), "tokens": len(new),
                                                      "added": len(new - old), "removed": len(old - new)})
        return True

    def _find(self, digest: bytes) -> Principal | None:
        match = None
        for principal in self._principals:  # every token, no early exit: the time does not depend on which matched
            if hmac.compare_digest(digest, principal.digest):
                match = principal
        return match

    def _refuse(self, reason: str, error: RequestError) -> RequestError:
        if self._refusals is not None:
            self._refusals.labels(reason=reason).inc()
        return error

    def authenticate(self, metadata) -> Principal:
        """The principal of a call's `authorization: Bearer <token>` metadata; raises Unauthenticated."""
        value = None
        for key, item in metadata or ():
            if key == "authorization":
                value = item.decode("latin-1") if isinstance(item, bytes) else item
        if value is None:
            raise self._refuse("missing", Unauthenticated(
                "missing authorization metadata: expected 'authorization: Bearer <token>' with a token of the "
                "server's --auth-tokens file"
            ))
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._refuse("malformed", Unauthenticated(
                "authorization metadata is not of the form 'Bearer <token>'"
            ))
        principal = self._find(_digest(token))
        if principal is None:
            raise self._refuse("invalid", Unauthenticated(
                "the bearer token is not valid: it is not (or no longer) in the server's --auth-tokens file"
            ))
        return principal

    def admit_rate(self, principal: Principal) -> None:
        """Take one request from the principal's bucket; raises ResourceExhausted naming the limit when empty."""
        if principal.rps <= 0:
            return
        bucket = self._buckets.get(principal.digest)
        if bucket is None:
            bucket = self._buckets[principal.digest] = TokenBucket(principal.rps, max(1.0, principal.rps))
        wait = bucket.take()
        if wait > 0:
            raise self._refuse("rps", ResourceExhausted(
                f"token '{principal.name}' is over its request-rate quota of {principal.rps:g} requests/s "
                f"(--token-rps or rps= in --auth-tokens); retry in {wait:.3f} s"
            ))

    def acquire(self, principal: Principal) -> None:
        """Count one more request in flight for the principal; raises ResourceExhausted over its concurrency."""
        count = self._in_flight.get(principal.digest, 0)
        if principal.concurrency and count >= principal.concurrency:
            raise self._refuse("concurrency", ResourceExhausted(
                f"token '{principal.name}' already has {count} request(s) in flight, its concurrency quota is "
                f"{principal.concurrency} (--token-concurrency or concurrency= in --auth-tokens)"
            ))
        self._in_flight[principal.digest] = count + 1

    def release(self, principal: Principal) -> None:
        count = self._in_flight.get(principal.digest, 0) - 1
        if count > 0:
            self._in_flight[principal.digest] = count
        else:
            self._in_flight.pop(principal.digest, None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and meters every FastAdapt method; health and reflection pass through untouched.

    Goes after the StatusInterceptor in the server's list, so that its refusals (RequestError subclasses) are
    answered, counted and logged like any other. The decision is taken from the call's metadata before the service
    is looked at; the refusal is raised when the call runs (inside the StatusInterceptor, which may read the parsed
    request, so a refused request is still deserialized).
    """

    def __init__(self, auth: TokenAuth):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(_PREFIX):
            return await continuation(handler_call_details)
        refusal = None
        try:
            principal = self.auth.authenticate(handler_call_details.invocation_metadata)
            self.auth.admit_rate(principal)
        except RequestError as exc:
            refusal = exc
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:  # unknown method: UNIMPLEMENTED (reflection is open anyway)
            return handler
        if refusal is not None:
            return _refusal(refusal, handler)
        inner, auth = handler.unary_unary, self.auth

        async def metered(request, context):
            auth.acquire(principal)
            try:
                return await inner(request, context)
            finally:
                auth.release(principal)

        return grpc.unary_unary_rpc_method_handler(
            metered,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _refusal(error: RequestError, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        raise error

    return grpc.unary_unary_rpc_method_handler(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
