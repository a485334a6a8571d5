"""Tests for `tlsproxy.routing`: which site and backend a request goes to."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.config import Backend, parse_yaml
from tlsproxy.routing import Route, Router, host_without_port

CONFIG = """\
listen:
  https: ["tcp:8443"]
hosts:
  example.com:
    aliases: [www.example.com, "*.example.com"]
    certificates: [/etc/tlsproxy/example.com.pem]
    backend: http://127.0.0.1:8000
  api.example.com:
    certificates: [/etc/tlsproxy/api.pem]
    backend: http://127.0.0.1:8001
  Example.ORG.:
    aliases: ["*.Example.org", bücher.example]
    certificates: [/etc/tlsproxy/example.org.pem]
    backend: http://[::1]:9000
"""

MAIN = Route(site="example.com", backend=Backend("http", "127.0.0.1", 8000))
API = Route(site="api.example.com", backend=Backend("http", "127.0.0.1", 8001))
ORG = Route(site="example.org", backend=Backend("http", "::1", 9000))

NAMES = {
    "example.com": MAIN,
    "www.example.com": MAIN,
    "shop.example.com": MAIN,
    "api.example.com": API,
    "example.org": ORG,
    "www.example.org": ORG,
    "xn--bcher-kva.example": ORG,
}


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(parse_yaml(CONFIG, "proxy.yaml"))


@pytest.mark.parametrize(
    ("host", "route"),
    [
        (b"example.com", MAIN),
        (b"www.example.com", MAIN),
        (b"api.example.com", API),
        (b"example.org", ORG),
        (b"xn--bcher-kva.example", ORG),
    ],
)
def test_routes_by_host_header(router: Router, host: bytes, route: Route) -> None:
    """A request goes to the site that has its Host as name or alias."""
    assert router(None, host, b"/") == route


@pytest.mark.parametrize(
    ("host", "route"),
    [
        (b"example.com:8443", MAIN),
        (b"www.example.com:443", MAIN),
        (b"api.example.com:80", API),
        (b"EXAMPLE.ORG.:8443", ORG),
        (b"example.com:", MAIN),
    ],
)
def test_host_header_port_is_ignored(router: Router, host: bytes, route: Route) -> None:
    """``Host: example.com:8443`` routes like ``Host: example.com``."""
    assert router(None, host, b"/") == route


@pytest.mark.parametrize("host", [b"EXAMPLE.COM", b"Example.Com.", b"WWW.example.com."])
def test_host_header_case_and_trailing_dot_are_ignored(router: Router, host: bytes) -> None:
    """Host names compare case-insensitively, with a final dot ignored."""
    assert router(None, host, b"/") == MAIN


def test_aliases_route_to_owning_site(router: Router) -> None:
    """An alias, including a Unicode one configured by its U-label, routes to its site."""
    assert router(None, b"www.example.com", b"/") == MAIN
    assert router(None, b"xn--bcher-kva.example", b"/") == ORG
    assert router("xn--bcher-kva.example", None, b"/") == ORG


@pytest.mark.parametrize(
    ("host", "route"),
    [
        (b"shop.example.com", MAIN),
        (b"x-1.example.com:8443", MAIN),
        (b"www.example.org", ORG),
        (b"Mail.EXAMPLE.org", ORG),
    ],
)
def test_wildcards_route_to_owning_site(router: Router, host: bytes, route: Route) -> None:
    """A name one label under a site's ``*.`` alias routes to that site."""
    assert router(None, host, b"/") == route


def test_exact_site_beats_another_sites_wildcard(router: Router) -> None:
    """``api.example.com`` is its own site although ``*.example.com`` belongs to another."""
    assert router(None, b"api.example.com", b"/") == API
    assert router("api.example.com", None, b"/") == API


@pytest.mark.parametrize(
    "host",
    [
        b"a.b.example.com",  # two labels below the wildcard
        b"v1.api.example.com",  # under an exact name, with no wildcard of its own
        b"example.net",
        b"com",
        b"localhost",
        b"127.0.0.1",
        b"127.0.0.1:8443",
        b"*.example.com",
    ],
)
def test_unknown_host_has_no_route(router: Router, host: bytes) -> None:
    """A Host that no site claims gets no route (the proxy answers 421), never a default."""
    assert router(None, host, b"/") is None


@pytest.mark.parametrize("host", [b"[::1]", b"[::1]:8443", b"[2001:db8::1]:443", b"[::1"])
def test_ipv6_literal_host_has_no_route(router: Router, host: bytes) -> None:
    """An IPv6 literal Host (bracketed, with or without port) matches no configured name."""
    assert router(None, host, b"/") is None


@pytest.mark.parametrize(
    "host",
    [b"user@example.com", b" example.com", b"example.com\r\n", b"ex\xc3\xa4mple.com", b"\xff"],
)
def test_malformed_host_has_no_route(router: Router, host: bytes) -> None:
    """A malformed Host (userinfo, spaces, raw UTF-8, control bytes) matches nothing."""
    assert router(None, host, b"/") is None


def test_missing_host_falls_back_to_sni(router: Router) -> None:
    """Without a Host header (HTTP/1.0) the TLS server name chooses the site."""
    assert router("api.example.com", None, b"/") == API
    assert router("WWW.Example.com.", None, b"/") == MAIN
    assert router("shop.example.com", None, b"/") == MAIN


def test_empty_host_falls_back_to_sni(router: Router) -> None:
    """An empty Host header counts as missing, so the TLS server name chooses the site."""
    assert router("example.org", b"", b"/") == ORG


def test_host_wins_over_sni(router: Router) -> None:
    """When both are present, the Host header decides, whatever SNI said."""
    assert router("example.com", b"api.example.com", b"/") == API
    assert router("api.example.com", b"example.org:443", b"/") == ORG


def test_unknown_host_does_not_fall_back_to_sni(router: Router) -> None:
    """A Host that matches nothing is not rescued by a matching SNI: no route."""
    assert router("example.com", b"evil.example.net", b"/") is None
    assert router("example.com", b"[::1]:443", b"/") is None


def test_no_host_and_no_sni_has_no_route(router: Router) -> None:
    """A request with neither Host nor SNI (e.g. by IP over plain HTTP) gets no route."""
    assert router(None, None, b"/") is None
    assert router(None, b"", b"/") is None


@pytest.mark.parametrize("sni", ["unknown.example.net", "", "[::1]", "a.b.example.com"])
def test_unknown_sni_without_host_has_no_route(router: Router, sni: str) -> None:
    """Without Host, an SNI no site claims gets no route."""
    assert router(sni, None, b"/") is None


def test_route_names_site_for_logs(router: Router) -> None:
    """The route carries the site's canonical (normalised) name and its backend."""
    route = router(None, b"www.example.org", b"/")
    assert route is not None
    assert route.site == "example.org"
    assert route.backend.url == "http://[::1]:9000"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"example.com", b"example.com"),
        (b"example.com:8443", b"example.com"),
        (b"example.com:", b"example.com"),
        (b"[::1]", b"[::1]"),
        (b"[::1]:8443", b"[::1]"),
        (b"[fe80::1%25eth0]:80", b"[fe80::1%25eth0]"),
        (b"[::1", b"[::1"),
        (b"", b""),
    ],
)
def test_host_without_port(header: bytes, name: bytes) -> None:
    """The port is cut off a Host value; IPv6 literals keep their brackets."""
    assert host_without_port(header) == name


@given(st.sampled_from(sorted(NAMES)), st.integers(min_value=0, max_value=65535), st.data())
def test_any_spelling_and_port_routes_to_the_same_site(
    name: str, port: int, data: st.DataObject
) -> None:
    """Every configured name routes to its site whatever the case, final dot or port."""
    router = Router(parse_yaml(CONFIG, "proxy.yaml"))
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    spelt = "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True))
    spelt += data.draw(st.sampled_from(["", "."]))
    with_port = data.draw(st.booleans())
    host = f"{spelt}:{port}" if with_port else spelt
    assert router(None, host.encode("ascii"), b"/") == NAMES[name]
    assert router(spelt, None, b"/") == NAMES[name]


@given(st.binary(), st.one_of(st.none(), st.text()))
def test_router_never_raises(host: bytes, sni: str | None) -> None:
    """Whatever a client sends as Host and SNI, the router answers a route or None."""
    router = Router(parse_yaml(CONFIG, "proxy.yaml"))
    assert router(sni, host, b"/") in (None, MAIN, API, ORG)


def test_router_reflects_its_own_config_only() -> None:
    """A router built for one configuration does not see sites of another (reload swaps)."""
    old = Router(parse_yaml(CONFIG, "proxy.yaml"))
    new_text = CONFIG.replace("backend: http://127.0.0.1:8001", "backend: http://127.0.0.1:8002")
    new = Router(parse_yaml(new_text, "proxy.yaml"))
    assert old(None, b"api.example.com", b"/") == API
    new_route = new(None, b"api.example.com", b"/")
    assert new_route is not None
    assert new_route.backend.port == 8002


ROUTES_CONFIG = """\
listen:
  https: ["tcp:8443"]
hosts:
  example.com:
    aliases: [www.example.com]
    certificates: [/etc/tlsproxy/example.com.pem]
    backend: http://127.0.0.1:8000
    routes:
      - {path: /ws/, backend: http://127.0.0.1:8001}
      - {path: /static/, backend: http://127.0.0.1:8002}
      - {path: /static/big/, backend: http://127.0.0.1:8003}
  backend-host.example:
    certificates: [/etc/tlsproxy/b.pem]
    backend: http://localhost:9000
    preserve_host: false
    routes:
      - {path: /v6/, backend: "http://[::1]:9001"}
"""


@pytest.mark.parametrize(
    ("target", "port"),
    [
        (b"/", 8000),
        (b"/ws", 8000),  # "/ws/" is the prefix: "/ws" alone is not under it
        (b"/ws/", 8001),
        (b"/ws/chat?room=1", 8001),
        (b"/static/app.css", 8002),
        (b"/static/big/video.mp4", 8003),  # the longest prefix wins, whatever the order
        (b"/staticfoo", 8000),
        (b"/WS/", 8000),  # paths are case-sensitive
        (b"/%77s/", 8000),  # compared as sent, not decoded
        (b"*", 8000),
    ],
)
def test_path_prefix_routes(target: bytes, port: int) -> None:
    """Within a host, the longest matching path prefix picks the backend; other paths
    go to the host's own backend."""
    router = Router(parse_yaml(ROUTES_CONFIG, "proxy.yaml"))
    route = router(None, b"www.example.com:443", target)
    assert route is not None
    assert route.site == "example.com"
    assert route.backend.port == port
    assert route.host_header is None


def test_path_routes_do_not_leak_to_other_sites() -> None:
    """A path routed on one host is not routed on another host."""
    router = Router(parse_yaml(ROUTES_CONFIG, "proxy.yaml"))
    route = router(None, b"backend-host.example", b"/ws/")
    assert route is not None and route.backend.port == 9000
    assert router(None, b"unknown.example", b"/ws/") is None


def test_preserve_host_false_sends_the_backends_own_host() -> None:
    """With preserve_host: false each route carries its backend's host:port as the Host
    to send; with the default (true) none is set."""
    router = Router(parse_yaml(ROUTES_CONFIG, "proxy.yaml"))
    plain = router(None, b"backend-host.example", b"/x")
    v6 = router(None, b"backend-host.example", b"/v6/x")
    assert plain is not None and plain.host_header == b"localhost:9000"
    assert v6 is not None and v6.host_header == b"[::1]:9001"


def test_table_is_shared_by_a_sites_names() -> None:
    """All names of a site find the same route table (what a connection caches)."""
    router = Router(parse_yaml(ROUTES_CONFIG, "proxy.yaml"))
    table = router.table(None, b"example.com")
    assert table is not None
    assert router.table(None, b"WWW.example.com") is table
    assert router.table("example.com", None) is table
    assert table.route(b"/ws/x").backend.port == 8001
