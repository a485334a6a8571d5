"""Tests for `tlsproxy.headers`: the HSTS, HPKP and extra headers on HTTPS responses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.config import Config, HPKPSettings, HSTSSettings, parse_config
from tlsproxy.headers import (
    HeaderPolicy,
    build_policies,
    fallback_policy,
    header_warnings,
    hpkp_header,
    hsts_value,
    response_header_policy,
)

PIN_A = "A" * 43 + "="
PIN_B = "B" * 43 + "="
PIN_C = "C" * 43 + "="


def config(**site: Any) -> Config:
    return parse_config(
        {
            "listen": {"https": ["tcp:443"]},
            "hosts": {
                "example.com": {
                    "certificates": ["/nonexistent.pem"],
                    "backend": "http://127.0.0.1:8000",
                    **site,
                },
                "other.example": {
                    "certificates": ["/nonexistent.pem"],
                    "backend": "http://127.0.0.1:8001",
                },
            },
        },
        "proxy.yaml",
    )


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


def test_hsts_is_on_by_default_for_two_years() -> None:
    """Without any hsts key, every HTTPS response carries max-age=63072000 (2 years)."""
    policy = response_header_policy(config().hosts[0])
    assert policy.apply([]) == [(b"Strict-Transport-Security", b"max-age=63072000")]


def test_policy_header_lines_for_error_pages() -> None:
    """set_bytes holds the headers as wire lines, for the proxy's own error pages."""
    host = config(headers={"set": {"X-Frame-Options": "DENY"}}).hosts[0]
    assert response_header_policy(host).set_bytes == (
        b"Strict-Transport-Security: max-age=63072000\r\nX-Frame-Options: DENY\r\n"
    )
    assert HeaderPolicy().set_bytes == b""


def test_hsts_values() -> None:
    """includeSubDomains and preload are added when configured."""
    assert hsts_value(HSTSSettings(max_age=300)) == b"max-age=300"
    assert hsts_value(HSTSSettings(include_subdomains=True)) == (
        b"max-age=63072000; includeSubDomains"
    )
    full = HSTSSettings(max_age=31536000, include_subdomains=True, preload=True)
    assert hsts_value(full) == b"max-age=31536000; includeSubDomains; preload"
    assert hsts_value(HSTSSettings(enabled=False)) is None
    assert hsts_value(HSTSSettings(max_age=0)) == b"max-age=0"


def test_backend_hsts_is_replaced_not_duplicated() -> None:
    """A backend's own Strict-Transport-Security (any case) is replaced by ours."""
    policy = response_header_policy(config(hsts={"max_age": 600}).hosts[0])
    out = policy.apply(
        [
            (b"content-type", b"text/html"),
            (b"strict-transport-security", b"max-age=1"),
            (b"STRICT-TRANSPORT-SECURITY", b"max-age=2"),
        ]
    )
    assert header(out, b"strict-transport-security") == [b"max-age=600"]
    assert (b"content-type", b"text/html") in out


def test_hsts_false_leaves_the_backend_header_alone() -> None:
    """With hsts: false tlsproxy sends none of its own and passes the backend's through."""
    policy = response_header_policy(config(hsts=False).hosts[0])
    assert policy.apply([(b"Strict-Transport-Security", b"max-age=5")]) == [
        (b"Strict-Transport-Security", b"max-age=5")
    ]
    assert policy.apply([]) == []


def test_repeated_headers_keep_their_order() -> None:
    """Set-Cookie and other repeated headers pass in order, untouched."""
    policy = response_header_policy(config().hosts[0])
    cookies = [(b"Set-Cookie", b"a=1"), (b"X-Other", b"x"), (b"Set-Cookie", b"b=2")]
    assert policy.apply(cookies)[:3] == cookies


def test_extra_headers_are_set_and_removed() -> None:
    """headers.set replaces the backend's value; headers.remove drops the header."""
    policy = response_header_policy(
        config(
            headers={
                "set": {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"},
                "remove": ["Server", "X-Powered-By"],
            }
        ).hosts[0]
    )
    out = policy.apply(
        [
            (b"server", b"gunicorn"),
            (b"x-powered-by", b"PHP"),
            (b"x-content-type-options", b"sniff-away"),
            (b"Vary", b"Accept"),
        ]
    )
    assert header(out, b"x-content-type-options") == [b"nosniff"]
    assert header(out, b"referrer-policy") == [b"no-referrer"]
    assert header(out, b"server") == []
    assert header(out, b"x-powered-by") == []
    assert header(out, b"vary") == [b"Accept"]


def test_hpkp_header_lists_every_pin_once() -> None:
    """pin-sha256 per distinct pin, then max-age, includeSubDomains and report-uri."""
    settings = HPKPSettings(
        backup_pins=(),
        max_age=600,
        include_subdomains=True,
        report_uri="https://r.example/hpkp",
        report_only=False,
    )
    name, value = hpkp_header(settings, [PIN_A, PIN_B, PIN_A])
    assert name == b"Public-Key-Pins"
    assert (
        value
        == (
            f'pin-sha256="{PIN_A}"; pin-sha256="{PIN_B}"; max-age=600; includeSubDomains; '
            'report-uri="https://r.example/hpkp"'
        ).encode()
    )


def test_hpkp_report_only_uses_its_own_header_name() -> None:
    """report_only (the default) sends Public-Key-Pins-Report-Only."""
    name, value = hpkp_header(HPKPSettings(backup_pins=()), [PIN_A, PIN_B])
    assert name == b"Public-Key-Pins-Report-Only"
    assert value == f'pin-sha256="{PIN_A}"; pin-sha256="{PIN_B}"; max-age=5184000'.encode()


def test_hpkp_needs_two_distinct_pins() -> None:
    """One pin alone is never valid HPKP (RFC 7469 requires a backup)."""
    with pytest.raises(ValueError):
        hpkp_header(HPKPSettings(backup_pins=()), [PIN_A, PIN_A])


def test_hpkp_policy_replaces_backend_pins() -> None:
    """With hpkp, the backend's HPKP headers of either kind are dropped and ours sent."""
    host = config(hpkp={"backup_pins": [PIN_C]}).hosts[0]
    policy = response_header_policy(host, [PIN_A, PIN_C])
    out = policy.apply([(b"Public-Key-Pins", b"x"), (b"public-key-pins-report-only", b"y")])
    assert header(out, b"public-key-pins") == []
    assert header(out, b"public-key-pins-report-only") == [
        f'pin-sha256="{PIN_A}"; pin-sha256="{PIN_C}"; max-age=5184000'.encode()
    ]


def test_hpkp_is_off_by_default() -> None:
    """Without hpkp, no pins are sent even if pins are known."""
    policy = response_header_policy(config().hosts[0], [PIN_A, PIN_B])
    assert header(policy.apply([]), b"public-key-pins") == []
    assert header(policy.apply([]), b"public-key-pins-report-only") == []


def test_policies_per_site_and_fallback() -> None:
    """Each site has its policy; unknown sites get HSTS without includeSubDomains."""
    cfg = config(hsts={"include_subdomains": True, "max_age": 31536000})
    policies = build_policies(cfg, {})
    assert header(policies.for_site("example.com").apply([]), b"strict-transport-security") == [
        b"max-age=31536000; includeSubDomains"
    ]
    assert header(policies.for_site("other.example").apply([]), b"strict-transport-security") == [
        b"max-age=63072000"
    ]
    for site in (None, "unknown.example"):
        assert policies.for_site(site).apply([]) == [
            (b"Strict-Transport-Security", b"max-age=31536000")
        ]
    assert fallback_policy(config(hsts=False)) == HeaderPolicy()


def test_warnings_for_weak_hsts_and_any_hpkp() -> None:
    """HSTS off or under six months, and HPKP at all, are start-up warnings."""
    assert header_warnings(config()) == []
    off = header_warnings(config(hsts=False))
    assert [p.render("p.yaml") for p in off] == [
        "p.yaml: hosts.example.com.hsts: HSTS is off: browsers may be downgraded to plain "
        "HTTP, and SSL Labs grades at most A"
    ]
    short = header_warnings(config(hsts={"max_age": 86400}))
    assert short[0].path == "hosts.example.com.hsts.max_age"
    pinned = header_warnings(config(hpkp={"backup_pins": [PIN_C]}))
    assert {p.path for p in pinned} == {
        "hosts.example.com.hpkp",
        "hosts.example.com.hpkp.report_uri",
    }
    enforced = header_warnings(
        config(hpkp={"backup_pins": [PIN_C], "report_only": False, "report_uri": "https://r/"})
    )
    assert len(enforced) == 1
    assert "ENFORCED" in enforced[0].reason
    assert all(p.warning for p in off + short + pinned + enforced)


_names = st.sampled_from(
    [b"Strict-Transport-Security", b"strict-transport-security", b"Server", b"X-A", b"x-b"]
)


@given(st.lists(st.tuples(_names, st.binary(max_size=5)), max_size=12))
def test_apply_never_duplicates_a_managed_header(headers: list[tuple[bytes, bytes]]) -> None:
    """Whatever the backend sends, each header we set appears exactly once and each
    header we remove is gone."""
    host = config(headers={"set": {"X-A": "1"}, "remove": ["Server"]}).hosts[0]
    out = response_header_policy(host).apply(headers)
    assert len(header(out, b"strict-transport-security")) == 1
    assert header(out, b"x-a") == [b"1"]
    assert header(out, b"server") == []
    assert header(out, b"x-b") == header(headers, b"x-b")
