"""The proxy engine over real loopback sockets, in front of a small twisted.web backend.

The proxy listens on plain TCP here (the TLS layer is tested elsewhere); clients
are treq and raw sockets.  Everything binds to 127.0.0.1 and every wait is
bounded by a timeout.
"""

# mypy: allow-untyped-decorators
from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.proxyharness import FunctionRouter
from tlsproxy.config import Backend
from tlsproxy.proxy import ProxyFactory, ProxySettings
from tlsproxy.routing import Route
from tlsproxy.upstream import UpstreamPools

pytestmark = pytest.mark.e2e

reactor: Any = _reactor

TIMEOUT = 20.0
SITE: dict[bytes | str, bytes | str] = {"Host": "site.test"}
MIB = 1024 * 1024


def bounded(d: defer.Deferred[Any], seconds: float = TIMEOUT) -> defer.Deferred[Any]:
    """``d`` with a deadline, so that no test can hang."""
    return d.addTimeout(seconds, reactor)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
        seen = {
            "x-forwarded-for": request.getHeader(b"x-forwarded-for"),
            "x-forwarded-proto": request.getHeader(b"x-forwarded-proto"),
            "forwarded": request.getHeader(b"forwarded"),
            "host": request.getHeader(b"host"),
            "client_port": request.getClientAddress().port,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {k: v.decode() if isinstance(v, bytes) else v for k, v in seen.items()}
        ).encode()


class Echo(Resource):
    """Answers the SHA-256 and length of the request body."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        data = request.content.read()
        return json.dumps(
            {
                "sha256": hashlib.sha256(data).hexdigest(),
                "length": len(data),
                "chunked": (request.getHeader(b"transfer-encoding") or b"").decode() or None,
            }
        ).encode()

    render_PUT = render_POST


class Big(Resource):
    """Streams ``n`` pseudo-random bytes with a pull producer (no Content-Length)."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        total = int(request.args[b"n"][0])
        produced = 0
        block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB

        class Producer:
            def resumeProducing(self) -> None:
                nonlocal produced
                if produced >= total:
                    request.unregisterProducer()
                    request.finish()
                    return
                chunk = block[: total - produced]
                produced += len(chunk)
                request.write(chunk)

            def stopProducing(self) -> None:
                pass

        request.registerProducer(Producer(), False)
        return NOT_DONE_YET


class Slow(Resource):
    """Never answers (until the connection goes)."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        return NOT_DONE_YET


def expected_big(n: int) -> bytes:
    block = hashlib.sha256(b"seed").digest() * 2048
    out = bytearray()
    while len(out) < n:
        out += block[: n - len(out)]
    return bytes(out)


class Stack:
    """A backend site, the proxy in front of it, and a treq client pool."""

    def __init__(self, settings: ProxySettings) -> None:
        root = Resource()
        root.putChild(b"hello", Hello())
        root.putChild(b"echo", Echo())
        root.putChild(b"big", Big())
        root.putChild(b"slow", Slow())
        self.site = Site(root)
        self.backend_port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        backend = Backend(scheme="http", host="127.0.0.1", port=self.backend_port.getHost().port)
        # A port nothing listens on: bound then closed.
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.dead_port = closed.getHost().port
        self._closing: list[defer.Deferred[Any]] = [defer.maybeDeferred(closed.stopListening)]
        routes = {
            b"site.test": Route(site="site.test", backend=backend),
            b"dead.test": Route(
                site="dead.test",
                backend=Backend(scheme="http", host="127.0.0.1", port=self.dead_port),
            ),
        }
        self.pools = UpstreamPools(reactor, settings)
        self.proxy = ProxyFactory(
            router=FunctionRouter(lambda sni, host: routes.get(host)),
            pools=self.pools,
            clock=reactor,
            settings=settings,
        )
        self.proxy_port = reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        self.port = self.proxy_port.getHost().port
        self.client_pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @defer.inlineCallbacks
    def close(self) -> Generator[Any, Any, None]:
        yield defer.DeferredList(self._closing)
        yield self.client_pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        self.pools.close()
        yield self.proxy_port.stopListening()
        yield self.backend_port.stopListening()
        # Let aborted connections finish closing.
        yield task.deferLater(reactor, 0.05, lambda: None)


@pytest.fixture
def stack() -> Generator[Stack, None, None]:
    s = Stack(ProxySettings(backend_read_timeout=1.0, sweep_interval=0.1))
    yield s
    pytest_twisted.blockon(s.close())


def get(stack: Stack, path: str, **kwargs: Any) -> defer.Deferred[Any]:
    headers = kwargs.pop("headers", {})
    headers.setdefault("Host", "site.test")
    return bounded(treq.get(stack.url(path), headers=headers, pool=stack.client_pool, **kwargs))


class RawClient(Protocol):
    """Sends bytes, collects everything until the server closes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.connected_d: defer.Deferred[RawClient] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.data))


@defer.inlineCallbacks
def raw_connect(port: int) -> Generator[Any, Any, RawClient]:
    client = RawClient()
    factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port, factory, timeout=5)
    yield bounded(client.connected_d)
    return client


@defer.inlineCallbacks
def wait_until(predicate: Any, seconds: float = TIMEOUT) -> Generator[Any, Any, None]:
    """Poll ``predicate`` every 10 ms until it is true, at most ``seconds``."""
    for _ in range(int(seconds * 100)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


@pytest_twisted.inlineCallbacks
def test_get_through_the_proxy(stack: Stack) -> Generator[Any, Any, None]:
    """A real HTTP client gets the backend's answer, with both cookies; the backend sees
    the original Host and the proxy's forwarding headers."""
    resp = yield get(stack, "/hello")
    assert resp.code == 200
    assert resp.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    seen = json.loads((yield bounded(resp.content())))
    assert seen["host"] == "site.test"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["forwarded"] == "for=127.0.0.1;proto=https;host=site.test"


@pytest_twisted.inlineCallbacks
def test_unknown_host_is_421(stack: Stack) -> Generator[Any, Any, None]:
    """A Host no site serves gets 421 from the proxy itself."""
    resp = yield get(stack, "/hello", headers={"Host": "nobody.test"})
    assert resp.code == 421
    yield bounded(resp.content())


@pytest_twisted.inlineCallbacks
def test_backend_down_is_502(stack: Stack) -> Generator[Any, Any, None]:
    """A backend with nothing listening gets the client a 502."""
    resp = yield get(stack, "/hello", headers={"Host": "dead.test"})
    assert resp.code == 502
    assert (yield bounded(resp.content())) == b"502 Bad Gateway\n"


@pytest_twisted.inlineCallbacks
def test_slow_backend_is_504(stack: Stack) -> Generator[Any, Any, None]:
    """A backend that does not answer within backend_read_timeout gets the client a 504."""
    resp = yield get(stack, "/slow")
    assert resp.code == 504
    yield bounded(resp.content())


@pytest_twisted.inlineCallbacks
def test_large_upload_with_content_length(stack: Stack) -> Generator[Any, Any, None]:
    """A 6 MiB upload with Content-Length reaches the backend intact."""
    body = expected_big(6 * MIB)
    resp = yield bounded(
        treq.post(
            stack.url("/echo"),
            data=body,
            headers=SITE,
            pool=stack.client_pool,
        )
    )
    assert resp.code == 200
    result = json.loads((yield bounded(resp.content())))
    assert result == {
        "sha256": hashlib.sha256(body).hexdigest(),
        "length": len(body),
        "chunked": None,
    }


@implementer(IBodyProducer)
class ChunkedBody:
    """An IBodyProducer of unknown length (so the client sends it chunked)."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        for i in range(0, len(self.data), 256 * 1024):
            consumer.write(self.data[i : i + 256 * 1024])
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_large_chunked_upload(stack: Stack) -> Generator[Any, Any, None]:
    """A 4 MiB chunked upload reaches the backend intact, re-chunked."""
    body = expected_big(4 * MIB)[::-1]
    resp = yield bounded(
        treq.put(
            stack.url("/echo"),
            data=ChunkedBody(body),
            headers=SITE,
            pool=stack.client_pool,
        )
    )
    assert resp.code == 200
    result = json.loads((yield bounded(resp.content())))
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["chunked"] == "chunked"


@pytest_twisted.inlineCallbacks
def test_large_streamed_download(stack: Stack) -> Generator[Any, Any, None]:
    """An 8 MiB response streamed without a length reaches the client intact."""
    n = 8 * MIB
    resp = yield get(stack, f"/big?n={n}")
    assert resp.code == 200
    data = yield bounded(resp.content())
    assert len(data) == n
    assert data == expected_big(n)


@pytest_twisted.inlineCallbacks
def test_keep_alive_and_pipelining_over_one_backend_connection(
    stack: Stack,
) -> Generator[Any, Any, None]:
    """Three pipelined requests on one client connection are answered in order over a
    single backend connection (the backend sees one client port)."""
    client = yield raw_connect(stack.port)
    req = b"GET /hello HTTP/1.1\r\nHost: site.test\r\n\r\n"
    assert client.transport is not None
    client.transport.write(req + req + req.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    data = yield bounded(client.done)
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in _split_responses(data)]
    assert len(bodies) == 3
    assert len({b["client_port"] for b in bodies}) == 1


def _split_responses(data: bytes) -> list[bytes]:
    """Split keep-alive responses that all carry Content-Length."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


@pytest_twisted.inlineCallbacks
def test_smuggling_attempt_is_refused(stack: Stack) -> Generator[Any, Any, None]:
    """A CL.TE smuggling payload gets one 400 and a closed connection."""
    client = yield raw_connect(stack.port)
    assert client.transport is not None
    client.transport.write(
        b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: site.test\r\n\r\n"
    )
    data = yield bounded(client.done)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert data.count(b"HTTP/1.1") == 1


@pytest_twisted.inlineCallbacks
def test_client_disconnect_frees_backend(stack: Stack) -> Generator[Any, Any, None]:
    """A client that hangs up while waiting makes the proxy drop its backend connection."""
    client = yield raw_connect(stack.port)
    assert client.transport is not None
    client.transport.write(b"GET /slow HTTP/1.1\r\nHost: site.test\r\n\r\n")
    yield wait_until(lambda: stack.pools.connection_count() == 1)
    client.transport.loseConnection()
    yield bounded(client.done)
    yield wait_until(lambda: stack.pools.connection_count() == 0)


class WebSocketishBackend(Protocol):
    """Answers any request with 101 and then echoes bytes upper-cased."""

    def __init__(self) -> None:
        self.upgraded = False
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.upgraded:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.upgraded = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"
                )
                rest = self.buffer.split(b"\r\n\r\n", 1)[1]
                if rest:
                    self.transport.write(rest.upper())
            return
        self.transport.write(data.upper())
        if b"BYE" in data.upper():
            self.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_websocket_splice() -> Generator[Any, Any, None]:
    """After a 101, bytes flow both ways through the proxy, and the backend's close
    reaches the client."""
    backend_port = reactor.listenTCP(
        0, Factory.forProtocol(WebSocketishBackend), interface="127.0.0.1"
    )
    backend = Backend(scheme="http", host="127.0.0.1", port=backend_port.getHost().port)
    pools = UpstreamPools(reactor)
    proxy = ProxyFactory(
        router=FunctionRouter(lambda sni, host: Route(site="ws.test", backend=backend)),
        pools=pools,
        clock=reactor,
    )
    proxy_port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
    try:
        client = yield raw_connect(proxy_port.getHost().port)
        assert client.transport is not None
        client.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        yield wait_until(lambda: b"\r\n\r\n" in client.data)
        assert client.data.startswith(b"HTTP/1.1 101 ")
        client.data.clear()
        client.transport.write(b"hello ")
        yield wait_until(lambda: client.data == b"HELLO ")
        client.transport.write(b"bye")
        data = yield bounded(client.done)
        assert data == b"HELLO BYE"
    finally:
        pools.close()
        yield proxy_port.stopListening()
        yield backend_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_behind_tls_sni_reaches_router_and_close_completes() -> Generator[Any, Any, None]:
    """Wrapped in Twisted's TLS layer as in production: the router gets the SNI name,
    and a Connection: close response ends with the TLS connection closed."""
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests import pki

    leaf = pki.make_ca().issue(["site.test"])
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(leaf.cert)  # type: ignore[arg-type]  # stubs lag pyOpenSSL
    context.use_privatekey(leaf.key)  # type: ignore[arg-type]
    for extra in leaf.chain:
        context.add_extra_chain_cert(extra)  # type: ignore[arg-type]

    @implementer(IOpenSSLServerConnectionCreator)
    class ServerOptions:
        def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
            return SSL.Connection(context, None)

    server_options = ServerOptions()
    backend_site = Site(Hello())
    backend_port = reactor.listenTCP(0, backend_site, interface="127.0.0.1")
    backend = Backend(scheme="http", host="127.0.0.1", port=backend_port.getHost().port)
    calls: list[tuple[str | None, bytes]] = []

    def router(sni: str | None, host: bytes) -> Route:
        calls.append((sni, host))
        return Route(site="site.test", backend=backend)

    pools = UpstreamPools(reactor)
    proxy = ProxyFactory(router=FunctionRouter(router), pools=pools, clock=reactor)
    proxy_port = reactor.listenTCP(
        0,
        TLSMemoryBIOFactory(server_options, False, proxy),  # type: ignore[arg-type]
        interface="127.0.0.1",
    )
    try:
        client = RawClient()
        trust = ssl.Certificate.loadPEM(pki.cert_pem(leaf.root))
        reactor.connectSSL(
            "127.0.0.1",
            proxy_port.getHost().port,
            ClientFactory.forProtocol(lambda: client),
            ssl.optionsForClientTLS("site.test", trustRoot=trust),
            timeout=5,
        )
        yield bounded(client.connected_d)
        assert client.transport is not None
        client.transport.write(
            b"GET /x HTTP/1.1\r\nHost: site.test\r\n\r\n"
            b"GET /y HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n"
        )
        data = yield bounded(client.done)
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
        assert b"Connection: close\r\n" in data
        # One routing decision: the keep-alive connection reuses it for the same Host.
        assert calls == [("site.test", b"site.test")]
    finally:
        pools.close()
        yield proxy_port.stopListening()
        yield backend_port.stopListening()
