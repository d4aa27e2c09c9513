"""TLS and mutual TLS with a throw-away CA generated at test time."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raffm.errors import ConfigError
from raffm.v1 import registry_pb2
from services.common.server import ServerConfig
from services.common.tls import TlsFiles, channel_credentials, tls_from_flags
from services.registry.testing import ENROLL_KEY, RegistryHarness, make_profile



def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool, usage=None, sans=()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """CA, server certificate for 127.0.0.1/localhost, a client certificate, and a rogue CA's client certificate."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("raffm test CA", ca_key, _name("raffm test CA"), ca_key, ca=True)
    rogue = _issue("rogue CA", rogue_key, _name("rogue CA"), rogue_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("registry", server_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                    sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")))
    client = _issue("device-1", client_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = _issue("intruder", client_key, rogue.subject, rogue_key, ca=False,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca": _pem(ca), "server": _pem(server), "server_key": _key_pem(server_key), "client": _pem(client),
             "client_key": _key_pem(client_key), "rogue_client": _pem(rogue_client)}
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _register(address: str, creds: grpc.ChannelCredentials) -> registry_pb2.RegisterReply:
    from raffm.v1 import registry_pb2_grpc

    with grpc.secure_channel(address, creds) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        return stub.Register(registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name="tls-dev",
                                                          profile=make_profile()), timeout=5)


def _serve(tmp_path: Path, tls: TlsFiles) -> RegistryHarness:
    return RegistryHarness(f"sqlite:///{tmp_path / 'r.db'}", server=ServerConfig(tls=tls, grace_s=0.5)).start()


def test_tls_server_accepts_tls_clients_and_rejects_plaintext(tmp_path, pki):
    harness = _serve(tmp_path, TlsFiles(pki["server"], pki["server_key"]))
    try:
        reply = _register(harness.address, channel_credentials(ca=pki["ca"].read_bytes()))
        assert reply.created
        with pytest.raises(grpc.RpcError) as err:  # the harness's own channel is plaintext
            harness.register("plain")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # a client that does not trust the CA
            _register(harness.address, channel_credentials(ca=pki["rogue_client"].read_bytes()))
    finally:
        harness.stop(0)


def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path, pki):
    harness = _serve(tmp_path, TlsFiles(pki["server"], pki["server_key"], pki["ca"]))
    ca = pki["ca"].read_bytes()
    try:
        reply = _register(harness.address, channel_credentials(
            ca=ca, cert=pki["client"].read_bytes(), key=pki["client_key"].read_bytes()))
        assert reply.created
        with pytest.raises(grpc.RpcError) as err:  # no client certificate
            _register(harness.address, channel_credentials(ca=ca))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # a certificate from another CA
            _register(harness.address, channel_credentials(
                ca=ca, cert=pki["rogue_client"].read_bytes(), key=pki["client_key"].read_bytes()))
    finally:
        harness.stop(0)


def test_tls_flags_are_validated(tmp_path, pki):
    assert tls_from_flags(None, None, None) is None
    files = tls_from_flags(str(pki["server"]), str(pki["server_key"]), str(pki["ca"]))
    assert files is not None and files.mutual
    for cert, key, ca, flag in ((str(pki["server"]), None, None, "--tls-cert"),
                                (None, None, str(pki["ca"]), "--tls-ca"),
                                (str(tmp_path / "missing.pem"), str(pki["server_key"]), None, "--tls-cert")):
        with pytest.raises(ConfigError) as err:
            tls_from_flags(cert, key, ca)
        assert flag in str(err.value)
