"""The access-log file: buffered writes, a flush timer, reopening on SIGUSR1.

One job: put the lines :mod:`tlsproxy.accesslog` formats into a file (or
standard output) cheaply, and let logrotate move the file away.

It must not: format lines (``accesslog`` does), flush or sync per line (the
buffer is flushed every ``flush_interval`` seconds and on stop), or take
SIGUSR1 away from twistd, which rotates its own log file on it: the previous
handler is chained.
"""

from __future__ import annotations

import os
import signal
from typing import IO, Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tlsproxy.accesslog import Entry, formatter

__all__ = ["AccessLogWriter"]

log = Logger()

#: Bytes buffered before a write reaches the file (besides the flush timer).
BUFFER = 64 * 1024


class AccessLogWriter:
    """Writes access-log lines to ``path`` (``-``: standard output).

    ``open()`` before twistd drops privileges (it raises `OSError` if the
    file cannot be opened); ``start()`` once running; the instance is the
    engine's ``on_request`` callable; ``stop()`` flushes and closes.
    """

    def __init__(self, path: str, fmt: str, clock: Any, flush_interval: float = 1.0) -> None:
        self.path = path
        self._format = formatter(fmt)
        self._clock = clock
        self._flush_interval = flush_interval
        self._file: IO[str] | None = None
        self._timer: LoopingCall | None = None
        self._previous_usr1: Any = None
        self._write_failed = False

    def open(self, fd: int | None = None) -> None:
        """Open (or create) the file for appending.

        :param fd: write to this open file descriptor (inherited from a
            supervisor that opened ``path`` before dropping privileges; this
            writer owns it from now on) instead of opening ``path``.
        :raises OSError: if it cannot be.
        """
        if fd is not None:
            self._file = open(fd, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        elif self.path == "-":
            # Not sys.stdout: twistd redirects that into its own log.
            self._file = open(os.dup(1), "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        else:
            self._file = open(self.path, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115

    def fileno(self) -> int | None:
        """The open file's descriptor (None: not open), e.g. to hand to worker processes."""
        f = self._file
        return None if f is None else f.fileno()

    def __call__(self, entry: Entry) -> None:
        f = self._file
        if f is not None:
            try:
                f.write(self._format(entry))
            except OSError as exc:  # a full disk must not stop the proxy
                if not self._write_failed:
                    self._write_failed = True
                    log.error(
                        "access log {path}: cannot write: {error} (reported once)",
                        path=self.path,
                        error=exc,
                    )

    def start(self) -> None:
        """Flush on a timer and reopen on SIGUSR1."""
        timer = LoopingCall(self.flush)
        timer.clock = self._clock
        timer.start(self._flush_interval, now=False)
        self._timer = timer
        self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._clock.callFromThread(self.reopen)
        previous = self._previous_usr1
        if callable(previous):
            previous(signum, frame)

    def flush(self) -> None:
        f = self._file
        if f is not None:
            try:
                f.flush()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)

    def reopen(self) -> None:
        """Close the file and open ``path`` again (after logrotate moved it)."""
        if self.path == "-":
            self.flush()
            return
        old, self._file = self._file, None
        if old is not None:
            try:
                old.close()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)
        try:
            self.open()
        except OSError as exc:
            log.error("access log {path}: cannot reopen: {error}", path=self.path, error=exc)
        else:
            log.info("access log {path} reopened", path=self.path)

    def stop(self) -> None:
        """Flush and close; restore the previous SIGUSR1 handler."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)
