"""A load generator for TLS handshakes: each connection does one request, then closes.

One job: keep ``--connections`` TLS connections busy against one address for
``--duration`` seconds, where every connection does a *full* handshake (no
session is ever offered for resumption: a fresh ``SSL`` object per connection
and the client session cache off), sends one ``GET`` with ``Connection:
close``, reads the whole response, and closes.  It prints one JSON line:
completed handshakes, how many resumed, errors, and latency percentiles of
connect→response.  With ``--resume`` every connection instead offers the
session (TLS 1.3 ticket) the last completed connection of its process got, as
a returning browser does, so the server does abbreviated handshakes.

Why not wrk: wrk reuses each connection's ``SSL`` object with ``SSL_clear``,
which keeps the session, so with ``Connection: close`` almost every
connection after the first *resumes* (measured with nginx's
``$ssl_session_reused``).  And Debian 12's OpenSSL 3.0, which wrk and curl use,
spends about twice as much CPU per client handshake as the OpenSSL 4 bundled
with pyOpenSSL/cryptography, so a wrk-based load generator on one core could
not keep even nginx busy.  This tool uses pyOpenSSL, non-blocking sockets and
one ``selectors`` loop per process; ``--processes`` runs several.

It must not: resume sessions unless told to, verify certificates (the peers are
ours), or run without a time bound.
"""

from __future__ import annotations

import json
import multiprocessing
import selectors
import sys
import time
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as _lib  # the binding under pyOpenSSL (no public API for these)

from bench import loadgen


def _context(groups: str | None, resume: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    if resume:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    else:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
    if groups and _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii")) != 1:
        raise SystemExit(f"OpenSSL refused the groups {groups}")
    return ctx


def _run(
    host: str,
    port: int,
    path: str,
    server_name: str,
    connections: int,
    duration: float,
    groups: str | None,
    resume: bool = False,
) -> dict[str, Any]:
    ctx = _context(groups, resume)
    request = (f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n").encode(
        "ascii"
    )
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = {"connect": 0, "handshake": 0, "read": 0, "status": 0, "stalled": 0}
    resumed = 0
    last_done = 0.0
    last_session: SSL.Session | None = None
    start_time = time.monotonic()
    deadline = start_time + duration
    hard_deadline = deadline + 10.0

    def open_one() -> None:
        opened = loadgen.connect(host, port, ctx, server_name, last_session)
        if opened is None:
            errors["connect"] += 1
            return
        sel.register(opened[0], selectors.EVENT_WRITE, loadgen.Conn(*opened))

    def finish(c: loadgen.Conn, ok: bool, kind: str = "") -> None:
        nonlocal last_session, last_done
        sel.unregister(c.sock)
        c.sock.close()
        if ok:
            last_done = time.monotonic()
            latencies.append(last_done - c.start)
            if resume:
                # As after close_notify: OpenSSL makes the session of a connection
                # freed without it unresumable.
                c.conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
                last_session = c.conn.get_session()
        else:
            errors[kind] += 1
        if time.monotonic() < deadline:
            open_one()

    def step(c: loadgen.Conn) -> None:
        nonlocal resumed
        if c.state in ("connect", "handshake"):
            outcome = loadgen.handshake(c, sel)
            if outcome == "wait":
                return
            if outcome != "done":
                finish(c, False, outcome)
                return
            if _lib.SSL_session_reused(c.conn._ssl):
                resumed += 1
            c.state = "write"
        if c.state == "write":
            try:
                c.conn.sendall(request)
            except (SSL.WantReadError, SSL.WantWriteError):
                sel.modify(c.sock, selectors.EVENT_WRITE, c)
                return
            except (SSL.Error, OSError):
                finish(c, False, "read")
                return
            c.state = "read"
            sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.state == "read":
            while True:
                try:
                    data = c.conn.recv(65536)
                except SSL.WantReadError:
                    return
                except SSL.ZeroReturnError:
                    data = b""
                except (SSL.Error, OSError):
                    data = b""
                if not data:
                    ok = c.buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
                    finish(c, ok, "status" if c.buf else "read")
                    return
                c.buf += data
                if _complete(c.buf):
                    ok = c.buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
                    finish(c, ok, "status")
                    return

    for _ in range(connections):
        open_one()
    errors["stalled"] = loadgen.run_loop(sel, step, hard_deadline)
    # Up to the last completion: a stalled connection's wait is not measured time.
    elapsed = max(last_done, deadline) - start_time
    latencies.sort()
    return {
        "handshakes": len(latencies),
        "seconds": elapsed,
        "errors": errors,
        "resumed": resumed,
        "latencies_ms": [x * 1000 for x in latencies[:: max(1, len(latencies) // 2000)]],
    }


def _complete(buf: bytes) -> bool:
    """Whether ``buf`` holds a whole response with a ``Content-Length`` body."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in buf[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(buf) - head_end - 4 >= int(value.strip())
    return False


def _worker(args: tuple[Any, ...]) -> dict[str, Any]:
    return _run(*args)


def main(argv: list[str] | None = None) -> int:
    parser = loadgen.parser(__doc__.split("\n\n")[0], "/small")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--groups", default=None, help="client key-exchange groups (OpenSSL list)")
    parser.add_argument(
        "--resume", action="store_true", help="offer the last session (abbreviated handshakes)"
    )
    ns = loadgen.parse(parser, argv)
    per = max(1, ns.connections // ns.processes)
    job = (ns.host, ns.port, ns.path, ns.server_name, per, ns.duration, ns.groups, ns.resume)
    if ns.processes == 1:
        results = [_run(*job)]
    else:
        with multiprocessing.Pool(ns.processes) as pool:
            results = pool.map(_worker, [job] * ns.processes)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    total = sum(r["handshakes"] for r in results)
    seconds = max(r["seconds"] for r in results)
    errors = {k: sum(r["errors"][k] for r in results) for k in results[0]["errors"]}
    out = {
        "handshakes": total,
        "seconds": seconds,
        "rate": total / seconds if seconds else 0.0,
        "errors": errors,
        "resumed": sum(r["resumed"] for r in results),
        "p50_ms": loadgen.percentile(latencies, 0.50),
        "p99_ms": loadgen.percentile(latencies, 0.99),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
