"""Listening on Twisted endpoint strings, with a one-line error when a port is taken.

`parse_endpoints` turns the ``listen`` section's strings into endpoints (before
anything binds), and `ListeningService` binds one of them when twistd starts
the application, closing it again on stop.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.eager import eager_endpoint
from tlsproxy.errors import Problem

log = Logger()

#: Endpoint types that wrap the socket in Twisted's own TLS: never right here.
_TLS_ENDPOINTS = frozenset({"ssl", "tls"})


class ListenError(Exception):
    """A listener could not bind; the message is the whole one-line explanation."""


def parse_endpoints(
    reactor: Any, descriptions: Sequence[str], path: str
) -> tuple[list[IStreamServerEndpoint], list[Problem]]:
    """Parse endpoint strings such as ``tcp:443:interface=::``; nothing is bound.

    :return: the endpoints, and a `Problem` (at ``path[i]``) for each string
        Twisted cannot parse.
    """
    endpoints: list[IStreamServerEndpoint] = []
    problems: list[Problem] = []
    for i, description in enumerate(descriptions):
        kind = description.split(":", 1)[0].strip().lower()
        if kind in _TLS_ENDPOINTS:
            problems.append(
                Problem(
                    f"{path}[{i}]",
                    f"{kind}: endpoints add a TLS layer of Twisted's own; tlsproxy terminates TLS "
                    f"itself, so use tcp:PORT (or systemd:/unix:) here",
                )
            )
            continue
        try:
            endpoints.append(eager_endpoint(reactor, serverFromString(reactor, description)))
        except IndexError:
            reason = "no socket with that index was passed in by systemd (see LISTEN_FDS)"
            problems.append(Problem(f"{path}[{i}]", reason))
            continue
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            problems.append(Problem(f"{path}[{i}]", f"not a valid endpoint ({reason})"))
    return endpoints, problems


def _reason(failure: Failure) -> str:
    exc = failure.value
    if isinstance(exc, CannotListenError) and exc.socketError is not None:
        err = exc.socketError
        return str(getattr(err, "strerror", None) or err)
    return str(exc) or type(exc).__name__


class ListeningService(Service):
    """Binds ``factory`` on ``endpoint`` in `privilegedStartService` (before twistd
    drops privileges) and stops listening in `stopService`.

    A failure to bind stops start-up with one line naming the config key and
    the reason: printed on the terminal's stderr followed by `SystemExit` in the
    foreground (no traceback), and raised as `ListenError` when daemonised,
    which twistd reports through its status pipe.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        where: str,
        foreground: bool,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.where = where
        self.foreground = foreground
        self.port: IListeningPort | None = None
        self._pending: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if not outcome:  # an asynchronous endpoint: report failure when it comes
            self._pending = d
            d.addCallback(self._listening)
            return
        result = outcome[0]
        if isinstance(result, Failure):
            message = f"{self.where}: cannot listen: {_reason(result)}"
            log.critical("{message}", message=message)
            if self.foreground:
                # twistd has replaced sys.stderr by the log by now; the user's
                # terminal is the original one.
                print(f"tlsproxy: {message}", file=sys.__stderr__, flush=True)
                raise SystemExit(1)
            raise ListenError(message)
        self._listening(result)

    def _listening(self, port: IListeningPort | Failure) -> None:
        if isinstance(port, Failure):
            log.error("{where}: cannot listen: {reason}", where=self.where, reason=_reason(port))
            return
        self.port = port
        host = port.getHost()
        log.info("listening on {address} ({where})", address=host, where=self.where)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[return-value]
        return None
