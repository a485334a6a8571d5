"""The access-log file: buffered writes, a flush timer, reopening on SIGUSR1.

One job: put the lines :mod:`tlsproxy.accesslog` formats into a file (or
standard output) cheaply, and let logrotate move the file away.

Several processes (``workers: N``) may share one access log.  Appends to a
regular file are atomic per ``write()``, so whole buffers go out at once; to a
pipe (``path: "-"`` under Docker or systemd) only writes of at most
``PIPE_BUF`` bytes are, so there lines go out in chunks of at most that size,
each ending on a line boundary (a longer line is written alone).

It must not: format lines (``accesslog`` does), flush or sync per line (the
buffer is flushed every ``flush_interval`` seconds and on stop), or take
SIGUSR1 away from twistd, which rotates its own log file on it: the previous
handler is chained.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator, Sequence
from typing import IO, Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tlsproxy.accesslog import Entry, formatter

__all__ = ["PIPE_BUF", "AccessLogWriter", "line_chunks"]

log = Logger()

#: Bytes buffered before a write reaches the file (besides the flush timer).
BUFFER = 64 * 1024
#: The largest write to a pipe POSIX guarantees not to interleave with other
#: writers' (Linux: 4096).
PIPE_BUF = 4096


def line_chunks(lines: Sequence[bytes], limit: int = PIPE_BUF) -> Iterator[bytes]:
    """Join whole ``lines`` into chunks of at most ``limit`` bytes, in order; a
    line longer than ``limit`` is a chunk of its own."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > limit:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


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
        #: Not a regular file (a pipe, a terminal): lines kept here and written
        #: in `line_chunks`, never through ``_file``'s own buffer.
        self._chunked = False
        self._pending: list[bytes] = []
        self._pending_size = 0

    def open(self, fd: int | None = None) -> None:
        """Open (or create) the file for appending.

        :param fd: write to this open file descriptor (inherited from a
            supervisor that opened ``path`` before dropping privileges; this
            writer owns it from now on) instead of opening ``path``.
        :raises OSError: if it cannot be.
        """
        if fd is not None:
            f = open(fd, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        elif self.path == "-":
            # Not sys.stdout: twistd redirects that into its own log.
            f = open(os.dup(1), "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        else:
            f = open(self.path, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        self._write_pending()  # what is left for the file open before
        self._file = f
        self._chunked = not stat.S_ISREG(os.fstat(f.fileno()).st_mode)

    def fileno(self) -> int | None:
        """The open file's descriptor (None: not open), e.g. to hand to worker processes."""
        f = self._file
        return None if f is None else f.fileno()

    def __call__(self, entry: Entry) -> None:
        f = self._file
        if f is None:
            return
        if self._chunked:
            line = self._format(entry).encode("utf-8")
            self._pending.append(line)
            self._pending_size += len(line)
            if self._pending_size >= BUFFER:
                self._write_pending()
            return
        try:
            f.write(self._format(entry))
        except OSError as exc:  # a full disk must not stop the proxy
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        if not self._write_failed:
            self._write_failed = True
            log.error(
                "access log {path}: cannot write: {error} (reported once)",
                path=self.path,
                error=exc,
            )

    def _write_pending(self) -> None:
        """Write the lines kept for a pipe, each chunk in one ``write()``."""
        pending, self._pending, self._pending_size = self._pending, [], 0
        f = self._file
        if f is None or not pending:
            return
        fd = f.fileno()
        try:
            for chunk in line_chunks(pending):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            self._failed(exc)

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
        if self._chunked:
            self._write_pending()
        elif f is not None:
            try:
                f.flush()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)

    def reopen(self) -> None:
        """Open ``path`` again (after logrotate moved it), then close the old file.

        If the new file cannot be opened the old one is kept (and the error
        logged): lines keep going somewhere, and a supervisor keeps a valid
        descriptor to hand to the workers it starts.
        """
        if self.path == "-":
            self.flush()
            return
        old = self._file
        try:
            self.open()
        except OSError as exc:
            self._file = old
            log.error(
                "access log {path}: cannot reopen: {error}; still writing to the file open before",
                path=self.path,
                error=exc,
            )
            return
        if old is not None:
            try:
                old.close()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)
        log.info("access log {path} reopened", path=self.path)

    def stop(self) -> None:
        """Flush and close; restore the previous SIGUSR1 handler."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
        self._write_pending()
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                log.error("access log {path}: cannot write: {error}", path=self.path, error=exc)
