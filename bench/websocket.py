"""A load generator for WebSocket messages through a TLS proxy.

One job: open ``--connections`` TLS connections to one address, upgrade each
to a WebSocket (RFC 6455) at ``--path``, then for ``--duration`` seconds have
every connection send a small masked text message and wait for its echo
(`bench.wsecho` behind the proxy), one message in flight per connection, as a
dashboard exchanging small updates does.  It prints one JSON line: messages
echoed, seconds, rate, errors, and latency percentiles of send→echo.

Uses pyOpenSSL, non-blocking sockets and one ``selectors`` loop, like
`bench.handshake`.  It must not verify certificates (the peers are ours),
send traffic anywhere but the given address, or run without a time bound.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import selectors
import socket
import sys
import time
from typing import Any

from OpenSSL import SSL

from bench.wsecho import accept_value, frame

#: The payload of every message (what a small dashboard update weighs).
PAYLOAD = b"tlsproxy websocket benchmark 32b"
_MASK = b"\x12\x34\x56\x78"


def message() -> bytes:
    """One masked client text frame carrying `PAYLOAD`."""
    masked = bytes(b ^ _MASK[i % 4] for i, b in enumerate(PAYLOAD))
    return bytes([0x81, 0x80 | len(PAYLOAD)]) + _MASK + masked


#: The echo every message must get back.
ECHO = frame(0x1, PAYLOAD)

_WANT = (SSL.WantReadError, SSL.WantWriteError)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Conn:
    """One connection: TCP connect, TLS handshake, upgrade, then messages."""

    __slots__ = ("buf", "conn", "expect", "sent", "sock", "state")

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.state = "connect"
        self.buf = b""
        self.sent = 0.0
        self.expect = b""


def run(
    host: str, port: int, path: str, server_name: str, connections: int, duration: float
) -> dict[str, Any]:
    """Run the load; the result as `main` prints it."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_alpn_protos([b"http/1.1"])
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = {"connect": 0, "handshake": 0, "upgrade": 0, "echo": 0}
    msg = message()
    start_time = time.monotonic()
    deadline = start_time + duration
    hard_deadline = deadline + 10.0

    def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
            errors["connect"] += 1
            sock.close()
            return
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(server_name.encode("ascii"))
        conn.set_connect_state()
        sel.register(sock, selectors.EVENT_WRITE, _Conn(sock, conn))

    def drop(c: _Conn, kind: str) -> None:
        errors[kind] += 1
        sel.unregister(c.sock)
        c.sock.close()

    def send(c: _Conn, data: bytes, kind: str) -> bool:
        try:
            c.conn.sendall(data)
        except (SSL.Error, OSError):
            drop(c, kind)
            return False
        return True

    def step(c: _Conn) -> None:
        if c.state == "connect":
            if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                drop(c, "connect")
                return
            c.state = "handshake"
        if c.state == "handshake":
            try:
                c.conn.do_handshake()
            except SSL.WantReadError:
                sel.modify(c.sock, selectors.EVENT_READ, c)
                return
            except SSL.WantWriteError:
                sel.modify(c.sock, selectors.EVENT_WRITE, c)
                return
            except (SSL.Error, OSError):
                drop(c, "handshake")
                return
            key = base64.b64encode(os.urandom(16))
            c.expect = b"Sec-WebSocket-Accept: " + accept_value(key)
            request = (
                (
                    f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                ).encode()
                + b"Sec-WebSocket-Key: "
                + key
                + b"\r\n\r\n"
            )
            if not send(c, request, "upgrade"):
                return
            c.state = "upgrade"
            sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        while True:
            try:
                data = c.conn.recv(65536)
            except _WANT:
                return
            except (SSL.Error, OSError):
                data = b""
            if not data:
                drop(c, "upgrade" if c.state == "upgrade" else "echo")
                return
            c.buf += data
            if c.state == "upgrade":
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, c.buf = c.buf[:end], c.buf[end + 4 :]
                if not head.startswith(b"HTTP/1.1 101") or c.expect.lower() not in head.lower():
                    drop(c, "upgrade")
                    return
                c.state = "messages"
            elif len(c.buf) < len(ECHO):
                continue
            else:
                if c.buf[: len(ECHO)] != ECHO:
                    drop(c, "echo")
                    return
                c.buf = c.buf[len(ECHO) :]
                now = time.monotonic()
                latencies.append(now - c.sent)
                if now >= deadline:
                    sel.unregister(c.sock)
                    c.sock.close()
                    return
            c.sent = time.monotonic()
            if not send(c, msg, "echo"):
                return

    for _ in range(connections):
        open_one()
    while sel.get_map() and time.monotonic() < hard_deadline:
        for key, _events in sel.select(timeout=0.5):
            step(key.data)
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    elapsed = max(time.monotonic(), deadline) - start_time
    latencies.sort()
    return {
        "messages": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed else 0.0,
        "errors": errors,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws/echo")
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    ns = parser.parse_args(argv)
    if not 0 < ns.duration <= 600:
        parser.error("--duration must be in (0, 600] seconds")
    out = run(ns.host, ns.port, ns.path, ns.server_name, ns.connections, ns.duration)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
