"""The proxy engine end to end in memory: client bytes in, backend bytes and client bytes out.

Every test drives raw HTTP/1.1 bytes through `tests.proxyharness`, which joins
a client, the proxy and fake backends with in-memory transports and a fake
clock: no sockets, no sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.internet import error
from twisted.internet.address import IPv6Address
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from tests.proxyharness import (
    BACKEND,
    OTHER_BACKEND,
    FakeBackend,
    FunctionRouter,
    Harness,
    MemoryTransport,
    Message,
    chunked,
    parse_requests,
    parse_responses,
    request,
    response,
)
from tlsproxy.config import Backend
from tlsproxy.headers import HeaderPolicy
from tlsproxy.proxy import ProxySettings
from tlsproxy.routing import Route, RouteTable


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def logged() -> Iterator[list[dict[str, object]]]:
    events: list[dict[str, object]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def one_request(h: Harness) -> bytes:
    """What the only backend received (asserting there is exactly one backend)."""
    assert len(h.backends) == 1
    return h.backends[0].take()


# ---------------------------------------------------------------- forwarding


def test_get_is_forwarded_and_answered(h: Harness) -> None:
    """A GET reaches the backend with Host preserved and our forwarding headers; the
    client gets the backend's response unchanged."""
    client, _ = h.client()
    client.send(request(b"GET", b"/path?q=1", [(b"Accept", b"text/html")]))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert (seen.method, seen.target, seen.version) == (b"GET", b"/path?q=1", "1.1")
    assert seen.header(b"Host") == b"example.com"
    assert seen.header(b"Accept") == b"text/html"
    assert seen.header(b"X-Forwarded-For") == b"192.0.2.7"
    assert seen.header(b"X-Forwarded-Proto") == b"https"
    assert seen.header(b"X-Forwarded-Host") == b"example.com"
    assert seen.header(b"X-Forwarded-Port") == b"443"
    assert seen.header(b"Forwarded") == b"for=192.0.2.7;proto=https;host=example.com"
    h.backends[0].send(response(200, b"hello", [(b"Content-Type", b"text/plain")]))
    h.pump()
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert client.lost is None


def test_host_with_port_and_case_is_preserved(h: Harness) -> None:
    """The Host header reaches the backend exactly as the client sent it; the router
    gets the name without the port."""
    client, _ = h.client()
    client.send(request(host=b"Example.COM:443"))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.header(b"Host") == b"Example.COM:443"
    assert h.router_calls == [(None, b"Example.COM")]


def test_sni_is_given_to_the_router(h: Harness) -> None:
    """The TLS server name the client sent is passed to the router."""
    client, _ = h.client(sni=b"example.com")
    client.send(request())
    h.pump()
    assert h.router_calls == [("example.com", b"example.com")]


def test_repeated_response_headers_keep_their_order(h: Harness) -> None:
    """Several Set-Cookie headers reach the client separately and in order."""
    client, _ = h.client()
    cookies = [(b"Set-Cookie", b"a=1"), (b"X-Other", b"x"), (b"Set-Cookie", b"b=2; Secure")]
    data = h.exchange(client, request(), response(200, b"", cookies))
    [resp] = parse_responses(data)
    assert resp.header_all(b"Set-Cookie") == [b"a=1", b"b=2; Secure"]
    assert resp.headers[:3] == cookies


def test_unknown_host_gets_421(h: Harness) -> None:
    """A Host that matches no site is answered 421 without contacting any backend;
    the connection stays usable."""
    client, _ = h.client()
    client.send(request(host=b"unknown.example"))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 421
    assert resp.header(b"Connection") is None
    assert h.backends == [] and h.reactor.pending == []
    client.send(request())
    h.pump()
    assert len(h.backends) == 1


def test_keep_alive_reuses_one_backend_connection(h: Harness) -> None:
    """Many requests on one client connection are served over one backend connection."""
    client, _ = h.client()
    for i in range(5):
        body = b"response %d" % i
        data = h.exchange(client, request(target=b"/%d" % i), response(200, body))
        assert parse_responses(data)[0].body == body
    assert len(h.backends) == 1
    assert [m.target for m in parse_requests(h.backends[0].take())] == [
        b"/0",
        b"/1",
        b"/2",
        b"/3",
        b"/4",
    ]


def test_pooled_connection_is_shared_between_clients(h: Harness) -> None:
    """A backend connection freed by one client serves the next client."""
    first, _ = h.client()
    h.exchange(first, request(), response(200, b"a"))
    second, _ = h.client()
    data = h.exchange(second, request(), response(200, b"b"))
    assert parse_responses(data)[0].body == b"b"
    assert len(h.backends) == 1
    assert h.pools.idle_count(BACKEND) == 1


def test_each_backend_has_its_own_pool(h: Harness) -> None:
    """Requests for different sites go to their own backends."""
    client, _ = h.client()
    h.exchange(client, request(host=b"example.com"), response(200, b"a"))
    h.exchange(client, request(host=b"other.example"), response(200, b"b"))
    assert len(h.backends) == 2
    assert h.pools.idle_count(BACKEND) == 1
    assert h.pools.idle_count(OTHER_BACKEND) == 1


def test_pipelined_requests_are_answered_in_order(h: Harness) -> None:
    """Pipelined requests are forwarded one at a time and answered in order; reading
    pauses while one is in flight."""
    client, proto = h.client()
    client.send(request(target=b"/1") + request(target=b"/2") + request(target=b"/3"))
    h.pump()
    backend = h.backends[0]
    assert [m.target for m in parse_requests(backend.take())] == [b"/1"]
    assert proto.transport.reading_paused  # type: ignore[union-attr]
    backend.send(response(200, b"one"))
    h.pump()
    assert [m.target for m in parse_requests(backend.take())] == [b"/2"]
    backend.send(response(200, b"two"))
    h.pump()
    backend.send(response(200, b"three"))
    h.pump()
    assert [r.body for r in parse_responses(client.take())] == [b"one", b"two", b"three"]
    assert not proto.transport.reading_paused  # type: ignore[union-attr]
    assert len(h.backends) == 1


def test_pipelined_request_with_body(h: Harness) -> None:
    """A pipelined POST's body, read while an earlier request was served, reaches the backend."""
    client, _ = h.client()
    client.send(request(target=b"/1") + request(b"POST", b"/2", body=b"payload"))
    h.pump()
    backend = h.backends[0]
    backend.take()
    backend.send(response(200, b"one"))
    h.pump()
    [post] = parse_requests(backend.take())
    assert (post.method, post.body, post.header(b"Content-Length")) == (b"POST", b"payload", b"7")


def test_post_with_content_length(h: Harness) -> None:
    """A Content-Length body is forwarded byte for byte with the same length."""
    client, _ = h.client()
    client.send(request(b"POST", b"/upload", [(b"Content-Type", b"x/y")], body=b"a" * 1000))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.body == b"a" * 1000
    assert seen.header(b"Content-Length") == b"1000"
    assert seen.complete


def test_body_arriving_in_pieces_streams(h: Harness) -> None:
    """Body bytes are forwarded as they arrive, before the body is complete."""
    client, _ = h.client()
    head = request(b"POST", b"/", body=b"0123456789")
    client.send(head[:-6])
    h.pump()
    assert h.backends[0].received.endswith(b"\r\n\r\n0123")
    client.send(head[-6:])
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert seen.body == b"0123456789" and seen.complete


def test_chunked_request_is_rechunked(h: Harness) -> None:
    """A chunked upload reaches the backend with valid chunked framing; chunk extensions
    and trailers are dropped."""
    client, _ = h.client()
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    client.send(request(b"POST", b"/", [(b"Transfer-Encoding", b"chunked")]) + body)
    h.pump()
    raw = one_request(h)
    assert raw.endswith(b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [seen] = parse_requests(raw)
    assert seen.header(b"Transfer-Encoding") == b"chunked"
    assert seen.header(b"Content-Length") is None
    assert seen.body == b"hello world"


def test_chunked_response_is_relayed(h: Harness) -> None:
    """A chunked response reaches an HTTP/1.1 client chunked; trailers are dropped."""
    client, _ = h.client()
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"ab", b"cde")
    data = h.exchange(client, request(), raw[:-2] + b"X-T: 1\r\n\r\n")
    assert data.endswith(b"\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    [resp] = parse_responses(data)
    assert resp.body == b"abcde" and resp.complete


def test_close_delimited_response_is_chunked_for_http11(h: Harness) -> None:
    """A backend response without length is chunked to an HTTP/1.1 client, whose
    connection stays open; the backend connection is not reused."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    backend = h.backends[0]
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
    h.pump()
    backend.send(b"part two")
    backend.close()
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.header(b"Transfer-Encoding") == b"chunked"
    assert resp.body == b"part one, part two" and resp.complete
    assert client.lost is None
    assert h.pools.connection_count() == 0


def test_close_delimited_response_to_http10_client(h: Harness) -> None:
    """An HTTP/1.0 client gets a length-less response delimited by closing the connection."""
    client, _ = h.client()
    client.send(request(version=b"HTTP/1.0", headers=[(b"Connection", b"keep-alive")]))
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\n\r\nbody")
    h.backends[0].close()
    h.pump()
    data = client.take()
    assert data == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody"
    assert client.lost is not None


def test_http10_keep_alive(h: Harness) -> None:
    """An HTTP/1.0 client asking for keep-alive gets it when the length is known."""
    client, _ = h.client()
    req = request(version=b"HTTP/1.0", headers=[(b"Connection", b"keep-alive")])
    data = h.exchange(client, req, response(200, b"x"))
    [resp] = parse_responses(data)
    assert resp.header(b"Connection") == b"keep-alive"
    data = h.exchange(client, request(version=b"HTTP/1.0"), response(200, b"y"))
    assert parse_responses(data)[0].header(b"Connection") == b"close"
    h.pump()
    assert client.lost is not None
    [first, second] = parse_requests(h.backends[0].take())
    assert first.version == second.version == "1.1"  # the backend always gets HTTP/1.1
    assert first.header(b"Connection") is None


def test_head_response_has_no_body_and_connection_is_not_reused(h: Harness) -> None:
    """A HEAD response with Content-Length carries no body; since a non-compliant
    backend might still send one, its connection is not reused (one with
    ``Content-Length: 0`` is)."""
    client, _ = h.client()
    client.send(request(b"HEAD"))
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    h.pump()
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    data = h.exchange(client, request(b"HEAD"), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    data = h.exchange(client, request(), response(200, b"after"))
    assert parse_responses(data)[0].body == b"after"
    assert len(h.backends) == 2


def test_head_response_in_pieces_with_chunked_header(h: Harness) -> None:
    """A HEAD response announcing chunked framing, arriving in pieces, ends at its head
    (and, as a body might follow anyway, its backend connection is not reused)."""
    client, _ = h.client()
    client.send(request(b"HEAD"))
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nTransfer-")
    h.pump()
    h.backends[0].send(b"Encoding: chunked\r\nX-A: 1\r\n\r\n")
    h.pump()
    assert client.take() == b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"
    assert h.pools.idle_count(BACKEND) == 0


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(h: Harness, status: int) -> None:
    """204 and 304 responses have no body and keep both connections usable."""
    client, _ = h.client()
    data = h.exchange(client, request(), b"HTTP/1.1 %d X\r\nETag: e\r\n\r\n" % status)
    assert data == b"HTTP/1.1 %d X\r\nETag: e\r\n\r\n" % status
    data = h.exchange(client, request(), response(200, b"next"))
    assert parse_responses(data)[0].body == b"next"
    assert len(h.backends) == 1


def test_interim_responses(h: Harness) -> None:
    """103 Early Hints reaches the client; a stray 100 Continue from the backend does not."""
    client, _ = h.client()
    data = h.exchange(
        client,
        request(),
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + response(200, b"ok"),
    )
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
    assert data.endswith(b"\r\n\r\nok")
    assert b"100 Continue" not in data


def test_client_connection_close(h: Harness) -> None:
    """A client's Connection: close is honoured after the response; later bytes are ignored."""
    client, _ = h.client()
    client.send(request(headers=[(b"Connection", b"close")]) + request(target=b"/ignored"))
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert seen.header(b"Connection") is None
    h.backends[0].send(response(200, b"bye"))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.header(b"Connection") == b"close"
    assert client.lost is not None
    assert h.backends[0].take() == b""
    assert h.pools.idle_count(BACKEND) == 1


def test_backend_connection_close_is_not_reused(h: Harness) -> None:
    """A backend response with Connection: close ends that backend connection, not the
    client's; the next request opens a new backend connection."""
    client, _ = h.client()
    data = h.exchange(client, request(), response(200, b"a", [(b"Connection", b"close")]))
    [resp] = parse_responses(data)
    assert resp.header(b"Connection") is None
    h.exchange(client, request(), response(200, b"b"))
    assert len(h.backends) == 2
    assert h.backends[0].lost is not None


def test_response_hop_by_hop_headers_are_removed(h: Harness) -> None:
    """Keep-Alive, Connection and headers it names do not reach the client."""
    client, _ = h.client()
    headers = [
        (b"Keep-Alive", b"timeout=5"),
        (b"Connection", b"X-Internal"),
        (b"X-Internal", b"secret"),
        (b"X-Public", b"ok"),
    ]
    [resp] = parse_responses(h.exchange(client, request(), response(200, b"", headers)))
    assert resp.names() == [b"x-public", b"content-length"]


def test_client_forwarding_headers_are_replaced(h: Harness) -> None:
    """Client-sent X-Forwarded-*, Forwarded, X-Real-IP and underscore headers never reach
    the backend; ours do, exactly once."""
    client, _ = h.client()
    spoofed = [
        (b"X-Forwarded-For", b"10.9.9.9"),
        (b"X-Forwarded-Proto", b"http"),
        (b"Forwarded", b"for=10.9.9.9"),
        (b"X-Real-IP", b"10.9.9.9"),
        (b"X_Forwarded_For", b"10.9.9.9"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Connection", b"X-Drop"),
        (b"X-Drop", b"1"),
    ]
    client.send(request(headers=spoofed))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.header_all(b"X-Forwarded-For") == [b"192.0.2.7"]
    assert seen.header_all(b"X-Forwarded-Proto") == [b"https"]
    assert seen.header_all(b"Forwarded") == [b"for=192.0.2.7;proto=https;host=example.com"]
    for name in [b"x-real-ip", b"x_forwarded_for", b"proxy-authorization", b"x-drop"]:
        assert name not in seen.names()


def test_ipv6_client_forwarded_header(h: Harness) -> None:
    """An IPv6 client appears bracketed and quoted in Forwarded, plain in X-Forwarded-For."""
    client, _ = h.client(IPv6Address("TCP", "2001:db8::5", 50000))
    client.send(request())
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.header(b"X-Forwarded-For") == b"2001:db8::5"
    assert seen.header(b"Forwarded") == b'for="[2001:db8::5]";proto=https;host=example.com'


def test_absolute_form_target_matching_host(h: Harness) -> None:
    """An absolute-form target naming the Host is forwarded in origin form."""
    client, _ = h.client()
    client.send(request(target=b"https://example.com/a?b"))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.target == b"/a?b"


def test_options_asterisk(h: Harness) -> None:
    """OPTIONS * is forwarded as is."""
    client, _ = h.client()
    client.send(request(b"OPTIONS", b"*"))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert (seen.method, seen.target) == (b"OPTIONS", b"*")


def test_tcp_nodelay_on_both_sides(h: Harness) -> None:
    """Nagle's algorithm is off on the client and backend connections."""
    client, proto = h.client()
    h.exchange(client, request(), response())
    assert proto.transport.no_delay  # type: ignore[union-attr]
    assert h.backends[0].t.other is not None and h.backends[0].t.other.no_delay


def test_response_head_and_small_body_are_one_write(h: Harness) -> None:
    """A response's head and the body bytes that came with it go to the client in one write."""
    client, proto = h.client()
    client.send(request())
    h.pump()
    assert isinstance(proto.transport, MemoryTransport)
    writes = proto.transport.record_writes()
    h.backends[0].send(response(200, b"small body"))
    h.pump()
    assert len(writes) == 1 and writes[0].endswith(b"small body")


def test_request_head_and_body_are_one_write(h: Harness) -> None:
    """On a pooled connection, a request's head and the body bytes read with it are
    sent to the backend in one write."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    backend = h.backends[0]
    proxy_side = backend.t.other
    assert proxy_side is not None
    writes = proxy_side.record_writes()
    client.send(request(b"POST", body=b"0123456789"))
    h.pump()
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n0123456789")


# ------------------------------------------------------------------ failures


def test_connection_refused_is_502(h: Harness, logged: list[dict[str, object]]) -> None:
    """A backend that refuses connections gets the client a plain 502, and the failure
    is logged with site, upstream and reason."""
    h.backend_servers[(BACKEND.host, BACKEND.port)] = error.ConnectionRefusedError()
    client, _ = h.client()
    client.send(request(target=b"/x"))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 502
    assert resp.body == b"502 Bad Gateway\n"
    assert resp.header(b"Content-Type") == b"text/plain; charset=utf-8"
    assert b"10.0.0.2" not in resp.body
    assert client.lost is None  # the request was complete: the connection stays
    [event] = [e for e in logged if e.get("reason") == "connection refused"]
    assert event["site"] == "example.com"
    assert event["upstream"] == "10.0.0.2:8080"
    assert event["log_level"] == LogLevel.warn


def test_connect_timeout_is_504(h: Harness) -> None:
    """A backend that cannot be reached in time gets the client 504; the connect
    timeout comes from the settings (10 s by default)."""
    h.backend_servers[(BACKEND.host, BACKEND.port)] = error.TimeoutError()
    client, _ = h.client()
    client.send(request())
    h.pump()
    assert parse_responses(client.take())[0].status == 504
    assert h.reactor.connect_timeouts == [10.0]


def test_dns_failure_is_502(h: Harness) -> None:
    """A backend name that does not resolve gets 502."""
    h.backend_servers[(BACKEND.host, BACKEND.port)] = error.DNSLookupError("nope")
    client, _ = h.client()
    client.send(request())
    h.pump()
    assert parse_responses(client.take())[0].status == 502


def test_unsupported_backend_scheme_is_502() -> None:
    """A route to a backend scheme the pool cannot speak gets 502, not a crash."""
    other_backend = Backend(scheme="ftp", host="10.0.0.9", port=21)
    h = Harness(routes={b"example.com": Route(site="example.com", backend=other_backend)})
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.reactor.advance(0)
    h.pump()
    assert parse_responses(client.take())[0].status == 502


def test_failed_post_body_still_arriving_closes(h: Harness) -> None:
    """A 502 sent while a large request body is still coming closes the connection."""
    h.backend_servers[(BACKEND.host, BACKEND.port)] = error.ConnectionRefusedError()
    client, _ = h.client()
    client.send(request(b"POST", body=b"x" * 200_000)[:1000])
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 502 and resp.header(b"Connection") == b"close"
    assert client.lost is not None


def test_response_timeout_is_504(h: Harness) -> None:
    """A backend that sends nothing within backend_read_timeout gets the client a 504,
    and that backend connection is dropped."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.advance(59)
    assert client.received == b""
    h.advance(2)
    assert parse_responses(client.take())[0].status == 504
    assert h.backends[0].lost is not None
    assert client.lost is None


def test_backend_stalling_mid_body_closes_client(h: Harness) -> None:
    """A backend that stops sending mid-body leaves the client with a cut-short
    response and a closed connection, never a silently complete one."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    h.pump()
    h.advance(62)
    assert client.lost is not None
    assert client.take().endswith(b"partial")


def test_garbage_response_is_502(h: Harness) -> None:
    """A backend answering with something that is not HTTP gets the client a 502."""
    client, _ = h.client()
    data = h.exchange(client, request(), b"SSH-2.0-OpenSSH_9.6\r\n")
    assert parse_responses(data)[0].status == 502
    assert h.backends[0].lost is not None
    data = h.exchange(client, request(), response(200, b"fresh"))
    assert parse_responses(data)[0].body == b"fresh"


def test_bad_response_framing_is_502(h: Harness) -> None:
    """A response with both Content-Length and Transfer-Encoding is refused with 502."""
    client, _ = h.client()
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert parse_responses(h.exchange(client, request(), bad))[0].status == 502


def test_response_with_unknown_coding_is_502(h: Harness) -> None:
    """A response body in a transfer coding we cannot relay is refused with 502."""
    client, _ = h.client()
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx"
    assert parse_responses(h.exchange(client, request(), bad))[0].status == 502


def test_oversized_response_head_is_502() -> None:
    """A backend response head larger than max_response_header_bytes is refused with 502."""
    h = Harness(ProxySettings(max_response_header_bytes=1000))
    client, _ = h.client()
    big = response(200, b"", [(b"X-Big", b"v" * 2000)])
    assert parse_responses(h.exchange(client, request(), big))[0].status == 502


def test_close_before_response_head_is_502(h: Harness) -> None:
    """A backend that closes after a partial head gets the client a 502."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nContent-")
    h.backends[0].close()
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 502


def test_close_mid_body_closes_client(h: Harness) -> None:
    """A backend closing before the announced length leaves the client with a closed
    connection and a short body, never a silently complete response."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    h.backends[0].close()
    h.pump()
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
    assert client.lost is not None


def test_close_mid_chunked_body_omits_last_chunk(h: Harness) -> None:
    """A chunked response cut short reaches the client without its last chunk."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.backends[0].send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    h.backends[0].close()
    h.pump()
    data = client.take()
    assert data.endswith(b"3\r\nabc\r\n")
    assert b"0\r\n\r\n" not in data
    assert client.lost is not None


def test_client_disconnect_aborts_backend_request(h: Harness) -> None:
    """A client hanging up while its request is in flight drops that backend connection."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    client.close()
    h.pump()
    assert h.backends[0].lost is not None
    assert h.pools.connection_count() == 0


def test_client_disconnect_mid_upload(h: Harness) -> None:
    """A client hanging up mid-upload drops the backend connection carrying it."""
    client, _ = h.client()
    client.send(request(b"POST", body=b"x" * 100)[:-50])
    h.pump()
    client.close()
    h.pump()
    assert h.backends[0].lost is not None
    assert h.pools.idle_count() == 0


def test_stale_pooled_connection_is_retried_for_get(h: Harness) -> None:
    """If a reused backend connection closes before answering a GET, the request is sent
    once more on a fresh connection."""
    client, _ = h.client()
    h.exchange(client, request(), response(200, b"first"))
    client.send(request(target=b"/again"))
    h.pump()
    h.backends[0].close()
    h.pump()
    assert len(h.backends) == 2
    [seen] = parse_requests(h.backends[1].take())
    assert seen.target == b"/again"
    h.backends[1].send(response(200, b"second"))
    h.pump()
    assert parse_responses(client.take())[0].body == b"second"


def test_stale_pooled_connection_is_not_retried_for_post(h: Harness) -> None:
    """A POST is never sent twice: a reused connection closing before answering is a 502."""
    client, _ = h.client()
    h.exchange(client, request(), response(200, b"first"))
    client.send(request(b"POST", body=b"x"))
    h.pump()
    h.backends[0].close()
    h.pump()
    assert len(h.backends) == 1
    assert parse_responses(client.take())[0].status == 502


def test_idle_backend_connections_expire(h: Harness) -> None:
    """Idle pooled connections are closed after backend_idle_timeout (4 s by default)."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    assert h.pools.idle_count() == 1
    h.advance(3)
    assert h.pools.idle_count() == 1
    h.advance(2)
    assert h.pools.idle_count() == 0
    assert h.backends[0].lost is not None


def test_expired_idle_connection_is_not_handed_out() -> None:
    """A pooled connection past its idle timeout is never reused, even before the sweep."""
    h = Harness(ProxySettings(sweep_interval=100))
    client, _ = h.client()
    h.exchange(client, request(), response())
    h.reactor.advance(5)
    h.exchange(client, request(), response())
    assert len(h.backends) == 2


def test_backend_closing_idle_connection_leaves_pool(h: Harness) -> None:
    """An idle pooled connection the backend closes is forgotten."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    h.backends[0].close()
    h.pump()
    assert h.pools.idle_count() == 0
    h.exchange(client, request(), response())
    assert len(h.backends) == 2


def test_unsolicited_bytes_on_idle_connection_discard_it(h: Harness) -> None:
    """A backend sending bytes on an idle connection loses that connection."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    h.backends[0].send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    h.pump()
    assert h.pools.idle_count() == 0


def test_extra_bytes_after_response_discard_backend(h: Harness) -> None:
    """Bytes after a complete response are not relayed and that connection is not reused."""
    client, _ = h.client()
    data = h.exchange(client, request(), response(200, b"ok") + b"junk")
    assert data.endswith(b"\r\n\r\nok")
    assert h.pools.idle_count() == 0
    assert client.lost is None


def test_max_idle_connections_per_backend() -> None:
    """At most backend_max_idle connections per backend are kept idle."""
    h = Harness(ProxySettings(backend_max_idle=1))
    clients = [h.client()[0] for _ in range(3)]
    for c in clients:
        c.send(request())
    h.pump()
    assert len(h.backends) == 3
    for b in h.backends:
        b.send(response())
    h.pump()
    assert h.pools.idle_count() == 1
    assert h.pools.connection_count() == 1


def test_pool_close_drops_everything(h: Harness) -> None:
    """Closing the pools closes every backend connection and stops its sweep."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    h.pools.close()
    h.pump()
    assert h.pools.connection_count() == 0
    client.close()
    h.pump()
    assert h.reactor.getDelayedCalls() == []


def test_early_backend_response_to_small_upload_keeps_connection(h: Harness) -> None:
    """A backend answering before a small upload ends: the client gets the answer, the
    rest of its body is read and dropped, and the connection stays usable."""
    client, _ = h.client()
    client.send(request(b"POST", body=b"y" * 1000)[:-500])
    h.pump()
    h.backends[0].send(response(401, b"no"))
    h.pump()
    assert parse_responses(client.take())[0].status == 401
    client.send(b"y" * 500)
    h.pump()
    assert h.pools.idle_count() == 0  # the backend saw only part of the request
    data = h.exchange(client, request(), response(200, b"next"))
    assert parse_responses(data)[0].body == b"next"


def test_early_backend_response_to_large_upload_closes(h: Harness) -> None:
    """A backend answering before a large upload ends: the answer says Connection: close."""
    client, _ = h.client()
    client.send(request(b"POST", body=b"y" * 1_000_000)[:2000])
    h.pump()
    h.backends[0].send(response(413, b"too big"))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 413 and resp.header(b"Connection") == b"close"
    assert client.lost is not None


# -------------------------------------------------------------- back-pressure


def test_full_backend_buffer_pauses_client_reading() -> None:
    """While the backend's send buffer is full, the proxy stops reading the client's
    upload; it resumes when the backend catches up, and every byte arrives."""
    h = Harness(backend_high_water=10_000, chunk_size=4096)
    client, proto = h.client()
    client.send(request(b"POST", b"/", [(b"Expect", b"100-continue")], body=None)[:-2])
    body = bytes(range(256)) * 1000  # 256 000 bytes
    client.send(b"Content-Length: %d\r\n\r\n" % len(body))
    h.pump()
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    backend = h.backends[0]
    backend.t.pauseProducing()  # the backend stops reading
    client.send(body)
    h.pump()
    assert proto.transport.reading_paused  # type: ignore[union-attr]
    buffered = len(backend.t.other.outgoing)  # type: ignore[union-attr]
    assert buffered < 10_000 + 2 * 65536
    backend.t.resumeProducing()
    h.pump()
    assert not proto.transport.reading_paused  # type: ignore[union-attr]
    [seen] = parse_requests(backend.take())
    assert seen.body == body


def test_slow_client_pauses_backend_reading() -> None:
    """While the client is not reading, the proxy stops reading the backend's response;
    no deadline fires while paused, and every byte arrives in the end."""
    h = Harness(client_high_water=10_000, chunk_size=4096)
    client, proto = h.client()
    client.send(request())
    h.pump()
    backend = h.backends[0]
    client.transport.pauseProducing()  # type: ignore[union-attr]
    body = bytes(range(256)) * 1000
    backend.send(response(200, body))
    h.pump()
    proxy_side = backend.t.other
    assert proxy_side is not None and proxy_side.reading_paused
    assert len(proto.transport.outgoing) < 10_000 + 2 * 4096  # type: ignore[union-attr]
    h.advance(50)  # less than client_send_timeout: nothing gives up
    client.transport.resumeProducing()  # type: ignore[union-attr]
    h.pump()
    assert parse_responses(client.take())[0].body == body
    assert h.pools.idle_count() == 1


def test_client_not_reading_is_dropped_after_send_timeout() -> None:
    """A client that stops reading for client_send_timeout is disconnected and its
    backend connection dropped."""
    h = Harness(client_high_water=1000, chunk_size=4096)
    client, proto = h.client()
    client.send(request())
    h.pump()
    client.transport.pauseProducing()  # type: ignore[union-attr]
    h.backends[0].send(response(200, b"z" * 100_000))
    h.pump()
    h.advance(61)
    assert proto.transport.disconnected  # type: ignore[union-attr]
    assert h.backends[0].lost is not None


def test_large_bodies_stream_both_ways_in_small_steps() -> None:
    """Several MiB go up and down through small buffers without loss or reordering."""
    h = Harness(backend_high_water=8192, client_high_water=8192, chunk_size=1500)
    client, _ = h.client()
    up = bytes(range(251)) * 12_000  # ~3 MB
    down = bytes(range(241)) * 13_000
    client.send(request(b"PUT", b"/big", [(b"Transfer-Encoding", b"chunked")]))
    for i in range(0, len(up), 50_000):
        client.send(chunked(up[i : i + 50_000])[:-5])
    client.send(b"0\r\n\r\n")
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert seen.body == up and seen.complete
    h.backends[0].send(response(200, down))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.body == down


# ------------------------------------------------------------------ WebSocket


WS_HANDSHAKE = request(
    headers=[
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ],
    target=b"/chat",
)
WS_ACCEPT = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def test_websocket_upgrade_and_splice(h: Harness) -> None:
    """A WebSocket handshake reaches the backend with its Upgrade headers; after the
    101 bytes flow both ways unchanged, and a close on one side closes the other."""
    client, _ = h.client()
    client.send(WS_HANDSHAKE)
    h.pump()
    backend = h.backends[0]
    [seen] = parse_requests(backend.take())
    assert seen.header(b"Upgrade") == b"websocket"
    assert seen.header(b"Connection") == b"Upgrade"
    assert seen.header(b"Sec-WebSocket-Key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    backend.send(WS_ACCEPT + b"\x81\x05hello")
    h.pump()
    data = client.take()
    [resp] = parse_responses(data)
    assert resp.status == 101
    assert resp.header(b"Upgrade") == b"websocket"
    assert resp.header(b"Sec-WebSocket-Accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert data.endswith(b"\r\n\r\n\x81\x05hello")
    client.send(b"\x81\x85maskdHTTP/1.1 not http")
    h.pump()
    assert backend.take() == b"\x81\x85maskdHTTP/1.1 not http"
    backend.send(b"\x88\x00")
    backend.close()
    h.pump()
    assert client.take() == b"\x88\x00"
    assert client.lost is not None


def test_websocket_client_close_closes_backend(h: Harness) -> None:
    """When the WebSocket client hangs up, the backend connection is closed too."""
    client, _ = h.client()
    client.send(WS_HANDSHAKE)
    h.pump()
    h.backends[0].send(WS_ACCEPT)
    h.pump()
    client.send(b"\x88\x80mask")
    client.close()
    h.pump()
    assert h.backends[0].take().endswith(b"\r\n\r\n\x88\x80mask")
    assert h.backends[0].lost is not None
    assert h.pools.connection_count() == 0


def test_websocket_early_data_waits_for_101(h: Harness) -> None:
    """Bytes a client sends right after its handshake are held until the backend accepts."""
    client, _ = h.client()
    client.send(WS_HANDSHAKE + b"\x81\x80early")
    h.pump()
    backend = h.backends[0]
    assert backend.take().endswith(b"\r\n\r\n")
    backend.send(WS_ACCEPT)
    h.pump()
    assert backend.take() == b"\x81\x80early"


def test_websocket_refused_by_backend(h: Harness) -> None:
    """A backend refusing the upgrade: its answer reaches the client, then the connection closes."""
    client, _ = h.client()
    data = h.exchange(client, WS_HANDSHAKE, response(403, b"no"))
    [resp] = parse_responses(data)
    assert resp.status == 403 and resp.header(b"Connection") == b"close"
    assert client.lost is not None


def test_websocket_backpressure(h: Harness) -> None:
    """Spliced WebSocket traffic honours back-pressure: a full backend buffer pauses the client."""
    h = Harness(backend_high_water=1000, chunk_size=512)
    client, proto = h.client()
    client.send(WS_HANDSHAKE)
    h.pump()
    backend = h.backends[0]
    backend.send(WS_ACCEPT)
    h.pump()
    backend.t.pauseProducing()
    client.send(b"m" * 20_000)
    h.pump()
    assert proto.transport.reading_paused  # type: ignore[union-attr]
    backend.t.resumeProducing()
    h.pump()
    assert backend.received.endswith(b"m" * 20_000)


def test_other_upgrades_are_ignored(h: Harness) -> None:
    """A non-WebSocket upgrade (h2c) is served as an ordinary request without Upgrade."""
    client, _ = h.client()
    req = request(headers=[(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")])
    client.send(req + request(target=b"/second"))
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert b"upgrade" not in seen.names() and b"connection" not in seen.names()
    h.backends[0].send(response())
    h.pump()
    assert [m.target for m in parse_requests(h.backends[0].take())] == [b"/second"]


def test_unexpected_101_is_502(h: Harness) -> None:
    """A backend switching protocols on an ordinary request gets the client a 502."""
    client, _ = h.client()
    data = h.exchange(client, request(), WS_ACCEPT)
    assert parse_responses(data)[0].status == 502


# ---------------------------------------------------------- factory plumbing


def test_factory_sweep_runs_only_with_connections(h: Harness) -> None:
    """No timer is left behind once every connection is gone."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    assert h.reactor.getDelayedCalls()
    client.close()
    h.pump()
    h.advance(10)
    assert h.reactor.getDelayedCalls() == []
    assert h.factory.connection_count() == 0


def test_backend_instances_are_independent(h: Harness) -> None:
    """Sanity: the harness gives each backend connection its own fake server."""
    assert FakeBackend is not None


def test_broken_body_after_early_answer_just_closes(h: Harness) -> None:
    """A malformed body arriving after the request was already answered closes the
    connection without a second response."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.pump()
    h.backends[0].send(response(403, b"no"))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 403 and resp.header(b"Connection") == b"close"
    client.send(b"zz\r\n")
    h.pump()
    assert client.take() == b""
    assert client.lost is not None


def test_connection_parked_after_cancelled_connect_is_retried(h: Harness) -> None:
    """A connection made for a borrower that stopped waiting is parked idle; if the
    backend has closed it by the time it is used, the request is retried."""
    waiter = object()
    h.pools.connect(BACKEND, waiter)  # type: ignore[arg-type]
    h.pools.cancel(waiter)  # type: ignore[arg-type]
    h.pump()
    assert h.pools.idle_count() == 1
    client, _ = h.client()
    client.send(request(target=b"/retry"))
    h.pump()
    h.backends[0].close()
    h.pump()
    assert len(h.backends) == 2
    assert [m.target for m in parse_requests(h.backends[1].take())] == [b"/retry"]


def test_client_leaving_while_connecting_drops_the_new_connection(h: Harness) -> None:
    """A client that hangs up while its backend connection is being made: the proxy
    notices once it reads again and drops that backend connection."""
    client, _ = h.client()
    client.send(request())
    client.close()
    h.pump()
    assert h.pools.connection_count() == 0
    assert h.backends[0].lost is not None


def test_router_swap_applies_to_open_connections(h: Harness) -> None:
    """Replacing factory.router (a reload) takes effect on the next request of an
    already open keep-alive connection."""
    client, _ = h.client()
    h.exchange(client, request(), response(200, b"old"))
    h.factory.router = FunctionRouter(lambda sni, host: Route(site="moved", backend=OTHER_BACKEND))
    client.send(request())
    h.pump()
    assert len(h.backends) == 2
    assert h.backends[1].t.host.port == OTHER_BACKEND.port


# ------------------------------------------------------------- path routes


def test_path_prefix_routes_on_one_keep_alive_connection() -> None:
    """Requests of one keep-alive connection go to the backend of their path prefix;
    the site is looked up once per Host, the path picked for every request."""
    table = RouteTable(
        Route(site="example.com", backend=BACKEND),
        ((b"/ws/", Route(site="example.com", backend=OTHER_BACKEND)),),
    )
    h = Harness(routes={b"example.com": table})
    client, _ = h.client()
    h.exchange(client, request(b"GET", b"/ws/chat"), response(200, b"ws"))
    assert h.backends[-1].t.host.port == OTHER_BACKEND.port
    assert parse_requests(h.backends[-1].take())[0].target == b"/ws/chat"
    h.exchange(client, request(b"GET", b"/page"), response(200, b"page"))
    assert h.backends[-1].t.host.port == BACKEND.port
    client.send(request(b"GET", b"/ws/again"))
    h.pump()
    assert [b.t.host.port for b in h.backends] == [OTHER_BACKEND.port, BACKEND.port]
    [again] = parse_requests(h.backends[0].take())  # the pooled connection, reused
    assert again.target == b"/ws/again"
    assert h.router_calls == [(None, b"example.com")]


def test_preserve_host_false_sends_backend_host() -> None:
    """A route with a Host override sends the backend's host:port as Host; the
    client's Host still reaches the backend in X-Forwarded-Host and Forwarded."""
    route = Route(site="example.com", backend=BACKEND, host_header=b"10.0.0.2:8080")
    h = Harness(routes={b"example.com": route})
    client, _ = h.client()
    client.send(request(host=b"Example.com:443"))
    h.pump()
    [seen] = parse_requests(one_request(h))
    assert seen.header_all(b"Host") == [b"10.0.0.2:8080"]
    assert seen.header(b"X-Forwarded-Host") == b"Example.com:443"
    assert seen.header(b"Forwarded") == b'for=192.0.2.7;proto=https;host="Example.com:443"'


def test_route_cache_follows_the_host_of_each_request(h: Harness) -> None:
    """On one keep-alive connection, requests for different sites go to their own
    backends: the cached site is only reused for the same Host."""
    client, _ = h.client()
    h.exchange(client, request(host=b"example.com"), response(200, b"a"))
    h.exchange(client, request(host=b"other.example"), response(200, b"b"))
    h.exchange(client, request(host=b"other.example"), response(200, b"b"))
    client.send(request(host=b"example.com"))
    h.pump()
    assert [b.t.host.port for b in h.backends] == [BACKEND.port, OTHER_BACKEND.port]
    assert len(parse_requests(h.backends[0].take())) == 2
    assert len(parse_requests(h.backends[1].take())) == 2
    assert h.router_calls == [
        (None, b"example.com"),
        (None, b"other.example"),
        (None, b"example.com"),
    ]


def test_backend_that_stops_reading_an_upload_gets_504() -> None:
    """A backend that stops reading a request body (a hung worker) does not hold the
    client forever: after ``backend_read_timeout`` without taking bytes, the client
    gets 504 and both connections are closed."""
    h = Harness(backend_high_water=1000)
    client, _ = h.client()
    client.send(request(b"POST", b"/up", headers=[(b"Content-Length", b"1000000")]))
    h.pump()
    backend = h.backends[-1]
    backend.t.reading_paused = True
    for _ in range(5):
        client.send(b"x" * 5000)
        h.pump()
    h.advance(h.settings.backend_read_timeout + 2)
    [resp] = parse_responses(client.take())
    assert resp.status == 504
    assert client.lost is not None
    backend.t.reading_paused = False
    h.pump()
    assert backend.lost is not None


def test_backend_that_stops_reading_after_answering_is_closed() -> None:
    """When the backend has started its response but stops reading the upload, the
    client connection is closed after ``backend_read_timeout``, the response cut short."""
    h = Harness(backend_high_water=1000)
    client, _ = h.client()
    client.send(request(b"POST", b"/up", headers=[(b"Content-Length", b"1000000")]))
    h.pump()
    backend = h.backends[-1]
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart")
    backend.t.reading_paused = True
    for _ in range(5):
        client.send(b"x" * 5000)
        h.pump()
    assert client.take().endswith(b"start")
    h.advance(h.settings.backend_read_timeout + 2)
    assert client.lost is not None


def test_close_delimited_early_response_while_upload_blocked_finishes() -> None:
    """A backend that stops reading an upload, answers early with a close-delimited body
    and closes, leaves the client connection usable: the rest of the upload is read
    and dropped, and the next request on the connection is served."""
    h = Harness(backend_high_water=1000)
    client, _ = h.client()
    client.send(request(b"POST", b"/up", headers=[(b"Content-Length", b"30000")]))
    h.pump()
    backend = h.backends[-1]
    backend.t.reading_paused = True
    client.send(b"x" * 8000)
    h.pump()
    backend.send(b"HTTP/1.1 413 Too Big\r\n\r\nno")
    backend.close()
    h.pump()
    [resp] = parse_responses(client.take())
    assert (resp.status, resp.body) == (413, b"no")
    client.send(b"x" * 22000)
    h.pump()
    data = h.exchange(client, request(), response(200, b"next"))
    assert parse_responses(data)[0].body == b"next"
    assert client.lost is None


def test_pipelined_local_answers_stop_when_client_does_not_read() -> None:
    """A client that pipelines requests the proxy answers itself (421 here) but never
    reads the answers is no longer read from once its send buffer is full, so unsent
    answers cannot pile up in memory."""
    h = Harness()
    client, _ = h.client(high_water=64 * 1024)
    server_side, client_side = h.links[-1]
    client_side.reading_paused = True
    many = request(host=b"unknown.example") * 1000
    for _ in range(50):
        client.send(many)
        h.pump()
    assert len(server_side.outgoing) < 256 * 1024
    client_side.reading_paused = False
    h.pump()
    assert client.take().count(b"HTTP/1.1 421") > 1000


def test_stray_body_after_head_response_never_answers_the_next_request(h: Harness) -> None:
    """A backend that wrongly sends a body after its HEAD response cannot have that
    body taken as the answer to the client's next (pipelined) request."""
    client, _ = h.client()
    client.send(request(b"HEAD", b"/file") + request(b"GET", b"/other"))
    h.pump()
    first = h.backends[0]
    first.take()
    first.send(b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n")
    h.pump()
    first.send(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nspoofed")
    h.pump()
    assert b"spoofed" not in client.take()
    assert len(h.backends) == 2
    [seen] = parse_requests(h.backends[1].take())
    assert seen.target == b"/other"


def test_connection_serves_next_request_after_close_delimited_response(h: Harness) -> None:
    """After a response whose body ended when its backend closed, the client's
    keep-alive connection answers its next request with that request's response."""
    client, _ = h.client()
    data = h.exchange(client, request(), b"HTTP/1.1 200 OK\r\n\r\nfirst")
    h.backends[-1].close()
    h.pump()
    data += client.take()
    assert parse_responses(data)[0].body == b"first"
    data = h.exchange(client, request(), response(200, b"second"))
    assert parse_responses(data)[0].body == b"second"


# ------------------------------------------- what a connection remembers between requests


def test_each_request_reaches_the_backend_with_its_own_header_fields(h: Harness) -> None:
    """On one keep-alive connection every request is forwarded with exactly the
    header fields it carried, whether they repeat the previous request's or not,
    with one set of forwarding headers each."""
    client, _ = h.client()
    sent = [
        (b"/1", [(b"Accept", b"a")]),
        (b"/2", [(b"Accept", b"a")]),
        (b"/3", [(b"Accept", b"b")]),
        (b"/4", [(b"Accept", b"a"), (b"Cookie", b"c=1")]),
        (b"/5", [(b"Accept", b"a")]),
    ]
    for target, headers in sent:
        h.exchange(client, request(b"GET", target, headers), response(200, b"ok"))
        [seen] = parse_requests(h.backends[0].take())
        assert seen.target == target
        assert [(n, v) for n, v in seen.headers if n in (b"Accept", b"Cookie")] == headers
        assert seen.header_all(b"X-Forwarded-For") == [b"192.0.2.7"]
        assert seen.header_all(b"Forwarded") == [b"for=192.0.2.7;proto=https;host=example.com"]
    assert len(h.backends) == 1


def test_repeated_header_fields_follow_each_requests_route() -> None:
    """Two requests with the same header fields on one connection, routed by path to
    a backend with a Host override and to one without, each get their route's Host."""
    table = RouteTable(
        Route(site="example.com", backend=BACKEND),
        ((b"/api/", Route(site="example.com", backend=OTHER_BACKEND, host_header=b"api:81")),),
    )
    h = Harness(routes={b"example.com": table})
    client, _ = h.client()
    h.exchange(client, request(b"GET", b"/api/x"), response(200, b"a"))
    h.exchange(client, request(b"GET", b"/page"), response(200, b"b"))
    h.exchange(client, request(b"GET", b"/api/y"), response(200, b"c"))
    api, main = h.backends
    assert [m.header_all(b"Host") for m in parse_requests(api.take())] == [[b"api:81"]] * 2
    assert [m.header_all(b"Host") for m in parse_requests(main.take())] == [[b"example.com"]]


def test_reload_that_adds_identity_headers_strips_them_on_open_connections(h: Harness) -> None:
    """A client-certificate identity header name configured by a reload is removed
    from the next request of an already open connection, even one whose header
    fields repeat the previous request's exactly."""
    client, _ = h.client()
    forged = [(b"X-Subject", b"CN=admin")]
    h.exchange(client, request(headers=forged), response(200, b"a"))
    assert parse_requests(h.backends[0].take())[0].header(b"X-Subject") == b"CN=admin"
    route = h.routes[b"example.com"]
    h.factory.router = FunctionRouter(lambda sni, host: route, frozenset({b"x-subject"}))
    h.exchange(client, request(headers=forged), response(200, b"b"))
    [seen] = parse_requests(h.backends[0].take())
    assert seen.header(b"X-Subject") is None
    assert seen.header(b"Host") == b"example.com"


def test_each_response_reaches_the_client_with_its_own_head(h: Harness) -> None:
    """On one keep-alive connection every response is relayed with its own status
    line and header fields, whether they repeat the previous response's or not."""
    client, _ = h.client()
    answers = [
        response(200, b"a", [(b"X-A", b"1")]),
        response(200, b"a", [(b"X-A", b"1")]),
        response(404, b"a", [(b"X-A", b"1")], reason=b"Not Found"),
        response(404, b"a", [(b"X-A", b"1")], reason=b"Gone Fishing"),
        response(200, b"a", [(b"X-A", b"2")]),
        response(200, b"a", [(b"X-A", b"1")]),
    ]
    for answer in answers:
        assert h.exchange(client, request(), answer) == answer
    assert len(h.backends) == 1


def test_length_dropped_from_a_204_is_kept_on_the_next_response(h: Harness) -> None:
    """A 204 relayed without the Content-Length its backend wrongly sent does not
    make the next response with the same header fields lose its Content-Length."""
    client, _ = h.client()
    got = h.exchange(client, request(), b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n")
    assert got == b"HTTP/1.1 204 No Content\r\n\r\n"
    got = h.exchange(client, request(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_each_sites_header_policy_applies_to_identical_responses() -> None:
    """Two sites on one connection whose backends answer with the same header fields:
    each response carries its own site's security headers, never the other's."""
    hsts = HeaderPolicy(
        set=((b"Strict-Transport-Security", b"max-age=63072000"),),
        remove=frozenset({b"strict-transport-security"}),
    )
    h = Harness(
        routes={
            b"example.com": Route(site="example.com", backend=BACKEND, headers=hsts),
            b"other.example": Route(site="other.example", backend=OTHER_BACKEND),
        }
    )
    client, _ = h.client()
    answer = response(200, b"x", [(b"Strict-Transport-Security", b"max-age=1")])

    def fetch(host: bytes, backend: int) -> Message:
        client.send(request(host=host))
        h.pump()
        h.backends[backend].send(answer)
        h.pump()
        [got] = parse_responses(client.take())
        return got

    first = fetch(b"example.com", 0)
    second = fetch(b"other.example", 1)
    third = fetch(b"example.com", 0)
    assert len(h.backends) == 2
    assert first.header_all(b"Strict-Transport-Security") == [b"max-age=63072000"]
    assert second.header_all(b"Strict-Transport-Security") == [b"max-age=1"]
    assert third.header_all(b"Strict-Transport-Security") == [b"max-age=63072000"]
