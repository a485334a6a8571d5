"""``python -m bench.engine``: the proxy engine's own cost per request, without TLS or sockets.

One job: time the real `tlsproxy.proxy.ProxyFactory` / `ProxyProtocol` and
`tlsproxy.upstream.UpstreamPools`, routed by the real `tlsproxy.routing.Router`
built from a minimal configuration (HSTS on, as by default), serving wrk's
keep-alive small request (``GET /small`` with ``Host``) from an in-memory
backend that answers what nginx answers in ``bench/run`` (about 200 bytes with
``Content-Length``), and print microseconds per request.  ``--vary`` gives
every request and response its own header value (the per-connection caches
of repeated heads then never hit), ``--access-log``/``--metrics`` add the
``on_request`` hooks, ``--profile`` adds a cProfile of one more batch.

The connections are the in-memory ones of ``tests/proxyharness.py``
(`MemoryTransport`, `FakeReactor`); each request is moved through them in a
fixed order (client → proxy → backend → proxy → client), so the figure is the
engine's Python path plus a constant for the harness (about 3.5 µs measured
with a do-nothing relay in place of the engine: four ``deliver`` and four
``write`` calls, and the backend's answer).  It also counts the ``write`` /
``writeSequence`` calls per request on both of the engine's transports (1 each
is the goal: one TLS record and one send per response) and checks every
response byte for byte.

It must not open sockets, use the global reactor or TLS, or run unbounded:
every batch is bounded in requests and in time.  Numbers swing with machine
load; compare runs made back to back, and look at the best of the repeats.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the harness lives in tests/, next to bench/
    sys.path.insert(0, str(ROOT))

from tests.proxyharness import BACKEND, FakeBackend, FakeClient, Harness, MemoryTransport  # noqa: E402
from tlsproxy.config import parse_yaml  # noqa: E402
from tlsproxy.headers import build_policies  # noqa: E402
from tlsproxy.metrics import Metrics  # noqa: E402
from tlsproxy.routing import Router  # noqa: E402
from tlsproxy.telemetry import AccessLogWriter  # noqa: E402

SITE = "bench.tlsproxy.test"

CONFIG = f"""\
listen:
  https: ["tcp:4443:interface=127.0.0.1"]
hosts:
  {SITE}:
    certificates: [/nonexistent/bench.pem]
    backend: http://{BACKEND.host}:{BACKEND.port}
"""

#: What wrk sends in ``bench/run`` (``-H "Host: …"``).
REQUEST = f"GET /small HTTP/1.1\r\nHost: {SITE}\r\n\r\n".encode("ascii")

#: What nginx answers for ``/small`` in ``bench/run``.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 33\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"hello from the benchmark backend\n"
)

_CHUNK = 65536

#: Distinct requests and responses cycled through with ``--vary``.
_VARIANTS = 64


def _variants(vary: bool) -> tuple[list[bytes], list[bytes]]:
    """The requests sent in turn and the backend's answers to them (in the same order).

    With ``vary`` every one carries its own header field value, so no two
    consecutive heads are alike (as when cookies or request ids change).
    """
    if not vary:
        return [REQUEST], [RESPONSE]
    requests = [REQUEST[:-2] + b"X-Request-Id: %05d\r\n\r\n" % i for i in range(_VARIANTS)]
    responses = [
        RESPONSE.replace(b"\r\n\r\n", b"\r\nX-Trace: %05d\r\n\r\n" % i, 1) for i in range(_VARIANTS)
    ]
    return requests, responses


class _Engine:
    """One proxy with ``connections`` keep-alive clients, all warmed up."""

    def __init__(self, connections: int, access_log: str | None, metrics: bool, vary: bool) -> None:
        self.requests, self.responses = _variants(vary)
        config = parse_yaml(CONFIG, "bench-engine.yaml")
        router = Router(config, build_policies(config, {}))
        harness = Harness(routes={})
        harness.factory.router = router
        harness.factory.unrouted_headers = router.unrouted_headers
        harness.backend_servers[(BACKEND.host, BACKEND.port)] = self._backend
        self.harness = harness
        self.writer: AccessLogWriter | None = None
        hooks: list[Any] = []
        if access_log is not None:
            self.writer = AccessLogWriter(os.devnull, access_log, harness.reactor)
            self.writer.open()
            hooks.append(self.writer)
        if metrics:
            hooks.append(Metrics(harness.factory.connection_count, dict, dict))
        if len(hooks) == 1:
            harness.factory.on_request = hooks[0]
        elif hooks:
            first, second = hooks

            def both(entry: Any) -> None:
                first(entry)
                second(entry)

            harness.factory.on_request = both
        self.clients: list[tuple[FakeClient, MemoryTransport, MemoryTransport]] = []
        for _ in range(connections):
            client, _proto = harness.client()
            proxy_side, client_side = harness.links[-1]
            self.clients.append((client, client_side, proxy_side))
        # The first request on each connection opens backend connections; the
        # pool then keeps one and every later request reuses it.  What the
        # client gets for each variant is checked here, then compared byte for
        # byte in every run.
        self.expected: list[bytes] = []
        self._answers = 0
        for i, request in enumerate(self.requests):
            client = self.clients[i % len(self.clients)][0]
            client.send(request)
            harness.pump()
            got = client.take()
            if (
                got[:15] != b"HTTP/1.1 200 OK"
                or not got.endswith(RESPONSE[-33:])
                or b"Strict-Transport-Security: max-age=" not in got
                or (len(self.requests) > 1 and b"X-Trace: %05d\r\n" % i not in got)
            ):
                raise SystemExit(f"bench.engine: unexpected first response {got[:300]!r}")
            self.expected.append(got)
        for client, _, _ in self.clients[len(self.requests) :]:
            self._answers = 0
            client.send(self.requests[0])
            harness.pump()
            if client.take() != self.expected[0]:
                raise SystemExit("bench.engine: unexpected first response")
        self._answers = 0
        if len(self.backend_links()) != 1:
            raise SystemExit("bench.engine: expected exactly one backend connection in use")

    def _backend(self) -> FakeBackend:
        backend = FakeBackend()
        responses = self.responses
        count = len(responses)

        def answer(b: FakeBackend) -> None:
            if b.received.endswith(b"\r\n\r\n"):
                b.received.clear()
                b.send(responses[self._answers % count])
                self._answers += 1

        backend.auto = answer
        return backend

    def backend_links(self) -> list[tuple[MemoryTransport, MemoryTransport]]:
        return [
            (st, ct)
            for st, ct in self.harness.links
            if isinstance(st.protocol, FakeBackend) and not st.disconnected
        ]

    def run(self, requests: int, seconds: float) -> tuple[int, float, float, float]:
        """Serve up to ``requests`` (stopping after ``seconds``); return (done, µs per
        request, client writes per request, backend writes per request)."""
        (backend_side, proxy_backend_side) = self.backend_links()[0]
        client_writes: list[list[bytes]] = [c[2].record_writes() for c in self.clients]
        backend_writes = proxy_backend_side.record_writes()
        expected = self.expected
        sent = self.requests
        variants = len(sent)
        clients = self.clients
        n = len(clients)
        self._answers = 0
        done = 0
        perf = time.perf_counter
        start = perf()
        limit = start + seconds
        while done < requests:
            # Check the clock once per 64 requests so it hardly shows.
            for i in range(64):
                client, client_side, proxy_side = clients[(done + i) % n]
                client_side.write(sent[(done + i) % variants])
                client_side.deliver(_CHUNK)  # client → proxy: parse, route, write the backend
                proxy_backend_side.deliver(_CHUNK)  # proxy → backend, which answers
                backend_side.deliver(_CHUNK)  # backend → proxy: parse, relay
                proxy_side.deliver(_CHUNK)  # proxy → client
                if client.received != expected[(done + i) % variants]:
                    raise SystemExit(f"bench.engine: bad response {bytes(client.received)!r}")
                client.received.clear()
            done += 64
            if perf() > limit:
                break
        elapsed = perf() - start
        cw = sum(len(w) for w in client_writes)
        bw = len(backend_writes)
        for _, _, proxy_side in clients:
            proxy_side.writes = None
        proxy_backend_side.writes = None
        return done, elapsed * 1e6 / done, cw / done, bw / done

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description=(
            "Time the proxy engine alone (no TLS, no sockets, no real reactor): keep-alive "
            "small requests through the real ProxyProtocol, Router and UpstreamPools "
            "over in-memory connections.  Prints microseconds per request (best and "
            "median of the repeats) and write calls per request on each side."
        ),
    )
    parser.add_argument("--requests", type=int, default=20000, help="requests per repeat")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="time limit of each repeat (seconds)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repeats (default 5)")
    parser.add_argument(
        "--connections", type=int, default=1, help="client connections, used in turn"
    )
    parser.add_argument(
        "--access-log",
        choices=("combined", "json"),
        help="also write an access log in this format (to /dev/null)",
    )
    parser.add_argument("--metrics", action="store_true", help="also count Prometheus metrics")
    parser.add_argument(
        "--vary",
        action="store_true",
        help="give every request and response its own header value (no two heads alike)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, run one more repeat under cProfile and print the top functions",
    )
    parser.add_argument(
        "--profile-out", type=Path, help="with --profile: also write the pstats data here"
    )
    args = parser.parse_args(argv)
    if args.requests < 64 or args.repeat < 1 or args.connections < 1 or args.seconds <= 0:
        parser.error("need --requests >= 64, --repeat >= 1, --connections >= 1, --seconds > 0")

    engine = _Engine(args.connections, args.access_log, args.metrics, args.vary)
    try:
        engine.run(min(args.requests, 2000), args.seconds)  # warm-up
        results = [engine.run(args.requests, args.seconds) for _ in range(args.repeat)]
        per_request = [r[1] for r in results]
        _, _, client_writes, backend_writes = results[-1]
        hooks = [h for h in (args.access_log and f"access log {args.access_log}",) if h]
        if args.metrics:
            hooks.append("metrics")
        print(
            f"engine: {results[-1][0]} requests x {args.repeat} repeats, "
            f"{args.connections} connection(s), on_request: {', '.join(hooks) or 'none'}, "
            f"heads: {'all different' if args.vary else 'repeated'}"
        )
        best, median = min(per_request), statistics.median(per_request)
        every = ", ".join(f"{x:.2f}" for x in per_request)
        print(f"  us/request: best {best:.2f}, median {median:.2f}  (all: {every})")
        print(f"  writes/request: to client {client_writes:.2f}, to backend {backend_writes:.2f}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            engine.run(args.requests, args.seconds)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(30)
            print(out.getvalue())
            if args.profile_out is not None:
                stats.dump_stats(args.profile_out)
    finally:
        engine.close()
    return 0


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
