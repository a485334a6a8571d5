"""Starting, watching and stopping the benchmark's server processes.

One job: run each server (backend, proxies) as a child in its own process
group, optionally pinned to CPUs with ``taskset``, wait until it listens, read
its memory and CPU time from ``/proc``, and stop it — and every other process
this run started — when the run ends, fails or is interrupted.

It must not stop anything it did not start: processes are ended by the
process-group ids of the children it spawned, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

_TICKS = os.sysconf("SC_CLK_TCK")


#: Ports `free_port` handed out: the kernel may offer a port again before whoever got
#: it has bound it, so one is never handed out twice.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` and that this process has
    not handed out before (also used by the tests' harness).

    :raises RuntimeError: if 100 tries found none.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """``command`` run under ``taskset -c cpus`` (unchanged when ``cpus`` is None)."""
    if cpus is None:
        return list(command)
    return ["taskset", "-c", cpus, *command]


@attrs.frozen
class Pinning:
    """Which CPUs the proxy under test and everything else (load, backend) run on.

    Both None when the machine has fewer than two usable CPUs or no ``taskset``.
    """

    proxy: str | None
    others: str | None

    @classmethod
    def detect(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(str(cpus[0]), ",".join(str(c) for c in cpus[1:]))

    def describe(self) -> str:
        if self.proxy is None:
            return "not pinned (fewer than 2 CPUs or no taskset)"
        return f"proxy on CPU {self.proxy}; load generator and backend on CPU {self.others}"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that exist now."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if Path(f"/proc/{p}").exists():
            found.append(p)
            todo.extend(_children(p))
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (exited ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICKS


@attrs.define
class Server:
    """One started server: its process, the pids that make up the measured peer, its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: The pids whose CPU and memory count as this server's (the process tree
    #: as it was once listening: nginx's master and worker, or one process).
    pids: list[int] = attrs.field(factory=list)

    def rss_kib(self) -> int:
        """Resident memory now, summed over the server's processes."""
        return sum(_status_kib(p, "VmRSS") for p in self.pids)

    def peak_rss_kib(self) -> int:
        """Peak resident memory (``VmHWM``), summed over the server's processes."""
        return sum(_status_kib(p, "VmHWM") for p in self.pids)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Every process a benchmark run starts; `stop_all` ends them all (also on errors).

    Use as a context manager.  SIGTERM and SIGHUP to the benchmark become
    KeyboardInterrupt so that the ``finally`` clauses run.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[Server] = []
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> ProcessGroup:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    @staticmethod
    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        port: int,
        cpus: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Server:
        """Start ``command`` (pinned to ``cpus``) and wait until 127.0.0.1:``port`` accepts.

        :raises RuntimeError: with the log's tail if it exits or does not listen in time.
        """
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                pinned(command, cpus),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        server = Server(name=name, proc=proc, log_path=log_path)
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode} before listening:\n"
                    + server.log_tail()
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name} did not listen on port {port} within {timeout:.0f} s:\n"
                        + server.log_tail()
                    ) from None
                time.sleep(0.05)
        # nginx forks its worker right after binding; give it a moment to appear.
        time.sleep(0.2)
        server.pids = process_tree(proc.pid)
        return server

    def stop(self, server: Server, timeout: float = 10.0) -> None:
        """Stop one server: SIGTERM to its process group, SIGKILL after ``timeout``."""
        if server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=timeout)
        # Workers of a stopped master (nginx) are in the same group: make sure they are gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            self.stop(server)
