"""
The downstream side: redirected client connections, each the owner of one
tunnel through the upstream proxy.

A L{DownstreamProtocol} takes its connection through four stages: resolve
the original destination, connect to the proxy, read the proxy's answer to
CONNECT, relay.  The relay (L{shifter.relay}) is splice(2) between the two
sockets where both are plain TCP, else Twisted's own flow control, each
transport the other's streaming producer; either way a slow side pauses the
fast one and no buffer grows without bound.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.connect import ConnectResponse, formatAuthority
from shifter.metrics import TunnelMetrics
from shifter.passclient import refusalHint, tunnelRequest
from shifter.policy import ITunnelPolicy, TunnelDecision, TunnelRequest
from shifter.pool import ProxyPool
from shifter.proxy import UpstreamProxy
from shifter.relay import IRelay, openRelay
from shifter.resolver import Destination, IOriginalDestinationResolver, ResolverError
from shifter.sockopt import unmapAddress
from shifter.tunnel import TunnelInfo
from shifter.upstream import UpstreamFactory, UpstreamProtocol


@dataclass(frozen=True)
class TunnelSettings:
    """
    Limits that apply to every tunnel.

    @ivar connectTimeout: seconds to wait for the TCP connection to the proxy.
    @ivar handshakeTimeout: seconds to wait for the proxy's answer to CONNECT.
    @ivar idleTimeout: seconds without a byte either way before a tunnel is
        closed; 0 for never.
    @ivar earlyDataLimit: bytes a client may send before its tunnel opens;
        past this, reading from it pauses until the tunnel is open.
    @ivar maxConnections: tunnels open at once; further clients are refused.
    @ivar allowedClients: if not empty, the only client networks served.
    @ivar allowedPorts: if not empty, the only destination ports served.
    @ivar connectTarget: what CONNECT asks for: C{"ip"}, the original
        destination's address; C{"sni"} or C{"host"}, the name in the
        client's TLS ClientHello or HTTP Host header; C{"auto"}, whichever
        the client's first bytes hold.  The original port is always kept.
    @ivar sniffTimeout: seconds to wait for the client's first bytes when
        looking for a name, before using the address.
    @ivar relay: how open tunnels relay: C{"auto"} or C{"splice"} (zero-copy
        wherever both sides are plain TCP), or C{"twisted"} (Twisted's
        producers and consumers); see L{shifter.relay}.
    """

    connectTimeout: float = 10.0
    handshakeTimeout: float = 10.0
    idleTimeout: float = 3600.0
    earlyDataLimit: int = 64 * 1024
    maxConnections: int = 10000
    allowedClients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowedPorts: frozenset[int] = field(default_factory=frozenset)
    connectTarget: str = "ip"
    sniffTimeout: float = 2.0
    relay: str = "auto"


class ShifterFactory(ServerFactory):
    """
    Accepts redirected connections and tunnels each, through a proxy of
    C{pool}, to the destination that C{resolver} finds.

    @ivar active: the client protocols whose tunnels are not yet finished.
    @ivar counters: how tunnels ended and why they failed, by short name
        (C{"opened"}, C{"closed"}, C{"resolver"}, C{"proxy-status"}, ...).
    @ivar openTunnels: tunnels relaying now.
    @ivar bytesUp: bytes from clients, of tunnels that have finished.
    @ivar bytesDown: bytes to clients, of tunnels that have finished.
    @ivar proxyAnswers: the proxy's answers to CONNECT by status class.
    @ivar retries: connection attempts moved on to another proxy.
    @ivar acceptPauses: times accepting paused for lack of descriptors.
    @ivar metrics: latency histograms, and the registry C{--metrics} serves.
    """

    log = Logger()

    def __init__(
        self,
        resolver: IOriginalDestinationResolver,
        pool: ProxyPool,
        settings: TunnelSettings,
        reactor,  # type: ignore[no-untyped-def]
        policy: ITunnelPolicy | None = None,
    ) -> None:
        self.resolver = resolver
        self.pool = pool
        self.settings = settings
        self.policy = policy
        self.reactor = reactor
        self.active: set[DownstreamProtocol] = set()
        self.counters: Counter[str] = Counter()
        self.listeningAddress: Destination | None = None
        self.openTunnels = 0
        self.bytesUp = 0
        self.bytesDown = 0
        self.proxyAnswers: Counter[str] = Counter()
        self.retries = 0
        self.acceptPauses = 0
        self.metrics = TunnelMetrics(self)
        self._idleWaiters: list[Deferred[None]] = []

    def isListeningAddress(self, host: str, port: int) -> bool:
        """
        Whether C{host} and C{port} name Shifter's own listening socket (as
        set in C{listeningAddress} once it listens): its port, and its
        address or, for a wildcard socket, any address.

        @param host: an IP address in compressed form.
        """
        listening = self.listeningAddress
        if listening is None or listening.port != port:
            return False
        bound = ipaddress.ip_address(unmapAddress(listening.host.split("%", 1)[0]))
        return bound.is_unspecified or bound.compressed == host

    def acceptPaused(self) -> None:
        """
        Count a pause of accepting (descriptors or memory ran out).
        """
        self.acceptPauses += 1

    def whenIdle(self) -> Deferred[None]:
        """
        @return: a C{Deferred} that fires once no client connection is left.
        """
        waiter: Deferred[None] = Deferred()
        if self.active:
            self._idleWaiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def closeAll(self) -> Deferred[None]:
        """
        Abort every client connection and its tunnel.

        @return: a C{Deferred} that fires once they are all gone.
        """
        done = self.whenIdle()
        for protocol in list(self.active):
            protocol.abort("closed at shutdown")
        return done

    def tunnels(self) -> list[TunnelInfo]:
        """
        A snapshot of every client connection not yet finished.
        """
        now = self.reactor.seconds()
        return [protocol.describe(now) for protocol in self.active]

    def reconfigure(
        self,
        settings: TunnelSettings | None = None,
        pool: ProxyPool | None = None,
        policy: ITunnelPolicy | None = None,
    ) -> None:
        """
        Apply new settings, proxies or policy to connections accepted from
        now on; each open connection keeps the ones it started with.  The
        old pool's probes stop.  Arguments left at C{None} keep what is.
        """
        if settings is not None:
            self.settings = settings
        if pool is not None and pool is not self.pool:
            self.pool.stop()
            self.pool = pool
        if policy is not None:
            self.policy = policy

    def _forget(self, protocol: DownstreamProtocol) -> None:
        self.active.discard(protocol)
        if not self.active and self._idleWaiters:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def buildProtocol(self, addr) -> DownstreamProtocol | None:  # type: ignore[no-untyped-def, override]
        if len(self.active) >= self.settings.maxConnections:
            self.counters["limit"] += 1
            self.log.warn(
                "refused {client}: {limit} tunnels already open (--max-connections)",
                client=_formatAddress(addr.host, addr.port),
                limit=self.settings.maxConnections,
            )
            return None
        protocol = DownstreamProtocol()
        protocol.factory = self
        return protocol


@implementer(IHalfCloseableProtocol)
class DownstreamProtocol(Protocol):
    """
    One redirected client connection and the tunnel it is owed.

    @ivar received: bytes received from the client.
    @ivar destination: the original destination, once resolved.
    @ivar proxy: the proxy being tried or in use.
    @ivar upstream: the connection to that proxy, once connected.
    """

    log = Logger()
    factory: ShifterFactory
    # The accepted TCP connection: an ITCPTransport that is also the push
    # producer of its bytes.
    transport: Any

    received = 0
    destination: Destination | None = None
    target = "(unknown)"
    proxy: UpstreamProxy | None = None
    upstream: UpstreamProtocol | None = None
    _relaying = False
    _failed = False
    _clientEnded = False
    _upstreamEnded = False
    _clientLost = False
    _upstreamLost = True
    _how: str | None = None
    _pending: Deferred | None = None
    _idleTimer = None
    _lastMoved = 0.0
    _relay: IRelay | None = None
    _sniffTimer = None
    _authRetried = False
    # What CONNECT asks for when it is not the destination's address, and
    # why: for the tunnel's log line.
    _named = ""
    _connectHost = ""
    # What the proxy is told about the client, when a policy chose it.
    _passClient: str | None = None

    def describe(self, now: float) -> TunnelInfo:
        """
        What an operator sees of this connection at time C{now}.
        """
        if self._relaying:
            state = "closing" if self._how is not None else "relaying"
        elif self._failed:
            state = "closing"
        elif self.destination is None:
            state = "resolving"
        elif self.upstream is not None:
            state = "handshaking"
        elif self.proxy is not None:
            state = "connecting"
        else:
            state = "deciding"
        upstream = self.upstream
        return TunnelInfo(
            client=self.client,
            destination=self.target,
            connectTarget=(
                _formatAddress(self._connectHost, self.destination.port)
                if self.destination is not None
                else ""
            ),
            proxy=self.proxy.description if self.proxy is not None else "",
            state=state,
            bytesUp=self.received,
            bytesDown=upstream.received if upstream is not None else 0,
            age=now - self._started,
        )

    def connectionMade(self) -> None:
        factory = self.factory
        factory.active.add(self)
        self._started = factory.reactor.seconds()
        peer = self.transport.getPeer()
        self._peerHost = unmapAddress(peer.host)
        self.client = _formatAddress(self._peerHost, peer.port)
        self._early: list[bytes] = []
        self._earlyBytes = 0
        allowed = factory.settings.allowedClients
        if allowed:
            address = ipaddress.ip_address(self._peerHost)
            if not any(address in network for network in allowed):
                self.fail("client-denied", f"client {self._peerHost} is not in an --allow network")
                return
        # maybeDeferred: a resolver bug becomes a refused connection, not a
        # client left hanging.
        pending = maybeDeferred(factory.resolver.resolve, self.transport)
        self._pending = pending
        pending.addCallbacks(self._resolved, self._resolveFailed)

    # Stage 1: the original destination.

    def _resolved(self, destination: Destination) -> None:
        self._pending = None
        factory = self.factory
        factory.metrics.resolveSeconds.observe(factory.reactor.seconds() - self._started)
        host = ipaddress.ip_address(unmapAddress(destination.host)).compressed
        self.destination = destination
        self.target = _formatAddress(host, destination.port)
        self._address = self._connectHost = host
        if getattr(self.factory.resolver, "localAddressIsDestination", False):
            # TPROXY: the local address is the destination for every
            # connection, so it cannot tell a direct one.  A destination
            # the listening socket itself would accept can.
            direct = self.factory.isListeningAddress(host, destination.port)
        else:
            local = self.transport.getHost()
            localHost = ipaddress.ip_address(unmapAddress(local.host)).compressed
            direct = (host, destination.port) == (localHost, local.port)
        if direct:
            self.fail("loop", "connected to Shifter directly, not redirected")
            return
        if any((host, destination.port) == proxy.address for proxy in factory.pool.proxies):
            self.fail("loop", "destination is an upstream proxy itself")
            return
        allowedPorts = factory.settings.allowedPorts
        if allowedPorts and destination.port not in allowedPorts:
            self.fail("port-denied", f"destination port {destination.port} is not an --allow-port")
            return
        if factory.settings.connectTarget == "ip":
            self._chooseProxies()
        else:
            self._sniffTimer = factory.reactor.callLater(
                factory.settings.sniffTimeout, self._sniff, True
            )
            self._sniff()

    def _resolveFailed(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError):
            return
        if reason.check(ResolverError):
            self.fail("resolver", f"original destination unknown: {reason.getErrorMessage()}")
        else:
            self.log.failure("resolver error for {client}", reason, client=self.client)
            self.fail("resolver", f"resolver error: {reason.getErrorMessage()}")

    # Stage 1b (--connect-target sni, host, auto): a name from the client's
    # first bytes.

    def _sniff(self, final: bool = False) -> None:
        """
        Look for a name in what the client sent so far; go on to the proxy
        once there is a verdict, or with the address when C{final}.
        """
        from shifter.sniff import sniffTarget

        settings = self.factory.settings
        verdict = sniffTarget(settings.connectTarget, b"".join(self._early))
        if verdict is None:
            if not final:
                return
            reason = f"client sent no complete hello within {settings.sniffTimeout:g} s"
            if self._clientEnded:
                reason = "client finished sending before a complete hello"
            name = None
        else:
            name, reason = verdict.name, verdict.reason
        if self._sniffTimer is not None:
            if self._sniffTimer.active():
                self._sniffTimer.cancel()
            self._sniffTimer = None
        port = self.destination.port  # type: ignore[union-attr]
        if name is None:
            self._named = f" (CONNECT by address: {reason})"
        else:
            self._connectHost = name
            self._named = f" (CONNECT {name}:{port}, from {reason})"
        self._chooseProxies()

    # Stage 2: a connection to a proxy, retried on the next one when a
    # proxy fails before the tunnel opens.

    def _chooseProxies(self) -> None:
        factory = self.factory
        self._candidates = factory.pool.candidates(self._peerHost)
        if factory.policy is None:
            self._connectFirst()
            return
        peer = self.transport.getPeer()
        client = (IPv6Address if ":" in self._peerHost else IPv4Address)("TCP", self._peerHost, peer.port)
        name = self._connectHost if self._connectHost != self._address else None
        request = TunnelRequest(client, self.destination, name, tuple(self._candidates))  # type: ignore[arg-type]
        pending = maybeDeferred(factory.policy.decide, request)
        self._pending = pending
        pending.addCallbacks(self._decided, self._policyFailed)

    def _decided(self, decision: TunnelDecision | None) -> None:
        self._pending = None
        if decision is not None:
            if decision.refuse is not None:
                self.fail("policy", f"refused by policy: {decision.refuse}")
                return
            if decision.proxies is not None:
                health = self.factory.pool.health
                self._candidates = [p for p in decision.proxies if p not in health or health[p].up]
            self._passClient = decision.passClient
            if decision.target is not None:
                port = self.destination.port  # type: ignore[union-attr]
                try:
                    formatAuthority(decision.target, port)
                except ValueError as e:
                    self.fail("policy", f"policy gave an invalid target: {e}")
                    return
                self._connectHost = decision.target
                self._named = f" (CONNECT {_formatAddress(decision.target, port)}, from policy)"
        self._connectFirst()

    def _policyFailed(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError):
            return
        self.log.failure("tunnel policy error for {client}", reason, client=self.client)
        self.fail("policy", f"policy error: {reason.getErrorMessage()}")

    def _connectFirst(self) -> None:
        if not self._candidates:
            self.fail("no-proxy", "every proxy is down")
            return
        self._connectStarted = self.factory.reactor.seconds()
        self._connectNext()

    def _connectNext(self) -> None:
        factory = self.factory
        proxy = self.proxy = self._candidates.pop(0)
        port = self.destination.port  # type: ignore[union-attr]
        headers = []
        if proxy.auth is not None:
            headers = proxy.auth.headersFor("CONNECT", formatAuthority(self._connectHost, port))
        request = tunnelRequest(
            proxy, self.transport.getPeer(), self.destination,  # type: ignore[arg-type]
            self._connectHost, port, headers, self._passClient,
        )
        pending = proxy.endpoint.connect(UpstreamFactory(self, request))
        pending.addTimeout(factory.settings.connectTimeout, factory.reactor)
        self._pending = pending
        pending.addErrback(self._connectFailed, proxy)

    def _connectFailed(self, reason: Failure, proxy: UpstreamProxy) -> None:
        self._pending = None
        if self._clientLost and reason.check(CancelledError):
            return
        if reason.check(TimeoutError):
            kind = "timeout"
            why = f"no connection to proxy within {self.factory.settings.connectTimeout:g} s"
        else:
            kind = "proxy-connect"
            why = f"cannot connect to proxy: {reason.getErrorMessage()}"
        self.factory.pool.failed(proxy, why)
        self._retryOrFail(kind, why)

    def _retryOrFail(self, kind: str, reason: str, **fields: object) -> None:
        """
        Try the next proxy if one is left, else end the connection.
        """
        if not self._candidates or self._clientLost or self._failed:
            self.fail(kind, reason, **fields)
            return
        self.factory.retries += 1
        self.log.info(
            "tunnel {client} -> {destination} via {proxy}: {reason}; trying {next}",
            client=self.client,
            destination=self.target,
            proxy=self.proxy.description,  # type: ignore[union-attr]
            reason=reason,
            next=self._candidates[0].description,
        )
        self._connectNext()

    def upstreamConnected(self, upstream: UpstreamProtocol) -> None:
        """
        The proxy accepted the TCP connection and has been sent CONNECT.
        """
        self._pending = None
        self.upstream = upstream
        self._upstreamLost = False
        self.factory.pool.succeeded(self.proxy)  # type: ignore[arg-type]
        if self._clientLost:
            upstream.transport.abortConnection()

    def _dropUpstream(self, upstream: UpstreamProtocol) -> None:
        """
        Let go of a proxy connection that will not carry the tunnel.
        """
        upstream.transport.loseConnection()
        self.upstream = None
        self._upstreamLost = True

    # Stage 3: the proxy's answer (read by the upstream protocol).

    def upstreamFailed(
        self,
        upstream: UpstreamProtocol,
        kind: str,
        reason: str,
        retry: bool = False,
        unhealthy: bool = False,
        **fields: object,
    ) -> None:
        """
        The proxy's answer to CONNECT was a failure.

        @param retry: whether another proxy may succeed where this one
            failed.
        @param unhealthy: whether this counts against the proxy's health.
        """
        if upstream is not self.upstream:
            return  # an abandoned attempt
        status = fields.get("status")
        reason += refusalHint(kind, status, self._passClient or self.proxy.passClient)  # type: ignore[union-attr]
        if isinstance(status, int):
            self.factory.proxyAnswers[f"{status // 100}xx"] += 1
        if unhealthy:
            self.factory.pool.failed(self.proxy, reason)  # type: ignore[arg-type]
        if retry and self._candidates and not self._clientLost:
            self._dropUpstream(upstream)
            self._retryOrFail(kind, reason, **fields)
        else:
            self.fail(kind, reason, **fields)

    def proxyChallenged(self, upstream: UpstreamProtocol, response: ConnectResponse) -> None:
        """
        The proxy answered 407: answer its challenge on a new connection,
        once, if the credentials allow.
        """
        if upstream is not self.upstream:
            return
        self.factory.proxyAnswers["4xx"] += 1
        auth = self.proxy.auth  # type: ignore[union-attr]
        if auth is None:
            self.fail("proxy-auth", "proxy answered 407: it needs credentials and none are configured", status=407)
            return
        challenges = [value for name, value in response.headers if name.lower() == b"proxy-authenticate"]
        cannot = auth.challenged(challenges)
        if cannot is not None or self._authRetried:
            self.fail("proxy-auth", f"proxy answered 407: {cannot or 'credentials refused'}", status=407)
            return
        self._authRetried = True
        self._dropUpstream(upstream)
        self._candidates.insert(0, self.proxy)  # type: ignore[arg-type]
        self._connectNext()

    def tunnelOpened(self, upstream: UpstreamProtocol, leftover: bytes) -> None:
        """
        The proxy answered 2xx: join the two connections.

        @param leftover: tunnel bytes that arrived with the proxy's answer.
        """
        if upstream is not self.upstream:
            return
        factory = self.factory
        self._relaying = True
        factory.counters["opened"] += 1
        factory.openTunnels += 1
        factory.proxyAnswers["2xx"] += 1
        factory.metrics.connectSeconds.observe(factory.reactor.seconds() - self._connectStarted)
        idleTimeout = factory.settings.idleTimeout
        if idleTimeout:
            self._lastMoved = factory.reactor.seconds()
            self._idleTimer = factory.reactor.callLater(idleTimeout, self._idledOut)
        early, self._early = b"".join(self._early), []
        self._relay = openRelay(factory.settings.relay, factory.reactor, self, upstream)
        self._relay.start(early, leftover, self._clientEnded)

    def relayEnded(self, how: str) -> None:
        """
        The splice relay has ended (both sides finished, or an error) and
        let go of the sockets: close both connections.
        """
        self._close(how)

    # Stage 4: the relay.

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._relaying:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
            self.touch()
            return
        self._early.append(data)
        self._earlyBytes += len(data)
        if self._earlyBytes >= self.factory.settings.earlyDataLimit:
            self.transport.pauseProducing()
        if self._sniffTimer is not None:
            self._sniff(final=self._earlyBytes >= self.factory.settings.earlyDataLimit)

    def touch(self) -> None:
        """
        Note that bytes moved, which postpones the idle timeout.

        Only the time is noted: the timer, when it fires, reschedules itself
        for what is left, which is cheaper than moving it on every chunk.
        """
        self._lastMoved = self.factory.reactor.seconds()

    def _idledOut(self) -> None:
        reactor = self.factory.reactor
        idleTimeout = self.factory.settings.idleTimeout
        left = self._lastMoved + idleTimeout - reactor.seconds()
        if left > 0:
            self._idleTimer = reactor.callLater(left, self._idledOut)
            return
        self._idleTimer = None
        self._close(f"idle for {idleTimeout:g} s")

    def readConnectionLost(self) -> None:
        self._clientEnded = True
        if self._sniffTimer is not None:
            self._sniff(final=True)
        if self._relaying:
            self.upstream.transport.loseWriteConnection()  # type: ignore[union-attr]
            if self._upstreamEnded:
                self._close("both sides closed")

    def writeConnectionLost(self) -> None:
        pass

    def upstreamEnded(self, upstream: UpstreamProtocol) -> None:
        """
        The proxy finished sending (half-close): pass that on to the client.
        """
        if upstream is not self.upstream:
            return
        self._upstreamEnded = True
        self.transport.loseWriteConnection()
        if self._clientEnded:
            self._close("both sides closed")

    def fail(self, kind: str, reason: str, **fields: object) -> None:
        """
        End the tunnel before it opened, with one log line saying why.

        @param kind: the counter to count this failure under.
        @param reason: the reason, for the log line.
        """
        if self._failed or self._relaying:
            return
        self._failed = True
        self.factory.counters[kind] += 1
        self.log.warn(
            "tunnel {client} -> {destination}{named} via {proxy} failed: {reason}",
            client=self.client,
            destination=self.target,
            named=self._named,
            proxy=self.proxy.description if self.proxy is not None else "(none)",
            reason=reason,
            failure_kind=kind,
            **fields,
        )
        self._close(reason)

    def _close(self, how: str) -> None:
        if self._how is None:
            self._how = how
        if self._relay is not None:
            self._relay.stop()
        if self._sniffTimer is not None:
            if self._sniffTimer.active():
                self._sniffTimer.cancel()
            self._sniffTimer = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self.upstream is not None:
            self.upstream.transport.loseConnection()
        self.transport.loseConnection()

    def upstreamLost(self, upstream: UpstreamProtocol, reason: Failure) -> None:
        """
        The connection to the proxy is gone: close the client's too.
        """
        if upstream is not self.upstream:
            return  # an abandoned attempt
        self._upstreamLost = True
        if self._how is None:
            self._how = _howLost("proxy", reason)
        if self._clientLost:
            self._finished()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._clientLost = True
        if self._how is None:
            self._how = _howLost("client", reason)
        if not self._relaying and not self._failed:
            self.fail("client-gone", "client left before the tunnel opened")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._upstreamLost:
            self._finished()
        else:
            self.upstream.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self, how: str) -> None:
        """
        Drop both connections now, without flushing what is queued.
        """
        if not self._relaying:
            self.fail("shutdown", how)
        elif self._how is None:
            self._how = how
        if self._relay is not None:
            self._relay.stop()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()
        self.transport.abortConnection()

    def _finished(self) -> None:
        self.factory._forget(self)
        if self._idleTimer is not None:
            self._idleTimer.cancel()
            self._idleTimer = None
        if not self._relaying:
            return  # fail() has logged the one line this connection gets.
        factory = self.factory
        bytesDown = self.upstream.received  # type: ignore[union-attr]
        factory.counters["closed"] += 1
        factory.openTunnels -= 1
        factory.bytesUp += self.received
        factory.bytesDown += bytesDown
        client, destination, named = self.client, self.target, self._named
        proxy = self.proxy.description  # type: ignore[union-attr]
        how, bytesUp = self._how, self.received
        duration = factory.reactor.seconds() - self._started
        # The line is rendered here, in one f-string, and logged as a single
        # field: Twisted's observers would otherwise run string.Formatter
        # over eight fields for every tunnel, the largest per-connection
        # cost there was.  The facts stay in the event as fields.
        self.log.info(
            "{tunnel_line}",
            tunnel_line=f"tunnel {client} -> {destination}{named} via {proxy} closed ({how}): "
            f"{bytesUp} bytes up, {bytesDown} bytes down, {duration:.3f} s",
            client=client,
            destination=destination,
            named=named,
            connect_target=_formatAddress(self._connectHost, self.destination.port),  # type: ignore[union-attr]
            proxy=proxy,
            how=how,
            bytes_up=bytesUp,
            bytes_down=bytesDown,
            duration=duration,
        )


def _howLost(side: str, reason: Failure) -> str:
    if reason.check(ConnectionDone):
        return f"{side} closed"
    return f"{side} connection lost: {reason.getErrorMessage()}"


def _formatAddress(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
