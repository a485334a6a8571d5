"""HPKP pins: SHA-256 hashes of public keys, read from key, CSR and certificate files.

`pins_in_file` finds every public key in a PEM or DER file (private keys,
public keys, certificate requests, certificates) and returns its pin-sha256,
the same value as ``openssl pkey -pubout -outform DER | openssl dgst -sha256
-binary | base64``.  `build_header_policies` is the start-up step that turns
the configuration and the live certificates into the response-header policies
of `tlsproxy.headers`, checking that every HPKP host has a backup pin that
differs from all its live keys.

Reads files with `cryptography` only; no Twisted.  It never logs, prints or
puts key material into messages: only pins (hashes of public keys) leave it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from tlsproxy.certs import CertifiedKey, spki_sha256_b64
from tlsproxy.config import Config, HostConfig
from tlsproxy.errors import Problem
from tlsproxy.headers import HeaderPolicies, build_policies, header_warnings

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_PRIVATE = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
_PUBLIC = {b"PUBLIC KEY", b"RSA PUBLIC KEY"}
_CSR = {b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"}
_CERT = {b"CERTIFICATE", b"X509 CERTIFICATE"}
#: Order in which `primary_pin` prefers the kinds of object in a file.
_PREFERENCE = ("private key", "certificate request", "certificate", "public key")
_MAX_FILE = 1 << 20


class PinFileError(Exception):
    """A file yields no pin; the message says why, in words a user can act on."""


@attrs.frozen
class FoundPin:
    """One public key found in a file: its ``pin`` (base64 SHA-256 of the DER
    SubjectPublicKeyInfo), what held it (``kinds``: ``private key``,
    ``certificate``...) and a short human description."""

    pin: str
    kinds: tuple[str, ...]
    description: str

    @property
    def hex(self) -> str:
        """The same hash in hex: the data of a DANE ``TLSA 3 1 1`` record."""
        return base64.b64decode(self.pin).hex()


def pin_sha256(public_key: PublicKeyTypes) -> str:
    """The pin-sha256 of a public key (see `tlsproxy.certs.spki_sha256_b64`)."""
    return spki_sha256_b64(public_key)


def _key_name(key: PublicKeyTypes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA"
    return type(key).__name__


def _subject(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty subject)"


def _from_pem(label: bytes, block: bytes) -> tuple[str, PublicKeyTypes, str] | None:
    """(kind, public key, description) of one PEM block, None for other labels."""
    if label in _PRIVATE:
        if b"ENCRYPTED" in block:
            raise PinFileError(
                "the private key is encrypted; give its certificate, CSR or public key instead "
                "(openssl pkey -in KEY -pubout)"
            )
        private = serialization.load_pem_private_key(block, password=None)
        public = private.public_key()
        return "private key", public, f"private key ({_key_name(public)})"
    if label == b"ENCRYPTED PRIVATE KEY":
        raise PinFileError(
            "the private key is encrypted; give its certificate, CSR or public key instead "
            "(openssl pkey -in KEY -pubout)"
        )
    if label in _PUBLIC:
        public = serialization.load_pem_public_key(block)
        return "public key", public, f"public key ({_key_name(public)})"
    if label in _CSR:
        csr = x509.load_pem_x509_csr(block)
        public = csr.public_key()
        return "certificate request", public, f"certificate request {_subject(csr.subject)}"
    if label in _CERT:
        cert = x509.load_pem_x509_certificate(block)
        public = cert.public_key()
        return "certificate", public, f"certificate {_subject(cert.subject)}"
    return None


def _from_der(data: bytes) -> tuple[str, PublicKeyTypes, str]:
    try:
        cert = x509.load_der_x509_certificate(data)
        return "certificate", cert.public_key(), f"certificate {_subject(cert.subject)}"
    except ValueError:
        pass
    try:
        csr = x509.load_der_x509_csr(data)
        return (
            "certificate request",
            csr.public_key(),
            f"certificate request {_subject(csr.subject)}",
        )
    except ValueError:
        pass
    try:
        public = serialization.load_der_public_key(data)
        return "public key", public, f"public key ({_key_name(public)})"
    except (ValueError, UnsupportedAlgorithm):
        pass
    try:
        private = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise PinFileError("the private key is encrypted; give its certificate instead") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PinFileError(
            "no key, certificate request or certificate found (expected PEM or DER)"
        ) from None
    public = private.public_key()
    return "private key", public, f"private key ({_key_name(public)})"


def pins_in_data(data: bytes) -> list[FoundPin]:
    """Every distinct public key in PEM or DER ``data``, in file order.

    A private key and the certificate made for it share one `FoundPin` whose
    ``kinds`` name both.

    :raises PinFileError: if nothing usable is found, a block cannot be
        parsed, or a private key is encrypted.
    """
    found: list[tuple[str, PublicKeyTypes, str]] = []
    blocks = list(_PEM_BLOCK.finditer(data))
    try:
        if blocks:
            for match in blocks:
                item = _from_pem(match.group(1), match.group(0))
                if item is not None:
                    found.append(item)
        else:
            found.append(_from_der(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PinFileError(f"cannot parse it: {exc}") from None
    if not found:
        labels = ", ".join(sorted({m.group(1).decode("ascii") for m in blocks}))
        raise PinFileError(f"no key, certificate request or certificate in it (found {labels})")
    merged: dict[str, FoundPin] = {}
    for kind, public, description in found:
        pin = pin_sha256(public)
        old = merged.get(pin)
        if old is None:
            merged[pin] = FoundPin(pin=pin, kinds=(kind,), description=description)
        elif kind not in old.kinds:
            merged[pin] = FoundPin(
                pin=pin, kinds=(*old.kinds, kind), description=f"{old.description}, {description}"
            )
    return list(merged.values())


def pins_in_file(path: str) -> list[FoundPin]:
    """`pins_in_data` of the file at ``path`` (at most 1 MiB).

    :raises PinFileError: if it cannot be read or holds no usable key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as exc:
        raise PinFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise PinFileError(f"{path} is larger than 1 MiB; it is not a key or certificate")
    try:
        return pins_in_data(data)
    except PinFileError as exc:
        raise PinFileError(f"{path}: {exc}") from None


def primary_pin(found: Sequence[FoundPin]) -> FoundPin:
    """The pin a file stands for: its private key's, else its certificate
    request's, else its first certificate's (the leaf), else its public key's."""
    for kind in _PREFERENCE:
        for item in found:
            if kind in item.kinds:
                return item
    return found[0]


def live_pins(certified: Iterable[CertifiedKey]) -> tuple[str, ...]:
    """The distinct pins of the certificates a host serves now, in order."""
    return tuple(dict.fromkeys(pin_sha256(c.leaf.public_key()) for c in certified))


def _host_pins(
    host: HostConfig, certified: Sequence[CertifiedKey]
) -> tuple[tuple[str, ...], list[Problem]]:
    """A host's HPKP pins (live, then backups) and the problems with them."""
    assert host.hpkp is not None
    live = live_pins(certified)
    problems: list[Problem] = []
    backups: list[str] = []
    unreadable = False
    for backup in host.hpkp.backup_pins:
        if backup.pin is not None:
            pin = backup.pin
        else:
            assert backup.file is not None
            try:
                pin = primary_pin(pins_in_file(backup.file)).pin
            except PinFileError as exc:
                problems.append(Problem(backup.path, str(exc)))
                unreadable = True
                continue
        if pin in live:
            problems.append(
                Problem(
                    backup.path,
                    f"pin {pin} belongs to a certificate key this host serves now, so it is "
                    "not a backup; pin a spare key that is kept offline",
                    warning=True,
                )
            )
        elif pin not in backups:
            backups.append(pin)
    if live and not backups and not unreadable:
        problems.append(
            Problem(
                f"hosts.{host.name}.hpkp.backup_pins",
                "needs at least one backup pin that differs from every key the host serves now "
                "(make a spare key with `openssl genpkey -algorithm EC -pkeyopt "
                "ec_paramgen_curve:P-256 -out spare.key`, keep it offline and list it here)",
            )
        )
    return (*live, *backups), problems


def build_header_policies(
    config: Config, certificates: Mapping[str, Sequence[CertifiedKey]]
) -> tuple[HeaderPolicies, list[Problem]]:
    """The HTTPS response-header policies of every site, and every problem found.

    :param certificates: the loaded certificates by host name (as
        `tlsproxy.service.load_certificates` returns them); HPKP pins are
        computed from their public keys, so call this again after a
        certificate is replaced.
    :return: the policies and the problems: errors for unreadable backup-pin
        files and HPKP hosts without a backup pin that differs from their live
        keys; warnings for HPKP being on, weak HSTS and redundant backups.
    """
    problems = header_warnings(config)
    pins: dict[str, tuple[str, ...]] = {}
    for host in config.hosts:
        if host.hpkp is None:
            continue
        pins[host.name], found = _host_pins(host, certificates.get(host.name, ()))
        problems += found
    return build_policies(config, pins), problems
