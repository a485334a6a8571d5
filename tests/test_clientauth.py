"""Client certificates (mTLS): the ``client_auth`` config keys, the identity headers
sent to backends, the host binding in routing, and the per-host TLS contexts."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tests import pki
from tests.proxyharness import BACKEND, Harness, parse_requests, parse_responses, request
from tlsproxy.certs import load_certified_key
from tlsproxy.clientauth import identity_block, load_client_auth, stripped_headers
from tlsproxy.config import ClientAuth, parse_config
from tlsproxy.errors import ConfigError
from tlsproxy.routing import PlainRouter, Route, Router
from tlsproxy.tls import SNIConnectionCreator, build_server_contexts


def config(client_auth: object, **site: Any) -> dict[str, Any]:
    return {
        "listen": {"https": ["tcp:443"]},
        "hosts": {
            "www.test": {"certificates": ["w.pem"], "backend": "http://127.0.0.1:1"},
            "api.test": {
                "certificates": ["a.pem"],
                "backend": "http://127.0.0.1:2",
                "client_auth": client_auth,
                **site,
            },
        },
    }


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "f.yaml")
    return [f"{p.path}: {p.reason}" for p in info.value.problems]


def test_client_auth_keys_parse_with_defaults() -> None:
    """``client_auth: {ca: FILE}`` means mode required, no CRL, no extra headers."""
    host = parse_config(config({"ca": "c.pem"}), "f.yaml").host("api.test")
    assert host.client_auth == ClientAuth(ca="c.pem", path="hosts.api.test.client_auth")
    assert parse_config(config({"ca": "c"}), "f").host("www.test").client_auth is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"mode": "required"}, "hosts.api.test.client_auth.ca: is required"),
        ({"ca": "c", "mode": "sometimes"}, "must be one of required, optional"),
        ({"ca": "c", "verify": 1}, "unknown key; allowed keys are: ca, mode, crl"),
        ({"ca": "c", "subject_header": "Client-Cert"}, "is a header the proxy manages"),
        ({"ca": "c", "subject_header": "X-Forwarded-User"}, "is a header the proxy manages"),
        ({"ca": "c", "subject_header": "bad header"}, "is not a valid header name"),
        (
            {"ca": "c", "subject_header": "X-A", "fingerprint_header": "x-a"},
            "already the other header's name",
        ),
        ("c.pem", "must be a mapping"),
    ],
)
def test_bad_client_auth_is_reported(value: object, message: str) -> None:
    """Mistakes in ``client_auth`` name the key path and the reason."""
    found = problems(config(value))
    assert any(message in p for p in found), found


def test_client_auth_with_plain_http_is_refused() -> None:
    """A client-certificate host cannot also be served over plain HTTP."""
    found = problems(config({"ca": "c"}, insecure_plain_http=True))
    assert any("bypass" in p for p in found), found


def leaf_with_subject(cn: str) -> pki.Leaf:
    return pki.make_ca().issue([cn], client=True)


def test_identity_block_carries_rfc9440_and_configured_headers() -> None:
    """The backend gets Client-Cert and Client-Cert-Chain as :base64: byte sequences,
    the RFC 4514 subject and the SHA-256 fingerprint in the configured headers."""
    leaf = leaf_with_subject("alice")
    auth = ClientAuth(ca="c", subject_header="X-Subject", fingerprint_header="X-Print")
    block = identity_block(auth, leaf.cert, list(leaf.chain))
    der = base64.b64encode(leaf.cert.public_bytes(Encoding.DER))
    chain = base64.b64encode(leaf.chain[0].public_bytes(Encoding.DER))
    assert block.split(b"\r\n") == [
        b"Client-Cert: :" + der + b":",
        b"Client-Cert-Chain: :" + chain + b":",
        b"X-Subject: CN=alice,O=tlsproxy tests",
        b"X-Print: " + leaf.cert.fingerprint(hashes.SHA256()).hex().encode(),
        b"",
    ]
    assert identity_block(auth, None, []) == b""
    assert stripped_headers(auth) == {b"x-subject", b"x-print"}


def test_identity_subject_is_visible_ascii() -> None:
    """Non-ASCII and control characters in a subject reach the backend as RFC 4514
    hex escapes, never as raw bytes that could split a header."""
    ca = pki.make_ca()
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "é\r\nX-Evil: 1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.intermediate.name)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(1)
        .not_valid_before(pki.now())
        .not_valid_after(pki.now())
        .sign(ca.intermediate.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    block = identity_block(ClientAuth(ca="c", subject_header="X-S"), cert, [])
    line = block.split(b"\r\n")[1]
    assert line.startswith(b"X-S: CN=\\c3\\a9\\0d\\0aX-Evil: 1")
    assert all(0x20 <= b < 0x7F for b in line)


def site_doc(tmp_path: Path, client_auth: dict[str, Any] | None) -> dict[str, Any]:
    ca = pki.make_ca()
    hosts: dict[str, Any] = {}
    for name in ("www.test", "api.test", "other.test"):
        hosts[name] = {
            "certificates": [str(pki.write_combined(tmp_path, ca.issue([name]), name=name))],
            "backend": "http://127.0.0.1:1",
        }
    if client_auth is not None:
        hosts["api.test"]["client_auth"] = client_auth
    return {"listen": {"https": ["tcp:443"]}, "default_host": "www.test", "hosts": hosts}


@pytest.mark.parametrize(
    ("sni", "host", "routed"),
    [
        ("api.test", b"api.test", True),
        ("www.test", b"www.test", True),
        ("www.test", b"other.test", True),  # neither uses client certificates
        ("www.test", b"api.test", False),
        ("unknown.test", b"api.test", False),  # the default host's handshake
        (None, b"api.test", False),
        ("api.test", b"www.test", False),
        ("api.test", b"API.test:443", True),
    ],
)
def test_host_is_bound_to_the_handshake_for_client_auth_sites(
    tmp_path: Path, sni: str | None, host: bytes, routed: bool
) -> None:
    """A request whose Host names another site than the TLS handshake's, where either
    site uses client certificates, gets no route (the proxy answers 421)."""
    router = Router(parse_config(site_doc(tmp_path, {"ca": "c"}), "f"))
    assert (router.table(sni, host) is not None) is routed


def test_without_client_auth_host_is_not_bound(tmp_path: Path) -> None:
    """Without client_auth anywhere, routing by Host ignores the SNI as before."""
    router = Router(parse_config(site_doc(tmp_path, None), "f"))
    assert router.table("www.test", b"api.test") is not None


def contexts(tmp_path: Path, client_auth: dict[str, Any]) -> tuple[Any, list[Any]]:
    cfg = parse_config(site_doc(tmp_path, client_auth), "f")
    certs = {}
    for h in cfg.hosts:
        loaded = [load_certified_key(c)[0] for c in h.certificates]
        certs[h.name] = [c for c in loaded if c is not None]
    return build_server_contexts(cfg, certs)


def test_only_client_auth_hosts_verify_peers(tmp_path: Path) -> None:
    """The client-auth host's context asks for (and, if required, demands) a client
    certificate; the others do not."""
    ca_file = pki.write_ca_file(tmp_path, pki.make_ca(fresh=True), "clients.pem")
    built, found = contexts(tmp_path, {"ca": str(ca_file)})
    assert built is not None, found
    api = built.context_for(b"api.test")
    assert api.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert built.context_for(b"www.test").get_verify_mode() == SSL.VERIFY_NONE
    built, _ = contexts(tmp_path, {"ca": str(ca_file), "mode": "optional"})
    assert built is not None
    assert built.context_for(b"api.test").get_verify_mode() == SSL.VERIFY_PEER


def test_bad_ca_and_crl_files_are_reported(tmp_path: Path) -> None:
    """An unreadable CA file, a file of non-CA certificates and a file without CRLs
    are reported at their key paths before anything binds."""
    leaf = pki.make_ca().issue(["x"], client=True)
    not_ca = pki.write_file(tmp_path / "leaf.pem", pki.cert_pem(leaf.cert))
    _, found = contexts(tmp_path, {"ca": str(tmp_path / "missing.pem")})
    assert [p.path for p in found] == ["hosts.api.test.client_auth.ca"]
    _, found = load_client_auth(ClientAuth(ca=str(not_ca), path="p"))
    assert "not a CA certificate" in found[0].reason
    ca_file = pki.write_ca_file(tmp_path, pki.make_ca())
    _, found = load_client_auth(ClientAuth(ca=str(ca_file), crl=str(ca_file), path="p"))
    assert [(p.path, "no BEGIN X509 CRL" in p.reason) for p in found] == [("p.crl", True)]


def engine(mode: str) -> Harness:
    auth = ClientAuth(ca="c", mode=mode, subject_header="X-Subject", fingerprint_header="X-Print")
    route = Route(site="example.com", backend=BACKEND, client_auth=auth)
    return Harness(routes={b"example.com": route})


def test_required_site_without_verified_certificate_gets_421() -> None:
    """A request for a site that requires client certificates, arriving on a
    connection without a verified one, is answered 421 and never reaches a backend."""
    h = engine("required")
    client, _ = h.client()
    client.send(request(headers=[(b"Client-Cert", b":AA:")]))
    h.pump()
    [resp] = parse_responses(client.take())
    assert resp.status == 421
    assert h.backends == []


def test_optional_site_drops_client_sent_identity_headers() -> None:
    """Without a certificate, an optional site's backend gets no identity headers,
    and copies the client sent (RFC 9440 and the configured ones, any case) are dropped."""
    h = engine("optional")
    client, _ = h.client()
    spoof = [
        (b"client-cert", b":AA:"),
        (b"Client-Cert-Chain", b":AA:"),
        (b"x-subject", b"CN=admin"),
        (b"X-PRINT", b"00"),
        (b"Accept", b"*/*"),
    ]
    client.send(request(headers=spoof))
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    names = {n.lower() for n, _ in seen.headers}
    assert names.isdisjoint({b"client-cert", b"client-cert-chain", b"x-subject", b"x-print"})
    assert seen.header(b"Accept") == b"*/*"


def _exchange(
    creator: SNIConnectionCreator,
    context: SSL.Context,
    sni: bytes | None,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection] | None:
    """A memory-BIO handshake of a certificate-less client (``context``, offering
    ``session``) with a connection of ``creator``, and one byte each way (which
    also carries TLS 1.3 tickets); the client and server, or None if refused."""
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if sni is not None:
        client.set_tlsext_host_name(sni)
    if session is not None:
        client.set_session(session)
    server = creator.serverConnectionForTLS(None)
    server.set_accept_state()
    for _ in range(20):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(65536))
        try:
            client.write(b"x")  # TLS 1.3: a refused client hears so at its first use
            server.bio_write(client.bio_read(65536))
            server.recv(1)
            server.write(b"y")
            client.bio_write(server.bio_read(65536))
            client.recv(1)
            return client, server
        except SSL.WantReadError:
            continue
        except SSL.Error:
            return None
    return None


def handshake(creator: SNIConnectionCreator, sni: bytes | None, ca_file: Path) -> bool:
    """Whether a certificate-less client's handshake with ``creator`` completes."""
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.load_verify_locations(str(ca_file))
    return _exchange(creator, client_ctx, sni) is not None


def test_client_auth_default_host_does_not_affect_other_hosts(tmp_path: Path) -> None:
    """With a client-auth host as the default (the host of connections without SNI),
    a client without a certificate still reaches the other hosts by SNI, and is
    refused by the client-auth host, with SNI or without."""
    clients = pki.write_ca_file(tmp_path, pki.make_ca(fresh=True), "clients.pem")
    doc = site_doc(tmp_path, {"ca": str(clients)})
    doc["default_host"] = "api.test"
    cfg = parse_config(doc, "f")
    certs = {h.name: [load_certified_key(c)[0] for c in h.certificates] for h in cfg.hosts}
    built, found = build_server_contexts(cfg, {k: [c for c in v if c] for k, v in certs.items()})
    assert built is not None, found
    server_ca = pki.write_ca_file(tmp_path, pki.make_ca(), "server-ca.pem")
    creator = SNIConnectionCreator(built)
    assert handshake(creator, b"www.test", server_ca)
    assert handshake(creator, b"other.test", server_ca)
    assert not handshake(creator, b"api.test", server_ca)
    assert not handshake(creator, None, server_ca)


def _contexts_of(doc: dict[str, Any]) -> Any:
    cfg = parse_config(doc, "f")
    certs = {h.name: [load_certified_key(c)[0] for c in h.certificates] for h in cfg.hosts}
    built, found = build_server_contexts(cfg, {k: [c for c in v if c] for k, v in certs.items()})
    assert built is not None, found
    return built


def _client_context(version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


def _resumes_without_certificate(
    creator: SNIConnectionCreator, context: SSL.Context, session: SSL.Session | None
) -> tuple[bool, bool, SSL.Session | None]:
    """A certificate-less client's handshake with api.test offering ``session``:
    whether it completed, whether it resumed, and the session to offer next."""
    pair = _exchange(creator, context, b"api.test", session)
    if pair is None:
        return False, False, None
    client, server = pair
    reused = bool(_lib.SSL_session_reused(client._ssl))
    client.shutdown()  # a connection freed without close_notify spoils its session
    server.shutdown()
    return True, reused, client.get_session()


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_a_session_from_before_client_auth_was_added_does_not_resume(
    tmp_path: Path, version: int
) -> None:
    """A client that resumed sessions on a host without client certificates is asked for
    one once a reload makes the host require it: its old session does not resume (it
    would skip the certificate request), so a client without a certificate is refused."""
    creator = SNIConnectionCreator(_contexts_of(site_doc(tmp_path, None)))
    client = _client_context(version)
    ok, _, session = _resumes_without_certificate(creator, client, None)
    assert ok and session is not None
    ok, reused, session = _resumes_without_certificate(creator, client, session)
    assert ok and reused, "control: sessions resume before the reload"
    clients = pki.write_ca_file(tmp_path, pki.make_ca(fresh=True), "clients.pem")
    creator.swap(_contexts_of(site_doc(tmp_path, {"ca": str(clients)})))
    ok, reused, _ = _resumes_without_certificate(creator, client, session)
    assert not ok and not reused


def test_identity_headers_are_dropped_on_every_site(tmp_path: Path) -> None:
    """Copies of the configured identity headers sent by a client are dropped on every
    site, also on sites without client_auth (one could otherwise forge them for a
    backend shared with a client-certificate site), over HTTPS and plain HTTP."""
    doc = site_doc(
        tmp_path, {"ca": "c", "subject_header": "X-Subject", "fingerprint_header": "X-Print"}
    )
    config = parse_config(doc, "f")
    assert Router(config).identity_headers == {b"x-subject", b"x-print"}
    assert PlainRouter(config, BACKEND).identity_headers == {b"x-subject", b"x-print"}
    auth = ClientAuth(ca="c", subject_header="X-Subject", fingerprint_header="X-Print")
    h = Harness(
        routes={
            b"api.example.com": Route(site="api.example.com", backend=BACKEND, client_auth=auth),
            b"www.example.com": Route(site="www.example.com", backend=BACKEND),
        }
    )
    client, _ = h.client()
    spoof = [(b"x-subject", b"CN=admin"), (b"X-PRINT", b"00"), (b"Accept", b"*/*")]
    client.send(request(host=b"www.example.com", headers=spoof))
    h.pump()
    [seen] = parse_requests(h.backends[0].take())
    names = {n.lower() for n, _ in seen.headers}
    assert names.isdisjoint({b"x-subject", b"x-print"})
    assert seen.header(b"Accept") == b"*/*"
