"""The proxy engine's client side: a lean, strict HTTP/1.1 server protocol that forwards.

One job: read HTTP/1.1 requests from a client connection (already decrypted by
the TLS layer), route each one, forward it over a pooled backend connection,
and stream the backend's response back, mapping every failure to a clean
status (400/413/414/421/431/501/505 for the client's mistakes, 502/504 for the
backend's) or to a closed connection when a response was already under way.

It must not: import the global reactor (the clock and pool are injected), use
``twisted.web`` (too slow for the hot path, and too lenient: see DESIGN.md §3),
decide routing or header policy itself (``router`` and
:mod:`tlsproxy.forwarding` do), or buffer whole bodies (bodies stream with
back-pressure both ways).

How a connection runs:

* ``httptools`` (llhttp, strict mode) parses requests; this module adds the
  checks llhttp leaves out (``Host``, transfer codings, target bytes, HTTP
  versions, size limits, deadlines).
* One request is served at a time.  Pipelined requests are parsed as they
  arrive, queued in order, and reading pauses until the queue drains; while a
  lone request waits for its response, reading continues so that a client
  disconnect is noticed and aborts the backend request.
* Request heads go to the backend in one write; bodies are re-framed
  (``Content-Length`` kept, chunked re-chunked, trailers dropped).  Response
  heads and whatever body arrived with them go to the client in one write.
* Deadlines are timestamps that :class:`ProxyFactory` checks once per
  ``sweep_interval``; nothing schedules a timer per request.
* A keep-alive connection remembers its last request head's and last
  response head's header fields with what was made of them (the scan, the
  header lines for the other side, the status line): a client or backend that
  repeats its header fields exactly, as most do, skips that work (the
  results are pure functions of the fields, so every message is still held
  to every check).  Heads over 8 KiB are not remembered.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
from httptools import HttpRequestParser, HttpResponseParser
from httptools.parser.errors import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
)
from OpenSSL.SSL import Error as SSLError
from twisted.internet import error
from twisted.internet.interfaces import IAddress, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy import clientauth, forwarding
from tlsproxy.accesslog import Entry
from tlsproxy.config import ClientAuth
from tlsproxy.headers import HeaderPolicy
from tlsproxy.upstream import (
    INFINITY,
    BackendConnection,
    BackendLike,
    Transport,
    UnsupportedBackend,
    UpstreamPools,
    describe,
)

__all__ = [
    "ProxyFactory",
    "ProxyProtocol",
    "ProxySettings",
    "RouteLike",
    "RouteTableLike",
    "Router",
]

log = Logger()

KIB = 1024
MIB = 1024 * KIB


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class ProxySettings:
    """Timeouts and limits of the proxy engine (client side and backend pool).

    Times are in seconds, sizes in bytes.  Defaults follow nginx and HAProxy
    where they have one.  Users set them in the configuration's ``proxy:``
    section under the same names (``tlsproxy.config.PROXY_KEYS``).  Deadlines
    are checked every ``sweep_interval`` seconds, so each may fire up to that
    much late.
    """

    #: Time allowed for a whole request head, from its first byte (nginx
    #: ``client_header_timeout``); also how long a new connection may stay
    #: silent.  Slowloris protection: it does not restart on each byte.  Expiry
    #: sends 408 and closes.
    client_header_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Longest pause between two reads of a request body (nginx
    #: ``client_body_timeout``).  Expiry sends 408 (or closes if a response
    #: has started).
    client_body_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: How long an idle keep-alive connection waits for its next request (nginx
    #: ``keepalive_timeout``).  Expiry closes silently.
    keepalive_timeout: float = attrs.field(default=75.0, validator=_positive)
    #: How long a client may leave our response unread (its receive window
    #: full) before the connection is dropped (nginx ``send_timeout``).
    client_send_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Longest request target accepted; longer gets 414 (nginx: 8 KiB buffers).
    max_request_line: int = attrs.field(default=8 * KIB, validator=_positive)
    #: Most bytes of header fields (names, values, and 4 bytes of framing per
    #: field) in one request, trailers included; more gets 431 (HAProxy ~15 KiB).
    max_header_bytes: int = attrs.field(default=16 * KIB, validator=_positive)
    #: Most header fields in one request; more gets 431 (HAProxy: 101).
    max_header_count: int = attrs.field(default=100, validator=_positive)
    #: Largest request body; larger gets 413, before any ``100 Continue`` when
    #: ``Content-Length`` announces it.  Bodies stream, so this guards the
    #: backend, not our memory (nginx defaults to 1 MiB, too small for uploads;
    #: Cloudflare uses 100 MB).  None means no limit.
    max_body_bytes: int | None = attrs.field(default=100 * MIB, validator=_positive)
    #: Time allowed to connect to a backend; expiry answers 504.  nginx's 60 s
    #: default only delays the error page.
    backend_connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for the backend's response head once the request is sent,
    #: and between reads of its body (nginx ``proxy_read_timeout``); also how
    #: long the backend may leave request bytes unread (full send buffer, or a
    #: TLS handshake that does not finish).  Expiry answers 504, or closes the
    #: client if the response had started.
    backend_read_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: How long an idle pooled backend connection is kept.  Shorter than the
    #: common backend keep-alive timeouts (uvicorn and Node close at 5 s), so
    #: the proxy rarely picks a connection the backend is closing.
    backend_idle_timeout: float = attrs.field(default=4.0, validator=_positive)
    #: Most idle connections kept per backend; more are closed on release.
    backend_max_idle: int = attrs.field(default=64, validator=_positive)
    #: Largest response head accepted from a backend; larger answers 502.
    max_response_header_bytes: int = attrs.field(default=64 * KIB, validator=_positive)
    #: How often deadlines are checked.
    sweep_interval: float = attrs.field(default=1.0, validator=_positive)


class RouteLike(Protocol):
    """What a route must provide (``tlsproxy.routing.Route``)."""

    @property
    def site(self) -> str:
        """The configured host name of the site, for logs."""

    @property
    def backend(self) -> BackendLike:
        """Where the site's requests go."""

    @property
    def headers(self) -> HeaderPolicy:
        """Headers set on (and first removed from) every response of the site."""

    @property
    def host_header(self) -> bytes | None:
        """The ``Host`` to send the backend instead of the client's, or None."""

    @property
    def client_auth(self) -> ClientAuth | None:
        """The site's client-certificate settings, or None."""


class RouteTableLike(Protocol):
    """One site's routes (``tlsproxy.routing.RouteTable``)."""

    def route(self, target: bytes) -> RouteLike:
        """The route for a request target (origin-form, or ``*``)."""


class Router(Protocol):
    """What the factory's ``router`` must provide (``tlsproxy.routing.Router``)."""

    #: Lower-cased client-certificate identity header names, dropped from every request.
    identity_headers: frozenset[bytes]

    def table(self, sni: str | None, host: bytes) -> RouteTableLike | None:
        """The routes of the site a request is for, or None (answered 421).

        ``sni`` is the TLS server name (None without TLS or SNI); ``host`` is
        the request's ``Host`` without its port, as sent (not case-folded, IPv6
        in brackets).  A connection caches the answer per (router, ``Host``).
        """


# Why reading from the client is paused (bits of ProxyProtocol._paused).
_PAUSE_PIPELINE = 1  # a request is in flight; later pipelined requests wait
_PAUSE_BACKEND = 2  # the backend's send buffer is full
_PAUSE_CONNECT = 4  # waiting for a backend connection
_PAUSE_UPGRADE = 8  # waiting for the backend to accept a WebSocket upgrade
_PAUSE_DONE = 16  # closing
_PAUSE_CLIENT = 32  # the client's send buffer is full (it is not reading our output)

# Response progress for the request being served.
_R_IDLE = 0  # nothing sent to a backend yet
_R_HEAD = 1  # request sent (or being sent), waiting for the response head
_R_BODY = 2  # head relayed, relaying the body
_R_DONE = 3  # response complete
_R_UPGRADE = 4  # 101 relayed, switching to byte splicing

# How the response body is framed towards the client.
_F_NONE = 0  # no body (HEAD, 204, 304)
_F_LENGTH = 1  # Content-Length passed through
_F_CHUNKED = 2  # re-chunked
_F_CLOSE = 3  # ends when we close (HTTP/1.0 client, no length known)

#: Methods safe to resend once on a fresh connection when a reused pooled
#: connection closes before any response byte (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: Unread request body small enough to read and drop after an early response,
#: keeping the connection; more than this, or chunked, closes instead.
_DRAIN_LIMIT = 64 * KIB

#: Bytes of chunk framing, extensions and trailers tolerated, beyond the header
#: limit, between two pieces of body data.
_FRAMING_SLACK = 4 * KIB

#: Most bytes a client may send after a WebSocket handshake before the backend accepts it.
_EARLY_LIMIT = 64 * KIB

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Bytes removed from a backend's reason phrase: controls (but TAB) and DEL.
_REASON_DELETE = bytes(b for b in range(32) if b != 9) + b"\x7f"

# A fragment, or a '%' not followed by two hex digits (llhttp already refuses
# controls, spaces, DEL and bytes >= 0x80).
_BAD_TARGET = re.compile(rb"#|%(?![0-9A-Fa-f]{2})")
_PERCENT, _HASH = ord("%"), ord("#")
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(.*)", re.DOTALL)

_PHRASES = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@functools.cache
def _error_bytes(status: int, close: bool, head_only: bool, extra: bytes = b"") -> bytes:
    """A complete small plain-text response for a locally generated status.

    ``extra`` is header lines (each ending in CRLF) added to the head, such as
    the site's HSTS header.
    """
    phrase = _PHRASES.get(status, "Error")
    body = f"{status} {phrase}\n".encode("ascii")
    head = (
        (
            f"HTTP/1.1 {status} {phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            + ("Connection: close\r\n" if close else "")
            + ("Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n" if status == 405 else "")
        ).encode("ascii")
        + extra
        + b"\r\n"
    )
    return head if head_only else head + body


def handshake_failure_reason(reason: Failure) -> str:
    """A short, bounded label for why a TLS connection closed before its handshake
    completed: OpenSSL's reason (``no shared cipher``, ``unsupported protocol``,
    ``tlsv1 alert unknown ca``…) or ``closed before handshake``."""
    exc = reason.value
    if isinstance(exc, SSLError) and exc.args and isinstance(exc.args[0], list):
        for entry in reversed(exc.args[0]):
            if isinstance(entry, tuple) and entry and isinstance(entry[-1], str) and entry[-1]:
                return entry[-1][:64]
        return "tls error"
    return "closed before handshake"


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class _Request:
    """One client request: its head as parsed, and its progress."""

    __slots__ = (
        "answered",
        "backend_head",
        "body",
        "body_bytes",
        "chunked",
        "complete",
        "continued",
        "early",
        "error",
        "expect_continue",
        "forward",
        "head_done",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "length",
        "method",
        "raw_idle",
        "retried",
        "route",
        "target",
        "upgrade",
        "websocket",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.http11 = True
        self.headers: forwarding.Headers = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.host = b""
        self.forward: forwarding.Headers = []
        self.length: int | None = None
        self.chunked = False
        self.expect_continue = False
        #: we told the client to send its body (100 Continue)
        self.continued = False
        self.websocket = False
        self.upgrade: bytes | None = None
        #: body chunks parsed before the request was started (pipelining)
        self.body: list[bytes] | None = None
        self.body_bytes = 0
        #: bytes read since the last body data (chunked requests)
        self.raw_idle = 0
        #: bytes the client sent after a WebSocket handshake, before the 101
        self.early: list[bytes] | None = None
        self.error: tuple[int, str] | None = None
        self.route: RouteLike | None = None
        self.backend_head = b""
        self.retried = False
        #: a response was sent before the body was complete; the rest is dropped
        self.answered = False

    def drainable(self) -> bool:
        """Whether the unread body is small enough to read and drop after answering.

        A client that asked ``Expect: 100-continue`` and got a final status
        instead may never send its body, so the connection cannot continue.
        """
        if self.complete or (self.length is None and not self.chunked):
            return True
        if self.expect_continue and not self.continued and self.body_bytes == 0:
            return False
        return self.length is not None and self.length - self.body_bytes <= _DRAIN_LIMIT


class _ResponseCallbacks:
    """The parser-callback object for responses: bound methods of the protocol."""

    __slots__ = (
        "on_body",
        "on_header",
        "on_headers_complete",
        "on_message_begin",
        "on_message_complete",
        "on_status",
    )

    def __init__(self, proxy: ProxyProtocol) -> None:
        self.on_message_begin = proxy._r_begin
        self.on_status = proxy._r_status
        self.on_header = proxy._r_header
        self.on_headers_complete = proxy._r_headers_complete
        self.on_body = proxy._r_body
        self.on_message_complete = proxy._r_complete


_UNSET: Any = object()

#: Largest head (bytes of header fields) a connection remembers for its next
#: message: keeps what an idle keep-alive connection holds on to small.
_REMEMBER_HEAD = 8 * KIB

# Placeholders for a connection's remembered header scans (keyed by None: never hit).
_NO_SCAN = forwarding.scan_request_headers([])
_NO_RSCAN = forwarding.scan_response_headers([])
_NO_NAMES: frozenset[bytes] = frozenset()


@implementer(IPushProducer, IHandshakeListener)
class ProxyProtocol(TwistedProtocol):
    """One client connection.  Built by :class:`ProxyFactory`; not configured directly.

    It is the streaming producer registered on the client transport (a full
    client send buffer pauses reading from the backend) and the
    :class:`~tlsproxy.upstream.BackendUser` of the backend connection it
    borrows (a full backend send buffer pauses reading from the client).
    The ``on_*`` methods are ``httptools`` request-parser callbacks.
    """

    def __init__(self, factory: ProxyFactory) -> None:
        self._factory = factory
        self._settings = s = factory.settings
        self._clock = factory.clock
        self._pool = factory.pools
        self._max_line = s.max_request_line
        self._max_header_bytes = s.max_header_bytes
        self._max_header_count = s.max_header_count
        self._max_body = s.max_body_bytes
        self._parser = HttpRequestParser(self)
        self._rcb = _ResponseCallbacks(self)
        self._rparser = HttpResponseParser(self._rcb)
        self._t: Transport = cast(Transport, None)
        self._fwd: forwarding.ForwardingContext | None = None
        self._client = "-"
        self._sni: Any = _UNSET
        # the client-certificate headers of this connection, for _client_identity
        self._identity: tuple[ClientAuth, bytes | None] | None = None
        # the last site looked up on this connection (keep-alive reuses it)
        self._route_host: bytes | None = None
        self._route_router: Router | None = None
        self._route_table: RouteTableLike | None = None
        self._route_strip: frozenset[bytes] = frozenset()
        # the last request head's header fields and what scanning them found
        self._scan_key: forwarding.Headers | None = None
        self._scan = _NO_SCAN
        # the last request's header lines for the backend, and what they came from
        self._fields_key: forwarding.Headers | None = None
        self._fields_route: RouteLike | None = None
        self._fields_strip: frozenset[bytes] | None = None
        self._fields_identity = b""
        self._fields_forward: forwarding.Headers = []
        self._fields = b""

        self._paused = 0
        #: when reading from the client times out (reactor seconds)
        self._deadline = INFINITY
        #: since when the client has not been reading our output
        self._write_blocked_since = INFINITY
        self._client_write_blocked = False

        self._parsing: _Request | None = None  # request the parser is filling in
        self._last: _Request | None = None  # request whose message completed last
        self._current: _Request | None = None  # request being served
        self._pipeline: collections.deque[_Request] = collections.deque()
        self._head_raw = 0
        self._headers: forwarding.Headers = []  # where on_header appends
        self._trailers: forwarding.Headers = []  # the sink for trailer fields
        self._body_seen = False  # on_body ran during this read
        self._stopped = False  # no more requests will be parsed
        self._closing = False
        self._in_next = False
        self._in_read = False

        self._backend: BackendConnection | None = None
        self._backend_reused = False
        self._connecting = False
        self._bout: list[bytes] = []  # pending bytes for the backend
        self._cout: list[bytes] = []  # pending bytes for the client
        self._splicing = False

        self._rstate = _R_IDLE
        self._rheaders: forwarding.Headers = []
        # the last response head's header fields, what scanning them found, the
        # header lines made from them, and the last status line
        self._rscan_key: forwarding.Headers | None = None
        self._rscan = _NO_RSCAN
        self._rscan_remove = _NO_NAMES
        self._rfields_scan: forwarding.ResponseHeaders | None = None
        self._rfields_policy: HeaderPolicy | None = None
        self._rfields_no_length = False
        self._rfields = b""
        self._rline_status = 0
        self._rline_reason = b""
        self._rline = b""
        self._rtrailers: forwarding.Headers = []
        self._rhead_raw = 0
        self._rchunked = False
        self._rbody_seen = False
        self._rraw_idle = 0
        self._rreason = b""
        self._rframe = _F_NONE
        self._r_until_close = False
        self._rinterim = False
        self._rextra = False
        self._rkeep = False
        self._rany = False
        self._rclose_token = False
        self._close_after = False
        self._raw_head: bytearray | None = None
        # for the factory's on_request report: when the exchange started, the
        # final status answered, body bytes relayed, and (once) TLS version/cipher
        self._started = 0.0
        self._rstatus = 0
        self._rsent = 0
        self._tls: tuple[str | None, str | None] | None = None
        # what _report found for the last header fields and route it saw
        self._report_forward: forwarding.Headers | None = None
        self._report_fields: tuple[bytes | None, bytes | None] = (None, None)
        self._report_route: RouteLike | None = None
        self._report_upstream: str | None = None
        self._handshake_done = False

    # ------------------------------------------------------------------ Protocol

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._t = transport
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):
                set_no_delay(True)
        transport.registerProducer(self, True)
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        self._client = forwarding.client_address(host) if isinstance(host, str) else "unknown"
        port = getattr(transport.getHost(), "port", None)
        self._fwd = forwarding.ForwardingContext(
            self._client, self._factory.scheme, port if isinstance(port, int) else None
        )
        self._deadline = self._clock.seconds() + self._settings.client_header_timeout
        self._factory._track(self)

    def dataReceived(self, data: bytes) -> None:
        if self._splicing:
            backend = self._backend
            if backend is not None:
                backend.write(data)
            return
        if self._stopped:
            self._data_after_stop(data)
            return
        r = self._parsing
        head_in_progress = r is not None and not r.head_done
        self._in_read = True
        try:
            while True:
                try:
                    self._parser.feed_data(data)
                except HttpParserUpgrade as exc:
                    data = self._client_upgrade(data, int(exc.args[0]))
                    if data:
                        continue
                except HttpParserError as exc:
                    self._parse_failed(exc, data)
                else:
                    r = self._parsing
                    if r is not None:
                        self._bound_unparsed(r, head_in_progress, len(data))
                break
        finally:
            self._in_read = False
        bout = self._bout
        if bout and self._backend is not None:
            self._bout = []
            self._backend.write_sequence(bout)
        current = self._current
        if (
            current is not None
            and (self._pipeline or self._parsing is not None)
            and current is not self._parsing
        ):
            self._pause(_PAUSE_PIPELINE)

    def _bound_unparsed(self, r: _Request, head_in_progress: bool, size: int) -> None:
        """Bound what llhttp may be buffering inside one unfinished field.

        httptools hands a header (or trailer) field over only once it ends, so
        an endless one is caught by counting the bytes read around it.
        """
        if not r.head_done:
            if head_in_progress:
                # All of this read belongs to the head begun in an earlier one.
                self._head_raw += size
                if self._head_raw > self._max_line + self._max_header_bytes:
                    self._reject_parsing(431, "request head too large")
        elif r.chunked:
            if self._body_seen:
                self._body_seen = False
                r.raw_idle = 0
            else:
                # Reads with no body data: chunk framing, extensions, trailers.
                r.raw_idle += size
                if r.raw_idle > self._max_header_bytes + _FRAMING_SLACK:
                    self._reject_parsing(431, "chunk framing or trailers too large")

    def handshakeCompleted(self) -> None:
        """The TLS handshake succeeded (called by Twisted's TLS layer)."""
        self._handshake_done = True
        on_tls = self._factory.on_tls
        if on_tls is not None:
            on_tls(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        on_tls = self._factory.on_tls
        if on_tls is not None and not self._handshake_done and self._factory.scheme == "https":
            on_tls(handshake_failure_reason(reason))
        self._closing = True
        self._stopped = True
        self._factory._untrack(self)
        backend, self._backend = self._backend, None
        if backend is not None:
            if self._splicing:
                self._pool.discard(backend, abort=False)
            else:
                r = self._current
                log.info(
                    "{client}: closed the connection; upstream request {method} {target} abandoned",
                    client=self._client,
                    method=r.method.decode("ascii", "replace") if r is not None else "-",
                    target=r.target.decode("ascii", "replace") if r is not None else "-",
                )
                self._pool.discard(backend)
        if self._connecting:
            self._connecting = False
            self._pool.cancel(self)
        self._pipeline.clear()

    # ------------------------------------------- IPushProducer (client output)

    def pauseProducing(self) -> None:
        """The client's send buffer is full: stop reading from the backend, and
        from the client (its pipelined requests would pile up answers)."""
        self._client_write_blocked = True
        self._write_blocked_since = self._clock.seconds()
        self._pause(_PAUSE_CLIENT)
        backend = self._backend
        if backend is not None:
            backend.pause_reading()
            backend.deadline = INFINITY

    def resumeProducing(self) -> None:
        """The client's send buffer drained: read from the backend again."""
        self._client_write_blocked = False
        self._write_blocked_since = INFINITY
        self._resume(_PAUSE_CLIENT)
        backend = self._backend
        if backend is not None:
            backend.resume_reading()
            if self._rstate in (_R_HEAD, _R_BODY):
                current = self._current
                if current is not None and (current.complete or self._paused & _PAUSE_BACKEND):
                    backend.deadline = self._clock.seconds() + self._settings.backend_read_timeout

    def stopProducing(self) -> None:
        """The client transport is going away; connectionLost cleans up."""

    # ----------------------------------------------- request parser callbacks

    def on_message_begin(self) -> None:
        """Parser callback: a new request starts."""
        r = _Request()
        self._parsing = r
        self._headers = r.headers
        self._head_raw = 0
        if self._current is None:
            self._deadline = self._clock.seconds() + self._settings.client_header_timeout

    def on_url(self, url: bytes) -> None:
        """Parser callback: (part of) the request target."""
        r = self._parsing
        assert r is not None
        r.target += url
        if len(r.target) > self._max_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        """Parser callback: one header field (or trailer field) complete.

        Sizes are checked once the head is complete; until then memory is
        bounded by the field count here and by :meth:`_bound_unparsed`.
        """
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self._max_header_count:
            raise _Reject(431, "too many header fields")

    def on_headers_complete(self) -> None:
        """Parser callback: the request head is complete; validate and start or queue it."""
        r = self._parsing
        assert r is not None
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.0":
            r.http11 = False
        elif version != "1.1":
            if version == "0.9":
                raise _Reject(400, "HTTP/0.9 request")
            raise _Reject(505, f"unsupported HTTP version {version}")
        r.method = method = parser.get_method()
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported")
        r.keep_alive = parser.should_keep_alive()
        headers = r.headers
        if headers == self._scan_key:
            # A keep-alive client usually repeats its header fields exactly.
            scan = self._scan
        else:
            scan = forwarding.scan_request_headers(headers)
            if scan.size <= _REMEMBER_HEAD:
                self._scan_key, self._scan = headers, scan
        if scan.size > self._max_header_bytes:
            raise _Reject(431, "request header fields too large")
        if scan.problem is not None:
            raise _Reject(*scan.problem)
        host: bytes = scan.host  # type: ignore[assignment]  # not None without a problem
        r.host = host
        target = r.target
        if target[:1] != b"/" and (target != b"*" or method != b"OPTIONS"):
            r.target = target = _origin_form(target, host)
        # (An int membership test is ten times cheaper than the regex or ``b"%" in``.)
        if (_PERCENT in target or _HASH in target) and _BAD_TARGET.search(target) is not None:
            raise _Reject(400, "invalid request target")
        r.length = length = scan.content_length
        r.chunked = scan.chunked
        if self._max_body is not None and length is not None and length > self._max_body:
            raise _Reject(413, "request body too large")
        if parser.should_upgrade():
            # llhttp skips the body of an upgrade request: refuse one with a body.
            if r.chunked or length:
                raise _Reject(400, "upgrade request with a body")
            if forwarding.is_websocket_upgrade(method, scan.upgrade, scan.connection_upgrade):
                r.websocket = True
                r.upgrade = scan.upgrade
        r.expect_continue = scan.expect_continue and r.http11
        r.forward = scan.forward
        r.headers = []
        self._headers = self._trailers
        r.head_done = True  # accepted: started or queued below
        if self._current is None:
            self._start(r)
        else:
            self._pipeline.append(r)

    def on_body(self, data: bytes) -> None:
        """Parser callback: a piece of request body (de-chunked)."""
        r = self._parsing
        assert r is not None
        self._body_seen = True
        r.body_bytes += len(data)
        if r.chunked and self._max_body is not None and r.body_bytes > self._max_body:
            raise _Reject(413, "request body too large")
        if r is self._current:
            if r.answered or self._rstate == _R_DONE:
                return
            if r.chunked:
                self._bout += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                self._bout.append(data)
            self._deadline = self._clock.seconds() + self._settings.client_body_timeout
        elif r.body is None:
            r.body = [data]
        else:
            r.body.append(data)

    def on_message_complete(self) -> None:
        """Parser callback: the request (body included) is complete."""
        r = self._parsing
        assert r is not None
        trailers = self._trailers
        if trailers:
            # Trailer fields are dropped, but count towards the header limits.
            size = sum(len(n) + len(v) + 4 for n, v in trailers)
            trailers.clear()
            if size > self._max_header_bytes:
                raise _Reject(431, "trailer fields too large")
        r.complete = True
        self._parsing = None
        self._last = r
        if not r.keep_alive:
            self._stopped = True
        if r is not self._current:
            return
        if r.answered:
            # An early response was already sent; the dropped body is done.
            self._current = None
            self._next()
            return
        self._deadline = INFINITY
        if r.chunked and self._rstate != _R_DONE:
            self._bout.append(b"0\r\n\r\n")
        backend = self._backend
        if backend is not None and self._rstate == _R_HEAD and not self._client_write_blocked:
            backend.deadline = self._clock.seconds() + self._settings.backend_read_timeout

    # ------------------------------------------------------ request lifecycle

    def _start(self, r: _Request) -> None:
        """Serve ``r`` now: answer it locally, or route it and send it to a backend."""
        self._current = r
        self._rstate = _R_IDLE
        self._rany = False
        self._rextra = False
        self._rinterim = False
        self._rheaders = []
        self._rhead_raw = 0
        self._close_after = False
        self._started = self._clock.seconds()
        self._rstatus = self._rsent = 0
        if r.error is not None:
            self._local_response(r.error[0], r.error[1], close=True)
            return
        router = self._factory.router  # read each time: a reload may swap it
        if r.host == self._route_host and router is self._route_router:
            table = self._route_table
        else:
            table = router.table(self._server_name(), forwarding.split_host(r.host))
            self._route_host, self._route_router, self._route_table = r.host, router, table
            self._route_strip = router.identity_headers
        if table is None:
            log.info(
                "{client}: no site for host {host!r} (SNI {sni!r}): 421",
                client=self._client,
                host=r.host,
                sni=self._server_name(),
            )
            self._local_response(421, "", quiet=True)
            return
        r.route = route = table.route(r.target)
        identity = b""
        if route.client_auth is not None:
            found = self._client_identity(route.client_auth)
            if found is None:
                log.info(
                    "{client}: no verified client certificate for {site}: 421",
                    client=self._client,
                    site=route.site,
                )
                self._local_response(421, "", quiet=True)
                return
            identity = found
        forward = r.forward
        strip = self._route_strip
        if (
            forward is self._fields_key
            and route is self._fields_route
            and strip is self._fields_strip
            and identity == self._fields_identity
        ):
            # The same header fields as the last request (see on_headers_complete).
            r.forward = self._fields_forward
            fields = self._fields
        else:
            key = forward
            if strip:
                # Clients may not send identity headers to any site (README).
                forward = [(n, v) for n, v in forward if n.lower() not in strip]
            host_header = route.host_header
            if host_header is not None:
                forward = [(n, host_header) if n.lower() == b"host" else (n, v) for n, v in forward]
            r.forward = forward
            assert self._fwd is not None
            fields = forwarding.serialize(forward) + self._fwd.block(r.host) + identity
            if len(fields) <= 2 * _REMEMBER_HEAD:
                self._fields_key, self._fields_route, self._fields_strip = key, route, strip
                self._fields_identity, self._fields_forward, self._fields = (
                    identity,
                    forward,
                    fields,
                )
        parts = [r.method, b" ", r.target, b" HTTP/1.1\r\n", fields]
        if r.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif r.length is not None:
            parts.append(b"Content-Length: %d\r\n" % r.length)
        if r.websocket:
            parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % r.upgrade)
        parts.append(b"\r\n")
        r.backend_head = head = b"".join(parts)
        bout = [head]
        if r.body is not None:
            for chunk in r.body:
                if r.chunked:
                    bout += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                else:
                    bout.append(chunk)
            r.body = None
        if r.complete:
            if r.chunked:
                bout.append(b"0\r\n\r\n")
            self._deadline = INFINITY
        else:
            self._deadline = self._clock.seconds() + self._settings.client_body_timeout
        self._bout = bout
        self._rstate = _R_HEAD
        conn = self._pool.get(route.backend, self)
        if conn is None:
            self._connecting = True
            self._pause(_PAUSE_CONNECT)
        else:
            self._attach(conn, pooled=True)

    def _attach(self, conn: BackendConnection, *, pooled: bool) -> None:
        """Start using a backend connection for the current request.

        ``pooled``: it was idle in the pool, so the backend may be closing it.
        """
        r = self._current
        assert r is not None
        self._connecting = False
        self._backend = conn
        conn.owner = self
        self._backend_reused = pooled
        self._raw_head = bytearray() if r.method == b"HEAD" else None
        if self._client_write_blocked:
            conn.pause_reading()
        if conn.write_paused:
            self._pause(_PAUSE_BACKEND)
            if not self._client_write_blocked:
                conn.deadline = self._clock.seconds() + self._settings.backend_read_timeout
        if not self._in_read:
            # Inside dataReceived the head waits for the body bytes of the same read.
            bout, self._bout = self._bout, []
            conn.write_sequence(bout)
        if r.complete:
            if not self._client_write_blocked:
                conn.deadline = self._clock.seconds() + self._settings.backend_read_timeout
        elif r.expect_continue and r.body_bytes == 0:
            r.continued = True
            self._t.write(_CONTINUE)
        self._resume(_PAUSE_CONNECT)

    def _next(self) -> None:
        """The current exchange is over: serve queued requests, or wait for one."""
        if self._in_next:
            return
        self._in_next = True
        try:
            while self._current is None and self._pipeline and not self._closing:
                self._start(self._pipeline.popleft())
        finally:
            self._in_next = False
        if self._closing:
            return
        r = self._current
        if r is None:
            if self._parsing is not None:
                self._deadline = self._clock.seconds() + self._settings.client_header_timeout
            elif self._stopped:
                self._close()
                return
            else:
                self._deadline = self._clock.seconds() + self._settings.keepalive_timeout
            self._resume(_PAUSE_PIPELINE)
        elif not r.complete:
            self._resume(_PAUSE_PIPELINE)

    def _finish_exchange(self, close: bool) -> None:
        """The response to the current request is complete (written or queued)."""
        r = self._current
        if r is not None and self._factory.on_request is not None:
            self._report(r)
        self._rstate = _R_IDLE
        if close or r is None:
            self._current = None
            self._close()
            return
        if not r.complete:
            r.answered = True  # read and drop the rest of its body, then go on
            return
        self._current = None
        self._next()

    def _local_response(
        self, status: int, reason: str, *, close: bool = False, quiet: bool = False
    ) -> None:
        """Answer the current request with a small error page of our own."""
        r = self._current
        close = (
            close
            or r is None
            or not r.keep_alive
            or not r.http11
            or r.websocket
            or not r.drainable()
        )
        head_only = r is not None and r.method == b"HEAD"
        if not quiet:
            log.info(
                "{client}: {status} {reason}", client=self._client, status=status, reason=reason
            )
        self._cout = []
        self._rstatus = status
        self._rsent = 0 if head_only else len(str(status)) + len(_PHRASES.get(status, "Error")) + 2
        route = r.route if r is not None else None
        policy = route.headers if route is not None else self._factory.unrouted_headers
        self._t.write(_error_bytes(status, close, head_only, policy.set_bytes))
        self._finish_exchange(close)

    def _close(self) -> None:
        """Send what is pending, then close the client connection."""
        if self._closing:
            return
        self._closing = True
        self._stopped = True
        self._pause(_PAUSE_DONE)
        cout, self._cout = self._cout, []
        if cout:
            self._t.writeSequence(cout)
        backend, self._backend = self._backend, None
        if backend is not None:
            self._pool.discard(backend, abort=not self._splicing)
        if self._connecting:
            self._connecting = False
            self._pool.cancel(self)
        # A TLS transport only shuts down once no producer is registered.
        self._t.unregisterProducer()
        self._t.loseConnection()
        # Twisted's TLS layer closes the socket only once it has read the
        # client's close_notify or EOF: keep reading (dataReceived discards
        # what comes after _stopped), bounded by the deadline below.
        self._t.resumeProducing()
        self._deadline = self._clock.seconds() + self._settings.client_send_timeout

    # ------------------------------------------------------- parse failures

    def _parse_failed(self, exc: HttpParserError, data: bytes) -> None:
        cause = exc.__context__ if isinstance(exc, HttpParserCallbackError) else None
        if isinstance(cause, _Reject):
            self._reject_parsing(cause.status, cause.reason)
        elif cause is not None:
            log.failure(
                "{client}: internal error while parsing a request",
                Failure(cause),
                client=self._client,
            )
            self._reject_parsing(500, "internal error")
        elif self._stopped and self._parsing is None:
            pass  # bytes after a "Connection: close" request: ignored
        elif isinstance(exc, HttpParserInvalidMethodError) and _METHOD.match(data):
            self._reject_parsing(501, "unknown method")
        elif str(exc).startswith(("Invalid HTTP version", "Pause on PRI")):
            self._reject_parsing(505, f"unsupported HTTP version: {exc}")
        else:
            self._reject_parsing(400, f"malformed request: {exc}")

    def _reject_parsing(self, status: int, reason: str) -> None:
        """The bytes from the client cannot be parsed further: answer in turn, then close."""
        self._stopped = True
        r = self._parsing
        self._parsing = None
        if r is None:
            r = _Request()
        r.error = (status, reason)
        if r is self._current:
            if r.answered:
                self._close()  # already answered; its dropped body is broken
            else:
                # The body of the request being forwarded is broken.
                self._fail_exchange(status, reason, client_fault=True)
        elif not r.head_done:
            if self._current is None:
                self._start(r)
            else:
                self._pipeline.append(r)
        # else: queued already; its error is answered when its turn comes.

    def _data_after_stop(self, data: bytes) -> None:
        """Bytes from the client once HTTP parsing has stopped."""
        r = self._last
        if r is not None and r.early is not None:
            r.early.append(data)
            r.body_bytes += len(data)
            if r.body_bytes > _EARLY_LIMIT:
                log.info(
                    "{client}: too much data before the WebSocket handshake completed",
                    client=self._client,
                )
                self._abort()

    def _client_upgrade(self, data: bytes, offset: int) -> bytes:
        """The parser stopped after an upgrade request; return bytes still to parse."""
        r = self._last
        if r is not None and r.websocket and r.error is None:
            # Bytes after the handshake belong to the new protocol: hold them
            # until the backend accepts.
            self._stopped = True
            rest = data[offset:]
            r.early = [rest] if rest else []
            r.body_bytes = len(rest)
            self._pause(_PAUSE_UPGRADE)
            return b""
        return data[offset:]

    # ----------------------------------------------- BackendUser (upstream)

    def backend_connected(self, conn: BackendConnection) -> None:
        """The pool made the connection we asked for."""
        self._attach(conn, pooled=False)

    def backend_connect_failed(self, reason: Failure) -> None:
        """The pool could not connect: 504 on timeout, 502 otherwise."""
        self._connecting = False
        self._bout = []
        exc = reason.value
        if isinstance(exc, error.TimeoutError):
            status, why = 504, "connection timed out"
        elif isinstance(exc, error.ConnectionRefusedError):
            status, why = 502, "connection refused"
        elif isinstance(exc, error.DNSLookupError):
            status, why = 502, "DNS lookup failed"
        elif isinstance(exc, UnsupportedBackend):
            status, why = 502, str(exc)
        else:
            status, why = 502, f"cannot connect ({exc.__class__.__name__}: {exc})"
        self._resume(_PAUSE_CONNECT)
        self._fail_exchange(status, why)

    def backend_data(self, data: bytes) -> None:
        """Bytes from the backend: parse the response and relay it."""
        if self._splicing:
            self._t.write(data)
            return
        self._rany = True
        try:
            if self._raw_head is not None:
                self._head_response(data)
            else:
                self._rparser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._backend_upgraded(data[int(exc.args[0]) :])
            return
        except _Reject as exc:
            self._fail_exchange(502, exc.reason)
            return
        except HttpParserError as exc:
            if self._rstate != _R_DONE:
                cause = exc.__context__ if isinstance(exc, HttpParserCallbackError) else None
                if isinstance(cause, _Reject):
                    why = cause.reason
                elif cause is not None:
                    log.failure("internal error relaying a response", Failure(cause))
                    why = "internal error"
                else:
                    why = f"invalid response: {exc}"
                self._fail_exchange(502, why)
                return
            self._rextra = True  # bytes after a complete response
        cout = self._cout
        if cout:
            self._cout = []
            self._t.writeSequence(cout)
        state = self._rstate
        if state == _R_DONE:
            self._response_done()
            return
        if state == _R_HEAD:
            self._rhead_raw += len(data)
            if self._rhead_raw > self._settings.max_response_header_bytes + _FRAMING_SLACK:
                self._fail_exchange(502, "response head too large")
                return
        elif self._rchunked:
            if self._rbody_seen:
                self._rbody_seen = False
                self._rraw_idle = 0
            else:
                self._rraw_idle += len(data)
                if self._rraw_idle > self._settings.max_response_header_bytes + _FRAMING_SLACK:
                    self._fail_exchange(502, "chunk framing or trailers too large")
                    return
        backend = self._backend
        current = self._current
        if (
            backend is not None
            and current is not None
            and current.complete
            and not self._client_write_blocked
        ):
            backend.deadline = self._clock.seconds() + self._settings.backend_read_timeout

    def backend_lost(self, reason: Failure) -> None:
        """The backend closed the connection we were using."""
        self._backend = None
        if self._splicing:
            self._close()
            return
        r = self._current
        if r is None:
            return
        state = self._rstate
        if state == _R_BODY and self._r_until_close:
            # A close-delimited body ends here.
            if self._rframe == _F_CHUNKED:
                self._cout.append(b"0\r\n\r\n")
            cout, self._cout = self._cout, []
            if cout:
                self._t.writeSequence(cout)
            self._rstate = _R_DONE
            self._rparser = HttpResponseParser(self._rcb)  # it still waits for the end
            self._resume(_PAUSE_BACKEND)
            self._finish_exchange(self._close_after)
            return
        if state == _R_HEAD and self._retryable(r):
            r.retried = True
            route = r.route
            assert route is not None
            log.info(
                "{site}: upstream {upstream} closed a reused connection; retrying {method}",
                site=route.site,
                upstream=describe(route.backend),
                method=r.method.decode("ascii", "replace"),
            )
            self._bout = [r.backend_head]
            self._connecting = True
            self._pause(_PAUSE_CONNECT)
            self._resume(_PAUSE_BACKEND)  # that was the lost connection's buffer
            self._pool.connect(route.backend, self)
            return
        if state == _R_BODY:
            self._fail_exchange(502, "upstream closed the connection mid-response")
        else:
            self._fail_exchange(502, "upstream closed the connection without a response")

    def backend_write_paused(self) -> None:
        """The backend's send buffer is full (or its TLS handshake pending): stop
        reading from the client, and give the backend ``backend_read_timeout`` to
        take the bytes (the client's deadline is suspended meanwhile)."""
        self._pause(_PAUSE_BACKEND)
        backend = self._backend
        if backend is not None and not self._client_write_blocked:
            backend.deadline = self._clock.seconds() + self._settings.backend_read_timeout

    def backend_write_resumed(self) -> None:
        """The backend's send buffer drained: read from the client again."""
        current = self._current
        backend = self._backend
        if backend is not None and current is not None and not current.complete:
            backend.deadline = INFINITY  # the client's body deadline applies again
        self._resume(_PAUSE_BACKEND)

    def backend_timed_out(self) -> None:
        """No response bytes within ``backend_read_timeout``."""
        if self._rstate == _R_HEAD:
            self._fail_exchange(504, "upstream response timed out")
        else:
            self._fail_exchange(504, "upstream stalled mid-response")

    def _retryable(self, r: _Request) -> bool:
        return (
            self._backend_reused
            and not self._rany
            and not r.retried
            and r.complete
            and not r.chunked
            and not r.length
            and r.method in _IDEMPOTENT
        )

    def _fail_exchange(self, status: int, why: str, *, client_fault: bool = False) -> None:
        """The current exchange cannot complete: answer ``status``, or cut the response short."""
        backend, self._backend = self._backend, None
        if backend is not None:
            self._pool.discard(backend)
        if self._connecting:
            self._connecting = False
            self._pool.cancel(self)
        if self._rany:
            self._rparser = HttpResponseParser(self._rcb)  # it may be mid-message
        self._raw_head = None
        self._resume(_PAUSE_CONNECT | _PAUSE_BACKEND)
        if not client_fault:
            self._log_failure(why, status)
        if self._rstate in (_R_IDLE, _R_HEAD):
            self._local_response(status, why, close=client_fault, quiet=not client_fault)
        else:
            # Part of the response is out: the client must see it cut short.
            if self._current is not None and self._factory.on_request is not None:
                self._report(self._current)
            self._close()

    def _log_failure(self, why: str, status: int | None = None) -> None:
        r = self._current
        route = r.route if r is not None else None
        log.warn(
            "{site}: {client} {method} {target}: upstream {upstream}: {reason} ({outcome})",
            site=route.site if route is not None else "-",
            client=self._client,
            method=r.method.decode("ascii", "replace") if r is not None else "-",
            target=r.target.decode("ascii", "replace") if r is not None else "-",
            upstream=describe(route.backend) if route is not None else "-",
            reason=why,
            status=status,
            outcome=f"answered {status}"
            if status is not None and self._rstate in (_R_IDLE, _R_HEAD)
            else "connection closed",
        )

    # ------------------------------------------------ response parser callbacks

    def _r_begin(self) -> None:
        if self._rstate == _R_DONE:
            self._rextra = True
            raise _Reject(502, "data after the response")
        self._rreason = b""

    def _r_status(self, reason: bytes) -> None:
        self._rreason += reason

    def _r_header(self, name: bytes, value: bytes) -> None:
        # Size limits: checked at the end of the head, and by backend_data's backstops.
        self._rheaders.append((name, value))

    def _r_headers_complete(self) -> None:
        parser = self._rparser
        status = parser.get_status_code()
        r = self._current
        assert r is not None
        headers = self._rheaders
        self._rheaders = []
        route = r.route
        policy = route.headers if route is not None else None
        # The site's headers replace the backend's on final responses.
        remove = policy.remove if policy is not None and status >= 200 else _NO_NAMES
        if headers == self._rscan_key and remove is self._rscan_remove:
            # A backend usually repeats its header fields on a keep-alive connection.
            scan = self._rscan
        else:
            scan = forwarding.scan_response_headers(headers, remove)
            if scan.size <= _REMEMBER_HEAD:
                self._rscan_key, self._rscan_remove, self._rscan = headers, remove, scan
        if scan.size > self._settings.max_response_header_bytes:
            raise _Reject(502, "response head too large")
        if status < 200:
            reason = self._rreason.translate(None, _REASON_DELETE)
            if status == 101:
                if not r.websocket:
                    raise _Reject(502, "unexpected 101 Switching Protocols")
                self._rstate = _R_UPGRADE
                self._cout.append(
                    b"HTTP/1.1 101 %s\r\n%sConnection: Upgrade\r\nUpgrade: %s\r\n\r\n"
                    % (reason, forwarding.serialize(scan.forward), scan.upgrade or b"")
                )
                return
            self._rinterim = True
            if status == 103 and r.http11:
                self._cout.append(
                    b"HTTP/1.1 103 Early Hints\r\n" + forwarding.serialize(scan.forward) + b"\r\n"
                )
            return
        if status > 599:
            raise _Reject(502, f"invalid status {status}")
        if scan.problem is not None:
            raise _Reject(502, scan.problem)
        self._rstatus = status
        self._r_until_close = False
        no_length = False
        if r.method == b"HEAD" or status == 204 or status == 304:
            frame = _F_NONE
            if scan.content_length or scan.chunked:
                # A body may follow anyway (non-compliant backend): never reuse
                # the connection, or it would answer the next request.
                self._rextra = True
                no_length = status == 204
        elif scan.content_length is not None:
            frame = _F_LENGTH
        else:
            self._r_until_close = not scan.chunked
            frame = _F_CHUNKED if r.http11 else _F_CLOSE
        keep = (
            r.keep_alive and frame != _F_CLOSE and not r.websocket and (r.complete or r.drainable())
        )
        self._close_after = not keep
        self._rclose_token = scan.close
        if (
            scan is self._rfields_scan
            and policy is self._rfields_policy
            and no_length == self._rfields_no_length
        ):
            fields = self._rfields
        else:
            forward = scan.forward
            if no_length:
                forward = [(n, v) for n, v in forward if n.lower() != b"content-length"]
            fields = forwarding.serialize(forward)
            if policy is not None:
                fields += policy.set_bytes
            if len(fields) <= 2 * _REMEMBER_HEAD:
                self._rfields_scan, self._rfields_policy = scan, policy
                self._rfields_no_length, self._rfields = no_length, fields
        raw_reason = self._rreason
        if status == self._rline_status and raw_reason == self._rline_reason:
            line = self._rline
        else:
            reason = raw_reason.translate(None, _REASON_DELETE)
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            self._rline_status, self._rline_reason, self._rline = status, raw_reason, line
        if frame == _F_CHUNKED:
            fields += b"Transfer-Encoding: chunked\r\n"
        if not keep:
            end = b"Connection: close\r\n\r\n"
        elif not r.http11:
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        self._cout.append(line + fields + end)
        self._rframe = frame
        self._rstate = _R_BODY
        self._rheaders = self._rtrailers  # trailer fields land here and are dropped
        self._rchunked = scan.chunked
        self._rraw_idle = 0

    def _r_body(self, data: bytes) -> None:
        self._rbody_seen = True
        if self._rstate != _R_BODY:
            return
        self._rsent += len(data)
        if self._rframe == _F_CHUNKED:
            self._cout += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._cout.append(data)

    def _r_complete(self) -> None:
        if self._rinterim:
            self._rinterim = False
            return
        if self._rstate != _R_BODY:
            return
        self._rstate = _R_DONE
        self._rtrailers.clear()
        if self._rframe == _F_CHUNKED:
            self._cout.append(b"0\r\n\r\n")
        self._rkeep = self._rparser.should_keep_alive()

    def _head_response(self, data: bytes) -> None:
        """Parse the response to a HEAD request, which has no body whatever its headers say.

        ``httptools`` cannot be told a response has no body, so the head is cut
        out at its blank line and fed alone; the parser, now expecting a body
        that will not come, is replaced.
        """
        buf = self._raw_head
        assert buf is not None
        buf += data
        while self._rstate == _R_HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._settings.max_response_header_bytes:
                    raise _Reject(502, "response head too large")
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._rparser.feed_data(head)
        if self._rstate == _R_BODY:
            # The parser now waits for a body that will not come: replace it.
            self._rstate = _R_DONE
            self._rkeep = not self._rclose_token and self._rparser.get_http_version() == "1.1"
            self._rparser = HttpResponseParser(self._rcb)
        self._raw_head = None
        if buf:
            self._rextra = True

    def _response_done(self) -> None:
        """The backend's response is complete: return or drop its connection, go on."""
        backend, self._backend = self._backend, None
        r = self._current
        assert r is not None
        reusable = self._rkeep and r.complete and not self._rextra and not r.websocket
        if not reusable:
            # A parser that saw the end of a non-persistent response refuses any
            # further message: the next backend connection needs a fresh one.
            self._rparser = HttpResponseParser(self._rcb)
        if backend is not None:
            if reusable:
                self._pool.release(backend)
            else:
                self._pool.discard(backend, abort=not self._rkeep)
        self._resume(_PAUSE_BACKEND)
        self._finish_exchange(self._close_after)

    def _backend_upgraded(self, rest: bytes) -> None:
        """The backend accepted a WebSocket upgrade: splice both connections."""
        r = self._current
        backend = self._backend
        assert r is not None and backend is not None
        cout, self._cout = self._cout, []
        if rest:
            cout.append(rest)
        if cout:
            self._t.writeSequence(cout)
        self._splicing = True
        self._stopped = True
        self._deadline = INFINITY
        if self._factory.on_request is not None:
            self._rstatus = 101
            self._report(r)
        backend.deadline = INFINITY
        if r.early:
            backend.write_sequence(r.early)
        r.early = None
        self._resume(_PAUSE_UPGRADE)

    # --------------------------------------------------------------- helpers

    def _pause(self, bit: int) -> None:
        if not self._paused:
            self._t.pauseProducing()
        self._paused |= bit

    def _resume(self, bits: int) -> None:
        paused = self._paused
        if paused & bits:
            self._paused = paused = paused & ~bits
            if not paused:
                self._t.resumeProducing()
                r = self._current
                if r is not None and r.head_done and not r.complete:
                    self._deadline = self._clock.seconds() + self._settings.client_body_timeout

    def _abort(self) -> None:
        self._closing = True
        self._stopped = True
        backend, self._backend = self._backend, None
        if backend is not None:
            self._pool.discard(backend)
        self._t.unregisterProducer()
        self._t.abortConnection()

    def _report(self, r: _Request) -> None:
        """Hand the finished exchange's facts to the factory's ``on_request``."""
        tls = self._tls
        if tls is None:
            handle: Any = getattr(self._t, "getHandle", lambda: None)()
            version = getattr(handle, "get_protocol_version_name", None)
            cipher = getattr(handle, "get_cipher_name", None)
            try:
                tls = (version() if version else None, cipher() if cipher else None)
            except Exception:
                tls = (None, None)
            self._tls = tls
        forward = r.forward
        if forward is self._report_forward:
            referer, agent = self._report_fields
        else:
            referer = agent = None
            for name, value in forward:
                if len(name) == 7 and name.lower() == b"referer":
                    referer = value
                elif len(name) == 10 and name.lower() == b"user-agent":
                    agent = value
            if forward is self._fields_forward:  # remembered anyway (small)
                self._report_forward, self._report_fields = forward, (referer, agent)
        route = r.route
        if route is None:
            upstream = site = None
        elif route is self._report_route:
            upstream, site = self._report_upstream, route.site
        else:
            upstream, site = describe(route.backend), route.site
            self._report_route, self._report_upstream = route, upstream
        now = self._clock.seconds()
        factory = self._factory
        on_request = factory.on_request
        assert on_request is not None
        try:
            on_request(
                Entry(
                    self._started,
                    self._client,
                    r.method or b"-",
                    r.target or b"-",
                    "HTTP/1.1" if r.http11 else "HTTP/1.0",
                    r.host,
                    self._rstatus,
                    self._rsent,
                    now - self._started,
                    referer,
                    site,
                    agent,
                    self._server_name(),
                    tls[0],
                    tls[1],
                    upstream,
                )
            )
        except Exception:
            # An access-log or metrics error must never break serving (or the sweep).
            if not factory._on_request_failed:
                factory._on_request_failed = True
                log.failure("on_request failed (reported once)")

    def drain(self) -> None:
        """Shutting down: close now if no request is being served (idle, or its
        head still arriving), else once the current request is answered.

        Called again and again by :meth:`ProxyFactory.drain` until the
        connection is gone, so a request body still arriving is read first.
        """
        if self._closing or self._splicing:
            return
        r = self._current
        if r is None:
            self._close()
        elif r.complete and self._parsing is None:
            self._stopped = True  # _next closes the connection after the pipeline

    def _client_identity(self, auth: ClientAuth) -> bytes | None:
        """The identity headers for a request to a site with ``auth``, or None.

        None means the connection may not reach the site: it has no verified
        certificate and the site requires one, or it resumed a session whose
        certificate the site does not accept (`clientauth.verified_peer`); a
        site with ``mode: optional`` gets empty headers without a certificate.  Computed once per
        connection: the peer certificate cannot change (no renegotiation).
        """
        cached = self._identity
        if cached is not None and cached[0] is auth:
            return cached[1]
        try:
            handle = self._t.getHandle()  # type: ignore[attr-defined]
        except Exception:
            handle = None
        peer = clientauth.verified_peer(handle)
        block: bytes | None
        if peer == clientauth.REJECTED:
            block = None
        elif isinstance(peer, tuple) and peer[0] is not None:
            block = clientauth.identity_block(auth, peer[0], peer[1])
        else:
            block = None if auth.mode == "required" else b""
        self._identity = (auth, block)
        return block

    def _server_name(self) -> str | None:
        """The TLS SNI name the client sent, if any (read once, after the handshake)."""
        sni = self._sni
        if sni is _UNSET:
            sni = None
            try:
                name = self._t.getHandle().get_servername()  # type: ignore[attr-defined]
            except Exception:
                name = None
            if isinstance(name, bytes):
                try:
                    sni = name.decode("ascii")
                except UnicodeDecodeError:
                    sni = None
            self._sni = sni
        return cast("str | None", sni)

    def check_deadlines(self, now: float) -> None:
        """Called by the factory's sweep: act on any deadline that has passed."""
        if self._closing:
            if self._deadline <= now:
                self._deadline = INFINITY
                self._t.abortConnection()
            return
        if self._write_blocked_since + self._settings.client_send_timeout <= now:
            log.info("{client}: not reading our response; dropped", client=self._client)
            if self._current is not None:
                self._log_failure("client stopped reading")
            self._abort()
            return
        if self._deadline <= now and not self._paused & (
            _PAUSE_BACKEND | _PAUSE_CONNECT | _PAUSE_CLIENT
        ):
            self._deadline = INFINITY
            r = self._current
            if r is not None and not r.complete:
                if r.answered:
                    self._close()
                else:
                    self._fail_exchange(408, "request body timed out", client_fault=True)
            elif self._parsing is not None:
                r = self._parsing
                self._parsing = None
                self._stopped = True
                if self._current is None:
                    r.error = (408, "request head timed out")
                    self._start(r)
                else:
                    self._close()
            elif self._current is None:
                self._close()  # idle keep-alive connection


def _origin_form(target: bytes, host: bytes) -> bytes:
    """The origin-form of an absolute-form target whose authority matches ``Host``."""
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        raise _Reject(400, "invalid request target")
    authority, rest = match.group(1), match.group(2)
    if authority.lower() != host.lower():
        raise _Reject(400, "request target does not match Host")
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


class ProxyFactory(Factory):
    """Builds the proxy protocol for every client connection of one listener.

    Wire it as::

        settings = ProxySettings(...)  # or ProxySettings() for the defaults
        pools = UpstreamPools(reactor, settings)
        factory = ProxyFactory(router=router, pools=pools, clock=reactor, settings=settings)
        # wrap in tlsconn.TLSServerFactory and listen; on shutdown: pools.close()

    ``router.table(sni, host)`` returns the routes of a request's site (see
    :class:`Router`); on a configuration reload assign a new one to
    ``factory.router``: the next request on every connection uses it
    (connections remember only the last site the same router object found),
    ``pools`` is the shared :class:`~tlsproxy.upstream.UpstreamPools` (give it
    the same settings: it applies the ``backend_*`` ones), ``clock``
    provides ``IReactorTime`` (the reactor), ``settings`` the timeouts and
    limits.  ``scheme`` is what ``X-Forwarded-Proto`` and ``Forwarded:
    proto=`` report (``https`` behind the TLS layer).
    """

    noisy = False

    def __init__(
        self,
        router: Router,
        pools: UpstreamPools,
        clock: Any,
        settings: ProxySettings | None = None,
        *,
        scheme: str = "https",
        unrouted_headers: HeaderPolicy | None = None,
    ) -> None:
        self.router = router
        self.unrouted_headers = unrouted_headers if unrouted_headers is not None else HeaderPolicy()
        self.pools = pools
        self.clock = clock
        self.settings = settings if settings is not None else ProxySettings()
        self.scheme = scheme
        self._connections: set[ProxyProtocol] = set()
        self._sweeper: LoopingCall | None = None
        self._on_request_failed = False
        #: Called with an :class:`~tlsproxy.accesslog.Entry` as each response
        #: completes (access log, metrics); None costs nothing per request.
        self.on_request: Callable[[Entry], object] | None = None
        #: Called once per TLS connection (``scheme == "https"``): with None when
        #: the handshake succeeds, else with `handshake_failure_reason` (metrics).
        self.on_tls: Callable[[str | None], object] | None = None

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocol:
        return ProxyProtocol(self)

    def connection_count(self) -> int:
        """Number of open client connections."""
        return len(self._connections)

    def drain(self) -> int:
        """Shutting down: close every connection once its current request is
        answered (idle ones now).  Call it repeatedly; return how many remain."""
        for proto in list(self._connections):
            proto.drain()
        return len(self._connections)

    def abort_all(self) -> None:
        """Drop every client connection now (the drain timeout has passed)."""
        for proto in list(self._connections):
            proto._abort()

    def _track(self, proto: ProxyProtocol) -> None:
        self._connections.add(proto)
        if self._sweeper is None:
            sweeper = LoopingCall(self._sweep)
            sweeper.clock = self.clock
            sweeper.start(self.settings.sweep_interval, now=False)
            self._sweeper = sweeper

    def _untrack(self, proto: ProxyProtocol) -> None:
        self._connections.discard(proto)
        if not self._connections and self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            if sweeper.running:
                sweeper.stop()

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for proto in list(self._connections):
            try:
                proto.check_deadlines(now)
            except Exception:
                # One connection's bug must not stop the sweep (every deadline).
                log.failure("checking a connection's deadlines")
                with contextlib.suppress(Exception):
                    proto._abort()
