"""Tests for `tlsproxy.pins` and the ``tlsproxy pins`` command: HPKP pins from key files,
and the start-up check that turns configuration and live keys into header policies."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tests import pki
from tlsproxy.certs import CertifiedKey, load_certified_key
from tlsproxy.cli import main
from tlsproxy.config import Config, parse_config
from tlsproxy.pins import (
    PinFileError,
    build_header_policies,
    pins_in_data,
    pins_in_file,
    primary_pin,
)


def expected_pin(key: Any) -> str:
    """The pin computed independently: SHA-256 over the DER SubjectPublicKeyInfo of a
    private key, certificate or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def csr_pem(key: Any) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spare.example")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA", "Ed25519"])
def test_pin_of_a_private_key(tmp_path: Path, key_type: pki.KeyType) -> None:
    """A PKCS#8 or traditional PEM private key gives the pin of its public key."""
    key = pki.new_key(key_type)
    for traditional in (False, True):
        path = pki.write_file(tmp_path / "k.pem", pki.key_pem(key, traditional=traditional))
        [found] = pins_in_file(str(path))
        assert found.pin == expected_pin(key)
        assert found.kinds == ("private key",)


def test_pins_of_a_combined_file(tmp_path: Path) -> None:
    """Key and leaf share one line; each intermediate has its own."""
    leaf = pki.make_ca().issue(["example.com"])
    path = pki.write_combined(tmp_path, leaf)
    found = pins_in_file(str(path))
    assert [f.pin for f in found] == [expected_pin(leaf.key), expected_pin(leaf.chain[0])]
    assert found[0].kinds == ("private key", "certificate")
    assert "CN=example.com" in found[0].description
    assert primary_pin(found).pin == expected_pin(leaf.key)


def test_pins_of_csr_public_key_and_der(tmp_path: Path) -> None:
    """CSRs, public keys and DER certificates are read too."""
    key = pki.new_key()
    pin = expected_pin(key)
    (tmp_path / "r.csr").write_bytes(csr_pem(key))
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    leaf = pki.make_ca().issue(["example.com"], key=key)
    (tmp_path / "c.der").write_bytes(leaf.cert.public_bytes(serialization.Encoding.DER))
    (tmp_path / "k.der").write_bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for name in ("r.csr", "pub.pem", "c.der", "k.der"):
        assert [f.pin for f in pins_in_file(str(tmp_path / name))] == [pin]


def test_primary_pin_prefers_key_then_csr_then_first_certificate() -> None:
    """The pin a file stands for as a backup: key, else CSR, else the first certificate."""
    leaf = pki.make_ca().issue(["example.com"])
    chain_first = pki.cert_pem(*leaf.chain) + pki.cert_pem(leaf.cert)
    assert primary_pin(pins_in_data(chain_first)).pin == expected_pin(leaf.chain[0])
    spare = pki.new_key()
    with_csr = pki.cert_pem(leaf.cert) + csr_pem(spare)
    assert primary_pin(pins_in_data(with_csr)).pin == expected_pin(spare)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no key, certificate request or certificate found"),
        (b"hello", "no key, certificate request or certificate found"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "found X509 CRL"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot parse"),
    ],
)
def test_files_without_keys_are_reported(data: bytes, message: str) -> None:
    """A file without any usable key gives a clear error."""
    with pytest.raises(PinFileError, match=message):
        pins_in_data(data)


def test_encrypted_key_is_refused_without_asking_for_a_password(tmp_path: Path) -> None:
    """An encrypted private key is an error that suggests the certificate or CSR instead."""
    path = pki.write_file(tmp_path / "k.pem", pki.key_pem(pki.new_key(), password=b"secret"))
    with pytest.raises(PinFileError, match="encrypted"):
        pins_in_file(str(path))


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    """A missing file names itself in the error."""
    with pytest.raises(PinFileError, match=r"cannot read .*missing\.pem"):
        pins_in_file(str(tmp_path / "missing.pem"))


# -- the start-up check -------------------------------------------------------------------


def site_config(tmp_path: Path, hpkp: Any, *, rsa: bool = False) -> tuple[Config, CertifiedKey]:
    leaf = pki.make_ca().issue(["example.com"])
    path = pki.write_combined(tmp_path, leaf, name="site.pem")
    certificates = [str(path)]
    config = parse_config(
        {
            "listen": {"https": ["tcp:443"]},
            "hosts": {
                "example.com": {
                    "certificates": certificates,
                    "backend": "http://127.0.0.1:8000",
                    "hpkp": hpkp,
                }
            },
        },
        "proxy.yaml",
    )
    certified, problems = load_certified_key(config.hosts[0].certificates[0])
    assert certified is not None, problems
    return config, certified


def hpkp_value(config: Config, certified: CertifiedKey) -> tuple[bytes, list[str]]:
    policies, problems = build_header_policies(config, {"example.com": [certified]})
    errors = [p.render("proxy.yaml") for p in problems if not p.warning]
    out = policies.for_site("example.com").apply([])
    values = [v for n, v in out if n.lower().startswith(b"public-key-pins")]
    return (values[0] if values else b""), errors


def test_hpkp_pins_live_key_and_backup_file(tmp_path: Path) -> None:
    """The header pins the live certificate key and the spare key from a file."""
    spare = pki.new_key()
    spare_path = pki.write_file(tmp_path / "spare.key", pki.key_pem(spare))
    config, certified = site_config(tmp_path, {"backup_pins": [str(spare_path)]})
    value, errors = hpkp_value(config, certified)
    assert errors == []
    assert (
        value
        == (
            f'pin-sha256="{expected_pin(certified.key)}"; pin-sha256="{expected_pin(spare)}"; '
            "max-age=5184000"
        ).encode()
    )


def test_hpkp_backup_given_as_base64(tmp_path: Path) -> None:
    """A backup pin may be given as its base64 value (optionally prefixed sha256/)."""
    spare = expected_pin(pki.new_key())
    config, certified = site_config(tmp_path, {"backup_pins": [f"sha256/{spare}"]})
    value, errors = hpkp_value(config, certified)
    assert errors == []
    assert f'pin-sha256="{spare}"'.encode() in value


def test_hpkp_backup_equal_to_the_live_key_is_a_config_error(tmp_path: Path) -> None:
    """A "backup" that is the live key does not count; with no other backup, tlsproxy
    refuses to start and says how to make a spare key."""
    config, certified = site_config(tmp_path, {"backup_pins": [str(tmp_path / "site.pem")]})
    value, errors = hpkp_value(config, certified)
    assert value == b""
    assert errors == [
        "proxy.yaml: hosts.example.com.hpkp.backup_pins: needs at least one backup pin that "
        "differs from every key the host serves now (make a spare key with `openssl genpkey "
        "-algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out spare.key`, keep it offline and "
        "list it here)"
    ]
    spare = expected_pin(pki.new_key())
    config, certified = site_config(tmp_path, {"backup_pins": [str(tmp_path / "site.pem"), spare]})
    _, problems = build_header_policies(config, {"example.com": [certified]})
    assert [p.path for p in problems if not p.warning] == []
    assert any(p.path == "hosts.example.com.hpkp.backup_pins[0]" and p.warning for p in problems)


def test_hpkp_unreadable_backup_file_is_an_error_at_its_key(tmp_path: Path) -> None:
    """A backup-pin file that cannot be read is an error at its own key path."""
    config, certified = site_config(tmp_path, {"backup_pins": [str(tmp_path / "gone.key")]})
    _, errors = hpkp_value(config, certified)
    assert errors == [
        f"proxy.yaml: hosts.example.com.hpkp.backup_pins[0]: cannot read {tmp_path}/gone.key: "
        "No such file or directory"
    ]


def test_hpkp_pins_follow_a_new_key(tmp_path: Path) -> None:
    """After renewal with a new key, rebuilding the policies pins the new key."""
    spare = expected_pin(pki.new_key())
    config, first = site_config(tmp_path, {"backup_pins": [spare]})
    renewed_leaf = pki.make_ca().issue(["example.com"])
    renewed_path = pki.write_combined(tmp_path, renewed_leaf, name="site.pem")
    renewed, _ = load_certified_key(config.hosts[0].certificates[0])
    assert renewed is not None and str(renewed_path) == renewed.source.key
    old, _ = hpkp_value(config, first)
    new, _ = hpkp_value(config, renewed)
    assert expected_pin(first.key).encode() in old
    assert expected_pin(renewed_leaf.key).encode() in new
    assert expected_pin(first.key).encode() not in new


def test_build_header_policies_includes_the_hpkp_warning(tmp_path: Path) -> None:
    """Start-up always warns that HPKP is deprecated when a host enables it."""
    config, certified = site_config(
        tmp_path, {"backup_pins": [expected_pin(pki.new_key())], "report_uri": "https://r/"}
    )
    _, problems = build_header_policies(config, {"example.com": [certified]})
    assert [p.path for p in problems] == ["hosts.example.com.hpkp"]
    assert problems[0].warning
    assert "deprecated" in problems[0].reason


# -- the tlsproxy pins command ------------------------------------------------------------


def test_cli_prints_one_line_per_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tlsproxy pins FILE...` prints "PIN  FILE: what" for each key, exit status 0."""
    leaf = pki.make_ca().issue(["example.com"])
    combined = pki.write_combined(tmp_path, leaf)
    spare = pki.new_key()
    spare_path = pki.write_file(tmp_path / "spare.key", pki.key_pem(spare))
    assert main(["pins", str(combined), str(spare_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{expected_pin(leaf.key)}  {combined}: private key (ECDSA")
    assert lines[1].startswith(f"{expected_pin(leaf.chain[0])}  {combined}: certificate")
    assert lines[2] == f"{expected_pin(spare)}  {spare_path}: private key (ECDSA secp256r1)"
    assert len(lines) == 3


def test_cli_hex_and_primary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--hex prints the TLSA 3 1 1 data; --primary only the file's own pin."""
    leaf = pki.make_ca().issue(["example.com"])
    combined = pki.write_combined(tmp_path, leaf)
    assert main(["pins", "--hex", "--primary", str(combined)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    digest = base64.b64decode(expected_pin(leaf.key)).hex()
    assert line.startswith(f"{digest}  {combined}: ")


def test_cli_fails_for_a_bad_file_but_prints_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file without keys makes the exit status 1; other files are still printed."""
    key = pki.write_file(tmp_path / "k.pem", pki.key_pem(pki.new_key()))
    (tmp_path / "junk.txt").write_text("not a key\n")
    assert main(["pins", str(tmp_path / "junk.txt"), str(key)]) == 1
    captured = capsys.readouterr()
    assert "tlsproxy pins: " in captured.err and "junk.txt" in captured.err
    assert len(captured.out.splitlines()) == 1
    assert "PRIVATE" not in captured.out + captured.err


def test_cli_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command, usage is printed and the exit status is 2."""
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
