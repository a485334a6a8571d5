"""Client certificates (mTLS): what a host's ``client_auth`` means to OpenSSL and to the backend.

Three jobs, all for hosts with ``client_auth`` (`tlsproxy.config.ClientAuth`):

* `load_client_auth` reads and checks the CA and CRL files once, when contexts
  are built (never inside a TLS callback), and `configure_context` applies them
  to that host's ``SSL.Context`` only: the trusted CAs (verify store and the CA
  names sent in the CertificateRequest), the verify mode and the CRL check.
* `verified_peer` gives the proxy a connection's verified client certificate,
  verifying it again when the TLS session was resumed: OpenSSL decides on
  resumption before the servername callback picks the host, so a session made
  for another host (with another CA, or without a certificate) can resume on a
  client-auth host, and must not skip its check.
* `identity_block` turns a verified client certificate into the request
  headers the backend receives: RFC 9440 ``Client-Cert`` and
  ``Client-Cert-Chain`` (``:base64-DER:`` byte sequences) and the configured
  subject (RFC 4514) and SHA-256 fingerprint headers.

Chain, expiry and revocation are checked by OpenSSL: during the handshake, or
(for a resumed session) through OpenSSL's ``X509StoreContext`` against the
host's own store.  This module never logs certificate contents and reads no
files outside `load_client_auth`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from twisted.logger import Logger

from tlsproxy.config import ClientAuth
from tlsproxy.errors import Problem

log = Logger()


@attrs.frozen(eq=False)
class ClientAuthMaterial:
    """A host's ``client_auth`` with its CA certificates and CRLs loaded."""

    settings: ClientAuth
    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]

    @property
    def verify_mode(self) -> int:
        """The OpenSSL verify flags of the host's mode."""
        if self.settings.mode == "required":
            return SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        return SSL.VERIFY_PEER


def _read(path: str, key: str) -> tuple[bytes | None, list[Problem]]:
    try:
        with open(path, "rb") as f:
            return f.read(), []
    except OSError as exc:
        return None, [Problem(key, f"cannot read {path}: {exc.strerror or exc}")]


def _split_pem(data: bytes, label: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, start = [], data.find(begin)
    while start != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        blocks.append(data[start : stop + len(end)] + b"\n")
        start = data.find(begin, stop)
    return blocks


def load_client_auth(settings: ClientAuth) -> tuple[ClientAuthMaterial | None, list[Problem]]:
    """Read and check the CA file (and CRL file) of one host's ``client_auth``.

    :return: the material (None if there are errors) and the problems, at
        ``<path>.ca`` and ``<path>.crl``.
    """
    problems: list[Problem] = []
    cas: list[x509.Certificate] = []
    data, problems = _read(settings.ca, f"{settings.path}.ca")
    if data is not None:
        try:
            cas = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            problems.append(
                Problem(
                    f"{settings.path}.ca",
                    f"{settings.ca} is not a PEM file of certificates ({exc})",
                )
            )
        else:
            for cert in cas:
                try:
                    is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                except x509.ExtensionNotFound:
                    is_ca = False
                if not is_ca:
                    problems.append(
                        Problem(
                            f"{settings.path}.ca",
                            f"{settings.ca} holds {cert.subject.rfc4514_string()}, which is not "
                            f"a CA certificate (basicConstraints CA:TRUE)",
                        )
                    )
    crls: list[x509.CertificateRevocationList] = []
    if settings.crl is not None:
        key = f"{settings.path}.crl"
        data, more = _read(settings.crl, key)
        problems += more
        if data is not None:
            blocks = _split_pem(data, b"X509 CRL")
            if not blocks:
                problems.append(Problem(key, f"{settings.crl} holds no BEGIN X509 CRL block"))
            for block in blocks:
                try:
                    crls.append(x509.load_pem_x509_crl(block))
                except ValueError as exc:
                    problems.append(Problem(key, f"{settings.crl} has a bad CRL ({exc})"))
    if problems:
        return None, problems
    return ClientAuthMaterial(settings=settings, cas=tuple(cas), crls=tuple(crls)), []


def configure_context(context: SSL.Context, material: ClientAuthMaterial) -> None:
    """Make ``context`` (one host's) ask for and verify client certificates."""
    store = context.get_cert_store()
    assert store is not None
    for cert in material.cas:
        store.add_cert(crypto.X509.from_cryptography(cert))
    if material.crls:
        for crl in material.crls:
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    context.load_client_ca(material.settings.ca.encode())  # the CA names to send
    context.set_verify(material.verify_mode)


#: `verified_peer`'s answer for a resumed session whose certificate this host
#: does not accept.
REJECTED = "rejected"


def verified_peer(
    handle: object,
) -> tuple[x509.Certificate | None, list[x509.Certificate]] | str:
    """The client certificate OpenSSL verified on a connection, and the chain sent after it.

    ``handle`` is the ``SSL.Connection`` of a TLS transport (anything else has
    no certificate).  A certificate counts only if the connection verified
    peers (its host has ``client_auth``).

    A resumed session skips the handshake's certificate check, and OpenSSL
    decides resumption before the servername callback picks the host, so a
    session made for another host (another CA, or none) could land here.  The
    certificate of a resumed session is therefore verified again against this
    host's trust store (CAs, CRLs, expiry, now); `REJECTED` if it fails.
    """
    if not isinstance(handle, SSL.Connection) or not handle.get_verify_mode() & SSL.VERIFY_PEER:
        return None, []
    leaf = handle.get_peer_certificate()
    if leaf is None:
        return None, []
    chain = handle.get_peer_cert_chain() or []
    if _lib.SSL_session_reused(handle._ssl):  # not in pyOpenSSL's API
        store = handle.get_context().get_cert_store()
        try:
            assert store is not None
            crypto.X509StoreContext(store, leaf, chain).verify_certificate()
        except (crypto.X509StoreContextError, AssertionError) as exc:
            log.info(
                "client certificate of a resumed TLS session refused: {reason}",
                reason=str(exc),
                chain=len(chain),
            )
            return REJECTED
    return leaf.to_cryptography(), [c.to_cryptography() for c in chain]


def _ascii_dn(subject: str) -> bytes:
    """An RFC 4514 string in visible ASCII: other UTF-8 bytes as ``\\xx`` hex pairs
    (RFC 4514's own escape), so no control character reaches a header."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E else b"\\%02x" % b for b in subject.encode("utf-8")
    )


def _sf_binary(der: bytes) -> bytes:
    return b":" + base64.b64encode(der) + b":"


def identity_block(
    settings: ClientAuth, leaf: x509.Certificate | None, chain: Sequence[x509.Certificate]
) -> bytes:
    """The identity headers for the backend, as header lines (empty without a certificate).

    ``leaf`` is the verified client certificate; ``chain`` the certificates
    the client sent after it (RFC 9440: ``Client-Cert-Chain`` holds those, in
    order, without the leaf).
    """
    if leaf is None:
        return b""
    der = leaf.public_bytes(Encoding.DER)
    lines = [b"Client-Cert: " + _sf_binary(der) + b"\r\n"]
    rest = [c.public_bytes(Encoding.DER) for c in chain]
    rest = [c for c in rest if c != der]
    if rest:
        lines.append(b"Client-Cert-Chain: " + b", ".join(map(_sf_binary, rest)) + b"\r\n")
    if settings.subject_header is not None:
        value = _ascii_dn(leaf.subject.rfc4514_string())
        lines.append(settings.subject_header.encode("ascii") + b": " + value + b"\r\n")
    if settings.fingerprint_header is not None:
        digest = leaf.fingerprint(hashes.SHA256()).hex().encode("ascii")
        lines.append(settings.fingerprint_header.encode("ascii") + b": " + digest + b"\r\n")
    return b"".join(lines)


def stripped_headers(settings: ClientAuth) -> frozenset[bytes]:
    """Lower-cased names of the configured identity headers, which clients may not send."""
    names = (settings.subject_header, settings.fingerprint_header)
    return frozenset(n.lower().encode("ascii") for n in names if n is not None)
