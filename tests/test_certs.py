"""Reading certificate files and checking them, as a user's PEM files would be."""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import pki
from tlsproxy.certs import (
    CertifiedKey,
    check_certified_key,
    check_names,
    check_validity,
    covers,
    load_certified_key,
    spki_sha256_b64,
)
from tlsproxy.config import CertificateSource
from tlsproxy.errors import Problem

WHERE = "hosts.example.com.certificates[0]"
NOW = pki.now().replace(second=0, microsecond=0)
DAY = datetime.timedelta(days=1)


def when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def one_file(path: Path) -> CertificateSource:
    return CertificateSource(key=str(path), cert=str(path), chain=None, path=WHERE)


def load_ok(source: CertificateSource) -> CertifiedKey:
    certified, problems = load_certified_key(source)
    assert certified is not None, problems
    assert [p for p in problems if not p.warning] == []
    return certified


def errors(source: CertificateSource) -> list[str]:
    certified, problems = load_certified_key(source)
    assert certified is None
    assert all(p.path == WHERE for p in problems)
    return [p.reason for p in problems if not p.warning]


@pytest.fixture(scope="module")
def ca() -> pki.CA:
    return pki.make_ca()


@pytest.fixture(scope="module")
def deep(ca: pki.CA) -> pki.Leaf:
    """A leaf under two intermediates: root → int1 → int2 → leaf."""
    int2 = pki.make_authority("second intermediate", issuer=ca.intermediate)
    leaf = ca.issue(["example.com"], issuer=int2)
    return attrs.evolve(leaf, chain=(int2.cert, ca.intermediate.cert))


# -- layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        ("key", "leaf", "chain"),
        ("leaf", "chain", "key"),
        ("leaf", "key", "chain"),
        ("chain", "leaf", "key"),
        ("key", "leaf", "chain", "root"),
        ("key", "leaf", "chain-reversed"),
        ("key", "chain-reversed", "leaf"),
    ],
)
def test_one_file_in_any_usual_order(tmp_path: Path, deep: pki.Leaf, order: tuple[str]) -> None:
    """Key, leaf and intermediates in one file load in any order; the chain is served
    leaf's issuer first and a self-signed root in the file is left out."""
    path = pki.write_combined(tmp_path, deep, order)  # type: ignore[arg-type]
    certified = load_ok(one_file(path))
    assert certified.leaf == deep.cert
    assert certified.chain == deep.chain
    assert certified.key_type == "ECDSA"
    assert certified.names == ("example.com",)
    assert certified.not_after == deep.cert.not_valid_after_utc
    assert certified.not_after.tzinfo is not None
    assert certified.source.path == WHERE


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(["key", "leaf", "int1", "int2", "root"]))
def test_any_permutation_loads_the_same(
    tmp_path: Path, ca: pki.CA, deep: pki.Leaf, order: list[str]
) -> None:
    """Whatever order the PEM blocks come in, the same key, leaf and ordered chain result."""
    blocks = {
        "key": pki.key_pem(deep.key),
        "leaf": pki.cert_pem(deep.cert),
        "int1": pki.cert_pem(deep.chain[1]),
        "int2": pki.cert_pem(deep.chain[0]),
        "root": pki.cert_pem(ca.root.cert),
    }
    path = pki.write_file(tmp_path / "perm.pem", b"".join(blocks[b] for b in order))
    certified = load_ok(one_file(path))
    assert (certified.leaf, certified.chain) == (deep.cert, deep.chain)


def test_separate_key_cert_and_chain_files(tmp_path: Path, ca: pki.CA) -> None:
    """The key, the certificate and the chain may each be in their own file."""
    leaf = ca.issue(["example.com"])
    files = pki.write_separate(tmp_path, leaf)
    source = CertificateSource(
        key=str(files.key), cert=str(files.cert), chain=str(files.chain), path=WHERE
    )
    certified = load_ok(source)
    assert (certified.leaf, certified.chain) == (leaf.cert, leaf.chain)


def test_separate_key_and_fullchain(tmp_path: Path, ca: pki.CA) -> None:
    """certbot's layout: privkey.pem plus fullchain.pem (leaf then intermediates)."""
    leaf = ca.issue(["example.com"])
    key = pki.write_file(tmp_path / "privkey.pem", pki.key_pem(leaf.key))
    full = pki.write_file(tmp_path / "fullchain.pem", pki.cert_pem(leaf.cert, *leaf.chain))
    certified = load_ok(CertificateSource(key=str(key), cert=str(full), chain=None, path=WHERE))
    assert certified.chain == leaf.chain


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA", "Ed25519"])
def test_key_types_and_traditional_pem(tmp_path: Path, ca: pki.CA, key_type: pki.KeyType) -> None:
    """ECDSA, RSA and Ed25519 keys load, in PKCS#8 or the traditional OpenSSL format."""
    leaf = ca.issue(["example.com"], key_type=key_type)
    pem = pki.key_pem(leaf.key, traditional=True) + pki.cert_pem(leaf.cert, *leaf.chain)
    certified = load_ok(one_file(pki.write_file(tmp_path / "k.pem", pem)))
    assert certified.key_type == key_type


def test_duplicate_certificates_are_served_once(tmp_path: Path, ca: pki.CA) -> None:
    """An intermediate pasted twice is harmless and sent once."""
    leaf = ca.issue(["example.com"])
    path = pki.write_combined(tmp_path, leaf, ("key", "leaf", "chain", "chain"))
    assert load_ok(one_file(path)).chain == leaf.chain


def test_self_signed_leaf(tmp_path: Path) -> None:
    """A self-signed certificate loads with an empty chain."""
    root = pki.make_authority("self")
    leaf = pki.Leaf(key=root.key, cert=root.cert, chain=(), root=root.cert)
    certified = load_ok(one_file(pki.write_combined(tmp_path, leaf, ("key", "leaf"))))
    assert certified.chain == ()


# -- file problems ---------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is reported with its path and the system's reason."""
    missing = tmp_path / "nope.pem"
    assert errors(one_file(missing)) == [f"cannot read {missing}: No such file or directory"]


def test_no_key(tmp_path: Path, ca: pki.CA) -> None:
    """A certificate file without a key names the file that should hold it."""
    path = pki.write_combined(tmp_path, ca.issue(["example.com"]), ("leaf", "chain"))
    assert errors(one_file(path)) == [f"no private key found in {path}"]


def test_not_pem_at_all(tmp_path: Path) -> None:
    """A file with no PEM blocks (DER, or the wrong file) is reported as missing both."""
    path = pki.write_file(tmp_path / "x.der", b"\x30\x82\x01\x00garbage")
    assert errors(one_file(path)) == [
        f"no private key found in {path}",
        f"no certificate found in {path}",
    ]


def test_several_keys(tmp_path: Path, ca: pki.CA) -> None:
    """Two keys in the files are an error: which one is meant is unclear."""
    leaf = ca.issue(["example.com"])
    pem = pki.key_pem(leaf.key) + pki.key_pem(pki.new_key()) + pki.cert_pem(leaf.cert)
    path = pki.write_file(tmp_path / "two.pem", pem)
    assert errors(one_file(path)) == ["2 private keys found; give exactly one per certificate"]


def test_no_certificate(tmp_path: Path) -> None:
    """A key alone is reported as lacking its certificate."""
    path = pki.write_file(tmp_path / "key.pem", pki.key_pem(pki.new_key()))
    assert errors(one_file(path)) == [f"no certificate found in {path}"]


def test_empty_chain_file(tmp_path: Path, ca: pki.CA) -> None:
    """A separate chain file with no certificate in it is reported."""
    files = pki.write_separate(tmp_path, ca.issue(["example.com"]))
    files.chain.write_bytes(b"")
    source = CertificateSource(
        key=str(files.key), cert=str(files.cert), chain=str(files.chain), path=WHERE
    )
    assert errors(source) == [f"no certificate found in the chain file {files.chain}"]


@pytest.mark.parametrize("traditional", [False, True])
def test_encrypted_key(tmp_path: Path, ca: pki.CA, traditional: bool) -> None:
    """A passphrase-protected key is refused with how to decrypt it."""
    leaf = ca.issue(["example.com"])
    pem = pki.key_pem(leaf.key, traditional=traditional, password=b"secret")
    path = pki.write_file(tmp_path / "enc.pem", pem + pki.cert_pem(leaf.cert))
    assert errors(one_file(path)) == [
        "the private key is encrypted with a passphrase; tlsproxy needs it unencrypted "
        "(openssl pkey -in KEY -out KEY.new) and protected by file permissions"
    ]


def test_key_does_not_match(tmp_path: Path, ca: pki.CA) -> None:
    """A key from another certificate gets the exact message users search for."""
    leaf = ca.issue(["example.com"])
    other = pki.new_key()
    pem = pki.key_pem(other) + pki.cert_pem(leaf.cert, *leaf.chain)
    path = pki.write_file(tmp_path / "mismatch.pem", pem)
    assert errors(one_file(path)) == ["private key does not match certificate"]


def test_two_certificates_match_the_key(tmp_path: Path, ca: pki.CA) -> None:
    """An old and a renewed certificate for the same key in one file are an error."""
    key = pki.new_key()
    old, new = ca.issue(["example.com"], key=key), ca.issue(["example.com"], key=key)
    path = pki.write_file(tmp_path / "two.pem", pki.key_pem(key) + pki.cert_pem(old.cert, new.cert))
    [reason] = errors(one_file(path))
    assert reason.startswith("2 certificates match the private key (")
    assert reason.endswith("); keep only the current one")


def test_gap_in_the_chain(tmp_path: Path, ca: pki.CA, deep: pki.Leaf) -> None:
    """A missing middle intermediate is reported as a broken chain naming the missing issuer."""
    pem = pki.key_pem(deep.key) + pki.cert_pem(deep.cert, deep.chain[1])
    path = pki.write_file(tmp_path / "gap.pem", pem)
    assert errors(one_file(path)) == [
        "the chain is broken: CN=example.com,O=tlsproxy tests was issued by "
        "CN=second intermediate,O=tlsproxy tests, which is missing from the files; "
        "CN=tlsproxy test intermediate,O=tlsproxy tests does not fill the gap"
    ]


def test_unrelated_certificate(tmp_path: Path, ca: pki.CA) -> None:
    """A certificate from another CA after a complete chain is reported as unrelated."""
    leaf = ca.issue(["example.com"])
    stranger = pki.make_ca(fresh=True).issue(["other.test"])
    pem = pki.key_pem(leaf.key) + pki.cert_pem(leaf.cert, *leaf.chain, leaf.root, stranger.cert)
    path = pki.write_file(tmp_path / "stray.pem", pem)
    assert errors(one_file(path)) == [
        "the certificate CN=other.test,O=tlsproxy tests is not part of the chain of "
        "CN=example.com,O=tlsproxy tests; remove it"
    ]


def test_same_name_wrong_key_is_not_an_issuer(tmp_path: Path, ca: pki.CA) -> None:
    """An intermediate with the right name but another key does not count as the issuer."""
    leaf = ca.issue(["example.com"])
    impostor = pki.make_authority("tlsproxy test intermediate", issuer=ca.root)
    pem = pki.key_pem(leaf.key) + pki.cert_pem(leaf.cert, impostor.cert)
    [reason] = errors(one_file(pki.write_file(tmp_path / "imp.pem", pem)))
    assert reason.startswith("the chain is broken: CN=example.com")


def test_short_rsa_key(tmp_path: Path, ca: pki.CA) -> None:
    """RSA keys under 2048 bits are refused."""
    leaf = ca.issue(["example.com"], key=pki.rsa_key(0, bits=1024))
    path = pki.write_combined(tmp_path, leaf)
    assert errors(one_file(path)) == ["the RSA key has 1024 bits; at least 2048 are required"]


def test_unusable_curve(tmp_path: Path, ca: pki.CA) -> None:
    """An ECDSA key on a curve TLS does not use is refused."""
    leaf = ca.issue(["example.com"], key=ec.generate_private_key(ec.SECP256K1()))
    assert errors(one_file(pki.write_combined(tmp_path, leaf))) == [
        "the ECDSA key uses curve secp256k1, which TLS clients do not accept; use P-256 or P-384"
    ]


def test_unsupported_key_type(tmp_path: Path, ca: pki.CA) -> None:
    """A key type tlsproxy cannot serve (Ed448) is refused by name."""
    key = ed448.Ed448PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = pki.write_file(tmp_path / "ed448.pem", pem + pki.cert_pem(ca.issue(["a.test"]).cert))
    [reason] = errors(one_file(path))
    assert reason.startswith("unsupported private key type") and reason.endswith("use ECDSA or RSA")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_readable_by_others_warns(tmp_path: Path, ca: pki.CA, mode: int) -> None:
    """A key file readable by group or others loads but warns, showing the mode."""
    path = pki.write_combined(tmp_path, ca.issue(["example.com"]), mode=mode)
    certified, problems = load_certified_key(one_file(path))
    assert certified is not None
    assert problems == [
        Problem(
            WHERE,
            f"the private key file {path} is readable by group or others (mode {mode:04o}); "
            f"run chmod 600 on it",
            warning=True,
        )
    ]


def test_private_key_file_mode_0600_is_quiet(tmp_path: Path, ca: pki.CA) -> None:
    """With mode 0600 (or 0400) there is nothing to say; certificate files may be 0644."""
    files = pki.write_separate(tmp_path, ca.issue(["example.com"]))
    os.chmod(files.key, 0o400)
    source = CertificateSource(
        key=str(files.key), cert=str(files.cert), chain=str(files.chain), path=WHERE
    )
    assert load_certified_key(source)[1] == []


# -- validity --------------------------------------------------------------------------


def certified_for(ca: pki.CA, names: list[str], **kwargs: object) -> CertifiedKey:
    leaf = ca.issue(names, **kwargs)  # type: ignore[arg-type]
    return CertifiedKey(
        key=leaf.key,  # type: ignore[arg-type]
        leaf=leaf.cert,
        chain=leaf.chain,
        key_type="ECDSA",
        names=tuple(names),
        not_after=leaf.cert.not_valid_after_utc,
        source=CertificateSource(key="k", cert="c", chain=None, path=WHERE),
    )


def test_expired(ca: pki.CA) -> None:
    """An expired certificate is an error with its expiry date."""
    c = certified_for(ca, ["example.com"], not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    assert check_validity(c, NOW) == [
        Problem(WHERE, f"the certificate expired on {when(NOW - DAY)}")
    ]


def test_not_yet_valid(ca: pki.CA) -> None:
    """A certificate whose validity starts in the future is an error."""
    c = certified_for(ca, ["example.com"], not_before=NOW + 2 * DAY, days=90)
    assert check_validity(c, NOW) == [
        Problem(WHERE, f"the certificate is not valid until {when(NOW + 2 * DAY)}")
    ]


def test_expired_intermediate(ca: pki.CA) -> None:
    """An expired intermediate is an error naming it."""
    old = pki.make_authority(
        "old intermediate", issuer=ca.root, not_before=NOW - 400 * DAY, not_after=NOW - DAY
    )
    leaf = certified_for(ca, ["example.com"], issuer=old, not_before=NOW - DAY)
    leaf = attrs.evolve(leaf, chain=(old.cert,))
    assert check_validity(leaf, NOW) == [
        Problem(
            WHERE,
            f"the intermediate CN=old intermediate,O=tlsproxy tests expired on {when(NOW - DAY)}",
        )
    ]


@given(st.integers(min_value=0, max_value=40))
def test_expiry_warning_within_14_days(days_left: int) -> None:
    """Expiring in under 14 days warns with the days left; later is quiet."""
    ca = pki.make_ca()
    c = certified_for(
        ca,
        ["example.com"],
        not_before=NOW - 30 * DAY,
        not_after=NOW + days_left * DAY + datetime.timedelta(minutes=1),
    )
    problems = check_validity(c, NOW)
    if days_left < 14:
        plural = "s" if days_left != 1 else ""
        [p] = problems
        assert p.warning
        assert p.reason.startswith(f"the certificate expires in {days_left} day{plural} (on ")
    else:
        assert problems == []


# -- host names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sans", "name", "covered"),
    [
        (["example.com"], "example.com", True),
        (["*.example.com"], "www.example.com", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "a.b.example.com", False),
        (["*.example.com"], "*.example.com", True),
        (["www.example.com"], "*.example.com", False),
        (["*.a.example.com"], "*.example.com", False),
        (["example.com", "www.example.com"], "www.example.com", True),
        (["other.test"], "example.com", False),
    ],
)
def test_covers(sans: list[str], name: str, covered: bool) -> None:
    """SAN wildcards cover one label (RFC 6125); a configured wildcard needs the same SAN
    wildcard."""
    assert covers(sans, name) is covered


labels = st.from_regex(r"\A[a-z0-9]{1,10}\Z")


@given(labels, labels, st.lists(labels, min_size=0, max_size=2))
def test_wildcard_san_covers_exactly_one_label(first: str, base: str, extra: list[str]) -> None:
    """``*.base.test`` covers ``x.base.test`` and nothing with more or fewer labels."""
    parent = f"{base}.test"
    assert covers([f"*.{parent}"], f"{first}.{parent}")
    assert not covers([f"*.{parent}"], parent)
    if extra:
        assert not covers([f"*.{parent}"], ".".join([first, *extra, parent]))


def test_names_not_covered_are_listed(ca: pki.CA) -> None:
    """Every configured name the certificate misses is named, with what it does cover."""
    c = certified_for(ca, ["example.com", "*.example.com"])
    assert check_names(c, ["example.com", "www.example.com", "shop.test", "a.b.example.com"]) == [
        Problem(
            WHERE,
            "the certificate does not cover shop.test, a.b.example.com; "
            "it covers only example.com, *.example.com",
        )
    ]


def test_names_are_compared_normalised(tmp_path: Path, ca: pki.CA) -> None:
    """Case and a trailing dot do not matter, in the config or in the certificate."""
    leaf = ca.issue(["Example.COM", "www.example.com."])
    certified = load_ok(one_file(pki.write_combined(tmp_path, leaf)))
    assert certified.names == ("example.com", "www.example.com")
    assert check_names(certified, ["EXAMPLE.com.", "WWW.example.com"]) == []


def test_certificate_without_san(ca: pki.CA) -> None:
    """A certificate with only a common name covers nothing, and the message says why."""
    c = attrs.evolve(certified_for(ca, ["example.com"]), names=())
    assert check_names(c, ["example.com"]) == [
        Problem(
            WHERE,
            "the certificate does not cover example.com; it has no DNS names in "
            "subjectAltName (the common name is not used)",
        )
    ]


def test_check_certified_key_combines_clock_and_names(ca: pki.CA) -> None:
    """The service's one call reports both expiry and names."""
    c = certified_for(ca, ["example.com"], not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    problems = check_certified_key(c, ("example.com", "www.example.com"), NOW)
    assert [p.reason.split(" ")[2] for p in problems] == ["expired", "does"]


# -- pins ------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_spki_pin_matches_openssl(tmp_path: Path, key_type: pki.KeyType) -> None:
    """The HPKP pin equals openssl's pkey | dgst -sha256 | base64 pipeline."""
    key = pki.new_key(key_type)
    expected = base64.b64encode(
        hashlib.sha256(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
    ).decode()
    assert spki_sha256_b64(key.public_key()) == expected
    openssl = shutil.which("openssl")
    if openssl is None:
        return
    path = pki.write_file(tmp_path / "k.pem", pki.key_pem(key))
    der = subprocess.run(
        [openssl, "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    assert (
        spki_sha256_b64(key.public_key()) == base64.b64encode(hashlib.sha256(der).digest()).decode()
    )


def test_rsa_pool_keys_are_distinct() -> None:
    """(pki) Distinct pool indexes give distinct RSA keys, so mismatch tests are real."""
    keys = [pki.rsa_key(i) for i in range(2)]
    assert isinstance(keys[0], rsa.RSAPrivateKey)
    assert all(
        a.public_key().public_numbers() != b.public_key().public_numbers()
        for a, b in itertools.combinations(keys, 2)
    )


def test_a_leaf_without_its_intermediates_is_warned_about(tmp_path: Path) -> None:
    """cert.pem given instead of fullchain.pem loads (some clients fetch intermediates) but
    warns, naming the fix; with the intermediates there is no such warning."""
    leaf = pki.make_ca().issue(["a.test"])
    alone = pki.write_combined(tmp_path, leaf, order=("key", "leaf"), name="alone.pem")
    source = CertificateSource(key=str(alone), cert=str(alone), chain=None, path="hosts.a.test")
    certified, problems = load_certified_key(source)
    assert certified is not None
    [warning] = [p for p in problems if "no intermediate certificates" in p.reason]
    assert warning.warning and "fullchain.pem" in warning.reason
    full = pki.write_combined(tmp_path, leaf, name="full.pem")
    source = CertificateSource(key=str(full), cert=str(full), chain=None, path="hosts.a.test")
    _, problems = load_certified_key(source)
    assert not any("no intermediate certificates" in p.reason for p in problems)
