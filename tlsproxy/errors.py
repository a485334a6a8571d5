"""Problems found in the user's configuration or certificates, and how they are reported.

Every check in tlsproxy (config schema, certificate files, TLS settings) reports
`Problem` values rather than raising at the first one, so that a user sees every
mistake in one run.  `ConfigError` carries them all; its ``str()`` is the text
printed before tlsproxy exits, one line per problem::

    proxy.yaml: hosts.example.com.certificates[0]: private key does not match certificate

This module is pure: it must not import Twisted or OpenSSL.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


@attrs.frozen
class Problem:
    """One thing wrong with the configuration.

    ``path`` is the dotted key path inside the file (``tls.ciphers``,
    ``hosts.example.com.certificates[1]``), empty for the document itself;
    ``reason`` says what is wrong in words a user can act on.  ``warning``
    problems are logged but do not stop tlsproxy.
    """

    path: str
    reason: str
    warning: bool = False

    def render(self, source: str) -> str:
        """Format as ``source: path: reason`` (``source: reason`` without a path)."""
        where = f"{source}: {self.path}" if self.path else source
        return f"{where}: {self.reason}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason.

    ``source`` names the file (as the user gave it) that the key paths refer to.
    ``partial``, when given, is what did validate (a `tlsproxy.config.Config`
    holding only the sound parts), so that later checks can still report on it.
    """

    def __init__(
        self, source: str, problems: Iterable[Problem], *, partial: object | None = None
    ) -> None:
        self.source = source
        self.problems = tuple(problems)
        self.partial = partial
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(p.render(self.source) for p in self.problems)
