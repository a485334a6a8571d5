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

When any site uses client certificates (``client_auth``), a request is bound
to its TLS handshake: a ``Host`` that names a different site than the SNI did
(or than the default host, without SNI), where either site uses client
certificates, gets no route — so a connection authenticated for one site, or
not at all, never reaches a protected one (nginx answers 421 here too).

Routing is two steps so that the proxy can cache the first per connection:
`Router.table` finds the site's `RouteTable` from the host name (the costly
part), `RouteTable.route` picks the route for a path (a few ``startswith``
calls, none at all for a site without ``routes``).

Pure module: no Twisted, no OpenSSL.
"""

from __future__ import annotations

import attrs

from tlsproxy.config import Backend, ClientAuth, Config, HostConfig
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
    #: The site's client-certificate settings, or None (see `tlsproxy.clientauth`).
    client_auth: ClientAuth | None = None


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
            client_auth=host.client_auth,
        )

    prefixes = tuple((r.path.encode("ascii"), route(r.backend)) for r in host.routes)
    return RouteTable(route(host.backend), prefixes)


def identity_headers(config: Config) -> frozenset[bytes]:
    """Lower-cased names of every configured client-certificate identity header.

    Clients may not send them to any site: a site without ``client_auth``
    could otherwise be used to forge them for a backend shared with one that has it.
    """
    return frozenset(
        name.lower().encode("ascii")
        for host in config.hosts
        if host.client_auth is not None
        for name in (host.client_auth.subject_header, host.client_auth.fingerprint_header)
        if name is not None
    )


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
        #: Sites with client_auth; with none, requests are not bound to the SNI.
        self._mtls = frozenset(h.name for h in config.hosts if h.client_auth is not None)
        self._default_site = config.default_host
        #: Identity header names dropped from every request (see `identity_headers`).
        self.identity_headers = identity_headers(config)

    def table(self, sni: str | None, host: bytes | None) -> RouteTable | None:
        """The routes of the site for this ``Host`` header (or, lacking one, SNI).

        Returns None when no configured site matches, and when the ``Host``
        names a different site than the connection's TLS handshake was for
        (the SNI's site, or the default host's without a matching SNI) while
        either of the two has ``client_auth``: a connection authenticated for
        one site, or not at all, never reaches a client-certificate site.
        """
        if not host:
            return self._table.lookup(sni)
        table = self._table.lookup(host_without_port(host))
        if table is not None and self._mtls:
            found = self._table.lookup(sni)
            handshake_site = found.default.site if found is not None else self._default_site
            site = table.default.site
            if site != handshake_site and (site in self._mtls or handshake_site in self._mtls):
                return None
        return table

    def __call__(self, sni: str | None, host: bytes | None, path: bytes) -> Route | None:
        """The route for a request with this ``Host`` (or SNI) and target path.

        Returns None when no configured site matches.
        """
        table = self.table(sni, host)
        return table.route(path) if table is not None else None


#: Where ACME http-01 challenges are fetched; always answered by tlsproxy itself.
ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


#: A backend's HSTS and HPKP headers are removed from plain-HTTP responses.
_PLAIN_HTTP_HEADERS = HeaderPolicy(
    remove=frozenset(
        {b"strict-transport-security", b"public-key-pins", b"public-key-pins-report-only"}
    )
)


class PlainRouter:
    """Routes requests arriving on the plain-HTTP port (``listen.http``).

    Everything goes to ``local`` — tlsproxy's own port-80 service, which
    answers ACME challenges and redirects to HTTPS — except the requests of
    hosts with ``insecure_plain_http: true``, which go to their backends (by
    their ``routes``) like HTTPS requests do, their ACME challenges excepted.
    HSTS and HPKP are never sent over plain HTTP, not even a backend's own.
    """

    def __init__(self, config: Config, local: Backend) -> None:
        self._local = RouteTable(Route(site="port-80 service", backend=local))
        challenge = (ACME_CHALLENGE_PREFIX, self._local.default)
        self._table: HostTable[RouteTable] = HostTable()
        self.unrouted_headers = HeaderPolicy()
        #: Identity header names dropped from every request (see `identity_headers`).
        self.identity_headers = identity_headers(config)
        for host in config.hosts:
            if host.redirect.enabled:
                continue
            site = site_table(host, _PLAIN_HTTP_HEADERS)
            table = RouteTable(site.default, (*site.prefixes, challenge))
            for pattern in host.names:
                self._table.add(pattern, table)

    def table(self, sni: str | None, host: bytes | None) -> RouteTable:
        """The routes for this ``Host``: the site's for a plain-HTTP site, else the
        port-80 service (which also answers unknown hosts)."""
        found = self._table.lookup(host_without_port(host)) if host else None
        return found if found is not None else self._local

    def __call__(self, sni: str | None, host: bytes | None, path: bytes) -> Route:
        """The route for a plain-HTTP request with this ``Host`` and target path."""
        return self.table(sni, host).route(path)
