"""Listener endpoint strings are checked before anything binds."""

from twisted.internet.testing import MemoryReactor

from tlsproxy.listeners import parse_endpoints


def test_bad_endpoint_strings_are_problems_with_their_key_path() -> None:
    """An endpoint Twisted cannot parse, and a systemd socket index that was not passed in,
    are reported at their key path instead of crashing."""
    endpoints, problems = parse_endpoints(
        MemoryReactor(),
        ["tcp:8443:interface=127.0.0.1", "tcp:notaport", "systemd:domain=INET:index=7"],
        "listen.https",
    )
    assert len(endpoints) == 1
    rendered = [p.render("proxy.yaml") for p in problems]
    assert rendered[0].startswith("proxy.yaml: listen.https[1]: not a valid endpoint (")
    assert rendered[1] == (
        "proxy.yaml: listen.https[2]: no socket with that index was passed in by systemd "
        "(see LISTEN_FDS)"
    )


def test_tls_wrapping_endpoint_types_are_refused() -> None:
    """``ssl:`` and ``tls:`` endpoints would wrap tlsproxy's own TLS in Twisted's (or bind
    another port): they are config errors naming the fix."""
    endpoints, problems = parse_endpoints(
        MemoryReactor(), ["ssl:18443", "TLS:18445:interface=127.0.0.1"], "listen.https"
    )
    assert endpoints == []
    rendered = [p.render("proxy.yaml") for p in problems]
    assert rendered[0].startswith("proxy.yaml: listen.https[0]: ssl: endpoints add a TLS layer")
    assert rendered[1].startswith("proxy.yaml: listen.https[1]: tls: endpoints add a TLS layer")
    assert all("use tcp:PORT" in line for line in rendered)
