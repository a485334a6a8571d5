"""TLS to backends: the ``https://`` backend URLs and ``backend_tls`` keys, and the
start-up checks of their files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tlsproxy.backendtls import check_backend_tls
from tlsproxy.config import BackendTLS, parse_config
from tlsproxy.errors import ConfigError


def doc(backend: str = "https://10.0.0.5:8443", **site: Any) -> dict[str, Any]:
    return {
        "listen": {"https": ["tcp:443"]},
        "hosts": {"api.test": {"certificates": ["a.pem"], "backend": backend, **site}},
    }


def errors(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(d, "f.yaml")
    return [f"{p.path}: {p.reason}" for p in info.value.problems]


def test_https_backend_and_backend_tls_apply_to_https_routes() -> None:
    """``https://`` backends default to port 443; backend_tls applies to the host's
    https backends (main and routes) and not to its http ones."""
    d = doc(
        "https://app.internal",
        backend_tls={"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        routes=[
            {"path": "/a/", "backend": "https://10.0.0.6:8443"},
            {"path": "/b/", "backend": "http://127.0.0.1:8000"},
        ],
    )
    host = parse_config(d, "f").hosts[0]
    tls = BackendTLS(ca="ca.pem", cert="c.pem", key="k.pem", path="hosts.api.test.backend_tls")
    assert (host.backend.scheme, host.backend.port, host.backend.tls) == ("https", 443, tls)
    by_path = {r.path: r.backend.tls for r in host.routes}
    assert by_path == {"/a/": tls, "/b/": None}


@pytest.mark.parametrize(
    ("d", "message"),
    [
        (doc(backend_tls={"cert": "c.pem"}), "cert and key go together"),
        (doc(backend_tls={"ca": "a", "insecure_skip_verify": True}), "ca has no effect"),
        (doc("http://127.0.0.1:1", backend_tls={"ca": "a"}), "this host has none"),
        (doc(backend_tls={"verify": False}), "unknown key; allowed keys are: ca, cert, key"),
        (doc(backend_tls={"insecure_skip_verify": "yes"}), "must be true or false"),
    ],
)
def test_bad_backend_tls_is_reported(d: dict[str, Any], message: str) -> None:
    """Mistakes in backend_tls are reported with their key path."""
    found = errors(d)
    assert any(message in p and p.startswith("hosts.api.test.backend_tls") for p in found), found


def test_unreadable_files_fail_and_insecure_warns(tmp_path: Path) -> None:
    """A missing CA file is an error at start-up; insecure_skip_verify is a warning
    naming the backend."""
    config = parse_config(doc(backend_tls={"ca": str(tmp_path / "missing.pem")}), "f")
    [problem] = check_backend_tls(config)
    assert problem.path == "hosts.api.test.backend_tls" and not problem.warning
    assert "cannot read" in problem.reason
    config = parse_config(doc(backend_tls={"insecure_skip_verify": True}), "f")
    [problem] = check_backend_tls(config)
    assert problem.warning and problem.path.endswith("backend_tls.insecure_skip_verify")
    assert "https://10.0.0.5:8443" in problem.reason
    ca_file = pki.write_ca_file(tmp_path, pki.make_ca())
    assert check_backend_tls(parse_config(doc(backend_tls={"ca": str(ca_file)}), "f")) == []
    not_pem = pki.write_file(tmp_path / "junk.pem", b"junk")
    config = parse_config(doc(backend_tls={"ca": str(not_pem)}), "f")
    assert "no BEGIN CERTIFICATE" in check_backend_tls(config)[0].reason


def test_encrypted_client_key_is_a_clear_error_not_a_passphrase_prompt(tmp_path: Path) -> None:
    """An encrypted backend_tls.key is reported at start-up; OpenSSL never asks for a
    passphrase on the terminal (which would hang a service)."""
    ca = pki.make_ca()
    leaf = ca.issue(["proxy-client"], client=True)
    cert = pki.write_file(tmp_path / "client.crt", pki.cert_pem(leaf.cert))
    key = pki.write_file(tmp_path / "client.key", pki.key_pem(leaf.key, password=b"secret"))
    config = parse_config(doc(backend_tls={"cert": str(cert), "key": str(key)}), "f")
    [problem] = check_backend_tls(config)
    assert "is an encrypted private key" in problem.reason
