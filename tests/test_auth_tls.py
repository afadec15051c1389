"""Optional API keys and TLS, against a real server on loopback with
certificates made at test time: HTTPS and gRPC TLS with client certificates (mTLS), keys from a
mounted file, health and readiness open, /metrics behind the key, docs and reflection off."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from omnipose.proto import omnipose_pb2 as pb
from omnipose.proto import omnipose_pb2_grpc
from omnipose.service.auth import KeyChecker, digest, load_key_digests, presented_key
from tests.conftest import ServerProcess, running_server

TLS_HEADER_TIMEOUT_S = 2.0
ASYNCIO_DEFAULT_HANDSHAKE_TIMEOUT_S = 60.0
TLS_MAX_CONNECTIONS = 4

pytestmark = pytest.mark.slow

KEY = "k3y-for-tests-only"
HASHED_KEY = "another-key"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _issue(
    subject: str, key, issuer_key, issuer: x509.Name, ca: bool, san: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("omnipose test CA", ca_key, ca_key, _name("omnipose test CA"), True, False)
    files = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"omnipose {role}", key, ca_key, ca_cert.subject, False, role == "server")
        (root / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[role] = (root / f"{role}.crt", _write_key(key, root / f"{role}.key"))
    (root / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(root / "ca.crt", *files["server"], *files["client"])


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("secure")
    keys = root / "api-keys"
    keys.write_text(f"# mounted Secret\n{KEY}\nsha256:{digest(HASHED_KEY)}\n")
    args = [
        "--detector",
        "none",
        "--api-keys-file",
        str(keys),
        "--metrics-access",
        "auth",
        "--docs-access",
        "off",
        "--reflection-access",
        "off",
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--grpc-tls-client-ca-file",
        str(pki.ca),
        "--http-header-timeout-s",
        str(TLS_HEADER_TIMEOUT_S),
        "--http-max-connections",
        str(TLS_MAX_CONNECTIONS),
        "--no-warmup",  # keys and TLS only: no model figures needed
    ]
    with running_server(root, "secure", args, tls_ca=pki.ca) as server:
        yield server


@pytest.fixture
def https(secure_server: ServerProcess, pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"https://127.0.0.1:{secure_server.http_port}",
        verify=ssl.create_default_context(cafile=pki.ca),
        timeout=60,
    ) as client:
        yield client


def grpc_channel(server: ServerProcess, pki: Pki, client_cert: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(server.grpc_target, credentials)


def test_key_checker_hashes_and_compares_every_digest(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n\n# comment\nsha256:{digest(HASHED_KEY)}\n")
    checker = KeyChecker(load_key_digests(digest("third"), keys))
    assert all(checker.accepts(k) for k in (KEY, HASHED_KEY, "third"))
    assert not any(checker.accepts(k) for k in (None, "", "k3y", KEY + " ", digest(KEY)))
    assert presented_key("Bearer abc", None) == "abc" and presented_key(None, "xyz") == "xyz"
    assert presented_key("Basic abc", None) is None
    assert hashlib.sha256(KEY.encode()).hexdigest() == digest(KEY)


def test_rest_requires_a_key_except_health(https: httpx.Client, images) -> None:
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    params = {"boxes": json.dumps(images.bus_boxes)}
    assert https.get("/healthz").status_code == 200
    assert https.get("/readyz").status_code == 200
    refused = https.post("/v1/pose", files=files, params=params)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "API key" in refused.json()["error"]["message"]
    wrong = https.post(
        "/v1/pose", files=files, params=params, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": HASHED_KEY}):
        response = https.post("/v1/pose", files=files, params=params, headers=headers)
        assert response.status_code == 200, response.text
        assert len(response.json()["persons"]) == 2
    assert https.get("/v1/models").status_code == 401
    assert https.get("/metrics").status_code == 401
    assert https.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
    assert https.get("/docs").status_code == 404 and https.get("/openapi.json").status_code == 404


def test_plain_http_is_not_served_on_a_tls_port(secure_server: ServerProcess) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{secure_server.http_port}/healthz", timeout=5)


def test_silent_connection_on_the_tls_port_is_closed_at_the_header_timeout(
    secure_server: ServerProcess,
) -> None:
    """A client that connects and never sends a ClientHello is dropped like a silent plain one,
    not held for asyncio's default handshake timeout."""
    with socket.create_connection(("127.0.0.1", secure_server.http_port), timeout=10) as sock:
        sock.settimeout(ASYNCIO_DEFAULT_HANDSHAKE_TIMEOUT_S / 2)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1024) == b""  # closed by the server, nothing sent
        waited = time.monotonic() - started
    assert waited < ASYNCIO_DEFAULT_HANDSHAKE_TIMEOUT_S / 2


def test_connections_still_in_their_tls_handshake_count_against_the_limit(
    secure_server: ServerProcess, https: httpx.Client,
) -> None:
    """Silent TCP connections (no ClientHello) fill the connection limit: a real client beyond
    it gets 503 (uvicorn alone counts a TLS connection only once its handshake is done); once
    the header timeout closes them, the real client is served again."""
    headers = {"Authorization": f"Bearer {KEY}"}
    silent = [socket.create_connection(("127.0.0.1", secure_server.http_port), timeout=10)
              for _ in range(TLS_MAX_CONNECTIONS)]
    try:
        refused = https.get("/v1/models", headers=headers)
        assert refused.status_code == 503, refused.text
        assert "too many open connections" in refused.json()["error"]["message"]
        for sock in silent:  # closed by the server at the header timeout, nothing sent
            sock.settimeout(TLS_HEADER_TIMEOUT_S * 5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""
    finally:
        for sock in silent:
            sock.close()
    assert https.get("/v1/models", headers=headers).status_code == 200


def test_grpc_mtls_and_keys(secure_server: ServerProcess, pki: Pki, images) -> None:
    request = pb.EstimateRequest(image=images.bus)
    request.boxes.boxes.append(pb.Box(x=20, y=110, width=110, height=330))
    with grpc_channel(secure_server, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open, no key
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Estimate(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Estimate(request, timeout=30, metadata=(("authorization", f"Bearer {KEY}"),))
        assert len(reply.persons) == 1
        frames = iter([pb.StreamFrame(frame_id=1, request=request)])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamEstimate(frames, timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        frames = iter([pb.StreamFrame(frame_id=1, request=request)])
        results = list(
            stub.StreamEstimate(frames, timeout=30, metadata=(("x-api-key", HASHED_KEY),))
        )
        assert [r.frame_id for r in results] == [1]
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=10,
                    metadata=(("x-api-key", KEY),),
                )
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # reflection is off


def test_grpc_without_a_client_certificate_is_refused(secure_server, pki) -> None:
    with (
        grpc_channel(secure_server, pki, client_cert=False) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
