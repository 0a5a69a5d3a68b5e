"""
The upstream side of a tunnel: a connection to the HTTP proxy that asks for
C{CONNECT host:port}, reads the answer, and then relays bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from shifter.connect import ConnectResponseParser, ProxyResponseError

if TYPE_CHECKING:
    from shifter.downstream import DownstreamProtocol


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """
    Shifter's connection to an upstream proxy for one client.

    It sends the CONNECT request as soon as it is connected and gives the
    proxy C{handshakeTimeout} seconds to answer.  The answer goes to the
    sans-I/O L{ConnectResponseParser}; the verdict, and any tunnel bytes
    that came with it, go to the L{DownstreamProtocol} that owns the tunnel.
    After that, every byte received is relayed to the client.

    @ivar received: bytes received from the proxy after its answer.
    """

    received = 0
    # The connection to the proxy (TCP, or TLS over TCP).
    transport: Any

    def __init__(self, downstream: DownstreamProtocol, request: bytes) -> None:
        self.downstream = downstream
        self._request = request
        self._parser: ConnectResponseParser | None = ConnectResponseParser()
        self._handshakeTimer = None

    def connectionMade(self) -> None:
        downstream = self.downstream
        self._handshakeTimer = downstream.factory.reactor.callLater(
            downstream.factory.settings.handshakeTimeout, self._handshakeTimedOut
        )
        self.transport.write(self._request)
        downstream.upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._parser is None:
            self.received += len(data)
            self.downstream.transport.write(data)
            self.downstream.touch()
            return
        try:
            response = self._parser.feed(data)
        except ProxyResponseError as e:
            self._endHandshake()
            self.downstream.upstreamFailed(self, "proxy-garbage", f"bad answer from proxy: {e}", retry=True)
            return
        if response is None:
            return
        self._endHandshake()
        if response.opensTunnel:
            self.received = len(response.leftover)
            self.downstream.tunnelOpened(self, response.leftover)
        elif response.status == 407:
            self.downstream.proxyChallenged(self, response)
        else:
            self.downstream.upstreamFailed(
                self,
                "proxy-status",
                f"proxy answered {response.status} {response.reason}".rstrip(),
                # A 5xx says this proxy could not serve the request; another
                # proxy may.  Other answers are the same policy everywhere.
                retry=response.status >= 500,
                status=response.status,
            )

    def readConnectionLost(self) -> None:
        if self._parser is not None:
            self._endHandshake()
            self.downstream.upstreamFailed(
                self, "proxy-closed", "proxy closed the connection before answering", retry=True
            )
        else:
            self.downstream.upstreamEnded(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._parser is not None:
            self._endHandshake()
            self.downstream.upstreamFailed(
                self,
                "proxy-closed",
                f"proxy connection lost before answering: {reason.getErrorMessage()}",
                retry=True,
            )
        self.downstream.upstreamLost(self, reason)

    def _endHandshake(self) -> None:
        self._parser = None
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        self._parser = None
        self.downstream.upstreamFailed(
            self,
            "timeout",
            f"proxy did not answer CONNECT within "
            f"{self.downstream.factory.settings.handshakeTimeout:g} s",
            retry=True,
            unhealthy=True,
        )


class UpstreamFactory(ClientFactory):
    """
    Builds the one L{UpstreamProtocol} of a connection attempt.
    """

    noisy = False  # one factory per attempt: its start and stop are not news

    def __init__(self, downstream: DownstreamProtocol, request: bytes) -> None:
        self.downstream = downstream
        self.request = request

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return UpstreamProtocol(self.downstream, self.request)
