"""
The downstream side: the factory that accepts redirected client
connections, and the protocol that joins each one to its tunnel.

The life of a tunnel is decided in L{shifter.tunnel.tunnel}; the protocol here only
feeds it the client connection's events and carries out what it asks of
that connection.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from shifter.tunnel.deadlines import Deadlines
from shifter.tunnel.destinations import GatewayNames, ProxyAddresses
from shifter.tunnel.limits import ClientLimit
from shifter.logs import RateLimitedLog
from shifter.tunnel.metrics import TunnelStats
from shifter.tunnel.policy import ITunnelPolicy
from shifter.upstream.pool import ProxyPool
from shifter.relay.relay import openRelay
from shifter.resolvers.resolver import Destination, IOriginalDestinationResolver
from shifter.resolvers.sockopt import unmapAddress
from shifter.tunnel.negotiation import canonicalHost, formatAddress
from shifter.tunnel.tunnel import ITunnelClient, ITunnelOwner, Tunnel, TunnelInfo
from shifter.upstream.upstream import ProxyAttempt
from shifter.upstream.warm import WarmConnections


@dataclass(frozen=True)
class TunnelSettings:
    """
    Limits that apply to every tunnel.

    @ivar connectTimeout: seconds to wait for the TCP connection to the proxy.
    @ivar handshakeTimeout: seconds to wait for the proxy's answer to CONNECT.
    @ivar setupTimeout: seconds from accepting a client to its tunnel's
        opening, whatever the stages (resolving, sniffing, the policy,
        every proxy tried) take.
    @ivar idleTimeout: seconds without a byte either way before a tunnel is
        closed; 0 for never.
    @ivar closeGrace: seconds a closing connection has to finish sending,
        and its peer to end its side (what it sends meanwhile is read and
        dropped), before it is dropped.
    @ivar earlyDataLimit: bytes a client may send before its tunnel opens;
        past this, reading from it pauses until the tunnel is open.
    @ivar maxConnections: tunnels open at once; further clients are refused.
    @ivar maxConnectionsPerClient: connections open at once from one client
        (an IPv4 address, or an IPv6 /64); 0 for no limit of its own.
    @ivar allowedClients: if not empty, the only client networks served.
    @ivar allowedPorts: if not empty, the only destination ports served.
    @ivar connectTarget: what CONNECT asks for: C{"ip"}, the original
        destination's address; C{"sni"} or C{"host"}, the name in the
        client's TLS ClientHello or HTTP Host header; C{"auto"}, whichever
        the client's first bytes hold.  The original port is always kept.
    @ivar sniffTimeout: seconds to wait for the client's first bytes when
        looking for a name, before using the address.
    @ivar tunnelIdHeader: the request header CONNECT carries the tunnel's
        id in (L{shifter.tunnel.tunnelid}), such as C{"Shifter-Tunnel"}
        (C{twistd shifter}'s default); C{""} to send none.
    @ivar warmConnections: warm connections per proxy at most
        (L{shifter.upstream.warm}), opened ahead of demand; 0 for none.
    @ivar warmLifetime: seconds a warm connection is kept unused before it
        is closed (and replaced, while tunnels still come).
    @ivar sendEarly: whether the client's bytes that come before the
        tunnel opens go to an HTTP proxy right behind the CONNECT request
        (saving the round trip of waiting for its 2xx), rather than once it
        has answered; never to a SOCKS5 server, nor to a proxy whose login
        (NTLM, Negotiate) may go on on the same connection.
    @ivar relay: how open tunnels relay: C{"auto"} or C{"splice"} (zero-copy
        wherever both sides are plain TCP), or C{"twisted"} (Twisted's
        producers and consumers); see L{shifter.relay.relay}.
    """

    connectTimeout: float = 10.0
    handshakeTimeout: float = 10.0
    setupTimeout: float = 30.0
    idleTimeout: float = 3600.0
    closeGrace: float = 5.0
    earlyDataLimit: int = 64 * 1024
    maxConnections: int = 10000
    maxConnectionsPerClient: int = 0
    allowedClients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowedPorts: frozenset[int] = field(default_factory=frozenset)
    connectTarget: str = "ip"
    sniffTimeout: float = 2.0
    relay: str = "auto"
    tunnelIdHeader: str = ""
    warmConnections: int = 0
    warmLifetime: float = 60.0
    sendEarly: bool = False

    @cached_property
    def shortestStage(self) -> float:
        """
        The shortest limit of the set-up stages (connecting, the CONNECT's
        answer, and looking for a name if one is looked for): a tunnel's
        first deadline comes this long after its start, or at the end of
        its whole set-up if that is sooner; no later stage can end before.
        """
        shortest = min(self.connectTimeout, self.handshakeTimeout)
        if self.connectTarget != "ip":
            shortest = min(shortest, self.sniffTimeout)
        return shortest


@implementer(ITunnelOwner)
class ShifterFactory(ServerFactory):
    """
    Accepts redirected connections and tunnels each, through a proxy of
    C{pool}, to the destination that C{resolver} finds.

    @ivar active: the tunnels not yet finished.
    @ivar stats: what the tunnels have done (L{TunnelStats}).
    @ivar deadlines: every tunnel's deadline, on one timer.
    @ivar listeningAddress: the listening socket's address, once listening.
    @ivar holder: with C{--hold-syn}, the L{shifter.tunnel.holdsyn.SynHolder} whose
        open tunnels the client connections take; else C{None}.
    @ivar director: with C{--resolver nfqueue} and a direct mark, without
        C{--hold-syn}, the L{shifter.tunnel.directsyn.SynDirector} that sends
        SYNs DIRECT at the SYN; else C{None}.
    @ivar accessLog: what each client connection's
        L{shifter.tunnel.tunnel.TunnelRecord} is given to once it has ended
        (its C{tunnelEnded(record)}), such as
        L{shifter.service.accesslog.AccessLog}; or C{None}.
    """

    log = Logger()
    noisy = False

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
        self.active: set[Tunnel] = set()
        self.stats = TunnelStats()
        self.stats.collectFrom(lambda: len(self.active), lambda: self.pool)
        self.deadlines = Deadlines(reactor)
        self.listeningAddress: Destination | None = None
        self.holder: Any = None
        self.director: Any = None
        self.accessLog: Any = None
        self._idleWaiters: list[Deferred[None]] = []
        self.proxyAddresses = ProxyAddresses(pool.proxies, reactor)
        self.gatewayNames = GatewayNames([], {})
        self.connectByAddress = False
        self._readNames()
        self.clientLimit = ClientLimit(settings.maxConnectionsPerClient)
        # Refusals a client can repeat at will are logged one line per
        # reason per interval, with a count of the others.
        self.refusals = RateLimitedLog(self.log, reactor, interval=10.0)
        self.warm: WarmConnections | None = None
        self._warmUp()

    def _readNames(self) -> None:
        """
        Read this machine's names again, and what the policy's rules say
        of names (at start and at each reload, never per connection).
        """
        policy = self.policy
        self.gatewayNames = GatewayNames.read(singleLabelAllowed=getattr(policy, "singleLabelNames", ()))
        self.connectByAddress = bool(getattr(policy, "decidesByAddress", False))

    def startFactory(self) -> None:
        # Look up the proxies' names and this machine's addresses (the
        # service has usually done so before listening); until they are
        # known, destinations that could be either are refused.
        if not self.proxyAddresses.started:
            self.proxyAddresses.start()
        self.pool.start()

    def stopFactory(self) -> None:
        self.proxyAddresses.stop()
        self.refusals.stop()
        if self.warm is not None:
            self.warm.stop()

    # What the tunnels have done, as the factory has always offered it.

    @property
    def counters(self) -> Any:
        """
        How tunnels ended and why they failed, by short name (C{"opened"},
        C{"closed"}, C{"resolver"}, C{"proxy-status"}, ...).
        """
        return self.stats.counters

    @property
    def metrics(self) -> TunnelStats:
        """
        The latency histograms and the registry C{--metrics} serves.
        """
        return self.stats

    @property
    def openTunnels(self) -> int:
        """
        Tunnels relaying now.
        """
        return self.stats.openTunnels

    @property
    def bytesUp(self) -> int:
        """
        Bytes relayed from clients to proxies.
        """
        return self.stats.bytesUp

    @property
    def bytesDown(self) -> int:
        """
        Bytes relayed from proxies to clients.
        """
        return self.stats.bytesDown

    @property
    def proxyAnswers(self) -> Any:
        """
        The proxies' answers to CONNECT, by status class (C{"2xx"}, ...).
        """
        return self.stats.proxyAnswers

    @property
    def retries(self) -> int:
        """
        Connection attempts moved on to another proxy.
        """
        return self.stats.retries

    @property
    def acceptPauses(self) -> int:
        """
        Times accepting paused for lack of descriptors.
        """
        return self.stats.acceptPauses

    def isListeningAddress(self, host: str, port: int) -> bool | None:
        """
        Whether C{host} and C{port} name Shifter's own listening socket: its
        port, and its address or, for a wildcard socket, any address.
        C{None} when the listening address is not known (not listening
        yet, or never told).

        @param host: an IP address in compressed form.
        """
        listening = self.listeningAddress
        if listening is None:
            return None
        if listening.port != port:
            return False
        bound = ipaddress.ip_address(unmapAddress(listening.host.split("%", 1)[0]))
        return bound.is_unspecified or bound.compressed == host

    def acceptPaused(self) -> None:
        """
        Count a pause of accepting (descriptors or memory ran out).
        """
        self.stats.acceptPauses += 1

    def tunnels(self) -> list[TunnelInfo]:
        """
        A snapshot of every client connection not yet finished.
        """
        now = self.reactor.seconds()
        return [tunnel.describe(now) for tunnel in self.active]

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
            self.clientLimit.limit = settings.maxConnectionsPerClient
        if pool is not None and pool is not self.pool:
            self.pool.stop()
            self.pool = pool
            self.proxyAddresses.stop()
            self.proxyAddresses = ProxyAddresses(pool.proxies, self.reactor)
            if self.numPorts:
                self.proxyAddresses.start()
                pool.start()
        if policy is not None:
            self.policy = policy
        self._readNames()
        if settings is not None or pool is not None:
            self._warmUp()

    def _warmUp(self) -> None:
        """
        Keep warm connections to the pool's proxies as the settings say:
        those kept so far are closed, and new ones opened as tunnels come.
        """
        if self.warm is not None:
            self.warm.stop()
            self.warm = None
        settings = self.settings
        if settings.warmConnections > 0:
            self.warm = WarmConnections(self.pool, self.reactor, settings.warmConnections, settings.warmLifetime)

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
        for tunnel in list(self.active):
            tunnel.abort("closed at shutdown")
        return done

    def tunnelClosed(self, tunnel: Tunnel) -> None:
        accessLog = self.accessLog
        if accessLog is not None:
            try:
                accessLog.tunnelEnded(tunnel.record())
            except Exception:
                self.refusals.emit(
                    "internal", LogLevel.error, "access log: cannot write the line of tunnel {tunnel}",
                    log_failure=Failure(), tunnel=tunnel.tunnelId,
                )
        self.active.discard(tunnel)
        self.clientLimit.release(tunnel.clientHost)
        if not self.active and self._idleWaiters:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def heldTunnel(self, clientHost: str, clientPort: int, host: str, port: int, receiver: Any) -> Any:
        """
        The tunnel opened while this client connection's SYN was held, if
        any (see L{ITunnelOwner.heldTunnel}).
        """
        holder = self.holder
        if holder is None:
            return None
        return holder.claim(clientHost, clientPort, host, port, receiver)

    def buildProtocol(self, addr) -> DownstreamProtocol | None:  # type: ignore[no-untyped-def, override]
        settings = self.settings
        if len(self.active) >= settings.maxConnections:
            self.stats.counters["limit"] += 1
            self.refusals.warn(
                "limit",
                "refused {client}: {limit} tunnels already open (--max-connections)",
                client=formatAddress(addr.host, addr.port),
                limit=settings.maxConnections,
            )
            return None
        if not self.clientLimit.admit(addr.host):
            self.stats.counters["client-limit"] += 1
            self.refusals.warn(
                "client-limit",
                "refused {client}: {limit} connections from this client already open "
                "(--max-connections-per-client)",
                client=formatAddress(addr.host, addr.port),
                limit=settings.maxConnectionsPerClient,
            )
            return None
        return DownstreamProtocol(self)


@implementer(IHalfCloseableProtocol, ITunnelClient)
class DownstreamProtocol(Protocol):
    """
    One redirected client connection: feeds its events to its L{Tunnel} and
    carries out the tunnel's requests on it.

    @ivar tunnel: the tunnel, once the connection is made.
    @ivar ended: whether the client has finished sending.
    @ivar finishing: whether the connection is being finished (see
        L{finish}): it closes at the client's end.
    """

    # The accepted TCP connection: an ITCPTransport that is also the push
    # producer of its bytes.
    transport: Any
    tunnel: Tunnel
    ended = False
    finishing = False

    def __init__(self, factory: ShifterFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        factory = self.factory
        transport = self.transport
        peer = transport.getPeer()
        local = transport.getHost()
        tunnel = self.tunnel = Tunnel(
            factory, self, canonicalHost(peer.host), peer.port, canonicalHost(local.host), local.port
        )
        factory.active.add(tunnel)
        tunnel.start()

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.clientData(data)

    def readConnectionLost(self) -> None:
        self.ended = True
        self.tunnel.clientEnded()
        if self.finishing:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.clientLost(reason)

    # ITunnelClient

    def resolveDestination(self) -> Any:
        return self.factory.resolver.resolve(self.transport)

    def connectProxy(self, proxy: Any, tunnel: Tunnel) -> ProxyAttempt:
        return ProxyAttempt(proxy, tunnel, self.factory.warm)

    def startRelay(self, attempt: Any, toProxy: bytes, toClient: bytes, clientEnded: bool) -> Any:
        factory = self.factory
        relay = openRelay(self.tunnel.settings.relay, factory.reactor, self.transport, attempt, self.tunnel)
        relay.start(toProxy, toClient, clientEnded)
        return relay

    def pauseReading(self) -> None:
        self.transport.pauseProducing()

    def resumeReading(self) -> None:
        self.transport.resumeProducing()

    def close(self) -> None:
        self.transport.loseConnection()

    def finish(self) -> None:
        transport = self.transport
        if self.ended:
            transport.loseConnection()  # nothing more to read
            return
        self.finishing = True
        if not getattr(transport, "_writeDisconnected", False):  # the splice relay may have sent it
            transport.loseWriteConnection()
        # Reading again (paused by the relay, or stopped by the splice
        # relay), to throw away what the client still sends until its end.
        transport.resumeProducing()

    def abort(self) -> None:
        self.transport.abortConnection()
