"""What the benchmark's TLS load generators share: connecting, handshaking, the loop.

One job: the mechanics of many non-blocking pyOpenSSL client connections in
one ``selectors`` loop, used by `bench.handshake` and `bench.websocket`; what
each connection does after its handshake is theirs.  It must not verify
certificates (the peers are ours) or loop without a time bound.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL


def parser(description: str, path: str) -> argparse.ArgumentParser:
    """The command line both tools share: where to connect, how many connections,
    for how long (``--duration`` is checked by `parse`); ``path`` is the default
    request path."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default=path)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments; exits with a usage error for a duration out of (0, 600] s."""
    ns = p.parse_args(argv)
    if not 0 < ns.duration <= 600:
        p.error("--duration must be in (0, 600] seconds")
    return ns


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The value at ``fraction`` (0..1) of ``sorted_values`` (0.0 if empty)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class Conn:
    """One client connection: its socket, its TLS connection and where it is
    (``state`` starts at ``connect``; the tools add their own states)."""

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.state = "connect"
        self.buf = b""
        self.start = time.monotonic()


def connect(
    host: str, port: int, ctx: SSL.Context, server_name: str, session: SSL.Session | None = None
) -> tuple[socket.socket, SSL.Connection] | None:
    """Start a non-blocking TCP connection with ``TCP_NODELAY`` and a TLS client on
    it (SNI ``server_name``, offering ``session`` if given); None if the connect
    failed at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(server_name.encode("ascii"))
    if session is not None:
        conn.set_session(session)
    conn.set_connect_state()
    return sock, conn


def handshake(c: Conn, sel: selectors.BaseSelector) -> str:
    """Advance ``c`` through the TCP connect and the TLS handshake.

    :return: ``"done"`` once the handshake completed (``c.state`` is then
        ``handshake``; the caller moves on), ``"wait"`` while waiting for the
        socket (registered for what OpenSSL needs), or the failure:
        ``"connect"`` or ``"handshake"``.
    """
    if c.state == "connect":
        if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return "connect"
        c.state = "handshake"
    try:
        c.conn.do_handshake()
    except SSL.WantReadError:
        sel.modify(c.sock, selectors.EVENT_READ, c)
        return "wait"
    except SSL.WantWriteError:
        sel.modify(c.sock, selectors.EVENT_WRITE, c)
        return "wait"
    except (SSL.Error, OSError):
        return "handshake"
    return "done"


def run_loop(sel: selectors.BaseSelector, step: Callable[[Any], None], until: float) -> int:
    """Call ``step`` with each ready connection until none is left or the
    monotonic clock passes ``until``; then close what is still open.

    :return: how many connections were still open (stalled: count them as errors).
    """
    while sel.get_map() and time.monotonic() < until:
        for key, _events in sel.select(timeout=0.5):
            step(key.data)
    stalled = list(sel.get_map().values())
    for key in stalled:
        key.fileobj.close()  # type: ignore[union-attr]
    return len(stalled)
