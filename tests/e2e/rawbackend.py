"""Test backends and clients that work at the byte level, for end-to-end proxy tests.

`CapturingBackend` is a threaded loopback HTTP/1.1 server that records every
byte each connection received, so a test can assert what did (or did not) reach
the backend; what it answers is picked by the request path.  `tls_client`
opens a TLS connection to tlsproxy trusting the test CA.  Every blocking call
has a timeout.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs

TIMEOUT = 15.0
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked\r\n", re.IGNORECASE)


@attrs.define
class Connection:
    """One connection the backend accepted: every byte received, and whether it ended."""

    received: bytearray = attrs.Factory(bytearray)
    closed: threading.Event = attrs.Factory(threading.Event)


def _response(status: int, body: bytes = b"", headers: bytes = b"") -> bytes:
    reason = {200: b"OK", 204: b"No Content", 304: b"Not Modified"}.get(status, b"X")
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status,
        reason,
        headers,
        len(body),
        body,
    )


class CapturingBackend:
    """A loopback backend recording all it receives; the path picks its answer.

    ``/slow…`` never answers; ``/garbage`` answers bytes that are not HTTP;
    ``/cut`` announces 1000 bytes, sends 10 and closes; ``/close`` closes
    without answering; ``/big-head`` answers a 100 kB header; ``/big-body``
    answers 256 MiB; ``/head-length`` answers HEAD with a Content-Length and
    no body; ``/204`` and ``/304`` answer those statuses; ``/echo`` answers the
    request body; anything else answers ``ok <path>``.  Requests are read
    whole (Content-Length or chunked) before answering.
    """

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def total(self) -> int:
        """Bytes received so far over all connections."""
        with self._lock:
            return sum(len(c.received) for c in self.connections)

    def data(self) -> bytes:
        """Everything received so far, connection after connection."""
        with self._lock:
            return b"".join(bytes(c.received) for c in self.connections)

    def snapshot(self) -> list[int]:
        """How much each connection has received so far (for `since`)."""
        with self._lock:
            return [len(c.received) for c in self.connections]

    def touched(self, snapshot: list[int]) -> list[tuple[Connection, bytes]]:
        """The connections that received bytes after ``snapshot``, with those bytes."""
        with self._lock:
            pieces = [
                (c, bytes(c.received[snapshot[i] if i < len(snapshot) else 0 :]))
                for i, c in enumerate(self.connections)
            ]
        return [(c, p) for c, p in pieces if p]

    def since(self, snapshot: list[int]) -> list[bytes]:
        """What each connection received after ``snapshot`` (those that received any)."""
        with self._lock:
            pieces = [
                bytes(c.received[snapshot[i] if i < len(snapshot) else 0 :])
                for i, c in enumerate(self.connections)
            ]
        return [p for p in pieces if p]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = Connection()
            with self._lock:
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        sock.settimeout(60)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    with self._lock:
                        conn.received += data
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                head += b"\r\n"
                body, buf = self._read_body(sock, conn, head, buf)
                if not self._answer(sock, head, body):
                    return
        except OSError:
            return
        finally:
            conn.closed.set()
            sock.close()

    def _read_body(
        self, sock: socket.socket, conn: Connection, head: bytes, buf: bytes
    ) -> tuple[bytes, bytes]:
        def more() -> bytes:
            data = sock.recv(65536)
            if not data:
                raise OSError("closed mid-body")
            with self._lock:
                conn.received += data
            return data

        length = _LENGTH.search(head)
        if length is not None:
            n = int(length.group(1))
            while len(buf) < n:
                buf += more()
            return buf[:n], buf[n:]
        if _CHUNKED.search(head):
            body = b""
            while True:
                while b"\r\n" not in buf:
                    buf += more()
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    buf += more()
                body += buf[:size]
                buf = buf[size + 2 :]
                if size == 0:
                    return body, buf
        return b"", buf

    def _answer(self, sock: socket.socket, head: bytes, body: bytes) -> bool:
        """Answer one request; False to end the connection."""
        method, target = head.split(b" ", 2)[:2]
        if target.startswith(b"/slow"):
            while not self._stop.is_set():
                try:
                    if not sock.recv(65536):
                        return False
                except TimeoutError:
                    continue
            return False
        if target == b"/garbage":
            sock.sendall(b"this is not HTTP\r\n\r\n")
            return False
        if target == b"/cut":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            return False
        if target == b"/close":
            return False
        if target == b"/big-head":
            sock.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n")
            return False
        if target == b"/big-body":
            size = 256 * 1024 * 1024
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"b" * (1024 * 1024)
            for _ in range(size // len(block)):
                sock.sendall(block)
            return True
        if target == b"/head-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Head: yes\r\n\r\n")
            return True
        if target == b"/204":
            sock.sendall(b"HTTP/1.1 204 No Content\r\nX-Status: 204\r\n\r\n")
            return True
        if target == b"/304":
            sock.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
            return True
        if target == b"/echo":
            sock.sendall(_response(200, body))
            return True
        sock.sendall(_response(200, b"ok " + target) if method != b"HEAD" else _response(200))
        return True


def tls_client(
    port: int,
    ca_file: Path,
    server_name: str,
    *,
    source: str | None = None,
    timeout: float = TIMEOUT,
) -> ssl.SSLSocket:
    """A TLS connection to tlsproxy on 127.0.0.1:``port`` (optionally from ``source``)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    )
    return context.wrap_socket(sock, server_hostname=server_name)


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (bounded by the socket timeout)."""
    out = b""
    while len(out) < limit:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            break
        if not data:
            break
        out += data
    return out


def read_response(sock: socket.socket, *, head_only: bool = False) -> tuple[bytes, bytes]:
    """One response with a Content-Length body (or none): its head and body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    head += b"\r\n"
    if head_only:
        return head, rest
    length = _LENGTH.search(head)
    n = int(length.group(1)) if length else 0
    while len(rest) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        rest += data
    return head, rest[:n]


def wait_for(predicate: Callable[[], bool], seconds: float = TIMEOUT) -> None:
    """Wait (bounded) until ``predicate()`` is true; fail the test otherwise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds} s")
