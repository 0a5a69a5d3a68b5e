"""
Tests for L{shifter.upstream.pool}: the order proxies are tried in, and their health,
with a fake clock and endpoints.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.auth import Credentials, ProxyAuth
from shifter.upstream.pool import DOWN, PROBING, TRIAL, UP, ProxyPool
from shifter.upstream.proxy import UpstreamProxy
from tests.test_tunnel import FakeProxyEndpoint


def makeProxies(count: int) -> list[UpstreamProxy]:
    return [UpstreamProxy(f"p{i}.test:3128", FakeProxyEndpoint()) for i in range(count)]


class BalanceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.proxies = makeProxies(3)

    def test_failover(self) -> None:
        """
        failover tries the proxies in the configured order, skipping those
        that are down.
        """
        pool = ProxyPool(self.proxies, self.clock, "failover")
        self.assertEqual(pool.candidates("192.0.2.2"), self.proxies)
        pool.markDown(self.proxies[0], "down for the test")
        self.assertEqual(pool.candidates("192.0.2.2"), self.proxies[1:])

    def test_roundRobin(self) -> None:
        """
        round-robin starts each client at the next proxy, and still offers
        the others after it.
        """
        pool = ProxyPool(self.proxies, self.clock, "round-robin")
        firsts = [pool.candidates("192.0.2.2")[0] for _ in range(6)]
        self.assertEqual(firsts, self.proxies * 2)
        self.assertEqual(sorted(pool.candidates("x"), key=self.proxies.index), self.proxies)

    def test_sourceHashSticky(self) -> None:
        """
        source-hash gives a client the same proxy every time, spreads
        clients over the proxies, and when a proxy goes down only its own
        clients move.
        """
        pool = ProxyPool(self.proxies, self.clock, "source-hash")
        clients = [f"192.0.2.{i}" for i in range(1, 200)]
        before = {client: pool.candidates(client)[0] for client in clients}
        self.assertEqual(before, {client: pool.candidates(client)[0] for client in clients})
        spread = Counter(before.values())
        self.assertEqual(len(spread), 3)
        self.assertGreater(min(spread.values()), 30)
        pool.markDown(self.proxies[1], "down for the test")
        after = {client: pool.candidates(client)[0] for client in clients}
        moved = {client for client in clients if before[client] != after[client]}
        self.assertEqual(moved, {client for client in clients if before[client] is self.proxies[1]})

    def test_invalid(self) -> None:
        """
        A pool needs a known balance.  (It may have no proxy: with --pac,
        those the PAC script names.)
        """
        self.assertRaises(ValueError, ProxyPool, self.proxies, self.clock, "random")


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        [self.proxy] = makeProxies(1)
        self.pool = ProxyPool(
            [self.proxy], self.clock, failureThreshold=3, downFor=10, maxDownFor=35,
            connectTimeout=5, handshakeTimeout=2,
        )
        self.health = self.pool.health[self.proxy]
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_markedDownAfterThreshold(self) -> None:
        """
        A proxy is marked down after C{failureThreshold} failures in a row;
        a success in between resets the count.
        """
        self.pool.failed(self.proxy, "refused")
        self.pool.failed(self.proxy, "refused")
        self.pool.succeeded(self.proxy)
        self.pool.failed(self.proxy, "refused")
        self.pool.failed(self.proxy, "refused")
        self.assertTrue(self.health.up)
        self.pool.failed(self.proxy, "refused")
        self.assertFalse(self.health.up)
        self.assertEqual(self.pool.candidates("192.0.2.2"), [])

    def markDown(self) -> None:
        for _ in range(3):
            self.pool.failed(self.proxy, "refused")

    def nextWait(self) -> float:
        [call] = [c for c in self.clock.getDelayedCalls() if c.active()]
        return call.getTime() - self.clock.seconds()

    def probe(self, answer: bytes | None = b"HTTP/1.1 403 Forbidden\r\n"):  # type: ignore[no-untyped-def]
        """
        Let the back-off run out; the probe connects and gets C{answer}
        (or nothing, if C{None}).
        """
        self.clock.advance(self.nextWait())
        protocol, transport = self.proxy.endpoint.accept()
        if answer is not None:
            protocol.dataReceived(answer)
        return protocol, transport

    def test_probeAsksConnect(self) -> None:
        """
        When the back-off ends the proxy is asked CONNECT to the probe
        target; a status line, even a refusal, puts it on trial, and the
        probe's connection is dropped at once, the rest of its answer
        unread.
        """
        self.markDown()
        self.clock.advance(9.9)
        self.assertEqual(self.proxy.endpoint.attempts, [])
        self.clock.advance(0.1)
        protocol, transport = self.proxy.endpoint.accept()
        self.assertTrue(transport.value().startswith(b"CONNECT 255.255.255.255:9 HTTP/1.1\r\n"))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.health.state, PROBING)
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Len")
        self.assertTrue(transport.disconnecting, "probe connection left open")
        self.assertEqual(self.health.state, TRIAL)
        self.assertEqual(self.pool.candidates("192.0.2.2"), [self.proxy])

    def test_probeTarget(self) -> None:
        """
        The probe asks for the configured target.
        """
        self.pool.probeTarget = ("2001:db8::9", 9)
        self.markDown()
        _, transport = self.probe(None)
        self.assertTrue(transport.value().startswith(b"CONNECT [2001:db8::9]:9 HTTP/1.1\r\n"))

    def test_connectedIsNotAnswered(self) -> None:
        """
        A proxy that takes the probe's connection and never answers stays
        down, for twice as long: a connection alone is no sign of health.
        """
        self.markDown()
        _, transport = self.probe(None)
        self.clock.advance(1.9)
        self.assertEqual(self.health.state, PROBING)
        self.clock.advance(0.1)
        self.assertEqual(self.health.state, DOWN)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.nextWait(), 20)
        self.assertEqual(
            self.health.lastError, "probe CONNECT 255.255.255.255:9 failed: no answer to CONNECT within 2 s"
        )

    def test_garbageIsNotAnswered(self) -> None:
        """
        A probe answered with something that is not HTTP fails.
        """
        self.markDown()
        self.probe(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertEqual(self.health.state, DOWN)
        self.assertIn("not HTTP", self.health.lastError)

    def test_closedIsNotAnswered(self) -> None:
        """
        A probe whose connection is closed before a status line fails.
        """
        self.markDown()
        protocol, _ = self.probe(b"HTTP/1.1 40")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.health.state, DOWN)
        self.assertIn("closed the connection without answering", self.health.lastError)

    def test_failedProbeDoublesBackOff(self) -> None:
        """
        A failed probe keeps the proxy down for twice as long, up to the
        maximum.
        """
        self.markDown()
        waits = []
        for _ in range(3):
            waits.append(self.nextWait())
            self.clock.advance(waits[-1])
            self.proxy.endpoint.refuse()
            self.assertFalse(self.health.up)
        self.assertEqual(waits, [10, 20, 35])

    def test_probeTimeout(self) -> None:
        """
        A probe that never connects fails after the connect timeout.
        """
        self.markDown()
        self.clock.advance(10)
        self.clock.advance(4.9)
        self.assertEqual(self.health.state, PROBING)
        self.clock.advance(0.1)
        self.assertEqual(self.health.state, DOWN)
        self.assertEqual(self.nextWait(), 20)
        self.assertEqual(self.health.lastError, "probe CONNECT 255.255.255.255:9 failed: no connection within 5 s")

    def test_oneCanaryAtATime(self) -> None:
        """
        On trial, the proxy takes one tunnel at a time: while a canary is
        in flight it is offered to no other, and a canary given up on
        without a verdict lets the next tunnel be one.
        """
        self.markDown()
        self.probe()
        first, second = object(), object()
        self.assertTrue(self.pool.claim(self.proxy, first))
        self.assertEqual(self.pool.candidates("192.0.2.2"), [])
        self.assertFalse(self.pool.claim(self.proxy, second))
        self.assertEqual(self.pool.unavailable(),
                         "every proxy is down, or on trial with its one canary tunnel in flight")
        self.pool.release(self.proxy, second)
        self.assertFalse(self.pool.usable(self.proxy))
        self.pool.release(self.proxy, first)
        self.assertEqual(self.pool.candidates("192.0.2.2"), [self.proxy])
        self.assertTrue(self.pool.claim(self.proxy, second))

    def test_canaryFailureMarksDownDoubled(self) -> None:
        """
        A canary that fails marks the proxy down at once, without waiting
        for C{failureThreshold} failures, for twice the last back-off.
        """
        self.markDown()
        self.probe()
        self.pool.claim(self.proxy, object())
        self.pool.failed(self.proxy, "proxy did not answer CONNECT within 2 s")
        self.assertEqual(self.health.state, DOWN)
        self.assertEqual(self.nextWait(), 20)
        [line] = [formatEvent(e) for e in self.events if "canary" in formatEvent(e)]
        self.assertIn("marked down for 20 s: its canary tunnel failed: proxy did not answer", line)

    def test_backOffsDoubleAcrossComebacks(self) -> None:
        """
        A proxy that answers every probe and fails every canary is down
        for 10, 20, 35 (the maximum), 35 s: it comes back once per back-off.
        """
        self.markDown()
        waits = []
        for _ in range(4):
            waits.append(self.nextWait())
            self.probe()
            self.assertTrue(self.pool.claim(self.proxy, object()))
            self.pool.failed(self.proxy, "proxy closed the connection before answering")
        self.assertEqual(waits, [10, 20, 35, 35])

    def test_onlyATunnelResetsBackOff(self) -> None:
        """
        A canary answered with a refusal brings the proxy up, but leaves its
        back-off where it was: failing again doubles it.  Only a tunnel
        that opens (a 2xx) sets it back to the first.
        """
        self.markDown()
        self.probe()
        self.pool.claim(self.proxy, object())
        self.pool.answered(self.proxy, 403)
        self.assertEqual(self.health.state, UP)
        self.markDown()
        self.assertEqual(self.nextWait(), 20)
        self.probe()
        self.pool.claim(self.proxy, object())
        self.pool.succeeded(self.proxy)
        self.assertEqual(self.health.state, UP)
        self.markDown()
        self.assertEqual(self.nextWait(), 10)

    def test_lateFailureWhileDown(self) -> None:
        """
        A tunnel that started before the proxy went down and fails after
        changes nothing.
        """
        self.markDown()
        self.pool.failed(self.proxy, "refused")
        self.assertEqual((self.health.state, self.nextWait()), (DOWN, 10))

    def test_probeSendsWhatATunnelSends(self) -> None:
        """
        The probe carries the proxy's credentials and, for the PROXY
        protocol, a header saying it relays no client.
        """
        proxy = UpstreamProxy(
            "auth.test:3128", FakeProxyEndpoint(),
            auth=ProxyAuth(Credentials("user", "secret"), preemptiveBasic=True), passClient="proxy-v1",
        )
        pool = ProxyPool([proxy], self.clock, failureThreshold=1, downFor=1)
        pool.failed(proxy, "refused")
        self.clock.advance(1)
        _, transport = proxy.endpoint.accept()
        self.assertEqual(
            transport.value(),
            b"PROXY UNKNOWN\r\nCONNECT 255.255.255.255:9 HTTP/1.1\r\nHost: 255.255.255.255:9\r\n"
            b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n\r\n",
        )

    def test_stopCancelsProbes(self) -> None:
        """
        Stopping the pool leaves no probe scheduled.
        """
        self.markDown()
        self.pool.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopCancelsProbeInFlight(self) -> None:
        """
        Stopping the pool while a probe is connecting cancels that
        connection attempt, and the cancelled probe schedules no other.
        """
        self.markDown()
        self.clock.advance(10)
        [(_, attempt)] = self.proxy.endpoint.attempts
        self.pool.stop()
        self.assertTrue(attempt.called, "the probe's connection attempt was left running")
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_stopCancelsProbeWaitingForAnswer(self) -> None:
        """
        Stopping the pool while a probe waits for its answer drops the
        probe's connection and schedules nothing.
        """
        self.markDown()
        _, transport = self.probe(None)
        self.pool.stop()
        self.assertTrue(transport.disconnecting)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])


class LastErrorTests(SynchronousTestCase):
    def test_lastErrorKept(self) -> None:
        """
        Each failure's reason is kept as the proxy's last error, also while
        it is down, for operators to read.
        """
        proxies = makeProxies(1)
        pool = ProxyPool(proxies, MemoryReactorClock(), failureThreshold=1)
        self.assertEqual(pool.health[proxies[0]].lastError, "")
        pool.failed(proxies[0], "connection refused")
        self.assertEqual(pool.health[proxies[0]].lastError, "connection refused")
        self.assertFalse(pool.health[proxies[0]].up)
        pool.failed(proxies[0], "timed out")
        self.assertEqual(pool.health[proxies[0]].lastError, "timed out")
