"""Mozilla's server-side TLS profiles (guidelines 6.0) and the effective TLS parameters.

This module holds the ``modern`` and ``intermediate`` profiles as plain data
and turns the ``tls`` section of the configuration (`TLSSettings`) into one
`TLSParameters` value: each override replaces the profile's value.  It checks
what can be checked without OpenSSL: versions below TLS 1.2, and TLS 1.2
cipher suites that are not forward secret or not AEAD.  Whether OpenSSL knows
a name is checked by `tlsproxy.tls`.

Pure module: no OpenSSL, no Twisted, no file access.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import attrs

from tlsproxy.errors import Problem

if TYPE_CHECKING:
    from tlsproxy.config import TLSSettings

#: TLS 1.2 suites of the intermediate profile, OpenSSL names, in Mozilla's order.
INTERMEDIATE_CIPHERS: tuple[str, ...] = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)

#: Finite-field DHE suites added after the profile's suites when ``tls.dhparam`` is set.
DHE_CIPHERS: tuple[str, ...] = (
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
)

#: TLS 1.3 suites of both profiles.
TLS13_CIPHERSUITES: tuple[str, ...] = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)

#: Key-exchange groups of both profiles, most preferred first.  X25519MLKEM768
#: (post-quantum hybrid) needs OpenSSL 3.5 or later; `tlsproxy.tls` drops it
#: from this default list when the OpenSSL in use does not have it.
GROUPS: tuple[str, ...] = ("X25519MLKEM768", "X25519", "prime256v1", "secp384r1")

VERSIONS: tuple[str, ...] = ("1.2", "1.3")
_OLD_VERSIONS = ("1.0", "1.1", "1", "ssl3", "sslv3", "tls1", "tls1.0", "tls1.1")


@attrs.frozen
class Profile:
    """One Mozilla profile: protocol versions, suites and groups.

    ``ciphers`` is empty for a TLS 1.3-only profile.
    """

    name: str
    min_version: str
    max_version: str
    ciphers: tuple[str, ...]
    ciphersuites: tuple[str, ...]
    groups: tuple[str, ...]


PROFILES: dict[str, Profile] = {
    "modern": Profile(
        name="modern",
        min_version="1.3",
        max_version="1.3",
        ciphers=(),
        ciphersuites=TLS13_CIPHERSUITES,
        groups=GROUPS,
    ),
    "intermediate": Profile(
        name="intermediate",
        min_version="1.2",
        max_version="1.3",
        ciphers=INTERMEDIATE_CIPHERS,
        ciphersuites=TLS13_CIPHERSUITES,
        groups=GROUPS,
    ),
}


@attrs.frozen
class TLSParameters:
    """The TLS policy in effect for every host, after applying overrides to a profile.

    Versions are ``"1.2"`` or ``"1.3"``; ``ciphers`` are TLS 1.2 suites and
    ``ciphersuites`` TLS 1.3 suites (OpenSSL names, preferred first).
    ``groups_configured`` is true when the user listed the groups, so an
    unknown one is an error rather than silently dropped.  ``dhparam`` is the
    path of a PEM DH parameters file, or None (no DHE).
    ``session_ticket_rotation`` is the life of the session-ticket keys and
    the session cache, in seconds (see `tlsproxy.tls.SNIConnectionCreator`).
    """

    profile: str
    min_version: str
    max_version: str
    ciphers: tuple[str, ...]
    ciphersuites: tuple[str, ...]
    groups: tuple[str, ...]
    groups_configured: bool
    dhparam: str | None
    session_tickets: bool
    session_ticket_rotation: float

    @property
    def cipher_string(self) -> str:
        """The TLS 1.2 suites as an OpenSSL cipher string (colon-separated)."""
        return ":".join(self.ciphers)

    @property
    def ciphersuites_string(self) -> str:
        """The TLS 1.3 suites as an OpenSSL ciphersuites string."""
        return ":".join(self.ciphersuites)

    @property
    def groups_string(self) -> str:
        """The groups as an OpenSSL groups list."""
        return ":".join(self.groups)


# A TLS 1.2 suite name is KEYEXCHANGE-AUTH-CIPHER[-MAC].  Forward secrecy needs an
# ephemeral key exchange; AEAD needs GCM, CCM or ChaCha20-Poly1305.
_SUITE_NAME = re.compile(r"^[A-Z0-9][A-Z0-9-]*$")
_FORWARD_SECRET = ("ECDHE-ECDSA-", "ECDHE-RSA-", "DHE-RSA-")
_AEAD = re.compile(r"-(GCM-SHA\d+|CCM|CHACHA20-POLY1305)$")
_TLS13_NAME = re.compile(r"^TLS_[A-Z0-9_]+$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(":") if part.strip())


def _check_tls12_suite(name: str) -> str | None:
    """Why ``name`` is not an acceptable TLS 1.2 suite, or None if it is."""
    if not _SUITE_NAME.match(name):
        return (
            f"{name!r} is not a cipher suite name; list OpenSSL suite names such as "
            f"ECDHE-ECDSA-AES128-GCM-SHA256, separated by ':'"
        )
    if not name.startswith(_FORWARD_SECRET):
        return (
            f"{name} is not forward secret; only ECDHE-ECDSA-, ECDHE-RSA- and DHE-RSA- suites "
            f"are allowed"
        )
    if not _AEAD.search(name):
        return (
            f"{name} is not an AEAD cipher; only GCM, CCM and CHACHA20-POLY1305 suites are allowed"
        )
    return None


def check_settings(settings: TLSSettings) -> list[Problem]:
    """Every problem with the ``tls`` section that needs no OpenSSL to find.

    Problems are reported at ``tls.profile``, ``tls.min_version``,
    ``tls.ciphers``, ``tls.ciphersuites`` and ``tls.groups``.
    """
    problems: list[Problem] = []
    profile = PROFILES.get(settings.profile)
    if profile is None:
        problems.append(
            Problem(
                "tls.profile", f"must be one of {', '.join(PROFILES)}, not {settings.profile!r}"
            )
        )
        profile = PROFILES["intermediate"]
    min_version = settings.min_version or profile.min_version
    if settings.min_version is not None and settings.min_version not in VERSIONS:
        if settings.min_version.lower() in _OLD_VERSIONS:
            reason = "TLS versions below 1.2 are insecure and not supported; use 1.2 or 1.3"
        else:
            reason = f"must be 1.2 or 1.3, not {settings.min_version!r}"
        problems.append(Problem("tls.min_version", reason))
        min_version = profile.min_version
    if settings.ciphers is not None:
        names = _split(settings.ciphers)
        if not names:
            problems.append(Problem("tls.ciphers", "must list at least one cipher suite"))
        for name in names:
            why = _check_tls12_suite(name)
            if why is None and name.startswith("DHE-") and settings.dhparam is None:
                why = f"{name} is a DHE suite, which needs DH parameters in tls.dhparam"
            if why is not None:
                problems.append(Problem("tls.ciphers", why))
    elif min_version == "1.2" and not profile.ciphers:
        problems.append(
            Problem(
                "tls.ciphers",
                f"TLS 1.2 is enabled (tls.min_version: 1.2) but the {profile.name} profile has no "
                f"TLS 1.2 cipher suites; list them in tls.ciphers",
            )
        )
    if settings.ciphersuites is not None:
        names = _split(settings.ciphersuites)
        if not names:
            problems.append(Problem("tls.ciphersuites", "must list at least one TLS 1.3 suite"))
        for name in names:
            if not _TLS13_NAME.match(name):
                problems.append(
                    Problem(
                        "tls.ciphersuites",
                        f"{name!r} is not a TLS 1.3 suite name such as TLS_AES_128_GCM_SHA256",
                    )
                )
    if settings.groups is not None:
        if not settings.groups:
            problems.append(Problem("tls.groups", "must name at least one group"))
        for group in settings.groups:
            if not _GROUP_NAME.match(group):
                problems.append(
                    Problem("tls.groups", f"{group!r} is not a group name such as X25519")
                )
    return problems


def resolve(settings: TLSSettings) -> tuple[TLSParameters | None, list[Problem]]:
    """Apply the overrides in ``settings`` to its profile.

    :return: the effective parameters, or None if there are errors; and every
        problem found by `check_settings`.
    """
    problems = check_settings(settings)
    if any(not p.warning for p in problems):
        return None, problems
    profile = PROFILES[settings.profile]
    if settings.ciphers is not None:
        ciphers = _split(settings.ciphers)
    else:
        ciphers = profile.ciphers + (DHE_CIPHERS if settings.dhparam and profile.ciphers else ())
    params = TLSParameters(
        profile=profile.name,
        min_version=settings.min_version or profile.min_version,
        max_version=profile.max_version,
        ciphers=ciphers,
        ciphersuites=(
            _split(settings.ciphersuites)
            if settings.ciphersuites is not None
            else profile.ciphersuites
        ),
        groups=tuple(settings.groups) if settings.groups is not None else profile.groups,
        groups_configured=settings.groups is not None,
        dhparam=settings.dhparam,
        session_tickets=settings.session_tickets,
        session_ticket_rotation=settings.session_ticket_rotation,
    )
    return params, problems
