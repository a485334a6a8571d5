"""The Python baseline: stock ``twisted.web.proxy.ReverseProxyResource`` behind Twisted TLS.

One job: serve HTTPS on 127.0.0.1 with the benchmark certificate and proxy
every request to the backend exactly as stock Twisted does (HTTP/1.0 with
``Connection: close`` to the backend, a new backend connection per request,
whole bodies in memory).  TLS is set up like the other peers as far as
Twisted's public API allows: TLS 1.2+, the same TLS 1.2 suites, and the same
TLS 1.3 suites and key-exchange groups (the groups through the OpenSSL binding
under pyOpenSSL, which has no public setter for them).

It is a benchmark peer only and must not be improved: it shows what a Python
proxy gets without tlsproxy's engine.
"""

from __future__ import annotations

import argparse
import sys

from OpenSSL import crypto
from OpenSSL._util import lib as _lib
from twisted.internet import endpoints, reactor, ssl
from twisted.web import proxy, server

from bench.configs import GROUPS
from tlsproxy.profiles import INTERMEDIATE_CIPHERS, TLS13_CIPHERSUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--combined", required=True, help="PEM with key, leaf, intermediate")
    ns = parser.parse_args(argv)

    with open(ns.combined, "rb") as f:
        data = f.read()
    certs = [
        crypto.load_certificate(crypto.FILETYPE_PEM, b + b"-----END CERTIFICATE-----\n")
        for b in data.split(b"-----END CERTIFICATE-----")
        if b"BEGIN CERTIFICATE" in b
    ]
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, data)
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
            ":".join(INTERMEDIATE_CIPHERS)
        ),
    )
    context = options.getContext()
    context.set_tls13_ciphersuites(":".join(TLS13_CIPHERSUITES).encode("ascii"))
    if _lib.SSL_CTX_set1_curves_list(context._context, ":".join(GROUPS).encode("ascii")) != 1:
        raise SystemExit("OpenSSL refused the groups")

    site = server.Site(proxy.ReverseProxyResource("127.0.0.1", ns.backend_port, b""))
    site.displayTracebacks = False
    endpoint = endpoints.SSL4ServerEndpoint(
        reactor, ns.port, options, backlog=4096, interface="127.0.0.1"
    )
    endpoint.listen(site)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
