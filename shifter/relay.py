"""
The relay of an open tunnel, in one of two implementations:

  - C{twisted}: the two transports joined as each other's streaming
    producer (as in L{twisted.protocols.portforward}); every byte passes
    through the protocols' C{dataReceived}.  Works for any transport, TLS
    to the proxy included.
  - C{splice}: L{shifter.splice.SpliceRelay}, zero-copy through pipes; for
    plain TCP sockets on both sides, on a reactor with file descriptors.

C{--relay auto} (the default) uses splice wherever it can, else twisted.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from zope.interface import Interface, implementer

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet

from shifter.splice import SPLICE_AVAILABLE, SpliceRelay

if TYPE_CHECKING:
    from shifter.downstream import DownstreamProtocol
    from shifter.upstream import UpstreamProtocol

RELAYS = ("auto", "splice", "twisted")

# Bulk flows get pipes of 1 MiB (the unprivileged maximum by default) rather
# than the kernel's 64 KiB: each splice then moves up to sixteen times as
# much, and the reactor wakes that much less often per gigabyte.
_PIPE_SIZE = 1 << 20


class IRelay(Interface):
    """
    Moves the bytes of one open tunnel both ways until either side ends it.
    """

    def start(toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        """
        Start relaying, first delivering what was read before the tunnel
        opened: the client's early bytes and the tunnel bytes that came
        with the proxy's answer.

        @param clientEnded: whether the client has already finished sending.
        """

    def stop() -> None:
        """
        Stop relaying now, leaving both transports to the caller to close.
        """


@implementer(IRelay)
class TwistedRelay:
    """
    Each transport is the other's streaming producer, so a slow reader
    pauses the fast writer; the protocols' C{dataReceived} write each chunk
    to the other side and half-closes are passed on by the protocols.
    """

    name = "twisted"

    def __init__(self, downstream: DownstreamProtocol, upstream: UpstreamProtocol) -> None:
        self.client = downstream.transport
        self.proxy = upstream.transport

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        self.proxy.registerProducer(self.client, True)
        self.client.registerProducer(self.proxy, True)
        if toProxy:
            self.proxy.write(toProxy)
        if toClient:
            self.client.write(toClient)
        if clientEnded:
            self.proxy.loseWriteConnection()
        else:
            self.client.resumeProducing()

    def stop(self) -> None:
        pass


@implementer(IRelay)
class _SpliceTunnel:
    """
    A L{SpliceRelay} on the sockets of the tunnel's two Twisted transports,
    which stop reading and writing while it runs and close the sockets when
    it has ended, as ever.
    """

    name = "splice"

    def __init__(self, reactor: Any, downstream: DownstreamProtocol, upstream: UpstreamProtocol) -> None:
        def countUp(n: int) -> None:
            downstream.received += n

        def countDown(n: int) -> None:
            upstream.received += n

        self.transports = (downstream.transport, upstream.transport)
        self.relay = SpliceRelay(
            reactor,
            downstream.transport.socket,
            upstream.transport.socket,
            countUp,
            countDown,
            downstream.touch,
            downstream.relayEnded,
            pipeSize=_PIPE_SIZE,
        )

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        for transport in self.transports:
            transport.stopReading()
            transport.stopWriting()
        self.relay.start(toProxy, toClient, clientEnded)

    def stop(self) -> None:
        self.relay.stop()


def _spliceable(transport: object) -> bool:
    """
    Whether C{transport} is a plain TCP connection that Twisted holds no
    unsent bytes for, whose socket a splice relay can take over.
    """
    return bool(
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.producer is None
        and transport.socket.type == socket.SOCK_STREAM
    )


def openRelay(mode: str, reactor: Any, downstream: DownstreamProtocol, upstream: UpstreamProtocol) -> IRelay:
    """
    The relay for a tunnel that has just opened: splice where C{mode} allows
    it and both transports are plain TCP, else Twisted's.

    @param mode: C{"auto"} or C{"splice"} (splice where possible), or
        C{"twisted"}.
    """
    if (
        mode != "twisted"
        and SPLICE_AVAILABLE
        and IReactorFDSet.providedBy(reactor)
        and _spliceable(downstream.transport)
        and _spliceable(upstream.transport)
    ):
        return _SpliceTunnel(reactor, downstream, upstream)
    return TwistedRelay(downstream, upstream)
