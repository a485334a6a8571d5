"""A small test PKI: a root CA, intermediates and leaf certificates, written as PEM files.

For tests only.  Everything is made in memory with `cryptography` and written
where a test asks (usually its ``tmp_path``) in the layouts users produce:
key + leaf + intermediates in one file in various orders, or separate key,
certificate and chain files.

RSA keys are slow to generate, so they come from a per-process pool
(`rsa_key(i)`); ECDSA keys are made fresh.  Reusing a pool key in two
certificates is harmless for tests that do not compare keys; tests that need
distinct keys pass distinct indexes.

Typical use::

    ca = make_ca()
    leaf = ca.issue(["example.com", "www.example.com"])
    pem = write_combined(tmp_path, leaf)          # key, leaf, intermediate
    rsa = ca.issue(["example.com"], key_type="RSA")
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KeyType = Literal["ECDSA", "RSA", "Ed25519"]

#: The pieces of a combined PEM file, for `write_combined`'s ``order``.
Piece = Literal["key", "leaf", "chain", "chain-reversed", "root"]

_ONE_DAY = datetime.timedelta(days=1)


def now() -> datetime.datetime:
    """The current time as an aware UTC datetime."""
    return datetime.datetime.now(datetime.UTC)


@functools.cache
def rsa_key(index: int = 0, bits: int = 2048) -> rsa.RSAPrivateKey:
    """The ``index``-th cached RSA key of ``bits`` bits (generated once per process)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_key(key_type: KeyType = "ECDSA", *, rsa_index: int = 0) -> PrivateKey:
    """A private key: a fresh ECDSA P-256 or Ed25519 key, or a pooled RSA 2048 key."""
    if key_type == "ECDSA":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa_key(rsa_index)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@attrs.frozen
class Authority:
    """A CA certificate and its key (root or intermediate)."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def name(self) -> x509.Name:
        return self.cert.subject


def make_authority(
    common_name: str,
    *,
    issuer: Authority | None = None,
    key_type: KeyType = "ECDSA",
    key: PrivateKey | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Authority:
    """A CA certificate: self-signed when ``issuer`` is None, else issued by it."""
    key = key if key is not None else new_key(key_type, rsa_index=100)
    start = not_before or now() - _ONE_DAY
    end = not_after or now() + 3650 * _ONE_DAY
    subject = _name(common_name)
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    return Authority(key=key, cert=builder.sign(signer, _hash_for(signer)))


@attrs.frozen
class Leaf:
    """A server certificate, its key, and the intermediates above it (issuer first)."""

    key: PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    root: x509.Certificate


@attrs.frozen
class CA:
    """A root CA with one intermediate CA under it; `issue` makes leaf certificates."""

    root: Authority
    intermediate: Authority

    def issue(
        self,
        names: Sequence[str],
        *,
        key_type: KeyType = "ECDSA",
        key: PrivateKey | None = None,
        rsa_index: int = 0,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        days: int = 60,
        issuer: Authority | None = None,
        ip_addresses: Sequence[str] = (),
        client: bool = False,
    ) -> Leaf:
        """A leaf certificate for DNS ``names`` (SAN; CN is the first name).

        Valid from ``not_before`` (default: one day ago) for ``days`` days unless
        ``not_after`` is given.  ``issuer`` defaults to the intermediate.
        ``client`` makes a TLS client certificate (extended key usage clientAuth).
        """
        import ipaddress

        key = key if key is not None else new_key(key_type, rsa_index=rsa_index)
        issuer = issuer or self.intermediate
        start = not_before or now() - _ONE_DAY
        end = not_after or start + days * _ONE_DAY
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0] if names else "no names"))
            .issuer_name(issuer.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(issuer.key, _hash_for(issuer.key))
        chain = (self.intermediate.cert,) if issuer is self.intermediate else ()
        return Leaf(key=key, cert=cert, chain=chain, root=self.root.cert)


@functools.cache
def _cached_ca(key_type: KeyType) -> CA:
    root = make_authority("tlsproxy test root", key_type=key_type)
    return CA(root=root, intermediate=make_authority("tlsproxy test intermediate", issuer=root))


def make_ca(key_type: KeyType = "ECDSA", *, fresh: bool = False) -> CA:
    """A root (of ``key_type``) with an ECDSA intermediate; shared per process unless ``fresh``."""
    if not fresh:
        return _cached_ca(key_type)
    root = make_authority("tlsproxy test root", key_type=key_type)
    return CA(root=root, intermediate=make_authority("tlsproxy test intermediate", issuer=root))


# -- PEM encoding and file layouts -------------------------------------------------------


def key_pem(key: PrivateKey, *, traditional: bool = False, password: bytes | None = None) -> bytes:
    """``key`` as PEM: PKCS#8 by default, "traditional" (``BEGIN EC/RSA PRIVATE KEY``)
    if asked, encrypted with ``password`` if given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional and not isinstance(key, ed25519.Ed25519PrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def cert_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as concatenated PEM blocks."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` and set its mode (default 0600)."""
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def write_combined(
    directory: Path,
    leaf: Leaf,
    order: Sequence[Piece] = ("key", "leaf", "chain"),
    name: str = "combined.pem",
    mode: int = 0o600,
) -> Path:
    """Write key, leaf and intermediates into one PEM in the given ``order``.

    ``chain-reversed`` writes the intermediates root-most first; ``root``
    appends the self-signed root.
    """
    pieces = {
        "key": lambda: key_pem(leaf.key),
        "leaf": lambda: cert_pem(leaf.cert),
        "chain": lambda: cert_pem(*leaf.chain),
        "chain-reversed": lambda: cert_pem(*reversed(leaf.chain)),
        "root": lambda: cert_pem(leaf.root),
    }
    return write_file(directory / name, b"".join(pieces[p]() for p in order), mode)


@attrs.frozen
class SeparateFiles:
    """Paths of a key, certificate and chain written as separate files."""

    key: Path
    cert: Path
    chain: Path


def write_separate(directory: Path, leaf: Leaf, prefix: str = "site") -> SeparateFiles:
    """Write ``prefix.key`` (0600), ``prefix.crt`` (leaf only), ``prefix.chain.pem``."""
    return SeparateFiles(
        key=write_file(directory / f"{prefix}.key", key_pem(leaf.key)),
        cert=write_file(directory / f"{prefix}.crt", cert_pem(leaf.cert), 0o644),
        chain=write_file(directory / f"{prefix}.chain.pem", cert_pem(*leaf.chain), 0o644),
    )


def write_ca_file(directory: Path, ca: CA, name: str = "ca.pem") -> Path:
    """Write the root certificate (what a client should trust) and return its path."""
    return write_file(directory / name, cert_pem(ca.root.cert), 0o644)
