"""Prometheus metrics: what the proxy counts and what it reports when scraped.

One job: keep a private ``prometheus_client`` registry with the request
counter and upstream latency histogram (fed from the engine's ``on_request``:
plain numbers, one count and at most one bucket per request, shown as a
Counter and a Histogram when scraped), the TLS handshake and handshake-failure
counters (fed from ``on_tls``), and collectors that read the rest at scrape
time: open connections, certificate expiry per host, and the ACME service's
state per host.  With worker processes, `merge_expositions` makes one
exposition of the supervisor's and the workers' (parsed with
prometheus_client's own parser).

It must not: cost anything per request beyond that, use labels of unbounded
cardinality (the label is the configured site, never the client's ``Host``),
or import the reactor (the HTTP resource is built by `tlsproxy.service`).
"""

from __future__ import annotations

import bisect
import datetime
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tlsproxy.accesslog import Entry
from tlsproxy.certs import CertifiedKey

__all__ = ["SUPERVISOR_FAMILIES", "Metrics", "merge_expositions"]

#: Upstream response time buckets (seconds): from a fast local app to a slow report.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BOUNDS = tuple(floatToGoString(b) for b in BUCKETS)
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
        # Per request: plain numbers, read by _RequestCollector when scraped (a
        # prometheus_client Counter or Histogram takes a lock and several calls
        # per update: ~5 µs a request between the two).  Only the reactor thread
        # writes them; a scrape (in a thread) copies them first.
        #: answered requests by (site or "-", status // 100)
        self._counts: dict[tuple[str, int], int] = {}
        #: per upstream: [sum of durations, count in each of BUCKETS and above them]
        self._latency: dict[str, list[float]] = {}
        #: when each series was first counted (Prometheus ``_created``)
        self._created: dict[object, float] = {}
        self.registry.register(_RequestCollector(self))
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

    def __call__(self, e: Entry) -> None:
        """Count one answered request (the engine's ``on_request``)."""
        key = (e.site or "-", e.status // 100)
        counts = self._counts
        count = counts.get(key)
        if count is None:
            self._created[key] = time.time()
            count = 0
        counts[key] = count + 1
        upstream = e.upstream
        if upstream is not None:
            latency = self._latency.get(upstream)
            if latency is None:
                self._created[upstream] = time.time()
                latency = self._latency[upstream] = [0.0] * (len(BUCKETS) + 2)
            duration = e.duration
            latency[0] += duration
            latency[1 + bisect.bisect_left(BUCKETS, duration)] += 1

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


class _RequestCollector(Collector):
    """Shows `Metrics`' per-request numbers when scraped, as a Counter and a Histogram would."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        created = m._created
        requests = CounterMetricFamily(
            "tlsproxy_requests",
            "Requests answered, by configured site and status class.",
            labels=["host", "code"],
        )
        for key, count in list(m._counts.items()):  # a copy: the reactor thread goes on counting
            site, kind = key
            code = _CLASSES[kind - 1] if 1 <= kind <= 5 else "other"
            requests.add_metric([site, code], count, created=created.get(key))
        latency = HistogramMetricFamily(
            "tlsproxy_upstream_response_seconds",
            "Time from starting to forward a request to the end of the upstream's response.",
            labels=["upstream"],
        )
        for upstream, numbers in list(m._latency.items()):
            numbers = list(numbers)
            buckets = []
            total = 0.0
            for bound, in_bucket in zip((*_BOUNDS, "+Inf"), numbers[1:], strict=True):
                total += in_bucket
                buckets.append((bound, total))
            latency.add_metric([upstream], buckets, sum_value=numbers[0])
            when = created.get(upstream)
            if when is not None:
                latency.add_sample(
                    "tlsproxy_upstream_response_seconds_created", {"upstream": upstream}, when
                )
        return [requests, latency]


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


#: The families a supervisor of worker processes reports itself, once (they
#: describe the configuration and the ACME service, which live in the parent);
#: every other family comes from the workers, labelled ``worker``.
SUPERVISOR_FAMILIES = frozenset(
    {
        "tlsproxy_certificate_expiry_timestamp_seconds",
        "tlsproxy_acme_consecutive_failures",
        "tlsproxy_acme_last_success_timestamp_seconds",
        "tlsproxy_acme_next_renewal_timestamp_seconds",
    }
)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(own: str, workers: Mapping[str, str]) -> bytes:
    """One Prometheus text exposition from a supervisor's and its workers'.

    ``own`` supplies the `SUPERVISOR_FAMILIES`; each worker (by its label
    value in ``workers``) supplies every other family, its samples gaining the
    label ``worker``, so ``sum without (worker)`` gives the process-wide value.
    """
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(own):
        if family.name in SUPERVISOR_FAMILIES:
            families[family.name] = family
    for worker, text in sorted(workers.items()):
        for family in text_string_to_metric_families(text):
            if family.name in SUPERVISOR_FAMILIES:
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples += [
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
