"""
Tests for L{shifter.tunnel.destinations}: the addresses Shifter never tunnels to,
and every address of every upstream proxy, kept current and failing closed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.names import hosts
from twisted.names.error import DomainError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.tunnel.destinations import (
    GatewayNames,
    ProxyAddresses,
    ProxyTarget,
    alwaysKnown,
    destinationRefusal,
    isRefusedDestination,
    proxyTargets,
    readLocalAddresses,
    resolveAll,
)
from shifter.tunnel.negotiation import canonicalHost
from shifter.upstream.proxy import _endpointHostPort, parseProxy
from shifter.tunnel.downstream import TunnelSettings
from tests.test_tunnel import PROXY, TunnelTestCase

LOCAL = ("192.0.2.1", "203.0.113.1", "2001:db8:1::1")


class DestinationRefusalTests(SynchronousTestCase):
    def test_refused(self) -> None:
        """
        Loopback, unspecified, multicast, broadcast and link-local
        destinations are refused, IPv4 and IPv6, with the kind in the
        reason.
        """
        for host, kind in [
            ("127.0.0.1", "a loopback"),
            ("127.255.0.9", "a loopback"),
            ("::1", "a loopback"),
            ("0.0.0.0", "an unspecified"),
            ("0.1.2.3", "an unspecified"),
            ("::", "an unspecified"),
            ("224.0.0.1", "a multicast"),
            ("239.255.255.250", "a multicast"),
            ("ff02::1", "a multicast"),
            ("255.255.255.255", "a broadcast"),
            ("169.254.169.254", "a link-local"),
            ("fe80::1", "a link-local"),
            ("febf::1", "a link-local"),
        ]:
            expected = ipaddress.ip_address(host).compressed
            self.assertEqual(destinationRefusal(host), f"destination {expected} is {kind} address")

    def test_mappedJudgedAsIPv4(self) -> None:
        """
        IPv4-mapped IPv6 addresses are judged, and named, by the IPv4
        address they carry.
        """
        self.assertEqual(destinationRefusal("::ffff:127.0.0.1"), "destination 127.0.0.1 is a loopback address")
        self.assertEqual(
            destinationRefusal("::ffff:169.254.169.254"), "destination 169.254.169.254 is a link-local address"
        )
        self.assertIsNone(destinationRefusal("::ffff:203.0.113.7"))

    def test_allowed(self) -> None:
        """
        Ordinary unicast destinations, private ones included, pass.
        """
        for host in ["203.0.113.7", "10.0.0.1", "192.168.1.1", "2001:db8::7", "fd00::1", "100.64.0.1"]:
            self.assertIsNone(destinationRefusal(host), host)
            self.assertFalse(isRefusedDestination(host))

    def test_notAnAddress(self) -> None:
        """
        Anything that is not an address, zone IDs included, is refused.
        """
        for host in ["fe80::1%eth0", "www.example.test", ""]:
            self.assertIn("is not an IP address", destinationRefusal(host))

    @settings(max_examples=500)
    @given(st.ip_addresses(v=4))
    def test_mappedAlwaysAgrees(self, address: ipaddress.IPv4Address) -> None:
        """
        An IPv4 address and its IPv4-mapped form always get the same
        verdict, and exactly the special addresses are refused.
        """
        verdict = destinationRefusal(str(address))
        self.assertEqual(destinationRefusal(f"::ffff:{address}"), verdict)
        special = (
            address.is_loopback or address.is_multicast or address.is_link_local
            or address in ipaddress.IPv4Network("0.0.0.0/8") or str(address) == "255.255.255.255"
        )
        self.assertEqual(verdict is not None, special)

    @settings(max_examples=500)
    @given(st.ip_addresses(v=6))
    def test_ipv6(self, address: ipaddress.IPv6Address) -> None:
        """
        An IPv6 address is refused exactly when it is special.
        """
        if address.ipv4_mapped is not None:
            return
        special = address.is_loopback or address.is_multicast or address.is_link_local or address.is_unspecified
        value = int(address)
        carried = None
        if 1 < value < 2**32:
            carried = ipaddress.IPv4Address(value)  # IPv4-compatible
        elif value >> 32 == 0x64FF9B << 64:
            carried = ipaddress.IPv4Address(value & 0xFFFFFFFF)  # NAT64
        elif value >> 112 == 0x2002:
            carried = ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF)  # 6to4
        if carried is not None:
            special = special or isSpecialIPv4(carried)
        self.assertEqual(destinationRefusal(str(address)) is not None, special)

    def test_translatedForms(self) -> None:
        """
        An IPv6 address that carries a loopback (or other refused) IPv4
        address is refused, naming the form.
        """
        for host, form in [
            ("::127.0.0.1", "IPv4-compatible"),
            ("64:ff9b::127.0.0.1", "NAT64"),
            ("64:ff9b::a9fe:a9fe", "NAT64"),
            ("2002:7f00:1::1", "6to4"),
        ]:
            reason = destinationRefusal(host)
            self.assertIsNotNone(reason, host)
            self.assertIn(f"in {form} form", reason)
        for host in ["64:ff9b::203.0.113.5", "2002:cb00:7105::1", "::203.0.113.5"]:
            self.assertIsNone(destinationRefusal(host), host)


def isSpecialIPv4(address: ipaddress.IPv4Address) -> bool:
    return (address.is_loopback or address.is_multicast or address.is_link_local
            or address in ipaddress.IPv4Network("0.0.0.0/8") or str(address) == "255.255.255.255")


class IPv4EveryAddressTests(SynchronousTestCase):
    @settings(max_examples=3000)
    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def test_matchesTheNetworks(self, number: int) -> None:
        """
        For any IPv4 address, the answer (including the quick one for
        plain dotted quads) is a refusal exactly when the address is in a
        refused network.
        """
        address = ipaddress.IPv4Address(number)
        refused = any(
            address in ipaddress.IPv4Network(network)
            for network in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
        )
        self.assertEqual(destinationRefusal(str(address)) is not None, refused)

    def test_edges(self) -> None:
        """
        The addresses at the edges of each refused network.
        """
        for host, refused in [
            ("0.255.255.255", True), ("1.0.0.0", False), ("126.255.255.255", False),
            ("127.0.0.0", True), ("128.0.0.0", False), ("169.253.255.255", False),
            ("169.254.0.0", True), ("169.255.0.0", False), ("223.255.255.255", False),
            ("224.0.0.0", True), ("239.255.255.255", True), ("240.0.0.0", False), ("255.255.255.254", False),
            ("255.255.255.255", True),
        ]:
            self.assertEqual(destinationRefusal(host) is not None, refused, host)


class FakeNames:
    """
    A C{twisted.names} resolver answering from a hosts file of the test's,
    or failing, or waiting, as the test says.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waiting: list[Deferred] = []
        self.hold = False
        self.broken = False

    def write(self, text: str) -> None:
        self.path.write_text(text)

    def _lookup(self, method: str, name: str) -> Deferred:
        if self.broken:
            return fail(DomainError(name))
        if self.hold:
            d: Deferred = Deferred()
            self.waiting.append(d)
            return d
        return getattr(hosts.Resolver(file=str(self.path)), method)(name)

    def lookupAddress(self, name: str) -> Deferred:
        return self._lookup("lookupAddress", name)

    def lookupIPV6Address(self, name: str) -> Deferred:
        return self._lookup("lookupIPV6Address", name)


class ProxyAddressesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.names = FakeNames(Path(self.mktemp()))
        self.names.write("198.51.100.3 squid.lan\n2001:db8:5::3 squid.lan\n192.0.2.1 gw.lan\n")
        self.local: Deferred | frozenset = frozenset(LOCAL)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def localAddresses(self) -> Deferred:
        if isinstance(self.local, Deferred):
            return self.local
        if isinstance(self.local, Exception):
            return fail(self.local)
        return succeed(self.local)

    def make(self, *proxies: str) -> ProxyAddresses:
        parsed = [parseProxy(proxy, self.clock) for proxy in proxies]
        return ProxyAddresses(parsed, self.clock, self.names, self.localAddresses, refreshInterval=60)

    def test_literalProxy(self) -> None:
        """
        A proxy given by address is refused as a destination at once, on
        its port only; IPv4-mapped forms too.
        """
        addresses = self.make("198.51.100.3:3128")
        addresses.start()
        self.assertEqual(addresses.refusal("198.51.100.3", 3128), "destination is an upstream proxy itself")
        self.assertTrue(addresses.isProxyDestination("::ffff:198.51.100.3", 3128))
        self.assertFalse(addresses.isProxyDestination("198.51.100.3", 443))
        self.assertFalse(addresses.isProxyDestination("198.51.100.4", 3128))

    def test_hostnameFailsClosedUntilKnown(self) -> None:
        """
        Before a proxy's hostname is resolved, every destination on its
        port is refused, and the reason says why; other ports pass.
        """
        self.names.hold = True
        addresses = self.make("http://squid.lan:3128")
        started = addresses.start()
        self.assertFalse(started.called)
        reason = addresses.refusal("203.0.113.7", 3128)
        self.assertEqual(
            reason, "destination is on the port of proxy squid.lan:3128, whose address is not known yet"
        )
        self.assertIsNone(addresses.refusal("203.0.113.7", 443))

    def test_hostnameResolved(self) -> None:
        """
        Once resolved, every address of the proxy's name (A and AAAA) is
        refused on its port, and nothing else.
        """
        addresses = self.make("squid.lan:3128")
        started = addresses.start()
        self.assertTrue(started.called)
        self.assertTrue(addresses.isProxyDestination("198.51.100.3", 3128))
        self.assertTrue(addresses.isProxyDestination("2001:db8:5::3", 3128))
        self.assertFalse(addresses.isProxyDestination("203.0.113.7", 3128))
        self.assertIn("198.51.100.3, 2001:db8:5::3", [e.get("addresses") for e in self.events])

    def test_lookupFailureNeverKnown(self) -> None:
        """
        A name that cannot be resolved keeps its port refused, with a
        warning that says so; start still completes.
        """
        self.names.broken = True
        addresses = self.make("squid.lan:3128")
        self.assertTrue(addresses.start().called)
        self.assertTrue(addresses.isProxyDestination("203.0.113.7", 3128))
        [warning] = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertIn("refused until it is known", warning["then"])

    def test_refreshFollowsChanges(self) -> None:
        """
        Every refresh interval the name is looked up again: a new address
        replaces the old one; a failed look-up keeps what was known.
        """
        addresses = self.make("squid.lan:3128")
        addresses.start()
        self.names.write("198.51.100.4 squid.lan\n")
        self.clock.advance(60)
        self.assertTrue(addresses.isProxyDestination("198.51.100.4", 3128))
        self.assertFalse(addresses.isProxyDestination("198.51.100.3", 3128))
        self.names.broken = True
        self.clock.advance(60)
        self.assertTrue(addresses.isProxyDestination("198.51.100.4", 3128))
        addresses.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_localProxyEveryLocalAddress(self) -> None:
        """
        A proxy on this machine (its address is loopback, or one of this
        machine's) is reachable through every address of this machine:
        they are all refused on its port; other hosts' are not.
        """
        for proxy in ("127.0.0.1:3128", "[::1]:3128", "192.0.2.1:3128", "gw.lan:3128"):
            addresses = self.make(proxy)
            addresses.start()
            for host in LOCAL:
                self.assertTrue(addresses.isProxyDestination(host, 3128), (proxy, host))
                self.assertFalse(addresses.isProxyDestination(host, 3129))
            self.assertFalse(addresses.isProxyDestination("203.0.113.7", 3128), proxy)
        self.assertEqual(
            addresses.refusal("203.0.113.1", 3128),
            "destination is an address of this machine, where proxy gw.lan:3128 runs",
        )

    def test_remoteProxyNotLocal(self) -> None:
        """
        A proxy elsewhere does not make this machine's addresses refused.
        """
        addresses = self.make("198.51.100.3:3128")
        addresses.start()
        self.assertFalse(addresses.isProxyDestination("192.0.2.1", 3128))

    def test_localAddressesUnknown(self) -> None:
        """
        Until this machine's addresses are known, a destination on a
        proxy's port that is not the proxy itself is refused.
        """
        self.local = OSError("no netlink")
        addresses = self.make("198.51.100.3:3128")
        addresses.start()
        self.assertEqual(
            addresses.refusal("192.0.2.1", 3128),
            "destination is on the port of proxy 198.51.100.3:3128, and this machine's addresses are not known yet",
        )
        self.assertIsNone(addresses.refusal("192.0.2.1", 443))

    def test_refreshOnceAtATime(self) -> None:
        """
        A refresh asked for while one runs waits for it instead of
        starting another.
        """
        self.names.hold = True
        addresses = self.make("squid.lan:3128")
        first, second = addresses.start(), addresses.refresh()
        self.assertEqual(len(self.names.waiting), 2)
        for d in self.names.waiting:
            d.errback(DomainError("squid.lan"))
        self.assertTrue(first.called and second.called)

    def test_targets(self) -> None:
        """
        Every TCP proxy form gives its host and port; a UNIX socket proxy
        none.
        """
        proxies = [
            parseProxy(value, self.clock)
            for value in ["squid.lan:3128", "[2001:db8::5]:3128", "https://proxy.lan:3129",
                          "tcp:host=10.0.0.5:port=3130", "unix:/run/squid.sock"]
        ]
        self.assertEqual(
            [(t.host, t.port) for t in proxyTargets(proxies)],
            [("squid.lan", 3128), ("2001:db8::5", 3128), ("proxy.lan", 3129), ("10.0.0.5", 3130)],
        )
        self.assertEqual(proxyTargets(proxies)[0], ProxyTarget("squid.lan:3128", "squid.lan", 3128))


class EndpointStringTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        Host and port are read from TCP endpoint strings in Twisted's
        grammar, escapes and keyword order included; other kinds give
        none.
        """
        for description, expected in [
            ("tcp:host=10.0.0.5:port=3128", ("10.0.0.5", 3128)),
            ("tcp:10.0.0.5:3128", ("10.0.0.5", 3128)),
            ("tcp:port=3128:host=squid.lan:timeout=3", ("squid.lan", 3128)),
            ("tcp6:host=2001\\:db8\\:\\:5:port=3128", ("2001:db8::5", 3128)),
            ("tls:proxy.lan:3129", ("proxy.lan", 3129)),
            ("unix:/run/squid.sock", None),
            ("tcp:host=a.lan:port=0", None),
            ("tcp:host=a.lan", None),
        ]:
            self.assertEqual(_endpointHostPort(description), expected, description)

    def test_proxyFields(self) -> None:
        """
        Each --proxy form records the host and port it was given, and the
        address when the host is one.
        """
        for value, host, port, address in [
            ("squid.lan:3128", "squid.lan", 3128, None),
            ("[2001:0db8::5]:3128", "2001:db8::5", 3128, ("2001:db8::5", 3128)),
            ("http://10.0.0.5:3128", "10.0.0.5", 3128, ("10.0.0.5", 3128)),
            ("tcp:host=10.0.0.5:port=3128", "10.0.0.5", 3128, ("10.0.0.5", 3128)),
            ("tcp:host=squid.lan:port=3128", "squid.lan", 3128, None),
        ]:
            proxy = parseProxy(value, Clock())
            self.assertEqual((proxy.host, proxy.port, proxy.address), (host, port, address), value)


class RealLookupTests(TestCase):
    def test_localAddresses(self) -> Deferred:
        """
        This machine's addresses come from a real netlink dump in the
        reactor; the loopback address is among them when lo is up.
        """

        def check(addresses: frozenset[str]) -> None:
            self.assertTrue(addresses)
            for address in addresses:
                self.assertEqual(ipaddress.ip_address(address).compressed, address)
            self.assertIn("127.0.0.1", addresses)

        return readLocalAddresses(reactor).addCallback(check)

    def test_resolveAllFromHostsFile(self) -> Deferred:
        """
        Every A and AAAA address of a name is found through a real
        C{twisted.names} resolver.
        """
        path = Path(self.mktemp())
        path.write_text("198.51.100.3 squid.lan\n2001:db8:5::3 squid.lan\n")
        pending = resolveAll(hosts.Resolver(file=str(path)), "squid.lan")
        return pending.addCallback(self.assertEqual, frozenset({"198.51.100.3", "2001:db8:5::3"}))

    def test_alwaysKnown(self) -> Deferred:
        """
        A fixed source of local addresses answers them at once.
        """
        return alwaysKnown(["192.0.2.1"])().addCallback(self.assertEqual, frozenset({"192.0.2.1"}))


class TunnelRefusalTests(TunnelTestCase):
    def test_specialDestinationRefused(self) -> None:
        """
        A connection whose original destination is a loopback address is
        refused before any proxy is asked, counted as C{destination}.
        """
        self.resolver.answer = IPv4Address("TCP", "127.0.0.1", 443)
        _, clientTransport = self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(clientTransport.disconnecting)
        self.assertIn("failed: destination 127.0.0.1 is a loopback address", self.failureLines()[0])
        self.assertEqual(self.factory.counters["destination"], 1)

    def test_proxyDestinationRefused(self) -> None:
        """
        A connection to the proxy's own address and port is refused as a
        loop.
        """
        self.resolver.answer = IPv4Address("TCP", PROXY[0], PROXY[1])
        self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        self.assertIn("failed: destination is an upstream proxy itself", self.failureLines()[0])
        self.assertEqual(self.factory.counters["loop"], 1)

    def test_unknownLocalAddressesFailClosed(self) -> None:
        """
        Until the factory has read this machine's addresses (the service
        does before it listens), every destination is refused, on the
        proxy's port and any other: none can be told from the gateway.
        """
        self.makeFactory()
        self.factory.proxyAddresses.localAddresses = None
        for port in (PROXY[1], 443):
            self.resolver.answer = IPv4Address("TCP", "203.0.113.9", port)
            self.connectClient()
        lines = self.failureLines()
        self.assertEqual(len(lines), 2)
        self.assertIn("this machine's addresses are not known yet", lines[0])
        self.assertIn("this machine's addresses are not known yet", lines[1])
        self.factory.proxyAddresses._readLocal = alwaysKnown(LOCAL)
        self.factory.proxyAddresses.refresh()
        self.connectClient()
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_gatewayAddressRefused(self) -> None:
        """
        A connection to any address of this machine, on any port and in
        any form that carries it, is refused before any proxy is asked,
        counted as C{destination}.
        """
        self.makeFactory()
        self.factory.proxyAddresses.localAddresses = frozenset(LOCAL)
        destinations = [
            ("192.0.2.1", 22),
            ("203.0.113.1", 443),
            ("2001:db8:1::1", 8443),
            ("::ffff:192.0.2.1", 443),
            ("::192.0.2.1", 443),
            ("64:ff9b::c000:201", 443),
            ("2002:c000:201::1", 443),
        ]
        for host, port in destinations:
            self.resolver.answer = IPv4Address("TCP", host, port)
            self.lose(*self.connectClient())
        self.assertEqual(self.endpoint.attempts, [])
        # One line (refusals are rate-limited), every one counted.
        self.assertIn("failed: destination 192.0.2.1 is an address of this machine", self.failureLines()[0])
        self.assertEqual(self.factory.counters["destination"], len(destinations))
        for host, _ in destinations:
            self.assertIsNotNone(self.factory.proxyAddresses.gatewayRefusal(canonicalHost(host)), host)


class GatewayNamesTests(SynchronousTestCase):
    HOSTS = (
        "127.0.0.1\tlocalhost\n"
        "127.0.1.1\tgw.example.test gw  # Debian's line for the host name\n"
        "::1 ip6-localhost ip6-loopback\n"
        "192.0.2.1 lan-side.example.test\n"
        "198.51.100.20 printer.example.test\n"
        "0.0.0.0 blocked.example.test\n"
        "not-an-address nothing.example.test\n"
    )

    def names(self, allowed: tuple[str, ...] = ()) -> GatewayNames:
        path = Path(self.mktemp())
        path.write_text(self.HOSTS)
        return GatewayNames.read(str(path), hostname="Gateway", singleLabelAllowed=allowed)

    def test_namesOfThisMachine(self) -> None:
        """
        The host name, the resolvers' loopback names, and every name the
        hosts file gives a loopback, unspecified or local address are
        refused; names of other machines are not.
        """
        names = self.names()
        local = frozenset({"192.0.2.1"})
        for name in ["gateway", "gw.example.test", "localhost.localdomain", "ip6-localhost",
                     "lan-side.example.test", "blocked.example.test"]:
            self.assertIsNotNone(names.refusal(name, local), name)
        self.assertIn("is a name of this gateway (127.0.1.1 in /etc/hosts)", names.refusal("gw.example.test", local))
        for name in ["printer.example.test", "www.example.test", "nothing.example.test"]:
            self.assertIsNone(names.refusal(name, local), name)

    def test_localAddressesKeptCurrent(self) -> None:
        """
        A hosts-file name is judged by this machine's addresses at the time
        of asking: an address the gateway gained makes its names refused.
        """
        names = self.names()
        self.assertIsNone(names.refusal("printer.example.test", frozenset({"192.0.2.1"})))
        self.assertIsNotNone(names.refusal("printer.example.test", frozenset({"198.51.100.20"})))

    def test_singleLabel(self) -> None:
        """
        A single-label name is refused unless a rule names it, and only
        for names clients send.
        """
        self.assertIn("single-label name intranet is not allowed", self.names().refusal("intranet", None))
        self.assertIsNone(self.names(("intranet",)).refusal("intranet", None))
        self.assertIsNone(self.names().refusal("intranet", None, singleLabel=False))
        self.assertIsNotNone(self.names().refusal("gateway", None, singleLabel=False))

    def test_unreadableHostsFile(self) -> None:
        """
        A hosts file that cannot be read gives no names (the host name is
        still refused), and says so.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        names = GatewayNames.read(self.mktemp(), hostname="gw")
        self.assertIsNotNone(names.refusal("gw", None))
        self.assertIsNone(names.refusal("anything.example.test", None))
        self.assertTrue(any("cannot read" in str(e.get("log_format")) for e in events))


class GatewayNameTunnelTests(TunnelTestCase):
    """
    A name the client sends never has the proxy connect to the gateway,
    and cannot lead around a destination rule.
    """

    def sniTunnel(self, name: str, policy: object = None) -> bytes:
        from tests.test_sniff import realHello

        self.settings = TunnelSettings(connectTarget="sni", sniffTimeout=2, earlyDataLimit=65536)
        self.makeFactory()
        self.factory.gatewayNames = GatewayNames(["gw"], {"gw.example.test": frozenset({"127.0.1.1"})})
        if policy is not None:
            self.factory.policy = policy  # type: ignore[assignment]
            self.factory._readNames()
        client, _ = self.connectClient()
        client.dataReceived(realHello(name))
        _, upstreamTransport = self.endpoint.accept()
        self.named = [tunnel.named for tunnel in self.factory.active]
        return upstreamTransport.value().split(b"\r\n", 1)[0]

    def test_gatewayNameByAddress(self) -> None:
        """
        A server name that is the gateway's own is not asked for: the
        tunnel goes to the original address, and the line says why.
        """
        for name, why in [
            ("gw", "gw is a name of this gateway"),
            ("gw.example.test", "gw.example.test is a name of this gateway (127.0.1.1 in /etc/hosts)"),
            ("localhost.localdomain", "localhost.localdomain is a name of this gateway"),
            ("intranet", "single-label name intranet is not allowed"),
        ]:
            self.assertEqual(self.sniTunnel(name), b"CONNECT 203.0.113.7:443 HTTP/1.1", name)
            self.assertTrue(self.named[0].startswith(f" (CONNECT by address: {why}"), self.named)

    def test_destinationRulesDecideByAddress(self) -> None:
        """
        While a rule judges destinations by address, a named connection is
        CONNECTed by its address; a rule that chooses the name still can.
        """
        from shifter.service.config import Rule, RulePolicy

        refuse = Rule(line=1, destinations=(ipaddress.ip_network("198.51.100.0/24"),), refuse="no")
        byName = Rule(line=2, names=("named.example.test",), connectTarget="name")
        policy = RulePolicy([refuse, byName], {})
        self.assertEqual(self.sniTunnel("www.example.test", policy), b"CONNECT 203.0.113.7:443 HTTP/1.1")
        self.assertEqual(self.sniTunnel("named.example.test", policy), b"CONNECT named.example.test:443 HTTP/1.1")
        withoutDestinations = RulePolicy([byName], {})
        self.assertEqual(self.sniTunnel("www.example.test", withoutDestinations),
                         b"CONNECT www.example.test:443 HTTP/1.1")
