"""TLS to ``https://`` backends: a client connection creator per backend.

One job: turn a backend's `tlsproxy.config.BackendTLS` settings into the
``IOpenSSLClientConnectionCreator`` that `tlsproxy.upstream` wraps its
backend connections with.  Certificates are verified by Twisted's
``optionsForClientTLS`` (service-identity host name or IP address checks)
against the system's CA store, or only the CAs of ``backend_tls.ca``; a
``backend_tls.cert``/``key`` client certificate is presented when the backend
asks.  ``insecure_skip_verify`` builds a creator that checks nothing (still
TLS 1.2+, still sending SNI for names).

`check_backend_tls` reads and checks every file before anything binds and
reports ``insecure_skip_verify`` as a warning.  Must not block inside TLS
callbacks, and must never log key material.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from tlsproxy.config import Backend, BackendTLS, Config
from tlsproxy.errors import Problem


@implementer(IOpenSSLClientConnectionCreator)
class _InsecureCreator:
    """Client connections that verify nothing (``insecure_skip_verify: true``)."""

    def __init__(self, hostname: str, options: ssl.CertificateOptions) -> None:
        self._context = options.getContext()
        is_name = not (isIPAddress(hostname) or isIPv6Address(hostname))
        self._sni = hostname.encode("idna") if is_name else None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_END = b"-----END CERTIFICATE-----"


def _certificates(pem: bytes) -> list[bytes]:
    """The PEM certificate blocks of a file, in order."""
    blocks = []
    for part in pem.split(_END)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start != -1:
            blocks.append(part[start:] + _END + b"\n")
    return blocks


def client_creator(backend: Backend) -> IOpenSSLClientConnectionCreator:
    """The connection creator for an ``https`` backend (reads its files).

    :raises OSError: if a file cannot be read.
    :raises Exception: (``SSL.Error``, ``ValueError``) if a file is not usable.
    """
    settings = backend.tls or BackendTLS()
    client = None
    extra: dict[str, Any] = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if settings.cert is not None and settings.key is not None:
        certs = _certificates(_read(settings.cert))
        if not certs:
            raise ValueError(f"{settings.cert} holds no BEGIN CERTIFICATE block")
        key = _read(settings.key)
        try:  # never let OpenSSL prompt for a passphrase on the terminal
            load_pem_private_key(key, password=None)
        except TypeError:
            raise ValueError(
                f"{settings.key} is an encrypted private key; tlsproxy needs it unencrypted "
                "(readable only by tlsproxy)"
            ) from None
        client = ssl.PrivateCertificate.loadPEM(certs[0] + key)
        # the intermediates after the leaf go out with it
        extra["extraCertChain"] = [ssl.Certificate.loadPEM(c).original for c in certs[1:]]
    if settings.insecure_skip_verify:
        kwargs: dict[str, Any] = {"verify": False, **extra}
        if client is not None:
            kwargs.update(privateKey=client.privateKey.original, certificate=client.original)
        return _InsecureCreator(backend.host, ssl.CertificateOptions(**kwargs))
    trust: Any = None
    if settings.ca is not None:
        blocks = _certificates(_read(settings.ca))
        if not blocks:
            raise ValueError(f"{settings.ca} holds no BEGIN CERTIFICATE block")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    return ssl.optionsForClientTLS(
        backend.host, trustRoot=trust, clientCertificate=client, extraCertificateOptions=extra
    )


def _https_backends(config: Config) -> Iterator[tuple[str, Backend]]:
    for host in config.hosts:
        if host.backend.scheme == "https":
            yield f"hosts.{host.name}.backend", host.backend
        for i, route in enumerate(host.routes):
            if route.backend.scheme == "https":
                yield f"hosts.{host.name}.routes[{i}].backend", route.backend


def check_backend_tls(config: Config) -> list[Problem]:
    """Build every ``https`` backend's creator once; report unusable files (errors)
    and ``insecure_skip_verify`` (a warning), each at its key path."""
    problems: list[Problem] = []
    warned: set[str] = set()
    for path, backend in _https_backends(config):
        where = backend.tls.path if backend.tls is not None and backend.tls.path else path
        try:
            client_creator(backend)
        except OSError as exc:
            problems.append(Problem(where, f"cannot read a file: {exc.strerror or exc}"))
        except Exception as exc:
            problems.append(Problem(where, f"is not usable: {exc}"))
        if backend.tls is not None and backend.tls.insecure_skip_verify and where not in warned:
            warned.add(where)
            problems.append(
                Problem(
                    f"{where}.insecure_skip_verify",
                    f"the certificate of {backend.url} is not verified: anyone on the "
                    f"network path can impersonate the backend",
                    warning=True,
                )
            )
    return problems
