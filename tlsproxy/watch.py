"""Noticing that files changed on disk, by polling their metadata.

`FileWatch` checks a set of paths every few seconds (size, modification time,
inode: a certbot-style rename counts) and calls back once per change, so that
replacing a certificate file is picked up without a SIGHUP.  It reads no file
contents and makes no decision about what a change means.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

Signature = tuple[tuple[str, tuple[int, int, int] | None], ...]


def signature(paths: Iterable[str]) -> Signature:
    """What is known of ``paths`` now: (size, mtime in ns, inode), or None if missing."""
    out: list[tuple[str, tuple[int, int, int] | None]] = []
    for path in sorted(set(paths)):
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
        else:
            out.append((path, (st.st_size, st.st_mtime_ns, st.st_ino)))
    return tuple(out)


class FileWatch:
    """Polls ``paths()`` every ``interval`` seconds and calls ``changed()`` when any
    of them differs from the last look.

    ``paths`` is asked again after each change (the set of files may change with
    the configuration).  ``clock`` provides ``IReactorTime``.
    """

    def __init__(
        self,
        paths: Callable[[], Iterable[str]],
        changed: Callable[[], object],
        clock: object,
        interval: float,
    ) -> None:
        self._paths = paths
        self._changed = changed
        self._last = signature(paths())
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock  # type: ignore[assignment]
        self.interval = interval

    def start(self) -> None:
        """Start polling (the first look is one interval from now)."""
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop polling."""
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        now = signature(self._paths())
        if now == self._last:
            return
        changed = [p for (p, s), (_, t) in zip(now, self._last, strict=False) if s != t]
        log.info("files changed on disk: {paths}", paths=", ".join(changed) or "(set changed)")
        # Remember what was seen *before* the callback: a file that changes while
        # it runs (a key replaced just after its certificate) is noticed next time.
        seen = dict(now)
        self._last = now
        try:
            self._changed()
        finally:
            paths = sorted(set(self._paths()))
            fresh = dict(signature(p for p in paths if p not in seen))
            self._last = tuple((p, seen[p] if p in seen else fresh[p]) for p in paths)
