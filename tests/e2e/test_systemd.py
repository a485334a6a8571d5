"""The systemd units in ``deploy/systemd/``: checked by systemd's own tools, and socket
activation run the way systemd does it (no systemd as PID 1 is needed for either)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import pki
from tests.e2e.harness import ROOT, need_tool, start_socket_activated

pytestmark = pytest.mark.e2e

UNITS = ROOT / "deploy" / "systemd"


def _units_here(directory: Path) -> Path:
    """The units, with /opt/tlsproxy/bin pointing at this virtualenv (verify checks that
    ExecStart exists)."""
    target = directory / "units"
    shutil.copytree(UNITS, target)
    for unit in target.rglob("*.service"):
        unit.write_text(
            unit.read_text().replace("/opt/tlsproxy/bin", str(Path(sys.executable).parent))
        )
    return target


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the service, the socket and the socket-activation
    drop-in without a single warning (an unknown or misspelt key would be one)."""
    analyze = need_tool("systemd-analyze")
    units = _units_here(tmp_path)
    done = subprocess.run(
        [analyze, "verify", str(units / "tlsproxy.service"), str(units / "tlsproxy.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    # The check is not vacuous: a misspelt hardening key is reported.
    broken = units / "broken"
    broken.mkdir()
    text = (units / "tlsproxy.service").read_text().replace("ProtectSystem=", "ProtectSystm=")
    (broken / "tlsproxy.service").write_text(text)
    bad = subprocess.run(
        [analyze, "verify", str(broken / "tlsproxy.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Unknown key 'ProtectSystm'" in bad.stderr


def _security(analyze: str, root: Path) -> str:
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={root}", "tlsproxy.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


def _exposure(report: str) -> float:
    found = re.search(r"Overall exposure level for tlsproxy.service: ([\d.]+)", report)
    assert found, report
    return float(found.group(1))


def test_service_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score for the service is "OK" (at most 2.0 of 10): read-only
    system, no new privileges, only CAP_NET_BIND_SERVICE, private /tmp and devices, …; with
    the socket-activation drop-in it keeps no capability at all."""
    analyze = need_tool("systemd-analyze")
    units = _units_here(tmp_path)
    alone = tmp_path / "alone" / "etc" / "systemd" / "system"
    alone.mkdir(parents=True)
    shutil.copy(units / "tlsproxy.service", alone)
    report = _security(analyze, tmp_path / "alone")
    assert _exposure(report) <= 2.0, report
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_NET_\(BIND_SERVICE", report), report

    activated = tmp_path / "activated" / "etc" / "systemd" / "system"
    shutil.copytree(units, activated)
    report = _security(analyze, tmp_path / "activated")
    assert _exposure(report) <= 2.0, report
    assert re.search(r"✓ CapabilityBoundingSet=~CAP_NET_\(BIND_SERVICE", report), report
    assert re.search(r"✓ AmbientCapabilities=", report), report

    service = (UNITS / "tlsproxy.service").read_text()
    for line in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/tlsproxy",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert f"\n{line}\n" in service, line


def test_socket_activation_through_a_systemd_endpoint(tmp_path: Path, echo_backend: int) -> None:
    """Started the way tlsproxy.socket starts it — the listening socket already bound and
    passed as fd 3 with LISTEN_FDS=1 and LISTEN_PID, the process launched by the first
    connection — tlsproxy serves HTTPS on a `systemd:domain=INET:index=0` listener, and that
    first connection is answered, not refused."""
    ca = pki.make_ca()
    certificate = pki.write_combined(tmp_path, ca.issue(["example.com"]))
    ca_file = pki.write_ca_file(tmp_path, ca)
    config = {
        "listen": {"https": ["systemd:domain=INET:index=0"]},
        "hosts": {
            "example.com": {
                "certificates": [str(certificate)],
                "backend": f"http://127.0.0.1:{echo_backend}",
            }
        },
    }
    proc, port = start_socket_activated(config, tmp_path)
    log_path = tmp_path / "tlsproxy.log"
    try:
        deadline = time.monotonic() + 20
        raw: socket.socket | None = None
        while raw is None:  # only systemd-socket-activate's own bind can race here
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, log_path.read_text()
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.05)
        context = ssl.create_default_context(cafile=str(ca_file))
        with context.wrap_socket(raw, server_hostname="example.com") as tls:
            tls.sendall(
                b"GET /activated HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
            )
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), response
        answer = json.loads(body)
        assert (answer["path"], answer["host"]) == ("/activated", "example.com")
        text = log_path.read_text()
        assert "systemd:domain=INET:index=0" in text
        assert "TLS grade example.com: A" in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # twistd stops cleanly and then dies of the SIGTERM it got, as systemd expects of a
    # service it stops (systemd counts SIGTERM as a clean exit).
    assert proc.returncode == -signal.SIGTERM, log_path.read_text()
    assert "Server Shut Down." in log_path.read_text()
