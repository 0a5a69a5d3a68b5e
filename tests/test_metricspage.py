"""
The metrics page (L{shifter.service.metricspage}) as Prometheus meets it:
scraped over real HTTP without a line in Shifter's log, with the build's
version, and every failure reason there before it first happens.
"""

from __future__ import annotations

import json
import socket

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import shifter
from shifter.service.metricspage import QuietSite, metricsSite
from shifter.service.metricsum import SummedPage, scrapeAddress, sumPages, summedSite, workerMetrics
from shifter.service.tap import Options, makeService
from shifter.tunnel.metrics import FAILURE_REASONS, TunnelStats
from shifter.tunnel.tunnel import RATE_LIMITED
from tests.support import socketDirectory
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

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        self.done.errback(reason)


class Stats:
    """
    What the metrics of a factory read, for a registry of its own.
    """

    def __init__(self) -> None:
        self.metrics = TunnelStats()
        self.metrics.collectFrom(lambda: 0, lambda: type("Pool", (), {"health": {}})())


def series_names(stats: Stats) -> set[str]:
    text = generate_latest(stats.metrics.registry).decode()
    return {f"{sample.name}{sorted(sample.labels.items())}"
            for family in text_string_to_metric_families(text) for sample in family.samples}


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

    def test_latencyHistograms(self) -> None:
        """
        The latency histograms, kept as plain integers, are served as
        prometheus_client's own histogram serves the same observations:
        every bucket (a value on a bound counts in it), the count and the
        sum.
        """
        from prometheus_client import CollectorRegistry, Histogram

        from shifter.tunnel.metrics import _LATENCY_BUCKETS

        observations = [0.0, 0.0004, 0.0005, 0.0007, 0.01, 0.3, 2.5, 9.9, 10.0, 11.0, 1e6]
        stats = Stats()
        reference = CollectorRegistry()
        histogram = Histogram("shifter_connect_seconds", "", buckets=_LATENCY_BUCKETS, registry=reference)
        for seconds in observations:
            stats.metrics.connectSeconds.observe(seconds)
            histogram.observe(seconds)

        def series(registry: CollectorRegistry) -> dict[str, float]:
            text = generate_latest(registry).decode()
            return {
                f"{sample.name}{sorted(sample.labels.items())}": sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name.startswith("shifter_connect_seconds") and not sample.name.endswith("_created")
            }

        ours, theirs = series(stats.metrics.registry), series(reference)
        self.assertEqual(ours, theirs)
        self.assertEqual(ours["shifter_connect_seconds_count[]"], len(observations))
        self.assertEqual(ours["shifter_connect_seconds_bucket[('le', '0.0005')]"], 3)
        self.assertIn("shifter_resolve_seconds_count[]", series_names(stats))

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


WORKER_0 = """\
# HELP shifter_tunnels_opened_total Tunnels opened.
# TYPE shifter_tunnels_opened_total counter
shifter_tunnels_opened_total 3.0
# HELP shifter_tunnel_failures_total Failures by reason.
# TYPE shifter_tunnel_failures_total counter
shifter_tunnel_failures_total{reason="proxy-status"} 1.0
shifter_tunnel_failures_total{reason="loop"} 0.0
# HELP shifter_proxy_up 1 while a proxy is up.
# TYPE shifter_proxy_up gauge
shifter_proxy_up{proxy="127.0.0.1:3128"} 1.0
# HELP shifter_build_info The Shifter that runs.
# TYPE shifter_build_info gauge
shifter_build_info{version="0.1.0"} 1.0
# HELP shifter_resolve_seconds Time to resolve.
# TYPE shifter_resolve_seconds histogram
shifter_resolve_seconds_bucket{le="0.001"} 2.0
shifter_resolve_seconds_bucket{le="+Inf"} 3.0
shifter_resolve_seconds_count 3.0
shifter_resolve_seconds_sum 0.004
# HELP shifter_resolve_seconds_created Time to resolve.
# TYPE shifter_resolve_seconds_created gauge
shifter_resolve_seconds_created 1.7e+09
"""

WORKER_1 = WORKER_0.replace(
    "shifter_tunnels_opened_total 3.0", "shifter_tunnels_opened_total 4.0"
).replace(
    'shifter_proxy_up{proxy="127.0.0.1:3128"} 1.0', 'shifter_proxy_up{proxy="127.0.0.1:3128"} 0.0'
).replace(
    'reason="proxy-status"} 1.0', 'reason="proxy-status"} 2.0'
).replace("shifter_resolve_seconds_created 1.7e+09", "shifter_resolve_seconds_created 1.8e+09")


def samplesOf(families: list) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families for sample in family.samples
    }


class SumTests(SynchronousTestCase):
    def test_sum(self) -> None:
        """
        Counters and histograms add up; a proxy is up only while every
        worker says so; the build's info and the creation times are not
        added.
        """
        summed = samplesOf(sumPages([WORKER_0, WORKER_1]))
        self.assertEqual(summed[("shifter_tunnels_opened_total", ())], 7)
        self.assertEqual(summed[("shifter_tunnel_failures_total", (("reason", "proxy-status"),))], 3)
        self.assertEqual(summed[("shifter_tunnel_failures_total", (("reason", "loop"),))], 0)
        self.assertEqual(summed[("shifter_proxy_up", (("proxy", "127.0.0.1:3128"),))], 0)
        self.assertEqual(summed[("shifter_build_info", (("version", "0.1.0"),))], 1)
        self.assertEqual(summed[("shifter_resolve_seconds_bucket", (("le", "+Inf"),))], 6)
        self.assertEqual(summed[("shifter_resolve_seconds_sum", ())], 0.008)
        self.assertEqual(summed[("shifter_resolve_seconds_created", ())], 1.8e9)

    def test_workerEndpoints(self) -> None:
        """
        Worker I serves on the port plus 1 + I, read at its interface, or
        at loopback for a wildcard; a non-TCP endpoint has no sum.
        """
        self.assertEqual(workerMetrics("tcp:9100:interface=127.0.0.1", 0), "tcp:9101:interface=127.0.0.1")
        self.assertEqual(scrapeAddress("tcp:9102:interface=192.0.2.1"), ("192.0.2.1", 9102))
        self.assertEqual(scrapeAddress("tcp:9102"), ("127.0.0.1", 9102))
        self.assertEqual(scrapeAddress("tcp6:9102"), ("::1", 9102))
        self.assertIsNone(workerMetrics("unix:/run/shifter/metrics", 0))
        self.assertIsNone(summedSite(reactor, "unix:/run/shifter/metrics", 2))


class SummedPageTests(TestCase):
    @inlineCallbacks
    def test_sumOfWorkers(self):  # type: ignore[no-untyped-def]
        """
        The parent's page, scraped over real HTTP, is the sum of the pages
        of the workers that answer (two here, on real ports, and a third
        that nothing serves), and says how many answered; scraping it logs
        nothing.
        """
        ports = []
        for opened in (3, 4):
            stats = Stats()
            stats.metrics.counters["opened"] = opened
            port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
                metricsSite(stats.metrics.registry)
            )
            self.addCleanup(port.stopListening)
            ports.append(port.getHost().port)
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        ports.append(dead.getsockname()[1])
        dead.close()
        site = QuietSite(SummedPage(reactor, [("127.0.0.1", p) for p in ports]))
        parent = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(parent.stopListening)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory = ScrapeFactory()
        reactor.connectTCP("127.0.0.1", parent.getHost().port, factory)
        answer = (yield factory.done).decode()
        self.assertTrue(answer.startswith("HTTP/1.0 200 "), answer[:80])
        body = answer.split("\r\n\r\n", 1)[1]
        summed = samplesOf(list(text_string_to_metric_families(body)))
        self.assertEqual(summed[("shifter_tunnels_opened_total", ())], 7)
        self.assertEqual(summed[("shifter_workers_scraped", ())], 2)
        self.assertEqual(summed[("shifter_build_info", (("version", shifter.__version__),))], 1)
        self.assertEqual(summed[("shifter_tunnel_failures_total", (("reason", "loop"),))], 0)
        self.assertEqual([formatEvent(e) for e in events], [])


class DrainTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_openWhileDraining(self):  # type: ignore[no-untyped-def]
        """
        While Shifter drains (stopping, with a connection still open), its
        metrics page and its control socket still answer; once the drain
        has ended they close.
        """
        directory = socketDirectory(self)
        options = Options()
        options.parseOptions([
            "--proxy", "127.0.0.1:3128", "--listen", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1", "--control", f"unix:{directory}/control",
        ])
        top = makeService(options, reactor=reactor)
        top.startService()
        shifterService = top.getServiceNamed("shifter")
        yield shifterService.ready
        [metrics] = [s for s in top if getattr(s, "what", "") == "metrics"]
        metricsPort = metrics.port.getHost().port
        factory = shifterService.factory
        lingering = type("Tunnel", (), {"clientHost": "192.0.2.2"})()
        factory.active.add(lingering)  # a connection the drain waits for
        stopping = top.stopService()
        self.assertFalse(stopping.called)
        scrape = ScrapeFactory()
        reactor.connectTCP("127.0.0.1", metricsPort, scrape)
        answer = yield scrape.done
        self.assertIn(b"shifter_connections_active 1.0", answer)
        control = ControlClient()
        yield clientFromString(reactor, f"unix:{directory}/control").connect(control)
        listed = yield control.ask(b'{"command": "proxies"}\n')
        self.assertTrue(json.loads(listed)["ok"])
        control.protocol.transport.loseConnection()
        yield control.protocol.lost
        factory.tunnelClosed(lingering)  # the drain ends
        yield stopping
        self.assertIsNone(metrics.port)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", metricsPort), timeout=5).close()


class ControlClient(Factory):
    """
    One question on the control socket, its one-line answer.
    """

    noisy = False

    def buildProtocol(self, addr: object) -> Protocol:
        self.protocol = LineProtocol()
        return self.protocol

    def ask(self, question: bytes) -> Deferred[bytes]:
        self.protocol.answer = Deferred()
        self.protocol.transport.write(question)
        return self.protocol.answer


class LineProtocol(Protocol):
    answer: Deferred[bytes]

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if b"\n" in data and not self.answer.called:
            self.answer.callback(data.split(b"\n", 1)[0])
