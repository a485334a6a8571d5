"""Wiring: a validated `Config` in, a twistd `MultiService` out, and reloads.

`prepare` runs every check that needs more than the config text (certificate
files, OpenSSL's view of the TLS settings, header policies) and builds what a
configuration serves: TLS contexts per host, the router with its header
policies, the port-80 resource.  `build_service` binds that to listeners;
`Runtime.reload` (SIGHUP) prepares a new configuration the same way and swaps
it in only if it is sound, so open connections are never dropped and a broken
file never replaces a working one.  This module makes no decisions of its own.
"""

from __future__ import annotations

import datetime
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tlsproxy.acme.store import AcmeStore, acme_certificates, acme_store, temporary_certificate
from tlsproxy.audit import describe, grade_config
from tlsproxy.backendtls import check_backend_tls
from tlsproxy.certs import CertifiedKey, check_certified_key, load_certified_key
from tlsproxy.config import Backend, Config, load_config
from tlsproxy.drain import drain
from tlsproxy.errors import ConfigError, Problem
from tlsproxy.listeners import ListeningService, parse_endpoints
from tlsproxy.pins import build_header_policies
from tlsproxy.plain import (
    ChallengeTokens,
    PlainResource,
    make_plain_site,
    plain_problems,
    plain_resource,
)
from tlsproxy.proxy import ProxyFactory, ProxySettings
from tlsproxy.routing import PlainRouter, Router
from tlsproxy.telemetry import AccessLogWriter
from tlsproxy.tls import (
    ChallengeCertificates,
    ServerContexts,
    SNIConnectionCreator,
    build_server_contexts,
)
from tlsproxy.tlsconn import TLSServerFactory
from tlsproxy.upstream import UpstreamPools
from tlsproxy.watch import FileWatch

if TYPE_CHECKING:
    from tlsproxy.acme.manager import AcmeService
    from tlsproxy.metrics import Metrics

log = Logger()


def load_certificates(
    config: Config, now: datetime.datetime
) -> tuple[dict[str, list[CertifiedKey]], list[Problem]]:
    """Read and check every host's certificates.

    :return: the loaded certificates by host name, and every problem found
        (warnings included; the caller decides what stops start-up).
    """
    loaded: dict[str, list[CertifiedKey]] = {}
    problems: list[Problem] = []
    for host in config.hosts:
        keys = loaded.setdefault(host.name, [])
        if host.acme:
            # Issue 5: the stored ACME certificates, else the configured files,
            # else a temporary self-signed certificate until issuance.
            issued, found = acme_certificates(config, host, now)
            problems += found
            if issued:
                keys += issued
                continue
            if not host.certificates:
                keys.append(temporary_certificate(host, now))
                problems.append(
                    Problem(
                        f"hosts.{host.name}.acme",
                        "no certificate issued yet: serving a temporary self-signed "
                        "certificate until the ACME service obtains one",
                        warning=True,
                    )
                )
                continue
        for source in host.certificates:
            certified, found = load_certified_key(source)
            problems += found
            if certified is None:
                continue
            problems += check_certified_key(certified, host.names, now)
            keys.append(certified)
    return loaded, problems


def proxy_settings(config: Config) -> ProxySettings:
    """The engine's limits and deadlines: its defaults, overridden by ``proxy:``."""
    values: dict[str, Any] = dict(config.proxy)  # names and kinds checked by config
    return ProxySettings(**values)


@attrs.frozen
class Prepared:
    """Everything one configuration serves, checked and built, not yet live.

    ``warnings`` are the problems that do not stop it (logged when applied).
    """

    config: Config
    certificates: dict[str, list[CertifiedKey]]
    contexts: ServerContexts
    router: Router
    plain: PlainResource
    warnings: tuple[Problem, ...]


def prepare(
    config: Config,
    tokens: ChallengeTokens,
    now: datetime.datetime,
    challenges: ChallengeCertificates | None = None,
    certificates: dict[str, list[CertifiedKey]] | None = None,
) -> Prepared:
    """Check ``config`` and its certificates and build what it serves.

    Reads certificate files; binds nothing and changes nothing live.
    ``challenges`` are the tls-alpn-01 answers the contexts consult.
    ``certificates``, if given, are served instead of reading the files: they
    were loaded and checked already (by a worker's supervisor).

    :raises ConfigError: with every error found.
    """
    if certificates is None:
        certificates, problems = load_certificates(config, now)
    else:
        problems = []
    contexts, tls_problems = build_server_contexts(config, certificates, challenges)
    problems += tls_problems + plain_problems(config) + check_backend_tls(config)
    header_policies, header_problems = build_header_policies(config, certificates)
    problems += header_problems
    errors = [p for p in problems if not p.warning]
    if errors or contexts is None:
        raise ConfigError(config.source, errors)
    return Prepared(
        config=config,
        certificates=certificates,
        contexts=contexts,
        router=Router(config, header_policies),
        plain=plain_resource(config, tokens),
        warnings=tuple(problems),
    )


class Runtime:
    """The live configuration, and replacing it without dropping connections.

    New TLS handshakes, new requests and port-80 requests use the newest
    applied configuration; connections already open keep their TLS context
    and finish what they are doing.  Listener endpoints are bound once, so a
    changed ``listen`` section takes effect at the next restart.
    """

    def __init__(
        self,
        prepared: Prepared,
        *,
        creator: SNIConnectionCreator,
        proxy: ProxyFactory,
        plain_site: Any,
        tokens: ChallengeTokens,
        config_path: str | None,
    ) -> None:
        self.current = prepared
        self.creator = creator
        self.proxy = proxy
        self.plain_site = plain_site
        self.tokens = tokens
        self.config_path = config_path
        #: tls-alpn-01 answers of the ACME service, consulted by every context.
        self.challenges = ChallengeCertificates()
        #: The ACME service, when a host has ``acme: true`` (see `tlsproxy.acme`).
        self.acme: AcmeService | None = None
        #: The engine on the plain-HTTP port, and where it reaches the port-80
        #: service (`plain_site`), when there is a ``listen.http``.
        self.plain_proxy: ProxyFactory | None = None
        self.plain_local: Backend | None = None
        #: The problems of the last refused reload, one rendered line each.
        self.refused: list[str] = []
        #: Whether a reload warns about settings that need a restart (a worker
        #: leaves that to its supervisor, which warns once).
        self.warn_restart = True

    def apply(self, prepared: Prepared) -> None:
        """Make ``prepared`` live for every new handshake and request."""
        for warning in prepared.warnings:
            log.warn("{message}", message=warning.render(prepared.config.source))
        self.creator.swap(prepared.contexts)
        self.proxy.pools.reload_tls()
        self.proxy.router = prepared.router
        self.proxy.unrouted_headers = prepared.router.unrouted_headers
        self.plain_site.resource = prepared.plain
        if self.plain_proxy is not None and self.plain_local is not None:
            self.plain_proxy.router = PlainRouter(prepared.config, self.plain_local)
        self.current = prepared

    def reload(self) -> bool:
        """Re-read the configuration file (or, for the demo, the certificates)
        and apply it if it is sound.

        Every problem is logged, and the running configuration is kept, when
        the new one has errors.

        :return: whether the new configuration was applied.
        """
        try:
            config = load_config(self.config_path) if self.config_path else self.current.config
        except ConfigError as exc:
            return self.refuse(exc)
        return self.replace(config)

    def refuse(self, exc: ConfigError) -> bool:
        """Log why a reload is refused (the running configuration stays)."""
        self.refused = [problem.render(exc.source) for problem in exc.problems]
        for message in self.refused:
            log.error("reload refused: {message}", message=message)
        log.error("reload refused: still serving the previous configuration")
        return False

    def replace(
        self,
        config: Config,
        certificates: dict[str, list[CertifiedKey]] | None = None,
        *,
        announce: bool = True,
    ) -> bool:
        """Apply ``config`` (with ``certificates`` already loaded, or read from
        its files) as `reload` does, if it is sound.

        :param announce: log that the configuration was reloaded.
        :return: whether it was applied.
        """
        now = datetime.datetime.now(datetime.UTC)
        try:
            prepared = prepare(config, self.tokens, now, self.challenges, certificates)
        except ConfigError as exc:
            return self.refuse(exc)
        self.refused = []
        old = self.current.config
        if self.warn_restart:
            if config.listen != old.listen:
                log.warn("listen changed: the listeners change at the next restart")
            if config.proxy != old.proxy:
                log.warn("proxy changed: limits and timeouts change at the next restart")
            if (config.access_log, config.metrics) != (old.access_log, old.metrics):
                log.warn("access_log or metrics changed: they change at the next restart")
            if config.workers != old.workers:
                log.warn("workers changed: the number of processes changes at the next restart")
        self.apply(prepared)
        if announce:
            log.info(
                "reloaded {source}: {hosts} hosts", source=config.source, hosts=len(config.hosts)
            )
        if self.acme is not None:
            self.acme.refresh()
        elif self.warn_restart and any(h.acme for h in config.hosts):
            log.warn("acme: true takes effect at the next restart (no ACME service is running)")
        return True

    def watched_paths(self) -> list[str]:
        """The files a reload would re-read: the config file, every certificate, and
        the client-certificate CA/CRL and backend TLS files."""
        paths = [self.config_path] if self.config_path else []
        for host in self.current.config.hosts:
            for source in host.certificates:
                paths += [source.key, source.cert]
                if source.chain:
                    paths.append(source.chain)
            if host.client_auth is not None:  # CA and CRL files (a CRL is replaced often)
                paths += [p for p in (host.client_auth.ca, host.client_auth.crl) if p]
            for backend in (host.backend, *(r.backend for r in host.routes)):
                if backend.tls is not None:
                    tls = backend.tls
                    paths += [p for p in (tls.ca, tls.cert, tls.key) if p and p not in paths]
        return paths

    def certificates_changed(self) -> bool:
        """Serve newly issued ACME certificates: rebuild the running
        configuration as a reload does (the file is not re-read).

        :return: whether the rebuilt configuration was applied.
        """
        now = datetime.datetime.now(datetime.UTC)
        try:
            prepared = prepare(self.current.config, self.tokens, now, self.challenges)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(
                    "new certificate not served: {message}", message=problem.render(exc.source)
                )
            return False
        self.apply(prepared)
        return True


@attrs.frozen
class StartParts:
    """What a start needs beyond the config, every part checked (see `check_start`)."""

    prepared: Prepared
    tokens: ChallengeTokens
    challenges: ChallengeCertificates
    #: Parsed, not bound (empty in a worker, which adopts its parent's sockets).
    https: list[Any]
    http: list[Any]
    metrics_endpoints: list[Any]
    store: AcmeStore | None
    #: Opened (before privileges are dropped), not started.
    access_log: AccessLogWriter | None


def check_start(
    config: Config,
    reactor: Any,
    *,
    tokens: ChallengeTokens | None = None,
    challenges: ChallengeCertificates | None = None,
    endpoints: bool = True,
    acme: bool = True,
    certificates: dict[str, list[CertifiedKey]] | None = None,
    access_log_fd: int | None = None,
) -> StartParts:
    """Run every check a start needs, all problems in one pass; binds nothing.

    :param endpoints: parse the listener and metrics endpoints (a worker,
        which adopts sockets bound by its parent, does not).
    :param acme: check (and create) the ACME state directory.
    :param certificates: serve these (loaded and checked by a supervisor)
        instead of reading the certificate files.
    :param access_log_fd: write the access log to this inherited descriptor
        (opened by a supervisor) instead of opening its path.
    :raises ConfigError: with every error found; warnings are kept in the
        prepared configuration instead.
    """
    now = datetime.datetime.now(datetime.UTC)
    tokens = tokens if tokens is not None else ChallengeTokens()
    challenges = challenges if challenges is not None else ChallengeCertificates()
    problems: list[Problem] = []
    https: list[Any] = []
    http: list[Any] = []
    endpoint_problems: list[Problem] = []
    if endpoints:
        https, found = parse_endpoints(reactor, config.listen.https, "listen.https")
        endpoint_problems += found
        http, found = parse_endpoints(reactor, config.listen.http, "listen.http")
        endpoint_problems += found
    prepared: Prepared | None = None
    try:
        prepared = prepare(config, tokens, now, challenges, certificates)
    except ConfigError as exc:
        problems += exc.problems
    store = acme_store(config) if acme else None
    if store is not None:
        try:
            store.ensure()
        except OSError as exc:
            problems.append(Problem("acme.state_dir", f"cannot create {store.directory}: {exc}"))
    problems += endpoint_problems
    access_log, metrics_endpoints, found = _observer_parts(
        config, reactor, endpoints, access_log_fd
    )
    problems += found
    if problems or prepared is None:
        if access_log is not None:
            access_log.stop()
        raise ConfigError(config.source, problems)
    return StartParts(
        prepared=prepared,
        tokens=tokens,
        challenges=challenges,
        https=https,
        http=http,
        metrics_endpoints=metrics_endpoints,
        store=store,
        access_log=access_log,
    )


def build_runtime(
    parts: StartParts,
    reactor: Any,
    *,
    config_path: str | None,
    plain: bool,
    log_grades: bool = True,
) -> tuple[Runtime, ProxyService]:
    """Build the engines for a checked start and make its configuration live.

    The one code path of the single process and of every worker; what is
    attached to listeners is up to the caller.

    :param plain: whether to build the plain-HTTP engine and the port-80
        service's private loopback listener (there is an HTTP listener).
    :return: the runtime and the service that drains its engines on stop
        (listener services go under it).
    """
    prepared = parts.prepared
    config = prepared.config
    settings = proxy_settings(config)
    pools = UpstreamPools(reactor, settings)
    top_ports: list[Any] = []
    proxy = ProxyFactory(router=prepared.router, pools=pools, clock=reactor, settings=settings)
    creator = SNIConnectionCreator(prepared.contexts)  # rotation on the monotonic clock
    plain_site = make_plain_site(config, parts.tokens, reactor=reactor)
    runtime = Runtime(
        prepared,
        creator=creator,
        proxy=proxy,
        plain_site=plain_site,
        tokens=parts.tokens,
        config_path=config_path,
    )
    runtime.challenges = parts.challenges
    if plain:
        # Plain-HTTP requests go through the engine (its strict parsing, limits
        # and deadlines), which sends them to the port-80 service on a private
        # loopback port, or to the backends of insecure_plain_http hosts.
        local_port = reactor.listenTCP(0, plain_site, interface="127.0.0.1")
        top_ports.append(local_port)
        runtime.plain_local = Backend("http", "127.0.0.1", local_port.getHost().port)
        runtime.plain_proxy = ProxyFactory(
            router=PlainRouter(config, runtime.plain_local),
            pools=pools,
            clock=reactor,
            settings=settings,
            scheme="http",
        )
    runtime.apply(prepared)
    if log_grades:
        now = datetime.datetime.now(datetime.UTC)
        for grade in grade_config(config, prepared.certificates, prepared.contexts.parameters, now):
            log.info(
                "TLS grade {summary}", summary=describe(grade), host=grade.host, grade=grade.grade
            )
    top = ProxyService(runtime, pools, reactor, top_ports)
    top.access_log = parts.access_log
    return runtime, top


def tls_factory(runtime: Runtime) -> TLSServerFactory:
    """The HTTPS listeners' factory: TLS by the runtime's SNI contexts, then the engine."""
    return TLSServerFactory(runtime.creator, runtime.proxy)


def start_acme(
    parts: StartParts,
    runtime: Runtime,
    reactor: Any,
    top: MultiService,
    *,
    acknowledged: Callable[[], Deferred[Any]] | None = None,
    on_issued: Callable[[], object] | None = None,
) -> None:
    """Run the ACME service under ``top`` when the configuration has an ACME store.

    :param acknowledged: fires once published challenges reach every process
        serving them (see `ThreadedIssuer`).
    :param on_issued: serves a newly stored certificate (default: the
        runtime's `Runtime.certificates_changed`).
    """
    if parts.store is None:
        return
    # Imported here: the ACME client libraries cost a worker process (which
    # never runs ACME) about 20 MiB.
    from tlsproxy.acme.manager import AcmeService, ThreadedIssuer

    issuer = ThreadedIssuer(
        lambda: runtime.current.config,
        parts.store,
        reactor,
        parts.tokens,
        parts.challenges,
        acknowledged=acknowledged,
    )
    runtime.acme = AcmeService(
        lambda: runtime.current.config,
        parts.store,
        issuer,
        reactor,
        on_issued if on_issued is not None else runtime.certificates_changed,
    )
    runtime.acme.setServiceParent(top)


def build_service(
    config: Config, reactor: Any, *, foreground: bool = True, config_path: str | None = None
) -> MultiService:
    """Check everything a start needs and build the service tree.

    With ``workers`` above 1 (and a configuration file the workers can read)
    the tree is a supervisor of worker processes (see `tlsproxy.supervisor`).

    :param foreground: whether twistd runs with ``-n``; decides how a port
        that cannot be bound is reported (see `ListeningService`).
    :param config_path: the file SIGHUP re-reads (None: reload certificates only).
    :raises ConfigError: with every error found; warnings are logged instead.
    """
    if config.workers > 1 and config_path is not None:
        from tlsproxy.supervisor import build_supervisor

        return build_supervisor(config, reactor, foreground=foreground, config_path=config_path)
    parts = check_start(config, reactor)
    runtime, top = build_runtime(parts, reactor, config_path=config_path, plain=bool(parts.http))
    metrics = wire_observers(runtime, parts.access_log)
    if metrics is not None and config.metrics is not None:
        where = f"{config.source}: metrics.listen ({config.metrics.listen})"
        site = metrics_site(metrics)
        ListeningService(parts.metrics_endpoints[0], site, where, foreground).setServiceParent(top)
    start_acme(parts, runtime, reactor, top)
    https = tls_factory(runtime)
    for i, endpoint in enumerate(parts.https):
        where = f"{config.source}: listen.https[{i}] ({config.listen.https[i]})"
        ListeningService(endpoint, https, where, foreground).setServiceParent(top)
    for i, endpoint in enumerate(parts.http):
        where = f"{config.source}: listen.http[{i}] ({config.listen.http[i]})"
        assert runtime.plain_proxy is not None
        ListeningService(endpoint, runtime.plain_proxy, where, foreground).setServiceParent(top)
    return top


class ProxyService(MultiService):
    """The listeners, SIGHUP for reload, and closing backend pools and private
    ``ports`` (the port-80 service's loopback listener) on shutdown."""

    def __init__(
        self, runtime: Runtime, pools: UpstreamPools, reactor: Any, ports: list[Any]
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.pools = pools
        self.ports = ports
        self._reactor = reactor
        self._previous_hup: Any = None
        self._watch: FileWatch | None = None
        self.access_log: AccessLogWriter | None = None
        #: What SIGHUP and the file watch call (a supervisor also tells its workers).
        self.reload: Callable[[], object] = runtime.reload
        #: Whether this process takes SIGHUP and watches files (a worker's
        #: supervisor does that for it).
        self.signals = True

    def startService(self) -> None:
        super().startService()
        if self.access_log is not None:
            self.access_log.start()
        if not self.signals:
            return
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        interval = self.runtime.current.config.watch_interval
        if interval > 0:
            self._watch = FileWatch(
                self.runtime.watched_paths, self.reload, self._reactor, interval
            )
            self._watch.start()

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: reloading")
        self._reactor.callFromThread(self.reload)

    def stopService(self) -> Any:
        if self._watch is not None:
            self._watch.stop()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        # Listeners stop accepting first; in-flight requests get drain_timeout
        # to finish before the backend pools and the access log close.
        d = super().stopService()
        factories = [f for f in (self.runtime.proxy, self.runtime.plain_proxy) if f is not None]
        timeout = self.runtime.current.config.drain_timeout
        d.addCallback(lambda _: drain(factories, self._reactor, timeout))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: Any) -> Any:
        self.pools.close()
        for port in self.ports:
            port.stopListening()
        if self.access_log is not None:
            self.access_log.stop()
        return result


def _observer_parts(
    config: Config, reactor: Any, endpoints: bool = True, access_log_fd: int | None = None
) -> tuple[AccessLogWriter | None, list[Any], list[Problem]]:
    """The access-log file (opened now, before privileges are dropped) and
    the metrics endpoint (when ``endpoints``), with any problem found."""
    problems: list[Problem] = []
    access_log = None
    if config.access_log is not None:
        access_log = AccessLogWriter(config.access_log.path, config.access_log.format, reactor)
        try:
            access_log.open(access_log_fd)
        except OSError as exc:
            access_log = None
            problems.append(
                Problem("access_log.path", f"cannot open {exc.filename}: {exc.strerror}")
            )
    found_endpoints: list[Any] = []
    if config.metrics is not None and endpoints:
        found_endpoints, found = parse_endpoints(
            reactor, (config.metrics.listen,), "metrics.listen"
        )
        problems += found
    return access_log, found_endpoints, problems


def wire_observers(runtime: Runtime, access_log: AccessLogWriter | None) -> Metrics | None:
    """Give the engines their ``on_request`` hook (access log, metrics).

    :return: the metrics the engines feed, when ``metrics`` is configured.
    """
    config = runtime.current.config
    factories = [f for f in (runtime.proxy, runtime.plain_proxy) if f is not None]
    hooks: list[Any] = [access_log] if access_log is not None else []
    metrics = None
    if config.metrics is not None:
        from tlsproxy.metrics import Metrics

        metrics = Metrics(
            lambda: sum(f.connection_count() for f in factories),
            lambda: runtime.current.certificates,
            lambda: {n: s.status for n, s in runtime.acme.slots.items()} if runtime.acme else {},
        )
        hooks.append(metrics)
        runtime.proxy.on_tls = metrics.tls
    if len(hooks) == 1:
        on_request = hooks[0]
    elif hooks:
        first, second = hooks

        def on_request(entry: Any) -> None:
            first(entry)
            second(entry)
    else:
        return metrics
    for factory in factories:
        factory.on_request = on_request
    return metrics


def metrics_site(metrics: Metrics) -> Any:
    """The metrics listener's site: Prometheus text at ``/metrics``."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))  # type: ignore[no-untyped-call]
    return Site(root)
