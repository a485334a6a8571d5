"""The TLS layer, tested through in-memory handshakes with a pyOpenSSL client.

The server side of every handshake is a connection made by `SNIConnectionCreator`,
exactly as Twisted's ``TLSMemoryBIOFactory`` makes it; the two sides exchange
bytes through memory BIOs, so nothing touches the network or sleeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests import pki
from tlsproxy import tls
from tlsproxy.certs import CertifiedKey, load_certified_key
from tlsproxy.config import Backend, CertificateSource, Config, HostConfig, Listen, TLSSettings
from tlsproxy.errors import Problem
from tlsproxy.profiles import INTERMEDIATE_CIPHERS, TLS13_CIPHERSUITES
from tlsproxy.tls import (
    ServerContexts,
    SNIConnectionCreator,
    build_server_contexts,
    check_tls_settings,
)

DATA = Path(__file__).parent / "data"


# -- a small world: three hosts, one with ECDSA + RSA certificates ---------------------


@attrs.frozen
class Site:
    name: str
    aliases: tuple[str, ...]
    leaves: tuple[pki.Leaf, ...]


@attrs.frozen
class World:
    ca: pki.CA
    ca_file: Path
    sites: tuple[Site, ...]
    certificates: dict[str, list[CertifiedKey]]
    rsa_intermediate: x509.Certificate

    def config(
        self, tls_settings: TLSSettings | None = None, default: str = "default.test"
    ) -> Config:
        hosts = tuple(
            HostConfig(
                name=s.name,
                aliases=s.aliases,
                certificates=tuple(k.source for k in self.certificates[s.name]),
                backend=Backend("http", "127.0.0.1", 8000),
            )
            for s in self.sites
        )
        return Config(
            source="test.yaml",
            listen=Listen(https=("tcp:0",)),
            tls=tls_settings or TLSSettings(),
            default_host=default,
            hosts=hosts,
        )

    def contexts(self, tls_settings: TLSSettings | None = None) -> ServerContexts:
        contexts, problems = build_server_contexts(self.config(tls_settings), self.certificates)
        assert contexts is not None, problems
        assert problems == []
        return contexts

    def leaf(self, host: str, key_type: str = "ECDSA") -> x509.Certificate:
        site = next(s for s in self.sites if s.name == host)
        return next(
            leaf.cert
            for leaf in site.leaves
            if isinstance(leaf.key, ec.EllipticCurvePrivateKey) == (key_type == "ECDSA")
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    directory = tmp_path_factory.mktemp("world")
    ca = pki.make_ca()
    rsa_intermediate = pki.make_authority("rsa intermediate", issuer=ca.root, key_type="RSA")
    rsa_leaf = ca.issue(["example.com", "www.example.com"], key_type="RSA", issuer=rsa_intermediate)
    sites = (
        Site(
            "example.com",
            ("www.example.com",),
            (
                ca.issue(["example.com", "www.example.com"]),
                attrs.evolve(rsa_leaf, chain=(rsa_intermediate.cert,)),
            ),
        ),
        Site("wild.test", ("*.wild.test",), (ca.issue(["wild.test", "*.wild.test"]),)),
        Site("default.test", (), (ca.issue(["default.test"]),)),
    )
    certificates: dict[str, list[CertifiedKey]] = {}
    for site in sites:
        for i, leaf in enumerate(site.leaves):
            path = pki.write_combined(directory, leaf, name=f"{site.name}-{i}.pem")
            source = CertificateSource(
                key=str(path),
                cert=str(path),
                chain=None,
                path=f"hosts.{site.name}.certificates[{i}]",
            )
            certified, problems = load_certified_key(source)
            assert certified is not None, problems
            certificates.setdefault(site.name, []).append(certified)
    return World(
        ca=ca,
        ca_file=pki.write_ca_file(directory, ca),
        sites=sites,
        certificates=certificates,
        rsa_intermediate=rsa_intermediate.cert,
    )


@pytest.fixture(scope="module")
def creator(world: World) -> SNIConnectionCreator:
    return SNIConnectionCreator(world.contexts())


# -- an in-memory client ---------------------------------------------------------------


class HandshakeFailed(Exception):
    """The handshake failed; ``side`` says which end raised."""

    def __init__(self, side: str, error: SSL.Error) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


def client_context(
    world: World,
    *,
    versions: tuple[int, int] | None = None,
    ciphers: str | None = None,
    ciphersuites: str | None = None,
    sigalgs: str | None = None,
    groups: str | None = None,
    alpn: Sequence[bytes] | None = None,
) -> SSL.Context:
    """A client context trusting the test CA, optionally restricted."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(world.ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    if versions is not None:
        context.set_min_proto_version(versions[0])
        context.set_max_proto_version(versions[1])
    if ciphers is not None:
        context.set_cipher_list(ciphers.encode())
    if ciphersuites is not None:
        context.set_tls13_ciphersuites(ciphersuites.encode())
    if sigalgs is not None:
        assert _lib.SSL_CTX_set1_sigalgs_list(context._context, sigalgs.encode()) == 1
    if groups is not None:
        assert _lib.SSL_CTX_set1_curves_list(context._context, groups.encode()) == 1
    if alpn is not None:
        context.set_alpn_protos(list(alpn))
    return context


def pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """Move bytes between the two memory BIOs, once each way."""
    for source, sink in ((client, server), (server, client)):
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            continue
        sink.bio_write(data)


def drive(client: SSL.Connection, server: SSL.Connection, step: Callable[[], bool]) -> None:
    """Call ``step`` and pump until it returns True (bounded: 50 rounds)."""
    for _ in range(50):
        if step():
            return
        pump(client, server)
    raise AssertionError("no progress after 50 rounds")


@attrs.frozen
class Pair:
    client: SSL.Connection
    server: SSL.Connection

    @property
    def peer(self) -> x509.Certificate:
        cert = self.client.get_peer_certificate(as_cryptography=True)
        assert cert is not None
        return cert

    @property
    def chain(self) -> list[x509.Certificate]:
        return self.client.get_peer_cert_chain(as_cryptography=True) or []


def connect(
    creator: SNIConnectionCreator,
    context: SSL.Context,
    sni: bytes | None = None,
    *,
    session: SSL.Session | None = None,
    finish: bool = True,
) -> Pair:
    """Start a client and a creator-made server connection; complete the handshake.

    :raises HandshakeFailed: if either side fails.
    """
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if sni is not None:
        client.set_tlsext_host_name(sni)
    if session is not None:
        client.set_session(session)
    server = creator.serverConnectionForTLS(None)
    server.set_accept_state()
    pair = Pair(client, server)
    if finish:
        handshake(pair)
    return pair


def handshake(pair: Pair) -> None:
    done = {"client": False, "server": False}

    def step() -> bool:
        for side, conn in (("client", pair.client), ("server", pair.server)):
            if not done[side]:
                try:
                    conn.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as exc:
                    pump(pair.client, pair.server)
                    raise HandshakeFailed(side, exc) from None
        return all(done.values())

    drive(pair.client, pair.server, step)


def exchange(pair: Pair) -> bytes:
    """Send a byte each way (so that post-handshake messages are processed)."""
    pair.client.send(b"?")
    got: list[bytes] = []

    def step() -> bool:
        try:
            got.append(pair.server.recv(10))
        except SSL.WantReadError:
            return False
        return True

    drive(pair.client, pair.server, step)
    pair.server.send(b"!")

    def back() -> bool:
        try:
            got.append(pair.client.recv(10))
        except SSL.WantReadError:
            return False
        return True

    drive(pair.client, pair.server, back)
    return b"".join(got)


def fails(creator: SNIConnectionCreator, context: SSL.Context, sni: bytes = b"example.com") -> str:
    """The reason a handshake fails (both sides' errors), asserting that it does."""
    with pytest.raises(HandshakeFailed) as info:
        connect(creator, context, sni)
    return str(info.value)


def all_client_suites(max_version: int) -> list[str]:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return [c for c in SSL.Connection(context, None).get_cipher_list() if not c.startswith("TLS_")]


# -- SNI -------------------------------------------------------------------------------


def test_creator_provides_twisted_interface(creator: SNIConnectionCreator) -> None:
    """The creator is what TLSMemoryBIOFactory expects for a server."""
    assert verifyObject(IOpenSSLServerConnectionCreator, creator)


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        (b"example.com", "example.com"),
        (b"www.example.com", "example.com"),
        (b"WWW.Example.COM", "example.com"),
        (b"www.example.com.", "example.com"),
        (b"wild.test", "wild.test"),
        (b"a.wild.test", "wild.test"),
        (b"B.Wild.Test.", "wild.test"),
        (b"a.b.wild.test", "default.test"),
        (b"unknown.test", "default.test"),
        (b"default.test", "default.test"),
        (None, "default.test"),
    ],
)
def test_certificate_chosen_by_sni(
    world: World, creator: SNIConnectionCreator, sni: bytes | None, host: str
) -> None:
    """Each name gets its host's certificate, matched case-insensitively, with one trailing
    dot ignored and ``*.`` covering one label; unknown or absent SNI gets the default host."""
    pair = connect(creator, client_context(world), sni)
    assert pair.peer == world.leaf(host)
    assert pair.chain[1:] == [world.ca.intermediate.cert]


def test_sni_name_readable_after_handshake(world: World, creator: SNIConnectionCreator) -> None:
    """The HTTP layer can read the name the client sent from the server connection."""
    pair = connect(creator, client_context(world), b"WWW.example.com")
    assert pair.server.get_servername() == b"WWW.example.com"
    assert connect(creator, client_context(world)).server.get_servername() is None


def test_ecdsa_for_capable_clients_rsa_for_others(
    world: World, creator: SNIConnectionCreator
) -> None:
    """A host with ECDSA and RSA certificates serves ECDSA to clients that accept it and
    RSA to RSA-only clients, each with its own intermediate."""
    default = connect(creator, client_context(world), b"example.com")
    assert isinstance(default.peer.public_key(), ec.EllipticCurvePublicKey)
    assert default.chain[1:] == [world.ca.intermediate.cert]

    tls13_rsa = connect(
        creator, client_context(world, sigalgs="RSA-PSS+SHA256:RSA+SHA256"), b"example.com"
    )
    assert tls13_rsa.client.get_protocol_version_name() == "TLSv1.3"
    assert tls13_rsa.peer == world.leaf("example.com", "RSA")
    assert tls13_rsa.chain[1:] == [world.rsa_intermediate]

    tls12_rsa = connect(
        creator,
        client_context(
            world,
            versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
            ciphers="ECDHE-RSA-AES128-GCM-SHA256",
        ),
        b"example.com",
    )
    assert isinstance(tls12_rsa.peer.public_key(), rsa.RSAPublicKey)
    assert tls12_rsa.chain[1:] == [world.rsa_intermediate]


def test_ecdsa_only_host_refuses_rsa_only_client(
    world: World, creator: SNIConnectionCreator
) -> None:
    """An RSA-only client cannot use a host that only has an ECDSA certificate."""
    context = client_context(world, sigalgs="RSA-PSS+SHA256:RSA+SHA256")
    assert "server" in fails(creator, context, b"default.test")


# -- versions and suites ---------------------------------------------------------------


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION])
def test_tls10_and_tls11_refused(world: World, creator: SNIConnectionCreator, version: int) -> None:
    """TLS 1.0 and 1.1 clients are refused by the server."""
    context = client_context(world, versions=(version, version), ciphers="ALL:@SECLEVEL=0")
    reason = fails(creator, context)
    assert reason.startswith("server:") and "unsupported protocol" in reason


def test_tls12_negotiates_only_ecdhe_aead(world: World, creator: SNIConnectionCreator) -> None:
    """Of every TLS 1.2 suite a client can offer, exactly the profile's ECDHE AEAD suites
    are accepted."""
    accepted = []
    for suite in all_client_suites(SSL.TLS1_2_VERSION):
        context = client_context(
            world,
            versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
            ciphers=f"{suite}:@SECLEVEL=0",
        )
        try:
            pair = connect(creator, context, b"example.com")
        except HandshakeFailed:
            continue
        assert pair.client.get_cipher_name() == suite
        accepted.append(suite)
    assert sorted(accepted) == sorted(INTERMEDIATE_CIPHERS)


TLS13_ALL = (*TLS13_CIPHERSUITES, "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256")


@pytest.mark.parametrize("profile", ["intermediate", "modern"])
def test_tls13_negotiates_only_profile_suites(world: World, profile: str) -> None:
    """Both profiles accept exactly Mozilla's three TLS 1.3 suites."""
    creator = SNIConnectionCreator(world.contexts(TLSSettings(profile=profile)))
    accepted = []
    for suite in TLS13_ALL:
        context = client_context(world, ciphersuites=suite)
        try:
            pair = connect(creator, context, b"example.com")
        except HandshakeFailed:
            continue
        assert pair.client.get_protocol_version_name() == "TLSv1.3"
        accepted.append(suite)
    assert accepted == list(TLS13_CIPHERSUITES)


def test_modern_refuses_tls12(world: World) -> None:
    """The modern profile is TLS 1.3 only: a TLS 1.2 client is refused."""
    creator = SNIConnectionCreator(world.contexts(TLSSettings(profile="modern")))
    context = client_context(world, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
    assert "unsupported protocol" in fails(creator, context)
    assert connect(creator, client_context(world)).client.get_protocol_version_name() == "TLSv1.3"


def test_min_version_13_on_intermediate(world: World) -> None:
    """``min_version: 1.3`` refuses TLS 1.2 on every host, including after an SNI switch."""
    creator = SNIConnectionCreator(world.contexts(TLSSettings(min_version="1.3")))
    context = client_context(world, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
    for sni in (b"example.com", b"a.wild.test", b"default.test"):
        assert "unsupported protocol" in fails(creator, context, sni)


def test_cipher_override_is_what_is_served(world: World) -> None:
    """A ``ciphers`` override restricts TLS 1.2 to the listed suites."""
    settings = TLSSettings(ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    creator = SNIConnectionCreator(world.contexts(settings))
    tls12 = (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
    pair = connect(creator, client_context(world, versions=tls12))
    assert pair.client.get_cipher_name() == "ECDHE-ECDSA-AES256-GCM-SHA384"
    fails(creator, client_context(world, versions=tls12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))


def test_server_order_wins(world: World, creator: SNIConnectionCreator) -> None:
    """The server's suite order is used, not the client's."""
    context = client_context(
        world,
        versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
        ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    assert connect(creator, context).client.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_dhe_only_with_dhparam(world: World) -> None:
    """DHE suites are served only when DH parameters are configured.

    Per RFC 7919, a client that lists FFDHE groups none of which the server has
    gets no DHE suite at all, so the client here lists only elliptic curves (as
    the legacy clients DHE is for do).
    """
    dhe = "DHE-RSA-AES128-GCM-SHA256"
    tls12 = (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
    context = client_context(world, versions=tls12, ciphers=dhe, groups="X25519:prime256v1")
    fails(SNIConnectionCreator(world.contexts()), context, b"example.com")
    with_dh = SNIConnectionCreator(world.contexts(TLSSettings(dhparam=str(DATA / "ffdhe2048.pem"))))
    assert connect(with_dh, context, b"example.com").client.get_cipher_name() == dhe


# -- groups ----------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["secp521r1", "X448", "ffdhe2048"])
def test_groups_outside_profile_refused(
    world: World, creator: SNIConnectionCreator, group: str
) -> None:
    """A client that offers only a group outside Mozilla's list cannot connect."""
    fails(creator, client_context(world, groups=group))


@pytest.mark.parametrize(
    ("offered", "negotiated"),
    [
        ("X25519", "x25519"),
        ("prime256v1", "secp256r1"),
        ("secp384r1", "secp384r1"),
        ("X25519MLKEM768", "X25519MLKEM768"),
        ("X25519MLKEM768:X25519:prime256v1", "X25519MLKEM768"),
    ],
)
def test_profile_groups_work(
    world: World, creator: SNIConnectionCreator, offered: str, negotiated: str
) -> None:
    """Each profile group works, and the post-quantum hybrid wins when both sides have it."""
    if "X25519MLKEM768" in offered and not tls.group_supported("X25519MLKEM768"):
        pytest.skip("this OpenSSL lacks X25519MLKEM768")
    pair = connect(creator, client_context(world, groups=offered))
    assert (pair.client.get_group_name() or "").lower() == negotiated.lower()


def test_tls12_groups(world: World, creator: SNIConnectionCreator) -> None:
    """Over TLS 1.2 the ECDHE curves are restricted the same way."""
    tls12 = (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
    fails(creator, client_context(world, versions=tls12, groups="secp521r1"))
    pair = connect(creator, client_context(world, versions=tls12, groups="X25519:prime256v1"))
    assert (pair.client.get_group_name() or "").lower() == "x25519"


def test_configured_groups_are_served(world: World) -> None:
    """A ``groups`` override replaces the profile's list."""
    creator = SNIConnectionCreator(world.contexts(TLSSettings(groups=("secp384r1",))))
    fails(creator, client_context(world, groups="X25519"))
    pair = connect(creator, client_context(world, groups="X25519:secp384r1"))
    assert pair.client.get_group_name() == "secp384r1"


def test_missing_mlkem_is_dropped_from_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an OpenSSL without X25519MLKEM768 the default list goes on without it."""
    real = tls.group_supported
    monkeypatch.setattr(
        tls, "group_supported", lambda name: name != "X25519MLKEM768" and real(name)
    )
    params, problems = check_tls_settings(TLSSettings())
    assert problems == []
    assert params is not None
    assert params.groups == ("X25519", "prime256v1", "secp384r1")


# -- hardening -------------------------------------------------------------------------


def test_no_compression_option(world: World) -> None:
    """TLS compression (CRIME) is disabled on every host context."""
    contexts = world.contexts()
    for name in ("example.com", "wild.test", "default.test"):
        context = contexts.context_for(name)
        assert _lib.SSL_CTX_get_options(context._context) & SSL.OP_NO_COMPRESSION


def test_client_renegotiation_refused(world: World, creator: SNIConnectionCreator) -> None:
    """A TLS 1.2 client asking to renegotiate is told no; the server never renegotiates."""
    context = client_context(world, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
    pair = connect(creator, context)
    assert pair.client.renegotiate()
    with pytest.raises(SSL.Error, match="no renegotiation"):

        def step() -> bool:
            with contextlib.suppress(SSL.WantReadError):
                pair.client.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                pair.server.recv(10)
            return False

        drive(pair.client, pair.server, step)
    assert pair.server.total_renegotiations() == 0


def _tickets_sent(creator: SNIConnectionCreator, context: SSL.Context) -> bool:
    pair = connect(creator, context, finish=False)
    states: list[bytes] = []
    pair.server.set_info_callback(lambda conn, where, ret: states.append(conn.get_state_string()))
    handshake(pair)
    exchange(pair)
    return any(b"session ticket" in s for s in states)


def test_session_tickets_on_and_off(world: World) -> None:
    """TLS 1.2 session tickets are issued by default and not with ``session_tickets: false``."""
    context = client_context(world, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
    assert _tickets_sent(SNIConnectionCreator(world.contexts()), context)
    off = SNIConnectionCreator(world.contexts(TLSSettings(session_tickets=False)))
    assert not _tickets_sent(off, context)


@pytest.mark.parametrize("tickets", [True, False])
@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
@pytest.mark.parametrize("sni", [b"default.test", b"www.example.com"])
def test_sessions_resume(world: World, tickets: bool, version: int, sni: bytes) -> None:
    """Sessions resume on the default and on an SNI-selected host, with tickets or with the
    server-side cache when tickets are off."""
    creator = SNIConnectionCreator(world.contexts(TLSSettings(session_tickets=tickets)))
    context = client_context(world, versions=(version, version))
    first = connect(creator, context, sni)
    exchange(first)
    session = first.client.get_session()
    assert session is not None
    second = connect(creator, context, sni, session=session)
    assert _lib.SSL_session_reused(second.client._ssl) == 1
    assert second.server.get_servername() == sni


# OpenSSL makes a session unresumable when a connection is freed without close_notify
# (the server also drops it from its cache): the helpers below close both ends cleanly.


def _close(pair: Pair) -> None:
    pair.client.shutdown()
    pair.server.shutdown()


def _resumes(creator: SNIConnectionCreator, context: SSL.Context, session: SSL.Session) -> bool:
    pair = connect(creator, context, b"www.example.com", session=session)
    exchange(pair)
    _close(pair)
    return bool(_lib.SSL_session_reused(pair.client._ssl))


def _session(creator: SNIConnectionCreator, context: SSL.Context) -> SSL.Session:
    pair = connect(creator, context, b"www.example.com")
    exchange(pair)  # TLS 1.3 tickets arrive after the handshake
    _close(pair)
    session = pair.client.get_session()
    assert session is not None
    return session


@pytest.mark.parametrize("tickets", [True, False])
@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_sessions_resume_across_reload(world: World, tickets: bool, version: int) -> None:
    """A reload with the same TLS policy keeps sessions resumable (tickets and the session
    cache); one that changes the policy starts afresh, so no session outlives its policy."""
    settings = TLSSettings(session_tickets=tickets)
    creator = SNIConnectionCreator(world.contexts(settings))
    context = client_context(world, versions=(version, version))
    session = _session(creator, context)
    creator.swap(world.contexts(settings))
    assert _resumes(creator, context, session)
    creator.swap(world.contexts(attrs.evolve(settings, ciphers=INTERMEDIATE_CIPHERS[0])))
    assert not _resumes(creator, context, session)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_session_ticket_keys_rotate(world: World, version: int) -> None:
    """Session-ticket keys and the session cache are replaced every
    ``tls.session_ticket_rotation`` seconds: a session from before is not resumed."""
    clock = Clock()
    settings = TLSSettings(session_ticket_rotation=3600)
    creator = SNIConnectionCreator(world.contexts(settings), now=clock.seconds)
    context = client_context(world, versions=(version, version))
    session = _session(creator, context)
    clock.advance(3599)
    assert _resumes(creator, context, session)
    fresh = _session(creator, context)
    clock.advance(1)
    assert not _resumes(creator, context, session)
    assert not _resumes(creator, context, fresh)
    assert _resumes(creator, context, _session(creator, context))


# -- ALPN ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        ([b"h2", b"http/1.1"], b"http/1.1"),
        ([b"http/1.1"], b"http/1.1"),
        ([b"h2"], b""),
        (None, b""),
    ],
)
def test_alpn(
    world: World,
    creator: SNIConnectionCreator,
    offered: list[bytes] | None,
    selected: bytes,
) -> None:
    """ALPN selects http/1.1; a client offering only h2 still connects, without ALPN."""
    for sni in (b"example.com", None):
        pair = connect(creator, client_context(world, alpn=offered), sni)
        assert pair.client.get_alpn_proto_negotiated() == selected


# -- reload ----------------------------------------------------------------------------


def test_swap_keeps_live_connections(world: World, tmp_path: Path) -> None:
    """After swap(), new connections get the new certificates, and so does one accepted
    before whose ClientHello comes after; a connection that finished its handshake
    before goes on working."""
    old = world.contexts()
    creator = SNIConnectionCreator(old)
    renewed = world.ca.issue(["default.test"])
    path = pki.write_combined(tmp_path, renewed)
    source = CertificateSource(key=str(path), cert=str(path), chain=None, path="renewed")
    certified, problems = load_certified_key(source)
    assert certified is not None, problems
    certificates = {**world.certificates, "default.test": [certified]}
    new, problems = build_server_contexts(world.config(), certificates)
    assert new is not None, problems

    live = connect(creator, client_context(world), b"default.test")
    accepted = connect(creator, client_context(world), b"default.test", finish=False)
    assert creator.swap(new) is old
    assert creator.contexts is new
    assert exchange(live) == b"?!"
    assert live.peer == world.leaf("default.test")
    handshake(accepted)
    assert accepted.peer == renewed.cert

    fresh = connect(creator, client_context(world), b"default.test")
    assert fresh.peer == renewed.cert
    other = connect(creator, client_context(world), b"www.example.com")
    assert other.peer == world.leaf("example.com")


# -- Twisted ---------------------------------------------------------------------------


class _Recorder(Protocol):
    received: bytes = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Echo(_Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)  # type: ignore[union-attr]


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class _Client:
    context: SSL.Context
    sni: bytes

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(self.sni)
        return connection


def test_through_twisted_tls_memory_bio(world: World, creator: SNIConnectionCreator) -> None:
    """Under TLSMemoryBIOFactory the right host is served, data flows, and the protocol
    sees the SNI name through ``transport.getHandle().get_servername()``."""
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(creator, False, Factory.forProtocol(_Echo), clock=clock)
    client_factory = TLSMemoryBIOFactory(
        _Client(client_context(world, alpn=[b"http/1.1"]), b"a.wild.test"),
        True,
        Factory.forProtocol(_Recorder),
        clock=clock,
    )
    client, server, io = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    client.write(b"hello")
    io.flush()
    app = server.wrappedProtocol
    assert app.received == b"hello"
    assert client.wrappedProtocol.received == b"hello"
    handle = app.transport.getHandle()
    assert handle.get_servername() == b"a.wild.test"
    assert server.negotiatedProtocol == b"http/1.1"
    assert client.getHandle().get_peer_certificate(as_cryptography=True) == world.leaf("wild.test")


# -- problems --------------------------------------------------------------------------


def settings_problems(**overrides: object) -> list[Problem]:
    params, problems = check_tls_settings(TLSSettings(**overrides))  # type: ignore[arg-type]
    assert params is None
    return problems


def test_unknown_names_are_config_errors() -> None:
    """Names OpenSSL does not know are errors at the key that lists them."""
    problems = settings_problems(
        ciphers="ECDHE-RSA-AES512-GCM-SHA384",
        ciphersuites="TLS_AES_512_GCM_SHA512",
        groups=("X25519", "brainpoolP999"),
    )
    version = tls.openssl_version()
    assert problems == [
        Problem("tls.ciphers", f"{version} does not know the suite ECDHE-RSA-AES512-GCM-SHA384"),
        Problem(
            "tls.ciphersuites", f"{version} does not know the TLS 1.3 suite TLS_AES_512_GCM_SHA512"
        ),
        Problem("tls.groups", f"{version} does not know the group brainpoolP999"),
    ]


def test_pure_problems_come_first() -> None:
    """Insecure overrides are reported without consulting OpenSSL."""
    assert [p.path for p in settings_problems(ciphers="AES128-SHA", min_version="1.1")] == [
        "tls.min_version",
        "tls.ciphers",
    ]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.pem", None, "cannot read {path}: No such file or directory"),
        (
            "junk.pem",
            b"hello",
            "{path} is not a PEM file of DH parameters (no BEGIN DH PARAMETERS block)",
        ),
        (
            "bad.pem",
            b"-----BEGIN DH PARAMETERS-----\nAAAA\n-----END DH PARAMETERS-----\n",
            "{path} is not a PEM file of DH parameters (unexpected DER structure)",
        ),
        (
            "small.pem",
            (DATA / "dh1024.pem").read_bytes(),
            "the DH parameters in {path} have 1024 bits; at least 2048 are required "
            "(openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048)",
        ),
    ],
)
def test_bad_dhparam(tmp_path: Path, name: str, content: bytes | None, reason: str) -> None:
    """An unreadable, malformed or too small DH file is an error at ``tls.dhparam``."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert settings_problems(dhparam=str(path)) == [
        Problem("tls.dhparam", reason.format(path=path))
    ]


def test_two_certificates_of_one_type(world: World) -> None:
    """A second certificate of the same key type on one host is an error at its path."""
    ecdsa = world.certificates["default.test"][0]
    second = attrs.evolve(
        ecdsa, source=attrs.evolve(ecdsa.source, path="hosts.default.test.certificates[1]")
    )
    certificates = {**world.certificates, "default.test": [ecdsa, second]}
    contexts, problems = build_server_contexts(world.config(), certificates)
    assert contexts is None
    assert problems == [
        Problem(
            "hosts.default.test.certificates[1]",
            "a second ECDSA certificate for default.test (the first is "
            "hosts.default.test.certificates[0]); a host can have one per key type",
        )
    ]


def test_host_without_certificate(world: World) -> None:
    """A host whose certificates all failed to load is reported, and nothing is built."""
    certificates = {**world.certificates, "wild.test": []}
    contexts, problems = build_server_contexts(world.config(), certificates)
    assert contexts is None
    assert problems == [Problem("hosts.wild.test.certificates", "no certificate could be loaded")]


def test_unknown_default_host(world: World) -> None:
    """A default host that is not configured is an error at ``default_host``."""
    contexts, problems = build_server_contexts(
        world.config(default="nowhere.test"), world.certificates
    )
    assert contexts is None
    assert problems == [Problem("default_host", "nowhere.test is not one of the hosts")]
