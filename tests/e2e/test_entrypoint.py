"""The ``twistd tlsproxy`` entry point, run as a user runs it: a real process, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tests.e2e.harness import (
    ROOT,
    free_port,
    need_tool,
    twistd_command,
    wait_for_port,
)

pytestmark = pytest.mark.e2e


def _site(tmp_path: Path, names: list[str], backend_port: int) -> tuple[dict[str, Any], Path]:
    """A one-host config for ``names`` with an ECDSA certificate; returns it and the CA file."""
    ca = pki.make_ca()
    leaf = ca.issue(names)
    pem = pki.write_combined(tmp_path, leaf, name=f"{names[0]}.pem")
    config = {
        "hosts": {
            names[0]: {
                "aliases": names[1:],
                "certificates": [str(pem)],
                "backend": f"http://127.0.0.1:{backend_port}",
            }
        }
    }
    return config, pki.write_ca_file(tmp_path, ca)


def _client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    return context


def test_request_reaches_backend_and_back(
    tmp_path: Path, echo_backend: int, tlsproxy_runner: Any
) -> None:
    """A client's HTTPS request is forwarded to the site's backend and the answer comes back,
    with the certificate verified against the CA and the original Host kept."""
    config, ca_file = _site(tmp_path, ["example.test", "www.example.test"], echo_backend)
    proxy = tlsproxy_runner(config)
    context = _client_context(ca_file)
    for name in ("example.test", "www.example.test"):
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            tls.sendall(
                f"POST /form?x=1 HTTP/1.1\r\nHost: {name}\r\nContent-Length: 5\r\n"
                "Connection: close\r\n\r\nhello".encode()
            )
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        answer = json.loads(body)
        assert answer == {"method": "POST", "path": "/form?x=1", "host": name, "body": "hello"}


def test_curl_through_the_proxy(tmp_path: Path, echo_backend: int, tlsproxy_runner: Any) -> None:
    """curl, verifying the certificate, gets the backend's answer over HTTPS with ALPN."""
    curl = need_tool("curl")
    config, ca_file = _site(tmp_path, ["example.test"], echo_backend)
    proxy = tlsproxy_runner(config)
    result = subprocess.run(
        [
            curl, "-sS", "--max-time", "10", "--cacert", str(ca_file),
            "--resolve", f"example.test:{proxy.https_port}:127.0.0.1",
            f"https://example.test:{proxy.https_port}/hello",
        ],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/hello"


def _run_twistd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twistd_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def test_bad_config_lists_every_problem_and_binds_nothing(tmp_path: Path) -> None:
    """A config with several mistakes (a key that does not match its certificate, a missing
    file, an unknown key) makes twistd exit 1 before binding, printing each with file and
    key path."""
    ca = pki.make_ca()
    leaf, other = ca.issue(["a.test"]), ca.issue(["a.test"])
    key = pki.write_file(tmp_path / "a.key", pki.key_pem(other.key))
    cert = pki.write_file(tmp_path / "a.crt", pki.cert_pem(leaf.cert, *leaf.chain), 0o644)
    port = free_port()
    (tmp_path / "proxy.yaml").write_text(
        f"""
listen: {{https: ["tcp:{port}:interface=127.0.0.1"]}}
hosts:
  a.test:
    certificates: [{{key: {key}, cert: {cert}}}]
    backend: http://127.0.0.1:9
  b.test:
    certificates: [{tmp_path / "missing.pem"}]
    backend: http://127.0.0.1:9
    colour: blue
"""
    )
    result = _run_twistd("-n", "--pidfile=", "tlsproxy", "--config", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "proxy.yaml: hosts.b.test.colour: unknown key; allowed keys are: " in result.stderr
    assert (
        "proxy.yaml: hosts.a.test.certificates[0]: private key does not match certificate" in lines
    )
    assert any(
        line.startswith("proxy.yaml: hosts.b.test.certificates[0]") and "missing.pem" in line
        for line in lines
    ), lines
    assert "Traceback" not in result.stderr
    with socket.socket() as s:  # nothing was bound: the port is still free
        s.bind(("127.0.0.1", port))


def test_invalid_endpoint_and_tls_override_are_config_errors(tmp_path: Path) -> None:
    """An endpoint string Twisted cannot parse and a cipher OpenSSL does not know are reported
    with their key paths, like any other config error."""
    config, _ = _site(tmp_path, ["a.test"], 9)
    config["listen"] = {"https": ["tcp:notaport"]}
    config["tls"] = {"ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:NO-SUCH-CIPHER"}
    (tmp_path / "proxy.yaml").write_text(json.dumps(config))
    result = _run_twistd("-n", "--pidfile=", "tlsproxy", "--config", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "proxy.yaml: listen.https[0]: not a valid endpoint" in result.stderr
    assert "proxy.yaml: tls.ciphers: " in result.stderr
    assert "NO-SUCH-CIPHER" in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    """When the HTTPS port is taken, tlsproxy says so in one line naming the listener,
    without a traceback, and exits non-zero."""
    config, _ = _site(tmp_path, ["a.test"], 9)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config["listen"] = {"https": [f"tcp:{port}:interface=127.0.0.1"]}
        (tmp_path / "proxy.yaml").write_text(json.dumps(config))
        result = _run_twistd("-n", "--pidfile=", "tlsproxy", "--config", "proxy.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "cannot listen" in line]
    assert error_lines == [
        f"tlsproxy: proxy.yaml: listen.https[0] (tcp:{port}:interface=127.0.0.1): "
        "cannot listen: Address already in use"
    ]


def test_daemon_mode_serves_and_stops(tmp_path: Path, echo_backend: int) -> None:
    """``twistd tlsproxy`` without -n detaches, writes its pid file, serves HTTPS, and stops
    on SIGTERM."""
    config, ca_file = _site(tmp_path, ["example.test"], echo_backend)
    port = free_port()
    config["listen"] = {"https": [f"tcp:{port}:interface=127.0.0.1"]}
    (tmp_path / "proxy.yaml").write_text(json.dumps(config))
    result = _run_twistd(
        "--pidfile", "tlsproxy.pid", "--logfile", "tlsproxy.log",
        "tlsproxy", "--config", "proxy.yaml", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "tlsproxy.pid").read_text())
    try:
        wait_for_port(port, None)
        context = _client_context(ca_file)
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/daemon", headers={"Host": "example.test"}
        )
        context.check_hostname = False  # connecting by IP; the Host header picks the site
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            assert json.loads(response.read())["path"] == "/daemon"
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while (tmp_path / "tlsproxy.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "tlsproxy.pid").exists()


def test_daemon_mode_bad_config_exits_before_detaching(tmp_path: Path) -> None:
    """In daemon mode too, a bad config is printed on the terminal and the exit status is 1."""
    (tmp_path / "proxy.yaml").write_text("hosts: {}\n")
    result = _run_twistd(
        "--pidfile", "tlsproxy.pid", "--logfile", "tlsproxy.log",
        "tlsproxy", "--config", "proxy.yaml", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "proxy.yaml: hosts: " in result.stderr
    assert not (tmp_path / "tlsproxy.pid").exists()


def test_help_documents_the_options(tmp_path: Path) -> None:
    """``twistd tlsproxy --help`` lists --config and --demo."""
    result = _run_twistd("tlsproxy", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--config" in result.stdout and "--demo" in result.stdout


def test_demo_answers_at_once(tmp_path: Path) -> None:
    """``twistd -n tlsproxy --demo`` serves a page behind a self-signed certificate."""
    curl = need_tool("curl")
    port = free_port()
    proc = subprocess.Popen(
        twistd_command(
            "-n", "--pidfile=", "tlsproxy", "--demo",
            "--demo-listen", f"tcp:{port}:interface=127.0.0.1", "--demo-dir", str(tmp_path),
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        result = subprocess.run(
            [curl, "-sSk", "--max-time", "10", f"https://localhost:{port}/"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "tlsproxy is working" in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        assert proc.stdout is not None
        proc.stdout.close()


def test_plugin_found_after_a_normal_install(tmp_path: Path) -> None:
    """A wheel built from the project and installed normally (not editable) makes
    ``twistd tlsproxy`` available."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "pip"), "wheel", "--no-deps",
            "-q", "-w", str(wheel_dir), str(ROOT),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("tlsproxy-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "pip"), "install", "--no-deps",
            "-q", "--target", str(target), str(wheel),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert (target / "twisted" / "plugins" / "tlsproxy_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    # Only the installed copy may be importable: run from elsewhere with the target first
    # and the project's source tree out of sys.path.
    script = (
        f"import sys; sys.path.insert(0, {str(target)!r}); "
        f"sys.path[:] = [p for p in sys.path if p.rstrip('/') != {str(ROOT)!r}]; "
        "import tlsproxy; from twisted.plugin import getPlugins; "
        "from twisted.application.service import IServiceMaker; "
        "print(tlsproxy.__file__); print([p.tapname for p in getPlugins(IServiceMaker)])"
    )
    probe = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    location, plugins = probe.stdout.splitlines()
    assert location.startswith(str(target))
    assert "'tlsproxy'" in plugins
