"""Port 80 and security headers, end to end: the real ``twistd tlsproxy`` and real curl.

One tlsproxy process serves three sites for the whole module:

* ``example.com`` (+ ``www.example.com``): HSTS with includeSubDomains, extra
  headers set and removed, a backend that sends its own HSTS header;
* ``pinned.example``: an ECDSA and an RSA certificate and HPKP (report-only)
  with a spare key as backup pin;
* ``down.example``: a backend that is not running, for error pages.

It listens on a free HTTPS port and a free plain-HTTP port on 127.0.0.1, with
an ``acme.webroot`` for challenge files.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests import pki
from tests.e2e.harness import (
    TlsproxyProcess,
    free_port,
    need_tool,
    start_tlsproxy,
    wait_for_port,
)

pytestmark = pytest.mark.e2e


TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


class _Backend(BaseHTTPRequestHandler):
    """A backend that sets its own HSTS and X-Powered-By headers, which tlsproxy replaces."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = f"backend saw {self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Strict-Transport-Security", "max-age=1")
        self.send_header("X-Powered-By", "hand-written Python")
        self.send_header("Set-Cookie", "a=1")
        self.send_header("Set-Cookie", "b=2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@attrs.frozen
class Setup:
    proxy: TlsproxyProcess
    https_port: int
    http_port: int
    ca_file: Path
    webroot: Path
    pinned_keys: tuple[Path, ...]
    spare_key: Path
    tmp: Path


@attrs.frozen
class CurlResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


def curl(setup: Setup, url: str, *args: str) -> CurlResult:
    """Run curl against tlsproxy (names resolved to 127.0.0.1, our CA trusted)."""
    tool = need_tool("curl")
    resolve = []
    names = ("example.com", "www.example.com", "pinned.example", "down.example", "plain.example")
    for name in (*names, "x.test"):
        for port in (setup.https_port, setup.http_port):
            resolve += ["--resolve", f"{name}:{port}:127.0.0.1"]
    command = [tool, "-sS", "--max-time", "10", "--cacert", str(setup.ca_file), *resolve]
    out = subprocess.run(
        [*command, "-D", "-", *args, url],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    raw = out.stdout
    # With -L there may be several heads; take the last one.
    heads = []
    while raw.startswith(b"HTTP/"):
        head, _, raw = raw.partition(b"\r\n\r\n")
        heads.append(head)
    lines = heads[-1].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return CurlResult(status=int(lines[0].split()[1]), headers=headers, body=raw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("port80")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    backend = f"http://127.0.0.1:{server.server_address[1]}"
    ca = pki.make_ca()
    site = pki.write_combined(tmp, ca.issue(["example.com", "www.example.com"]), name="site.pem")
    pinned_ecdsa = pki.write_combined(tmp, ca.issue(["pinned.example"]), name="pinned-ec.pem")
    pinned_rsa = pki.write_combined(
        tmp, ca.issue(["pinned.example"], key_type="RSA", rsa_index=7), name="pinned-rsa.pem"
    )
    down = pki.write_combined(tmp, ca.issue(["down.example"]), name="down.pem")
    plain = pki.write_combined(tmp, ca.issue(["plain.example"]), name="plain.pem")
    spare = pki.write_file(tmp / "spare.key", pki.key_pem(pki.new_key()))
    webroot = tmp / "webroot"
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    https_port, http_port = free_port(), free_port()
    config = {
        "listen": {
            "https": [f"tcp:{https_port}:interface=127.0.0.1"],
            "http": [f"tcp:{http_port}:interface=127.0.0.1"],
        },
        "acme": {"webroot": str(webroot)},
        "hosts": {
            "example.com": {
                "aliases": ["www.example.com"],
                "certificates": [str(site)],
                "backend": backend,
                "hsts": {"include_subdomains": True},
                "headers": {
                    "set": {"X-Content-Type-Options": "nosniff"},
                    "remove": ["X-Powered-By"],
                },
            },
            "pinned.example": {
                "certificates": [str(pinned_ecdsa), str(pinned_rsa)],
                "backend": backend,
                "hpkp": {
                    "backup_pins": [str(spare)],
                    "max_age": 600,
                    "report_uri": "https://report.example/hpkp",
                },
            },
            "down.example": {
                "certificates": [str(down)],
                "backend": f"http://127.0.0.1:{free_port()}",
            },
            "plain.example": {
                "certificates": [str(plain)],
                "backend": backend,
                "insecure_plain_http": True,
            },
        },
    }
    proxy = start_tlsproxy(config, tmp, https_port)
    try:
        wait_for_port(http_port, proxy.proc)
        yield Setup(
            proxy=proxy,
            https_port=https_port,
            http_port=http_port,
            ca_file=pki.write_ca_file(tmp, ca),
            webroot=webroot,
            pinned_keys=(pinned_ecdsa, pinned_rsa),
            spare_key=spare,
            tmp=tmp,
        )
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()


def openssl_pin(path: Path) -> str:
    """The pin as the issue defines it: openssl pkey -pubout (DER) | sha256 | base64."""
    tool = need_tool("openssl")
    pub = subprocess.run(
        [tool, "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    digest = subprocess.run(
        [tool, "dgst", "-sha256", "-binary"], input=pub, capture_output=True, check=True, timeout=30
    ).stdout
    return (
        subprocess.run(["base64"], input=digest, capture_output=True, check=True, timeout=30)
        .stdout.decode()
        .strip()
    )


# -- plain HTTP ---------------------------------------------------------------------------


def test_redirects_keep_path_and_query_and_use_the_https_port(setup: Setup) -> None:
    """http://example.com:PLAIN/a/b?x=1&y=%20 → 301 to https://example.com:HTTPS/a/b?x=1&y=%20."""
    result = curl(setup, f"http://example.com:{setup.http_port}/a/b?x=1&y=%20")
    assert result.status == 301
    assert result.values("location") == [f"https://example.com:{setup.https_port}/a/b?x=1&y=%20"]
    alias = curl(setup, f"http://www.example.com:{setup.http_port}/")
    assert alias.values("location") == [f"https://www.example.com:{setup.https_port}/"]


def test_post_is_redirected_with_308(setup: Setup) -> None:
    """A POST on port 80 gets 308, so it is repeated as a POST on HTTPS."""
    result = curl(setup, f"http://example.com:{setup.http_port}/form", "-d", "a=1")
    assert result.status == 308
    assert result.values("location") == [f"https://example.com:{setup.https_port}/form"]


def test_following_the_redirect_reaches_the_backend_over_https(setup: Setup) -> None:
    """curl -L from the plain port ends at the backend, over verified HTTPS."""
    result = curl(setup, f"http://example.com:{setup.http_port}/page?q=1", "-L")
    assert result.status == 200
    assert result.body == b"backend saw GET /page?q=1\n"


def test_unknown_or_malformed_host_is_never_redirected(setup: Setup) -> None:
    """Unknown Host → 404, malformed Host → 400, and neither carries a Location."""
    unknown = curl(setup, f"http://x.test:{setup.http_port}/")
    assert (unknown.status, unknown.values("location")) == (404, [])
    evil = curl(setup, f"http://127.0.0.1:{setup.http_port}/", "-H", "Host: evil.example")
    assert (evil.status, evil.values("location")) == (404, [])
    bad = curl(setup, f"http://127.0.0.1:{setup.http_port}/", "-H", "Host: exa mple.com")
    assert (bad.status, bad.values("location")) == (400, [])


def test_no_hsts_on_plain_http(setup: Setup) -> None:
    """Nothing on the plain port sends Strict-Transport-Security or HPKP."""
    for url in (
        f"http://example.com:{setup.http_port}/",
        f"http://pinned.example:{setup.http_port}/",
        f"http://x.test:{setup.http_port}/",
        f"http://example.com:{setup.http_port}/.well-known/acme-challenge/{TOKEN}",
    ):
        result = curl(setup, url)
        assert result.values("strict-transport-security") == []
        assert result.values("public-key-pins") == []
        assert result.values("public-key-pins-report-only") == []


def test_webroot_challenge_is_served(setup: Setup) -> None:
    """A token file in the webroot is served as text/plain on the plain port."""
    (setup.webroot / ".well-known" / "acme-challenge" / TOKEN).write_text(TOKEN + ".thumb")
    result = curl(setup, f"http://example.com:{setup.http_port}/.well-known/acme-challenge/{TOKEN}")
    assert (result.status, result.body) == (200, (TOKEN + ".thumb").encode())
    assert result.values("content-type") == ["text/plain"]
    missing = curl(setup, f"http://example.com:{setup.http_port}/.well-known/acme-challenge/nope")
    assert missing.status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/acme-challenge/../../secret.txt",
        "/.well-known/acme-challenge/..%2f..%2fsecret.txt",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/secret.txt",
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge/.",
        "/.well-known/acme-challenge/link",
        "/.well-known/acme-challenge/secret.txt",
    ],
)
def test_traversal_and_malformed_tokens_are_refused(setup: Setup, path: str) -> None:
    """Traversal, listings, dotted names and symlinks out of the webroot give 404."""
    (setup.tmp / "secret.txt").write_text("SECRET")
    link = setup.webroot / ".well-known" / "acme-challenge" / "link"
    if not link.is_symlink():
        link.symlink_to(setup.tmp / "secret.txt")
    result = curl(setup, f"http://example.com:{setup.http_port}{path}", "--path-as-is")
    assert result.status == 404
    assert b"SECRET" not in result.body


# -- HTTPS headers ------------------------------------------------------------------------


def test_hsts_on_proxied_responses_replaces_the_backends(setup: Setup) -> None:
    """Proxied responses carry exactly our HSTS; the backend's max-age=1 is gone, extra
    headers are set and removed, repeated Set-Cookie headers survive."""
    result = curl(setup, f"https://example.com:{setup.https_port}/")
    assert result.status == 200
    assert result.values("strict-transport-security") == ["max-age=63072000; includeSubDomains"]
    assert result.values("x-content-type-options") == ["nosniff"]
    assert result.values("x-powered-by") == []
    assert result.values("set-cookie") == ["a=1", "b=2"]


def test_hsts_on_error_pages(setup: Setup) -> None:
    """502 for a dead backend and 421 for an unknown Host both carry HSTS."""
    down = curl(setup, f"https://down.example:{setup.https_port}/")
    assert down.status == 502
    assert down.values("strict-transport-security") == ["max-age=63072000"]
    unknown = curl(setup, f"https://example.com:{setup.https_port}/", "-H", "Host: x.test")
    assert unknown.status in (404, 421)
    assert unknown.values("strict-transport-security") == ["max-age=63072000"]


def test_hpkp_pins_equal_openssl_for_live_keys_and_backup(setup: Setup) -> None:
    """Public-Key-Pins-Report-Only pins the live ECDSA and RSA keys and the spare key,
    each pin equal to `openssl pkey -pubout -outform DER | openssl dgst -sha256 -binary
    | base64`."""
    result = curl(setup, f"https://pinned.example:{setup.https_port}/")
    assert result.status == 200
    assert result.values("public-key-pins") == []
    pins = [openssl_pin(p) for p in (*setup.pinned_keys, setup.spare_key)]
    assert result.values("public-key-pins-report-only") == [
        "; ".join(f'pin-sha256="{pin}"' for pin in pins)
        + '; max-age=600; report-uri="https://report.example/hpkp"'
    ]
    assert result.values("strict-transport-security") == ["max-age=63072000"]


def test_startup_warns_about_hpkp(setup: Setup) -> None:
    """The log explains at start-up that HPKP is deprecated and risky."""
    assert "hosts.pinned.example.hpkp: HPKP is deprecated" in setup.proxy.log


# -- the tlsproxy pins command ------------------------------------------------------------


def test_pins_command_matches_openssl(setup: Setup) -> None:
    """`tlsproxy pins FILE` prints the same pin as the openssl pipeline, first on its line."""
    import shutil
    import sys

    command = shutil.which("tlsproxy", path=str(Path(sys.executable).parent))
    assert command, "the tlsproxy console script is not installed (pip install -e .)"
    out = subprocess.run(
        [command, "pins", *map(str, setup.pinned_keys), str(setup.spare_key)],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout.decode()
    firsts = [line.split()[0] for line in out.splitlines() if "private key" in line]
    assert firsts == [openssl_pin(p) for p in (*setup.pinned_keys, setup.spare_key)]


def test_insecure_plain_http_host_is_proxied_over_port_80(setup: Setup) -> None:
    """A host with insecure_plain_http: true is proxied over plain HTTP (no redirect, and no
    HSTS even though its backend sends one), while its ACME challenges are still answered by
    tlsproxy and other hosts are still redirected; the start-up log calls it insecure."""
    result = curl(setup, f"http://plain.example:{setup.http_port}/page?x=1")
    assert result.status == 200
    assert result.body == b"backend saw GET /page?x=1\n"
    assert result.values("strict-transport-security") == []
    token = "plainHostToken_-123"
    challenge = setup.webroot / ".well-known" / "acme-challenge" / token
    challenge.write_text(token + ".thumbprint")
    answer = curl(
        setup, f"http://plain.example:{setup.http_port}/.well-known/acme-challenge/{token}"
    )
    assert (answer.status, answer.body) == (200, (token + ".thumbprint").encode())
    assert curl(setup, f"http://example.com:{setup.http_port}/page").status == 301
    assert "hosts.plain.example.insecure_plain_http: INSECURE" in setup.proxy.log
