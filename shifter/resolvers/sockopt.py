"""
The C{sockopt} resolver: the original destination from C{SO_ORIGINAL_DST}.

When a REDIRECT or DNAT rule rewrote a connection's destination, conntrack
still holds the original one, and the kernel hands it out through a socket
option on the accepted socket.  It needs no module of ours and no privilege,
and answers without any I/O, so it is Shifter's default.
"""

from __future__ import annotations

import socket
import struct

from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITCPTransport

from shifter.resolvers.resolver import Destination, DestinationUnknown, IOriginalDestinationResolver

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")


def unmapAddress(host: str) -> str:
    """
    Turn an IPv4-mapped IPv6 address (C{::ffff:192.0.2.1}), as a dual-stack
    listener reports IPv4 peers, into the plain IPv4 address.
    """
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def originalDestination(sock: socket.socket) -> Destination:
    """
    Ask the kernel for the original destination of an accepted socket.

    IPv4 connections, also those accepted on a dual-stack IPv6 socket, use
    C{SO_ORIGINAL_DST}; IPv6 connections use C{IP6T_SO_ORIGINAL_DST}.

    @raise OSError: if the kernel knows no original destination.
    """
    if sock.family == socket.AF_INET6 and "." not in sock.getpeername()[0]:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, packed = _SOCKADDR_IN6.unpack(raw)
        return IPv6Address("TCP", socket.inet_ntop(socket.AF_INET6, packed), port)
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    port, packed = _SOCKADDR_IN.unpack(raw)
    return IPv4Address("TCP", socket.inet_ntoa(packed), port)


@implementer(IOriginalDestinationResolver)
class SocketOptionResolver:
    """
    Resolves original destinations with C{SO_ORIGINAL_DST}, for connections
    redirected by REDIRECT or DNAT rules.
    """

    name = "sockopt"

    def __init__(self, reactor=None) -> None:  # type: ignore[no-untyped-def]
        pass

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def resolve(self, transport: ITCPTransport) -> Destination:
        try:
            # A TCP transport's handle is its socket.
            return originalDestination(transport.getHandle())  # type: ignore[attr-defined]
        except OSError as e:
            raise DestinationUnknown(f"SO_ORIGINAL_DST: {e.strerror or e}") from None
