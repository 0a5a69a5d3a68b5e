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

from typing import Any

from zope.interface import implementer

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet

from shifter.splice import SPLICE_AVAILABLE, SpliceRelay
from shifter.interfaces import IProxyAttempt, IRelay

RELAYS = ("auto", "splice", "twisted")

# Bulk flows get pipes of 1 MiB (the unprivileged maximum by default) rather
# than the kernel's 64 KiB: each splice then moves up to sixteen times as
# much, and the reactor wakes that much less often per gigabyte.
_PIPE_SIZE = 1 << 20


@implementer(IRelay)
class TwistedRelay:
    """
    Each transport is the other's streaming producer, so a slow reader
    pauses the fast writer; the bytes themselves pass through the
    protocols and the tunnel.  A side that has finished sending stops being
    a producer, and the relay, when stopped, unregisters both, so that
    closing a transport is never held up by a paused producer.
    """

    name = "twisted"

    def __init__(self, clientTransport: Any, attempt: IProxyAttempt) -> None:
        self.client = clientTransport
        self.attempt = attempt
        self.proxy = attempt.transport

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        self.client.registerProducer(self.proxy, True)
        if toProxy:
            self.proxy.write(toProxy)
        if toClient:
            self.client.write(toClient)
        if clientEnded:
            self.attempt.halfClose()
        else:
            self.proxy.registerProducer(self.client, True)
            self.client.resumeProducing()

    def clientFinished(self) -> None:
        if self.proxy.producer is not None:
            self.proxy.unregisterProducer()
        self.attempt.halfClose()

    def proxyFinished(self) -> None:
        if self.client.producer is not None:
            self.client.unregisterProducer()
        self.client.loseWriteConnection()

    def stop(self) -> None:
        for transport in (self.client, self.proxy):
            if transport.producer is not None:
                transport.unregisterProducer()


@implementer(IRelay)
class _SpliceTunnel:
    """
    A L{SpliceRelay} on the sockets of the tunnel's two Twisted transports,
    which stop reading and writing while it runs and close the sockets when
    it has ended, as ever.  Half-closes are seen and passed on by the
    splice relay itself.
    """

    name = "splice"
    __slots__ = ("transports", "relay")

    def __init__(self, reactor: Any, clientTransport: Any, proxyTransport: Any, owner: Any) -> None:
        self.transports = (clientTransport, proxyTransport)
        self.relay = SpliceRelay(
            reactor, clientTransport.getHandle(), proxyTransport.getHandle(), owner, pipeSize=_PIPE_SIZE
        )

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        for transport in self.transports:
            transport.stopReading()
            transport.stopWriting()
        self.relay.start(toProxy, toClient, clientEnded)

    def clientFinished(self) -> None:
        pass  # the transports do not read while the splice relay runs

    def proxyFinished(self) -> None:
        pass

    def stop(self) -> None:
        self.relay.stop()


def _spliceable(transport: object) -> bool:
    """
    Whether C{transport} is a plain, open TCP connection (Twisted's
    C{tcp.Connection} is always a stream socket) whose socket a splice
    relay can take over.

    Shifter itself makes sure that Twisted holds no unsent bytes for it:
    nothing is written to the client before the tunnel opens, and the only
    bytes written to the proxy, the CONNECT request, have been answered.
    """
    return bool(isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting)


def openRelay(
    mode: str,
    reactor: Any,
    clientTransport: Any,
    attempt: IProxyAttempt,
    owner: Any,
) -> IRelay:
    """
    The relay for a tunnel that has just opened: splice where C{mode} allows
    it and both transports are plain TCP, else Twisted's.

    @param mode: C{"auto"} or C{"splice"} (splice where possible), or
        C{"twisted"}.
    @param owner: told of the splice relay's progress: its C{relayed} and
        C{relayEnded} (see L{SpliceRelay}).
    """
    proxyTransport = attempt.transport
    if (
        mode != "twisted"
        and SPLICE_AVAILABLE
        and IReactorFDSet.providedBy(reactor)
        and _spliceable(clientTransport)
        and _spliceable(proxyTransport)
    ):
        return _SpliceTunnel(reactor, clientTransport, proxyTransport, owner)
    return TwistedRelay(clientTransport, attempt)
