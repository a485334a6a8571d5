"""Header policy: what crosses the proxy, what it consumes, what it adds (pure functions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tlsproxy import forwarding
from tlsproxy.forwarding import (
    ForwardingContext,
    client_address,
    forwarded_for,
    is_websocket_upgrade,
    scan_request_headers,
    scan_response_headers,
    split_host,
)

HOST = [(b"Host", b"example.com")]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def test_end_to_end_headers_pass_in_order_with_their_case() -> None:
    """Ordinary headers reach the backend unchanged, repeated ones separately and in order."""
    headers = [
        (b"Host", b"example.com"),
        (b"Accept", b"*/*"),
        (b"Cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"X-Custom", b"v"),
    ]
    scan = scan_request_headers(headers)
    assert scan.problem is None
    assert scan.forward == headers
    assert scan.host == b"example.com"


def test_hop_by_hop_headers_never_cross() -> None:
    """Connection, Keep-Alive, TE, Trailer, Upgrade, Proxy-* do not reach the backend."""
    headers = [
        *HOST,
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"X-Secret", b"named by Connection"),
        (b"Accept", b"*/*"),
    ]
    scan = scan_request_headers(headers)
    assert scan.problem is None
    assert names(scan.forward) == [b"host", b"accept"]


def test_connection_cannot_remove_host() -> None:
    """A client naming Host in Connection does not strip it from the request."""
    scan = scan_request_headers([*HOST, (b"Connection", b"host, x-a"), (b"X-A", b"1")])
    assert names(scan.forward) == [b"host"]


def test_client_forwarding_headers_are_dropped() -> None:
    """Every client-sent forwarding header, and names with underscores, are dropped."""
    spoofed = [
        (b"X-Forwarded-For", b"1.2.3.4"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"evil"),
        (b"X-Forwarded-Port", b"80"),
        (b"X-Forwarded-Prefix", b"/admin"),
        (b"x-forwarded-ssl", b"on"),
        (b"Forwarded", b"for=1.2.3.4"),
        (b"X-Real-IP", b"1.2.3.4"),
        (b"True-Client-IP", b"1.2.3.4"),
        (b"Client-Cert", b":abc:"),
        (b"X_Forwarded_For", b"1.2.3.4"),
        (b"Remote_User", b"admin"),
    ]
    scan = scan_request_headers(HOST + spoofed)
    assert scan.problem is None
    assert names(scan.forward) == [b"host"]


def test_framing_and_expectation_are_consumed() -> None:
    """Content-Length, Transfer-Encoding and Expect are read by the proxy, not forwarded."""
    scan = scan_request_headers([*HOST, (b"Content-Length", b"12 "), (b"Expect", b"100-Continue")])
    assert scan.content_length == 12
    assert scan.expect_continue
    assert names(scan.forward) == [b"host"]
    scan = scan_request_headers([*HOST, (b"Transfer-Encoding", b"Chunked")])
    assert scan.chunked and scan.problem is None


def test_host_problems() -> None:
    """Missing, repeated or malformed Host is refused with 400."""
    assert scan_request_headers([]).problem == (400, "missing Host header")
    assert scan_request_headers(HOST + HOST).problem == (400, "repeated Host header")
    for bad in [b"", b"a b", b"exa mple.com", b"a/b", b"a@b", b"[::1", b"a:port", b"a:123456"]:
        assert scan_request_headers([(b"Host", bad)]).problem == (400, "malformed Host header")
    for good in [b"example.com", b"Example.COM:8443", b"[2001:db8::1]:443", b"127.0.0.1"]:
        assert scan_request_headers([(b"Host", good)]).problem is None


def test_transfer_coding_problems() -> None:
    """Only a single plain 'chunked' is accepted; other codings 501, odd shapes 400."""
    cases = {
        b"gzip, chunked": 501,
        b"identity": 501,
        b"chunked, chunked": 400,
        b",chunked": 400,
    }
    for value, status in cases.items():
        scan = scan_request_headers([*HOST, (b"Transfer-Encoding", value)])
        assert scan.problem is not None and scan.problem[0] == status, value
    twice = [*HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")]
    assert scan_request_headers(twice).problem == (400, "repeated Transfer-Encoding header")


def test_unknown_expectation_is_refused() -> None:
    """An Expect other than 100-continue gets 417."""
    scan = scan_request_headers([*HOST, (b"Expect", b"something")])
    assert scan.problem == (417, "unsupported expectation")


def test_websocket_detection() -> None:
    """Only a GET with Connection: upgrade and Upgrade: websocket is a WebSocket handshake."""
    scan = scan_request_headers(
        [*HOST, (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"WebSocket")]
    )
    assert scan.connection_upgrade and scan.upgrade == b"WebSocket"
    assert is_websocket_upgrade(b"GET", scan.upgrade, scan.connection_upgrade)
    assert not is_websocket_upgrade(b"POST", scan.upgrade, scan.connection_upgrade)
    assert not is_websocket_upgrade(b"GET", b"h2c", True)
    assert not is_websocket_upgrade(b"GET", b"websocket", False)


def test_response_headers() -> None:
    """Responses lose hop-by-hop headers; Set-Cookie repeats and Content-Length pass."""
    headers = [
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Length", b"5"),
        (b"Proxy-Authenticate", b"Basic"),
    ]
    scan = scan_response_headers(headers)
    assert scan.problem is None
    assert scan.close
    assert scan.content_length == 5
    assert scan.forward == [
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Length", b"5"),
    ]


def test_response_transfer_codings() -> None:
    """A response coding other than chunked cannot be relayed faithfully."""
    assert scan_response_headers([(b"Transfer-Encoding", b"chunked")]).chunked
    assert scan_response_headers([(b"Transfer-Encoding", b"gzip")]).problem is not None
    two = [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")]
    assert scan_response_headers(two).problem is not None


def test_forwarding_context_ipv4() -> None:
    """The proxy's own forwarding headers describe the client, scheme, host and port."""
    ctx = ForwardingContext("192.0.2.7", "https", 443)
    assert ctx.headers(b"example.com") == [
        (b"X-Forwarded-For", b"192.0.2.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Port", b"443"),
        (b"X-Forwarded-Host", b"example.com"),
        (b"Forwarded", b"for=192.0.2.7;proto=https;host=example.com"),
    ]
    assert ctx.block(b"example.com") == forwarding.serialize(ctx.headers(b"example.com"))


def test_forwarding_context_ipv6_and_port_in_host() -> None:
    """RFC 7239: IPv6 'for' is bracketed and quoted; a host with a port is quoted."""
    ctx = ForwardingContext("2001:db8::1", "https", 8443)
    forwarded = dict(ctx.headers(b"example.com:8443"))[b"Forwarded"]
    assert forwarded == b'for="[2001:db8::1]";proto=https;host="example.com:8443"'
    assert forwarded_for("unknown") == "unknown"


def test_client_address_unmaps_ipv4() -> None:
    """A dual-stack listener reports IPv4 clients as plain IPv4 addresses."""
    assert client_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_address("2001:DB8::1") == "2001:db8::1"
    assert client_address("not-an-ip") == "not-an-ip"


def test_split_host() -> None:
    """The router gets the Host name without its port."""
    assert split_host(b"example.com:8443") == b"example.com"
    assert split_host(b"[::1]:443") == b"[::1]"
    assert split_host(b"example.com") == b"example.com"


_header_names = st.sampled_from(
    [
        b"Host",
        b"Accept",
        b"Cookie",
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"Proxy-Authorization",
        b"X-Forwarded-For",
        b"x-forwarded-whatever",
        b"Forwarded",
        b"X-Real-IP",
        b"X_Under",
        b"X-App",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Expect",
    ]
)
_header_values = st.sampled_from([b"1", b"x-app", b"close", b"accept, cookie", b"chunked"])


@given(st.lists(st.tuples(_header_names, _header_values), max_size=12))
def test_no_forbidden_header_ever_reaches_the_backend(headers: list[tuple[bytes, bytes]]) -> None:
    """Whatever the client sends, forwarded headers are end-to-end ones, in client order."""
    scan = scan_request_headers(headers)
    forward = scan.forward
    for name, _ in forward:
        lname = name.lower()
        assert lname not in forwarding.HOP_BY_HOP
        assert lname not in forwarding.CLIENT_FORWARDING
        assert not lname.startswith(b"x-forwarded-")
        assert b"_" not in lname
        assert lname not in (b"content-length", b"expect")
    # the forwarded headers are a subsequence of the input
    it = iter(headers)
    assert all(any(h == other for other in it) for h in forward)
