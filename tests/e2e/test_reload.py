"""SIGHUP reloads the configuration and certificates without dropping connections, and a
bad file or config never replaces the one in service."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests import pki
from tests.e2e.harness import TlsproxyProcess

pytestmark = pytest.mark.e2e


class Client:
    """One keep-alive HTTPS connection to the proxy, trusting the test CA."""

    def __init__(self, port: int, name: str, ca_file: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = context.wrap_socket(raw, server_hostname=name)
        self.name = name
        self._buffer = b""

    @property
    def serial(self) -> int:
        """The serial number of the certificate this connection was served."""
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def get(self, path: str) -> dict[str, Any]:
        """GET ``path`` on this connection, keeping it open; the backend's JSON answer."""
        self.tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.name}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(self._buffer) < length:
            self._buffer += self._recv()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return dict(json.loads(body))

    def _recv(self) -> bytes:
        chunk = self.tls.recv(65536)
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        return chunk

    def close(self) -> None:
        self.tls.close()


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Site:
    """A running tlsproxy for example.test whose certificate file and config a test rewrites."""

    def __init__(self, directory: Path, runner: Any, backend: int) -> None:
        self.ca = pki.make_ca()
        self.directory = directory
        self.ca_file = pki.write_ca_file(directory, self.ca)
        self.pem = directory / "example.pem"
        self.backend = backend
        self.leaf = self.write_certificate(["example.test"])
        self.config: dict[str, Any] = {
            "hosts": {
                "example.test": {
                    "certificates": [str(self.pem)],
                    "backend": f"http://127.0.0.1:{backend}",
                }
            }
        }
        self.proxy: TlsproxyProcess = runner(self.config)

    def write_certificate(self, names: list[str], path: Path | None = None) -> pki.Leaf:
        """Issue a new certificate and replace the file atomically, as certbot does."""
        leaf = self.ca.issue(names)
        target = path or self.pem
        temporary = pki.write_combined(self.directory, leaf, name=target.name + ".new")
        temporary.replace(target)
        return leaf

    def client(self, name: str = "example.test") -> Client:
        return Client(self.proxy.https_port, name, self.ca_file)

    def rewrite_config(self, text: str) -> None:
        self.proxy.config_path.write_text(text)

    def hup(self) -> None:
        self.proxy.proc.send_signal(signal.SIGHUP)

    def log_count(self, text: str) -> int:
        return self.proxy.log.count(text)


@pytest.fixture
def site(tmp_path: Path, tlsproxy_runner: Any, echo_backend: int) -> Iterator[Site]:
    yield Site(tmp_path, tlsproxy_runner, echo_backend)


def _serial_of_new_handshake(site: Site) -> int:
    client = site.client()
    try:
        return client.serial
    finally:
        client.close()


def test_new_certificate_file_is_served_after_sighup_and_open_connections_survive(
    site: Site,
) -> None:
    """After certbot-style replacement of the certificate file and SIGHUP, new handshakes get
    the new certificate while a keep-alive connection opened before keeps working."""
    before = site.client()
    assert before.serial == site.leaf.cert.serial_number
    assert before.get("/one")["path"] == "/one"

    renewed = site.write_certificate(["example.test"])
    site.hup()
    _wait_for(
        lambda: _serial_of_new_handshake(site) == renewed.cert.serial_number,
        "the renewed certificate to be served",
    )
    assert before.get("/two")["path"] == "/two"  # same connection, after the reload
    assert before.serial == site.leaf.cert.serial_number
    before.close()
    assert site.log_count("reloaded ") == 1


def _resumed(
    site: Site, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """One request on a new connection offering ``session``: whether it was resumed, and
    the session to offer next."""
    raw = socket.create_connection(("127.0.0.1", site.proxy.https_port), timeout=10)
    with context.wrap_socket(raw, server_hostname="example.test", session=session) as tls:
        tls.sendall(b"GET /s HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):  # to the server's close_notify (TLS 1.3 tickets too)
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        return tls.session_reused, tls.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_sessions_resume_across_a_certificate_renewal(site: Site, version: ssl.TLSVersion) -> None:
    """A returning client resumes its TLS session after a renewed certificate was reloaded
    (the TLS policy is the same); after a reload that changes the ``tls`` section it makes
    a full handshake, and resumes again from then on."""
    context = ssl.create_default_context(cafile=str(site.ca_file))
    context.minimum_version = context.maximum_version = version
    reused, session = _resumed(site, context, None)
    assert not reused
    renewed = site.write_certificate(["example.test"])
    site.hup()
    _wait_for(
        lambda: _serial_of_new_handshake(site) == renewed.cert.serial_number,
        "the renewed certificate to be served",
    )
    reused, session = _resumed(site, context, session)
    assert reused

    config = {
        "listen": {"https": [f"tcp:{site.proxy.https_port}:interface=127.0.0.1"]},
        **site.config,
        "tls": {"session_ticket_rotation": 3600},
    }
    site.rewrite_config(yaml.safe_dump(config))
    site.hup()
    _wait_for(lambda: site.log_count("reloaded ") == 2, "the second reload")
    reused, session = _resumed(site, context, session)
    assert not reused
    reused, session = _resumed(site, context, session)
    assert reused


def test_bad_certificate_file_is_refused_and_the_old_one_kept(site: Site) -> None:
    """A new certificate file whose key does not match is refused with a clear log line;
    tlsproxy keeps serving the certificate it had."""
    other = site.ca.issue(["example.test"])
    site.pem.write_bytes(pki.key_pem(other.key) + pki.cert_pem(site.ca.issue(["x.test"]).cert))
    site.hup()
    _wait_for(lambda: site.log_count("reload refused") > 0, "the refusal in the log")
    assert "private key does not match certificate" in site.proxy.log
    assert "still serving the previous configuration" in site.proxy.log
    client = site.client()
    assert client.serial == site.leaf.cert.serial_number
    assert client.get("/still")["path"] == "/still"
    client.close()


def test_broken_config_on_sighup_keeps_the_running_one(site: Site) -> None:
    """A config file with a YAML error or an unknown key is refused on SIGHUP, each problem
    logged with its location, and the running configuration stays in service."""
    site.rewrite_config("hosts: [\n")
    site.hup()
    _wait_for(lambda: site.log_count("still serving the previous") == 1, "the first refusal")
    assert "line 2" in site.proxy.log

    broken = {**site.config, "colour": "blue"}
    broken["listen"] = {"https": [f"tcp:{site.proxy.https_port}:interface=127.0.0.1"]}
    site.rewrite_config(yaml.safe_dump(broken))
    site.hup()
    _wait_for(lambda: site.log_count("still serving the previous") == 2, "the second refusal")
    assert "colour: unknown key" in site.proxy.log

    client = site.client()
    assert client.get("/alive")["path"] == "/alive"
    client.close()


def test_new_host_in_config_is_served_after_sighup(site: Site) -> None:
    """A host added to the config file is served (its certificate and backend) after SIGHUP."""
    other_pem = site.directory / "other.pem"
    other = site.write_certificate(["other.test"], other_pem)
    config = {
        "listen": {"https": [f"tcp:{site.proxy.https_port}:interface=127.0.0.1"]},
        **site.config,
    }
    config["hosts"] = {
        **site.config["hosts"],
        "other.test": {
            "certificates": [str(other_pem)],
            "backend": f"http://127.0.0.1:{site.backend}",
        },
    }
    site.rewrite_config(yaml.safe_dump(config))
    site.hup()
    _wait_for(lambda: site.log_count("reloaded ") == 1, "the reload")
    client = site.client("other.test")
    assert client.serial == other.cert.serial_number
    assert client.get("/new")["host"] == "other.test"
    client.close()


def test_watch_interval_picks_up_a_replaced_certificate_without_sighup(
    tmp_path: Path, tlsproxy_runner: Any, echo_backend: int
) -> None:
    """With watch_interval set, a certificate file replaced on disk is served to new
    handshakes without any signal, and a broken replacement is refused and logged."""
    ca = pki.make_ca()
    pem = tmp_path / "site.pem"
    first = ca.issue(["example.test"])
    pki.write_combined(tmp_path, first, name="site.pem")
    proxy = tlsproxy_runner(
        {
            "watch_interval": 0.2,
            "hosts": {
                "example.test": {
                    "certificates": [str(pem)],
                    "backend": f"http://127.0.0.1:{echo_backend}",
                }
            },
        }
    )
    ca_file = pki.write_ca_file(tmp_path, ca)

    def served() -> int:
        client = Client(proxy.https_port, "example.test", ca_file)
        try:
            return client.serial
        finally:
            client.close()

    assert served() == first.cert.serial_number
    renewed = ca.issue(["example.test"])
    pki.write_combined(tmp_path, renewed, name="site.pem.new").replace(pem)
    _wait_for(lambda: served() == renewed.cert.serial_number, "the watched file to be served")

    pem.write_bytes(pki.key_pem(ca.issue(["example.test"]).key) + pki.cert_pem(first.cert))
    _wait_for(lambda: "reload refused" in proxy.log, "the refusal of the broken file")
    assert served() == renewed.cert.serial_number
