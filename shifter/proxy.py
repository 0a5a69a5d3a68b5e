"""
The upstream HTTP proxy: how it is named on the command line and how Shifter
reaches it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from twisted.internet import tcp

from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
)
from twisted.internet.interfaces import IStreamClientEndpoint

# host:port, or [v6 literal]:port
_SHORTHAND = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class UpstreamProxy:
    """
    One upstream HTTP proxy.

    @ivar description: how the proxy is named in log lines.
    @ivar endpoint: the client endpoint that connects to it.
    @ivar address: its (IP address, port) when known in advance, so that a
        connection redirected to the proxy itself can be refused; L{None}
        when the proxy is named by hostname or by a non-TCP endpoint.
    """

    description: str
    endpoint: IStreamClientEndpoint
    address: tuple[str, int] | None = None


def parseProxy(value: str, reactor) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    """
    Parse a C{--proxy} value: C{host:port}, C{[v6]:port}, or a Twisted
    client endpoint string such as C{tcp:host=10.0.0.5:port=3128}.

    @raise ValueError: with a one-line reason if the value is neither.
    """
    match = _SHORTHAND.fullmatch(value)
    if match is None:
        if ":" not in value:
            raise ValueError(f"expected host:port or an endpoint string, got {value!r}")
        try:
            endpoint = clientFromString(reactor, value)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"invalid proxy endpoint {value!r}: {e}") from None
        return UpstreamProxy(value, endpoint, _endpointAddress(endpoint))
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise ValueError(f"proxy port out of range in {value!r}")
    host = match.group("v6") or match.group("host")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if match.group("v6"):
            raise ValueError(f"invalid IPv6 address in {value!r}") from None
        # A hostname: TCP4ClientEndpoint resolves it through the reactor's
        # resolver when connecting.
        return UpstreamProxy(value, TCP4ClientEndpoint(reactor, host, port))
    if address.version == 6:
        endpoint = TCP6ClientEndpoint(reactor, address.compressed, port)
    else:
        endpoint = TCP4ClientEndpoint(reactor, str(address), port)
    return UpstreamProxy(value, endpoint, (address.compressed, port))


def _endpointAddress(endpoint: IStreamClientEndpoint) -> tuple[str, int] | None:
    """
    The (IP address, port) a TCP client endpoint connects to, if its host is
    an IP literal.
    """
    host = getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        return ipaddress.ip_address(host).compressed, port
    except ValueError:
        return None


# linux/socket.h
SO_MARK = 36


class _MarkedClient(tcp.Client):
    """
    A TCP client connection whose socket carries a netfilter mark from
    before its SYN, so that firewall rules can tell Shifter's own
    connections apart (for example, to keep them out of the redirect).
    """

    def __init__(self, host, port, bindAddress, connector, reactor, mark):  # type: ignore[no-untyped-def]
        self._mark = mark
        super().__init__(host, port, bindAddress, connector, reactor)

    def createInternetSocket(self):  # type: ignore[no-untyped-def]
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
        return skt


class _MarkedConnector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, bindAddress, reactor, mark):  # type: ignore[no-untyped-def]
        self._mark = mark
        super().__init__(host, port, factory, timeout, bindAddress, reactor)

    def _makeTransport(self) -> tcp.Client:
        return _MarkedClient(self.host, self.port, self.bindAddress, self, self.reactor, self._mark)


class MarkingReactor:
    """
    The reactor as client endpoints see it, except that the TCP connections
    they make carry the socket mark C{mark} (C{SO_MARK}; needs
    CAP_NET_ADMIN).  Endpoints built on this reactor, from a host:port or
    from an endpoint string, need no other change.
    """

    def __init__(self, reactor, mark: int) -> None:  # type: ignore[no-untyped-def]
        self._reactor = reactor
        self._mark = mark

    def connectTCP(self, host, port, factory, timeout=30.0, bindAddress=None):  # type: ignore[no-untyped-def]
        connector = _MarkedConnector(host, port, factory, timeout, bindAddress, self._reactor, self._mark)
        connector.connect()
        return connector

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._reactor, name)
