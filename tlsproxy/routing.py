"""Which site and backend a request goes to, from its ``Host`` header (and SNI) and path.

A request is routed by its ``Host`` header, compared with every host's name and
aliases by the rules of `tlsproxy.hostnames` (exact before wildcard).  A request
whose ``Host`` matches no configured site gets no route (the proxy answers 421),
never another site's backend.  A request without a usable ``Host`` falls back to
the TLS server name the client sent, if any.

Within a site, the host's ``routes`` send paths that start with a prefix to
their own backend; the longest matching prefix wins and a path that matches
none goes to the host's ``backend``.  Prefixes are compared byte for byte with
the request target as the client sent it (no decoding), like nginx's prefix
``location`` blocks.

Routing is two steps so that the proxy can cache the first per connection:
`Router.table` finds the site's `RouteTable` from the host name (the costly
part), `RouteTable.route` picks the route for a path (a few ``startswith``
calls, none at all for a site without ``routes``).

Pure module: no Twisted, no OpenSSL.
"""

from __future__ import annotations

import attrs

from tlsproxy.config import Backend, Config, HostConfig
from tlsproxy.headers import HeaderPolicies, HeaderPolicy
from tlsproxy.hostnames import HostTable


@attrs.frozen
class Route:
    """Where one request goes: ``site`` is the configured host name (for logs),
    ``headers`` the site's response-header policy (HSTS, HPKP, extra headers).

    ``host_header`` is the ``Host`` value to send to the backend instead of the
    client's (``preserve_host: false``), or None to pass the client's on.
    """

    site: str
    backend: Backend
    headers: HeaderPolicy = attrs.field(factory=HeaderPolicy)
    host_header: bytes | None = None


class RouteTable:
    """One site's routes: a default and path prefixes, longest first."""

    __slots__ = ("default", "prefixes")

    def __init__(self, default: Route, prefixes: tuple[tuple[bytes, Route], ...] = ()) -> None:
        self.default = default
        #: ``(prefix, route)`` pairs, longest prefix first.
        self.prefixes = tuple(sorted(prefixes, key=lambda p: len(p[0]), reverse=True))

    def route(self, target: bytes) -> Route:
        """The route for a request target (origin-form path and query, or ``*``)."""
        for prefix, route in self.prefixes:
            if target.startswith(prefix):
                return route
        return self.default


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


def _host_header(backend: Backend) -> bytes:
    """``host:port`` of a backend, as a ``Host`` header value."""
    name = backend.host
    if ":" in name:
        name = f"[{name}]"
    elif not name.isascii():
        name = name.encode("idna").decode("ascii")
    return f"{name}:{backend.port}".encode("ascii")


def site_table(host: HostConfig, headers: HeaderPolicy) -> RouteTable:
    """The `RouteTable` of one configured site."""

    def route(backend: Backend) -> Route:
        return Route(
            site=host.name,
            backend=backend,
            headers=headers,
            host_header=None if host.preserve_host else _host_header(backend),
        )

    prefixes = tuple((r.path.encode("ascii"), route(r.backend)) for r in host.routes)
    return RouteTable(route(host.backend), prefixes)


class Router:
    """Routes requests for one configuration; build a new one on reload.

    ``policies`` gives each route its response-header policy; without it routes
    carry none.  ``unrouted_headers`` is the policy for answers to requests that
    matched no site.
    """

    def __init__(self, config: Config, policies: HeaderPolicies | None = None) -> None:
        self._table: HostTable[RouteTable] = HostTable()
        self.unrouted_headers = policies.fallback if policies is not None else HeaderPolicy()
        for host in config.hosts:
            headers = policies.for_site(host.name) if policies is not None else HeaderPolicy()
            table = site_table(host, headers)
            for pattern in host.names:
                self._table.add(pattern, table)

    def table(self, sni: str | None, host: bytes | None) -> RouteTable | None:
        """The routes of the site for this ``Host`` header (or, lacking one, SNI).

        Returns None when no configured site matches.
        """
        if host:
            return self._table.lookup(host_without_port(host))
        return self._table.lookup(sni)

    def __call__(self, sni: str | None, host: bytes | None, path: bytes) -> Route | None:
        """The route for a request with this ``Host`` (or SNI) and target path.

        Returns None when no configured site matches.
        """
        table = self.table(sni, host)
        return table.route(path) if table is not None else None
