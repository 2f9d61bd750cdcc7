"""Kafka security settings reach the clients, and the clients really authenticate with them.

The worker's Kafka clients are built two ways: by Faust from ``broker_credentials(settings)`` (the worker's
consumer and producer) and by ``client_security(settings)`` for plain aiokafka clients (topic admin, geofence
feed). Both are checked as configured objects, then against a small in-process Kafka endpoint that speaks
the real wire protocol for ApiVersions, SaslHandshake, SaslAuthenticate (PLAIN and SCRAM-SHA-256/512, verified
per RFC 5802 with the expected password) and Metadata, behind TLS with a client-certificate requirement when
asked: a client that starts against it has authenticated with the settings' mechanism, user and password.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.protocol.admin import (
    ApiVersionResponse_v0,
    ApiVersionResponse_v1,
    SaslAuthenticateResponse_v0,
    SaslHandShakeResponse_v1,
)
from aiokafka.protocol.metadata import MetadataResponse_v0
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from fleetstream.config import Settings
from fleetstream.streaming.app import broker_credentials, create_app
from fleetstream.streaming.kafka import client_security, ssl_context

USER, PASSWORD = "fleet-worker", "s3cret-p@ss,word="
SASL_AUTHENTICATION_FAILED = 58
_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}


# --- a Kafka endpoint that authenticates -------------------------------------------------------------------------

@dataclass
class Session:
    """What one client connection did: the mechanism it asked for, who it proved to be, its TLS certificate."""

    mechanism: str | None = None
    user: str | None = None
    authenticated: bool = False
    peer_names: tuple[str, ...] = ()
    api_keys: list[int] = field(default_factory=list)


class KafkaEndpoint:
    """A single-node Kafka endpoint for authentication checks: ApiVersions, SASL and an empty Metadata."""

    def __init__(self, mechanisms: tuple[str, ...] = ("PLAIN",), password: str = PASSWORD,
                 tls: ssl.SSLContext | None = None) -> None:
        self.mechanisms = mechanisms
        self.password = password
        self.tls = tls
        self.sessions: list[Session] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> KafkaEndpoint:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        self.sessions.append(session)
        peer = writer.get_extra_info("peercert") or {}
        session.peer_names = tuple(value for _, value in peer.get("subjectAltName", ()))
        scram: dict[str, object] = {}
        try:
            while True:
                size = struct.unpack(">i", await reader.readexactly(4))[0]
                frame = await reader.readexactly(size)
                api_key, api_version, correlation_id = struct.unpack(">hhi", frame[:8])
                client_id_len = struct.unpack(">h", frame[8:10])[0]
                body = frame[10 + max(client_id_len, 0):]
                session.api_keys.append(api_key)
                response = self._answer(session, scram, api_key, api_version, body)
                if response is None:
                    break
                payload = struct.pack(">i", correlation_id) + response
                writer.write(struct.pack(">i", len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _answer(self, session: Session, scram: dict[str, object], api_key: int, api_version: int,
                body: bytes) -> bytes | None:
        if api_key == 18:  # ApiVersions: SaslHandshake v1 only, so tokens travel in SaslAuthenticate requests
            versions = [(18, 0, 2), (17, 1, 1), (36, 0, 0), (3, 0, 0)]
            if api_version == 0:
                return ApiVersionResponse_v0(error_code=0, api_versions=versions).encode()
            return ApiVersionResponse_v1(error_code=0, api_versions=versions, throttle_time_ms=0).encode()
        if api_key == 17:  # SaslHandshake
            n = struct.unpack(">h", body[:2])[0]
            session.mechanism = body[2:2 + n].decode()
            error = 0 if session.mechanism in self.mechanisms else 33  # UNSUPPORTED_SASL_MECHANISM
            return SaslHandShakeResponse_v1(error_code=error, enabled_mechanisms=list(self.mechanisms)).encode()
        if api_key == 36:  # SaslAuthenticate
            n = struct.unpack(">i", body[:4])[0]
            token = body[4:4 + n]
            ok, reply = self._authenticate(session, scram, token)
            return SaslAuthenticateResponse_v0(
                error_code=0 if ok else SASL_AUTHENTICATION_FAILED,
                error_message=None if ok else "authentication failed", sasl_auth_bytes=reply,
            ).encode()
        if api_key == 3:  # Metadata: only for an authenticated session
            if session.mechanism is not None and not session.authenticated:
                return None
            return MetadataResponse_v0(brokers=[(0, "127.0.0.1", self.port)], topics=[]).encode()
        return None

    def _authenticate(self, session: Session, scram: dict[str, object], token: bytes) -> tuple[bool, bytes]:
        if session.mechanism == "PLAIN":
            _, user, password = token.decode().split("\0")
            session.user = user
            session.authenticated = hmac.compare_digest(password, self.password)
            return session.authenticated, b""
        digest = _HASHES[session.mechanism or ""]
        message = token.decode()
        if "salted" not in scram:  # client-first: n,,n=user,r=nonce
            bare = message.split(",", 2)[2]
            fields = dict(part.split("=", 1) for part in bare.split(","))
            session.user = fields["n"].replace("=2C", ",").replace("=3D", "=")
            salt, iterations = os.urandom(16), 4096
            nonce = fields["r"] + base64.b64encode(os.urandom(12)).decode()
            server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
            scram.update(bare=bare, server_first=server_first, nonce=nonce,
                         salted=hashlib.pbkdf2_hmac(digest().name, self.password.encode(), salt, iterations))
            return True, server_first.encode()
        fields = dict(part.split("=", 1) for part in message.split(","))  # client-final: c=biws,r=...,p=proof
        without_proof = message.rsplit(",p=", 1)[0]
        auth_message = f"{scram['bare']},{scram['server_first']},{without_proof}".encode()
        salted = scram["salted"]
        assert isinstance(salted, bytes)
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        signature = hmac.new(digest(client_key).digest(), auth_message, digest).digest()
        expected = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        session.authenticated = fields["r"] == scram["nonce"] and hmac.compare_digest(
            base64.b64decode(fields["p"]), expected)
        server_key = hmac.new(salted, b"Server Key", digest).digest()
        server_signature = hmac.new(server_key, auth_message, digest).digest()
        return session.authenticated, b"v=" + base64.b64encode(server_signature)


# --- certificates ------------------------------------------------------------------------------------------------

@dataclass
class Pki:
    ca: trustme.CA
    cafile: Path
    certfile: Path
    keyfile: Path
    client_name: str = "worker-0.fleetstream.example"

    def server_context(self, require_client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    client = ca.issue_cert(Pki.client_name)
    paths = Pki(ca, tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
    ca.cert_pem.write_to_path(str(paths.cafile))
    client.cert_chain_pems[0].write_to_path(str(paths.certfile))
    client.private_key_pem.write_to_path(str(paths.keyfile))
    return paths


def settings(**overrides: object) -> Settings:
    return Settings.load(env={}, **overrides)


# --- configuration -----------------------------------------------------------------------------------------------

def test_plaintext_needs_no_credentials():
    plain = settings()
    assert broker_credentials(plain) is None
    assert client_security(plain) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_sasl_settings_configure_every_client(mechanism: str, protocol: str, pki: Pki):
    configured = settings(security_protocol=protocol, sasl_mechanism=mechanism, sasl_username=USER,
                          sasl_password=PASSWORD, ssl_cafile=str(pki.cafile) if protocol == "SASL_SSL" else "")
    wants_tls = protocol == "SASL_SSL"

    # Faust's clients, as the worker builds them
    app = create_app(configured)
    faust_auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert faust_auth["security_protocol"] == protocol
    assert (faust_auth["sasl_mechanism"], faust_auth["sasl_plain_username"], faust_auth["sasl_plain_password"]) == (
        mechanism, USER, PASSWORD)
    producer = app.producer._new_producer()
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    # plain aiokafka clients (topic admin, geofence feed)
    plain_producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **client_security(configured))
    plain_consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **client_security(configured))
    try:
        for client in (producer.client, consumer._client, plain_producer.client, plain_consumer._client):
            assert client._security_protocol == protocol
            assert client._sasl_mechanism == mechanism
            assert (client._sasl_plain_username, client._sasl_plain_password) == (USER, PASSWORD)
            assert isinstance(client._ssl_context, ssl.SSLContext) == wants_tls
            if wants_tls:  # the CA from the settings is the one trusted
                expected = ssl.create_default_context(cafile=str(pki.cafile)).get_ca_certs()
                assert client._ssl_context.get_ca_certs() == expected
    finally:
        for client in (producer, consumer, plain_producer, plain_consumer):
            await client.stop()


async def test_tls_settings_configure_mutual_tls(pki: Pki):
    configured = settings(security_protocol="SSL", ssl_cafile=str(pki.cafile), ssl_certfile=str(pki.certfile),
                          ssl_keyfile=str(pki.keyfile))
    credentials = broker_credentials(configured)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SSL"
    context = auth["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert client_security(configured)["security_protocol"] == "SSL"
    assert ssl_context(settings(security_protocol="SASL_PLAINTEXT")) is None  # no TLS where none was asked


# --- authentication against a Kafka endpoint --------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_the_worker_producer_authenticates_over_tls(mechanism: str, pki: Pki):
    """SASL_SSL with a client certificate: the producer Faust builds for the worker completes the TLS
    handshake (trusting the settings' CA, presenting the settings' certificate) and proves the password."""
    async with KafkaEndpoint((mechanism,), tls=pki.server_context(require_client_cert=True)) as endpoint:
        configured = settings(broker=f"kafka://{endpoint.bootstrap}", security_protocol="SASL_SSL",
                              sasl_mechanism=mechanism, sasl_username=USER, sasl_password=PASSWORD,
                              ssl_cafile=str(pki.cafile), ssl_certfile=str(pki.certfile), ssl_keyfile=str(pki.keyfile))
        producer = create_app(configured).producer._new_producer()
        try:
            await asyncio.wait_for(producer.start(), 20)
        finally:
            await producer.stop()
    assert endpoint.sessions
    for session in endpoint.sessions:
        assert (session.mechanism, session.user, session.authenticated) == (mechanism, USER, True)
        assert pki.client_name in session.peer_names


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_the_worker_consumer_and_admin_authenticate(mechanism: str):
    async with KafkaEndpoint((mechanism,)) as endpoint:
        configured = settings(broker=f"kafka://{endpoint.bootstrap}", security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism=mechanism, sasl_username=USER, sasl_password=PASSWORD)
        app = create_app(configured)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            await asyncio.wait_for(consumer._client.bootstrap(), 20)
        finally:
            await consumer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=endpoint.bootstrap, **client_security(configured))
        try:
            await asyncio.wait_for(admin._client.bootstrap(), 20)
        finally:
            await admin.close()
    assert len(endpoint.sessions) >= 2
    assert all((s.mechanism, s.user, s.authenticated) == (mechanism, USER, True) for s in endpoint.sessions)


async def test_a_wrong_password_is_refused():
    """The endpoint really checks the proof: the same client with another password does not get in."""
    async with KafkaEndpoint(("SCRAM-SHA-512",), password="another") as endpoint:
        configured = settings(broker=f"kafka://{endpoint.bootstrap}", security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512", sasl_username=USER, sasl_password=PASSWORD)
        producer = create_app(configured).producer._new_producer()
        with pytest.raises(KafkaError):
            await asyncio.wait_for(producer.start(), 20)
        await producer.stop()
    assert endpoint.sessions and not any(s.authenticated for s in endpoint.sessions)


async def test_tls_refuses_a_broker_signed_by_another_ca(pki: Pki):
    """The CA file in the settings is what the client trusts: a server certificate from another CA fails."""
    other = Pki(trustme.CA(), pki.cafile, pki.certfile, pki.keyfile)
    async with KafkaEndpoint(tls=other.server_context(require_client_cert=False)) as endpoint:
        configured = settings(broker=f"kafka://{endpoint.bootstrap}", security_protocol="SSL",
                              ssl_cafile=str(pki.cafile))
        admin = AIOKafkaAdminClient(bootstrap_servers=endpoint.bootstrap, **client_security(configured))
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(admin._client.bootstrap(), 20)
        await admin.close()
    assert not any(3 in s.api_keys for s in endpoint.sessions)  # never got as far as a request
