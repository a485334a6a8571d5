"""Access-log lines: one request's facts in, one line of text out.

One job: format an :class:`Entry` (what the proxy engine already knows when a
response completes) as an nginx ``combined`` line or as one JSON object.

It must not: do I/O or touch the reactor (the writer in
:mod:`tlsproxy.telemetry` does), or see anything but the fields below: the
engine never hands it cookies, ``Authorization`` or any other header value
than ``Referer`` and ``User-Agent``, so no format can leak them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

__all__ = ["FORMATS", "Entry", "format_combined", "format_json", "formatter"]

FORMATS = ("combined", "json")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Entry:
    """One answered request.  A plain slotted class: the engine builds one per request.

    ``time`` is when the request started (seconds since the epoch),
    ``duration`` seconds until its response was complete; ``bytes_sent`` is
    the response body as relayed (nginx's ``$body_bytes_sent``); text fields
    are ``"-"`` (or None for ``sni``/``tls_*``/``upstream``) when unknown;
    ``site`` is the configured host the request was routed to (None: none).
    """

    __slots__ = (
        "bytes_sent",
        "cipher",
        "client",
        "duration",
        "host",
        "method",
        "protocol",
        "referer",
        "site",
        "sni",
        "status",
        "target",
        "time",
        "tls_version",
        "upstream",
        "user_agent",
    )

    def __init__(
        self,
        *,
        time: float,
        client: str,
        method: bytes,
        target: bytes,
        protocol: str,
        host: bytes,
        status: int,
        bytes_sent: int,
        duration: float,
        referer: bytes | None = None,
        site: str | None = None,
        user_agent: bytes | None = None,
        sni: str | None = None,
        tls_version: str | None = None,
        cipher: str | None = None,
        upstream: str | None = None,
    ) -> None:
        self.time = time
        self.client = client
        self.method = method
        self.target = target
        self.protocol = protocol
        self.host = host
        self.status = status
        self.bytes_sent = bytes_sent
        self.duration = duration
        self.referer = referer
        self.site = site
        self.user_agent = user_agent
        self.sni = sni
        self.tls_version = tls_version
        self.cipher = cipher
        self.upstream = upstream


def _text(value: bytes | None) -> str:
    """Header or request bytes as log-safe text: nginx's ``\\xHH`` escapes for quotes,
    backslashes, controls and non-ASCII bytes."""
    if not value:
        return "-"
    out = []
    for byte in value:
        if byte < 0x20 or byte > 0x7E or byte in (0x22, 0x5C):
            out.append(f"\\x{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def _local_time(when: float) -> str:
    """``10/Oct/2000:13:55:36 -0700``: nginx's ``$time_local``."""
    t = time.localtime(when)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"
    )


def format_combined(e: Entry) -> str:
    """nginx's ``combined`` format (what log analysers such as GoAccess read)::

        $remote_addr - $remote_user [$time_local] "$request" $status
        $body_bytes_sent "$http_referer" "$http_user_agent"

    ``$remote_user`` is always ``-``: it would come from ``Authorization``.
    """
    request = f"{_text(e.method)} {_text(e.target)} {e.protocol}"
    return (
        f'{e.client} - - [{_local_time(e.time)}] "{request}" {e.status} {e.bytes_sent} '
        f'"{_text(e.referer)}" "{_text(e.user_agent)}"\n'
    )


def format_json(e: Entry) -> str:
    """One JSON object per line, with the TLS and upstream fields as well."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.time))
        + f".{int(e.time * 1000) % 1000:03d}Z",
        "client": e.client,
        "host": e.host.decode("ascii", "replace"),
        "site": e.site,
        "sni": e.sni,
        "tls_version": e.tls_version,
        "tls_cipher": e.cipher,
        "method": e.method.decode("ascii", "replace"),
        "target": e.target.decode("ascii", "replace"),
        "protocol": e.protocol,
        "status": e.status,
        "bytes_sent": e.bytes_sent,
        "duration": round(e.duration, 6),
        "upstream": e.upstream,
        "referer": e.referer.decode("latin-1") if e.referer else None,
        "user_agent": e.user_agent.decode("latin-1") if e.user_agent else None,
    }
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


def formatter(name: str) -> Callable[[Entry], str]:
    """The format function named ``name`` (one of `FORMATS`)."""
    return {"combined": format_combined, "json": format_json}[name]
