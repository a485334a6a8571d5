"""The control channel between the supervisor and its workers: AMP commands.

One job: name the commands the parent and a worker send each other over
their private socketpair (see `tlsproxy.supervisor` and `tlsproxy.worker`),
with their arguments and answers, and the little helpers both sides need to
move values bigger than one AMP value (64 KiB) through it.

Parent → worker: `Configure` (a `Snapshot` of what to serve: the
configuration text and the certificates the parent checked), `PublishToken`,
`RemoveToken`, `PublishChallengeCertificate`, `RemoveChallengeCertificate`,
`ReopenLogs`, `MetricsPage`.  Worker → parent: `Ready`.

Workers serve exactly what the parent checked: they are sent the
configuration text and the loaded certificates (`encode_snapshot`), instead of
reading those files again, so a file changed in between (or readable only by
the user tlsproxy started as) cannot make a worker differ from its parent.

It must not: decide anything (the responders live with the objects they act
on), touch the reactor, or carry anything off the machine: private keys
(served certificates, tls-alpn-01) cross the socketpair in PEM, which never
leaves this host and is never logged.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.protocols import amp

from tlsproxy.certs import CertifiedKey
from tlsproxy.config import CertificateSource

__all__ = [
    "PAGE",
    "Configure",
    "MetricsPage",
    "PublishChallengeCertificate",
    "PublishToken",
    "Ready",
    "RemoveChallengeCertificate",
    "RemoveToken",
    "ReopenLogs",
    "Snapshot",
    "decode_snapshot",
    "encode_snapshot",
    "pages",
]

#: Bytes per page of a paged answer: below AMP's 65,535-byte limit per value.
PAGE = 60_000


class Ready(amp.Command):
    """Worker → parent: the worker's engines are built; answered once the parent
    has replayed the current ACME challenges, after which the worker starts
    accepting connections."""

    arguments = [(b"pid", amp.Integer())]
    response = []


class Configure(amp.Command):
    """One page of a `Snapshot` (see `encode_snapshot`): what the worker serves.

    The pages of one snapshot (same ``snapshot`` number, rising ``offset``)
    are sent in order; the one with ``final`` true makes the worker build its
    engines (the first time) or apply it as a reload (``kind``: ``start``,
    ``reload`` or ``certificates``, a newly issued ACME certificate).  Only the
    final page's answer means anything: ``ok`` false means the worker refused
    it (``errors``, one line each) and keeps serving what it had.
    """

    arguments = [
        (b"snapshot", amp.Integer()),
        (b"offset", amp.Integer()),
        (b"data", amp.String()),
        (b"final", amp.Boolean()),
        (b"kind", amp.Unicode()),
    ]
    response = [(b"ok", amp.Boolean()), (b"errors", amp.ListOf(amp.Unicode()))]


class PublishToken(amp.Command):
    """Answer an http-01 challenge for ``token`` on the port-80 listeners."""

    arguments = [(b"token", amp.Unicode()), (b"key_authorization", amp.Unicode())]
    response = []


class RemoveToken(amp.Command):
    """Stop answering the http-01 challenge for ``token``."""

    arguments = [(b"token", amp.Unicode())]
    response = []


class PublishChallengeCertificate(amp.Command):
    """Answer ``acme-tls/1`` handshakes for ``name`` with a tls-alpn-01 certificate (PEM)."""

    arguments = [(b"name", amp.Unicode()), (b"key", amp.String()), (b"certificate", amp.String())]
    response = []


class RemoveChallengeCertificate(amp.Command):
    """Stop answering ``acme-tls/1`` handshakes for ``name``."""

    arguments = [(b"name", amp.Unicode())]
    response = []


class ReopenLogs(amp.Command):
    """Reopen the access log at its path (logrotate moved it; the parent got SIGUSR1)."""

    arguments = []
    response = []


class Ping(amp.Command):
    """Answer at once: the supervisor's watchdog checks that the worker's event loop runs."""

    arguments = []
    response = []


class MetricsPage(amp.Command):
    """One page of the worker's Prometheus exposition (text format).

    ``offset`` 0 takes a new snapshot and answers its ``snapshot`` number;
    later pages name it.  ``total`` is the snapshot's length in bytes.
    """

    arguments = [(b"snapshot", amp.Integer()), (b"offset", amp.Integer())]
    response = [(b"snapshot", amp.Integer()), (b"data", amp.String()), (b"total", amp.Integer())]


def pages(data: bytes, offset: int) -> bytes:
    """The page of ``data`` starting at ``offset``."""
    return data[offset : offset + PAGE]


@attrs.frozen
class Snapshot:
    """What a worker serves: the configuration file's text as the parent
    parsed it (``source`` is its path, for messages), and every host's
    loaded, checked certificates.  ``started_with`` is the text tlsproxy
    started with: a worker built from this snapshot takes the settings that
    change only at a restart from it (`tlsproxy.config.with_restart_settings`),
    so that a restarted worker has them as the other workers do."""

    source: str
    text: str
    certificates: dict[str, list[CertifiedKey]]
    started_with: str | None = None


def _key_pem(key: Any) -> str:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode("ascii")


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """``snapshot`` as bytes for `Configure` pages (JSON, keys in PEM)."""
    hosts = {
        host: [
            {
                "key": _key_pem(c.key),
                "certificates": c.chain_pem().decode("ascii"),
                "key_type": c.key_type,
                "names": list(c.names),
                "not_after": c.not_after.isoformat(),
                "source": [c.source.key, c.source.cert, c.source.chain, c.source.path],
            }
            for c in keys
        ]
        for host, keys in snapshot.certificates.items()
    }
    document = {
        "source": snapshot.source,
        "text": snapshot.text,
        "certificates": hosts,
        "started_with": snapshot.started_with,
    }
    return json.dumps(document).encode("utf-8")


def decode_snapshot(data: bytes) -> Snapshot:
    """The `Snapshot` that `encode_snapshot` made ``data`` of.

    :raises ValueError: if ``data`` is not one.
    """
    try:
        document = json.loads(data)
        certificates: dict[str, list[CertifiedKey]] = {}
        for host, keys in document["certificates"].items():
            loaded = certificates[host] = []
            for c in keys:
                chain = x509.load_pem_x509_certificates(c["certificates"].encode("ascii"))
                key, cert, chain_file, path = c["source"]
                loaded.append(
                    CertifiedKey(
                        key=serialization.load_pem_private_key(  # type: ignore[arg-type]
                            c["key"].encode("ascii"), None
                        ),
                        leaf=chain[0],
                        chain=tuple(chain[1:]),
                        key_type=c["key_type"],
                        names=tuple(c["names"]),
                        not_after=datetime.datetime.fromisoformat(c["not_after"]),
                        source=CertificateSource(key, cert, chain_file, path),
                    )
                )
        return Snapshot(
            document["source"], document["text"], certificates, document.get("started_with")
        )
    except (KeyError, TypeError, IndexError, UnicodeError) as exc:
        raise ValueError(f"not a configuration snapshot: {exc!r}") from None
