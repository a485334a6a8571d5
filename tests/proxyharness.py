"""In-memory harness for the proxy engine: client ↔ proxy ↔ backend without sockets.

`MemoryTransport` pairs behave like TCP as far as the proxy can tell: bytes
written on one end arrive at the other when pumped, a paused reader leaves them
in the writer's buffer, and a writer whose buffer passes ``high_water`` has its
registered producer paused (resumed once it drains).  A paused reader does not
notice the peer's close until it reads again, as with a real socket.

`Harness` wires a `ProxyFactory` and `UpstreamPools` to a `FakeReactor`
(a `MemoryReactorClock` whose ``connectTCP`` is completed on the next pump
against the backend the test registered for that address) and pumps all
connections until nothing moves.  Everything is deterministic; time only
moves with ``harness.advance``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import httptools
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from tlsproxy.clientauth import stripped_headers
from tlsproxy.config import Backend
from tlsproxy.proxy import ProxyFactory, ProxyProtocol, ProxySettings
from tlsproxy.routing import Route, RouteTable
from tlsproxy.upstream import UpstreamPools

BACKEND = Backend(scheme="http", host="10.0.0.2", port=8080)
OTHER_BACKEND = Backend(scheme="http", host="10.0.0.3", port=8081)


class MemoryTransport:
    """One end of an in-memory TCP connection."""

    def __init__(
        self,
        protocol: Any,
        host: Any,
        peer: Any,
        high_water: int | None = None,
        handle: Any = None,
    ) -> None:
        self.protocol = protocol
        self.host = host
        self.peer = peer
        self.high_water = high_water
        self.handle = handle
        self.other: MemoryTransport | None = None
        self.outgoing = bytearray()
        self.reading_paused = False
        self.producer: Any = None
        self.producer_paused = False
        self.disconnecting = False
        self.disconnected = False
        self.aborted = False
        self.no_delay = False
        self.pause_count = 0
        #: every write call's bytes, once `record_writes` is called
        self.writes: list[bytes] | None = None

    def record_writes(self) -> list[bytes]:
        """Start recording each write (writeSequence counts as one)."""
        self.writes = []
        return self.writes

    # ITransport
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes), type(data)
        if self.disconnecting or self.disconnected:
            return
        if self.writes is not None:
            self.writes.append(data)
        self.outgoing += data
        self._check_high_water()

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True
        self.outgoing.clear()

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.host

    def getHandle(self) -> Any:
        if self.handle is None:
            return object()
        return self.handle

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    # IProducer (this end's reading)
    def pauseProducing(self) -> None:
        self.reading_paused = True
        self.pause_count += 1

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # flow control simulation
    def _check_high_water(self) -> None:
        if (
            self.high_water is not None
            and self.producer is not None
            and not self.producer_paused
            and len(self.outgoing) > self.high_water
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def _check_low_water(self) -> None:
        if self.producer is not None and self.producer_paused and not self.outgoing:
            self.producer_paused = False
            self.producer.resumeProducing()

    def deliver(self, chunk_size: int) -> bool:
        """Move up to ``chunk_size`` bytes to the other end; True if anything happened."""
        other = self.other
        assert other is not None
        moved = False
        if self.outgoing and not other.disconnected and not other.reading_paused:
            data = bytes(self.outgoing[:chunk_size])
            del self.outgoing[:chunk_size]
            other.protocol.dataReceived(data)
            self._check_low_water()
            moved = True
        elif self.outgoing and other.disconnected:
            self.outgoing.clear()
        if self.disconnecting and not self.outgoing and not self.disconnected:
            self.disconnected = True
            self._lost(self, error.ConnectionDone() if not self.aborted else error.ConnectionLost())
            moved = True
        if self.disconnected and not other.disconnected and not other.reading_paused:
            other.disconnected = True
            other.outgoing.clear()
            self._lost(
                other, error.ConnectionDone() if not self.aborted else error.ConnectionLost()
            )
            moved = True
        return moved

    @staticmethod
    def _lost(transport: MemoryTransport, reason: Exception) -> None:
        producer = transport.producer
        if producer is not None:
            producer.stopProducing()
            transport.producer = None
        transport.protocol.connectionLost(Failure(reason))


def connect_pair(
    server: Any,
    client: Any,
    server_addr: Any,
    client_addr: Any,
    *,
    server_high_water: int | None = None,
    client_high_water: int | None = None,
    server_handle: Any = None,
) -> tuple[MemoryTransport, MemoryTransport]:
    """Join two protocols; returns (server transport, client transport)."""
    st = MemoryTransport(server, server_addr, client_addr, server_high_water, server_handle)
    ct = MemoryTransport(client, client_addr, server_addr, client_high_water)
    st.other, ct.other = ct, st
    server.makeConnection(st)
    client.makeConnection(ct)
    return st, ct


class FakeClient(Protocol):
    """A client that records everything the proxy sends it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def take(self) -> bytes:
        """The bytes received so far, clearing them."""
        data = bytes(self.received)
        self.received.clear()
        return data


class FakeBackend(Protocol):
    """A backend server that records requests; the test writes its responses."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None
        self.auto: Callable[[FakeBackend], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.auto is not None:
            self.auto(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def take(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data

    @property
    def t(self) -> MemoryTransport:
        assert isinstance(self.transport, MemoryTransport)
        return self.transport


@attrs.define
class PendingConnect:
    host: str
    port: int
    factory: ClientFactory
    timeout: float


class FakeReactor(MemoryReactorClock):
    """Records connectTCP calls; the harness completes them on the next pump."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[PendingConnect] = []
        self.connect_timeouts: list[float] = []

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> Any:
        self.pending.append(PendingConnect(host, port, factory, timeout))
        self.connect_timeouts.append(timeout)
        return super().connectTCP(host, port, factory, timeout, bindAddress)


class SNIHandle:
    """Stands in for the OpenSSL connection behind a TLS transport."""

    def __init__(self, name: bytes | None) -> None:
        self.name = name

    def get_servername(self) -> bytes | None:
        return self.name


class FunctionRouter:
    """A router from a function ``(sni, host) -> Route | RouteTable | None``."""

    def __init__(
        self,
        find: Callable[[str | None, bytes], Route | RouteTable | None],
        identity_headers: frozenset[bytes] = frozenset(),
    ) -> None:
        self.find = find
        self.identity_headers = identity_headers

    def table(self, sni: str | None, host: bytes) -> RouteTable | None:
        found = self.find(sni, host)
        if isinstance(found, Route):
            return RouteTable(found)
        return found


def _identity_headers(routes: Iterable[Route | RouteTable]) -> frozenset[bytes]:
    """Every identity header name the routes' ``client_auth`` configures (like `Router`)."""
    names: frozenset[bytes] = frozenset()
    for found in routes:
        table = RouteTable(found) if isinstance(found, Route) else found
        for route in (table.default, *(r for _, r in table.prefixes)):
            if route.client_auth is not None:
                names |= stripped_headers(route.client_auth)
    return names


class Harness:
    """A proxy with in-memory clients and backends.

    ``backends`` maps ``(host, port)`` to what a connection attempt meets: a
    zero-argument callable building a `FakeBackend` (the connection
    succeeds), an exception instance (the attempt fails with it), or None
    (the attempt hangs).
    """

    def __init__(
        self,
        settings: ProxySettings | None = None,
        routes: dict[bytes, Route | RouteTable] | None = None,
        *,
        backend_high_water: int | None = None,
        client_high_water: int | None = None,
        chunk_size: int = 65536,
    ) -> None:
        self.reactor = FakeReactor()
        self.settings = settings or ProxySettings()
        self.routes: dict[bytes, Route | RouteTable] = (
            routes
            if routes is not None
            else {
                b"example.com": Route(site="example.com", backend=BACKEND),
                b"other.example": Route(site="other.example", backend=OTHER_BACKEND),
            }
        )
        self.router_calls: list[tuple[str | None, bytes]] = []
        self.pools = UpstreamPools(self.reactor, self.settings)
        self.factory = ProxyFactory(
            router=FunctionRouter(self.route, _identity_headers(self.routes.values())),
            pools=self.pools,
            clock=self.reactor,
            settings=self.settings,
        )
        self.links: list[tuple[MemoryTransport, MemoryTransport]] = []
        self.backend_servers: dict[tuple[str, int], Any] = {
            (BACKEND.host, BACKEND.port): FakeBackend,
            (OTHER_BACKEND.host, OTHER_BACKEND.port): FakeBackend,
        }
        self.backends: list[FakeBackend] = []
        self.backend_high_water = backend_high_water
        self.client_high_water = client_high_water
        self.chunk_size = chunk_size

    def route(self, sni: str | None, host: bytes) -> Route | RouteTable | None:
        self.router_calls.append((sni, host))
        return self.routes.get(host.lower())

    def client(
        self,
        peer: Any = None,
        *,
        sni: bytes | None = None,
        high_water: int | None = None,
    ) -> tuple[FakeClient, ProxyProtocol]:
        """A new client connection to the proxy."""
        peer = peer or IPv4Address("TCP", "192.0.2.7", 50123)
        host = (
            IPv6Address("TCP", "::1", 443)
            if isinstance(peer, IPv6Address)
            else IPv4Address("TCP", "192.0.2.1", 443)
        )
        proto = self.factory.buildProtocol(peer)
        client = FakeClient()
        st, ct = connect_pair(
            proto,
            client,
            host,
            peer,
            server_high_water=high_water if high_water is not None else self.client_high_water,
            server_handle=SNIHandle(sni) if sni is not None else None,
        )
        self.links.append((st, ct))
        return client, proto

    def _complete_connects(self) -> bool:
        moved = False
        while self.reactor.pending:
            attempt = self.reactor.pending.pop(0)
            server = self.backend_servers.get((attempt.host, attempt.port))
            moved = True
            if server is None:
                continue  # hangs
            if isinstance(server, BaseException):
                attempt.factory.clientConnectionFailed(None, Failure(server))  # type: ignore[arg-type]
                continue
            backend = server()
            self.backends.append(backend)
            proto = attempt.factory.buildProtocol(IPv4Address("TCP", attempt.host, attempt.port))
            st, ct = connect_pair(
                backend,
                proto,
                IPv4Address("TCP", attempt.host, attempt.port),
                IPv4Address("TCP", "10.0.0.1", 40000 + len(self.backends)),
                client_high_water=self.backend_high_water,
            )
            self.links.append((st, ct))
        return moved

    def pump(self, max_rounds: int = 10000) -> None:
        """Move bytes and complete connects until nothing changes."""
        for _ in range(max_rounds):
            moved = self._complete_connects()
            for st, ct in list(self.links):
                moved = ct.deliver(self.chunk_size) or moved
                moved = st.deliver(self.chunk_size) or moved
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def advance(self, seconds: float) -> None:
        """Let time pass (in sweep-sized steps), pumping after each step."""
        step = self.settings.sweep_interval
        remaining = seconds
        while remaining > 0:
            self.reactor.advance(min(step, remaining))
            remaining -= step
            self.pump()

    def exchange(self, client: FakeClient, request: bytes, response: bytes) -> bytes:
        """Send ``request``, answer it from the last backend with ``response``; client's bytes."""
        client.send(request)
        self.pump()
        self.backends[-1].send(response)
        self.pump()
        return client.take()


# ------------------------------------------------------------------ HTTP parsing helpers


@attrs.define
class Message:
    """A parsed request or response."""

    method: bytes = b""
    target: bytes = b""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytes = b""
    complete: bool = False
    version: str = ""

    def header(self, name: bytes) -> bytes | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        m = self.messages[-1]
        m.version = self.parser.get_http_version()
        if isinstance(self.parser, httptools.HttpRequestParser):
            m.method = self.parser.get_method()
        else:
            m.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_requests(data: bytes | bytearray) -> list[Message]:
    """The requests in ``data`` (as a backend would see them)."""
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    collector.parser = parser
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return collector.messages


def parse_responses(data: bytes, *, head: bool = False) -> list[Message]:
    """The responses in ``data`` (as a client would see them); ``head``: to a HEAD request."""
    if head:
        end = data.index(b"\r\n\r\n") + 4
        collector = _Collector()
        parser = httptools.HttpResponseParser(collector)
        collector.parser = parser
        parser.feed_data(data[:end])
        collector.messages[-1].complete = True
        return (
            collector.messages + parse_responses(data[end:]) if data[end:] else collector.messages
        )
    collector = _Collector()
    parser = httptools.HttpResponseParser(collector)
    collector.parser = parser
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return collector.messages


def response(
    status: int = 200,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    length: bool = True,
    reason: bytes = b"OK",
) -> bytes:
    """A backend response with ``Content-Length`` (unless ``length`` is False)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    for name, value in headers or []:
        lines.append(name + b": " + value)
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
    *,
    host: bytes | None = b"example.com",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """A client request (``Content-Length`` added when ``body`` is given)."""
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    for name, value in headers or []:
        lines.append(name + b": " + value)
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(*chunks: bytes) -> bytes:
    """A chunked body made of ``chunks`` (then the last chunk)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
