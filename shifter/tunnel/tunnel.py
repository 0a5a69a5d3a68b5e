"""
The life of one tunnel, as an explicit state machine, sans I/O.

A client connection that netfilter redirected to Shifter goes through
these states::

  accepted -> resolving -> [sniffing] -> [deciding] -> connecting -> handshaking -> relaying
                                                        ^                 |            |
                                                        +-- next proxy ---+            +-> client-finished
                                                                                       +-> proxy-finished
  any state -> closing -> closed   (a failure, a deadline, a loss, the end of the relay, shutdown)

Everything that can happen to a tunnel is one of the events in L{EVENTS};
L{TABLE} says, for every state and every event, what the tunnel does, and
that is the only place where it is decided: the handlers keep facts (the
bytes counted, whether the client finished sending before the tunnel
opened, whether its connection is gone) but no flag sends an event to one
handler or another.  A pair that cannot happen (a proxy's answer while
resolving) is declared too, as L{Tunnel._impossible}, which closes the
connection with an error line rather than guessing.

The machine does no I/O itself.  It talks to its client connection through
L{ITunnelClient}, to proxy connections through the L{IProxyAttempt}s that
the client side makes for it, and to the factory that owns it through
L{ITunnelOwner}; each of them feeds it events by calling its methods.  So
the whole life of a tunnel is tested with plain objects, and the
protocols stay thin.

Deadlines: each stage has an end (C{stageEnd}: the end of the current
set-up stage or of the whole set-up, whichever is first; the end of the
idle period; the end of the closing grace).  The tunnel has one deadline
at a time in the owner's L{shifter.tunnel.deadlines.Deadlines}, which calls
L{Tunnel.timedOut}; it is never later than the stage's end, and moves
only to come earlier: set when the tunnel starts, to the earliest any
set-up stage can end, it usually stays there until the tunnel closes, and
one that passes before the stage's end is moved to that end then.  Two
deadline sets for a tunnel that opens and closes within its set-up time,
not one per stage.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional

from zope.interface import Attribute, Interface, implementer

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from shifter.interfaces import IProxyAttempt, IProxyReceiver, IRelay
from shifter.logs import QuickLogger
from shifter.tunnel.negotiation import (
    AUTHENTICATING,
    CONNECTING,
    DECIDE_FAILED,
    DECIDED,
    DECIDING,
    HANDSHAKING,
    PROXY_ANSWERED,
    PROXY_CONNECT_FAILED,
    PROXY_CONNECTED,
    PROXY_DATA,
    PROXY_ENDED,
    PROXY_EVENTS,
    PROXY_INVALID,
    PROXY_LOST,
    ProxyNegotiation,
    canonicalHost,
    destinationCheck,
    formatAddress,
)
from shifter.resolvers.resolver import Destination, ResolverError
from shifter.upstream.proxy import DIRECT
from shifter.tunnel.sniff import ECH, ECH_INNER
from shifter.tunnel.statetable import buildTable
from shifter.tunnel.tunnelid import newTunnelId

# The states.  Plain strings: they are dictionary keys on every event.
ACCEPTED = "accepted"
RESOLVING = "resolving"
SNIFFING = "sniffing"
RELAYING = "relaying"
CLIENT_FINISHED = "client-finished"
PROXY_FINISHED = "proxy-finished"
CLOSING = "closing"
CLOSED = "closed"

STATES = (
    ACCEPTED, RESOLVING, SNIFFING, DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING,
    RELAYING, CLIENT_FINISHED, PROXY_FINISHED, CLOSING, CLOSED,
)

# States before the tunnel opens, and while it is open.
SETUP = (RESOLVING, SNIFFING, DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING)
OPEN = (RELAYING, CLIENT_FINISHED, PROXY_FINISHED)

# The events.
START = "start"
RESOLVED = "resolved"
RESOLVE_FAILED = "resolve-failed"
CLIENT_DATA = "client-data"
CLIENT_ENDED = "client-ended"
CLIENT_LOST = "client-lost"
RELAY_ENDED = "relay-ended"
TIMED_OUT = "timed-out"
ABORT = "abort"

EVENTS = (
    START, RESOLVED, RESOLVE_FAILED, DECIDED, DECIDE_FAILED,
    CLIENT_DATA, CLIENT_ENDED, CLIENT_LOST,
    PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_ANSWERED, PROXY_INVALID,
    PROXY_DATA, PROXY_ENDED, PROXY_LOST, RELAY_ENDED, TIMED_OUT, ABORT,
)

# Failures that are Shifter refusing the client, before any proxy is
# asked.
REFUSALS = frozenset(("client-denied", "port-denied", "loop", "destination"))

# The failures whose lines are rate-limited (the owner's C{refusals}: one
# line per kind per interval, then a count; the counters still count each
# connection): every kind a client can cause again and again at will, so
# that connecting in a loop cannot flood the log.
RATE_LIMITED = REFUSALS | frozenset((
    # The client closes or resets before its tunnel opens (connect, reset).
    "client-gone",
    # A client that sends nothing while its name is awaited, or names a
    # destination the proxy is slow to reach.
    "setup-timeout",
    # A rule refusing the client's destination or name, or a policy
    # failing on what the client sent.
    "policy",
    # The proxy's answer for the destination the client chose (403, 503).
    "proxy-status",
    # No original destination: a connection made to Shifter's port
    # straight, or gone before the look-up answered.
    "resolver",
    # The last proxy failing for the client's destination (one that never
    # answers holds CONNECT until the handshake timeout, and some proxies
    # close on what they refuse): every new client repeats the line.
    "timeout", "proxy-connect", "proxy-garbage", "proxy-closed",
    # Every proxy down, or wanting credentials Shifter cannot give: a
    # proxy's problem, but each new client would log it again.
    "no-proxy", "proxy-auth",
    # A bug a client's input sets off, it can set off again; the first line
    # of each interval keeps its traceback.
    "internal",
))
# Not limited: "shutdown", Shifter stopping, which no client causes and
# which ends each connection once at most.


@dataclass(frozen=True)
class TunnelInfo:
    """
    A snapshot of one client connection and its tunnel, for operators.

    @ivar client: the client's address and port, as C{"192.0.2.2:50000"}
        or C{"[2001:db8::2]:50000"}.
    @ivar destination: the original destination, or C{"(unknown)"} until
        it is resolved.
    @ivar connectTarget: what CONNECT asks for (C{host:port}), or C{""}
        until that is decided.
    @ivar proxy: the proxy being tried or in use, or C{""} before one is.
    @ivar state: the tunnel's state (C{"resolving"}, C{"relaying"}, ...).
    @ivar bytesUp: bytes delivered to the proxy so far (handed to its
        socket's kernel).
    @ivar bytesDown: bytes delivered to the client so far.
    @ivar age: seconds since the client connection was accepted.
    @ivar ech: what the client's ClientHello showed of Encrypted Client
        Hello (L{shifter.tunnel.sniff.Sniffed.ech}), or C{""}: none, or
        nothing read (yet).
    @ivar tunnelId: the tunnel's id (L{shifter.tunnel.tunnelid}).
    @ivar decision: what decided where it goes (a rule, a PAC answer), when
        the policy names it; C{""} otherwise.
    """

    client: str
    destination: str
    connectTarget: str
    proxy: str
    state: str
    bytesUp: int
    bytesDown: int
    age: float
    ech: str = ""
    tunnelId: str = ""
    decision: str = ""


@dataclass(frozen=True)
class TunnelRecord:
    """
    What one tunnel was, once it has ended: the facts of its access-log
    line.  Times are the reactor's (seconds since the epoch); a stage the
    tunnel never reached has C{None}.

    @ivar tunnelId: the tunnel's id, sent to the proxy on CONNECT.
    @ivar started: when the client connection was accepted.
    @ivar ended: when both its connections were gone.
    @ivar client: the client's C{address:port}.
    @ivar destination: the original destination, or C{"(unknown)"}.
    @ivar connectTarget: what CONNECT asked for (C{host:port}), or C{""}
        if nothing was asked.
    @ivar targetFrom: how the CONNECT target was chosen: C{"address"} (the
        original address), C{"sni"}, C{"host"} (a name the client sent) or
        C{"policy"} (a rule's target).
    @ivar name: the name read from the client (SNI or Host), or C{None}.
    @ivar proxy: the last proxy tried, or C{""} if none was.
    @ivar status: that proxy's answer to CONNECT, or C{None}.
    @ivar bytesUp: bytes delivered to the proxy.
    @ivar bytesDown: bytes delivered to the client.
    @ivar result: C{"ok"} for a tunnel that opened, else the failure's kind
        (C{"proxy-status"}, C{"proxy-connect"}, C{"client-denied"}, ...:
        the C{shifter_tunnel_failures_total} reasons).
    @ivar how: how it ended, in words.
    @ivar resolved: when its original destination was known.
    @ivar sniffed: when the sniffer was done with the client's first bytes.
    @ivar connecting: when the first connection to a proxy began.
    @ivar connected: when the connection to the last proxy tried was made.
    @ivar opened: when that proxy's answer opened the tunnel.
    @ivar firstByte: when the first byte from the proxy reached the client.
    @ivar ech: what the ClientHello showed of Encrypted Client Hello
        (C{"ech"}, C{"grease"}, C{"inner"}, C{"unknown"}), or C{None} if
        nothing (no extension, not TLS, or not read).
    """

    tunnelId: str
    started: float
    ended: float
    client: str
    destination: str
    connectTarget: str
    targetFrom: str
    name: Optional[str]
    proxy: str
    status: Optional[int]
    bytesUp: int
    bytesDown: int
    result: str
    how: str
    resolved: Optional[float] = None
    sniffed: Optional[float] = None
    connecting: Optional[float] = None
    connected: Optional[float] = None
    opened: Optional[float] = None
    firstByte: Optional[float] = None
    ech: Optional[str] = None


class ITunnelClient(Interface):
    """
    The client connection, as the tunnel drives it.
    """

    def resolveDestination() -> Any:
        """
        Ask the resolver for this connection's original destination.

        @return: a L{Destination}, or a C{Deferred} firing with one.
        """

    def connectProxy(proxy: Any, tunnel: Tunnel) -> IProxyAttempt:
        """
        An attempt at C{proxy} that reports to C{tunnel}, not started yet:
        the tunnel knows it as its own before it can report anything, even
        a failure at once.
        """

    def startRelay(attempt: IProxyAttempt, toProxy: bytes, toClient: bytes, clientEnded: bool) -> IRelay:
        """
        Join the client connection to C{attempt}'s, first delivering the
        bytes read before the tunnel opened.
        """

    def pauseReading() -> None:
        """
        Stop reading from the client until L{resumeReading}.
        """

    def resumeReading() -> None:
        """
        Read from the client again.
        """

    def close() -> None:
        """
        Close the client connection now (a tunnel that never opened: the
        client was sent nothing, so nothing is owed to it).
        """

    def finish() -> None:
        """
        End the client connection without losing a byte either way: send
        what was written, then the end (a FIN); read and discard what the
        client still sends until its own end; then close.  Closing with
        unread bytes would reset the connection, and a reset makes the
        kernel throw away what the client has not received yet.
        """

    def abort() -> None:
        """
        Drop the client connection now.
        """


class ITunnelOwner(Interface):
    """
    What a tunnel needs from the factory that accepted it.
    """

    settings = Attribute("The L{shifter.tunnel.downstream.TunnelSettings}.")
    pool = Attribute("The L{shifter.upstream.pool.ProxyPool}.")
    policy = Attribute("The L{shifter.tunnel.policy.ITunnelPolicy}, or C{None}.")
    resolver = Attribute("The original-destination resolver.")
    reactor = Attribute("The reactor, for its clock.")
    deadlines = Attribute("The L{shifter.tunnel.deadlines.Deadlines} of every tunnel.")
    stats = Attribute("The L{shifter.tunnel.metrics.TunnelStats} to count in.")
    refusals = Attribute(
        "A L{shifter.logs.RateLimitedLog} for the lines of L{RATE_LIMITED}."
    )
    proxyAddresses = Attribute(
        "The L{shifter.tunnel.destinations.ProxyAddresses} of the proxies and of this machine: "
        "destinations that could reach either are refused."
    )
    gatewayNames = Attribute(
        "The L{shifter.tunnel.destinations.GatewayNames}: names CONNECT never asks for."
    )
    connectByAddress = Attribute(
        "Whether destination rules are in force, so that CONNECT asks for the address even "
        "when a name was read (unless a rule chooses the name)."
    )
    accessLog = Attribute(
        "The access log each finished connection's L{TunnelRecord} goes to (through "
        "L{tunnelClosed}), or C{None}.  While there is one, a tunnel that opened and "
        "ended in order has its line there, not in the service log."
    )

    def isListeningAddress(host: str, port: int) -> Optional[bool]:
        """
        Whether C{host:port} is Shifter's own listening socket; C{None} when
        that is not known.
        """

    def tunnelClosed(tunnel: Tunnel) -> None:
        """
        C{tunnel} has finished: both its connections are gone.
        """

    def heldTunnel(clientHost: str, clientPort: int, host: str, port: int, receiver: IProxyReceiver) -> Any:
        """
        The tunnel already opened for the client connection from
        C{clientHost:clientPort} to C{host:port} (its original destination)
        while its SYN was held (C{--hold-syn}, see
        L{shifter.tunnel.holdsyn}), now reporting to C{receiver}; or C{None}.  It
        has C{attempt} (an L{IProxyAttempt} whose CONNECT the proxy answered
        with a 2xx), C{leftover} (tunnel bytes already read from the proxy),
        C{started} (when its CONNECT began), and the C{connectHost} and
        C{passClient} the policy chose for it at the SYN, if any.
        """


@implementer(IProxyReceiver)
class Tunnel(ProxyNegotiation):
    """
    One client connection and the tunnel it is owed.

    The public methods are the events; each is looked up in L{TABLE} under
    the tunnel's current state.

    @ivar state: one of L{STATES}.
    @ivar destination: the original destination, once resolved.
    @ivar proxy: the proxy being tried or in use.
    @ivar attempt: the current proxy attempt, or C{None}.
    @ivar relay: the L{IRelay} once open (kept, stopped, while closing: it
        counts what the connections never sent).
    @ivar bytesUp: bytes delivered to the proxy.
    @ivar bytesDown: bytes delivered to the client (after the proxy's answer).
    @ivar droppedUp: bytes read from the client and never delivered.
    @ivar droppedDown: bytes read from the proxy and never delivered.
    """

    log = QuickLogger("shifter.tunnel.tunnel.Tunnel")
    retryLine = "tunnel {client} -> {destination} via {proxy}: {reason}; trying {next}"

    __slots__ = (
        "state", "owner", "client", "settings", "pool", "policy", "clock", "stats",
        "clientHost", "clientPort", "localHost", "localPort", "clientLabel",
        "destination", "address", "target", "connectHost", "name", "named", "proxy", "attempt",
        "candidates", "request", "early", "earlyBytes", "earlyEnded", "earlySent", "sendingEarly",
        "pending", "relay", "bytesUp", "bytesDown", "droppedUp", "droppedDown", "started", "connectStarted",
        "setupDeadline", "stageEnd", "lastMoved", "deadline", "deadlineBucket", "how",
        "failed", "clientGone", "graceOver", "authExchange", "authProxy", "passClient", "sniffer",
        "ech", "echNote",
        "tunnelId", "proxyStatus", "targetFrom", "failureKind",
        "resolvedAt", "sniffedAt", "proxyConnectedAt", "openedAt", "firstByteAt",
        "decidedBy", "sniffedScheme", "sniffedPath",
    )

    def __init__(
        self,
        owner: Any,
        client: Any,
        clientHost: str,
        clientPort: int,
        localHost: str,
        localPort: int,
    ) -> None:
        """
        @param owner: the L{ITunnelOwner}; its settings, pool and policy at
            this moment are the ones this tunnel keeps.
        @param client: the L{ITunnelClient}.
        @param clientHost: the client's address, IPv4-mapped ones unmapped.
        """
        self.state = ACCEPTED
        self.owner = owner
        self.client = client
        self.settings = owner.settings
        self.pool = owner.pool
        self.policy = owner.policy
        self.clock = owner.reactor
        self.stats = owner.stats
        self.clientHost = clientHost
        self.clientPort = clientPort
        self.localHost = localHost
        self.localPort = localPort
        self.clientLabel = formatAddress(clientHost, clientPort)
        self.destination: Destination | None = None
        self.address = ""
        self.target = "(unknown)"
        self.connectHost = ""
        self.name: str | None = None  # the name read from the client, if any
        self.named = ""
        self.proxy: Any = None
        self.attempt: Any = None
        self.candidates: list[Any] = []
        self.request = b""
        self.early: list[bytes] = []
        self.earlyBytes = 0
        self.earlyEnded = False
        self.earlySent = 0  # of the early bytes, those written to the current attempt
        self.sendingEarly = False  # whether the current attempt is sent the early bytes as they come
        self.pending: Deferred[Any] | None = None
        self.relay: Any = None
        self.bytesUp = 0
        self.bytesDown = 0
        self.droppedUp = 0
        self.droppedDown = 0
        self.started = self.clock.seconds()
        self.connectStarted = 0.0
        self.setupDeadline = self.started + self.settings.setupTimeout
        self.stageEnd: float | None = None
        self.lastMoved = self.started
        self.deadline: float | None = None
        self.deadlineBucket: int | None = None
        self.how: str | None = None
        self.failed = False
        self.clientGone = False
        self.graceOver = False  # dropped at the end of the closing grace
        # The authentication of this tunnel with the proxy it is trying:
        # an AuthExchange (it bounds the retries a 407 allows), and for
        # which proxy.
        self.authExchange: Any = None
        self.authProxy: Any = None
        self.passClient: str | None = None  # a policy's --pass-client choice
        self.sniffer: Any = None  # the name sniffer, fed each read once, while sniffing
        self.ech: str | None = None  # what the ClientHello showed of ECH (Sniffed.ech)
        self.echNote = ""  # " [ech=...]" in the tunnel's lines, once sniffed
        self.tunnelId = newTunnelId()
        self.proxyStatus: int | None = None  # the last proxy's answer to CONNECT
        self.targetFrom = "address"
        self.failureKind: str | None = None
        # When each stage ended, for the access log's timers.
        self.resolvedAt: float | None = None
        self.sniffedAt: float | None = None
        self.proxyConnectedAt: float | None = None
        self.openedAt: float | None = None
        self.firstByteAt: float | None = None
        self.decidedBy = ""  # " (what decided)", when the policy names it
        # Where the name read came from ("https": SNI, "http": Host), and
        # the plain request's path, for the policy.
        self.sniffedScheme: str | None = None
        self.sniffedPath: str | None = None

    # The events.

    def start(self) -> None:
        """
        The client connection was accepted: begin.
        """
        self._handle(START)

    def resolved(self, destination: Destination) -> None:
        self._handle(RESOLVED, destination)

    def resolveFailed(self, reason: Failure) -> None:
        self._handle(RESOLVE_FAILED, reason)

    def clientData(self, data: bytes) -> None:
        self._handle(CLIENT_DATA, data)

    def clientEnded(self) -> None:
        """
        The client has finished sending (a half-close).
        """
        self._handle(CLIENT_ENDED)

    def clientLost(self, reason: Failure) -> None:
        """
        The client connection is gone.
        """
        self._handle(CLIENT_LOST, reason)

    def relayEnded(self, how: str) -> None:
        """
        The relay ended by itself (the splice relay: both sides finished,
        or an error) and let go of the sockets.
        """
        self._handle(RELAY_ENDED, how)

    def timedOut(self) -> None:
        """
        The tunnel's deadline has passed: the end of its stage, or an
        earlier one (then it moves to the stage's end).
        """
        stageEnd = self.stageEnd
        if stageEnd is not None and stageEnd > self.clock.seconds():
            self.owner.deadlines.set(self, stageEnd)
            return
        self._handle(TIMED_OUT)

    def abort(self, how: str) -> None:
        """
        Drop both connections now (shutdown).
        """
        self._handle(ABORT, how)

    # What the relay reports as bytes move.

    def relayed(self, up: bool, n: int) -> None:
        """
        The relay delivered C{n} bytes, to the proxy if C{up}, else to the
        client: count them, and start the idle period again (only the time
        is noted; the deadline, when it comes, looks at it).
        """
        if up:
            self.bytesUp += n
            self.stats.bytesUp += n
        else:
            if self.firstByteAt is None:
                self.firstByteAt = self.clock.seconds()
            self.bytesDown += n
            self.stats.bytesDown += n
        self.lastMoved = self.clock.seconds()

    def relayDropped(self, up: bool, n: int) -> None:
        """
        C{n} bytes read from the client (if C{up}) or from the proxy will
        never be delivered: the other side is gone, or was dropped.
        """
        if up:
            self.droppedUp += n
            self.stats.bytesDroppedUp += n
        else:
            self.droppedDown += n
            self.stats.bytesDroppedDown += n

    # Dispatch.

    def _handle(self, event: str, *args: Any) -> None:
        try:
            TABLE[event][self.state](self, *args)
        except Exception:
            self._internalError(event, Failure())

    def _internalError(self, event: str, failure: Failure) -> None:
        """
        A bug: an exception while handling C{event}.  Close the connection
        with one line and the C{internal} counter; never leave it hanging.
        """
        if self.state in (CLOSING, CLOSED):
            self.owner.refusals.emit(
                "internal", LogLevel.error,
                "tunnel {client}: internal error on {event} while {state}",
                log_failure=failure, client=self.clientLabel, event=event, state=self.state,
            )
            self.owner.stats.counters["internal"] += 1
            self._abortAll()
            return
        try:
            self._fail(
                "internal",
                f"internal error on {event} while {self.state}: {failure.getErrorMessage()}",
                failure=failure,
            )
        except Exception:
            self.log.failure("tunnel {client}: closing failed", client=self.clientLabel)
            self._abortAll()

    # Stage 0: accepted.

    def _begin(self) -> None:
        allowed = self.settings.allowedClients
        if allowed:
            address = ipaddress.ip_address(self.clientHost)
            if not any(address in network for network in allowed):
                self._fail("client-denied", f"client {self.clientHost} is not in an --allow network")
                return
        self.state = RESOLVING
        # The deadline every set-up stage ends after (see the module's
        # docstring): most tunnels open and close before it.
        self.stageEnd = self.setupDeadline
        self.owner.deadlines.set(self, min(self.started + self.settings.shortestStage, self.setupDeadline))
        self._ask(self.client.resolveDestination, self.resolved, self.resolveFailed)

    # Before the tunnel opens, the client's bytes are kept (up to a limit;
    # past it, reading pauses) and sent first once it opens.

    def _keepEarly(self, data: bytes) -> None:
        self.early.append(data)
        self.earlyBytes += len(data)
        if self.earlyBytes >= self.settings.earlyDataLimit:
            self.client.pauseReading()

    def _earlyWithRequest(self) -> bytes:
        """
        The client's bytes so far, to go with the CONNECT request in one
        write, if they may go before the answer (L{_mayWriteEarly}); those
        that come before the answer then follow as they come.  A new
        proxy connection starts from none sent.
        """
        self.sendingEarly = self._mayWriteEarly()
        if not self.sendingEarly:
            self.earlySent = 0
            return b""
        early = b"".join(self.early)
        self.early = [early] if early else []
        self.earlySent = len(early)
        return early

    def _keepAndSendEarly(self, data: bytes) -> None:
        """
        The client's bytes while the proxy has yet to answer CONNECT: kept
        (another proxy may be tried) and, with C{--early-data send}, written
        behind the request (L{ProxyNegotiation._proxyConnected}).
        """
        self._keepEarly(data)
        if self.sendingEarly:
            self.attempt.write(data)
            self.earlySent += len(data)

    def _keepEnd(self) -> None:
        self.earlyEnded = True

    def _clientLeftEarly(self, reason: Failure) -> None:
        self.clientGone = True
        self._fail("client-gone", "client left before the tunnel opened")

    def _setupTimedOut(self) -> None:
        self._fail(
            "setup-timeout",
            f"tunnel not set up within {self.settings.setupTimeout:g} s (was {self.state})",
        )

    def _abortEarly(self, how: str) -> None:
        self._fail("shutdown", how)
        self._abortAll()

    # Stage 1: the original destination.

    def _resolved(self, destination: Destination) -> None:
        owner = self.owner
        self.resolvedAt = now = self.clock.seconds()
        owner.stats.resolveSeconds.observe(now - self.started)
        host = canonicalHost(destination.host)
        port = destination.port
        self.destination = destination
        self.address = self.connectHost = host
        self.target = formatAddress(host, port)
        refusal = self._refusal(host, port)
        if refusal is not None:
            self._fail(*refusal)
            return
        if self.settings.connectTarget == "ip":
            self._chooseProxies()
            return
        from shifter.tunnel.sniff import NameSniffer

        self.state = SNIFFING
        self.sniffer = NameSniffer(self.settings.connectTarget)
        self.sniffer.feed(b"".join(self.early))
        self._setDeadline(min(self.clock.seconds() + self.settings.sniffTimeout, self.setupDeadline))
        self._sniff(final=self.earlyEnded)

    def _refusal(self, host: str, port: int) -> tuple[str, str] | None:
        """
        Why a connection to C{host:port} must not be tunnelled, as
        (counter, reason), or C{None}.
        """
        if getattr(self.owner.resolver, "localAddressIsDestination", False):
            # TPROXY: the local address is the destination of every
            # connection, so it cannot tell a direct one.  A destination
            # the listening socket itself would accept can.
            direct = self.owner.isListeningAddress(host, port)
            if direct is None:
                return "loop", "Shifter's listening address is not known, so a direct connection cannot be told"
        else:
            direct = (host, port) == (self.localHost, self.localPort)
        if direct:
            return "loop", "connected to Shifter directly, not redirected"
        return destinationCheck(self.owner, self.settings, host, port)
    def _resolveFailed(self, reason: Failure) -> None:
        if reason.check(ResolverError):
            self._fail("resolver", f"original destination unknown: {reason.getErrorMessage()}")
        else:
            self._fail("resolver", f"resolver error: {reason.getErrorMessage()}", failure=reason)

    # Stage 1b (--connect-target sni, host, auto): a name from the
    # client's first bytes.

    def _sniffMore(self, data: bytes) -> None:
        self._keepEarly(data)
        self.sniffer.feed(data)
        self._sniff(final=self.earlyBytes >= self.settings.earlyDataLimit)

    def _sniffEnded(self) -> None:
        self.earlyEnded = True
        self._sniff(final=True)

    def _sniffTimedOut(self) -> None:
        if self.clock.seconds() >= self.setupDeadline:
            self._setupTimedOut()
        else:
            self._sniff(final=True)

    def _sniff(self, final: bool) -> None:
        """
        Go on once the sniffer, fed each read as it came, has a verdict, or
        with the address when C{final}.
        """
        settings = self.settings
        verdict = self.sniffer.verdict
        if verdict is None:
            if not final:
                return
            if self.earlyEnded:
                reason = "client finished sending before a complete hello"
            else:
                reason = f"client sent no complete hello within {settings.sniffTimeout:g} s"
            verdict = self.sniffer.finish(reason)
        name, reason = verdict.name, verdict.reason
        if name is not None:
            self.sniffedScheme = "https" if reason == "SNI" else "http"
            self.sniffedPath = verdict.path
        self.sniffer = None
        self.sniffedAt = self.clock.seconds()
        port = self.destination.port  # type: ignore[union-attr]
        owner = self.owner
        self._noteECH(verdict)
        if verdict.coverName:
            reason += ", the ECH outer name"
        if name is not None:
            refused = owner.gatewayNames.refusal(name, owner.proxyAddresses.localAddresses)
            if refused is not None:
                name, reason = None, refused
        if name is None:
            self.named = f" (CONNECT by address: {reason})"
        elif owner.connectByAddress:
            # The rules judge destinations by address, and only the address
            # is known to be where the proxy connects: a name could lead
            # anywhere.  Rules still see the name, and one may choose it.
            self.name = name
            self.named = f" (CONNECT by address: destination rules apply; {name} from {reason})"
        else:
            self.name = self.connectHost = name
            self.named = f" (CONNECT {name}:{port}, from {reason})"
            self.targetFrom = "host" if reason.startswith("Host") else "sni"
        self._chooseProxies()

    def _noteECH(self, verdict: Any) -> None:
        """
        Keep, count and (once per interval) log what the ClientHello
        showed of Encrypted Client Hello.
        """
        ech = self.ech = verdict.ech
        self.stats.ech[ech or "none"] += 1
        if ech is None:
            return
        self.echNote = f" [ech={ech}]"
        if ech in (ECH, ECH_INNER):
            what = "may be GREASE" if ech == ECH else "the inner type, on the wire"
            shown = f"; the name it shows, {verdict.name}, is its outer (cover) name" if verdict.coverName else ""
            self.owner.refusals.emit(
                "ech", LogLevel.info,
                "tunnel {client} -> {destination}: the ClientHello offers Encrypted Client Hello ({what}){shown}",
                client=self.clientLabel, destination=self.target, what=what, shown=shown, ech=ech,
            )

    # Stage 2: the policy, if any.

    def _chooseProxies(self) -> None:
        # With --hold-syn the tunnel may be open already: the client's SYN
        # was held while the policy, if any, decided and a proxy answered
        # (shifter.tunnel.holdsyn).  Not when a name was read for CONNECT: the SYN
        # had none.
        if self.connectHost == self.address:
            port = self.destination.port  # type: ignore[union-attr]
            held = self.owner.heldTunnel(self.clientHost, self.clientPort, self.address, port, self)
            if held is not None:
                self._takeHeld(held)
                return
        self.candidates = self.pool.candidates(self.clientHost)
        self._askPolicy(self.name, self.ech)

    def _decideFailed(self, reason: Failure) -> None:
        self._fail("policy", f"policy error: {reason.getErrorMessage()}", failure=reason)

    # Stage 3: a connection to a proxy, and its answer to CONNECT; the
    # next proxy is tried when one fails before the tunnel opens.

    def _takeHeld(self, held: Any) -> None:
        """
        Carry on with the tunnel opened while the client's SYN was held:
        its proxy, CONNECT target and --pass-client mode were chosen then.
        """
        attempt = self.attempt = held.attempt
        self.proxy = attempt.proxy
        self.passClient = held.passClient
        self.tunnelId = held.tunnelId or self.tunnelId
        self.proxyStatus = held.status
        self.proxyConnectedAt = held.connected
        if held.connectHost != self.address:
            self.targetFrom = "policy"
            self.connectHost = held.connectHost
            self.named = f" (CONNECT {formatAddress(held.connectHost, self.destination.port)}, from policy)"  # type: ignore[union-attr]
        self.connectStarted = held.started
        self._open(held.leftover)

    # What the proxy negotiation (shifter.tunnel.negotiation) asks of a tunnel.

    def _newAttempt(self, proxy: Any) -> IProxyAttempt:
        return self.client.connectProxy(proxy, self)

    # Stage 4: the relay.

    def _open(self, leftover: bytes) -> None:
        stats = self.owner.stats
        now = self.openedAt = self.clock.seconds()
        stats.counters["opened"] += 1
        if self.proxy.kind == DIRECT:
            # Straight to the destination's address: no CONNECT target to name.
            stats.counters["direct"] += 1
            self.connectHost = self.address
            self.named = ""
        stats.openTunnels += 1
        stats.connectSeconds.observe(now - self.connectStarted)
        # The early bytes and the leftover are counted, as every byte, when
        # they are delivered: those sent behind the CONNECT request now.
        early, self.early = b"".join(self.early), []
        sent, self.earlySent, self.sendingEarly = self.earlySent, 0, False
        if sent:
            self.relayed(True, sent)
            early = early[sent:]
        self.state = CLIENT_FINISHED if self.earlyEnded else RELAYING
        self.lastMoved = now
        self._armIdle()
        relay = self.relay = self.client.startRelay(self.attempt, early, leftover, self.earlyEnded)
        if self.state not in OPEN:
            relay.stop()  # it ended (and the tunnel with it) while starting

    def _relayUp(self, data: bytes) -> None:
        self.lastMoved = self.clock.seconds()
        self.relay.up(data)

    def _relayDown(self, data: bytes) -> None:
        self.lastMoved = self.clock.seconds()
        self.relay.down(data)

    def _clientFinished(self) -> None:
        self.state = CLIENT_FINISHED
        self.relay.clientFinished()

    def _proxyFinished(self) -> None:
        self.state = PROXY_FINISHED
        self.relay.proxyFinished()

    def _bothFinished(self) -> None:
        self._close("both sides closed")

    # A side that is gone has delivered all it sent before going (the
    # Twisted relay read it to its end; the splice relay delivers it before
    # it ends); the other side is finished in order.

    def _clientLostOpen(self, reason: Failure) -> None:
        self.clientGone = True
        self.relay.clientGone()
        self._close(_howLost("client", reason))

    def _proxyLostOpen(self, reason: Failure) -> None:
        self.attempt = None
        self.relay.proxyGone()
        self._close(_howLost("proxy", reason))

    def _relayEnded(self, how: str) -> None:
        # Finished in order, not dropped: dropping a socket resets it, and
        # the kernel would throw away what the relay has handed it and the
        # peer not yet read.
        self._close(how)

    def _idleCheck(self) -> None:
        idle = self.settings.idleTimeout
        if self.clock.seconds() - self.lastMoved >= idle:
            self._close(f"idle for {idle:g} s")
        else:
            self._armIdle()

    def _armIdle(self) -> None:
        idle = self.settings.idleTimeout
        self._setDeadline(self.lastMoved + idle if idle else None)

    def _abortOpen(self, how: str) -> None:
        self._close(how)
        self._abortAll()

    # Closing: the connections of a tunnel that was open are finished
    # (what was written is sent, then the end; the peer is read until its
    # own end, then closed), those of one that never opened closed at
    # once; after a grace period, whatever is left is dropped.

    def _fail(self, kind: str, reason: str, failure: Failure | None = None, **fields: Any) -> None:
        """
        End the tunnel before it opened, with one log line saying why.
        """
        self.failed = True
        self.failureKind = kind
        self.owner.stats.counters[kind] += 1
        text = "tunnel {client} -> {destination}{named}{ech_note} via {proxy}{decided_by} failed: {reason} id={tunnel}"
        facts: dict[str, Any] = dict(
            tunnel=self.tunnelId,
            client=self.clientLabel,
            destination=self.target,
            named=self.named,
            ech_note=self.echNote,
            ech=self.ech,
            proxy=self.proxy.description if self.proxy is not None else "(none)",
            decided_by=self.decidedBy,
            reason=reason,
            failure_kind=kind,
            **fields,
        )
        level = LogLevel.warn
        if failure is not None and not failure.check(ResolverError, CancelledError, TimeoutError):
            level = LogLevel.error
            facts["log_failure"] = failure
        if kind in RATE_LIMITED:
            self.owner.refusals.emit(kind, level, text, **facts)
        else:
            self.log.emit(level, text, **facts)
        self._close(reason)

    def _close(self, how: str) -> None:
        """
        Close both connections: a proxy connection that never carried the
        tunnel is dropped, and the client's closed; the connections of a
        tunnel that was open are finished in order (L{ITunnelClient.finish},
        L{IProxyAttempt.finish}).  After the closing grace, whatever is
        left is dropped.
        """
        if self.how is None:
            self.how = how
        self.state = CLOSING
        self._cancelPending()
        relay = self.relay
        if relay is not None:
            relay.stop()
        failed = self.failed
        if failed:
            self._dropAttempt()
        elif self.attempt is not None:
            self.attempt.finish()
        if not self.clientGone and self.state == CLOSING:
            if failed:
                self.client.close()
            else:
                self.client.finish()
        self._closedIfGone()
        # Closing a transport may report its loss at once (a connection
        # the splice relay ended both ways always does), and that may have
        # finished the tunnel: only one still closing needs the grace.
        if self.state == CLOSING:
            self._setDeadline(self.clock.seconds() + self.settings.closeGrace)

    def _clientLostClosing(self, reason: Failure) -> None:
        self.clientGone = True
        if self.how is None:
            self.how = _howLost("client", reason)
        if self.relay is not None:
            self.relay.clientGone()
        self._closedIfGone()

    def _proxyLostClosing(self, reason: Failure) -> None:
        self.attempt = None
        if self.relay is not None:
            self.relay.proxyGone()
        self._closedIfGone()

    def _attemptEndedClosing(self, reason: Failure) -> None:
        self.attempt = None
        self._closedIfGone()

    def _graceOver(self) -> None:
        if self.failed:
            self.log.info(
                "tunnel {client} -> {destination}: still open {grace:g} s after closing; dropped",
                client=self.clientLabel, destination=self.target, grace=self.settings.closeGrace,
            )
        else:
            # A peer that never ends its side (gone without a word) is
            # common: the tunnel's own line says so.
            self.graceOver = True
        self._abortAll()
        # Aborted transports close their sockets on the reactor's next
        # turn; the tunnel is finished now.
        self.clientGone = True
        self.attempt = None
        self._closedIfGone()

    def _abortClosing(self, how: str) -> None:
        self._abortAll()

    def _abortAll(self) -> None:
        attempt = self.attempt
        relay = self.relay
        if attempt is not None:
            if relay is not None:
                relay.proxyGone()
            attempt.abort()
        if not self.clientGone:
            if relay is not None:
                relay.clientGone()
            self.client.abort()

    def _closedIfGone(self) -> None:
        if self.state == CLOSING and self.clientGone and self.attempt is None:
            self._finish()

    def _finish(self) -> None:
        self.state = CLOSED
        self._setDeadline(None)
        wasOpen = not self.failed
        stats = self.owner.stats
        if wasOpen:
            stats.openTunnels -= 1
            stats.counters["closed"] += 1
        self.owner.tunnelClosed(self)
        if not wasOpen:
            return  # _fail has logged the one line this connection gets.
        if getattr(self.owner, "accessLog", None) is not None:
            return  # the access log has its line; the service log keeps what concerns the service
        duration = self.clock.seconds() - self.started
        client, destination, named = self.clientLabel, self.target, self.named
        proxy = self.proxy.description
        decidedBy = self.decidedBy
        how, up, down = self.how, self.bytesUp, self.bytesDown
        droppedUp, droppedDown = self.droppedUp, self.droppedDown
        dropped = ""
        if droppedUp:
            dropped = f", {droppedUp} bytes up dropped"
        if droppedDown:
            dropped += f", {droppedDown} bytes down dropped"
        if self.graceOver:
            dropped += f", dropped after the {self.settings.closeGrace:g} s closing grace"
        # The line is rendered here, in one f-string, and logged as a single
        # field: Twisted's observers would otherwise run string.Formatter
        # over eight fields for every tunnel.  The facts stay in the event
        # as fields.
        self.log.info(
            "{tunnel_line}",
            tunnel_line=f"tunnel {client} -> {destination}{named}{self.echNote} via {proxy}{decidedBy} closed ({how}): "
            f"{up} bytes up, {down} bytes down, {duration:.3f} s{dropped} id={self.tunnelId}",
            tunnel=self.tunnelId,
            client=client,
            destination=destination,
            named=named,
            ech=self.ech,
            connect_target=formatAddress(self.connectHost, self.destination.port),  # type: ignore[union-attr]
            proxy=proxy,
            decided_by=decidedBy,
            how=how,
            bytes_up=up,
            bytes_down=down,
            bytes_up_dropped=droppedUp,
            bytes_down_dropped=droppedDown,
            duration=duration,
        )

    def _setDeadline(self, when: float | None) -> None:
        """
        The current stage ends at C{when} (or never): the deadline moves
        only if that is earlier, or to clear it.
        """
        self.stageEnd = when
        deadline = self.deadline
        if when is None:
            if deadline is not None:
                self.owner.deadlines.set(self, None)
        elif deadline is None or when < deadline:
            self.owner.deadlines.set(self, when)

    def describe(self, now: float) -> TunnelInfo:
        """
        What an operator sees of this tunnel at time C{now}.
        """
        destination = self.destination
        return TunnelInfo(
            client=self.clientLabel,
            destination=self.target,
            connectTarget=formatAddress(self.connectHost, destination.port) if destination is not None else "",
            proxy=self.proxy.description if self.proxy is not None else "",
            state=self.state,
            bytesUp=self.bytesUp,
            bytesDown=self.bytesDown,
            age=now - self.started,
            decision=self.decidedBy.strip()[1:-1] if self.decidedBy else "",
            ech=self.ech or "",
            tunnelId=self.tunnelId,
        )

    def record(self) -> TunnelRecord:
        """
        What this tunnel was, for its access-log line (once it has ended).
        """
        destination = self.destination
        connectTarget, targetFrom = "", self.targetFrom
        if destination is not None and self.proxy is not None:
            host = self.connectHost
            if self.proxy.kind == DIRECT:
                # DIRECT goes to the original address, whatever was read.
                host, targetFrom = self.address, "address"
            connectTarget = formatAddress(host, destination.port)
        return TunnelRecord(
            tunnelId=self.tunnelId,
            started=self.started,
            ended=self.clock.seconds(),
            client=self.clientLabel,
            destination=self.target,
            connectTarget=connectTarget,
            targetFrom=targetFrom,
            name=self.name,
            proxy=self.proxy.description if self.proxy is not None else "",
            status=self.proxyStatus,
            bytesUp=self.bytesUp,
            bytesDown=self.bytesDown,
            result=self.failureKind or "ok",
            how=self.how or "",
            resolved=self.resolvedAt,
            sniffed=self.sniffedAt,
            connecting=self.connectStarted or None,
            connected=self.proxyConnectedAt,
            opened=self.openedAt,
            firstByte=self.firstByteAt,
            ech=self.ech,
        )

_CLIENT_SIDE = (CLIENT_DATA, CLIENT_ENDED, CLIENT_LOST)
_ANSWERS = (PROXY_ANSWERED, PROXY_INVALID, PROXY_DATA, PROXY_ENDED, PROXY_LOST)
_RESULTS = (RESOLVED, RESOLVE_FAILED, DECIDED, DECIDE_FAILED)

# What every event does in every state.  "_impossible" marks a pair that
# cannot happen (the sources of the event do not exist in that state); it
# closes the connection with an internal-error line.
TABLE = buildTable(
    Tunnel, STATES, EVENTS,
    # state                    event(s)                           action
    (ACCEPTED,                 START,                             "_begin"),
    (ACCEPTED,                 tuple(e for e in EVENTS if e != START), "_impossible"),
    # Set-up: every stage keeps early bytes, notes an early end, fails on
    # the client's loss, the set-up deadline or shutdown.
    (SETUP,                    START,                             "_impossible"),
    ((RESOLVING, DECIDING, CONNECTING, AUTHENTICATING), CLIENT_DATA, "_keepEarly"),
    (HANDSHAKING,              CLIENT_DATA,                       "_keepAndSendEarly"),
    ((RESOLVING, DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING), CLIENT_ENDED, "_keepEnd"),
    (SETUP,                    CLIENT_LOST,                       "_clientLeftEarly"),
    (SETUP,                    ABORT,                             "_abortEarly"),
    (SETUP,                    RELAY_ENDED,                       "_impossible"),
    (RESOLVING,                RESOLVED,                          "_resolved"),
    (RESOLVING,                RESOLVE_FAILED,                    "_resolveFailed"),
    (RESOLVING,                (DECIDED, DECIDE_FAILED),          "_impossible"),
    (RESOLVING,                TIMED_OUT,                         "_setupTimedOut"),
    ((RESOLVING, SNIFFING, DECIDING), PROXY_EVENTS,               "_impossible"),
    (SNIFFING,                 CLIENT_DATA,                       "_sniffMore"),
    (SNIFFING,                 CLIENT_ENDED,                      "_sniffEnded"),
    (SNIFFING,                 TIMED_OUT,                         "_sniffTimedOut"),
    (SNIFFING,                 _RESULTS,                          "_impossible"),
    (DECIDING,                 DECIDED,                           "_decided"),
    (DECIDING,                 DECIDE_FAILED,                     "_decideFailed"),
    (DECIDING,                 (RESOLVED, RESOLVE_FAILED),        "_impossible"),
    (DECIDING,                 TIMED_OUT,                         "_setupTimedOut"),
    ((CONNECTING, HANDSHAKING, AUTHENTICATING), _RESULTS,         "_impossible"),
    (CONNECTING,               PROXY_CONNECTED,                   "_proxyConnected"),
    (CONNECTING,               PROXY_CONNECT_FAILED,              "_connectFailed"),
    (CONNECTING,               _ANSWERS,                          "_impossible"),
    (CONNECTING,               TIMED_OUT,                         "_connectTimedOut"),
    (HANDSHAKING,              (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_DATA), "_impossible"),
    (HANDSHAKING,              PROXY_ANSWERED,                    "_answered"),
    (HANDSHAKING,              PROXY_INVALID,                     "_answerInvalid"),
    (HANDSHAKING,              (PROXY_ENDED, PROXY_LOST),         "_closedBeforeAnswer"),
    (HANDSHAKING,              TIMED_OUT,                         "_handshakeTimedOut"),
    # NTLM's second round, on the same connection: a 407 now is the
    # credentials refused; an end or garbage is NTLM failing, not the proxy.
    (AUTHENTICATING,           (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_DATA), "_impossible"),
    (AUTHENTICATING,           PROXY_ANSWERED,                    "_answered"),
    (AUTHENTICATING,           PROXY_INVALID,                     "_authenticationInvalid"),
    (AUTHENTICATING,           (PROXY_ENDED, PROXY_LOST),         "_closedWhileAuthenticating"),
    (AUTHENTICATING,           TIMED_OUT,                         "_handshakeTimedOut"),
    # Open: bytes flow; a half-close is passed on; a loss, the end of the
    # relay, the idle deadline or shutdown closes.
    (OPEN,                     (START,) + _RESULTS,               "_impossible"),
    (OPEN,                     (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_ANSWERED, PROXY_INVALID), "_impossible"),
    ((RELAYING, PROXY_FINISHED), CLIENT_DATA,                     "_relayUp"),
    (CLIENT_FINISHED,          CLIENT_DATA,                       "_impossible"),
    ((RELAYING, CLIENT_FINISHED), PROXY_DATA,                     "_relayDown"),
    (PROXY_FINISHED,           PROXY_DATA,                        "_impossible"),
    (RELAYING,                 CLIENT_ENDED,                      "_clientFinished"),
    (RELAYING,                 PROXY_ENDED,                       "_proxyFinished"),
    (PROXY_FINISHED,           CLIENT_ENDED,                      "_bothFinished"),
    (CLIENT_FINISHED,          PROXY_ENDED,                       "_bothFinished"),
    (CLIENT_FINISHED,          CLIENT_ENDED,                      "_impossible"),
    (PROXY_FINISHED,           PROXY_ENDED,                       "_impossible"),
    (OPEN,                     CLIENT_LOST,                       "_clientLostOpen"),
    (OPEN,                     PROXY_LOST,                        "_proxyLostOpen"),
    (OPEN,                     RELAY_ENDED,                       "_relayEnded"),
    (OPEN,                     TIMED_OUT,                         "_idleCheck"),
    (OPEN,                     ABORT,                             "_abortOpen"),
    # Closing: late bytes and answers are dropped, late results ignored;
    # the connections' losses are awaited, then the grace runs out.
    (CLOSING,                  START,                             "_impossible"),
    (CLOSING,                  _RESULTS + (CLIENT_DATA, CLIENT_ENDED, RELAY_ENDED), "_ignore"),
    (CLOSING,                  (PROXY_CONNECTED, PROXY_ANSWERED, PROXY_INVALID, PROXY_DATA, PROXY_ENDED), "_ignore"),
    (CLOSING,                  CLIENT_LOST,                       "_clientLostClosing"),
    (CLOSING,                  PROXY_LOST,                        "_proxyLostClosing"),
    (CLOSING,                  PROXY_CONNECT_FAILED,              "_attemptEndedClosing"),
    (CLOSING,                  TIMED_OUT,                         "_graceOver"),
    (CLOSING,                  ABORT,                             "_abortClosing"),
    # Closed: nothing is left to do.
    (CLOSED,                   EVENTS,                            "_ignore"),
)


def _howLost(side: str, reason: Failure) -> str:
    if reason.check(ConnectionDone):
        return f"{side} closed"
    return f"{side} connection lost: {reason.getErrorMessage()}"
