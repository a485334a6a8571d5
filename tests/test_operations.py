"""Access-log formatting, the engine's per-request report and metrics, draining, and the
``access_log``/``metrics``/``drain_timeout`` config keys, all in memory."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from twisted.internet.task import Clock

from tests.proxyharness import BACKEND, Harness, request, response
from tlsproxy.accesslog import Entry, format_combined, format_json
from tlsproxy.config import AccessLogSettings, MetricsSettings, parse_config
from tlsproxy.drain import drain
from tlsproxy.errors import ConfigError
from tlsproxy.metrics import Metrics
from tlsproxy.telemetry import AccessLogWriter

SECRET_HEADERS = [(b"Cookie", b"sid=SECRET1"), (b"Authorization", b"Bearer SECRET2")]


def entry(**changes: Any) -> Entry:
    values: dict[str, Any] = {
        "time": 1_700_000_000.25,
        "client": "192.0.2.7",
        "method": b"GET",
        "target": b"/a?b=c",
        "protocol": "HTTP/1.1",
        "host": b"example.com",
        "status": 200,
        "bytes_sent": 5,
        "duration": 0.0123,
        "referer": b"https://r.example/",
        "user_agent": b"curl/8",
        "sni": "example.com",
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
        "upstream": "10.0.0.2:8080",
        "site": "example.com",
    }
    values.update(changes)
    return Entry(**values)


def test_combined_matches_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The combined line has nginx's fields in nginx's order and time format."""
    monkeypatch.setenv("TZ", "UTC")
    line = format_combined(entry())
    assert line == (
        '192.0.2.7 - - [14/Nov/2023:22:13:20 +0000] "GET /a?b=c HTTP/1.1" 200 5 '
        '"https://r.example/" "curl/8"\n'
    )


def test_combined_unknown_fields_are_dashes() -> None:
    """Missing referer and user agent are logged as "-", as nginx does."""
    line = format_combined(entry(referer=None, user_agent=None))
    assert line.endswith(' 200 5 "-" "-"\n')


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_combined_is_one_parseable_line_whatever_the_client_sent(
    agent: bytes, target: bytes
) -> None:
    """Quotes, backslashes, control and non-ASCII bytes are escaped: a client cannot break
    the line or forge a field."""
    line = format_combined(entry(user_agent=agent, target=target))
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.isascii()
    assert re.fullmatch(r'\S+ - - \[[^\]]+\] "[^"]*" \d+ \d+ "[^"]*" "[^"]*"\n', line)


def test_json_has_the_tls_and_upstream_fields() -> None:
    """The JSON line carries host, SNI, TLS version and cipher, upstream, status, bytes
    and duration."""
    record = json.loads(format_json(entry()))
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert record["host"] == "example.com" and record["sni"] == "example.com"
    assert (record["tls_version"], record["tls_cipher"]) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert (record["upstream"], record["status"], record["bytes_sent"]) == ("10.0.0.2:8080", 200, 5)
    assert record["duration"] == 0.0123
    assert set(record) == {
        "time", "client", "host", "site", "sni", "tls_version", "tls_cipher", "method",
        "target", "protocol", "status", "bytes_sent", "duration", "upstream", "referer",
        "user_agent",
    }  # fmt: skip


def _reports(h: Harness) -> list[Entry]:
    seen: list[Entry] = []
    h.factory.on_request = seen.append
    return seen


def test_engine_reports_each_proxied_response_once() -> None:
    """Each completed response is reported with status, body bytes, upstream and duration;
    the referer and user agent are passed, cookies and credentials are not."""
    h = Harness()
    seen = _reports(h)
    client, _ = h.client()
    headers = [(b"User-Agent", b"ua/1"), *SECRET_HEADERS]
    client.send(request(b"GET", b"/x", headers))
    h.pump()
    h.reactor.advance(0.5)
    h.backends[0].take()
    h.backends[0].send(response(201, b"abcdefg"))
    h.pump()
    assert client.take().startswith(b"HTTP/1.1 201")
    [e] = seen
    assert (e.status, e.bytes_sent, e.method, e.target) == (201, 7, b"GET", b"/x")
    assert (e.upstream, e.site, e.host, e.user_agent) == (
        f"{BACKEND.host}:{BACKEND.port}",
        "example.com",
        b"example.com",
        b"ua/1",
    )
    assert e.duration == 0.5
    assert not any(b"SECRET" in str(getattr(e, f)).encode() for f in Entry._fields)


def test_engine_reports_its_own_error_responses() -> None:
    """A request the proxy answers itself (421, 400) is reported with that status."""
    h = Harness()
    seen = _reports(h)
    client, _ = h.client()
    client.send(request(b"GET", b"/", [(b"Host", b"nowhere.test")], host=None))
    h.pump()
    assert client.take().startswith(b"HTTP/1.1 421")
    [e] = seen
    assert (e.status, e.upstream, e.site, e.host) == (421, None, None, b"nowhere.test")
    assert e.bytes_sent == len(b"421 Misdirected Request\n")


def test_metrics_count_requests_and_upstream_latency() -> None:
    """Requests are counted by configured site and status class, and proxied ones feed
    the upstream latency histogram."""
    metrics = Metrics(lambda: 3, dict, dict)
    metrics(entry(status=204, duration=0.02))
    metrics(entry(status=502))
    metrics(entry(status=421, site=None, upstream=None))
    text = generate_latest(metrics.registry).decode()
    assert 'tlsproxy_requests_total{code="2xx",host="example.com"} 1.0' in text
    assert 'tlsproxy_requests_total{code="5xx",host="example.com"} 1.0' in text
    assert 'tlsproxy_requests_total{code="4xx",host="-"} 1.0' in text
    assert 'tlsproxy_upstream_response_seconds_count{upstream="10.0.0.2:8080"} 2.0' in text
    assert (
        'tlsproxy_upstream_response_seconds_bucket{le="0.025",upstream="10.0.0.2:8080"} 2.0' in text
    )
    assert "tlsproxy_open_connections 3.0" in text


def test_metrics_report_acme_state() -> None:
    """The ACME service's per-host failures, last success and next renewal are exported."""

    class Status:
        failures = 2
        last_success = "2026-01-02T03:04:05+00:00"
        next_renewal = None

    metrics = Metrics(lambda: 0, dict, lambda: {"a.test": Status()})
    text = generate_latest(metrics.registry).decode()
    assert 'tlsproxy_acme_consecutive_failures{host="a.test"} 2.0' in text
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()
    assert f'tlsproxy_acme_last_success_timestamp_seconds{{host="a.test"}} {when:.9e}' in text or (
        f'tlsproxy_acme_last_success_timestamp_seconds{{host="a.test"}} {when}' in text
    )
    assert 'tlsproxy_acme_next_renewal_timestamp_seconds{host="a.test"}' not in text


def test_drain_closes_idle_connections_and_waits_for_busy_ones() -> None:
    """On shutdown an idle connection closes at once; one waiting for its response gets
    the response and is then closed; drain completes when both are gone."""
    h = Harness()
    idle, _ = h.client()
    busy, _ = h.client()
    busy.send(request(b"GET", b"/slow"))
    h.pump()
    done = drain([h.factory], h.reactor, 10)
    h.pump()
    assert idle.lost is not None and busy.lost is None
    assert not done.called
    h.backends[0].take()
    h.backends[0].send(response(200, b"late"))
    h.pump()
    h.reactor.advance(0.1)
    h.pump()
    assert busy.take().endswith(b"late") and busy.lost is not None
    h.reactor.advance(0.1)
    assert done.called


def test_drain_timeout_drops_what_is_left() -> None:
    """A response still not complete when ``drain_timeout`` passes is cut off."""
    h = Harness()
    busy, _ = h.client()
    busy.send(request(b"GET", b"/never"))
    h.pump()
    done = drain([h.factory], h.reactor, 1)
    for _ in range(11):
        h.reactor.advance(0.1)
    h.pump()
    assert done.called and busy.lost is not None


class ThreadClock(Clock):
    """A clock that runs ``callFromThread`` calls at once, as the reactor soon would."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_writer_buffers_flushes_on_timer_and_reopens(tmp_path: Path) -> None:
    """Lines are buffered and reach the file on the flush timer; ``reopen`` starts a new
    file at the path after the old one was renamed; SIGUSR1's previous handler still runs."""
    path = tmp_path / "access.log"
    clock = ThreadClock()
    writer = AccessLogWriter(str(path), "combined", clock)
    writer.open()
    called: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: called.append(signum))
    try:
        writer.start()
        writer(entry())
        assert path.read_text() == ""
        clock.advance(1)
        assert path.read_text().count("\n") == 1
        path.rename(tmp_path / "access.log.1")
        writer._on_usr1(signal.SIGUSR1, None)
        assert called == [signal.SIGUSR1]
        writer(entry(target=b"/after"))
        writer.stop()
        assert "/after" in path.read_text()
        assert "/after" not in (tmp_path / "access.log.1").read_text()
    finally:
        signal.signal(signal.SIGUSR1, previous)


DOC: dict[str, Any] = {
    "listen": {"https": ["tcp:8443"]},
    "hosts": {"a.test": {"certificates": ["/x.pem"], "backend": "http://127.0.0.1:1"}},
}


def test_config_defaults_are_off() -> None:
    """Without the keys there is no access log, no metrics, and a 10 s drain."""
    config = parse_config(DOC, "t.yaml")
    assert (config.access_log, config.metrics, config.drain_timeout) == (None, None, 10.0)


def test_config_keys_parse() -> None:
    """``access_log``, ``metrics`` and ``drain_timeout`` are read as given."""
    config = parse_config(
        {
            **DOC,
            "access_log": {"path": "-", "format": "json"},
            "metrics": {"listen": "tcp:9100:interface=127.0.0.1"},
            "drain_timeout": 3,
        },
        "t.yaml",
    )
    assert config.access_log == AccessLogSettings(path="-", format="json")
    assert config.metrics == MetricsSettings(listen="tcp:9100:interface=127.0.0.1")
    assert config.drain_timeout == 3.0


def test_config_errors_name_every_bad_key() -> None:
    """Bad values are all reported at once with their key paths."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                **DOC,
                "access_log": {"format": "apache", "rotate": True},
                "metrics": {},
                "drain_timeout": -1,
            },
            "t.yaml",
        )
    text = str(caught.value)
    for key in ("access_log.path", "access_log.rotate", "metrics.listen", "drain_timeout"):
        assert key in text, text


def test_stdout_target_is_not_sys_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    """``path: "-"`` writes to file descriptor 1 itself (twistd redirects sys.stdout)."""
    writer = AccessLogWriter("-", "combined", Clock())
    writer.open()
    writer(entry())
    writer.stop()
    assert '"GET /a?b=c HTTP/1.1" 200' in capfd.readouterr().out
    assert os.fstat(1)  # fd 1 is still open after stop


def test_example_config_documents_working_keys() -> None:
    """The commented ``access_log``/``metrics``/``drain_timeout`` lines in
    config/example.yaml are valid when uncommented."""
    import yaml

    example = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
    text = example.read_text()
    start = text.index("# access_log:")
    keys = re.findall(r"^# ((?:access_log|metrics|drain_timeout|  \w+):.*)$", text[start:], re.M)
    doc = yaml.safe_load("\n".join(keys))
    assert set(doc) == {"access_log", "metrics", "drain_timeout"}
    config = parse_config({**DOC, **doc}, "example.yaml")
    assert config.access_log is not None and config.metrics is not None


def test_handshake_failure_reason_is_openssls_short_reason() -> None:
    """A failed TLS handshake is labelled with OpenSSL's reason string; a connection closed
    before any handshake gets a fixed label, so the metric's labels stay few."""
    from OpenSSL.SSL import Error as SSLError
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from tlsproxy.proxy import handshake_failure_reason

    error = SSLError([("SSL routines", "", "no shared cipher")])
    assert handshake_failure_reason(Failure(error)) == "no shared cipher"
    assert handshake_failure_reason(Failure(SSLError([]))) == "tls error"
    assert handshake_failure_reason(Failure(ConnectionDone())) == "closed before handshake"


def test_failing_access_log_never_stops_deadlines() -> None:
    """An access log that cannot be written (full disk) does not break the proxy: the
    request is still answered, and later slow or silent clients and backends still
    time out."""
    h = Harness()
    calls: list[int] = []

    def on_request(entry: Entry) -> None:
        calls.append(entry.status)
        raise OSError(28, "No space left on device")

    h.factory.on_request = on_request
    first, _ = h.client()
    first.send(request())
    h.pump()
    h.advance(h.settings.backend_read_timeout + 2)  # the backend never answers: 504
    assert first.take().startswith(b"HTTP/1.1 504")
    slow, _ = h.client()
    slow.send(b"GET / HTTP/1.1\r\nHost: exa")
    third, _ = h.client()
    third.send(request())
    h.pump()
    h.advance(h.settings.client_header_timeout + 2)
    assert slow.lost is not None
    assert third.take().startswith(b"HTTP/1.1 504")
    assert calls == [504, 408, 504]


def test_writer_keeps_serving_when_the_disk_is_full(tmp_path: Path) -> None:
    """An access-log write error (full disk) is logged, not raised to the proxy."""
    writer = AccessLogWriter(str(tmp_path / "access.log"), "combined", Clock())

    class Full:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    writer._file = Full()  # type: ignore[assignment]
    writer(entry())
    writer(entry())


def test_one_broken_connection_does_not_stop_the_deadline_sweep() -> None:
    """An unexpected error while checking one connection's deadlines drops that
    connection, and the other connections' deadlines keep being enforced."""
    h = Harness()
    broken, broken_proto = h.client()
    slow, _ = h.client()
    slow.send(b"GET / HTTP/1.1\r\nHost: exa")

    def fail(now: float) -> None:
        raise RuntimeError("bug")

    broken_proto.check_deadlines = fail  # type: ignore[method-assign]
    h.advance(h.settings.client_header_timeout + 2)
    assert broken.lost is not None
    assert slow.lost is not None


def test_one_broken_upstream_timeout_does_not_stop_the_pool_sweep() -> None:
    """An unexpected error while handling one backend connection's timeout drops that
    backend connection, and other requests' backend timeouts still answer 504."""
    h = Harness()
    broken, broken_proto = h.client()
    broken.send(request())
    other, _ = h.client()
    other.send(request())
    h.pump()

    def fail() -> None:
        raise RuntimeError("bug")

    broken_proto.backend_timed_out = fail  # type: ignore[method-assign]
    h.advance(h.settings.backend_read_timeout + 2)
    assert other.take().startswith(b"HTTP/1.1 504")
    assert broken.take().startswith(b"HTTP/1.1 502")  # its backend connection was dropped
