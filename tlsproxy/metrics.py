"""Prometheus metrics: what the proxy counts and what it reports when scraped.

One job: keep a private ``prometheus_client`` registry with the request
counter and upstream latency histogram (fed from the engine's ``on_request``,
one counter increment and at most one histogram observation per request), the
TLS handshake and handshake-failure counters (fed from ``on_tls``), and
collectors that read the rest at scrape time: open connections, certificate
expiry per host, and the ACME service's state per host.

It must not: cost anything per request beyond that, use labels of unbounded
cardinality (the label is the configured site, never the client's ``Host``),
or import the reactor (the HTTP resource is built by `tlsproxy.service`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tlsproxy.accesslog import Entry
from tlsproxy.certs import CertifiedKey

__all__ = ["Metrics"]

#: Upstream response time buckets (seconds): from a fast local app to a slow report.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Metrics:
    """The registry and the per-request hook.

    ``connections`` returns the number of open client connections;
    ``certificates`` the live certificates by host; ``acme_statuses`` the
    ACME service's per-host status (``failures``, ``last_success``,
    ``next_renewal`` as in `tlsproxy.acme.store.HostStatus`), or nothing.
    """

    def __init__(
        self,
        connections: Callable[[], int],
        certificates: Callable[[], dict[str, list[CertifiedKey]]],
        acme_statuses: Callable[[], dict[str, Any]],
    ) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "tlsproxy_requests",
            "Requests answered, by configured site and status class.",
            ["host", "code"],
            registry=self.registry,
        )
        self._upstream = Histogram(
            "tlsproxy_upstream_response_seconds",
            "Time from starting to forward a request to the end of the upstream's response.",
            ["upstream"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._handshakes = Counter(
            "tlsproxy_tls_handshakes",
            "TLS handshakes completed on the HTTPS listeners.",
            registry=self.registry,
        )
        self._handshake_failures = Counter(
            "tlsproxy_tls_handshake_failures",
            "TLS connections that closed before their handshake completed, by OpenSSL's reason.",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(connections, certificates, acme_statuses))
        self._counters: dict[tuple[str | None, int], Any] = {}
        self._histograms: dict[str, Any] = {}

    def __call__(self, e: Entry) -> None:
        """Count one answered request (the engine's ``on_request``)."""
        key = (e.site, e.status // 100)
        counter = self._counters.get(key)
        if counter is None:
            code = _CLASSES[key[1] - 1] if 1 <= key[1] <= 5 else "other"
            counter = self._counters[key] = self._requests.labels(e.site or "-", code)
        counter.inc()
        upstream = e.upstream
        if upstream is not None:
            histogram = self._histograms.get(upstream)
            if histogram is None:
                histogram = self._histograms[upstream] = self._upstream.labels(upstream)
            histogram.observe(e.duration)

    def tls(self, failure: str | None) -> None:
        """Count one TLS handshake, or one failure with its reason (the engine's ``on_tls``)."""
        if failure is None:
            self._handshakes.inc()
        else:
            self._handshake_failures.labels(failure).inc()


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class _StateCollector(Collector):
    """Reads the live state when scraped."""

    def __init__(
        self,
        connections: Callable[[], int],
        certificates: Callable[[], dict[str, list[CertifiedKey]]],
        acme_statuses: Callable[[], dict[str, Any]],
    ) -> None:
        self._connections = connections
        self._certificates = certificates
        self._acme = acme_statuses

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return list(self._collect())

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "tlsproxy_open_connections", "Open client connections.", value=self._connections()
        )
        expiry = GaugeMetricFamily(
            "tlsproxy_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time), by host and key type.",
            labels=["host", "key_type"],
        )
        for host, keys in sorted(self._certificates().items()):
            for key in keys:
                expiry.add_metric([host, key.key_type], key.not_after.timestamp())
        yield expiry
        statuses = self._acme()
        failures = GaugeMetricFamily(
            "tlsproxy_acme_consecutive_failures",
            "ACME attempts that failed since the host's last successful issuance.",
            labels=["host"],
        )
        success = GaugeMetricFamily(
            "tlsproxy_acme_last_success_timestamp_seconds",
            "When the host's last certificate was issued by ACME (Unix time).",
            labels=["host"],
        )
        renewal = GaugeMetricFamily(
            "tlsproxy_acme_next_renewal_timestamp_seconds",
            "When the ACME service next looks at the host's certificate (Unix time).",
            labels=["host"],
        )
        for host, status in sorted(statuses.items()):
            failures.add_metric([host], status.failures)
            when = _timestamp(status.last_success)
            if when is not None:
                success.add_metric([host], when)
            when = _timestamp(status.next_renewal)
            if when is not None:
                renewal.add_metric([host], when)
        yield failures
        yield success
        yield renewal
