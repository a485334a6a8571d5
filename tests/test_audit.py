"""Tests for `tlsproxy.audit`: the SSL-Labs-style grade of each host and the reason for
every cap below A+."""

from __future__ import annotations

import datetime
import functools
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from tests import pki
from tlsproxy.audit import (
    GRADES,
    HostGrade,
    describe,
    grade_config,
    grade_host,
    lowest,
    rank,
    report_lines,
)
from tlsproxy.certs import CertifiedKey, load_certified_key
from tlsproxy.config import Config, HostConfig, parse_config
from tlsproxy.profiles import TLSParameters, resolve

NOW = datetime.datetime.now(datetime.UTC)
SIX_MONTHS = 15768000


def config(hosts: dict[str, Any] | None = None, tls: dict[str, Any] | None = None) -> Config:
    document: dict[str, Any] = {
        "listen": {"https": ["tcp:8443"]},
        "hosts": hosts
        or {"example.com": {"certificates": ["/x.pem"], "backend": "http://127.0.0.1:8000"}},
    }
    if tls is not None:
        document["tls"] = tls
    return parse_config(document, "proxy.yaml")


def host(**policy: Any) -> HostConfig:
    body = {"certificates": ["/x.pem"], "backend": "http://127.0.0.1:8000", **policy}
    return config({"example.com": body}).hosts[0]


def params(**tls: Any) -> TLSParameters:
    resolved, problems = resolve(config(tls=tls).tls)
    assert resolved is not None, problems
    return resolved


def certified(tmp_path: Path, leaf: pki.Leaf, name: str = "site.pem") -> CertifiedKey:
    loaded, problems = load_certified_key(
        config(
            {
                "example.com": {
                    "certificates": [str(pki.write_combined(tmp_path, leaf, name=name))],
                    "backend": "http://127.0.0.1:8000",
                }
            }
        )
        .hosts[0]
        .certificates[0]
    )
    assert loaded is not None, problems
    return loaded


@pytest.fixture
def good(tmp_path: Path) -> CertifiedKey:
    return certified(tmp_path, pki.make_ca().issue(["example.com"], days=90))


ROOTS = [pki.make_ca().root.cert]


def caps(grade: HostGrade) -> list[tuple[str, str]]:
    return [(c.grade, c.path) for c in grade.caps]


def test_strong_defaults_grade_a_plus(good: CertifiedKey) -> None:
    """The intermediate profile with the default HSTS (two years) and a valid, trusted
    ECDSA certificate is A+ with nothing to explain."""
    grade = grade_host(host(), [good], params(), NOW, trust_roots=ROOTS)
    assert grade.grade == "A+"
    assert grade.caps == ()
    assert grade.trust_checked
    assert describe(grade) == "example.com: A+"


def test_modern_profile_tls13_only_is_a_plus(good: CertifiedKey) -> None:
    """TLS 1.3 alone (the modern profile) is not penalised: SSL Labs gives it A+."""
    assert grade_host(host(), [good], params(profile="modern"), NOW).grade == "A+"


def test_rsa_and_ecdsa_side_by_side_is_a_plus(tmp_path: Path, good: CertifiedKey) -> None:
    """A host with an RSA 2048 certificate next to its ECDSA one still grades A+."""
    rsa_cert = certified(tmp_path, pki.make_ca().issue(["example.com"], key_type="RSA"), "r.pem")
    assert grade_host(host(), [good, rsa_cert], params(), NOW, trust_roots=ROOTS).grade == "A+"


def test_hsts_off_caps_at_a(good: CertifiedKey) -> None:
    """`hsts: false` caps the grade at A, and says why at hosts.NAME.hsts."""
    grade = grade_host(host(hsts=False), [good], params(), NOW)
    assert grade.grade == "A"
    assert caps(grade) == [("A", "hosts.example.com.hsts")]
    assert "HSTS is off" in grade.caps[0].reason


@pytest.mark.parametrize(
    ("max_age", "expected"), [(0, "A"), (86400, "A"), (SIX_MONTHS - 1, "A"), (SIX_MONTHS, "A+")]
)
def test_hsts_needs_six_months_for_a_plus(good: CertifiedKey, max_age: int, expected: str) -> None:
    """An HSTS max-age under six months (15768000 s) caps at A; six months is enough."""
    grade = grade_host(host(hsts={"max_age": max_age}), [good], params(), NOW)
    assert grade.grade == expected
    if expected == "A":
        assert caps(grade) == [("A", "hosts.example.com.hsts.max_age")]
        assert str(max_age) in grade.caps[0].reason


def test_missing_tls13_caps_at_a_minus(good: CertifiedKey) -> None:
    """A policy without TLS 1.3 (which tlsproxy's profiles always offer) grades A-."""
    grade = grade_host(host(), [good], attrs.evolve(params(), max_version="1.2"), NOW)
    assert grade.grade == "A-"
    assert grade.caps[0].reason == "TLS 1.3 is not offered"


@pytest.mark.parametrize(
    ("suite", "expected", "why"),
    [
        ("AES128-GCM-SHA256", "B", "no forward secrecy"),
        ("ECDHE-RSA-AES128-SHA256", "B", "not an AEAD cipher"),
        ("ECDHE-RSA-DES-CBC3-SHA", "F", "broken or under-128-bit"),
        ("ECDHE-RSA-RC4-SHA", "F", "broken or under-128-bit"),
    ],
)
def test_weak_tls12_suites(good: CertifiedKey, suite: str, expected: str, why: str) -> None:
    """Suites tlsproxy refuses in the configuration would still be graded honestly: no
    forward secrecy or no AEAD caps at B, broken ciphers at F."""
    weak = attrs.evolve(params(), ciphers=(*params().ciphers, suite))
    grade = grade_host(host(), [good], weak, NOW)
    assert grade.grade == expected
    assert grade.caps[0].path == "tls.ciphers"
    assert why in grade.caps[0].reason


def test_tls12_suites_do_not_count_when_tls12_is_off(good: CertifiedKey) -> None:
    """With TLS 1.3 only, a leftover TLS 1.2 suite list is never offered and not graded."""
    modern = attrs.evolve(params(profile="modern"), ciphers=("AES128-GCM-SHA256",))
    assert grade_host(host(), [good], modern, NOW).grade == "A+"


def test_small_dh_parameters_and_groups_cap_at_b(good: CertifiedKey) -> None:
    """DHE with DH parameters under 2048 bits, or a key-exchange group under 256 bits,
    caps at B; 2048-bit DH is fine."""
    dhe = attrs.evolve(params(), ciphers=("DHE-RSA-AES128-GCM-SHA256",), dhparam="/dh.pem")
    assert grade_host(host(), [good], dhe, NOW, dh_bits=2048).grade == "A+"
    small = grade_host(host(), [good], dhe, NOW, dh_bits=1024)
    assert (small.grade, small.caps[0].path) == ("B", "tls.dhparam")
    groups = attrs.evolve(params(), groups=("X25519", "prime192v1"))
    weak = grade_host(host(), [good], groups, NOW)
    assert (weak.grade, weak.caps[0].path) == ("B", "tls.groups")
    assert "prime192v1" in weak.caps[0].reason


def test_expired_and_not_yet_valid_certificates_are_t(tmp_path: Path) -> None:
    """An expired or not yet valid certificate makes the host untrusted: T."""
    ca = pki.make_ca()
    old = certified(
        tmp_path,
        ca.issue(["example.com"], not_before=NOW - datetime.timedelta(days=90), days=30),
        "a.pem",
    )
    grade = grade_host(host(), [old], params(), NOW, trust_roots=ROOTS)
    assert grade.grade == "T"
    assert caps(grade) == [("T", "hosts.example.com.certificates[0]")]
    assert "expired on" in grade.caps[0].reason
    early = certified(
        tmp_path, ca.issue(["example.com"], not_before=NOW + datetime.timedelta(days=2)), "b.pem"
    )
    grade = grade_host(host(), [early], params(), NOW)
    assert grade.grade == "T"
    assert "not valid until" in grade.caps[0].reason


def test_certificate_close_to_expiry_caps_at_a_minus(tmp_path: Path) -> None:
    """A certificate that expires within 14 days caps at A- (beyond SSL Labs: a CI gate
    then catches a renewal that did not happen); 15 days left is A+."""
    ca = pki.make_ca()
    soon = certified(
        tmp_path,
        ca.issue(["example.com"], not_after=NOW + datetime.timedelta(days=5, hours=1)),
        "s.pem",
    )
    grade = grade_host(host(), [soon], params(), NOW)
    assert grade.grade == "A-"
    assert grade.caps[0].reason.startswith("the certificate expires in 5 days")
    later = certified(
        tmp_path, ca.issue(["example.com"], not_after=NOW + datetime.timedelta(days=15)), "l.pem"
    )
    assert grade_host(host(), [later], params(), NOW).grade == "A+"


def test_names_not_covered_are_t(tmp_path: Path) -> None:
    """A certificate that does not cover an alias of the host is a name mismatch: T."""
    other = certified(tmp_path, pki.make_ca().issue(["example.com"]))
    grade = grade_host(host(aliases=["www.example.com"]), [other], params(), NOW)
    assert grade.grade == "T"
    assert "www.example.com" in grade.caps[0].reason


def test_untrusted_chain_is_t_only_when_trust_is_checked(good: CertifiedKey) -> None:
    """A chain that does not lead to one of the given roots is T; without roots (start-up)
    trust is not graded and the grade says so."""
    stranger = pki.make_ca(fresh=True).root.cert
    grade = grade_host(host(), [good], params(), NOW, trust_roots=[stranger])
    assert grade.grade == "T"
    assert "not trusted" in grade.caps[0].reason
    assert "--ca-file" in grade.caps[0].reason
    assert grade_host(host(), [good], params(), NOW, trust_roots=[]).grade == "T"
    unchecked = grade_host(host(), [good], params(), NOW)
    assert unchecked.grade == "A+"
    assert not unchecked.trust_checked


def test_missing_intermediate_is_not_trusted(tmp_path: Path) -> None:
    """A served chain without its intermediate does not verify against the root: T."""
    leaf = pki.make_ca().issue(["example.com"])
    bare = attrs.evolve(certified(tmp_path, leaf), chain=())
    assert grade_host(host(), [bare], params(), NOW, trust_roots=ROOTS).grade == "T"


def _resigned(good: CertifiedKey, algorithm: Any, key: Any = None) -> CertifiedKey:
    ca = pki.make_ca()
    leaf = good.leaf
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key() if key is not None else leaf.public_key())  # type: ignore[arg-type]
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for extension in leaf.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return attrs.evolve(good, leaf=builder.sign(ca.intermediate.key, algorithm))  # type: ignore[arg-type]


class _SignedWith:
    """A real certificate that reports another signature hash (OpenSSL 4 cannot make
    SHA-1 signatures any more, but such certificates are still out there)."""

    def __init__(self, cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> None:
        self._cert = cert
        self.signature_hash_algorithm = algorithm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cert, name)


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.MD5()])
def test_sha1_or_md5_signature_is_f(good: CertifiedKey, algorithm: hashes.HashAlgorithm) -> None:
    """A certificate in the chain signed with SHA-1 or MD5 grades F."""
    weak = attrs.evolve(good, chain=(_SignedWith(good.chain[0], algorithm),))
    grade = grade_host(host(), [weak], params(), NOW)
    assert grade.grade == "F"
    assert f"signed with {algorithm.name.upper()}" in grade.caps[0].reason


def test_small_rsa_key_is_b(good: CertifiedKey) -> None:
    """An RSA key under 2048 bits (refused at start-up) would grade B."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    grade = grade_host(host(), [_resigned(good, hashes.SHA256(), small)], params(), NOW)
    assert grade.grade == "B"
    assert "1024 bits" in grade.caps[0].reason


def test_caps_are_listed_worst_first_and_config_order_is_kept(tmp_path: Path) -> None:
    """Every cap is listed, worst first, and grade_config grades hosts in file order."""
    ca = pki.make_ca()
    soon = pki.write_combined(tmp_path, ca.issue(["b.example"], days=3), name="b.pem")
    good = pki.write_combined(tmp_path, ca.issue(["a.example"]), name="a.pem")
    cfg = config(
        {
            "b.example": {
                "certificates": [str(soon)],
                "backend": "http://127.0.0.1:1",
                "hsts": False,
            },
            "a.example": {"certificates": [str(good)], "backend": "http://127.0.0.1:1"},
        }
    )
    loaded = {h.name: [load_certified_key(h.certificates[0])[0]] for h in cfg.hosts}
    grades = grade_config(cfg, loaded, params(), NOW)  # type: ignore[arg-type]
    assert [g.host for g in grades] == ["b.example", "a.example"]
    assert [c.grade for c in grades[0].caps] == ["A-", "A"]
    assert grades[0].grade == "A-"
    assert lowest(grades) == "A-"
    lines = report_lines(grades[0])
    assert lines[0] == "b.example: A-"
    assert lines[1].startswith("  A-  hosts.b.example.certificates[0]: the certificate expires")
    assert lines[2].startswith("  A   hosts.b.example.hsts: HSTS is off")


def test_grade_order() -> None:
    """T (not trusted) is below every letter; at_least compares by that order."""
    assert GRADES[0] == "A+" and GRADES[-1] == "T"
    assert rank("A+") < rank("A") < rank("A-") < rank("B") < rank("F") < rank("T")
    grade = HostGrade("x", "A-", (), False)
    assert grade.at_least("B") and grade.at_least("A-") and not grade.at_least("A")
    assert lowest([]) is None


@functools.cache
def _shared_good() -> CertifiedKey:
    directory = Path(tempfile.mkdtemp(prefix="tlsproxy-audit-"))
    return certified(directory, pki.make_ca().issue(["example.com"], days=90))


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_a_plus_exactly_when_hsts_lasts_six_months(max_age: int) -> None:
    """For any HSTS max-age the strong configuration is A+ exactly when max-age is at least
    six months, and A otherwise, with the one HSTS cap."""
    grade = grade_host(host(hsts={"max_age": max_age}), [_shared_good()], params(), NOW)
    assert grade.grade == ("A+" if max_age >= SIX_MONTHS else "A")
    assert len(grade.caps) == (0 if max_age >= SIX_MONTHS else 1)
