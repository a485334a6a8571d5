#!/usr/bin/env python3
"""Container health check for tlsproxy: complete a TLS handshake with the HTTPS listener.

Connects to 127.0.0.1:$TLSPROXY_HEALTHCHECK_PORT (default 8443), sends the SNI name
$TLSPROXY_HEALTHCHECK_NAME if set, and exits 0 once the handshake has completed, 1 otherwise.
An open port whose TLS layer is broken is unhealthy.  The certificate is not verified: its
name is the site's, not 127.0.0.1, and the point is that tlsproxy answers, not who it is.
Must not send a request to the backend (a health check must not load the application).
"""

import os
import socket
import ssl
import sys


def main() -> int:
    port = int(os.environ.get("TLSPROXY_HEALTHCHECK_PORT", "8443"))
    name = os.environ.get("TLSPROXY_HEALTHCHECK_NAME") or None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=4) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            print(f"ok: {tls.version()} {tls.cipher()[0]}")
            return 0
    except (OSError, ValueError) as exc:
        print(f"unhealthy: 127.0.0.1:{port}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
