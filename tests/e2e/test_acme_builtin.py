"""The built-in ACME client against Debian's pebble (strict), with the real ``twistd tlsproxy``.

Pebble validates http-01 on tlsproxy's plain port and tls-alpn-01 on its
HTTPS port; challtestsrv resolves every test name to 127.0.0.1.  The tests
wait for the issued certificate by handshaking (bounded loops) and verify
what is served against pebble's root.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from tests.e2e.harness import TlsproxyProcess, free_port, start_tlsproxy
from tests.e2e.pebble import Pebble, Processes

pytestmark = pytest.mark.e2e

NAMES = ["one.example.com", "two.example.com"]
NEW_ORDER = "POST /order-plz"


def _config(pebble: Pebble, state: Path, backend_port: int, **acme: Any) -> dict[str, Any]:
    return {
        "listen": {
            "https": [f"tcp:{pebble.https_port}:interface=127.0.0.1"],
            "http": [f"tcp:{pebble.http_port}:interface=127.0.0.1"],
        },
        "acme": {
            "directory": pebble.directory_url,
            "agree_tos": True,
            "email": "admin@example.com",
            "state_dir": str(state),
            "ca_bundle": str(pebble.https_ca),
            **acme,
        },
        "hosts": {
            NAMES[0]: {
                "aliases": NAMES[1:],
                "acme": True,
                "backend": f"http://127.0.0.1:{backend_port}",
            }
        },
    }


def _served(port: int, name: str, *, rsa: bool = False) -> x509.Certificate:
    """The leaf tlsproxy presents for ``name`` (unverified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if rsa:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _wait_for(
    what: str,
    check: Callable[[], x509.Certificate | None],
    proxy: TlsproxyProcess,
    pebble: Pebble,
    timeout: float = 60.0,
) -> x509.Certificate:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(
        f"{what} within {timeout} s\n--- tlsproxy ---\n{proxy.log}\n--- pebble ---\n{pebble.log()}"
    )


def _issued_by_pebble(port: int, name: str, **kw: Any) -> Callable[[], x509.Certificate | None]:
    def check() -> x509.Certificate | None:
        try:
            cert = _served(port, name, **kw)
        except ssl.SSLError:
            return None  # e.g. no RSA certificate yet for an RSA-only client
        issuer = cert.issuer.rfc4514_string()
        return cert if "Pebble" in issuer else None

    return check


class _Client:
    """One verified HTTPS connection that sends keep-alive requests."""

    def __init__(self, port: int, name: str, root: Path) -> None:
        context = ssl.create_default_context(cafile=str(root))
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = context.wrap_socket(sock, server_hostname=name)
        self.name = name
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        self.cert = x509.load_der_x509_certificate(der)

    def get(self, path: str = "/") -> dict[str, Any]:
        request = f"GET {path} HTTP/1.1\r\nHost: {self.name}\r\n\r\n".encode()
        self.tls.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.tls.recv(65536)
            assert chunk, "connection closed"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = self.tls.recv(65536)
            assert chunk, "connection closed"
            body += chunk
        result: dict[str, Any] = json.loads(body)
        return result

    def close(self) -> None:
        self.tls.close()


def test_http01_issues_for_every_name_and_a_restart_reuses_the_stored_certificate(
    tmp_path: Path, processes: Processes, echo_backend: int
) -> None:
    """With `acme: true` tlsproxy obtains one certificate for all of a host's names over
    http-01 (serving a temporary self-signed one meanwhile), serves it verified by the CA's
    root, and after a restart serves the stored certificate without placing a new order."""
    https_port, http_port = free_port(), free_port()
    pebble = Pebble(processes, tmp_path, NAMES, http_port=http_port, https_port=https_port)
    pebble.start()
    state = tmp_path / "state"
    config = _config(pebble, state, echo_backend, challenges=["http-01"])
    (tmp_path / "first").mkdir()
    proxy = start_tlsproxy(config, tmp_path / "first", https_port)
    try:
        issued = _wait_for(
            "no certificate from pebble", _issued_by_pebble(https_port, NAMES[0]), proxy, pebble
        )
        root = pebble.root()
        for name in NAMES:
            client = _Client(https_port, name, root)  # verifies chain and name
            assert client.cert == issued
            assert client.get()["host"] == name
            client.close()
        log = proxy.log
        assert "temporary self-signed certificate" in log
        assert "answering http-01 for one.example.com" in log
        assert "answering http-01 for two.example.com" in log
    finally:
        proxy.stop()
    sans = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sorted(sans.value.get_values_for_type(x509.DNSName)) == NAMES
    stored = state / "certs" / f"{NAMES[0]}.ecdsa.pem"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (state / "account.key").stat().st_mode & 0o777 == 0o600
    orders = pebble.log().count(NEW_ORDER)
    assert orders == 1, pebble.log()

    (tmp_path / "second").mkdir()
    directory_requests = pebble.log().count("GET /dir")
    again = start_tlsproxy(config, tmp_path / "second", https_port)
    try:
        assert _served(https_port, NAMES[1]) == issued
        time.sleep(1)  # give a wrongly scheduled renewal the chance to show up
        assert pebble.log().count(NEW_ORDER) == orders
        assert pebble.log().count("GET /dir") == directory_requests  # CA not contacted
        assert "requesting" not in again.log
    finally:
        again.stop()

    # The status command shows it, from the stored state.
    listing = subprocess.run(
        [sys.executable, "-m", "tlsproxy.cli", "certs", "--config", str(again.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "one.example.com" in listing.stdout and "Pebble Intermediate" in listing.stdout
    assert "ECDSA" in listing.stdout


def test_tls_alpn01_issues_dual_ecdsa_and_rsa_certificates(
    tmp_path: Path, processes: Processes, echo_backend: int
) -> None:
    """tls-alpn-01 is answered on the HTTPS listener (ALPN acme-tls/1) while normal
    handshakes go on; `key_type: both` gets an ECDSA and an RSA certificate, each served to
    the clients that can use it."""
    https_port, http_port = free_port(), free_port()
    pebble = Pebble(processes, tmp_path, NAMES, http_port=http_port, https_port=https_port)
    pebble.start()
    config = _config(
        pebble, tmp_path / "state", echo_backend, challenges=["tls-alpn-01"], key_type="both"
    )
    del config["listen"]["http"]  # no port 80 at all: only tls-alpn-01 can work
    proxy = start_tlsproxy(config, tmp_path, https_port)
    try:
        ecdsa = _wait_for(
            "no ECDSA certificate", _issued_by_pebble(https_port, NAMES[1]), proxy, pebble
        )
        rsa = _wait_for(
            "no RSA certificate",
            _issued_by_pebble(https_port, NAMES[1], rsa=True),
            proxy,
            pebble,
        )
        root = pebble.root()
        client = _Client(https_port, NAMES[0], root)
        assert client.get()["host"] == NAMES[0]
        client.close()
        assert "answering tls-alpn-01 for two.example.com" in proxy.log
    finally:
        proxy.stop()
    assert isinstance(ecdsa.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(rsa.public_key(), RSAPublicKey)


def test_short_lived_certificate_is_renewed_and_a_ca_outage_keeps_the_old_one(
    tmp_path: Path, processes: Processes, echo_backend: int
) -> None:
    """A 30-second certificate is renewed when a third of its life is left: new handshakes
    get the new one while an open connection keeps working; then, with the CA down, renewal
    is retried with back-off and the last certificate stays in service."""
    https_port, http_port = free_port(), free_port()
    pebble = Pebble(
        processes, tmp_path, NAMES, http_port=http_port, https_port=https_port,
        validity_seconds=30,
    )  # fmt: skip
    pebble.start()
    config = _config(pebble, tmp_path / "state", echo_backend, retry_initial=1, retry_max=2)
    proxy = start_tlsproxy(config, tmp_path, https_port)
    try:
        first = _wait_for(
            "no certificate from pebble", _issued_by_pebble(https_port, NAMES[0]), proxy, pebble
        )
        root = pebble.root()
        client = _Client(https_port, NAMES[0], root)
        assert client.cert == first
        assert client.get()["host"] == NAMES[0]

        def renewed() -> x509.Certificate | None:
            cert = _served(https_port, NAMES[0])
            return cert if cert != first and "Pebble" in cert.issuer.rfc4514_string() else None

        second = _wait_for("no renewal", renewed, proxy, pebble, timeout=45)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime.total_seconds() <= 31
        assert client.get("/still-open")["path"] == "/still-open"  # same connection
        client.close()
        assert pebble.log().count(NEW_ORDER) == 2

        pebble.stop()
        deadline = time.monotonic() + 60
        while proxy.log.count("attempt 2 failed") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        log = proxy.log
        assert "attempt 1 failed: cannot reach the CA" in log, log
        assert "attempt 2 failed" in log, log
        assert "the current certificate stays in service" in log
        assert _served(https_port, NAMES[0]) == second
    finally:
        proxy.stop()


def test_dry_run_rehearses_issuance_without_touching_the_live_state(
    tmp_path: Path, processes: Processes, echo_backend: int
) -> None:
    """`tlsproxy acme-dry-run` registers, orders, answers the challenges on the configured
    listeners and finalizes against the directory, then discards everything: the live state
    directory is never created."""
    https_port, http_port = free_port(), free_port()
    pebble = Pebble(processes, tmp_path, NAMES, http_port=http_port, https_port=https_port)
    pebble.start()
    state = tmp_path / "live-state"
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(json.dumps(_config(pebble, state, echo_backend)))
    run = subprocess.run(
        [sys.executable, "-m", "tlsproxy.cli", "acme-dry-run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{pebble.log()}"
    assert f"ACME dry run against {pebble.directory_url}" in run.stdout
    assert "one.example.com: ok, a certificate was issued" in run.stdout
    assert pebble.log().count(NEW_ORDER) == 1
    assert not state.exists()

    pebble.stop()  # a failing dry run says why and exits 1
    failed = subprocess.run(
        [sys.executable, "-m", "tlsproxy.cli", "acme-dry-run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert failed.returncode == 1
    assert "one.example.com: FAILED: cannot reach the CA" in failed.stdout
