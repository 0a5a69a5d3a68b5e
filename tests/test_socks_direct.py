"""
Tests, in memory, of SOCKS5 upstreams and the DIRECT route in a tunnel's
life (L{shifter.tunnel.negotiation}, L{shifter.upstream.upstream}), of
their C{--proxy} and C{[[rule]]} forms, and of the SOCKS5 health probe.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.interfaces import ConnectResponse
from shifter.service.config import RulePolicy, Rule
from shifter.tunnel.downstream import ShifterFactory, TunnelSettings
from shifter.tunnel.policy import TunnelDecision, TunnelRequest
from shifter.upstream import upstream as upstreamModule
from shifter.upstream.pool import ProxyPool
from shifter.upstream.probe import ProbeFailed, Socks5Probe
from shifter.upstream.proxy import DIRECT, SOCKS5, UpstreamProxy, directRoute, parseProxy
from shifter.upstream.socks5 import formatConnectRequest, formatPasswordRequest

from tests.support import knowLocalAddresses
from tests import test_holdsyn, test_tunnel
from tests.test_tunnel import OK, PROXY, FakeProxyEndpoint, TunnelTestCase

GRANTED = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
LOGIN = (b"alice", b"s3cret")


def _reply(code: int) -> bytes:
    return b"\x05" + bytes((code,)) + b"\x00\x01" + bytes(6)


class SocksPoolTestCase(TunnelTestCase):
    """
    A pool of a SOCKS5 server, then an HTTP proxy (failover).
    """

    login: tuple[bytes, bytes] | None = None

    def setUp(self) -> None:
        super().setUp()
        self.endpointB = FakeProxyEndpoint()
        self.socks = UpstreamProxy("socks5://s.test:1080", self.endpoint, PROXY, kind=SOCKS5, login=self.login)
        self.http = UpstreamProxy("b.test:3128", self.endpointB, ("198.51.100.4", 3128))
        self.pool = ProxyPool([self.socks, self.http], self.clock, failureThreshold=5)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)


class SocksTunnelTests(SocksPoolTestCase):
    def test_handshakeThenTunnel(self) -> None:
        """
        The greeting goes first, the CONNECT for the original address once
        the server chose a method; its success opens the tunnel, the
        client's early bytes then going through.
        """
        client, clientTransport = self.connectClient()
        client.dataReceived(b"hello")
        upstream, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), b"\x05\x01\x00")
        transport.clear()
        upstream.dataReceived(b"\x05\x00")
        self.assertEqual(transport.value(), formatConnectRequest("203.0.113.7", 443))
        transport.clear()
        upstream.dataReceived(GRANTED + b"answer")
        self.assertEqual(transport.value(), b"hello")
        self.assertEqual(clientTransport.value(), b"answer")
        self.assertEqual(self.factory.counters["opened"], 1)
        self.assertEqual(self.factory.proxyAnswers["2xx"], 1)
        self.lose(upstream, transport)
        self.lose(client, clientTransport)
        self.assertTrue(any("-> 203.0.113.7:443 via socks5://s.test:1080 closed" in m for m in self.messages("info")))

    def test_accessLogRecord(self) -> None:
        """
        A SOCKS5 tunnel's access-log record has the server's grant as its
        status; no header could carry the id (SOCKS5 has none), so none
        was sent even with a tunnel-id header set.
        """
        records: list[Any] = []
        self.settings = TunnelSettings(tunnelIdHeader="Shifter-Tunnel")
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        self.factory.accessLog = type("AccessLog", (), {"tunnelEnded": lambda _, record: records.append(record)})()
        client, clientTransport = self.connectClient()
        upstream, transport = self.endpoint.accept()
        upstream.dataReceived(b"\x05\x00")
        self.assertEqual(transport.value(), b"\x05\x01\x00" + formatConnectRequest("203.0.113.7", 443))
        upstream.dataReceived(GRANTED)
        self.lose(upstream, transport)
        self.lose(client, clientTransport)
        [record] = records
        self.assertEqual((record.proxy, record.status, record.result), ("socks5://s.test:1080", 200, "ok"))

    def test_sniNameSentAsName(self) -> None:
        """
        With C{--connect-target sni}, the name read from the client goes to
        the server as a name (address type 3), not resolved by Shifter.
        """
        from tests.test_sniff import realHello

        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        client, _ = self.connectClient()
        client.dataReceived(realHello("www.example.test"))
        upstream, transport = self.endpoint.accept()
        transport.clear()
        upstream.dataReceived(b"\x05\x00")
        self.assertEqual(transport.value(), b"\x05\x01\x00\x03\x10www.example.test\x01\xbb")

    def test_rulesetRefusalFinal(self) -> None:
        """
        The server's rules refusing the CONNECT (reply 2) end the tunnel
        with one line in SOCKS's words, counted as the proxy's refusal;
        the next proxy is not tried.
        """
        _, clientTransport = self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"\x05\x00" + _reply(2))
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpointB.attempts, [])
        self.assertEqual(self.factory.counters["proxy-status"], 1)
        [line] = self.failureLines()
        self.assertIn("via socks5://s.test:1080 failed: SOCKS5 server answered 0x02 (connection not allowed by ruleset)",
                      line)

    def test_failureTriesNextProxy(self) -> None:
        """
        Every other failure the server reports (here: connection refused)
        tries the next proxy, with the reason in the retry line.
        """
        client, clientTransport = self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"\x05\x00" + _reply(5))
        upstreamB, transportB = self.endpointB.accept()
        upstreamB.dataReceived(OK)
        self.assertEqual(self.factory.counters["opened"], 1)
        self.assertEqual(self.factory.retries, 1)
        self.assertTrue(any("SOCKS5 server answered 0x05 (connection refused); trying b.test:3128" in m
                            for m in self.messages("info")))

    def test_garbageTriesNextProxy(self) -> None:
        """
        An answer that is not SOCKS5 counts against the server's health and
        tries the next proxy.
        """
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertEqual(len(self.endpointB.attempts), 1)
        self.assertEqual(self.pool.health[self.socks].failures, 1)
        self.assertTrue(any("bad answer from proxy: answered what looks like HTTP" in m
                            for m in self.messages("info")))

    def test_closedMidReply(self) -> None:
        """
        A server that closes halfway through its reply is a proxy that
        closed before answering, with no word of PROXY protocol headers.
        """
        self.pool = ProxyPool([self.socks], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        self.connectClient()
        upstream, transport = self.endpoint.accept()
        upstream.dataReceived(b"\x05\x00" + GRANTED[:5])
        self.lose(upstream, transport)
        [line] = self.failureLines()
        self.assertRegex(line, r"failed: proxy closed the connection before answering id=[a-z2-7]{8}-[a-z2-7]+$")
        self.assertEqual(self.factory.counters["proxy-closed"], 1)

    def test_noAcceptableMethod(self) -> None:
        """
        A server that wants credentials Shifter does not have ends the
        tunnel as an authentication failure, not retried.
        """
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"\x05\xff")
        self.assertEqual(self.factory.counters["proxy-auth"], 1)
        self.assertEqual(self.endpointB.attempts, [])
        self.assertIn("none are configured", self.failureLines()[0])

    def test_handshakeTimeout(self) -> None:
        """
        A server that never finishes its answers is given up on at the
        handshake timeout, and the next proxy tried.
        """
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"\x05\x00\x05")
        self.clock.advance(self.settings.handshakeTimeout)
        self.assertEqual(len(self.endpointB.attempts), 1)


class SocksLoginTests(SocksPoolTestCase):
    login = LOGIN

    def test_login(self) -> None:
        """
        With credentials, both methods are offered; chosen, username and
        password go before the CONNECT, and a refusal of them is counted as
        an authentication failure with RFC 1929's status in the line.
        """
        self.connectClient()
        upstream, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), b"\x05\x02\x00\x02")
        transport.clear()
        upstream.dataReceived(b"\x05\x02")
        self.assertEqual(transport.value(), formatPasswordRequest(*LOGIN))
        upstream.dataReceived(b"\x01\x05")
        self.assertEqual(self.factory.counters["proxy-auth"], 1)
        self.assertIn("refused the username and password (RFC 1929 status 0x05)", self.failureLines()[0])


class DirectTests(TunnelTestCase):
    """
    A policy that chooses the DIRECT route.
    """

    usePolicy = test_tunnel.PolicyTests.usePolicy

    def setUp(self) -> None:
        super().setUp()
        self.connections: list[Any] = []
        self.patch(upstreamModule, "connectNow", self.connectNow)
        self.direct = directRoute(self.clock, mark=0x20)

    def connectNow(self, target: Any, factory: Any) -> Any:
        """
        Record where a DIRECT attempt connects, and connect it to a
        L{StringTransport}.
        """
        self.connections.append((target, factory))
        return None

    def connected(self, index: int = 0):  # type: ignore[no-untyped-def]
        target, factory = self.connections[index]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_toOriginalAddress(self) -> None:
        """
        DIRECT connects to the original destination's address and port,
        with the route's mark, and the tunnel is open once connected: no
        handshake, the early bytes sent first; no proxy is contacted.
        """
        self.usePolicy(TunnelDecision(proxies=[self.direct]))
        client, clientTransport = self.connectClient()
        client.dataReceived(b"hello")
        [(target, _)] = self.connections
        self.assertEqual((target.host, target.port, target.mark), ("203.0.113.7", 443, 0x20))
        upstream, transport = self.connected()
        self.assertEqual(transport.value(), b"hello")
        upstream.dataReceived(b"answer")
        self.assertEqual(clientTransport.value(), b"answer")
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual((self.factory.counters["opened"], self.factory.counters["direct"]), (1, 1))
        self.assertEqual(self.factory.proxyAnswers, {})
        from tests.test_operations import scrape

        samples = scrape(self.factory)
        self.assertEqual((samples["shifter_tunnels_direct_total"], samples["shifter_tunnels_opened_total"]), (1, 1))
        self.assertNotIn('shifter_tunnel_failures_total{reason="direct"}', samples)
        self.lose(upstream, transport)
        self.lose(client, clientTransport)
        self.assertTrue(any("tunnel 192.0.2.2:50000 -> 203.0.113.7:443 via DIRECT closed" in m
                            for m in self.messages("info")))

    def test_neverTheName(self) -> None:
        """
        A name read from the client is never what DIRECT connects to: the
        original address is.
        """
        from tests.test_sniff import realHello

        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536)
        self.usePolicy(TunnelDecision(proxies=[self.direct]))
        client, _ = self.connectClient()
        client.dataReceived(realHello("www.example.test"))
        [(target, _)] = self.connections
        self.assertEqual(target.host, "203.0.113.7")

    def test_accessLogRecord(self) -> None:
        """
        A DIRECT tunnel's access-log record: the route as its proxy, no
        status (no proxy answered), the original address as its target
        even when a name was read.
        """
        from tests.test_sniff import realHello

        records: list[Any] = []
        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536)
        self.usePolicy(TunnelDecision(proxies=[self.direct]))
        self.factory.accessLog = type("AccessLog", (), {"tunnelEnded": lambda _, record: records.append(record)})()
        client, clientTransport = self.connectClient()
        client.dataReceived(realHello("www.example.test"))
        upstream, transport = self.connected()
        self.lose(upstream, transport)
        self.lose(client, clientTransport)
        [record] = records
        self.assertEqual(
            (record.proxy, record.status, record.connectTarget, record.targetFrom, record.name, record.result),
            ("DIRECT", None, "203.0.113.7:443", "address", "www.example.test", "ok"),
        )

    def test_loopbackAndGatewayRefused(self) -> None:
        """
        A destination Shifter refuses (loopback, this machine's address)
        is refused with DIRECT too: nothing is connected.
        """
        for host in ("127.0.0.1", "::1", "192.0.2.254"):
            self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            self.resolver.answer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 443)
            self.usePolicy(TunnelDecision(proxies=[self.direct]))
            _, clientTransport = self.connectClient()
            self.assertTrue(clientTransport.disconnecting, host)
            self.assertEqual(self.connections, [], host)
            self.assertEqual(self.factory.counters["destination"], 1, host)

    def test_directRefusedAtConnect(self) -> None:
        """
        The route checks the destination again itself when it connects:
        a destination that became refused meanwhile (a new address of
        this machine) is never connected to.
        """
        self.usePolicy(TunnelDecision(proxies=[self.direct]))
        policy = self.factory.policy

        class LateAddress:
            def decide(this, request: TunnelRequest) -> Any:
                self.factory.proxyAddresses.localAddresses = frozenset({"203.0.113.7"})
                return policy.decide(request)

        self.factory.policy = LateAddress()
        _, clientTransport = self.connectClient()
        self.assertEqual(self.connections, [])
        self.assertTrue(clientTransport.disconnecting)
        self.assertIn("via DIRECT failed: DIRECT refused: destination 203.0.113.7 is an address of this machine",
                      self.failureLines()[0])

    def test_clientOnThisMachine(self) -> None:
        """
        A client on this machine (redirected by rules for the gateway's own
        connections) is not sent DIRECT by an unmarked route, whose
        connection those rules would bring back to Shifter; with the
        rules' mark, it is.
        """
        local = IPv4Address("TCP", "192.0.2.254", 40000)
        self.usePolicy(TunnelDecision(proxies=[directRoute(self.clock)]))
        _, clientTransport = self.connectClient(peer=local)
        self.assertEqual(self.connections, [])
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.factory.counters["loop"], 1)
        self.assertIn("DIRECT refused: the client 192.0.2.254 is this machine", self.failureLines()[0])
        self.usePolicy(TunnelDecision(proxies=[self.direct]))
        self.connectClient(peer=local)
        self.assertEqual(len(self.connections), 1)

    def test_failoverToProxy(self) -> None:
        """
        DIRECT in a list with proxies is tried in its place: when the
        destination refuses the connection, the next one is tried.
        """
        policy = self.usePolicy(None)
        policy.decision = TunnelDecision(proxies=[self.direct, self.pool.proxies[0]])
        self.connectClient()
        [(_, factory)] = self.connections
        from twisted.internet.error import ConnectionRefusedError

        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.endpoint.attempts), 1)


class ParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_socks5URL(self) -> None:
        """
        C{socks5://host:port} is a SOCKS5 upstream, with the login from the
        URL (percent-decoded) or none.
        """
        proxy = parseProxy("socks5://us%40er:p%3Ass@192.0.2.9:1080", self.reactor)
        self.assertEqual(
            (proxy.kind, proxy.description, proxy.address, proxy.login, proxy.auth),
            (SOCKS5, "socks5://192.0.2.9:1080", ("192.0.2.9", 1080), (b"us@er", b"p:ss"), None),
        )
        self.assertIsNone(parseProxy("socks5://[2001:db8::9]:1080", self.reactor).login)
        named = parseProxy("socks5://socks.example.test:1080", self.reactor)
        self.assertEqual((named.kind, named.host, named.address), (SOCKS5, "socks.example.test", None))

    def test_socks5Refused(self) -> None:
        """
        A SOCKS5 URL with a path, a query (no --pass-client for SOCKS5), no
        port, or a username too long for RFC 1929 is refused with a reason.
        """
        for value, reason in [
            ("socks5://192.0.2.9:1080/x", "only a scheme"),
            ("socks5://192.0.2.9:1080?pass-client=proxy-v1", "only a scheme"),
            ("socks5://192.0.2.9", "host and port"),
            ("socks5://192.0.2.9:99999", "out of range"),
            (f"socks5://{'u' * 256}:p@192.0.2.9:1080", "1 to 255 bytes"),
        ]:
            e = self.assertRaises(ValueError, parseProxy, value, self.reactor)
            self.assertIn(reason, str(e), value)

    def test_directRoute(self) -> None:
        """
        The DIRECT route is a proxy of its own kind, with no address, whose
        route to one destination carries that address and port.
        """
        route = directRoute(self.reactor, 7)
        self.assertEqual((route.kind, route.description, route.address), (DIRECT, "DIRECT", None))
        one = route.toDestination("2001:db8::7", 443)
        self.assertEqual((one.direct.host, one.direct.port, one.direct.mark), ("2001:db8::7", 443, 7))  # type: ignore[union-attr]


class RuleTests(SynchronousTestCase):
    def test_directRule(self) -> None:
        """
        A rule with C{direct} gives the DIRECT route as the one proxy.
        """
        route = directRoute(MemoryReactorClock())
        policy = RulePolicy([Rule(line=3, direct=True)], {}, route)
        request = TunnelRequest(IPv4Address("TCP", "192.0.2.2", 1), IPv4Address("TCP", "203.0.113.7", 443), None, ())
        decision = policy.decide(request)
        assert decision is not None
        self.assertEqual(list(decision.proxies or ()), [route])

    def test_directNeedsARoute(self) -> None:
        """
        A policy with a C{direct} rule and no route to give is refused at
        once.
        """
        self.assertRaises(ValueError, RulePolicy, [Rule(line=3, direct=True)], {})


class Socks5ProbeTests(SynchronousTestCase):
    def probe(self, login=None):  # type: ignore[no-untyped-def]
        done: Deferred[ConnectResponse] = Deferred()
        protocol = Socks5Probe(formatConnectRequest("255.255.255.255", 9), done, True, login)
        transport = StringTransport()
        protocol.makeConnection(transport)
        results: list[Any] = []
        done.addBoth(results.append)
        return protocol, transport, results

    def test_anyAnswer(self) -> None:
        """
        The probe speaks SOCKS5 and takes any complete answer, a refusal
        of its CONNECT too, as the server answering; then drops the
        connection.
        """
        protocol, transport, results = self.probe()
        self.assertEqual(transport.value(), b"\x05\x01\x00")
        protocol.dataReceived(b"\x05\x00")
        protocol.dataReceived(_reply(3))
        [response] = results
        self.assertEqual(response.refusal, "SOCKS5 server answered 0x03 (network unreachable)")
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_loginRefusalIsAnAnswer(self) -> None:
        """
        A server refusing the probe's credentials has answered.
        """
        protocol, transport, results = self.probe(LOGIN)
        protocol.dataReceived(b"\x05\x02\x01\x01")
        [response] = results
        self.assertEqual(response.status, 407)

    def test_garbageFails(self) -> None:
        """
        Bytes that are not SOCKS5 fail the probe, saying so.
        """
        protocol, _, results = self.probe()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        [failure] = results
        self.assertIsInstance(failure.value, ProbeFailed)
        self.assertIn("not SOCKS5", str(failure.value))
        protocol.connectionLost(Failure(ConnectionDone()))


class HeldSynTests(test_holdsyn.HolderTestCase):
    """
    With C{--hold-syn}, DIRECT and SOCKS5 are chosen and opened at the SYN
    like any proxy.
    """

    def test_directAtTheSyn(self) -> None:
        """
        A policy's DIRECT opens the connection to the SYN's own destination
        while the SYN is held; the open connection accepts it, with no
        CONNECT written and no proxy answer counted.
        """
        route = directRoute(self.clock)

        class Policy:
            def decide(this, request: Any) -> Any:
                return TunnelDecision(proxies=[route])

        self.owner.policy = Policy()
        self.send(test_holdsyn.syn(1))
        (attempt,) = self.attempts
        self.assertEqual((attempt.proxy.kind, attempt.proxy.direct.host, attempt.proxy.direct.port),
                         (DIRECT, "203.0.113.7", 443))
        attempt.receiver.proxyConnected(attempt)
        self.assertEqual(attempt.written, [b""])
        attempt.receiver.proxyAnswered(attempt, ConnectResponse(200, "connected"))
        self.assertEqual(self.queue.verdicts, [("accept", 1)])
        self.assertEqual(self.owner.stats.proxyAnswers, {})

    def test_socksAtTheSyn(self) -> None:
        """
        A SOCKS5 server in the pool is asked at the SYN with a SOCKS5
        CONNECT for the SYN's destination; its refusal resets the SYN with
        the line in SOCKS's words.
        """
        socks = UpstreamProxy("socks5://s.test:1080", test_holdsyn.DummyEndpoint(), ("198.51.100.9", 1080),
                              kind=SOCKS5)

        class Policy:
            def decide(this, request: Any) -> Any:
                return TunnelDecision(proxies=[socks])

        self.owner.policy = Policy()
        self.send(test_holdsyn.syn(1))
        (attempt,) = self.attempts
        attempt.receiver.proxyConnected(attempt)
        self.assertEqual(attempt.written, [formatConnectRequest("203.0.113.7", 443)])
        from shifter.upstream.socks5 import REPLIES

        text, status = REPLIES[2]
        attempt.receiver.proxyAnswered(
            attempt, ConnectResponse(status, text, refusal="SOCKS5 server answered 0x02 (connection not allowed by ruleset)"),
        )
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertEqual(len(self.lines("refused at the SYN: SOCKS5 server answered 0x02")), 1)
