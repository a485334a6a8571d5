"""Access-log lines: one request's facts in, one line of text out.

One job: format an :class:`Entry` (what the proxy engine already knows when a
response completes) as an nginx ``combined`` line or as one JSON object.

It must not: do I/O or touch the reactor (the writer in
:mod:`tlsproxy.telemetry` does), or see anything but the fields below: the
engine never hands it cookies, ``Authorization`` or any other header value
than ``Referer`` and ``User-Agent``, so no format can leak them.
"""

from __future__ import annotations

import json.encoder
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["FORMATS", "Entry", "format_combined", "format_json", "formatter"]

FORMATS = ("combined", "json")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Entry(NamedTuple):
    """One answered request.  A named tuple: the engine builds one per request, positionally.

    ``time`` is when the request started (seconds since the epoch),
    ``duration`` seconds until its response was complete; ``bytes_sent`` is
    the response body as relayed (nginx's ``$body_bytes_sent``); text fields
    are ``"-"`` (or None for ``sni``/``tls_*``/``upstream``) when unknown;
    ``site`` is the configured host the request was routed to (None: none).
    """

    time: float
    client: str
    method: bytes
    target: bytes
    protocol: str
    host: bytes
    status: int
    bytes_sent: int
    duration: float
    referer: bytes | None = None
    site: str | None = None
    user_agent: bytes | None = None
    sni: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    upstream: str | None = None


#: Bytes written as they are: printable ASCII but the quote and the backslash.
_PLAIN = bytes(b for b in range(0x20, 0x7F) if b not in (0x22, 0x5C))


def _text(value: bytes | None) -> str:
    """Header or request bytes as log-safe text: nginx's ``\\xHH`` escapes for quotes,
    backslashes, controls and non-ASCII bytes."""
    if not value:
        return "-"
    if not value.translate(None, _PLAIN):
        return value.decode("ascii")  # nothing to escape (the usual case)
    out = []
    for byte in value:
        if byte < 0x20 or byte > 0x7E or byte in (0x22, 0x5C):
            out.append(f"\\x{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


# The last second formatted by each time function: a busy log formats the same
# second many times.
_last_local: tuple[int, str] = (-1, "")
_last_iso: tuple[int, str] = (-1, "")


def _local_time(when: float) -> str:
    """``10/Oct/2000:13:55:36 -0700``: nginx's ``$time_local``."""
    global _last_local
    second = int(when)
    if _last_local[0] == second:
        return _last_local[1]
    t = time.localtime(second)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    text = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"
    )
    _last_local = (second, text)
    return text


def _iso_time(when: float) -> str:
    """``2000-10-10T20:55:36.123Z``: UTC with milliseconds."""
    global _last_iso
    second = int(when)
    if _last_iso[0] == second:
        prefix = _last_iso[1]
    else:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_iso = (second, prefix)
    return f"{prefix}.{int(when * 1000) % 1000:03d}Z"


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


_json_string = json.encoder.encode_basestring_ascii  # '"text"', escaped, ASCII only


def _json_text(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def _json_latin1(value: bytes | None) -> str:
    return _json_string(value.decode("latin-1")) if value else "null"


def format_json(e: Entry) -> str:
    """One JSON object per line, with the TLS and upstream fields as well.

    Written out directly (what ``json.dumps`` of the same fields would give, in
    a quarter of the time): keys in a fixed order, strings escaped to ASCII.
    """
    return (
        f'{{"time":"{_iso_time(e.time)}","client":{_json_string(e.client)},'
        f'"host":{_json_string(e.host.decode("ascii", "replace"))},'
        f'"site":{_json_text(e.site)},"sni":{_json_text(e.sni)},'
        f'"tls_version":{_json_text(e.tls_version)},"tls_cipher":{_json_text(e.cipher)},'
        f'"method":{_json_string(e.method.decode("ascii", "replace"))},'
        f'"target":{_json_string(e.target.decode("ascii", "replace"))},'
        f'"protocol":{_json_string(e.protocol)},"status":{e.status!r},'
        f'"bytes_sent":{e.bytes_sent!r},"duration":{round(e.duration, 6)!r},'
        f'"upstream":{_json_text(e.upstream)},"referer":{_json_latin1(e.referer)},'
        f'"user_agent":{_json_latin1(e.user_agent)}}}\n'
    )


def formatter(name: str) -> Callable[[Entry], str]:
    """The format function named ``name`` (one of `FORMATS`)."""
    return {"combined": format_combined, "json": format_json}[name]
