"""TCP transports that send at once instead of waiting for the reactor's next turn.

Twisted's TCP transport buffers every ``write`` and sends it when the reactor
reports the socket writable on its next turn: each response costs two
``epoll_ctl`` calls (register, unregister) and a loop iteration.  Almost always
the kernel's send buffer has room, so these transports try ``send`` right away
when nothing is queued, and fall back to Twisted's buffering (with its
producer back-pressure and error handling) for whatever the kernel did not
take.  Measured: about +40 % keep-alive requests per second (DESIGN.md §3).

This module only provides the transport classes and the ways to get them:
`EagerPort` is a ``tcp.Port`` whose ``transport`` attribute (Twisted's
documented hook for replacing the transport class) is `EagerServer`,
`eager_endpoint` turns a parsed ``tcp:`` endpoint into one listening with it,
`adopt_port` wraps an inherited listening socket (systemd, workers) and
`connect_tcp` connects with `EagerClient`.  It must not change what is sent or
when a connection closes: ordering, back-pressure and error reporting stay
Twisted's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import AlreadyListened
from twisted.internet.fdesc import setNonBlocking
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "EagerClient",
    "EagerPort",
    "EagerServer",
    "adopt_port",
    "connect_tcp",
    "eager_endpoint",
    "supports_eager",
]


_INET = (socket.AF_INET, socket.AF_INET6)


class _EagerWrites:
    """``write``/``writeSequence`` for a Twisted TCP connection, sending at once
    when nothing is buffered.  Mixed in before ``tcp.Server``/``tcp.Client``."""

    # Attributes of twisted.internet.abstract.FileDescriptor / tcp.Connection.
    connected: int
    socket: socket.socket
    dataBuffer: bytes
    _tempDataLen: int
    _writeDisconnected: bool
    _aborting: bool
    producer: Any
    streamingProducer: bool

    def write(self, data: bytes) -> None:
        if (
            data
            and not self._tempDataLen
            and not self.dataBuffer
            and self.connected
            and not self._writeDisconnected
            and not self._aborting
            # A pull producer is asked for more from the writable turn.
            and (self.producer is None or self.streamingProducer)
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # EAGAIN, or an error Twisted's write path will detect and
                # report as the connection's loss on its writable turn.
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


class EagerServer(_EagerWrites, tcp.Server):
    """An accepted TCP connection that sends eagerly."""


class EagerClient(_EagerWrites, tcp.Client):
    """An outgoing TCP connection that sends eagerly."""


class EagerPort(tcp.Port):
    """A listening TCP port whose connections are `EagerServer` transports."""

    transport = EagerServer


class _EagerConnector(tcp.Connector):
    """Connects with an `EagerClient` transport."""

    def _makeTransport(self) -> tcp.Client:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


def supports_eager(reactor: Any) -> bool:
    """Whether ``reactor`` runs Twisted's socket transports (the POSIX reactors:
    epoll, poll, select); test doubles such as ``MemoryReactor`` do not."""
    return isinstance(reactor, PosixReactorBase)


@implementer(IStreamServerEndpoint)
class _EagerTCPServerEndpoint:
    """A ``tcp:``/``tcp6:`` server endpoint that listens with `EagerPort`."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        port = EagerPort(self._port, protocolFactory, self._backlog, self._interface, self._reactor)
        try:
            port.startListening()
        except Exception:
            return fail(Failure())
        return succeed(port)


@implementer(IStreamServerEndpoint)
class _EagerAdoptedEndpoint:
    """A ``systemd:`` (inherited socket) endpoint that listens with `EagerPort`
    and closes the inherited descriptor, like Twisted's own."""

    def __init__(self, reactor: Any, fileno: int, family: int) -> None:
        self._reactor = reactor
        self._fileno = fileno
        self._family = family
        self._used = False

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self._used:
            return fail(AlreadyListened())
        self._used = True
        try:
            setNonBlocking(self._fileno)
            port = adopt_port(self._reactor, self._fileno, self._family, protocolFactory)
            os.close(self._fileno)
        except Exception:
            return fail(Failure())
        return succeed(port)


def eager_endpoint(reactor: Any, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """The same listening socket as ``endpoint`` (parsed from a ``tcp:``,
    ``tcp6:`` or ``systemd:`` string), served by `EagerServer` transports;
    other endpoints (``unix:``) and non-POSIX reactors are returned unchanged."""
    if not supports_eager(reactor):
        return endpoint
    e: Any = endpoint
    if type(endpoint) in (TCP4ServerEndpoint, TCP6ServerEndpoint):
        return _EagerTCPServerEndpoint(reactor, e._port, e._backlog, e._interface)
    if type(endpoint) is AdoptedStreamServerEndpoint and e.addressFamily in _INET:
        return _EagerAdoptedEndpoint(reactor, e.fileno, e.addressFamily)
    return endpoint


def adopt_port(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """Listen on the inherited listening socket ``fd`` (it must be non-blocking).

    The descriptor is duplicated; the caller may close ``fd`` afterwards.
    TCP sockets get `EagerServer` transports on a POSIX reactor; anything else
    goes through ``reactor.adoptStreamPort``.

    :raises OSError: if ``fd`` is not a usable socket.
    """
    if family in _INET and supports_eager(reactor):
        port: Any = EagerPort._fromListeningDescriptor(reactor, fd, family, factory)
        port.startListening()
        return port  # type: ignore[no-any-return]
    return reactor.adoptStreamPort(fd, family, factory)  # type: ignore[no-any-return]


def connect_tcp(reactor: Any, host: str, port: int, factory: Any, timeout: float) -> Any:
    """``reactor.connectTCP``, with an `EagerClient` transport on a POSIX reactor.

    :return: the ``IConnector``.
    """
    if not supports_eager(reactor):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = _EagerConnector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
