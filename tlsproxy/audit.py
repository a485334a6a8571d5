"""Grading the effective TLS settings of every host, in the spirit of SSL Labs.

`grade_config` takes what tlsproxy would serve (the effective `TLSParameters`,
each host's loaded certificates, its HSTS settings) and returns one
`HostGrade` per host: a letter from ``A+`` down to ``F``, or ``T`` when
browsers would not trust the certificate, with a `Cap` for every reason the
grade is below ``A+``.  The rules follow SSL Labs' rating guide (2025):

- A+ needs TLS 1.2 and/or 1.3 with forward-secret AEAD suites only, a trusted
  and valid certificate with a strong key, and HSTS with a max-age of at
  least six months (`HSTS_A_PLUS_MIN_MAX_AGE`).
- No HSTS, or a shorter max-age: A.  TLS 1.3 not offered: A-.
- A TLS 1.2 suite without forward secrecy or AEAD, DH parameters or a
  key-exchange group under 2048/256 bits, an RSA key under 2048 bits (or EC
  under 256): B.  A cipher under 128 bits, TLS below 1.2, a SHA-1 or MD5
  signed certificate: F.
- Expired, not yet valid, wrong names, or (when a trust store is given) a
  chain that does not lead to a trusted root: T.
- Beyond SSL Labs: a certificate that expires within `EXPIRY_WARNING` (14
  days) caps at A-, so that a CI gate on the grade also catches a renewal
  that did not happen.

Many of these cannot happen with a configuration tlsproxy accepts (it refuses
TLS below 1.2, non-AEAD suites and small keys); the rules are kept so the
grade stays honest if the policy is ever loosened.

Pure module: no Twisted, no OpenSSL, no file access and no logging; the
callers (`tlsproxy.cli`'s ``check``, `tlsproxy.service` at start-up) read the
files and print or log the result.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tlsproxy.certs import EXPIRY_WARNING, CertifiedKey, check_names
from tlsproxy.config import Config, HostConfig
from tlsproxy.headers import HSTS_A_PLUS_MIN_MAX_AGE
from tlsproxy.profiles import TLSParameters

#: Grades from best to worst; ``T`` (not trusted) fails every minimum grade.
GRADES: tuple[str, ...] = ("A+", "A", "A-", "B", "C", "D", "E", "F", "T")

#: Key-exchange groups and their strength in bits (RFC 7748, SP 800-57).
_GROUP_BITS = {
    "x25519mlkem768": 256,
    "secp256r1mlkem768": 256,
    "secp384r1mlkem1024": 384,
    "x25519": 256,
    "x448": 448,
    "prime256v1": 256,
    "secp256r1": 256,
    "p-256": 256,
    "secp384r1": 384,
    "p-384": 384,
    "secp521r1": 521,
    "p-521": 521,
    "prime192v1": 192,
    "secp192r1": 192,
    "secp224r1": 224,
    "ffdhe2048": 2048,
    "ffdhe3072": 3072,
    "ffdhe4096": 4096,
}
_FFDHE = re.compile(r"^ffdhe\d+$")
_FORWARD_SECRET = ("ECDHE-", "DHE-")
_AEAD = re.compile(r"-(GCM-SHA\d+|CCM(8)?|CHACHA20-POLY1305)$")
_WEAK_CIPHER = re.compile(r"(^|-)(NULL|EXPORT|RC4|DES|3DES|DES-CBC3|IDEA|SEED|RC2|MD5)(-|$)")
_WEAK_HASHES = (hashes.SHA1, hashes.MD5)


def rank(grade: str) -> int:
    """Position of ``grade`` in `GRADES` (0 is best).

    :raises ValueError: for an unknown grade.
    """
    return GRADES.index(grade)


@attrs.frozen
class Cap:
    """One reason a host's grade is at most ``grade``; ``path`` is the config key it concerns."""

    grade: str
    path: str
    reason: str


@attrs.frozen
class HostGrade:
    """A host's grade and every cap that brought it below A+ (worst first)."""

    host: str
    grade: str
    caps: tuple[Cap, ...]
    trust_checked: bool

    def at_least(self, minimum: str) -> bool:
        """Whether this grade is ``minimum`` or better."""
        return rank(self.grade) <= rank(minimum)


def _protocol_caps(params: TLSParameters) -> list[Cap]:
    caps: list[Cap] = []
    if params.max_version != "1.3":
        caps.append(Cap("A-", "tls", "TLS 1.3 is not offered"))
    if params.min_version not in ("1.2", "1.3"):
        caps.append(Cap("F", "tls.min_version", f"TLS {params.min_version} is offered"))
    if params.min_version == "1.2" or params.max_version == "1.2":
        for suite in params.ciphers:
            if _WEAK_CIPHER.search(suite):
                caps.append(Cap("F", "tls.ciphers", f"{suite} is a broken or under-128-bit cipher"))
            elif not suite.startswith(_FORWARD_SECRET):
                caps.append(Cap("B", "tls.ciphers", f"{suite} has no forward secrecy"))
            elif not _AEAD.search(suite):
                caps.append(Cap("B", "tls.ciphers", f"{suite} is not an AEAD cipher"))
    return caps


def _key_exchange_caps(params: TLSParameters, dh_bits: int | None) -> list[Cap]:
    caps: list[Cap] = []
    for group in params.groups:
        bits = _GROUP_BITS.get(group.lower())
        if bits is None:
            continue
        weak = bits < 2048 if _FFDHE.match(group.lower()) else bits < 256
        if weak:
            caps.append(Cap("B", "tls.groups", f"the key-exchange group {group} is under 256 bits"))
    uses_dhe = any(s.startswith("DHE-") for s in params.ciphers) and params.min_version == "1.2"
    if uses_dhe and dh_bits is not None and dh_bits < 2048:
        caps.append(Cap("B", "tls.dhparam", f"the DH parameters have {dh_bits} bits (under 2048)"))
    return caps


def _certificate_caps(
    host: HostConfig,
    certified: CertifiedKey,
    now: datetime.datetime,
    trust_roots: Sequence[x509.Certificate] | None,
) -> list[Cap]:
    where = certified.source.path
    leaf = certified.leaf
    caps: list[Cap] = []
    valid = True
    for i, cert in enumerate((leaf, *certified.chain)):
        what = "the certificate" if i == 0 else "an intermediate certificate"
        if cert.not_valid_after_utc < now:
            caps.append(Cap("T", where, f"{what} expired on {_day(cert.not_valid_after_utc)}"))
            valid = False
        elif cert.not_valid_before_utc > now:
            caps.append(
                Cap("T", where, f"{what} is not valid until {_day(cert.not_valid_before_utc)}")
            )
            valid = False
    left = leaf.not_valid_after_utc - now
    if valid and left < EXPIRY_WARNING:
        caps.append(
            Cap(
                "A-",
                where,
                f"the certificate expires in {left.days} days (on "
                f"{_day(leaf.not_valid_after_utc)}); renew it",
            )
        )
    caps += [Cap("T", p.path, p.reason) for p in check_names(certified, host.names)]
    public = leaf.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        caps.append(Cap("B", where, f"the RSA key has {public.key_size} bits (under 2048)"))
    if isinstance(public, ec.EllipticCurvePublicKey) and public.key_size < 256:
        caps.append(Cap("B", where, f"the EC key has {public.key_size} bits (under 256)"))
    for cert in (leaf, *certified.chain):
        algorithm = cert.signature_hash_algorithm
        if isinstance(algorithm, _WEAK_HASHES):
            caps.append(
                Cap("F", where, f"{_subject(cert)} is signed with {algorithm.name.upper()}")
            )
    if trust_roots is not None and valid:
        why = _untrusted(host, certified, now, trust_roots)
        if why is not None:
            caps.append(Cap("T", where, f"the chain is not trusted: {why}"))
    return caps


def _untrusted(
    host: HostConfig,
    certified: CertifiedKey,
    now: datetime.datetime,
    roots: Sequence[x509.Certificate],
) -> str | None:
    """Why a browser trusting ``roots`` would reject the served chain, or None."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    if not roots:
        return "no trusted root certificates were given"
    name = host.name[2:] if host.name.startswith("*.") else host.name
    name = f"www.{name}" if host.name.startswith("*.") else name
    try:
        verifier = (
            PolicyBuilder()
            .store(Store(list(roots)))
            .time(now)
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(certified.leaf, list(certified.chain))
    except VerificationError as exc:
        detail = str(exc)
        if "candidates exhausted" in detail:
            return (
                "it does not lead to a trusted root certificate (missing intermediate, or a "
                "private CA: give its root with --ca-file)"
            )
        return detail or "no path to a trusted root"
    except ValueError as exc:
        return str(exc)
    return None


def _hsts_caps(host: HostConfig) -> list[Cap]:
    path = f"hosts.{host.name}.hsts"
    if not host.hsts.enabled:
        return [
            Cap(
                "A",
                path,
                "HSTS is off; A+ needs Strict-Transport-Security with max-age of at least "
                f"{HSTS_A_PLUS_MIN_MAX_AGE} (six months)",
            )
        ]
    if host.hsts.max_age < HSTS_A_PLUS_MIN_MAX_AGE:
        return [
            Cap(
                "A",
                f"{path}.max_age",
                f"HSTS max-age {host.hsts.max_age} is under six months "
                f"({HSTS_A_PLUS_MIN_MAX_AGE}); A+ needs at least that",
            )
        ]
    return []


def grade_host(
    host: HostConfig,
    certificates: Sequence[CertifiedKey],
    params: TLSParameters,
    now: datetime.datetime,
    *,
    dh_bits: int | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
) -> HostGrade:
    """Grade one host served with ``params`` and its loaded ``certificates``.

    :param dh_bits: size of the DH parameters in use, if known.
    :param trust_roots: the roots a browser would trust; None skips the trust
        check (only expiry, names, keys and signatures are graded then).
    """
    caps = _protocol_caps(params) + _key_exchange_caps(params, dh_bits)
    if not certificates:
        caps.append(Cap("T", f"hosts.{host.name}.certificates", "no certificate could be loaded"))
    for certified in certificates:
        caps += _certificate_caps(host, certified, now, trust_roots)
    caps += _hsts_caps(host)
    caps = sorted(dict.fromkeys(caps), key=lambda c: -rank(c.grade))
    grade = caps[0].grade if caps else "A+"
    return HostGrade(
        host=host.name, grade=grade, caps=tuple(caps), trust_checked=trust_roots is not None
    )


def grade_config(
    config: Config,
    certificates: Mapping[str, Sequence[CertifiedKey]],
    params: TLSParameters,
    now: datetime.datetime,
    *,
    dh_bits: int | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
) -> list[HostGrade]:
    """`grade_host` for every host of ``config``, in the file's order."""
    return [
        grade_host(
            host,
            certificates.get(host.name, ()),
            params,
            now,
            dh_bits=dh_bits,
            trust_roots=trust_roots,
        )
        for host in config.hosts
    ]


def describe(grade: HostGrade) -> str:
    """One line: ``example.com: A+`` or ``example.com: A (capped: reason; reason)``."""
    if not grade.caps:
        return f"{grade.host}: {grade.grade}"
    reasons = "; ".join(f"{c.grade}: {c.reason}" for c in grade.caps)
    return f"{grade.host}: {grade.grade} (capped: {reasons})"


def report_lines(grade: HostGrade) -> list[str]:
    """``host: GRADE`` followed by one indented ``CAP  key.path: reason`` line per cap."""
    lines = [f"{grade.host}: {grade.grade}"]
    lines += [f"  {c.grade:<2}  {c.path}: {c.reason}" for c in grade.caps]
    return lines


def lowest(grades: Iterable[HostGrade]) -> str | None:
    """The worst grade of ``grades``, or None if there are none."""
    worst = [g.grade for g in grades]
    return max(worst, key=rank) if worst else None


def _day(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return f"the certificate {names[0].value!s}" if names else "a certificate"
