"""Client certificates (mTLS) end to end: the real ``twistd tlsproxy`` with curl,
``openssl s_client`` and Python's ``ssl`` as clients, a header-echoing backend.

One proxy serves four sites on one listener: ``www.test`` (default, no client
certificates), ``api.test`` (``client_auth`` required, identity headers),
``opt.test`` (optional) and ``crl.test`` (required, with a CRL).  Everything
binds to 127.0.0.1; every network wait has a timeout.
"""

from __future__ import annotations

import base64
import datetime
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from tests import pki
from tests.e2e.harness import TlsproxyProcess, need_tool, start_tlsproxy

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0


class HeaderEcho(BaseHTTPRequestHandler):
    """Answers every request with the request headers it received, as JSON pairs."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        payload = json.dumps([[k, v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Setup:
    """The proxy, its PKI and file paths shared by the tests of this module."""

    def __init__(self, tmp: Path, backend_port: int) -> None:
        self.tmp = tmp
        server_ca = pki.make_ca()
        self.server_ca_file = pki.write_ca_file(tmp, server_ca, "server-ca.pem")
        self.client_ca = pki.make_ca(fresh=True)
        self.client_ca_file = pki.write_ca_file(tmp, self.client_ca, "client-ca.pem")
        self.other_ca = pki.make_ca(fresh=True)
        self.good = self.client_ca.issue(["alice"], client=True)
        self.revoked = self.client_ca.issue(["mallory"], client=True)
        self.expired = self.client_ca.issue(
            ["bob"],
            client=True,
            not_before=pki.now() - datetime.timedelta(days=30),
            days=10,
        )
        self.stranger = self.other_ca.issue(["eve"], client=True)
        self.other_ca_file = pki.write_ca_file(tmp, self.other_ca, "other-ca.pem")
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.client_ca.intermediate.cert.subject)
            .last_update(pki.now() - datetime.timedelta(hours=1))
            .next_update(pki.now() + datetime.timedelta(days=7))
            .add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(self.revoked.cert.serial_number)
                .revocation_date(pki.now() - datetime.timedelta(hours=1))
                .build()
            )
            .sign(self.client_ca.intermediate.key, hashes.SHA256())
        )
        self.crl_file = pki.write_file(tmp / "clients.crl", crl.public_bytes(Encoding.PEM))
        hosts: dict[str, Any] = {}
        for name, client_auth in (
            ("www.test", None),
            (
                "api.test",
                {
                    "ca": str(self.client_ca_file),
                    "mode": "required",
                    "subject_header": "X-Client-Subject",
                    "fingerprint_header": "X-Client-SHA256",
                },
            ),
            ("opt.test", {"ca": str(self.client_ca_file), "mode": "optional"}),
            ("other.test", {"ca": str(self.other_ca_file)}),
            (
                "crl.test",
                {"ca": str(self.client_ca_file), "crl": str(self.crl_file)},
            ),
        ):
            leaf = server_ca.issue([name])
            site: dict[str, Any] = {
                "certificates": [str(pki.write_combined(tmp, leaf, name=f"{name}.pem"))],
                "backend": f"http://127.0.0.1:{backend_port}",
            }
            if client_auth is not None:
                site["client_auth"] = client_auth
            hosts[name] = site
        self.config = {"default_host": "www.test", "hosts": hosts}

    def client_files(self, leaf: pki.Leaf, name: str) -> tuple[Path, Path]:
        """Certificate (leaf + intermediate) and key files of a client certificate."""
        cert = pki.write_file(self.tmp / f"{name}.crt", pki.cert_pem(leaf.cert, *leaf.chain))
        key = pki.write_file(self.tmp / f"{name}.key", pki.key_pem(leaf.key))
        return cert, key


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Setup, TlsproxyProcess]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeaderEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    tmp = tmp_path_factory.mktemp("mtls")
    s = Setup(tmp, server.server_address[1])
    (tmp / "proxy").mkdir()
    proxy = start_tlsproxy(s.config, tmp / "proxy")
    yield s, proxy
    proxy.stop()
    server.shutdown()
    server.server_close()


def client_context(
    s: Setup, cert: pki.Leaf | None = None, *, version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(s.server_ca_file))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        certfile, keyfile = s.client_files(cert, f"client-{cert.cert.serial_number}")
        ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


def get(
    proxy: TlsproxyProcess,
    ctx: ssl.SSLContext,
    sni: str | None,
    host: str,
    extra: str = "",
    session: ssl.SSLSession | None = None,
) -> tuple[int, Any, tuple[ssl.SSLSession | None, bool]]:
    """One GET over a fresh TLS connection: (status, JSON body or None, (the TLS
    session, whether it was resumed)).

    :raises OSError: (including ``ssl.SSLError``) if the handshake or exchange fails.
    """
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=TIMEOUT)
    if sni is None:
        ctx.check_hostname = False
    tls = ctx.wrap_socket(raw, server_hostname=sni, session=session)
    try:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        resumption = (tls.session, bool(tls.session_reused))
    finally:
        tls.close()
    if not data:
        raise ConnectionResetError("connection closed without a response")
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status == 200 else None, resumption


def headers_of(body: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in body:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_required_client_certificate_passes_identity_to_backend(
    setup: tuple[Setup, TlsproxyProcess],
) -> None:
    """A client with a certificate from the configured CA reaches the backend, which
    receives RFC 9440 Client-Cert/Client-Cert-Chain and the subject and fingerprint
    headers; copies of those headers sent by the client are dropped."""
    s, proxy = setup
    spoof = (
        "Client-Cert: :AAAA:\r\nClient-Cert-Chain: :AAAA:\r\n"
        "X-Client-Subject: CN=admin\r\nX-Client-SHA256: 00\r\n"
    )
    status, body, _ = get(proxy, client_context(s, s.good), "api.test", "api.test", spoof)
    assert status == 200
    seen = headers_of(body)
    der = s.good.cert.public_bytes(Encoding.DER)
    assert seen["client-cert"] == [f":{base64.b64encode(der).decode()}:"]
    chain_der = s.good.chain[0].public_bytes(Encoding.DER)
    assert seen["client-cert-chain"] == [f":{base64.b64encode(chain_der).decode()}:"]
    assert seen["x-client-subject"] == ["CN=alice,O=tlsproxy tests"]
    assert seen["x-client-sha256"] == [s.good.cert.fingerprint(hashes.SHA256()).hex()]


@pytest.mark.parametrize("who", ["none", "stranger", "expired"])
def test_required_rejects_missing_foreign_and_expired_certificates(
    setup: tuple[Setup, TlsproxyProcess], who: str
) -> None:
    """With mode required, no certificate, one from another CA, or an expired one
    ends the TLS connection before any request reaches the backend."""
    s, proxy = setup
    cert = {"none": None, "stranger": s.stranger, "expired": s.expired}[who]
    with pytest.raises(OSError):
        get(proxy, client_context(s, cert), "api.test", "api.test")


def test_optional_client_certificate(setup: tuple[Setup, TlsproxyProcess]) -> None:
    """With mode optional a client without a certificate gets through (no
    Client-Cert, and a spoofed one is dropped); one with a certificate is
    identified; one with a foreign certificate is refused."""
    s, proxy = setup
    status, body, _ = get(proxy, client_context(s), "opt.test", "opt.test", "Client-Cert: :AA:\r\n")
    assert status == 200
    assert "client-cert" not in headers_of(body)
    status, body, _ = get(proxy, client_context(s, s.good), "opt.test", "opt.test")
    assert status == 200
    assert headers_of(body)["client-cert"][0].startswith(":")
    with pytest.raises(OSError):
        get(proxy, client_context(s, s.stranger), "opt.test", "opt.test")


def test_crl_revokes_a_certificate(setup: tuple[Setup, TlsproxyProcess]) -> None:
    """A host with a CRL refuses a revoked client certificate and accepts a good one."""
    s, proxy = setup
    status, _, _ = get(proxy, client_context(s, s.good), "crl.test", "crl.test")
    assert status == 200
    with pytest.raises(OSError):
        get(proxy, client_context(s, s.revoked), "crl.test", "crl.test")


def test_other_hosts_do_not_ask_for_certificates(setup: tuple[Setup, TlsproxyProcess]) -> None:
    """Only client-auth hosts send a CertificateRequest; a handshake for another
    host or without SNI does not, and client-sent identity headers are still dropped."""
    s, proxy = setup
    openssl = need_tool("openssl")

    def ca_names(*args: str) -> str:
        out = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{proxy.https_port}", *args],
            input=b"",
            capture_output=True,
            timeout=TIMEOUT,
        )
        return out.stdout.decode(errors="replace")

    for version in ("-tls1_2", "-tls1_3"):
        assert "Acceptable client certificate CA names" in ca_names(
            "-servername", "api.test", version
        )
        assert "No client certificate CA names sent" in ca_names("-servername", "www.test", version)
        assert "No client certificate CA names sent" in ca_names("-noservername", version)
    status, body, _ = get(proxy, client_context(s), "www.test", "www.test", "Client-Cert: :AA:\r\n")
    assert status == 200
    assert "client-cert" not in headers_of(body)


@pytest.mark.parametrize(
    ("sni", "host", "cert"),
    [
        ("www.test", "api.test", False),
        (None, "api.test", False),
        ("opt.test", "api.test", True),
        ("api.test", "www.test", True),
    ],
)
def test_host_must_match_the_handshake(
    setup: tuple[Setup, TlsproxyProcess], sni: str | None, host: str, cert: bool
) -> None:
    """A request whose Host names another site than the TLS handshake, where either
    uses client certificates, is answered 421 Misdirected Request."""
    s, proxy = setup
    status, _, _ = get(proxy, client_context(s, s.good if cert else None), sni, host)
    assert status == 421


def refused(proxy: TlsproxyProcess, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> bool:
    """Whether a request to api.test offering ``session`` fails or is answered 421.

    OpenSSL decides on resumption before the servername callback chooses the
    host, so the session may resume (TLS 1.2 then keeps the session's host);
    the proxy must then refuse the request instead.
    """
    try:
        status, _, _ = get(proxy, ctx, "api.test", "api.test", session=session)
    except OSError:
        return True
    return status == 421


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_session_from_another_host_needs_a_certificate(
    setup: tuple[Setup, TlsproxyProcess], version: ssl.TLSVersion
) -> None:
    """A session made on a host without client certificates, or on a host that
    trusts another CA, never gets a client onto a client-auth host (the
    handshake fails or the request is answered 421).  A session made on the
    client-auth host itself resumes (TLS 1.2 and 1.3) and keeps the identity."""
    s, proxy = setup
    ctx = client_context(s, version=version)
    status, _, (session, _) = get(proxy, ctx, "www.test", "www.test")
    assert status == 200
    assert session is not None
    _, _, (_, reused) = get(proxy, ctx, "www.test", "www.test", session=session)
    assert reused, "control: the session resumes on its own host"
    assert refused(proxy, ctx, session)
    ctx = client_context(s, s.stranger, version=version)
    status, _, (session, _) = get(proxy, ctx, "other.test", "other.test")
    assert status == 200
    assert refused(proxy, ctx, session), "a certificate of another host's CA"
    ctx = client_context(s, s.good, version=version)
    _, _, (session, _) = get(proxy, ctx, "api.test", "api.test")
    status, body, (_, reused) = get(proxy, ctx, "api.test", "api.test", session=session)
    assert status == 200
    # Sessions resume from the server's session cache, which keeps the client's
    # chain: with a client-auth host, no host issues stateless tickets.
    assert reused
    assert headers_of(body)["x-client-subject"] == ["CN=alice,O=tlsproxy tests"]


def test_curl_with_client_certificate(setup: tuple[Setup, TlsproxyProcess]) -> None:
    """curl with --cert/--key reaches a client-auth host; without them it fails."""
    s, proxy = setup
    curl = need_tool("curl")
    certfile, keyfile = s.client_files(s.good, "curl")
    base = [
        curl,
        "-sS",
        "--max-time",
        str(TIMEOUT),
        "--cacert",
        str(s.server_ca_file),
        "--resolve",
        f"api.test:{proxy.https_port}:127.0.0.1",
        f"https://api.test:{proxy.https_port}/",
    ]
    out = subprocess.run(
        [*base, "--cert", str(certfile), "--key", str(keyfile)],
        capture_output=True,
        timeout=TIMEOUT + 5,
    )
    assert out.returncode == 0, out.stderr
    assert headers_of(json.loads(out.stdout))["x-client-subject"] == ["CN=alice,O=tlsproxy tests"]
    out = subprocess.run(base, capture_output=True, timeout=TIMEOUT + 5)
    assert out.returncode != 0


def test_sighup_applies_a_new_crl(tmp_path: Path) -> None:
    """Replacing the CRL file and sending SIGHUP revokes a client certificate for new
    connections (client_auth files are re-read on reload, like certificates)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeaderEcho)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s = Setup(tmp_path, server.server_address[1])
    empty = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(s.client_ca.intermediate.cert.subject)
        .last_update(pki.now() - datetime.timedelta(hours=1))
        .next_update(pki.now() + datetime.timedelta(days=7))
        .sign(s.client_ca.intermediate.key, hashes.SHA256())
    )
    revoking = s.crl_file.read_bytes()
    s.crl_file.write_bytes(empty.public_bytes(Encoding.PEM))
    (tmp_path / "proxy").mkdir()
    proxy = start_tlsproxy(s.config, tmp_path / "proxy")
    try:
        status, _, _ = get(proxy, client_context(s, s.revoked), "crl.test", "crl.test")
        assert status == 200
        s.crl_file.write_bytes(revoking)
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reloaded " not in proxy.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reloaded " in proxy.log
        with pytest.raises(OSError):
            get(proxy, client_context(s, s.revoked), "crl.test", "crl.test")
        status, _, _ = get(proxy, client_context(s, s.good), "crl.test", "crl.test")
        assert status == 200
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()
