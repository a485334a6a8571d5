"""Challenge types: which one to answer, and the tls-alpn-01 certificate.

http-01 answers come from `tlsproxy.plain.ChallengeTokens` (the port-80
site); tls-alpn-01 answers from `tlsproxy.tls.ChallengeCertificates` (the
HTTPS listener, ALPN ``acme-tls/1``).  This module makes the values they
serve; it never touches the network or the reactor.

certbot's ``acme`` 5.x no longer ships a tls-alpn-01 challenge class, so
`TLSALPN01` registers one with its challenge registry (RFC 8737: the
response is an empty object; the key authorization goes into the
certificate).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ObjectIdentifier
from josepy.jwk import JWK

from tlsproxy.certs import self_signed

#: RFC 8737 section 3: id-pe-acmeIdentifier.
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """ACME tls-alpn-01 challenge response (an empty JSON object on the wire)."""

    typ = "tls-alpn-01"


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """ACME tls-alpn-01 challenge (RFC 8737)."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> bytes:
        """SHA-256 of the key authorization: the acmeIdentifier extension's value."""
        return hashlib.sha256(self.key_authorization(account_key).encode("ascii")).digest()


if TLSALPN01.typ not in challenges.Challenge.TYPES:
    challenges.ChallengeResponse.register(TLSALPN01Response)
    challenges.Challenge.register(TLSALPN01)


def choose(
    authorization: messages.Authorization, preference: Sequence[str]
) -> messages.ChallengeBody | None:
    """The offered challenge of the first preferred type we can answer, or None."""
    offered = {c.chall.typ: c for c in authorization.challenges}
    for kind in preference:
        body = offered.get(kind)
        if body is not None and isinstance(body.chall, challenges.HTTP01 | TLSALPN01):
            return body
    return None


def alpn_certificate(
    name: str, digest: bytes, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The self-signed RFC 8737 certificate proving control of ``name``.

    :param digest: the SHA-256 of the key authorization (`TLSALPN01.validation`).
    """
    key, cert = self_signed(
        [x509.DNSName(name)],
        "ACME challenge",
        now,
        datetime.timedelta(days=1),
        [(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), True)],
    )
    return key, cert
