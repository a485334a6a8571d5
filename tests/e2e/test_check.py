"""``tlsproxy check``, the self-audit, run as a user runs it, and the grade tlsproxy logs
for each host when it starts."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import pki
from tests.e2e.harness import ROOT, free_port
from tlsproxy.config import load_config

pytestmark = pytest.mark.e2e

BACKEND = "http://127.0.0.1:9"
HSTS_OFF = (
    "HSTS is off; A+ needs Strict-Transport-Security with max-age of at least 15768000 (six months)"
)


def tlsproxy_check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``tlsproxy check --config FILE ARGS``."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "tlsproxy"), "check", "--config", config.name, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=config.parent,
    )


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def strong(tmp_path: Path) -> tuple[Path, Path]:
    """A config with two hosts (ECDSA + RSA certificates, default HSTS); and the CA file."""
    ca = pki.make_ca()
    a = pki.write_combined(tmp_path, ca.issue(["example.com", "www.example.com"]), name="a.pem")
    b = pki.write_combined(tmp_path, ca.issue(["api.example.com"], key_type="RSA"), name="b.pem")
    config = write_config(
        tmp_path,
        {
            "listen": {"https": ["tcp:8443:interface=127.0.0.1"]},
            "hosts": {
                "example.com": {
                    "aliases": ["www.example.com"],
                    "certificates": [str(a)],
                    "backend": BACKEND,
                },
                "api.example.com": {"certificates": [str(b)], "backend": BACKEND},
            },
        },
    )
    return config, pki.write_ca_file(tmp_path, ca)


def test_strong_config_is_a_plus(strong: tuple[Path, Path]) -> None:
    """The defaults with certificates from a trusted CA grade A+ for every host, and
    `--min-grade A+` passes."""
    config, ca_file = strong
    done = tlsproxy_check(config, "--ca-file", str(ca_file), "--min-grade", "A+")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "example.com: A+\napi.example.com: A+\n"
    assert done.stderr == ""


def test_private_ca_without_ca_file_is_t(strong: tuple[Path, Path]) -> None:
    """Certificates of a CA the system does not trust grade T, with the reason and the
    way out (--ca-file); a CI gate on any grade fails with status 2."""
    config, _ = strong
    done = tlsproxy_check(config, "--min-grade", "B")
    assert done.returncode == 2
    lines = done.stdout.splitlines()
    assert lines[0] == "example.com: T"
    assert lines[1].startswith("  T   hosts.example.com.certificates[0]: the chain is not trusted")
    assert "--ca-file" in lines[1]
    assert "below B: example.com (T), api.example.com (T)" in done.stderr
    assert tlsproxy_check(config, "--no-trust-check").stdout == (
        "example.com: A+\napi.example.com: A+\n"
    )


def test_check_binds_nothing(strong: tuple[Path, Path]) -> None:
    """The check runs while the configured port is taken: it never binds it."""
    config, ca_file = strong
    port = free_port()
    text = config.read_text().replace(
        "tcp:8443:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"
    )
    config.write_text(text)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = tlsproxy_check(config, "--ca-file", str(ca_file))
    assert done.returncode == 0, done.stderr


@pytest.fixture
def weak(tmp_path: Path) -> tuple[Path, Path, datetime.datetime]:
    """Hosts that start but fall short: HSTS off, HSTS for a day, a certificate that
    expires in five days (TLS 1.3 cannot be switched off in tlsproxy at all)."""
    ca = pki.make_ca()
    now = pki.now()
    soon_leaf = ca.issue(["soon.example"], not_after=now + datetime.timedelta(days=5, hours=2))
    files = {
        name: pki.write_combined(tmp_path, ca.issue([name]), name=f"{name}.pem")
        for name in ("off.example", "short.example")
    }
    files["soon.example"] = pki.write_combined(tmp_path, soon_leaf, name="soon.pem")
    config = write_config(
        tmp_path,
        {
            "listen": {"https": ["tcp:8443:interface=127.0.0.1"]},
            "tls": {"min_version": "1.2", "session_tickets": False},
            "hosts": {
                "off.example": {
                    "certificates": [str(files["off.example"])],
                    "backend": BACKEND,
                    "hsts": False,
                },
                "short.example": {
                    "certificates": [str(files["short.example"])],
                    "backend": BACKEND,
                    "hsts": {"max_age": 86400},
                },
                "soon.example": {"certificates": [str(files["soon.example"])], "backend": BACKEND},
            },
        },
    )
    return config, pki.write_ca_file(tmp_path, ca), soon_leaf.cert.not_valid_after_utc


def test_weak_config_lists_every_cap(weak: tuple[Path, Path, datetime.datetime]) -> None:
    """Each weakness caps its host with the reason and the key to change: no HSTS and a
    one-day HSTS give A, a certificate five days from expiry A-; `--min-grade A` fails
    (status 2) naming the host below it, `--min-grade A-` passes."""
    config, ca_file, expiry = weak
    done = tlsproxy_check(config, "--ca-file", str(ca_file), "--min-grade", "A")
    assert done.returncode == 2
    assert done.stdout.splitlines() == [
        "off.example: A",
        f"  A   hosts.off.example.hsts: {HSTS_OFF}",
        "short.example: A",
        "  A   hosts.short.example.hsts.max_age: HSTS max-age 86400 is under six months "
        "(15768000); A+ needs at least that",
        "soon.example: A-",
        "  A-  hosts.soon.example.certificates[0]: the certificate expires in 5 days (on "
        f"{expiry:%Y-%m-%d %H:%M} UTC); renew it",
    ]
    assert "tlsproxy check: below A: soon.example (A-)" in done.stderr
    # The start-up warnings are printed too, as warnings.
    assert "warning: proxy.yaml: hosts.off.example.hsts: HSTS is off" in done.stderr
    assert tlsproxy_check(config, "--ca-file", str(ca_file), "--min-grade", "A-").returncode == 0
    assert tlsproxy_check(config, "--ca-file", str(ca_file)).returncode == 0


def test_expired_certificate_is_t_and_an_error(tmp_path: Path) -> None:
    """An expired certificate is an error (tlsproxy would not start: status 1) and grades
    T, with the date it expired."""
    ca = pki.make_ca()
    leaf = ca.issue(["example.com"], not_before=pki.now() - datetime.timedelta(days=40), days=30)
    pem = pki.write_combined(tmp_path, leaf)
    config = write_config(
        tmp_path,
        {
            "listen": {"https": ["tcp:8443"]},
            "hosts": {"example.com": {"certificates": [str(pem)], "backend": BACKEND}},
        },
    )
    done = tlsproxy_check(config, "--ca-file", str(pki.write_ca_file(tmp_path, ca)))
    assert done.returncode == 1
    expired = f"{leaf.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    assert done.stdout.splitlines() == [
        "example.com: T",
        f"  T   hosts.example.com.certificates[0]: the certificate expired on {expired}",
    ]
    assert "error: proxy.yaml: hosts.example.com.certificates[0]: the certificate expired" in (
        done.stderr
    )
    assert "tlsproxy would not start" in done.stderr


def test_invalid_config_reports_every_problem(tmp_path: Path) -> None:
    """A config with schema errors is reported with file and key path, status 1, no grade."""
    config = write_config(
        tmp_path,
        {"listen": {"https": ["tcp:8443"]}, "tls": {"profile": "old"}, "hosts": {"x.example": {}}},
    )
    done = tlsproxy_check(config)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "proxy.yaml: tls.profile:" in done.stderr
    assert "proxy.yaml: hosts.x.example" in done.stderr


def test_startup_logs_each_hosts_grade(
    weak: tuple[Path, Path, datetime.datetime], tlsproxy_runner: Any
) -> None:
    """`twistd -n tlsproxy` logs each host's grade and its caps when it starts."""
    config, _, _ = weak
    document = yaml.safe_load(config.read_text())
    del document["listen"]
    proxy = tlsproxy_runner(document)
    log = proxy.log
    assert f"TLS grade off.example: A (capped: A: {HSTS_OFF})" in log
    assert "TLS grade short.example: A (capped: A: HSTS max-age 86400 is under six months" in log
    assert "TLS grade soon.example: A- (capped: A-: the certificate expires in 5 days" in log


def test_shipped_deploy_config_is_valid() -> None:
    """deploy/tlsproxy/proxy.yaml (used by the compose example) passes the schema, listens
    on the container's unprivileged ports and redirects to the published 443."""
    config = load_config(str(ROOT / "deploy" / "tlsproxy" / "proxy.yaml"))
    assert config.listen.https == ("tcp:8443",)
    assert config.listen.http == ("tcp:8080",)
    (site,) = config.hosts
    assert (site.backend.host, site.backend.port) == ("app", 8000)
    assert site.redirect.https_port == 443
    assert site.hsts.max_age >= 15768000
