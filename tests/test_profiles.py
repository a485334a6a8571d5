"""The Mozilla 6.0 profiles and how ``tls`` overrides apply to them (no OpenSSL involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.config import TLSSettings
from tlsproxy.errors import Problem
from tlsproxy.profiles import (
    DHE_CIPHERS,
    GROUPS,
    INTERMEDIATE_CIPHERS,
    PROFILES,
    TLS13_CIPHERSUITES,
    TLSParameters,
    check_settings,
    resolve,
)

DATA = Path(__file__).parent / "data"


def mozilla(name: str) -> dict[str, object]:
    return json.loads((DATA / f"mozilla-6.0-{name}.json").read_text())  # type: ignore[no-any-return]


def params(**overrides: object) -> TLSParameters:
    resolved, problems = resolve(TLSSettings(**overrides))  # type: ignore[arg-type]
    assert resolved is not None, problems
    return resolved


def reasons(problems: list[Problem], path: str) -> list[str]:
    return [p.reason for p in problems if p.path == path]


@pytest.mark.parametrize("name", ["intermediate", "modern"])
def test_profiles_match_mozilla_json(name: str) -> None:
    """Each built-in profile is exactly Mozilla's 6.0 profile: versions, suites (in
    Mozilla's order), TLS 1.3 suites and groups."""
    doc = mozilla(name)
    profile = PROFILES[name]
    versions = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}
    allowed = [v for k, v in versions.items() if profile.min_version <= k <= profile.max_version]
    assert allowed == doc["tls_versions"]
    assert list(profile.ciphers) == doc["ciphers"]["openssl"]  # type: ignore[index]
    assert list(profile.ciphersuites) == doc["ciphersuites"]
    assert list(profile.groups) == doc["tls_curves"]


def test_default_is_intermediate() -> None:
    """With no ``tls`` section, tlsproxy serves Mozilla intermediate with tickets on."""
    p = params()
    assert p.profile == "intermediate"
    assert (p.min_version, p.max_version) == ("1.2", "1.3")
    assert p.ciphers == INTERMEDIATE_CIPHERS
    assert p.ciphersuites == TLS13_CIPHERSUITES
    assert p.groups == GROUPS == ("X25519MLKEM768", "X25519", "prime256v1", "secp384r1")
    assert not p.groups_configured
    assert p.dhparam is None
    assert p.session_tickets


def test_modern_is_tls13_only() -> None:
    """The modern profile allows TLS 1.3 only and needs no TLS 1.2 suites."""
    p = params(profile="modern")
    assert (p.min_version, p.max_version) == ("1.3", "1.3")
    assert p.ciphers == ()


def test_overrides_replace_profile_values() -> None:
    """Each override replaces the profile's value rather than adding to it."""
    p = params(
        min_version="1.3",
        ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        ciphersuites="TLS_AES_256_GCM_SHA384",
        groups=("X25519",),
        session_tickets=False,
    )
    assert p.min_version == "1.3"
    assert p.ciphers == ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384")
    assert p.cipher_string == "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
    assert p.ciphersuites == ("TLS_AES_256_GCM_SHA384",)
    assert p.groups == ("X25519",) and p.groups_configured
    assert not p.session_tickets


def test_dhparam_adds_dhe_suites_after_the_profile_ones() -> None:
    """Giving DH parameters enables the DHE suites, after the ECDHE ones."""
    p = params(dhparam="/etc/ssl/dh.pem")
    assert p.ciphers == INTERMEDIATE_CIPHERS + DHE_CIPHERS
    assert p.dhparam == "/etc/ssl/dh.pem"
    assert params().ciphers == INTERMEDIATE_CIPHERS


def test_dhe_suite_override_needs_dhparam() -> None:
    """A DHE suite in ``tls.ciphers`` without ``tls.dhparam`` is an error; with it, fine."""
    problems = check_settings(TLSSettings(ciphers="DHE-RSA-AES128-GCM-SHA256"))
    assert reasons(problems, "tls.ciphers") == [
        "DHE-RSA-AES128-GCM-SHA256 is a DHE suite, which needs DH parameters in tls.dhparam"
    ]
    assert check_settings(TLSSettings(ciphers="DHE-RSA-AES128-GCM-SHA256", dhparam="dh.pem")) == []


@pytest.mark.parametrize("version", ["1.0", "1.1", "ssl3", "TLS1.1"])
def test_versions_below_tls12_are_refused(version: str) -> None:
    """``min_version`` below 1.2 is refused with a reason, not silently raised."""
    problems = check_settings(TLSSettings(min_version=version))
    assert reasons(problems, "tls.min_version") == [
        "TLS versions below 1.2 are insecure and not supported; use 1.2 or 1.3"
    ]
    assert resolve(TLSSettings(min_version=version))[0] is None


def test_unknown_version_and_profile_are_refused() -> None:
    """Anything but 1.2/1.3 and modern/intermediate is an error at its key."""
    problems = check_settings(TLSSettings(profile="old", min_version="2"))
    assert reasons(problems, "tls.profile") == ["must be one of modern, intermediate, not 'old'"]
    assert reasons(problems, "tls.min_version") == ["must be 1.2 or 1.3, not '2'"]


@pytest.mark.parametrize(
    ("suite", "reason"),
    [
        ("AES128-GCM-SHA256", "AES128-GCM-SHA256 is not forward secret"),
        ("RSA-AES128-GCM-SHA256", "RSA-AES128-GCM-SHA256 is not forward secret"),
        ("ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES128-SHA is not an AEAD cipher"),
        ("ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384 is not an AEAD cipher"),
        ("ECDHE-RSA-DES-CBC3-SHA", "ECDHE-RSA-DES-CBC3-SHA is not an AEAD cipher"),
        ("ADH-AES128-GCM-SHA256", "ADH-AES128-GCM-SHA256 is not forward secret"),
        ("ECDHE-PSK-CHACHA20-POLY1305", "ECDHE-PSK-CHACHA20-POLY1305 is not forward secret"),
        ("HIGH:!aNULL", "'!aNULL' is not a cipher suite name"),
        ("ECDHE+AESGCM", "'ECDHE+AESGCM' is not a cipher suite name"),
    ],
)
def test_weak_or_non_aead_ciphers_are_refused(suite: str, reason: str) -> None:
    """A TLS 1.2 override that is not forward secret or not AEAD is refused by name."""
    found = reasons(check_settings(TLSSettings(ciphers=suite)), "tls.ciphers")
    assert any(r.startswith(reason) for r in found), found


@pytest.mark.parametrize(
    "suite",
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-CCM",
    ],
)
def test_forward_secret_aead_ciphers_are_accepted(suite: str) -> None:
    """ECDHE suites with GCM, CCM or ChaCha20-Poly1305 pass the pure check."""
    assert check_settings(TLSSettings(ciphers=suite)) == []


@given(
    st.lists(
        st.sampled_from((*INTERMEDIATE_CIPHERS, "AES128-SHA", "ECDHE-RSA-AES128-SHA256")),
        min_size=1,
    )
)
def test_any_weak_suite_in_a_list_is_reported(suites: list[str]) -> None:
    """In any list of suites, exactly the weak ones are reported."""
    problems = check_settings(TLSSettings(ciphers=":".join(suites)))
    weak = [s for s in suites if s not in INTERMEDIATE_CIPHERS]
    assert len(problems) == len(weak)


def test_empty_lists_are_refused() -> None:
    """An override that lists nothing is an error rather than disabling the protocol."""
    problems = check_settings(TLSSettings(ciphers=" : ", ciphersuites="", groups=()))
    assert reasons(problems, "tls.ciphers") == ["must list at least one cipher suite"]
    assert reasons(problems, "tls.ciphersuites") == ["must list at least one TLS 1.3 suite"]
    assert reasons(problems, "tls.groups") == ["must name at least one group"]


def test_malformed_tls13_suites_and_groups_are_refused() -> None:
    """TLS 1.3 suites and groups must be plain names (no OpenSSL list syntax)."""
    problems = check_settings(
        TLSSettings(ciphersuites="TLS_AES_128_GCM_SHA256:AES128", groups=("?X448", "X25519"))
    )
    assert reasons(problems, "tls.ciphersuites") == [
        "'AES128' is not a TLS 1.3 suite name such as TLS_AES_128_GCM_SHA256"
    ]
    assert reasons(problems, "tls.groups") == ["'?X448' is not a group name such as X25519"]


def test_modern_with_tls12_needs_explicit_ciphers() -> None:
    """Modern has no TLS 1.2 suites, so enabling TLS 1.2 on it requires ``tls.ciphers``."""
    problems = check_settings(TLSSettings(profile="modern", min_version="1.2"))
    assert [p.path for p in problems] == ["tls.ciphers"]
    p = params(profile="modern", min_version="1.2", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert (p.min_version, p.max_version, p.ciphers) == (
        "1.2",
        "1.3",
        ("ECDHE-ECDSA-AES128-GCM-SHA256",),
    )
