"""
Several upstream proxies: which to try for a client, in what order, and
which are down.

A proxy that refuses connections or times out C{failureThreshold} times in
a row is marked down for a back-off period.  When that ends it is probed:
asked CONNECT to the probe target on a connection of Shifter's own
(L{shifter.upstream.probe}), which must bring an HTTP status line, any status, in
the handshake timeout; a proxy that accepts connections and never answers
(a wedged Squid, a full helper queue, a TLS certificate Shifter refuses)
fails it.  A proxy that answers is on trial: one client tunnel at a time
(the canary) goes to it, the others to the proxies that are up, until a
canary gets an answer; a canary that fails marks it down again at once.

Each down period lasts twice the one before, up to C{maxDownFor}, until a
tunnel through the proxy opens (a 2xx to a client's CONNECT): only that
sets the back-off back to its first value.  So a proxy that answers the
probe but not tunnels costs one client per back-off, and ever fewer.
Clients are never sent to a proxy that is down; when no proxy can take
them they are closed at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.upstream.connect import ConnectResponse
from shifter.upstream.probe import DEFAULT_PROBE_TARGET, askProxy
from shifter.upstream.proxy import UpstreamProxy

BALANCES = ("failover", "round-robin", "source-hash")


# A proxy's states.
UP = "up"  # clients are sent to it
DOWN = "down"  # marked down, until its back-off ends
PROBING = "probing"  # its probe is waiting for an answer
TRIAL = "trial"  # it answered the probe: one canary tunnel at a time


@dataclass
class ProxyHealth:
    """
    What the pool knows of one proxy.

    @ivar state: L{UP}, L{DOWN}, L{PROBING} or L{TRIAL}.
    @ivar failures: connection failures in a row, while up.
    @ivar downFor: the length of its last down period; 0 before any.
    @ivar proven: whether a tunnel through it has opened since its last
        down period (or it was never down): the next down period is then
        the first back-off again, else twice the last.
    @ivar probe: the pending probe (a timer, or a probe's C{Deferred}).
    @ivar canary: while on trial, who holds its one canary tunnel.
    @ivar lastError: the reason of its last failure, or C{""}.
    """

    state: str = UP
    failures: int = 0
    downFor: float = 0.0
    proven: bool = True
    probe: Any = None
    canary: Any = None
    lastError: str = ""

    @property
    def up(self) -> bool:
        """
        Whether clients may be sent to it freely (not down, not on trial).
        """
        return self.state == UP


class ProxyPool:
    """
    The configured proxies, their health, and the order to try them in.

    A tunnel (or a held SYN) asks L{candidates}, then L{claim}s each proxy
    just before connecting to it, and reports how it went: L{succeeded}
    (a 2xx), L{answered} (any other answer), L{failed} (no connection, no
    answer in time, a close or garbage before the answer); when it gives
    a proxy up without a verdict (its client left, its deadline passed)
    it L{release}s it.

    @ivar proxies: the proxies, in the order configured.
    @ivar health: each proxy's L{ProxyHealth}, by proxy.
    @ivar probeTarget: the (host, port) the probe asks CONNECT for.
    @ivar connectTimeout: seconds the probe waits for its connection.
    @ivar handshakeTimeout: seconds the probe waits, once connected, for
        the status line.
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
        probeTarget: tuple[str, int] = DEFAULT_PROBE_TARGET,
        connectTimeout: float = 10.0,
        handshakeTimeout: float = 10.0,
    ) -> None:
        if balance not in BALANCES:
            raise ValueError(f"unknown balance {balance!r}")
        self.proxies = list(proxies)
        self.reactor = reactor
        self.balance = balance
        self.failureThreshold = failureThreshold
        self.firstDownFor = downFor
        self.maxDownFor = maxDownFor
        self.probeTarget = probeTarget
        self.connectTimeout = connectTimeout
        self.handshakeTimeout = handshakeTimeout
        self.health = {proxy: ProxyHealth() for proxy in self.proxies}
        self._next = 0
        self._stopped = False
        # The warm connections kept to these proxies (set by
        # L{shifter.upstream.warm.WarmConnections}), or None.
        self.warm: Any = None

    def usable(self, proxy: UpstreamProxy) -> bool:
        """
        Whether a new tunnel may try C{proxy} now: it is up, or on trial
        with no canary tunnel in flight, or outside the pool (a proxy an
        embedding program's policy chose).
        """
        health = self.health.get(proxy)
        return health is None or health.state == UP or (health.state == TRIAL and health.canary is None)

    def candidates(self, clientHost: str) -> list[UpstreamProxy]:
        """
        The proxies to try for a client from C{clientHost}, best first: only
        those that are L{usable}, ordered by the balance policy.  Empty when
        none is.
        """
        up = [proxy for proxy in self.proxies if self.usable(proxy)]
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

    def track(self, proxy: UpstreamProxy) -> None:
        """
        Keep the health of C{proxy}, one that is not among the configured
        proxies (a proxy a PAC answer named), from now on: it is marked
        down, probed and brought back like them, and never offered by
        L{candidates}.
        """
        if proxy not in self.health:
            self.health[proxy] = ProxyHealth()

    def forget(self, proxy: UpstreamProxy) -> None:
        """
        Stop keeping the health of C{proxy}, one L{track}ed before.
        """
        if proxy in self.proxies:
            return
        health = self.health.pop(proxy, None)
        if health is not None and health.probe is not None:
            probe, health.probe = health.probe, None
            if isinstance(probe, Deferred) or probe.active():
                probe.cancel()

    def unavailable(self) -> str:
        """
        Why no proxy can take a tunnel now, for its log line.
        """
        if not self.proxies:
            return "no proxy is configured for connections the rules and the PAC script leave undecided"
        if any(health.state == TRIAL for health in self.health.values()):
            return "every proxy is down, or on trial with its one canary tunnel in flight"
        return "every proxy is down"

    def claim(self, proxy: UpstreamProxy, claimant: object) -> bool:
        """
        C{claimant} (a tunnel) is about to connect to C{proxy}: whether it
        may.  A proxy on trial takes one claimant at a time, its canary,
        until that one reports or L{release}s it; a proxy marked down since
        the candidates were given takes none.
        """
        health = self.health.get(proxy)
        if health is None or health.state == UP:
            return True
        if health.state != TRIAL:
            return False
        if health.canary is None:
            health.canary = claimant
        return health.canary is claimant

    def release(self, proxy: UpstreamProxy, claimant: object) -> None:
        """
        C{claimant} gave up on C{proxy} without a verdict (its client left,
        its deadline passed, Shifter is stopping): if it was the canary,
        the next tunnel may be.
        """
        health = self.health.get(proxy)
        if health is not None and health.canary is claimant:
            health.canary = None

    def succeeded(self, proxy: UpstreamProxy) -> None:
        """
        C{proxy} opened a tunnel (a valid 2xx answer to CONNECT): it is up,
        and its next down period, if any, is the first back-off again.
        (Proxies outside the pool, such as one an embedding program's
        policy chose, are not tracked.)
        """
        health = self.health.get(proxy)
        if health is None:
            return
        if self.warm is not None:
            self.warm.tunnelOpened(proxy)
        health.failures = 0
        health.proven = True
        if health.state == TRIAL:
            self._backUp(proxy, "a tunnel through it opened")

    def answered(self, proxy: UpstreamProxy, status: int) -> None:
        """
        C{proxy} answered a tunnel's CONNECT with C{status}, not a 2xx: it
        answers, so a proxy on trial is up again; its back-off stays where
        it is, as no tunnel opened.
        """
        health = self.health.get(proxy)
        if health is not None and health.state == TRIAL:
            health.failures = 0
            self._backUp(proxy, f"it answered a tunnel's CONNECT with {status}")

    def _backUp(self, proxy: UpstreamProxy, why: str) -> None:
        health = self.health[proxy]
        health.state = UP
        health.canary = None
        self.log.info("proxy {proxy} is back up: {why}", proxy=proxy.description, why=why)

    def failed(self, proxy: UpstreamProxy, reason: str) -> None:
        """
        C{proxy} failed a tunnel: its connection was refused or timed out,
        it did not answer CONNECT in time, closed before answering, or
        answered with garbage.  After C{failureThreshold} in a row it is
        marked down; on trial, at the first.  (A tunnel given up on by
        Shifter itself, because its client left or Shifter is stopping, is
        not the proxy's failure and is never reported.)
        """
        health = self.health.get(proxy)
        if health is None or self._stopped:
            return
        health.lastError = reason
        if health.state == TRIAL:
            self.markDown(proxy, f"its canary tunnel failed: {reason}")
        elif health.state == UP:
            health.failures += 1
            if health.failures >= self.failureThreshold:
                self.markDown(proxy, reason)
        # Down or probing: a tunnel that began before it went down.

    def markDown(self, proxy: UpstreamProxy, reason: str) -> None:
        """
        Send no tunnel to C{proxy} for a back-off period, then probe it.
        """
        health = self.health[proxy]
        if health.proven:
            health.downFor = self.firstDownFor
        else:
            health.downFor = min(health.downFor * 2, self.maxDownFor)
        health.proven = False
        health.state = DOWN
        health.failures = 0
        health.canary = None
        self.log.warn(
            "proxy {proxy} marked down for {seconds:g} s: {reason}",
            proxy=proxy.description,
            seconds=health.downFor,
            reason=reason,
        )
        health.probe = self.reactor.callLater(health.downFor, self._probe, proxy)
        if self.warm is not None:
            self.warm.proxyDown(proxy)

    def _probe(self, proxy: UpstreamProxy) -> None:
        health = self.health[proxy]
        health.state = PROBING
        host, port = self.probeTarget
        try:
            asking = askProxy(
                proxy, host, port, self.reactor, self.connectTimeout, self.handshakeTimeout, statusOnly=True
            )
        except Exception as e:
            health.probe = None
            self._probeFailed(proxy, str(e))
            return
        health.probe = asking

        def answered(response: ConnectResponse) -> None:
            health.probe = None
            health.state = TRIAL
            health.canary = None
            self.log.info(
                "proxy {proxy} answered the probe ({status}): on trial, one tunnel at a time until one is answered",
                proxy=proxy.description,
                status=response.refusal or f"{response.status} {response.reason}".rstrip(),
            )

        def failed(failure: Failure) -> None:
            health.probe = None
            if self._stopped or failure.check(CancelledError):
                return  # cancelled by stop(): no new period, no new probe
            self._probeFailed(proxy, failure.getErrorMessage())

        asking.addCallbacks(answered, failed)

    def _probeFailed(self, proxy: UpstreamProxy, why: str) -> None:
        host, port = self.probeTarget
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = f"probe CONNECT {target} failed: {why}"
        self.health[proxy].lastError = reason
        self.markDown(proxy, reason)

    def start(self) -> Deferred[Any]:
        """
        Start what the proxies' logins need before the first tunnel (the
        Kerberos tickets of those that may ask for Negotiate).

        @return: a C{Deferred} that fires, never with a failure, once each
            first login has succeeded or failed.
        """
        logins = []
        if not self._stopped:
            for proxy in self.proxies:
                if proxy.auth is not None:
                    login = proxy.auth.start()
                    if login is not None:
                        logins.append(login)
        return DeferredList(logins, consumeErrors=True)

    def stop(self) -> None:
        """
        Cancel pending probes, those waiting and those connecting, and
        schedule no more; stop the proxies' ticket keepers.
        """
        self._stopped = True
        if self.warm is not None:
            self.warm.stop()
        for proxy in self.proxies:
            if proxy.auth is not None:
                proxy.auth.stop()
        for health in self.health.values():
            probe, health.probe = health.probe, None
            if isinstance(probe, Deferred):
                probe.cancel()
            elif probe is not None and probe.active():
                probe.cancel()
