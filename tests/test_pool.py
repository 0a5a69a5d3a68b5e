"""
Tests for L{shifter.pool}: the order proxies are tried in, and their health,
with a fake clock and endpoints.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shifter.pool import ProxyPool
from shifter.proxy import UpstreamProxy
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
        pool.health[self.proxies[0]].up = False
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
        pool.health[self.proxies[1]].up = False
        after = {client: pool.candidates(client)[0] for client in clients}
        moved = {client for client in clients if before[client] != after[client]}
        self.assertEqual(moved, {client for client in clients if before[client] is self.proxies[1]})

    def test_invalid(self) -> None:
        """
        A pool needs a proxy and a known balance.
        """
        self.assertRaises(ValueError, ProxyPool, [], self.clock)
        self.assertRaises(ValueError, ProxyPool, self.proxies, self.clock, "random")


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        [self.proxy] = makeProxies(1)
        self.pool = ProxyPool([self.proxy], self.clock, failureThreshold=3, downFor=10, maxDownFor=35)
        self.health = self.pool.health[self.proxy]

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

    def test_probedAfterBackOff(self) -> None:
        """
        When the back-off ends the proxy is probed with a TCP connection;
        if it connects, the proxy is up again.
        """
        self.markDown()
        self.clock.advance(9.9)
        self.assertEqual(self.proxy.endpoint.attempts, [])
        self.clock.advance(0.2)
        protocol, transport = self.proxy.endpoint.accept()
        self.assertTrue(transport.disconnecting, "probe connection left open")
        self.assertTrue(self.health.up)
        self.assertEqual(self.health.failures, 0)

    def test_failedProbeDoublesBackOff(self) -> None:
        """
        A failed probe keeps the proxy down for twice as long, up to the
        maximum.
        """
        self.markDown()
        waits = []
        for _ in range(3):
            [call] = self.clock.getDelayedCalls()
            waits.append(call.getTime() - self.clock.seconds())
            self.clock.advance(waits[-1])
            self.proxy.endpoint.refuse()
            self.assertFalse(self.health.up)
        self.assertEqual(waits, [10, 20, 35])

    def test_probeTimeout(self) -> None:
        """
        A probe that never connects fails after the probe timeout.
        """
        self.markDown()
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertFalse(self.health.up)
        [call] = [c for c in self.clock.getDelayedCalls() if c.active()]
        self.assertAlmostEqual(call.getTime() - self.clock.seconds(), 20)

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
