"""The TLS layer over real sockets, judged by real clients: openssl s_client, Python's
``ssl``, a pyOpenSSL client with ML-KEM, and sslyze against Mozilla's 6.0 profiles.

The server is the product, ``twistd -n tlsproxy --config proxy.yaml``, started
once per module per profile.  Everything binds to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from OpenSSL import SSL

from tests import pki
from tests.e2e.harness import ROOT, need_tool, start_tlsproxy
from tlsproxy import tls

pytestmark = pytest.mark.e2e

DATA = ROOT / "tests" / "data"
BACKEND = "http://127.0.0.1:9"  # never contacted: these tests speak TLS only


@attrs.frozen
class Setup:
    ca_file: Path
    ecdsa: pki.Leaf
    rsa: pki.Leaf
    wild: pki.Leaf
    default: pki.Leaf
    config: dict[str, Any]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Three hosts: example.test (ECDSA + RSA, 80 days), *.wild.test, default.test."""
    directory = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca()
    names = ["example.test", "www.example.test"]
    ecdsa = ca.issue(names, days=80)
    rsa_ = ca.issue(names, key_type="RSA", days=300)
    wild = ca.issue(["wild.test", "*.wild.test"])
    default = ca.issue(["default.test"], ip_addresses=["127.0.0.1"])

    def pem(leaf: pki.Leaf, name: str) -> str:
        return str(pki.write_combined(directory, leaf, name=name))

    config = {
        # One process: a session resumes only in the process that issued it.
        "workers": 1,
        "default_host": "default.test",
        "hosts": {
            "example.test": {
                "aliases": ["www.example.test"],
                "certificates": [pem(ecdsa, "ecdsa.pem"), pem(rsa_, "rsa.pem")],
                "backend": BACKEND,
            },
            "wild.test": {
                "aliases": ["*.wild.test"],
                "certificates": [pem(wild, "wild.pem")],
                "backend": BACKEND,
            },
            "default.test": {"certificates": [pem(default, "default.pem")], "backend": BACKEND},
        },
    }
    return Setup(pki.write_ca_file(directory, ca), ecdsa, rsa_, wild, default, config)


@pytest.fixture(scope="module")
def server(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The intermediate-profile server (the default ``tls`` settings)."""
    proc = start_tlsproxy(setup.config, tmp_path_factory.mktemp("intermediate"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def modern_server(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The modern profile, serving only ECDSA certificates of at most 90 days."""
    config = dict(setup.config, tls={"profile": "modern"})
    config["hosts"] = {
        name: {**host, "certificates": host["certificates"][:1]}
        for name, host in setup.config["hosts"].items()
    }
    proc = start_tlsproxy(config, tmp_path_factory.mktemp("modern"))
    yield proc
    proc.stop()


# -- openssl s_client (system OpenSSL 3.0: no ML-KEM) ----------------------------------


def s_client(server: Any, setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    openssl = need_tool("openssl")
    return subprocess.run(
        [
            openssl, "s_client", "-connect", f"127.0.0.1:{server.https_port}",
            "-CAfile", str(setup.ca_file), "-verify_return_error", *args,
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def brief(server: Any, setup: Setup, *args: str) -> dict[str, str]:
    """``s_client -brief`` as a dict (``Protocol version``, ``Peer certificate``, ...);
    asserts that the handshake and verification succeeded."""
    result = s_client(server, setup, "-brief", *args)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stderr.splitlines() if ": " in line)
    assert fields["Verification"] == "OK"
    return fields


@pytest.mark.parametrize(
    ("sni", "cn"),
    [
        ("example.test", "example.test"),
        ("WWW.Example.Test", "example.test"),
        ("a.wild.test", "wild.test"),
        ("unknown.test", "default.test"),
    ],
)
def test_s_client_gets_each_hosts_verified_chain(
    server: Any, setup: Setup, sni: str, cn: str
) -> None:
    """openssl verifies the chain each name gets: the host's, the wildcard's, or the default."""
    fields = brief(server, setup, "-servername", sni)
    assert fields["Peer certificate"] == f"O = tlsproxy tests, CN = {cn}"
    assert fields["Protocol version"] == "TLSv1.3"


def test_s_client_without_sni_gets_default(server: Any, setup: Setup) -> None:
    """A client sending no SNI gets the default host."""
    fields = brief(server, setup, "-noservername")
    assert fields["Peer certificate"] == "O = tlsproxy tests, CN = default.test"


@pytest.mark.parametrize(
    ("args", "signature"),
    [
        ((), "ECDSA"),
        (("-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"), "RSA-PSS"),
        (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), "RSA-PSS"),
    ],
)
def test_s_client_gets_ecdsa_or_rsa(
    server: Any, setup: Setup, args: tuple[str, ...], signature: str
) -> None:
    """A host with both certificates signs with ECDSA for capable clients and RSA for
    RSA-only ones, each chain verifying."""
    fields = brief(server, setup, "-servername", "example.test", *args)
    assert fields["Signature type"] == signature


@pytest.mark.parametrize(
    "args",
    [
        ("-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        ("-tls1_2", "-cipher", "AES128-GCM-SHA256"),
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"),
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"),
        ("-groups", "secp521r1"),
        ("-groups", "X448"),
        ("-groups", "ffdhe2048"),
    ],
)
def test_s_client_refused(server: Any, setup: Setup, args: tuple[str, ...]) -> None:
    """Old protocols, non-forward-secret or non-AEAD suites and groups outside Mozilla's
    list are refused by the server with an alert."""
    result = s_client(server, setup, "-servername", "example.test", *args)
    assert result.returncode != 0
    assert "alert" in result.stderr


def test_s_client_groups(server: Any, setup: Setup) -> None:
    """X25519, P-256 and P-384 are each accepted."""
    for group, shown in (
        ("X25519", "X25519"),
        ("prime256v1", "ECDH, prime256v1"),
        ("secp384r1", "ECDH, secp384r1"),
    ):
        fields = brief(server, setup, "-servername", "example.test", "-groups", group)
        assert fields["Server Temp Key"].startswith(shown)


@pytest.mark.parametrize(
    ("offer", "expected"),
    [("h2", "No ALPN negotiated"), ("h2,http/1.1", "ALPN protocol: http/1.1")],
)
def test_s_client_alpn(server: Any, setup: Setup, offer: str, expected: str) -> None:
    """ALPN picks http/1.1; a client offering only h2 still connects, without ALPN."""
    result = s_client(server, setup, "-servername", "example.test", "-alpn", offer)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


# -- Python's ssl module ---------------------------------------------------------------


def python_client(
    server: Any, setup: Setup, name: str, context: ssl.SSLContext | None = None
) -> tuple[ssl.SSLSocket, x509.Certificate]:
    context = context or ssl.create_default_context(cafile=str(setup.ca_file))
    raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname=name)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return sock, x509.load_der_x509_certificate(der)


@pytest.mark.parametrize(
    "name", ["example.test", "www.example.test", "x.wild.test", "default.test"]
)
def test_python_verifies_hostname(server: Any, setup: Setup, name: str) -> None:
    """Python's default context (chain and host name checks) accepts every configured name."""
    sock, _ = python_client(server, setup, name)
    with sock:
        assert sock.version() == "TLSv1.3"


def test_python_rsa_client_and_alpn(server: Any, setup: Setup) -> None:
    """A TLS 1.2 ECDHE-RSA client gets the RSA certificate; ALPN yields http/1.1 or nothing."""
    context = ssl.create_default_context(cafile=str(setup.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    context.set_alpn_protocols(["h2", "http/1.1"])
    sock, cert = python_client(server, setup, "example.test", context)
    with sock:
        assert cert == setup.rsa.cert
        assert sock.selected_alpn_protocol() == "http/1.1"
    h2_only = ssl.create_default_context(cafile=str(setup.ca_file))
    h2_only.set_alpn_protocols(["h2"])
    sock, cert = python_client(server, setup, "example.test", h2_only)
    with sock:
        assert cert == setup.ecdsa.cert
        assert sock.selected_alpn_protocol() is None


def test_python_tls11_refused(server: Any, setup: Setup) -> None:
    """A client limited to TLS 1.1 cannot connect."""
    context = ssl.create_default_context(cafile=str(setup.ca_file))
    with warnings.catch_warnings():  # the point is to use the deprecated versions
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        python_client(server, setup, "example.test", context)


def _request_and_session(
    server: Any, setup: Setup, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool, bytes]:
    """One request on a new connection offering ``session``: the session to offer
    next, whether this one was resumed, and the status line."""
    raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=10)
    with context.wrap_socket(raw, server_hostname="example.test", session=session) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):  # ends at the server's close_notify
            data += chunk
        return sock.session, sock.session_reused, data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_returning_client_resumes_its_session(
    server: Any, setup: Setup, version: ssl.TLSVersion
) -> None:
    """A client offering the session (TLS 1.3 ticket, TLS 1.2 session) it got on its
    last connection skips the full handshake, and its request is served the same."""
    context = ssl.create_default_context(cafile=str(setup.ca_file))
    context.minimum_version = context.maximum_version = version
    session, reused, status = _request_and_session(server, setup, context, None)
    assert not reused and session is not None
    assert status == b"HTTP/1.1 502 Bad Gateway"  # the backend is not there
    for _ in range(2):
        session, reused, status = _request_and_session(server, setup, context, session)
        assert reused
        assert status == b"HTTP/1.1 502 Bad Gateway"


# -- pyOpenSSL (bundled OpenSSL with ML-KEM) over a real socket ------------------------


def test_post_quantum_group_negotiated(server: Any, setup: Setup) -> None:
    """A client with ML-KEM gets the X25519MLKEM768 hybrid key exchange."""
    if not tls.group_supported("X25519MLKEM768"):
        pytest.skip("this OpenSSL lacks X25519MLKEM768")
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(setup.ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=10) as raw:
        raw.setblocking(False)
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(b"example.test")
        connection.set_connect_state()
        deadline = time.monotonic() + 10
        while True:
            try:
                connection.do_handshake()
                break
            except SSL.WantReadError:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "handshake timed out"
                select.select([raw], [], [], remaining)
        assert connection.get_group_name() == "X25519MLKEM768"
        assert connection.get_protocol_version_name() == "TLSv1.3"


# -- sslyze against Mozilla's profiles --------------------------------------------------


def sslyze_path() -> str:
    """sslyze from ``TLSPROXY_SSLYZE``, ``.tools/sslyze/bin/sslyze`` or PATH (skip if none,
    fail under CI=true)."""
    for candidate in (os.environ.get("TLSPROXY_SSLYZE"), str(ROOT / ".tools/sslyze/bin/sslyze")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return need_tool("sslyze")


def sslyze(server: Any, setup: Setup, profile: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sslyze_path(),
            f"--custom_tls_config={DATA / f'mozilla-6.0-{profile}.json'}",
            f"--certinfo_ca_file={setup.ca_file}",
            f"example.test:{server.https_port}{{127.0.0.1}}",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_sslyze_intermediate(server: Any, setup: Setup) -> None:
    """sslyze finds the default configuration compliant with Mozilla 6.0 intermediate,
    with both the ECDSA and the RSA chain, no compression, no client renegotiation."""
    result = sslyze(server, setup, "intermediate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK - Compliant" in result.stdout
    assert "Number of cert chains detected:    2" in result.stdout
    assert "Compression disabled" in result.stdout
    assert "Client Renegotiation DoS Attack:   OK - Not vulnerable" in result.stdout


def test_sslyze_modern(modern_server: Any, setup: Setup) -> None:
    """sslyze finds ``profile: modern`` with an ECDSA certificate of at most 90 days
    compliant with Mozilla 6.0 modern."""
    result = sslyze(modern_server, setup, "modern")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK - Compliant" in result.stdout


def test_sslyze_is_not_vacuous(server: Any, setup: Setup) -> None:
    """The same check fails the intermediate server against modern (TLS 1.2, RSA)."""
    result = sslyze(server, setup, "modern")
    assert result.returncode != 0
    assert "tls_versions" in result.stdout
