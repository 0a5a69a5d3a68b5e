"""
The upstream HTTP proxy: how it is named on the command line and how Shifter
reaches it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

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
