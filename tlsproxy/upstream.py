"""Pooled persistent HTTP/1.1 connections to backends.

One job: hand the proxy a connected TCP transport to a backend (TLS-wrapped
for ``https://`` backends, see `tlsproxy.backendtls`), reusing an idle
one when it is safe, and keep track of idle and busy connections' deadlines.
This module moves bytes and owns connection lifetimes; it does not parse HTTP
(the proxy protocol that borrows a connection parses the response itself) and
it must not import the global reactor (the reactor is passed in).

Rules the pool keeps:

* A connection returns to the pool only when its borrower says the exchange
  ended cleanly (complete request sent, complete response read, backend did
  not ask to close).  On any doubt the borrower discards it.
* Idle connections are kept per backend, most recently used first, at most
  ``ProxySettings.backend_max_idle`` of them, each for at most
  ``ProxySettings.backend_idle_timeout`` seconds.  Data or a close from an idle
  connection discards it.
* Deadlines are timestamps checked by one periodic sweep (running only while
  the pool has connections), not one timer per request.

The borrower implements :class:`BackendUser`; the connection calls it for
every event.  Hot-path calls are plain method calls, no Deferreds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.eager import connect_tcp

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConnector

    from tlsproxy.proxy import ProxySettings

log = Logger()

INFINITY = float("inf")


class BackendLike(Protocol):
    """Where a site's requests go: what ``tlsproxy.routing.Backend`` provides."""

    @property
    def scheme(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class Reactor(Protocol):
    """The reactor methods the pool uses (``IReactorTCP`` and ``IReactorTime``)."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = ...,
        bindAddress: tuple[str, int] | None = ...,
    ) -> IConnector: ...

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any: ...


class Transport(Protocol):
    """The transport methods the proxy engine uses on both of its sides."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: list[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...


class BackendUser(Protocol):
    """The borrower of a backend connection (the proxy protocol)."""

    def backend_connected(self, conn: BackendConnection) -> None:
        """A new connection asked for with :meth:`UpstreamPools.get` is ready and owned."""

    def backend_connect_failed(self, reason: Failure) -> None:
        """Connecting failed (refused, unreachable, DNS, timed out)."""

    def backend_data(self, data: bytes) -> None:
        """Bytes arrived from the owned connection."""

    def backend_lost(self, reason: Failure) -> None:
        """The owned connection closed; it is already out of the pool."""

    def backend_write_paused(self) -> None:
        """The owned connection's send buffer is full: stop feeding it."""

    def backend_write_resumed(self) -> None:
        """The owned connection's send buffer drained."""

    def backend_timed_out(self) -> None:
        """The owned connection's deadline passed (no response bytes in time)."""


def describe(backend: BackendLike) -> str:
    """``host:port`` of a backend, for logs."""
    return f"{backend.host}:{backend.port}"


@implementer(IPushProducer)
class BackendConnection(TwistedProtocol):
    """One TCP connection to a backend, owned by at most one borrower at a time.

    It registers itself as the streaming producer of its own transport, so a
    full send buffer pauses whoever feeds it (``owner.backend_write_paused``).
    """

    def __init__(self, pool: UpstreamPools, backend: BackendLike) -> None:
        self.pool = pool
        self.backend = backend
        #: the borrower, or None while idle in the pool
        self.owner: BackendUser | None = None
        #: when the borrower's wait for response bytes ends (reactor seconds)
        self.deadline = INFINITY
        #: when it last became idle
        self.idle_since = 0.0
        #: how many exchanges completed on it; a reused connection may be stale
        self.exchanges = 0
        #: the send buffer is full
        self.write_paused = False
        self.connected_ = False
        #: the pool's idle list for this backend (cached: saves hashing the backend)
        self.idle_list: list[BackendConnection] | None = None
        self._read_paused = False
        self._t: Transport | None = None
        self._attempt: _ConnectAttempt | None = None

    # Protocol

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._t = transport
        self.connected_ = True
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        transport.registerProducer(self, True)
        attempt, self._attempt = self._attempt, None
        self.pool._connected(self, attempt.user if attempt is not None else None)

    def dataReceived(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.backend_data(data)
        else:
            log.info(
                "upstream {upstream} sent {size} bytes on an idle connection; closing it",
                upstream=describe(self.backend),
                size=len(data),
            )
            self.pool.discard(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        self.pool._lost(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.backend_lost(reason)

    # IPushProducer, as the producer feeding our own transport

    def pauseProducing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.backend_write_paused()

    def resumeProducing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.backend_write_resumed()

    def stopProducing(self) -> None:
        pass

    # for the borrower

    @property
    def transport_(self) -> Transport:
        """The connected transport (only valid after ``connectionMade``)."""
        assert self._t is not None
        return self._t

    def write(self, data: bytes) -> None:
        """Send bytes to the backend."""
        assert self._t is not None
        self._t.write(data)

    def write_sequence(self, data: list[bytes]) -> None:
        """Send several byte strings to the backend in one go."""
        assert self._t is not None
        self._t.writeSequence(data)

    def pause_reading(self) -> None:
        """Stop reading from the backend (the client cannot take more)."""
        if not self._read_paused and self._t is not None:
            self._read_paused = True
            self._t.pauseProducing()

    def resume_reading(self) -> None:
        """Read from the backend again."""
        if self._read_paused and self._t is not None:
            self._read_paused = False
            self._t.resumeProducing()

    def abort(self) -> None:
        """Drop the connection at once (unsent data is lost)."""
        if self._t is not None and self.connected_:
            self._t.unregisterProducer()
            self._t.abortConnection()

    def close(self) -> None:
        """Close the connection after sending what is buffered."""
        if self._t is not None and self.connected_:
            self._t.unregisterProducer()
            self._t.loseConnection()


class _ConnectAttempt(ClientFactory):
    """One connection attempt on behalf of one borrower (who may stop waiting)."""

    noisy = False

    def __init__(self, pool: UpstreamPools, backend: BackendLike, user: BackendUser | None) -> None:
        self.pool = pool
        self.backend = backend
        self.user = user

    def buildProtocol(self, addr: IAddress | None) -> BackendConnection:
        conn = BackendConnection(self.pool, self.backend)
        conn._attempt = self
        return conn

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.pool._attempt_done(self)
        user, self.user = self.user, None
        if user is not None:
            user.backend_connect_failed(reason)


class _TLSConnectAttempt(TLSMemoryBIOFactory):
    """A `_ConnectAttempt` whose connection speaks TLS (an ``https`` backend).

    The backend connection sees the TLS transport: writes before the
    handshake completes are buffered, and a failed handshake (unknown CA,
    wrong name) is a lost connection, which the proxy answers with 502.
    """

    def __init__(self, creator: Any, attempt: _ConnectAttempt) -> None:
        super().__init__(creator, True, attempt)
        self.noisy = False


class UnsupportedBackend(Exception):
    """The backend's scheme is not one this pool can connect to."""


class UpstreamPools:
    """Persistent connections to every backend, shared by all proxy connections.

    Create one per process (or per listener) and pass it to
    :class:`tlsproxy.proxy.ProxyFactory`; call :meth:`close` on shutdown.

    ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``; ``settings``
    supplies ``backend_connect_timeout``, ``backend_idle_timeout``,
    ``backend_max_idle`` and ``sweep_interval``.
    """

    def __init__(self, reactor: Reactor, settings: ProxySettings | None = None) -> None:
        if settings is None:
            from tlsproxy.proxy import ProxySettings

            settings = ProxySettings()
        self._reactor = reactor
        self._settings = settings
        self._idle: dict[BackendLike, list[BackendConnection]] = {}
        # the backend get() last found an idle list for, and that list
        self._last_backend: BackendLike | None = None
        self._last_idle: list[BackendConnection] | None = None
        self._connections: set[BackendConnection] = set()
        self._attempts: dict[BackendUser, _ConnectAttempt] = {}
        #: TLS connection creators of https backends (see `_tls_creator`).
        self._creators: dict[BackendLike, Any] = {}
        self._sweeper: LoopingCall | None = None
        self._closed = False

    # borrowing

    def get(self, backend: BackendLike, user: BackendUser) -> BackendConnection | None:
        """An idle connection to ``backend`` now owned by ``user``, or None.

        With None, a new connection is being made and ``user`` will be told
        through ``backend_connected`` or ``backend_connect_failed``.
        """
        if backend is self._last_backend:
            idle = self._last_idle  # saves hashing the backend (the usual case)
        else:
            idle = self._idle.get(backend)
            if idle is not None:
                self._last_backend, self._last_idle = backend, idle
        if idle:
            now = self._reactor.seconds()
            limit = now - self._settings.backend_idle_timeout
            while idle:
                conn = idle.pop()
                if conn.idle_since > limit and conn.connected_:
                    conn.owner = user
                    return conn
                conn.close()
        self.connect(backend, user)
        return None

    def connect(self, backend: BackendLike, user: BackendUser) -> None:
        """Open a new connection for ``user`` (not taken from the idle pool)."""
        attempt = _ConnectAttempt(self, backend, user)
        factory: Any = attempt
        if backend.scheme == "https":
            creator = self._tls_creator(backend)
            if creator is None:
                failure = Failure(UnsupportedBackend(f"TLS to {describe(backend)} is unusable"))
                self._reactor.callLater(0, attempt.clientConnectionFailed, None, failure)
                self._attempts[user] = attempt
                return
            factory = _TLSConnectAttempt(creator, attempt)
        elif backend.scheme != "http":
            failure = Failure(UnsupportedBackend(f"unsupported backend scheme {backend.scheme!r}"))
            self._reactor.callLater(0, attempt.clientConnectionFailed, None, failure)
            self._attempts[user] = attempt
            return
        self._attempts[user] = attempt
        connect_tcp(
            self._reactor,
            backend.host,
            backend.port,
            factory,
            self._settings.backend_connect_timeout,
        )

    def reload_tls(self) -> None:
        """Re-read ``https`` backends' TLS files at their next new connection (after
        a reload: a rotated CA or client certificate takes effect; idle
        connections already verified stay until they expire)."""
        self._creators.clear()

    def _tls_creator(self, backend: BackendLike) -> Any:
        """The TLS connection creator of an ``https`` backend, built once (None if
        its files became unusable since start-up checked them; logged)."""
        creator = self._creators.get(backend)
        if creator is None:
            from tlsproxy.backendtls import client_creator

            try:
                creator = client_creator(backend)  # type: ignore[arg-type]
            except Exception as exc:
                log.error(
                    "cannot set up TLS to {backend}: {error}",
                    backend=describe(backend),
                    error=str(exc),
                )
                return None
            self._creators[backend] = creator
        return creator

    def cancel(self, user: BackendUser) -> None:
        """``user`` no longer wants the connection it is waiting for.

        The attempt goes on; a connection it makes joins the idle pool.
        """
        attempt = self._attempts.pop(user, None)
        if attempt is not None:
            attempt.user = None

    def release(self, conn: BackendConnection) -> None:
        """Take back a connection whose exchange ended cleanly; keep it idle if room."""
        conn.owner = None
        conn.deadline = INFINITY
        conn.exchanges += 1
        conn.resume_reading()
        if not conn.connected_ or self._closed:
            conn.close()
            return
        idle = conn.idle_list
        if idle is None:
            idle = conn.idle_list = self._idle.setdefault(conn.backend, [])
        if len(idle) >= self._settings.backend_max_idle:
            conn.close()
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)

    def discard(self, conn: BackendConnection, *, abort: bool = True) -> None:
        """Drop a connection that must not be reused.

        ``abort`` drops it at once (mid-exchange); otherwise buffered bytes are
        sent first (the backend asked to close, or a WebSocket ended).
        """
        conn.owner = None
        conn.deadline = INFINITY
        self._forget_idle(conn)
        if abort:
            conn.abort()
        else:
            conn.close()

    def close(self) -> None:
        """Close every connection and stop the sweep (on shutdown)."""
        self._closed = True
        for conn in list(self._connections):
            conn.abort()
        for idle in self._idle.values():
            idle.clear()
        self._stop_sweeping()

    # statistics, for tests and status pages

    def idle_count(self, backend: BackendLike | None = None) -> int:
        """Number of idle connections (to one backend, or in all)."""
        if backend is not None:
            return len(self._idle.get(backend, ()))
        return sum(len(v) for v in self._idle.values())

    def connection_count(self) -> int:
        """Number of open backend connections, idle or busy."""
        return len(self._connections)

    # internals

    def _connected(self, conn: BackendConnection, user: BackendUser | None) -> None:
        self._connections.add(conn)
        self._start_sweeping()
        if user is not None and self._attempts.get(user) is not None:
            attempt = self._attempts.pop(user)
            attempt.user = None
            conn.owner = user
            user.backend_connected(conn)
        else:
            conn.exchanges = -1  # release() counts an exchange; this one had none
            self.release(conn)

    def _attempt_done(self, attempt: _ConnectAttempt) -> None:
        if attempt.user is not None and self._attempts.get(attempt.user) is attempt:
            del self._attempts[attempt.user]

    def _lost(self, conn: BackendConnection) -> None:
        self._connections.discard(conn)
        self._forget_idle(conn)
        if not self._connections:
            self._stop_sweeping()

    def _forget_idle(self, conn: BackendConnection) -> None:
        idle = conn.idle_list
        if idle is not None and conn in idle:
            idle.remove(conn)

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            sweeper = LoopingCall(self._sweep)
            sweeper.clock = self._reactor  # type: ignore[assignment]
            sweeper.start(self._settings.sweep_interval, now=False)
            self._sweeper = sweeper

    def _stop_sweeping(self) -> None:
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            if sweeper.running:
                sweeper.stop()

    def _sweep(self) -> None:
        now = self._reactor.seconds()
        limit = now - self._settings.backend_idle_timeout
        for conn in list(self._connections):
            owner = conn.owner
            if owner is None:
                if conn.idle_since <= limit:
                    self._forget_idle(conn)
                    conn.close()
            elif conn.deadline <= now:
                conn.deadline = INFINITY
                try:
                    owner.backend_timed_out()
                except Exception:
                    # One connection's bug must not stop the sweep (every deadline).
                    log.failure("handling an upstream timeout")
                    conn.abort()
