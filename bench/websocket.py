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

import base64
import json
import os
import selectors
import sys
import time
from typing import Any

from OpenSSL import SSL

from bench import loadgen
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


class _Conn(loadgen.Conn):
    """A connection and its message in flight: when it was sent, the accept value expected."""

    sent = 0.0
    expect = b""


def run(
    host: str, port: int, path: str, server_name: str, connections: int, duration: float
) -> dict[str, Any]:
    """Run the load; the result as `main` prints it."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_alpn_protos([b"http/1.1"])
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    last = [0.0]  # when the last echo arrived
    errors = {"connect": 0, "handshake": 0, "upgrade": 0, "echo": 0, "stalled": 0}
    msg = message()
    start_time = time.monotonic()
    deadline = start_time + duration
    hard_deadline = deadline + 10.0

    def open_one() -> None:
        opened = loadgen.connect(host, port, ctx, server_name)
        if opened is None:
            errors["connect"] += 1
            return
        sel.register(opened[0], selectors.EVENT_WRITE, _Conn(*opened))

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
        if c.state in ("connect", "handshake"):
            outcome = loadgen.handshake(c, sel)
            if outcome == "wait":
                return
            if outcome != "done":
                drop(c, outcome)
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
            except (SSL.WantReadError, SSL.WantWriteError):
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
                now = last[0] = time.monotonic()
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
    errors["stalled"] = loadgen.run_loop(sel, step, hard_deadline)
    # Up to the deadline, and the echoes in flight then: a stalled connection's
    # wait is not measured time.
    elapsed = max(deadline, last[0]) - start_time
    latencies.sort()
    return {
        "messages": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed else 0.0,
        "errors": errors,
        "p50_ms": loadgen.percentile(latencies, 0.50) * 1000,
        "p99_ms": loadgen.percentile(latencies, 0.99) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    ns = loadgen.parse(loadgen.parser(__doc__.split("\n\n")[0], "/ws/echo"), argv)
    out = run(ns.host, ns.port, ns.path, ns.server_name, ns.connections, ns.duration)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
