"""``workers: N``: one parent process supervising N worker processes.

One job: keep N workers (``python -m tlsproxy.worker``, see `tlsproxy.worker`)
serving the listening sockets this process bound, and be their single point
of control.  The parent binds every listener before twistd drops privileges
and never accepts a connection itself; it spawns the workers (after the drop,
so they run as the same user) passing each the listening sockets, the access
log it opened, and one end of a socketpair carrying AMP (`tlsproxy.control`),
over which each worker is sent what to serve: the configuration text and the
certificates this process checked (a snapshot), never re-read by the worker.
It then:

- kills and restarts a worker whose event loop has not answered a ping for
  ``HUNG_AFTER`` seconds (stuck in a loop or a blocking call: it accepts
  nothing, and the connections it holds stall), as HAProxy's watchdog does;
- restarts a worker that exits unexpectedly, logging its exit code or
  signal, backing off a crash loop (1 s doubling to 30 s; reset once a
  worker stayed up 60 s); but if every worker fails before it is ready at
  the first start, it gives up and the process exits with status 1 and their
  messages, as a single process refusing to start would;
- on SIGHUP or a file change (``watch_interval``) reloads its own runtime
  first and, only if that is sound, sends every worker the new snapshot: a
  broken file is refused once, here, and the workers keep serving;
- forwards SIGUSR1 (reopen the access log) and, on stop, SIGTERM: each worker
  drains for ``drain_timeout``; one still alive a few seconds later is killed;
- runs the ACME service: its challenge answers go to every live worker (and
  are replayed to a restarted one before it accepts connections), and the
  CA is told a challenge is ready only once every worker acknowledged it;
  a newly issued certificate is served by every worker;
- serves ``metrics.listen``: each worker's metrics, labelled ``worker``,
  plus its own certificate and ACME gauges; a scrape waits at most
  ``METRICS_DEADLINE`` for the workers, and concurrent scrapes share one
  collection.

It must not: serve client traffic, parse worker logs beyond re-emitting their
events, or decide what a configuration means (`tlsproxy.service` does).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tlsproxy import control
from tlsproxy.config import Config
from tlsproxy.control import Snapshot, encode_snapshot
from tlsproxy.listeners import ListeningService
from tlsproxy.metrics import Metrics, merge_expositions
from tlsproxy.plain import ChallengeTokens
from tlsproxy.telemetry import AccessLogWriter
from tlsproxy.tls import ChallengeCertificates

__all__ = [
    "BackOff",
    "BoundSocket",
    "FanOutCertificates",
    "FanOutTokens",
    "WorkerSupervisor",
    "build_supervisor",
]

log = Logger()

#: Seconds a worker may take past ``drain_timeout`` before it is killed.
KILL_GRACE = 5.0
#: Seconds a worker has to acknowledge a challenge, a reload or a metrics page.
ANSWER_TIMEOUT = 10.0
#: Seconds between the watchdog's pings of every ready worker.
PING_INTERVAL = 10.0
#: Seconds without an answer to any ping after which a worker is considered hung
#: and killed (then restarted): far above any pause of a working event loop.
HUNG_AFTER = 60.0
#: Seconds a metrics scrape waits for the workers: well below Prometheus's
#: default scrape timeout (10 s), so one hung worker cannot fail the whole target.
METRICS_DEADLINE = 3.0
#: The fds a worker finds its log pipe, control channel and access log on
#: (listeners follow).
LOG_FD = 3
CONTROL_FD = 4
ACCESS_LOG_FD = 5
FIRST_LISTEN_FD = 6
#: How many of a worker's last error lines say why it could not start.
LAST_WORDS = 3


@attrs.frozen
class BackOff:
    """How long to wait before restarting a worker that exited unexpectedly.

    The n-th consecutive crash waits ``initial * 2**(n-1)`` seconds, at most
    ``maximum``; a worker that ran ``reset_after`` seconds is no longer in a
    crash loop, so its next crash counts as the first.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0

    def delay(self, crashes: int) -> float:
        """The wait before restarting after ``crashes`` consecutive crashes (≥ 1)."""
        return float(min(self.maximum, self.initial * 2 ** max(0, crashes - 1)))


def _answers_by_worker(
    slots: list[_Slot], calls: list[Deferred[Any]], what: str
) -> Deferred[dict[int, Any | Failure]]:
    """Gather the answers of ``calls`` (one per slot) by worker index, once all
    answered, failed or timed out; each failure is logged with ``what``."""

    def answers(results: list[tuple[bool, Any]]) -> dict[int, Any | Failure]:
        out: dict[int, Any | Failure] = {}
        for slot, (ok, value) in zip(slots, results, strict=True):
            out[slot.index] = value
            if not ok:
                log.warn(
                    "worker {worker}: {what} failed: {error}",
                    worker=slot.index,
                    what=what,
                    error=value.getErrorMessage(),
                )
        return out

    done: Deferred[dict[int, Any | Failure]] = DeferredList(calls, consumeErrors=True).addCallback(
        answers
    )
    return done


class Caller(Protocol):
    """A worker's end of the control channel, as the parent sees it (AMP)."""

    def callRemote(self, commandType: Any, *a: Any, **kw: Any) -> Any: ...


class Handle(Protocol):
    """A running worker process."""

    pid: int | None
    #: The last errors it logged or wrote on stderr (why it could not start).
    last_words: list[str]

    def signal(self, name: str) -> None:
        """Send the signal ``name`` (``TERM``, ``KILL``, …); nothing if it already exited."""


class Launcher(Protocol):
    """Starts worker processes; reports back through the supervisor's
    `WorkerSupervisor.worker_ready` and `WorkerSupervisor.worker_exited`."""

    def launch(self, index: int, supervisor: WorkerSupervisor) -> Handle: ...


@attrs.define(eq=False)
class _Slot:
    """One of the N worker positions and the process filling it."""

    index: int
    handle: Handle | None = None
    #: Set once the worker said Ready: it then receives every broadcast.
    control: Caller | None = None
    started: float = 0.0
    crashes: int = 0
    restart: IDelayedCall | None = None
    #: Why this slot's first process failed before it was ready (None: it has not).
    first_failure: str | None = None
    #: When the worker last answered a ping (or became ready), in clock seconds.
    answered: float = 0.0


class FanOutTokens(ChallengeTokens):
    """http-01 tokens that every worker answers (same interface as `ChallengeTokens`)."""

    def __init__(self) -> None:
        super().__init__()
        self.supervisor: WorkerSupervisor | None = None
        #: What is published now, replayed to a (re)started worker.
        self.published: dict[str, str] = {}

    def publish(self, token: str, key_authorization: str) -> None:
        super().publish(token, key_authorization)  # checks the values
        self.published[token] = key_authorization
        if self.supervisor is not None:
            self.supervisor.broadcast(
                control.PublishToken, token=token, key_authorization=key_authorization
            )

    def remove(self, token: str) -> None:
        super().remove(token)
        self.published.pop(token, None)
        if self.supervisor is not None:
            self.supervisor.broadcast(control.RemoveToken, token=token)


class FanOutCertificates(ChallengeCertificates):
    """tls-alpn-01 certificates that every worker presents (same interface as
    `ChallengeCertificates`)."""

    def __init__(self) -> None:
        super().__init__()
        self.supervisor: WorkerSupervisor | None = None
        #: name → (key PEM, certificate PEM), replayed to a (re)started worker.
        self.published: dict[str, tuple[bytes, bytes]] = {}

    def publish(self, name: str, key: Any, certificate: Any) -> None:
        super().publish(name, key, certificate)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.published[name.lower()] = (key_pem, cert_pem)
        if self.supervisor is not None:
            self.supervisor.broadcast(
                control.PublishChallengeCertificate, name=name, key=key_pem, certificate=cert_pem
            )

    def remove(self, name: str) -> None:
        super().remove(name)
        self.published.pop(name.lower(), None)
        if self.supervisor is not None:
            self.supervisor.broadcast(control.RemoveChallengeCertificate, name=name)


def _describe_exit(code: int | None, signal_name: str | None) -> str:
    if signal_name is not None:
        return f"was killed by {signal_name}"
    return f"exited with status {code}"


class WorkerSupervisor(Service):
    """Keeps ``count`` workers running and talks to all of them.

    ``launcher`` starts the processes; ``clock`` provides ``IReactorTime``;
    ``drain_timeout`` returns the live configuration's value; ``snapshot``
    the encoded `tlsproxy.control.Snapshot` every worker is to serve.  ``tokens`` and
    ``certificates`` are the ACME service's challenge answers, replayed to
    every worker when it becomes ready.
    """

    def __init__(
        self,
        count: int,
        launcher: Launcher,
        clock: Any,
        *,
        drain_timeout: Callable[[], float],
        snapshot: Callable[[], bytes] = lambda: b"",
        tokens: FanOutTokens | None = None,
        certificates: FanOutCertificates | None = None,
        backoff: BackOff | None = None,
        on_fatal: Callable[[str], object] | None = None,
    ) -> None:
        self.slots = [_Slot(i) for i in range(count)]
        #: Called once if no worker could be started at all (see `worker_exited`).
        self.on_fatal = on_fatal
        #: Whether any worker has become ready since the service started.
        self.served = False
        self.launcher = launcher
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.snapshot = snapshot
        self._snapshots = 0
        self.tokens = tokens if tokens is not None else FanOutTokens()
        self.certificates = certificates if certificates is not None else FanOutCertificates()
        self.tokens.supervisor = self
        self.certificates.supervisor = self
        self.backoff = backoff if backoff is not None else BackOff()
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None
        self._give_up: IDelayedCall | None = None
        #: Publications not yet acknowledged by every worker.
        self._pending: set[Deferred[Any]] = set()
        #: The scrapes waiting for the metrics collection under way (None: none is).
        self._collecting: list[Deferred[dict[str, str]]] | None = None
        self._watchdog: IDelayedCall | None = None
        self._last_tick = 0.0

    # Processes.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.served = False
        for slot in self.slots:
            slot.first_failure = None
            self._launch(slot)
        self._last_tick = self.clock.seconds()
        self._watchdog = self.clock.callLater(PING_INTERVAL, self._watch)

    def _watch(self) -> None:
        """Ping every ready worker; kill one that has not answered for `HUNG_AFTER`."""
        now = self.clock.seconds()
        if now - self._last_tick > 2 * PING_INTERVAL:
            # This process itself did not run (stopped, suspended): the workers'
            # silence says nothing, so their time starts again.
            for slot in self.slots:
                slot.answered = now
        self._last_tick = now
        for slot in self.slots:
            if slot.control is None or slot.handle is None:
                continue
            if now - slot.answered >= HUNG_AFTER:
                log.error(
                    "worker {worker} (pid {pid}) has not answered for {seconds:.0f} s: killing it",
                    worker=slot.index,
                    pid=slot.handle.pid,
                    seconds=now - slot.answered,
                )
                slot.handle.signal("KILL")
                slot.answered = now  # once; its exit restarts it
                continue
            # No answer timeout: a late answer still counts; silence is what kills.
            ping: Deferred[Any] = slot.control.callRemote(control.Ping)
            ping.addCallbacks(self._pong, lambda _: None, callbackArgs=(slot, slot.handle))
        self._watchdog = self.clock.callLater(PING_INTERVAL, self._watch)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _pong(self, _answer: object, slot: _Slot, handle: Handle) -> None:
        if slot.handle is handle:
            slot.answered = self.clock.seconds()

    def _launch(self, slot: _Slot) -> None:
        slot.restart = None
        slot.control = None
        slot.started = self.clock.seconds()
        try:
            slot.handle = self.launcher.launch(slot.index, self)
        except OSError as exc:  # e.g. out of file descriptors or processes: try again later
            if self._failed_before_ready(slot, f"worker {slot.index} cannot be started: {exc}"):
                return
            slot.crashes += 1
            delay = self.backoff.delay(slot.crashes)
            log.error(
                "worker {worker} cannot be started: {error}; trying again in {delay:g} s",
                worker=slot.index,
                error=exc,
                delay=delay,
            )
            slot.restart = self.clock.callLater(delay, self._launch, slot)
            return
        log.info("worker {worker} started (pid {pid})", worker=slot.index, pid=slot.handle.pid)

    def worker_ready(self, index: int, handle: Handle, caller: Caller) -> Deferred[None]:
        """The worker in slot ``index`` is up: send it the current snapshot and
        replay the current challenges to it; it starts accepting connections
        when this fires."""
        slot = self.slots[index]
        if slot.handle is not handle or self._stopping:
            return succeed(None)
        slot.control = caller  # from now on it receives every broadcast, in order
        slot.answered = self.clock.seconds()
        calls = [self._configure(slot, "start")]
        calls += [
            self._call(slot, control.PublishToken, token=token, key_authorization=auth)
            for token, auth in self.tokens.published.items()
        ]
        calls += [
            self._call(slot, control.PublishChallengeCertificate, name=n, key=k, certificate=c)
            for n, (k, c) in self.certificates.published.items()
        ]

        def replayed(results: list[tuple[bool, Any]]) -> None:
            started, answer = results[0]
            if started and answer["ok"]:
                self.served = True
                log.info("worker {worker} ready (pid {pid})", worker=index, pid=handle.pid)

        return DeferredList(calls, consumeErrors=True).addCallback(replayed)

    def worker_exited(
        self, index: int, handle: Handle, code: int | None, signal_name: str | None
    ) -> None:
        """The worker process in slot ``index`` ended: restart it unless stopping."""
        slot = self.slots[index]
        if slot.handle is not handle:
            return
        was_ready = slot.control is not None
        slot.handle = None
        slot.control = None
        how = _describe_exit(code, signal_name)
        if self._stopping:
            log.info("worker {worker} (pid {pid}) {how}", worker=index, pid=handle.pid, how=how)
            self._check_stopped()
            return
        words = list(getattr(handle, "last_words", ()))
        why = f"worker {index} {how} before it was ready" + (
            f": {'; '.join(words)}" if words else ""
        )
        if not was_ready and self._failed_before_ready(slot, why):
            return
        if self.clock.seconds() - slot.started >= self.backoff.reset_after:
            slot.crashes = 0
        slot.crashes += 1
        delay = self.backoff.delay(slot.crashes)
        log.error(
            "worker {worker} (pid {pid}) {how} unexpectedly; restarting it in {delay:g} s",
            worker=index,
            pid=handle.pid,
            how=how,
            code=code,
            signal=signal_name,
            delay=delay,
        )
        slot.restart = self.clock.callLater(delay, self._launch, slot)

    def _failed_before_ready(self, slot: _Slot, why: str) -> bool:
        """Note that ``slot``'s worker failed before it was ready; once every
        slot's did and none was ever ready since the start, no worker can
        serve (an interpreter the user cannot run, a file it cannot read):
        give up like a single process refusing to start.  True if given up."""
        if self.served or self._stopping:
            return False
        if slot.first_failure is None:
            slot.first_failure = why
        if any(s.first_failure is None for s in self.slots):
            return False
        message = "no worker could start: " + " | ".join(
            s.first_failure for s in self.slots if s.first_failure
        )
        log.critical("{message}", message=message)
        self._stopping = True  # no more restarts
        self._stop_watchdog()
        for other in self.slots:
            if other.restart is not None and other.restart.active():
                other.restart.cancel()
            other.restart = None
        if self.on_fatal is not None:
            self.on_fatal(message)
        return True

    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [s.handle.pid for s in self.slots if s.handle is not None and s.handle.pid]

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker (each drains), wait for them, kill stragglers."""
        super().stopService()
        self._stopping = True
        self._stop_watchdog()
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        self._stopped = Deferred()
        running = [s for s in self.slots if s.handle is not None]
        if running:
            log.info("stopping {count} workers", count=len(running))
        for slot in running:
            assert slot.handle is not None
            slot.handle.signal("TERM")
        grace = self.drain_timeout() + KILL_GRACE
        self._kill = self.clock.callLater(grace, self._kill_remaining)
        stopped = self._stopped
        self._check_stopped()
        return stopped

    def _kill_remaining(self) -> None:
        self._kill = None
        for slot in self.slots:
            if slot.handle is not None:
                log.warn(
                    "worker {worker} (pid {pid}) still running: killing it",
                    worker=slot.index,
                    pid=slot.handle.pid,
                )
                slot.handle.signal("KILL")
        self._give_up = self.clock.callLater(KILL_GRACE, self._finish)

    def _check_stopped(self) -> None:
        if self._stopped is not None and all(s.handle is None for s in self.slots):
            self._finish()

    def _finish(self) -> None:
        for call in (self._kill, self._give_up):
            if call is not None and call.active():
                call.cancel()
        self._kill = self._give_up = None
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    # Talking to the workers.

    def _call(self, slot: _Slot, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
        assert slot.control is not None
        d: Deferred[Any] = slot.control.callRemote(command, **kwargs)
        d.addTimeout(ANSWER_TIMEOUT, self.clock)
        return d

    def broadcast(
        self, command: type[amp.Command], **kwargs: Any
    ) -> Deferred[dict[int, Any | Failure]]:
        """Send ``command`` to every ready worker.

        :return: fires with each worker's answer (or `Failure`) by index, once
            all answered, failed or timed out; a failure is logged.
        """
        slots = [s for s in self.slots if s.control is not None]
        calls = [self._call(s, command, **kwargs) for s in slots]
        done = _answers_by_worker(slots, calls, command.__name__)
        self._pending.add(done)
        done.addBoth(self._settled, done)
        return done

    def _settled(self, result: Any, d: Deferred[Any]) -> Any:
        self._pending.discard(d)
        return result

    def acknowledged(self) -> Deferred[None]:
        """Fires once every broadcast sent so far has been answered (or failed)."""
        if not self._pending:
            return succeed(None)
        waiting: list[Deferred[None]] = []
        for pending in list(self._pending):
            mirror: Deferred[None] = Deferred()

            def relay(result: Any, mirror: Deferred[None] = mirror) -> Any:
                mirror.callback(None)
                return result

            pending.addBoth(relay)
            waiting.append(mirror)
        return gatherResults(waiting).addCallback(lambda _: None)

    def _configure(self, slot: _Slot, kind: str) -> Deferred[Any]:
        """Send the current snapshot to one worker, page by page; the final page's answer."""
        data = self.snapshot()
        self._snapshots += 1
        final: Deferred[Any] | None = None
        for offset in range(0, max(len(data), 1), control.PAGE):
            last = offset + control.PAGE >= len(data)
            d = self._call(
                slot,
                control.Configure,
                snapshot=self._snapshots,
                offset=offset,
                data=control.pages(data, offset),
                final=last,
                kind=kind,
            )
            if last:
                final = d
            else:
                d.addErrback(lambda _: None)  # the final page reports the outcome
        assert final is not None
        return final

    def configure_workers(self, kind: str) -> Deferred[dict[int, Any | Failure]]:
        """Send the current snapshot to every ready worker (``kind``: ``reload`` or
        ``certificates``); fires with each worker's answer (or `Failure`) by index."""
        slots = [s for s in self.slots if s.control is not None]
        return _answers_by_worker(slots, [self._configure(s, kind) for s in slots], kind)

    def reload_workers(self, kind: str = "reload") -> Deferred[bool]:
        """Send every worker the new snapshot; fires with whether all applied it."""

        def check(answers: dict[int, Any]) -> bool:
            ok = True
            for index, answer in sorted(answers.items()):
                if isinstance(answer, Failure):
                    ok = False
                elif not answer["ok"]:
                    ok = False
                    log.error(
                        "worker {worker} refused the new configuration and keeps its own: {errors}",
                        worker=index,
                        errors="; ".join(answer["errors"]),
                    )
            return ok

        return self.configure_workers(kind).addCallback(check)

    def certificates_changed(self) -> Deferred[bool]:
        """Make every worker serve the certificates ACME just stored."""
        return self.reload_workers("certificates")

    def reopen_logs(self) -> Deferred[Any]:
        """Tell every worker to reopen its access log."""
        return self.broadcast(control.ReopenLogs)

    def collect_metrics(self) -> Deferred[dict[str, str]]:
        """Every ready worker's Prometheus exposition, by worker index (as text).

        Answers within `METRICS_DEADLINE` seconds with the workers that replied
        by then (the others are logged), so one hung worker cannot make every
        scrape time out.  Scrapes arriving while a collection is under way share
        it: each worker keeps one metrics snapshot, which a second collection
        would replace in the middle of the first one's paging.
        """
        scrape: Deferred[dict[str, str]] = Deferred()
        if self._collecting is not None:
            self._collecting.append(scrape)
        else:
            self._collecting = [scrape]
            self._collect(self._collecting)
        return scrape

    def _collect(self, waiting: list[Deferred[dict[str, str]]]) -> None:
        """Run one collection for the scrapes in ``waiting`` (more may join it)."""
        slots = [s for s in self.slots if s.control is not None]
        out: dict[str, str] = {}
        remaining = {s.index for s in slots}

        def done() -> None:
            if self._collecting is not waiting:
                return  # answered already
            self._collecting = None
            if deadline.active():
                deadline.cancel()
            for index in sorted(remaining):
                log.warn(
                    "worker {worker}: no metrics within {seconds:g} s; left out of this scrape",
                    worker=index,
                    seconds=METRICS_DEADLINE,
                )
            for scrape in waiting:
                scrape.callback(dict(out))

        def got(text: str, slot: _Slot) -> None:
            out[str(slot.index)] = text
            remaining.discard(slot.index)
            if not remaining:
                done()

        def failed(failure: Failure, slot: _Slot) -> None:
            if self._collecting is waiting:
                remaining.discard(slot.index)
                log.warn(
                    "worker {worker}: no metrics: {error}",
                    worker=slot.index,
                    error=failure.getErrorMessage(),
                )
                if not remaining:
                    done()

        deadline = self.clock.callLater(METRICS_DEADLINE, done)
        for slot in slots:
            d = Deferred.fromCoroutine(self._metrics_of(slot))
            d.addCallbacks(got, failed, callbackArgs=(slot,), errbackArgs=(slot,))
        if not remaining:
            done()  # no worker ready: the parent's own metrics only

    async def _metrics_of(self, slot: _Slot) -> str:
        answer = await self._call(slot, control.MetricsPage, snapshot=0, offset=0)
        data = bytearray(answer["data"])
        while len(data) < answer["total"]:
            if slot.control is None:
                raise RuntimeError("the worker went away")
            answer = await self._call(
                slot, control.MetricsPage, snapshot=answer["snapshot"], offset=len(data)
            )
            if not answer["data"]:
                raise RuntimeError("the worker's metrics snapshot changed")
            data += answer["data"]
        return bytes(data).decode("utf-8")


# The real processes.


class ParentControl(amp.AMP):
    """The parent's end of one worker's control channel."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, handle: Handle) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.index = index
        self.handle = handle

    @control.Ready.responder
    def ready(self, pid: int) -> Deferred[dict[str, Any]]:
        d = self.supervisor.worker_ready(self.index, self.handle, self)
        return d.addCallback(lambda _: {})


class _ControlFactory(Factory):
    noisy = False

    def __init__(self, protocol: ParentControl) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> ParentControl:
        return self.protocol_instance


def reemit(line: bytes, index: int) -> dict[str, Any] | None:
    """Publish one JSON log event of worker ``index`` in this process's log.

    The event keeps its own fields and format (it is formatted once, by this
    process's observers) and gains ``worker`` and a ``log_system`` naming it.

    :return: the event (None: the line was not one, and was logged as text).
    """
    try:
        event = eventFromJSON(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        event = None
    if not isinstance(event, dict):
        log.info("worker {worker}: {line}", worker=index, line=line.decode("utf-8", "replace"))
        return None
    event["worker"] = index
    event["log_system"] = f"worker-{index}"
    globalLogPublisher(event)
    return event


class WorkerProcess(ProcessProtocol):
    """One worker process: its log pipe and stderr re-emitted, its end reported."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self._partial: dict[int, bytes] = {}
        #: Its last errors (logged at error level or above, or on stderr).
        self.last_words: list[str] = []

    def signal(self, name: str) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(name)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > 1024 * 1024:  # a runaway line: emit what there is
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if not line.strip():
            return
        if fd == LOG_FD:
            event = reemit(line, self.index)
            level = event.get("log_level") if event is not None else None
            if event is not None and level is not None and level >= LogLevel.error:
                self._remember(formatEvent(event))
        else:
            self._remember(line.decode("utf-8", "replace").strip())
            log.warn(
                "worker {worker} stderr: {line}",
                worker=self.index,
                line=line.decode("utf-8", "replace"),
            )

    def _remember(self, text: str) -> None:
        self.last_words = [*self.last_words, text][-LAST_WORDS:]

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._partial.items()):
            if rest:
                self._line(fd, rest)
        self._partial.clear()
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        name = None
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
        self.supervisor.worker_exited(self.index, self, code, name)


class SpawnLauncher:
    """Starts ``python -m tlsproxy.worker`` with the listening sockets of
    ``listeners``, a fresh socketpair as its control channel and the access
    log the parent opened (``access_log`` returns its descriptor, if any)."""

    def __init__(
        self,
        reactor: Any,
        listeners: list[BoundSocket],
        access_log: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.access_log = access_log
        self.listeners = listeners

    def launch(self, index: int, supervisor: WorkerSupervisor) -> Handle:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [
            sys.executable,
            "-m",
            "tlsproxy.worker",
            "--index",
            str(index),
            "--log-fd",
            str(LOG_FD),
            "--control-fd",
            str(CONTROL_FD),
        ]
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: "r", LOG_FD: "r"}
        child_fds[CONTROL_FD] = child_end.fileno()
        access_log = self.access_log()
        if access_log is not None:
            child_fds[ACCESS_LOG_FD] = access_log
            args += ["--access-log-fd", str(ACCESS_LOG_FD)]
        fd = FIRST_LISTEN_FD
        for bound in self.listeners:
            if bound.port is None:
                continue
            port: Any = bound.port
            child_fds[fd] = port.fileno()
            args += ["--listen", f"{fd}:{int(port.socket.family)}:{bound.kind}"]
            fd += 1
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = WorkerProcess(supervisor, index)
        try:
            self.reactor.spawnProcess(process, sys.executable, args, env=env, childFDs=child_fds)
            protocol = ParentControl(supervisor, index, process)
            self.reactor.adoptStreamConnection(
                parent_end.fileno(), socket.AF_UNIX, _ControlFactory(protocol)
            )
        finally:
            parent_end.close()  # the reactor holds its own copy
            child_end.close()  # the worker holds its own copy
        return process


class BoundSocket(ListeningService):
    """Binds a listener in `privilegedStartService` like `ListeningService`, but
    never accepts: the socket is handed to the workers."""

    def __init__(self, endpoint: IStreamServerEndpoint, kind: str, where: str, foreground: bool):
        factory = Factory.forProtocol(TwistedProtocol)
        factory.noisy = False
        super().__init__(endpoint, factory, where, foreground)
        self.kind = kind

    def _listening(self, port: IListeningPort | Failure) -> None:
        super()._listening(port)
        if self.port is not None:
            self.port.stopReading()  # type: ignore[attr-defined]


class MergedMetricsResource(Resource):
    """``/metrics`` of a supervisor: its own gauges plus every worker's metrics."""

    isLeaf = True

    def __init__(self, metrics: Metrics, collect: Callable[[], Deferred[dict[str, str]]]) -> None:
        super().__init__()
        self.metrics = metrics
        self.collect = collect

    def render_GET(self, request: Any) -> Any:
        gone: list[bool] = []  # the scraper disconnected (or the request finished)

        def answer(workers: dict[str, str]) -> None:
            own = generate_latest(self.metrics.registry).decode("utf-8")
            body = merge_expositions(own, workers)
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("metrics: cannot merge the workers' metrics", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.finish()

        request.notifyFinish().addBoth(lambda _: gone.append(True))
        self.collect().addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


def merged_metrics_site(metrics: Metrics, collect: Callable[[], Deferred[dict[str, str]]]) -> Site:
    """The supervisor's metrics listener: merged Prometheus text at ``/metrics``."""
    root = Resource()
    root.putChild(b"metrics", MergedMetricsResource(metrics, collect))
    return Site(root)


class _Signals(Service):
    """Forwards SIGUSR1 (reopen logs) to the workers, chaining twistd's handler.

    The parent holds the access log open (opened before privileges were
    dropped) to hand it to each worker it starts; it reopens its copy too, so
    a worker started after logrotate writes to the new file.
    """

    def __init__(
        self, supervisor: WorkerSupervisor, reactor: Any, access_log: AccessLogWriter | None
    ) -> None:
        self.supervisor = supervisor
        self.reactor = reactor
        self.access_log = access_log
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reopen)
        if callable(self._previous):
            self._previous(signum, frame)

    def _reopen(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()
        self.supervisor.reopen_logs()

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
        if self.access_log is not None:
            self.access_log.stop()


def _exit_status_at_exit(status: int) -> None:
    """Make this process exit with ``status`` once twistd has cleaned up (its pid
    file removed, its log closed): twistd itself always exits with 0 after a
    clean reactor stop."""

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(status)

    atexit.register(exit_now)


def build_supervisor(
    config: Config, reactor: Any, *, foreground: bool, config_path: str
) -> MultiService:
    """The parent's service tree for ``workers`` above 1: every start-up check
    exactly as for one process, the listeners bound, the workers supervised.

    :raises ConfigError: with every error found, before anything binds.
    """
    from tlsproxy.config import parse_yaml, read_config_text
    from tlsproxy.errors import ConfigError
    from tlsproxy.service import build_runtime, check_start, start_acme, wire_observers

    # The text the workers are sent is the text checked here (read once more:
    # the caller parsed the file a moment ago, under the name the user gave).
    text = read_config_text(config_path)
    config = parse_yaml(text, config.source)
    served = {"text": text}
    # A (re)started worker takes the settings that change only at a restart from here.
    started_with = text
    tokens = FanOutTokens()
    certificates = FanOutCertificates()
    parts = check_start(config, reactor, tokens=tokens, challenges=certificates)
    runtime, top = build_runtime(parts, reactor, config_path=config_path, plain=False)
    top.access_log = None  # opened for the workers; written by them
    listeners: list[BoundSocket] = []
    for kind, endpoints, strings in (
        ("https", parts.https, config.listen.https),
        ("http", parts.http, config.listen.http),
    ):
        for i, endpoint in enumerate(endpoints):
            where = f"{config.source}: listen.{kind}[{i}] ({strings[i]})"
            bound = BoundSocket(endpoint, kind, where, foreground)
            bound.setServiceParent(top)
            listeners.append(bound)

    def snapshot() -> bytes:
        current = runtime.current
        return encode_snapshot(
            Snapshot(current.config.source, served["text"], current.certificates, started_with)
        )

    def fatal(message: str) -> None:
        # As a single process refusing to start: the reason on the terminal, and
        # a non-zero exit status for systemd, docker and scripts.
        if foreground:
            print(f"tlsproxy: {message}", file=sys.__stderr__, flush=True)
        _exit_status_at_exit(1)

        def stop() -> None:
            with contextlib.suppress(ReactorNotRunning):
                reactor.stop()

        reactor.callWhenRunning(stop)  # now, or once running (a failed first spawn)

    supervisor = WorkerSupervisor(
        config.workers,
        SpawnLauncher(
            reactor,
            listeners,
            parts.access_log.fileno if parts.access_log is not None else lambda: None,
        ),
        reactor,
        drain_timeout=lambda: runtime.current.config.drain_timeout,
        snapshot=snapshot,
        tokens=tokens,
        certificates=certificates,
        on_fatal=fatal,
    )

    def reload() -> bool:
        try:
            text = read_config_text(config_path)
            new = parse_yaml(text, config_path)
        except ConfigError as exc:
            return runtime.refuse(exc)
        if not runtime.replace(new):
            return False
        served["text"] = text
        supervisor.reload_workers()
        return True

    def certificates_changed() -> bool:
        ok = runtime.certificates_changed()
        if ok:
            supervisor.certificates_changed()
        return ok

    top.reload = reload
    metrics = wire_observers(runtime, None)
    if metrics is not None and config.metrics is not None:
        where = f"{config.source}: metrics.listen ({config.metrics.listen})"
        site = merged_metrics_site(metrics, supervisor.collect_metrics)
        ListeningService(parts.metrics_endpoints[0], site, where, foreground).setServiceParent(top)
    start_acme(
        parts,
        runtime,
        reactor,
        top,
        acknowledged=supervisor.acknowledged,
        on_issued=certificates_changed,
    )
    supervisor.setServiceParent(top)
    _Signals(supervisor, reactor, parts.access_log).setServiceParent(top)
    log.info("{count} worker processes will serve the listeners", count=config.workers)
    return top
