"""
Tests for L{shifter.upstream.connector}: plain TCP connections to a proxy, on
loopback with the real reactor.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError, UserError
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from shifter.upstream.connector import SO_MARK, DirectTCP, connectNow
from tests.test_reactor import CountingPoller


class Recorder(ClientFactory):
    """
    Fires C{done} with C{("connected", protocol)} or C{("failed",
    failure)}.
    """

    def __init__(self) -> None:
        self.done: Deferred[Any] = Deferred()

    def buildProtocol(self, addr: object) -> Protocol:
        protocol = Protocol()
        protocol.factory = self

        def made() -> None:
            self.done.callback(("connected", protocol))

        protocol.connectionMade = made  # type: ignore[method-assign]
        return protocol

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.done.callback(("failed", reason))


class ConnectorTests(TestCase):
    def listening(self) -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_connects(self):  # type: ignore[no-untyped-def]
        """
        A listening proxy is connected to; the protocol gets a TCP
        transport whose peer is the proxy.
        """
        port = self.listening()
        recorder = Recorder()
        connectNow(DirectTCP(reactor, "127.0.0.1", port), recorder)
        outcome, protocol = yield recorder.done
        self.assertEqual(outcome, "connected")
        self.assertEqual((protocol.transport.getPeer().host, protocol.transport.getPeer().port), ("127.0.0.1", port))
        protocol.transport.loseConnection()

    @inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        """
        A port nothing listens on fails with ConnectionRefusedError.
        """
        port = self.listening()
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closedPort = free.getsockname()[1]
        free.close()
        recorder = Recorder()
        connectNow(DirectTCP(reactor, "127.0.0.1", closedPort), recorder)
        outcome, result = yield recorder.done
        self.assertEqual(outcome, "failed")
        self.assertTrue(result.check(ConnectionRefusedError), result)
        self.assertNotEqual(port, closedPort)

    @inlineCallbacks
    def test_stop(self):  # type: ignore[no-untyped-def]
        """
        Giving up on a pending connection reports UserError, closes the
        socket, and nothing is connected later.
        """
        yield deferLater(reactor, 0, lambda: None)  # the reactor's own descriptors first
        before = len(os.listdir("/proc/self/fd"))
        recorder = Recorder()
        # An address nothing answers, so that the connection stays pending.
        pending = connectNow(DirectTCP(reactor, "192.0.2.1", 9), recorder)
        pending.stop()
        outcome, result = yield recorder.done
        self.assertEqual(outcome, "failed")
        self.assertTrue(result.check(UserError), result)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    @inlineCallbacks
    def test_mark(self):  # type: ignore[no-untyped-def]
        """
        The connection carries the mark asked for (SO_MARK, which needs
        CAP_NET_ADMIN) from before its SYN.
        """
        from tests.support import requireHost

        requireHost(root=True)
        port = self.listening()
        recorder = Recorder()
        connectNow(DirectTCP(reactor, "127.0.0.1", port, mark=0x2A), recorder)
        outcome, protocol = yield recorder.done
        self.assertEqual(outcome, "connected")
        sock = protocol.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, SO_MARK), 0x2A)
        protocol.transport.loseConnection()

    @inlineCallbacks
    def test_sameDescriptor(self):  # type: ignore[no-untyped-def]
        """
        The transport holds the socket that connected, not a copy: a tunnel
        never needs a third descriptor, even for a moment.
        """
        port = self.listening()
        recorder = Recorder()
        pending = connectNow(DirectTCP(reactor, "127.0.0.1", port), recorder)
        fd = pending.fileno()
        outcome, protocol = yield recorder.done
        self.assertEqual(outcome, "connected")
        self.assertEqual(protocol.transport.fileno(), fd)
        self.assertEqual(protocol.transport.getHost().host, "127.0.0.1")
        protocol.transport.loseConnection()

    @inlineCallbacks
    def test_readingStoppedInConnectionMade(self):  # type: ignore[no-untyped-def]
        """
        A protocol may stop its transport's reading from C{connectionMade}
        (a DIRECT connection is open at once, and the splice relay then
        takes its socket): it stays stopped, as with Twisted's own clients.
        """
        port = self.listening()
        recorder = Recorder()
        original = recorder.buildProtocol

        def build(addr: object) -> Protocol:
            protocol = original(addr)
            made = protocol.connectionMade

            def stopThenReport() -> None:
                protocol.transport.stopReading()  # type: ignore[attr-defined]
                made()

            protocol.connectionMade = stopThenReport  # type: ignore[method-assign]
            return protocol

        recorder.buildProtocol = build  # type: ignore[method-assign]
        connectNow(DirectTCP(reactor, "127.0.0.1", port), recorder)
        outcome, protocol = yield recorder.done
        yield deferLater(reactor, 0, lambda: None)  # the connection's set-up is over
        self.assertEqual(outcome, "connected")
        self.assertNotIn(protocol.transport, reactor.getReaders())
        protocol.transport.loseConnection()

    @inlineCallbacks
    def test_transportTakesTheRegistration(self):  # type: ignore[no-untyped-def]
        """
        On Shifter's reactor the connected socket goes from being watched
        for writing (connecting) to being read by its transport with one
        epoll_ctl, a modification, where removing and adding take two.
        """
        if not hasattr(reactor, "writerBecomesReader"):
            raise SkipTest("needs Shifter's reactor (trial --reactor=shifter, as make test runs it)")
        port = self.listening()
        poller = CountingPoller(reactor._poller)  # type: ignore[attr-defined]
        self.patch(reactor, "_poller", poller)
        recorder = Recorder()
        pending = connectNow(DirectTCP(reactor, "127.0.0.1", port), recorder)
        fd = pending.fileno()
        outcome, protocol = yield recorder.done
        self.assertEqual(outcome, "connected")
        self.assertEqual([name for name, changed in poller.changed if changed == fd], ["register", "modify"])
        self.assertIn(protocol.transport, reactor.getReaders())
        self.assertNotIn(pending, reactor.getWriters())
        protocol.transport.loseConnection()
