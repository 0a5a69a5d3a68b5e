"""
Destinations Shifter refuses to tunnel, whatever the client asked.

Three kinds, all checked before any proxy is asked:

  - Addresses that mean "this machine" or no one machine:
    L{destinationRefusal} refuses loopback, unspecified, multicast,
    broadcast and link-local destinations, IPv4 and IPv6 alike, and IPv6
    addresses that carry such an IPv4 address (IPv4-mapped,
    IPv4-compatible, NAT64's C{64:ff9b::/96}, 6to4's C{2002::/16}).
    Asked for such an address, the proxy would connect to itself or to its
    own link, never to what the client meant.  A pure function of the
    address.

  - This machine, the gateway: L{ProxyAddresses.gatewayRefusal} refuses
    every address of this machine, on every port, in any of the forms
    above.  A client that reaches one through Shifter would reach the
    gateway's own services from the gateway itself, around every INPUT
    rule.  Its names are L{GatewayNames}'.

  - The upstream proxies themselves: L{ProxyAddresses} knows every address
    of every proxy, and refuses them as destinations, so that a connection
    redirected to the proxy's port cannot come back to Shifter as a CONNECT
    through the proxy to the proxy, a loop.  A proxy named by hostname
    (C{squid.lan:3128}) is resolved at start with Twisted's own DNS client
    (C{twisted.names}: in the reactor, no threads) and again every
    C{refreshInterval} seconds; the addresses found are also where the
    proxy's connections go (L{shifter.upstream.proxy.ProxyName}), so no tunnel
    looks the name up itself.  When one of a proxy's addresses is an
    address of this machine (the proxy runs on the gateway), the proxy is
    reachable through every address of this machine, so all of them are
    refused on the proxy's port.  This machine's addresses come from a
    netlink dump (C{RTM_GETADDR}) in the reactor, refreshed likewise.

It fails closed: while Shifter cannot tell whether a destination reaches a
proxy or this machine (a proxy's hostname not resolved yet, this machine's
addresses not read yet), the destination is refused, with a reason that
says so.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.upstream.connect import isDottedQuad
from shifter.kernel.localaddresses import readLocalAddresses

# Every destination in these networks is refused, with the reason's word.
_REFUSED_V4 = [
    (ipaddress.IPv4Network("0.0.0.0/8"), "unspecified"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv4Network("255.255.255.255/32"), "broadcast"),
]
_REFUSED_V6 = [
    (ipaddress.IPv6Network("::/128"), "unspecified"),
    (ipaddress.IPv6Network("::1/128"), "loopback"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
]

# IPv6 prefixes whose addresses carry an IPv4 address that a proxy (or a
# translator on its way) connects to: NAT64's well-known prefix (RFC 6052)
# and 6to4 (RFC 3056).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# How often proxy names and this machine's addresses are looked up again.
REFRESH_INTERVAL = 60.0



def _parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    @raise ValueError: if C{host} is not an IP address (zone IDs refused).
    """
    if "%" in host:
        raise ValueError(f"zone ID in {host!r}")
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def embeddedIPv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """
    The IPv4 address an IPv6 address stands for, with the form's name, or
    C{None}: IPv4-mapped (C{::ffff:a.b.c.d}), IPv4-compatible
    (C{::a.b.c.d}, but not C{::} nor C{::1}), NAT64 (C{64:ff9b::a.b.c.d})
    and 6to4 (C{2002:AABB:CCDD::/48}).
    """
    mapped = address.ipv4_mapped
    if mapped is not None:
        return mapped, "IPv4-mapped"
    value = int(address)
    if value >> 32 == 0 and value > 1:
        return ipaddress.IPv4Address(value), "IPv4-compatible"
    if address in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF), "NAT64"
    sixtofour = address.sixtofour
    if sixtofour is not None:
        return sixtofour, "6to4"
    return None


def destinationRefusal(host: str) -> str | None:
    """
    Why a connection to the address C{host} must not be tunnelled, or
    C{None} if it may be.

    @param host: the original destination's IP address, in any form
        (IPv4-mapped IPv6 addresses are judged by their IPv4 address).
    @return: the reason for the log line, such as C{"destination
        127.0.0.1 is a loopback address"}.
    """
    if isDottedQuad(host):
        first = host[: host.index(".")]
        if first not in ("0", "127", "169") and int(first) < 224:
            # Outside every refused network (the tunnel's usual case): no
            # need to parse the address.
            return None
    try:
        address = _parse(host)
    except ValueError:
        return f"destination {host!r} is not an IP address"
    networks = _REFUSED_V4 if address.version == 4 else _REFUSED_V6
    for network, kind in networks:
        if address in network:
            return f"destination {address.compressed} is {_article(kind)} {kind} address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embeddedIPv4(address)
        if embedded is not None:
            inner, form = embedded
            for network, kind in _REFUSED_V4:
                if inner in network:
                    return (f"destination {address.compressed} is {_article(kind)} {kind} address "
                            f"({inner} in {form} form)")
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def isRefusedDestination(host: str) -> bool:
    """
    Whether L{destinationRefusal} refuses C{host}.
    """
    return destinationRefusal(host) is not None


@dataclass(frozen=True)
class ProxyTarget:
    """
    Where one proxy listens, as Shifter knows it from the configuration.

    @ivar description: the proxy's name in log lines.
    @ivar host: its IP address or hostname.
    @ivar port: its TCP port.
    @ivar name: for a proxy named by hostname, its
        L{shifter.upstream.proxy.ProxyName}, given each new set of addresses: the
        proxy's connections go there.
    """

    description: str
    host: str
    port: int
    name: Any = field(default=None, compare=False)


def proxyTargets(proxies: Iterable[Any]) -> list[ProxyTarget]:
    """
    The L{ProxyTarget}s of C{proxies} (L{shifter.upstream.proxy.UpstreamProxy}s):
    those with a TCP host and port (a proxy reached through a UNIX socket
    has none and cannot be a TCP destination).
    """
    targets = []
    for proxy in proxies:
        host = getattr(proxy, "host", None)
        port = getattr(proxy, "port", None)
        if (host is None or port is None) and getattr(proxy, "address", None) is not None:
            host, port = proxy.address
        if host is not None and port is not None:
            targets.append(ProxyTarget(proxy.description, host, port, getattr(proxy, "name", None)))
    return targets


class ProxyAddresses:
    """
    Every address of every upstream proxy, kept current, to refuse them as
    destinations.

    L{start} looks up what is not known yet (proxy hostnames, this
    machine's addresses) and repeats it every C{refreshInterval} seconds;
    a look-up that fails keeps what was known before and is logged.

    @ivar addresses: each proxy's addresses, by proxy, once known.
    @ivar localAddresses: this machine's addresses, once known.
    """

    log = Logger()

    def __init__(
        self,
        proxies: Sequence[Any],
        reactor: Any,
        resolver: Any = None,
        localAddresses: Callable[[], Deferred[frozenset[str]]] | None = None,
        refreshInterval: float = REFRESH_INTERVAL,
    ) -> None:
        """
        @param proxies: the L{shifter.upstream.proxy.UpstreamProxy}s (or anything
            with C{description}, C{host} and C{port}).
        @param resolver: a C{twisted.names} resolver (C{IResolver}) for
            proxy hostnames; by default one made from the system's
            configuration (C{/etc/resolv.conf}, C{/etc/hosts}) when first
            needed.
        @param localAddresses: returns a C{Deferred} firing with this
            machine's addresses; by default L{readLocalAddresses}.
        """
        self.reactor = reactor
        self.targets = proxyTargets(proxies)
        self.ports = frozenset(target.port for target in self.targets)  # the ports the proxies listen on
        self._resolver = resolver
        self._readLocal = localAddresses or (lambda: readLocalAddresses(reactor))
        self.refreshInterval = refreshInterval
        self.addresses: dict[ProxyTarget, frozenset[str]] = {}
        self.localAddresses: frozenset[str] | None = None
        self._loop: LoopingCall | None = None
        self._waiters: list[Deferred[None]] = []
        self._named: list[ProxyTarget] = []
        for target in self.targets:
            try:
                literal = _parse(target.host.split("%", 1)[0])
                self.addresses[target] = frozenset([literal.compressed])
            except ValueError:
                self._named.append(target)  # a hostname: looked up by refresh()

    def start(self) -> Deferred[None]:
        """
        Look up what is not known, now and every C{refreshInterval}
        seconds.

        @return: a C{Deferred} that fires once the first look-ups have
            ended, successful or not (never with a failure).
        """
        if self._loop is None:
            self._loop = LoopingCall(self.refresh)
            self._loop.clock = self.reactor
            self._loop.start(self.refreshInterval, now=False)
        return self.refresh()

    def stop(self) -> None:
        """
        Stop refreshing.
        """
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def refresh(self) -> Deferred[None]:
        """
        Look up the proxies' hostnames and this machine's addresses again
        (once at a time: a call while a refresh runs waits for it).

        @return: a C{Deferred} that fires when done, never with a failure.
        """
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) > 1:
            return waiter
        lookups: list[Deferred[Any]] = [self.readLocal()]
        lookups += [self._lookUp(target) for target in self._named]

        def finished(_: object) -> None:
            waiters, self._waiters = self._waiters, []
            for each in waiters:
                each.callback(None)

        DeferredList(lookups, consumeErrors=True).addCallback(finished)
        return waiter

    def readLocal(self) -> Deferred[None]:
        """
        Read this machine's addresses now (L{refresh} reads them too, with
        the proxies' names, which may take longer).

        @return: a C{Deferred} that fires when done, never with a failure.
        """
        return self._readLocal().addCallbacks(self._gotLocal, self._noLocal)

    def _gotLocal(self, addresses: frozenset[str]) -> None:
        self.localAddresses = frozenset(_parse(a).compressed for a in addresses)

    def _noLocal(self, reason: Failure) -> None:
        self.log.warn(
            "cannot read this machine's addresses: {reason}; "
            "keeping {known}",
            reason=reason.getErrorMessage(),
            known="the last ones read" if self.localAddresses is not None else "the proxies' ports refused",
        )

    def _lookUp(self, target: ProxyTarget) -> Deferred[None]:
        resolver = self._resolver
        if resolver is None:
            from twisted.names.client import createResolver

            resolver = self._resolver = createResolver()
        pending = resolveAll(resolver, target.host)

        def found(addresses: frozenset[str]) -> None:
            if not addresses:
                raise LookupError("no A or AAAA records")
            if addresses != self.addresses.get(target):
                self.log.info(
                    "proxy {proxy} is at {addresses}",
                    proxy=target.description,
                    addresses=", ".join(sorted(addresses)),
                )
            self.addresses[target] = addresses
            if target.name is not None:
                target.name.setAddresses(addresses)

        def failed(reason: Failure) -> None:
            known = self.addresses.get(target)
            self.log.warn(
                "cannot look up proxy {proxy}: {reason}; {then}",
                proxy=target.description,
                reason=reason.getErrorMessage() or repr(reason.value),
                then=f"keeping {', '.join(sorted(known))}" if known
                else f"destinations on port {target.port} are refused until it is known",
            )

        return pending.addCallback(found).addErrback(failed)

    def isProxyDestination(self, host: str, port: int) -> bool:
        """
        Whether a connection to C{host:port} could reach an upstream proxy,
        or cannot be told not to (fails closed).
        """
        return self.refusal(host, port) is not None

    def refusal(self, host: str, port: int) -> str | None:
        """
        Why a connection to C{host:port} must not be tunnelled because it
        could reach an upstream proxy, or C{None}.

        @param host: the destination's IP address.
        """
        if port not in self.ports:
            return None
        try:
            address = _parse(host)
        except ValueError:
            return f"destination {host!r} is not an IP address"
        compressed = address.compressed
        local = self.localAddresses
        for target in self.targets:
            if target.port != port:
                continue
            known = self.addresses.get(target)
            if known is None:
                return (
                    f"destination is on the port of proxy {target.description}, "
                    "whose address is not known yet"
                )
            if compressed in known:
                return "destination is an upstream proxy itself"
            if local is None:
                return (
                    f"destination is on the port of proxy {target.description}, "
                    "and this machine's addresses are not known yet"
                )
            if compressed in local and any(_isLocal(a, local) for a in known):
                return f"destination is an address of this machine, where proxy {target.description} runs"
        return None


    def gatewayRefusal(self, host: str) -> str | None:
        """
        Why C{host} must not be tunnelled because it is an address of this
        machine (in any form that carries one), or C{None}; fails closed
        while this machine's addresses are not known.

        @param host: the destination's address, as
            L{shifter.tunnel.negotiation.canonicalHost} gives it.
        """
        local = self.localAddresses
        if local is None:
            return "this machine's addresses are not known yet, so a connection to the gateway itself cannot be told"
        if host in local:
            return f"destination {host} is an address of this machine"
        if ":" in host:
            try:
                address = ipaddress.IPv6Address(host)
            except ValueError:
                return f"destination {host!r} is not an IP address"
            embedded = embeddedIPv4(address)
            if embedded is not None and embedded[0].compressed in local:
                inner, form = embedded
                return f"destination {host} is an address of this machine ({inner} in {form} form)"
        return None

    @property
    def started(self) -> bool:
        """
        Whether L{start} was called (and L{stop} not since).
        """
        return self._loop is not None


def _isLocal(address: str, local: frozenset[str]) -> bool:
    parsed = _parse(address)
    return parsed.is_loopback or parsed.compressed in local


def resolveAll(resolver: Any, name: str) -> Deferred[frozenset[str]]:
    """
    Every IPv4 and IPv6 address of C{name}, through a C{twisted.names}
    resolver (A and AAAA look-ups at once).

    @return: a C{Deferred} firing with the addresses (empty if there are
        none), or failing if both look-ups failed.
    """
    from twisted.names import dns

    lookups = [resolver.lookupAddress(name), resolver.lookupIPV6Address(name)]

    def gather(results: list[tuple[bool, Any]]) -> frozenset[str]:
        addresses: set[str] = set()
        failures = [result for ok, result in results if not ok]
        if len(failures) == len(results):
            failures[0].raiseException()
        for ok, result in results:
            if not ok:
                continue
            answers = result[0]
            for record in answers:
                if record.type == dns.A:
                    addresses.add(socket.inet_ntop(socket.AF_INET, record.payload.address))
                elif record.type == dns.AAAA:
                    addresses.add(ipaddress.IPv6Address(record.payload.address).compressed)
        return frozenset(addresses)

    return DeferredList(lookups, consumeErrors=True).addCallback(gather)


def alwaysKnown(addresses: Iterable[str]) -> Callable[[], Deferred[frozenset[str]]]:
    """
    A C{localAddresses} source that answers C{addresses} at once (for
    tests, or for programs that know them).
    """
    fixed = frozenset(addresses)
    return lambda: succeed(fixed)


# Names that resolvers answer with a loopback address whatever /etc/hosts
# says (systemd-resolved synthesizes them; RFC 6761 reserves localhost).
# Names under C{localhost} are refused by the sniffer already.
_LOOPBACK_NAMES = ("localhost.localdomain", "ip6-localhost", "ip6-loopback")

HOSTS_FILE = "/etc/hosts"


class GatewayNames:
    """
    The names a client may not have the proxy connect to: the names of
    this machine, and single-label names.

    This machine's names are its host name, the names resolvers keep for
    loopback (C{localhost.localdomain}, C{ip6-localhost}), and every name
    C{/etc/hosts} gives a loopback, unspecified or link-local address or an
    address of this machine.  The proxy, often on this machine, resolves
    names the same way: asked for one of them it would connect to the
    gateway.  The file is read once, at start and at each reload, never
    per connection.

    A single-label name (no dot) means what the proxy's search domains
    make of it, which Shifter cannot know; it is refused unless a rule
    names it (C{name = "intranet"}).

    A refused name is not asked for: the connection goes on to its
    original address, which passed every address check.
    """

    def __init__(self, hostNames: Iterable[str], hosts: dict[str, frozenset[str]], singleLabelAllowed: Iterable[str] = ()) -> None:
        """
        @param hostNames: this machine's own names.
        @param hosts: each name of the hosts file and its addresses
            (canonical forms).
        @param singleLabelAllowed: the single-label names rules allow.
        """
        self.hostNames = frozenset(_normalName(name) for name in hostNames) | frozenset(_LOOPBACK_NAMES)
        self.hosts = hosts
        self.singleLabelAllowed = frozenset(_normalName(name) for name in singleLabelAllowed)

    @classmethod
    def read(cls, path: str = HOSTS_FILE, hostname: str | None = None,
             singleLabelAllowed: Iterable[str] = ()) -> GatewayNames:
        """
        This machine's names, from its host name and the hosts file at
        C{path} (a file that cannot be read contributes nothing, and is
        logged).
        """
        name = socket.gethostname() if hostname is None else hostname
        hosts: dict[str, set[str]] = {}
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    fields = line.split("#", 1)[0].split()
                    if len(fields) < 2:
                        continue
                    try:
                        address = _parse(fields[0]).compressed
                    except ValueError:
                        continue
                    for each in fields[1:]:
                        hosts.setdefault(_normalName(each), set()).add(address)
        except OSError as e:
            ProxyAddresses.log.warn("cannot read {path}: {error}; its names are not refused", path=path, error=e)
        return cls([name], {key: frozenset(value) for key, value in hosts.items()}, singleLabelAllowed)

    def refusal(self, name: str, localAddresses: frozenset[str] | None, singleLabel: bool = True) -> str | None:
        """
        Why the proxy must not be asked for C{name}, or C{None}.

        @param name: a lowercased hostname without a trailing dot, as the
            sniffer gives it.
        @param localAddresses: this machine's addresses, if known.
        @param singleLabel: whether single-label names are refused too (a
            name a client sent), or not (one the configuration chose).
        """
        if name in self.hostNames:
            return f"{name} is a name of this gateway"
        addresses = self.hosts.get(name)
        if addresses is not None:
            for address in addresses:
                if destinationRefusal(address) is not None or (localAddresses is not None and address in localAddresses):
                    return f"{name} is a name of this gateway ({address} in {HOSTS_FILE})"
        if singleLabel and "." not in name and name not in self.singleLabelAllowed:
            return f"single-label name {name} is not allowed (a rule with name = \"{name}\" allows it)"
        return None


def _normalName(name: str) -> str:
    return name.lower().rstrip(".")
