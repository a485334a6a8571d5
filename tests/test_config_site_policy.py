"""Tests for the port-80 and response-header keys of the configuration:
``acme.webroot`` and each host's ``hsts``, ``hpkp``, ``redirect``, ``headers`` and
``webroot``.  Each test checks the line a user would see for a mistake."""

from __future__ import annotations

from typing import Any

import pytest

from tlsproxy.config import (
    AcmeSettings,
    BackupPin,
    Config,
    ExtraHeaders,
    HPKPSettings,
    HSTSSettings,
    RedirectSettings,
    parse_config,
)
from tlsproxy.errors import ConfigError

PIN = "A" * 43 + "="


def document(**site: Any) -> dict[str, Any]:
    return {
        "listen": {"https": ["tcp:443"], "http": ["tcp:80"]},
        "hosts": {
            "example.com": {
                "certificates": ["/etc/tlsproxy/example.pem"],
                "backend": "http://127.0.0.1:8000",
                **site,
            }
        },
    }


def parse(**site: Any) -> Config:
    return parse_config(document(**site), "proxy.yaml")


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc, "proxy.yaml")
    return str(exc.value).splitlines()


def site_errors(**site: Any) -> list[str]:
    return errors(document(**site))


def test_defaults() -> None:
    """Without the keys: HSTS on for two years, no HPKP, 301/308 redirects, no extras."""
    config = parse()
    host = config.hosts[0]
    assert host.hsts == HSTSSettings(
        enabled=True, max_age=63072000, include_subdomains=False, preload=False
    )
    assert host.hpkp is None
    assert host.redirect == RedirectSettings(
        enabled=True, status=301, other_status=308, https_port=None
    )
    assert host.headers == ExtraHeaders()
    assert host.webroot is None
    assert config.acme == AcmeSettings(webroot=None)


def test_every_key_parsed() -> None:
    """A host using every key gets them all in its HostConfig."""
    doc = document(
        hsts={"max_age": 31536000, "include_subdomains": True, "preload": True},
        hpkp={
            "backup_pins": [f"sha256/{PIN}", "/etc/tlsproxy/spare.key"],
            "max_age": 600,
            "include_subdomains": True,
            "report_uri": "https://report.example/hpkp",
            "report_only": False,
        },
        redirect={"status": 302, "other_status": 307, "https_port": 8443},
        headers={"set": {"X-Frame-Options": "DENY"}, "remove": ["Server"]},
        webroot="/var/www/example",
    )
    doc["acme"] = {"webroot": "/var/www/acme"}
    config = parse_config(doc, "proxy.yaml")
    host = config.hosts[0]
    assert host.hsts == HSTSSettings(max_age=31536000, include_subdomains=True, preload=True)
    assert host.hpkp == HPKPSettings(
        backup_pins=(
            BackupPin(pin=PIN, file=None, path="hosts.example.com.hpkp.backup_pins[0]"),
            BackupPin(
                pin=None,
                file="/etc/tlsproxy/spare.key",
                path="hosts.example.com.hpkp.backup_pins[1]",
            ),
        ),
        max_age=600,
        include_subdomains=True,
        report_uri="https://report.example/hpkp",
        report_only=False,
    )
    assert host.redirect == RedirectSettings(status=302, other_status=307, https_port=8443)
    assert host.headers == ExtraHeaders(set=(("X-Frame-Options", "DENY"),), remove=("Server",))
    assert host.webroot == "/var/www/example"
    assert config.acme.webroot == "/var/www/acme"


def test_booleans_switch_features() -> None:
    """hsts: false and hpkp: false are accepted shorthands; insecure_plain_http: true
    switches the redirect off."""
    host = parse(hsts=False, hpkp=False, insecure_plain_http=True).hosts[0]
    assert not host.hsts.enabled
    assert host.hpkp is None
    assert not host.redirect.enabled
    assert parse(hsts=True).hosts[0].hsts == HSTSSettings()


@pytest.mark.parametrize(
    ("hsts", "line"),
    [
        (
            {"preload": True},
            "proxy.yaml: hosts.example.com.hsts.preload: preload needs max_age of at least "
            "31536000 (one year) and include_subdomains: true (the browsers' preload list "
            "requires both); this host has max_age 63072000 and include_subdomains false",
        ),
        (
            {"preload": True, "include_subdomains": True, "max_age": 86400},
            "proxy.yaml: hosts.example.com.hsts.preload: preload needs max_age of at least "
            "31536000 (one year) and include_subdomains: true (the browsers' preload list "
            "requires both); this host has max_age 86400 and include_subdomains true",
        ),
        (
            {"max_age": -1},
            "proxy.yaml: hosts.example.com.hsts.max_age: must be from 0 to 2147483647, not -1",
        ),
        (
            {"max_age": "2y"},
            "proxy.yaml: hosts.example.com.hsts.max_age: must be a whole number, not a string",
        ),
        (
            {"include_subdomains": "yes"},
            "proxy.yaml: hosts.example.com.hsts.include_subdomains: must be true or false, "
            "not a string",
        ),
        (
            {"maxage": 1},
            "proxy.yaml: hosts.example.com.hsts.maxage: unknown key; allowed keys are: "
            "max_age, include_subdomains, preload",
        ),
        ("on", "proxy.yaml: hosts.example.com.hsts: must be a mapping, not a string"),
    ],
)
def test_hsts_mistakes(hsts: Any, line: str) -> None:
    """HSTS preload without a year and includeSubDomains is refused, as are bad values."""
    assert site_errors(hsts=hsts) == [line]


@pytest.mark.parametrize(
    ("hpkp", "line"),
    [
        ({}, "proxy.yaml: hosts.example.com.hpkp.backup_pins: is required"),
        (
            {"backup_pins": []},
            "proxy.yaml: hosts.example.com.hpkp.backup_pins: must list at least one backup "
            "pin (a key, CSR or certificate file)",
        ),
        (
            {"backup_pins": ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]},
            "proxy.yaml: hosts.example.com.hpkp.backup_pins[0]: looks like a pin but is not a "
            "base64 SHA-256 (44 characters ending in =)",
        ),
        (
            {"backup_pins": [PIN], "report_uri": "mailto:x@example.com"},
            "proxy.yaml: hosts.example.com.hpkp.report_uri: must be an absolute http(s) URL, "
            "not 'mailto:x@example.com'",
        ),
        (
            {"backup_pins": [PIN], "report_uri": 'https://r.example/"x'},
            "proxy.yaml: hosts.example.com.hpkp.report_uri: must not contain spaces, quotes, "
            "backslashes or control characters",
        ),
        (
            {"backup_pins": [PIN], "report_only": 1},
            "proxy.yaml: hosts.example.com.hpkp.report_only: must be true or false, not a number",
        ),
        (True, "proxy.yaml: hosts.example.com.hpkp: must be a mapping, not a boolean"),
    ],
)
def test_hpkp_mistakes(hpkp: Any, line: str) -> None:
    """HPKP needs at least one backup pin; pins and report URIs are checked."""
    assert site_errors(hpkp=hpkp) == [line]


@pytest.mark.parametrize(
    ("redirect", "line"),
    [
        (
            {"status": 303},
            "proxy.yaml: hosts.example.com.redirect.status: must be one of 301, 302, 307, 308, "
            "not 303",
        ),
        (
            {"other_status": 301},
            "proxy.yaml: hosts.example.com.redirect.other_status: must be one of 307, 308, not 301",
        ),
        (
            {"https_port": 70000},
            "proxy.yaml: hosts.example.com.redirect.https_port: must be from 1 to 65535, not 70000",
        ),
        (
            {"enabled": False},
            "proxy.yaml: hosts.example.com.redirect.enabled: unknown key; allowed keys are: "
            "status, other_status, https_port",
        ),
    ],
)
def test_redirect_mistakes(redirect: Any, line: str) -> None:
    """Redirect statuses must be redirects; methods other than GET keep theirs (307/308)."""
    assert site_errors(redirect=redirect) == [line]


@pytest.mark.parametrize(
    ("headers", "line"),
    [
        (
            {"set": {"Strict-Transport-Security": "max-age=1"}},
            "proxy.yaml: hosts.example.com.headers.set.Strict-Transport-Security: cannot set "
            "or remove Strict-Transport-Security: use the host's hsts key",
        ),
        (
            {"remove": ["Transfer-Encoding"]},
            "proxy.yaml: hosts.example.com.headers.remove[0]: cannot set or remove "
            "Transfer-Encoding: it frames the response and is managed by the proxy",
        ),
        (
            {"set": {"X Bad": "1"}},
            "proxy.yaml: hosts.example.com.headers.set.X Bad: 'X Bad' is not a valid header name",
        ),
        (
            {"set": {"X-A": "a\r\nX-Injected: 1"}},
            "proxy.yaml: hosts.example.com.headers.set.X-A: the value must be printable ASCII "
            "without line breaks",
        ),
        (
            {"set": {"X-A": 1}},
            "proxy.yaml: hosts.example.com.headers.set.X-A: must be a string, not a number",
        ),
        (
            {"set": {"X-A": "1", "x-a": "2"}},
            "proxy.yaml: hosts.example.com.headers.set.x-a: x-a is already named at "
            "hosts.example.com.headers.set.X-A",
        ),
        (
            {"set": {"Server": "tlsproxy"}, "remove": ["server"]},
            "proxy.yaml: hosts.example.com.headers.remove[0]: server is already named at "
            "hosts.example.com.headers.set.Server",
        ),
        (
            {"add": {"X-A": "1"}},
            "proxy.yaml: hosts.example.com.headers.add: unknown key; allowed keys are: set, remove",
        ),
    ],
)
def test_extra_header_mistakes(headers: Any, line: str) -> None:
    """Extra headers must be valid, unique and not ones the proxy manages itself."""
    assert site_errors(headers=headers) == [line]


def test_acme_section_mistakes() -> None:
    """acme.webroot must be a path; unknown acme keys list the allowed ones."""
    doc = document(webroot="")
    doc["acme"] = {"webroot": 5, "dns_provider": "x"}
    assert errors(doc) == [
        "proxy.yaml: acme.dns_provider: unknown key; allowed keys are: webroot, directory, "
        "email, agree_tos, state_dir, ca_bundle, key_type, challenges, retry_initial, retry_max",
        "proxy.yaml: acme.webroot: must be a string, not a number",
        "proxy.yaml: hosts.example.com.webroot: must not be empty",
    ]


def test_site_policy_problems_are_reported_with_certificate_problems() -> None:
    """Mistakes in these keys are reported in the same run as other mistakes of the host."""
    lines = site_errors(hsts={"max_age": -1}, certificates=[])
    assert lines == [
        "proxy.yaml: hosts.example.com.certificates: must list at least one certificate",
        "proxy.yaml: hosts.example.com.hsts.max_age: must be from 0 to 2147483647, not -1",
    ]
