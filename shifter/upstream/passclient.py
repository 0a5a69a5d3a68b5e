"""
What the upstream proxy is told about the client (C{--pass-client}), and
the bytes Shifter writes first on each connection to a proxy.

Every tunnel reaches the proxy from Shifter's own address, so without help
the proxy's ACLs and access log see Shifter, not the client.  Two standard
ways tell it who the client is:

  - C{x-forwarded-for}: an C{X-Forwarded-For} header on the CONNECT
    request (Squid: C{follow_x_forwarded_for allow localhost});
  - C{proxy-v1}, C{proxy-v2}: a PROXY protocol header, text or binary,
    before the request (Squid: C{http_port ... require-proxy-header} and
    C{proxy_protocol_access allow localhost}).

The header states the client's address and port and the original
destination the client connected to, which is what the proxy itself would
have seen had the client come to it directly (Squid records intercepted
connections the same way).  Nothing here touches a socket.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Protocol, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address

from shifter.upstream.connect import formatConnectRequest
from shifter.upstream.proxyprotocol import encodeLocalV1, encodeLocalV2, encodeV1, encodeV2



class _Proxy(Protocol):
    """
    What L{tunnelRequest} reads of a L{shifter.upstream.proxy.UpstreamProxy}.
    """

    passClient: str

PASS_CLIENT_MODES = ("none", "x-forwarded-for", "proxy-v1", "proxy-v2")

_ENCODERS = {"proxy-v1": encodeV1, "proxy-v2": encodeV2}

Address = Union[IPv4Address, IPv6Address]


def checkPassClient(mode: str) -> str:
    """
    @return: C{mode}, if it is one of L{PASS_CLIENT_MODES}.
    @raise ValueError: with a one-line reason, if it is not.
    """
    if mode not in PASS_CLIENT_MODES:
        raise ValueError(f"expected one of {', '.join(PASS_CLIENT_MODES)}, got {mode!r}")
    return mode


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    The IP address C{host} names, without an IPv6 scope (C{%eth0}) and with
    an IPv4-mapped IPv6 address (as a dual-stack socket reports an IPv4
    peer) turned into the IPv4 address it holds.

    @raise ValueError: if C{host} is not an IP address.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def clientEndpoints(client: Address, destination: Address) -> tuple[tuple[str, int], tuple[str, int]]:
    """
    The client's and the original destination's (address, port) as a
    PROXY header states them: IPv4-mapped addresses as IPv4, and both of
    one family.  Addresses read from one connection are always of one
    family once unmapped; should they differ, the IPv4 one is given in its
    IPv4-mapped IPv6 form, so the header is still true.

    @raise ValueError: if either host is not an IP address.
    """
    source, target = _ip(client.host), _ip(destination.host)
    if source.version != target.version:
        source, target = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (source, target)
        )
    return (source.compressed, client.port), (target.compressed, destination.port)


def forwardedFor(client: Address) -> tuple[str, str]:
    """
    The C{X-Forwarded-For} header naming C{client}: its address alone, in
    canonical form (IPv6 without brackets, as Squid reads it).

    @raise ValueError: if the client's host is not an IP address, so that
        nothing but an address can reach the header.
    """
    return "X-Forwarded-For", _ip(client.host).compressed


def proxyHeader(mode: str, client: Address, destination: Address) -> bytes:
    """
    The PROXY protocol header of C{mode} (C{proxy-v1} or C{proxy-v2}) for a
    client connection, or C{b""} for the other modes.
    """
    encoder = _ENCODERS.get(mode)
    if encoder is None:
        return b""
    return encoder(*clientEndpoints(client, destination))


def tunnelRequest(
    proxy: _Proxy,
    client: Address,
    destination: Address,
    connectHost: str,
    port: int,
    authHeaders: Sequence[tuple[str, str]] = (),
    passClient: Optional[str] = None,
    first: bool = True,
) -> bytes:
    """
    Everything Shifter writes on a new connection to C{proxy} before the
    proxy answers: the PROXY protocol header if the mode asks for one, then
    the C{CONNECT connectHost:port} request with C{authHeaders} (such as
    C{Proxy-Authorization}) and, in the C{x-forwarded-for} mode,
    C{X-Forwarded-For}.

    For a proxy reached over TLS these are the first bytes inside TLS.

    @param client: the client's address (an IPv4-mapped one is sent as
        IPv4).
    @param destination: where the client was originally going; the PROXY
        header's destination.
    @param passClient: this connection's mode (a policy's choice); C{None}
        for the proxy's own, L{shifter.upstream.proxy.UpstreamProxy.passClient}.
    @param first: C{False} for a request on a connection that already
        carried one (NTLM's authenticate message): the PROXY header opens a
        connection, and is not sent again.
    @raise ValueError: if the mode is unknown or anything in the request
        cannot be sent safely (see L{formatConnectRequest}).
    """
    mode = checkPassClient(passClient if passClient is not None else proxy.passClient)
    headers = list(authHeaders)
    if mode == "x-forwarded-for":
        headers.append(forwardedFor(client))
    header = proxyHeader(mode, client, destination) if first else b""
    return header + formatConnectRequest(connectHost, port, headers)


def probeRequest(
    proxy: _Proxy, host: str, port: int, authHeaders: Sequence[tuple[str, str]] = (), first: bool = True
) -> bytes:
    """
    Everything Shifter writes on a connection of its own to C{proxy} (a
    health probe, C{doctor}'s check): the PROXY protocol header that says
    the connection relays no client (its LOCAL form), if the proxy's mode
    asks for one, then C{CONNECT host:port} with C{authHeaders}.  No
    C{X-Forwarded-For}: there is no client to name.

    @param first: C{False} for a request on a connection that already
        carried one (as for L{tunnelRequest}).
    @raise ValueError: as L{tunnelRequest}.
    """
    mode = checkPassClient(proxy.passClient)
    local = {"proxy-v1": encodeLocalV1, "proxy-v2": encodeLocalV2}.get(mode)
    header = local() if local is not None and first else b""
    return header + formatConnectRequest(host, port, list(authHeaders))


def refusalHint(kind: str, status: object, mode: str) -> str:
    """
    A hint for the log line of a tunnel the proxy refused in a way that a
    mismatched C{--pass-client} causes, else C{""}.

    Squid closes a connection that lacks the PROXY header on a port that
    requires one, and answers 400 to a PROXY header on a port that does
    not expect it.

    @param kind: the failure's counter name (C{"proxy-closed"},
        C{"proxy-status"}, ...).
    @param status: the proxy's status code, if it answered.
    @param mode: the connection's C{--pass-client} mode.
    """
    sentHeader = mode in _ENCODERS
    if kind == "proxy-closed" and not sentHeader:
        return " (as a proxy port that requires a PROXY protocol header does; see --pass-client)"
    if kind == "proxy-status" and status == 400 and sentHeader:
        return f" (as a proxy port that expects no PROXY protocol header does; {mode} was sent, see --pass-client)"
    return ""
