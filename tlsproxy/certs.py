"""Certificate files: read a key and its certificate chain, and check them.

`load_certified_key` reads the PEM files named by a `CertificateSource` (one
file holding key, leaf and intermediates in any usual order, or separate key,
certificate and chain files), identifies the leaf as the certificate matching
the private key, orders the intermediates from the leaf up, and returns a
`CertifiedKey` with every problem found.  `check_certified_key` checks a
loaded key against the clock and the host names it must serve.
`spki_sha256_b64` computes HPKP pins.

Every finding is a `Problem` at the source's key path, so that all of them
reach the user in one run.  This module uses `cryptography` only: no OpenSSL
bindings, no Twisted.  It must never log or put key material into messages.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from tlsproxy.errors import Problem
from tlsproxy.hostnames import InvalidHostname, matches, normalize_pattern

if TYPE_CHECKING:
    from tlsproxy.config import CertificateSource

ServerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KeyType = Literal["ECDSA", "RSA", "Ed25519"]

#: A certificate expiring sooner than this gives a warning.
EXPIRY_WARNING = datetime.timedelta(days=14)
#: RSA keys shorter than this are refused.
MIN_RSA_BITS = 2048
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
_ENCRYPTED_KEY_LABEL = b"ENCRYPTED PRIVATE KEY"


@attrs.frozen
class CertifiedKey:
    """A private key with its certificate and intermediates, ready to serve.

    ``chain`` holds the intermediates only, ordered from the leaf's issuer up
    toward the root; a self-signed root found in the files is left out.
    ``names`` are the leaf's subjectAltName DNS names, normalised; ``not_after``
    is an aware UTC datetime.  ``source`` says where it was read from.
    """

    key: ServerKey
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_type: KeyType
    names: tuple[str, ...]
    not_after: datetime.datetime
    source: CertificateSource

    def chain_pem(self) -> bytes:
        """The leaf followed by the intermediates, as PEM (public data only)."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.leaf, *self.chain)
        )


def self_signed(
    sans: Sequence[x509.GeneralName],
    common_name: str,
    not_before: datetime.datetime,
    lifetime: datetime.timedelta,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new ECDSA P-256 key and a self-signed end-entity certificate for ``sans``.

    Valid from five minutes before ``not_before`` for ``lifetime``; ``extensions``
    are added as (extension, critical) pairs.  Used for the demo, the temporary
    certificate of an ACME host and tls-alpn-01 answers.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - datetime.timedelta(minutes=5))
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return key, builder.sign(key, hashes.SHA256())


def spki_sha256_b64(public_key: PublicKeyTypes) -> str:
    """The base64 SHA-256 of the DER SubjectPublicKeyInfo: an HPKP ``pin-sha256`` value.

    Equal to ``openssl pkey -pubout -outform DER | openssl dgst -sha256 -binary | base64``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its subject (RFC 4514)."""
    return cert.subject.rfc4514_string() or "(empty subject)"


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# -- reading ---------------------------------------------------------------------------


@attrs.frozen
class _Block:
    label: bytes
    pem: bytes  # the whole PEM block, as found
    file: str


def _read_blocks(paths: Iterable[str], where: str) -> tuple[list[_Block], list[Problem]]:
    blocks: list[_Block] = []
    problems: list[Problem] = []
    for path in dict.fromkeys(paths):  # each file once, in order
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            problems.append(Problem(where, f"cannot read {path}: {exc.strerror or exc}"))
            continue
        blocks += [_Block(m.group(1), m.group(0), path) for m in _PEM_BLOCK.finditer(data)]
    return blocks, problems


def _encrypted(block: _Block) -> bool:
    """PKCS#8 ``ENCRYPTED PRIVATE KEY``, or a traditional key with a Proc-Type header."""
    if block.label == _ENCRYPTED_KEY_LABEL:
        return True
    return block.label in _KEY_LABELS and b"Proc-Type: 4,ENCRYPTED" in block.pem


def _key_type(key: ServerKey) -> KeyType:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    return "Ed25519"


def _check_key(key: ServerKey, where: str) -> list[Problem]:
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        return [
            Problem(
                where,
                f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required",
            )
        ]
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _EC_CURVES:
        return [
            Problem(
                where,
                f"the ECDSA key uses curve {key.curve.name}, which TLS clients do not accept; "
                f"use P-256 or P-384",
            )
        ]
    return []


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_public_der(cert: x509.Certificate) -> bytes | None:
    try:
        return _public_der(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None  # a key type cryptography cannot read cannot be ours


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s name and key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _order_chain(
    leaf: x509.Certificate, others: Sequence[x509.Certificate], where: str
) -> tuple[tuple[x509.Certificate, ...], list[Problem]]:
    """Follow issuers up from ``leaf`` through ``others``.

    :return: the intermediates in order (self-signed root dropped) and a
        problem for each certificate that is not on the leaf's path.
    """
    path = [leaf]
    remaining = list(others)
    while remaining and not _self_signed(path[-1]):
        issuer = next((c for c in remaining if _issued_by(path[-1], c)), None)
        if issuer is None:
            break
        path.append(issuer)
        remaining.remove(issuer)
    problems: list[Problem] = []
    top = path[-1]
    for stray in remaining:
        if not _self_signed(top):
            reason = (
                f"the chain is broken: {describe(top)} was issued by "
                f"{top.issuer.rfc4514_string()}, which is missing from the files; "
                f"{describe(stray)} does not fill the gap"
            )
        else:
            reason = (
                f"the certificate {describe(stray)} is not part of the chain of "
                f"{describe(leaf)}; remove it"
            )
        problems.append(Problem(where, reason))
    chain = path[1:]
    if chain and _self_signed(chain[-1]):
        chain.pop()
    return tuple(chain), problems


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for raw in san.value.get_values_for_type(x509.DNSName):
        try:
            names.append(normalize_pattern(raw))
        except InvalidHostname:
            continue  # partial wildcards ("f*.example.com") and junk match nothing
    return tuple(dict.fromkeys(names))


def _key_file_mode_warning(path: str, where: str) -> list[Problem]:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return []
    if mode & 0o044:
        return [
            Problem(
                where,
                f"the private key file {path} is readable by group or others (mode {mode:04o}); "
                f"run chmod 600 on it",
                warning=True,
            )
        ]
    return []


def load_certified_key(source: CertificateSource) -> tuple[CertifiedKey | None, list[Problem]]:
    """Read the key, leaf and intermediates named by ``source`` and check how they fit.

    Reports, at ``source.path``: unreadable files, no key / several keys /
    an encrypted key, no certificate, a key that does not match any
    certificate, an unsupported or weak key, certificates that are not on the
    leaf's chain (a gap or an unrelated certificate), and a key file readable
    by group or others (a warning).  Expiry and host names are checked by
    `check_certified_key`.

    :return: the `CertifiedKey` (None if it cannot be used) and every problem.
    """
    where = source.path
    files = [source.key, source.cert] + ([source.chain] if source.chain else [])
    blocks, problems = _read_blocks(files, where)
    if problems:
        return None, problems

    if any(_encrypted(b) for b in blocks):
        problems.append(
            Problem(
                where,
                "the private key is encrypted with a passphrase; tlsproxy needs it unencrypted "
                "(openssl pkey -in KEY -out KEY.new) and protected by file permissions",
            )
        )
        return None, problems
    key_blocks = [b for b in blocks if b.label in _KEY_LABELS]
    if not key_blocks:
        problems.append(Problem(where, f"no private key found in {source.key}"))
    elif len(key_blocks) > 1:
        problems.append(
            Problem(
                where, f"{len(key_blocks)} private keys found; give exactly one per certificate"
            )
        )
    cert_blocks = [b for b in blocks if b.label == b"CERTIFICATE"]
    if not any(b.file == source.cert for b in cert_blocks):
        problems.append(Problem(where, f"no certificate found in {source.cert}"))
    if (
        source.chain
        and source.chain != source.cert
        and not any(b.file == source.chain for b in cert_blocks)
    ):
        problems.append(Problem(where, f"no certificate found in the chain file {source.chain}"))
    if problems:
        return None, problems

    problems += _key_file_mode_warning(key_blocks[0].file, where)
    try:
        loaded = serialization.load_pem_private_key(key_blocks[0].pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        problems.append(Problem(where, f"cannot load the private key: {exc}"))
        return None, problems
    if not isinstance(loaded, ServerKey):
        problems.append(
            Problem(
                where, f"unsupported private key type {type(loaded).__name__}; use ECDSA or RSA"
            )
        )
        return None, problems
    key: ServerKey = loaded
    key_type = _key_type(key)
    problems += _check_key(key, where)

    certs: list[x509.Certificate] = []
    for block in cert_blocks:
        try:
            cert = x509.load_pem_x509_certificate(block.pem)
        except ValueError as exc:
            problems.append(Problem(where, f"cannot parse a certificate in {block.file}: {exc}"))
            continue
        if cert not in certs:  # a duplicate is harmless: serve it once
            certs.append(cert)
    if not certs:
        return None, problems

    public = _public_der(key.public_key())
    leaves = [c for c in certs if _cert_public_der(c) == public]
    if not leaves:
        problems.append(Problem(where, "private key does not match certificate"))
        return None, problems
    if len(leaves) > 1:
        problems.append(
            Problem(
                where,
                f"{len(leaves)} certificates match the private key "
                f"({', '.join(describe(c) for c in leaves)}); keep only the current one",
            )
        )
        return None, problems
    leaf = leaves[0]
    chain, chain_problems = _order_chain(leaf, [c for c in certs if c is not leaf], where)
    problems += chain_problems
    if not chain and not _self_signed(leaf):
        problems.append(
            Problem(
                where,
                "no intermediate certificates: clients that do not fetch missing "
                "intermediates themselves (curl, Python, Go, Android apps) will refuse it; "
                "give the full chain (certbot's fullchain.pem) unless the issuer is a root "
                "your clients trust directly",
                warning=True,
            )
        )
    if any(not p.warning for p in problems):
        return None, problems
    return (
        CertifiedKey(
            key=key,
            leaf=leaf,
            chain=chain,
            key_type=key_type,
            names=_dns_names(leaf),
            not_after=leaf.not_valid_after_utc,
            source=source,
        ),
        problems,
    )


# -- checks against the clock and the configuration ------------------------------------


def check_validity(certified: CertifiedKey, now: datetime.datetime) -> list[Problem]:
    """Expiry problems of the leaf and intermediates at ``now`` (an aware datetime).

    Expired or not yet valid certificates are errors; a leaf expiring within
    `EXPIRY_WARNING` (14 days) is a warning.
    """
    where = certified.source.path
    problems: list[Problem] = []
    for i, cert in enumerate((certified.leaf, *certified.chain)):
        what = "the certificate" if i == 0 else f"the intermediate {describe(cert)}"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if end < now:
            problems.append(Problem(where, f"{what} expired on {_when(end)}"))
        elif start > now:
            problems.append(Problem(where, f"{what} is not valid until {_when(start)}"))
        elif i == 0 and end - now < EXPIRY_WARNING:
            days = (end - now).days
            problems.append(
                Problem(
                    where,
                    f"the certificate expires in {days} day{'s' if days != 1 else ''} "
                    f"(on {_when(end)}); renew it",
                    warning=True,
                )
            )
    return problems


def covers(san_names: Iterable[str], name: str) -> bool:
    """Whether certificate DNS names cover a configured host name or wildcard.

    SAN wildcards match exactly one leftmost label (RFC 6125); a configured
    wildcard ``*.example.com`` is covered only by the identical SAN wildcard.
    Both sides must be normalised.
    """
    if name.startswith("*."):
        return name in san_names
    return any(matches(san, name) for san in san_names)


def check_names(certified: CertifiedKey, names: Iterable[str]) -> list[Problem]:
    """An error naming every host name or alias the certificate does not cover."""
    wanted: list[str] = []
    for name in names:
        try:
            wanted.append(normalize_pattern(name))
        except InvalidHostname:
            continue  # the config check reports it
    missing = [n for n in dict.fromkeys(wanted) if not covers(certified.names, n)]
    if not missing:
        return []
    has = (
        f"it covers only {', '.join(certified.names)}"
        if certified.names
        else "it has no DNS names in subjectAltName (the common name is not used)"
    )
    return [
        Problem(
            certified.source.path,
            f"the certificate does not cover {', '.join(missing)}; {has}",
        )
    ]


def check_certified_key(
    certified: CertifiedKey, names: Iterable[str], now: datetime.datetime
) -> list[Problem]:
    """`check_validity` at ``now`` plus `check_names` for the host's ``names``
    (canonical name and aliases)."""
    return check_validity(certified, now) + check_names(certified, names)
