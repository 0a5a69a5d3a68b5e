"""
Prometheus metrics: what Shifter has done, served over HTTP by C{--metrics}.

Counts that the tunnels keep anyway (tunnels, failures by reason, bytes)
are plain integers in a L{TunnelStats}, read when scraped, so the relay pays
an addition per chunk for them.  Latencies are observed once per connection
into L{LatencyHistogram}s, plain integers too.

They are served by L{shifter.service.metricspage}, loaded only with C{--metrics}.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from math import inf
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from shifter.tunnel.sniff import ECH_VERDICTS

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# Counters of TunnelStats.counters that are not failures.
_OUTCOMES = {"opened", "closed", "direct"}

# Every reason a client connection can fail for (the kinds of
# L{shifter.tunnel.tunnel.Tunnel._fail}, and the two limits the factory
# refuses by), each exported from the start, at 0 until it happens, so
# that a rate or an alert on it works before its first occurrence.
FAILURE_REASONS = (
    "client-denied", "client-gone", "client-limit", "destination", "internal", "limit", "loop",
    "no-proxy", "policy", "port-denied", "proxy-auth", "proxy-closed", "proxy-connect",
    "proxy-garbage", "proxy-status", "resolver", "setup-timeout", "shutdown", "timeout",
)


class LatencyHistogram:
    """
    A Prometheus histogram of seconds kept as plain integers and read when
    scraped: an observation is a search among the bounds and two additions
    (a C{prometheus_client} histogram takes a lock and a call per bucket
    and sum, twice per tunnel).

    @ivar counts: observations per bucket, the last one above every bound
        (not cumulative: L{metric} sums them).
    """

    __slots__ = ("name", "documentation", "bounds", "counts", "sum")

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bound at or above it
        self.sum += seconds

    def metric(self) -> HistogramMetricFamily:
        buckets = []
        total = 0
        for bound, count in zip((*self.bounds, inf), self.counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class TunnelStats:
    """
    What the tunnels of one factory have done, counted as it happens.
    Every counter only goes up: bytes are counted when they are delivered
    (handed to the receiving socket's kernel), a client's early bytes too.

    @ivar counters: how tunnels ended and why they failed, by short name
        (C{"opened"}, C{"closed"}, C{"resolver"}, C{"proxy-status"}, ...);
        C{"direct"} counts the tunnels opened DIRECT (among C{"opened"}).
    @ivar openTunnels: tunnels relaying now.
    @ivar bytesUp: bytes delivered from clients to proxies.
    @ivar bytesDown: bytes delivered from proxies to clients.
    @ivar bytesDroppedUp: bytes read from clients and never delivered (the
        proxy connection failed, or was dropped).
    @ivar bytesDroppedDown: the same from proxies to clients.
    @ivar proxyAnswers: the proxies' answers to CONNECT by status class.
    @ivar ech: connections whose first bytes were read (C{--connect-target}
        sni, host or auto), by what they showed of Encrypted Client Hello:
        C{"none"}, C{"ech"} (may be GREASE), C{"grease"}, C{"inner"},
        C{"unknown"} (a ClientHello not read through), as
        L{shifter.tunnel.sniff.Sniffed.ech} says.
    @ivar retries: connection attempts moved on to another proxy.
    @ivar acceptPauses: times accepting paused for lack of descriptors.
    @ivar registry: the registry C{--metrics} serves.
    @ivar resolveSeconds: from accepting a client to knowing its original
        destination.
    @ivar connectSeconds: from asking for the proxy connection to the
        proxy's 2xx answer.
    """

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.openTunnels = 0
        self.bytesUp = 0
        self.bytesDown = 0
        self.bytesDroppedUp = 0
        self.bytesDroppedDown = 0
        self.proxyAnswers: Counter[str] = Counter()
        self.ech: Counter[str] = Counter()
        self.retries = 0
        self.acceptPauses = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.resolveSeconds = LatencyHistogram(
            "shifter_resolve_seconds", "Time to find a connection's original destination.",
        )
        self.connectSeconds = LatencyHistogram(
            "shifter_connect_seconds", "Time from connecting to the proxy to its 2xx answer to CONNECT.",
        )

    def collectFrom(self, activeCount: Callable[[], int], pool: Callable[[], Any]) -> None:
        """
        Serve these counts, with the number of connections that
        C{activeCount} gives and the health of the proxies of the pool
        that C{pool} gives, at each scrape.
        """
        self.registry.register(_StatsCollector(self, activeCount, pool))


class _StatsCollector:
    """
    Reads the counts at scrape time.
    """

    def __init__(self, stats: TunnelStats, activeCount: Callable[[], int], pool: Callable[[], Any]) -> None:
        self._stats = stats
        self._activeCount = activeCount
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        counters = stats.counters
        yield GaugeMetricFamily(
            "shifter_tunnels_open", "Tunnels relaying now.", value=stats.openTunnels
        )
        yield GaugeMetricFamily(
            "shifter_connections_active",
            "Client connections accepted and not yet finished (tunnels and handshakes).",
            value=self._activeCount(),
        )
        yield CounterMetricFamily(
            "shifter_tunnels_opened", "Tunnels opened (the proxy answered 2xx).",
            value=counters["opened"],
        )
        yield CounterMetricFamily(
            "shifter_tunnels_direct", "Tunnels opened DIRECT: to the destination itself, through no proxy.",
            value=counters["direct"],
        )
        ech = CounterMetricFamily(
            "shifter_tunnels_ech",
            "Client connections whose first bytes were read, by what their ClientHello showed of "
            "Encrypted Client Hello: none, ech (may be GREASE), grease, inner, unknown (not read through).",
            labels=["ech"],
        )
        for kind in ("none", *ECH_VERDICTS):  # each from 0, as the failures
            ech.add_metric([kind], stats.ech[kind])
        yield ech
        failures = CounterMetricFamily(
            "shifter_tunnel_failures",
            "Client connections that did not become a tunnel, by reason.",
            labels=["reason"],
        )
        for reason in sorted(set(FAILURE_REASONS).union(counters).difference(_OUTCOMES)):
            failures.add_metric([reason], counters[reason])
        yield failures
        answers = CounterMetricFamily(
            "shifter_proxy_answers", "Proxy answers to CONNECT, by status class.",
            labels=["status_class"],
        )
        for statusClass, count in sorted(stats.proxyAnswers.items()):
            answers.add_metric([statusClass], count)
        yield answers
        relayed = CounterMetricFamily(
            "shifter_bytes", "Bytes delivered, up (client to proxy) and down.",
            labels=["direction"],
        )
        relayed.add_metric(["up"], stats.bytesUp)
        relayed.add_metric(["down"], stats.bytesDown)
        yield relayed
        dropped = CounterMetricFamily(
            "shifter_bytes_dropped",
            "Bytes read from one side and never delivered to the other (it failed, or was dropped).",
            labels=["direction"],
        )
        dropped.add_metric(["up"], stats.bytesDroppedUp)
        dropped.add_metric(["down"], stats.bytesDroppedDown)
        yield dropped
        proxyUp = GaugeMetricFamily(
            "shifter_proxy_up", "1 while a proxy is up, 0 while it is marked down.",
            labels=["proxy"],
        )
        for proxy, health in self._pool().health.items():
            proxyUp.add_metric([proxy.description], 1 if health.up else 0)
        yield proxyUp
        yield CounterMetricFamily(
            "shifter_proxy_retries",
            "Connection attempts moved on to the next proxy after one failed.",
            value=stats.retries,
        )
        warm = getattr(self._pool(), "warm", None)
        if warm is not None:
            yield GaugeMetricFamily(
                "shifter_warm_connections_open",
                "Warm proxy connections open or being made, not yet taken.",
                value=warm.openCount(),
            )
            yield GaugeMetricFamily(
                "shifter_warm_connections_ready", "Warm proxy connections ready to be taken.",
                value=warm.readyCount(),
            )
            warmEnds = CounterMetricFamily(
                "shifter_warm_connections",
                "Warm proxy connections by what became of them: opened (ready), taken by a tunnel, "
                "expired unused, closed by the proxy unused, failed.",
                labels=["outcome"],
            )
            warmEnds.add_metric(["opened"], warm.opened)
            warmEnds.add_metric(["taken"], warm.taken)
            warmEnds.add_metric(["expired"], warm.expiredUnused)
            warmEnds.add_metric(["proxy-closed"], warm.proxyClosed)
            warmEnds.add_metric(["failed"], warm.failures)
            yield warmEnds
        yield CounterMetricFamily(
            "shifter_accept_pauses",
            "Times accepting paused because descriptors or memory ran out.",
            value=stats.acceptPauses,
        )
        yield stats.resolveSeconds.metric()
        yield stats.connectSeconds.metric()
