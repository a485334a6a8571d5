"""Turning measured numbers into the results table, ratios to nginx, targets, JSON and Markdown.

One job: from a results document (plain dicts, as written to JSON) compute
ratios to the reference peer, check issue 7's targets, and render text.  Pure
module: no processes, no I/O except `write_results`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

#: The sign after a ratio.
TIMES = "\N{MULTIPLICATION SIGN}"

#: The peer every ratio is relative to.
REFERENCE = "nginx"

#: Display names of the peers, in table order.
PEER_LABELS: dict[str, str] = {
    "nginx": "nginx (1 worker)",
    "haproxy": "HAProxy (1 thread)",
    "tlsproxy": "tlsproxy (1 process)",
    "minimal": "minimal relay (no checks)",
    "twisted": "twisted.web.proxy (stock)",
    "nginx-2w": "nginx (2 workers)",
    "tlsproxy-2w": "tlsproxy (2 workers)",
}


@attrs.frozen
class Metric:
    key: str
    label: str
    #: Python format for the absolute value.
    fmt: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("keepalive_rps", "keep-alive requests/s", "{:,.0f}", True),
    Metric("keepalive_p50_ms", "keep-alive p50 latency (ms)", "{:.2f}", False),
    Metric("keepalive_p99_ms", "keep-alive p99 latency (ms)", "{:.2f}", False),
    Metric("keepalive_cpu_pct", "proxy CPU during keep-alive (%)", "{:.0f}", True),
    Metric("keepalive_per_cpu_s", "keep-alive requests per proxy CPU-second", "{:,.0f}", True),
    Metric("handshakes_per_s", "full handshakes/s", "{:,.0f}", True),
    Metric("handshake_cpu_pct", "proxy CPU during handshakes (%)", "{:.0f}", True),
    Metric("handshakes_per_cpu_s", "full handshakes per proxy CPU-second", "{:,.0f}", True),
    Metric("resumed_per_s", "resumed handshakes/s", "{:,.0f}", True),
    Metric("resumed_cpu_pct", "proxy CPU during resumed handshakes (%)", "{:.0f}", True),
    Metric("resumed_per_cpu_s", "resumed handshakes per proxy CPU-second", "{:,.0f}", True),
    Metric("ws_msgs_per_s", "WebSocket messages/s", "{:,.0f}", True),
    Metric("ws_p99_ms", "WebSocket p99 latency (ms)", "{:.2f}", False),
    Metric("ws_cpu_pct", "proxy CPU during WebSocket messages (%)", "{:.0f}", True),
    Metric("ws_per_cpu_s", "WebSocket messages per proxy CPU-second", "{:,.0f}", True),
    Metric("download_mb_s", "64 MiB download (MB/s)", "{:,.0f}", True),
    Metric("download_cpu_pct", "proxy CPU during downloads (%)", "{:.0f}", True),
    Metric("download_per_cpu_s", "download MB per proxy CPU-second", "{:,.0f}", True),
    Metric("upload_mb_s", "64 MiB upload (MB/s)", "{:,.0f}", True),
    Metric("upload_cpu_pct", "proxy CPU during uploads (%)", "{:.0f}", True),
    Metric("upload_per_cpu_s", "upload MB per proxy CPU-second", "{:,.0f}", True),
    Metric("idle_rss_mib", "idle RSS (MiB)", "{:.1f}", False),
    Metric("peak_rss_mib", "peak RSS (MiB)", "{:.1f}", False),
    Metric("soak_rss_mib_start", "RSS at the soak's start (MiB)", "{:.1f}", False),
    Metric("soak_rss_mib_end", "RSS at the soak's end (MiB)", "{:.1f}", False),
    Metric("soak_rss_change_pct", "RSS change over the soak (%)", "{:.1f}", False),
)


@attrs.frozen
class Target:
    """One of issue 7's targets for tlsproxy: ``metric``'s ratio to ``against``
    must be at least (``at_least``) or at most ``limit``; or an absolute bound."""

    label: str
    metric: str
    limit: float
    at_least: bool
    against: str | None = REFERENCE
    #: The same quantity per proxy CPU-second (capacity), which must meet the
    #: target too: when the load generator cannot saturate the reference, the
    #: plain rate ratio flatters the slower peer.
    capacity_metric: str | None = None
    #: The peer the target is about, if not the one `check_targets` is given.
    peer: str | None = None


TARGETS: tuple[Target, ...] = (
    Target(
        "keep-alive requests/s vs nginx",
        "keepalive_rps",
        0.70,
        True,
        capacity_metric="keepalive_per_cpu_s",
    ),
    Target(
        "keep-alive requests/s vs stock twisted.web.proxy", "keepalive_rps", 5.0, True, "twisted"
    ),
    Target(
        "full handshakes/s vs nginx",
        "handshakes_per_s",
        0.70,
        True,
        capacity_metric="handshakes_per_cpu_s",
    ),
    Target(
        "64 MiB download MB/s vs nginx",
        "download_mb_s",
        1.0,
        True,
        capacity_metric="download_per_cpu_s",
    ),
    Target(
        "64 MiB upload MB/s vs nginx", "upload_mb_s", 1.0, True, capacity_metric="upload_per_cpu_s"
    ),
    Target("keep-alive p99 latency vs nginx", "keepalive_p99_ms", 3.0, False),
    Target(
        "2 workers on 2 cores vs 1 process, keep-alive requests/s",
        "keepalive_rps",
        1.7,
        True,
        against="tlsproxy",
        peer="tlsproxy-2w",
    ),
    Target("idle RSS per process (MiB)", "idle_rss_mib", 64.0, False, None),
    Target("RSS change over the keep-alive soak (%)", "soak_rss_change_pct", 10.0, False, None),
)


#: A run with more failed requests than this share of its total does not count.
MAX_ERROR_SHARE = 0.005
#: A resumption run counts only if at least this share of its handshakes resumed
#: (the first connection of each process, and those started before it ended, are full).
MIN_RESUMED_SHARE = 0.9


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _per_cpu(m: dict[str, Any], rate_key: str, cpu_key: str, out_key: str) -> None:
    if m.get(rate_key) is not None and m.get(cpu_key):
        m[out_key] = m[rate_key] / (m[cpu_key] / 100)


def _without_errors(
    peer: str, label: str, runs: Sequence[Mapping[str, Any]], count: str, problems: list[str]
) -> list[Mapping[str, Any]]:
    """The runs that completed something, with errors within `MAX_ERROR_SHARE`
    of their ``count``; each other one is added to ``problems``."""
    clean = []
    for r in runs:
        if not r[count] or sum(r["errors"].values()) > MAX_ERROR_SHARE * r[count]:
            problems.append(f"{peer}: {label} run with errors {r['errors']}")
        else:
            clean.append(r)
    return clean


def aggregate(
    peer: str, raw: Mapping[str, Sequence[Mapping[str, Any]]], m: dict[str, Any]
) -> list[str]:
    """Fill ``m`` with the medians of ``peer``'s raw runs; return problems found.

    Runs with failed requests (beyond `MAX_ERROR_SHARE`), a resumed handshake
    among the full ones, or under `MIN_RESUMED_SHARE` resumed in a resumption
    run do not count.  Rates per proxy CPU-second divide each median rate by the
    median share of a CPU the proxy used meanwhile.
    """
    problems: list[str] = []
    ka = _without_errors(peer, "keep-alive", raw.get("keepalive", ()), "requests", problems)
    if ka:
        m["keepalive_rps"] = _median([r["rate"] for r in ka])
        m["keepalive_p50_ms"] = _median([r["p50_ms"] for r in ka])
        m["keepalive_p99_ms"] = _median([r["p99_ms"] for r in ka])
        m["keepalive_cpu_pct"] = _median([r["cpu_pct"] for r in ka])
        _per_cpu(m, "keepalive_rps", "keepalive_cpu_pct", "keepalive_per_cpu_s")
    for kind, prefix, key in (
        ("handshake", "handshake", "handshakes"),
        ("resumption", "resumed", "resumed"),
    ):
        counted = []
        for r in raw.get(kind, ()):
            done = max(1, r["handshakes"])
            bad = not r["handshakes"] or sum(r["errors"].values()) > MAX_ERROR_SHARE * done
            if kind == "handshake":
                bad = bad or r["resumed"] > 0
            else:
                bad = bad or r["resumed"] < MIN_RESUMED_SHARE * done
            if bad:
                problems.append(
                    f"{peer}: {kind} run with errors {r['errors']}, resumed {r['resumed']} "
                    f"of {r['handshakes']}"
                )
            else:
                counted.append(r)
        if counted:
            m[f"{key}_per_s"] = _median([r["rate"] for r in counted])
            m[f"{prefix}_cpu_pct"] = _median([r["cpu_pct"] for r in counted])
            _per_cpu(m, f"{key}_per_s", f"{prefix}_cpu_pct", f"{key}_per_cpu_s")
    ws = _without_errors(peer, "WebSocket", raw.get("websocket", ()), "messages", problems)
    if ws:
        m["ws_msgs_per_s"] = _median([r["rate"] for r in ws])
        m["ws_p99_ms"] = _median([r["p99_ms"] for r in ws])
        m["ws_cpu_pct"] = _median([r["cpu_pct"] for r in ws])
        _per_cpu(m, "ws_msgs_per_s", "ws_cpu_pct", "ws_per_cpu_s")
    for direction in ("download", "upload"):
        runs = [x for r in raw.get(direction, ()) for x in r["runs_mb_per_s"]]
        if runs:
            m[f"{direction}_mb_s"] = _median(runs)
            m[f"{direction}_cpu_pct"] = _median([r["cpu_pct"] for r in raw[direction]])
            _per_cpu(m, f"{direction}_mb_s", f"{direction}_cpu_pct", f"{direction}_per_cpu_s")
    return problems


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def ratio(
    metrics: Mapping[str, Mapping[str, Any]], peer: str, key: str, against: str
) -> float | None:
    """``peer``'s value of ``key`` divided by ``against``'s, or None if either is missing."""
    mine = _number(metrics.get(peer, {}).get(key))
    theirs = _number(metrics.get(against, {}).get(key))
    if mine is None or not theirs:
        return None
    return mine / theirs


def check_targets(
    metrics: Mapping[str, Mapping[str, Any]], peer: str = "tlsproxy"
) -> list[dict[str, Any]]:
    """Each target with the measured value (a ratio, or the absolute value), the ratio per
    proxy CPU-second where the target has one, and whether it is met (both must be)."""
    rows = []

    def ok(value: float) -> bool:
        return value >= t.limit if t.at_least else value <= t.limit

    for t in TARGETS:
        subject = t.peer or peer
        if t.against is None:
            value = _number(metrics.get(subject, {}).get(t.metric))
        else:
            value = ratio(metrics, subject, t.metric, t.against)
        capacity = None
        if t.capacity_metric and t.against is not None:
            capacity = ratio(metrics, subject, t.capacity_metric, t.against)
        met = None if value is None else ok(value) and (capacity is None or ok(capacity))
        required = ("≥ " if t.at_least else "≤ ") + (
            f"{t.limit:g}{TIMES}" if t.against is not None else f"{t.limit:g}"
        )
        rows.append(
            {
                "target": t.label,
                "required": required,
                "measured": value,
                "met": met,
                "ratio": t.against is not None,
                "per_cpu_second": capacity,
            }
        )
    return rows


def _cell(metrics: Mapping[str, Mapping[str, Any]], peer: str, m: Metric) -> str:
    value = _number(metrics.get(peer, {}).get(m.key))
    if value is None:
        return str(metrics.get(peer, {}).get(m.key + "_error", "—"))
    text = m.fmt.format(value)
    r = ratio(metrics, peer, m.key, REFERENCE)
    if r is not None and peer != REFERENCE:
        text += f" ({r:.2f}{TIMES})"
    return text


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per metric, one column per peer."""
    peers: Sequence[str] = results["peers"]
    metrics = results["metrics"]
    header = ["metric", *(PEER_LABELS.get(p, p) for p in peers)]
    rows = []
    for m in METRICS:
        if not any(_number(metrics.get(p, {}).get(m.key)) is not None for p in peers):
            continue
        rows.append([m.label, *(_cell(metrics, p, m) for p in peers)])
    return header, rows


def _target_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for row in results.get("targets", []):
        value = row["measured"]
        measured = (
            "—" if value is None else (f"{value:.2f}{TIMES}" if row["ratio"] else f"{value:.1f}")
        )
        capacity = row.get("per_cpu_second")
        per_cpu = "—" if capacity is None else f"{capacity:.2f}{TIMES}"
        met = {True: "met", False: "not met", None: "not measured"}[row["met"]]
        rows.append([row["target"], row["required"], measured, per_cpu, met])
    return rows


def render_text(results: Mapping[str, Any]) -> str:
    """The table for a terminal (fixed-width columns)."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    targets = _target_rows(results)
    if targets:
        lines += ["", "tlsproxy against issue 7's targets:"]
        for t in targets:
            per_cpu = f", per proxy CPU-second {t[3]}" if t[3] != "—" else ""
            lines.append(f"  {t[0]}: {t[2]}{per_cpu} (target {t[1]}): {t[4]}")
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _load(meta: Mapping[str, Any]) -> str:
    load = meta.get("load_average") or {}
    return " / ".join(f"{load[k]:.2f}" for k in ("start", "end") if k in load) or "—"


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: how it was run, the table, the targets, the TLS check."""
    meta = results["meta"]
    header, rows = table_rows(results)
    parts = [
        f"# tlsproxy benchmark, {meta['date']}",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- pinning: {meta['pinning']}",
        f"- mode: {meta['mode']} ({meta['settings']})",
        f"- versions: {meta['versions']}",
        f"- load average (1 min) at start and end: {_load(meta)}",
        "",
        "Ratios in parentheses are to nginx with 1 worker, measured in the same run.",
        "",
        _md_table(header, rows),
    ]
    targets = _target_rows(results)
    if targets:
        parts += ["", "## tlsproxy against issue 7's targets", ""]
        parts.append(
            _md_table(["target", "required", "tlsproxy", "per proxy CPU-second", "status"], targets)
        )
    tls = results.get("tls", {})
    if tls:
        parts += ["", "## Negotiated TLS (openssl s_client)", ""]
        parts.append(
            _md_table(
                ["peer", "TLS 1.3", "TLS 1.2"],
                [
                    [
                        PEER_LABELS.get(p, p),
                        " ".join(tls[p].get("tls13", {}).values()),
                        " ".join(tls[p].get("tls12", {}).values()),
                    ]
                    for p in results["peers"]
                    if p in tls
                ],
            )
        )
    if results.get("problems"):
        parts += ["", "## Problems", ""] + [f"- {p}" for p in results["problems"]]
    return "\n".join(parts) + "\n"


def write_results(results: Mapping[str, Any], directory: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` (and copies as ``latest.*``) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    text_json = json.dumps(results, indent=2, sort_keys=True) + "\n"
    text_md = render_markdown(results)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(text_json)
    md_path.write_text(text_md)
    (directory / "latest.json").write_text(text_json)
    (directory / "latest.md").write_text(text_md)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report FILE.json``: recompute medians, ratios and targets from a
    results file's raw runs and print (or ``--write``) them again."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite FILE.json and FILE.md")
    ns = parser.parse_args(argv)
    results = json.loads(ns.results.read_text())
    problems = [p for p in results.get("problems", []) if " run with errors " not in p]
    for peer in results["peers"]:
        problems += aggregate(peer, results["raw"][peer], results["metrics"][peer])
    results["problems"] = problems
    if "tlsproxy" in results["peers"]:
        results["targets"] = check_targets(results["metrics"])
    print(render_text(results))
    if ns.write:
        ns.results.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        ns.results.with_suffix(".md").write_text(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
