"""Running the real ``twistd tlsproxy`` process and external tools from end-to-end tests.

Everything binds to loopback only, and every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"


def need_tool(name: str, path: str | None = None) -> str:
    """The path of an external tool; skip the test without it (fail under CI=true)."""
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (scripts/test installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 15.0,
    details: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` every 50 ms for at most ``timeout`` seconds; its first truthy
    value.  On timeout the assertion names ``what`` and adds ``details()`` (a log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    extra = f"\n{details()}" if details is not None else ""
    raise AssertionError(f"timed out waiting for {what}{extra}")


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:``port``.

    :raises RuntimeError: if ``proc`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


def twistd_command(*args: str) -> list[str]:
    """The ``twistd`` script installed beside this interpreter, with ``args``."""
    return [str(Path(sys.executable).parent / "twistd"), *args]


def start_as_nobody(config: Mapping[str, Any], directory: Path) -> subprocess.Popen[bytes]:
    """Start ``twistd -n -u nobody -g nogroup tlsproxy`` (run as root) with ``config``
    written to ``directory/proxy.yaml``; its output goes to ``directory/tlsproxy.log``."""
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    with open(directory / "tlsproxy.log", "wb") as output:  # the child keeps its own copy
        return subprocess.Popen(
            twistd_command(
                "-n",
                "--pidfile=",
                f"--uid={nobody.pw_uid}",
                f"--gid={nogroup.gr_gid}",
                "tlsproxy",
                "--config",
                str(path),
            ),
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )


def start_socket_activated(
    config: Mapping[str, Any], directory: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start tlsproxy the way ``tlsproxy.socket`` does: ``systemd-socket-activate`` binds
    a free loopback port and launches ``twistd -n tlsproxy`` at the first connection,
    passing the socket as fd 3.  ``config`` is written to ``directory/proxy.yaml``
    (its ``listen`` should name ``systemd:domain=INET:index=0``); the output goes to
    ``directory/tlsproxy.log``.

    :return: the ``systemd-socket-activate`` process (twistd replaces it) and the port.
    """
    activate = need_tool("systemd-socket-activate")
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    port = free_port()
    twistd = twistd_command("-n", "--pidfile=", "tlsproxy", "--config", str(path))
    with open(directory / "tlsproxy.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            # --fdname: systemd always sets LISTEN_FDNAMES (default: the socket unit's
            # name), and Twisted ignores inherited descriptors without it.
            [activate, "--listen", f"127.0.0.1:{port}", "--fdname=tlsproxy.socket", *twistd],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    return proc, port


class TlsproxyProcess:
    """A ``twistd -n tlsproxy --config FILE`` child process and its log."""

    def __init__(self, config: Mapping[str, Any], directory: Path, https_port: int) -> None:
        self.https_port = https_port
        self.config_path = directory / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config)))
        self.log_path = directory / "tlsproxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            twistd_command("-n", "--pidfile=", "tlsproxy", "--config", str(self.config_path)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )

    @property
    def log(self) -> str:
        """Everything the process printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop the process (SIGTERM, then SIGKILL after 10 s) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def start_tlsproxy(
    config: Mapping[str, Any], directory: Path, https_port: int | None = None
) -> TlsproxyProcess:
    """Start tlsproxy with ``config``, whose ``listen.https`` is filled in if absent.

    :raises RuntimeError: with the process log if it does not start listening.
    """
    config = dict(config)
    if https_port is None:
        https_port = free_port()
    config.setdefault("listen", {"https": [f"tcp:{https_port}:interface=127.0.0.1"]})
    proxy = TlsproxyProcess(config, directory, https_port)
    try:
        wait_for_port(https_port, proxy.proc)
    except RuntimeError as exc:
        proxy.stop()
        raise RuntimeError(f"{exc}\n--- tlsproxy log ---\n{proxy.log}") from None
    return proxy


@pytest.fixture
def tlsproxy_runner(tmp_path: Path) -> Iterator[Any]:
    """Start tlsproxy processes for a test; all are stopped afterwards."""
    started: list[TlsproxyProcess] = []

    def run(config: Mapping[str, Any], https_port: int | None = None) -> TlsproxyProcess:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        proxy = start_tlsproxy(config, directory, https_port)
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


class EchoHandler(BaseHTTPRequestHandler):
    """A backend that answers every request with JSON describing it."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("host"),
                "body": body.decode("latin-1"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_backend() -> Iterator[int]:
    """A plain-HTTP echo backend on 127.0.0.1; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class SlowHandler(BaseHTTPRequestHandler):
    """Answers ``/slow/<seconds>`` after that long (setting the server's ``arrived``
    first), anything else at once, with ``done <path>``."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            self.server.arrived.set()  # type: ignore[attr-defined]
            time.sleep(float(self.path.rsplit("/", 1)[1]))
        body = f"done {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def slow_backend() -> Iterator[ThreadingHTTPServer]:
    """A plain-HTTP `SlowHandler` backend on 127.0.0.1 (``server.arrived`` is set when
    a slow request comes in)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    server.daemon_threads = True
    server.arrived = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
