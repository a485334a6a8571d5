"""Server-side TLS over a TCP connection, lean on the per-request path.

Twisted's ``TLSMemoryBIOProtocol`` does the same job in general: it raises and
catches pyOpenSSL's ``WantReadError`` on every read, aggregates small writes
behind a ``callLater(0)`` (one timer and one extra reactor turn per response),
and wraps producers in two layers.  `TLSServerConnection` keeps the handshake
on pyOpenSSL's public API (so the SNI, ALPN and verify callbacks behave exactly
as there) and moves the steady state, record reads and writes between memory
BIOs, onto the OpenSSL binding underneath pyOpenSSL, which reports "no more
data" as a return code: no exceptions, one ``SSL_write`` and one socket send
per application write.  DESIGN.md §3 measured +15-25 % for this alone.

Its job: the TLS state machine of one accepted connection (handshake, records,
close_notify, alerts) and the transport interface the engine uses.  It must
not: buffer (a write goes to the TCP transport at once, whose buffer and
producer pausing give back-pressure), make decisions about HTTP, or outlive
its TCP connection.  Closing follows nginx: send close_notify, half-close the
socket, and let the engine's deadline bound how long the client may take to
close its side.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import exception_from_error_queue
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["TLSServerConnection", "TLSServerFactory"]

#: Plaintext read per SSL_read call (bytes; a record holds at most 16 KiB).
_CHUNK = 65536
#: Ciphertext taken from the send BIO per BIO_read (bytes): a 64 KiB write and
#: its record overhead in one piece, below glibc's 128 KiB mmap threshold
#: (each bytes object copied out of it is a fresh allocation).
_OUT_CHUNK = 96 * 1024
# One buffer each for the reactor thread; copied out after every call.
_read_buffer = _ffi.new("char[]", _CHUNK)
_out_buffer = _ffi.new("char[]", _OUT_CHUNK)

_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL = _lib.SSL_ERROR_SYSCALL


def _tls_error(ssl: Any, result: int) -> Exception:
    """The pyOpenSSL exception for a failed ``SSL_read``/``SSL_write``, as
    pyOpenSSL itself would have raised it (the engine reads OpenSSL's reason
    from it)."""
    if _lib.SSL_get_error(ssl, result) == _SYSCALL and _lib.ERR_peek_error() == 0:
        return SSL.SysCallError(-1, "Unexpected EOF")
    try:
        exception_from_error_queue(SSL.Error)
    except SSL.Error as exc:
        return exc
    return SSL.Error([])  # pragma: no cover - the queue had an entry


@implementer(ISSLTransport, ITCPTransport, IConsumer, IPushProducer, IProtocol)
class TLSServerConnection(Protocol):
    """One accepted TLS connection: the protocol of the TCP transport, and the
    transport of the wrapped (application) protocol.

    The wrapped protocol sees ``makeConnection`` at once, ``handshakeCompleted``
    (if it provides ``IHandshakeListener``) when the handshake succeeds, then
    plaintext in ``dataReceived``; ``connectionLost`` gets the TLS failure
    (a pyOpenSSL ``SSL.Error``) when TLS failed, else the TCP reason.
    """

    transport: Any  # the TCP transport (an ITCPTransport)

    def __init__(self, creator: IOpenSSLServerConnectionCreator, wrapped: IProtocol) -> None:
        self._creator = creator
        self.wrapped = wrapped
        self._tls: SSL.Connection | None = None
        self._ssl: Any = None
        self._in: Any = None
        self._out: Any = None
        self._handshake_done = False
        self._early: list[bytes] = []  # application writes made before the handshake ended
        self._finished = False  # TLS is over: nothing more is read or written
        self._reason: Failure | None = None
        self.disconnecting = False

    # ------------------------------------------------- protocol of the TCP side

    def makeConnection(self, transport: Any) -> None:
        tls = self._creator.serverConnectionForTLS(self)  # type: ignore[arg-type]
        tls.set_accept_state()
        self._tls = tls
        # The SSL object and its memory BIOs, as pyOpenSSL created them.
        self._ssl = tls._ssl  # type: ignore[attr-defined]
        self._in = tls._into_ssl  # type: ignore[attr-defined]
        self._out = tls._from_ssl  # type: ignore[attr-defined]
        Protocol.makeConnection(self, transport)
        self.wrapped.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        _lib.BIO_write(self._in, data, len(data))
        if not self._handshake_done and not self._handshake():
            return
        self._read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finished = True
        self.connected = False
        failure, self._reason = self._reason or reason, None
        self.wrapped.connectionLost(failure)

    def _handshake(self) -> bool:
        """Advance the handshake; True once it completed and reading may go on."""
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except SSL.Error:
            self._fail(Failure())
            return False
        self._handshake_done = True
        self._flush()  # the server's last flight, TLS 1.3 session tickets
        wrapped = self.wrapped
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()  # type: ignore[attr-defined]
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        return not self._finished

    def _read(self) -> None:
        """Decrypt every complete record in the receive BIO and deliver it: the
        records are decrypted side by side into one buffer and handed over as
        one string (a 64 KiB read holds up to four 16 KiB records)."""
        ssl = self._ssl
        total = 0
        while True:
            n = _lib.SSL_read(ssl, _read_buffer + total, _CHUNK - total)
            if n > 0:
                total += n
                if total < _CHUNK:
                    continue
                self.wrapped.dataReceived(_ffi.buffer(_read_buffer, total)[:])
                if self._finished:
                    return
                total = 0
                continue
            error = _lib.SSL_get_error(ssl, n)
            break
        if total:
            self.wrapped.dataReceived(_ffi.buffer(_read_buffer, total)[:])
            if self._finished:
                return
        if error == _WANT_READ:
            self._flush()  # e.g. the answer to a TLS 1.3 KeyUpdate
        elif error == _ZERO_RETURN:
            # The client's close_notify: answer it and close.
            self._finished = True
            self._shutdown()
            self._close_tcp()
        else:
            self._fail(Failure(_tls_error(ssl, n)))

    def _flush(self) -> None:
        """Send whatever OpenSSL put in the send BIO (one TCP write for up to
        `_OUT_CHUNK` bytes)."""
        out = self._out
        write = self.transport.write
        while (n := _lib.BIO_read(out, _out_buffer, _OUT_CHUNK)) > 0:
            write(_ffi.buffer(_out_buffer, n)[:])
            if n < _OUT_CHUNK:
                return

    def _shutdown(self) -> None:
        """Queue and send our close_notify."""
        if _lib.SSL_shutdown(self._ssl) < 0:
            _lib.ERR_clear_error()  # e.g. mid-handshake; nothing to send then
        self._flush()

    def _fail(self, failure: Failure) -> None:
        """TLS failed: send the alert OpenSSL prepared and close.

        An EOF that violates TLS is reported as ``ConnectionLost``, as
        Twisted's TLS layer does.
        """
        if isinstance(failure.value, SSL.SysCallError):
            failure = Failure(CONNECTION_LOST)
        if self._reason is None:
            self._reason = failure
        self._finished = True
        self._flush()
        self._close_tcp()

    def _close_tcp(self) -> None:
        """TLS is over: close the socket once what is queued was sent.

        The application's producer is unregistered first: Twisted's transport
        would otherwise resume a paused producer instead of closing, and keep
        the connection open for output that can no longer be sent.
        """
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # ------------------------------------ transport of the application side

    def write(self, data: bytes) -> None:
        """Encrypt ``data`` as one ``SSL_write`` and send it (one TCP write)."""
        if self._finished or self.disconnecting or not data:
            return
        if not self._handshake_done:
            self._early.append(data)
            return
        size = len(data)
        n = _lib.SSL_write(self._ssl, data, size)
        if n != size:
            if n <= 0:
                self._fail(Failure(_tls_error(self._ssl, n)))
                return
            # A partial write (SSL_MODE_ENABLE_PARTIAL_WRITE): write the rest.
            view = _ffi.from_buffer(data)
            while n < size:
                more = _lib.SSL_write(self._ssl, view + n, size - n)
                if more <= 0:
                    self._fail(Failure(_tls_error(self._ssl, more)))
                    return
                n += more
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send close_notify after what was written, then half-close the socket.

        Before the handshake completed there is nothing to close cleanly, so
        the connection is aborted (as Twisted's TLS layer does).  The client
        may still send (its close_notify, pipelined bytes): those are read and
        dropped until it closes; the engine's deadline bounds that.
        """
        if self.disconnecting or self._finished:
            return
        self.disconnecting = True
        if not self._handshake_done:
            self.abortConnection()
            return
        self._shutdown()
        self.transport.loseWriteConnection()

    def abortConnection(self) -> None:
        """Close at once, discarding anything not yet sent."""
        self.disconnecting = True
        self._finished = True
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        """Same as `loseConnection`: TLS cannot half-close without closing."""
        self.loseConnection()

    def getHandle(self) -> SSL.Connection | None:
        """The pyOpenSSL connection (for SNI, the peer certificate, session state)."""
        return self._tls

    def getPeerCertificate(self) -> Any:
        tls = self._tls
        return tls.get_peer_certificate() if tls is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """The ALPN protocol agreed on, if any."""
        tls = self._tls
        if tls is None:
            return None
        return tls.get_alpn_proto_negotiated() or None

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getTcpNoDelay(self) -> bool:
        return bool(self.transport.getTcpNoDelay())

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.transport.getTcpKeepAlive())

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    # Producer/consumer: the TCP transport's buffer is the only one, so both
    # directions go straight to it.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def logPrefix(self) -> str:
        return "TLS"


@implementer(IProtocolFactory)
class TLSServerFactory(Factory):
    """Wraps each protocol of ``wrapped`` in a `TLSServerConnection` whose
    pyOpenSSL connection comes from ``creator``."""

    noisy = False

    def __init__(self, creator: IOpenSSLServerConnectionCreator, wrapped: Factory) -> None:
        self.creator = creator
        self.wrapped = wrapped

    def buildProtocol(self, addr: Any) -> TLSServerConnection | None:  # type: ignore[override]
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        return TLSServerConnection(self.creator, protocol)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
