"""The built-in demo: a self-signed certificate and a small page to put behind the proxy.

``twistd -n tlsproxy --demo`` uses this so that a new user sees tlsproxy work
at once (``curl -k https://localhost:8443/``) without writing a config or
obtaining a certificate.  It is a real configuration going through the same
checks and code paths as any other; only the certificate is self-signed.

Must not be used for anything but the demo: the certificate is trusted by nobody.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tlsproxy.certs import self_signed

DEMO_HOST = "localhost"

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tlsproxy demo</title></head>
<body><h1>tlsproxy is working</h1>
<p>This page comes from a demo backend on plain HTTP; tlsproxy terminated TLS in front of it.</p>
<p>Write a proxy.yaml (see <code>config/example.yaml</code>) and run
<code>twistd -n tlsproxy --config proxy.yaml</code> to put your own site here.</p>
</body></html>
"""


def write_self_signed(directory: str, name: str = DEMO_HOST, days: int = 30) -> str:
    """Write an ECDSA P-256 key and self-signed certificate for ``name`` into one PEM.

    The certificate also covers 127.0.0.1 and ::1.  The file is created with
    mode 0600 in ``directory`` (created 0700 if missing).

    :return: the path of the PEM file (key followed by certificate).
    :raises OSError: if the directory or file cannot be written.
    """
    import ipaddress

    os.makedirs(directory, mode=0o700, exist_ok=True)
    sans: list[x509.GeneralName] = [
        x509.DNSName(name),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    now = datetime.datetime.now(datetime.UTC)
    key, cert = self_signed(sans, name, now, datetime.timedelta(days=days))
    path = os.path.join(directory, f"{name}-selfsigned.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


class _DemoPage(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _PAGE.encode("utf-8")

    render_HEAD = render_GET


def demo_site() -> Site:
    """The demo backend: one page on every path, over plain HTTP."""
    return Site(_DemoPage())


def demo_document(https_endpoint: str, certificate: str, backend_port: int) -> dict[str, Any]:
    """The demo's configuration, as a YAML document would decode to."""
    return {
        "listen": {"https": [https_endpoint]},
        "tls": {"profile": "intermediate"},
        "default_host": DEMO_HOST,
        "hosts": {
            DEMO_HOST: {
                "certificates": [certificate],
                "backend": f"http://127.0.0.1:{backend_port}",
            }
        },
    }
