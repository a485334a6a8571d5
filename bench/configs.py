"""Configuration text for every process the benchmark runs, and its test certificate.

One job: given ports and file paths, produce the nginx, HAProxy and tlsproxy
configurations (and the PKI files they share) so that all TLS-terminating
peers are configured the same way: Mozilla intermediate TLS (TLS 1.2 and 1.3,
the same suites in the same server order, groups X25519:prime256v1:secp384r1),
the same ECDSA P-256 certificate and intermediate, session tickets on,
persistent (keep-alive) connections to the same backend, streaming bodies,
forwarding headers and HSTS added; WebSocket upgrades under `WS_PREFIX` go to
a second backend, the WebSocket echo server.

Pure module: builds strings and writes the files it is told to; it must not
start processes or open sockets.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsproxy.profiles import INTERMEDIATE_CIPHERS, TLS13_CIPHERSUITES

#: The key-exchange groups every peer offers.  Mozilla's list without the
#: post-quantum hybrid, which Debian 12's OpenSSL (used by nginx, HAProxy, wrk
#: and curl) does not have.
GROUPS: tuple[str, ...] = ("X25519", "prime256v1", "secp384r1")

#: The name in the benchmark certificate (clients connect to 127.0.0.1 and send it as SNI).
SERVER_NAME = "bench.tlsproxy.test"

#: Paths the backend serves.
SMALL_PATH = "/small"
BIG_PATH = "/big"
UPLOAD_PATH = "/upload"
#: The WebSocket prefix every peer routes to the WebSocket echo backend
#: (`bench.wsecho`), and the path the load generator (`bench.websocket`) opens.
WS_PREFIX = "/ws/"
WS_PATH = WS_PREFIX + "echo"

#: The small response body (what the keep-alive and handshake runs fetch).
SMALL_BODY = "hello from the benchmark backend\n"

#: Size of the bulk body, downloaded and uploaded.
BIG_SIZE = 64 * 1024 * 1024

#: nginx's echo module (Debian: libnginx-mod-http-echo): the backend reads whole uploads
#: before it answers, as an application would (nginx's own ``return`` answers at once and
#: discards the body afterwards, and a proxy may then stop forwarding it).
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")

#: The HSTS header every proxy adds (tlsproxy's default value).
HSTS_VALUE = "max-age=63072000"

#: Largest request body each proxy accepts (tlsproxy's default).
MAX_BODY_BYTES = 100 * 1024 * 1024


@attrs.frozen
class Pki:
    """Paths of the benchmark certificate files (all PEM)."""

    #: The root certificate clients may trust.
    ca: Path
    #: Private key alone.
    key: Path
    #: Leaf certificate followed by the intermediate.
    chain: Path
    #: Key, leaf and intermediate in one file (tlsproxy and HAProxy read this).
    combined: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy benchmark"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=60 if not ca else 365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVER_NAME),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path) -> Pki:
    """Make a root CA, an intermediate and an ECDSA P-256 leaf for `SERVER_NAME`.

    The files are readable by their owner only, except the CA certificate.
    """
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("benchmark root", root_key, None, root_key, ca=True)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _certificate("benchmark intermediate", mid_key, root, root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(SERVER_NAME, leaf_key, mid, mid_key, ca=False)

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pki = Pki(
        ca=directory / "ca.pem",
        key=directory / "server.key",
        chain=directory / "server.chain.pem",
        combined=directory / "server.combined.pem",
    )
    for path, data, mode in (
        (pki.ca, pem(root), 0o644),
        (pki.key, key_pem, 0o600),
        (pki.chain, pem(leaf) + pem(mid), 0o600),
        (pki.combined, pem(leaf) + pem(mid) + key_pem, 0o600),
    ):
        path.write_bytes(data)
        os.chmod(path, mode)
    return pki


def _user_line() -> str:
    # As root, nginx's workers would switch to "nobody" and could not read the
    # files in the private run directory; keep them the same user as the master.
    return "user root;\n" if os.geteuid() == 0 else ""


def nginx_backend_conf(*, prefix: Path, port: int, docroot: Path) -> str:
    """The fast plain-HTTP backend: one nginx worker serving `SMALL_BODY` and the big
    file, and answering uploads with a 200 once it has read the whole body (in memory)."""
    return f"""\
# Benchmark backend (generated by bench/configs.py).
load_module {ECHO_MODULE};
{_user_line()}worker_processes 1;
pid {prefix / "backend.pid"};
error_log {prefix / "backend.error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    client_body_temp_path {prefix / "backend-client-body"};
    proxy_temp_path {prefix / "backend-proxy-temp"};
    fastcgi_temp_path {prefix / "backend-fastcgi-temp"};
    uwsgi_temp_path {prefix / "backend-uwsgi-temp"};
    scgi_temp_path {prefix / "backend-scgi-temp"};
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        location = {SMALL_PATH} {{
            default_type text/plain;
            return 200 "{SMALL_BODY.rstrip()}\\n";
        }}
        location = {BIG_PATH} {{ try_files /big.bin =404; }}
        location = {UPLOAD_PATH} {{
            # Read the whole body into memory first, then answer.
            client_body_buffer_size {MAX_BODY_BYTES};
            default_type text/plain;
            echo_read_request_body;
            echo "uploaded";
        }}
    }}
}}
"""


def _nginx_tls_lines(pki: Pki) -> str:
    return f"""\
        ssl_certificate {pki.chain};
        ssl_certificate_key {pki.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {":".join(INTERMEDIATE_CIPHERS)};
        ssl_conf_command Ciphersuites {":".join(TLS13_CIPHERSUITES)};
        ssl_ecdh_curve {":".join(GROUPS)};
        ssl_prefer_server_ciphers on;
        ssl_session_tickets on;
"""


def nginx_proxy_conf(
    *,
    prefix: Path,
    port: int,
    backend_port: int,
    pki: Pki,
    session_log_port: int | None = None,
    workers: int = 1,
    ws_port: int | None = None,
) -> str:
    """nginx with ``workers`` worker processes as a TLS-terminating reverse proxy for the backend.

    Equivalent to tlsproxy: its TLS settings, keep-alive to clients and to the
    backend, bodies streamed both ways (no request buffering, no temp files),
    forwarding headers and HSTS added; with ``ws_port``, WebSocket upgrades
    under `WS_PREFIX` to the echo server there.  With ``session_log_port``, a second
    server with the same TLS settings logs ``$ssl_session_reused`` for each
    request to ``prefix/session.log`` (to check a load generator resumes nothing).
    """
    tls = _nginx_tls_lines(pki)
    proxy = f"""\
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $host;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            add_header Strict-Transport-Security "{HSTS_VALUE}" always;
"""
    websocket = ws_upstream = ""
    if ws_port is not None:
        ws_upstream = f"""\
    upstream bench_ws {{
        server 127.0.0.1:{ws_port};
    }}
"""
        websocket = f"""\
        location {WS_PREFIX} {{
            proxy_pass http://bench_ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout 75s;
        }}
"""
    session_server = ""
    if session_log_port is not None:
        session_server = f"""\
    log_format bench_session "$ssl_session_reused $ssl_protocol";
    server {{
        listen 127.0.0.1:{session_log_port} ssl;
        server_name {SERVER_NAME};
{tls}        access_log {prefix / "session.log"} bench_session;
        location / {{
{proxy}        }}
    }}
"""
    return f"""\
# nginx as the reference TLS proxy (generated by bench/configs.py).
{_user_line()}worker_processes {workers};
pid {prefix / "nginx.pid"};
error_log {prefix / "nginx.error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size {MAX_BODY_BYTES};
    client_body_temp_path {prefix / "nginx-client-body"};
    proxy_temp_path {prefix / "nginx-proxy-temp"};
    fastcgi_temp_path {prefix / "nginx-fastcgi-temp"};
    uwsgi_temp_path {prefix / "nginx-uwsgi-temp"};
    scgi_temp_path {prefix / "nginx-scgi-temp"};
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
{ws_upstream}    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name {SERVER_NAME};
{tls}        location / {{
{proxy}        }}
{websocket}    }}
{session_server}}}
"""


def haproxy_conf(*, port: int, backend_port: int, pki: Pki, ws_port: int | None = None) -> str:
    """HAProxy with one thread as a TLS-terminating reverse proxy for the backend,
    configured like `nginx_proxy_conf`."""
    ws_rule = ws_backend = ""
    if ws_port is not None:
        ws_rule = f"    use_backend ws if {{ path_beg {WS_PREFIX} }}\n"
        ws_backend = f"""
backend ws
    timeout tunnel 75s
    server ws1 127.0.0.1:{ws_port}
"""
    return f"""\
# HAProxy as a reference TLS proxy (generated by bench/configs.py).
global
    nbthread 1
    maxconn 8192
    ssl-default-bind-ciphers {":".join(INTERMEDIATE_CIPHERS)}
    ssl-default-bind-ciphersuites {":".join(TLS13_CIPHERSUITES)}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-curves {":".join(GROUPS)}
    tune.ssl.default-dh-param 2048

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 10s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    timeout http-request 60s

frontend tls
    bind 127.0.0.1:{port} ssl crt {pki.combined} alpn http/1.1
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-response set-header Strict-Transport-Security "{HSTS_VALUE}"
{ws_rule}    default_backend app

backend app
    server app1 127.0.0.1:{backend_port} pool-max-conn 64
{ws_backend}"""


def tlsproxy_config(
    *, port: int, backend_port: int, pki: Pki, workers: int = 1, ws_port: int | None = None
) -> dict[str, Any]:
    """tlsproxy's YAML document (as a mapping) for the same certificate and backend,
    with ``workers`` processes."""
    host: dict[str, Any] = {
        "certificates": [str(pki.combined)],
        "backend": f"http://127.0.0.1:{backend_port}",
    }
    if ws_port is not None:
        host["routes"] = [{"path": WS_PREFIX, "backend": f"http://127.0.0.1:{ws_port}"}]
    return {
        "workers": workers,
        "listen": {"https": [f"tcp:{port}:interface=127.0.0.1:backlog=4096"]},
        "tls": {"profile": "intermediate", "groups": list(GROUPS)},
        "hosts": {SERVER_NAME: host},
    }
