"""Host names as tlsproxy compares them: normalisation and exact/wildcard lookup.

Used for SNI (which certificate to present) and for the ``Host`` header (which
site a request is for), so both follow one rule set:

* names compare case-insensitively, with one trailing dot ignored;
* internationalised names are compared as their ASCII (A-label) form;
* ``*.example.com`` matches exactly one extra leftmost label
  (``a.example.com``, not ``example.com`` nor ``a.b.example.com``);
* an exact name wins over a wildcard.

Pure module: no Twisted, no OpenSSL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

import idna

T = TypeVar("T")

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class InvalidHostname(ValueError):
    """A name is not a valid DNS host name or wildcard pattern; the message says why."""


def normalize(name: str | bytes) -> str:
    """Return the canonical form of a DNS host name (lower case, A-labels, no final dot).

    :raises InvalidHostname: if it is empty, too long, or has a bad label.
    """
    if isinstance(name, bytes):
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidHostname("host name is not ASCII") from None
    else:
        text = name
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise InvalidHostname("host name is empty")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidHostname(f"not a valid internationalised host name ({exc})") from None
    text = text.lower()
    if len(text) > 253:
        raise InvalidHostname("host name is longer than 253 characters")
    for label in text.split("."):
        if not _LABEL.fullmatch(label):  # not match(): `$` would accept a final newline
            raise InvalidHostname(f"host name has an invalid label {label!r}")
    return text


def normalize_pattern(pattern: str) -> str:
    """Canonical form of a configured name that may be a ``*.example.com`` wildcard.

    :raises InvalidHostname: for a bad name, a ``*`` anywhere but as the whole
        leftmost label, or a wildcard directly above a top-level domain (``*.com``).
    """
    if pattern.startswith("*."):
        rest = normalize(pattern[2:])
        if "." not in rest:
            raise InvalidHostname("a wildcard must have at least two labels after '*.'")
        return "*." + rest
    if "*" in pattern:
        raise InvalidHostname(
            "'*' is only allowed as the whole leftmost label, as in *.example.com"
        )
    return normalize(pattern)


def candidates(name: str) -> Iterator[str]:
    """The patterns that could match a normalised ``name``: itself, then its wildcard."""
    yield name
    _, dot, parent = name.partition(".")
    if dot and "." in parent:
        yield "*." + parent


def matches(pattern: str, name: str) -> bool:
    """Whether a normalised pattern (exact or ``*.``) covers a normalised name."""
    return pattern in candidates(name)


class HostTable(Generic[T]):
    """A map from host-name patterns to values, looked up by a name from the wire.

    Built once and then only read (the TLS layer swaps whole tables on reload),
    so lookups are two dict probes at most.
    """

    def __init__(self) -> None:
        self._entries: dict[str, T] = {}

    def add(self, pattern: str, value: T) -> None:
        """Map a normalised pattern to ``value``.

        :raises ValueError: if the pattern is already in the table.
        """
        if pattern in self._entries:
            raise ValueError(f"{pattern} is already mapped")
        self._entries[pattern] = value

    def __contains__(self, pattern: str) -> bool:
        return pattern in self._entries

    def lookup(self, name: str | bytes | None) -> T | None:
        """The value for a raw name (SNI bytes, Host text), or None if nothing matches.

        Invalid names match nothing rather than raising.
        """
        if name is None:
            return None
        try:
            canonical = normalize(name)
        except InvalidHostname:
            return None
        for candidate in candidates(canonical):
            value = self._entries.get(candidate)
            if value is not None:
                return value
        return None
