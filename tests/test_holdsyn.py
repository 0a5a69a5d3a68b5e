"""
Tests for C{--hold-syn} (L{shifter.tunnel.holdsyn}): the holder and its held SYNs
driven without sockets, with a recording queue, recording proxy attempts
and a clock; and every (state, event) pair of a held SYN's table.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.tunnel import holdsyn as H
from shifter.upstream.auth import Credentials, ProxyAuth
from shifter.upstream.connect import ConnectResponse
from shifter.tunnel.destinations import GatewayNames, ProxyAddresses
from shifter.tunnel.downstream import TunnelSettings
from shifter.tunnel.limits import ClientLimit
from shifter.logs import RateLimitedLog
from shifter.tunnel.holdsyn import HeldTunnel, SynHolder
from shifter.interfaces import IProxyAttempt
from shifter.tunnel.metrics import TunnelStats
from shifter.resolvers.nfqueue import QueuedPacket, parseSegment
from shifter.tunnel.policy import TunnelDecision
from shifter.upstream.pool import ProxyPool
from shifter.upstream.proxy import UpstreamProxy, directRoute

from tests.support import knowLocalAddresses
from tests.test_tunnel_table import ntlmChallenge
from tests.test_nfqueue import ipv4Packet

CONNECT = b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n"
OK = ConnectResponse(200, "Connection established", [], b"")


def syn(packetId: int, port: int = 40000, sequence: int = 1000, destination: str = "203.0.113.7",
        source: str = "192.0.2.2", destinationPort: int = 443) -> QueuedPacket:
    payload = ipv4Packet(source, destination, port, destinationPort, sequence=sequence)
    return QueuedPacket(packetId, 0, parseSegment(payload))


class RecordingQueue:
    """
    The verdicts a holder gives, by packet id.
    """

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.verdicts: list[tuple[str, int]] = []

    def hold(self, packet: QueuedPacket) -> None:
        self.held.add(packet.packetId)

    def _give(self, kind: str, packet: QueuedPacket) -> None:
        assert packet.packetId not in {p for _, p in self.verdicts}, f"a second verdict for {packet.packetId}"
        self.held.discard(packet.packetId)
        self.verdicts.append((kind, packet.packetId))

    def accept(self, packet: QueuedPacket) -> None:
        self._give("accept", packet)

    def reject(self, packet: QueuedPacket) -> None:
        self._give("reject", packet)

    def drop(self, packet: QueuedPacket) -> None:
        self._give("drop", packet)


class RecordingTransport:
    def __init__(self) -> None:
        self.producing = True

    def pauseProducing(self) -> None:
        self.producing = False

    def resumeProducing(self) -> None:
        self.producing = True


@implementer(IProxyAttempt)
class RecordingAttempt:
    def __init__(self, proxy: Any, receiver: Any) -> None:
        self.proxy = proxy
        self.receiver = receiver
        self.written: list[bytes] = []
        self.aborted = False
        self.connecting = False
        self.transport = RecordingTransport()

    def connect(self) -> None:
        self.connecting = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def again(self, request: bytes, response: Any) -> None:
        self.written.append(request)

    def halfClose(self) -> None:
        pass

    def close(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = True


class DummyEndpoint:
    def connect(self, factory: Any) -> Any:
        raise AssertionError("attempts are recorded, never connected")


class Owner:
    def __init__(self, proxies: int = 1, auth: Any = None, **settings: Any) -> None:
        self.reactor = Clock()
        self.settings = TunnelSettings(**settings)
        self.pool = ProxyPool(
            [UpstreamProxy(f"proxy{i}.test:3128", DummyEndpoint(), (f"198.51.100.{i}", 3128), auth=auth)
             for i in range(1, proxies + 1)],
            self.reactor,
        )
        self.stats = TunnelStats()
        self.active: set[Any] = set()
        self.policy: Any = None
        self.proxyAddresses = ProxyAddresses(self.pool.proxies, self.reactor)
        knowLocalAddresses(self)
        self.gatewayNames = GatewayNames([], {})
        self.connectByAddress = False
        self.clientLimit = ClientLimit(self.settings.maxConnectionsPerClient)
        self.refusals = RateLimitedLog(Logger(), self.reactor)


class HolderTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.makeHolder()

    def makeHolder(self, proxies: int = 1, timeout: float = 5.0, auth: Any = None, **settings: Any) -> None:
        settings.setdefault("connectTimeout", 2.0)
        settings.setdefault("handshakeTimeout", 2.0)
        self.owner = Owner(proxies, auth, **settings)
        self.clock = self.owner.reactor
        self.attempts: list[RecordingAttempt] = []

        def newAttempt(proxy: Any, receiver: Any) -> RecordingAttempt:
            attempt = RecordingAttempt(proxy, receiver)
            self.attempts.append(attempt)
            return attempt

        self.holder = SynHolder(self.owner, timeout, newAttempt=newAttempt)
        self.queue = RecordingQueue()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def lines(self, fragment: str = "") -> list[str]:
        return [text for text in (formatEvent(e) for e in self.events) if fragment in text]

    def send(self, packet: QueuedPacket) -> None:
        self.holder.synReceived(self.queue, packet)

    def answered(self, attempt: RecordingAttempt, response: ConnectResponse = OK) -> None:
        attempt.receiver.proxyConnected(attempt)
        attempt.receiver.proxyAnswered(attempt, response)

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.owner.stats.counters.items() if v}


class OpenTests(HolderTestCase):
    def test_heldUntilAnswered(self) -> None:
        """
        A SYN is held while a proxy is connected to and asked for CONNECT to
        its destination; the 2xx accepts it.
        """
        self.send(syn(1))
        self.assertEqual((self.queue.held, self.queue.verdicts), ({1}, []))
        (attempt,) = self.attempts
        self.assertTrue(attempt.connecting)
        attempt.receiver.proxyConnected(attempt)
        self.assertEqual(attempt.written, [CONNECT])
        self.assertEqual(self.queue.verdicts, [])
        attempt.receiver.proxyAnswered(attempt, OK)
        self.assertEqual(self.queue.verdicts, [("accept", 1)])
        self.assertEqual(self.owner.stats.proxyAnswers["2xx"], 1)
        self.assertEqual(self.holder.entries[("192.0.2.2", 40000, "203.0.113.7", 443)].state, H.ACCEPTED)

    def test_claimed(self) -> None:
        """
        The client connection from the SYN's source takes the open tunnel:
        the attempt now reports to it, with the bytes the proxy sent
        already; the holder forgets it, and closes nothing.
        """
        self.clock.advance(3)
        self.send(syn(1))
        (attempt,) = self.attempts
        self.answered(attempt, ConnectResponse(200, "OK", [], b"hello"))
        attempt.receiver.proxyData(attempt, b" world")
        receiver = object()
        held = self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, receiver)
        self.assertEqual(
            (held.attempt, held.leftover, held.started, held.connectHost, held.passClient, held.status),
            (attempt, b"hello world", 3.0, "203.0.113.7", None, 200),
        )
        self.assertRegex(held.tunnelId, "^[a-z2-7]{8}-[a-z2-7]+$")
        self.assertIs(attempt.receiver, receiver)
        self.assertFalse(attempt.aborted)
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, receiver), None)
        self.assertEqual(self.holder.counters["joined"], 1)
        self.assertEqual(len(self.holder.deadlines), 0)

    def test_otherClientNotClaimed(self) -> None:
        """
        Only a connection from the SYN's own source takes its tunnel.
        """
        self.send(syn(1))
        self.answered(self.attempts[0])
        self.assertIsNone(self.holder.claim("192.0.2.2", 40001, "203.0.113.7", 443, object()))
        self.assertIsNone(self.holder.claim("192.0.2.3", 40000, "203.0.113.7", 443, object()))
        self.assertIsNone(self.holder.claim("192.0.2.2", 40000, "203.0.113.8", 443, object()))

    def test_claimWhileHeld(self) -> None:
        """
        A SYN still held has no tunnel to give.
        """
        self.send(syn(1))
        self.assertIsNone(self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object()))
        self.assertEqual(self.queue.held, {1})

    def test_serverSpeaksFirst(self) -> None:
        """
        Bytes the proxy relays before the client's connection is accepted
        are kept; past the early-data limit, reading from the proxy pauses
        until the tunnel is taken.
        """
        self.makeHolder(earlyDataLimit=10)
        self.send(syn(1))
        (attempt,) = self.attempts
        self.answered(attempt)
        attempt.receiver.proxyData(attempt, b"x" * 6)
        self.assertTrue(attempt.transport.producing)
        attempt.receiver.proxyData(attempt, b"y" * 6)
        self.assertFalse(attempt.transport.producing)
        held = self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object())
        self.assertEqual(held.leftover, b"x" * 6 + b"y" * 6)
        self.assertTrue(attempt.transport.producing)

    def test_passClient(self) -> None:
        """
        The held CONNECT carries what the proxy's --pass-client asks for,
        about the client of the SYN.
        """
        proxy = self.owner.pool.proxies[0]
        object.__setattr__(proxy, "passClient", "x-forwarded-for")
        self.send(syn(1))
        (attempt,) = self.attempts
        attempt.receiver.proxyConnected(attempt)
        self.assertIn(b"X-Forwarded-For: 192.0.2.2\r\n", attempt.written[0])

    def test_authenticationRetry(self) -> None:
        """
        A 407 with a Digest challenge is answered once, on a new connection,
        as the tunnel does; the SYN stays held until the 2xx.
        """
        proxy = self.owner.pool.proxies[0]
        object.__setattr__(proxy, "auth", ProxyAuth(Credentials("alice", "secret")))
        self.send(syn(1))
        first = self.attempts[0]
        first.receiver.proxyConnected(first)
        self.assertNotIn(b"Proxy-Authorization", first.written[0])  # until the proxy asks
        challenge = ConnectResponse(
            407, "Proxy Authentication Required",
            [(b"Proxy-Authenticate", b'Digest realm="squid", nonce="abc", qop="auth"')],
        )
        first.receiver.proxyAnswered(first, challenge)
        self.assertTrue(first.aborted)
        self.assertEqual(self.queue.verdicts, [])
        second = self.attempts[1]
        second.receiver.proxyConnected(second)
        self.assertIn(b"Proxy-Authorization: Digest ", second.written[0])
        second.receiver.proxyAnswered(second, OK)
        self.assertEqual(self.queue.verdicts, [("accept", 1)])

    def test_failover(self) -> None:
        """
        A proxy that cannot be reached, or answers 5xx, is followed by the
        next one, the SYN still held.
        """
        self.makeHolder(proxies=3)
        self.send(syn(1))
        first = self.attempts[0]
        first.receiver.proxyConnectFailed(first, Failure(ConnectionRefusedError()))
        second = self.attempts[1]
        self.assertEqual(second.proxy.description, "proxy2.test:3128")
        self.answered(second, ConnectResponse(503, "Service Unavailable"))
        third = self.attempts[2]
        self.assertEqual(self.queue.verdicts, [])
        self.answered(third)
        self.assertEqual(self.queue.verdicts, [("accept", 1)])
        self.assertEqual(self.owner.stats.retries, 2)


class PolicyTests(HolderTestCase):
    """
    With a policy (an embedding program's, or --config rules), it is asked
    at the SYN, as the tunnel would ask it, with no name.
    """

    def decideWith(self, decision: Any) -> None:
        class Policy:
            def decide(self, request: Any) -> Any:
                self.request = request
                return decision

        self.policy = self.owner.policy = Policy()

    def test_asked(self) -> None:
        """
        The policy hears of the client, the destination, no name, and the
        proxies that are up.
        """
        self.decideWith(None)
        self.send(syn(1))
        request = self.policy.request
        self.assertEqual((request.client.host, request.client.port, request.destination.host,
                          request.destination.port, request.name, list(request.proxies)),
                         ("192.0.2.2", 40000, "203.0.113.7", 443, None, self.owner.pool.proxies))
        self.assertEqual(len(self.attempts), 1)

    def test_refusesAtTheSyn(self) -> None:
        """
        A policy's refusal refuses the SYN, with its reason.
        """
        self.decideWith(TunnelDecision(refuse="not for the lab"))
        self.send(syn(1))
        self.assertEqual((self.attempts, self.queue.verdicts), ([], [("reject", 1)]))
        self.assertEqual(self.counters(), {"policy": 1})
        self.assertEqual(len(self.lines("refused at the SYN: refused by policy: not for the lab")), 1)

    def test_choices(self) -> None:
        """
        The policy's proxies, target and --pass-client are the held CONNECT's,
        and go with the tunnel to its connection.
        """
        self.makeHolder(proxies=2)
        second = self.owner.pool.proxies[1]
        self.decideWith(TunnelDecision(proxies=[second], target="www.example.test", passClient="x-forwarded-for"))
        self.send(syn(1))
        (attempt,) = self.attempts
        self.assertIs(attempt.proxy, second)
        attempt.receiver.proxyConnected(attempt)
        self.assertEqual(attempt.written, [b"CONNECT www.example.test:443 HTTP/1.1\r\nHost: www.example.test:443\r\n"
                                           b"X-Forwarded-For: 192.0.2.2\r\n\r\n"])
        attempt.receiver.proxyAnswered(attempt, OK)
        held = self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object())
        self.assertEqual((held.connectHost, held.passClient), ("www.example.test", "x-forwarded-for"))

    def test_deferred(self) -> None:
        """
        A decision that comes later is waited for, the SYN held.
        """
        pending: Deferred = Deferred()
        self.decideWith(pending)
        self.send(syn(1))
        self.assertEqual((self.attempts, self.queue.held), ([], {1}))
        pending.callback(None)
        self.assertEqual(len(self.attempts), 1)

    def test_slowDecision(self) -> None:
        """
        A decision that does not come within the hold timeout refuses the
        SYN, and is given up on.
        """
        pending: Deferred = Deferred()
        self.decideWith(pending)
        self.send(syn(1))
        self.clock.advance(5.1)
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertTrue(pending.called)  # cancelled
        self.assertEqual(self.counters(), {"setup-timeout": 1})

    def test_policyError(self) -> None:
        """
        A policy that fails refuses the SYN.
        """

        class Broken:
            def decide(self, request: Any) -> Any:
                raise RuntimeError("policy broke")

        self.owner.policy = Broken()
        self.send(syn(1))
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertEqual(len(self.lines("refused at the SYN: policy error: policy broke")), 1)


class DirectQueue(RecordingQueue):
    """
    A queue that gives DIRECT at the SYN (a direct mark is set).
    """

    def direct(self, packet: QueuedPacket) -> None:
        self._give("direct", packet)


class DirectAtSynTests(PolicyTests):
    """
    A policy's DIRECT answer, first, to the SYN's own destination, is given
    at the SYN: the direct verdict, no attempt, no tunnel.
    """

    def setUp(self) -> None:
        PolicyTests.setUp(self)
        self.queue = DirectQueue()
        self.holder.direct = True
        self.direct = directRoute(self.clock)

    def test_directAtTheSyn(self) -> None:
        """
        DIRECT first: the SYN gets the direct verdict, no proxy is asked,
        one line says so, and the holder counts it; a copy of the SYN gets
        the same verdict.
        """
        self.decideWith(TunnelDecision(proxies=[self.direct], label="rule at line 3"))
        self.send(syn(1))
        self.assertEqual((self.attempts, self.queue.verdicts, self.queue.held), ([], [("direct", 1)], set()))
        self.assertEqual(self.holder.counters["direct"], 1)
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(len(self.lines("192.0.2.2:40000 -> 203.0.113.7:443 DIRECT at the SYN "
                                        "(not through Shifter) (rule at line 3)")), 1)
        self.assertEqual(self.counters(), {})
        self.send(syn(2))
        self.assertEqual(self.queue.verdicts, [("direct", 1), ("direct", 2)])
        self.assertIsNone(self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object()))

    def test_accessLogLine(self) -> None:
        """
        A SYN sent DIRECT at the SYN has its access-log record: DIRECT, no
        CONNECT target, no bytes, and how.
        """
        records: list[Any] = []
        self.owner.accessLog = type("AccessLog", (), {"tunnelEnded": lambda self, record: records.append(record)})()
        self.decideWith(TunnelDecision(proxies=[self.direct], label="PAC: DIRECT"))
        self.send(syn(1))
        [record] = records
        self.assertEqual(
            (record.client, record.destination, record.connectTarget, record.proxy, record.status, record.result,
             record.how, record.bytesUp, record.bytesDown),
            ("192.0.2.2:40000", "203.0.113.7:443", "", "DIRECT", None, "direct",
             "DIRECT at the SYN (not through Shifter) (PAC: DIRECT)", 0, 0),
        )

    def test_proxyFirst(self) -> None:
        """
        DIRECT after a proxy (PAC's "PROXY a; DIRECT") is not given at the
        SYN: the proxy is asked.
        """
        self.decideWith(TunnelDecision(proxies=[self.owner.pool.proxies[0], self.direct]))
        self.send(syn(1))
        self.assertEqual((len(self.attempts), self.queue.verdicts), (1, []))
        self.assertEqual(self.holder.counters["direct"], 0)

    def test_otherTarget(self) -> None:
        """
        DIRECT with a target of the policy's (another address) cannot be
        given at the SYN: the tunnel's way.
        """
        self.decideWith(TunnelDecision(proxies=[self.direct], target="203.0.113.99"))
        self.send(syn(1))
        self.assertEqual(self.queue.verdicts, [])
        self.assertEqual(self.holder.counters["direct"], 0)

    def test_gatewayRefused(self) -> None:
        """
        The destination checks come first: a SYN to loopback is refused at
        the SYN, whatever the policy would say.
        """
        self.decideWith(TunnelDecision(proxies=[self.direct]))
        self.send(syn(1, destination="127.0.0.1"))
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertEqual(self.holder.counters["direct"], 0)

    def test_noDirectMark(self) -> None:
        """
        With a direct mark of 0, DIRECT goes through Shifter as before.
        """
        self.holder.direct = False
        self.decideWith(TunnelDecision(proxies=[self.direct]))
        self.send(syn(1))
        self.assertEqual((len(self.attempts), self.queue.verdicts), (1, []))


class RefusalTests(HolderTestCase):
    def assertRefused(self, counter: str, reason: str, attemptsLeft: bool = True) -> None:
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertEqual(self.counters(), {counter: 1})
        lines = self.lines("refused at the SYN")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"tunnel 192.0.2.2:40000 -> 203.0.113.7:443 via ", lines[0])
        self.assertIn(reason, lines[0])
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(len(self.holder.deadlines), 0)
        if attemptsLeft:
            self.assertTrue(all(a.aborted for a in self.attempts))

    def test_denied(self) -> None:
        """
        A 4xx answer refuses the SYN with a reset, and says why once.
        """
        self.send(syn(1))
        self.answered(self.attempts[0], ConnectResponse(403, "Forbidden"))
        self.assertRefused("proxy-status", "via proxy1.test:3128 refused at the SYN: proxy answered 403 Forbidden")

    def test_accessLogLine(self) -> None:
        """
        A SYN refused has its access-log record, under the id its CONNECT
        carried: the proxy's status, the reason, no bytes.
        """
        records: list[Any] = []
        self.makeHolder(tunnelIdHeader="Shifter-Tunnel")
        self.owner.accessLog = type("AccessLog", (), {"tunnelEnded": lambda self, record: records.append(record)})()
        self.send(syn(1))
        self.clock.advance(0.25)
        self.answered(self.attempts[0], ConnectResponse(403, "Forbidden"))
        [record] = records
        self.assertIn(f"\r\nShifter-Tunnel: {record.tunnelId}\r\n".encode(), self.attempts[0].written[0])
        self.assertEqual(
            (record.client, record.destination, record.connectTarget, record.proxy, record.status, record.result,
             record.how, record.bytesUp, record.bytesDown, record.ended - record.started),
            ("192.0.2.2:40000", "203.0.113.7:443", "203.0.113.7:443", "proxy1.test:3128", 403, "proxy-status",
             "refused at the SYN: proxy answered 403 Forbidden", 0, 0, 0.25),
        )

    def test_proxyDown(self) -> None:
        """
        A proxy that refuses the connection, with none left to try, refuses
        the SYN.
        """
        self.send(syn(1))
        attempt = self.attempts[0]
        attempt.receiver.proxyConnectFailed(attempt, Failure(ConnectionRefusedError()))
        self.assertRefused("proxy-connect", "cannot connect to proxy: Connection was refused", attemptsLeft=False)

    def test_everyProxyDown(self) -> None:
        """
        With every proxy marked down, the SYN is refused at once.
        """
        self.owner.pool.markDown(self.owner.pool.proxies[0], "down for the test")
        self.send(syn(1))
        self.assertEqual(self.attempts, [])
        self.assertRefused("no-proxy", "every proxy is down")

    def test_serverUnreachable(self) -> None:
        """
        A 5xx from the only proxy refuses the SYN.
        """
        self.send(syn(1))
        self.answered(self.attempts[0], ConnectResponse(503, "Service Unavailable"))
        self.assertRefused("proxy-status", "proxy answered 503 Service Unavailable")

    def test_garbage(self) -> None:
        """
        An answer that is not HTTP refuses the SYN.
        """
        self.send(syn(1))
        attempt = self.attempts[0]
        attempt.receiver.proxyConnected(attempt)
        attempt.receiver.proxyInvalid(attempt, "not HTTP")
        self.assertRefused("proxy-garbage", "bad answer from proxy: not HTTP")

    def test_closedBeforeAnswer(self) -> None:
        """
        A proxy that closes before answering refuses the SYN.
        """
        self.send(syn(1))
        attempt = self.attempts[0]
        attempt.receiver.proxyConnected(attempt)
        attempt.receiver.proxyLost(attempt, Failure(ConnectionDone()))
        self.assertRefused("proxy-closed", "proxy closed the connection before answering")

    def test_holdTimeout(self) -> None:
        """
        No answer within the hold timeout refuses the SYN, at most a
        deadline bucket after it.
        """
        self.makeHolder(timeout=1.5)
        self.send(syn(1))
        self.attempts[0].receiver.proxyConnected(self.attempts[0])
        self.clock.advance(1.4)
        self.assertEqual(self.queue.verdicts, [])
        self.clock.advance(0.2)
        self.assertRefused("setup-timeout", "tunnel not open within --hold-timeout 1.5 s (was handshaking)")
        self.assertLessEqual(self.holder.longestHold, 1.6)

    def test_connectTimeoutThenNext(self) -> None:
        """
        A proxy that does not connect within --connect-timeout is given up
        for the next, within the hold timeout.
        """
        self.makeHolder(proxies=2, timeout=10.0)
        self.send(syn(1))
        self.clock.advance(2.1)
        self.assertTrue(self.attempts[0].aborted)
        self.answered(self.attempts[1])
        self.assertEqual(self.queue.verdicts, [("accept", 1)])

    def test_clientNotAllowed(self) -> None:
        """
        A client outside --allow is refused at the SYN, before any proxy is
        asked.
        """
        import ipaddress

        self.makeHolder(allowedClients=(ipaddress.ip_network("10.0.0.0/8"),))
        self.send(syn(1))
        self.assertEqual(self.attempts, [])
        self.assertRefused("client-denied", "client 192.0.2.2 is not in an --allow network")

    def test_portNotAllowed(self) -> None:
        """
        A destination port outside --allow-port is refused at the SYN.
        """
        self.makeHolder(allowedPorts=frozenset({8443}))
        self.send(syn(1))
        self.assertRefused("port-denied", "destination port 443 is not an --allow-port")

    def test_refusedDestination(self) -> None:
        """
        A destination Shifter never tunnels to (here a loopback address) is
        refused at the SYN, before any proxy is asked.
        """
        self.send(syn(1, destination="127.0.0.1"))
        self.assertEqual((self.attempts, self.queue.verdicts), ([], [("reject", 1)]))
        self.assertEqual(self.counters(), {"destination": 1})
        self.assertEqual(len(self.lines("refused at the SYN: destination 127.0.0.1 is a loopback address")), 1)

    def test_proxyAsDestination(self) -> None:
        """
        A SYN to the proxy itself is refused: never a loop.
        """
        self.send(syn(1, destination="198.51.100.1", destinationPort=3128))
        self.assertEqual(self.attempts, [])
        self.assertEqual(self.queue.verdicts, [("reject", 1)])
        self.assertEqual(self.counters(), {"loop": 1})


class CopiesTests(HolderTestCase):
    def test_copyWhileHeld(self) -> None:
        """
        A retransmitted SYN (same source and sequence number) while the
        first is held is dropped, and costs no second CONNECT.
        """
        self.send(syn(1))
        self.send(syn(2))
        self.send(syn(3))
        self.assertEqual(len(self.attempts), 1)
        self.assertEqual(self.queue.verdicts, [("drop", 2), ("drop", 3)])
        self.answered(self.attempts[0])
        self.assertEqual(self.queue.verdicts[-1], ("accept", 1))
        self.assertEqual(self.holder.counters["retransmits"], 2)

    def test_copyAfterAccept(self) -> None:
        """
        A copy after the first was accepted is accepted too (the SYN-ACK
        was lost, or crossed it); still one CONNECT.
        """
        self.send(syn(1))
        self.answered(self.attempts[0])
        self.send(syn(2))
        self.assertEqual(self.queue.verdicts, [("accept", 1), ("accept", 2)])
        self.assertEqual(len(self.attempts), 1)

    def test_copyAfterClaim(self) -> None:
        """
        A copy read after the connection took its tunnel is accepted (it
        goes to that connection), without a new CONNECT.
        """
        self.send(syn(1))
        self.answered(self.attempts[0])
        self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object())
        self.send(syn(2))
        self.assertEqual(self.queue.verdicts, [("accept", 1), ("accept", 2)])
        self.assertEqual((len(self.attempts), self.queue.held), (1, set()))

    def test_copyAfterRefusal(self) -> None:
        """
        A copy of a refused SYN is refused again (the first reset may have
        been lost), without a new CONNECT.
        """
        self.send(syn(1))
        self.answered(self.attempts[0], ConnectResponse(403, "Forbidden"))
        self.send(syn(2))
        self.assertEqual(self.queue.verdicts, [("reject", 1), ("reject", 2)])
        self.assertEqual(len(self.attempts), 1)

    def test_copyRememberedForTheHoldTimeout(self) -> None:
        """
        A verdict is remembered for the hold timeout; after it, the same SYN
        is held anew.
        """
        self.send(syn(1))
        self.answered(self.attempts[0], ConnectResponse(403, "Forbidden"))
        self.clock.advance(5.1)
        self.send(syn(2))
        self.assertEqual((len(self.attempts), self.queue.held), (2, {2}))

    def test_newConnectionAfterClaim(self) -> None:
        """
        Another sequence number from the source of a connection that took
        its tunnel is a new connection, held.
        """
        self.send(syn(1, sequence=1000))
        self.answered(self.attempts[0])
        self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object())
        self.send(syn(2, sequence=9000))
        self.assertEqual((len(self.attempts), self.queue.held), (2, {2}))

    def test_samePortOtherDestination(self) -> None:
        """
        A client may use one port for connections to two destinations at
        once: each SYN is its own, neither replaces the other.
        """
        self.send(syn(1, sequence=1000))
        self.send(syn(2, sequence=5000, destination="203.0.113.8"))
        first, second = self.attempts
        self.assertFalse(first.aborted)
        self.answered(second, ConnectResponse(403, "Forbidden"))
        self.answered(first)
        self.assertEqual(self.queue.verdicts, [("reject", 2), ("accept", 1)])
        self.assertIs(self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object()).attempt, first)

    def test_newConnectionSameSource(self) -> None:
        """
        A SYN from the same source with another sequence number is a new
        connection: the old held SYN is dropped and its attempt given up.
        """
        self.send(syn(1, sequence=1000))
        self.send(syn(2, sequence=5000))
        first, second = self.attempts
        self.assertTrue(first.aborted)
        self.assertEqual(self.queue.verdicts, [("drop", 1)])
        self.answered(second)
        self.assertEqual(self.queue.verdicts, [("drop", 1), ("accept", 2)])
        # A late report from the first attempt changes nothing.
        first.receiver.proxyAnswered(first, OK)
        self.assertEqual(len(self.queue.verdicts), 2)

    def test_newConnectionAfterAccept(self) -> None:
        """
        A new connection from the source of an accepted SYN whose tunnel was
        never taken closes that tunnel.
        """
        self.send(syn(1, sequence=1000))
        self.answered(self.attempts[0])
        self.send(syn(2, sequence=5000))
        self.assertTrue(self.attempts[0].aborted)
        self.assertEqual(len(self.attempts), 2)
        self.assertEqual(self.queue.held, {2})


class LimitsTests(HolderTestCase):
    def test_unclaimed(self) -> None:
        """
        An open tunnel that no connection takes within the hold timeout of
        its SYN's acceptance is closed, with one line.
        """
        self.send(syn(1))
        self.answered(self.attempts[0])
        self.clock.advance(5.1)
        self.assertTrue(self.attempts[0].aborted)
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(self.holder.counters["unclaimed"], 1)
        self.assertEqual(len(self.lines("no connection took it within 5 s")), 1)

    def test_proxyClosesWhileWaiting(self) -> None:
        """
        A proxy that closes the open tunnel before the client's connection
        is accepted leaves nothing to take: that connection will connect
        afresh.
        """
        self.send(syn(1))
        attempt = self.attempts[0]
        self.answered(attempt)
        attempt.receiver.proxyLost(attempt, Failure(ConnectionDone()))
        self.assertIsNone(self.holder.claim("192.0.2.2", 40000, "203.0.113.7", 443, object()))

    def test_startFailsRefused(self) -> None:
        """
        A held SYN whose start raises is refused with a reset, like any
        other internal error: one line, counted, and nothing left held.
        """
        def broken(client: str) -> list[Any]:
            raise RuntimeError("the pool broke")

        self.patch(self.owner.pool, "candidates", broken)
        self.send(syn(1))
        self.assertEqual((self.queue.verdicts, self.queue.held), ([("reject", 1)], set()))
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(len(self.lines("internal error on start while deciding")), 1)
        self.assertEqual(self.counters(), {"internal": 1})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fullRefused(self) -> None:
        """
        With --max-connections tunnels open, a SYN is refused at once.
        """
        self.makeHolder(maxConnections=1)
        self.owner.active.add(object())
        self.send(syn(1))
        self.assertEqual((self.attempts, self.queue.verdicts), ([], [("reject", 1)]))
        self.assertEqual(self.counters(), {"limit": 1})

    def test_perClientLimit(self) -> None:
        """
        A client with --max-connections-per-client connections open or SYNs
        held has its next SYN refused; another client's is held.
        """
        self.makeHolder(maxConnectionsPerClient=3)
        self.owner.clientLimit.admit("192.0.2.2")
        self.send(syn(1, port=1))
        self.send(syn(2, port=2))
        self.send(syn(3, port=3))
        self.send(syn(4, port=1, source="192.0.2.3"))
        self.assertEqual(self.queue.verdicts, [("reject", 3)])
        self.assertEqual(self.queue.held, {1, 2, 4})
        self.assertEqual(self.counters(), {"client-limit": 1})
        # A refused or finished SYN no longer counts.
        self.answered(self.attempts[0], ConnectResponse(403, "Forbidden"))
        self.send(syn(5, port=5))
        self.assertIn(5, self.queue.held)

    def test_repeatableRefusalsRateLimited(self) -> None:
        """
        Refusals a client can repeat at will (here a destination Shifter
        never tunnels to) are logged once per reason per interval, then
        counted.
        """
        for n in range(5):
            self.send(syn(n + 1, port=1000 + n, destination="127.0.0.1"))
        self.assertEqual(len(self.lines("refused at the SYN")), 1)
        self.assertEqual(self.counters(), {"destination": 5})
        self.clock.advance(10)
        self.assertEqual(len(self.lines("4 more like it not logged")), 1)

    def test_clientCausedFailuresRateLimited(self) -> None:
        """
        Failures a client can cause again and again (a destination the
        proxy refuses, one it never answers for within the hold timeout)
        are logged once per kind per interval too, each SYN still counted.
        """
        self.makeHolder(timeout=1.0)
        for n in range(5):
            self.send(syn(n + 1, port=1000 + n))
            self.answered(self.attempts[-1], ConnectResponse(403, "Forbidden"))
        for n in range(5):
            self.send(syn(n + 10, port=2000 + n))
        self.clock.pump([0.5] * 3)
        self.assertEqual(self.counters(), {"proxy-status": 5, "setup-timeout": 5})
        self.assertEqual(len(self.lines("refused at the SYN: proxy answered 403")), 1)
        self.assertEqual(len(self.lines("refused at the SYN: tunnel not open within --hold-timeout")), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.lines("4 more like it not logged")), 2)

    def test_overTheLimitPassed(self) -> None:
        """
        Past --max-connections (held SYNs and open tunnels together), a SYN
        is accepted at once, not held: it will be tunnelled after its
        handshake, as without --hold-syn.
        """
        self.makeHolder(maxConnections=2)
        self.owner.active.add(object())
        self.send(syn(1, port=1))
        self.send(syn(2, port=2))
        self.assertEqual(len(self.attempts), 1)
        self.assertEqual(self.queue.verdicts, [("accept", 2)])
        self.assertEqual(self.holder.counters["passed"], 1)

    def test_stop(self) -> None:
        """
        Stopping drops every held SYN (its client sends it again) and closes
        every open tunnel not taken, then says what was done.
        """
        self.send(syn(1, port=1))
        self.send(syn(2, port=2))
        self.answered(self.attempts[1])
        self.holder.stop()
        self.assertEqual(self.queue.verdicts, [("accept", 2), ("drop", 1)])
        self.assertTrue(all(a.aborted for a in self.attempts))
        self.assertEqual(self.holder.entries, {})
        self.assertEqual(len(self.lines("hold-syn: 2 SYNs held, 1 accepted, 0 refused")), 1)

    def test_everyPacketOneVerdict(self) -> None:
        """
        Whatever happens to them, every SYN handed to the holder gets
        exactly one verdict (the recording queue refuses a second), and none
        is held after the hold timeout.
        """
        self.makeHolder(proxies=2, timeout=3.0)
        outcomes = [OK, ConnectResponse(403, "Forbidden"), None, ConnectResponse(502, "Bad Gateway")]
        packetId = 0
        for n in range(40):
            packetId += 1
            self.send(syn(packetId, port=1000 + n))
            if n % 3 == 0:
                packetId += 1
                self.send(syn(packetId, port=1000 + n))  # a copy
        for n, attempt in enumerate(list(self.attempts)):
            outcome = outcomes[n % len(outcomes)]
            if outcome is not None and not attempt.aborted:
                self.answered(attempt, outcome)
        for attempt in list(self.attempts):
            if not attempt.aborted and attempt.receiver.state != H.ACCEPTED:
                attempt.receiver.proxyConnectFailed(attempt, Failure(ConnectionRefusedError()))
        self.clock.advance(3.1)
        self.assertEqual(self.queue.held, set())
        self.assertEqual(sorted(p for _, p in self.queue.verdicts), list(range(1, packetId + 1)))


class PendingPolicy:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def decide(self, request: Any) -> Deferred:
        self.requests.append(request)
        return Deferred()


def heldSynIn(test: HolderTestCase, state: str) -> H.HeldSyn:
    """
    A held SYN brought to C{state}.
    """
    if state == H.DECIDING:
        test.owner.policy = PendingPolicy()
    if state == H.AUTHENTICATING:
        auth = ProxyAuth(Credentials("CORP\\alice", "s3cret"))
        auth.ntlm = True
        test.makeHolder(auth=auth)
    if state == H.HELD:
        # Held, and its start not yet come.
        start, H.HeldSyn.start = H.HeldSyn.start, lambda self: None  # type: ignore[method-assign]
        try:
            test.send(syn(1))
        finally:
            H.HeldSyn.start = start  # type: ignore[method-assign]
    else:
        test.send(syn(1))
    entry = test.holder.entries[("192.0.2.2", 40000, "203.0.113.7", 443)]
    if state in (H.HELD, H.DECIDING):
        assert entry.state == state, (entry.state, state)
        return entry
    attempt = test.attempts[-1]
    if state == H.HANDSHAKING:
        attempt.receiver.proxyConnected(attempt)
    elif state == H.AUTHENTICATING:
        # The proxy was known to ask for NTLM: its 407 holds the challenge.
        attempt.receiver.proxyConnected(attempt)
        attempt.receiver.proxyAnswered(attempt, ntlmChallenge(attempt.written[-1]))
    elif state == H.ACCEPTED:
        test.answered(attempt)
    elif state == H.DONE:
        test.answered(attempt, ConnectResponse(403, "Forbidden"))
    assert entry.state == state, (entry.state, state)
    return entry


class TableTests(HolderTestCase):
    def test_everyPairDeclared(self) -> None:
        """
        The table names an action for every state and every event.
        """
        for event in H.EVENTS:
            self.assertEqual(set(H.TABLE[event]), set(H.STATES), event)

    def fire(self, entry: H.HeldSyn, event: str) -> Any:
        attempt = entry.attempt or RecordingAttempt(None, entry)
        copy = syn(2)
        calls: dict[str, Any] = {
            H.START: entry.start,
            H.DECIDED: lambda: entry.decided(None),
            H.DECIDE_FAILED: lambda: entry.decideFailed(Failure(RuntimeError("policy broke"))),
            H.PROXY_CONNECTED: lambda: entry.proxyConnected(attempt),
            H.PROXY_CONNECT_FAILED: lambda: entry.proxyConnectFailed(attempt, Failure(ConnectionRefusedError())),
            H.PROXY_ANSWERED: lambda: entry.proxyAnswered(attempt, OK),
            H.PROXY_INVALID: lambda: entry.proxyInvalid(attempt, "not HTTP"),
            H.PROXY_DATA: lambda: entry.proxyData(attempt, b"data"),
            H.PROXY_ENDED: lambda: entry.proxyEnded(attempt),
            H.PROXY_LOST: lambda: entry.proxyLost(attempt, Failure(ConnectionDone())),
            # Nothing has set a held SYN's deadline before its start.
            H.TIMED_OUT: entry.timedOut if entry.state == H.HELD else lambda: self.clock.advance(30),
            H.RETRANSMITTED: lambda: entry.retransmitted(copy),
            H.SUPERSEDED: entry.superseded,
            H.CLAIMED: lambda: entry.claimed(object()),
            H.STOP: entry.stop,
        }
        return calls[event]()

    def test_everyPairGivesEveryVerdict(self) -> None:
        """
        In every state, every event leaves the SYN and any copy of it with
        exactly one verdict or still held (never both, never neither once
        the SYN is done), and a pair that cannot happen refuses a held SYN
        with one internal-error line.
        """
        impossible = {
            (H.CONNECTING, e) for e in (H.PROXY_ANSWERED, H.PROXY_INVALID, H.PROXY_DATA, H.PROXY_ENDED, H.PROXY_LOST)
        } | {
            (state, e) for state in (H.HANDSHAKING, H.AUTHENTICATING)
            for e in (H.PROXY_CONNECTED, H.PROXY_CONNECT_FAILED, H.PROXY_DATA)
        } | {
            (H.ACCEPTED, e) for e in (H.PROXY_CONNECTED, H.PROXY_CONNECT_FAILED, H.PROXY_ANSWERED, H.PROXY_INVALID)
        } | {(H.HELD, e) for e in (H.DECIDED, H.DECIDE_FAILED, H.TIMED_OUT)} | {
            (state, H.START) for state in (H.DECIDING, H.CONNECTING, H.HANDSHAKING, H.AUTHENTICATING, H.ACCEPTED)
        }
        for state in H.STATES:
            for event in H.EVENTS:
                self.makeHolder()
                entry = heldSynIn(self, state)
                self.fire(entry, event)
                where = f"({state}, {event})"
                given = [p for _, p in self.queue.verdicts]
                self.assertEqual(len(given), len(set(given)), where)
                if event == H.RETRANSMITTED:
                    self.assertIn(2, given, where)
                if entry.state == H.DONE:
                    self.assertIn(1, given, where)
                    self.assertNotIn(entry, self.holder.entries.values(), where)
                elif entry.state in (H.HELD, H.DECIDING, H.CONNECTING, H.HANDSHAKING, H.AUTHENTICATING):
                    self.assertEqual(self.queue.held, {1}, where)
                internal = self.lines("internal error")
                if (state, event) in impossible:
                    self.assertEqual(len(internal), 1, where)
                    self.assertEqual(entry.state, H.DONE, where)
                    self.flushLoggedErrors(AssertionError)
                else:
                    self.assertEqual(internal, [], where)


class HolderBoundsTests(SynchronousTestCase):
    def test_timeoutPositive(self) -> None:
        """
        A hold timeout must be more than 0 seconds.
        """
        self.assertRaises(ValueError, SynHolder, Owner(), 0)

