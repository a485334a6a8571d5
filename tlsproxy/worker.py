"""One worker process of ``workers: N`` (``python -m tlsproxy.worker``, started by
`tlsproxy.supervisor`, never by hand).

One job: serve client connections on the listening sockets inherited from the
supervisor, with the same runtime and engines as the single process
(`tlsproxy.service.build_runtime`), and do what the supervisor asks over the
control channel (`tlsproxy.control`): serve a new configuration snapshot
(reload, newly issued certificates), publish ACME challenge answers, reopen
the access log, report metrics.  Its log events go to the supervisor as JSON
lines on a pipe, which re-emits them in its own log.

It serves exactly what the supervisor checked: the configuration text and the
loaded certificates come over the control channel, so it never re-reads the
configuration or certificate files, and the access log is the descriptor the
supervisor opened (other files a configuration names, such as
client-certificate CAs, it reads itself, as the user tlsproxy runs as).  Handed
no access-log descriptor, it opens the path itself and, if it cannot, serves
without one (logged) rather than refusing to start.

Start-up order: say Ready; receive the snapshot and build the engines from
it; receive the current ACME challenges; once Ready is answered, adopt the
listening sockets.  On SIGTERM
(or SIGINT) it stops accepting and drains for ``drain_timeout``, as the single
process does; it drains and exits by itself when the control channel closes
(the supervisor died), so it is never orphaned.

It must not: bind anything (the supervisor did, before dropping
privileges), run ACME or watch files (the supervisor does and tells it), or
act on SIGHUP/SIGUSR1 sent to it directly beyond reopening its access log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols import amp
from twisted.python.failure import Failure

from tlsproxy import control
from tlsproxy.config import AccessLogSettings
from tlsproxy.eager import adopt_port
from tlsproxy.telemetry import AccessLogWriter

__all__ = ["WorkerControl", "main", "own_access_log"]

log = Logger()


class WorkerControl(amp.AMP):
    """The worker's end of the control channel: the supervisor's commands.

    ``start`` builds the worker from the first `tlsproxy.control.Snapshot`
    and returns the problems that stopped it (empty: it is built, and
    ``runtime``, ``metrics`` and ``access_log`` are set); later snapshots are
    applied to ``runtime`` (a `tlsproxy.service.Runtime`) as reloads.
    ``metrics`` is the worker's `tlsproxy.metrics.Metrics` (None: off),
    ``access_log`` its `tlsproxy.telemetry.AccessLogWriter` (None: off);
    ``lost`` is called once when the channel closes.
    """

    def __init__(
        self,
        runtime: Any = None,
        metrics: Any = None,
        access_log: Any = None,
        lost: Callable[[], object] | None = None,
        start: Callable[[control.Snapshot], list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.metrics = metrics
        self.access_log = access_log
        self.lost = lost
        self.start = start
        self._snapshot = 0
        self._snapshot_data = b""
        self._incoming: tuple[int, bytearray] = (0, bytearray())

    def _live(self) -> Any:
        if self.runtime is None:
            raise RuntimeError("the worker is not configured yet")
        return self.runtime

    @control.Configure.responder
    def configure(
        self, snapshot: int, offset: int, data: bytes, final: bool, kind: str
    ) -> dict[str, Any]:
        number, buffer = self._incoming
        if number != snapshot or offset == 0:
            number, buffer = snapshot, bytearray()
        if offset != len(buffer):
            raise ValueError(f"snapshot page at {offset}, expected {len(buffer)}")
        buffer += data
        self._incoming = (number, buffer)
        if not final:
            return {"ok": True, "errors": []}
        self._incoming = (0, bytearray())
        received = control.decode_snapshot(bytes(buffer))
        if self.runtime is None:
            if self.start is None:
                raise RuntimeError("nothing to start the worker with")
            errors = self.start(received)
            return {"ok": not errors, "errors": errors}
        from tlsproxy.config import parse_yaml
        from tlsproxy.errors import ConfigError

        try:
            config = parse_yaml(received.text, received.source)
        except ConfigError as exc:
            self.runtime.refuse(exc)
            return {"ok": False, "errors": list(self.runtime.refused)}
        ok = self.runtime.replace(config, received.certificates, announce=kind == "reload")
        return {"ok": ok, "errors": [] if ok else list(self.runtime.refused)}

    @control.PublishToken.responder
    def publish_token(self, token: str, key_authorization: str) -> dict[str, Any]:
        self._live().tokens.publish(token, key_authorization)
        return {}

    @control.RemoveToken.responder
    def remove_token(self, token: str) -> dict[str, Any]:
        self._live().tokens.remove(token)
        return {}

    @control.PublishChallengeCertificate.responder
    def publish_certificate(self, name: str, key: bytes, certificate: bytes) -> dict[str, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        self._live().challenges.publish(
            name, load_pem_private_key(key, None), x509.load_pem_x509_certificate(certificate)
        )
        return {}

    @control.RemoveChallengeCertificate.responder
    def remove_certificate(self, name: str) -> dict[str, Any]:
        self._live().challenges.remove(name)
        return {}

    @control.ReopenLogs.responder
    def reopen_logs(self) -> dict[str, Any]:
        if self.access_log is not None:
            self.access_log.reopen()
        return {}

    @control.Ping.responder
    def ping(self) -> dict[str, Any]:
        return {}

    @control.MetricsPage.responder
    def metrics_page(self, snapshot: int, offset: int) -> dict[str, Any]:
        if offset == 0:
            from prometheus_client import generate_latest

            self._snapshot += 1
            self._snapshot_data = (
                b"" if self.metrics is None else generate_latest(self.metrics.registry)
            )
        elif snapshot != self._snapshot:
            return {"snapshot": self._snapshot, "data": b"", "total": 0}
        data = self._snapshot_data
        return {"snapshot": self._snapshot, "data": control.pages(data, offset), "total": len(data)}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        lost, self.lost = self.lost, None
        if lost is not None:
            lost()


def own_access_log(settings: AccessLogSettings, clock: Any, index: int) -> AccessLogWriter:
    """The access log of a worker its supervisor handed no descriptor (it had
    none open to give): opened here, by path, as the user tlsproxy runs as.

    A file that cannot be opened is logged, not fatal: the worker serves
    without writing lines until a SIGUSR1 reopen succeeds, instead of
    crash-looping on every restart.
    """
    writer = AccessLogWriter(settings.path, settings.format, clock)
    try:
        writer.open()
    except OSError as exc:
        log.error(
            "worker {worker}: access log {path}: cannot open: {error}; this worker writes "
            "no access log until SIGUSR1 reopens it",
            worker=index,
            path=settings.path,
            error=exc,
        )
    return writer


class AdoptedListener(Service):
    """Serves ``factory`` on an inherited listening socket from start to stop."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.port = adopt_port(self.reactor, self.fd, self.family, self.factory)
        os.close(self.fd)  # the port holds its own copy

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # type: ignore[return-value]
        return None


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: amp.AMP) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self.protocol_instance


def _listen_spec(text: str) -> tuple[int, int, str]:
    fd, family, kind = text.split(":")
    if kind not in ("https", "http"):
        raise argparse.ArgumentTypeError(f"unknown listener kind {kind!r}")
    return int(fd), int(family), kind


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tlsproxy.worker",
        description="A worker process of tlsproxy (started by its supervisor, not by hand).",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--access-log-fd", type=int, default=None)
    parser.add_argument("--listen", type=_listen_spec, action="append", default=[])
    return parser.parse_args(argv)


def _begin_logging(fd: int) -> IO[str]:
    out = open(fd, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - the process's lifetime
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(out, recordSeparator="")], redirectStandardIO=False
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until it is stopped; the exit status is 1 if it cannot start."""
    args = _arguments(argv)
    from tlsproxy.reactor import install

    reactor: Any = install()  # epoll, as in the supervisor; before anything imports one
    _begin_logging(args.log_fd)
    # The supervisor reloads and forwards SIGUSR1; the default action of both
    # (terminate) must not kill a worker a signal to the process group reaches.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    from tlsproxy.config import parse_yaml, with_restart_settings
    from tlsproxy.errors import ConfigError
    from tlsproxy.service import build_runtime, check_start, tls_factory, wire_observers

    status = [0]
    services: list[Any] = []

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    def fail(messages: list[str]) -> list[str]:
        for message in messages:
            log.critical("cannot start: {message}", message=message)
        status[0] = 1
        reactor.callLater(0, stop)
        return messages

    def start(snapshot: control.Snapshot) -> list[str]:
        """Build the engines for what the supervisor checked (files it read are not re-read)."""
        try:
            config = parse_yaml(snapshot.text, snapshot.source)
            if snapshot.started_with is not None and snapshot.started_with != snapshot.text:
                started = parse_yaml(snapshot.started_with, snapshot.source)
                config = with_restart_settings(config, started)
            checked = config
            if args.access_log_fd is None and config.access_log is not None:
                # No descriptor from the supervisor: opened below, never fatal.
                checked = attrs.evolve(config, access_log=None)
            parts = check_start(
                checked,
                reactor,
                endpoints=False,
                acme=False,
                certificates=snapshot.certificates,
                access_log_fd=args.access_log_fd,
            )
        except ConfigError as exc:
            return fail([problem.render(exc.source) for problem in exc.problems])
        if checked is not config and config.access_log is not None:
            parts = attrs.evolve(
                parts,
                prepared=attrs.evolve(parts.prepared, config=config),
                access_log=own_access_log(config.access_log, reactor, args.index),
            )
        # The supervisor logged the start-up warnings once already.
        parts = attrs.evolve(parts, prepared=attrs.evolve(parts.prepared, warnings=()))
        http = any(kind == "http" for _, _, kind in args.listen)
        runtime, top = build_runtime(
            parts, reactor, config_path=snapshot.source, plain=http, log_grades=False
        )
        runtime.warn_restart = False
        top.signals = False
        channel.runtime = runtime
        channel.metrics = wire_observers(runtime, parts.access_log)
        channel.access_log = parts.access_log
        top.privilegedStartService()
        top.startService()
        services.append(top)
        return []

    def lost() -> None:
        if reactor.running:
            log.info("worker {worker}: the supervisor is gone; draining", worker=args.index)
        stop()

    channel = WorkerControl(lost=lost, start=start)
    reactor.adoptStreamConnection(args.control_fd, socket.AF_UNIX, _OneProtocol(channel))
    os.close(args.control_fd)

    def listen(_: Any) -> None:
        if not services or channel.runtime is None:
            stop()  # not configured: it said why
            return
        runtime = channel.runtime
        factories: dict[str, IProtocolFactory] = {"https": tls_factory(runtime)}
        if runtime.plain_proxy is not None:
            factories["http"] = runtime.plain_proxy
        for fd, family, kind in args.listen:
            AdoptedListener(reactor, fd, family, factories[kind]).setServiceParent(services[0])

    def not_ready(failure: Failure) -> None:
        if not stopping:
            log.failure(
                "worker {worker}: the supervisor did not answer", failure, worker=args.index
            )
            status[0] = 1
        stop()

    def ready() -> None:
        answer = channel.callRemote(control.Ready, pid=os.getpid())
        answer.addCallbacks(listen, not_ready)

    stopping: list[bool] = []

    def shutdown() -> Any:
        stopping.append(True)
        return services[0].stopService() if services else None

    reactor.callWhenRunning(ready)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
