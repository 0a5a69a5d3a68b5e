"""
The metrics page C{--metrics} serves, in Prometheus text format.

The text format is prometheus_client's own.  Its Twisted resource renders
in the reactor's thread pool; Shifter runs no threads, so L{MetricsPage}
renders in the reactor instead, which takes well under a millisecond.  This
module (and twisted.web with it) is loaded only when C{--metrics} is given.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from twisted.web.resource import Resource
from twisted.web.server import Request, Site


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


def metricsSite(registry: CollectorRegistry) -> Site:
    """
    The web site that serves C{registry} at every path.
    """
    site = Site(MetricsPage(registry))
    site.noisy = False
    return site
