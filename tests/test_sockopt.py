"""
Tests for L{shifter.resolvers.sockopt}, the SO_ORIGINAL_DST resolver, with sockets
that answer the option with canned kernel structures.
"""

from __future__ import annotations

import errno
import socket
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from shifter.resolvers.resolver import DestinationUnknown, IOriginalDestinationResolver
from shifter.resolvers.sockopt import SocketOptionResolver, originalDestination, unmapAddress
from zope.interface.verify import verifyObject


class FakeSocket:
    """
    Answers getsockopt like the kernel for a redirected connection, and
    records which option was asked for.
    """

    def __init__(self, family: int, peer: str, answer: bytes | OSError) -> None:
        self.family = family
        self._peer = peer
        self._answer = answer
        self.asked: list[tuple[int, int, int]] = []

    def getpeername(self) -> tuple:
        return (self._peer, 40000)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        if isinstance(self._answer, OSError):
            raise self._answer
        return self._answer


def sockaddrIn(address: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(address) + bytes(8)


def sockaddrIn6(address: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, address)
        + bytes(4)
    )


class FakeTransport:
    def __init__(self, sock: FakeSocket) -> None:
        self.sock = sock

    def getHandle(self) -> FakeSocket:
        return self.sock


class OriginalDestinationTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """
        An IPv4 socket is asked for SO_ORIGINAL_DST at SOL_IP, and the
        sockaddr_in it returns becomes an L{IPv4Address}.
        """
        sock = FakeSocket(socket.AF_INET, "192.0.2.2", sockaddrIn("203.0.113.7", 443))
        self.assertEqual(originalDestination(sock), IPv4Address("TCP", "203.0.113.7", 443))
        self.assertEqual(sock.asked, [(socket.SOL_IP, 80, 16)])

    def test_ipv6(self) -> None:
        """
        An IPv6 connection is asked for IP6T_SO_ORIGINAL_DST at SOL_IPV6,
        and the sockaddr_in6 becomes an L{IPv6Address}.
        """
        sock = FakeSocket(socket.AF_INET6, "2001:db8:1::2", sockaddrIn6("2001:db8:2::7", 8443))
        self.assertEqual(originalDestination(sock), IPv6Address("TCP", "2001:db8:2::7", 8443))
        self.assertEqual(sock.asked, [(socket.IPPROTO_IPV6, 80, 28)])

    def test_ipv4OnDualStackSocket(self) -> None:
        """
        An IPv4 client on a dual-stack IPv6 listener (peer ::ffff:a.b.c.d)
        is an IPv4 connection to netfilter: SO_ORIGINAL_DST at SOL_IP.
        """
        sock = FakeSocket(socket.AF_INET6, "::ffff:192.0.2.2", sockaddrIn("203.0.113.7", 443))
        self.assertEqual(originalDestination(sock), IPv4Address("TCP", "203.0.113.7", 443))
        self.assertEqual(sock.asked, [(socket.SOL_IP, 80, 16)])

    def test_unmap(self) -> None:
        """
        IPv4-mapped addresses become plain IPv4; others are unchanged.
        """
        self.assertEqual(unmapAddress("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(unmapAddress("2001:db8::1"), "2001:db8::1")
        self.assertEqual(unmapAddress("192.0.2.1"), "192.0.2.1")


class SocketOptionResolverTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """
        The resolver provides L{IOriginalDestinationResolver}.
        """
        self.assertTrue(verifyObject(IOriginalDestinationResolver, SocketOptionResolver()))

    def test_resolve(self) -> None:
        """
        L{SocketOptionResolver.resolve} answers at once with the original destination.
        """
        sock = FakeSocket(socket.AF_INET, "192.0.2.2", sockaddrIn("203.0.113.7", 443))
        result = SocketOptionResolver().resolve(FakeTransport(sock))
        self.assertEqual(result, IPv4Address("TCP", "203.0.113.7", 443))

    def test_unknown(self) -> None:
        """
        When the kernel has no original destination (ENOENT: no conntrack
        entry; ENOPROTOOPT: conntrack not loaded), the resolver fails with
        L{DestinationUnknown} giving the kernel's reason, at once.
        """
        for code in (errno.ENOENT, errno.ENOPROTOOPT):
            sock = FakeSocket(socket.AF_INET, "192.0.2.2", OSError(code, "kernel says no"))
            error = self.assertRaises(DestinationUnknown, SocketOptionResolver().resolve, FakeTransport(sock))
            self.assertIn("SO_ORIGINAL_DST: kernel says no", str(error))

    def test_realUnredirectedSocket(self) -> None:
        """
        On a real loopback connection that no rule redirected, the kernel
        either reports the connection's own destination or none at all.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        try:
            destination = originalDestination(accepted)
        except OSError as e:
            self.assertIn(e.errno, (errno.ENOENT, errno.ENOPROTOOPT))
        else:
            self.assertEqual((destination.host, destination.port), accepted.getsockname())
