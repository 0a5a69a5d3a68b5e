"""
The metrics page C{--metrics} serves, in Prometheus text format.

The text format is prometheus_client's own.  Its Twisted resource renders
in the reactor's thread pool; Shifter runs no threads, so L{MetricsPage}
renders in the reactor instead, which takes well under a millisecond.  This
module (and twisted.web with it) is loaded only when C{--metrics} is given.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import InfoMetricFamily, Metric

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import shifter


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


class QuietSite(Site):
    """
    A site that writes no line per request: a scrape every 15 s would be
    thousands of lines a day in Shifter's log, saying nothing.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class _BuildInfo:
    """
    C{shifter_build_info{version}}, always 1: which Shifter runs.
    """

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("shifter_build", "The Shifter that runs.", value={"version": shifter.__version__})


def metricsSite(registry: CollectorRegistry) -> Site:
    """
    The web site that serves C{registry}, and C{shifter_build_info}, at
    every path.
    """
    registry.register(_BuildInfo())
    return QuietSite(MetricsPage(registry))
