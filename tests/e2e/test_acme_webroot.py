"""certbot --webroot obtains a certificate through tlsproxy's port-80 service, end to end.

Debian's ``pebble`` is the ACME server (strict mode), ``pebble-challtestsrv`` its
DNS (every test name resolves to 127.0.0.1), and pebble's http-01 port is
tlsproxy's plain listener.  certbot writes its tokens into ``acme.webroot``;
tlsproxy answers pebble's validation requests from there.  Then tlsproxy is
restarted with the issued certificate and must serve it, verified against
pebble's root.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests import pki
from tests.e2e.harness import free_port, need_tool, start_tlsproxy, wait_for_port

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


class _Processes:
    """Child processes started by a test, all stopped at the end (bounded waits)."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')}" for _, log in self.procs
        )


@pytest.fixture
def processes() -> Iterator[_Processes]:
    procs = _Processes()
    yield procs
    procs.stop()


def _post_json(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


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
    tmp_path: Path, backend: str, processes: _Processes
) -> None:
    """certbot --webroot gets one certificate for two names from pebble, validated over
    tlsproxy's plain-HTTP listener; tlsproxy then serves it for both names."""
    pebble = need_tool("pebble", "/usr/bin/pebble")
    challtestsrv = need_tool("pebble-challtestsrv", "/usr/bin/pebble-challtestsrv")
    certbot = need_tool("certbot", "/usr/bin/certbot")

    https_port, http_port = free_port(), free_port()
    acme_port, acme_mgmt_port = free_port(), free_port()
    dns_port, dns_mgmt_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEBBLE_", "REQUESTS_"))}

    # DNS: every test name is 127.0.0.1 (and has no AAAA, since tlsproxy listens on IPv4).
    processes.start(
        [
            challtestsrv,
            "-dns01", f"127.0.0.1:{dns_port}",
            "-http01", "",
            "-https01", "",
            "-tlsalpn01", "",
            "-management", f"127.0.0.1:{dns_mgmt_port}",
            "-defaultIPv4", "127.0.0.1",
            "-defaultIPv6", "",
        ],
        tmp_path / "challtestsrv.log",
        env,
    )  # fmt: skip
    wait_for_port(dns_mgmt_port, None)
    for name in NAMES:
        _post_json(
            f"http://127.0.0.1:{dns_mgmt_port}/add-a",
            {"host": name, "addresses": ["127.0.0.1"]},
        )

    # Pebble, with its own HTTPS certificate, validating http-01 on tlsproxy's plain port.
    ca = pki.make_ca(fresh=True)
    pebble_leaf = ca.issue(["localhost"], ip_addresses=["127.0.0.1"])
    pebble_files = pki.write_separate(tmp_path, pebble_leaf, prefix="pebble")
    pebble_cert = pki.write_file(
        tmp_path / "pebble-fullchain.pem", pki.cert_pem(pebble_leaf.cert, *pebble_leaf.chain)
    )
    pebble_ca = pki.write_ca_file(tmp_path, ca, name="pebble-ca.pem")
    config_file = tmp_path / "pebble.json"
    config_file.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{acme_port}",
                    "managementListenAddress": f"127.0.0.1:{acme_mgmt_port}",
                    "certificate": str(pebble_cert),
                    "privateKey": str(pebble_files.key),
                    "httpPort": http_port,
                    "tlsPort": https_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    pebble_env = env | {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    pebble_proc = processes.start(
        [pebble, "-config", str(config_file), "-dnsserver", f"127.0.0.1:{dns_port}", "-strict"],
        tmp_path / "pebble.log",
        pebble_env,
    )
    wait_for_port(acme_port, pebble_proc)

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
                "--server", f"https://127.0.0.1:{acme_port}/dir",
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
        context = ssl.create_default_context(cafile=str(pebble_ca))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{acme_mgmt_port}/roots/0", context=context, timeout=10
        ) as response:
            root = tmp_path / "pebble-root.pem"
            root.write_bytes(response.read())
        issued = x509.load_pem_x509_certificates((live / "cert.pem").read_bytes())[0]
        for name in NAMES:
            served = _handshake(https_port, name, root)
            assert served == issued
        sans = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert sorted(sans.value.get_values_for_type(x509.DNSName)) == NAMES
    finally:
        second.stop()
