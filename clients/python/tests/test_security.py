"""The publisher over TLS and mutual TLS, as a tenant, against the real binary with a
CA and certificates made in the test (grpcio's TLS, the `cryptography` package)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ingest_client import PublishError, Publisher, RetrySettings
from support import Ingest

GUARD = 60.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, sans: list, usage) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("leaf"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def secured(tmp_path: Path, queue):
    """ingest with TLS, mutual TLS optional for callers with a token, and two tenants."""
    ca = Ca("test CA")
    clients = Ca("client CA")
    cert, key = ca.issue(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    (tmp_path / "server.pem").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    (tmp_path / "clients.pem").write_bytes(clients.pem())
    token_sha = hashlib.sha256(b"py-secret").hexdigest()
    (tmp_path / "tenants.toml").write_text(
        f"""
[[tenant]]
name = "python-ml"
tokens_sha256 = ["{token_sha}"]
topics = ["ml.#"]

[[tenant]]
name = "cert-logger"
client_cert_names = ["logger.ml.svc"]
topics = ["ml.#"]
"""
    )
    server = Ingest(
        queue.exchange,
        extra=(
            "--tls-cert", str(tmp_path / "server.pem"),
            "--tls-key", str(tmp_path / "server.key"),
            "--auth-file", str(tmp_path / "tenants.toml"),
        ),
    ).ready()
    yield server, ca, clients, tmp_path
    server.stop()


def test_a_grpcio_client_over_tls_publishes_as_its_tenant(secured, queue):
    server, ca, _, _ = secured
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem())
    with Publisher(
        f"localhost:{server.port}",
        credentials=credentials,
        metadata=[("authorization", "Bearer py-secret")],
    ) as publisher:
        ids = [publisher.publish("ml.predictions", b"{}", id=f"tls-{i}").result(GUARD) for i in range(20)]
    assert ids == [f"tls-{i}" for i in range(20)]
    landed = queue.take_all(20)
    assert [m[0] for m in landed] == ids
    assert {_text(m[2].get("x-ingest-tenant")) for m in landed} == {"python-ml"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_plaintext_and_unauthenticated_callers_are_refused(secured, queue):
    server, ca, _, _ = secured
    quick = RetrySettings(deadline=1.0, initial_backoff=0.1, max_backoff=0.2)
    with Publisher(server.addr, retry=quick) as plaintext:
        with pytest.raises(PublishError) as refused:
            plaintext.publish("ml.x", b"{}", id="plain").result(GUARD)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem())
    with Publisher(f"localhost:{server.port}", credentials=credentials, retry=quick) as anonymous:
        with pytest.raises(PublishError) as unauthenticated:
            anonymous.publish("ml.x", b"{}", id="anon").result(GUARD)
    assert unauthenticated.value.code == grpc.StatusCode.UNAUTHENTICATED, unauthenticated.value
    assert "no credentials" in unauthenticated.value.message
    with Publisher(
        f"localhost:{server.port}",
        credentials=credentials,
        metadata=[("authorization", "Bearer py-secret")],
    ) as tenant:
        with pytest.raises(PublishError) as denied:
            tenant.publish("orders.x", b"{}", id="denied").result(GUARD)
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "events[0].topic" in denied.value.message
    assert queue.take_all(0, settle=0.5) == [], "nothing refused was published"


def test_mutual_tls_identifies_the_client_certificate_as_its_tenant(secured, queue):
    _, ca, clients, tmp_path = secured
    # A second server, requiring client certificates from the client CA.
    server = Ingest(
        queue.exchange,
        extra=(
            "--tls-cert", str(tmp_path / "server.pem"),
            "--tls-key", str(tmp_path / "server.key"),
            "--tls-client-ca", str(tmp_path / "clients.pem"),
            "--auth-file", str(tmp_path / "tenants.toml"),
        ),
    ).ready()
    try:
        cert, key = clients.issue([x509.DNSName("logger.ml.svc")], ExtendedKeyUsageOID.CLIENT_AUTH)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.pem(), private_key=key, certificate_chain=cert
        )
        with Publisher(f"localhost:{server.port}", credentials=credentials) as publisher:
            assert publisher.publish("ml.logs", b"{}", id="mtls-1").result(GUARD) == "mtls-1"
        quick = RetrySettings(deadline=1.0, initial_backoff=0.1, max_backoff=0.2)
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca.pem())
        with Publisher(f"localhost:{server.port}", credentials=no_cert, retry=quick) as stranger:
            with pytest.raises(PublishError) as refused:
                stranger.publish("ml.logs", b"{}", id="mtls-none").result(GUARD)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    finally:
        server.stop()
    landed = queue.take_all(1)
    assert [(m[0], _text(m[2].get("x-ingest-tenant"))) for m in landed] == [("mtls-1", "cert-logger")]
