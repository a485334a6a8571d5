"""Tests for `tlsproxy.config`: YAML text in, frozen `Config` out, every mistake reported.

Most tests assert the exact line a user would see, ``source: key.path: reason``,
because those lines are the interface of this module.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

import tlsproxy.config as config_module
from tlsproxy.config import (
    Backend,
    CertificateSource,
    Config,
    HostConfig,
    Listen,
    TLSSettings,
    load_config,
    parse_config,
    parse_yaml,
)
from tlsproxy.errors import ConfigError, Problem

VALID_YAML = """\
listen:
  https: ["tcp:8443:interface=127.0.0.1"]
  http:  ["tcp:8080:interface=127.0.0.1"]
tls:
  profile: intermediate
default_host: example.com
hosts:
  example.com:
    aliases: [www.example.com, "*.example.com"]
    certificates:
      - /etc/tlsproxy/example.com-ecdsa.pem
      - {key: /etc/tlsproxy/rsa.key, cert: /etc/tlsproxy/rsa.crt, chain: /etc/tlsproxy/chain.pem}
    backend: http://127.0.0.1:8000
"""

# The allowed-key lists are taken from the module so that adding a setting does not
# break these tests; the tests still check that the message lists them all, in order.
TOP_KEYS = ", ".join(config_module._TOP_KEYS)
TLS_KEYS = ", ".join(config_module._TLS_KEYS)
HOST_KEYS = ", ".join(config_module._HOST_KEYS)


def valid_doc() -> dict[str, Any]:
    """A fresh, mutable copy of the valid example as a decoded document."""
    return copy.deepcopy(yaml.safe_load(VALID_YAML))


def site(**overrides: Any) -> dict[str, Any]:
    """A minimal valid body for one entry under ``hosts``."""
    body: dict[str, Any] = {"certificates": ["/c.pem"], "backend": "http://127.0.0.1:8000"}
    body.update(overrides)
    return body


def errors_of(document: object) -> list[str]:
    """The lines printed for a document that must be rejected."""
    with pytest.raises(ConfigError) as info:
        parse_config(document, "proxy.yaml")
    return str(info.value).splitlines()


def yaml_errors_of(text: str) -> list[str]:
    """The lines printed for YAML text that must be rejected."""
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "proxy.yaml")
    return str(info.value).splitlines()


def with_tls(**tls: Any) -> dict[str, Any]:
    doc = valid_doc()
    doc["tls"] = tls
    return doc


def with_host(**body: Any) -> dict[str, Any]:
    """The valid example with the site's body replaced by ``body``."""
    doc = valid_doc()
    doc["hosts"] = {"example.com": body}
    return doc


def with_site(**overrides: Any) -> dict[str, Any]:
    """The valid example with one key of its site overridden."""
    doc = valid_doc()
    doc["hosts"]["example.com"].update(overrides)
    return doc


def backend_errors(url: object) -> list[str]:
    return errors_of(with_site(backend=url))


# --- the valid example --------------------------------------------------------


def test_valid_example_decodes_to_expected_objects() -> None:
    """The documented example configuration loads into exactly the values it describes."""
    config = parse_yaml(VALID_YAML, "proxy.yaml")
    assert config == Config(
        source="proxy.yaml",
        listen=Listen(
            https=("tcp:8443:interface=127.0.0.1",),
            http=("tcp:8080:interface=127.0.0.1",),
        ),
        tls=TLSSettings(profile="intermediate"),
        default_host="example.com",
        hosts=(
            HostConfig(
                name="example.com",
                aliases=("www.example.com", "*.example.com"),
                certificates=(
                    CertificateSource(
                        key="/etc/tlsproxy/example.com-ecdsa.pem",
                        cert="/etc/tlsproxy/example.com-ecdsa.pem",
                        chain=None,
                        path="hosts.example.com.certificates[0]",
                    ),
                    CertificateSource(
                        key="/etc/tlsproxy/rsa.key",
                        cert="/etc/tlsproxy/rsa.crt",
                        chain="/etc/tlsproxy/chain.pem",
                        path="hosts.example.com.certificates[1]",
                    ),
                ),
                backend=Backend(scheme="http", host="127.0.0.1", port=8000),
            ),
        ),
    )


def test_config_values_are_frozen() -> None:
    """A loaded configuration cannot be changed in place; reload builds a new one."""
    config = parse_yaml(VALID_YAML, "proxy.yaml")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.default_host = "other.example"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.hosts[0].backend.port = 1  # type: ignore[misc]


def test_tls_defaults_when_tls_section_is_absent() -> None:
    """Leaving out ``tls`` gives the intermediate profile with session tickets on."""
    doc = valid_doc()
    del doc["tls"]
    assert parse_config(doc, "proxy.yaml").tls == TLSSettings(
        profile="intermediate",
        min_version=None,
        ciphers=None,
        ciphersuites=None,
        groups=None,
        dhparam=None,
        session_tickets=True,
        session_ticket_rotation=43200.0,
    )


def test_every_tls_setting_decodes() -> None:
    """Each TLS override is carried through as written."""
    doc = with_tls(
        profile="modern",
        min_version="1.3",
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
        ciphersuites="TLS_AES_128_GCM_SHA256",
        groups=["X25519", "P-256"],
        dhparam="/etc/tlsproxy/dhparam.pem",
        session_tickets=False,
        session_ticket_rotation=3600,
    )
    assert parse_config(doc, "proxy.yaml").tls == TLSSettings(
        profile="modern",
        min_version="1.3",
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
        ciphersuites="TLS_AES_128_GCM_SHA256",
        groups=("X25519", "P-256"),
        dhparam="/etc/tlsproxy/dhparam.pem",
        session_tickets=False,
        session_ticket_rotation=3600.0,
    )


@pytest.mark.parametrize(
    ("written", "expected"), [("1.2", "1.2"), ("1.3", "1.3"), ('"1.2"', "1.2")]
)
def test_min_version_written_as_yaml_number_is_accepted(written: str, expected: str) -> None:
    """``min_version: 1.2`` works although YAML reads an unquoted 1.2 as a number."""
    config = parse_yaml(
        VALID_YAML.replace("  profile: intermediate", f"  min_version: {written}"), "p"
    )
    assert config.tls.min_version == expected


def test_groups_may_be_one_colon_separated_string() -> None:
    """``groups: X25519:P-256`` is the same as a list of the two groups."""
    config = parse_config(with_tls(groups="X25519:P-256"), "proxy.yaml")
    assert config.tls.groups == ("X25519", "P-256")


def test_single_strings_are_accepted_where_lists_are_expected() -> None:
    """A lone listener, alias or certificate may be written without list brackets."""
    text = """\
listen:
  https: tcp:443
  http: tcp:80
hosts:
  example.com:
    aliases: www.example.com
    certificates: /etc/tlsproxy/example.com.pem
    backend: http://127.0.0.1:8000
"""
    config = parse_yaml(text, "proxy.yaml")
    assert config.listen == Listen(https=("tcp:443",), http=("tcp:80",))
    assert config.hosts[0].aliases == ("www.example.com",)
    assert config.hosts[0].certificates == (
        CertificateSource(
            key="/etc/tlsproxy/example.com.pem",
            cert="/etc/tlsproxy/example.com.pem",
            chain=None,
            path="hosts.example.com.certificates[0]",
        ),
    )


def test_single_certificate_mapping_is_accepted_without_a_list() -> None:
    """``certificates: {cert: ..., key: ...}`` is one certificate."""
    config = parse_config(with_site(certificates={"cert": "/c.crt", "key": "/k.key"}), "p.yaml")
    assert config.hosts[0].certificates == (
        CertificateSource(
            key="/k.key", cert="/c.crt", chain=None, path="hosts.example.com.certificates[0]"
        ),
    )


def test_certificate_mapping_without_key_uses_cert_file_for_key() -> None:
    """A certificate mapping with only ``cert`` reads the private key from that same file."""
    config = parse_config(with_site(certificates=[{"cert": "/both.pem"}]), "p.yaml")
    assert config.hosts[0].certificates[0] == CertificateSource(
        key="/both.pem", cert="/both.pem", chain=None, path="hosts.example.com.certificates[0]"
    )


def test_only_http_listener_is_enough() -> None:
    """A configuration may listen on plain HTTP only."""
    doc = valid_doc()
    doc["listen"] = {"http": ["tcp:80"]}
    assert parse_config(doc, "p.yaml").listen == Listen(https=(), http=("tcp:80",))


@pytest.mark.parametrize(
    ("url", "backend", "shown"),
    [
        ("http://127.0.0.1:8000", Backend("http", "127.0.0.1", 8000), "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", Backend("http", "127.0.0.1", 8000), "http://127.0.0.1:8000"),
        ("http://app.internal", Backend("http", "app.internal", 80), "http://app.internal:80"),
        ("HTTP://App.Internal:81", Backend("http", "app.internal", 81), "http://app.internal:81"),
        ("http://[::1]:8000", Backend("http", "::1", 8000), "http://[::1]:8000"),
    ],
)
def test_backend_urls_that_are_accepted(url: str, backend: Backend, shown: str) -> None:
    """A backend is an http:// URL with a host and an optional port (80 by default)."""
    config = parse_config(with_site(backend=url), "p.yaml")
    assert config.hosts[0].backend == backend
    assert config.hosts[0].backend.url == shown


def test_host_names_are_normalised() -> None:
    """Site names and aliases are stored lower case, as A-labels, without a final dot."""
    doc = valid_doc()
    doc["hosts"] = {"Bücher.Example.": site(aliases=["WWW.Bücher.Example.", "*.BÜCHER.example"])}
    doc["default_host"] = "bücher.example"
    host = parse_config(doc, "p.yaml").hosts[0]
    assert host.name == "xn--bcher-kva.example"
    assert host.aliases == ("www.xn--bcher-kva.example", "*.xn--bcher-kva.example")
    assert host.names == (host.name, *host.aliases)


def test_hosts_keep_file_order_and_can_be_found_by_name() -> None:
    """Sites appear in the order of the file and `Config.host` finds one by its name."""
    doc = valid_doc()
    doc["hosts"]["b.example"] = site(backend="http://10.0.0.2:80")
    doc["hosts"]["a.example"] = site(backend="http://10.0.0.1:80")
    config = parse_config(doc, "p.yaml")
    assert [h.name for h in config.hosts] == ["example.com", "b.example", "a.example"]
    assert config.host("a.example").backend.host == "10.0.0.1"
    with pytest.raises(KeyError):
        config.host("www.example.com")  # an alias is not a site name


# --- default_host -------------------------------------------------------------


def test_default_host_defaults_to_first_host() -> None:
    """Without ``default_host`` the first site in the file is the default."""
    doc = valid_doc()
    del doc["default_host"]
    doc["hosts"]["other.example"] = site()
    assert parse_config(doc, "p.yaml").default_host == "example.com"


def test_default_host_defaults_to_first_host_normalised() -> None:
    """The implicit default is the first site's normalised name."""
    doc = valid_doc()
    del doc["default_host"]
    doc["hosts"] = {"WWW.Example.ORG.": site(), "example.com": site()}
    assert parse_config(doc, "p.yaml").default_host == "www.example.org"


@pytest.mark.parametrize("written", ["OTHER.example", "other.example.", "Other.EXAMPLE."])
def test_default_host_is_normalised(written: str) -> None:
    """``default_host`` matches a site regardless of case and a trailing dot."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site()
    doc["default_host"] = written
    assert parse_config(doc, "p.yaml").default_host == "other.example"


def test_unknown_default_host() -> None:
    """A ``default_host`` that is not a site is reported with the name as written."""
    doc = valid_doc()
    doc["default_host"] = "Exmaple.com"
    assert errors_of(doc) == [
        "proxy.yaml: default_host: 'Exmaple.com' is not one of the names under hosts"
    ]


def test_default_host_must_be_a_site_name_not_an_alias() -> None:
    """``default_host`` names a site; one of its aliases is not accepted."""
    doc = valid_doc()
    doc["default_host"] = "www.example.com"
    assert errors_of(doc) == [
        "proxy.yaml: default_host: 'www.example.com' is not one of the names under hosts"
    ]


def test_invalid_default_host() -> None:
    """A ``default_host`` that is not a host name says what is wrong with it."""
    doc = valid_doc()
    doc["default_host"] = "exa mple.com"
    assert errors_of(doc) == ["proxy.yaml: default_host: host name has an invalid label 'exa mple'"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "must be a string, not nothing"),
        (["a"], "must be a string, not a list"),
        ("  ", "must not be empty"),
    ],
)
def test_default_host_must_be_a_string(value: object, reason: str) -> None:
    """``default_host`` must be a non-empty string."""
    doc = valid_doc()
    doc["default_host"] = value
    assert errors_of(doc) == [f"proxy.yaml: default_host: {reason}"]


def test_unknown_default_host_not_reported_when_hosts_are_broken() -> None:
    """When a site itself is broken, ``default_host`` naming it is not reported as unknown too."""
    doc = valid_doc()
    doc["hosts"]["example.com"]["backend"] = "ftp://x"
    assert errors_of(doc) == [
        "proxy.yaml: hosts.example.com.backend: must be an http:// or https:// URL such as "
        "http://127.0.0.1:8000, not 'ftp://x'"
    ]


def test_unknown_default_host_not_reported_when_hosts_is_missing() -> None:
    """Without any ``hosts`` only the missing section is reported, not ``default_host``."""
    doc = valid_doc()
    del doc["hosts"]
    assert errors_of(doc) == ["proxy.yaml: hosts: is required"]


# --- whole-document and section shape ----------------------------------------


def test_document_must_be_a_mapping() -> None:
    """A file whose top level is not a mapping is rejected without a key path."""
    assert yaml_errors_of("- listen\n- hosts\n") == ["proxy.yaml: must be a mapping, not a list"]


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    """An empty file says it is empty and what it needs."""
    assert yaml_errors_of(text) == ["proxy.yaml: is empty; it needs at least listen and hosts"]


def test_allowed_key_lists_name_the_documented_settings() -> None:
    """The allowed-key lists shown to users contain the documented settings, in that order."""
    assert TOP_KEYS.startswith("listen, tls, default_host, hosts")
    assert TLS_KEYS == (
        "profile, min_version, ciphers, ciphersuites, groups, dhparam, session_tickets, "
        "session_ticket_rotation"
    )
    assert HOST_KEYS.startswith("aliases, certificates, backend")


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    """A misspelt top-level key is named and the allowed keys are listed."""
    doc = valid_doc()
    doc["lsiten"] = doc.pop("listen")
    assert errors_of(doc) == [
        f"proxy.yaml: lsiten: unknown key; allowed keys are: {TOP_KEYS}",
        "proxy.yaml: listen: is required (for example https: ['tcp:443'])",
    ]


def test_hosts_is_required() -> None:
    """A file without ``hosts`` says that it is required."""
    doc = valid_doc()
    del doc["hosts"]
    del doc["default_host"]
    assert errors_of(doc) == ["proxy.yaml: hosts: is required"]


def test_listen_is_required() -> None:
    """A file without ``listen`` says so with an example."""
    doc = valid_doc()
    del doc["listen"]
    assert errors_of(doc) == ["proxy.yaml: listen: is required (for example https: ['tcp:443'])"]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (["tcp:443"], "a list"),
        ("tcp:443", "a string"),
        (None, "nothing"),
        (443, "a number"),
        (True, "a boolean"),
        (1.5, "a number"),
    ],
)
def test_listen_must_be_a_mapping(value: object, kind: str) -> None:
    """``listen`` must be a mapping; the message says what was found instead."""
    doc = valid_doc()
    doc["listen"] = value
    assert errors_of(doc) == [f"proxy.yaml: listen: must be a mapping, not {kind}"]


def test_unknown_listen_key_lists_allowed_keys() -> None:
    """A misspelt key under ``listen`` lists https and http."""
    doc = valid_doc()
    doc["listen"]["htps"] = ["tcp:443"]
    assert errors_of(doc) == ["proxy.yaml: listen.htps: unknown key; allowed keys are: https, http"]


@pytest.mark.parametrize("listen", [{}, {"https": [], "http": []}, {"https": []}])
def test_listen_needs_an_endpoint(listen: dict[str, Any]) -> None:
    """Listening nowhere is refused."""
    doc = valid_doc()
    doc["listen"] = listen
    assert errors_of(doc) == ["proxy.yaml: listen: must name at least one https or http endpoint"]


def test_listen_entries_must_be_a_list() -> None:
    """``listen.https`` must be a list (or one string)."""
    doc = valid_doc()
    doc["listen"]["https"] = 443
    assert errors_of(doc) == ["proxy.yaml: listen.https: must be a list, not a number"]


def test_listen_endpoints_must_be_strings() -> None:
    """Each endpoint is a Twisted endpoint string; a bare port number is refused at its index."""
    doc = valid_doc()
    doc["listen"]["http"] = ["tcp:80", 8080, ""]
    assert errors_of(doc) == [
        "proxy.yaml: listen.http[1]: must be a string, not a number",
        "proxy.yaml: listen.http[2]: must not be empty",
    ]


# --- tls ---------------------------------------------------------------------


def test_tls_must_be_a_mapping() -> None:
    """``tls`` must be a mapping."""
    doc = valid_doc()
    doc["tls"] = "modern"
    assert errors_of(doc) == ["proxy.yaml: tls: must be a mapping, not a string"]


def test_unknown_tls_key_lists_allowed_keys() -> None:
    """A misspelt TLS setting lists every TLS setting."""
    assert errors_of(with_tls(cipher="AES")) == [
        f"proxy.yaml: tls.cipher: unknown key; allowed keys are: {TLS_KEYS}"
    ]


def test_unknown_profile() -> None:
    """Only the modern and intermediate profiles exist."""
    assert errors_of(with_tls(profile="old")) == [
        "proxy.yaml: tls.profile: must be one of modern, intermediate, not 'old'"
    ]


@pytest.mark.parametrize(
    ("value", "shown"), [(1.1, "'1.1'"), ("1.0", "'1.0'"), (1, "'1'"), (None, "None")]
)
def test_unknown_min_version(value: object, shown: str) -> None:
    """``min_version`` is 1.2 or 1.3; older versions are refused."""
    assert errors_of(with_tls(min_version=value)) == [
        f"proxy.yaml: tls.min_version: must be one of 1.2, 1.3, not {shown}"
    ]


@pytest.mark.parametrize("key", ["ciphers", "ciphersuites", "dhparam"])
def test_tls_strings_must_be_strings(key: str) -> None:
    """Cipher strings and the dhparam path must be non-empty strings."""
    assert errors_of(with_tls(**{key: ["AES"]})) == [
        f"proxy.yaml: tls.{key}: must be a string, not a list"
    ]
    assert errors_of(with_tls(**{key: ""})) == [f"proxy.yaml: tls.{key}: must not be empty"]


@pytest.mark.parametrize("groups", [[], "", ":"])
def test_groups_must_not_be_empty(groups: object) -> None:
    """An empty ``groups`` list would disable key exchange and is refused."""
    assert errors_of(with_tls(groups=groups)) == [
        "proxy.yaml: tls.groups: must name at least one group"
    ]


def test_groups_must_be_a_list_of_strings() -> None:
    """``groups`` is a list of names (or one colon-separated string)."""
    assert errors_of(with_tls(groups=25519)) == [
        "proxy.yaml: tls.groups: must be a list, not a number"
    ]
    assert errors_of(with_tls(groups=["X25519", 256])) == [
        "proxy.yaml: tls.groups[1]: must be a string, not a number"
    ]


@pytest.mark.parametrize(
    ("value", "kind"), [("yes please", "a string"), (1, "a number"), (None, "nothing")]
)
def test_session_tickets_must_be_boolean(value: object, kind: str) -> None:
    """``session_tickets`` is true or false."""
    assert errors_of(with_tls(session_tickets=value)) == [
        f"proxy.yaml: tls.session_tickets: must be true or false, not {kind}"
    ]


@pytest.mark.parametrize("value", [59, 604801, -1, 0, "12h", True, None, float("inf")])
def test_session_ticket_rotation_is_a_minute_to_a_week(value: object) -> None:
    """``session_ticket_rotation`` is a number of seconds from a minute to a week: keys
    that live longer weaken forward secrecy, shorter ones make returning clients pay full
    handshakes."""
    assert errors_of(with_tls(session_ticket_rotation=value)) == [
        "proxy.yaml: tls.session_ticket_rotation: must be a number of seconds from 60 to "
        f"604800, not {value!r}"
    ]


@pytest.mark.parametrize("value", [60, 604800, 1800.5])
def test_session_ticket_rotation_bounds_are_allowed(value: float) -> None:
    """The bounds themselves and fractions are accepted."""
    assert parse_config(with_tls(session_ticket_rotation=value), "p").tls == TLSSettings(
        session_ticket_rotation=float(value)
    )


def test_yaml_yes_no_are_booleans() -> None:
    """YAML's ``no`` turns session tickets off, as a YAML user expects."""
    text = VALID_YAML.replace("  profile: intermediate", "  session_tickets: no")
    assert parse_yaml(text, "p").tls.session_tickets is False


# --- hosts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"), [(["example.com"], "a list"), (None, "nothing"), ("example.com", "a string")]
)
def test_hosts_must_be_a_mapping(value: object, kind: str) -> None:
    """``hosts`` maps names to sites; anything else is refused."""
    doc = valid_doc()
    doc["hosts"] = value
    assert errors_of(doc) == [
        f"proxy.yaml: hosts: must be a mapping of host names to sites, not {kind}"
    ]


def test_hosts_must_not_be_empty() -> None:
    """``hosts: {}`` is refused with a message that says a site is needed."""
    doc = valid_doc()
    doc["hosts"] = {}
    assert errors_of(doc) == ["proxy.yaml: hosts: must name at least one site"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("exa_mple.com", "host name has an invalid label 'exa_mple'"),
        ("-example.com", "host name has an invalid label '-example'"),
        ("example..com", "host name has an invalid label ''"),
        (".", "host name is empty"),
        ("a" * 64 + ".com", f"host name has an invalid label '{'a' * 64}'"),
        ("a." * 127 + "com", "host name is longer than 253 characters"),
    ],
)
def test_invalid_site_name(name: str, reason: str) -> None:
    """A site name that is not a DNS name is reported with why."""
    doc = valid_doc()
    doc["hosts"] = {name: site()}
    del doc["default_host"]
    assert errors_of(doc) == [f"proxy.yaml: hosts.{name}: is not a valid host name: {reason}"]


def test_invalid_internationalised_site_name() -> None:
    """A Unicode site name that IDNA refuses is reported as such."""
    doc = valid_doc()
    doc["hosts"] = {"a\u200db.example": site()}  # a joiner where none is allowed
    del doc["default_host"]
    (line,) = errors_of(doc)
    assert line.startswith(
        "proxy.yaml: hosts.a\u200db.example: is not a valid host name: "
        "not a valid internationalised host name ("
    )


def test_wildcard_site_name_points_to_aliases() -> None:
    """A wildcard cannot be a site's name; the message says to make it an alias."""
    doc = valid_doc()
    doc["hosts"] = {"*.example.com": site()}
    del doc["default_host"]
    assert errors_of(doc) == [
        "proxy.yaml: hosts.*.example.com: a wildcard cannot name a site; "
        "list it under a site's aliases"
    ]


@pytest.mark.parametrize(
    ("body", "kind"), [("http://127.0.0.1:8000", "a string"), (None, "nothing"), ([], "a list")]
)
def test_site_must_be_a_mapping(body: object, kind: str) -> None:
    """Each site is a mapping of its settings."""
    doc = valid_doc()
    doc["hosts"]["example.com"] = body
    assert errors_of(doc) == [f"proxy.yaml: hosts.example.com: must be a mapping, not {kind}"]


def test_unknown_site_key_lists_allowed_keys() -> None:
    """A misspelt site setting lists the allowed ones."""
    assert errors_of(with_site(backends="http://x")) == [
        f"proxy.yaml: hosts.example.com.backends: unknown key; allowed keys are: {HOST_KEYS}"
    ]


def test_site_requires_certificates_and_backend() -> None:
    """A site without certificates and backend reports both as required."""
    assert errors_of(with_host(aliases=["www.example.com"])) == [
        "proxy.yaml: hosts.example.com.certificates: is required",
        "proxy.yaml: hosts.example.com.backend: is required",
    ]


# aliases


def test_aliases_must_be_a_list() -> None:
    """``aliases`` is a list of names."""
    assert errors_of(with_site(aliases={"www.example.com": None})) == [
        "proxy.yaml: hosts.example.com.aliases: must be a list, not a mapping"
    ]


def test_alias_must_be_a_host_name() -> None:
    """An alias that is not a string is refused at its index."""
    assert errors_of(with_site(aliases=["www.example.com", 42])) == [
        "proxy.yaml: hosts.example.com.aliases[1]: must be a host name, not a number"
    ]


@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("*.com", "a wildcard must have at least two labels after '*.'"),
        ("a.*.com", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("*", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("w*.example.com", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("*.", "host name is empty"),
        ("", "host name is empty"),
        ("www_1.example.com", "host name has an invalid label 'www_1'"),
        ("www.example.com\n", "host name has an invalid label 'com\\n'"),
        ("x" * 250 + ".com", "host name is longer than 253 characters"),
    ],
)
def test_invalid_alias(alias: str, reason: str) -> None:
    """An alias that is not a host name or a valid ``*.`` wildcard says why."""
    assert errors_of(with_site(aliases=[alias])) == [
        f"proxy.yaml: hosts.example.com.aliases[0]: {reason}"
    ]


def test_invalid_internationalised_alias() -> None:
    """A Unicode alias that IDNA refuses is reported as such."""
    (line,) = errors_of(with_site(aliases=["a\u200db.example"]))
    assert line.startswith(
        "proxy.yaml: hosts.example.com.aliases[0]: not a valid internationalised host name ("
    )


# certificates


def test_certificates_must_not_be_empty() -> None:
    """A site needs at least one certificate."""
    assert errors_of(with_site(certificates=[])) == [
        "proxy.yaml: hosts.example.com.certificates: must list at least one certificate"
    ]


def test_certificates_must_be_a_list() -> None:
    """``certificates`` is a list (or one entry)."""
    assert errors_of(with_site(certificates=3)) == [
        "proxy.yaml: hosts.example.com.certificates: must be a list, not a number"
    ]


def test_certificate_path_must_not_be_blank() -> None:
    """A certificate written as a blank path is refused at its index."""
    assert errors_of(with_site(certificates=["/c.pem", "  "])) == [
        "proxy.yaml: hosts.example.com.certificates[1]: must be a file path"
    ]


def test_certificate_entry_must_be_path_or_mapping() -> None:
    """A certificate entry that is neither a path nor a mapping is refused."""
    assert errors_of(with_site(certificates=[7])) == [
        "proxy.yaml: hosts.example.com.certificates[0]: must be a mapping, not a number"
    ]


def test_certificate_mapping_requires_cert() -> None:
    """A certificate mapping must name its ``cert`` file."""
    assert errors_of(with_site(certificates=[{"key": "/k.key"}])) == [
        "proxy.yaml: hosts.example.com.certificates[0].cert: is required"
    ]


def test_unknown_certificate_key_lists_allowed_keys() -> None:
    """A misspelt key in a certificate mapping lists key, cert and chain."""
    assert errors_of(with_site(certificates=[{"cert": "/c", "chian": "/ch"}])) == [
        "proxy.yaml: hosts.example.com.certificates[0].chian: unknown key; "
        "allowed keys are: key, cert, chain"
    ]


def test_certificate_mapping_values_must_be_strings() -> None:
    """``cert``, ``key`` and ``chain`` must be non-empty strings, each reported."""
    entry = {"cert": ["/c"], "key": "", "chain": 5}
    assert errors_of(with_site(certificates=[entry])) == [
        "proxy.yaml: hosts.example.com.certificates[0].cert: must be a string, not a list",
        "proxy.yaml: hosts.example.com.certificates[0].key: must not be empty",
        "proxy.yaml: hosts.example.com.certificates[0].chain: must be a string, not a number",
    ]


def test_every_bad_certificate_is_reported() -> None:
    """All bad certificate entries of a site are reported, not only the first."""
    assert errors_of(with_site(certificates=["", "/ok.pem", {"key": "/k"}])) == [
        "proxy.yaml: hosts.example.com.certificates[0]: must be a file path",
        "proxy.yaml: hosts.example.com.certificates[2].cert: is required",
    ]


# backend


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "ftp://127.0.0.1:8443",
            "must be an http:// or https:// URL such as http://127.0.0.1:8000, "
            "not 'ftp://127.0.0.1:8443'",
        ),
        (
            "127.0.0.1:8000",
            "must be an http:// or https:// URL such as http://127.0.0.1:8000, "
            "not '127.0.0.1:8000'",
        ),
        (
            "localhost:8000",
            "must be an http:// or https:// URL such as http://127.0.0.1:8000, "
            "not 'localhost:8000'",
        ),
        (
            "unix:/run/app.sock",
            "must be an http:// or https:// URL such as http://127.0.0.1:8000, "
            "not 'unix:/run/app.sock'",
        ),
        ("http://", "must name a host, as in http://127.0.0.1:8000"),
        ("http://:8000", "must name a host, as in http://127.0.0.1:8000"),
        (
            "http://127.0.0.1:8000/app",
            "must be scheme://host:port only (no path, query or credentials)",
        ),
        (
            "http://127.0.0.1:8000?x=1",
            "must be scheme://host:port only (no path, query or credentials)",
        ),
        (
            "http://127.0.0.1:8000#top",
            "must be scheme://host:port only (no path, query or credentials)",
        ),
        (
            "http://user:pw@127.0.0.1:8000",
            "must be scheme://host:port only (no path, query or credentials)",
        ),
        (
            "http://:secret@127.0.0.1:8000",
            "must be scheme://host:port only (no path, query or credentials)",
        ),
        ("http://127.0.0.1:99999", "is not a valid URL (Port out of range 0-65535)"),
        (
            "http://127.0.0.1:http",
            "is not a valid URL (Port could not be cast to integer value as 'http')",
        ),
        ("http://[::1:8000", "is not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:0", "must have a port from 1 to 65535, not 0"),
        ("", "must not be empty"),
    ],
)
def test_invalid_backend(url: str, reason: str) -> None:
    """A backend that is not a plain http://host:port URL is refused, saying why."""
    assert backend_errors(url) == [f"proxy.yaml: hosts.example.com.backend: {reason}"]


def test_backend_must_be_a_string() -> None:
    """A backend written as a mapping or number is refused."""
    assert backend_errors({"host": "127.0.0.1", "port": 8000}) == [
        "proxy.yaml: hosts.example.com.backend: must be a string, not a mapping"
    ]
    assert backend_errors(8000) == [
        "proxy.yaml: hosts.example.com.backend: must be a string, not a number"
    ]


# --- names claimed twice ------------------------------------------------------


def test_same_site_twice_after_normalisation() -> None:
    """Two site keys that differ only in case or a trailing dot are the same name."""
    doc = valid_doc()
    doc["hosts"]["Example.COM."] = site()
    assert errors_of(doc) == [
        "proxy.yaml: hosts.Example.COM.: example.com is already used by hosts.example.com"
    ]


def test_alias_used_by_two_sites() -> None:
    """An alias of one site cannot also be an alias of another."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site(aliases=["WWW.example.com"])
    assert errors_of(doc) == [
        "proxy.yaml: hosts.other.example.aliases[0]: www.example.com is already used by "
        "hosts.example.com.aliases[0]"
    ]


def test_wildcard_used_by_two_sites() -> None:
    """The same wildcard cannot belong to two sites."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site(aliases=["*.EXAMPLE.com."])
    assert errors_of(doc) == [
        "proxy.yaml: hosts.other.example.aliases[0]: *.example.com is already used by "
        "hosts.example.com.aliases[1]"
    ]


def test_alias_equal_to_another_site_name() -> None:
    """An alias cannot be another site's name, whichever comes first in the file."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site(aliases=["example.com"])
    doc["hosts"]["www.other.example"] = site()
    doc["hosts"]["other.example"]["aliases"].append("www.other.example")
    assert errors_of(doc) == [
        "proxy.yaml: hosts.other.example.aliases[0]: example.com is already used by "
        "hosts.example.com",
        "proxy.yaml: hosts.www.other.example: www.other.example is already used by "
        "hosts.other.example.aliases[1]",
    ]


def test_alias_equal_to_own_site_name() -> None:
    """Repeating a site's own name as its alias is reported."""
    assert errors_of(with_site(aliases=["www.example.com", "Example.com"])) == [
        "proxy.yaml: hosts.example.com.aliases[1]: example.com is already used by hosts.example.com"
    ]


def test_duplicate_alias_path_counts_invalid_aliases() -> None:
    """The index in a duplicate-alias message is the one in the file, even after a bad alias."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site(aliases=["bad_alias", "www.example.com"])
    assert errors_of(doc) == [
        "proxy.yaml: hosts.other.example.aliases[0]: host name has an invalid label 'bad_alias'",
        "proxy.yaml: hosts.other.example.aliases[1]: www.example.com is already used by "
        "hosts.example.com.aliases[0]",
    ]


def test_duplicate_alias_reported_even_when_site_has_other_problems() -> None:
    """A clashing alias is reported in the same run as the site's broken backend."""
    doc = valid_doc()
    doc["hosts"]["other.example"] = site(aliases=["www.example.com"], backend="ftp://x")
    assert errors_of(doc) == [
        "proxy.yaml: hosts.other.example.backend: must be an http:// or https:// URL such as "
        "http://127.0.0.1:8000, not 'ftp://x'",
        "proxy.yaml: hosts.other.example.aliases[0]: www.example.com is already used by "
        "hosts.example.com.aliases[0]",
    ]


def test_exact_alias_under_another_sites_wildcard_is_allowed() -> None:
    """``api.example.com`` may belong to a different site than ``*.example.com``."""
    doc = valid_doc()
    doc["hosts"]["api.example.com"] = site(backend="http://127.0.0.1:9000")
    config = parse_config(doc, "p.yaml")
    assert [h.name for h in config.hosts] == ["example.com", "api.example.com"]


# --- one pass -----------------------------------------------------------------


def test_all_problems_are_reported_in_one_error() -> None:
    """Every mistake in the file is reported together, in file order, so one edit fixes all."""
    text = """\
listen:
  https: [443]
  htp: ["tcp:80"]
tls:
  profile: old
  session_tickets: maybe
hosts:
  example.com:
    aliases: ["*.com"]
    certificates: []
    backend: ftp://127.0.0.1:8443
  bad_name.example: {}
  other.example:
    certificates: /c.pem
colour: blue
"""
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "proxy.yaml")
    assert str(info.value).splitlines() == [
        f"proxy.yaml: colour: unknown key; allowed keys are: {TOP_KEYS}",
        "proxy.yaml: listen.htp: unknown key; allowed keys are: https, http",
        "proxy.yaml: listen.https[0]: must be a string, not a number",
        "proxy.yaml: tls.profile: must be one of modern, intermediate, not 'old'",
        "proxy.yaml: tls.session_tickets: must be true or false, not a string",
        "proxy.yaml: hosts.example.com.aliases[0]: "
        "a wildcard must have at least two labels after '*.'",
        "proxy.yaml: hosts.example.com.certificates: must list at least one certificate",
        "proxy.yaml: hosts.example.com.backend: must be an http:// or https:// URL such as "
        "http://127.0.0.1:8000, not 'ftp://127.0.0.1:8443'",
        "proxy.yaml: hosts.bad_name.example: is not a valid host name: "
        "host name has an invalid label 'bad_name'",
        "proxy.yaml: hosts.other.example.backend: is required",
    ]
    assert info.value.source == "proxy.yaml"
    assert info.value.problems[2] == Problem("listen.https[0]", "must be a string, not a number")
    assert not any(p.warning for p in info.value.problems)


def test_error_names_the_source_given() -> None:
    """Messages name the file as the caller gave it."""
    with pytest.raises(ConfigError) as info:
        parse_yaml("hosts: []\nlisten: {http: tcp:80}\n", "/etc/tlsproxy/proxy.yaml")
    assert str(info.value) == (
        "/etc/tlsproxy/proxy.yaml: hosts: must be a mapping of host names to sites, not a list"
    )


# --- YAML syntax --------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column() -> None:
    """A YAML syntax error points at the line and column where it was found."""
    text = "listen:\n  https: [tcp:443\nhosts: {}\n"
    assert yaml_errors_of(text) == [
        "proxy.yaml: line 3, column 6: expected ',' or ']', but got ':'"
    ]


def test_yaml_bad_indentation_has_line_and_column() -> None:
    """A mis-indented key is reported at its position."""
    text = "listen:\n  https: tcp:443\n http: tcp:80\n"
    assert yaml_errors_of(text) == [
        "proxy.yaml: line 3, column 2: expected <block end>, but found '<block mapping start>'"
    ]


def test_duplicate_top_level_key_is_refused_with_position() -> None:
    """A key written twice is an error (not silently last-wins), with its line and column."""
    text = VALID_YAML + "listen:\n  http: tcp:80\n"
    assert yaml_errors_of(text) == ["proxy.yaml: line 14, column 1: duplicate key 'listen'"]


def test_duplicate_site_is_refused_with_position() -> None:
    """A site written twice under ``hosts`` is reported where the second one starts."""
    text = VALID_YAML + "  example.com:\n    backend: http://127.0.0.1:9000\n"
    assert yaml_errors_of(text) == ["proxy.yaml: line 14, column 3: duplicate key 'example.com'"]


def test_duplicate_key_in_flow_mapping() -> None:
    """Duplicate keys in ``{...}`` mappings are caught too."""
    text = VALID_YAML.replace(
        "{key: /etc/tlsproxy/rsa.key,", "{key: /a, key: /etc/tlsproxy/rsa.key,"
    )
    (line,) = yaml_errors_of(text)
    assert line == "proxy.yaml: line 12, column 19: duplicate key 'key'"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("hosts: !!int abc\n", "proxy.yaml: line 1, column 8: not a valid !!int value"),
        ("hosts: !!float x\n", "proxy.yaml: line 1, column 8: not a valid !!float value"),
        ("hosts: !!bool x\n", "proxy.yaml: line 1, column 8: not a valid !!bool value"),
        ("hosts: !!timestamp x\n", "proxy.yaml: line 1, column 8: not a valid !!timestamp value"),
        ("hosts: !!map [1]\n", "proxy.yaml: line 1, column 8: not a valid !!map value"),
        ("? [a]\n: 1\n", "proxy.yaml: line 1, column 3: a key must be a plain value, not a list"),
        (
            "{{a: 1}: 1}\n",
            "proxy.yaml: line 1, column 2: a key must be a plain value, not a mapping",
        ),
        ("a: *nope\n", "proxy.yaml: line 1, column 4: found undefined alias 'nope'"),
        (
            "a: !!python/name:os.system x\n",
            "proxy.yaml: line 1, column 4: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/name:os.system'",
        ),
        (
            "listen: {}\nhosts: bad\x00\n",
            "proxy.yaml: line 2, column 11: unacceptable character #x0000: "
            "special characters are not allowed",
        ),
    ],
)
def test_malformed_yaml_values_are_reported_not_crashed_on(text: str, line: str) -> None:
    """Odd YAML (bad tagged values, list keys, control characters) is a one-line error."""
    assert yaml_errors_of(text) == [line]


def test_deeply_nested_yaml_is_an_error_not_a_crash() -> None:
    """Absurdly nested YAML is refused with a message instead of a Python traceback."""
    assert yaml_errors_of("a: " + "[" * 5000) == ["proxy.yaml: not valid YAML: nested too deeply"]


def test_yaml_merge_keys_share_settings_between_sites() -> None:
    """``<<: *anchor`` merges shared site settings; keys written next to it win."""
    text = """\
listen: {https: tcp:443}
hosts:
  example.com: &site
    certificates: [/etc/tlsproxy/shared.pem]
    backend: http://127.0.0.1:8000
  example.org:
    <<: *site
    backend: http://127.0.0.1:9000
"""
    config = parse_yaml(text, "proxy.yaml")
    org = config.host("example.org")
    assert org.certificates[0].cert == "/etc/tlsproxy/shared.pem"
    assert org.certificates[0].path == "hosts.example.org.certificates[0]"
    assert org.backend.port == 9000


def test_yaml_python_objects_are_not_constructed() -> None:
    """The loader is safe: Python object tags are refused, never instantiated."""
    (line,) = yaml_errors_of("hosts: !!python/object/apply:os.getcwd []\n")
    assert "could not determine a constructor" in line


# --- load_config ----------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    """A valid file loads, and its path is the source used in later messages."""
    path = tmp_path / "proxy.yaml"
    path.write_text(VALID_YAML, encoding="utf-8")
    config = load_config(str(path))
    assert config.source == str(path)
    assert config == parse_yaml(VALID_YAML, str(path))


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is reported with its path and the system's reason."""
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"


def test_load_config_directory(tmp_path: Path) -> None:
    """Naming a directory instead of a file is reported plainly."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read the file: Is a directory"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file"
)
def test_load_config_unreadable_file(tmp_path: Path) -> None:
    """A file without read permission is reported as such."""
    path = tmp_path / "proxy.yaml"
    path.write_text(VALID_YAML, encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
    finally:
        path.chmod(0o600)
    assert str(info.value) == f"{path}: cannot read the file: Permission denied"


def test_load_config_permission_denied_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permission error from the system is reported with its reason (works even as root)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_module, "open", refuse, raising=False)
    path = str(tmp_path / "proxy.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the file: Permission denied"


def test_load_config_not_utf8(tmp_path: Path) -> None:
    """A file in another encoding (here Latin-1) is refused as not UTF-8."""
    path = tmp_path / "proxy.yaml"
    path.write_bytes(VALID_YAML.replace("example.com-ecdsa", "b\xfccher").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: is not UTF-8 text"


def test_load_config_reports_schema_problems_against_the_path(tmp_path: Path) -> None:
    """Schema problems found in a file name that file."""
    path = tmp_path / "proxy.yaml"
    path.write_text(VALID_YAML.replace("intermediate", "old"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: tls.profile: must be one of modern, intermediate, not 'old'"
    )


def test_shipped_example_config_is_valid() -> None:
    """The documented example in config/example.yaml passes validation, so it cannot rot."""
    from pathlib import Path

    from tlsproxy.config import load_config

    path = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
    config = load_config(str(path))
    assert config.default_host == "example.com"
    (host,) = config.hosts
    assert host.aliases == ("www.example.com",)
    assert len(host.certificates) == 2


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("drain_timeout: .nan", "proxy.yaml: drain_timeout: must be a number of seconds"),
        ("watch_interval: .inf", "proxy.yaml: watch_interval: must be a number of seconds"),
        ("watch_interval: .nan", "proxy.yaml: watch_interval: must be a number of seconds"),
    ],
)
def test_infinite_or_nan_durations_are_refused(text: str, line: str) -> None:
    """YAML's .nan and .inf are not durations (a NaN drain timeout would never expire)."""
    document = (
        "listen: {https: ['tcp:8443']}\n"
        "hosts: {a.example: {certificates: [/x.pem], backend: 'http://127.0.0.1:80'}}\n" + text
    )
    with pytest.raises(ConfigError) as exc:
        parse_yaml(document, "proxy.yaml")
    assert str(exc.value).startswith(line)


def test_site_names_and_backend_hosts_must_be_names() -> None:
    """A site keyed by null (or a number) and a backend URL whose host is not a name are
    config errors, not a site called 'none' or a connection to 'a b'."""
    document = (
        "listen: {https: ['tcp:8443']}\n"
        "hosts:\n"
        "  null: {certificates: [/x.pem], backend: 'http://127.0.0.1:80'}\n"
        "  b.example: {certificates: [/x.pem], backend: 'http://a b:80'}\n"
    )
    with pytest.raises(ConfigError) as exc:
        parse_yaml(document, "proxy.yaml")
    lines = str(exc.value).splitlines()
    assert "proxy.yaml: hosts.None: a site must be named by a host name, not nothing" in lines
    assert "proxy.yaml: hosts.b.example.backend: 'a b' is not a host name or IP address" in lines
