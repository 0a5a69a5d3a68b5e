"""
The metrics page (L{shifter.service.metricspage}) as Prometheus meets it:
scraped over real HTTP without a line in Shifter's log, with the build's
version, and every failure reason there before it first happens.
"""

from __future__ import annotations

from prometheus_client import generate_latest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import shifter
from shifter.service.metricspage import metricsSite
from shifter.tunnel.metrics import FAILURE_REASONS, TunnelStats
from shifter.tunnel.tunnel import RATE_LIMITED
from tests.test_operations import scrape


class Scrape(Protocol):
    """
    One GET of the page, read to the end.
    """

    def connectionMade(self) -> None:
        self.received = b""
        self.transport.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.factory.done.callback(self.received)


class ScrapeFactory(ClientFactory):
    protocol = Scrape
    noisy = False

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()


class Stats:
    """
    What the metrics of a factory read, for a registry of its own.
    """

    def __init__(self) -> None:
        self.metrics = TunnelStats()
        self.metrics.collectFrom(lambda: 0, lambda: type("Pool", (), {"health": {}})())


class MetricsPageTests(SynchronousTestCase):
    def test_everyReasonFromTheStart(self) -> None:
        """
        Every failure reason is a series at 0 before anything has failed,
        and the reasons a tunnel can fail for are all among them.
        """
        samples = scrape(Stats())
        for reason in FAILURE_REASONS:
            self.assertEqual(samples[f'shifter_tunnel_failures_total{{reason="{reason}"}}'], 0, reason)
        self.assertEqual(sorted(RATE_LIMITED | {"shutdown", "limit", "client-limit"}), sorted(FAILURE_REASONS))

    def test_countedReasonStillOne(self) -> None:
        """
        A reason that happened is counted in its one series.
        """
        stats = Stats()
        stats.metrics.counters["proxy-status"] += 2
        text = generate_latest(stats.metrics.registry).decode()
        self.assertEqual(text.count('shifter_tunnel_failures_total{reason="proxy-status"}'), 1)
        self.assertIn('shifter_tunnel_failures_total{reason="proxy-status"} 2.0', text)

    def test_buildInfo(self) -> None:
        """
        The site serves shifter_build_info with the version, at 1.
        """
        stats = Stats()
        metricsSite(stats.metrics.registry)
        text = generate_latest(stats.metrics.registry).decode()
        self.assertIn(f'shifter_build_info{{version="{shifter.__version__}"}} 1.0', text)


class ScrapeTests(TestCase):
    @inlineCallbacks
    def test_scrapesLogNothing(self):  # type: ignore[no-untyped-def]
        """
        Five scrapes over real HTTP are answered, and add no line to the
        log: no access line, no factory starting or stopping.
        """
        stats = Stats()
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            metricsSite(stats.metrics.registry)
        )
        self.addCleanup(port.stopListening)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(5):
            factory = ScrapeFactory()
            reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
            answer = yield factory.done
            self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:80])
            self.assertIn(b"shifter_build_info{", answer)
        self.assertEqual([formatEvent(e) for e in events], [])
