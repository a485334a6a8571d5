"""The per-request metrics show exactly what prometheus_client's Counter and Histogram would."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tlsproxy.accesslog import Entry
from tlsproxy.metrics import BUCKETS, Metrics

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _entry(site: str | None, status: int, upstream: str | None, duration: float) -> Entry:
    return Entry(0.0, "192.0.2.7", b"GET", b"/", "HTTP/1.1", b"h", status, 0, duration,
                 None, site, None, None, None, None, upstream)  # fmt: skip


def _requests_and_latency(text: str) -> str:
    """The request and latency families of an exposition, ``_created`` values masked."""
    keep = [
        line
        for line in text.splitlines()
        if "tlsproxy_requests" in line or "tlsproxy_upstream_response_seconds" in line
    ]
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", "\n".join(keep))


requests = st.lists(
    st.tuples(
        st.sampled_from([None, "example.com", "api.example.com"]),
        st.integers(100, 599),
        st.sampled_from([None, "10.0.0.2:8080", "[::1]:9000"]),
        st.sampled_from([*BUCKETS, 0.0, 0.0004, 0.03, 99.0]) | st.floats(0, 100),
    ),
    max_size=30,
)


@given(requests)
def test_request_metrics_match_prometheus_clients_own(
    answered: list[tuple[str | None, int, str | None, float]],
) -> None:
    """Whatever requests were answered, the scrape shows the same request counts by site
    and status class and the same latency buckets, count and sum per upstream as
    prometheus_client's Counter and Histogram fed the same requests."""
    metrics = Metrics(lambda: 0, dict, dict)
    reference = CollectorRegistry()
    counter = Counter(
        "tlsproxy_requests",
        "Requests answered, by configured site and status class.",
        ["host", "code"],
        registry=reference,
    )
    histogram = Histogram(
        "tlsproxy_upstream_response_seconds",
        "Time from starting to forward a request to the end of the upstream's response.",
        ["upstream"],
        buckets=BUCKETS,
        registry=reference,
    )
    for site, status, upstream, duration in answered:
        metrics(_entry(site, status, upstream, duration))
        code = CLASSES[status // 100 - 1]
        counter.labels(site or "-", code).inc()
        if upstream is not None:
            histogram.labels(upstream).observe(duration)
    ours = _requests_and_latency(generate_latest(metrics.registry).decode())
    theirs = _requests_and_latency(generate_latest(reference).decode())
    assert ours == theirs
