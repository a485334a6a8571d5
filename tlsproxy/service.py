"""Wiring: a validated `Config` in, a twistd `MultiService` out.

`build_service` runs every remaining check that needs more than the config
text (certificate files, OpenSSL's view of the TLS settings, endpoint strings),
collects all problems, and raises one `ConfigError` before anything binds.
Then it connects the pieces: TLS listeners → SNI contexts → proxy protocol →
router → upstream pools.  It makes no decisions of its own.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from tlsproxy.certs import CertifiedKey, check_certified_key, load_certified_key
from tlsproxy.config import Config
from tlsproxy.errors import ConfigError, Problem
from tlsproxy.listeners import ListeningService, parse_endpoints
from tlsproxy.pins import build_header_policies
from tlsproxy.plain import ChallengeTokens, make_plain_site, plain_problems
from tlsproxy.proxy import ProxyFactory, ProxySettings
from tlsproxy.routing import Router
from tlsproxy.tls import SNIConnectionCreator, build_server_contexts
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


def build_service(config: Config, reactor: Any, *, foreground: bool = True) -> MultiService:
    """Check everything a start needs and build the service tree.

    :param foreground: whether twistd runs with ``-n``; decides how a port
        that cannot be bound is reported (see `ListeningService`).
    :raises ConfigError: with every error found; warnings are logged instead.
    """
    now = datetime.datetime.now(datetime.UTC)
    certificates, problems = load_certificates(config, now)
    contexts, tls_problems = build_server_contexts(config, certificates)
    problems += tls_problems
    https, endpoint_problems = parse_endpoints(reactor, config.listen.https, "listen.https")
    problems += endpoint_problems
    http, http_problems = parse_endpoints(reactor, config.listen.http, "listen.http")
    problems += http_problems + plain_problems(config)
    header_policies, header_problems = build_header_policies(config, certificates)
    problems += header_problems
    errors = [p for p in problems if not p.warning]
    if errors or contexts is None:
        raise ConfigError(config.source, errors)
    for warning in problems:
        log.warn("{message}", message=warning.render(config.source))

    top = _ProxyService()
    settings = ProxySettings()
    router = Router(config, header_policies)
    top.pools = UpstreamPools(reactor, settings)
    proxy = ProxyFactory(
        router=router,
        pools=top.pools,
        clock=reactor,
        settings=settings,
        unrouted_headers=router.unrouted_headers,
    )
    creator = SNIConnectionCreator(contexts)
    tls_factory = TLSMemoryBIOFactory(creator, False, proxy)
    for i, endpoint in enumerate(https):
        where = f"{config.source}: listen.https[{i}] ({config.listen.https[i]})"
        ListeningService(endpoint, tls_factory, where, foreground).setServiceParent(top)
    plain_site = make_plain_site(config, ChallengeTokens(), reactor=reactor)
    for i, endpoint in enumerate(http):
        where = f"{config.source}: listen.http[{i}] ({config.listen.http[i]})"
        ListeningService(endpoint, plain_site, where, foreground).setServiceParent(top)
    return top


class _ProxyService(MultiService):
    """The listeners, plus closing the pooled backend connections on shutdown."""

    pools: UpstreamPools | None = None

    def stopService(self) -> Any:
        d = super().stopService()
        if self.pools is not None:
            self.pools.close()
        return d
