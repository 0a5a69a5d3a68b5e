"""
The relay of an open tunnel, in one of two implementations:

  - C{twisted}: the two transports joined as each other's streaming
    producer (as in L{twisted.protocols.portforward}); every byte passes
    through the protocols' C{dataReceived}.  Works for any transport, TLS
    to the proxy included.
  - C{splice}: L{shifter.relay.splice.SpliceRelay}, zero-copy through pipes; for
    plain TCP sockets on both sides, on a reactor with file descriptors.

C{--relay auto} (the default) uses splice wherever it can, else twisted.

Both count bytes when they are delivered (handed to the receiving socket's
kernel), not when they are read, and say how many were dropped: read from
one side, never delivered to the other.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer, IReactorFDSet
from twisted.protocols.tls import TLSMemoryBIOProtocol

from shifter.relay.splice import SPLICE_AVAILABLE, SpliceRelay
from shifter.interfaces import IProxyAttempt, IRelay

RELAYS = ("auto", "splice", "twisted")

# Bulk flows get pipes of 1 MiB (the unprivileged maximum by default) rather
# than the kernel's 64 KiB: each splice then moves up to sixteen times as
# much, and the reactor wakes that much less often per gigabyte.
_PIPE_SIZE = 1 << 20


def unsentBytes(transport: Any) -> int:
    """
    Bytes written to a Twisted transport that it has not handed to the
    kernel yet (read from its buffers).  For TLS, what its layers hold,
    partly as TLS records (a little larger than the bytes they carry).
    Anything else (a test double) sends at once.
    """
    held = 0
    if isinstance(transport, TLSMemoryBIOProtocol):
        held += sum(map(len, getattr(getattr(transport, "_aggregator", None), "_buffer", ())))
        held += sum(map(len, transport._appSendBuffer))
        transport = transport.transport
    if not isinstance(transport, FileDescriptor):
        return held
    return held + len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _Direction:
    """
    The bytes the Twisted relay hands to one transport, and how many of
    them it has sent: those are reported to the owner as delivered, as
    they go (checked at each write: the count lags by at most what the
    transport holds), and what is left when the transport is gone, as
    dropped.
    """

    __slots__ = ("transport", "up", "owner", "handed", "counted", "settled")

    def __init__(self, transport: Any, up: bool, owner: Any) -> None:
        self.transport = transport
        self.up = up
        self.owner = owner
        self.handed = 0
        self.counted = 0
        self.settled = False

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.settled or not transport.connected:
            self.owner.relayDropped(self.up, len(data))
            return
        self.handed += len(data)
        transport.write(data)
        self._count(self.handed - unsentBytes(transport))

    def _count(self, delivered: int) -> None:
        n = delivered - self.counted
        if n > 0:
            self.counted = delivered
            self.owner.relayed(self.up, n)

    def settle(self) -> None:
        """
        The transport is gone, or about to be dropped: what it has not sent
        by now, it never will.
        """
        if self.settled:
            return
        self.settled = True
        unsent = min(unsentBytes(self.transport), self.handed - self.counted)
        self._count(self.handed - unsent)
        if unsent:
            self.owner.relayDropped(self.up, unsent)


@implementer(IPushProducer)
class _Pacing:
    """
    What the Twisted relay registers as the producer of one transport (the
    consumer): it pauses and resumes reading from the other (the source).

    Twisted stops a transport's producer when that transport's connection
    is lost, before closing its socket; at that moment whatever the kernel
    still holds from the lost peer (it acknowledged those bytes, and a
    reset leaves them readable) is read and handed to the consumer's
    protocol, as Twisted would have had it read them.  Twisted itself only
    reads a connection it is reading: one whose reading was paused, and
    that fails while being written to, would lose them.
    """

    __slots__ = ("source", "consumer")

    def __init__(self, source: Any, consumer: Any) -> None:
        self.source = source
        self.consumer = consumer

    def pauseProducing(self) -> None:
        self.source.pauseProducing()

    def resumeProducing(self) -> None:
        self.source.resumeProducing()

    def stopProducing(self) -> None:
        consumer = self.consumer
        if not isinstance(consumer, tcp.Connection):
            return  # TLS: raw records, which only its TLS layer could read
        sock = getattr(consumer, "socket", None)
        protocol = getattr(consumer, "protocol", None)
        if sock is None or protocol is None:
            return
        while True:
            try:
                data = sock.recv(consumer.bufferSize)
            except OSError:
                return
            if not data:
                return
            protocol.dataReceived(data)


@implementer(IRelay)
class TwistedRelay:
    """
    Each transport is paced by the other, as its streaming producer, so a
    slow reader pauses the fast writer; the bytes themselves pass through
    the protocols and the tunnel, which hands them to L{up} and L{down}.
    A side that has finished sending stops being a producer, and the relay,
    when stopped, unregisters both, so that closing a transport is never
    held up by a paused producer.
    """

    name = "twisted"
    __slots__ = ("client", "attempt", "proxy", "toProxy", "toClient")

    def __init__(self, clientTransport: Any, attempt: IProxyAttempt, owner: Any) -> None:
        """
        @param owner: told of bytes delivered and dropped: C{relayed(up, n)}
            and C{relayDropped(up, n)}, as for L{SpliceRelay}.
        """
        self.client = clientTransport
        self.attempt = attempt
        self.proxy = attempt.transport
        self.toProxy = _Direction(self.proxy, True, owner)
        self.toClient = _Direction(clientTransport, False, owner)

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        self.client.registerProducer(_Pacing(self.proxy, self.client), True)
        if toProxy:
            self.toProxy.write(toProxy)
        if toClient:
            self.toClient.write(toClient)
        if clientEnded:
            self.attempt.halfClose()
        else:
            self.proxy.registerProducer(_Pacing(self.client, self.proxy), True)
            self.client.resumeProducing()

    def up(self, data: bytes) -> None:
        self.toProxy.write(data)

    def down(self, data: bytes) -> None:
        self.toClient.write(data)

    def clientGone(self) -> None:
        self.toClient.settle()

    def proxyGone(self) -> None:
        self.toProxy.settle()

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
    splice relay itself; once it has stopped, a transport whose socket it
    shut down for sending knows it, as if it had done so itself (Twisted
    would otherwise send to it once more, and fail), and a protocol whose
    peer's end it read knows that too (its C{ended}).  A connection ended
    both ways is then closed at once (Twisted's C{loseConnection} of a
    transport that has shut down sending), rather than read again to find
    the end the relay has already seen, and written once more to find it
    has nothing to send: four calls to epoll_ctl and two reactor turns
    fewer per socket.
    """

    name = "splice"
    __slots__ = ("transports", "relay", "reactor")

    def __init__(self, reactor: Any, clientTransport: Any, proxyTransport: Any, owner: Any) -> None:
        self.reactor = reactor
        self.transports = (clientTransport, proxyTransport)
        self.relay = SpliceRelay(
            reactor, clientTransport.getHandle(), proxyTransport.getHandle(), owner, pipeSize=_PIPE_SIZE
        )

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        """
        Start the splice relay.  On Shifter's reactor (its
        C{replaceReader}), a relay socket that is to read takes over its
        transport's registration for reading: two fewer calls to
        epoll_ctl per socket.  Elsewhere the transports stop reading, and
        the relay's sockets register anew.
        """
        relay = self.relay
        replaceReader = getattr(self.reactor, "replaceReader", None)
        client, proxy = self.transports
        for transport, relaySocket, reads in ((client, relay.client, not clientEnded), (proxy, relay.proxy, True)):
            transport.stopWriting()
            if reads and replaceReader is not None and replaceReader(transport, relaySocket):
                relaySocket.reading = True
            else:
                transport.stopReading()
        relay.start(toProxy, toClient, clientEnded)

    def clientFinished(self) -> None:
        pass  # the transports do not read while the splice relay runs

    def proxyFinished(self) -> None:
        pass

    def up(self, data: bytes) -> None:
        raise AssertionError("the transports do not read while the splice relay runs")

    def down(self, data: bytes) -> None:
        raise AssertionError("the transports do not read while the splice relay runs")

    def clientGone(self) -> None:
        pass  # the splice relay counts what it drops itself

    def proxyGone(self) -> None:
        pass

    def stop(self) -> None:
        relay = self.relay
        relay.stop()
        client, proxy = self.transports
        # A flow whose end was sent had read its source's end first.
        if relay.down.endSent:
            client._writeDisconnected = True
            _peerEnded(proxy)
        if relay.up.endSent:
            proxy._writeDisconnected = True
            _peerEnded(client)


def _peerEnded(transport: Any) -> None:
    """
    Tell C{transport}'s protocol that its peer has finished sending (the
    splice relay read that end in its place), if it keeps track.
    """
    protocol = getattr(transport, "protocol", None)
    if protocol is not None and hasattr(protocol, "ended"):
        protocol.ended = True


def _spliceable(transport: object) -> bool:
    """
    Whether C{transport} is a plain, open TCP connection (Twisted's
    C{tcp.Connection} is always a stream socket) whose socket a splice
    relay can take over.

    Nothing is written to the client before the tunnel opens; to the
    proxy, the CONNECT request has been answered, but the client's bytes
    sent behind it (C{--early-data send}) may still wait in Twisted's
    buffer: then the Twisted relay, which sends them first, carries the
    tunnel.
    """
    unsent = getattr(transport, "unsent", None)
    return bool(
        isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
        and not (unsent is not None and unsent())
    )


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
    @param owner: told of the relay's progress: its C{relayed},
        C{relayDropped} and (splice) C{relayEnded} (see L{SpliceRelay}).
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
    return TwistedRelay(clientTransport, attempt, owner)
