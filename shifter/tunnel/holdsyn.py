"""
C{--hold-syn}: the tunnel is opened while the client's SYN waits, so that a
refused tunnel is refused at the SYN.

With C{--resolver nfqueue}, each SYN to be redirected reaches Shifter
before the client's handshake has even begun.  L{SynHolder} keeps it
there, with no verdict, connects to a proxy and asks for C{CONNECT} to the
SYN's destination, and only then gives the verdict:

  - the proxy opens the tunnel (2xx): the SYN is accepted with the queue
    mark, so the nat rule redirects it to Shifter; the client's connection
    that Shifter then accepts takes the open proxy connection over
    (L{shifter.tunnel.tunnel.Tunnel} asks its owner for it, through
    L{shifter.tunnel.downstream.ShifterFactory.heldTunnel}) and makes none of its
    own;
  - the tunnel is refused (another status, every proxy down or
    unreachable, garbage, no answer within C{--hold-timeout}): the SYN is
    accepted with the reject mark instead, which the printed C{REJECT
    --reject-with tcp-reset} rule matches, so the client's C{connect()}
    fails with C{ECONNREFUSED}, as if the server had refused it.

The CONNECT is the tunnel's own: the same checks and policy (asked with
no name), the same proxies in the same order, the same authentication (a
407 answered as the tunnel answers it), the same C{--pass-client} header,
the next proxy after a failure or a 5xx, the same failure counters and one
log line per refusal.  It can only ask for the address (or a policy's
target): nothing but the SYN exists yet, so C{--connect-target
sni}/C{host} cannot work.

A retransmitted SYN (same source, same initial sequence number) is
recognised: while its first copy is held the copy is dropped; once the
first got its verdict, for up to C{--hold-timeout} after, the copy gets
the same (the connection goes on, or is reset again in case the first
reset was lost); it never costs a second CONNECT.  An open tunnel that no
client connection takes within C{--hold-timeout} of its SYN's acceptance
(the client never completed its handshake) is closed.  Every queued packet
gets exactly one verdict; an internal error at any step, the first checks
included, refuses a held SYN with a reset.

A held SYN costs a proxy connection, so a flood of SYNs could cost many.
The caps apply at the SYN: with C{--max-connections} tunnels open, or a
client's C{--max-connections-per-client} open or held, its SYN is refused;
SYNs past C{--max-connections} counting held ones are not held but
accepted at once, to be tunnelled the ordinary way after their handshake.

DIRECT at the SYN: when the policy's answer (asked with no name, as every
held SYN's is) sends the connection DIRECT first, to its own destination,
the SYN is accepted with the direct mark (C{--direct-mark}) instead of the
queue mark.  The printed rules never redirect it and save the mark to the
connection, so no later packet of it is queued: the gateway forwards it
like any routed traffic, and its bytes never enter Shifter.  The checks
still apply first (never the gateway itself, never loopback: refused at
the SYN).  With a direct mark of 0, a DIRECT answer goes through Shifter
as before.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from shifter.tunnel.deadlines import Deadlines
from shifter.interfaces import IProxyAttempt, IProxyReceiver
from shifter.tunnel.limits import clientKey
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
from shifter.tunnel.statetable import buildTable
from shifter.tunnel.tunnel import RATE_LIMITED, TunnelRecord
from shifter.tunnel.tunnelid import newTunnelId
from shifter.upstream.proxy import DIRECT
from shifter.upstream.upstream import ProxyAttempt

DEFAULT_HOLD_TIMEOUT = 10.0

# A held SYN's states.
HELD = "held"  # held, its checks not yet made (until START)
# DECIDING (the policy deciding), CONNECTING (connecting to a proxy) and
# HANDSHAKING (CONNECT sent), AUTHENTICATING (NTLM's second CONNECT sent),
# the SYN held: the proxy negotiation's own (shifter.tunnel.negotiation).
ACCEPTED = "accepted"  # the proxy said 2xx and the SYN was accepted: waiting for the client's connection
DONE = "done"  # refused, taken over by a tunnel, or given up

STATES = (HELD, DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING, ACCEPTED, DONE)

# Its events: the proxy negotiation's (DECIDED, DECIDE_FAILED and the
# PROXY_EVENTS), and these.
START = "start"  # the SYN is held: make the checks, ask the policy, connect
TIMED_OUT = "timed-out"
RETRANSMITTED = "retransmitted"  # a copy of the SYN (same initial sequence number)
SUPERSEDED = "superseded"  # a new SYN from the same source: the client gave up on this one
CLAIMED = "claimed"  # a client connection from the SYN's source was accepted
STOP = "stop"

EVENTS = (
    START, DECIDED, DECIDE_FAILED, PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_ANSWERED, PROXY_INVALID, PROXY_DATA,
    PROXY_ENDED, PROXY_LOST, TIMED_OUT, RETRANSMITTED, SUPERSEDED, CLAIMED, STOP,
)


@dataclass(frozen=True)
class HeldTunnel:
    """
    A tunnel opened before its client connection was accepted, handed to
    that connection's L{shifter.tunnel.tunnel.Tunnel}.

    @ivar attempt: the L{IProxyAttempt} whose CONNECT the proxy answered
        with a 2xx; it reports to the receiver given to L{SynHolder.claim}.
    @ivar leftover: tunnel bytes already read from the proxy.
    @ivar started: when the SYN arrived (on the reactor's clock).
    @ivar connectHost: what CONNECT asked for: the destination's address,
        or a policy's target.
    @ivar passClient: a policy's C{--pass-client} choice, or C{None} for
        the proxy's own.
    @ivar tunnelId: the id its CONNECT carried, which the tunnel keeps.
    @ivar status: the proxy's answer to CONNECT.
    @ivar connected: when the connection to the proxy was made.
    """

    attempt: Any
    leftover: bytes
    started: float
    connectHost: str
    passClient: Optional[str] = None
    tunnelId: str = ""
    status: Optional[int] = None
    connected: Optional[float] = None


def directAtSyn(decision: Any, address: str, usable: Callable[[Any], bool]) -> bool:
    """
    Whether a policy's C{decision}, for a connection to C{address}, can be
    given at its SYN as DIRECT: it sends the connection DIRECT first (of
    the routes C{usable} says may be tried), to its own address.
    """
    if decision is None or decision.refuse is not None or not decision.proxies:
        return False
    if decision.target is not None:
        try:
            if canonicalHost(decision.target) != address:
                return False
        except ValueError:
            return False  # a name: only a tunnel can connect to it
    first = next((p for p in decision.proxies if usable(p)), None)
    return first is not None and first.kind == DIRECT


def refusalAtSyn(owner: Any, clientHost: str, address: str, port: int, held: int = 0) -> tuple[str, str] | None:
    """
    Why Shifter would refuse a connection whose SYN it sees, from
    C{clientHost} to C{address:port}, as (counter, reason), or C{None}: the
    connection caps, C{--allow}, and the destination checks.

    @param owner: the L{shifter.tunnel.downstream.ShifterFactory}.
    @param held: the client's other SYNs held (C{--hold-syn}), which count
        against C{--max-connections-per-client} like open tunnels.
    """
    settings = owner.settings
    if len(owner.active) >= settings.maxConnections:
        return "limit", f"{settings.maxConnections} tunnels already open (--max-connections)"
    perClient = settings.maxConnectionsPerClient
    if perClient:
        others = held + owner.clientLimit.counts.get(clientKey(clientHost), 0)
        if others >= perClient:
            return "client-limit", (f"{perClient} connections from this client already open or "
                                    "held (--max-connections-per-client)")
    allowed = settings.allowedClients
    if allowed:
        client = ipaddress.ip_address(clientHost)
        if not any(client in network for network in allowed):
            return "client-denied", f"client {clientHost} is not in an --allow network"
    return destinationCheck(owner, settings, address, port)


def announceDirect(
    owner: Any, log: Logger, client: str, destination: str, label: Optional[str], tunnelId: str, started: float,
) -> None:
    """
    Say that the connection from C{client} to C{destination} (both
    C{address:port}) goes DIRECT at its SYN, as C{label} decided: one log
    line, and its access-log record (no proxy, no bytes), if there is an
    access log.
    """
    decidedBy = f" ({label})" if label else ""
    log.info(
        "tunnel {client} -> {destination} DIRECT at the SYN (not through Shifter){decidedBy} id={tunnel}",
        client=client, destination=destination, decidedBy=decidedBy, tunnel=tunnelId,
    )
    accessLog = getattr(owner, "accessLog", None)
    if accessLog is not None:
        accessLog.tunnelEnded(TunnelRecord(
            tunnelId=tunnelId, started=started, ended=owner.reactor.seconds(), client=client,
            destination=destination, connectTarget="", targetFrom="address", name=None, proxy="DIRECT",
            status=None, bytesUp=0, bytesDown=0, result="direct",
            how=f"DIRECT at the SYN (not through Shifter){decidedBy}", resolved=started,
        ))


def newAttempt(proxy: Any, receiver: IProxyReceiver) -> Any:
    """
    An attempt at C{proxy} that reports to C{receiver}, not yet connecting
    (its C{connect()} starts it).
    """
    return ProxyAttempt(proxy, receiver)


@implementer(IProxyReceiver)
class HeldSyn(ProxyNegotiation):
    """
    One SYN held while its tunnel is opened, then the open tunnel until a
    client connection takes it.

    The public methods are the events; each is looked up in L{TABLE} under
    the current state.

    @ivar state: one of L{STATES}.
    @ivar packet: the held L{shifter.resolvers.nfqueue.QueuedPacket}.
    @ivar sequence: the SYN's initial sequence number.
    """

    log = Logger()
    retryLine = "held SYN {client} -> {destination} via {proxy}: {reason}; trying {next}"
    # A held SYN has no bytes, so no name read from them.
    sniffedScheme: str | None = None
    sniffedPath: str | None = None

    def __init__(self, holder: SynHolder, protocol: Any, packet: Any, clientHost: str, clientPort: int) -> None:
        owner = self.owner = holder.owner
        segment = packet.segment
        self.holder = holder
        self.protocol = protocol
        self.packet = packet
        self.sequence: int = segment.sequence
        self.clientHost = clientHost
        self.clientPort = clientPort
        self.settings = owner.settings
        self.pool = owner.pool
        self.stats = owner.stats
        self.clock = holder.clock
        self.destination = segment.destinationAddress()
        self.address = canonicalHost(self.destination.host)
        self.clientLabel = formatAddress(clientHost, clientPort)
        self.key = (clientHost, clientPort, self.address, self.destination.port)
        self.clientId = ""  # its client key, for --max-connections-per-client
        self.target = formatAddress(self.address, self.destination.port)
        self.policy = owner.policy
        self.state = HELD
        self.started = self.clock.seconds()
        self.setupDeadline = self.started + holder.timeout
        self.connectStarted = self.started
        self.candidates: list[Any] = []
        self.connectHost = self.address
        self.named = ""
        self.passClient: str | None = None  # a policy's --pass-client choice
        self.tunnelId = newTunnelId()
        self.targetFrom = "address"
        self.proxyStatus: int | None = None
        self.proxyConnectedAt: float | None = None
        self.pending: Deferred[Any] | None = None
        self.proxy: Any = None
        self.attempt: Any = None
        self.request = b""
        # This held SYN's authentication with the proxy it is trying.
        self.authExchange: Any = None
        self.authProxy: Any = None
        self.received: list[bytes] = []
        self.receivedBytes = 0
        self.paused = False
        self.verdict: str | None = None  # what the held SYN got, once it got it
        self.deadline: float | None = None
        self.deadlineBucket: int | None = None

    # The events.

    def start(self) -> None:
        """
        Begin, for a SYN just held.
        """
        self._handle(START)

    def timedOut(self) -> None:
        self._handle(TIMED_OUT)

    def retransmitted(self, copy: Any) -> None:
        """
        The client sent its SYN again: C{copy} is queued too.
        """
        self._handle(RETRANSMITTED, copy)

    def superseded(self) -> None:
        self._handle(SUPERSEDED)

    def claimed(self, receiver: IProxyReceiver) -> Optional[HeldTunnel]:
        """
        A client connection from this SYN's source was accepted: hand it
        the open tunnel, re-pointed at C{receiver}, if there is one.
        """
        return self._handle(CLAIMED, receiver)  # type: ignore[no-any-return]

    def stop(self) -> None:
        self._handle(STOP)

    # Dispatch.

    def _handle(self, event: str, *args: Any) -> Any:
        try:
            return TABLE[event][self.state](self, *args)
        except Exception:
            self._internalError(event, Failure())
            return None

    def _internalError(self, event: str, failure: Failure) -> None:
        # A bug a client's SYN sets off, it can set off again: rate-limited.
        self.owner.refusals.emit(
            "internal", LogLevel.error,
            "held SYN {client} -> {destination}: internal error on {event} while {state}",
            log_failure=failure, client=self.clientLabel, destination=self.target, event=event, state=self.state,
        )
        self.stats.counters["internal"] += 1
        if self.state in _HELD:
            self._verdict("reject")
        self._cancelPending()
        self._dropAttempt()
        self._done()

    # The start: checks, then the first proxy.

    def _start(self) -> None:
        """
        Refuse the SYN at once if Shifter would refuse its connection; else
        ask the policy, if there is one, as the tunnel would (with no name:
        nothing has been read), then connect.
        """
        self.state = DECIDING
        refusal = self._refusal()
        if refusal is not None:
            self._fail(*refusal)
            return
        self.candidates = self.pool.candidates(self.clientHost)
        self._askPolicy(None)

    def _setupTimedOut(self) -> None:
        self._fail(
            "setup-timeout",
            f"tunnel not open within --hold-timeout {self.holder.timeout:g} s (was {self.state})",
        )

    def _newAttempt(self, proxy: Any) -> IProxyAttempt:
        return self.holder.newAttempt(proxy, self)

    def _decideFailed(self, reason: Failure) -> None:
        self._fail("policy", f"policy error: {reason.getErrorMessage()}")

    def _decided(self, decision: Any) -> None:
        """
        The policy's answer: DIRECT at the SYN if it sends the connection
        straight to its own destination, else the tunnel's way.
        """
        if self._directAtSyn(decision):
            self._direct(decision.label)
            return
        ProxyNegotiation._decided(self, decision)

    def _directAtSyn(self, decision: Any) -> bool:
        """
        Whether C{decision} sends this connection DIRECT at the SYN.
        """
        return self.holder.direct and directAtSyn(decision, self.address, self.pool.usable)

    def _direct(self, label: Optional[str]) -> None:
        """
        Accept the SYN with the direct mark: its connection goes to its
        destination past Shifter.  One line says so.
        """
        self.holder.counters["direct"] += 1
        announceDirect(self.owner, self.log, self.clientLabel, self.target, label, self.tunnelId, self.started)
        self._cancelPending()
        self._verdict("direct")
        self._done()

    def _refusal(self) -> tuple[str, str] | None:
        """
        Why the tunnel would refuse this connection, as (counter, reason),
        or C{None}: the same checks, before any proxy is asked.
        """
        held = self.holder.heldFrom(clientKey(self.clientHost)) - 1
        return refusalAtSyn(self.holder.owner, self.clientHost, self.address, self.destination.port, held)

    # Connecting and handshaking, the SYN held.

    def _fail(self, kind: str, reason: str, **fields: Any) -> None:
        """
        The tunnel is refused: so is the SYN, with a reset, and one line
        says why.
        """
        self.stats.counters[kind] += 1
        self.holder.counters["refused"] += 1
        text = "tunnel {client} -> {destination}{named} via {proxy} refused at the SYN: {reason} id={tunnel}"
        facts: dict[str, Any] = dict(
            tunnel=self.tunnelId,
            client=self.clientLabel,
            destination=self.target,
            named=self.named,
            proxy=self.proxy.description if self.proxy is not None else "(none)",
            reason=reason,
            failure_kind=kind,
            **fields,
        )
        if kind in _RATE_LIMITED:
            # Refusals a client can repeat at will: rate-limited, as the
            # tunnel's are.
            self.holder.owner.refusals.warn(kind, text, **facts)
        else:
            self.log.warn(text, **facts)
        accessLog = getattr(self.owner, "accessLog", None)
        if accessLog is not None:
            accessLog.tunnelEnded(self._record(kind, reason))
        self._cancelPending()
        self._dropAttempt()
        self._verdict("reject")
        self._done()

    def _record(self, kind: str, reason: str) -> TunnelRecord:
        """
        The access-log record of a SYN refused: a client connection that
        never was, from its SYN to its reset.
        """
        port = self.destination.port
        return TunnelRecord(
            tunnelId=self.tunnelId,
            started=self.started,
            ended=self.clock.seconds(),
            client=self.clientLabel,
            destination=self.target,
            connectTarget=formatAddress(self.connectHost, port) if self.proxy is not None else "",
            targetFrom=self.targetFrom,
            name=None,
            proxy=self.proxy.description if self.proxy is not None else "",
            status=self.proxyStatus,
            bytesUp=0,
            bytesDown=0,
            result=kind,
            how=f"refused at the SYN: {reason}",
            resolved=self.started,
            connecting=self.connectStarted if self.proxy is not None else None,
            connected=self.proxyConnectedAt,
        )

    def _dropCopy(self, copy: Any) -> None:
        # The first copy, held, will be answered: this one adds nothing.
        self.holder.counters["retransmits"] += 1
        self.protocol.drop(copy)

    def _abandon(self) -> None:
        """
        Give up on a held SYN: drop it (its client will send it again, or
        has moved on) and the attempt.
        """
        self._cancelPending()
        self._dropAttempt()
        self._verdict("drop")
        self._done()

    def _notAnswered(self, receiver: IProxyReceiver) -> None:
        return None  # no connection can come from a SYN still held

    # Accepted: the tunnel is open, the SYN on its way to Shifter.

    def _open(self, leftover: bytes) -> None:
        self.state = ACCEPTED
        self.holder.counters["accepted"] += 1
        if leftover:
            self._keepData(leftover)
        self._verdict("accept")
        self._setDeadline(self.clock.seconds() + self.holder.timeout)

    def _keepData(self, data: bytes) -> None:
        # Bytes the server sent first: kept for the client, up to a limit;
        # past it, reading from the proxy pauses until a client takes it.
        self.received.append(data)
        self.receivedBytes += len(data)
        if self.receivedBytes >= self.settings.earlyDataLimit and not self.paused:
            self.paused = True
            self.attempt.transport.pauseProducing()

    def _acceptCopy(self, copy: Any) -> None:
        # The first copy was accepted and redirected; this one follows it
        # (conntrack already knows the connection).
        self.holder.counters["retransmits"] += 1
        self.protocol.accept(copy)

    def _lostWaiting(self, reason: Failure | None = None) -> None:
        # The proxy closed the open tunnel before a client connection took
        # it: forget it; the connection, if it comes, connects afresh.
        self.log.info(
            "tunnel {client} -> {destination} via {proxy}: proxy closed the tunnel "
            "before the client's connection was accepted",
            client=self.clientLabel, destination=self.target, proxy=self.proxy.description,
        )
        self._dropAttempt()
        self._done()

    def _unclaimed(self) -> None:
        self.holder.counters["unclaimed"] += 1
        self.log.info(
            "tunnel {client} -> {destination} via {proxy}: no connection took it within "
            "{timeout:g} s of its SYN's acceptance (the client never completed its "
            "handshake, or its connection was refused); closed",
            client=self.clientLabel, destination=self.target, proxy=self.proxy.description,
            timeout=self.holder.timeout,
        )
        self._dropAttempt()
        self._done()

    def _handOver(self, receiver: IProxyReceiver) -> HeldTunnel:
        attempt, self.attempt = self.attempt, None
        attempt.receiver = receiver
        if self.paused:
            attempt.transport.resumeProducing()
        self.holder.counters["joined"] += 1
        self._done()
        return HeldTunnel(
            attempt, b"".join(self.received), self.started, self.connectHost, self.passClient,
            self.tunnelId, self.proxyStatus, self.proxyConnectedAt,
        )

    def _giveUp(self) -> None:
        self._dropAttempt()
        self._done()

    def _passCopy(self, copy: Any) -> None:
        self.holder.copyOfDone(self.protocol, copy, self)  # never happens: the holder forgets what is done

    # Bookkeeping.

    def _verdict(self, kind: str) -> None:
        """
        Give the held SYN its verdict: C{"accept"}, C{"reject"},
        C{"direct"} or C{"drop"}.
        """
        self.verdict = kind
        getattr(self.protocol, kind)(self.packet)
        self.holder.noteHold(self.clock.seconds() - self.started)

    def _done(self) -> None:
        self.state = DONE
        self._setDeadline(None)
        self.holder.forget(self)

    def _setDeadline(self, when: float | None) -> None:
        self.holder.deadlines.set(self, when)

_HELD = (HELD, DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING)
# The verdicts a copy of the SYN gets too, while remembered.
_REMEMBERED = ("accept", "reject", "direct")
# Every refusal at the SYN a client can cause at will (see the tunnel's
# RATE_LIMITED), and the connection caps, which downstream limits too.
_RATE_LIMITED = RATE_LIMITED | {"limit", "client-limit"}

# What every event does in every state.  "_impossible" marks a pair that
# cannot happen; it refuses a SYN still held and ends with an
# internal-error line.
TABLE = buildTable(
    HeldSyn, STATES, EVENTS,
    # state        event(s)                                            action
    (HELD,         START,                                              "_start"),
    (HELD,         (DECIDED, DECIDE_FAILED, TIMED_OUT) + PROXY_EVENTS, "_impossible"),
    ((DECIDING, CONNECTING, HANDSHAKING, AUTHENTICATING, ACCEPTED), START, "_impossible"),
    (DECIDING,     DECIDED,                                            "_decided"),
    (DECIDING,     DECIDE_FAILED,                                      "_decideFailed"),
    (DECIDING,     PROXY_EVENTS,                                      "_impossible"),
    # Late results of a policy given up on (cancelled) change nothing.
    ((CONNECTING, HANDSHAKING, AUTHENTICATING, ACCEPTED), (DECIDED, DECIDE_FAILED), "_ignore"),
    (CONNECTING,   PROXY_CONNECTED,                                    "_proxyConnected"),
    (CONNECTING,   PROXY_CONNECT_FAILED,                               "_connectFailed"),
    (CONNECTING,   (PROXY_ANSWERED, PROXY_INVALID, PROXY_DATA, PROXY_ENDED, PROXY_LOST), "_impossible"),
    (HANDSHAKING,  (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_DATA), "_impossible"),
    (HANDSHAKING,  PROXY_ANSWERED,                                     "_answered"),
    (HANDSHAKING,  PROXY_INVALID,                                      "_answerInvalid"),
    (HANDSHAKING,  (PROXY_ENDED, PROXY_LOST),                          "_closedBeforeAnswer"),
    (DECIDING,     TIMED_OUT,                                          "_setupTimedOut"),
    (CONNECTING,   TIMED_OUT,                                          "_connectTimedOut"),
    (HANDSHAKING,  TIMED_OUT,                                          "_handshakeTimedOut"),
    (AUTHENTICATING, (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_DATA), "_impossible"),
    (AUTHENTICATING, PROXY_ANSWERED,                                   "_answered"),
    (AUTHENTICATING, PROXY_INVALID,                                    "_authenticationInvalid"),
    (AUTHENTICATING, (PROXY_ENDED, PROXY_LOST),                        "_closedWhileAuthenticating"),
    (AUTHENTICATING, TIMED_OUT,                                        "_handshakeTimedOut"),
    (_HELD,        RETRANSMITTED,                                      "_dropCopy"),
    (_HELD,        (SUPERSEDED, STOP),                                 "_abandon"),
    (_HELD,        CLAIMED,                                            "_notAnswered"),
    (ACCEPTED,     (PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_ANSWERED, PROXY_INVALID), "_impossible"),
    (ACCEPTED,     PROXY_DATA,                                         "_keepData"),
    (ACCEPTED,     (PROXY_ENDED, PROXY_LOST),                          "_lostWaiting"),
    (ACCEPTED,     TIMED_OUT,                                          "_unclaimed"),
    (ACCEPTED,     RETRANSMITTED,                                      "_acceptCopy"),
    (ACCEPTED,     (SUPERSEDED, STOP),                                 "_giveUp"),
    (ACCEPTED,     CLAIMED,                                            "_handOver"),
    # Done: nothing is left; a copy of the SYN still gets its verdict.
    (DONE,         RETRANSMITTED,                                      "_passCopy"),
    (DONE,         tuple(e for e in EVENTS if e != RETRANSMITTED),     "_ignore"),
)


class SynHolder:
    """
    Holds each queued SYN while its tunnel is opened (C{--hold-syn}).

    L{shifter.resolvers.nfqueue.QueueProtocol} hands it every SYN
    (L{synReceived}); the owner's tunnels take open tunnels with L{claim}.

    @ivar owner: the L{shifter.tunnel.downstream.ShifterFactory} (its settings,
        pool, counters and open tunnels at the time of each SYN).
    @ivar timeout: C{--hold-timeout}: the longest a SYN is held, and the
        longest an open tunnel waits for its client's connection.
    @ivar entries: the held SYNs and open tunnels not yet taken, by
        (client address, client port, destination address, destination
        port): a client may use one port for connections to several
        destinations at once.
    @ivar recent: the SYNs whose verdict was given in the last C{timeout}
        seconds (at most C{maxRecent}), so that copies of them still get
        the same verdict.
    @ivar counters: C{held}, C{accepted}, C{refused}, C{direct} (DIRECT
        at the SYN), C{joined},
        C{retransmits}, C{unclaimed}, C{passed} (not held: too many).
    @ivar longestHold: the longest a SYN waited for its verdict, in seconds.
    """

    log = Logger()

    def __init__(
        self,
        owner: Any,
        timeout: float = DEFAULT_HOLD_TIMEOUT,
        newAttempt: Callable[[Any, IProxyReceiver], Any] = newAttempt,
        direct: bool = False,
    ) -> None:
        """
        @param newAttempt: makes an attempt at a proxy (a test passes its
            own).
        @param direct: give DIRECT decisions at the SYN (the queue has a
            direct mark, C{--direct-mark}).
        """
        if not timeout > 0:
            raise ValueError("the hold timeout must be more than 0 seconds")
        self.owner = owner
        self.timeout = timeout
        self.clock = owner.reactor
        self.newAttempt = newAttempt
        self.direct = direct
        self.deadlines = Deadlines(self.clock)
        self.entries: dict[tuple[str, int, str, int], HeldSyn] = {}
        # (sequence number, verdict, until when) of SYNs done lately, by
        # source, oldest first.
        self.recent: OrderedDict[tuple[str, int, str, int], tuple[int, str, float]] = OrderedDict()
        self.maxRecent = 65536
        self.perClient: dict[str, int] = {}  # entries by client key
        self.counters: Counter[str] = Counter()
        self.longestHold = 0.0

    def synReceived(self, protocol: Any, packet: Any) -> None:
        """
        A SYN was queued: hold it and open its tunnel, or recognise a copy.
        """
        segment = packet.segment
        client = canonicalHost(socket.inet_ntop(segment.family, segment.source))
        destination = canonicalHost(socket.inet_ntop(segment.family, segment.destination))
        key = (client, segment.sourcePort, destination, segment.destinationPort)
        entry = self.entries.get(key)
        if entry is not None:
            if entry.sequence == segment.sequence:
                entry.retransmitted(packet)
                return
            entry.superseded()
        elif self._copyOfRecent(protocol, packet, key):
            return
        limit, active = self.owner.settings.maxConnections, len(self.owner.active)
        if active < limit <= active + len(self.entries):
            # Room for its connection, none for a held SYN more.
            self.counters["passed"] += 1
            protocol.accept(packet)
            return
        entry = HeldSyn(self, protocol, packet, client, segment.sourcePort)
        self.entries[key] = entry
        clientId = entry.clientId = clientKey(client)
        self.perClient[clientId] = self.perClient.get(clientId, 0) + 1
        self.counters["held"] += 1
        protocol.hold(packet)
        entry.start()

    def claim(
        self, clientHost: str, clientPort: int, host: str, port: int, receiver: IProxyReceiver
    ) -> Optional[HeldTunnel]:
        """
        The open tunnel for the client connection from C{clientHost:clientPort}
        to C{host:port}, now reporting to C{receiver}; C{None} if there is
        none.
        """
        entry = self.entries.get((clientHost, clientPort, host, port))
        if entry is None:
            return None
        return entry.claimed(receiver)

    def forget(self, entry: HeldSyn) -> None:
        """
        C{entry} is done.  Its SYN's verdict is remembered for a while: a
        copy of it can still come, sent before the client had the answer
        to the first, or read from the queue after it.
        """
        key = entry.key
        if self.entries.get(key) is entry:
            del self.entries[key]
            clientId = entry.clientId
            left = self.perClient[clientId] - 1
            if left:
                self.perClient[clientId] = left
            else:
                del self.perClient[clientId]
        if entry.verdict in _REMEMBERED:
            recent = self.recent
            recent.pop(key, None)
            recent[key] = (entry.sequence, entry.verdict, self.clock.seconds() + self.timeout)
            if len(recent) > self.maxRecent:
                recent.popitem(last=False)

    def _copyOfRecent(self, protocol: Any, packet: Any, key: tuple[str, int, str, int]) -> bool:
        """
        If C{packet} is a copy of a SYN whose verdict was given lately, give
        it the same verdict (an accepted connection goes on; a refused one
        is reset again, in case the first reset was lost) and say so.
        """
        recent = self.recent
        now = self.clock.seconds()
        while recent:
            oldest = next(iter(recent.values()))
            if oldest[2] > now:
                break
            recent.popitem(last=False)
        remembered = recent.get(key)
        if remembered is None or remembered[0] != packet.segment.sequence:
            return False
        self.counters["retransmits"] += 1
        getattr(protocol, remembered[1])(packet)
        return True

    def copyOfDone(self, protocol: Any, packet: Any, entry: HeldSyn) -> None:
        """
        A copy for an entry already done: the verdict its SYN got, or, for
        a SYN dropped, acceptance as an ordinary SYN.
        """
        self.counters["retransmits"] += 1
        getattr(protocol, entry.verdict if entry.verdict in _REMEMBERED else "accept")(packet)

    def heldFrom(self, clientId: str) -> int:
        """
        The held SYNs and open tunnels not yet taken of one client
        (L{shifter.tunnel.limits.clientKey}).
        """
        return self.perClient.get(clientId, 0)

    def noteHold(self, seconds: float) -> None:
        if seconds > self.longestHold:
            self.longestHold = seconds

    def stop(self) -> None:
        """
        Drop every held SYN (their clients send them again, to the next
        Shifter or past the queue) and close every open tunnel not taken.
        """
        for entry in list(self.entries.values()):
            entry.stop()
        self.deadlines.stop()
        counters = self.counters
        self.log.info(
            "hold-syn: {held} SYNs held, {accepted} accepted, {refused} refused, "
            "{direct} direct at the SYN, {joined} joined to their connection, {unclaimed} never taken, "
            "{retransmits} copies recognised, {passed} passed unheld; longest hold {longest:.3f} s",
            held=counters["held"], accepted=counters["accepted"], refused=counters["refused"],
            direct=counters["direct"],
            joined=counters["joined"], unclaimed=counters["unclaimed"],
            retransmits=counters["retransmits"], passed=counters["passed"],
            longest=self.longestHold,
        )
