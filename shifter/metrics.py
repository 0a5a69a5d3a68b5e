"""
Prometheus metrics: what Shifter has done, served over HTTP by C{--metrics}.

Counts that the tunnel code keeps anyway (tunnels, failures by reason, bytes)
are read from the factory when scraped, so the relay pays nothing per byte
for them.  Latencies are observed into histograms once per connection.

The text format is prometheus_client's own.  Its Twisted resource renders
in the reactor's thread pool; Shifter runs no threads, so L{MetricsPage}
renders in the reactor instead, which takes well under a millisecond.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from twisted.web.resource import Resource
from twisted.web.server import Request

if TYPE_CHECKING:
    from shifter.downstream import ShifterFactory

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# Counters of ShifterFactory.counters that are not failures.
_OUTCOMES = {"opened", "closed"}


class TunnelMetrics:
    """
    The metrics of one L{ShifterFactory}, in a registry of their own.

    @ivar registry: the registry to serve.
    @ivar resolveSeconds: from accepting a client to knowing its original
        destination.
    @ivar connectSeconds: from asking for the proxy connection to the
        proxy's 2xx answer.
    """

    def __init__(self, factory: ShifterFactory) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.resolveSeconds = Histogram(
            "shifter_resolve_seconds",
            "Time to find a connection's original destination.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.connectSeconds = Histogram(
            "shifter_connect_seconds",
            "Time from connecting to the proxy to its 2xx answer to CONNECT.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_FactoryCollector(factory))


class _FactoryCollector:
    """
    Reads the factory's own counts at scrape time.
    """

    def __init__(self, factory: ShifterFactory) -> None:
        self._factory = factory

    def collect(self) -> Iterator[Metric]:
        factory = self._factory
        counters = factory.counters
        yield GaugeMetricFamily(
            "shifter_tunnels_open", "Tunnels relaying now.", value=factory.openTunnels
        )
        yield GaugeMetricFamily(
            "shifter_connections_active",
            "Client connections accepted and not yet finished (tunnels and handshakes).",
            value=len(factory.active),
        )
        yield CounterMetricFamily(
            "shifter_tunnels_opened", "Tunnels opened (the proxy answered 2xx).",
            value=counters["opened"],
        )
        failures = CounterMetricFamily(
            "shifter_tunnel_failures",
            "Client connections that did not become a tunnel, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(counters.items()):
            if reason not in _OUTCOMES:
                failures.add_metric([reason], count)
        yield failures
        answers = CounterMetricFamily(
            "shifter_proxy_answers", "Proxy answers to CONNECT, by status class.",
            labels=["status_class"],
        )
        for statusClass, count in sorted(factory.proxyAnswers.items()):
            answers.add_metric([statusClass], count)
        yield answers
        up, down = factory.bytesUp, factory.bytesDown
        for protocol in factory.active:
            up += protocol.received
            if protocol.upstream is not None:
                down += protocol.upstream.received
        relayed = CounterMetricFamily(
            "shifter_bytes", "Bytes relayed, up (client to proxy) and down.",
            labels=["direction"],
        )
        relayed.add_metric(["up"], up)
        relayed.add_metric(["down"], down)
        yield relayed
        proxyUp = GaugeMetricFamily(
            "shifter_proxy_up", "1 while a proxy is up, 0 while it is marked down.",
            labels=["proxy"],
        )
        for proxy, health in factory.pool.health.items():
            proxyUp.add_metric([proxy.description], 1 if health.up else 0)
        yield proxyUp
        yield CounterMetricFamily(
            "shifter_proxy_retries",
            "Connection attempts moved on to the next proxy after one failed.",
            value=factory.retries,
        )
        yield CounterMetricFamily(
            "shifter_accept_pauses",
            "Times accepting paused because descriptors or memory ran out.",
            value=factory.acceptPauses,
        )


class MetricsPage(Resource):
    """
    The metrics in Prometheus text format, rendered in the reactor.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
