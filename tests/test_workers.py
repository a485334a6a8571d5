"""``workers: N`` in memory: the config key, the supervisor's restart and stop logic, the
control channel's commands, challenge fan-out and metrics merging. No processes, no sleeps."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from tests import pki
from tlsproxy import control
from tlsproxy.acme.challenges import alpn_certificate
from tlsproxy.certs import load_certified_key
from tlsproxy.config import (
    MAX_WORKERS,
    CertificateSource,
    available_cores,
    parse_config,
    with_restart_settings,
)
from tlsproxy.errors import ConfigError
from tlsproxy.metrics import Metrics, merge_expositions
from tlsproxy.plain import ChallengeTokens
from tlsproxy.supervisor import (
    KILL_GRACE,
    BackOff,
    FanOutCertificates,
    FanOutTokens,
    WorkerSupervisor,
    reemit,
)
from tlsproxy.tls import ChallengeCertificates
from tlsproxy.worker import WorkerControl

BASE: dict[str, Any] = {
    "listen": {"https": ["tcp:8443"]},
    "hosts": {
        "example.com": {
            "backend": "http://127.0.0.1:8000",
            "certificates": [{"key": "k.pem", "cert": "c.pem"}],
        }
    },
}


def config_with(**top: Any) -> Any:
    return parse_config({**BASE, **top}, "proxy.yaml")


@contextlib.contextmanager
def captured_events() -> Iterator[list[dict[str, Any]]]:
    """The log events published while the block runs."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


# The config key.


def test_workers_defaults_to_one_process_and_accepts_a_count_or_auto() -> None:
    """Without ``workers`` tlsproxy runs one process; ``workers: 3`` asks for three and
    ``workers: auto`` for one per CPU this process may use."""
    assert config_with().workers == 1
    assert config_with(workers=3).workers == 3
    assert config_with(workers=MAX_WORKERS).workers == MAX_WORKERS
    assert config_with(workers="auto").workers == min(available_cores(), MAX_WORKERS)


@pytest.mark.parametrize("value", [0, -1, "x", MAX_WORKERS + 1, True, 1.5, None, [2]])
def test_a_bad_workers_value_is_an_error_naming_the_key_and_the_allowed_values(
    value: Any,
) -> None:
    """``workers`` must be a whole number from 1 to 64 or ``auto``; anything else stops
    start-up with one line naming the file, the key and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        config_with(workers=value)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"proxy.yaml: workers: must be a whole number from 1 to {MAX_WORKERS}, or auto "
        f"(one per core), not {value!r}"
    ]


def test_a_bad_workers_value_is_reported_with_the_other_problems() -> None:
    """A bad ``workers`` does not hide other problems in the same file: all come in one run."""
    with pytest.raises(ConfigError) as caught:
        config_with(workers=0, drain_timeout=-1)
    paths = [p.path for p in caught.value.problems]
    assert paths == ["drain_timeout", "workers"]


@pytest.mark.parametrize("kind", ["https", "http"])
def test_a_proxy_protocol_listener_with_several_workers_is_refused_before_anything_binds(
    kind: str,
) -> None:
    """Workers share bare listening sockets, so an endpoint that wraps its connections
    (``haproxy:`` for the PROXY protocol) would lose the wrapper and break every
    connection: with ``workers`` above 1 it is a config error naming the key and the
    endpoint types that work; with one process it stays allowed."""
    listen = {"https": ["tcp:8443"], kind: ["tcp:8000", "haproxy:tcp:8444"]}
    with pytest.raises(ConfigError) as caught:
        config_with(listen=listen, workers=2)
    assert str(caught.value).splitlines() == [
        f"proxy.yaml: listen.{kind}[1]: haproxy: endpoints cannot be shared by workers "
        "(workers: 2); with workers above 1 use tcp:, tcp6:, unix:, systemd: endpoints, "
        "or workers: 1"
    ]
    assert (
        config_with(listen=listen, workers=1)
        .listen.https[-1]
        .startswith("haproxy:" if kind == "https" else "tcp:")
    )
    shared = {"https": ["tcp6:8443", "unix:/run/t.sock", "systemd:domain=INET:index=0"]}
    assert config_with(listen=shared, workers=2).workers == 2


# The supervisor, with a fake launcher.


class FakeHandle:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.last_words: list[str] = []

    def signal(self, name: str) -> None:
        self.signals.append(name)


class FakeLauncher:
    def __init__(self) -> None:
        self.launched: list[tuple[int, FakeHandle]] = []

    def launch(self, index: int, supervisor: WorkerSupervisor) -> FakeHandle:
        handle = FakeHandle(1000 + len(self.launched))
        self.launched.append((index, handle))
        return handle

    def current(self, index: int) -> FakeHandle:
        return [h for i, h in self.launched if i == index][-1]


class FakeCaller:
    """A worker's control channel: records commands; answers at once, or when told."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.waiting: list[tuple[str, Deferred[Any]]] = []

    def callRemote(self, commandType: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((commandType.__name__, kwargs))
        if self.answer:
            return succeed({"ok": True, "errors": []})
        d: Deferred[Any] = Deferred()
        self.waiting.append((commandType.__name__, d))
        return d

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def pending(self, name: str) -> list[Deferred[Any]]:
        return [d for n, d in self.waiting if n == name]


def supervisor_of(count: int, drain: float = 10.0) -> tuple[WorkerSupervisor, FakeLauncher, Clock]:
    clock = Clock()
    launcher = FakeLauncher()
    supervisor = WorkerSupervisor(count, launcher, clock, drain_timeout=lambda: drain)
    supervisor.startService()
    return supervisor, launcher, clock


def serve(supervisor: WorkerSupervisor, launcher: FakeLauncher, index: int = 0) -> FakeCaller:
    """Make the worker in slot ``index`` ready (it served), as after a normal start."""
    caller = FakeCaller()
    supervisor.worker_ready(index, launcher.current(index), caller)
    return caller


def test_every_worker_is_started_and_a_crashed_one_is_restarted_after_a_second() -> None:
    """With ``workers: 3`` three processes start; one that dies is logged and started
    again one second later, the others untouched."""
    supervisor, launcher, clock = supervisor_of(3)
    assert [i for i, _ in launcher.launched] == [0, 1, 2]
    assert supervisor.pids() == [1000, 1001, 1002]
    clock.advance(100)
    supervisor.worker_exited(1, launcher.current(1), None, "SIGKILL")
    assert supervisor.pids() == [1000, 1002]
    clock.advance(0.9)
    assert len(launcher.launched) == 3
    clock.advance(0.1)
    assert [i for i, _ in launcher.launched] == [0, 1, 2, 1]
    assert supervisor.pids() == [1000, 1003, 1002]


def test_a_crash_looping_worker_backs_off_up_to_thirty_seconds_and_recovers() -> None:
    """A worker that keeps dying at once is restarted after 1, 2, 4, 8, 16, then 30 s
    at most; once one ran for a minute, its next crash is treated as a first crash."""
    supervisor, launcher, clock = supervisor_of(1)
    serve(supervisor, launcher)
    waits = []
    for _ in range(8):
        supervisor.worker_exited(0, launcher.current(0), 1, None)
        before = len(launcher.launched)
        waited = 0.0
        while len(launcher.launched) == before:
            clock.advance(0.5)
            waited += 0.5
            assert waited <= 60
        waits.append(waited)
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
    clock.advance(60)  # this one stayed up
    supervisor.worker_exited(0, launcher.current(0), 1, None)
    clock.advance(1)
    assert len(launcher.launched) == 10


def test_back_off_delays() -> None:
    """The back-off doubles from its initial delay and is capped."""
    backoff = BackOff(initial=1, maximum=30)
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_an_exit_reported_for_a_replaced_process_changes_nothing() -> None:
    """A late exit report of a process already replaced does not restart anything again."""
    supervisor, launcher, clock = supervisor_of(1)
    serve(supervisor, launcher)
    first = launcher.current(0)
    supervisor.worker_exited(0, first, 1, None)
    clock.advance(1)
    supervisor.worker_exited(0, first, 1, None)
    clock.advance(60)
    assert len(launcher.launched) == 2


def test_stopping_sends_sigterm_and_waits_for_every_worker() -> None:
    """On stop each worker gets SIGTERM (it drains its connections); the supervisor has
    stopped once all of them exited, and restarts none of them."""
    supervisor, launcher, clock = supervisor_of(2)
    stopped = supervisor.stopService()
    assert [h.signals for _, h in launcher.launched] == [["TERM"], ["TERM"]]
    supervisor.worker_exited(0, launcher.current(0), 0, None)
    assert not stopped.called
    supervisor.worker_exited(1, launcher.current(1), 0, None)
    assert stopped.called
    clock.advance(100)
    assert len(launcher.launched) == 2
    assert not clock.getDelayedCalls()


def test_a_worker_that_does_not_drain_in_time_is_killed() -> None:
    """A worker still running ``drain_timeout`` plus a few seconds after SIGTERM gets
    SIGKILL; the stop completes when it is gone (or, bounded, shortly after)."""
    supervisor, launcher, clock = supervisor_of(2, drain=3)
    stopped = supervisor.stopService()
    supervisor.worker_exited(0, launcher.current(0), 0, None)
    clock.advance(3 + KILL_GRACE - 0.1)
    assert launcher.current(1).signals == ["TERM"]
    clock.advance(0.1)
    assert launcher.current(1).signals == ["TERM", "KILL"]
    assert not stopped.called
    clock.advance(KILL_GRACE)
    assert stopped.called


def test_a_restart_pending_at_stop_is_cancelled() -> None:
    """A crashed worker waiting for its restart is not started once tlsproxy is stopping."""
    supervisor, launcher, clock = supervisor_of(2)
    supervisor.worker_exited(0, launcher.current(0), 1, None)
    stopped = supervisor.stopService()
    supervisor.worker_exited(1, launcher.current(1), 0, None)
    assert stopped.called
    clock.advance(60)
    assert len(launcher.launched) == 2


# Challenge fan-out.


def test_a_published_token_reaches_every_worker_before_the_ca_is_told() -> None:
    """An http-01 token is sent to every running worker, and the ACME client's wait
    (``acknowledged``) ends only when all of them confirmed it."""
    supervisor, launcher, _clock = supervisor_of(2)
    callers = [FakeCaller(answer=False), FakeCaller(answer=False)]
    for i, caller in enumerate(callers):
        supervisor.worker_ready(i, launcher.current(i), caller)
    supervisor.tokens.publish("tok_1", "tok_1.thumb")
    assert [c.calls[1:] for c in callers] == [
        [("PublishToken", {"token": "tok_1", "key_authorization": "tok_1.thumb"})]
    ] * 2
    waited = supervisor.acknowledged()
    callers[0].pending("PublishToken")[0].callback({})
    assert not waited.called
    callers[1].pending("PublishToken")[0].callback({})
    assert waited.called
    assert supervisor.acknowledged().called  # nothing pending any more


def test_the_wait_for_acknowledgements_is_bounded() -> None:
    """A worker that never answers does not hold up issuance forever: the wait ends
    after the answer timeout (that worker's failure is logged)."""
    supervisor, launcher, clock = supervisor_of(1)
    supervisor.worker_ready(0, launcher.current(0), FakeCaller(answer=False))
    supervisor.tokens.publish("tok_2", "tok_2.thumb")
    waited = supervisor.acknowledged()
    clock.advance(9)
    assert not waited.called
    clock.advance(2)
    assert waited.called


def test_a_restarted_worker_gets_the_current_challenges_before_it_accepts() -> None:
    """A worker started while a challenge is pending is sent every published token and
    tls-alpn-01 certificate (not the removed ones) before its Ready is answered."""
    supervisor, launcher, _clock = supervisor_of(1)
    now = datetime.datetime.now(datetime.UTC)
    key, cert = alpn_certificate("Example.com", b"\x01" * 32, now)
    supervisor.tokens.publish("gone", "gone.thumb")
    supervisor.tokens.publish("tok_3", "tok_3.thumb")
    supervisor.tokens.remove("gone")
    supervisor.certificates.publish("Example.com", key, cert)
    caller = FakeCaller(answer=False)
    ready = supervisor.worker_ready(0, launcher.current(0), caller)
    assert caller.names() == ["Configure", "PublishToken", "PublishChallengeCertificate"]
    assert caller.calls[1][1] == {"token": "tok_3", "key_authorization": "tok_3.thumb"}
    assert caller.calls[2][1]["name"] == "example.com"
    assert caller.calls[2][1]["key"].startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not ready.called
    for _, d in caller.waiting:
        d.callback({"ok": True, "errors": []})
    assert ready.called


def test_fan_out_objects_keep_the_interfaces_of_the_single_process() -> None:
    """The parent's challenge stores are drop-in replacements: they validate and answer
    like the single process's (a bad token is refused before anything is sent)."""
    tokens = FanOutTokens()
    assert isinstance(tokens, ChallengeTokens)
    assert isinstance(FanOutCertificates(), ChallengeCertificates)
    supervisor, launcher, _clock = supervisor_of(1)
    caller = FakeCaller()
    supervisor.worker_ready(0, launcher.current(0), caller)
    with pytest.raises(ValueError):
        supervisor.tokens.publish("not a token!", "x")
    assert caller.names() == ["Configure"]
    supervisor.tokens.publish("tok_4", "tok_4.thumb")
    assert supervisor.tokens.get("tok_4") == b"tok_4.thumb"


def test_reload_and_certificate_changes_go_to_every_worker() -> None:
    """After the parent accepted a reload (or ACME stored a certificate) every worker is
    told; a worker that refuses is reported, the others keep the new configuration."""
    supervisor, launcher, _clock = supervisor_of(2)
    ok, refusing = FakeCaller(), FakeCaller(answer=False)
    supervisor.worker_ready(0, launcher.current(0), ok)
    supervisor.worker_ready(1, launcher.current(1), refusing)
    result = supervisor.reload_workers()
    refusing.pending("Configure")[-1].callback({"ok": False, "errors": ["proxy.yaml: x: bad"]})
    assert result.result is False
    supervisor.certificates_changed()
    for caller in (ok, refusing):
        assert [(n, kw["kind"], kw["final"]) for n, kw in caller.calls] == [
            ("Configure", "start", True),
            ("Configure", "reload", True),
            ("Configure", "certificates", True),
        ]


def test_a_large_snapshot_goes_over_in_ordered_pages() -> None:
    """A configuration snapshot bigger than one AMP value is sent in pages, in order,
    only the last one marked final."""
    clock = Clock()
    launcher = FakeLauncher()
    data = bytes(range(256)) * 1000  # 256,000 bytes
    supervisor = WorkerSupervisor(
        1, launcher, clock, drain_timeout=lambda: 1.0, snapshot=lambda: data
    )
    supervisor.startService()
    caller = FakeCaller()
    supervisor.worker_ready(0, launcher.current(0), caller)
    pages = [kw for _, kw in caller.calls]
    assert [p["offset"] for p in pages] == [0, 60000, 120000, 180000, 240000]
    assert [p["final"] for p in pages] == [False, False, False, False, True]
    assert b"".join(p["data"] for p in pages) == data
    assert len({p["snapshot"] for p in pages}) == 1


# The control channel, both ends in memory.


class FakeRuntime:
    def __init__(self) -> None:
        self.tokens = ChallengeTokens()
        self.challenges = ChallengeCertificates()
        self.replaced: list[tuple[Any, Any, bool]] = []
        self.refused: list[str] = []
        self.accept = True

    def replace(self, config: Any, certificates: Any, *, announce: bool = True) -> bool:
        self.replaced.append((config, certificates, announce))
        if not self.accept:
            self.refused = ["proxy.yaml: hosts.a.certificates[0]: key does not match"]
        return self.accept

    def refuse(self, exc: ConfigError) -> bool:
        self.refused = [p.render(exc.source) for p in exc.problems]
        return False


def snapshot_of(tmp_path: Path) -> control.Snapshot:
    """A snapshot of a one-host configuration whose certificate file is then removed."""
    pem = pki.write_combined(tmp_path, pki.make_ca().issue(["a.example", "www.a.example"]))
    certified, problems = load_certified_key(CertificateSource(str(pem), str(pem), None, "c"))
    assert certified is not None, problems
    pem.unlink()  # the worker must not need it
    text = (
        "listen: {https: ['tcp:8443']}\n"
        f"hosts: {{a.example: {{backend: 'http://127.0.0.1:8000', certificates: ['{pem}']}}}}\n"
    )
    return control.Snapshot("/etc/tlsproxy/proxy.yaml", text, {"a.example": [certified]})


def configure(parent: amp.AMP, pump: iosim.IOPump, data: bytes, kind: str, page: int = 1000) -> Any:
    """Send ``data`` as Configure pages of ``page`` bytes; the final page's answer."""
    offsets = list(range(0, len(data), page))
    for offset in offsets[:-1]:
        d = parent.callRemote(
            control.Configure, snapshot=7, offset=offset, data=data[offset : offset + page],
            final=False, kind=kind,
        )  # fmt: skip
        assert answer(d, pump) == {"ok": True, "errors": []}
    last = offsets[-1]
    d = parent.callRemote(
        control.Configure, snapshot=7, offset=last, data=data[last:], final=True, kind=kind
    )
    return answer(d, pump)


def test_restart_settings_come_from_the_configuration_tlsproxy_started_with() -> None:
    """A worker (re)started after reloads serves the current sites, certificates and TLS
    settings, but listen, proxy, access_log, metrics and workers as tlsproxy started with
    them, as the workers that only reloaded do (files named only in the old text are never
    read)."""
    started = config_with(
        proxy={"max_request_line": "8K"}, access_log={"path": "/var/log/a.log"}, workers=2
    )
    now = config_with(
        proxy={"max_request_line": "1K"},
        metrics={"listen": "tcp:9100:interface=127.0.0.1"},
        tls={"dhparam": "/etc/new-dh.pem"},
        workers=3,
    )
    merged = with_restart_settings(now, started)
    assert merged.tls == now.tls and merged.hosts == now.hosts
    for name in ("listen", "proxy", "access_log", "metrics", "workers"):
        assert getattr(merged, name) == getattr(started, name), name


def test_a_snapshot_keeps_what_the_parent_loaded(tmp_path: Path) -> None:
    """The configuration text and the loaded certificates (key, chain, names, expiry,
    where they came from) survive the trip to a worker unchanged."""
    snapshot = attrs.evolve(snapshot_of(tmp_path), started_with="workers: 2\n")
    back = control.decode_snapshot(control.encode_snapshot(snapshot))
    assert (back.source, back.text) == (snapshot.source, snapshot.text)
    assert back.started_with == "workers: 2\n"
    [original] = snapshot.certificates["a.example"]
    [copy] = back.certificates["a.example"]
    assert copy.leaf == original.leaf and copy.chain == original.chain
    assert copy.key.public_key() == original.key.public_key()
    assert (copy.key_type, copy.names, copy.not_after, copy.source) == (
        original.key_type,
        original.names,
        original.not_after,
        original.source,
    )
    with pytest.raises(ValueError):
        control.decode_snapshot(b'{"source": "x"}')


def test_the_first_snapshot_starts_the_worker_and_later_ones_reload_it(tmp_path: Path) -> None:
    """A worker builds itself from the first snapshot it is sent (never reading the
    configuration or certificate files); later snapshots are applied as reloads, a
    refusal coming back with its reasons."""
    snapshot = snapshot_of(tmp_path)
    data = control.encode_snapshot(snapshot)
    runtime = FakeRuntime()
    started: list[control.Snapshot] = []

    def start(received: control.Snapshot) -> list[str]:
        started.append(received)
        worker.runtime = runtime
        return []

    worker = WorkerControl(start=start)
    parent, _, pump = iosim.connectedServerAndClient(lambda: worker, amp.AMP)
    assert len(data) > 2000  # several pages
    assert configure(parent, pump, data, "start") == {"ok": True, "errors": []}
    assert [s.text for s in started] == [snapshot.text]
    assert started[0].certificates["a.example"][0].leaf == (
        snapshot.certificates["a.example"][0].leaf
    )

    assert configure(parent, pump, data, "reload") == {"ok": True, "errors": []}
    config, certificates, announce = runtime.replaced[-1]
    assert config.source == "/etc/tlsproxy/proxy.yaml"
    assert [h.name for h in config.hosts] == ["a.example"]
    assert certificates["a.example"][0].names == ("a.example", "www.a.example")
    assert announce is True
    assert configure(parent, pump, data, "certificates")["ok"] is True
    assert runtime.replaced[-1][2] is False  # a new ACME certificate is not a reload

    runtime.accept = False
    assert configure(parent, pump, data, "reload") == {"ok": False, "errors": runtime.refused}
    assert len(started) == 1


def test_a_worker_that_cannot_start_says_why(tmp_path: Path) -> None:
    """If a worker cannot build itself from the snapshot (e.g. it cannot open the access
    log), the answer carries the reasons."""
    data = control.encode_snapshot(snapshot_of(tmp_path))
    worker = WorkerControl(start=lambda _: ["proxy.yaml: access_log.path: cannot open x"])
    parent, _, pump = iosim.connectedServerAndClient(lambda: worker, amp.AMP)
    result = configure(parent, pump, data, "start", page=100_000)
    assert result == {"ok": False, "errors": ["proxy.yaml: access_log.path: cannot open x"]}


class FakeAccessLog:
    def __init__(self) -> None:
        self.reopened = 0

    def reopen(self) -> None:
        self.reopened += 1


def channel(
    runtime: FakeRuntime, metrics: Any = None, access_log: Any = None
) -> tuple[amp.AMP, WorkerControl, iosim.IOPump]:
    parent, worker, pump = iosim.connectedServerAndClient(
        lambda: WorkerControl(runtime, metrics, access_log), amp.AMP
    )
    return parent, worker, pump


def answer(d: Deferred[Any], pump: iosim.IOPump) -> Any:
    pump.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no answer"
    return results[0]


def test_commands_reach_the_workers_runtime_over_amp() -> None:
    """Over the control channel the parent can publish and remove challenge answers and
    make the worker reopen its access log."""
    runtime, access_log = FakeRuntime(), FakeAccessLog()
    parent, _, pump = channel(runtime, access_log=access_log)
    publish = parent.callRemote(control.PublishToken, token="abc", key_authorization="abc.x")
    assert answer(publish, pump) == {}
    assert runtime.tokens.get("abc") == b"abc.x"
    answer(parent.callRemote(control.RemoveToken, token="abc"), pump)
    assert runtime.tokens.get("abc") is None

    now = datetime.datetime.now(datetime.UTC)
    key, cert = alpn_certificate("a.example", b"\x02" * 32, now)
    fan = FanOutCertificates()
    fan.publish("a.example", key, cert)
    key_pem, cert_pem = fan.published["a.example"]
    d = parent.callRemote(
        control.PublishChallengeCertificate, name="a.example", key=key_pem, certificate=cert_pem
    )
    answer(d, pump)
    assert runtime.challenges.lookup(b"A.example") is not None
    answer(parent.callRemote(control.RemoveChallengeCertificate, name="a.example"), pump)
    assert runtime.challenges.lookup(b"a.example") is None

    answer(parent.callRemote(control.ReopenLogs), pump)
    assert access_log.reopened == 1
    assert answer(parent.callRemote(control.Ping), pump) == {}


def test_a_worker_notices_when_its_control_channel_closes() -> None:
    """When the parent goes away the worker's channel reports it (the worker then drains
    and exits instead of serving on unsupervised)."""
    lost: list[int] = []
    parent, _worker, pump = iosim.connectedServerAndClient(
        lambda: WorkerControl(FakeRuntime(), lost=lambda: lost.append(1)), amp.AMP
    )
    assert parent.transport is not None
    parent.transport.loseConnection()
    pump.flush()
    assert lost == [1]


def test_large_metrics_come_over_in_pages(tmp_path: Path) -> None:
    """Metrics larger than one AMP value (64 KiB) are fetched page by page, whole."""
    metrics = Metrics(lambda: 0, lambda: {}, lambda: {})
    for i in range(900):
        metrics.tls(f"reason number {i} " + "x" * 40)
    expected = generate_latest(metrics.registry)
    assert len(expected) > 2 * control.PAGE
    data = control.encode_snapshot(snapshot_of(tmp_path))
    launcher = FakeLauncher()
    supervisor = WorkerSupervisor(
        1, launcher, Clock(), drain_timeout=lambda: 1.0, snapshot=lambda: data
    )
    supervisor.startService()
    parent, _, pump = channel(FakeRuntime(), metrics=metrics)
    ready = supervisor.worker_ready(0, launcher.current(0), parent)
    answer(ready, pump)
    collected = supervisor.collect_metrics()
    for _ in range(10):
        pump.flush()
    text = answer(collected, pump)["0"]
    names = {
        s.labels.get("reason") for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert {f"reason number {i} " + "x" * 40 for i in range(900)} <= names


# Metrics merging.


def test_merged_metrics_label_each_workers_samples_and_keep_the_parents_gauges_once(
    tmp_path: Path,
) -> None:
    """A scrape of the parent shows every worker's counters with a ``worker`` label (so
    ``sum without (worker)`` totals them), and certificate/ACME gauges once."""
    pem = str(pki.write_combined(tmp_path, pki.make_ca().issue(["example.com"])))
    certified, problems = load_certified_key(CertificateSource(pem, pem, None, "c"))
    assert certified is not None, problems
    own = Metrics(lambda: 0, lambda: {"example.com": [certified]}, lambda: {})
    workers = {}
    for index, count in (("0", 2), ("1", 5)):
        m = Metrics(lambda: 3, lambda: {"example.com": [certified]}, lambda: {})
        for _ in range(count):
            m.tls(None)
        workers[index] = generate_latest(m.registry).decode()
    merged = merge_expositions(generate_latest(own.registry).decode(), workers).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    handshakes = families["tlsproxy_tls_handshakes"].samples
    totals = {s.labels["worker"]: s.value for s in handshakes if s.name.endswith("_total")}
    assert totals == {"0": 2.0, "1": 5.0}
    connections = families["tlsproxy_open_connections"].samples
    assert sorted((s.labels["worker"], s.value) for s in connections) == [("0", 3), ("1", 3)]
    expiry = families["tlsproxy_certificate_expiry_timestamp_seconds"].samples
    assert [s.labels for s in expiry] == [{"host": "example.com", "key_type": "ECDSA"}]
    assert merged.count("# TYPE tlsproxy_tls_handshakes_total counter") == 1


# Worker logs in the parent's log.


def test_worker_log_events_are_re_emitted_with_their_fields_and_the_worker() -> None:
    """A worker's log event appears in the parent's log with its own fields and format
    (formatted once, by the parent) plus which worker it came from."""
    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        event = {
            "log_format": "upstream {upstream}: {reason}",
            "upstream": "127.0.0.1:8000",
            "reason": "connection refused",
            "log_level": LogLevel.warn,
            "log_namespace": "tlsproxy.proxy",
            "log_time": 1700000000.0,
        }
        reemit(eventAsJSON(event).encode(), 3)
        reemit(b"not json at all", 4)
    finally:
        globalLogPublisher.removeObserver(observer)
    first = seen[0]
    assert first["log_format"] == "upstream {upstream}: {reason}"
    assert (first["upstream"], first["reason"], first["worker"]) == (
        "127.0.0.1:8000",
        "connection refused",
        3,
    )
    assert first["log_level"] == LogLevel.warn
    assert first["log_system"] == "worker-3"
    assert seen[1]["line"] == "not json at all"
    assert json.dumps(seen[1]["worker"]) == "4"


def test_workers_appending_to_one_access_log_never_split_a_line(tmp_path: Path) -> None:
    """Several workers writing the same access log (each with its own buffer, flushed on
    its own timer) leave only whole lines in it: every write carries whole lines."""
    from tlsproxy.accesslog import Entry
    from tlsproxy.telemetry import AccessLogWriter

    path = tmp_path / "access.log"
    writers = [AccessLogWriter(str(path), "json", Clock()) for _ in range(3)]
    for writer in writers:
        writer.open()
    for i in range(6000):
        writer = writers[i % 3]
        writer(
            Entry(
                time=1_700_000_000.0,
                client="192.0.2.1",
                method=b"GET",
                target=f"/{i % 3}/{i}/".encode() + b"x" * (i % 97),
                protocol="HTTP/1.1",
                host=b"example.com",
                status=200,
                bytes_sent=i,
                duration=0.001,
            )
        )
        if i % 1001 == 0:
            writer.flush()
    for writer in writers:
        writer.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == 6000
    assert sorted(json.loads(line)["bytes_sent"] for line in lines) == list(range(6000))


def test_a_worker_that_cannot_be_spawned_is_tried_again_with_back_off() -> None:
    """If starting a worker process fails (out of processes or file descriptors), the
    supervisor logs it and tries again after the back-off delay instead of giving up."""

    class Failing(FakeLauncher):
        failures = 2

        def launch(self, index: int, supervisor: WorkerSupervisor) -> FakeHandle:
            if index == 1 and self.failures:
                self.failures -= 1
                raise OSError(24, "Too many open files")
            return super().launch(index, supervisor)

    clock = Clock()
    launcher = Failing()
    supervisor = WorkerSupervisor(2, launcher, clock, drain_timeout=lambda: 1.0)
    supervisor.startService()
    serve(supervisor, launcher, 0)
    assert supervisor.pids() == [1000]
    clock.advance(1)
    assert supervisor.pids() == [1000]
    clock.advance(2)
    assert supervisor.pids() == [1000, 1001]


def test_a_worker_writes_the_access_log_its_supervisor_opened(tmp_path: Path) -> None:
    """A worker appends to the access-log file its supervisor opened (before dropping
    privileges), even when that file could not be opened by path any more."""
    from tlsproxy.accesslog import Entry
    from tlsproxy.telemetry import AccessLogWriter

    path = tmp_path / "access.log"
    parent = AccessLogWriter(str(path), "combined", Clock())
    parent.open()
    fd = parent.fileno()
    assert fd is not None
    inherited = os.dup(fd)  # what the worker process receives
    path.rename(tmp_path / "moved.log")  # the path no longer names the file
    worker = AccessLogWriter(str(path), "combined", Clock())
    worker.open(inherited)
    worker(
        Entry(
            time=1_700_000_000.0, client="192.0.2.1", method=b"GET", target=b"/w",
            protocol="HTTP/1.1", host=b"example.com", status=204, bytes_sent=0, duration=0.0,
        )
    )  # fmt: skip
    worker.stop()
    parent.stop()
    assert '"GET /w HTTP/1.1" 204' in (tmp_path / "moved.log").read_text()
    assert not path.exists()


def _entry(target: bytes = b"/") -> Any:
    from tlsproxy.accesslog import Entry

    return Entry(
        time=1_700_000_000.0, client="192.0.2.1", method=b"GET", target=target,
        protocol="HTTP/1.1", host=b"example.com", status=200, bytes_sent=0, duration=0.0,
    )  # fmt: skip


def test_a_failed_access_log_reopen_keeps_writing_to_the_old_file(tmp_path: Path) -> None:
    """When SIGUSR1 cannot open a new access log at the path (logrotate moved it and the
    directory is not writable, say), lines keep going to the file open before, and the
    supervisor still has a descriptor to hand to a worker it restarts; the error is logged."""
    from tlsproxy.telemetry import AccessLogWriter

    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path), "combined", Clock())
    writer.open()
    fd = writer.fileno()
    path.rename(tmp_path / "access.log.1")
    path.mkdir()  # the new file cannot be opened
    with captured_events() as events:
        writer.reopen()
    assert writer.fileno() == fd
    writer(_entry(b"/still-logged"))
    writer.stop()
    assert "/still-logged" in (tmp_path / "access.log.1").read_text()
    assert any(
        e["log_level"] == LogLevel.error and "cannot reopen" in e["log_format"] for e in events
    )


def test_a_worker_handed_no_access_log_starts_anyway_and_opens_it_later(tmp_path: Path) -> None:
    """A worker started without the supervisor's access-log descriptor opens the path
    itself; if it cannot, it logs why and serves without an access log (rather than
    failing to start and being restarted forever), and a later reopen picks the file up."""
    from tlsproxy.config import AccessLogSettings
    from tlsproxy.worker import own_access_log

    path = tmp_path / "logs" / "access.log"
    with captured_events() as events:
        writer = own_access_log(AccessLogSettings(path=str(path), format="combined"), Clock(), 1)
    assert writer.fileno() is None
    assert [e["worker"] for e in events if e["log_level"] == LogLevel.error] == [1]
    writer(_entry(b"/dropped"))
    path.parent.mkdir()
    writer.reopen()
    writer(_entry(b"/kept"))
    writer.stop()
    assert "/kept" in path.read_text() and "/dropped" not in path.read_text()


def test_when_no_worker_can_start_the_supervisor_gives_up_with_their_reasons() -> None:
    """If every worker fails before it is ready on the first start (an interpreter or a
    file the user tlsproxy runs as cannot use), tlsproxy stops with the workers' own
    messages, as a single process refusing to start would, instead of keeping its ports
    bound while clients hang; nothing is restarted."""
    fatal: list[str] = []
    clock = Clock()
    launcher = FakeLauncher()
    supervisor = WorkerSupervisor(
        2, launcher, clock, drain_timeout=lambda: 1.0, on_fatal=fatal.append
    )
    supervisor.startService()
    first = launcher.current(0)
    first.last_words = ["cannot start: ca.pem: Permission denied"]
    supervisor.worker_exited(0, first, 1, None)
    assert fatal == []
    clock.advance(1)  # slot 0 restarted; still no worker ever ready
    supervisor.worker_exited(1, launcher.current(1), 1, None)
    assert fatal == [
        "no worker could start: worker 0 exited with status 1 before it was ready: "
        "cannot start: ca.pem: Permission denied | worker 1 exited with status 1 before "
        "it was ready"
    ]
    clock.advance(100)
    assert len(launcher.launched) == 3
    assert not clock.getDelayedCalls()


def test_a_worker_failing_at_start_while_another_serves_is_retried() -> None:
    """Once one worker serves, another that fails before it is ready is a worker
    problem, not a start-up failure: it is restarted with back-off, tlsproxy keeps going."""
    fatal: list[str] = []
    clock = Clock()
    launcher = FakeLauncher()
    supervisor = WorkerSupervisor(
        2, launcher, clock, drain_timeout=lambda: 1.0, on_fatal=fatal.append
    )
    supervisor.startService()
    serve(supervisor, launcher, 1)
    for _ in range(3):
        supervisor.worker_exited(0, launcher.current(0), 1, None)
        clock.advance(30)
    assert fatal == []
    assert len(launcher.launched) == 5


# Scraping the supervisor's metrics.


class MetricsCaller(FakeCaller):
    """A ready worker whose metrics page is ``text`` (held back when ``answer`` is off)."""

    def __init__(self, text: str, answer: bool = True) -> None:
        super().__init__(answer)
        self.text = text.encode()

    def callRemote(self, commandType: Any, *args: Any, **kwargs: Any) -> Any:
        if commandType is not control.MetricsPage:
            return FakeCaller(answer=True).callRemote(commandType, *args, **kwargs)
        self.calls.append((commandType.__name__, kwargs))
        page = {"snapshot": 1, "data": self.text, "total": len(self.text)}
        if self.answer:
            return succeed(page)
        d: Deferred[Any] = Deferred()
        self.waiting.append((commandType.__name__, d))
        return d

    def release(self) -> None:
        for d in self.pending("MetricsPage"):
            if not d.called:
                d.callback({"snapshot": 1, "data": self.text, "total": len(self.text)})


def scraped(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def test_a_worker_that_stops_answering_pings_for_a_minute_is_killed_and_restarted() -> None:
    """The watchdog pings every ready worker every 10 s; one whose event loop has not
    answered for 60 s (stuck) is logged and killed once, and its exit restarts it, while
    a worker that answers is left alone."""
    supervisor, launcher, clock = supervisor_of(2)
    stuck, healthy = FakeCaller(answer=False), FakeCaller()
    supervisor.worker_ready(0, launcher.current(0), stuck)
    supervisor.worker_ready(1, launcher.current(1), healthy)
    stuck.pending("Configure")[0].callback({"ok": True, "errors": []})
    victim = launcher.current(0)
    with captured_events() as events:
        clock.pump([10.0] * 5)
        assert victim.signals == []
        assert stuck.names().count("Ping") == 5 and healthy.names().count("Ping") == 5
        clock.advance(10.0)
        assert victim.signals == ["KILL"]
        clock.pump([10.0] * 3)
        assert victim.signals == ["KILL"]  # killed once, not again while it exits
    assert launcher.current(1).signals == []
    assert [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error] == [
        "worker 0 (pid 1000) has not answered for 60 s: killing it"
    ]
    supervisor.worker_exited(0, victim, None, "KILL")
    clock.advance(1)
    assert launcher.current(0) is not victim


def test_a_late_ping_answer_counts_and_a_paused_supervisor_kills_nobody() -> None:
    """A worker that answers pings late (more than the 10 s any other command gets) but
    within the minute is kept; if the supervisor
    itself was not running for a while (stopped, suspended), the workers' silence over
    that time is not held against them."""
    supervisor, launcher, clock = supervisor_of(1)
    slow = FakeCaller(answer=False)
    supervisor.worker_ready(0, launcher.current(0), slow)
    slow.pending("Configure")[0].callback({"ok": True, "errors": []})
    clock.pump([10.0] * 5)
    slow.pending("Ping")[-3].callback({})  # the ping of 30 s, answered 20 s late
    clock.pump([10.0] * 5)
    assert launcher.current(0).signals == []
    clock.advance(500)  # the supervisor was stopped for minutes
    assert launcher.current(0).signals == []
    clock.pump([10.0] * 6)
    assert launcher.current(0).signals == ["KILL"]


def test_stopping_the_supervisor_stops_the_watchdog() -> None:
    """After stop, no more pings go out and nothing is left scheduled."""
    supervisor, launcher, clock = supervisor_of(1)
    caller = serve(supervisor, launcher)
    supervisor.stopService()
    supervisor.worker_exited(0, launcher.current(0), 0, None)
    clock.advance(100)
    assert "Ping" not in caller.names()
    assert not clock.getDelayedCalls()


def test_a_hung_worker_delays_a_scrape_by_three_seconds_at_most() -> None:
    """A worker that does not answer (stopped, stuck) is left out of a scrape after 3 s,
    well inside Prometheus's default 10 s scrape timeout, so the target stays up with
    the metrics of the workers that did answer; the missing worker is logged."""
    supervisor, launcher, clock = supervisor_of(2)
    supervisor.worker_ready(0, launcher.current(0), MetricsCaller("a 1\n"))
    supervisor.worker_ready(1, launcher.current(1), MetricsCaller("b 1\n", answer=False))
    with captured_events() as events:
        results = scraped(supervisor.collect_metrics())
        clock.advance(2.9)
        assert results == []
        clock.advance(0.1)
    assert results == [{"0": "a 1\n"}]
    warned = [e for e in events if e["log_level"] == LogLevel.warn]
    assert [e["worker"] for e in warned] == [1]


def test_concurrent_scrapes_share_one_collection_and_both_get_every_worker() -> None:
    """Two Prometheus servers scraping at once (an HA pair) both get every worker's
    metrics: the second scrape joins the collection under way instead of starting one
    that would replace the worker's metrics snapshot while the first is paging it."""
    supervisor, launcher, _ = supervisor_of(2)
    callers = [MetricsCaller("a 1\n", answer=False), MetricsCaller("b 1\n", answer=False)]
    for index, caller in enumerate(callers):
        supervisor.worker_ready(index, launcher.current(index), caller)
    first = scraped(supervisor.collect_metrics())
    second = scraped(supervisor.collect_metrics())
    for caller in callers:
        caller.release()
    assert first == second == [{"0": "a 1\n", "1": "b 1\n"}]
    assert [len(c.pending("MetricsPage")) for c in callers] == [1, 1]
    third = scraped(supervisor.collect_metrics())  # a later scrape collects afresh
    assert third == [] and [len(c.pending("MetricsPage")) for c in callers] == [2, 2]


def test_a_scrape_with_no_worker_ready_answers_at_once() -> None:
    """While no worker is ready, a scrape answers at once with the supervisor's own
    metrics rather than waiting."""
    supervisor, _, _ = supervisor_of(2)
    assert scraped(supervisor.collect_metrics()) == [{}]


def test_a_scraper_that_disconnects_early_is_not_answered_and_nothing_fails() -> None:
    """A scraper that gives up before the workers answered is simply not answered: no
    write to its closed connection and no error logged; a patient one gets the page."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    from twisted.web.server import NOT_DONE_YET
    from twisted.web.test.requesthelper import DummyRequest

    from tlsproxy.supervisor import MergedMetricsResource

    pending: list[Deferred[dict[str, str]]] = []

    def collect() -> Deferred[dict[str, str]]:
        pending.append(Deferred())
        return pending[-1]

    resource = MergedMetricsResource(Metrics(lambda: 0, lambda: {}, lambda: {}), collect)
    impatient, patient = DummyRequest([b"metrics"]), DummyRequest([b"metrics"])
    with captured_events() as events:
        assert resource.render_GET(impatient) is NOT_DONE_YET
        assert resource.render_GET(patient) is NOT_DONE_YET
        impatient.processingFailed(Failure(ConnectionLost()))
        for d in pending:
            d.callback({"0": "# TYPE x gauge\nx 1\n"})
    assert (impatient.finished, impatient.written) == (0, [])
    assert patient.finished == 1 and b'x{worker="0"} 1' in b"".join(patient.written)
    assert [e for e in events if e["log_level"] >= LogLevel.error] == []


def test_a_worker_failing_to_answer_a_broadcast_is_logged_once_not_as_a_traceback() -> None:
    """A worker that fails to acknowledge a command (it died, it timed out) is a routine
    event: one warning, no "Unhandled error in Deferred" traceback when it is collected."""
    import gc

    from twisted.internet.defer import fail

    class Failing(FakeCaller):
        def callRemote(self, commandType: Any, *args: Any, **kwargs: Any) -> Any:
            if commandType is control.ReopenLogs:
                return fail(RuntimeError("the worker went away"))
            return super().callRemote(commandType, *args, **kwargs)

    supervisor, launcher, _ = supervisor_of(1)
    with captured_events() as events:
        supervisor.worker_ready(0, launcher.current(0), Failing())
        answers = scraped(supervisor.reopen_logs())
        assert isinstance(answers[0][0], Failure)
        del answers
        gc.collect()
    assert [e["log_level"] for e in events if e["log_level"] >= LogLevel.warn] == [LogLevel.warn]


def test_lines_for_a_pipe_go_out_in_whole_line_chunks_of_at_most_pipe_buf() -> None:
    """Lines for a shared pipe are grouped into writes of at most 4096 bytes that end on
    a line boundary, in order; a line longer than that is written on its own."""
    from tlsproxy.telemetry import PIPE_BUF, line_chunks

    lines = [b"a" * 1000 + b"\n"] * 5 + [b"b" * 5000 + b"\n", b"c\n"]
    chunks = list(line_chunks(lines))
    assert b"".join(chunks) == b"".join(lines)
    assert [len(c) for c in chunks] == [4004, 1001, 5001, 2]
    assert all(c.endswith(b"\n") for c in chunks)
    assert all(len(c) <= PIPE_BUF for c in chunks if c.count(b"\n") > 1)
    assert list(line_chunks([])) == []
