"""TLS for the server and the client: PEM files checked up front, turned into gRPC credentials.

Server: `--tls-cert FILE --tls-key FILE` serve TLS; `--tls-client-ca FILE` also requires every client to present a
certificate signed by that CA (mutual TLS). Every file is read and parsed before the port opens, so a missing,
unreadable or malformed file, or a key that does not belong to the certificate, stops the start-up with an error
naming the flag and the file (`python -m server` exits 2) rather than failing every handshake later.

Client: `client_credentials(ca, client_cert, client_key)` for `grpc.secure_channel`; with no CA file the system
roots are used.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

PEM_HINT = "a PEM file (-----BEGIN ...-----)"


class TLSConfigError(ValueError):
    """A TLS flag whose file is missing, unreadable or not what it must be; the message names flag and file."""


def _read(flag: str, path: Path | str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise TLSConfigError(f"{flag} {path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{flag} {path}: not {PEM_HINT}")
    return data


def _certificates(flag: str, path: Path | str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(flag, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(f"{flag} {path}: expected PEM certificate(s), cannot parse it ({exc})"[:300]) from exc
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:  # every handshake would fail: say so now, not once per client
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TLSConfigError(
                f"{flag} {path}: the certificate for {cert.subject.rfc4514_string()[:120]} is valid from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
                f"expected one valid now ({now:%Y-%m-%d %H:%M} UTC)"
            )
    return data, certs


def _private_key(flag: str, path: Path | str):
    data = _read(flag, path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted: gRPC cannot take a passphrase
        raise TLSConfigError(f"{flag} {path}: the private key is encrypted, expected an unencrypted PEM key") from exc
    except ValueError as exc:
        raise TLSConfigError(f"{flag} {path}: expected a PEM private key, cannot parse it ({exc})"[:300]) from exc
    return data, key


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class ServerTLS:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None  # set: clients must present a certificate signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def load_server_tls(cert: Path | str | None, key: Path | str | None, client_ca: Path | str | None) -> ServerTLS | None:
    """The checked TLS material of --tls-cert / --tls-key / --tls-client-ca; None when TLS is off (no flags)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TLSConfigError(f"--tls-client-ca {client_ca} needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise TLSConfigError(f"{given} {cert if key is None else key} needs {missing} as well")
    cert_pem, certs = _certificates("--tls-cert", cert)
    key_pem, private_key = _private_key("--tls-key", key)
    if _public_bytes(certs[0].public_key()) != _public_bytes(private_key.public_key()):
        raise TLSConfigError(
            f"--tls-key {key} does not belong to the first certificate of --tls-cert {cert} "
            f"(subject {certs[0].subject.rfc4514_string()[:120]}): expected the key the certificate was issued for"
        )
    ca_pem = _certificates("--tls-client-ca", client_ca)[0] if client_ca is not None else None
    return ServerTLS(cert_pem, key_pem, ca_pem)


def client_credentials(
    ca: Path | str | None = None, client_cert: Path | str | None = None, client_key: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials: trust `ca` (None: the system roots), present client_cert/client_key when given."""
    if (client_cert is None) != (client_key is None):
        given = "--client-cert" if client_key is None else "--client-key"
        raise TLSConfigError(f"{given} needs {'--client-key' if client_key is None else '--client-cert'} as well")
    root = _certificates("--ca", ca)[0] if ca is not None else None
    chain = _certificates("--client-cert", client_cert)[0] if client_cert is not None else None
    key = _private_key("--client-key", client_key)[0] if client_key is not None else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
