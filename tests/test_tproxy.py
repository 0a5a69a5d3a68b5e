"""
Tests for the C{tproxy} resolver, its endpoint string, the loop check under
TPROXY, and the C{auto} resolver.
"""

from __future__ import annotations

import socket

from zope.interface import implementer

from twisted.internet import reactor as globalReactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.resolvers import resolver as resolverModule
from shifter.resolvers.auto import AutoResolver
from shifter.resolvers.resolver import IOriginalDestinationResolver, ResolverUnavailable, makeResolver
from shifter.resolvers.tproxy import TransparentPort, TransparentResolver, TransparentServerEndpoint
from tests.test_tunnel import CLIENT, SHIFTER, TunnelTestCase


class EndpointTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        C{tproxy:PORT:interface=...} makes a transparent endpoint, with
        C{::} (IPv4 and IPv6) as the default interface.
        """
        endpoint = serverFromString(globalReactor, "tproxy:12345:interface=192.0.2.1:backlog=7")
        self.assertIsInstance(endpoint, TransparentServerEndpoint)
        self.assertEqual((endpoint.port, endpoint.interface, endpoint.backlog), (12345, "192.0.2.1", 7))
        self.assertEqual(serverFromString(globalReactor, "tproxy:1").interface, "::")

    def test_badPort(self) -> None:
        """
        A port out of range is refused when parsed.
        """
        self.assertRaises(ValueError, serverFromString, globalReactor, "tproxy:70000")


class TransparentPortTests(TestCase):
    def test_transparentOption(self) -> None:
        """
        The listening socket has IP_TRANSPARENT (IPV6_TRANSPARENT for an
        IPv6 socket) set; without CAP_NET_ADMIN listening fails instead.
        """
        import os

        if os.geteuid() != 0:
            from twisted.internet.error import CannotListenError

            self.assertRaises(CannotListenError,
                              TransparentPort(0, ServerFactory(), interface="127.0.0.1").startListening)
            return
        for interface, level, option in [("127.0.0.1", socket.SOL_IP, 19), ("::1", socket.IPPROTO_IPV6, 75)]:
            port = TransparentPort(0, ServerFactory(), interface=interface)
            port.startListening()
            self.addCleanup(port.stopListening)
            self.assertEqual(port.socket.getsockopt(level, option), 1)


class ResolverTests(SynchronousTestCase):
    def test_localAddress(self) -> None:
        """
        The destination is the accepted socket's local address; an IPv4
        one on a dual-stack socket is unmapped.
        """
        resolver = TransparentResolver()
        for host, expected in [
            (IPv4Address("TCP", "203.0.113.7", 443), IPv4Address("TCP", "203.0.113.7", 443)),
            (IPv6Address("TCP", "::ffff:203.0.113.7", 443), IPv4Address("TCP", "203.0.113.7", 443)),
            (IPv6Address("TCP", "2001:db8:2::7", 443), IPv6Address("TCP", "2001:db8:2::7", 443)),
        ]:
            transport = StringTransport(hostAddress=host, peerAddress=CLIENT)
            self.assertEqual(resolver.resolve(transport), expected)

    def test_registered(self) -> None:
        """
        The registry builds each new resolver by name, passing options.
        """
        self.assertIsInstance(makeResolver("tproxy", globalReactor), TransparentResolver)
        queue = makeResolver("nfqueue", globalReactor, queueNum=9)
        self.assertEqual((queue.name, queue.queueNum), ("nfqueue", 9))
        self.assertEqual(makeResolver("conntrack", globalReactor).name, "conntrack")
        self.assertEqual(makeResolver("kmod", globalReactor).name, "kmod")


class TransparentLoopTests(TunnelTestCase):
    """
    The loop check under TPROXY, where every accepted connection's local
    address is its destination.
    """

    def setUp(self) -> None:
        super().setUp()
        self.resolver = TransparentResolver()  # type: ignore[assignment]
        self.makeFactory()
        self.factory.listeningAddress = IPv6Address("TCP", "::", 12345)

    def test_transparentConnectionTunnelled(self) -> None:
        """
        A TPROXY connection to a remote address is tunnelled, although its
        destination equals the local address.
        """
        destination = IPv4Address("TCP", "203.0.113.7", 443)
        _, transport = self.connectClient(host=destination)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_directConnectionRefused(self) -> None:
        """
        A direct connection to Shifter's port, on any local address of a
        wildcard listener, is refused.
        """
        for host in [SHIFTER, IPv6Address("TCP", "::ffff:192.0.2.1", 12345),
                     IPv6Address("TCP", "2001:db8:1::1", 12345)]:
            _, transport = self.connectClient(host=host)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(self.factory.counters["loop"], 3)

    def test_boundListener(self) -> None:
        """
        With a listener bound to one address, only that address and port
        are Shifter itself.
        """
        self.factory.listeningAddress = IPv4Address("TCP", "192.0.2.1", 12345)
        _, direct = self.connectClient(host=SHIFTER)
        _, other = self.connectClient(host=IPv4Address("TCP", "203.0.113.7", 12345))
        self.assertTrue(direct.disconnecting)
        self.assertFalse(other.disconnecting)


class NonTransparentLoopTests(TunnelTestCase):
    def test_localAddressStillChecked(self) -> None:
        """
        For resolvers other than tproxy the check is unchanged: a
        destination equal to the local address is refused, even when the
        listening address is unknown.
        """
        self.resolver.answer = SHIFTER
        _, transport = self.connectClient(host=SHIFTER)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.counters["loop"], 1)

    def test_listeningPortNotUsed(self) -> None:
        """
        For REDIRECT resolvers, a redirected connection to a remote host on
        the same port number as Shifter's is still tunnelled.
        """
        self.makeFactory()
        self.factory.listeningAddress = IPv6Address("TCP", "::", 12345)
        self.resolver.answer = IPv4Address("TCP", "203.0.113.7", 12345)
        _, transport = self.connectClient(host=SHIFTER)
        self.assertFalse(transport.disconnecting)


@implementer(IOriginalDestinationResolver)
class StubResolver:
    def __init__(self, reactor=None, name="stub", works=True) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.works = works
        self.started = self.stopped = False

    def start(self):  # type: ignore[no-untyped-def]
        if not self.works:
            return fail(ResolverUnavailable(f"{self.name} missing"))
        self.started = True
        return succeed(None)

    def stop(self):  # type: ignore[no-untyped-def]
        self.stopped = True
        return succeed(None)

    def resolve(self, transport):  # type: ignore[no-untyped-def]
        return succeed(IPv4Address("TCP", "203.0.113.7", 443))


class AutoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.built: dict[str, StubResolver] = {}
        works = {"first": False, "second": True, "third": True}

        def make(name, reactor, **options):  # type: ignore[no-untyped-def]
            self.built[name] = StubResolver(name=name, works=works[name])
            return self.built[name]

        self.patch(__import__("shifter.resolvers.auto", fromlist=["makeResolver"]), "makeResolver", make)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_firstThatStarts(self) -> None:
        """
        The first candidate whose start succeeds is used; later ones are not
        tried; the log names the choice and why the others were passed.
        """
        auto = AutoResolver(candidates=("first", "second", "third"))
        self.successResultOf(auto.start())
        self.assertIs(auto.chosen, self.built["second"])
        self.assertNotIn("third", self.built)
        self.assertEqual(auto.name, "auto: second")
        from twisted.logger import formatEvent
        lines = [formatEvent(e) for e in self.events]
        self.assertIn(
            "resolver auto chose second (kmod: not tried: SO_ORIGINAL_DST answers every "
            "connection the module does, faster and with no privilege (--resolver kmod to "
            "use the module); first: first missing)",
            lines,
        )
        transport = StringTransport(peerAddress=CLIENT)
        self.assertEqual(self.successResultOf(auto.resolve(transport)).port, 443)
        self.successResultOf(auto.stop())
        self.assertTrue(self.built["second"].stopped)

    def test_noneStarts(self) -> None:
        """
        When no candidate starts, auto is unavailable and lists the reasons.
        """
        auto = AutoResolver(candidates=("first",))
        failure = self.failureResultOf(auto.start(), ResolverUnavailable)
        self.assertIn("first: first missing", str(failure.value))

    def test_defaultOrder(self) -> None:
        """
        By default auto tries SO_ORIGINAL_DST alone: the kernel module's
        answers are a subset of it, so the module is used only when named.
        """
        self.assertEqual(AutoResolver().candidates, ("sockopt",))
