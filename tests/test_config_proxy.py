"""Tests for the proxy engine's configuration: ``proxy:`` limits and deadlines, and
per-host ``routes`` and ``preserve_host`` (`tlsproxy.config`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from tlsproxy.config import PROXY_KEYS, Backend, PathRoute, parse_config
from tlsproxy.errors import ConfigError
from tlsproxy.proxy import ProxySettings
from tlsproxy.service import proxy_settings


def document(proxy: Any = None, **host: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"certificates": ["/c.pem"], "backend": "http://127.0.0.1:8000"}
    body.update(host)
    doc: dict[str, Any] = {"listen": {"https": ["tcp:8443"]}, "hosts": {"example.com": body}}
    if proxy is not None:
        doc["proxy"] = proxy
    return doc


def errors_of(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "proxy.yaml")
    return str(info.value).splitlines()


def test_proxy_keys_are_exactly_the_engine_settings() -> None:
    """Every engine limit and deadline can be set under ``proxy:``, under its own name."""
    assert set(PROXY_KEYS) == {f.name for f in attrs.fields(ProxySettings)}


def test_without_proxy_section_the_engine_defaults_apply() -> None:
    """A config without ``proxy:`` runs the engine with its documented defaults."""
    assert proxy_settings(parse_config(document(), "proxy.yaml")) == ProxySettings()


def test_every_proxy_setting_decodes() -> None:
    """Times are seconds, sizes bytes or K/M/G (powers of 1024), counts whole numbers."""
    config = parse_config(
        document(
            {
                "client_header_timeout": 1,
                "client_body_timeout": 2.5,
                "keepalive_timeout": 3,
                "client_send_timeout": 4,
                "max_request_line": "4K",
                "max_header_bytes": 8192,
                "max_header_count": 50,
                "max_body_bytes": "1G",
                "backend_connect_timeout": 5,
                "backend_read_timeout": 6,
                "backend_idle_timeout": 0.5,
                "backend_max_idle": 7,
                "max_response_header_bytes": "32KiB",
                "sweep_interval": 0.25,
            }
        ),
        "proxy.yaml",
    )
    assert proxy_settings(config) == ProxySettings(
        client_header_timeout=1.0,
        client_body_timeout=2.5,
        keepalive_timeout=3.0,
        client_send_timeout=4.0,
        max_request_line=4096,
        max_header_bytes=8192,
        max_header_count=50,
        max_body_bytes=1024**3,
        backend_connect_timeout=5.0,
        backend_read_timeout=6.0,
        backend_idle_timeout=0.5,
        backend_max_idle=7,
        max_response_header_bytes=32768,
        sweep_interval=0.25,
    )


def test_body_size_may_be_unlimited() -> None:
    """``max_body_bytes: unlimited`` turns the request body limit off."""
    config = parse_config(document({"max_body_bytes": "unlimited"}), "proxy.yaml")
    assert proxy_settings(config).max_body_bytes is None


@pytest.mark.parametrize(
    ("proxy", "line"),
    [
        (
            {"client_header_timeout": 0},
            "proxy.yaml: proxy.client_header_timeout: must be more than 0 and at most 86400"
            " seconds, not 0",
        ),
        (
            {"keepalive_timeout": "75s"},
            "proxy.yaml: proxy.keepalive_timeout: must be a number of seconds, not a string",
        ),
        (
            {"backend_read_timeout": True},
            "proxy.yaml: proxy.backend_read_timeout: must be a number of seconds, not a boolean",
        ),
        (
            {"max_body_bytes": "100 MB!"},
            "proxy.yaml: proxy.max_body_bytes: must be a size above 0 such as 16384, 64K, 100M"
            " or 1G or unlimited, not '100 MB!'",
        ),
        (
            {"max_header_bytes": 0},
            "proxy.yaml: proxy.max_header_bytes: must be a size above 0 such as 16384, 64K,"
            " 100M or 1G, not 0",
        ),
        (
            {"max_header_count": 1.5},
            "proxy.yaml: proxy.max_header_count: must be a whole number, not a number",
        ),
        (
            {"client_timeout": 5},
            "proxy.yaml: proxy.client_timeout: unknown key; allowed keys are: "
            + ", ".join(PROXY_KEYS),
        ),
        ("fast", "proxy.yaml: proxy: must be a mapping, not a string"),
    ],
)
def test_bad_proxy_values_are_reported(proxy: Any, line: str) -> None:
    """A bad limit or deadline names its key and what is allowed."""
    assert line in errors_of(document(proxy))


def test_all_proxy_problems_in_one_pass() -> None:
    """Every bad ``proxy:`` value is reported at once."""
    lines = errors_of(document({"client_header_timeout": -1, "max_header_count": 0}))
    assert sum("proxy." in line for line in lines) == 2


def test_routes_decode_longest_prefix_first() -> None:
    """``routes`` become path routes sorted longest prefix first; ``preserve_host``
    defaults to true."""
    config = parse_config(
        document(
            routes=[
                {"path": "/static/", "backend": "http://127.0.0.1:8002"},
                {"path": "/static/big/", "backend": "http://127.0.0.1:8003"},
                {"path": "/ws/", "backend": "http://127.0.0.1:8001"},
            ]
        ),
        "proxy.yaml",
    )
    [host] = config.hosts
    assert host.routes == (
        PathRoute("/static/big/", Backend("http", "127.0.0.1", 8003)),
        PathRoute("/static/", Backend("http", "127.0.0.1", 8002)),
        PathRoute("/ws/", Backend("http", "127.0.0.1", 8001)),
    )
    assert host.preserve_host is True


def test_preserve_host_false() -> None:
    """``preserve_host: false`` is kept on the host."""
    [host] = parse_config(document(preserve_host=False), "proxy.yaml").hosts
    assert host.preserve_host is False


@pytest.mark.parametrize(
    ("routes", "line"),
    [
        (
            [{"path": "ws/", "backend": "http://127.0.0.1:1"}],
            "proxy.yaml: hosts.example.com.routes[0].path: must start with /, not 'ws/'",
        ),
        (
            [{"path": "/a?b", "backend": "http://127.0.0.1:1"}],
            "proxy.yaml: hosts.example.com.routes[0].path: must be a URL path without query,"
            " fragment, spaces or control characters, not '/a?b'",
        ),
        (
            [
                {"path": "/ws/", "backend": "http://127.0.0.1:1"},
                {"path": "/ws/", "backend": "http://127.0.0.1:2"},
            ],
            "proxy.yaml: hosts.example.com.routes[1].path: /ws/ is already routed by"
            " hosts.example.com.routes[0]",
        ),
        (
            [{"path": "/ws/", "backend": "ftp://127.0.0.1:1"}],
            "proxy.yaml: hosts.example.com.routes[0].backend: must be an http:// or https:// "
            "URL such as http://127.0.0.1:8000, not 'ftp://127.0.0.1:1'",
        ),
        (
            [{"path": "/ws/"}],
            "proxy.yaml: hosts.example.com.routes[0].backend: is required",
        ),
        (
            [{"path": "/ws/", "backend": "http://127.0.0.1:1", "strip": True}],
            "proxy.yaml: hosts.example.com.routes[0].strip: unknown key; allowed keys are:"
            " path, backend",
        ),
        (
            {"path": "/ws/", "backend": "http://127.0.0.1:1"},
            "proxy.yaml: hosts.example.com.routes: must be a list of {path, backend} mappings,"
            " not a mapping",
        ),
    ],
)
def test_bad_routes_are_reported(routes: Any, line: str) -> None:
    """A bad path route names its key path and the reason."""
    assert line in errors_of(document(routes=routes))


def test_preserve_host_must_be_boolean() -> None:
    """``preserve_host`` takes true or false only."""
    assert (
        "proxy.yaml: hosts.example.com.preserve_host: must be true or false, not a string"
        in errors_of(document(preserve_host="no"))
    )


def test_readme_documents_every_proxy_setting_with_its_default() -> None:
    """The README's limits table lists every ``proxy:`` key with the engine's real default."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Proxy behaviour, limits and timeouts", 1)[1]
    documented = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `([a-z_]+)` \| `([^`]+)` \|", section, re.MULTILINE)
    }
    defaults = ProxySettings()
    for key in PROXY_KEYS:
        assert key in documented, key
        config = parse_config(document({key: _yaml_value(documented[key])}), "proxy.yaml")
        assert getattr(proxy_settings(config), key) == getattr(defaults, key), key


def _yaml_value(text: str) -> object:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text  # a size such as 16K
