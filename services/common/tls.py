"""TLS and mutual TLS from PEM files, and the rule that plaintext is only for loopback."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from raffm.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate and key; with ``ca`` set, clients must present a certificate signed by it (mTLS)."""

    cert: Path
    key: Path
    ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


def tls_from_flags(cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
    """Validate the ``--tls-cert/--tls-key/--tls-ca`` combination; None means plaintext."""
    if not cert and not key:
        if ca:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certificates)",
                              field="--tls-ca")
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key must be given together", field="--tls-cert")
    files = TlsFiles(Path(cert), Path(key), Path(ca) if ca else None)
    for flag, path in (("--tls-cert", files.cert), ("--tls-key", files.key), ("--tls-ca", files.ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: no such file {str(path)!r}", field=flag)
    return files


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials; requires client certificates when a CA is configured."""
    root = files.ca.read_bytes() if files.ca else None
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def channel_credentials(
    ca: bytes | None = None, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (system roots when None) and present ``cert``/``key`` for mTLS."""
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; wildcard binds (0.0.0.0, ::, '') are not loopback."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(host: str, tls: TlsFiles | None, insecure: bool) -> None:
    """Refuse plaintext on a non-loopback bind unless the operator said ``--insecure``."""
    if tls is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve plaintext gRPC on non-loopback address {host!r}",
            field="--host",
            hint="pass --tls-cert/--tls-key (and --tls-ca for mTLS), bind 127.0.0.1, or add --insecure explicitly",
        )
