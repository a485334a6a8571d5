"""The benchmark in bench/ keeps working: its configurations, parsers, report and a tiny run.

The in-memory tests check what the benchmark generates and how it reads its
tools' output; the end-to-end tests run real nginx, HAProxy's config check,
wrk, curl and tlsproxy for a few seconds, so that ``bench/run`` cannot rot
between the (manual) full runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import configs, loadgen, measure, profile, report, websocket, wsecho
from bench.handshake import _complete
from tests.e2e.harness import IN_CI, ROOT, free_port, need_tool, wait_for_port

#: The sign after ratios in the report.
X = report.TIMES

WRK_OUTPUT = """\
Running 1s test @ https://127.0.0.1:4443/small
  1 threads and 64 connections
BENCH_JSON {"requests":12000,"duration_us":2000000,"bytes":3000000,\
"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0},\
"p50_us":1500,"p90_us":2500,"p99_us":9000,"max_us":20000}
"""


def test_wrk_summary_is_read_from_the_scripts_json_line() -> None:
    """The keep-alive rate is requests over wrk's measured duration; latencies are in ms."""
    result = measure.parse_wrk(WRK_OUTPUT)
    assert result["rate"] == 6000
    assert result["p50_ms"] == 1.5
    assert result["p99_ms"] == 9.0
    assert result["errors"]["status"] == 2


def test_wrk_output_without_the_summary_line_is_an_error() -> None:
    """A wrk run that printed no summary (crashed, wrong script) is not read as zero."""
    with pytest.raises(ValueError, match="BENCH_JSON"):
        measure.parse_wrk("Running 1s test\nunable to connect to 127.0.0.1:1\n")


def test_curl_transfer_must_be_complete_and_successful() -> None:
    """A bulk result counts only for a 200 that moved the whole body; MB/s are 10^6 bytes/s."""
    good = measure.parse_curl("200 67108864 0 0.5\n", expected_bytes=67108864, upload=False)
    assert good["mb_per_s"] == pytest.approx(134.217728)
    upload = measure.parse_curl("200 9 1000 2\n", expected_bytes=1000, upload=True)
    assert upload["mb_per_s"] == pytest.approx(0.0005)
    with pytest.raises(ValueError, match="status 502"):
        measure.parse_curl("502 100 0 0.1\n", expected_bytes=100, upload=False)
    with pytest.raises(ValueError, match="moved 65536 bytes"):
        measure.parse_curl("200 9 65536 0.1\n", expected_bytes=67108864, upload=True)


def test_s_client_summary_names_protocol_suite_and_group() -> None:
    """The TLS check reads what ``openssl s_client -brief`` prints."""
    text = (
        "CONNECTION ESTABLISHED\nProtocol version: TLSv1.3\n"
        "Ciphersuite: TLS_AES_128_GCM_SHA256\nPeer signature type: ECDSA\n"
        "Server Temp Key: X25519, 253 bits\n"
    )
    assert measure.parse_s_client(text) == {
        "protocol": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
        "group": "X25519",
        "signature": "ECDSA",
    }


def test_handshake_client_knows_when_a_response_is_complete() -> None:
    """The handshake load generator stops reading at the end of a Content-Length body."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert not _complete(head + b"abc")
    assert _complete(head + b"abcde")
    assert not _complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")


def _results(metrics: dict[str, dict[str, float]]) -> dict[str, object]:
    return {
        "meta": {
            "date": "2026-11-22 07:00 UTC",
            "command": "bench/run",
            "machine": "test",
            "pinning": "none",
            "mode": "short",
            "settings": "test",
            "versions": "test",
        },
        "peers": list(metrics),
        "metrics": metrics,
        "targets": report.check_targets(metrics),
        "tls": {},
        "problems": [],
    }


def test_report_shows_ratios_to_nginx_and_checks_targets() -> None:
    """The table gives each peer's value with its ratio to nginx; targets need the rate
    ratio and the per-CPU-second ratio to hold."""
    metrics = {
        "nginx": {
            "keepalive_rps": 20000.0,
            "keepalive_per_cpu_s": 20000.0,
            "keepalive_p99_ms": 10.0,
            "download_mb_s": 400.0,
        },
        "tlsproxy": {
            "keepalive_rps": 15000.0,
            "keepalive_per_cpu_s": 10000.0,
            "keepalive_p99_ms": 20.0,
            "download_mb_s": 440.0,
            "idle_rss_mib": 70.0,
        },
        "twisted": {"keepalive_rps": 1000.0},
    }
    results = _results(metrics)
    text = report.render_text(results)
    assert f"15,000 (0.75{X})" in text
    assert f"440 (1.10{X})" in text
    targets = {row["target"]: row for row in results["targets"]}  # type: ignore[attr-defined]
    keepalive = targets["keep-alive requests/s vs nginx"]
    assert keepalive["measured"] == 0.75 and keepalive["per_cpu_second"] == 0.5
    assert keepalive["met"] is False
    assert targets["keep-alive requests/s vs stock twisted.web.proxy"]["met"] is True
    assert targets["64 MiB download MB/s vs nginx"]["met"] is True
    assert targets["keep-alive p99 latency vs nginx"]["met"] is True
    assert targets["idle RSS per process (MiB)"]["met"] is False
    assert targets["full handshakes/s vs nginx"]["met"] is None
    markdown = report.render_markdown(results)
    assert f"| keep-alive requests/s | 20,000 | 15,000 (0.75{X}) | 1,000 (0.05{X}) |" in markdown


def test_profile_summary_ranks_self_and_inclusive_time() -> None:
    """py-spy's collapsed stacks become the hottest functions, outer loop left out."""
    lines = [
        "run (twisted/base.py:1);doRead (internet/tcp.py:5);recv (OpenSSL/SSL.py:9) 30",
        "run (twisted/base.py:1);doRead (internet/tcp.py:5);parse (tlsproxy/proxy.py:7) 60",
        "run (twisted/base.py:1);doPoll (internet/epollreactor.py:3) 10",
    ]
    summary = profile.summarize(lines)
    assert summary.total == 100
    assert summary.self_time[0] == ("parse (tlsproxy/proxy.py)", 60)
    assert summary.inclusive[0] == ("doRead (internet/tcp.py)", 90)
    assert all(not frame.startswith("run ") for frame, _ in summary.inclusive)
    assert "60.0%  parse (tlsproxy/proxy.py)" in profile.render(summary)


def test_websocket_frames_follow_rfc_6455() -> None:
    """The echo backend answers the RFC's sample key with the RFC's accept value, unmasks
    what the load generator masks, and frames its answer as the generator expects."""
    assert wsecho.accept_value(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    sent = websocket.message()
    assert sent[0] == 0x81 and sent[1] == 0x80 | len(websocket.PAYLOAD)
    assert wsecho.unmask(sent[6:], sent[2:6]) == websocket.PAYLOAD
    assert b"\x81" + bytes([len(websocket.PAYLOAD)]) + websocket.PAYLOAD == websocket.ECHO
    assert wsecho.frame(0x2, b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"
    assert wsecho.frame(0x2, b"x" * 70000)[:2] == b"\x82\x7f"


def test_every_proxy_routes_websockets_to_the_echo_backend(tmp_path: Path) -> None:
    """nginx (with the upgrade headers it needs), HAProxy and tlsproxy send the WebSocket
    prefix to the echo backend and everything else to the HTTP backend."""
    pki = configs.write_pki(tmp_path)
    nginx = configs.nginx_proxy_conf(prefix=tmp_path, port=1, backend_port=2, pki=pki, ws_port=3)
    haproxy = configs.haproxy_conf(port=1, backend_port=2, pki=pki, ws_port=3)
    tlsproxy = configs.tlsproxy_config(port=1, backend_port=2, pki=pki, ws_port=3)
    assert f"location {configs.WS_PREFIX}" in nginx and "proxy_set_header Upgrade" in nginx
    assert "server 127.0.0.1:3;" in nginx
    assert f"use_backend ws if {{ path_beg {configs.WS_PREFIX} }}" in haproxy
    assert tlsproxy["hosts"][configs.SERVER_NAME]["routes"] == [
        {"path": configs.WS_PREFIX, "backend": "http://127.0.0.1:3"}
    ]


def test_websocket_runs_with_errors_do_not_count() -> None:
    """WebSocket medians use only runs whose dropped connections stay within the limit."""
    good = {"rate": 100.0, "messages": 1000, "errors": {"echo": 0}, "p99_ms": 2.0, "cpu_pct": 50}
    bad = {**good, "rate": 5.0, "errors": {"echo": 30}}
    metrics: dict[str, float] = {}
    problems = report.aggregate("haproxy", {"websocket": [good, bad]}, metrics)
    assert metrics["ws_msgs_per_s"] == 100.0
    assert metrics["ws_per_cpu_s"] == 200.0
    assert problems == ["haproxy: WebSocket run with errors {'echo': 30}"]


def test_a_stalled_connection_is_counted_and_closed_at_the_time_limit() -> None:
    """The load generators' loop ends at its time limit even if a connection never
    becomes ready, closes it and reports it (as a ``stalled`` error)."""
    import selectors
    import socket
    import time

    a, b = socket.socketpair()
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, None)
    started = time.monotonic()
    assert loadgen.run_loop(sel, lambda data: None, started + 0.2) == 1
    assert time.monotonic() - started < 5
    assert a.fileno() == -1
    b.close()


def test_a_run_that_completed_nothing_does_not_count() -> None:
    """A run with no completed request, handshake or message is a problem, not a rate of 0."""
    empty = {"rate": 0.0, "handshakes": 0, "errors": {"stalled": 0}, "resumed": 0, "cpu_pct": 1}
    ws = {"rate": 0.0, "messages": 0, "errors": {"stalled": 0}, "p99_ms": 0.0, "cpu_pct": 1}
    metrics: dict[str, float] = {}
    problems = report.aggregate("x", {"handshake": [empty], "websocket": [ws]}, metrics)
    assert "handshakes_per_s" not in metrics and "ws_msgs_per_s" not in metrics
    assert len(problems) == 2


def test_every_proxy_gets_the_same_tls_settings(tmp_path: Path) -> None:
    """nginx, HAProxy and tlsproxy are configured with the same suites, groups and certificate."""
    pki = configs.write_pki(tmp_path)
    nginx = configs.nginx_proxy_conf(prefix=tmp_path, port=1, backend_port=2, pki=pki)
    haproxy = configs.haproxy_conf(port=1, backend_port=2, pki=pki)
    tlsproxy = configs.tlsproxy_config(port=1, backend_port=2, pki=pki)
    ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    assert ciphers in nginx and ciphers in haproxy
    assert "X25519:prime256v1:secp384r1" in nginx and "X25519:prime256v1:secp384r1" in haproxy
    assert tlsproxy["tls"] == {"profile": "intermediate", "groups": list(configs.GROUPS)}
    assert "keepalive 64" in nginx and "proxy_request_buffering off" in nginx
    assert str(pki.combined) in haproxy
    assert tlsproxy["hosts"][configs.SERVER_NAME]["certificates"] == [str(pki.combined)]


@pytest.mark.e2e
def test_generated_nginx_and_haproxy_configurations_are_accepted(tmp_path: Path) -> None:
    """The real nginx and HAProxy accept the configurations the benchmark writes."""
    nginx = need_tool("nginx")
    haproxy = need_tool("haproxy")
    pki = configs.write_pki(tmp_path)
    (tmp_path / "www").mkdir()
    files = {
        "backend.conf": configs.nginx_backend_conf(prefix=tmp_path, port=1, docroot=tmp_path),
        "nginx.conf": configs.nginx_proxy_conf(
            prefix=tmp_path, port=2, backend_port=1, pki=pki, session_log_port=3, ws_port=4
        ),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        check = subprocess.run(
            [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / name), "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 0, check.stderr
    (tmp_path / "haproxy.cfg").write_text(
        configs.haproxy_conf(port=2, backend_port=1, pki=pki, ws_port=4)
    )
    check = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr + check.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("resume", [False, True])
def test_handshake_generator_resumes_a_session_only_when_told(tmp_path: Path, resume: bool) -> None:
    """Every connection of the handshake load generator is a full handshake, as nginx
    sees it (``$ssl_session_reused``), though the server offers tickets and a session id;
    with ``--resume`` nearly all resume, and nginx agrees."""
    nginx = need_tool("nginx")
    pki = configs.write_pki(tmp_path)
    backend_port, proxy_port, log_port = free_port(), free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "backend.conf").write_text(
        configs.nginx_backend_conf(prefix=tmp_path, port=backend_port, docroot=tmp_path / "www")
    )
    (tmp_path / "nginx.conf").write_text(
        configs.nginx_proxy_conf(
            prefix=tmp_path,
            port=proxy_port,
            backend_port=backend_port,
            pki=pki,
            session_log_port=log_port,
        )
    )
    procs = [
        subprocess.Popen(
            [
                nginx,
                "-p",
                str(tmp_path),
                "-c",
                str(tmp_path / name),
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for name in ("backend.conf", "nginx.conf")
    ]
    try:
        wait_for_port(backend_port, procs[0])
        wait_for_port(log_port, procs[1])
        out = subprocess.run(
            measure.handshake_command(port=log_port, connections=4, duration=1.0, resume=resume),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=True,
        ).stdout
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    result = measure.parse_json_line(out)
    logged = (tmp_path / "session.log").read_text().splitlines()
    assert result["handshakes"] >= 10
    assert len(logged) >= result["handshakes"]
    seen_resumed = sum(line.split()[0] == "r" for line in logged)
    if resume:
        assert result["resumed"] >= report.MIN_RESUMED_SHARE * result["handshakes"]
        assert seen_resumed >= result["resumed"]
    else:
        assert result["resumed"] == 0
        assert seen_resumed == 0, "nginx saw resumed sessions"


@pytest.mark.e2e
def test_short_benchmark_of_nginx_tlsproxy_and_the_relay_produces_results(tmp_path: Path) -> None:
    """A very short run against nginx and tlsproxy measures every quantity for both (and
    tlsproxy's RSS over a short soak), and keep-alive requests through the minimal relay
    (with tlsproxy's TLS settings); it writes JSON and Markdown, and leaves no server
    running."""
    for tool in ("nginx", "wrk", "curl", "openssl"):
        need_tool(tool)
    if not configs.ECHO_MODULE.exists():
        message = f"nginx's echo module {configs.ECHO_MODULE} is not installed (scripts/test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--short",
            "--peers",
            "nginx,tlsproxy,minimal",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--bulk-repetitions",
            "1",
            "--soak",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["problems"] == []
    for peer in ("nginx", "tlsproxy"):
        m = results["metrics"][peer]
        for key in (
            "keepalive_rps",
            "keepalive_p99_ms",
            "handshakes_per_s",
            "resumed_per_s",
            "ws_msgs_per_s",
            "download_mb_s",
            "upload_mb_s",
            "idle_rss_mib",
            "peak_rss_mib",
        ):
            assert m[key] > 0, (peer, key)
        assert results["tls"][peer]["tls13"]["group"] == "X25519"
    assert results["metrics"]["tlsproxy"]["soak_rss_change_pct"] >= 0
    assert results["tls"]["nginx"] == results["tls"]["tlsproxy"] == results["tls"]["minimal"]
    minimal = results["metrics"]["minimal"]
    assert minimal["keepalive_rps"] > 0
    assert "handshakes_per_s" not in minimal and "download_mb_s" not in minimal
    assert re.search(rf"keep-alive requests/s +[\d,]+ +[\d,]+ \(\d+\.\d\d{X}\)", proc.stdout)
    assert (tmp_path / "latest.md").read_text().startswith("# tlsproxy benchmark")
    run_dir = re.search(r"run directory (\S+);", proc.stdout)
    assert run_dir is not None
    assert not Path(run_dir.group(1)).exists()
    assert run_dir.group(1) not in _process_list(), "a server of the run is still running"


def _process_list() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


def test_runs_with_errors_or_resumed_handshakes_do_not_count() -> None:
    """Medians use only clean runs; a resumed handshake or failed requests are reported."""
    ok = {
        "rate": 100.0,
        "requests": 1000,
        "errors": {"read": 0},
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "cpu_pct": 50.0,
    }
    failing = {**ok, "rate": 9999.0, "errors": {"read": 100}}
    handshake = {
        "rate": 10.0,
        "handshakes": 100,
        "errors": {"connect": 0},
        "resumed": 0,
        "cpu_pct": 25.0,
    }
    resumed = {**handshake, "rate": 500.0, "resumed": 3}
    raw = {
        "keepalive": [ok, failing],
        "handshake": [handshake, resumed],
        "download": [{"runs_mb_per_s": [100.0, 300.0], "cpu_pct": 100.0}],
        "upload": [],
    }
    metrics: dict[str, float] = {}
    problems = report.aggregate("tlsproxy", raw, metrics)
    assert metrics["keepalive_rps"] == 100.0
    assert metrics["keepalive_per_cpu_s"] == 200.0
    assert metrics["handshakes_per_s"] == 10.0
    assert metrics["handshakes_per_cpu_s"] == 40.0
    assert metrics["download_mb_s"] == 200.0
    assert "upload_mb_s" not in metrics
    assert len(problems) == 2
    assert "resumed 3" in problems[1]


def test_resumption_runs_count_only_when_nearly_every_handshake_resumed() -> None:
    """A resumption run in which the server resumed too few sessions (tickets off, keys
    lost) is reported and left out, so the row never shows full handshakes as resumed."""
    good = {"rate": 40.0, "handshakes": 100, "errors": {"read": 0}, "resumed": 95, "cpu_pct": 50.0}
    few = {**good, "rate": 10.0, "resumed": 50}
    metrics: dict[str, float] = {}
    problems = report.aggregate("tlsproxy", {"resumption": [good, few]}, metrics)
    assert metrics["resumed_per_s"] == 40.0
    assert metrics["resumed_per_cpu_s"] == 80.0
    assert problems == ["tlsproxy: resumption run with errors {'read': 0}, resumed 50 of 100"]
