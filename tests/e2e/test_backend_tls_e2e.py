"""TLS to backends end to end: the real ``twistd tlsproxy`` in front of HTTPS backends
(Python's ``ssl`` servers on 127.0.0.1), with certificates from test CAs.

Checked: a good certificate (CA from ``backend_tls.ca``, IP address name), a wrong
name, an unknown CA, the system store not trusting a private CA, a client
certificate presented to a backend that requires one, ``insecure_skip_verify``
(with its start-up warning), and pooled keep-alive over TLS.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tests.e2e.harness import TlsproxyProcess, start_tlsproxy

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0


class Who(BaseHTTPRequestHandler):
    """Answers with the backend connection's client port and the client certificate's CN."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        peer: Any = (
            self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        )
        cn = None
        if peer:
            cn = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
        payload = json.dumps({"port": self.client_address[1], "client_cn": cn}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def https_server(
    tmp: Path, leaf: pki.Leaf, name: str, client_ca: Path | None = None
) -> ThreadingHTTPServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.write_combined(tmp, leaf, name=f"{name}.pem")))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))

    class Server(ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            sock.settimeout(TIMEOUT)
            try:
                return ctx.wrap_socket(sock, server_side=True), addr
            except (OSError, ssl.SSLError):
                sock.close()
                raise

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    server = Server(("127.0.0.1", 0), Who)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsproxyProcess, Path]]:
    tmp = tmp_path_factory.mktemp("backendtls")
    ca = pki.make_ca(fresh=True)
    ca_file = pki.write_ca_file(tmp, ca, "backend-ca.pem")
    stranger = pki.make_ca(fresh=True)
    client_ca = pki.make_ca(fresh=True)
    client_ca_file = pki.write_ca_file(tmp, client_ca, "client-ca.pem")
    client = client_ca.issue(["tlsproxy-client"], client=True)
    client_cert = pki.write_file(tmp / "client.crt", pki.cert_pem(client.cert, *client.chain))
    client_key = pki.write_file(tmp / "client.key", pki.key_pem(client.key))
    servers = {
        "good": https_server(tmp, ca.issue(["backend"], ip_addresses=["127.0.0.1"]), "good"),
        "wrongname": https_server(tmp, ca.issue(["elsewhere.test"]), "wrongname"),
        "unknownca": https_server(
            tmp, stranger.issue(["backend"], ip_addresses=["127.0.0.1"]), "unknownca"
        ),
        "mtls": https_server(
            tmp, ca.issue(["backend"], ip_addresses=["127.0.0.1"]), "mtls", client_ca_file
        ),
    }

    def url(server: str) -> str:
        return f"https://127.0.0.1:{servers[server].server_address[1]}"

    trusted = {"ca": str(ca_file)}
    sites: dict[str, tuple[str, dict[str, Any] | None]] = {
        "good.test": (url("good"), trusted),
        "system.test": (url("good"), None),
        "wrongname.test": (url("wrongname"), trusted),
        "unknownca.test": (url("unknownca"), trusted),
        "mtls.test": (url("mtls"), {**trusted, "cert": str(client_cert), "key": str(client_key)}),
        "nocert.test": (url("mtls"), trusted),
        "insecure.test": (url("unknownca"), {"insecure_skip_verify": True}),
    }
    server_ca = pki.make_ca()
    hosts: dict[str, Any] = {}
    for name, (backend, tls) in sites.items():
        leaf = server_ca.issue([name])
        hosts[name] = {
            "certificates": [str(pki.write_combined(tmp, leaf, name=f"site-{name}.pem"))],
            "backend": backend,
        }
        if tls is not None:
            hosts[name]["backend_tls"] = tls
    (tmp / "proxy").mkdir()
    process = start_tlsproxy({"hosts": hosts}, tmp / "proxy")
    yield process, pki.write_ca_file(tmp, server_ca, "server-ca.pem")
    process.stop()
    for server in servers.values():
        server.shutdown()
        server.server_close()


def requests(proxy: tuple[TlsproxyProcess, Path], host: str, count: int = 1) -> list[Any]:
    """``count`` keep-alive GETs for ``host`` on one connection: (status, body) each."""
    process, server_ca = proxy
    ctx = ssl.create_default_context(cafile=str(server_ca))
    raw = socket.create_connection(("127.0.0.1", process.https_port), timeout=TIMEOUT)
    out = []
    with ctx.wrap_socket(raw, server_hostname=host) as tls:
        reader = tls.makefile("rb")
        for _ in range(count):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status = int(reader.readline().split(b" ", 2)[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = reader.read(length)
            out.append((status, json.loads(body) if status == 200 else None))
    return out


def test_verified_backend_with_pooled_keep_alive(proxy: tuple[TlsproxyProcess, Path]) -> None:
    """A backend whose certificate chains to backend_tls.ca and names its IP address
    is reached; consecutive requests reuse one backend TLS connection."""
    (first, a), (second, b), (third, c) = requests(proxy, "good.test", 3)
    assert first == second == third == 200
    assert a["port"] == b["port"] == c["port"]


@pytest.mark.parametrize("host", ["wrongname.test", "unknownca.test", "system.test"])
def test_unverifiable_backend_gets_502(proxy: tuple[TlsproxyProcess, Path], host: str) -> None:
    """A backend certificate for another name, from an unknown CA, or from a private
    CA while only the system store is trusted, is refused: the client gets 502."""
    [(status, _)] = requests(proxy, host)
    assert status == 502


def test_client_certificate_to_backend(proxy: tuple[TlsproxyProcess, Path]) -> None:
    """backend_tls cert/key are presented to a backend that requires a client
    certificate; without them that backend refuses the connection (502)."""
    [(status, body)] = requests(proxy, "mtls.test")
    assert status == 200
    assert body["client_cn"] == "tlsproxy-client"
    [(status, _)] = requests(proxy, "nocert.test")
    assert status == 502


def test_insecure_skip_verify_connects_and_warns(proxy: tuple[TlsproxyProcess, Path]) -> None:
    """insecure_skip_verify reaches a backend with an unverifiable certificate, and
    tlsproxy warned about it at start-up."""
    [(status, _)] = requests(proxy, "insecure.test")
    assert status == 200
    assert "insecure_skip_verify" in proxy[0].log
    assert "is not verified" in proxy[0].log
