"""Header policy for proxied HTTP/1.1 messages: which headers cross the proxy, and what we add.

One job: given the header list of a request or response as parsed off the wire,
say which headers pass to the other side, what the message's framing and
connection-management headers asked for, and which forwarding headers we add
for the backend.  Header lists are lists of ``(name, value)`` byte pairs in
wire order; names keep the case they arrived in, repeated headers (several
``Set-Cookie``) stay separate and in order.

Policy, in brief:

* Hop-by-hop headers never cross: ``Connection`` and every header it names,
  ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding`` (the proxy frames
  bodies itself), ``Upgrade`` (re-added for a WebSocket handshake only),
  ``Proxy-Connection``, ``Proxy-Authenticate`` and ``Proxy-Authorization``
  (credentials meant for a proxy are never passed on).
* ``Content-Length`` and ``Expect`` are consumed by the proxy; it writes its own
  framing header and answers ``100-continue`` itself.
* Every client-sent forwarding header is dropped, so that a backend that trusts
  its proxy cannot be lied to: ``Forwarded``, every ``X-Forwarded-*``,
  ``X-Real-IP``, ``X-Client-IP``, ``True-Client-IP``, ``Client-IP``,
  ``X-Cluster-Client-IP``, ``Front-End-Https``, ``X-Url-Scheme``,
  ``Client-Cert`` and ``Client-Cert-Chain`` (RFC 9440), and any header whose
  name contains ``_`` (CGI/WSGI maps ``X_Forwarded_For`` and
  ``X-Forwarded-For`` onto one variable).
* The proxy then adds ``X-Forwarded-For`` (the client address),
  ``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Port`` and the RFC
  7239 ``Forwarded`` header (``for=``, ``proto=``, ``host=``).
* ``Host`` always passes unchanged, even if ``Connection`` names it.

Pure module: no Twisted, no I/O.  The functions run once per message on the
proxy's hot path, so they make one pass over the headers and return plain
tuples rather than validated attrs objects.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple

Headers = list[tuple[bytes, bytes]]

#: Lower-cased names of the hop-by-hop headers that never cross the proxy.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: Lower-cased names of client-sent headers that claim to describe the client or
#: the connection.  Only the proxy may set these; ``x-forwarded-*`` is dropped as
#: a prefix as well.
CLIENT_FORWARDING: frozenset[bytes] = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
        b"front-end-https",
        b"x-url-scheme",
        b"client-cert",
        b"client-cert-chain",
    }
)

# What the single pass over request headers does with each name.
_FORWARD, _DROP, _HOST, _CONNECTION, _LENGTH, _TE, _EXPECT, _UPGRADE = range(8)
_LENGTH_REMOVED = 8  # a response's Content-Length that frames the body but is not relayed
_REQUEST_KINDS: dict[bytes, int] = dict.fromkeys(HOP_BY_HOP | CLIENT_FORWARDING, _DROP)
_REQUEST_KINDS.update(
    {
        b"host": _HOST,
        b"connection": _CONNECTION,
        b"content-length": _LENGTH,
        b"transfer-encoding": _TE,
        b"expect": _EXPECT,
        b"upgrade": _UPGRADE,
    }
)
_RESPONSE_KINDS: dict[bytes, int] = dict.fromkeys(HOP_BY_HOP, _DROP)
_RESPONSE_KINDS.update(
    {
        b"connection": _CONNECTION,
        b"content-length": _LENGTH,
        b"transfer-encoding": _TE,
        b"upgrade": _UPGRADE,
    }
)

# Classification by the exact name bytes as received, so that the usual names
# cost one dict lookup (no lower-casing).  Bounded: names beyond the limit are
# classified each time.
_CACHE_LIMIT = 2048
#: Longest name or value cached (so that the caches stay small whatever clients send).
_CACHE_MAX_KEY = 64
_request_cache: dict[bytes, int] = {}
_response_cache: dict[bytes, int] = {}


def _request_kind(name: bytes) -> int:
    lname = name.lower()
    kind = _REQUEST_KINDS.get(lname)
    if kind is None:
        kind = _DROP if b"_" in lname or lname.startswith(b"x-forwarded-") else _FORWARD
    if len(_request_cache) < _CACHE_LIMIT and len(name) <= _CACHE_MAX_KEY:
        _request_cache[name] = kind
    return kind


def _response_kind(name: bytes) -> int:
    kind = _RESPONSE_KINDS.get(name.lower(), _FORWARD)
    if len(_response_cache) < _CACHE_LIMIT and len(name) <= _CACHE_MAX_KEY:
        _response_cache[name] = kind
    return kind


# reg-name (letters, digits, '.', '-', '_') or a bracketed IPv6 literal, then an optional port.
_HOST_RE = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# Host header values found well-formed (bounded like the name caches).
_good_hosts: set[bytes] = set()


def _good_host(host: bytes) -> bool:
    if _HOST_RE.fullmatch(host) is None:
        return False
    if len(_good_hosts) < _CACHE_LIMIT and len(host) <= _CACHE_MAX_KEY:
        _good_hosts.add(host)
    return True


class RequestHeaders(NamedTuple):
    """What one pass over a request's headers found.

    ``forward`` holds the end-to-end headers to pass on (``Host`` included), in
    the client's order.  ``problem`` is ``(status, reason)`` when the request
    must be refused; the other fields are then unreliable.
    """

    forward: Headers
    host: bytes | None
    problem: tuple[int, str] | None
    content_length: int | None
    chunked: bool
    expect_continue: bool
    upgrade: bytes | None
    connection_upgrade: bool
    #: bytes of the fields as on the wire (name, value and 4 bytes of framing each)
    size: int


class ResponseHeaders(NamedTuple):
    """What one pass over a response's headers found.

    ``forward`` holds the end-to-end headers to pass to the client (including
    ``Content-Length`` when the backend sent one).  ``problem`` names a reason
    the response cannot be relayed faithfully.
    """

    forward: Headers
    problem: str | None
    content_length: int | None
    chunked: bool
    upgrade: bytes | None
    close: bool
    #: bytes of the fields as on the wire (name, value and 4 bytes of framing each)
    size: int


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased option names listed in one ``Connection`` header value."""
    return [t for t in (part.strip().lower() for part in value.split(b",")) if t]


_tokens_cache: dict[bytes, tuple[bytes, ...]] = {}


def _connection_tokens(value: bytes) -> tuple[bytes, ...]:
    """`connection_tokens`, remembered for the usual values (``keep-alive``, ``close``…)."""
    tokens = _tokens_cache.get(value)
    if tokens is None:
        tokens = tuple(connection_tokens(value))
        if len(_tokens_cache) < _CACHE_LIMIT and len(value) <= _CACHE_MAX_KEY:
            _tokens_cache[value] = tokens
    return tokens


def _transfer_problem(values: list[bytes]) -> tuple[int, str] | None:
    """Why a request's ``Transfer-Encoding`` headers are unacceptable, if they are.

    Only a single header whose value is exactly ``chunked`` is accepted:
    anything else is either an unknown coding (501, RFC 9112 §6.1) or a
    smuggling shape (400).
    """
    if len(values) > 1:
        return (400, "repeated Transfer-Encoding header")
    codings = [c.strip().lower() for c in values[0].split(b",")]
    if codings == [b"chunked"]:
        return None
    if any(not c for c in codings) or codings.count(b"chunked") > 1:
        return (400, "malformed Transfer-Encoding")
    return (501, "unsupported transfer coding")


def scan_request_headers(headers: Headers) -> RequestHeaders:
    """Sort a request's headers into those to forward and those the proxy consumes.

    Checks the shapes the HTTP parser lets through but a strict proxy must
    refuse: a missing, repeated or malformed ``Host``; ``Transfer-Encoding``
    other than one plain ``chunked``; an ``Expect`` other than
    ``100-continue`` (417).
    """
    forward: Headers = []
    append = forward.append
    cached = _request_cache.get
    host: bytes | None = None
    hosts = 0
    length: bytes | None = None
    te: list[bytes] | None = None
    expect: bytes | None = None
    upgrade: bytes | None = None
    named: list[bytes] | None = None
    size = 4 * len(headers)
    for header in headers:
        name = header[0]
        size += len(name) + len(header[1])
        kind = cached(name)
        if kind is None:
            kind = _request_kind(name)
        if kind == _FORWARD:
            append(header)
        elif kind == _HOST:
            hosts += 1
            host = header[1]
            append(header)
        elif kind == _CONNECTION:
            if named is None:
                named = []
            named.extend(_connection_tokens(header[1]))
        elif kind == _LENGTH:
            length = header[1]
        elif kind == _TE:
            if te is None:
                te = []
            te.append(header[1])
        elif kind == _EXPECT:
            expect = header[1] if expect is None else expect + b"," + header[1]
        elif kind == _UPGRADE:
            upgrade = header[1] if upgrade is None else upgrade + b", " + header[1]
        # _DROP: nothing to do.

    problem: tuple[int, str] | None = None
    if hosts == 0:
        problem = (400, "missing Host header")
    elif hosts > 1:
        problem = (400, "repeated Host header")
    elif host is None or (host not in _good_hosts and not _good_host(host)):
        problem = (400, "malformed Host header")
    content_length: int | None = None
    if length is not None:
        # llhttp refuses repeated or signed values before we get here; check anyway.
        length = length.strip()
        if length.isdigit():
            content_length = int(length)
        elif problem is None:
            problem = (400, "invalid Content-Length")
    chunked = False
    if te is not None and problem is None:
        problem = _transfer_problem(te)
        chunked = problem is None
    expect_continue = False
    if expect is not None and problem is None:
        if expect.strip().lower() == b"100-continue":
            expect_continue = True
        else:
            problem = (417, "unsupported expectation")
    connection_upgrade = False
    if named:
        connection_upgrade = b"upgrade" in named
        # Names the proxy handles itself (Host included) are never removed this way.
        extra = {t for t in named if t not in _REQUEST_KINDS and t != b"close"}
        if extra:
            forward = [h for h in forward if h[0].lower() not in extra]
    return RequestHeaders(
        forward,
        host,
        problem,
        content_length,
        chunked,
        expect_continue,
        upgrade,
        connection_upgrade,
        size,
    )


def scan_response_headers(
    headers: Headers, remove: frozenset[bytes] = frozenset()
) -> ResponseHeaders:
    """Sort a backend response's headers into those to relay and the framing they declare.

    A ``Transfer-Encoding`` other than one plain ``chunked`` is reported as a
    problem: relaying the body without the coding would change its meaning.
    Header fields whose lower-cased names are in ``remove`` (a site's
    `~tlsproxy.headers.HeaderPolicy.remove`) are left out of ``forward``;
    a ``Content-Length`` among them still frames the body.
    """
    forward: Headers = []
    append = forward.append
    cached = _policy_cache(remove).get if remove else _response_cache.get
    length: bytes | None = None
    te: list[bytes] | None = None
    upgrade: bytes | None = None
    named: list[bytes] | None = None
    size = 4 * len(headers)
    for header in headers:
        name = header[0]
        size += len(name) + len(header[1])
        kind = cached(name)
        if kind is None:
            kind = _removing_kind(remove, name) if remove else _response_kind(name)
        if kind == _FORWARD:
            append(header)
        elif kind == _LENGTH:
            length = header[1]
            append(header)
        elif kind == _CONNECTION:
            if named is None:
                named = []
            named.extend(_connection_tokens(header[1]))
        elif kind == _TE:
            if te is None:
                te = []
            te.append(header[1])
        elif kind == _UPGRADE:
            upgrade = header[1]
        elif kind == _LENGTH_REMOVED:
            length = header[1]
        # _DROP: nothing to do.
    problem: str | None = None
    chunked = False
    if te is not None:
        if len(te) == 1 and te[0].strip().lower() == b"chunked":
            chunked = True
        else:
            problem = "unsupported Transfer-Encoding in response"
    content_length: int | None = None
    if length is not None:
        length = length.strip()
        if length.isdigit():
            content_length = int(length)
        else:
            problem = "invalid Content-Length in response"
    close = False
    if named:
        close = b"close" in named
        extra = {t for t in named if t not in _RESPONSE_KINDS and t != b"close"}
        if extra:
            forward = [h for h in forward if h[0].lower() not in extra]
    return ResponseHeaders(forward, problem, content_length, chunked, upgrade, close, size)


# Response classification with a site's removed names as well, one cache per
# set of names (a configuration has one per site; bounded all the same).
_policy_caches: dict[frozenset[bytes], dict[bytes, int]] = {}


def _policy_cache(remove: frozenset[bytes]) -> dict[bytes, int]:
    cache = _policy_caches.get(remove)
    if cache is None:
        if len(_policy_caches) >= 64:
            _policy_caches.clear()
        cache = _policy_caches[remove] = {}
    return cache


def _removing_kind(remove: frozenset[bytes], name: bytes) -> int:
    lname = name.lower()
    kind = _RESPONSE_KINDS.get(lname, _FORWARD)
    if lname in remove:
        if kind == _FORWARD:
            kind = _DROP
        elif kind == _LENGTH:
            kind = _LENGTH_REMOVED
    cache = _policy_cache(remove)
    if len(cache) < _CACHE_LIMIT and len(name) <= _CACHE_MAX_KEY:
        cache[name] = kind
    return kind


def is_websocket_upgrade(method: bytes, upgrade: bytes | None, connection_upgrade: bool) -> bool:
    """Whether a request is a WebSocket opening handshake (RFC 6455 §4.1)."""
    if method != b"GET" or upgrade is None or not connection_upgrade:
        return False
    return b"websocket" in connection_tokens(upgrade)


def split_host(host: bytes) -> bytes:
    """The host part of a ``Host`` header value: without a port, IPv6 brackets kept."""
    if host.startswith(b"["):
        return host[: host.index(b"]") + 1]
    return host.partition(b":")[0]


@functools.lru_cache(maxsize=4096)
def client_address(host: str) -> str:
    """The textual client address to report: IPv4-mapped IPv6 addresses as plain IPv4.

    Called for every accepted connection; returning clients are answered from a
    bounded cache (parsing the address was about 1 % of a full handshake's CPU).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _forwarded_value(value: str) -> str:
    """An RFC 7239 parameter value: a token as is, anything else as a quoted string."""
    if _TOKEN_RE.fullmatch(value.encode("ascii", "replace")):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def forwarded_for(client: str) -> str:
    """The RFC 7239 ``for=`` node for a client address (IPv6 bracketed and quoted)."""
    if ":" in client:
        return f'"[{client}]"'
    return _forwarded_value(client)


class ForwardingContext:
    """The forwarding headers for one client connection, precomputed once.

    Only ``X-Forwarded-Host`` and the ``host=`` part of ``Forwarded`` change
    with the request; :meth:`headers` caches them for the last host seen, so a
    keep-alive connection builds them once.
    """

    __slots__ = ("_fixed", "_for_proto", "_last_block", "_last_headers", "_last_host")

    def __init__(self, client: str, proto: str, port: int | None) -> None:
        """``client`` is the peer address (as from :func:`client_address`),
        ``proto`` the scheme the client used (``https``), ``port`` the port it
        connected to (None if not an IP connection)."""
        fixed: Headers = [
            (b"X-Forwarded-For", client.encode("ascii", "replace")),
            (b"X-Forwarded-Proto", proto.encode("ascii")),
        ]
        if port is not None:
            fixed.append((b"X-Forwarded-Port", b"%d" % port))
        self._fixed = fixed
        self._for_proto = f"for={forwarded_for(client)};proto={_forwarded_value(proto)}"
        self._last_host: bytes | None = None
        self._last_headers: Headers = []
        self._last_block = b""

    def headers(self, host: bytes) -> Headers:
        """The forwarding headers to add to a request whose ``Host`` is ``host``."""
        if host != self._last_host:
            self._remember(host)
        return self._last_headers

    def block(self, host: bytes) -> bytes:
        """:meth:`headers`, serialized as header lines."""
        if host != self._last_host:
            self._remember(host)
        return self._last_block

    def _remember(self, host: bytes) -> None:
        text = host.decode("ascii", "replace")
        forwarded = f"{self._for_proto};host={_forwarded_value(text)}"
        result = [
            *self._fixed,
            (b"X-Forwarded-Host", host),
            (b"Forwarded", forwarded.encode("ascii", "replace")),
        ]
        self._last_host = host
        self._last_headers = result
        self._last_block = serialize(result)


_colon_join = b": ".join


def serialize(headers: Headers) -> bytes:
    """Header lines (``Name: value\\r\\n`` each) for a message head."""
    if not headers:
        return b""
    return b"\r\n".join(map(_colon_join, headers)) + b"\r\n"
