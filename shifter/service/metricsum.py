"""
C{--metrics} with C{--workers}: the parent serves the sum of its workers'
metrics on the endpoint given, so Prometheus scrapes one target; worker I
serves its own on the port given plus 1 + I.

At each scrape the parent reads every worker's page (over TCP, in the
reactor, each within L{SCRAPE_TIMEOUT} seconds), adds up the samples of
the same name and labels, and writes the sum.  Counters, gauges of counts
and histograms add up; a proxy is up (C{shifter_proxy_up}) only while every
worker says so; C{shifter_build_info} and the C{_created} times are not
added.  C{shifter_workers_scraped} says how many workers answered: a
worker that does not answer (restarting) is left out of that scrape, so
counters can step back until it serves again.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from shifter.service.metricspage import QuietSite
from shifter.service.workers import ReusePortEndpoint, shiftPort

# Seconds a worker has to answer one scrape.
SCRAPE_TIMEOUT = 5.0

# The most bytes read from one worker's page.
MAX_PAGE = 16 << 20

# Samples combined otherwise than by adding.
_LEAST = ("shifter_proxy_up",)


def workerMetrics(description: str, index: int) -> str | None:
    """
    Where worker C{index} serves its own metrics: the C{--metrics} endpoint
    with its port moved up by 1 + C{index}; C{None} if it names no TCP
    port (then there is no sum, and worker 0 alone serves there).
    """
    return shiftPort(description, index + 1)


def scrapeAddress(description: str) -> tuple[str, int] | None:
    """
    The address the parent reads a worker's page at: the worker's
    endpoint, its interface, or loopback for a wildcard one.
    """
    listener = ReusePortEndpoint.fromString(None, description)
    if listener is None:
        return None
    host = listener.interface
    if host in ("", "0.0.0.0", "::"):
        host = "::1" if listener.family == socket.AF_INET6 else "127.0.0.1"
    return host, listener.port


def sumPages(pages: list[str]) -> list[Metric]:
    """
    The metric families of C{pages} (Prometheus text), their samples of the
    same name and labels added up (see the module's docstring for those
    that are not).
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for page in pages:
        for family in text_string_to_metric_families(page):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif family.type == "info" or family.name.endswith("_info") or sample.name.endswith("_created"):
                    samples[key] = max(samples[key], sample.value)
                elif family.name in _LEAST:
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, family in families.items():
        for (sampleName, labels), value in values[name].items():
            family.add_sample(sampleName, dict(labels), value)
    return list(families.values())


class _PageReader(Protocol):
    """
    One C{GET /metrics} over HTTP/1.0, read to the end.
    """

    transport: Any
    factory: Any

    def connectionMade(self) -> None:
        self.data = bytearray()
        self.transport.write(b"GET /metrics HTTP/1.0\r\nHost: shifter\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_PAGE:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.finished(bytes(self.data))


class _PageFactory(ClientFactory):
    protocol = _PageReader
    noisy = False

    def __init__(self) -> None:
        self.page: Deferred[str] = Deferred()

    def finished(self, data: bytes) -> None:
        head, _, body = data.partition(b"\r\n\r\n")
        if self.page.called:
            return
        if not head.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")) or len(data) > MAX_PAGE:
            self.page.errback(Failure(ValueError("no metrics page")))
        else:
            self.page.callback(body.decode("utf-8", "replace"))

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.page.called:
            self.page.errback(reason)


def readPage(reactor: Any, host: str, port: int) -> Deferred[str]:
    """
    The metrics page at C{host:port}, or a failure within
    L{SCRAPE_TIMEOUT} seconds.
    """
    factory = _PageFactory()
    connector = reactor.connectTCP(host, port, factory, timeout=SCRAPE_TIMEOUT)

    def timedOut(result: Any, timeout: float) -> Any:
        connector.disconnect()
        return result

    page = factory.page
    page.addTimeout(SCRAPE_TIMEOUT, reactor, onTimeoutCancel=timedOut)
    return page


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class SummedPage(Resource):
    """
    The sum of the workers' metrics pages, read at each request.
    """

    isLeaf = True

    def __init__(self, reactor: Any, addresses: list[tuple[str, int]]) -> None:
        super().__init__()
        self.reactor = reactor
        self.addresses = addresses

    def render_GET(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        pages = [
            readPage(self.reactor, host, port).addErrback(lambda _: None) for host, port in self.addresses
        ]

        def write(results: list[str | None]) -> None:
            if gone:
                return
            answered = [page for page in results if page is not None]
            try:
                families = sumPages(answered)
            except ValueError:
                families = []
            scraped = GaugeMetricFamily(
                "shifter_workers_scraped", "Workers whose metrics are in this sum.", value=len(answered)
            )
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families([*families, scraped]))
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(generate_latest(registry))
            request.finish()

        gatherResults(pages).addCallback(write)
        return NOT_DONE_YET


def summedSite(reactor: Any, description: str, workers: int) -> QuietSite | None:
    """
    The site the parent of C{workers} serves on C{description}, or C{None}
    when the workers' endpoints cannot be told (not a TCP endpoint).
    """
    addresses = []
    for index in range(workers):
        worker = workerMetrics(description, index)
        address = scrapeAddress(worker) if worker is not None else None
        if address is None:
            return None
        addresses.append(address)
    return QuietSite(SummedPage(reactor, addresses))
