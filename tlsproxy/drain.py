"""Graceful shutdown: let in-flight requests finish, up to a deadline.

One job: once the listeners have stopped accepting, close idle client
connections, close busy ones as soon as their current request is answered,
and drop whatever is left when ``timeout`` seconds have passed.

It must not: stop listeners or backend pools (`tlsproxy.service` does, around
this), or block: it polls the engines on the reactor's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tlsproxy.proxy import ProxyFactory

__all__ = ["drain"]

log = Logger()

#: How often the engines are asked to close connections that became idle.
POLL = 0.1


def drain(factories: Sequence[ProxyFactory], clock: Any, timeout: float) -> Deferred[None]:
    """Fire once every connection of ``factories`` is closed, within ``timeout`` s."""
    done: Deferred[None] = Deferred()
    deadline = clock.seconds() + timeout
    busy = sum(f.drain() for f in factories)
    if busy:
        log.info("draining {count} connections (up to {timeout:g} s)", count=busy, timeout=timeout)

    def check() -> None:
        remaining = sum(f.drain() for f in factories)
        if remaining == 0:
            done.callback(None)
        elif clock.seconds() >= deadline:
            log.warn("drain timeout: dropping {count} connections still open", count=remaining)
            for factory in factories:
                factory.abort_all()
            done.callback(None)
        else:
            clock.callLater(POLL, check)

    check()
    return done
