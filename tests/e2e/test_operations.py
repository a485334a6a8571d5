"""Operating the real ``twistd -n tlsproxy``: access log lines (combined and JSON, reopened
on SIGUSR1), Prometheus metrics scraped over HTTP, draining in-flight requests on SIGTERM,
and dropping privileges after binding (``twistd -u/-g``)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests import pki
from tests.e2e.harness import (
    free_port,
    slow_backend,
    start_as_nobody,
    start_tlsproxy,
    wait_for,
    wait_for_port,
)

pytestmark = pytest.mark.e2e

NAME = "site.test"
#: twistd's exit status after a clean shutdown on SIGTERM (it re-raises the signal).
STOPPED = -signal.SIGTERM
SECRETS = ("sessionid=s3cr3t-cookie", "Basic dXNlcjpwYXNzd29yZA==", "s3cr3t-cookie", "dXNlcjpw")


@pytest.fixture
def backend() -> Iterator[ThreadingHTTPServer]:
    with slow_backend() as server:
        yield server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, x509.Certificate]:
    tmp = tmp_path_factory.mktemp("certs")
    ca = pki.make_ca()
    leaf = ca.issue([NAME])
    return pki.write_combined(tmp, leaf), pki.write_ca_file(tmp, ca), leaf.cert


def _config(certs: tuple[Path, Path, x509.Certificate], port: int, **extra: Any) -> dict[str, Any]:
    return {
        "hosts": {NAME: {"certificates": [str(certs[0])], "backend": f"http://127.0.0.1:{port}"}},
        **extra,
    }


def get(
    port: int, ca: Path, path: str = "/", host: str = NAME, headers: str = "", timeout: float = 10
) -> bytes:
    """One HTTPS request (SNI ``site.test``) with ``Connection: close``; the whole response."""
    context = ssl.create_default_context(cafile=str(ca))
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        tls.sendall(head.encode())
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
        return out


def lines(path: Path, count: int) -> list[str]:
    """The file's lines once it has ``count`` of them (the log is flushed every second)."""

    def ready() -> list[str] | None:
        found = path.read_text().splitlines() if path.exists() else []
        return found if len(found) >= count else None

    return list(wait_for(ready, f"{count} lines in {path}"))


COMBINED = re.compile(
    r"^127\.0\.0\.1 - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
    r'"GET /hello\?x=1 HTTP/1\.1" 200 (\d+) "https://ref\.example/page" "probe/1\.0"$'
)
PRIVATE = (
    "Cookie: sessionid=s3cr3t-cookie\r\nAuthorization: Basic dXNlcjpwYXNzd29yZA==\r\n"
    "Referer: https://ref.example/page\r\nUser-Agent: probe/1.0\r\n"
)


def test_combined_access_log_line(tmp_path: Path, backend: Any, certs: Any) -> None:
    """With ``access_log: {path: FILE}`` each request adds an nginx "combined" line (client,
    time, request line, status, body bytes, referer, user agent) and never the cookie or
    the credentials the client sent."""
    log = tmp_path / "access.log"
    config = _config(certs, backend.server_address[1], access_log={"path": str(log)})
    proxy = start_tlsproxy(config, tmp_path)
    try:
        response = get(proxy.https_port, certs[1], "/hello?x=1", headers=PRIVATE)
        assert response.startswith(b"HTTP/1.1 200")
        (line,) = lines(log, 1)
        match = COMBINED.match(line)
        assert match, line
        assert int(match.group(1)) == len(b"done /hello?x=1\n")
        assert not any(secret in line for secret in SECRETS)
    finally:
        assert proxy.stop() == STOPPED


def test_json_access_log_and_reopen_on_sigusr1(tmp_path: Path, backend: Any, certs: Any) -> None:
    """``format: json`` logs host, SNI, TLS version and cipher, upstream, status, bytes and
    duration (also for the proxy's own 421); after logrotate renames the file, SIGUSR1
    makes tlsproxy write to a new file at the configured path."""
    log = tmp_path / "access.json"
    port = backend.server_address[1]
    config = _config(certs, port, access_log={"path": str(log), "format": "json"})
    proxy = start_tlsproxy(config, tmp_path)
    try:
        get(proxy.https_port, certs[1], "/a", headers=PRIVATE)
        get(proxy.https_port, certs[1], "/b", host="other.test")
        first, second = (json.loads(line) for line in lines(log, 2))
        assert first["host"] == NAME and first["sni"] == NAME and first["site"] == NAME
        assert first["tls_version"] == "TLSv1.3"
        assert first["tls_cipher"].startswith("TLS_")
        assert first["upstream"] == f"127.0.0.1:{port}"
        assert (first["method"], first["target"], first["status"]) == ("GET", "/a", 200)
        assert first["bytes_sent"] == len(b"done /a\n")
        assert 0 <= first["duration"] < 10
        assert first["user_agent"] == "probe/1.0" and first["client"] == "127.0.0.1"
        assert not any(secret in log.read_text() for secret in SECRETS)
        assert (second["host"], second["status"], second["upstream"]) == ("other.test", 421, None)

        rotated = tmp_path / "access.json.1"
        log.rename(rotated)
        proxy.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "access log" in proxy.log and "reopened" in proxy.log, "the reopen")
        get(proxy.https_port, certs[1], "/c")
        (third,) = (json.loads(line) for line in lines(log, 1))
        assert third["target"] == "/c"
        assert len(rotated.read_text().splitlines()) == 2
    finally:
        assert proxy.stop() == STOPPED


def test_access_log_to_stdout(tmp_path: Path, backend: Any, certs: Any) -> None:
    """``path: "-"`` writes the lines to standard output (as in a container)."""
    config = _config(certs, backend.server_address[1], access_log={"path": "-"})
    proxy = start_tlsproxy(config, tmp_path)
    try:
        get(proxy.https_port, certs[1], "/stdout-probe")
        wait_for(lambda: '"GET /stdout-probe HTTP/1.1" 200' in proxy.log, "the line on stdout")
    finally:
        assert proxy.stop() == STOPPED


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


def test_metrics_scraped_over_http(tmp_path: Path, backend: Any, certs: Any) -> None:
    """``metrics: {listen: ...}`` serves Prometheus text at /metrics: requests by site and
    status class, the upstream latency histogram, open connections and each certificate's
    expiry time."""
    metrics_port = free_port()
    config = _config(
        certs,
        backend.server_address[1],
        metrics={"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
    )
    proxy = start_tlsproxy(config, tmp_path)
    try:
        for _ in range(3):
            assert get(proxy.https_port, certs[1], "/m").startswith(b"HTTP/1.1 200")
        get(proxy.https_port, certs[1], "/m", host="other.test")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        assert _sample(text, "tlsproxy_requests_total", host=NAME, code="2xx") == 3
        assert _sample(text, "tlsproxy_requests_total", host="-", code="4xx") == 1
        upstream = f"127.0.0.1:{backend.server_address[1]}"
        assert _sample(text, "tlsproxy_upstream_response_seconds_count", upstream=upstream) == 3
        assert _sample(text, "tlsproxy_open_connections") is not None
        expiry = _sample(text, "tlsproxy_certificate_expiry_timestamp_seconds", host=NAME)
        assert expiry == certs[2].not_valid_after_utc.timestamp()
        assert _sample(text, "tlsproxy_tls_handshakes_total") == 4

        # A client offering only a suite without forward secrecy, and a client that hangs
        # up before its handshake, are failures, by reason.
        def failures() -> dict[str, float]:
            with urllib.request.urlopen(url, timeout=10) as answer:
                text = answer.read().decode()
            return {
                reason: _sample(text, "tlsproxy_tls_handshake_failures_total", reason=reason) or 0
                for reason in ("no shared cipher", "closed before handshake")
            }

        before = failures()  # the harness's readiness probe closed before a handshake
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.set_ciphers("AES128-SHA")
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(raw, server_hostname=NAME)
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10).close()
        expected = {reason: count + 1 for reason, count in before.items()}
        deadline = time.monotonic() + 10
        while failures() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures() == expected
    finally:
        assert proxy.stop() == STOPPED


def _slow_request(port: int, ca: Path, seconds: float, out: list[bytes | Exception]) -> None:
    try:
        out.append(get(port, ca, f"/slow/{seconds}", timeout=30))
    except Exception as exc:
        out.append(exc)


def test_sigterm_drains_an_in_flight_request(tmp_path: Path, backend: Any, certs: Any) -> None:
    """On SIGTERM tlsproxy stops accepting connections at once but finishes a slow response
    already under way, then exits cleanly."""
    config = _config(certs, backend.server_address[1], drain_timeout=20)
    proxy = start_tlsproxy(config, tmp_path)
    out: list[bytes | Exception] = []
    thread = threading.Thread(target=_slow_request, args=(proxy.https_port, certs[1], 2, out))
    thread.start()
    assert backend.arrived.wait(10)
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_for(refused, "the listener to close", timeout=5)
    assert proxy.proc.poll() is None  # still serving the slow request
    thread.join(30)
    assert proxy.proc.wait(15) == STOPPED
    assert time.monotonic() - started >= 1
    assert len(out) == 1 and isinstance(out[0], bytes), out
    assert out[0].startswith(b"HTTP/1.1 200") and out[0].endswith(b"done /slow/2\n")
    assert proxy.stop() == STOPPED


def test_drain_timeout_cuts_off_what_is_left(tmp_path: Path, backend: Any, certs: Any) -> None:
    """A request that outlasts ``drain_timeout`` is dropped and tlsproxy exits on time."""
    config = _config(certs, backend.server_address[1], drain_timeout=1)
    proxy = start_tlsproxy(config, tmp_path)
    out: list[bytes | Exception] = []
    thread = threading.Thread(target=_slow_request, args=(proxy.https_port, certs[1], 8, out))
    thread.start()
    assert backend.arrived.wait(10)
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(6) == STOPPED
    assert time.monotonic() - started < 6
    thread.join(15)
    assert out and not (isinstance(out[0], bytes) and out[0].startswith(b"HTTP/1.1 200"))
    assert "drain timeout: dropping 1 connections" in proxy.log
    proxy.stop()


def _privileged_free_port() -> int:
    """A port below 1024 that is free on 127.0.0.1 (only root can bind it)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 needs root")
def test_privileges_dropped_after_binding(tmp_path: Path, backend: Any, certs: Any) -> None:
    """``twistd -u nobody -g nogroup`` binds a port below 1024 and reads the certificates as
    root, then runs as nobody and keeps serving HTTPS (and writing its access log)."""
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    port = _privileged_free_port()
    log = tmp_path / "access.log"
    config = _config(certs, backend.server_address[1], access_log={"path": str(log)})
    config["listen"] = {"https": [f"tcp:{port}:interface=127.0.0.1"]}
    proc = start_as_nobody(config, tmp_path)
    try:
        wait_for_port(port, proc)
        assert get(port, certs[1], "/as-nobody").endswith(b"done /as-nobody\n")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.M)
        gids = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.M)
        assert uids is not None and gids is not None
        assert {int(u) for u in uids.groups()} == {nobody.pw_uid}
        assert {int(g) for g in gids.groups()} == {nogroup.gr_gid}
        assert "/as-nobody" in lines(log, 1)[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
