"""The reactor tlsproxy installs: events dispatched without the legacy log context.

A private `ProxyReactor` is iterated by hand (bounded) next to the test
reactor; installation is checked in fresh interpreters.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from tlsproxy.reactor import ProxyReactor


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("application bug")
        if data == b"fail on close":
            self.connectionLost = self._fail  # type: ignore[method-assign]
            return
        self.transport.write(data)  # type: ignore[union-attr]

    def _fail(self, reason: object = None) -> None:
        raise RuntimeError("bug in connectionLost")


def _spin(reactor: ProxyReactor, done: Any, limit: int = 400) -> None:
    for _ in range(limit):
        if done():
            return
        reactor.iterate(0.005)
    raise AssertionError("nothing happened within the bounded number of iterations")


@pytest.fixture
def echo_reactor() -> Any:
    reactor = ProxyReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    yield reactor, port.getHost().port
    port.stopListening()
    reactor.iterate(0)
    reactor._poller.close()


def _recv_ready(client: socket.socket) -> Any:
    def ready() -> bool:
        try:
            client.recv(100, socket.MSG_PEEK)  # data, or b"" once closed
        except BlockingIOError:
            return False
        return True

    return ready


def test_reads_and_writes_are_dispatched(echo_reactor: Any) -> None:
    """Bytes sent to a server on the reactor come back: reads and writes work."""
    reactor, port = echo_reactor
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.setblocking(False)
        client.sendall(b"ping")
        _spin(reactor, _recv_ready(client))
        assert client.recv(100) == b"ping"


def test_an_error_in_the_application_is_logged_and_closes_its_connection(
    echo_reactor: Any,
) -> None:
    """An exception raised while handling a read is logged with its traceback and
    the connection is closed, as on Twisted's own reactor."""
    reactor, port = echo_reactor
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.setblocking(False)
            client.sendall(b"boom")
            _spin(reactor, _recv_ready(client))
            assert client.recv(100) == b""  # closed by the proxy side
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e.get("log_failure", e.get("failure")) for e in events]
    assert any(f is not None and f.check(RuntimeError) for f in failures)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("", "ProxyReactor"),
        ("from twisted.internet import pollreactor; pollreactor.install()", "PollReactor"),
    ],
)
def test_install_uses_ours_unless_a_reactor_was_chosen(setup: str, expected: str) -> None:
    """`install` puts ProxyReactor in place, but keeps a reactor chosen before
    (``twistd -r poll``)."""
    code = f"{setup}\nfrom tlsproxy.reactor import install\nprint(type(install()).__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == expected


def test_an_error_while_closing_a_connection_spares_the_other_events(echo_reactor: Any) -> None:
    """An exception raised by a protocol's connectionLost is logged, and the reactor
    goes on serving other connections."""
    reactor, port = echo_reactor
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as bad,
            socket.create_connection(("127.0.0.1", port), timeout=5) as good,
        ):
            bad.sendall(b"fail on close")
            for _ in range(20):
                reactor.iterate(0.005)
            bad.close()
            good.setblocking(False)
            good.sendall(b"still here")
            _spin(reactor, _recv_ready(good))
            assert good.recv(100) == b"still here"
            for _ in range(20):
                reactor.iterate(0.005)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e.get("log_failure", e.get("failure")) for e in events]
    assert any(f is not None and "connectionLost" in f.getTraceback() for f in failures)
