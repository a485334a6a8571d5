"""tlsproxy's server-side TLS transport, against Twisted's own TLS client in memory.

The client side is Twisted's ``TLSMemoryBIOProtocol`` (an independent
implementation of the same job), connected through ``iosim``: no sockets, no
sleeps.  The application protocol on the server records what it sees.
"""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from tests import pki
from tlsproxy.proxy import handshake_failure_reason
from tlsproxy.tlsconn import TLSServerConnection, TLSServerFactory

NAME = "tlsconn.test"


@implementer(IHandshakeListener)
class App(Protocol):
    """Records data, handshake completion and loss; optional behaviour by flags."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.received = b""
        self.lost: Failure | None = None
        self.echo = False
        self.greeting = b""

    def connectionMade(self) -> None:
        self.events.append("made")
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.events.append("handshake")

    def dataReceived(self, data: bytes) -> None:
        self.events.append("data")
        self.received += data
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append("lost")
        self.lost = reason


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IOpenSSLServerConnectionCreator)
class Creator:
    """What `tlsproxy.tls.SNIConnectionCreator` is: a server connection per accept."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def clientConnectionForTLS(self, protocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(NAME.encode())
        return connection


@pytest.fixture(scope="module")
def leaf() -> pki.Leaf:
    return pki.make_ca().issue([NAME])


def server_context(leaf: pki.Leaf) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(leaf.cert)  # type: ignore[arg-type]
    context.use_privatekey(leaf.key)  # type: ignore[arg-type]
    for intermediate in leaf.chain:
        context.add_extra_chain_cert(intermediate)  # type: ignore[arg-type]
    context.set_alpn_select_callback(lambda conn, offered: b"http/1.1")
    return context


def client_context(max_version: int | None = None, ciphers: str | None = None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_alpn_protos([b"http/1.1"])
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if ciphers is not None:
        context.set_cipher_list(ciphers.encode())
    return context


class Pair:
    """A tlsproxy TLS server and a Twisted TLS client connected in memory."""

    def __init__(
        self,
        leaf: pki.Leaf,
        app: App,
        client_ctx: SSL.Context | None = None,
        greet: bool = True,
    ) -> None:
        self.clock = Clock()
        self.app = app
        self.recorder = Recorder()
        server_factory = TLSServerFactory(
            Creator(server_context(leaf)),  # type: ignore[arg-type]
            Factory.forProtocol(lambda: app),
        )
        client_factory = TLSMemoryBIOFactory(
            ClientCreator(client_ctx or client_context()),
            True,
            Factory.forProtocol(lambda: self.recorder),
            clock=self.clock,
        )
        self.client: Any
        self.server: TLSServerConnection
        self.client, self.server, self.io = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),  # type: ignore[arg-type,return-value]
            lambda: client_factory.buildProtocol(None),
            greet=greet,
            clock=self.clock,
        )

    def flush(self) -> None:
        self.io.flush()


def test_handshake_then_data_both_ways(leaf: pki.Leaf) -> None:
    """The application sees the handshake before any data, data flows both ways,
    and the transport answers for the TLS session (SNI, ALPN, certificate)."""
    app = App()
    app.echo = True
    pair = Pair(leaf, app)
    pair.client.write(b"GET / HTTP/1.1\r\n\r\n")
    pair.flush()
    assert app.events[:3] == ["made", "handshake", "data"]
    assert app.received == b"GET / HTTP/1.1\r\n\r\n"
    assert pair.recorder.received == b"GET / HTTP/1.1\r\n\r\n"
    handle = pair.server.getHandle()
    assert handle is not None and handle.get_servername() == NAME.encode()
    assert pair.server.negotiatedProtocol == b"http/1.1"
    assert pair.server.getPeerCertificate() is None  # no client certificate asked for
    assert pair.server.getPeer() is pair.server.transport.getPeer()


def test_large_writes_and_uploads_arrive_whole_and_in_order(leaf: pki.Leaf) -> None:
    """A write larger than one TLS record and one BIO read (3 MiB) arrives intact,
    as does a large upload split over many records."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()
    body = bytes(range(256)) * (3 * 4096)
    pair.server.write(body)
    pair.server.writeSequence([b"tail-", b"end"])
    pair.flush()
    assert pair.recorder.received == body + b"tail-end"
    pair.client.write(body)
    pair.flush()
    assert app.received == b"x" + body


def test_writes_before_the_handshake_are_sent_after_it(leaf: pki.Leaf) -> None:
    """Bytes the application writes while the handshake is still running are
    held and sent, in order, once it completes."""
    app = App()
    app.greeting = b"hello "
    pair = Pair(leaf, app)
    pair.server.write(b"world")
    pair.client.write(b"ping")
    pair.flush()
    assert pair.recorder.received == b"hello world"


def test_client_close_notify_closes_cleanly(leaf: pki.Leaf) -> None:
    """The client's close_notify is answered and the connection closes; the
    application sees a clean close."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()
    pair.client.loseConnection()
    pair.flush()
    assert app.lost is not None and app.lost.check(ConnectionDone)
    assert pair.recorder.lost is not None and pair.recorder.lost.check(ConnectionDone)


def test_server_close_sends_data_then_close_notify(leaf: pki.Leaf) -> None:
    """Closing after a write delivers the write, then a clean TLS close that the
    client sees as such (not a truncation), and later writes are dropped."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()
    pair.server.write(b"last words")
    pair.server.loseConnection()
    pair.server.write(b"dropped")
    pair.flush()
    assert pair.recorder.received == b"last words"
    assert pair.recorder.lost is not None and pair.recorder.lost.check(ConnectionDone)
    assert app.lost is not None and app.lost.check(ConnectionDone)


def test_close_before_the_handshake_aborts(leaf: pki.Leaf) -> None:
    """There is nothing to close cleanly before the handshake: the connection is aborted."""
    app = App()
    pair = Pair(leaf, app, greet=False)
    pair.server.loseConnection()
    assert pair.server.transport.disconnecting
    pair.flush()
    assert app.lost is not None
    assert "handshake" not in app.events


def test_handshake_failure_reaches_the_application_with_openssl_reason(leaf: pki.Leaf) -> None:
    """A client the server cannot serve (TLS 1.2 with only RSA suites, against an
    ECDSA certificate) fails the handshake; the application gets OpenSSL's error,
    which names the reason, and the client an alert."""
    app = App()
    client = client_context(max_version=SSL.TLS1_2_VERSION, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    pair = Pair(leaf, app, client)
    pair.flush()
    assert "handshake" not in app.events
    assert app.lost is not None and app.lost.check(SSL.Error)
    assert handshake_failure_reason(app.lost) == "no shared cipher"
    assert pair.recorder.lost is not None and pair.recorder.lost.check(SSL.Error)


def test_corrupted_record_fails_the_connection(leaf: pki.Leaf) -> None:
    """A record that does not decrypt ends the connection with a TLS error, and
    nothing of it reaches the application."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()
    # An application-data record (TLS 1.3 framing) full of garbage.
    pair.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    pair.flush()
    assert app.received == b"x"
    assert app.lost is not None and app.lost.check(SSL.Error)


def test_eof_without_close_notify_is_reported_as_loss(leaf: pki.Leaf) -> None:
    """The TCP connection ending without TLS close is passed on as the TCP reason."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()
    pair.server.connectionLost(Failure(ConnectionLost()))
    assert app.lost is not None and app.lost.check(ConnectionLost)
    pair.server.write(b"after the end")  # ignored, no error


def test_producers_and_flow_control_go_to_the_tcp_transport(leaf: pki.Leaf) -> None:
    """The TCP transport's buffer is the only one: producers register there, and
    pausing reading pauses the TCP transport."""
    app = App()
    pair = Pair(leaf, app)

    class Producer:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    producer = Producer()
    pair.server.registerProducer(producer, True)
    assert pair.server.transport.producer is producer
    pair.server.unregisterProducer()
    assert pair.server.transport.producer is None
    tcp = StringTransport()
    connection = TLSServerConnection(Creator(server_context(leaf)), App())
    connection.makeConnection(tcp)
    connection.pauseProducing()
    assert tcp.producerState == "paused"
    connection.resumeProducing()
    assert tcp.producerState == "producing"


def test_close_after_the_clients_close_notify_does_not_wait_for_a_producer(
    leaf: pki.Leaf,
) -> None:
    """When TLS ends (the client's close_notify, or an error), the application's
    producer is unregistered so the socket closes even while the producer is
    paused (Twisted would otherwise resume it instead of closing)."""
    app = App()
    pair = Pair(leaf, app)
    pair.client.write(b"x")
    pair.flush()

    class Producer:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    pair.server.registerProducer(Producer(), True)
    pair.client.loseConnection()  # sends close_notify
    pair.flush()
    assert app.lost is not None and app.lost.check(ConnectionDone)
    assert pair.server.transport.producer is None

    app2 = App()
    pair2 = Pair(leaf, app2)
    pair2.client.write(b"x")
    pair2.flush()
    pair2.server.registerProducer(Producer(), True)
    pair2.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    assert pair2.server.transport.producer is None
    assert pair2.server.transport.disconnecting
