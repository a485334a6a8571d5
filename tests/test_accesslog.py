"""Access-log lines stay exact with the formatter's shortcuts (remembered seconds, plain text)."""

from __future__ import annotations

import json
import time

from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.accesslog import Entry, format_combined, format_json

T = 1_700_000_000.0


def entry(when: float, agent: bytes | None = b"curl/8") -> Entry:
    return Entry(
        time=when,
        client="192.0.2.7",
        method=b"GET",
        target=b"/",
        protocol="HTTP/1.1",
        host=b"example.com",
        status=200,
        bytes_sent=5,
        duration=0.001,
        user_agent=agent,
    )


def test_lines_show_the_time_of_their_own_request() -> None:
    """Requests in the same second, in the next one and back again each log their own
    time (to the millisecond in JSON), in the local time zone for combined."""
    expected = [(T + 0.25, "22:13:20.250"), (T + 0.75, "22:13:20.750"), (T + 1.5, "22:13:21.500")]
    for when, clock in [*expected, expected[0]]:
        record = json.loads(format_json(entry(when)))
        assert record["time"] == f"2023-11-14T{clock}Z"
        local = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(when))
        assert f"[{local} " in format_combined(entry(when))


def _escaped(value: bytes) -> str:
    """nginx's escaping, byte by byte (what the log must show)."""
    return "".join(
        f"\\x{b:02X}" if b < 0x20 or b > 0x7E or b in (0x22, 0x5C) else chr(b) for b in value
    )


@given(st.binary(min_size=1, max_size=60))
def test_user_agent_is_shown_as_sent_or_escaped(agent: bytes) -> None:
    """A user agent of plain printable ASCII is logged as sent; any other byte, the
    quote and the backslash as ``\\xHH``."""
    line = format_combined(entry(T, agent))
    assert line.endswith(f' "-" "{_escaped(agent)}"\n')


def _reference_json(e: Entry) -> str:
    """The JSON line as ``json.dumps`` writes it (the format's definition)."""
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


text = st.text(max_size=20)
data = st.binary(max_size=20)


@given(
    when=st.floats(min_value=0, max_value=4e9),
    strings=st.tuples(text, text, st.none() | text, st.none() | text, st.none() | text),
    more=st.tuples(st.none() | text, st.none() | text),
    raw=st.tuples(data, data, data, st.none() | data, st.none() | data),
    numbers=st.tuples(st.integers(100, 599), st.integers(0, 2**40), st.floats(0, 1e5)),
)
def test_json_line_is_what_json_dumps_writes(
    when: float,
    strings: tuple[str, str, str | None, str | None, str | None],
    more: tuple[str | None, str | None],
    raw: tuple[bytes, bytes, bytes, bytes | None, bytes | None],
    numbers: tuple[int, int, float],
) -> None:
    """Whatever a client sent, the JSON line is exactly the one ``json.dumps`` writes
    for the same fields (so any JSON reader parses it, fields in a fixed order)."""
    client, protocol, site, sni, upstream = strings
    version, cipher = more
    method, target, host, referer, agent = raw
    status, sent, duration = numbers
    e = Entry(
        when, client, method, target, protocol, host, status, sent, duration,
        referer, site, agent, sni, version, cipher, upstream,
    )  # fmt: skip
    assert format_json(e) == _reference_json(e)
