"""
Shifter's TCP transports (L{shifter.transports}): Twisted's, with a
quicker close for a connection that has ended both ways, on real sockets
and the real reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from shifter.transports import CONNECTION_DONE, TunnelPort, TunnelServer


@implementer(IHalfCloseableProtocol)
class Server(Protocol):
    """
    Does what its factory's C{script} says when the connection is made
    and when the client's end comes; records how the connection was lost.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.factory.script.get("made", lambda p: None)(self)  # type: ignore[attr-defined]

    def readConnectionLost(self) -> None:
        self.factory.script.get("ended", lambda p: None)(self)  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        self.factory.script.get("sent end", lambda p: None)(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.factory.lost.callback([reason])  # type: ignore[attr-defined]  (a list: not an errback)


def received(sock: socket.socket) -> tuple[bytes, str]:
    """
    What C{sock} receives until its end: the bytes, and C{"eof"} or
    C{"reset"}.
    """
    sock.settimeout(10)
    data = b""
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return data, "eof"
            data += chunk
    except ConnectionResetError:
        return data, "reset"


class TunnelServerTests(TestCase):
    """
    L{TunnelServer}s, accepted by a L{TunnelPort}.
    """

    def listen(self, **script: Any) -> socket.socket:
        factory = Factory.forProtocol(Server)
        factory.script = script  # type: ignore[attr-defined]
        factory.connections = []  # type: ignore[attr-defined]
        factory.lost = self.lost = Deferred()  # type: ignore[attr-defined]
        self.factory = factory
        port = TunnelPort(0, factory, interface="127.0.0.1", reactor=reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_endedBothWays(self):  # type: ignore[no-untyped-def]
        """
        A connection that has read its peer's end and sent its own closes
        with the shared L{CONNECTION_DONE} (not a failure of its own) and
        is no longer watched by the reactor; the client gets every byte
        and an orderly end.
        """
        client = self.listen(
            ended=lambda p: (p.transport.write(b"bye"), p.transport.loseWriteConnection()),
            **{"sent end": lambda p: p.transport.loseConnection()},
        )
        client.sendall(b"hi")
        client.shutdown(socket.SHUT_WR)
        (reason,) = yield self.lost
        (server,) = self.factory.connections  # type: ignore[attr-defined]
        self.assertIsInstance(server.transport, TunnelServer)
        self.assertIs(reason, CONNECTION_DONE)
        self.assertNotIn(server.transport, reactor.getReaders() + reactor.getWriters())
        self.assertEqual(received(client), (b"bye", "eof"))

    @inlineCallbacks
    def test_unsentBytesFirst(self):  # type: ignore[no-untyped-def]
        """
        A connection closed with bytes not yet sent sends them all first,
        then its end (Twisted's close, kept).
        """
        body = b"x" * (8 << 20)
        client = self.listen(made=lambda p: (p.transport.write(body), p.transport.loseConnection()))
        data, how = yield deferToReceive(client)
        (reason,) = yield self.lost
        self.assertEqual((len(data), how), (len(body), "eof"))
        self.assertTrue(reason.check(ConnectionDone))

    @inlineCallbacks
    def test_abortResets(self):  # type: ignore[no-untyped-def]
        """
        An aborted connection is reset, its unsent bytes dropped.
        """
        client = self.listen(made=lambda p: (p.transport.write(b"x" * (8 << 20)), p.transport.abortConnection()))
        (reason,) = yield self.lost
        self.assertTrue(reason.check(ConnectionAborted))
        data, how = received(client)
        self.assertEqual(how, "reset")
        self.assertLess(len(data), 8 << 20)


def deferToReceive(sock: socket.socket) -> Deferred[tuple[bytes, str]]:
    """
    L{received} for C{sock}, read a chunk at a time as the reactor turns
    (the server's bytes are sent while its reactor runs).
    """
    sock.setblocking(False)
    done: Deferred[tuple[bytes, str]] = Deferred()
    chunks: list[bytes] = []

    def poll() -> None:
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                reactor.callLater(0.001, poll)
                return
            except ConnectionResetError:
                done.callback((b"".join(chunks), "reset"))
                return
            if not chunk:
                done.callback((b"".join(chunks), "eof"))
                return
            chunks.append(chunk)

    poll()
    return done
