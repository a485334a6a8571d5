"""The minimal relay: the least a proxy on tlsproxy's fast path does per request.

One job: serve HTTPS on the first ``listen.https`` endpoint of a tlsproxy
configuration file exactly as tlsproxy would (its TLS contexts, its TLS
transport `tlsproxy.tlsconn`, its eager sends and its reactor), and relay
keep-alive requests to the first host's backend over one backend connection
per client connection, parsing both directions with ``httptools`` as the
issue's feasibility probe did: the request's method, target and header fields
are copied to the backend with an ``X-Forwarded-For`` added, and the backend's
bytes are sent back unchanged.

Nothing else: no checks of the request or the response (the response goes
through httptools and nothing is done with it), no limits, no timeouts, no
routing, no header policy, no HSTS, no error pages, no request bodies, no
pool.  It is a benchmark peer only, measured for keep-alive small requests
alone, and must stay this small: the gap between it and tlsproxy is what
tlsproxy's engine (its strictness and features) costs per request, the gap
between it and nginx what Python, Twisted and memory-BIO TLS cost.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

import httptools
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from tlsproxy import eager, tls
from tlsproxy import reactor as proxy_reactor
from tlsproxy.config import load_config
from tlsproxy.listeners import parse_endpoints
from tlsproxy.plain import ChallengeTokens
from tlsproxy.service import prepare
from tlsproxy.tlsconn import TLSServerFactory


class _Backend(Protocol):
    """The backend side of one client connection: relays every byte back."""

    transport: Any

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.client.backend_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


class _BackendFactory(ClientFactory):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _Backend:
        return _Backend(self.client)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.client.transport.loseConnection()


class _Client(Protocol):
    """One client connection: each complete request head goes to the backend."""

    transport: Any

    def __init__(self, reactor: Any, backend: tuple[str, int]) -> None:
        self.reactor = reactor
        self.backend_address = backend
        self.parser = httptools.HttpRequestParser(self)
        self.backend: _Backend | None = None
        self.closed = False
        self.waiting: list[bytes] = []
        self.target = b""
        self.headers: list[bytes] = []

    def connectionMade(self) -> None:
        host, port = self.backend_address
        eager.connect_tcp(self.reactor, host, port, _BackendFactory(self), 10)

    def backend_ready(self, backend: _Backend) -> None:
        if self.closed:
            backend.transport.loseConnection()
            return
        self.backend = backend
        for request in self.waiting:
            backend.transport.write(request)
        self.waiting = []

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self.backend is not None:
            self.backend.transport.loseConnection()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        head = b"%s %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\n\r\n" % (
            self.parser.get_method(),
            self.target,
            b"".join(self.headers),
            self.transport.getPeer().host.encode("ascii"),
        )
        self.target, self.headers = b"", []
        if self.backend is None:
            self.waiting.append(head)
        else:
            self.backend.transport.write(head)


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, reactor: Any, backend: tuple[str, int]) -> None:
        self.reactor = reactor
        self.backend = backend

    def buildProtocol(self, addr: Any) -> _Client:
        return _Client(self.reactor, self.backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a tlsproxy configuration file")
    ns = parser.parse_args(argv)

    reactor = proxy_reactor.install()
    config = load_config(ns.config)
    # Checked and built as tlsproxy does; listening as on its first listen.https endpoint.
    prepared = prepare(config, ChallengeTokens(), datetime.datetime.now(datetime.UTC))
    endpoints, problems = parse_endpoints(reactor, config.listen.https[:1], "listen.https")
    if problems or not endpoints:
        raise SystemExit(f"{ns.config}: {problems or 'no listen.https endpoint'}")
    backend = config.hosts[0].backend
    factory = TLSServerFactory(
        tls.SNIConnectionCreator(prepared.contexts),
        _ClientFactory(reactor, (backend.host, backend.port)),
    )
    eager.eager_endpoint(reactor, endpoints[0]).listen(factory)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
