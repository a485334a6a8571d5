"""The TLS layer: hardened OpenSSL contexts per host, chosen by SNI.

`build_server_contexts` turns the ``tls`` settings and each host's loaded
certificates into a `ServerContexts` value: one `OpenSSL.SSL.Context` per host,
all made from one hardened policy (TLS 1.2/1.3 only, forward-secret AEAD
suites in server order, Mozilla's key-exchange groups, no compression, no
client-initiated renegotiation, ALPN ``http/1.1``).  A host may hold one
ECDSA and one RSA certificate, each with its own intermediates; OpenSSL serves
whichever the client's signature algorithms accept.

`SNIConnectionCreator` is what `tlsproxy.tlsconn.TLSServerFactory` (or
Twisted's ``TLSMemoryBIOFactory``) calls for each accepted connection.  Every
connection starts on a *session context*: the policy without a certificate,
which fixes the protocol versions and holds what OpenSSL keeps per context
for resumption (the session cache and the session-ticket keys).  Its
servername callback switches the connection to the named host's context (the
default host's without SNI or for an unknown name) by an in-memory lookup.
`SNIConnectionCreator.swap` installs a new `ServerContexts` on reload; the
session context stays while the policy is unchanged, so sessions resume
across reloads, and is replaced every ``tls.session_ticket_rotation``
seconds, which gives the ticket keys a bounded life (forward secrecy).
A connection keeps the session and host contexts its handshake chose; one
accepted before a swap whose ClientHello comes after it gets the new host
contexts (or, if the policy changed, finishes on the old ones).

A host with ``client_auth`` gets the trust store, CA names and verify mode of
`tlsproxy.clientauth` on its context only; the servername callback copies
the host's verify mode onto the connection (OpenSSL does not when switching
contexts), so a CertificateRequest goes out only for such hosts.

`ChallengeCertificates` holds the tls-alpn-01 answers of the built-in ACME
client (RFC 8737): when a ClientHello for a name with a pending challenge
offers ALPN ``acme-tls/1``, the ALPN callback switches the connection to the
challenge certificate's context and selects ``acme-tls/1``.  Other
handshakes pay one membership test of the offered protocols.

The name the client sent stays readable after the handshake: from a protocol
over `tlsproxy.tlsconn.TLSServerConnection`, ``transport.getHandle().get_servername()``
returns it as bytes (None when the client sent no SNI).

Must not read files or block inside TLS callbacks, and must never log key
material.  Certificate files are read and checked by `tlsproxy.certs`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from tlsproxy.certs import CertifiedKey
from tlsproxy.clientauth import configure_context, load_client_auth
from tlsproxy.errors import Problem
from tlsproxy.hostnames import HostTable
from tlsproxy.profiles import TLSParameters, resolve

if TYPE_CHECKING:
    from tlsproxy.config import Config, TLSSettings

log = Logger()

#: The only application protocol tlsproxy speaks, offered through ALPN.
ALPN_HTTP11 = b"http/1.1"
#: The ALPN protocol of ACME's tls-alpn-01 validation (RFC 8737).
ALPN_ACME_TLS = b"acme-tls/1"
#: Smallest accepted finite-field DH group (Mozilla intermediate), in bits.
MIN_DH_BITS = 2048

# Not in every type stub of pyOpenSSL; the binding has it since OpenSSL 1.1.0h.
_OP_NO_RENEGOTIATION: int = _lib.SSL_OP_NO_RENEGOTIATION
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
# One session ID context for every context of a policy: the session cache and
# ticket keys live in the connection's initial (session) context, and a
# session must stay resumable after the servername callback switched contexts.
# A session from another host can therefore resume on a client-auth host; see
# _switch_to_host and tlsproxy.clientauth.verified_peer for how that is made safe.
_SESSION_ID_CONTEXT = b"tlsproxy"


def openssl_version() -> str:
    """The OpenSSL library in use, e.g. ``OpenSSL 3.5.1 1 Jul 2025``."""
    return openssl_backend.openssl_version_text()


def _scratch() -> SSL.Context:
    return SSL.Context(SSL.TLS_SERVER_METHOD)


def _set_groups(context: SSL.Context, groups: str) -> bool:
    """Set the key-exchange groups (``SSL_CTX_set1_groups_list``); False if OpenSSL refuses."""
    return bool(_lib.SSL_CTX_set1_curves_list(context._context, groups.encode("ascii")) == 1)


def group_supported(name: str) -> bool:
    """Whether the OpenSSL in use can negotiate the key-exchange group ``name``."""
    return _set_groups(_scratch(), name)


def _cipher_known(name: str) -> bool:
    context = _scratch()
    try:
        context.set_cipher_list(name.encode("ascii"))
    except SSL.Error:
        return False
    return name in SSL.Connection(context, None).get_cipher_list()


def _ciphersuite_known(name: str) -> bool:
    context = _scratch()
    try:
        context.set_tls13_ciphersuites(name.encode("ascii"))
    except SSL.Error:
        return False
    return name in SSL.Connection(context, None).get_cipher_list()


_DH_PEM = re.compile(rb"-----BEGIN (X9.42 )?DH PARAMETERS-----(.*?)-----END", re.DOTALL)


def _der_item(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    """The content of the DER item of ``tag`` at ``offset``, and the offset after it.

    :raises ValueError: if the bytes there are not such an item.
    """
    if offset + 2 > len(data) or data[offset] != tag:
        raise ValueError("unexpected DER structure")
    length, offset = data[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or offset + count > len(data):
            raise ValueError("bad DER length")
        length, offset = int.from_bytes(data[offset : offset + count], "big"), offset + count
    if offset + length > len(data):
        raise ValueError("truncated DER")
    return data[offset : offset + length], offset + length


def dh_prime_bits(pem: bytes) -> int:
    """The size in bits of the prime in PEM DH parameters (PKCS #3 or X9.42).

    :raises ValueError: if ``pem`` holds no such parameters.
    """
    match = _DH_PEM.search(pem)
    if match is None:
        raise ValueError("no BEGIN DH PARAMETERS block")
    try:
        der = base64.b64decode(match.group(2), validate=False)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 ({exc})") from None
    sequence, _ = _der_item(der, 0, 0x30)
    prime, _ = _der_item(sequence, 0, 0x02)
    return int.from_bytes(prime, "big").bit_length()


def _check_dhparam(path: str) -> list[Problem]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return [Problem("tls.dhparam", f"cannot read {path}: {exc.strerror or exc}")]
    try:
        bits = dh_prime_bits(data)
    except ValueError as exc:
        return [Problem("tls.dhparam", f"{path} is not a PEM file of DH parameters ({exc})")]
    if bits < MIN_DH_BITS:
        return [
            Problem(
                "tls.dhparam",
                f"the DH parameters in {path} have {bits} bits; at least {MIN_DH_BITS} are "
                f"required (openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048)",
            )
        ]
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).load_tmp_dh(path)
    except SSL.Error as exc:
        return [Problem("tls.dhparam", f"OpenSSL cannot use the DH parameters in {path}: {exc}")]
    return []


def check_tls_settings(settings: TLSSettings) -> tuple[TLSParameters | None, list[Problem]]:
    """Resolve the ``tls`` section and check it against the OpenSSL in use.

    Beyond `tlsproxy.profiles.check_settings`, reports cipher suites, TLS 1.3
    suites and groups OpenSSL does not know (at ``tls.ciphers``,
    ``tls.ciphersuites``, ``tls.groups``) and an unreadable, malformed or
    too small DH parameters file (``tls.dhparam``).  A default group OpenSSL
    lacks (X25519MLKEM768 before OpenSSL 3.5) is dropped with a logged warning.

    :return: the effective parameters (None if there are errors) and the problems.
    """
    params, problems = resolve(settings)
    if params is None:
        return None, problems
    version = openssl_version()
    for name in params.ciphers:
        if not _cipher_known(name):
            problems.append(Problem("tls.ciphers", f"{version} does not know the suite {name}"))
    for name in params.ciphersuites:
        if not _ciphersuite_known(name):
            problems.append(
                Problem("tls.ciphersuites", f"{version} does not know the TLS 1.3 suite {name}")
            )
    groups = []
    for name in params.groups:
        if group_supported(name):
            groups.append(name)
        elif params.groups_configured:
            problems.append(Problem("tls.groups", f"{version} does not know the group {name}"))
        else:
            log.warn(
                "{openssl} lacks the key-exchange group {group}; it will not be offered",
                openssl=version,
                group=name,
            )
    if params.dhparam is not None:
        problems += _check_dhparam(params.dhparam)
    if any(not p.warning for p in problems):
        return None, problems
    return attrs.evolve(params, groups=tuple(groups)), problems


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> Any:  # bytes | SSL.NO_OVERLAPPING_PROTOCOLS (typed differently by stub packages)
    """Choose ``http/1.1`` if offered; otherwise complete the handshake without ALPN."""
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class ChallengeCertificates:
    """The tls-alpn-01 certificates being presented right now, by host name.

    Filled by the ACME service from the reactor thread (`publish` before the
    CA is told the challenge is ready, `remove` afterwards); read by the ALPN
    callback of every host context, in memory only.  Lives as long as the
    process, across reloads.
    """

    def __init__(self) -> None:
        self._contexts: dict[str, SSL.Context] = {}

    def publish(self, name: str, key: Any, certificate: Any) -> None:
        """Answer ``acme-tls/1`` handshakes for ``name`` with ``certificate``.

        :param key: the certificate's private key (a ``cryptography`` key).
        :param certificate: a ``cryptography`` certificate (RFC 8737).
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(certificate)
        context.use_privatekey(key)
        self._contexts[name.lower()] = context

    def remove(self, name: str) -> None:
        """Stop answering for ``name`` (no error if nothing was published)."""
        self._contexts.pop(name.lower(), None)

    def lookup(self, server_name: bytes | None) -> SSL.Context | None:
        """The challenge context for the SNI ``server_name``, or None."""
        if not self._contexts or not server_name:
            return None
        return self._contexts.get(server_name.decode("ascii", "replace").lower())

    def __len__(self) -> int:
        return len(self._contexts)


def _alpn_selector(
    challenges: ChallengeCertificates,
) -> Callable[[SSL.Connection, list[bytes]], Any]:
    """`_select_alpn`, plus ``acme-tls/1`` for names with a pending tls-alpn-01 challenge.

    OpenSSL picks the certificate after the ALPN callback, so switching the
    connection's context here serves the challenge certificate.
    """

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        if ALPN_ACME_TLS in offered:
            context = challenges.lookup(connection.get_servername())
            if context is None:
                return SSL.NO_OVERLAPPING_PROTOCOLS  # acme-tls/1 is never for HTTP
            connection.set_context(context)
            connection.set_verify(SSL.VERIFY_NONE)  # the CA's validator has no client cert
            return ALPN_ACME_TLS
        return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _policy_context(
    params: TLSParameters, challenges: ChallengeCertificates | None = None
) -> SSL.Context:
    """A context with the hardened policy and no certificate yet.

    :raises SSL.Error: if OpenSSL refuses a setting (`check_tls_settings` has
        already ruled that out for valid parameters).
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_VERSIONS[params.min_version])
    context.set_max_proto_version(_VERSIONS[params.max_version])
    options = SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_COMPRESSION | _OP_NO_RENEGOTIATION
    if not params.session_tickets:
        options |= SSL.OP_NO_TICKET
    context.set_options(options)
    if params.ciphers:
        context.set_cipher_list(params.cipher_string.encode("ascii"))
    context.set_tls13_ciphersuites(params.ciphersuites_string.encode("ascii"))
    if not _set_groups(context, params.groups_string):
        raise SSL.Error([("tlsproxy", "", f"OpenSSL refused the groups {params.groups_string}")])
    if params.dhparam is not None:
        context.load_tmp_dh(params.dhparam)
    context.set_session_id(_SESSION_ID_CONTEXT)
    if challenges is None:
        context.set_alpn_select_callback(_select_alpn)
    else:
        context.set_alpn_select_callback(_alpn_selector(challenges))
    return context


def _use_certified_key(context: SSL.Context, certified: CertifiedKey) -> None:
    """Add a certificate with its own chain and its key to ``context``.

    ``SSL_CTX_use_certificate_chain_file`` attaches the intermediates to this
    certificate only (``add_extra_chain_cert`` would share them between the
    ECDSA and RSA certificates), so the public chain goes through a private
    temporary file, removed at once.

    :raises SSL.Error: if OpenSSL refuses the certificate or key.
    :raises OSError: if the temporary file cannot be written.
    """
    fd, path = tempfile.mkstemp(prefix="tlsproxy-chain-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(certified.chain_pem())
        context.use_certificate_chain_file(path)
    finally:
        os.unlink(path)
    # pyOpenSSL takes cryptography keys directly (PKey is deprecated); older stubs say PKey.
    context.use_privatekey(cast(crypto.PKey, certified.key))


@attrs.frozen(eq=False)
class ServerContexts:
    """An immutable set of per-host contexts: what one configuration serves.

    ``hosts`` maps every host name and alias (exact or ``*.`` wildcard) to its
    context; ``default`` is the default host's context, used when the client
    sends no SNI or a name no host matches.  ``verify_modes`` holds the
    contexts of hosts with ``client_auth`` and their verify modes (the others
    verify nothing); ``client_auth`` the same by host name, to compare two sets.
    """

    hosts: HostTable[SSL.Context]
    default: SSL.Context
    parameters: TLSParameters
    verify_modes: Mapping[SSL.Context, int] = attrs.field(factory=dict)
    client_auth: frozenset[tuple[str, int]] = frozenset()

    def context_for(self, server_name: bytes | str | None) -> SSL.Context:
        """The context serving ``server_name`` (raw SNI), or the default's."""
        return self.hosts.lookup(server_name) or self.default


def _switch_to_host(connection: SSL.Connection, contexts: ServerContexts) -> None:
    """Move a connection from its session context to the context of the host its
    SNI names (the default host's without SNI or for an unknown name).

    OpenSSL copies a context's verify mode into a connection when the
    connection is created, not when ``SSL_set_SSL_CTX`` switches it, so the
    connection's mode is set here for hosts with ``client_auth``.  The CA
    names and the verify store are read from the switched-to context.

    OpenSSL decides on resumption before this callback runs, with the session
    context's session ID context, so a session from another host can resume
    here; `tlsproxy.clientauth.verified_peer` verifies a resumed session's
    certificate again for the host, and the proxy refuses the request if it
    fails.
    """
    context = contexts.context_for(connection.get_servername())
    connection.set_context(context)
    mode = contexts.verify_modes.get(context, SSL.VERIFY_NONE)
    if mode != SSL.VERIFY_NONE:
        connection.set_verify(mode)
        # Stateful sessions only (the server cache keeps the client's chain,
        # which a stateless ticket drops), so that a resumed session's
        # certificate can be verified again for this host.
        _lib.SSL_set_options(connection._ssl, SSL.OP_NO_TICKET)


def build_server_contexts(
    config: Config,
    certificates: Mapping[str, Sequence[CertifiedKey]],
    challenges: ChallengeCertificates | None = None,
) -> tuple[ServerContexts | None, list[Problem]]:
    """Build every host's context from ``config.tls`` and the loaded certificates.

    ``certificates`` maps each host's canonical name to its loaded
    `CertifiedKey` values (see `tlsproxy.certs.load_certified_key`).  Besides
    the problems of `check_tls_settings`, reports a host with no usable
    certificate (``hosts.NAME.certificates``), two certificates of one key
    type on a host, and anything OpenSSL refuses (at the certificate's path).
    Nothing is bound or listened on.  With ``challenges``, every context
    answers tls-alpn-01 handshakes from it (see `ChallengeCertificates`).

    :return: the contexts (None if there are errors) and every problem.
    """
    params, problems = check_tls_settings(config.tls)
    if params is None:
        return None, problems
    table: HostTable[SSL.Context] = HostTable()
    verify_modes: dict[SSL.Context, int] = {}
    client_auth: set[tuple[str, int]] = set()
    default: SSL.Context | None = None
    for host in config.hosts:
        keys = certificates.get(host.name, ())
        if not keys:
            problems.append(
                Problem(f"hosts.{host.name}.certificates", "no certificate could be loaded")
            )
            continue
        try:
            context = _policy_context(params, challenges)
        except SSL.Error as exc:  # not expected after check_tls_settings
            problems.append(Problem("tls", f"OpenSSL refused the TLS settings: {exc}"))
            return None, problems
        by_type: dict[str, CertifiedKey] = {}
        for certified in keys:
            first = by_type.setdefault(certified.key_type, certified)
            if first is not certified:
                problems.append(
                    Problem(
                        certified.source.path,
                        f"a second {certified.key_type} certificate for {host.name} (the first "
                        f"is {first.source.path}); a host can have one per key type",
                    )
                )
                continue
            try:
                _use_certified_key(context, certified)
            except (SSL.Error, OSError) as exc:
                problems.append(Problem(certified.source.path, f"OpenSSL refused it: {exc}"))
        if host.client_auth is not None:
            material, more = load_client_auth(host.client_auth)
            problems += more
            if material is not None:
                configure_context(context, material)
                verify_modes[context] = material.verify_mode
                client_auth.update((name, material.verify_mode) for name in host.names)
        for name in host.names:
            if name not in table:
                table.add(name, context)
        if host.name == config.default_host:
            default = context
    if default is None and not any(not p.warning for p in problems):
        problems.append(Problem("default_host", f"{config.default_host} is not one of the hosts"))
    if default is None or any(not p.warning for p in problems):
        return None, problems
    log.info(
        "TLS policy {profile}: TLS {low} to {high}, groups {groups}, {hosts} hosts, {openssl}",
        profile=params.profile,
        low=params.min_version,
        high=params.max_version,
        groups=params.groups_string,
        hosts=len(config.hosts),
        openssl=openssl_version(),
    )
    return (
        ServerContexts(
            hosts=table,
            default=default,
            parameters=params,
            verify_modes=verify_modes,
            client_auth=frozenset(client_auth),
        ),
        problems,
    )


def _session_key(contexts: ServerContexts) -> tuple[TLSParameters, frozenset[tuple[str, int]]]:
    """What a session context is made for: the policy, and which hosts verify client
    certificates how (see `_SessionContext`)."""
    return contexts.parameters, contexts.client_auth


class _SessionContext:
    """The context every connection starts on, and the host contexts it switches to.

    Holds the policy but no certificate; OpenSSL keeps the session cache and
    the session-ticket keys (made at random when the context is created) in
    it.  ``contexts`` is replaced on reload while `_session_key` stays the same:
    a reload that adds ``client_auth`` to a host (or changes its mode) starts
    afresh, so that no session made without a client certificate resumes there.

    Client-auth hosts issue no stateless tickets (see `_switch_to_host`), and
    OpenSSL decides between its session cache and a ticket before the
    servername callback runs, by the options the connection starts with: so
    when any host verifies client certificates, every connection starts
    without stateless tickets and sessions resume from the cache (TLS 1.3
    included) on every host.
    """

    def __init__(self, contexts: ServerContexts, created: float) -> None:
        self.contexts = contexts
        self.key = _session_key(contexts)
        self.parameters = contexts.parameters
        self.created = created
        self.context = _policy_context(contexts.parameters)
        if contexts.client_auth:
            self.context.set_options(SSL.OP_NO_TICKET)
        self.context.set_tlsext_servername_callback(self._on_servername)

    def _on_servername(self, connection: SSL.Connection) -> None:
        _switch_to_host(connection, self.contexts)


@implementer(IOpenSSLServerConnectionCreator)
class SNIConnectionCreator:
    """Creates each accepted TLS connection on the current `ServerContexts`.

    Pass it to ``TLSServerFactory(creator, factory)`` (`tlsproxy.tlsconn`).
    ``now`` is the clock (seconds) that times the session context's life:
    it is replaced, with new ticket keys and an empty session cache, once
    it is ``parameters.session_ticket_rotation`` seconds old (checked as
    connections arrive), and when a reload changes the TLS policy.

    :raises SSL.Error: if OpenSSL refuses the policy (`check_tls_settings`
        has ruled that out for the parameters of built contexts).
    """

    def __init__(self, contexts: ServerContexts, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._session = _SessionContext(contexts, now())

    @property
    def contexts(self) -> ServerContexts:
        """The contexts new connections switch to."""
        return self._session.contexts

    def swap(self, contexts: ServerContexts) -> ServerContexts:
        """Serve new connections from ``contexts``; return the previous ones.

        Sessions stay resumable if the TLS policy and the hosts' client
        certificate settings are unchanged.  A reference
        assignment, so it is atomic; connections keep the contexts their
        handshake chose until they close.
        """
        session = self._session
        previous = session.contexts
        if _session_key(contexts) == session.key:
            session.contexts = contexts
        else:
            self._session = _SessionContext(contexts, self._now())
        return previous

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A server-side connection on the session context; the servername
        callback switches it to its host's context."""
        session = self._session
        now = self._now()
        if now - session.created >= session.parameters.session_ticket_rotation:
            session = self._session = _SessionContext(session.contexts, now)
            log.info(
                "TLS session ticket keys and session cache replaced (every {seconds:g} s)",
                seconds=session.parameters.session_ticket_rotation,
            )
        return SSL.Connection(session.context, None)
