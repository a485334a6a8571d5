"""Strictness, limits and deadlines of the proxy's HTTP/1.1 server side, byte by byte.

Malformed or ambiguous requests (the shapes behind request smuggling) are
refused with a status and a closed connection, and reach no backend; limits
answer 413/414/431; deadlines close slow connections.  All in memory with a
fake clock.
"""

from __future__ import annotations

import pytest

from tests.proxyharness import Harness, parse_requests, parse_responses, request, response
from tlsproxy.proxy import ProxySettings

H = b"Host: example.com\r\n"


@pytest.fixture
def h() -> Harness:
    return Harness()


def refused(h: Harness, raw: bytes, status: int) -> None:
    """Send ``raw``; assert it is refused with ``status``, closed, and no backend was asked."""
    client, _ = h.client()
    client.send(raw)
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == status, resp
    assert resp.header(b"Connection") == b"close"
    assert client.lost is not None
    assert h.backends == [] and h.reactor.pending == []


BAD_REQUESTS = {
    "content-length and transfer-encoding": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "transfer-encoding then content-length": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "duplicate content-length": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "content-length list": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "signed content-length": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    "negative content-length": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    "empty content-length": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    "huge content-length": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    "unknown transfer coding": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "identity transfer coding": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n",
        501,
    ),
    "chunked not last": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    "repeated transfer-encoding": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    "gzip header then chunked header": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    "empty coding element": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    "obs-fold with tab": (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n", 400),
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: example.com\n\n", 400),
    "bare LF in headers": (b"GET / HTTP/1.1\r\nHost: example.com\nX-A: 1\r\n\r\n", 400),
    "bare CR in header": (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    "NUL in header": (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    "control char in header": (b"GET / HTTP/1.1\r\n" + H + b"X-A: \x01\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", 400),
    "space before first header": (b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", 400),
    "missing host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "missing host in HTTP/1.0": (b"GET / HTTP/1.0\r\n\r\n", 400),
    "duplicate host": (b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    "host with path": (b"GET / HTTP/1.1\r\nHost: example.com/x\r\n\r\n", 400),
    "host with userinfo": (b"GET / HTTP/1.1\r\nHost: u@example.com\r\n\r\n", 400),
    "fragment in target": (b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "DEL in target": (b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400),
    "high byte in target": (b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    "high byte in query": (b"GET /?q=\xff HTTP/1.1\r\n" + H + b"\r\n", 400),
    "tab in target": (b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n", 400),
    "bad percent-encoding": (b"GET /a%zz HTTP/1.1\r\n" + H + b"\r\n", 400),
    "truncated percent-encoding": (b"GET /a%2 HTTP/1.1\r\n" + H + b"\r\n", 400),
    "relative target": (b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "asterisk for GET": (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    "absolute target for another host": (
        b"GET http://evil.example/ HTTP/1.1\r\n" + H + b"\r\n",
        400,
    ),
    "absolute target with other scheme": (
        b"GET ftp://example.com/ HTTP/1.1\r\n" + H + b"\r\n",
        400,
    ),
    "HTTP/0.9": (b"GET /\r\n\r\n", 400),
    "HTTP/2.0 in HTTP/1 syntax": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    "HTTP/3.0": (b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "lowercase version": (b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    "unknown method": (b"BREW / HTTP/1.1\r\n" + H + b"\r\n", 501),
    "lowercase method": (b"get / HTTP/1.1\r\n" + H + b"\r\n", 501),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 405),
    "unknown expectation": (b"GET / HTTP/1.1\r\n" + H + b"Expect: coffee\r\n\r\n", 417),
    "upgrade with a body": (
        b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        400,
    ),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
}


@pytest.mark.parametrize("raw,status", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_refused_and_never_forwarded(h: Harness, raw: bytes, status: int) -> None:
    """Each malformed or ambiguous request is answered with an error and a closed
    connection, and no backend is contacted."""
    refused(h, raw, status)


def test_error_page_reveals_nothing(h: Harness) -> None:
    """The error page is a short plain-text status line, nothing about the parser."""
    client, _ = h.client()
    client.send(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n")
    h.pump()
    assert client.take() == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 16\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        b"400 Bad Request\n"
    )


def test_invalid_chunk_size_cuts_the_upload(h: Harness) -> None:
    """An invalid chunk size mid-upload gets a 400 and close; the backend connection that
    received the head is dropped, so it never sees a complete request."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    h.pump()
    client.send(b"zz\r\nsmuggled\r\n0\r\n\r\n")
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 400 and client.lost is not None
    backend = h.backends[0]
    assert backend.lost is not None
    [seen] = parse_requests(backend.take())
    assert not seen.complete and b"smuggled" not in seen.body


@pytest.mark.parametrize(
    "body",
    [
        b"5 \r\nhello\r\n0\r\n\r\n",  # space after size
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after size
        b"5\r\nhelloXX0\r\n\r\n",  # missing CRLF after data
        b"ffffffffffffffffff\r\n",  # overflow
        b"-5\r\nhello\r\n0\r\n\r\n",  # negative
        b"0x5\r\nhello\r\n0\r\n\r\n",  # hex prefix
    ],
)
def test_malformed_chunks_are_refused(h: Harness, body: bytes) -> None:
    """Malformed chunk framing is refused with 400 and the connection closed."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 400 and client.lost is not None
    for backend in h.backends:
        assert not any(m.complete for m in parse_requests(backend.received))


def test_smuggled_request_after_bad_framing_is_not_forwarded(h: Harness) -> None:
    """The classic CL.TE payload: nothing after the refused request reaches a backend."""
    client, _ = h.client()
    client.send(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nSMUGGLED"
        b"GET /admin HTTP/1.1\r\n" + H + b"\r\n"
    )
    h.pump()
    assert [r.status for r in parse_responses(client.take())] == [400]
    assert h.backends == []


def test_error_in_pipelined_request_is_answered_in_turn(h: Harness) -> None:
    """A good request followed by a bad one: the good one is answered first, then the
    error, then the connection closes."""
    client, _ = h.client()
    client.send(request(target=b"/good") + b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    h.pump()
    assert [m.target for m in parse_requests(h.backends[0].take())] == [b"/good"]
    h.backends[0].send(response(200, b"good"))
    h.pump()
    statuses = [r.status for r in parse_responses(client.take())]
    assert statuses == [200, 400]
    assert client.lost is not None


def test_head_error_has_no_body(h: Harness) -> None:
    """An error answering a HEAD request carries no body."""
    client, _ = h.client()
    client.send(request(b"HEAD", host=b"unknown.example"))
    h.pump()
    data = client.take()
    assert data.startswith(b"HTTP/1.1 421 Misdirected Request\r\n")
    assert data.endswith(b"\r\n\r\n")


# -------------------------------------------------------------------- limits


def test_long_request_target_is_414(h: Harness) -> None:
    """A request target over max_request_line (8 KiB) is answered 414."""
    refused(h, request(target=b"/" + b"a" * 8192), 414)


def test_long_request_target_in_pieces_is_414(h: Harness) -> None:
    """A long target trickled in small pieces is caught without buffering it whole."""
    client, _ = h.client()
    client.send(b"GET /")
    for _ in range(20):
        client.send(b"a" * 500)
        h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 414 and client.lost is not None


def test_target_at_the_limit_is_accepted(h: Harness) -> None:
    """A target of exactly max_request_line bytes is forwarded."""
    client, _ = h.client()
    client.send(request(target=b"/" + b"a" * 8191))
    h.pump()
    assert len(h.backends) == 1


def test_too_many_header_bytes_is_431(h: Harness) -> None:
    """More than max_header_bytes (16 KiB) of header fields is answered 431."""
    headers = [(b"X-H%d" % i, b"v" * 1000) for i in range(17)]
    refused(h, request(headers=headers), 431)


def test_too_many_headers_is_431(h: Harness) -> None:
    """More than max_header_count (100) header fields is answered 431."""
    headers = [(b"X-H%d" % i, b"v") for i in range(100)]  # plus Host: 101
    refused(h, request(headers=headers), 431)


def test_header_count_at_the_limit_is_accepted(h: Harness) -> None:
    """Exactly max_header_count fields are accepted."""
    client, _ = h.client()
    client.send(request(headers=[(b"X-H%d" % i, b"v") for i in range(99)]))
    h.pump()
    assert len(h.backends) == 1


def test_one_endless_header_line_is_431(h: Harness) -> None:
    """A single header value that never ends is cut off at the limit, not buffered."""
    client, _ = h.client()
    client.send(b"GET / HTTP/1.1\r\n" + H + b"X-Endless: ")
    for _ in range(40):
        client.send(b"v" * 1000)
        h.pump()
        if client.lost:
            break
    [resp] = parse_responses(client.take())
    assert resp.status == 431 and client.lost is not None


def test_oversized_trailers_are_431(h: Harness) -> None:
    """Trailer fields count towards max_header_bytes."""
    client, _ = h.client()
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(20))
    client.send(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 431


def test_announced_large_body_is_413_before_continue() -> None:
    """A Content-Length over max_body_bytes is refused with 413 before any 100 Continue."""
    h = Harness(ProxySettings(max_body_bytes=1000))
    refused(
        h,
        b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 1001\r\n\r\n",
        413,
    )


def test_body_at_the_limit_is_accepted() -> None:
    """A body of exactly max_body_bytes is forwarded."""
    h = Harness(ProxySettings(max_body_bytes=1000))
    client, _ = h.client()
    client.send(request(b"POST", body=b"b" * 1000))
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert seen.body == b"b" * 1000


def test_chunked_body_over_the_limit_is_413() -> None:
    """A chunked body growing past max_body_bytes is cut off with 413 and the backend
    connection dropped."""
    h = Harness(ProxySettings(max_body_bytes=1000))
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    client.send(b"200\r\n" + b"c" * 512 + b"\r\n")
    h.pump()
    client.send(b"200\r\n" + b"c" * 512 + b"\r\n")
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 413 and client.lost is not None
    assert h.backends[0].lost is not None


# --------------------------------------------------------- 100-continue


def test_expect_continue_is_answered_by_the_proxy(h: Harness) -> None:
    """Expect: 100-continue gets a 100 once a backend connection is ready; the backend
    does not see the Expect header."""
    client, _ = h.client()
    client.send(b"PUT /f HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert client.received == b""
    h.pump()
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"data")
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    assert seen.header(b"Expect") is None and seen.body == b"data"


def test_no_continue_when_backend_is_down(h: Harness) -> None:
    """With the backend unreachable, the client gets the 502 instead of a 100, and the
    connection closes (it may never send its body)."""
    from twisted.internet import error

    h.backend_servers[("10.0.0.2", 8080)] = error.ConnectionRefusedError()
    client, _ = h.client()
    client.send(b"PUT /f HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    h.pump()
    data = client.take()
    assert data.startswith(b"HTTP/1.1 502 ")
    assert client.lost is not None


def test_no_continue_if_body_already_sent(h: Harness) -> None:
    """A client that sent its body without waiting gets no stray 100 Continue."""
    client, _ = h.client()
    data = h.exchange(
        client,
        b"PUT /f HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\ndata",
        response(201),
    )
    assert data.startswith(b"HTTP/1.1 201 ")


def test_no_continue_for_http10(h: Harness) -> None:
    """HTTP/1.0 clients never get a 100 Continue."""
    client, _ = h.client()
    client.send(b"PUT /f HTTP/1.0\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    h.pump()
    assert client.received == b""


# ------------------------------------------------------------------ deadlines


def test_silent_new_connection_is_closed(h: Harness) -> None:
    """A connection that sends nothing is closed after client_header_timeout, silently."""
    client, _ = h.client()
    h.advance(59)
    assert client.lost is None
    h.advance(2)
    assert client.lost is not None and client.received == b""


def test_slowloris_head_is_cut_off(h: Harness) -> None:
    """A request head trickled byte by byte is cut off client_header_timeout after it
    began, however steadily bytes arrive: 408 and close."""
    client, _ = h.client()
    raw = request(headers=[(b"X-Pad", b"p" * 200)])
    for i in range(len(raw)):
        client.send(raw[i : i + 1])
        h.advance(1)
        if client.lost:
            break
    assert client.lost is not None
    assert 60 <= h.reactor.seconds() <= 62
    [resp] = parse_responses(client.take())
    assert resp.status == 408
    assert h.backends == []


def test_idle_keep_alive_connection_is_closed(h: Harness) -> None:
    """An idle keep-alive connection is closed after keepalive_timeout (75 s)."""
    client, _ = h.client()
    h.exchange(client, request(), response())
    h.advance(74)
    assert client.lost is None
    h.advance(2)
    assert client.lost is not None
    assert client.received == b""


def test_stalled_body_is_408(h: Harness) -> None:
    """An upload that stops for client_body_timeout (60 s) gets 408 and the backend
    connection is dropped."""
    client, _ = h.client()
    client.send(request(b"POST", body=b"x" * 100)[:-50])
    h.pump()
    h.advance(59)
    assert client.lost is None
    h.advance(2)
    [resp] = parse_responses(client.take())
    assert resp.status == 408 and client.lost is not None
    assert h.backends[0].lost is not None


def test_slow_but_steady_body_is_fine(h: Harness) -> None:
    """Body bytes arriving more often than client_body_timeout keep the upload alive."""
    client, _ = h.client()
    raw = request(b"POST", body=b"0123456789")
    client.send(raw[:-10])
    for i in range(10):
        h.advance(50)
        client.send(raw[-10 + i : len(raw) - 9 + i] if i < 9 else raw[-1:])
        h.pump()
    assert client.lost is None
    [seen] = parse_requests(h.backends[0].take())
    assert seen.body == b"0123456789"


def test_waiting_for_the_backend_is_not_a_client_timeout(h: Harness) -> None:
    """A client waiting quietly for a slow backend is not timed out by client deadlines."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.advance(59)
    h.backends[0].send(response(200, b"late"))
    h.pump()
    assert parse_responses(client.take())[0].body == b"late"


def test_custom_timeouts() -> None:
    """Timeouts come from ProxySettings."""
    h = Harness(ProxySettings(keepalive_timeout=5, backend_read_timeout=3))
    client, _ = h.client()
    client.send(request())
    h.pump()
    h.advance(4)
    assert parse_responses(client.take())[0].status == 504
    h.advance(6)
    assert client.lost is not None


def test_settings_validation() -> None:
    """Non-positive limits are refused when the settings are built."""
    with pytest.raises(ValueError, match="max_header_count"):
        ProxySettings(max_header_count=0)
    with pytest.raises(ValueError, match="keepalive_timeout"):
        ProxySettings(keepalive_timeout=-1)
    assert ProxySettings(max_body_bytes=None).max_body_bytes is None


def test_endless_trailer_field_is_cut_off(h: Harness) -> None:
    """A trailer field that never ends is cut off (431) instead of being buffered."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n")
    client.send(b"X-Trailer: ")
    for _ in range(40):
        client.send(b"t" * 1000)
        h.pump()
        if client.lost:
            break
    assert client.lost is not None
    assert parse_responses(client.take())[0].status == 431


def test_endless_chunk_extension_is_cut_off(h: Harness) -> None:
    """A chunk extension that never ends is cut off instead of being read forever."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;ext=")
    for _ in range(40):
        client.send(b"e" * 1000)
        h.pump()
        if client.lost:
            break
    assert client.lost is not None


def test_many_small_chunks_are_fine(h: Harness) -> None:
    """Tiny chunks (lots of framing per byte of data) are not mistaken for abuse."""
    client, _ = h.client()
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(50):
        client.send(b"1;e=x\r\na\r\n" * 100)
        h.pump()
    client.send(b"0\r\n\r\n")
    h.pump()
    assert client.lost is None
    [seen] = parse_requests(h.backends[0].take())
    assert seen.body == b"a" * 5000 and seen.complete


def test_backend_endless_head_is_502(h: Harness) -> None:
    """A backend response head that never ends gets the client a 502."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    backend = h.backends[0]
    backend.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(80):
        backend.send(b"v" * 1000)
        h.pump()
    assert parse_responses(client.take())[0].status == 502
    assert backend.lost is not None


def test_backend_endless_trailer_closes_client(h: Harness) -> None:
    """A backend trailer that never ends cuts the response short and closes the client."""
    client, _ = h.client()
    client.send(request())
    h.pump()
    backend = h.backends[0]
    backend.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
    for _ in range(80):
        backend.send(b"v" * 1000)
        h.pump()
    assert client.lost is not None
    assert b"0\r\n\r\n" not in client.take()


def test_control_bytes_in_reason_phrase_are_not_relayed(h: Harness) -> None:
    """Control bytes (NUL, ESC, …) and DEL in a backend's reason phrase never reach the
    client; the rest of the phrase does."""
    client, _ = h.client()
    out = h.exchange(
        client, request(), b"HTTP/1.1 200 OK\x00\x1b[31m\x7fX\tY\r\nContent-Length: 0\r\n\r\n"
    )
    assert out.split(b"\r\n")[0] == b"HTTP/1.1 200 OK[31mX\tY"


def test_204_response_loses_its_content_length(h: Harness) -> None:
    """A 204 response is relayed without the Content-Length its backend wrongly sent."""
    client, _ = h.client()
    out = h.exchange(client, request(), b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
    assert out == b"HTTP/1.1 204 No Content\r\n\r\n"
