"""Which site and backend a request goes to, from its ``Host`` header (and SNI).

A request is routed by its ``Host`` header, compared with every host's name and
aliases by the rules of `tlsproxy.hostnames` (exact before wildcard).  A request
whose ``Host`` matches no configured site gets no route (the proxy answers 421),
never another site's backend.  A request without a usable ``Host`` falls back to
the TLS server name the client sent, if any.

Pure module: no Twisted, no OpenSSL.
"""

from __future__ import annotations

import attrs

from tlsproxy.config import Backend, Config
from tlsproxy.headers import HeaderPolicies, HeaderPolicy
from tlsproxy.hostnames import HostTable


@attrs.frozen
class Route:
    """Where one request goes: ``site`` is the configured host name (for logs),
    ``headers`` the site's response-header policy (HSTS, HPKP, extra headers)."""

    site: str
    backend: Backend
    headers: HeaderPolicy = attrs.field(factory=HeaderPolicy)


def host_without_port(host: bytes) -> bytes:
    """The name part of a ``Host`` header value (``example.com:8443`` → ``example.com``).

    IPv6 literals (``[::1]:8443``) are returned with their brackets, which no
    configured name matches.
    """
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    name, _, _ = host.partition(b":")
    return name


class Router:
    """Routes requests for one configuration; build a new one on reload.

    ``policies`` gives each route its response-header policy; without it routes
    carry none.  ``unrouted_headers`` is the policy for answers to requests that
    matched no site.
    """

    def __init__(self, config: Config, policies: HeaderPolicies | None = None) -> None:
        self._table: HostTable[Route] = HostTable()
        self.unrouted_headers = policies.fallback if policies is not None else HeaderPolicy()
        for host in config.hosts:
            headers = policies.for_site(host.name) if policies is not None else HeaderPolicy()
            route = Route(site=host.name, backend=host.backend, headers=headers)
            for pattern in host.names:
                self._table.add(pattern, route)

    def __call__(self, sni: str | None, host: bytes | None) -> Route | None:
        """The route for a request with this ``Host`` header (or, lacking one, SNI).

        Returns None when no configured site matches.
        """
        if host:
            return self._table.lookup(host_without_port(host))
        return self._table.lookup(sni)
