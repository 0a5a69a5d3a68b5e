"""
The upstream side of a tunnel: one attempt at a proxy, the connection it
makes, the proxy's answer to CONNECT, and then the tunnel's bytes.

A L{ProxyAttempt} reports everything to its receiver (the tunnel, through
L{shifter.interfaces.IProxyReceiver}) naming itself, so the receiver can
tell an attempt it has given up on from the one it waits for.  This module
knows nothing of the tunnel beyond that interface.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from shifter.upstream.connect import BodySkipper, ConnectResponse, ConnectResponseParser, ProxyResponseError
from shifter.upstream.connector import ProxyConnection, connectNow, noDelay
from shifter.upstream.proxy import DIRECT, SOCKS5
from shifter.upstream.socks5 import Socks5Error, Socks5Handshake
from shifter.upstream.warm import WarmConnections
from shifter.interfaces import ConnectResponse, IProxyAttempt, IProxyReceiver


# The attempt's states.
CONNECTING = "connecting"
CONNECTED = "connected"
ABANDONED = "abandoned"  # given up on; a connection made late is dropped
GONE = "gone"


@implementer(IProxyAttempt)
class ProxyAttempt:
    """
    One try at one proxy for one tunnel.

    A plain TCP proxy at a known address is reached with
    L{shifter.upstream.connector}, with no timeout of its own (the tunnel keeps the
    deadline); any other (TLS, a hostname, an endpoint string) through its
    endpoint.

    @ivar proxy: the L{shifter.upstream.proxy.UpstreamProxy} being tried.
    @ivar protocol: the L{UpstreamProtocol}, once connected.
    """

    __slots__ = ("proxy", "receiver", "warm", "state", "protocol", "_connector", "_pending", "_written", "wasWarm")

    def __init__(self, proxy: Any, receiver: IProxyReceiver, warm: WarmConnections | None = None) -> None:
        self.proxy = proxy
        self.receiver = receiver
        self.warm = warm
        self.wasWarm = False
        self.state = CONNECTING
        self.protocol: UpstreamProtocol | None = None
        self._connector: Any = None
        self._pending: Deferred[Any] | None = None
        self._written = False

    def connect(self) -> None:
        """
        Start connecting: on a warm connection to the proxy if one is
        ready (the attempt is then connected at once), else anew.
        """
        proxy = self.proxy
        factory = _AttemptFactory(self)
        warm = self.warm
        transport = warm.take(proxy) if warm is not None else None
        if transport is not None:
            self.wasWarm = True
            protocol = factory.buildProtocol(None)
            if isinstance(transport, TLSMemoryBIOProtocol):
                transport.wrappedProtocol = protocol
            else:
                transport.protocol = protocol
            protocol.makeConnection(transport)
        elif proxy.direct is not None:
            self._connector = connectNow(proxy.direct, factory)
        else:
            pending = proxy.endpoint.connect(factory)
            self._pending = pending
            pending.addErrback(self._endpointFailed)
        if warm is not None:
            warm.refill(proxy)

    def _endpointFailed(self, reason: Failure) -> None:
        self._pending = None
        self.connectFailed(reason)

    def connected(self, protocol: UpstreamProtocol) -> None:
        """
        The connection is made (called by the protocol).
        """
        self._connector = None
        self._pending = None
        if self.state == ABANDONED:
            protocol.transport.abortConnection()
            return
        self.state = CONNECTED
        self.protocol = protocol
        self.receiver.proxyConnected(self)

    def connectFailed(self, reason: Failure) -> None:
        if self.state == GONE:
            return
        self.state = GONE
        self._connector = None
        self.receiver.proxyConnectFailed(self, reason)

    def lost(self, reason: Failure) -> None:
        """
        The connection is gone (called by the protocol).
        """
        self.state = GONE
        self.receiver.proxyLost(self, reason)

    @property
    def transport(self) -> Any:
        """
        The connection's transport (TCP, or TLS over TCP), once connected.
        """
        return self.protocol.transport if self.protocol is not None else None

    def write(self, data: bytes) -> None:
        if self.state != CONNECTED:
            return
        protocol = self.protocol
        transport = protocol.transport  # type: ignore[union-attr]
        if not self._written:
            self._written = True
            data = protocol.firstBytes(data)  # type: ignore[union-attr]
            if not data:
                return
        if isinstance(transport, ProxyConnection) and not transport.unsent() and not transport.disconnecting:
            # Bytes with nothing queued before them (the CONNECT request,
            # the client's early bytes behind it) go out now: waiting for
            # the reactor to say the socket is writable would cost a turn
            # before the proxy hears anything.
            try:
                sent = transport.getHandle().send(data)
            except OSError:
                sent = 0  # the transport will meet the error itself
            data = data[sent:]
            if not data:
                return
        transport.write(data)

    def again(self, request: bytes, response: ConnectResponse) -> None:
        if self.state != CONNECTED:
            return
        self.protocol.again(request, response)  # type: ignore[union-attr]

    def halfClose(self) -> None:
        if self.state != CONNECTED:
            return
        transport = self.protocol.transport  # type: ignore[union-attr]
        if isinstance(transport, TLSMemoryBIOProtocol):
            # TLS has no half-close of its own: a close_notify says "no
            # more from me", and the TLS layer keeps reading until the
            # proxy answers with its own.  A bare FIN under TLS would be a
            # truncation attack as far as the proxy can tell.
            transport.loseConnection()
        else:
            transport.loseWriteConnection()

    def finish(self) -> None:
        if self.state == CONNECTED:
            self.protocol.finish()  # type: ignore[union-attr]
        else:
            self.abort()

    def abort(self) -> None:
        state = self.state
        if state == CONNECTED:
            self.protocol.transport.abortConnection()  # type: ignore[union-attr]
        elif state == CONNECTING:
            self.state = ABANDONED
            if self._connector is not None:
                connector, self._connector = self._connector, None
                connector.stop()
            elif self._pending is not None:
                pending, self._pending = self._pending, None
                pending.cancel()


# The upstream protocol's states.
ANSWERING = "answering"  # CONNECT sent, the answer not yet complete
OPEN = "open"  # a 2xx came: bytes belong to the tunnel
REFUSED = "refused"  # any other answer, or garbage: bytes are dropped
SKIPPING = "skipping"  # reading past a refusal's body, to ask again (NTLM)


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """
    Shifter's connection to an upstream proxy for one tunnel.

    The answer to CONNECT goes to the sans-I/O L{ConnectResponseParser};
    only after a 2xx are bytes passed on, as tunnel bytes.  After any other
    answer they are dropped, unless the tunnel asks again on the same
    connection (L{again}): then the answer's body is read past with a
    L{BodySkipper} and the next request sent.

    @ivar ended: whether the proxy has finished sending.
    @ivar finishing: whether the connection is being finished (see
        L{finish}): it closes at the proxy's end.
    """

    # The connection to the proxy (TCP, or TLS over TCP).
    transport: Any
    ended = False
    finishing = False

    def __init__(self, attempt: ProxyAttempt) -> None:
        self.attempt = attempt
        self.state = ANSWERING
        self._parser: ConnectResponseParser | None = ConnectResponseParser()
        self._skipper: BodySkipper | None = None
        self._next = b""

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.attempt.connected(self)

    def firstBytes(self, request: bytes) -> bytes:
        """
        What to send first, given the tunnel's request (the bytes before
        the proxy answers): for an HTTP proxy, the request itself.
        """
        return request

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == OPEN:
            self.attempt.receiver.proxyData(self.attempt, data)
        elif state == ANSWERING:
            self._answer(data)
        elif state == SKIPPING:
            self._skip(data)
        # REFUSED: the tunnel was refused; whatever follows (the body of a
        # 403 or 407 page) is not the client's business.

    def _answer(self, data: bytes) -> None:
        try:
            response = self._parser.feed(data)  # type: ignore[union-attr]
        except ProxyResponseError as e:
            self._refuse(str(e))
            return
        if response is None:
            return
        self._parser = None
        self.state = OPEN if response.opensTunnel else REFUSED
        self.attempt.receiver.proxyAnswered(self.attempt, response)

    def again(self, request: bytes, response: ConnectResponse) -> None:
        """
        See L{ProxyAttempt.again}.
        """
        if self.state != REFUSED:
            return
        self.state = SKIPPING
        self._skipper = BodySkipper(response)
        self._next = request
        self._skip(response.leftover)

    def _skip(self, data: bytes) -> None:
        try:
            after = self._skipper.feed(data)  # type: ignore[union-attr]
        except ProxyResponseError as e:
            self._refuse(str(e))
            return
        if after is None:
            return
        if after:
            # A proxy that speaks before it is asked.
            self._refuse("the proxy sent bytes after its answer's body, before the next request")
            return
        self._skipper = None
        self.state = ANSWERING
        self._parser = ConnectResponseParser()
        request, self._next = self._next, b""
        self.attempt.write(request)

    def _refuse(self, reason: str) -> None:
        self.state = REFUSED
        self._parser = self._skipper = None
        self.attempt.receiver.proxyInvalid(self.attempt, reason)

    def readConnectionLost(self) -> None:
        self.ended = True
        self.attempt.receiver.proxyEnded(self.attempt)
        if self.finishing:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._parser = self._skipper = None
        if (
            self.state == OPEN
            and not self.ended
            and reason.check(ConnectionDone)
            and isinstance(self.transport, TLSMemoryBIOProtocol)
        ):
            # A clean TLS close (the proxy's close_notify, then ours): the
            # proxy's end of the tunnel, as a FIN is over TCP; TLS has no
            # half-close, so its connection goes with it.  A truncation (an
            # end without close_notify, an error) is reported as a loss.
            self.ended = True
            self.attempt.receiver.proxyEnded(self.attempt)
        self.attempt.lost(reason)

    def finish(self) -> None:
        """
        End the connection in order: see L{IProxyAttempt.finish}.
        """
        transport = self.transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            # close_notify; the TLS layer reads on until the proxy's own,
            # then closes.
            transport.resumeProducing()
            transport.loseConnection()
        elif self.ended:
            transport.loseConnection()  # nothing more to read
        else:
            self.finishing = True
            if not getattr(transport, "_writeDisconnected", False):  # the splice relay may have sent it
                transport.loseWriteConnection()
            # Reading again (paused by the relay, or stopped by the splice
            # relay), to throw away what the proxy still sends until its end.
            transport.resumeProducing()


class Socks5Protocol(UpstreamProtocol):
    """
    Shifter's connection to a SOCKS5 server for one tunnel: the greeting
    goes first, the tunnel's request (a SOCKS5 CONNECT) once the server has
    chosen a method and, with username/password, accepted the credentials;
    the sans-I/O L{Socks5Handshake} reads every answer.  The server's
    reply is reported as an answer to CONNECT (see L{shifter.upstream.socks5}).
    """

    _handshake: Socks5Handshake | None = None

    def firstBytes(self, request: bytes) -> bytes:
        handshake = self._handshake = Socks5Handshake(request, self.attempt.proxy.login)
        return handshake.greeting()

    def _answer(self, data: bytes) -> None:
        handshake = self._handshake
        try:
            if handshake is None:
                raise Socks5Error("SOCKS5 server spoke before the greeting")
            send, response = handshake.feed(data)
        except Socks5Error as e:
            self.state = REFUSED
            self._handshake = None
            self.attempt.receiver.proxyInvalid(self.attempt, str(e))
            return
        if send:
            self.transport.write(send)
        if response is None:
            return
        self._handshake = None
        self.state = OPEN if response.opensTunnel else REFUSED
        self.attempt.receiver.proxyAnswered(self.attempt, response)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._handshake = None
        super().connectionLost(reason)


# What a DIRECT connection "answers": it is open once made.
_DIRECT_OPEN = ConnectResponse(200, "connected")


class DirectProtocol(UpstreamProtocol):
    """
    Shifter's connection straight to a tunnel's destination (the L{DIRECT}
    route): there is no handshake, and the tunnel is open as soon as the
    connection is made.
    """

    def connectionMade(self) -> None:
        attempt = self.attempt
        attempt.connected(self)
        if self.state == ANSWERING and attempt.state == CONNECTED:
            self.state = OPEN
            self._parser = None
            attempt.receiver.proxyAnswered(attempt, _DIRECT_OPEN)

    def firstBytes(self, request: bytes) -> bytes:
        return b""


_PROTOCOLS = {SOCKS5: Socks5Protocol, DIRECT: DirectProtocol}


class _AttemptFactory(ClientFactory):
    """
    Builds the one L{UpstreamProtocol} of an attempt, and tells the attempt
    when its connection fails.
    """

    noisy = False  # one factory per attempt: its start and stop are not news

    def __init__(self, attempt: ProxyAttempt) -> None:
        self.attempt = attempt

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return _PROTOCOLS.get(self.attempt.proxy.kind, UpstreamProtocol)(self.attempt)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.attempt.connectFailed(reason)
