"""Client-certificate hosts and TLS session resumption when the host is the default one."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests import pki

pytestmark = pytest.mark.e2e


def test_resumed_sessions_work_on_a_client_certificate_default_host(
    tmp_path: Path, tlsproxy_runner: Any, echo_backend: int
) -> None:
    """On the only (so default) host, which requires client certificates issued under an
    intermediate, a client that resumes its TLS session is still served (the session keeps
    the client's whole chain), not refused with 421."""
    ca = pki.make_ca()
    pem = pki.write_combined(tmp_path, ca.issue(["secure.test"]))
    clients = pki.make_ca(fresh=True)
    root = pki.write_file(tmp_path / "clients-root.pem", pki.cert_pem(clients.root.cert))
    alice = clients.issue(["alice"], client=True)
    client_pem = pki.write_file(
        tmp_path / "alice.pem",
        pki.key_pem(alice.key) + pki.cert_pem(alice.cert, clients.intermediate.cert),
    )
    proxy = tlsproxy_runner(
        {
            "hosts": {
                "secure.test": {
                    "certificates": [str(pem)],
                    "backend": f"http://127.0.0.1:{echo_backend}",
                    "client_auth": {"ca": str(root)},
                }
            }
        }
    )
    context = ssl.create_default_context(cafile=str(pki.write_ca_file(tmp_path, ca)))
    context.load_cert_chain(str(client_pem))
    session = None
    answers = []
    for _ in range(3):
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
        with context.wrap_socket(raw, server_hostname="secure.test", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            answers.append((tls.session_reused, data.split(b"\r\n", 1)[0]))
            session = tls.session
    assert [status for _, status in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert any(reused for reused, _ in answers[1:])  # the check is not vacuous
