"""
Warm proxy connections: connections to an upstream proxy opened (and for
an C{https://} proxy, TLS-handshaked) before a client needs them, so that a
tunnel's CONNECT goes out the moment its destination is known, without
waiting a round trip for the TCP connection (three, with TLS).

How many each proxy gets follows the recent rate of new tunnels to it:
none until a tunnel through that proxy has opened, then enough to cover the tunnels
that come while one is being made, at most C{limit} per proxy (their own
cap on descriptors: C{limit} times the number of proxies), and none for a
proxy the pool has marked down.  When no tunnel has asked for a proxy for
C{lifetime} seconds, its warm connections expire and are not replaced:
an idle Shifter holds none after two lifetimes at most.

A warm connection carries at most one CONNECT: once taken it belongs to
that tunnel, and is never given back.  It is closed unused after
C{lifetime} seconds (and another opened if tunnels still come), well
before a proxy's own idle limit (Squid's C{request_start_timeout}, 5
minutes by default); a proxy that closes one sooner teaches the pool a
shorter lifetime for it.  A warm connection the proxy has closed (its
EOF, or a reset, seen by the reactor, or found when it is taken) or that
the proxy wrote to unasked is dropped, never used.

Only the pool's own HTTP proxies are kept warm, and only while their authentication
(if any) is per request (Basic, Digest): NTLM and Negotiate authenticate
a connection through its first CONNECT's exchange, which cannot happen
before a tunnel has a destination, so those proxies stay cold.
"""

from __future__ import annotations

import math
import socket
from collections import deque
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from shifter.upstream.connector import connectNow, noDelay
from shifter.upstream.proxy import HTTP

# A warm connection's states.
CONNECTING = "connecting"  # the TCP connection is being made
HANDSHAKING = "handshaking"  # connected; the TLS handshake is under way
READY = "ready"  # may be taken
TAKEN = "taken"  # handed to a tunnel: no longer this module's
CLOSED = "closed"  # gone, unused

# Its events.
CONNECTED = "connected"  # the TCP connection is made
HANDSHAKEN = "handshaken"  # the TLS handshake is done
FAILED = "failed"  # the connection could not be made
DATA = "data"  # the proxy sent bytes before any request
LOST = "lost"  # the proxy closed it, or it broke
EXPIRED = "expired"  # its lifetime passed unused
TAKE = "take"  # a tunnel takes it
DROP = "drop"  # the pool lets it go (proxy down, Shifter stopping)

# Seconds a proxy gets no new warm connection after one failed or the
# proxy closed one: a proxy that refuses or closes every connection costs
# one attempt per this, not a loop.
HOLD_OFF = 1.0

# Seconds over which the rate of new tunnels is measured.
RATE_WINDOW = 5.0


def warmable(proxy: Any) -> bool:
    """
    Whether C{proxy} may be kept warm: an HTTP proxy (plain or TLS) whose
    authentication, if any, is per request.
    """
    if proxy.kind != HTTP:
        return False
    auth = proxy.auth
    return auth is None or auth.scheme in ("none", "basic", "digest")


@implementer(IHandshakeListener)
class _WarmProtocol(Protocol):
    """
    The protocol on a warm connection until it is taken: it reports to
    its L{WarmConnection} and reads nothing.
    """

    def __init__(self, warm: WarmConnection) -> None:
        self.warm = warm

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.warm.handle(CONNECTED, self)

    def handshakeCompleted(self) -> None:
        self.warm.handle(HANDSHAKEN)

    def dataReceived(self, data: bytes) -> None:
        self.warm.handle(DATA)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.warm.handle(LOST)


class _WarmFactory(ClientFactory):
    noisy = False

    def __init__(self, warm: WarmConnection) -> None:
        self.warm = warm

    def buildProtocol(self, addr: object) -> _WarmProtocol:
        return _WarmProtocol(self.warm)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.warm.handle(FAILED)


class WarmConnection:
    """
    One connection to a proxy, opened ahead of demand.

    @ivar state: L{CONNECTING}, L{HANDSHAKING}, L{READY}, L{TAKEN} or
        L{CLOSED}.
    @ivar transport: the connection's transport once connected (TCP, or
        TLS over TCP).
    """

    def __init__(self, pool: WarmConnections, proxy: Any) -> None:
        self.pool = pool
        self.proxy = proxy
        self.state = CONNECTING
        self.transport: Any = None
        self.readyAt: float | None = None
        self.startedAt = pool.clock.seconds()
        self._connector: Any = None
        self._pending: Any = None
        self._timer: Any = None

    def start(self) -> None:
        factory = _WarmFactory(self)
        self._timer = self.pool.clock.callLater(self.pool.lifetimeOf(self.proxy), self.handle, EXPIRED)
        if self.proxy.direct is not None:
            connector = connectNow(self.proxy.direct, factory)
            if self.state == CONNECTING:  # not failed at once
                self._connector = connector
        else:
            pending = self.proxy.endpoint.connect(factory)
            if self.state == CONNECTING:
                self._pending = pending
            pending.addErrback(lambda reason: self.handle(FAILED))

    def handle(self, event: str, *args: Any) -> Any:
        """
        Apply C{event}; see L{_TABLE} for what each state does with each.
        """
        return _TABLE[self.state, event](self, *args)

    # The actions.

    def _connected(self, protocol: _WarmProtocol) -> None:
        self._connector = self._pending = None
        self.transport = protocol.transport
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self.state = HANDSHAKING
        else:
            self._ready()

    def _handshaken(self) -> None:
        self._ready()

    def _ready(self) -> None:
        self.state = READY
        self.readyAt = self.pool.clock.seconds()
        self.pool.ready(self)

    def _failed(self) -> None:
        self._close()
        self.pool.failed(self)

    def _spoke(self) -> None:
        self._close()
        self.pool.failed(self)

    def _lost(self) -> None:
        self.transport = None
        self._close()
        self.pool.closedByProxy(self)

    def _lostEarly(self) -> None:
        # Lost while connecting or handshaking: it never was ready.
        self.transport = None
        self._close()
        self.pool.failed(self)

    def _expired(self) -> None:
        self._timer = None
        was = self.state
        self._close()
        self.pool.expired(self, unused=was == READY)

    def _drop(self) -> None:
        self._close()
        self.pool.forget(self)

    def _take(self) -> Any:
        """
        Hand the connection over: its transport, or C{None} if it turns
        out the proxy has closed it (then it is dropped).
        """
        if not self._alive():
            self._close()
            self.pool.closedByProxy(self)
            return None
        self.state = TAKEN
        self._cancelTimer()
        transport, self.transport = self.transport, None
        self.pool.forget(self)
        return transport

    def _ignore(self, *args: Any) -> None:
        pass

    def _close(self) -> None:
        self.state = CLOSED
        self._cancelTimer()
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.stop()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abortConnection()

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _alive(self) -> bool:
        """
        Whether the proxy has not closed the connection, by a look at the
        socket that reads nothing: an end of file or an error there is a
        close the reactor has not reported yet; bytes waiting on a plain
        connection are the proxy speaking unasked (on a TLS one, they may
        be the handshake's last records).
        """
        transport = self.transport
        tls = isinstance(transport, TLSMemoryBIOProtocol)
        if tls:
            transport = transport.transport
        try:
            sock = transport.getHandle()
            waiting = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return tls and waiting != b""


def _unexpected(connection: WarmConnection, *args: Any) -> None:
    raise AssertionError(f"a warm connection {connection.state} never expects this event")


# Every (state, event): what it does.
_TABLE: dict[tuple[str, str], Callable[..., Any]] = {
    (CONNECTING, CONNECTED): WarmConnection._connected,
    (CONNECTING, HANDSHAKEN): _unexpected,
    (CONNECTING, FAILED): WarmConnection._failed,
    (CONNECTING, DATA): _unexpected,
    (CONNECTING, LOST): WarmConnection._lostEarly,
    (CONNECTING, EXPIRED): WarmConnection._expired,
    (CONNECTING, TAKE): _unexpected,  # only ready ones are offered
    (CONNECTING, DROP): WarmConnection._drop,
    (HANDSHAKING, CONNECTED): _unexpected,
    (HANDSHAKING, HANDSHAKEN): WarmConnection._handshaken,
    (HANDSHAKING, FAILED): WarmConnection._failed,
    (HANDSHAKING, DATA): WarmConnection._spoke,
    (HANDSHAKING, LOST): WarmConnection._lostEarly,
    (HANDSHAKING, EXPIRED): WarmConnection._expired,
    (HANDSHAKING, TAKE): _unexpected,
    (HANDSHAKING, DROP): WarmConnection._drop,
    (READY, CONNECTED): _unexpected,
    (READY, HANDSHAKEN): WarmConnection._ignore,  # (a renegotiation)
    (READY, FAILED): _unexpected,
    (READY, DATA): WarmConnection._spoke,
    (READY, LOST): WarmConnection._lost,
    (READY, EXPIRED): WarmConnection._expired,
    (READY, TAKE): WarmConnection._take,
    (READY, DROP): WarmConnection._drop,
    # Taken: the tunnel's protocol has the transport, and hears its events.
    (TAKEN, CONNECTED): _unexpected,
    (TAKEN, HANDSHAKEN): WarmConnection._ignore,
    (TAKEN, FAILED): _unexpected,
    (TAKEN, DATA): WarmConnection._ignore,
    (TAKEN, LOST): WarmConnection._ignore,
    (TAKEN, EXPIRED): WarmConnection._ignore,
    (TAKEN, TAKE): _unexpected,
    (TAKEN, DROP): WarmConnection._ignore,
    # Closed: the aborted transport's own connectionLost, a late failure.
    (CLOSED, CONNECTED): WarmConnection._ignore,
    (CLOSED, HANDSHAKEN): WarmConnection._ignore,
    (CLOSED, FAILED): WarmConnection._ignore,
    (CLOSED, DATA): WarmConnection._ignore,
    (CLOSED, LOST): WarmConnection._ignore,
    (CLOSED, EXPIRED): WarmConnection._ignore,
    (CLOSED, TAKE): _unexpected,
    (CLOSED, DROP): WarmConnection._ignore,
}


class WarmConnections:
    """
    The warm connections of every proxy of a L{shifter.upstream.pool.ProxyPool}.

    @ivar limit: warm connections per proxy, at most (ready or being made).
    @ivar lifetime: seconds a warm connection is kept unused, at most.
    @ivar opened: warm connections opened (counted when ready).
    @ivar taken: warm connections a tunnel took.
    @ivar expiredUnused: warm connections closed unused at the end of
        their lifetime.
    @ivar proxyClosed: warm connections the proxy closed before use.
    @ivar failures: warm connections that could not be made (or that the
        proxy wrote to unasked).
    """

    log = Logger()

    def __init__(self, pool: Any, clock: Any, limit: int, lifetime: float = 60.0) -> None:
        if limit < 1:
            raise ValueError("warm connections need a limit of at least 1")
        self.pool = pool
        self.clock = clock
        self.limit = limit
        self.lifetime = lifetime
        # Each proxy's connections in the order they were started, oldest
        # first (a dict's keys: ordered, and removed in one step).
        self.connections: dict[Any, dict[WarmConnection, None]] = {}
        self.opened = self.taken = self.expiredUnused = self.proxyClosed = self.failures = 0
        self._demand: dict[Any, deque[float]] = {}
        self._lifetimes: dict[Any, float] = {}
        self._heldUntil: dict[Any, float] = {}
        self._turnaround: dict[Any, float] = {}
        self._holdTimers: dict[Any, Any] = {}
        self._proven: set[Any] = set()
        self._stopped = False
        pool.warm = self

    def lifetimeOf(self, proxy: Any) -> float:
        return self._lifetimes.get(proxy, self.lifetime)

    def openCount(self, proxy: Any = None) -> int:
        """
        Warm connections open or being made (to C{proxy}, or to all).
        """
        if proxy is None:
            return sum(len(held) for held in self.connections.values())
        return len(self.connections.get(proxy, ()))

    def readyCount(self) -> int:
        return sum(1 for held in self.connections.values() for c in held if c.state == READY)

    def take(self, proxy: Any) -> Any:
        """
        A tunnel is about to connect to C{proxy}: the transport of a ready
        warm connection to it, now the tunnel's alone, or C{None} (then
        the tunnel connects as it would without).  Either way the demand
        is counted; the tunnel then calls L{refill}, once its own
        connection is on its way, so that no warm connection gets ahead
        of it at the proxy.
        """
        if self._stopped or proxy not in self.pool.health or not warmable(proxy):
            # Stopped, or a route of its own per destination (DIRECT) or
            # per policy decision: nothing to keep warm.
            return None
        now = self.clock.seconds()
        demand = self._demand.setdefault(proxy, deque(maxlen=4096))
        demand.append(now)
        self._forgetOldDemand(demand, now)
        transport = None
        for connection in list(self.connections.get(proxy, ())):  # the oldest first; taking may forget it
            if connection.state != READY:
                continue
            transport = connection.handle(TAKE)
            if transport is not None:
                self.taken += 1
                break
        return transport

    @staticmethod
    def _forgetOldDemand(demand: deque[float], now: float) -> None:
        """
        Keep in C{demand} only the times within L{RATE_WINDOW} of C{now}
        (and always the latest), so that counting the recent rate costs
        nothing per tunnel however high the rate.
        """
        while len(demand) > 1 and now - demand[0] > RATE_WINDOW:
            demand.popleft()

    def target(self, proxy: Any) -> int:
        """
        How many warm connections C{proxy} should have now: none if no
        tunnel through it has opened yet, if no tunnel asked for it within
        a lifetime, or if the pool says it is not up; else enough for the tunnels that come while one is made
        (the recent rate times the time one takes, and one more), at most
        L{limit}.
        """
        demand = self._demand.get(proxy)
        if not demand or self._stopped or proxy not in self._proven:
            return 0
        now = self.clock.seconds()
        if now - demand[-1] > self.lifetime:
            return 0
        health = self.pool.health.get(proxy)
        if health is not None and not health.up:
            return 0
        self._forgetOldDemand(demand, now)
        recent = len(demand) - (now - demand[0] > RATE_WINDOW)
        turnaround = self._turnaround.get(proxy, 0.05)
        return min(self.limit, 1 + math.ceil(recent / RATE_WINDOW * turnaround * 2))

    def refill(self, proxy: Any) -> None:
        """
        Open warm connections to C{proxy} up to its L{target}.
        """
        if proxy not in self._demand or self.clock.seconds() < self._heldUntil.get(proxy, 0.0):
            return
        held = self.connections.setdefault(proxy, {})
        missing = self.target(proxy) - len(held)
        for _ in range(max(0, missing)):
            connection = WarmConnection(self, proxy)
            held[connection] = None
            connection.start()
            if connection.state == CLOSED:
                break  # it failed at once

    # What the connections report.

    def ready(self, connection: WarmConnection) -> None:
        self.opened += 1
        took = connection.pool.clock.seconds() - connection.startedAt
        proxy = connection.proxy
        previous = self._turnaround.get(proxy)
        self._turnaround[proxy] = took if previous is None else (previous * 7 + took) / 8

    def forget(self, connection: WarmConnection) -> None:
        self.connections.get(connection.proxy, {}).pop(connection, None)

    def failed(self, connection: WarmConnection) -> None:
        self.failures += 1
        self.forget(connection)
        self._holdOff(connection.proxy)

    def _holdOff(self, proxy: Any) -> None:
        """
        Open no warm connection to C{proxy} for L{HOLD_OFF} seconds, then
        as many as its demand needs.
        """
        self._heldUntil[proxy] = self.clock.seconds() + HOLD_OFF
        timer = self._holdTimers.get(proxy)
        if timer is None or not timer.active():
            self._holdTimers[proxy] = self.clock.callLater(HOLD_OFF, self.refill, proxy)

    def closedByProxy(self, connection: WarmConnection) -> None:
        self.proxyClosed += 1
        self.forget(connection)
        proxy = connection.proxy
        self._holdOff(proxy)
        if connection.readyAt is not None:
            # The proxy's idle limit is shorter than the lifetime: keep
            # them half as long as it allowed this one.
            age = self.clock.seconds() - connection.readyAt
            lifetime = self.lifetimeOf(proxy)
            if 2 * HOLD_OFF <= age < lifetime:
                self._lifetimes[proxy] = max(HOLD_OFF, age / 2)
                self.log.info(
                    "proxy {proxy} closed a warm connection after {age:.1f} s unused: "
                    "keeping them {lifetime:.1f} s",
                    proxy=proxy.description, age=age, lifetime=self._lifetimes[proxy],
                )

    def expired(self, connection: WarmConnection, unused: bool) -> None:
        if unused:
            self.expiredUnused += 1
        self.forget(connection)
        self.refill(connection.proxy)

    # The pool's news.

    def tunnelOpened(self, proxy: Any) -> None:
        """
        A tunnel through C{proxy} opened: it may have warm connections
        from now on.  Until then it has none, so that a proxy that refuses
        every tunnel, or a gateway rule that sends Shifter's connections
        to it somewhere else, is not sent more connections than tunnels.
        """
        if proxy not in self._proven:
            self._proven.add(proxy)
            self.refill(proxy)

    def proxyDown(self, proxy: Any) -> None:
        """
        C{proxy} was marked down: its warm connections are closed.
        """
        for connection in list(self.connections.get(proxy, ())):
            connection.handle(DROP)

    def stop(self) -> None:
        """
        Close every warm connection and open no more.
        """
        self._stopped = True
        for timer in self._holdTimers.values():
            if timer.active():
                timer.cancel()
        for held in list(self.connections.values()):
            for connection in list(held):
                connection.handle(DROP)
