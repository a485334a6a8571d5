"""Eager TCP transports, over real loopback sockets on the test reactor.

Each test listens on 127.0.0.1 with an ephemeral port and talks to itself.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from tlsproxy.eager import (
    EagerClient,
    EagerPort,
    EagerServer,
    adopt_port,
    connect_tcp,
    eager_endpoint,
)

reactor: Any = _reactor


class Sink(Protocol):
    """Collects bytes; fires ``done`` with them when ``expected`` bytes arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()
        self.done.addTimeout(10, reactor)  # a failing test fails, it does not hang

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= self.expected and not self.done.called:
            self.done.callback(b"".join(self.chunks))


class Holder(Protocol):
    """Keeps its transport for the test; fires ``made`` on connection."""

    def __init__(self) -> None:
        self.made: Deferred[Holder] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


class OneFactory(ClientFactory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


async def _pair(expected: int) -> tuple[Any, Holder, Sink, Any]:
    """A listening EagerPort whose accepted connection is held, and a client Sink."""
    server = Holder()
    port = await eager_endpoint(
        reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    ).listen(OneFactory(server))
    sink = Sink(expected)
    connector = reactor.connectTCP("127.0.0.1", port.getHost().port, OneFactory(sink))
    await server.made
    return port, server, sink, connector


@pytest_twisted.ensureDeferred
async def test_a_write_is_sent_before_the_reactor_turns() -> None:
    """A small write leaves nothing buffered and registers no writer: it was sent
    by ``write`` itself, and it arrives."""
    port, server, sink, connector = await _pair(5)
    transport: Any = server.transport
    try:
        assert isinstance(transport, EagerServer)
        transport.write(b"hello")
        assert transport.dataBuffer == b"" and transport._tempDataLen == 0
        assert transport not in reactor.getWriters()
        assert await sink.done == b"hello"
    finally:
        connector.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_buffered_in_order_with_back_pressure() -> None:
    """A write larger than the socket buffers is partly sent and partly buffered;
    the registered producer is paused, and every byte arrives in order."""
    body = bytes(range(256)) * (32 * 1024)  # 8 MiB
    port, server, sink, connector = await _pair(len(body) + 4)
    transport: Any = server.transport
    paused: list[bool] = []

    class Producer:
        def pauseProducing(self) -> None:
            paused.append(True)

        def resumeProducing(self) -> None:
            paused.append(False)

        def stopProducing(self) -> None:
            pass

    try:
        transport.registerProducer(Producer(), True)
        transport.write(body)
        assert transport._tempDataLen > 0  # the kernel did not take 8 MiB at once
        assert paused == [True]
        transport.writeSequence([b"ta", b"il"])
        received = await sink.done
        assert received == body + b"tail"
        transport.unregisterProducer()
    finally:
        connector.disconnect()
        await port.stopListening()


def test_only_tcp_endpoints_on_a_posix_reactor_become_eager(tmp_path: Any) -> None:
    """tcp: and tcp6: endpoints are replaced; unix: ones and test reactors are not."""
    tcp = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    assert eager_endpoint(reactor, tcp) is not tcp
    unix = serverFromString(reactor, f"unix:{tmp_path}/s")
    assert eager_endpoint(reactor, unix) is unix
    memory = MemoryReactor()
    tcp_on_memory = serverFromString(memory, "tcp:0")
    assert eager_endpoint(memory, tcp_on_memory) is tcp_on_memory


@pytest_twisted.ensureDeferred
async def test_an_inherited_listening_socket_is_adopted_with_eager_transports() -> None:
    """A listening socket bound elsewhere (systemd, a parent process) is served with
    eager transports, and the caller may close its descriptor afterwards."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    server = Holder()
    port = adopt_port(reactor, listener.fileno(), socket.AF_INET, OneFactory(server))
    address = listener.getsockname()
    listener.close()
    sink = Sink(2)
    connector = reactor.connectTCP("127.0.0.1", address[1], OneFactory(sink))
    try:
        assert isinstance(port, EagerPort)
        await server.made
        assert isinstance(server.transport, EagerServer)
        server.transport.write(b"ok")
        assert await sink.done == b"ok"
    finally:
        connector.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_outgoing_connections_send_eagerly() -> None:
    """connect_tcp connects with an eager client transport."""
    sink = Sink(4)
    port = reactor.listenTCP(0, OneFactory(sink), interface="127.0.0.1")
    client = Holder()
    connector = connect_tcp(reactor, "127.0.0.1", port.getHost().port, OneFactory(client), 5)
    try:
        await client.made
        assert isinstance(client.transport, EagerClient)
        client.transport.write(b"ping")
        assert client.transport not in reactor.getWriters()
        assert await sink.done == b"ping"
    finally:
        connector.disconnect()
        await port.stopListening()


def test_eager_endpoints_report_bind_errors() -> None:
    """Listening on a port in use fails the Deferred (the caller reports it)."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
    results: list[Any] = []
    endpoint = eager_endpoint(reactor, serverFromString(reactor, description))
    endpoint.listen(Factory.forProtocol(Protocol)).addBoth(results.append)
    taken.close()
    assert isinstance(results[0], Failure)


@pytest_twisted.ensureDeferred
async def test_a_pull_producer_is_asked_for_more_until_it_is_done() -> None:
    """A non-streaming (pull) producer gets resumeProducing from the writable turn,
    as on Twisted's own transport: all of its output arrives."""
    total = 100_000
    port, server, sink, connector = await _pair(total)
    transport: Any = server.transport

    class Pull:
        sent = 0

        def resumeProducing(self) -> None:
            if self.sent < total:
                transport.write(b"p" * 1000)
                self.sent += 1000
            else:
                transport.unregisterProducer()

        def stopProducing(self) -> None:
            pass

    try:
        transport.registerProducer(Pull(), False)
        assert await sink.done == b"p" * total
    finally:
        connector.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nothing_is_sent_after_an_abort() -> None:
    """Bytes written after abortConnection are dropped, as Twisted drops them."""
    port, server, sink, connector = await _pair(1)
    transport: Any = server.transport
    lost: Deferred[None] = Deferred()
    sink.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
    try:
        transport.abortConnection()
        transport.write(b"written after abort")
        await lost
        assert sink.chunks == []
    finally:
        # done never fires here: stop its timer, or its timeout would surface as
        # an unhandled error in whichever later test collects it.
        sink.done.addErrback(lambda _: None)
        sink.done.cancel()
        connector.disconnect()
        await port.stopListening()
