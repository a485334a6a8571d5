"""Real applications behind the real ``twistd tlsproxy``, over TLS.

One tlsproxy process serves ``app.test`` with path routes to three backends the
tests start themselves:

* ``/`` → a small Django project (``tests/e2e/djangoapp``) under gunicorn, set
  up as the README recommends (``SECURE_PROXY_SSL_HEADER``,
  ``USE_X_FORWARDED_HOST``, secure cookies, ``SECURE_SSL_REDIRECT``);
* ``/ws/`` → a WebSocket echo server built with the ``websockets`` package;
* ``/bulk/`` → a plain socket server that takes and sends 256 MiB bodies, to
  check that bodies stream and the proxy's memory stays flat.

Clients connect from 127.0.0.2 so that the client address the backend is told
differs from the proxy's own (127.0.0.1).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as ws_serve

from tests import pki
from tests.e2e.harness import TlsproxyProcess, free_port, start_tlsproxy, wait_for_port
from tests.e2e.rawbackend import read_response, tls_client

pytestmark = pytest.mark.e2e

E2E = Path(__file__).resolve().parent
CLIENT_ADDRESS = "127.0.0.2"
MIB = 1024 * 1024
BULK = 256 * MIB
BLOCK = bytes(range(256)) * 4096  # 1 MiB
TIMEOUT = 30.0


def bulk_digest(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // len(BLOCK)):
        digest.update(BLOCK)
    return digest.hexdigest()


class BulkBackend:
    """``POST /bulk/up`` (Content-Length): answers the body's length and SHA-256;
    ``GET /bulk/down/N``: answers N bytes made of `BLOCK`."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        with sock, contextlib.suppress(OSError):  # the proxy may close pooled connections
            self._exchange(sock)

    def _exchange(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(MIB)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            target = head.split(b" ")[1]
            if target.startswith(b"/bulk/down/"):
                size = int(target.rsplit(b"/", 1)[1])
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                for _ in range(size // len(BLOCK)):
                    sock.sendall(BLOCK)
                continue
            match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            remaining = int(match.group(1)) if match else 0
            digest = hashlib.sha256()
            seen = 0
            body, buf = buf[:remaining], buf[remaining:]
            while True:
                digest.update(body)
                seen += len(body)
                if seen >= remaining:
                    break
                body = sock.recv(min(MIB, remaining - seen))
                if not body:
                    return
            answer = json.dumps({"length": seen, "sha256": digest.hexdigest()}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
            sock.sendall(answer)

    def close(self) -> None:
        self._server.close()


def _echo(ws: ServerConnection) -> None:
    for message in ws:
        if message == "close please":
            ws.close(1000, "bye")
            return
        ws.send(message)


@attrs.frozen
class Setup:
    proxy: TlsproxyProcess
    ca_file: Path
    gunicorn_port: int

    @property
    def port(self) -> int:
        return self.proxy.https_port


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("apps")
    gunicorn_port = free_port()
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="djangoapp.settings")
    log = open(tmp / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    gunicorn = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{gunicorn_port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--chdir",
            str(E2E),
            "djangoapp.wsgi:application",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ws_server: Server = ws_serve(_echo, "127.0.0.1", 0, max_size=8 * MIB)
    threading.Thread(target=ws_server.serve_forever, daemon=True).start()
    bulk = BulkBackend()
    proxy = None
    try:
        wait_for_port(gunicorn_port, gunicorn, timeout=30)
        ca = pki.make_ca()
        cert = pki.write_combined(tmp, ca.issue(["app.test"]), name="app.pem")
        ws_port = ws_server.socket.getsockname()[1]
        config = {
            "proxy": {"max_body_bytes": "512M"},  # the default (100M) would refuse 256 MiB
            "hosts": {
                "app.test": {
                    "certificates": [str(cert)],
                    "backend": f"http://127.0.0.1:{gunicorn_port}",
                    "routes": [
                        {"path": "/ws/", "backend": f"http://127.0.0.1:{ws_port}"},
                        {"path": "/bulk/", "backend": f"http://127.0.0.1:{bulk.port}"},
                    ],
                }
            },
        }
        proxy = start_tlsproxy(config, tmp)
        yield Setup(proxy, pki.write_ca_file(tmp, ca), gunicorn_port)
    finally:
        if proxy is not None:
            proxy.stop()
        gunicorn.terminate()
        try:
            gunicorn.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait(timeout=10)
        log.close()
        ws_server.shutdown()
        bulk.close()


class _Connection(http.client.HTTPSConnection):
    """HTTPS to tlsproxy as ``app.test``, from `CLIENT_ADDRESS`."""

    def __init__(self, setup: Setup) -> None:
        context = ssl.create_default_context(cafile=str(setup.ca_file))
        super().__init__("app.test", setup.port, context=context, timeout=TIMEOUT)

    def connect(self) -> None:
        sock = socket.create_connection(
            ("127.0.0.1", self.port), self.timeout, source_address=(CLIENT_ADDRESS, 0)
        )
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@attrs.frozen
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def cookies(self) -> dict[str, str]:
        """Set-Cookie headers by cookie name (the whole header value)."""
        found = {}
        for name, value in self.headers:
            if name.lower() == "set-cookie":
                found[value.split("=", 1)[0]] = value
        return found

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    setup: Setup,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> Reply:
    conn = _Connection(setup)
    try:
        conn.putrequest(method, path)
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


# -------------------------------------------------------------------------- Django


def test_django_sees_https_public_host_and_client_address(setup: Setup) -> None:
    """Behind tlsproxy, Django's request.is_secure() is true (no SSL redirect),
    get_host() is the public host, and the client's address arrives in
    X-Forwarded-For (and so in REMOTE_ADDR), while gunicorn's peer is the proxy."""
    reply = call(setup, "GET", "/info")
    assert reply.status == 200, reply
    info = reply.json()
    public = f"app.test:{setup.port}"
    assert info["is_secure"] is True and info["scheme"] == "https"
    assert info["host"] == public
    assert info["absolute_uri"] == f"https://{public}/x"
    assert info["x_forwarded_for"] == CLIENT_ADDRESS
    assert info["remote_addr"] == CLIENT_ADDRESS
    assert info["proxy_addr"] == "127.0.0.1"
    assert info["forwarded"] == f'for={CLIENT_ADDRESS};proto=https;host="{public}"'


def test_spoofed_forwarding_headers_are_not_believed(setup: Setup) -> None:
    """Forwarding headers sent by the client (claiming plain HTTP, another address,
    another host) never reach Django: it still sees HTTPS, the real client address
    and the public host."""
    spoof = [
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Port", "80"),
        ("Forwarded", "for=6.6.6.6;proto=http;host=evil.example"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Forwarded_Proto", "http"),
    ]
    info = call(setup, "GET", "/info", spoof).json()
    assert info["is_secure"] is True
    assert info["host"] == f"app.test:{setup.port}"
    assert info["remote_addr"] == CLIENT_ADDRESS
    assert info["x_forwarded_for"] == CLIENT_ADDRESS
    assert "6.6.6.6" not in json.dumps(info) and "evil" not in json.dumps(info)


def test_spoofed_headers_would_fool_django_without_the_proxy(setup: Setup) -> None:
    """Control: sent straight to gunicorn, the same spoofed headers are believed, which
    is why the proxy must drop them (and why the test above means something)."""
    conn = http.client.HTTPConnection("127.0.0.1", setup.gunicorn_port, timeout=TIMEOUT)
    try:
        conn.request(
            "GET",
            "/info",
            headers={
                "Host": "app.test",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-For": "6.6.6.6",
            },
        )
        info = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert info["is_secure"] is True and info["remote_addr"] == "6.6.6.6"


def _form_fields(body: bytes) -> str:
    match = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body)
    assert match is not None, body
    return match.group(1).decode()


def test_csrf_protected_form_with_secure_cookies(setup: Setup) -> None:
    """The CSRF-protected form works through the proxy: GET sets Secure csrftoken and
    session cookies; a POST with the cookies, the token and the browser's Origin is
    accepted and sees the session."""
    form = call(setup, "GET", "/form")
    assert form.status == 200
    cookies = form.cookies()
    assert "Secure" in cookies["csrftoken"] and "Secure" in cookies["sessionid"]
    token = _form_fields(form.body)
    jar = "; ".join(v.split(";", 1)[0] for v in cookies.values())
    body = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "name": "Ada"}).encode()
    reply = call(
        setup,
        "POST",
        "/form",
        [
            ("Cookie", jar),
            ("Origin", f"https://app.test:{setup.port}"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
    assert reply.status == 200, reply.body[:500]
    assert reply.json() == {"name": "Ada", "visits": 1}


@pytest.mark.parametrize("missing", ["cookie", "token"])
def test_csrf_post_without_cookie_or_token_is_403(setup: Setup, missing: str) -> None:
    """A POST lacking the CSRF cookie or the token is refused by Django (403)."""
    form = call(setup, "GET", "/form")
    token = _form_fields(form.body)
    jar = "; ".join(v.split(";", 1)[0] for v in form.cookies().values())
    fields = {"name": "Eve"} if missing == "token" else {"csrfmiddlewaretoken": token}
    headers = [
        ("Origin", f"https://app.test:{setup.port}"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]
    if missing != "cookie":
        headers.append(("Cookie", jar))
    reply = call(setup, "POST", "/form", headers, urllib.parse.urlencode(fields).encode())
    assert reply.status == 403


# ----------------------------------------------------------------------- WebSocket


def _ws(setup: Setup) -> Any:
    sock = socket.create_connection(
        ("127.0.0.1", setup.port), TIMEOUT, source_address=(CLIENT_ADDRESS, 0)
    )
    context = ssl.create_default_context(cafile=str(setup.ca_file))
    return ws_connect(
        f"wss://app.test:{setup.port}/ws/echo",
        sock=sock,
        ssl=context,
        server_hostname="app.test",
        max_size=8 * MIB,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
    )


def test_websocket_echo_text_and_large_binary(setup: Setup) -> None:
    """A WebSocket app behind the proxy (over TLS) echoes text messages and a 4 MiB
    binary message intact; the client closes cleanly (code 1000)."""
    payload = os.urandom(4 * MIB)
    with _ws(setup) as ws:
        for text in ("hello", "ünïcode ✓", "x" * 70000):
            ws.send(text)
            assert ws.recv(timeout=TIMEOUT) == text
        ws.send(payload)
        assert ws.recv(timeout=TIMEOUT) == payload
        ws.close(1000, "done")
        assert ws.close_code == 1000


def test_websocket_server_side_close(setup: Setup) -> None:
    """When the app closes the WebSocket, the client gets its close frame (1000, reason)
    through the proxy."""
    with _ws(setup) as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=TIMEOUT)
        assert ws.close_code == 1000 and ws.close_reason == "bye"


# ----------------------------------------------------------- streaming and memory


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _rss_baseline(setup: Setup) -> int:
    """The proxy's resident memory (KiB) after a warm-up exchange on the bulk route."""
    with tls_client(setup.port, setup.ca_file, "app.test") as sock:
        sock.sendall(b"GET /bulk/down/1048576 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        _, body = read_response(sock)
        assert body == BLOCK
    return _status_kib(setup.proxy.proc.pid, "VmRSS")


def test_256_mib_upload_and_download_stream_with_flat_memory(setup: Setup) -> None:
    """A 256 MiB upload and a 256 MiB download pass through intact and in bounded time,
    while the proxy's peak memory grows by less than 64 MiB: bodies stream."""
    pid = setup.proxy.proc.pid
    baseline = _rss_baseline(setup)
    start = time.monotonic()
    expected = bulk_digest(BULK)
    with tls_client(setup.port, setup.ca_file, "app.test", timeout=120) as sock:
        sock.sendall(
            b"POST /bulk/up HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n" % BULK
        )
        for _ in range(BULK // len(BLOCK)):
            sock.sendall(BLOCK)
        answer = b""
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            assert data, answer
            answer += data
        result = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert result == {"length": BULK, "sha256": expected}

        sock.sendall(b"GET /bulk/down/%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % BULK)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, first = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % BULK in head
        digest = hashlib.sha256(first)
        received = len(first)
        while received < BULK:
            data = sock.recv(MIB)
            assert data
            digest.update(data)
            received += len(data)
        assert received == BULK and digest.hexdigest() == expected
    elapsed = time.monotonic() - start
    peak = _status_kib(pid, "VmHWM")
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 64, f"proxy peak RSS grew by {growth_mib:.1f} MiB"
    assert elapsed < 120
