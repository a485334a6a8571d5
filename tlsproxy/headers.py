"""Security headers on HTTPS responses: HSTS, HPKP and a host's extra headers.

From a host's configuration (and, for HPKP, the pins of its keys) this module
computes a `HeaderPolicy`: the headers to set on every HTTPS response of that
host and the names to remove from the backend's response first, so that a
header is replaced, never duplicated.  `HeaderPolicies` holds one policy per
site plus a fallback for requests that matched no site.  The proxy engine calls
``policies.for_site(site).apply(headers)`` on every response it sends over
TLS, its own error pages and redirects included.

Policies are for HTTPS only: nothing here may be sent over plain HTTP (the
port-80 service never uses this module's output).

Pure module: no Twisted, no OpenSSL, no file access.  Pins arrive as base64
strings; reading keys and computing pins is `tlsproxy.pins`' job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from tlsproxy.config import (
    Config,
    HostConfig,
    HPKPSettings,
    HSTSSettings,
)
from tlsproxy.errors import Problem

Header = tuple[bytes, bytes]

HSTS = b"Strict-Transport-Security"
HPKP = b"Public-Key-Pins"
HPKP_REPORT_ONLY = b"Public-Key-Pins-Report-Only"
#: SSL Labs awards A+ only with an HSTS max-age of at least six months.
HSTS_A_PLUS_MIN_MAX_AGE = 15768000


@attrs.frozen
class HeaderPolicy:
    """Headers to put on a response, replacing any the backend sent.

    ``set`` is added after removing every header named in ``remove`` (which
    holds lower-case names and always includes the names in ``set``).
    """

    set: tuple[Header, ...] = ()
    remove: frozenset[bytes] = frozenset()
    #: ``set`` as header lines (``Name: value\r\n`` each), for responses the
    #: proxy writes itself (error pages), where there is no header to remove.
    set_bytes: bytes = attrs.field(init=False)

    @set_bytes.default
    def _serialize(self) -> bytes:
        return b"".join(b"%s: %s\r\n" % (name, value) for name, value in self.set)

    def apply(self, headers: Iterable[Header]) -> list[Header]:
        """A new header list: ``headers`` without the removed names, then ``set``.

        Names are compared case-insensitively; the order of the kept headers is
        preserved, so repeated headers such as ``Set-Cookie`` stay as they were.
        """
        remove = self.remove
        out = [h for h in headers if h[0].lower() not in remove] if remove else list(headers)
        out.extend(self.set)
        return out


def _policy(set_: Sequence[Header], remove: Iterable[bytes] = ()) -> HeaderPolicy:
    names = {name.lower() for name, _ in set_} | {name.lower() for name in remove}
    return HeaderPolicy(set=tuple(set_), remove=frozenset(names))


def hsts_value(settings: HSTSSettings) -> bytes | None:
    """The ``Strict-Transport-Security`` value, or None when HSTS is off.

    >>> hsts_value(HSTSSettings(max_age=63072000, include_subdomains=True))
    b'max-age=63072000; includeSubDomains'
    """
    if not settings.enabled:
        return None
    value = f"max-age={settings.max_age}"
    if settings.include_subdomains:
        value += "; includeSubDomains"
    if settings.preload:
        value += "; preload"
    return value.encode("ascii")


def hpkp_header(settings: HPKPSettings, pins: Sequence[str]) -> Header:
    """The HPKP header (name and value) pinning ``pins`` (base64 SHA-256 SPKI hashes).

    The name is ``Public-Key-Pins-Report-Only`` when ``settings.report_only``.

    :raises ValueError: with fewer than two distinct pins (RFC 7469 requires a
        backup pin, so one pin alone is never valid).
    """
    unique = list(dict.fromkeys(pins))
    if len(unique) < 2:
        raise ValueError("HPKP needs at least two distinct pins (a live key and a backup)")
    parts = [f'pin-sha256="{pin}"' for pin in unique]
    parts.append(f"max-age={settings.max_age}")
    if settings.include_subdomains:
        parts.append("includeSubDomains")
    if settings.report_uri:
        parts.append(f'report-uri="{settings.report_uri}"')
    name = HPKP_REPORT_ONLY if settings.report_only else HPKP
    return name, "; ".join(parts).encode("ascii")


def response_header_policy(host: HostConfig, pins: Sequence[str] = ()) -> HeaderPolicy:
    """The policy for every HTTPS response of ``host``.

    :param pins: all HPKP pins of the host, live keys first, then backups; used
        only when the host has ``hpkp``.  With ``hpkp`` and fewer than two
        pins, no HPKP header is sent (the start-up check reports why).
    """
    set_: list[Header] = []
    remove: list[bytes] = []
    hsts = hsts_value(host.hsts)
    if hsts is not None:
        set_.append((HSTS, hsts))  # with hsts: false, a backend's own header passes through
    if host.hpkp is not None:
        remove += [HPKP, HPKP_REPORT_ONLY]
        if len(set(pins)) >= 2:
            set_.append(hpkp_header(host.hpkp, pins))
    set_ += [(n.encode("ascii"), v.encode("ascii")) for n, v in host.headers.set]
    remove += [n.encode("ascii") for n in host.headers.remove]
    return _policy(set_, remove)


def fallback_policy(config: Config) -> HeaderPolicy:
    """The policy for HTTPS responses that matched no site (unknown ``Host``).

    HSTS with the default host's max-age (if it has HSTS), but without
    ``includeSubDomains`` or ``preload``: the request named a host that
    tlsproxy does not serve, so nothing beyond that name is pinned.
    """
    try:
        default = config.host(config.default_host)
    except KeyError:
        return HeaderPolicy()
    if not default.hsts.enabled:
        return HeaderPolicy()
    return _policy([(HSTS, f"max-age={default.hsts.max_age}".encode("ascii"))])


@attrs.frozen
class HeaderPolicies:
    """The response-header policy of every site of one configuration.

    Built again whenever the configuration or the live certificates change
    (HPKP pins follow the keys), and swapped as a whole.
    """

    by_site: Mapping[str, HeaderPolicy]
    fallback: HeaderPolicy

    def for_site(self, site: str | None) -> HeaderPolicy:
        """The policy for a response of ``site`` (a `Route.site`), or the
        fallback when the request matched no site (``None``)."""
        if site is None:
            return self.fallback
        return self.by_site.get(site, self.fallback)


def build_policies(config: Config, pins: Mapping[str, Sequence[str]]) -> HeaderPolicies:
    """Every site's policy; ``pins`` maps a host name to its HPKP pins (see
    `response_header_policy`) and may leave out hosts without ``hpkp``."""
    return HeaderPolicies(
        by_site={h.name: response_header_policy(h, pins.get(h.name, ())) for h in config.hosts},
        fallback=fallback_policy(config),
    )


def header_warnings(config: Config) -> list[Problem]:
    """Start-up warnings about settings that are allowed but weaken a site.

    HSTS switched off (``hsts: false`` leaves the header to the backend) or
    shorter than SSL Labs' six months for A+, and HPKP being enabled at all
    (it is deprecated and can lock visitors out).
    """
    problems: list[Problem] = []
    for host in config.hosts:
        path = f"hosts.{host.name}"
        if not host.hsts.enabled:
            problems.append(
                Problem(
                    f"{path}.hsts",
                    "HSTS is off: browsers may be downgraded to plain HTTP, and SSL Labs "
                    "grades at most A",
                    warning=True,
                )
            )
        elif host.hsts.max_age < HSTS_A_PLUS_MIN_MAX_AGE:
            problems.append(
                Problem(
                    f"{path}.hsts.max_age",
                    f"max_age {host.hsts.max_age} is under six months "
                    f"({HSTS_A_PLUS_MIN_MAX_AGE}); SSL Labs grades at most A",
                    warning=True,
                )
            )
        if host.hpkp is not None:
            mode = (
                "in report-only mode, which cannot lock anyone out"
                if host.hpkp.report_only
                else "ENFORCED: if this site ever serves a key that is not pinned (lost key, "
                "new key without a backup), browsers that remember the pins refuse it for "
                f"max_age ({host.hpkp.max_age} s); prefer report_only: true"
            )
            problems.append(
                Problem(
                    f"{path}.hpkp",
                    "HPKP is deprecated and ignored by current browsers; it is sent " + mode,
                    warning=True,
                )
            )
            if host.hpkp.report_only and not host.hpkp.report_uri:
                problems.append(
                    Problem(
                        f"{path}.hpkp.report_uri",
                        "report_only without report_uri has no effect; add a report_uri",
                        warning=True,
                    )
                )
    return problems
