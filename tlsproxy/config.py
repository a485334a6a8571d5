"""The configuration file: YAML text in, a frozen tree of attrs values out.

`load_config` reads the file, `parse_config` validates an already-decoded
document.  Every problem in the document is collected in one pass and raised
together as a `ConfigError`, each with the key path it concerns, so a user fixes
their file in one go.  Unknown keys are errors that list the allowed ones.

What this module checks is the *shape* of the configuration.  Whether the
certificate files are good, whether OpenSSL knows a cipher name and whether an
endpoint string parses are checked by the modules that own those things
(`certs`, `tls`, `service`), which report their own `Problem` values against
the same key paths, still before any port is bound.

Pure module: stdlib, attrs and PyYAML only; no Twisted, no OpenSSL.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeGuard, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from tlsproxy.errors import ConfigError, Problem
from tlsproxy.hostnames import InvalidHostname, normalize, normalize_pattern

T = TypeVar("T")

PROFILES = ("modern", "intermediate")
TLS_VERSIONS = ("1.2", "1.3")
#: Seconds between new session-ticket keys (and a new session cache): 12 hours,
#: as Caddy rotates them; a ticket older than that gets a full handshake.
DEFAULT_SESSION_TICKET_ROTATION = 43200.0
#: Allowed ``tls.session_ticket_rotation``: a minute to a week.
SESSION_TICKET_ROTATION_RANGE = (60, 604800)


@attrs.frozen
class Listen:
    """Where tlsproxy listens, as Twisted server endpoint strings.

    ``https`` listeners terminate TLS; ``http`` listeners are the plain port
    (ACME challenges and redirects).
    """

    https: tuple[str, ...] = ()
    http: tuple[str, ...] = ()


@attrs.frozen
class TLSSettings:
    """TLS policy shared by every host: a Mozilla profile plus explicit overrides.

    ``None`` means "as the profile says".  ``ciphers`` are TLS 1.2 suites and
    ``ciphersuites`` TLS 1.3 suites, both colon-separated OpenSSL names;
    ``dhparam`` is the path of a PEM file of DH parameters, which enables DHE
    suites.
    """

    profile: str = "intermediate"
    min_version: str | None = None
    ciphers: str | None = None
    ciphersuites: str | None = None
    groups: tuple[str, ...] | None = None
    dhparam: str | None = None
    session_tickets: bool = True
    session_ticket_rotation: float = DEFAULT_SESSION_TICKET_ROTATION


@attrs.frozen
class CertificateSource:
    """Where one certificate of a host comes from.

    ``key`` and ``cert`` are the same file when key, certificate and
    intermediates sit in one PEM; ``chain`` is an optional separate file of
    intermediates.  ``path`` is the key path used in messages about it.
    """

    key: str
    cert: str
    chain: str | None
    path: str


@attrs.frozen
class BackendTLS:
    """How tlsproxy connects to ``https://`` backends (a host's ``backend_tls``).

    ``ca`` is a PEM file of CAs to trust instead of the system store; ``cert``
    and ``key`` a client certificate to present; ``insecure_skip_verify``
    turns off certificate and name checks (labs only; warned about).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure_skip_verify: bool = False
    path: str = ""


@attrs.frozen
class Backend:
    """An upstream HTTP server: ``scheme`` is ``"http"`` or ``"https"``, ``port`` a
    TCP port; ``tls`` applies to ``https`` (None: the system's CAs, no client
    certificate)."""

    scheme: str
    host: str
    port: int
    tls: BackendTLS | None = None

    @property
    def url(self) -> str:
        """The backend as a URL, for logs (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


# -- port 80 and response headers (issue 4): acme.webroot, per-host hsts, hpkp,
#    redirect, headers, webroot.  Values only; tlsproxy.headers, tlsproxy.pins and
#    tlsproxy.plain give them meaning.

#: HSTS max-age of two years, the hstspreload.org recommendation.
HSTS_DEFAULT_MAX_AGE = 63072000
#: hstspreload.org refuses a max-age below one year.
HSTS_PRELOAD_MIN_MAX_AGE = 31536000
REDIRECT_STATUSES = (301, 302, 307, 308)
REDIRECT_OTHER_STATUSES = (307, 308)


@attrs.frozen
class HSTSSettings:
    """The ``Strict-Transport-Security`` header of a host's HTTPS responses.

    On by default; ``enabled`` is False only after ``hsts: false``.  ``preload``
    requires ``max_age`` of at least a year and ``include_subdomains``.
    """

    enabled: bool = True
    max_age: int = HSTS_DEFAULT_MAX_AGE
    include_subdomains: bool = False
    preload: bool = False


@attrs.frozen
class BackupPin:
    """An HPKP backup pin: either a base64 SHA-256 ``pin`` or a key/CSR/certificate
    ``file`` to compute it from; ``path`` is the key path used in messages."""

    pin: str | None
    file: str | None
    path: str


@attrs.frozen
class HPKPSettings:
    """Deprecated HTTP Public Key Pinning, opt-in per host (``hpkp:``).

    The live pins come from the host's certificates at run time; ``backup_pins``
    must hold at least one pin of a key that is not in use.  ``report_only``
    (the default) sends ``Public-Key-Pins-Report-Only``.
    """

    backup_pins: tuple[BackupPin, ...]
    max_age: int = 5184000
    include_subdomains: bool = False
    report_uri: str | None = None
    report_only: bool = True


@attrs.frozen
class RedirectSettings:
    """What the plain-HTTP listener does with a host's requests (other than ACME).

    ``enabled`` (the default) redirects to HTTPS with ``status`` for GET and HEAD
    and ``other_status`` for other methods; ``https_port`` overrides the port
    put in ``Location`` (default: the first ``listen.https`` port).  With
    ``enabled`` False (``insecure_plain_http: true``) the host is proxied over
    plain HTTP, which is insecure.
    """

    enabled: bool = True
    status: int = 301
    other_status: int = 308
    https_port: int | None = None


@attrs.frozen
class ExtraHeaders:
    """Response headers a host sets (replacing the backend's) or removes.

    Names keep the user's spelling; they are compared case-insensitively.
    """

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


#: Named ACME directories accepted by ``acme.directory``.
ACME_DIRECTORIES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
#: ``acme.key_type`` values: the certificate keys each ACME host gets.
ACME_KEY_TYPES = ("ecdsa", "rsa", "both")
#: ``acme.challenges`` values, in the default order of preference.
ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@attrs.frozen
class AcmeSettings:
    """The ``acme`` section.

    ``webroot`` is the directory whose ``.well-known/acme-challenge/`` external
    ACME clients write tokens into.  The rest drives the built-in client
    (`tlsproxy.acme`) for hosts with ``acme: true``: ``directory`` is the
    directory URL (named shortcuts resolved), ``agree_tos`` the explicit
    agreement to the CA's terms, ``state_dir`` where the account and
    certificates are kept, ``ca_bundle`` extra CA certificates trusted for the
    directory's HTTPS, ``challenges`` the challenge types in order of
    preference, ``retry_initial``/``retry_max`` the back-off bounds in seconds.
    """

    webroot: str | None = None
    directory: str = ACME_DIRECTORIES["letsencrypt"]
    email: str | None = None
    agree_tos: bool = False
    state_dir: str | None = None
    ca_bundle: str | None = None
    key_type: str = "ecdsa"
    challenges: tuple[str, ...] = ACME_CHALLENGES
    retry_initial: float = 60.0
    retry_max: float = 6 * 3600.0


@attrs.frozen
class PathRoute:
    """``routes: [{path: /ws/, backend: http://…}]``: requests whose path starts
    with ``path`` (a plain prefix, as nginx's ``location /ws/``) go to ``backend``."""

    path: str
    backend: Backend


#: ``client_auth.mode`` values: ``required`` refuses a handshake without a valid
#: client certificate; ``optional`` verifies one if the client presents it.
CLIENT_AUTH_MODES = ("required", "optional")


@attrs.frozen
class ClientAuth:
    """A host's client-certificate authentication (``client_auth:``, mTLS).

    ``ca`` is a PEM file of the CA certificates client certificates must chain
    to; ``crl`` an optional PEM file of CRLs checked for the client certificate;
    ``subject_header`` and ``fingerprint_header`` optional request headers that
    carry the verified certificate's RFC 4514 subject and SHA-256 fingerprint
    (hex) to the backend, besides RFC 9440 ``Client-Cert``/``Client-Cert-Chain``
    (see `tlsproxy.clientauth`).  ``path`` is the key path used in messages.
    """

    ca: str
    mode: str = "required"
    crl: str | None = None
    subject_header: str | None = None
    fingerprint_header: str | None = None
    path: str = ""


#: The ``proxy:`` keys: engine limits and deadlines (`tlsproxy.proxy.ProxySettings`
#: fields of the same names, which hold the defaults).  Each maps to its kind:
#: ``seconds`` (a number > 0), ``bytes`` (a whole number or a string with a
#: ``K``/``M``/``G`` suffix, powers of 1024), ``count`` (a whole number > 0).
PROXY_KEYS: dict[str, str] = {
    "client_header_timeout": "seconds",
    "client_body_timeout": "seconds",
    "keepalive_timeout": "seconds",
    "client_send_timeout": "seconds",
    "max_request_line": "bytes",
    "max_header_bytes": "bytes",
    "max_header_count": "count",
    "max_body_bytes": "bytes",
    "backend_connect_timeout": "seconds",
    "backend_read_timeout": "seconds",
    "backend_idle_timeout": "seconds",
    "backend_max_idle": "count",
    "max_response_header_bytes": "bytes",
    "sweep_interval": "seconds",
}


@attrs.frozen
class HostConfig:
    """One site: its canonical name, other names, certificates and backend.

    ``name`` and ``aliases`` are normalised (lower case, A-labels, no final
    dot); aliases may be ``*.example.com`` wildcards.  ``hsts``, ``hpkp``,
    ``redirect``, ``headers`` and ``webroot`` are its port-80 and response-header
    settings (see `tlsproxy.plain` and `tlsproxy.headers`).
    """

    name: str
    aliases: tuple[str, ...]
    certificates: tuple[CertificateSource, ...]
    backend: Backend
    hsts: HSTSSettings = HSTSSettings()
    hpkp: HPKPSettings | None = None
    redirect: RedirectSettings = RedirectSettings()
    headers: ExtraHeaders = ExtraHeaders()
    webroot: str | None = None
    #: Path-prefix routes, longest prefix first (see `PathRoute`); paths that
    #: match none go to ``backend``.
    routes: tuple[PathRoute, ...] = ()
    #: Send the client's ``Host`` to the backend (True) or the backend's own
    #: ``host:port`` (False; ``X-Forwarded-Host`` still carries the original).
    preserve_host: bool = True
    #: Obtain and renew the certificate through the built-in ACME client
    #: (`tlsproxy.acme`); ``certificates`` may then be empty.
    acme: bool = False
    #: Client-certificate authentication (mTLS), or None: no certificate asked for.
    client_auth: ClientAuth | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases."""
        return (self.name, *self.aliases)


@attrs.frozen
class AccessLogSettings:
    """``access_log:``: one line per request to ``path`` (``-``: standard output)."""

    path: str
    #: ``combined`` (nginx's) or ``json``.
    format: str = "combined"


@attrs.frozen
class MetricsSettings:
    """``metrics:``: a Prometheus endpoint on its own listener (an endpoint string)."""

    listen: str


@attrs.frozen
class Config:
    """A whole validated configuration; ``source`` names the file it came from."""

    source: str
    listen: Listen
    tls: TLSSettings
    default_host: str
    hosts: tuple[HostConfig, ...]
    acme: AcmeSettings = AcmeSettings()
    #: The ``proxy:`` values given, by `PROXY_KEYS` name (``max_body_bytes``
    #: may be None: unlimited); absent keys keep the engine's defaults.
    proxy: tuple[tuple[str, float | int | None], ...] = ()
    #: Seconds between checks of the config and certificate files for changes
    #: (then reloaded as on SIGHUP); 0 turns the watch off.
    watch_interval: float = 0
    #: ``access_log:``, ``metrics:`` (None: off).
    access_log: AccessLogSettings | None = None
    metrics: MetricsSettings | None = None
    #: Seconds in-flight requests get to finish after SIGTERM.
    drain_timeout: float = 10.0
    #: Worker processes serving the listeners (1: one process, no supervisor;
    #: see `tlsproxy.supervisor`).
    workers: int = 1

    def host(self, name: str) -> HostConfig:
        """The host whose canonical name is ``name``.

        :raises KeyError: if there is none.
        """
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


#: The settings a reload leaves alone: they change at the next restart.
RESTART_SETTINGS = ("listen", "proxy", "access_log", "metrics", "workers")


def with_restart_settings(config: Config, started: Config) -> Config:
    """``config`` with the `RESTART_SETTINGS` of ``started`` (what the process
    started with): what a process built after reloads must serve, as the others
    do that only reloaded."""
    return attrs.evolve(config, **{name: getattr(started, name) for name in RESTART_SETTINGS})


class _Checker:
    """Collects problems while walking the document; helpers return None on error."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def mapping(
        self, value: object, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error(
                    _join(path, str(key)),
                    f"unknown key; allowed keys are: {', '.join(allowed)}",
                )
        for key in required:
            if key not in value:
                self.error(_join(path, key), "is required")
        return value

    def string(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {_kind(value)}")
            return None
        if not value.strip():
            self.error(path, "must not be empty")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, not {_kind(value)}")
            return None
        return value

    def choice(self, value: object, path: str, choices: Sequence[str]) -> str | None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `min_version: 1.2` is a float in YAML
        if value not in choices:
            self.error(path, f"must be one of {', '.join(choices)}, not {value!r}")
            return None
        assert isinstance(value, str)
        return value

    def items(
        self, value: object, path: str, item: Callable[[object, str], T | None]
    ) -> tuple[T, ...] | None:
        """A list (a single item is accepted as a list of one) of checked items."""
        if isinstance(value, str | Mapping):
            value = [value]
        if not isinstance(value, list):
            self.error(path, f"must be a list, not {_kind(value)}")
            return None
        out = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if any(v is None for v in out):
            return None
        return tuple(v for v in out if v is not None)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    kinds |= {int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TOP_KEYS = (
    "listen",
    "tls",
    "default_host",
    "hosts",
    "acme",
    "proxy",
    "watch_interval",
    "access_log",
    "metrics",
    "drain_timeout",
    "workers",
)
_LISTEN_KEYS = ("https", "http")
_TLS_KEYS = (
    "profile",
    "min_version",
    "ciphers",
    "ciphersuites",
    "groups",
    "dhparam",
    "session_tickets",
    "session_ticket_rotation",
)
_HOST_KEYS = (
    "aliases",
    "certificates",
    "backend",
    "hsts",
    "hpkp",
    "redirect",
    "insecure_plain_http",
    "headers",
    "webroot",
    "routes",
    "preserve_host",
    "acme",
    "client_auth",
    "backend_tls",
)
_CERT_KEYS = ("key", "cert", "chain")


def _parse_listen(c: _Checker, value: object) -> Listen:
    doc = c.mapping(value, "listen", _LISTEN_KEYS)
    if doc is None:
        return Listen()
    https = c.items(doc.get("https", []), "listen.https", c.string)
    http = c.items(doc.get("http", []), "listen.http", c.string)
    if https == () and http == ():
        c.error("listen", "must name at least one https or http endpoint")
    return Listen(https=https or (), http=http or ())


def _parse_tls(c: _Checker, value: object) -> TLSSettings:
    doc = c.mapping(value, "tls", _TLS_KEYS)
    if doc is None:
        return TLSSettings()
    kwargs: dict[str, Any] = {}
    if "profile" in doc:
        kwargs["profile"] = c.choice(doc["profile"], "tls.profile", PROFILES)
    if "min_version" in doc:
        kwargs["min_version"] = c.choice(doc["min_version"], "tls.min_version", TLS_VERSIONS)
    for key in ("ciphers", "ciphersuites", "dhparam"):
        if key in doc:
            kwargs[key] = c.string(doc[key], f"tls.{key}")
    if "groups" in doc:
        groups = doc["groups"]
        if isinstance(groups, str):
            groups = [g for g in groups.split(":") if g]
        kwargs["groups"] = c.items(groups, "tls.groups", c.string)
        if kwargs["groups"] == ():
            c.error("tls.groups", "must name at least one group")
    if "session_tickets" in doc:
        kwargs["session_tickets"] = c.boolean(doc["session_tickets"], "tls.session_tickets")
    if "session_ticket_rotation" in doc:
        value = doc["session_ticket_rotation"]
        low, high = SESSION_TICKET_ROTATION_RANGE
        if not _finite_seconds(value) or not low <= value <= high:
            c.error(
                "tls.session_ticket_rotation",
                f"must be a number of seconds from {low} to {high}, not {value!r}",
            )
        else:
            kwargs["session_ticket_rotation"] = float(value)
    return TLSSettings(**{k: v for k, v in kwargs.items() if v is not None})


def _parse_certificate(c: _Checker, value: object, path: str) -> CertificateSource | None:
    if isinstance(value, str):
        if not value.strip():
            c.error(path, "must be a file path")
            return None
        return CertificateSource(key=value, cert=value, chain=None, path=path)
    doc = c.mapping(value, path, _CERT_KEYS, required=("cert",))
    if doc is None or "cert" not in doc:
        return None
    cert = c.string(doc["cert"], _join(path, "cert"))
    key = c.string(doc["key"], _join(path, "key")) if "key" in doc else cert
    chain = c.string(doc["chain"], _join(path, "chain")) if "chain" in doc else None
    if cert is None or key is None or ("chain" in doc and chain is None):
        return None
    return CertificateSource(key=key, cert=cert, chain=chain, path=path)


def _parse_backend(c: _Checker, value: object, path: str) -> Backend | None:
    text = c.string(value, path)
    if text is None:
        return None
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        c.error(path, f"is not a valid URL ({exc})")
        return None
    if url.scheme not in ("http", "https"):
        c.error(
            path,
            f"must be an http:// or https:// URL such as http://127.0.0.1:8000, not {text!r}",
        )
        return None
    if not url.hostname:
        c.error(path, "must name a host, as in http://127.0.0.1:8000")
        return None
    if url.path not in ("", "/") or url.query or url.fragment or "@" in url.netloc:
        c.error(path, "must be scheme://host:port only (no path, query or credentials)")
        return None
    if port == 0:
        c.error(path, "must have a port from 1 to 65535, not 0")
        return None
    if not _backend_host_ok(url.hostname):
        c.error(path, f"{url.hostname!r} is not a host name or IP address")
        return None
    default_port = 80 if url.scheme == "http" else 443
    return Backend(
        scheme=url.scheme, host=url.hostname, port=default_port if port is None else port
    )


def _parse_host(
    c: _Checker, name: str, value: object, path: str, claims: list[tuple[str, str]]
) -> HostConfig | None:
    """Check one site; append ``(alias, key path)`` to ``claims`` for each valid alias."""
    acme_flag = isinstance(value, Mapping) and value.get("acme") is True
    required = ("backend",) if acme_flag else ("certificates", "backend")
    doc = c.mapping(value, path, _HOST_KEYS, required=required)
    if doc is None:
        return None
    aliases: list[str] = []
    raw_aliases = doc.get("aliases", [])
    if isinstance(raw_aliases, str):
        raw_aliases = [raw_aliases]
    if not isinstance(raw_aliases, list):
        c.error(_join(path, "aliases"), f"must be a list, not {_kind(raw_aliases)}")
        raw_aliases = []
    for i, alias in enumerate(raw_aliases):
        apath = f"{path}.aliases[{i}]"
        if not isinstance(alias, str):
            c.error(apath, f"must be a host name, not {_kind(alias)}")
            continue
        try:
            aliases.append(normalize_pattern(alias))
        except InvalidHostname as exc:
            c.error(apath, str(exc))
        else:
            claims.append((aliases[-1], apath))
    certificates = None
    if "certificates" in doc:
        cpath = _join(path, "certificates")
        certificates = c.items(doc["certificates"], cpath, lambda v, p: _parse_certificate(c, v, p))
        if certificates == ():
            c.error(cpath, "must list at least one certificate")
            certificates = None
    backend = (
        _parse_backend(c, doc["backend"], _join(path, "backend")) if "backend" in doc else None
    )
    policy = _parse_site_policy(c, doc, path)
    routes = _parse_routes(c, doc["routes"], _join(path, "routes")) if "routes" in doc else ()
    if "preserve_host" in doc:
        preserve = c.boolean(doc["preserve_host"], _join(path, "preserve_host"))
        if preserve is not None:
            policy["preserve_host"] = preserve
    if "acme" in doc:
        acme = c.boolean(doc["acme"], _join(path, "acme"))
        if acme:
            policy["acme"] = True
            certificates = certificates or ()
            for alias in aliases:
                if alias.startswith("*."):
                    c.error(
                        _join(path, "acme"),
                        f"the alias {alias} is a wildcard, which needs a dns-01 challenge; "
                        f"tlsproxy answers http-01 and tls-alpn-01 only",
                    )
    if "client_auth" in doc:
        client_auth = _parse_client_auth(c, doc["client_auth"], _join(path, "client_auth"))
        if client_auth is not None:
            policy["client_auth"] = client_auth
        if doc.get("insecure_plain_http") is True:
            c.error(
                _join(path, "client_auth"),
                "a host with client certificates cannot also be served over plain HTTP "
                "(insecure_plain_http), which would bypass them",
            )
    if "backend_tls" in doc:
        tpath = _join(path, "backend_tls")
        tls = _parse_backend_tls(c, doc["backend_tls"], tpath)
        backends = [b for b in (backend, *(r.backend for r in routes or ())) if b is not None]
        if not any(b.scheme == "https" for b in backends):
            c.error(tpath, "applies to https:// backends, and this host has none")
        elif tls is not None and routes is not None and backend is not None:
            if backend.scheme == "https":
                backend = attrs.evolve(backend, tls=tls)
            routes = tuple(
                attrs.evolve(r, backend=attrs.evolve(r.backend, tls=tls))
                if r.backend.scheme == "https"
                else r
                for r in routes
            )
    if certificates is None or backend is None or routes is None:
        return None
    return HostConfig(
        name=name,
        aliases=tuple(aliases),
        certificates=certificates,
        backend=backend,
        routes=routes,
        **policy,
    )


_BACKEND_TLS_KEYS = ("ca", "cert", "key", "insecure_skip_verify")


def _parse_backend_tls(c: _Checker, value: object, path: str) -> BackendTLS | None:
    doc = c.mapping(value, path, _BACKEND_TLS_KEYS)
    if doc is None:
        return None
    ok = True
    files: dict[str, str | None] = {}
    for key in ("ca", "cert", "key"):
        if key in doc:
            files[key] = c.string(doc[key], _join(path, key))
            ok = ok and files[key] is not None
    if ("cert" in doc) != ("key" in doc):
        c.error(path, "cert and key go together: give both or neither")
        ok = False
    insecure = False
    if "insecure_skip_verify" in doc:
        flag = c.boolean(doc["insecure_skip_verify"], _join(path, "insecure_skip_verify"))
        ok = ok and flag is not None
        insecure = bool(flag)
        if insecure and "ca" in doc:
            c.error(path, "ca has no effect with insecure_skip_verify: true; remove one")
            ok = False
    if not ok:
        return None
    return BackendTLS(insecure_skip_verify=insecure, path=path, **files)


_CLIENT_AUTH_KEYS = ("ca", "mode", "crl", "subject_header", "fingerprint_header")
#: Request headers ``client_auth.subject_header`` may not name (the proxy's own).
_RESERVED_REQUEST_HEADERS = ("host", "client-cert", "client-cert-chain", "forwarded")


def _parse_client_auth(c: _Checker, value: object, path: str) -> ClientAuth | None:
    doc = c.mapping(value, path, _CLIENT_AUTH_KEYS, required=("ca",))
    if doc is None or "ca" not in doc:
        return None
    ca = c.string(doc["ca"], _join(path, "ca"))
    mode = c.choice(doc["mode"], _join(path, "mode"), CLIENT_AUTH_MODES) if "mode" in doc else None
    crl = c.string(doc["crl"], _join(path, "crl")) if "crl" in doc else None
    headers: dict[str, str | None] = {}
    ok = True
    for key in ("subject_header", "fingerprint_header"):
        if key not in doc:
            continue
        hpath = _join(path, key)
        header = _header_name(c, doc[key], hpath)
        if header is not None and (
            header.lower() in _RESERVED_REQUEST_HEADERS
            or header.lower().startswith("x-forwarded-")
            or "_" in header
        ):
            c.error(hpath, f"{header} is a header the proxy manages; choose another name")
            header = None
        if header is not None and header.lower() in {
            h.lower() for h in headers.values() if h is not None
        }:
            c.error(hpath, f"{header} is already the other header's name")
            header = None
        ok = ok and header is not None
        headers[key] = header
    if not ok or ca is None or ("mode" in doc and mode is None) or ("crl" in doc and crl is None):
        return None
    return ClientAuth(ca=ca, mode=mode or "required", crl=crl, path=path, **headers)


_ROUTE_KEYS = ("path", "backend")
# A path prefix: "/" then path characters (RFC 3986 pchar and "/"), no query or fragment.
_ROUTE_PATH = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$")


def _parse_routes(c: _Checker, value: object, path: str) -> tuple[PathRoute, ...] | None:
    """A host's ``routes`` list, longest prefix first; None if any entry is bad."""
    if not isinstance(value, list):
        c.error(path, f"must be a list of {{path, backend}} mappings, not {_kind(value)}")
        return None
    routes: list[PathRoute] = []
    seen: dict[str, str] = {}
    ok = True
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        doc = c.mapping(item, ipath, _ROUTE_KEYS, required=_ROUTE_KEYS)
        if doc is None or "path" not in doc or "backend" not in doc:
            ok = False
            continue
        prefix = c.string(doc["path"], _join(ipath, "path"))
        backend = _parse_backend(c, doc["backend"], _join(ipath, "backend"))
        if prefix is not None and not _ROUTE_PATH.fullmatch(prefix):
            reason = (
                "must start with /"
                if not prefix.startswith("/")
                else "must be a URL path without query, fragment, spaces or control characters"
            )
            c.error(_join(ipath, "path"), f"{reason}, not {prefix!r}")
            prefix = None
        if prefix is not None and prefix in seen:
            c.error(_join(ipath, "path"), f"{prefix} is already routed by {seen[prefix]}")
            prefix = None
        if prefix is None or backend is None:
            ok = False
            continue
        seen[prefix] = ipath
        routes.append(PathRoute(path=prefix, backend=backend))
    if not ok:
        return None
    routes.sort(key=lambda r: len(r.path), reverse=True)
    return tuple(routes)


def _parse_hosts(c: _Checker, value: object) -> tuple[HostConfig, ...]:
    if not isinstance(value, Mapping):
        c.error("hosts", f"must be a mapping of host names to sites, not {_kind(value)}")
        return ()
    if not value:
        c.error("hosts", "must name at least one site")
        return ()
    hosts: list[HostConfig] = []
    seen: dict[str, str] = {}  # normalised pattern -> path that claimed it
    for raw_name, body in value.items():
        path = f"hosts.{raw_name}"
        if not isinstance(raw_name, str):
            c.error(path, f"a site must be named by a host name, not {_kind(raw_name)}")
            continue
        if "*" in str(raw_name):
            c.error(path, "a wildcard cannot name a site; list it under a site's aliases")
            continue
        try:
            name = normalize(str(raw_name))
        except InvalidHostname as exc:
            c.error(path, f"is not a valid host name: {exc}")
            continue
        claims = [(name, path)]
        host = _parse_host(c, name, body, path, claims)
        for pattern, where in claims:
            if pattern in seen:
                c.error(where, f"{pattern} is already used by {seen[pattern]}")
            else:
                seen[pattern] = where
        if host is not None:
            hosts.append(host)
    return tuple(hosts)


# -- port 80 and response headers (issue 4) ---------------------------------------------

_ACME_KEYS = (
    "webroot",
    "directory",
    "email",
    "agree_tos",
    "state_dir",
    "ca_bundle",
    "key_type",
    "challenges",
    "retry_initial",
    "retry_max",
)
_EMAIL = re.compile(r"^[^@\s:]+@[^@\s:]+\.[^@\s:]+$")
_HSTS_KEYS = ("max_age", "include_subdomains", "preload")
_HPKP_KEYS = ("backup_pins", "max_age", "include_subdomains", "report_uri", "report_only")
_REDIRECT_KEYS = ("status", "other_status", "https_port")
_HEADERS_KEYS = ("set", "remove")
_BASE64_PIN = re.compile(r"^(?:pin-sha256:|sha256/)?([A-Za-z0-9+/]{43}=)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?$")
#: Headers that ``headers:`` may not touch: framing and hop-by-hop headers belong
#: to the proxy, HSTS and HPKP to their own keys.
_MANAGED_HEADERS = {
    "connection": "it is a hop-by-hop header managed by the proxy",
    "keep-alive": "it is a hop-by-hop header managed by the proxy",
    "proxy-connection": "it is a hop-by-hop header managed by the proxy",
    "transfer-encoding": "it frames the response and is managed by the proxy",
    "content-length": "it frames the response and is managed by the proxy",
    "te": "it is a hop-by-hop header managed by the proxy",
    "trailer": "it is a hop-by-hop header managed by the proxy",
    "upgrade": "it is a hop-by-hop header managed by the proxy",
    "strict-transport-security": "use the host's hsts key",
    "public-key-pins": "use the host's hpkp key",
    "public-key-pins-report-only": "use the host's hpkp key",
}


def _integer(c: _Checker, value: object, path: str, minimum: int, maximum: int) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        c.error(path, f"must be a whole number, not {_kind(value)}")
        return None
    if not minimum <= value <= maximum:
        c.error(path, f"must be from {minimum} to {maximum}, not {value}")
        return None
    return value


def _parse_acme(c: _Checker, value: object) -> AcmeSettings:
    doc = c.mapping(value, "acme", _ACME_KEYS)
    if doc is None:
        return AcmeSettings()
    webroot = c.string(doc["webroot"], "acme.webroot") if "webroot" in doc else None
    values: dict[str, Any] = {}
    if "directory" in doc:
        raw = c.string(doc["directory"], "acme.directory")
        if raw is not None:
            url = ACME_DIRECTORIES.get(raw, raw)
            parsed = urlsplit(url)
            if parsed.scheme != "https" or not parsed.hostname:
                c.error(
                    "acme.directory",
                    f"must be an https:// URL or one of {', '.join(ACME_DIRECTORIES)}, not {raw!r}",
                )
            else:
                values["directory"] = url
    if "email" in doc:
        email = c.string(doc["email"], "acme.email")
        if email is not None and not _EMAIL.match(email):
            c.error("acme.email", f"must be an e-mail address, not {email!r}")
        elif email is not None:
            values["email"] = email
    if "agree_tos" in doc:
        agree = c.boolean(doc["agree_tos"], "acme.agree_tos")
        if agree is not None:
            values["agree_tos"] = agree
    for key in ("state_dir", "ca_bundle"):
        if key in doc:
            text = c.string(doc[key], f"acme.{key}")
            if text is not None:
                values[key] = text
    if "key_type" in doc:
        key_type = c.choice(doc["key_type"], "acme.key_type", ACME_KEY_TYPES)
        if key_type is not None:
            values["key_type"] = key_type
    if "challenges" in doc:
        kinds = c.items(
            doc["challenges"],
            "acme.challenges",
            lambda v, p: c.choice(v, p, ACME_CHALLENGES),
        )
        if kinds == ():
            c.error("acme.challenges", f"must list at least one of {', '.join(ACME_CHALLENGES)}")
        elif kinds is not None:
            values["challenges"] = tuple(dict.fromkeys(kinds))
    for key, low, high in (("retry_initial", 1, 86400), ("retry_max", 1, 7 * 86400)):
        if key in doc:
            number = doc[key]
            if not isinstance(number, int | float) or isinstance(number, bool):
                c.error(f"acme.{key}", f"must be a number of seconds, not {_kind(number)}")
            elif not low <= number <= high:
                c.error(f"acme.{key}", f"must be from {low} to {high} seconds, not {number}")
            else:
                values[key] = float(number)
    if values.get("retry_initial", 60.0) > values.get("retry_max", 6 * 3600.0):
        c.error("acme.retry_initial", "must not be greater than acme.retry_max")
    return AcmeSettings(webroot=webroot, **values)


def _check_acme_hosts(
    c: _Checker, acme: AcmeSettings, hosts: Sequence[HostConfig], listen: Listen
) -> None:
    """Hosts with ``acme: true`` need the terms agreed to, a state directory and
    a listener for one of the challenges."""
    managed = [h.name for h in hosts if h.acme]
    if not managed:
        return
    if not listen.http and acme.challenges == ("http-01",):
        c.error(
            "acme.challenges",
            "http-01 needs a port-80 listener (listen.http); add one or allow tls-alpn-01",
        )
    if not acme.agree_tos:
        c.error(
            "acme.agree_tos",
            f"must be true to obtain certificates for {', '.join(managed)} (it agrees to "
            f"the terms of service of {acme.directory})",
        )
    if acme.state_dir is None:
        c.error(
            "acme.state_dir",
            f"is required for {', '.join(managed)}: the directory where the ACME account "
            f"and certificates are kept (for example /var/lib/tlsproxy/acme)",
        )


def _parse_hsts(c: _Checker, value: object, path: str) -> HSTSSettings:
    if isinstance(value, bool):
        return HSTSSettings(enabled=value)
    doc = c.mapping(value, path, _HSTS_KEYS)
    if doc is None:
        return HSTSSettings()
    kwargs: dict[str, Any] = {}
    if "max_age" in doc:
        kwargs["max_age"] = _integer(c, doc["max_age"], _join(path, "max_age"), 0, 2**31 - 1)
    for key in ("include_subdomains", "preload"):
        if key in doc:
            kwargs[key] = c.boolean(doc[key], _join(path, key))
    settings = HSTSSettings(**{k: v for k, v in kwargs.items() if v is not None})
    if settings.preload and "max_age" in doc and kwargs.get("max_age") is None:
        return settings  # the max_age problem is reported already
    if settings.preload and (
        settings.max_age < HSTS_PRELOAD_MIN_MAX_AGE or not settings.include_subdomains
    ):
        c.error(
            _join(path, "preload"),
            f"preload needs max_age of at least {HSTS_PRELOAD_MIN_MAX_AGE} (one year) and "
            f"include_subdomains: true (the browsers' preload list requires both); "
            f"this host has max_age {settings.max_age} and include_subdomains "
            f"{str(settings.include_subdomains).lower()}",
        )
    return settings


def _parse_backup_pin(c: _Checker, value: object, path: str) -> BackupPin | None:
    text = c.string(value, path)
    if text is None:
        return None
    match = _BASE64_PIN.match(text.strip())
    if match:
        return BackupPin(pin=match.group(1), file=None, path=path)
    if len(text) < 60 and re.fullmatch(r"[A-Za-z0-9+/=]{20,}", text.strip()):
        c.error(path, "looks like a pin but is not a base64 SHA-256 (44 characters ending in =)")
        return None
    return BackupPin(pin=None, file=text, path=path)


def _parse_hpkp(c: _Checker, value: object, path: str) -> HPKPSettings | None:
    if value is False:
        return None
    doc = c.mapping(value, path, _HPKP_KEYS, required=("backup_pins",))
    if doc is None or "backup_pins" not in doc:
        return None
    bpath = _join(path, "backup_pins")
    pins = c.items(doc["backup_pins"], bpath, lambda v, p: _parse_backup_pin(c, v, p))
    if pins == ():
        c.error(bpath, "must list at least one backup pin (a key, CSR or certificate file)")
        pins = None
    kwargs: dict[str, Any] = {}
    if "max_age" in doc:
        kwargs["max_age"] = _integer(c, doc["max_age"], _join(path, "max_age"), 0, 2**31 - 1)
    for key in ("include_subdomains", "report_only"):
        if key in doc:
            kwargs[key] = c.boolean(doc[key], _join(path, key))
    if "report_uri" in doc:
        upath = _join(path, "report_uri")
        uri = c.string(doc["report_uri"], upath)
        if uri is not None:
            parts = urlsplit(uri)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                c.error(upath, f"must be an absolute http(s) URL, not {uri!r}")
            elif not re.fullmatch(r"[\x21-\x7e]+", uri) or '"' in uri or "\\" in uri:
                c.error(upath, "must not contain spaces, quotes, backslashes or control characters")
            else:
                kwargs["report_uri"] = uri
    if pins is None:
        return None
    return HPKPSettings(backup_pins=pins, **{k: v for k, v in kwargs.items() if v is not None})


def _parse_redirect(c: _Checker, value: object, path: str) -> RedirectSettings:
    if value is True:
        return RedirectSettings()
    if value is False:
        c.error(
            path,
            "to send this host's plain-HTTP requests to its backend unencrypted instead of "
            "redirecting them, set insecure_plain_http: true (it is insecure)",
        )
        return RedirectSettings()
    doc = c.mapping(value, path, _REDIRECT_KEYS)
    if doc is None:
        return RedirectSettings()
    kwargs: dict[str, Any] = {}
    for key, allowed in (("status", REDIRECT_STATUSES), ("other_status", REDIRECT_OTHER_STATUSES)):
        if key in doc:
            if doc[key] in allowed and not isinstance(doc[key], bool):
                kwargs[key] = doc[key]
            else:
                c.error(
                    _join(path, key),
                    f"must be one of {', '.join(map(str, allowed))}, not {doc[key]!r}",
                )
    if "https_port" in doc:
        kwargs["https_port"] = _integer(c, doc["https_port"], _join(path, "https_port"), 1, 65535)
    return RedirectSettings(**{k: v for k, v in kwargs.items() if v is not None})


def _header_name(c: _Checker, value: object, path: str) -> str | None:
    name = c.string(value, path)
    if name is None:
        return None
    if not _HEADER_NAME.match(name):
        c.error(path, f"{name!r} is not a valid header name")
        return None
    if name.lower() in _MANAGED_HEADERS:
        c.error(path, f"cannot set or remove {name}: {_MANAGED_HEADERS[name.lower()]}")
        return None
    return name


def _parse_headers(c: _Checker, value: object, path: str) -> ExtraHeaders:
    doc = c.mapping(value, path, _HEADERS_KEYS)
    if doc is None:
        return ExtraHeaders()
    seen: dict[str, str] = {}  # lower-case name -> key path that named it
    set_: list[tuple[str, str]] = []
    if "set" in doc:
        spath = _join(path, "set")
        raw = doc["set"]
        if not isinstance(raw, Mapping):
            c.error(spath, f"must be a mapping of header names to values, not {_kind(raw)}")
            raw = {}
        for raw_name, raw_value in raw.items():
            hpath = _join(spath, str(raw_name))
            name = _header_name(c, raw_name, hpath)
            text = c.string(raw_value, hpath)
            if text is not None and not _HEADER_VALUE.match(text):
                c.error(hpath, "the value must be printable ASCII without line breaks")
                text = None
            if name is None or text is None:
                continue
            if name.lower() in seen:
                c.error(hpath, f"{name} is already named at {seen[name.lower()]}")
                continue
            seen[name.lower()] = hpath
            set_.append((name, text))
    remove: list[str] = []
    if "remove" in doc:
        rpath = _join(path, "remove")
        names = c.items(doc["remove"], rpath, lambda v, p: _header_name(c, v, p)) or ()
        for i, name in enumerate(names):
            if name.lower() in seen:
                c.error(f"{rpath}[{i}]", f"{name} is already named at {seen[name.lower()]}")
                continue
            seen[name.lower()] = f"{rpath}[{i}]"
            remove.append(name)
    return ExtraHeaders(set=tuple(set_), remove=tuple(remove))


def _parse_site_policy(c: _Checker, doc: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The issue-4 keys of one host, as `HostConfig` keyword arguments."""
    out: dict[str, Any] = {}
    if "hsts" in doc:
        out["hsts"] = _parse_hsts(c, doc["hsts"], _join(path, "hsts"))
    if "hpkp" in doc:
        out["hpkp"] = _parse_hpkp(c, doc["hpkp"], _join(path, "hpkp"))
    if "redirect" in doc:
        out["redirect"] = _parse_redirect(c, doc["redirect"], _join(path, "redirect"))
    if "insecure_plain_http" in doc:
        key = _join(path, "insecure_plain_http")
        if c.boolean(doc["insecure_plain_http"], key) and "redirect" in doc:
            c.error(key, "a host proxied over plain HTTP has no redirect; remove redirect")
        elif doc["insecure_plain_http"] is True:
            out["redirect"] = RedirectSettings(enabled=False)
    if "headers" in doc:
        out["headers"] = _parse_headers(c, doc["headers"], _join(path, "headers"))
    if "webroot" in doc:
        out["webroot"] = c.string(doc["webroot"], _join(path, "webroot"))
    return out


def _backend_host_ok(host: str) -> bool:
    """Whether a backend URL's host is an IP address or a valid DNS name."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            normalize(host)
        except InvalidHostname:
            return False
    return True


def _finite_seconds(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite, non-negative number (YAML's .nan and .inf are not)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def parse_config(document: object, source: str) -> Config:
    """Validate a decoded YAML document into a `Config`.

    :param source: the file name used in messages.
    :raises ConfigError: listing every problem found.
    """
    if document is None:
        raise ConfigError(source, [Problem("", "is empty; it needs at least listen and hosts")])
    c = _Checker()
    doc = c.mapping(document, "", _TOP_KEYS, required=("hosts",))
    if doc is None:
        raise ConfigError(source, c.problems)
    if "listen" in doc:
        listen = _parse_listen(c, doc["listen"])
    else:
        listen = Listen()
        c.error("listen", "is required (for example https: ['tcp:443'])")
    tls = _parse_tls(c, doc.get("tls", {}))
    acme = _parse_acme(c, doc["acme"]) if "acme" in doc else AcmeSettings()
    hosts = _parse_hosts(c, doc["hosts"]) if "hosts" in doc else ()
    proxy = _parse_proxy(c, doc["proxy"]) if "proxy" in doc else ()
    watch_interval: float = 0
    if "watch_interval" in doc:
        value = doc["watch_interval"]
        if not _finite_seconds(value):
            c.error("watch_interval", f"must be a number of seconds (0: off), not {value!r}")
        else:
            watch_interval = value
    access_log = _parse_access_log(c, doc["access_log"]) if "access_log" in doc else None
    metrics = _parse_metrics(c, doc["metrics"]) if "metrics" in doc else None
    drain_timeout = 10.0
    if "drain_timeout" in doc:
        value = doc["drain_timeout"]
        if not _finite_seconds(value):
            c.error("drain_timeout", f"must be a number of seconds (0: none), not {value!r}")
        else:
            drain_timeout = float(value)
    workers = _parse_workers(c, doc.get("workers", DEFAULT_WORKERS))
    _check_worker_listeners(c, listen, workers)
    _check_acme_hosts(c, acme, hosts, listen)
    default_host = hosts[0].name if hosts else ""
    if "default_host" in doc:
        raw = c.string(doc["default_host"], "default_host")
        if raw is not None:
            try:
                wanted = normalize(raw)
            except InvalidHostname as exc:
                c.error("default_host", str(exc))
            else:
                if wanted in {h.name for h in hosts}:
                    default_host = wanted
                elif not any(p.path.split(".")[0] == "hosts" for p in c.problems):
                    c.error("default_host", f"{raw!r} is not one of the names under hosts")
    if c.problems:
        # The sites that did validate, so that their certificates can still be
        # checked and reported in the same run.
        partial = Config(
            source=source, listen=listen, tls=TLSSettings(), default_host="", hosts=hosts
        )
        raise ConfigError(source, c.problems, partial=partial)
    return Config(
        source=source,
        listen=listen,
        tls=tls,
        default_host=default_host,
        hosts=hosts,
        acme=acme,
        proxy=proxy,
        watch_interval=watch_interval,
        access_log=access_log,
        metrics=metrics,
        drain_timeout=drain_timeout,
        workers=workers,
    )


#: ``workers:`` when the file has none.
DEFAULT_WORKERS: int | str = 1
#: The most ``workers:`` accepted: beyond it a typo (``workers: 400``) is likelier than a machine.
MAX_WORKERS = 64


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, as ``nproc`` counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _parse_workers(c: _Checker, value: object) -> int:
    """``workers: N`` (1-64) or ``workers: auto`` (one per available core)."""
    if value == "auto":
        return min(available_cores(), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        c.error(
            "workers",
            f"must be a whole number from 1 to {MAX_WORKERS}, or auto (one per core), "
            f"not {value!r}",
        )
        return 1
    return value


#: Endpoint types whose listening socket workers can share (the supervisor hands them
#: the bare socket, so an endpoint that wraps the connections, like ``haproxy:``, cannot be).
WORKER_ENDPOINTS = ("tcp", "tcp6", "unix", "systemd")


def _check_worker_listeners(c: _Checker, listen: Listen, workers: int) -> None:
    """With ``workers`` above 1 every listener must be a plain socket the workers share."""
    if workers <= 1:
        return
    for kind, strings in (("https", listen.https), ("http", listen.http)):
        for i, text in enumerate(strings):
            endpoint = text.split(":", 1)[0].strip().lower()
            if endpoint in WORKER_ENDPOINTS or endpoint in ("ssl", "tls"):
                continue  # ssl:/tls: are refused for every worker count, when parsed
            c.error(
                f"listen.{kind}[{i}]",
                f"{endpoint}: endpoints cannot be shared by workers (workers: {workers}); "
                f"with workers above 1 use {', '.join(e + ':' for e in WORKER_ENDPOINTS)} "
                f"endpoints, or workers: 1",
            )


def _parse_access_log(c: _Checker, value: object) -> AccessLogSettings | None:
    doc = c.mapping(value, "access_log", ("path", "format"), required=("path",))
    if doc is None or "path" not in doc:
        return None
    path = c.string(doc["path"], "access_log.path")
    fmt = c.choice(doc.get("format", "combined"), "access_log.format", ("combined", "json"))
    if path is None or fmt is None:
        return None
    return AccessLogSettings(path=path, format=fmt)


def _parse_metrics(c: _Checker, value: object) -> MetricsSettings | None:
    doc = c.mapping(value, "metrics", ("listen",), required=("listen",))
    if doc is None or "listen" not in doc:
        return None
    listen = c.string(doc["listen"], "metrics.listen")
    return MetricsSettings(listen=listen) if listen is not None else None


_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
#: Largest value accepted for any ``proxy:`` time (a day) and size (1 TiB).
_MAX_SECONDS = 86400
_MAX_SIZE = 1024**4


def _parse_proxy(c: _Checker, value: object) -> tuple[tuple[str, float | int | None], ...]:
    """The ``proxy:`` section: engine limits and deadlines (see `PROXY_KEYS`)."""
    doc = c.mapping(value, "proxy", tuple(PROXY_KEYS))
    if doc is None:
        return ()
    out: list[tuple[str, float | int | None]] = []
    for key, raw in doc.items():
        kind = PROXY_KEYS.get(key)
        path = f"proxy.{key}"
        if kind is None:
            continue  # reported by mapping()
        parsed: float | int | None
        if kind == "seconds":
            if not isinstance(raw, int | float) or isinstance(raw, bool):
                c.error(path, f"must be a number of seconds, not {_kind(raw)}")
                continue
            if not 0 < raw <= _MAX_SECONDS:
                c.error(path, f"must be more than 0 and at most {_MAX_SECONDS} seconds, not {raw}")
                continue
            parsed = float(raw)
        elif kind == "count":
            count = _integer(c, raw, path, 1, 1_000_000)
            if count is None:
                continue
            parsed = count
        else:
            if key == "max_body_bytes" and raw == "unlimited":
                out.append((key, None))
                continue
            size = _size(raw)
            if size is None or not 0 < size <= _MAX_SIZE:
                hint = " or unlimited" if key == "max_body_bytes" else ""
                c.error(
                    path,
                    f"must be a size above 0 such as 16384, 64K, 100M or 1G{hint}, not {raw!r}",
                )
                continue
            parsed = size
        out.append((key, parsed))
    return tuple(out)


def _size(value: object) -> int | None:
    """A size in bytes: a whole number, or a string such as ``64K``, ``100M``, ``1G``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is not None:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of keeping the last one."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Report PyYAML's own crashes on bad tagged values (``!!int abc``) with a mark."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, LookupError, AttributeError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                problem=f"not a valid {tag} value", problem_mark=node.start_mark
            ) from None


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`; construct_mapping merges it, later keys win
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.MarkedYAMLError(
                problem=f"a key must be a plain value, not {_kind(key)}",
                problem_mark=key_node.start_mark,
            )
        if key in seen:
            mark = key_node.start_mark
            raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Config:
    """Validate YAML text into a `Config`.

    :raises ConfigError: for YAML syntax errors (with line and column) or any
        schema problem.
    """
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(source, [Problem("", f"{where}: {exc.problem}")]) from None
    except yaml.reader.ReaderError as exc:  # its str() spans two lines and has no line number
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        reason = f"line {line}, column {column}: unacceptable character #x{exc.character:04x}"
        raise ConfigError(source, [Problem("", f"{reason}: {exc.reason}")]) from None
    except RecursionError:
        raise ConfigError(source, [Problem("", "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [Problem("", f"not valid YAML: {exc}")]) from None
    return parse_config(document, source)


def load_config(path: str) -> Config:
    """Read and validate the configuration file at ``path``.

    :raises ConfigError: if the file cannot be read or is not a valid configuration.
    """
    return parse_yaml(read_config_text(path), path)


def read_config_text(path: str) -> str:
    """The text of the configuration file at ``path`` (not yet validated).

    :raises ConfigError: if the file cannot be read as UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read the file: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, [Problem("", "is not UTF-8 text")]) from None
