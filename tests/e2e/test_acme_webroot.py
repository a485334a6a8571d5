"""certbot --webroot obtains a certificate through tlsproxy's port-80 service, end to end.

Debian's ``pebble`` is the ACME server (strict mode), ``pebble-challtestsrv`` its
DNS (every test name resolves to 127.0.0.1), and pebble's http-01 port is
tlsproxy's plain listener.  certbot writes its tokens into ``acme.webroot``;
tlsproxy answers pebble's validation requests from there.  Then tlsproxy is
restarted with the issued certificate and must serve it, verified against
pebble's root.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests import pki
from tests.e2e.harness import free_port, need_tool, start_tlsproxy, wait_for_port
from tests.e2e.pebble import Pebble, Processes

pytestmark = pytest.mark.e2e

NAMES = ["one.example.com", "two.example.com"]


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"hello from the backend for {self.headers.get('host')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _handshake(port: int, name: str, cafile: Path) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert f"hello from the backend for {name}".encode() in data
    return x509.load_der_x509_certificate(der)


def test_certbot_webroot_through_port_80_then_tlsproxy_serves_the_certificate(
    tmp_path: Path, backend: str, processes: Processes
) -> None:
    """certbot --webroot gets one certificate for two names from pebble, validated over
    tlsproxy's plain-HTTP listener; tlsproxy then serves it for both names."""
    certbot = need_tool("certbot", "/usr/bin/certbot")

    https_port, http_port = free_port(), free_port()
    ca = Pebble(processes, tmp_path, NAMES, http_port=http_port, https_port=https_port)
    ca.start()
    env = ca.env
    pebble_ca = ca.https_ca

    # tlsproxy, first with a stand-in certificate: only its plain port matters now.
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    standin = pki.write_combined(tmp_path, pki.make_ca().issue(NAMES), name="standin.pem")
    site: dict[str, Any] = {"aliases": NAMES[1:], "backend": backend}
    config: dict[str, Any] = {
        "listen": {
            "https": [f"tcp:{https_port}:interface=127.0.0.1"],
            "http": [f"tcp:{http_port}:interface=127.0.0.1"],
        },
        "acme": {"webroot": str(webroot)},
        "hosts": {NAMES[0]: {**site, "certificates": [str(standin)]}},
    }
    (tmp_path / "first").mkdir()
    first = start_tlsproxy(config, tmp_path / "first", https_port)
    try:
        wait_for_port(http_port, first.proc)
        certbot_dir = tmp_path / "certbot"
        run = subprocess.run(
            [
                certbot, "certonly",
                "--non-interactive", "--agree-tos", "--register-unsafely-without-email",
                "--server", ca.directory_url,
                "--webroot", "-w", str(webroot),
                *(arg for name in NAMES for arg in ("-d", name)),
                "--cert-name", "tlsproxy-test",
                "--config-dir", str(certbot_dir / "config"),
                "--work-dir", str(certbot_dir / "work"),
                "--logs-dir", str(certbot_dir / "logs"),
            ],
            env=env | {"REQUESTS_CA_BUNDLE": str(pebble_ca)},
            capture_output=True,
            timeout=240,
            check=False,
        )  # fmt: skip
        answered = first.log
    finally:
        first.stop()
    assert run.returncode == 0, (
        f"certbot failed:\n{run.stdout.decode()}\n{run.stderr.decode()}\n"
        f"--- tlsproxy ---\n{first.log_path.read_text(errors='replace')}\n{processes.logs()}"
    )
    assert answered.count("answered ACME challenge") >= len(NAMES)

    # tlsproxy again, now with the certificate certbot obtained.
    live = certbot_dir / "config" / "live" / "tlsproxy-test"
    config["hosts"][NAMES[0]]["certificates"] = [
        {"key": str(live / "privkey.pem"), "cert": str(live / "fullchain.pem")}
    ]
    (tmp_path / "second").mkdir()
    second = start_tlsproxy(config, tmp_path / "second", https_port)
    try:
        root = ca.root()
        issued = x509.load_pem_x509_certificates((live / "cert.pem").read_bytes())[0]
        for name in NAMES:
            served = _handshake(https_port, name, root)
            assert served == issued
        sans = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert sorted(sans.value.get_values_for_type(x509.DNSName)) == NAMES
    finally:
        second.stop()
