"""
Tests for the tunnel, in memory: L{shifter.tunnel.downstream} and
L{shifter.upstream.upstream} with Twisted's test doubles and a fake clock.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.tunnel.downstream import DownstreamProtocol, ShifterFactory, TunnelSettings
from shifter.tunnel.policy import ITunnelPolicy, TunnelDecision, TunnelRequest
from shifter.upstream.pool import ProxyPool
from shifter.upstream.proxy import UpstreamProxy
from shifter.resolvers.resolver import DestinationUnknown, IOriginalDestinationResolver

from tests.support import knowLocalAddresses

CLIENT = IPv4Address("TCP", "192.0.2.2", 50000)
SHIFTER = IPv4Address("TCP", "192.0.2.1", 12345)
DESTINATION = IPv4Address("TCP", "203.0.113.7", 443)
PROXY = ("198.51.100.3", 3128)
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


class HalfCloseTransport(StringTransport):
    """
    A L{StringTransport} that also records a half-close.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@implementer(IOriginalDestinationResolver)
class FakeResolver:
    name = "fake"

    def __init__(self) -> None:
        self.answer: object = DESTINATION
        self.pending: Deferred | None = None

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def resolve(self, transport: object) -> Deferred:
        if self.answer == "later":
            self.pending = Deferred()
            return self.pending
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return succeed(self.answer)


@implementer(IStreamClientEndpoint)
class FakeProxyEndpoint:
    """
    Connects on demand: L{accept} builds the upstream protocol on a
    L{HalfCloseTransport}, L{refuse} fails the attempt.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[object, Deferred]] = []

    def connect(self, factory: object) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def accept(self):  # type: ignore[no-untyped-def]
        factory, d = self.attempts.pop(0)
        protocol = factory.buildProtocol(None)  # type: ignore[attr-defined]
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def refuse(self) -> None:
        _, d = self.attempts.pop(0)
        d.errback(ConnectionRefusedError("Connection refused"))


class TunnelTestCase(SynchronousTestCase):
    """
    One client connection through a L{ShifterFactory}, with every
    collaborator under the test's control.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.resolver = FakeResolver()
        self.endpoint = FakeProxyEndpoint()
        self.settings = TunnelSettings(
            connectTimeout=5, handshakeTimeout=7, idleTimeout=30, earlyDataLimit=100, maxConnections=3
        )
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def makeFactory(self) -> ShifterFactory:
        proxy = UpstreamProxy("proxy.test:3128", self.endpoint, PROXY)
        self.pool = ProxyPool([proxy], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        return self.factory

    def connectClient(self, peer=CLIENT, host=SHIFTER):  # type: ignore[no-untyped-def]
        if not hasattr(self, "factory"):
            self.makeFactory()
        protocol = self.factory.buildProtocol(peer)
        transport = HalfCloseTransport(hostAddress=host, peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def openTunnel(self, answer: bytes = OK):  # type: ignore[no-untyped-def]
        client, clientTransport = self.connectClient()
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(answer)
        return client, clientTransport, upstream, upstreamTransport

    def lose(self, protocol, transport, reason=ConnectionDone) -> None:  # type: ignore[no-untyped-def]
        """
        Deliver connectionLost for a transport the code asked to close.
        """
        protocol.connectionLost(Failure(reason()))

    def messages(self, level: str | None = None) -> list[str]:
        from twisted.logger import formatEvent

        return [
            formatEvent(e) for e in self.events if level is None or e["log_level"].name == level
        ]

    def failureLines(self) -> list[str]:
        return [m for m in self.messages("warn") if "failed" in m]


class HandshakeTests(TunnelTestCase):
    def test_connectRequestForOriginalDestination(self) -> None:
        """
        Once the destination is resolved and the proxy connected, the proxy
        is asked for CONNECT to the original destination.
        """
        self.connectClient()
        _, upstreamTransport = self.endpoint.accept()
        self.assertEqual(
            upstreamTransport.value(),
            b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n",
        )

    def test_ipv6Destination(self) -> None:
        """
        An IPv6 destination is asked for in brackets.
        """
        self.resolver.answer = IPv6Address("TCP", "2001:db8:2::7", 443)
        self.connectClient()
        _, upstreamTransport = self.endpoint.accept()
        self.assertTrue(upstreamTransport.value().startswith(b"CONNECT [2001:db8:2::7]:443 HTTP/1.1\r\n"))

    def test_2xxOpensTunnel(self) -> None:
        """
        A 2xx answer opens the tunnel: bytes then flow both ways.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        upstreamTransport.clear()
        client.dataReceived(b"client hello")
        upstream.dataReceived(b"server hello")
        self.assertEqual(upstreamTransport.value(), b"client hello")
        self.assertEqual(clientTransport.value(), b"server hello")
        self.assertEqual(self.factory.counters["opened"], 1)

    def test_producersRegistered(self) -> None:
        """
        Each transport has a streaming producer that pauses and resumes
        the other, so a slow side pauses the fast one.
        """
        _, clientTransport, _, upstreamTransport = self.openTunnel()
        self.assertTrue(clientTransport.streaming)
        self.assertTrue(upstreamTransport.streaming)
        clientTransport.producer.pauseProducing()
        self.assertEqual((upstreamTransport.producerState, clientTransport.producerState), ("paused", "producing"))
        clientTransport.producer.resumeProducing()
        upstreamTransport.producer.pauseProducing()
        self.assertEqual((upstreamTransport.producerState, clientTransport.producerState), ("producing", "paused"))

    def test_leftoverGoesToClient(self) -> None:
        """
        Tunnel bytes that came in the same read as the answer go to the
        client, and not the answer itself.
        """
        _, clientTransport, _, _ = self.openTunnel(OK + b"\x16\x03\x03early")
        self.assertEqual(clientTransport.value(), b"\x16\x03\x03early")

    def test_earlyClientBytesDeliveredFirst(self) -> None:
        """
        What the client sent before the tunnel opened reaches the proxy
        after the CONNECT request and before anything sent later.
        """
        client, _ = self.connectClient()
        client.dataReceived(b"early-1 ")
        client.dataReceived(b"early-2 ")
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK)
        client.dataReceived(b"later")
        request = b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n"
        self.assertEqual(upstreamTransport.value(), request + b"early-1 early-2 later")

    def test_earlyBytesBounded(self) -> None:
        """
        Once a client has sent C{earlyDataLimit} bytes before its tunnel
        opened, reading from it pauses; it resumes when the tunnel opens.
        """
        client, clientTransport = self.connectClient()
        client.dataReceived(b"x" * 60)
        self.assertEqual(clientTransport.producerState, "producing")
        client.dataReceived(b"x" * 60)
        self.assertEqual(clientTransport.producerState, "paused")
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK)
        self.assertEqual(clientTransport.producerState, "producing")
        self.assertTrue(upstreamTransport.value().endswith(b"x" * 120))

    def test_answerSplitAcrossReads(self) -> None:
        """
        An answer split over several reads opens the tunnel once complete.
        """
        client, clientTransport = self.connectClient()
        upstream, _ = self.endpoint.accept()
        for byte in OK[:-1]:
            upstream.dataReceived(bytes([byte]))
        self.assertEqual(self.factory.counters["opened"], 0)
        upstream.dataReceived(OK[-1:] + b"data")
        self.assertEqual(self.factory.counters["opened"], 1)
        self.assertEqual(clientTransport.value(), b"data")


REQUEST = b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n"


class EarlyDataTests(TunnelTestCase):
    """
    C{--early-data send}: the client's bytes go to an HTTP proxy behind the
    CONNECT request, before its answer, and are neither sent twice nor
    counted twice.
    """

    def setUp(self) -> None:
        super().setUp()
        self.settings = TunnelSettings(
            connectTimeout=5, handshakeTimeout=7, idleTimeout=30, earlyDataLimit=100, maxConnections=3,
            sendEarly=True,
        )

    def test_sentBehindTheRequest(self) -> None:
        """
        Bytes read while connecting go in the request's write; bytes read
        while the proxy has yet to answer follow at once; after the 2xx,
        the relay sends only what comes next, and each byte is counted
        once.
        """
        client, clientTransport = self.connectClient()
        client.dataReceived(b"hello ")
        upstream, upstreamTransport = self.endpoint.accept()
        self.assertEqual(upstreamTransport.value(), REQUEST + b"hello ")
        client.dataReceived(b"again ")
        self.assertEqual(upstreamTransport.value(), REQUEST + b"hello again ")
        upstream.dataReceived(OK + b"answer")
        client.dataReceived(b"later")
        self.assertEqual(upstreamTransport.value(), REQUEST + b"hello again later")
        self.assertEqual(clientTransport.value(), b"answer")
        tunnel = next(iter(self.factory.active))
        self.assertEqual(tunnel.bytesUp, len(b"hello again later"))

    def test_waitKeepsThemUntilTheAnswer(self) -> None:
        """
        With C{--early-data wait}, nothing but the request reaches the
        proxy before its answer.
        """
        self.settings = TunnelSettings(earlyDataLimit=100, sendEarly=False)
        client, _ = self.connectClient()
        client.dataReceived(b"hello ")
        upstream, upstreamTransport = self.endpoint.accept()
        client.dataReceived(b"again")
        self.assertEqual(upstreamTransport.value(), REQUEST)
        upstream.dataReceived(OK)
        self.assertEqual(upstreamTransport.value(), REQUEST + b"hello again")

    def test_notWithNTLM(self) -> None:
        """
        To a proxy that asked for NTLM (whose login goes on on the
        connection after a 407), nothing goes before the answer.
        """
        from shifter.upstream.auth import Credentials, ProxyAuth

        auth = ProxyAuth(Credentials("CORP\\alice", "secret"))
        auth.ntlm = True
        proxy = UpstreamProxy("proxy.test:3128", self.endpoint, PROXY, auth=auth)
        self.pool = ProxyPool([proxy], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        client, _ = self.connectClient()
        client.dataReceived(b"hello")
        _, upstreamTransport = self.endpoint.accept()
        self.assertNotIn(b"hello", upstreamTransport.value())


class EarlyDataFailoverTests(TunnelTestCase):
    """
    Early bytes sent to a proxy that then fails are sent again, whole, to
    the next one.
    """

    def setUp(self) -> None:
        super().setUp()
        self.settings = TunnelSettings(earlyDataLimit=100, sendEarly=True)
        self.endpointB = FakeProxyEndpoint()
        proxyA = UpstreamProxy("a.test:3128", self.endpoint, PROXY)
        proxyB = UpstreamProxy("b.test:3128", self.endpointB, ("198.51.100.4", 3128))
        self.pool = ProxyPool([proxyA, proxyB], self.clock, failureThreshold=2)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)

    def test_sentAgainToTheNextProxy(self) -> None:
        client, clientTransport = self.connectClient()
        upstreamA, transportA = self.endpoint.accept()
        client.dataReceived(b"hello")
        self.assertEqual(transportA.value(), REQUEST + b"hello")
        upstreamA.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        upstreamB, transportB = self.endpointB.accept()
        self.assertEqual(transportB.value(), REQUEST + b"hello")
        client.dataReceived(b" again")
        upstreamB.dataReceived(OK)
        self.assertEqual(transportB.value(), REQUEST + b"hello again")
        tunnel = next(iter(self.factory.active))
        self.assertEqual(tunnel.bytesUp, len(b"hello again"))


class FailureTests(TunnelTestCase):
    def assertBothClosed(self, clientTransport, upstreamTransport=None) -> None:  # type: ignore[no-untyped-def]
        self.assertTrue(clientTransport.disconnecting, "client connection left open")
        if upstreamTransport is not None:
            self.assertTrue(upstreamTransport.disconnecting, "proxy connection left open")

    def assertOneFailureLine(self, *fragments: str) -> None:
        lines = self.failureLines()
        self.assertEqual(len(lines), 1, lines)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def test_non2xxClosesBoth(self) -> None:
        """
        A 403 ends the client connection and the proxy connection, with one
        log line naming the client, destination, proxy, status and reason.
        """
        client, clientTransport, _, upstreamTransport = self.openTunnel(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertBothClosed(clientTransport, upstreamTransport)
        self.assertEqual(clientTransport.value(), b"")
        self.assertOneFailureLine(
            "192.0.2.2:50000", "203.0.113.7:443", "proxy.test:3128", "403 Forbidden"
        )
        self.assertEqual(self.factory.counters["proxy-status"], 1)

    def test_407(self) -> None:
        """
        A 407 (authentication required) without configured credentials is a
        failure with one line saying so.
        """
        _, clientTransport, _, upstreamTransport = self.openTunnel(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
        )
        self.assertBothClosed(clientTransport, upstreamTransport)
        self.assertOneFailureLine("proxy answered 407: it needs credentials and none are configured")
        self.assertEqual(self.factory.counters["proxy-auth"], 1)

    def test_garbageClosesBoth(self) -> None:
        """
        An answer that is not HTTP ends both connections at once.
        """
        _, clientTransport, _, upstreamTransport = self.openTunnel(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertBothClosed(clientTransport, upstreamTransport)
        self.assertOneFailureLine("bad answer from proxy", "not an HTTP response")
        self.assertEqual(self.factory.counters["proxy-garbage"], 1)

    def test_oversizedAnswer(self) -> None:
        """
        An answer whose header block never ends within the bound ends both
        connections.
        """
        client, clientTransport = self.connectClient()
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(20):
            upstream.dataReceived(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        self.assertBothClosed(clientTransport, upstreamTransport)
        self.assertOneFailureLine("exceeds")

    def test_handshakeTimeout(self) -> None:
        """
        A proxy that accepts but does not answer within the handshake
        timeout has both connections closed.
        """
        _, clientTransport = self.connectClient()
        _, upstreamTransport = self.endpoint.accept()
        self.clock.advance(6.9)
        self.assertFalse(clientTransport.disconnecting)
        self.clock.advance(0.2)
        self.assertBothClosed(clientTransport, upstreamTransport)
        self.assertOneFailureLine("did not answer CONNECT within 7 s")
        self.assertEqual(self.factory.counters["timeout"], 1)

    def test_connectTimeout(self) -> None:
        """
        A proxy connection that does not complete within the connect timeout
        is abandoned and the client closed.
        """
        _, clientTransport = self.connectClient()
        self.clock.advance(5.1)
        self.assertTrue(clientTransport.disconnecting)
        self.assertOneFailureLine("no connection to proxy within 5 s")

    def test_proxyRefused(self) -> None:
        """
        A refused proxy connection closes the client with one log line.
        """
        _, clientTransport = self.connectClient()
        self.endpoint.refuse()
        self.assertTrue(clientTransport.disconnecting)
        self.assertOneFailureLine("cannot connect to proxy", "refused")
        self.assertEqual(self.factory.counters["proxy-connect"], 1)

    def test_proxyRefusedAtOnce(self) -> None:
        """
        A proxy connection that fails at once, before the attempt is even
        returned (a synchronous error), fails the tunnel at once rather
        than after the connect timeout.
        """
        self.endpoint.connect = lambda factory: fail(ConnectionRefusedError("at once"))  # type: ignore[method-assign]
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertOneFailureLine("cannot connect to proxy", "at once")
        self.assertEqual(self.factory.counters["proxy-connect"], 1)

    def test_proxyClosesBeforeAnswer(self) -> None:
        """
        A proxy that closes before answering (EOF or loss) ends the client
        connection.
        """
        for event in ("readConnectionLost", "connectionLost"):
            self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            _, clientTransport = self.connectClient()
            upstream, _ = self.endpoint.accept()
            upstream.dataReceived(b"HTTP/1.1 200")
            if event == "readConnectionLost":
                upstream.readConnectionLost()
            else:
                upstream.connectionLost(Failure(ConnectionLost("reset")))
            self.assertTrue(clientTransport.disconnecting)
            self.assertOneFailureLine("before answering")
            # A new window of the rate-limited log, for the next line.
            self.clock.advance(self.factory.refusals.interval)

    def test_resolverMiss(self) -> None:
        """
        A connection whose original destination is unknown is refused
        without any connection to the proxy.
        """
        self.resolver.answer = DestinationUnknown("SO_ORIGINAL_DST: No such file or directory")
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertOneFailureLine("original destination unknown", "No such file")
        self.assertEqual(self.factory.counters["resolver"], 1)

    def test_resolverBugRefusesConnection(self) -> None:
        """
        A resolver that raises instead of failing its Deferred still has the
        connection refused rather than left hanging.
        """
        self.resolver.resolve = lambda transport: 1 / 0  # type: ignore[method-assign]
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_directConnectionRefused(self) -> None:
        """
        A connection whose original destination is Shifter's own listening
        address was not redirected: it is refused, never relayed.
        """
        self.resolver.answer = SHIFTER
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertOneFailureLine("connected to Shifter directly")
        self.assertEqual(self.factory.counters["loop"], 1)

    def test_directConnectionOnDualStackRefused(self) -> None:
        """
        On a dual-stack listener, Shifter's own address is reported IPv4-mapped;
        a direct connection is still recognised and refused.
        """
        self.resolver.answer = SHIFTER
        _, clientTransport = self.connectClient(
            peer=IPv6Address("TCP", "::ffff:192.0.2.2", 50000),
            host=IPv6Address("TCP", "::ffff:192.0.2.1", 12345),
        )
        self.assertTrue(clientTransport.disconnecting)
        self.assertOneFailureLine("192.0.2.2:50000", "connected to Shifter directly")

    def test_destinationIsProxyRefused(self) -> None:
        """
        A connection redirected to the proxy itself would loop: refused.
        """
        self.resolver.answer = IPv4Address("TCP", *PROXY)
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertOneFailureLine("destination is an upstream proxy itself")

    def test_clientGoneWhileConnecting(self) -> None:
        """
        A client that leaves while the proxy connection is being made has
        the attempt cancelled, and one log line.
        """
        client, clientTransport = self.connectClient()
        attempt = self.endpoint.attempts[0][1]
        self.lose(client, clientTransport, ConnectionLost)
        self.assertTrue(attempt.called)
        self.assertOneFailureLine("client left before the tunnel opened")
        self.assertNotIn(client, self.factory.active)

    def test_clientGoneDuringHandshake(self) -> None:
        """
        A client that resets while the proxy is answering has the proxy
        connection closed too.
        """
        client, clientTransport = self.connectClient()
        upstream, upstreamTransport = self.endpoint.accept()
        self.lose(client, clientTransport, ConnectionLost)
        self.assertTrue(upstreamTransport.disconnecting)
        self.lose(upstream, upstreamTransport)
        self.assertOneFailureLine("client left before the tunnel opened")
        self.assertNotIn(client, self.factory.active)
        timers = [call for call in self.clock.getDelayedCalls() if call.func != self.factory.refusals._windowEnded]
        self.assertFalse(timers, "handshake timer left running")

    def test_clientGoneWhileResolving(self) -> None:
        """
        A client that leaves while its destination is being resolved is
        not connected onward when the answer comes.
        """
        self.resolver.answer = "later"
        client, clientTransport = self.connectClient()
        pending = self.resolver.pending
        self.lose(client, clientTransport, ConnectionLost)
        pending.callback(DESTINATION)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertNotIn(client, self.factory.active)

    def test_connectionCap(self) -> None:
        """
        Clients past C{maxConnections} are refused (no protocol is built),
        with a log line; a place frees up when a tunnel ends.
        """
        self.makeFactory()
        clients = [self.connectClient() for _ in range(3)]
        self.assertIsNone(self.factory.buildProtocol(CLIENT))
        self.assertEqual(self.factory.counters["limit"], 1)
        self.assertTrue(any("3 tunnels already open" in m for m in self.messages("warn")))
        client, clientTransport = clients[0]
        self.lose(client, clientTransport)
        self.assertIsInstance(self.factory.buildProtocol(CLIENT), DownstreamProtocol)


class ClientLimitTests(TunnelTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.settings = TunnelSettings(maxConnections=10, maxConnectionsPerClient=2)

    def test_perClientCap(self) -> None:
        """
        One client past C{maxConnectionsPerClient} is refused with the
        C{client-limit} counter, while another client is still served; a
        place frees up for it when one of its tunnels ends.
        """
        self.makeFactory()
        mine = [self.connectClient(peer=IPv4Address("TCP", "192.0.2.2", 50000 + n)) for n in range(2)]
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 50002)))
        self.assertEqual(self.factory.counters["client-limit"], 1)
        self.assertIsInstance(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.3", 50000)), DownstreamProtocol)
        client, clientTransport = mine[0]
        self.lose(client, clientTransport)
        self.assertIsInstance(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 50003)), DownstreamProtocol)

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 clients count by their /64: a host cannot escape its limit by
        taking other addresses of its network.
        """
        self.makeFactory()
        for n in range(2):
            self.connectClient(peer=IPv6Address("TCP", f"2001:db8:1::{n + 2}", 50000))
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "2001:db8:1::99", 50000)))
        self.assertIsInstance(self.factory.buildProtocol(IPv6Address("TCP", "2001:db8:2::2", 50000)), DownstreamProtocol)

    def test_reloadChangesTheCap(self) -> None:
        """
        New settings change the cap for the next connections.
        """
        self.makeFactory()
        for n in range(2):
            self.connectClient(peer=IPv4Address("TCP", "192.0.2.2", 50000 + n))
        self.factory.reconfigure(settings=TunnelSettings(maxConnections=10, maxConnectionsPerClient=3))
        self.assertIsInstance(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 50002)), DownstreamProtocol)

    def test_refusalLinesRateLimited(self) -> None:
        """
        Refusals a client can repeat at will are logged once per reason per
        interval, then one line counts the rest; each is still counted.
        """
        self.makeFactory()
        for n in range(2):
            self.connectClient(peer=IPv4Address("TCP", "192.0.2.2", 50000 + n))
        for n in range(5):
            self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 51000 + n))
        self.assertEqual(self.factory.counters["client-limit"], 5)
        refused = [m for m in self.messages("warn") if "already open" in m]
        self.assertEqual(len(refused), 1)
        self.clock.advance(10)
        self.assertTrue(any("4 more like it not logged in the last 10 s" in m for m in self.messages("warn")))

    def test_loopRefusalsRateLimited(self) -> None:
        """
        Direct connections to Shifter, refused as a loop, are likewise
        one line per interval however many come.
        """
        self.settings = TunnelSettings()
        self.resolver.answer = SHIFTER
        for _ in range(4):
            self.connectClient()
        self.assertEqual(self.factory.counters["loop"], 4)
        self.assertEqual(len(self.failureLines()), 1)


class RelayTests(TunnelTestCase):
    def test_clientHalfClosePassedOn(self) -> None:
        """
        A client that shuts down its sending side has the proxy connection
        half-closed too, and still receives the rest of the answer.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.dataReceived(b"request")
        client.readConnectionLost()
        self.assertTrue(upstreamTransport.writeClosed)
        self.assertFalse(clientTransport.disconnecting)
        upstream.dataReceived(b"the whole response")
        self.assertEqual(clientTransport.value(), b"the whole response")

    def test_proxyHalfClosePassedOn(self) -> None:
        """
        When the proxy finishes sending, the client's connection is
        half-closed; when both have finished, both are closed.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        upstream.readConnectionLost()
        self.assertTrue(clientTransport.writeClosed)
        self.assertFalse(clientTransport.disconnecting)
        client.dataReceived(b"more")
        self.assertTrue(upstreamTransport.value().endswith(b"more"))
        client.readConnectionLost()
        self.assertTrue(clientTransport.disconnecting)
        self.assertTrue(upstreamTransport.disconnecting)

    def test_halfCloseBeforeTunnelOpens(self) -> None:
        """
        A client that sends its request and half-closes before the tunnel
        opens has its bytes delivered and the half-close passed on.
        """
        client, _ = self.connectClient()
        client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        client.readConnectionLost()
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK)
        self.assertTrue(upstreamTransport.value().endswith(b"GET / HTTP/1.0\r\n\r\n"))
        self.assertTrue(upstreamTransport.writeClosed)

    def test_clientCloseClosesProxy(self) -> None:
        """
        When the client connection is lost, the proxy connection is
        finished: its end sent at once, and closed at the proxy's own end
        (what it sends until then is read and dropped); one line logs the
        tunnel with its byte counts.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.dataReceived(b"12345")
        upstream.dataReceived(b"1234567890")
        self.clock.advance(2.5)
        self.lose(client, clientTransport, ConnectionLost)
        self.assertTrue(upstreamTransport.writeClosed)
        self.assertFalse(upstreamTransport.disconnecting)
        upstream.dataReceived(b"too late")
        upstream.readConnectionLost()
        self.assertTrue(upstreamTransport.disconnecting)
        self.lose(upstream, upstreamTransport)
        [line] = [m for m in self.messages("info") if "closed" in m and "tunnel" in m]
        self.assertIn("192.0.2.2:50000 -> 203.0.113.7:443 via proxy.test:3128", line)
        self.assertIn("client connection lost", line)
        self.assertIn("5 bytes up, 10 bytes down, 2.500 s", line)
        self.assertEqual(self.failureLines(), [])
        self.assertNotIn(client, self.factory.active)

    def test_tunnelLineIsStructured(self) -> None:
        """
        The tunnel line carries its facts as fields, for JSON observers.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.dataReceived(b"abc")
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        [event] = [e for e in self.events if "bytes_up" in e]
        self.assertEqual(
            (event["client"], event["destination"], event["bytes_up"], event["bytes_down"]),
            ("192.0.2.2:50000", "203.0.113.7:443", 3, 0),
        )
        self.assertEqual(event["how"], "proxy closed")

    def test_proxyCloseClosesClient(self) -> None:
        """
        When the proxy connection is lost, the client's is finished: its
        end sent at once, and closed at the client's own end (what it sends
        until then is read and dropped).
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        self.lose(upstream, upstreamTransport, ConnectionLost)
        self.assertTrue(clientTransport.writeClosed)
        self.assertFalse(clientTransport.disconnecting)
        client.dataReceived(b"a pipelined request")
        self.assertEqual(upstreamTransport.value(), b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n")
        client.readConnectionLost()
        self.assertTrue(clientTransport.disconnecting)
        self.lose(client, clientTransport)
        self.assertEqual(self.factory.counters["closed"], 1)

    def test_droppedBytesInTheLine(self) -> None:
        """
        Bytes that could not be delivered (here, to a proxy connection
        already gone) are not counted as relayed, and the tunnel line says
        how many were dropped.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.dataReceived(b"12345")
        upstreamTransport.connected = False
        client.dataReceived(b"lost")
        self.lose(upstream, upstreamTransport, ConnectionLost)
        self.lose(client, clientTransport)
        [event] = [e for e in self.events if "bytes_up" in e]
        self.assertEqual((event["bytes_up"], event["bytes_up_dropped"], event["bytes_down_dropped"]), (5, 4, 0))
        self.assertRegex(event["tunnel_line"], r" s, 4 bytes up dropped id=[a-z2-7]{8}-[a-z2-7]+$")
        self.assertEqual((self.factory.bytesUp, self.factory.stats.bytesDroppedUp), (5, 4))

    def test_idleTimeout(self) -> None:
        """
        A tunnel with no bytes either way for C{idleTimeout} seconds is
        closed; bytes in either direction postpone it.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        self.clock.advance(20)
        client.dataReceived(b"ping")
        self.clock.advance(20)
        upstream.dataReceived(b"pong")
        self.clock.advance(29)
        self.assertFalse(clientTransport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(clientTransport.writeClosed)
        self.assertTrue(upstreamTransport.writeClosed)
        self.lose(client, clientTransport)
        self.lose(upstream, upstreamTransport)
        self.assertTrue(any("idle for 30 s" in m for m in self.messages("info")))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_peersThatNeverEnd(self) -> None:
        """
        Peers that never end their side once the tunnel is closing (gone
        without a word) are dropped after the closing grace, and the
        tunnel's one line says so.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        self.clock.advance(30.5)
        self.assertTrue(clientTransport.writeClosed and upstreamTransport.writeClosed)
        self.assertFalse(clientTransport.disconnected or upstreamTransport.disconnected)
        self.clock.advance(5.5)
        self.assertTrue(clientTransport.disconnected and upstreamTransport.disconnected)
        lines = [m for m in self.messages("info") if "tunnel" in m]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r" s, dropped after the 5 s closing grace id=[a-z2-7]{8}-[a-z2-7]+$")
        self.assertEqual(self.factory.counters["closed"], 1)

    def test_idleTimeoutOff(self) -> None:
        """
        With an idle timeout of 0, silent tunnels stay open.
        """
        self.settings = TunnelSettings(idleTimeout=0)
        _, clientTransport, _, _ = self.openTunnel()
        self.clock.advance(10 * 24 * 3600)
        self.assertFalse(clientTransport.disconnecting)
        self.assertFalse(self.clock.getDelayedCalls())


class DeadlineTests(TunnelTestCase):
    """
    A tunnel's one deadline: never later than its stage's end, moved only
    to come earlier.
    """

    def recordSets(self) -> list[float | None]:
        sets: list[float | None] = []
        original = self.factory.deadlines.set
        self.patch(self.factory.deadlines, "set", lambda item, when: (sets.append(when), original(item, when)))
        return sets

    def test_twoSetsForAQuickTunnel(self) -> None:
        """
        A tunnel that opens and closes within its set-up time sets its
        deadline twice: at the start, to the earliest any set-up stage can
        end (the connect timeout, 5 s, before the handshake's 7 s), and
        at the end, to none.
        """
        self.makeFactory()
        sets = self.recordSets()
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.readConnectionLost()
        upstream.readConnectionLost()
        self.lose(client, clientTransport)
        self.lose(upstream, upstreamTransport)
        self.assertEqual(self.factory.counters["closed"], 1)
        self.assertEqual(sets, [5.0, None])
        self.assertEqual(len(self.factory.deadlines), 0)

    def test_earlierStageEndMovesTheDeadline(self) -> None:
        """
        A stage that ends before the tunnel's deadline moves it earlier:
        the closing grace of a tunnel that ends while its idle deadline is
        far off ends on time.
        """
        self.makeFactory()
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        self.clock.advance(10)  # past the start's deadline (5 s): now the idle deadline (30 s)
        client.readConnectionLost()
        upstream.readConnectionLost()  # closing from 10 s: the grace ends at 15 s
        self.clock.advance(4.9)
        self.assertFalse(clientTransport.disconnected or upstreamTransport.disconnected)
        self.clock.advance(0.3)
        self.assertTrue(clientTransport.disconnected and upstreamTransport.disconnected)


class SeveralProxiesTests(TunnelTestCase):
    """
    A pool of two proxies, A and B, tried in that order (failover).
    """

    def setUp(self) -> None:
        super().setUp()
        self.endpointB = FakeProxyEndpoint()
        self.proxyA = UpstreamProxy("a.test:3128", self.endpoint, PROXY)
        self.proxyB = UpstreamProxy("b.test:3128", self.endpointB, ("198.51.100.4", 3128))
        self.pool = ProxyPool([self.proxyA, self.proxyB], self.clock, failureThreshold=2)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)

    def test_refusedProxyRetriedOnNext(self) -> None:
        """
        When the first proxy refuses the connection, the second is tried,
        early client bytes included; the client never notices.
        """
        client, clientTransport = self.connectClient()
        client.dataReceived(b"hello")
        self.endpoint.refuse()
        upstream, upstreamTransport = self.endpointB.accept()
        upstream.dataReceived(OK + b"answer")
        self.assertTrue(upstreamTransport.value().endswith(b"\r\n\r\nhello"))
        self.assertEqual(clientTransport.value(), b"answer")
        self.assertEqual((self.factory.retries, self.factory.counters["opened"]), (1, 1))
        self.assertTrue(any("via a.test:3128: cannot connect" in m and "trying b.test:3128" in m
                            for m in self.messages("info")))
        self.assertEqual(self.failureLines(), [])

    def test_5xxRetried(self) -> None:
        """
        A 5xx answer (this proxy could not serve it) moves on to the next
        proxy; the first proxy connection is closed.
        """
        self.connectClient()
        upstreamA, upstreamTransportA = self.endpoint.accept()
        upstreamA.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        self.assertTrue(upstreamTransportA.disconnecting)
        self.assertEqual(len(self.endpointB.attempts), 1)
        upstream, _ = self.endpointB.accept()
        upstream.dataReceived(OK)
        self.assertEqual(self.factory.counters["opened"], 1)

    def test_403NotRetried(self) -> None:
        """
        A 403 is the proxies' policy: it ends the client connection without
        asking the next proxy.
        """
        _, clientTransport, _, _ = self.openTunnel(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpointB.attempts, [])

    def test_allFail(self) -> None:
        """
        When every proxy fails, the client is closed with one failure line
        giving the last reason.
        """
        _, clientTransport = self.connectClient()
        self.endpoint.refuse()
        self.endpointB.refuse()
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn("via b.test:3128 failed: cannot connect to proxy", line)

    def test_downProxySkipped(self) -> None:
        """
        After C{failureThreshold} refusals a proxy is marked down and
        clients go straight to the next one.
        """
        for _ in range(2):
            self.connectClient()
            self.endpoint.refuse()
            self.endpointB.accept()[0].dataReceived(OK)
        self.assertFalse(self.pool.health[self.proxyA].up)
        self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(len(self.endpointB.attempts), 1)

    def test_allDown(self) -> None:
        """
        With every proxy down, clients are closed at once with a log line,
        without any connection attempt.
        """
        for proxy in (self.proxyA, self.proxyB):
            self.pool.markDown(proxy, "down for the test")
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual((self.endpoint.attempts, self.endpointB.attempts), ([], []))
        self.assertIn("every proxy is down", self.failureLines()[0])
        self.assertEqual(self.factory.counters["no-proxy"], 1)


class CanaryTests(TunnelTestCase):
    """
    Proxies A and B (failover), A back from its probe, on trial; B up.
    """

    def setUp(self) -> None:
        super().setUp()
        self.endpointB = FakeProxyEndpoint()
        self.proxyA = UpstreamProxy("a.test:3128", self.endpoint, PROXY)
        self.proxyB = UpstreamProxy("b.test:3128", self.endpointB, ("198.51.100.4", 3128))
        self.pool = ProxyPool([self.proxyA, self.proxyB], self.clock, failureThreshold=2)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        self.pool.markDown(self.proxyA, "down for the test")
        self.clock.advance(10)
        probe, _ = self.endpoint.accept()
        probe.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.assertEqual(self.pool.health[self.proxyA].state, "trial")

    def test_oneCanaryOthersElsewhere(self) -> None:
        """
        The first client tries A, its canary; the clients that come while
        it waits for A's answer go straight to B.
        """
        self.connectClient()
        self.assertEqual(len(self.endpoint.attempts), 1)
        for _ in range(2):
            self.connectClient()
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(len(self.endpointB.attempts), 2)

    def test_canaryTimesOut(self) -> None:
        """
        A canary whose CONNECT goes unanswered marks A down at once (not
        after C{failureThreshold}), for twice the back-off; its client is
        carried by B, and the clients after it do not try A.
        """
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        self.clock.advance(7)
        self.assertEqual(self.pool.health[self.proxyA].state, "down")
        self.assertTrue(any("a.test:3128 marked down for 20 s: its canary tunnel failed" in m
                            for m in self.messages("warn")))
        self.endpointB.accept()[0].dataReceived(OK)
        self.assertEqual(self.factory.counters["opened"], 1)
        self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])

    def test_canaryOpensTunnel(self) -> None:
        """
        A canary that opens its tunnel brings A fully up: clients go to it
        again, several at once.
        """
        self.connectClient()
        self.endpoint.accept()[0].dataReceived(OK)
        self.assertTrue(self.pool.health[self.proxyA].up)
        self.connectClient()
        self.connectClient()
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_canaryClientLeaves(self) -> None:
        """
        A canary whose client leaves before A answers is no verdict: the
        next client is A's canary.
        """
        client, _ = self.connectClient()
        self.endpoint.accept()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.health[self.proxyA].state, "trial")
        self.connectClient()
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.endpointB.attempts, [])

    def test_onlyProxyOnTrial(self) -> None:
        """
        With B down and A's canary in flight, a client is closed at once,
        and the line says why.
        """
        self.pool.markDown(self.proxyB, "down for the test")
        self.connectClient()
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertIn("every proxy is down, or on trial with its one canary tunnel in flight",
                      self.failureLines()[0])


class ConnectTargetTests(TunnelTestCase):
    """
    --connect-target sni, host and auto: the name CONNECT asks for comes
    from the client's first bytes.
    """

    def useTarget(self, mode: str) -> None:
        self.settings = TunnelSettings(connectTarget=mode, sniffTimeout=2, earlyDataLimit=65536)

    def request(self, upstreamTransport) -> bytes:  # type: ignore[no-untyped-def]
        return upstreamTransport.value().split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"

    def test_sniNamesTheTarget(self) -> None:
        """
        The server name from a ClientHello, even one split across reads,
        becomes the CONNECT target with the original port; the hello itself
        is sent through the tunnel unchanged.
        """
        from tests.test_sniff import realHello

        self.useTarget("sni")
        hello = realHello("www.example.test")
        client, clientTransport = self.connectClient()
        client.dataReceived(hello[:20])
        self.assertEqual(self.endpoint.attempts, [], "connected before the name was known")
        client.dataReceived(hello[20:])
        upstream, upstreamTransport = self.endpoint.accept()
        self.assertEqual(
            self.request(upstreamTransport),
            b"CONNECT www.example.test:443 HTTP/1.1\r\nHost: www.example.test:443\r\n\r\n",
        )
        upstream.dataReceived(OK)
        self.assertTrue(upstreamTransport.value().endswith(hello))
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        self.assertTrue(any(
            "-> 203.0.113.7:443 (CONNECT www.example.test:443, from SNI) via" in m
            for m in self.messages("info")
        ))

    def test_hostHeader(self) -> None:
        """
        With auto, a plain HTTP request's Host header names the target.
        """
        self.useTarget("auto")
        self.resolver.answer = IPv4Address("TCP", "203.0.113.7", 80)
        client, _ = self.connectClient()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
        _, upstreamTransport = self.endpoint.accept()
        self.assertTrue(self.request(upstreamTransport).startswith(b"CONNECT www.example.test:80 "))

    def test_policyToldWhereTheNameCameFrom(self) -> None:
        """
        The policy is told whether the name came from SNI (https) or from a
        Host header (http, with the request's path).
        """
        from tests.test_sniff import realHello

        self.useTarget("auto")
        policy = RecordingPolicy(None)
        self.makeFactory()
        self.factory.policy = policy
        client, _ = self.connectClient()
        client.dataReceived(realHello("www.example.test"))
        self.resolver.answer = IPv4Address("TCP", "203.0.113.7", 80)
        client, _ = self.connectClient()
        client.dataReceived(b"GET /a?b=c HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
        tls, plain = policy.requests
        self.assertEqual((tls.name, tls.scheme, tls.path), ("www.example.test", "https", None))
        self.assertEqual((plain.name, plain.scheme, plain.path), ("www.example.test", "http", "/a?b=c"))

    def test_noNameFallsBackToAddress(self) -> None:
        """
        A hello without a server name is tunnelled by address, and the log
        says why.
        """
        from tests.test_sniff import realHello

        self.useTarget("sni")
        client, clientTransport = self.connectClient()
        client.dataReceived(realHello(None))
        upstream, upstreamTransport = self.endpoint.accept()
        self.assertTrue(self.request(upstreamTransport).startswith(b"CONNECT 203.0.113.7:443 "))
        upstream.dataReceived(OK)
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        self.assertTrue(any("(CONNECT by address: no SNI" in m for m in self.messages("info")))

    def test_sniffTimeout(self) -> None:
        """
        A client that sends nothing (a server-speaks-first protocol) is
        tunnelled by address once the sniff timeout ends.
        """
        self.useTarget("sni")
        self.connectClient()
        self.clock.advance(1.9)
        self.assertEqual(self.endpoint.attempts, [])
        self.clock.advance(0.2)
        _, upstreamTransport = self.endpoint.accept()
        self.assertTrue(self.request(upstreamTransport).startswith(b"CONNECT 203.0.113.7:443 "))

    def test_clientEndsBeforeHello(self) -> None:
        """
        A client that half-closes before a whole hello is tunnelled by
        address at once, its bytes and its half-close passed on.
        """
        self.useTarget("sni")
        client, _ = self.connectClient()
        client.dataReceived(b"\x16\x03\x01\x00")
        client.readConnectionLost()
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK)
        self.assertTrue(upstreamTransport.value().endswith(b"\x16\x03\x01\x00"))
        self.assertTrue(upstreamTransport.writeClosed)

    def test_hostileNameRefused(self) -> None:
        """
        A name that is not a hostname never reaches the CONNECT request.
        """
        self.useTarget("host")
        client, _ = self.connectClient()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: evil.test\tX\r\n\r\n")
        _, upstreamTransport = self.endpoint.accept()
        self.assertTrue(self.request(upstreamTransport).startswith(b"CONNECT 203.0.113.7:443 "))
        self.assertNotIn(b"evil", upstreamTransport.value().split(b"\r\n\r\n")[0])


@implementer(ITunnelPolicy)
class RecordingPolicy:
    """
    Answers with C{self.decision} (or a Deferred the test fires), recording
    the requests.
    """

    def __init__(self, decision: object = None) -> None:
        self.decision = decision
        self.requests: list[TunnelRequest] = []

    def decide(self, request: TunnelRequest) -> object:
        self.requests.append(request)
        if isinstance(self.decision, Exception):
            raise self.decision
        return self.decision


class PolicyTests(TunnelTestCase):
    def usePolicy(self, decision: object) -> RecordingPolicy:
        policy = RecordingPolicy(decision)
        self.makeFactory()
        self.factory.policy = policy
        return policy

    def test_askedWithWhatIsKnown(self) -> None:
        """
        The policy is asked once per connection with the client, the
        original destination and the proxies Shifter would try; None keeps
        Shifter's choices.
        """
        policy = self.usePolicy(None)
        self.openTunnel()
        [request] = policy.requests
        self.assertEqual(request.client, CLIENT)
        self.assertEqual(request.destination, DESTINATION)
        self.assertIsNone(request.name)
        self.assertEqual([p.description for p in request.proxies], ["proxy.test:3128"])
        self.assertEqual(self.factory.counters["opened"], 1)

    def test_refuse(self) -> None:
        """
        A refusal closes the client with the policy's reason, and no proxy
        is contacted.
        """
        self.usePolicy(TunnelDecision(refuse="destination blocked"))
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertIn("refused by policy: destination blocked", self.failureLines()[0])

    def test_chooseProxyAndTarget(self) -> None:
        """
        The policy may name the proxies to try and the CONNECT target; the
        original port is kept.
        """
        other = FakeProxyEndpoint()
        proxy = UpstreamProxy("other.test:3128", other)
        self.usePolicy(TunnelDecision(proxies=[proxy], target="internal.example.test"))
        self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        _, transport = other.accept()
        self.assertTrue(transport.value().startswith(b"CONNECT internal.example.test:443 HTTP/1.1\r\n"))

    def test_deferredDecision(self) -> None:
        """
        A policy may answer later with a Deferred; nothing is connected
        until it does.
        """
        answer: Deferred = Deferred()
        self.usePolicy(answer)
        self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        answer.callback(None)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_invalidTargetRefused(self) -> None:
        """
        A target that is not a hostname or address is refused, never sent.
        """
        self.usePolicy(TunnelDecision(target="evil\r\nX-Injected: 1"))
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])

    def test_refusedAddressTarget(self) -> None:
        """
        A policy's target that is an address Shifter would refuse as a
        destination (loopback, link-local, ...) is refused likewise,
        never asked for.
        """
        for target in ("127.0.0.1", "::1", "169.254.1.1"):
            self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            self.usePolicy(TunnelDecision(target=target))
            _, clientTransport = self.connectClient()
            self.assertTrue(clientTransport.disconnecting, target)
            self.assertEqual(self.endpoint.attempts, [], target)
            self.assertEqual(self.factory.counters["destination"], 1, target)

    def test_policyErrorRefuses(self) -> None:
        """
        A policy that raises refuses the connection, with the error logged.
        """
        self.usePolicy(RuntimeError("policy bug"))
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class EncryptedClientHelloTests(TunnelTestCase):
    """
    A ClientHello that offers Encrypted Client Hello: passed by default,
    counted, logged once per interval, and said in the tunnel's line.
    """

    useTarget = ConnectTargetTests.useTarget
    request = ConnectTargetTests.request

    def echHello(self, name: bytes = b"cover.example.test") -> bytes:
        from tests.test_sniff import echHello, echOuter, frame

        return frame(echHello(echOuter(), name))

    def test_passedCountedAndMarked(self) -> None:
        """
        By default an ECH hello is tunnelled to the name it shows, which
        the tunnel line marks as the ECH outer name and with C{[ech=ech]};
        the counter counts it by kind.
        """
        self.useTarget("sni")
        client, clientTransport = self.connectClient()
        hello = self.echHello()
        client.dataReceived(hello)
        upstream, upstreamTransport = self.endpoint.accept()
        self.assertTrue(self.request(upstreamTransport).startswith(b"CONNECT cover.example.test:443 "))
        upstream.dataReceived(OK)
        self.assertTrue(upstreamTransport.value().endswith(hello))
        self.assertEqual(self.factory.tunnels()[0].ech, "ech")
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        lines = [m for m in self.messages("info") if "closed" in m]
        self.assertEqual(len(lines), 1)
        self.assertIn(
            "-> 203.0.113.7:443 (CONNECT cover.example.test:443, from SNI, the ECH outer name) [ech=ech] via",
            lines[0],
        )
        self.assertEqual(self.factory.stats.ech, {"ech": 1})

    def test_noECHNoMark(self) -> None:
        """
        A hello without ECH is counted as C{none} and its line has no mark.
        """
        from tests.test_sniff import realHello

        self.useTarget("sni")
        client, clientTransport = self.connectClient()
        client.dataReceived(realHello("plain.example.test"))
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK)
        self.assertEqual(self.factory.tunnels()[0].ech, "")
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        self.assertFalse(any("ech" in m.lower() for m in self.messages("info")))
        self.assertEqual(self.factory.stats.ech, {"none": 1})

    def test_loggedOncePerInterval(self) -> None:
        """
        Each ECH hello is counted, but the line saying ECH was offered is
        logged once per interval, then how many more were left out.
        """
        self.useTarget("sni")
        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536, maxConnections=10)
        for port in range(5):
            client, _ = self.connectClient(peer=IPv4Address("TCP", "192.0.2.2", 50000 + port))
            client.dataReceived(self.echHello())
        offered = [m for m in self.messages("info") if "offers Encrypted Client Hello" in m]
        self.assertEqual(offered, [
            "tunnel 192.0.2.2:50000 -> 203.0.113.7:443: the ClientHello offers Encrypted Client Hello "
            "(may be GREASE); the name it shows, cover.example.test, is its outer (cover) name"
        ])
        self.assertEqual(self.factory.stats.ech["ech"], 5)
        self.clock.advance(self.factory.refusals.interval)
        self.assertIn("4 more like it not logged in the last 10 s (ech)", self.messages("info"))

    def test_policySeesECH(self) -> None:
        """
        The policy is asked with what the hello showed of ECH.
        """
        asked: list[TunnelRequest] = []

        class Policy:
            def decide(self, request: TunnelRequest) -> None:
                asked.append(request)

        self.useTarget("sni")
        self.makeFactory()
        self.factory.policy = Policy()
        client, _ = self.connectClient()
        client.dataReceived(self.echHello())
        self.assertEqual([(r.name, r.ech) for r in asked], [("cover.example.test", "ech")])

    def test_metric(self) -> None:
        """
        C{shifter_tunnels_ech_total} counts the connections read by what
        their hello showed of ECH.
        """
        from tests.test_operations import scrape
        from tests.test_sniff import echHello, echOuter, frame, realHello

        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536, maxConnections=10)
        hellos = [self.echHello(), self.echHello(), frame(echHello(echOuter(enc=b""))), realHello("a.example.test")]
        for port, hello in enumerate(hellos):
            client, _ = self.connectClient(peer=IPv4Address("TCP", "192.0.2.2", 50000 + port))
            client.dataReceived(hello)
        samples = scrape(self.factory)
        self.assertEqual(samples['shifter_tunnels_ech_total{ech="ech"}'], 2)
        self.assertEqual(samples['shifter_tunnels_ech_total{ech="grease"}'], 1)
        self.assertEqual(samples['shifter_tunnels_ech_total{ech="none"}'], 1)
        self.assertEqual(samples['shifter_tunnels_ech_total{ech="inner"}'], 0)
        self.assertEqual(samples['shifter_tunnels_ech_total{ech="unknown"}'], 0)
