"""The reactor tlsproxy runs on: Twisted's epoll reactor minus per-event log context.

For every socket event, Twisted's epoll reactor calls ``log.callWithLogger``,
which asks the transport for its log prefix and pushes a legacy log context
around the read or write: about 7 % of the proxy's time under keep-alive load
(py-spy), for a prefix that only ``twisted.python.log.msg`` callers see.
tlsproxy logs through ``twisted.logger`` with named fields, so `ProxyReactor`
dispatches events directly.  Errors raised by a read or write are still
caught, logged and turned into the connection's loss by Twisted's
``_doReadOrWrite``; one raised while closing a connection is logged here,
as ``callWithLogger`` did, and the other events of the batch still run.

`install` is called by the twistd plugin (and the worker processes) before
anything imports ``twisted.internet.reactor``; if a reactor is installed
already (``twistd -r ...``), that one is kept.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

__all__ = ["ProxyReactor", "install"]

_log = Logger()


class ProxyReactor(EPollReactor):
    """``EPollReactor`` whose event dispatch skips the legacy log context."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (forever if None) and handle the events."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except BaseException:
                    # _doReadOrWrite contains errors of reads and writes; this
                    # catches one raised while a connection was being closed
                    # (its connectionLost), so the other events still run.
                    _log.failure("error handling an event of {selectable}", selectable=selectable)

    doIteration = doPoll


def install() -> Any:
    """Install `ProxyReactor` unless a reactor is installed already; return the
    reactor in use.  Off Linux (no epoll) Twisted's default is used."""
    if "twisted.internet.reactor" not in sys.modules:
        try:
            reactor = ProxyReactor()
        except (AttributeError, OSError):  # pragma: no cover - no epoll here
            pass
        else:
            from twisted.internet.main import installReactor

            installReactor(reactor)
    from twisted.internet import reactor as installed

    return installed
