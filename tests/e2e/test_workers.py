"""``workers: 2`` with the real ``twistd tlsproxy``: two worker processes serve the listeners
the parent bound, a killed worker comes back, reloads and ACME reach every worker, SIGTERM
drains, and workers never outlive their parent.

Which worker answers a connection is up to the kernel, so to check each worker on its
own the tests pause the others with SIGSTOP (a paused process accepts nothing; the
connection waits in the shared listen queue for the running one) and resume them after.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests import pki
from tests.e2e import harness
from tests.e2e.harness import (
    ROOT,
    TlsproxyProcess,
    free_port,
    slow_backend,
    start_as_nobody,
    start_socket_activated,
    start_tlsproxy,
)
from tests.e2e.pebble import Pebble, Processes

pytestmark = pytest.mark.e2e

NAME = "example.test"


# Processes.


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not exited, not zombie) process."""
    return _state(pid) not in (None, "Z", "X")


def exited(pid: int) -> bool:
    """Whether ``pid`` is gone (or a zombie)."""
    return not alive(pid)


def worker_pids(parent: int) -> set[int]:
    """The live ``tlsproxy.worker`` children of ``parent`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and b"tlsproxy.worker" in cmdline and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def wait_for(
    condition: Callable[[], Any], what: str, proxy: TlsproxyProcess, timeout: float = 20
) -> Any:
    """`tests.e2e.harness.wait_for`, showing ``proxy``'s log on timeout."""
    return harness.wait_for(condition, what, timeout, lambda: f"--- tlsproxy log ---\n{proxy.log}")


def ready_workers(
    proxy: TlsproxyProcess, count: int, exclude: frozenset[int] = frozenset()
) -> set[int]:
    """Wait until ``count`` workers run, each logged ready; their pids."""

    def ready() -> set[int] | None:
        pids = worker_pids(proxy.proc.pid) - exclude
        log = proxy.log
        if len(pids) == count and all(f"ready (pid {pid})" in log for pid in pids):
            return pids
        return None

    pids: set[int] = wait_for(ready, f"{count} ready workers", proxy)
    return pids


@contextlib.contextmanager
def only(serving: int, pids: set[int]) -> Iterator[None]:
    """Pause every worker in ``pids`` but ``serving`` for the duration."""
    paused = [p for p in pids if p != serving]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# Clients and backends.


def https_get(
    port: int, ca_file: Path, path: str = "/", timeout: float = 10
) -> tuple[int, bytes, x509.Certificate]:
    """GET ``path`` from the proxy over verified HTTPS: status, body, served leaf."""
    context = ssl.create_default_context(cafile=str(ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    conn.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname=NAME
    )
    try:
        conn.request("GET", path, headers={"Host": NAME})
        response = conn.getresponse()
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return response.status, response.read(), x509.load_der_x509_certificate(der)
    finally:
        conn.close()


@pytest.fixture
def backend_server() -> Iterator[ThreadingHTTPServer]:
    with slow_backend() as server:
        yield server


@pytest.fixture
def backend(backend_server: ThreadingHTTPServer) -> int:
    return backend_server.server_address[1]


class Site:
    """A ``workers: 2`` tlsproxy for example.test with a certificate a test can replace."""

    def __init__(self, directory: Path, backend: int, *, http: bool = False, **extra: Any) -> None:
        self.directory = directory
        self.ca = pki.make_ca()
        self.ca_file = pki.write_ca_file(directory, self.ca)
        self.pem = directory / "site.pem"
        self.leaf = self.write_certificate()
        self.https_port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        listen = {"https": [f"tcp:{self.https_port}:interface=127.0.0.1"]}
        if http:
            listen["http"] = [f"tcp:{self.http_port}:interface=127.0.0.1"]
        host: dict[str, Any] = {"backend": f"http://127.0.0.1:{backend}"}
        host["certificates"] = [str(self.pem)]
        host.update(extra.pop("host", {}))
        self.config: dict[str, Any] = {
            "listen": listen,
            "workers": 2,
            "drain_timeout": 5,
            "metrics": {"listen": f"tcp:{self.metrics_port}:interface=127.0.0.1"},
            "hosts": {NAME: host},
            **extra,
        }
        run = directory / "run"
        run.mkdir()
        self.proxy = start_tlsproxy(self.config, run, self.https_port)
        self.pids = ready_workers(self.proxy, 2)

    def write_certificate(self) -> pki.Leaf:
        leaf = self.ca.issue([NAME])
        pki.write_combined(self.directory, leaf, name="site.pem.new").replace(self.pem)
        return leaf

    def get(self, path: str = "/") -> tuple[int, bytes, x509.Certificate]:
        return https_get(self.https_port, self.ca_file, path)

    def replace_a_worker(self) -> tuple[int, int]:
        """kill -9 one worker and wait until its replacement is ready: (new pid, survivor)."""
        victim, survivor = sorted(self.pids)
        os.kill(victim, signal.SIGKILL)
        new = ready_workers(self.proxy, 2, exclude=frozenset({victim})) - {survivor}
        return next(iter(new)), survivor

    def reload(self) -> None:
        """SIGHUP to the parent, then wait until both workers reloaded."""
        before = [self.proxy.log.count(f"[worker-{i}] reloaded") for i in (0, 1)]
        self.proxy.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: all(self.proxy.log.count(f"[worker-{i}] reloaded") > before[i] for i in (0, 1)),
            "both workers reloaded",
            self.proxy,
        )

    def metrics(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            text = response.read().decode()
        finally:
            conn.close()
        return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
def site(tmp_path: Path, backend: int) -> Iterator[Site]:
    s = Site(tmp_path, backend)
    yield s
    s.proxy.stop()


# The tests.


def test_two_workers_each_serve_https_and_report_their_own_metrics(site: Site) -> None:
    """With ``workers: 2`` two worker processes serve the HTTPS port the parent bound: each
    of them alone completes requests, and the parent's /metrics shows both, labelled."""
    assert len(site.pids) == 2
    for pid in site.pids:
        with only(pid, site.pids):
            for _ in range(2):
                status, body, leaf = site.get(f"/from-{pid}")
                assert (status, body) == (200, f"done /from-{pid}\n".encode())
                assert leaf.serial_number == site.leaf.cert.serial_number
    families = site.metrics()
    handshakes = {
        s.labels["worker"]: s.value
        for s in families["tlsproxy_tls_handshakes"].samples
        if s.name.endswith("_total")
    }
    assert handshakes == {"0": 2.0, "1": 2.0}
    requests = families["tlsproxy_requests"].samples
    assert {s.labels["worker"] for s in requests} == {"0", "1"}
    expiry = families["tlsproxy_certificate_expiry_timestamp_seconds"].samples
    assert [s.labels for s in expiry] == [{"host": NAME, "key_type": "ECDSA"}]


def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(site: Site) -> None:
    """kill -9 of one worker: requests go on being served, the parent logs how it died and
    starts a new worker within seconds, which then serves on its own."""
    victim, survivor = sorted(site.pids)
    os.kill(victim, signal.SIGKILL)
    for i in range(5):
        assert site.get(f"/during-{i}")[0] == 200
    new = ready_workers(site.proxy, 2, exclude=frozenset({victim})) - {survivor}
    assert len(new) == 1 and victim not in new
    assert f"(pid {victim}) was killed by SIGKILL unexpectedly; restarting it in 1 s" in (
        site.proxy.log
    )
    pids = {survivor, *new}
    with only(next(iter(new)), pids):
        assert site.get("/after")[0] == 200


def test_a_restarted_worker_serves_what_the_parent_checked_not_the_files_now(
    site: Site,
) -> None:
    """Workers are sent the configuration and certificates the parent checked: a worker
    restarted after the certificate file was broken on disk (no reload yet) starts and
    serves the certificate in service, like the others."""
    other = site.ca.issue(["other.test"])
    site.pem.write_bytes(pki.key_pem(other.key) + pki.cert_pem(site.leaf.cert))  # key mismatch
    new, survivor = site.replace_a_worker()
    with only(new, {survivor, new}):
        assert site.get()[2].serial_number == site.leaf.cert.serial_number
    assert "cannot start" not in site.proxy.log


def test_a_worker_restarted_after_a_reload_keeps_the_limits_the_others_have(
    tmp_path: Path, backend: int
) -> None:
    """``proxy`` limits change at the next restart of tlsproxy, not at a reload: a worker
    restarted after a reload that lowered ``max_request_line`` still serves a long request
    target like the other worker, and serves the reloaded certificate; a file that only
    the configuration before the reload named (a ``tls.dhparam`` since moved) is not
    needed for it to start."""
    old_dh, new_dh = tmp_path / "dh-old.pem", tmp_path / "dh-new.pem"
    for path in (old_dh, new_dh):
        shutil.copy(ROOT / "tests" / "data" / "ffdhe2048.pem", path)
    site = Site(tmp_path, backend, tls={"dhparam": str(old_dh)})
    try:
        config = yaml.safe_load(site.proxy.config_path.read_text())
        config["proxy"] = {"max_request_line": "1K"}
        config["tls"]["dhparam"] = str(new_dh)
        site.proxy.config_path.write_text(yaml.safe_dump(config))
        renewed = site.write_certificate()
        site.reload()
        old_dh.unlink()
        new, survivor = site.replace_a_worker()
        long_target = "/" + "x" * 2000
        for pid in (new, survivor):
            with only(pid, {survivor, new}):
                status, body, leaf = site.get(long_target)
                assert (status, body) == (200, f"done {long_target}\n".encode())
                assert leaf.serial_number == renewed.cert.serial_number
        assert "cannot start" not in site.proxy.log
    finally:
        site.proxy.stop()


def test_sighup_reloads_every_worker_and_a_broken_certificate_is_refused_once(
    site: Site,
) -> None:
    """After the certificate file is replaced and the parent gets SIGHUP, each worker serves
    the new certificate; a broken replacement is refused (logged once, by the parent) and
    every worker keeps serving the previous one."""
    renewed = site.write_certificate()
    site.reload()
    for pid in site.pids:
        with only(pid, site.pids):
            assert site.get()[2].serial_number == renewed.cert.serial_number

    other = site.ca.issue(["other.test"])
    site.pem.write_bytes(pki.key_pem(other.key) + pki.cert_pem(renewed.cert))  # key mismatch
    site.proxy.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "still serving the previous configuration" in site.proxy.log,
        "the refusal",
        site.proxy,
    )
    log = site.proxy.log
    assert log.count("reload refused: still serving the previous configuration") == 1
    assert "refused the reload" not in log  # the workers were never asked
    for pid in site.pids:
        with only(pid, site.pids):
            assert site.get()[2].serial_number == renewed.cert.serial_number
    assert log.count("reloaded ") == 3  # the parent and each worker, once


def test_changing_workers_on_reload_waits_for_a_restart(site: Site) -> None:
    """Editing ``workers`` and sending SIGHUP reloads everything else but keeps the number of
    processes, saying once that it changes at the next restart."""
    text = site.proxy.config_path.read_text().replace("workers: 2", "workers: 3")
    site.proxy.config_path.write_text(text)
    site.reload()
    log = site.proxy.log
    assert log.count("workers changed: the number of processes changes at the next restart") == 1
    assert worker_pids(site.proxy.proc.pid) == site.pids
    assert site.get()[0] == 200


def test_sigusr1_to_the_parent_makes_every_worker_reopen_the_access_log(
    tmp_path: Path, backend: int
) -> None:
    """Both workers append to the one access log; after logrotate moves it and the parent
    gets SIGUSR1, each worker writes to a new file at the path."""
    log_path = tmp_path / "access.log"
    s = Site(tmp_path, backend, access_log={"path": str(log_path)})
    try:
        for pid in s.pids:
            with only(pid, s.pids):
                assert s.get(f"/before-{pid}")[0] == 200
        wait_for(
            lambda: all(f"/before-{pid}" in log_path.read_text() for pid in s.pids),
            "both workers' lines (flushed every second)",
            s.proxy,
        )
        log_path.rename(tmp_path / "access.log.1")
        s.proxy.proc.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: all(f"[worker-{i}] access log" in s.proxy.log for i in (0, 1)),
            "both workers reopened the access log",
            s.proxy,
        )
        for pid in s.pids:
            with only(pid, s.pids):
                assert s.get(f"/after-{pid}")[0] == 200
        wait_for(
            lambda: (
                log_path.exists() and all(f"/after-{pid}" in log_path.read_text() for pid in s.pids)
            ),
            "both workers' lines in the new file",
            s.proxy,
        )
        old = (tmp_path / "access.log.1").read_text()
        assert "/after-" not in old
        assert all(line.count('"GET ') == 1 for line in log_path.read_text().splitlines())

        # A worker started after the rotation gets the parent's reopened file.
        new, survivor = s.replace_a_worker()
        with only(new, {survivor, new}):
            assert s.get("/from-the-new-worker")[0] == 200
        wait_for(
            lambda: "/from-the-new-worker" in log_path.read_text(),
            "the new worker's line in the new file",
            s.proxy,
        )
    finally:
        s.proxy.stop()


def test_sigterm_lets_an_in_flight_request_finish_then_everything_exits(
    site: Site, backend_server: ThreadingHTTPServer
) -> None:
    """On SIGTERM to the parent the workers stop accepting but finish the request they are
    serving; then the workers and the parent exit cleanly."""
    results: list[Any] = []

    def slow() -> None:
        try:
            results.append(site.get("/slow/1.5"))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    assert backend_server.arrived.wait(10)  # type: ignore[attr-defined]
    site.proxy.proc.send_signal(signal.SIGTERM)
    thread.join(15)
    assert results and not isinstance(results[0], Exception), results
    assert results[0][:2] == (200, b"done /slow/1.5\n")
    # twistd re-raises the signal that stopped it once it shut down cleanly.
    assert site.proxy.proc.wait(timeout=15) == -signal.SIGTERM
    log = site.proxy.log
    assert "still running: killing it" not in log
    assert log.count(") exited with status 0") == 2, log
    for pid in site.pids:
        wait_for(partial(exited, pid), f"worker {pid} to exit", site.proxy)


def test_workers_exit_by_themselves_when_the_parent_is_killed(site: Site) -> None:
    """If the parent is killed with SIGKILL, its workers notice the closed control channel,
    drain and exit (within drain_timeout and a little), instead of serving unsupervised."""
    site.proxy.proc.kill()
    site.proxy.proc.wait(timeout=10)
    for pid in site.pids:
        wait_for(partial(exited, pid), f"worker {pid} to exit", site.proxy, 12)


def test_port_80_webroot_challenges_are_answered_by_every_worker(
    tmp_path: Path, backend: int
) -> None:
    """A certbot-style webroot token is served on the plain-HTTP port by each worker, and
    other plain requests are redirected to HTTPS."""
    webroot = tmp_path / "webroot"
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    (webroot / ".well-known" / "acme-challenge" / "tok_Worker-1").write_text("tok_Worker-1.key")
    s = Site(tmp_path, backend, http=True, host={"webroot": str(webroot)})
    try:
        pids = s.pids
        for pid in pids:
            with only(pid, pids):
                conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
                conn.request(
                    "GET", "/.well-known/acme-challenge/tok_Worker-1", headers={"Host": NAME}
                )
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"tok_Worker-1.key")
                conn.request("GET", "/page", headers={"Host": NAME})
                response = conn.getresponse()
                response.read()
                assert response.status == 301
                location = f"https://{NAME}:{s.https_port}/page"
                assert response.getheader("location") == location
                conn.close()
    finally:
        s.proxy.stop()


ACME_NAMES = ["one.example.com", "two.example.com"]


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_built_in_acme_with_two_workers_serves_the_issued_certificate_from_each(
    tmp_path: Path, processes: Processes, backend: int, challenge: str
) -> None:
    """With ``workers: 2`` the parent runs ACME: every worker answers the CA's validation
    (the challenge reaches all of them before the CA is told), and afterwards each worker
    serves the issued certificate."""
    https_port, http_port = free_port(), free_port()
    pebble = Pebble(processes, tmp_path, ACME_NAMES, http_port=http_port, https_port=https_port)
    pebble.start()
    config: dict[str, Any] = {
        "workers": 2,
        "listen": {
            "https": [f"tcp:{https_port}:interface=127.0.0.1"],
            "http": [f"tcp:{http_port}:interface=127.0.0.1"],
        },
        "acme": {
            "directory": pebble.directory_url,
            "agree_tos": True,
            "email": "admin@example.com",
            "state_dir": str(tmp_path / "state"),
            "ca_bundle": str(pebble.https_ca),
            "challenges": [challenge],
        },
        "hosts": {
            ACME_NAMES[0]: {
                "aliases": ACME_NAMES[1:],
                "acme": True,
                "backend": f"http://127.0.0.1:{backend}",
            }
        },
    }
    (tmp_path / "run").mkdir()
    proxy = start_tlsproxy(config, tmp_path / "run", https_port)
    try:
        pids = ready_workers(proxy, 2)
        root = pebble.root()

        def issued() -> x509.Certificate | None:
            try:
                context = ssl.create_default_context(cafile=str(root))
                with (
                    socket.create_connection(("127.0.0.1", https_port), timeout=10) as sock,
                    context.wrap_socket(sock, server_hostname=ACME_NAMES[1]) as tls,
                ):
                    der = tls.getpeercert(binary_form=True)
            except ssl.SSLError:
                return None
            return None if der is None else x509.load_der_x509_certificate(der)

        try:
            cert = wait_for(issued, "the issued certificate", proxy, timeout=90)
        except AssertionError:
            raise AssertionError(f"--- pebble ---\n{pebble.log()}") from None
        log = proxy.log
        assert f"answering {challenge} for one.example.com" in log
        # Only the parent talks to the CA.
        assert not [line for line in log.splitlines() if "[worker-" in line and "ACME:" in line]
        for pid in pids:
            with only(pid, pids):
                assert wait_for(issued, "the issued certificate", proxy) == cert
    finally:
        proxy.stop()


def test_socket_activated_listeners_are_shared_by_the_workers(tmp_path: Path, backend: int) -> None:
    """Under systemd socket activation (the socket bound by systemd, passed as fd 3) the
    supervisor hands that socket to both workers, and each of them serves on it."""
    ca = pki.make_ca()
    ca_file = pki.write_ca_file(tmp_path, ca)
    certificate = pki.write_combined(tmp_path, ca.issue([NAME]))
    config = {
        "workers": 2,
        "listen": {"https": ["systemd:domain=INET:index=0"]},
        "hosts": {
            NAME: {
                "certificates": [str(certificate)],
                "backend": f"http://127.0.0.1:{backend}",
            }
        },
    }
    proc, port = start_socket_activated(config, tmp_path)
    log_path = tmp_path / "tlsproxy.log"
    try:
        # The first connection launches twistd (systemd-socket-activate execs it); only
        # systemd-socket-activate's own bind can race with it.
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, _ = https_get(port, ca_file, "/first", timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, log_path.read_text()
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.05)
        assert status == 200

        def ready() -> set[int] | None:
            pids = worker_pids(proc.pid)
            text = log_path.read_text()
            ok = len(pids) == 2 and all(f"ready (pid {p})" in text for p in pids)
            return pids if ok else None

        deadline = time.monotonic() + 20
        pids = ready()
        while pids is None and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = ready()
        assert pids is not None, log_path.read_text()
        for pid in pids:
            with only(pid, pids):
                assert https_get(port, ca_file, f"/by-{pid}")[:2] == (
                    200,
                    f"done /by-{pid}\n".encode(),
                )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM, log_path.read_text()


def test_a_failed_access_log_reopen_does_not_keep_a_restarted_worker_down(
    tmp_path: Path, backend: int
) -> None:
    """If SIGUSR1 after logrotate cannot open a new access log (the path is not writable),
    the supervisor keeps the old file, so a worker that dies afterwards comes back and
    serves (writing to that file) instead of failing to start over and over."""
    log_path = tmp_path / "access.log"
    s = Site(tmp_path, backend, access_log={"path": str(log_path)})
    try:
        log_path.rename(tmp_path / "access.log.1")
        log_path.mkdir()  # the new file cannot be opened
        s.proxy.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "cannot reopen" in s.proxy.log, "the failed reopen logged", s.proxy)
        new, survivor = s.replace_a_worker()
        with only(new, {survivor, new}):
            assert s.get("/from-the-new-worker")[0] == 200
        wait_for(
            lambda: "/from-the-new-worker" in (tmp_path / "access.log.1").read_text(),
            "the new worker's line in the file open before",
            s.proxy,
        )
        assert "cannot start" not in s.proxy.log
    finally:
        s.proxy.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="running workers as nobody needs root")
def test_when_no_worker_can_start_tlsproxy_exits_with_the_reason(
    tmp_path: Path, backend: int
) -> None:
    """With ``twistd -u nobody``, workers that cannot start (nobody may not run the
    interpreter, or read the ``backend_tls`` CA every worker opens itself) make tlsproxy
    exit non-zero within seconds saying why, rather than keeping its port bound while
    clients hang."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    ca = pki.make_ca()
    ca_file = pki.write_ca_file(private, ca)
    pem = pki.write_combined(tmp_path, ca.issue([NAME]))
    port = free_port()
    config = {
        "listen": {"https": [f"tcp:{port}:interface=127.0.0.1"]},
        "workers": 2,
        "hosts": {
            NAME: {
                "backend": f"https://127.0.0.1:{backend}",
                "backend_tls": {"ca": str(ca_file)},
                "certificates": [str(pem)],
            }
        },
    }
    proc = start_as_nobody(config, tmp_path)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        code = None
    log = (tmp_path / "tlsproxy.log").read_text(errors="replace")
    assert code not in (0, None), log
    assert "tlsproxy: no worker could start: worker 0 " in log, log
    assert "Permission denied" in log, log
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_workers_sharing_a_pipe_as_access_log_never_tear_a_line() -> None:
    """With ``access_log: {path: "-"}`` under Docker or systemd, standard output is a pipe
    the workers share: their lines arrive whole, never two of them mixed into one (writes
    to a pipe are atomic only up to 4096 bytes, so lines go out in such chunks)."""
    import fcntl
    import json

    from twisted.internet.task import Clock

    from tlsproxy.accesslog import Entry
    from tlsproxy.telemetry import AccessLogWriter

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a full pipe makes big writes split
    writers, lines = 4, 3000
    children = []
    for k in range(writers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(read_end)
                writer = AccessLogWriter("-", "json", Clock())
                writer.open(os.dup(write_end))  # as a worker: its supervisor's descriptor
                for i in range(lines):
                    target = f"/{k}/{i}/".encode() + b"x" * (200 + i % 3000)  # lines up to ~3.5 KB
                    writer(
                        Entry(
                            time=1.7e9, client="192.0.2.1", method=b"GET", target=target,
                            protocol="HTTP/1.1", host=b"example.com", status=200,
                            bytes_sent=i, duration=0.001,
                        )
                    )  # fmt: skip
                writer.stop()
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    os.close(write_end)
    data = bytearray()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert statuses == [0] * writers
    received = [json.loads(line) for line in bytes(data).splitlines()]
    assert len(received) == writers * lines
    assert sorted((r["target"].split("/")[1], r["bytes_sent"]) for r in received) == sorted(
        (str(k), i) for k in range(writers) for i in range(lines)
    )
