"""Limits, deadlines, failures and request-smuggling shapes, byte by byte through the real
``twistd tlsproxy`` over TLS.

One tlsproxy process (small configured limits and one-second deadlines, so these
tests stay fast) fronts a `CapturingBackend` that records every byte it
receives.  Each test checks what the client got *and* what reached the backend:
for a refused request, nothing at all.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests import pki
from tests.e2e.harness import TlsproxyProcess, free_port, start_tlsproxy
from tests.e2e.rawbackend import (
    CapturingBackend,
    read_response,
    read_until_closed,
    tls_client,
    wait_for,
)
from tests.test_proxy_strict import BAD_REQUESTS

pytestmark = pytest.mark.e2e

H = b"Host: example.com\r\n"
LIMITS = {
    "client_header_timeout": 1,
    "client_body_timeout": 1,
    "keepalive_timeout": 1,
    "backend_read_timeout": 1,
    "backend_connect_timeout": 1,
    "client_send_timeout": 1,
    "max_request_line": "1K",
    "max_header_bytes": "2K",
    "max_header_count": 20,
    "max_body_bytes": "4K",
    "sweep_interval": 0.1,
}


@attrs.frozen
class Setup:
    proxy: TlsproxyProcess
    backend: CapturingBackend
    ca_file: Path
    down_port: int

    def connect(self, **kwargs: object) -> ssl.SSLSocket:
        return tls_client(self.proxy.https_port, self.ca_file, "example.com", **kwargs)  # type: ignore[arg-type]

    def exchange(self, raw: bytes) -> bytes:
        """Send ``raw`` on a new connection; everything received until the proxy closes."""
        with self.connect() as sock:
            sock.sendall(raw)
            return read_until_closed(sock)


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full, so new connections to it hang
    (the kernel drops their SYNs): a backend that cannot be connected to in time."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("socket-e2e")
    backend = CapturingBackend()
    ca = pki.make_ca()
    cert = pki.write_combined(tmp, ca.issue(["example.com"]), name="site.pem")
    down_port = free_port()
    hole, fillers = blackhole()
    config = {
        "proxy": LIMITS,
        "hosts": {
            "example.com": {
                "certificates": [str(cert)],
                "backend": backend.url,
                "routes": [
                    {"path": "/down/", "backend": f"http://127.0.0.1:{down_port}"},
                    {"path": "/hole/", "backend": f"http://127.0.0.1:{hole.getsockname()[1]}"},
                ],
            }
        },
    }
    proxy = start_tlsproxy(config, tmp)
    try:
        yield Setup(proxy, backend, pki.write_ca_file(tmp, ca), down_port)
    finally:
        proxy.stop()
        backend.close()
        for sock in [hole, *fillers]:
            sock.close()


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12])


def assert_nothing_forwarded(setup: Setup, before: list[int]) -> None:
    """No byte of the refused request reached the backend.

    A marker request on a fresh connection, answered by the backend, proves the
    proxy is past the refused one; the backend must have received only the marker.
    """
    with setup.connect() as sock:
        sock.sendall(b"GET /marker HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
        _, body = read_response(sock)
    assert body == b"ok /marker"
    [data] = setup.backend.since(before)
    assert data.startswith(b"GET /marker HTTP/1.1\r\n"), data[:300]
    assert data.count(b"\r\n\r\n") == 1 and data.endswith(b"\r\n\r\n"), data


@pytest.mark.parametrize("raw,status", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_smuggling_shape_is_refused_over_tls(setup: Setup, raw: bytes, status: int) -> None:
    """Each malformed or ambiguous request sent over TLS gets its error status and a
    closed connection, and not one byte of it reaches the backend."""
    before = setup.backend.snapshot()
    answer = setup.exchange(raw)
    assert status_of(answer) == status
    assert b"\r\nConnection: close\r\n" in answer
    assert_nothing_forwarded(setup, before)


def test_good_request_reaches_backend(setup: Setup) -> None:
    """A well-formed request is forwarded once, with our forwarding headers."""
    before = setup.backend.snapshot()
    answer = setup.exchange(b"GET /hello HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert status_of(answer) == 200 and answer.endswith(b"ok /hello")
    [seen] = setup.backend.since(before)
    assert seen.startswith(b"GET /hello HTTP/1.1\r\n")
    assert b"\r\nX-Forwarded-Proto: https\r\n" in seen
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in seen


def test_unknown_host_is_421_and_not_forwarded(setup: Setup) -> None:
    """A Host no site claims gets 421 even on a connection whose SNI named a real
    site; no backend sees it."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
        head, _ = read_response(sock)
    assert status_of(head) == 421
    assert_nothing_forwarded(setup, before)


# ------------------------------------------------------------------------ limits


def test_long_request_line_is_414(setup: Setup) -> None:
    """A request target over max_request_line (1K here) gets 414; nothing is forwarded."""
    before = setup.backend.snapshot()
    answer = setup.exchange(b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert status_of(answer) == 414
    assert_nothing_forwarded(setup, before)


def test_large_header_is_431(setup: Setup) -> None:
    """Header fields over max_header_bytes (2K here) get 431; nothing is forwarded."""
    before = setup.backend.snapshot()
    answer = setup.exchange(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 2100 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert_nothing_forwarded(setup, before)


def test_too_many_headers_is_431(setup: Setup) -> None:
    """More than max_header_count (20 here) fields get 431; nothing is forwarded."""
    before = setup.backend.snapshot()
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(21))
    answer = setup.exchange(b"GET / HTTP/1.1\r\n" + H + fields + b"\r\n")
    assert status_of(answer) == 431
    assert_nothing_forwarded(setup, before)


def test_announced_large_body_is_413_before_continue(setup: Setup) -> None:
    """A Content-Length over max_body_bytes (4K here) with Expect: 100-continue gets 413
    at once, never 100 Continue, and the backend sees nothing."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = read_until_closed(sock)
    assert status_of(answer) == 413
    assert b"100 Continue" not in answer
    assert_nothing_forwarded(setup, before)


def test_chunked_body_over_limit_is_413_and_never_completes(setup: Setup) -> None:
    """A chunked upload that grows past max_body_bytes gets 413; the backend, which was
    already streaming it, loses its connection without a complete request."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")
        wait_for(lambda: b"x" * 0x800 in b"".join(setup.backend.since(before)))
        sock.sendall(b"800\r\n" + b"y" * 0x800 + b"\r\n")
        sock.sendall(b"800\r\n" + b"z" * 0x800 + b"\r\n0\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 413
    [(conn, seen)] = setup.backend.touched(before)
    assert seen.startswith(b"POST /up HTTP/1.1\r\n")
    wait_for(conn.closed.is_set)
    [(_, seen)] = setup.backend.touched(before)
    assert b"0\r\n\r\n" not in seen and b"z" * 16 not in seen


def test_body_at_the_limit_is_forwarded(setup: Setup) -> None:
    """A body of exactly max_body_bytes passes whole."""
    body = b"q" * 4096
    answer = setup.exchange(
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 4096\r\nConnection: close\r\n\r\n" + body
    )
    assert status_of(answer) == 200 and answer.endswith(body)


# --------------------------------------------------------------------- deadlines


def test_silent_connection_is_closed(setup: Setup) -> None:
    """A TLS connection that sends no request is closed after client_header_timeout."""
    with setup.connect() as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.8 <= time.monotonic() - start <= 5


def test_slowloris_head_is_cut_off(setup: Setup) -> None:
    """A request head trickled slowly is cut off client_header_timeout after it began,
    though bytes keep arriving: 408, closed, nothing forwarded."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n" + H)
        answer = b""
        for _ in range(40):
            try:
                sock.sendall(b"X: y\r\n")
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        sock.settimeout(5)
        answer += read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert status_of(answer) == 408
    assert 0.8 <= elapsed <= 5
    assert_nothing_forwarded(setup, before)


def test_idle_keep_alive_connection_is_closed(setup: Setup) -> None:
    """A keep-alive connection left idle after a response is closed after keepalive_timeout."""
    with setup.connect() as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
        _, body = read_response(sock)
        assert body == b"ok /a"
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.8 <= time.monotonic() - start <= 5


def test_stalled_body_is_408_and_backend_request_dropped(setup: Setup) -> None:
    """An upload that stops mid-body gets 408 after client_body_timeout; the backend
    connection that was receiving it is closed, its request never complete."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n0123456789")
        start = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert status_of(answer) == 408
    assert 0.8 <= elapsed <= 5
    [(conn, seen)] = setup.backend.touched(before)
    wait_for(conn.closed.is_set)
    assert seen.startswith(b"POST /echo HTTP/1.1\r\n") and seen.endswith(b"\r\n\r\n0123456789")


# ---------------------------------------------------------------------- failures


def test_backend_refused_is_502_and_logged(setup: Setup) -> None:
    """A route whose backend refuses connections answers 502; the log names the host,
    the upstream and the reason."""
    answer = setup.exchange(b"GET /down/x HTTP/1.1\r\n" + H + b"\r\n")
    assert status_of(answer) == 502
    assert b"127.0.0.1" not in answer.partition(b"\r\n\r\n")[2]  # no internals
    wait_for(lambda: "connection refused" in setup.proxy.log)
    line = next(x for x in setup.proxy.log.splitlines() if "connection refused" in x)
    assert "example.com" in line and f"127.0.0.1:{setup.down_port}" in line


def test_backend_connect_timeout_is_504(setup: Setup) -> None:
    """A backend that cannot be connected to within backend_connect_timeout (1 s here)
    gets the client a 504."""
    start = time.monotonic()
    answer = setup.exchange(b"GET /hole/x HTTP/1.1\r\n" + H + b"\r\n")
    assert status_of(answer) == 504
    assert 0.8 <= time.monotonic() - start <= 5


def test_slow_backend_is_504(setup: Setup) -> None:
    """A backend that does not answer within backend_read_timeout gets the client a 504."""
    start = time.monotonic()
    answer = setup.exchange(b"GET /slow HTTP/1.1\r\n" + H + b"\r\n")
    assert status_of(answer) == 504
    assert 0.8 <= time.monotonic() - start <= 5


def test_garbage_from_backend_is_502(setup: Setup) -> None:
    """A backend answering something that is not HTTP gets the client a 502."""
    assert status_of(setup.exchange(b"GET /garbage HTTP/1.1\r\n" + H + b"\r\n")) == 502


def test_backend_closing_without_response_is_502(setup: Setup) -> None:
    """A backend closing the connection without answering gets the client a 502."""
    assert status_of(setup.exchange(b"GET /close HTTP/1.1\r\n" + H + b"\r\n")) == 502


def test_truncated_response_is_visible(setup: Setup) -> None:
    """A backend that closes mid-body: the client gets the head and what arrived, then
    the connection closes short of the announced length (never a 'complete' response)."""
    answer = setup.exchange(b"GET /cut HTTP/1.1\r\n" + H + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(head) == 200 and b"Content-Length: 1000" in head
    assert body == b"0123456789"


def test_huge_response_head_is_502(setup: Setup) -> None:
    """A backend response head over max_response_header_bytes (64K) gets the client a 502."""
    assert status_of(setup.exchange(b"GET /big-head HTTP/1.1\r\n" + H + b"\r\n")) == 502


def test_client_that_stops_reading_is_dropped(setup: Setup) -> None:
    """A client that stops reading a large response is dropped after client_send_timeout,
    and the backend connection sending it is closed too (nothing piles up in memory)."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big-body HTTP/1.1\r\n" + H + b"\r\n")
        wait_for(lambda: len(setup.backend.touched(before)) == 1)
        [(conn, _)] = setup.backend.touched(before)
        wait_for(conn.closed.is_set, 10)
    assert "not reading our response" in setup.proxy.log


def test_client_disconnect_cancels_backend_request(setup: Setup) -> None:
    """A client that goes away while the backend is working makes the proxy drop that
    backend connection."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(b"GET /slow-cancel HTTP/1.1\r\n" + H + b"\r\n")
        wait_for(lambda: b"/slow-cancel" in setup.backend.data())
        [(conn, _)] = setup.backend.touched(before)
        assert not conn.closed.is_set()
    wait_for(conn.closed.is_set, 5)


# --------------------------------------------------------- protocol conformance


def test_expect_continue_end_to_end(setup: Setup) -> None:
    """A client asking Expect: 100-continue gets 100 Continue from the proxy, then the
    response; the backend gets the body but no Expect header."""
    before = setup.backend.snapshot()
    with setup.connect() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            data = sock.recv(4096)
            assert data
            interim += data
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        head, body = read_response(sock)
    assert status_of(head) == 200 and body == b"hello"
    [seen] = setup.backend.since(before)
    assert b"expect" not in seen.lower() and seen.endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [(b"HEAD", b"/head-length", 200), (b"GET", b"/204", 204), (b"GET", b"/304", 304)],
)
def test_bodiless_responses_keep_the_connection_in_sync(
    setup: Setup, method: bytes, path: bytes, status: int
) -> None:
    """HEAD, 204 and 304 responses carry no body whatever their headers say; the next
    request on the same connection gets its own response."""
    with setup.connect() as sock:
        sock.sendall(method + b" " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
        head, rest = read_response(sock, head_only=True)
        assert status_of(head) == status
        sock.sendall(b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
        buf = rest
        while not buf.endswith(b"ok /next"):
            data = sock.recv(4096)
            assert data, buf
            buf += data
    assert buf.startswith(b"HTTP/1.1 200 ")
    if status == 200:
        assert b"Content-Length: 100" in head


def test_pipelined_requests_over_tls(setup: Setup) -> None:
    """Pipelined requests are answered in order over one TLS connection."""
    with setup.connect() as sock:
        sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(5)))
        bodies = [read_response(sock)[1] for _ in range(5)]
    assert bodies == [b"ok /p%d" % i for i in range(5)]
