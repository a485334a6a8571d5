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
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from tlsproxy.acme.manager import AcmeService, ThreadedIssuer
from tlsproxy.acme.store import acme_certificates, acme_store, temporary_certificate
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
from tlsproxy.upstream import UpstreamPools
from tlsproxy.watch import FileWatch

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
) -> Prepared:
    """Check ``config`` and its certificates and build what it serves.

    Reads certificate files; binds nothing and changes nothing live.
    ``challenges`` are the tls-alpn-01 answers the contexts consult.

    :raises ConfigError: with every error found.
    """
    certificates, problems = load_certificates(config, now)
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
        now = datetime.datetime.now(datetime.UTC)
        try:
            config = load_config(self.config_path) if self.config_path else self.current.config
            prepared = prepare(config, self.tokens, now, self.challenges)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: {message}", message=problem.render(exc.source))
            log.error("reload refused: still serving the previous configuration")
            return False
        if config.listen != self.current.config.listen:
            log.warn("listen changed: the listeners change at the next restart")
        if config.proxy != self.current.config.proxy:
            log.warn("proxy changed: limits and timeouts change at the next restart")
        old = self.current.config
        if (config.access_log, config.metrics) != (old.access_log, old.metrics):
            log.warn("access_log or metrics changed: they change at the next restart")
        self.apply(prepared)
        log.info("reloaded {source}: {hosts} hosts", source=config.source, hosts=len(config.hosts))
        if self.acme is not None:
            self.acme.refresh()
        elif any(h.acme for h in config.hosts):
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


def build_service(
    config: Config, reactor: Any, *, foreground: bool = True, config_path: str | None = None
) -> MultiService:
    """Check everything a start needs and build the service tree.

    :param foreground: whether twistd runs with ``-n``; decides how a port
        that cannot be bound is reported (see `ListeningService`).
    :param config_path: the file SIGHUP re-reads (None: reload certificates only).
    :raises ConfigError: with every error found; warnings are logged instead.
    """
    now = datetime.datetime.now(datetime.UTC)
    tokens = ChallengeTokens()
    problems: list[Problem] = []
    https, endpoint_problems = parse_endpoints(reactor, config.listen.https, "listen.https")
    http, http_problems = parse_endpoints(reactor, config.listen.http, "listen.http")
    challenges = ChallengeCertificates()
    try:
        prepared = prepare(config, tokens, now, challenges)
    except ConfigError as exc:
        problems += exc.problems
    store = acme_store(config)
    if store is not None:
        try:
            store.ensure()
        except OSError as exc:
            problems.append(Problem("acme.state_dir", f"cannot create {store.directory}: {exc}"))
    problems += endpoint_problems + http_problems
    access_log, metrics_endpoints, found = _observer_parts(config, reactor)
    problems += found
    if problems:
        raise ConfigError(config.source, problems)

    settings = proxy_settings(config)
    pools = UpstreamPools(reactor, settings)
    top_ports: list[Any] = []
    proxy = ProxyFactory(router=prepared.router, pools=pools, clock=reactor, settings=settings)
    creator = SNIConnectionCreator(prepared.contexts)
    plain_site = make_plain_site(config, tokens, reactor=reactor)
    runtime = Runtime(
        prepared,
        creator=creator,
        proxy=proxy,
        plain_site=plain_site,
        tokens=tokens,
        config_path=config_path,
    )
    runtime.challenges = challenges
    if http:
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
    for grade in grade_config(config, prepared.certificates, prepared.contexts.parameters, now):
        log.info("TLS grade {summary}", summary=describe(grade), host=grade.host, grade=grade.grade)

    top = ProxyService(runtime, pools, reactor, top_ports)
    top.access_log = access_log
    _wire_observers(config, runtime, top, access_log, metrics_endpoints, foreground)
    if store is not None:
        issuer = ThreadedIssuer(lambda: runtime.current.config, store, reactor, tokens, challenges)
        runtime.acme = AcmeService(
            lambda: runtime.current.config, store, issuer, reactor, runtime.certificates_changed
        )
        runtime.acme.setServiceParent(top)
    tls_factory = TLSMemoryBIOFactory(creator, False, proxy)
    tls_factory.noisy = False  # our ListeningService logs each listener once
    for i, endpoint in enumerate(https):
        where = f"{config.source}: listen.https[{i}] ({config.listen.https[i]})"
        ListeningService(endpoint, tls_factory, where, foreground).setServiceParent(top)
    for i, endpoint in enumerate(http):
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

    def startService(self) -> None:
        super().startService()
        if self.access_log is not None:
            self.access_log.start()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        interval = self.runtime.current.config.watch_interval
        if interval > 0:
            self._watch = FileWatch(
                self.runtime.watched_paths, self.runtime.reload, self._reactor, interval
            )
            self._watch.start()

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: reloading")
        self._reactor.callFromThread(self.runtime.reload)

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
    config: Config, reactor: Any
) -> tuple[AccessLogWriter | None, list[Any], list[Problem]]:
    """The access-log file (opened now, before privileges are dropped) and
    the metrics endpoint, with any problem found."""
    problems: list[Problem] = []
    access_log = None
    if config.access_log is not None:
        access_log = AccessLogWriter(config.access_log.path, config.access_log.format, reactor)
        try:
            access_log.open()
        except OSError as exc:
            problems.append(
                Problem("access_log.path", f"cannot open {exc.filename}: {exc.strerror}")
            )
    endpoints: list[Any] = []
    if config.metrics is not None:
        endpoints, found = parse_endpoints(reactor, (config.metrics.listen,), "metrics.listen")
        problems += found
    return access_log, endpoints, problems


def _wire_observers(
    config: Config,
    runtime: Runtime,
    top: MultiService,
    access_log: AccessLogWriter | None,
    metrics_endpoints: list[Any],
    foreground: bool,
) -> None:
    """Give the engines their ``on_request`` hook and serve the metrics."""
    factories = [f for f in (runtime.proxy, runtime.plain_proxy) if f is not None]
    hooks: list[Any] = [access_log] if access_log is not None else []
    if config.metrics is not None:
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from tlsproxy.metrics import Metrics

        metrics = Metrics(
            lambda: sum(f.connection_count() for f in factories),
            lambda: runtime.current.certificates,
            lambda: {n: s.status for n, s in runtime.acme.slots.items()} if runtime.acme else {},
        )
        hooks.append(metrics)
        runtime.proxy.on_tls = metrics.tls
        root = Resource()
        root.putChild(b"metrics", MetricsResource(metrics.registry))  # type: ignore[no-untyped-call]
        where = f"{config.source}: metrics.listen ({config.metrics.listen})"
        ListeningService(metrics_endpoints[0], Site(root), where, foreground).setServiceParent(top)
    if len(hooks) == 1:
        on_request = hooks[0]
    elif hooks:
        first, second = hooks

        def on_request(entry: Any) -> None:
            first(entry)
            second(entry)
    else:
        return
    for factory in factories:
        factory.on_request = on_request
