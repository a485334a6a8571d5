"""Connections are released and reused correctly: a client that closes after ``Connection:
close`` leaves no socket behind, and a backend that closes after each response does not break
the client's keep-alive connection."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tests.e2e.harness import need_tool

pytestmark = pytest.mark.e2e


def test_connection_close_requests_leave_no_open_sockets(
    tmp_path: Path, tlsproxy_runner: Any, echo_backend: int
) -> None:
    """After 20 curl requests with ``Connection: close`` (curl then closes at once), the
    proxy holds no more sockets than before (one pooled backend connection aside)."""
    curl = need_tool("curl")
    ca = pki.make_ca()
    pem = pki.write_combined(tmp_path, ca.issue(["a.test"]))
    proxy = tlsproxy_runner(
        {
            "hosts": {
                "a.test": {
                    "certificates": [str(pem)],
                    "backend": f"http://127.0.0.1:{echo_backend}",
                }
            }
        }
    )

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))

    before = open_fds()
    url = f"https://a.test:{proxy.https_port}/"
    resolve = f"a.test:{proxy.https_port}:127.0.0.1"
    for _ in range(20):
        subprocess.run(
            [curl, "-sS", "--cacert", str(pki.write_ca_file(tmp_path, ca)), "-o", os.devnull,
             "--max-time", "10", "-H", "Connection: close", "--resolve", resolve, url],
            check=True, timeout=30,
        )  # fmt: skip
    deadline = time.monotonic() + 5
    while open_fds() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before + 2


class _ClosingHandler(BaseHTTPRequestHandler):
    """An HTTP/1.0 backend (Python's default): one response per connection, then close."""

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_keep_alive_client_in_front_of_a_backend_that_closes_after_each_response(
    tmp_path: Path, tlsproxy_runner: Any
) -> None:
    """A backend that closes its connection after every response (HTTP/1.0, or gunicorn's
    sync workers with Connection: close) still answers every request of a client that keeps
    its own connection alive."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ClosingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ca = pki.make_ca()
        pem = pki.write_combined(tmp_path, ca.issue(["a.test"]))
        proxy = tlsproxy_runner(
            {
                "hosts": {
                    "a.test": {
                        "certificates": [str(pem)],
                        "backend": f"http://127.0.0.1:{server.server_address[1]}",
                    }
                }
            }
        )
        context = ssl.create_default_context(cafile=str(pki.write_ca_file(tmp_path, ca)))
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="a.test") as tls,
        ):
            reader = tls.makefile("rb")
            for i in range(4):
                tls.sendall(f"GET /r{i} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
                status = reader.readline()
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = reader.read(length)
                assert (status.split()[1], body) == (b"200", f"/r{i}".encode())
    finally:
        server.shutdown()
        server.server_close()
