"""
The C{tproxy} resolver and the transparent listener it needs.

A TPROXY rule delivers a connection to Shifter's socket without rewriting
it: no NAT, so the accepted socket's local address is the address the
client sent to, and the client's own address (IPv4 or IPv6) reaches
Shifter untouched.  The kernel hands such connections only to a listening
socket with C{IP_TRANSPARENT} (C{IPV6_TRANSPARENT}), set before bind, which
needs CAP_NET_ADMIN.

Twisted's TCP port has no option for it, so this module adds an endpoint
type, C{tproxy:PORT[:interface=ADDRESS][:backlog=N]}, through the endpoint
parser dropin in C{twisted/plugins/shifter_endpoints.py}:
C{--listen 'tproxy:12345:interface=\\:\\:'}.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, execute, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
    ITCPTransport,
)
from twisted.plugin import IPlugin

from shifter.resolvers.resolver import Destination, IOriginalDestinationResolver
from shifter.resolvers.sockopt import unmapAddress
from shifter.transports import TunnelPort

# linux/in.h, linux/in6.h
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


class TransparentPort(TunnelPort):
    """
    A TCP listening port with C{IP_TRANSPARENT} (or C{IPV6_TRANSPARENT},
    which on a dual-stack socket covers IPv4 as well) set before bind, so
    that TPROXY can hand it connections addressed to anyone.
    """

    def createInternetSocket(self) -> socket.socket:
        sock = TunnelPort.createInternetSocket(self)
        try:
            if self.addressFamily == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def __repr__(self) -> str:
        return f"<TransparentPort {self._realPortNumber or self.port} on {self.interface!r}>"


@implementer(IStreamServerEndpoint)
class TransparentServerEndpoint:
    """
    Listens with a L{TransparentPort}.
    """

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "::") -> None:
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        """
        Listen; fails with C{CannotListenError} when the port is taken or
        C{IP_TRANSPARENT} is refused (no CAP_NET_ADMIN).
        """
        port = TransparentPort(self.port, protocolFactory, self.backlog, self.interface, self.reactor)

        def started() -> TransparentPort:
            port.startListening()
            return port

        return execute(started)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TransparentServerParser:
    """
    The C{tproxy:PORT[:interface=ADDRESS][:backlog=N]} endpoint string.
    The interface defaults to C{::}, IPv4 and IPv6 on one socket.
    """

    prefix = "tproxy"

    def _parse(self, reactor: Any, port: str, backlog: str = "50", interface: str = "::") -> TransparentServerEndpoint:
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError(f"port {port} out of range")
        return TransparentServerEndpoint(reactor, number, int(backlog), interface)

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> TransparentServerEndpoint:
        return self._parse(reactor, *args, **kwargs)


@implementer(IOriginalDestinationResolver)
class TransparentResolver:
    """
    C{--resolver=tproxy}: the original destination is the accepted
    socket's local address, for connections delivered by TPROXY rules to a
    C{tproxy:} listener.

    @cvar localAddressIsDestination: tells the tunnel that the local
        address cannot show a direct connection to Shifter, so it checks
        the destination against the listening port instead.
    """

    name = "tproxy"
    localAddressIsDestination = True

    def __init__(self, reactor: Optional[Any] = None) -> None:
        pass

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def resolve(self, transport: ITCPTransport) -> Destination:
        local = transport.getHost()
        host = unmapAddress(local.host)
        if ":" in host:
            return IPv6Address("TCP", host, local.port)
        return IPv4Address("TCP", host, local.port)
