"""
Warm proxy connections (L{shifter.upstream.warm}), with real sockets and
the real reactor: Shifter's factory in this process on loopback, a CONNECT
proxy that records when it accepted each connection and what came on it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from shifter.upstream.warm import READY
from tests.gateway import makeCertificate
from tests.test_lifecycle import OK, LifecycleTestCase


class RecordingProxy(Protocol):
    """
    Answers each CONNECT with 200, then echoes; records when it accepted
    the connection (C{time.monotonic}) and how many CONNECTs came on it.
    """

    def connectionMade(self) -> None:
        self.acceptedAt = time.monotonic()
        self.requests = 0
        self.buffer = b""
        self.open = True
        self.factory.accepted.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.requests and not self.buffer.startswith(b"CONNECT "):
                # Tunnel bytes: echoed, and looked at for a second CONNECT.
                data, self.buffer = self.buffer, b""
                self.transport.write(data)
                return
            if b"\r\n\r\n" not in self.buffer:
                return
            request, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.requests += 1
            self.factory.requests.append(self)
            if self.factory.refuse:
                self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                self.transport.loseConnection()
                return
            self.transport.write(OK)

    def connectionLost(self, reason: Any) -> None:
        self.open = False


class RecordingProxyFactory(Factory):
    protocol = RecordingProxy

    def __init__(self) -> None:
        self.accepted: list[RecordingProxy] = []
        self.requests: list[RecordingProxy] = []
        self.refuse = False

    def idle(self) -> list[RecordingProxy]:
        return [p for p in self.accepted if p.open and not p.requests]


class WarmTestCase(LifecycleTestCase):
    @inlineCallbacks
    def startRecordingProxy(self, tls: bool = False):  # type: ignore[no-untyped-def]
        factory = RecordingProxyFactory()
        if tls:
            key, cert = makeCertificate(self.directory, names=("IP:127.0.0.1",))
            self.proxyCA = str(cert)
            description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        else:
            description = "tcp:0:interface=127.0.0.1"
        port = yield serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        return factory, f"{'https' if tls else 'http'}://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def tunnel(self, payload: bytes = b"ping"):  # type: ignore[no-untyped-def]
        """
        A client through Shifter: its CONNECT answered, its bytes echoed.
        """
        sock = self.client()
        sock.sendall(payload)
        echoed = yield self.receive(sock, len(payload))
        self.assertEqual(echoed, payload)
        return sock

    def ready(self) -> int:
        return self.factory.warm.readyCount()

    @inlineCallbacks
    def connectOnWarm(self, tls: bool):  # type: ignore[no-untyped-def]
        proxy, url = yield self.startRecordingProxy(tls)
        yield self.startShifter([url], warmConnections=4)
        first = yield self.tunnel()
        first.close()
        yield self.waitUntil(lambda: self.ready() >= 1, 10, "a warm connection ready")
        clientAt = time.monotonic()
        yield self.tunnel()
        carrier = proxy.requests[-1]
        self.assertLess(carrier.acceptedAt, clientAt, "the CONNECT came on a connection made for it")
        self.assertEqual(self.factory.warm.taken, 1)

    def test_connectOnWarmConnection(self):  # type: ignore[no-untyped-def]
        """
        Once a tunnel has asked for a proxy, the next one's CONNECT goes
        out on a connection the proxy accepted before the client came.
        """
        return self.connectOnWarm(tls=False)

    def test_connectOnWarmTLSConnection(self):  # type: ignore[no-untyped-def]
        """
        The same with an https:// proxy: the warm connection's TLS
        handshake was done before the client came.
        """
        return self.connectOnWarm(tls=True)

    @inlineCallbacks
    def test_oldestTakenFirst(self):  # type: ignore[no-untyped-def]
        """
        Of the ready warm connections, a tunnel takes one of those started
        first: the nearest to its proxy's idle limit.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=4)
        first = yield self.tunnel()
        first.close()
        yield self.waitUntil(lambda: self.ready() >= 2, 10, "two warm connections ready")
        (held,) = self.factory.warm.connections.values()
        readyBefore = [c for c in held if c.state == READY]
        yield self.tunnel()
        taken = [c for c in readyBefore if c not in held]
        self.assertEqual(len(taken), 1)
        self.assertEqual(taken[0].startedAt, min(c.startedAt for c in readyBefore))

    @inlineCallbacks
    def test_noneWhileIdle(self):  # type: ignore[no-untyped-def]
        """
        No warm connection is opened before any tunnel, and those opened
        expire without replacement once tunnels stop coming.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=4, warmLifetime=1.0)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(proxy.accepted, [])
        sock = yield self.tunnel()
        sock.close()
        yield self.waitUntil(lambda: self.ready() >= 1, 10, "a warm connection ready")
        # Past two lifetimes without a tunnel: none left, none opened.
        yield self.waitUntil(lambda: self.factory.warm.openCount() == 0, 10, "warm connections gone")
        accepted = len(proxy.accepted)
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(len(proxy.accepted), accepted)
        self.assertEqual(self.factory.warm.openCount(), 0)
        self.assertGreaterEqual(self.factory.warm.expiredUnused, 1)
        yield self.waitUntil(lambda: not proxy.idle(), 10, "the proxy's idle connections closed")

    @inlineCallbacks
    def test_closedByProxyNeverUsed(self):  # type: ignore[no-untyped-def]
        """
        A warm connection the proxy has closed is dropped, and the next
        tunnel goes on another connection, even when the close has not
        been read yet when the tunnel takes it.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=1)
        first = yield self.tunnel()
        first.close()
        yield self.waitUntil(lambda: self.ready() == 1 and len(proxy.idle()) == 1, 10, "a warm connection")
        closed = proxy.idle()[0]
        # The FIN goes now, and reaches Shifter's socket before the reactor
        # turns again.
        closed.transport.getHandle().shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        warm = self.factory.warm
        self.assertIsNone(warm.take(self.pool.proxies[0]))
        self.assertEqual(warm.proxyClosed, 1)
        yield self.waitUntil(lambda: self.ready() == 1, 10, "another warm connection")
        yield self.tunnel()
        self.assertIsNot(proxy.requests[-1], closed)
        self.assertEqual(closed.requests, 0)

    @inlineCallbacks
    def test_closedByProxySeenByReactor(self):  # type: ignore[no-untyped-def]
        """
        A warm connection whose close the reactor has read is gone from
        the ready ones; the tunnel after it takes another.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=1)
        first = yield self.tunnel()
        first.close()
        yield self.waitUntil(lambda: self.ready() == 1 and len(proxy.idle()) == 1, 10, "a warm connection")
        closed = proxy.idle()[0]
        closed.transport.loseConnection()
        yield self.waitUntil(lambda: self.factory.warm.proxyClosed == 1, 10, "the close seen")
        yield self.tunnel()
        self.assertIsNot(proxy.requests[-1], closed)
        self.assertEqual(closed.requests, 0)

    @inlineCallbacks
    def test_neverUsedTwice(self):  # type: ignore[no-untyped-def]
        """
        Each warm connection carries one CONNECT at most: tunnels one
        after another each take a connection of their own.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=2)
        for _ in range(4):
            yield self.waitUntil(lambda: self.ready() >= 1 or not proxy.requests, 10, "a warm connection")
            sock = yield self.tunnel()
            sock.close()
            yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel ended")
        self.assertGreaterEqual(self.factory.warm.taken, 3)
        self.assertEqual(len(proxy.requests), 4)
        self.assertEqual([p.requests for p in proxy.accepted if p.requests], [1, 1, 1, 1])

    @inlineCallbacks
    def test_downProxyGetsNone(self):  # type: ignore[no-untyped-def]
        """
        A proxy marked down loses its warm connections and gets no new
        one while down, whatever the demand.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url], warmConnections=4)
        sock = yield self.tunnel()
        sock.close()
        yield self.waitUntil(lambda: self.ready() >= 1, 10, "a warm connection")
        upstream = self.pool.proxies[0]
        self.pool.markDown(upstream, "test")
        warm = self.factory.warm
        self.assertEqual(warm.openCount(), 0)
        yield self.waitUntil(lambda: not proxy.idle(), 10, "the proxy's idle connections closed")
        accepted = len(proxy.accepted)
        for _ in range(5):
            self.assertIsNone(warm.take(upstream))
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(proxy.accepted), accepted)
        self.assertEqual(warm.openCount(), 0)

    @inlineCallbacks
    def test_noneBeforeATunnelOpens(self):  # type: ignore[no-untyped-def]
        """
        A proxy through which no tunnel has opened (it refuses them all)
        gets no warm connection: one connection per tunnel, no more.
        """
        proxy, url = yield self.startRecordingProxy()
        proxy.refuse = True
        yield self.startShifter([url], warmConnections=4)
        for count in range(1, 4):
            sock = self.client()
            yield self.waitUntil(lambda: len(proxy.requests) == count, 10, "the proxy's refusal")
            sock.close()
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(proxy.accepted), 3)
        self.assertEqual(self.factory.warm.openCount(), 0)

    @inlineCallbacks
    def test_offByDefaultInSettings(self):  # type: ignore[no-untyped-def]
        """
        With warm connections off, none is kept.
        """
        proxy, url = yield self.startRecordingProxy()
        yield self.startShifter([url])
        sock = yield self.tunnel()
        sock.close()
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertIsNone(self.factory.warm)
        self.assertEqual(len(proxy.accepted), 1)


class WarmTableTests(TestCase):
    def test_everyStateEventDecided(self) -> None:
        """
        The warm connection's table names an action for every state and
        every event.
        """
        from shifter.upstream import warm

        states = (warm.CONNECTING, warm.HANDSHAKING, warm.READY, warm.TAKEN, warm.CLOSED)
        events = (warm.CONNECTED, warm.HANDSHAKEN, warm.FAILED, warm.DATA, warm.LOST, warm.EXPIRED, warm.TAKE,
                  warm.DROP)
        self.assertEqual(set(warm._TABLE), {(s, e) for s in states for e in events})
