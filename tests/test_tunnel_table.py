"""
Every (state, event) pair of the tunnel's state machine, driven without
sockets: L{shifter.tunnel.tunnel.Tunnel} with a recording client, proxy attempt
and owner.  Each pair is checked against what it should do (written here
from the tunnel's intended behaviour, not read from its table): what is
sent, what is closed, which counter moves, and the state it ends in.
"""

from __future__ import annotations

import base64
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from zope.interface import implementer

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.tunnel import tunnel as T
from shifter.upstream.connect import ConnectResponse
from shifter.tunnel.deadlines import Deadlines
from shifter.tunnel.destinations import GatewayNames, ProxyAddresses
from shifter.tunnel.downstream import TunnelSettings
from shifter.interfaces import IProxyAttempt, IRelay
from shifter.logs import RateLimitedLog
from shifter.tunnel.metrics import TunnelStats
from shifter.upstream.pool import ProxyPool
from shifter.upstream.auth import Credentials, ProxyAuth
from shifter.upstream.proxy import UpstreamProxy
from shifter.resolvers.resolver import DestinationUnknown
from shifter.tunnel.tunnel import ITunnelClient, ITunnelOwner, Tunnel

from tests.support import knowLocalAddresses, ntlmUsers
from tests.test_sniff import realHello

DESTINATION = IPv4Address("TCP", "203.0.113.7", 443)
OK = ConnectResponse(200, "Connection established", [], b"")


@implementer(IProxyAttempt)
class RecordingAttempt:
    transport = None

    def __init__(self, proxy: Any, calls: list) -> None:
        self.proxy = proxy
        self.calls = calls

    def connect(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.calls.append(("proxy.write", data))

    def again(self, request: bytes, response: Any) -> None:
        self.calls.append(("proxy.again",))

    def halfClose(self) -> None:
        self.calls.append(("proxy.halfClose",))

    def finish(self) -> None:
        self.calls.append(("proxy.finish",))

    def abort(self) -> None:
        self.calls.append(("proxy.abort",))


@implementer(IRelay)
class RecordingRelay:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def start(self, toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        pass

    def clientFinished(self) -> None:
        self.calls.append(("relay.clientFinished",))

    def proxyFinished(self) -> None:
        self.calls.append(("relay.proxyFinished",))

    def up(self, data: bytes) -> None:
        self.calls.append(("relay.up", data))

    def down(self, data: bytes) -> None:
        self.calls.append(("relay.down", data))

    def clientGone(self) -> None:
        self.calls.append(("relay.clientGone",))

    def proxyGone(self) -> None:
        self.calls.append(("relay.proxyGone",))

    def stop(self) -> None:
        self.calls.append(("relay.stop",))


@implementer(ITunnelClient)
class RecordingClient:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.destination: Any = DESTINATION
        self.attempts: list[RecordingAttempt] = []

    def resolveDestination(self) -> Any:
        return self.destination

    def connectProxy(self, proxy: Any, tunnel: Any) -> RecordingAttempt:
        attempt = RecordingAttempt(proxy, self.calls)
        self.attempts.append(attempt)
        self.calls.append(("connectProxy", proxy))
        return attempt

    def startRelay(self, attempt: Any, toProxy: bytes, toClient: bytes, clientEnded: bool) -> RecordingRelay:
        self.calls.append(("startRelay", toProxy, toClient, clientEnded))
        return RecordingRelay(self.calls)

    def pauseReading(self) -> None:
        self.calls.append(("client.pause",))

    def resumeReading(self) -> None:
        self.calls.append(("client.resume",))

    def close(self) -> None:
        self.calls.append(("client.close",))

    def finish(self) -> None:
        self.calls.append(("client.finish",))

    def abort(self) -> None:
        self.calls.append(("client.abort",))


class PendingPolicy:
    def decide(self, request: Any) -> Deferred:
        return Deferred()


class DummyEndpoint:
    def connect(self, factory: Any) -> Deferred:
        return Deferred()


@implementer(ITunnelOwner)
class Owner:
    resolver = object()

    def __init__(self, settings: TunnelSettings, policy: Any = None, auth: Any = None) -> None:
        self.settings = settings
        self.reactor = Clock()
        proxy = UpstreamProxy("proxy.test:3128", DummyEndpoint(), ("198.51.100.3", 3128), auth=auth)
        self.pool = ProxyPool([proxy], self.reactor)
        self.proxyAddresses = ProxyAddresses(self.pool.proxies, self.reactor)
        knowLocalAddresses(self)
        self.gatewayNames = GatewayNames([], {})
        self.connectByAddress = False
        self.policy = policy
        self.deadlines = Deadlines(self.reactor)
        self.stats = TunnelStats()
        self.refusals = RateLimitedLog(Logger(), self.reactor)
        self.closed: list[Tunnel] = []
        self.held: Any = None
        self.claims: list[tuple[str, int, str, int, Any]] = []

    def isListeningAddress(self, host: str, port: int) -> bool:
        return False

    def tunnelClosed(self, tunnel: Tunnel) -> None:
        self.closed.append(tunnel)

    def heldTunnel(self, clientHost: str, clientPort: int, host: str, port: int, receiver: Any) -> Any:
        self.claims.append((clientHost, clientPort, host, port, receiver))
        held, self.held = self.held, None
        return held


class Harness:
    """
    A tunnel brought to one state, with everything it did recorded.
    """

    def __init__(self, state: str) -> None:
        settings = TunnelSettings(
            connectTarget="sni" if state == T.SNIFFING else "ip",
            idleTimeout=30, setupTimeout=60, closeGrace=5,
        )
        auth = None
        if state == T.AUTHENTICATING:
            # A proxy known to ask for NTLM: the first CONNECT carries the
            # negotiate message, and its 407 the challenge.
            auth = ProxyAuth(Credentials("CORP\\alice", "s3cret"))
            auth.ntlm = True
        self.owner = Owner(settings, PendingPolicy() if state == T.DECIDING else None, auth)
        self.calls: list = []
        self.client = RecordingClient(self.calls)
        if state == T.RESOLVING:
            self.client.destination = Deferred()
        self.tunnel = Tunnel(self.owner, self.client, "192.0.2.2", 50000, "192.0.2.1", 12345)
        self._bringTo(state)
        self.calls.clear()
        self.counters = Counter(self.owner.stats.counters)

    def _bringTo(self, state: str) -> None:
        tunnel = self.tunnel
        if state == T.ACCEPTED:
            return
        tunnel.start()
        if state in (T.RESOLVING, T.SNIFFING, T.DECIDING, T.CONNECTING):
            return
        attempt = self.client.attempts[-1]
        tunnel.proxyConnected(attempt)
        if state == T.HANDSHAKING:
            return
        if state == T.AUTHENTICATING:
            tunnel.proxyAnswered(attempt, ntlmChallenge(self.calls[-1][1]))
            assert tunnel.state == state, (tunnel.state, state)
            return
        tunnel.proxyAnswered(attempt, OK)
        if state == T.CLIENT_FINISHED:
            tunnel.clientEnded()
        elif state == T.PROXY_FINISHED:
            tunnel.proxyEnded(attempt)
        elif state in (T.CLOSING, T.CLOSED):
            self.owner.reactor.advance(31)  # idle: closing, both connections open
            if state == T.CLOSED:
                tunnel.clientLost(Failure(ConnectionDone()))
                tunnel.proxyLost(attempt, Failure(ConnectionDone()))
        assert tunnel.state == state, (tunnel.state, state)

    def attempt(self) -> RecordingAttempt:
        """
        The tunnel's current attempt, or a new one (which the tunnel has
        never heard of) when it has none.
        """
        current = self.tunnel.attempt
        return current if current is not None else RecordingAttempt(None, self.calls)

    def fire(self, event: str) -> None:
        tunnel = self.tunnel
        if event == T.TIMED_OUT:
            # The stage's end, whatever it is, has come (the deadline
            # before it, if any, fires first and finds it has not).
            deadline = tunnel.deadline
            end = tunnel.stageEnd if tunnel.stageEnd is not None else deadline
            self.owner.reactor.advance((end - self.owner.reactor.seconds()) if end else 0)
            if deadline is None:
                tunnel.timedOut()
            return
        args: dict[str, tuple] = {
            T.START: (),
            T.RESOLVED: (DESTINATION,),
            T.RESOLVE_FAILED: (Failure(DestinationUnknown("no entry")),),
            T.DECIDED: (None,),
            T.DECIDE_FAILED: (Failure(RuntimeError("policy broke")),),
            T.CLIENT_DATA: (b"hello",),
            T.CLIENT_ENDED: (),
            T.CLIENT_LOST: (Failure(ConnectionDone()),),
            T.PROXY_CONNECTED: (self.attempt(),),
            T.PROXY_CONNECT_FAILED: (self.attempt(), Failure(ConnectionDone())),
            T.PROXY_ANSWERED: (self.attempt(), OK),
            T.PROXY_INVALID: (self.attempt(), "not HTTP"),
            T.PROXY_DATA: (self.attempt(), b"world"),
            T.PROXY_ENDED: (self.attempt(),),
            T.PROXY_LOST: (self.attempt(), Failure(ConnectionDone())),
            T.RELAY_ENDED: ("both sides closed",),
            T.ABORT: ("shutdown",),
        }
        method = {
            T.START: tunnel.start, T.RESOLVED: tunnel.resolved, T.RESOLVE_FAILED: tunnel.resolveFailed,
            T.DECIDED: tunnel.decided, T.DECIDE_FAILED: tunnel.decideFailed,
            T.CLIENT_DATA: tunnel.clientData, T.CLIENT_ENDED: tunnel.clientEnded,
            T.CLIENT_LOST: tunnel.clientLost, T.PROXY_CONNECTED: tunnel.proxyConnected,
            T.PROXY_CONNECT_FAILED: tunnel.proxyConnectFailed, T.PROXY_ANSWERED: tunnel.proxyAnswered,
            T.PROXY_INVALID: tunnel.proxyInvalid, T.PROXY_DATA: tunnel.proxyData,
            T.PROXY_ENDED: tunnel.proxyEnded, T.PROXY_LOST: tunnel.proxyLost,
            T.RELAY_ENDED: tunnel.relayEnded, T.ABORT: tunnel.abort,
        }[event]
        method(*args[event])

    def counted(self) -> dict[str, int]:
        """
        The counters that moved since the state was reached.
        """
        now = self.owner.stats.counters
        return {k: now[k] - self.counters[k] for k in now if now[k] != self.counters[k]}


# The expected outcome of each pair: (state after, calls made, counters
# moved).  Calls and counters are checked exactly.
_SETUP = (T.RESOLVING, T.SNIFFING, T.DECIDING, T.CONNECTING, T.HANDSHAKING, T.AUTHENTICATING)


def ntlmChallenge(request: bytes) -> ConnectResponse:
    """
    The 407 a proxy gives the NTLM negotiate message in C{request}: a
    challenge from pyspnego's own acceptor, with an empty body.
    """
    import spnego

    negotiate = request.split(b"Proxy-Authorization: NTLM ", 1)[1].split(b"\r\n", 1)[0]
    with tempfile.TemporaryDirectory() as directory, ntlmUsers(Path(directory), "CORP:alice:s3cret"):
        challenge = spnego.server(protocol="ntlm").step(base64.b64decode(negotiate))
    value = b"NTLM " + base64.b64encode(challenge)
    return ConnectResponse(407, "Proxy Authentication Required", [
        (b"Proxy-Authenticate", value), (b"Content-Length", b"0"),
    ])
_OPEN = (T.RELAYING, T.CLIENT_FINISHED, T.PROXY_FINISHED)


def expected(state: str, event: str) -> tuple[Any, Any, Any]:
    """
    What (state, event) should do, as (state after, calls, counters); a
    value of C{None} for calls means "the internal-error path".
    """
    PROXY = (T.PROXY_CONNECTED, T.PROXY_CONNECT_FAILED, T.PROXY_ANSWERED, T.PROXY_INVALID,
             T.PROXY_DATA, T.PROXY_ENDED, T.PROXY_LOST)
    internal = (T.CLOSING, None, {"internal": 1})
    if state == T.CLOSED:
        # Nothing is left: every event is ignored (a proxy event comes from
        # an attempt the tunnel no longer has, which is aborted again).
        return T.CLOSED, [("proxy.abort",)] if event in PROXY else [], {}
    if event in PROXY and state in (T.ACCEPTED, T.RESOLVING, T.SNIFFING, T.DECIDING):
        # No attempt exists: the event is from a stranger, which is aborted.
        return state, [("proxy.abort",)], {}
    if state == T.ACCEPTED:
        if event == T.START:
            return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
        return internal
    if event == T.START:
        return internal
    # Dropping a connection of a tunnel that was open: what it never sent
    # is counted (by the relay) first.
    drop = [("relay.proxyGone",), ("proxy.abort",), ("relay.clientGone",), ("client.abort",)]
    if state == T.CLOSING:
        # (Reached from relaying, by the idle deadline: the stopped relay
        # still counts what the connections never sent.)
        if event == T.CLIENT_LOST:
            return T.CLOSING, [("relay.clientGone",)], {}  # the proxy connection is still awaited
        if event == T.PROXY_LOST:
            return T.CLOSING, [("relay.proxyGone",)], {}  # the client connection is still awaited
        if event == T.PROXY_CONNECT_FAILED:
            return T.CLOSING, [], {}
        if event == T.TIMED_OUT:
            return T.CLOSED, drop, {"closed": 1}
        if event == T.ABORT:
            return T.CLOSING, drop, {}
        return T.CLOSING, [], {}  # late bytes, answers and results are dropped
    if state in _SETUP:
        failAttempt = [("proxy.abort",)] if state in (T.CONNECTING, T.HANDSHAKING, T.AUTHENTICATING) else []
        if event == T.CLIENT_LOST:
            return T.CLOSED, failAttempt, {"client-gone": 1}
        if event == T.ABORT:
            return T.CLOSING, failAttempt + [("client.close",), ("client.abort",)], {"shutdown": 1}
        if event == T.CLIENT_DATA:
            if state == T.SNIFFING:
                # Not a TLS record: no name to find, connect with the address.
                return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
            return state, [], {}  # kept for when the tunnel opens
        if event == T.CLIENT_ENDED:
            if state == T.SNIFFING:
                # No hello can come now: connect with the address.
                return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
            return state, [], {}
        if event == T.RELAY_ENDED:
            return internal
    if state == T.RESOLVING:
        if event == T.RESOLVED:
            return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
        if event == T.RESOLVE_FAILED:
            return T.CLOSING, [("client.close",)], {"resolver": 1}
        if event == T.TIMED_OUT:
            return T.CLOSING, [("client.close",)], {"setup-timeout": 1}
        return internal
    if state == T.SNIFFING:
        if event == T.TIMED_OUT:
            # No hello in time: connect with the address.
            return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
        return internal
    if state == T.DECIDING:
        if event == T.DECIDED:
            return T.CONNECTING, [("connectProxy", "proxy.test:3128")], {}
        if event == T.DECIDE_FAILED:
            return T.CLOSING, [("client.close",)], {"policy": 1}
        if event == T.TIMED_OUT:
            return T.CLOSING, [("client.close",)], {"setup-timeout": 1}
        return internal
    if state == T.CONNECTING:
        if event == T.PROXY_CONNECTED:
            return T.HANDSHAKING, [("proxy.write", b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n")], {}
        if event == T.PROXY_CONNECT_FAILED:
            return T.CLOSING, [("client.close",)], {"proxy-connect": 1}
        if event == T.TIMED_OUT:
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"timeout": 1}
        return internal
    if state == T.HANDSHAKING:
        if event == T.PROXY_ANSWERED:
            return T.RELAYING, [("startRelay", b"", b"", False)], {"opened": 1}
        if event == T.PROXY_INVALID:
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"proxy-garbage": 1}
        if event in (T.PROXY_ENDED, T.PROXY_LOST):
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"proxy-closed": 1}
        if event == T.TIMED_OUT:
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"timeout": 1}
        return internal
    if state == T.AUTHENTICATING:
        # NTLM's second round, on the same connection: its failures are
        # the authentication's.
        if event == T.PROXY_ANSWERED:
            return T.RELAYING, [("startRelay", b"", b"", False)], {"opened": 1}
        if event in (T.PROXY_INVALID, T.PROXY_ENDED, T.PROXY_LOST):
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"proxy-auth": 1}
        if event == T.TIMED_OUT:
            return T.CLOSING, [("proxy.abort",), ("client.close",)], {"timeout": 1}
        return internal
    # Open: the connections are finished in order, never just closed.
    close = [("relay.stop",), ("proxy.finish",), ("client.finish",)]
    if event == T.CLIENT_DATA:
        if state == T.CLIENT_FINISHED:
            return internal
        return state, [("relay.up", b"hello")], {}
    if event == T.PROXY_DATA:
        if state == T.PROXY_FINISHED:
            return internal
        return state, [("relay.down", b"world")], {}
    if event == T.CLIENT_ENDED:
        if state == T.RELAYING:
            return T.CLIENT_FINISHED, [("relay.clientFinished",)], {}
        if state == T.PROXY_FINISHED:
            return T.CLOSING, close, {}
        return internal
    if event == T.PROXY_ENDED:
        if state == T.RELAYING:
            return T.PROXY_FINISHED, [("relay.proxyFinished",)], {}
        if state == T.CLIENT_FINISHED:
            return T.CLOSING, close, {}
        return internal
    if event == T.CLIENT_LOST:
        return T.CLOSING, [("relay.clientGone",), ("relay.stop",), ("proxy.finish",)], {}
    if event == T.PROXY_LOST:
        return T.CLOSING, [("relay.proxyGone",), ("relay.stop",), ("client.finish",)], {}
    if event == T.RELAY_ENDED:
        return T.CLOSING, close, {}
    if event == T.TIMED_OUT:
        return T.CLOSING, close, {}  # idle
    if event == T.ABORT:
        return T.CLOSING, close + drop, {}
    return internal


class TableTests(SynchronousTestCase):
    def test_everyPairDeclared(self) -> None:
        """
        The table names an action for every state and every event.
        """
        for event in T.EVENTS:
            self.assertEqual(set(T.TABLE[event]), set(T.STATES), event)

    def test_everyPair(self) -> None:
        """
        Each (state, event) pair does what it should: the state it leads
        to, every call on the client, proxy and relay, and the counters
        that move.  Pairs that cannot happen close the connection with an
        internal-error line and the C{internal} counter.
        """
        wrong = []
        checked = 0
        for state in T.STATES:
            for event in T.EVENTS:
                try:
                    self._checkPair(state, event)
                except self.failureException as e:
                    wrong.append(str(e))
                checked += 1
        self.assertEqual(wrong, [])
        self.assertEqual(checked, len(T.STATES) * len(T.EVENTS))

    def _checkPair(self, state: str, event: str) -> None:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        try:
            harness = Harness(state)
            harness.fire(event)
        finally:
            globalLogPublisher.removeObserver(events)
        wantState, wantCalls, wantCounters = expected(state, event)
        where = f"({state}, {event})"
        if wantCalls is None:
            self.assertIn(harness.tunnel.state, (T.CLOSING, T.CLOSED), where)
            self.assertEqual(harness.counted(), wantCounters, where)
            lines = [formatEvent(e) for e in events if "internal error" in formatEvent(e)]
            self.assertEqual(len(lines), 1, f"{where}: {lines}")
            self.assertTrue(
                ("client.close",) in harness.calls or ("client.abort",) in harness.calls, where
            )
            self.flushLoggedErrors(AssertionError)
            return
        self.assertEqual(harness.tunnel.state, wantState, where)
        named = [tuple(c.description if isinstance(c, UpstreamProxy) else c for c in call) for call in harness.calls]
        self.assertEqual(named, wantCalls, where)
        self.assertEqual(harness.counted(), wantCounters, where)
        self.flushLoggedErrors()

    def test_closedTunnelLeavesOwner(self) -> None:
        """
        Reaching C{closed} tells the owner once and leaves no deadline.
        """
        harness = Harness(T.CLOSED)
        self.assertEqual(harness.owner.closed, [harness.tunnel])
        self.assertEqual(len(harness.owner.deadlines), 0)
        self.assertEqual(harness.owner.reactor.getDelayedCalls(), [])

    def test_strangerAttemptAborted(self) -> None:
        """
        An event from a proxy attempt the tunnel has given up on aborts that
        attempt and changes nothing else.
        """
        harness = Harness(T.HANDSHAKING)
        stranger = RecordingAttempt(None, harness.calls)
        harness.tunnel.proxyAnswered(stranger, OK)
        self.assertEqual(harness.tunnel.state, T.HANDSHAKING)
        self.assertEqual(harness.calls, [("proxy.abort",)])
        self.assertEqual(harness.counted(), {})


class CanonicalHostTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        Addresses come out in the one form Shifter compares: IPv4 as given
        when already canonical, IPv4-mapped ones unmapped, IPv6 compressed
        and lower case, without a scope.
        """
        for given, canonical in [
            ("192.0.2.2", "192.0.2.2"),
            ("0.0.0.0", "0.0.0.0"),
            ("255.255.255.255", "255.255.255.255"),
            ("::ffff:192.0.2.2", "192.0.2.2"),
            ("2001:DB8:0::1", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
        ]:
            self.assertEqual(T.canonicalHost(given), canonical)

    def test_notAnAddress(self) -> None:
        """
        Anything else is refused, never passed on as if it were one.
        """
        for bad in ("256.0.0.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", "example.test", "", "::ffff:1.2.3.999"):
            self.assertRaises(ValueError, T.canonicalHost, bad)


class HeldTunnelTests(SynchronousTestCase):
    """
    A tunnel opened while its client's SYN was held (C{--hold-syn}): the
    owner hands it over when the tunnel would connect to a proxy.
    """

    def setUp(self) -> None:
        self.owner = Owner(TunnelSettings(idleTimeout=30, setupTimeout=60, closeGrace=5))
        self.calls: list = []
        self.client = RecordingClient(self.calls)
        self.tunnel = Tunnel(self.owner, self.client, "192.0.2.2", 50000, "192.0.2.1", 12345)
        self.proxy = self.owner.pool.proxies[0]
        self.attempt = RecordingAttempt(self.proxy, self.calls)

    def hold(self, leftover: bytes = b"", connectHost: str = "203.0.113.7", passClient: Any = None) -> None:
        from shifter.tunnel.holdsyn import HeldTunnel

        self.owner.held = HeldTunnel(self.attempt, leftover, 0.0, connectHost, passClient)

    def test_taken(self) -> None:
        """
        The held tunnel is the tunnel's: no proxy connection is made, the
        relay starts with the bytes the proxy already sent, and it counts as
        opened; proxy events from its attempt are the tunnel's.
        """
        self.hold(b"banner")
        self.tunnel.start()
        self.assertEqual(self.owner.claims, [("192.0.2.2", 50000, "203.0.113.7", 443, self.tunnel)])
        self.assertEqual(self.calls, [("startRelay", b"", b"banner", False)])
        self.assertEqual((self.tunnel.state, self.tunnel.attempt, self.tunnel.proxy),
                         (T.RELAYING, self.attempt, self.proxy))
        self.assertEqual(self.owner.stats.counters["opened"], 1)
        self.tunnel.proxyData(self.attempt, b"more")
        self.assertEqual(self.calls[-1], ("relay.down", b"more"))

    def test_idKept(self) -> None:
        """
        The tunnel takes the held tunnel's id (the one its CONNECT carried,
        at the SYN), its proxy's status and the connection's time, for its
        access-log record.
        """
        from shifter.tunnel.holdsyn import HeldTunnel

        self.owner.held = HeldTunnel(self.attempt, b"", 0.0, "203.0.113.7", None, "k7q2mx4d-1b", 200, 0.5)
        self.tunnel.start()
        self.assertEqual(self.tunnel.describe(0.0).tunnelId, "k7q2mx4d-1b")
        record = self.tunnel.record()
        self.assertEqual((record.tunnelId, record.status, record.connected), ("k7q2mx4d-1b", 200, 0.5))

    def test_noneHeld(self) -> None:
        """
        With nothing held, the tunnel connects to a proxy as ever.
        """
        self.tunnel.start()
        self.assertEqual([c[0] for c in self.calls], ["connectProxy"])
        self.assertEqual(self.tunnel.state, T.CONNECTING)

    def test_policyAskedAtTheSyn(self) -> None:
        """
        With a policy, the held tunnel is taken before the policy would be
        asked: it was asked at the SYN, and its choices (here a name for
        CONNECT and a --pass-client mode) are the tunnel's.
        """
        self.owner.policy = PendingPolicy()
        self.tunnel = Tunnel(self.owner, self.client, "192.0.2.2", 50000, "192.0.2.1", 12345)
        self.hold(connectHost="www.example.test", passClient="proxy-v1")
        self.tunnel.start()
        self.assertEqual(self.tunnel.state, T.RELAYING)
        self.assertEqual([c[0] for c in self.calls], ["startRelay"])
        self.assertEqual((self.tunnel.connectHost, self.tunnel.passClient, self.tunnel.named),
                         ("www.example.test", "proxy-v1", " (CONNECT www.example.test:443, from policy)"))

    def test_notTakenWithAName(self) -> None:
        """
        A connection that read a name for CONNECT from its first bytes does
        not ask for a held tunnel (its SYN had no name to ask for).
        """
        self.owner = Owner(TunnelSettings(connectTarget="sni", sniffTimeout=1, idleTimeout=30, setupTimeout=60))
        self.tunnel = Tunnel(self.owner, self.client, "192.0.2.2", 50000, "192.0.2.1", 12345)
        self.hold()
        self.tunnel.start()
        self.tunnel.clientData(realHello("www.example.test"))
        self.assertEqual(self.owner.claims, [])
        self.assertEqual(self.tunnel.state, T.CONNECTING)
