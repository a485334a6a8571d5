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

from tlsproxy.certs import CertifiedKey, check_certified_key, load_certified_key
from tlsproxy.config import Config, load_config
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
from tlsproxy.routing import Router
from tlsproxy.tls import ServerContexts, SNIConnectionCreator, build_server_contexts
from tlsproxy.upstream import UpstreamPools

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
    return ProxySettings(**dict(config.proxy))


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


def prepare(config: Config, tokens: ChallengeTokens, now: datetime.datetime) -> Prepared:
    """Check ``config`` and its certificates and build what it serves.

    Reads certificate files; binds nothing and changes nothing live.

    :raises ConfigError: with every error found.
    """
    certificates, problems = load_certificates(config, now)
    contexts, tls_problems = build_server_contexts(config, certificates)
    problems += tls_problems + plain_problems(config)
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

    def apply(self, prepared: Prepared) -> None:
        """Make ``prepared`` live for every new handshake and request."""
        for warning in prepared.warnings:
            log.warn("{message}", message=warning.render(prepared.config.source))
        self.creator.swap(prepared.contexts)
        self.proxy.router = prepared.router
        self.proxy.unrouted_headers = prepared.router.unrouted_headers
        self.plain_site.resource = prepared.plain
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
            prepared = prepare(config, self.tokens, now)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: {message}", message=problem.render(exc.source))
            log.error("reload refused: still serving the previous configuration")
            return False
        if config.listen != self.current.config.listen:
            log.warn("listen changed: the listeners change at the next restart")
        if config.proxy != self.current.config.proxy:
            log.warn("proxy changed: limits and timeouts change at the next restart")
        self.apply(prepared)
        log.info("reloaded {source}: {hosts} hosts", source=config.source, hosts=len(config.hosts))
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
    try:
        prepared = prepare(config, tokens, now)
    except ConfigError as exc:
        problems += exc.problems
    problems += endpoint_problems + http_problems
    if problems:
        raise ConfigError(config.source, problems)

    settings = proxy_settings(config)
    pools = UpstreamPools(reactor, settings)
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
    runtime.apply(prepared)

    top = ProxyService(runtime, pools, reactor)
    tls_factory = TLSMemoryBIOFactory(creator, False, proxy)
    for i, endpoint in enumerate(https):
        where = f"{config.source}: listen.https[{i}] ({config.listen.https[i]})"
        ListeningService(endpoint, tls_factory, where, foreground).setServiceParent(top)
    for i, endpoint in enumerate(http):
        where = f"{config.source}: listen.http[{i}] ({config.listen.http[i]})"
        ListeningService(endpoint, plain_site, where, foreground).setServiceParent(top)
    return top


class ProxyService(MultiService):
    """The listeners, SIGHUP for reload, and closing backend pools on shutdown."""

    def __init__(self, runtime: Runtime, pools: UpstreamPools, reactor: Any) -> None:
        super().__init__()
        self.runtime = runtime
        self.pools = pools
        self._reactor = reactor
        self._previous_hup: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: reloading")
        self._reactor.callFromThread(self.runtime.reload)

    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        d = super().stopService()
        self.pools.close()
        return d
