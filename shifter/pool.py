"""
Several upstream proxies: which to try for a client, in what order, and
which are down.

A proxy that refuses connections or times out C{failureThreshold} times in
a row is marked down for a back-off period; when that ends it is probed
with a plain TCP connection, and comes back up if the probe connects, or
stays down for twice as long if not.  Clients are never sent to a proxy
that is down; when every proxy is down they are closed at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.proxy import UpstreamProxy

BALANCES = ("failover", "round-robin", "source-hash")


@dataclass
class ProxyHealth:
    """
    What the pool knows of one proxy.

    @ivar up: whether clients may be sent to it.
    @ivar failures: connection failures in a row.
    @ivar downFor: the back-off of its current or next down period.
    @ivar probe: the pending probe (a timer, or a connection attempt).
    @ivar lastError: the reason of its last failure, or C{""}.
    """

    up: bool = True
    failures: int = 0
    downFor: float = 0.0
    probe: Any = None
    lastError: str = ""


class ProxyPool:
    """
    The configured proxies, their health, and the order to try them in.

    @ivar proxies: the proxies, in the order configured.
    @ivar health: each proxy's L{ProxyHealth}, by proxy.
    """

    log = Logger()

    def __init__(
        self,
        proxies: Sequence[UpstreamProxy],
        reactor: Any,
        balance: str = "failover",
        failureThreshold: int = 3,
        downFor: float = 10.0,
        maxDownFor: float = 300.0,
        probeTimeout: float = 5.0,
    ) -> None:
        if not proxies:
            raise ValueError("at least one proxy is needed")
        if balance not in BALANCES:
            raise ValueError(f"unknown balance {balance!r}")
        self.proxies = list(proxies)
        self.reactor = reactor
        self.balance = balance
        self.failureThreshold = failureThreshold
        self.firstDownFor = downFor
        self.maxDownFor = maxDownFor
        self.probeTimeout = probeTimeout
        self.health = {proxy: ProxyHealth(downFor=downFor) for proxy in self.proxies}
        self._next = 0
        self._stopped = False

    def candidates(self, clientHost: str) -> list[UpstreamProxy]:
        """
        The proxies to try for a client from C{clientHost}, best first: only
        those that are up, ordered by the balance policy.  Empty when every
        proxy is down.
        """
        up = [proxy for proxy in self.proxies if self.health[proxy].up]
        if len(up) <= 1 or self.balance == "failover":
            return up
        if self.balance == "round-robin":
            start = self._next % len(up)
            self._next += 1
            return up[start:] + up[:start]
        # source-hash: rendezvous hashing, so that a client keeps its proxy
        # and only the clients of a proxy that goes down move elsewhere.
        key = clientHost.encode()
        return sorted(up, key=lambda proxy: -zlib.crc32(key + b"|" + proxy.description.encode()))

    def succeeded(self, proxy: UpstreamProxy) -> None:
        """
        C{proxy} opened a tunnel (a valid 2xx answer to CONNECT).  (Proxies
        outside the pool, such as one an embedding program's policy chose,
        are not tracked.)
        """
        health = self.health.get(proxy)
        if health is None:
            return
        health.failures = 0
        health.downFor = self.firstDownFor

    def failed(self, proxy: UpstreamProxy, reason: str) -> None:
        """
        C{proxy} failed a tunnel: its connection was refused or timed out,
        it did not answer CONNECT in time, closed before answering, or
        answered with garbage.  After C{failureThreshold} in a row it is
        marked down.  (A tunnel given up on by Shifter itself, because its
        client left or Shifter is stopping, is not the proxy's failure and
        is never reported.)
        """
        health = self.health.get(proxy)
        if health is None or self._stopped:
            return
        health.lastError = reason
        if not health.up:
            return
        health.failures += 1
        if health.failures >= self.failureThreshold:
            self._markDown(proxy, reason)

    def _markDown(self, proxy: UpstreamProxy, reason: str) -> None:
        health = self.health[proxy]
        health.up = False
        self.log.warn(
            "proxy {proxy} marked down for {seconds:g} s: {reason}",
            proxy=proxy.description,
            seconds=health.downFor,
            reason=reason,
        )
        health.probe = self.reactor.callLater(health.downFor, self._probe, proxy)

    def _probe(self, proxy: UpstreamProxy) -> None:
        health = self.health[proxy]
        attempt: Deferred = proxy.endpoint.connect(Factory.forProtocol(Protocol))
        attempt.addTimeout(self.probeTimeout, self.reactor)
        health.probe = attempt

        def connected(protocol: Protocol) -> None:
            health.probe = None
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            health.up = True
            health.failures = 0
            health.downFor = self.firstDownFor
            self.log.info("proxy {proxy} is back up", proxy=proxy.description)

        def refused(failure: Failure) -> None:
            health.probe = None
            if self._stopped:
                return  # cancelled by stop(): no new period, no new probe
            health.lastError = f"probe failed: {failure.getErrorMessage()}"
            health.downFor = min(health.downFor * 2, self.maxDownFor)
            self._markDown(proxy, f"probe failed: {failure.getErrorMessage()}")

        attempt.addCallbacks(connected, refused)

    def stop(self) -> None:
        """
        Cancel pending probes, those waiting and those connecting, and
        schedule no more.
        """
        self._stopped = True
        for health in self.health.values():
            probe, health.probe = health.probe, None
            if isinstance(probe, Deferred):
                probe.cancel()
            elif probe is not None and probe.active():
                probe.cancel()
