"""
The PROXY protocol header, sans I/O: versions 1 (text) and 2 (binary), as
HAProxy's specification (C{doc/proxy-protocol.txt}) defines them, for TCP
over IPv4 and IPv6.

A sender puts the header before anything else it writes on the connection,
so that the receiver (Squid on an C{http_port ... require-proxy-header})
takes the connection as coming from the header's source address rather
than from the sender.  Only the sending side is here: Shifter never
accepts the header, so no client can claim another's address.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Section 2.2: the twelve bytes that open every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# The thirteenth byte: version 2 in the high nibble, the PROXY command (the
# connection was made on behalf of another node) in the low one.
_V2_PROXY_COMMAND = 0x21
# ... or the LOCAL command (the sender's own connection, a health check).
_V2_LOCAL_COMMAND = 0x20

# The fourteenth byte: address family in the high nibble, STREAM (TCP) in
# the low one.
_V2_TCP_OVER = {4: 0x11, 6: 0x21}

# Section 2.1: the longest lines a receiver must accept, CRLF included.
V1_MAX_LENGTH = {4: 56, 6: 104}


def _endpoint(host: str, port: int, what: str) -> Address:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} address is not an IP address: {host!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} port out of range: {port!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"{what} address has a scope, which the header cannot carry: {host!r}")
    return address


def _pair(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[Address, Address]:
    sourceAddress = _endpoint(*source, "source")
    destinationAddress = _endpoint(*destination, "destination")
    if sourceAddress.version != destinationAddress.version:
        raise ValueError(
            f"source {sourceAddress} and destination {destinationAddress} "
            "are not of one address family"
        )
    return sourceAddress, destinationAddress


def encodeV1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """
    The version 1 header for a TCP connection from C{source} to
    C{destination}: one line of US-ASCII, such as
    C{b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n"}.

    Addresses are written in their canonical form (IPv4 without leading
    zeros, IPv6 compressed) and ports in decimal without leading zeros.

    @param source: the client's (address, port).
    @param destination: the (address, port) the client connected to, of
        the same address family.
    @raise ValueError: if an address is not an IP address, a port is out
        of range, or the two families differ (the line names one family).
    """
    sourceAddress, destinationAddress = _pair(source, destination)
    line = (
        f"PROXY TCP{sourceAddress.version} {sourceAddress.compressed} "
        f"{destinationAddress.compressed} {source[1]} {destination[1]}\r\n"
    )
    return line.encode("ascii")


def encodeV2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """
    The version 2 header for a TCP connection from C{source} to
    C{destination}: the signature, the PROXY command, TCP over IPv4 or
    IPv6, the length of the address block, then the source and destination
    addresses and ports in network byte order.  No TLV follows.

    @param source: the client's (address, port).
    @param destination: the (address, port) the client connected to, of
        the same address family.
    @raise ValueError: as L{encodeV1}.
    """
    sourceAddress, destinationAddress = _pair(source, destination)
    addresses = sourceAddress.packed + destinationAddress.packed + struct.pack(
        "!HH", source[1], destination[1]
    )
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", _V2_PROXY_COMMAND, _V2_TCP_OVER[sourceAddress.version], len(addresses))
        + addresses
    )


def encodeLocalV1() -> bytes:
    """
    The version 1 header of a connection the sender makes on its own
    behalf, such as a health check (section 2.1: C{UNKNOWN}): the receiver
    takes the connection's real addresses.
    """
    return b"PROXY UNKNOWN\r\n"


def encodeLocalV2() -> bytes:
    """
    The version 2 header of a connection the sender makes on its own
    behalf (section 2.2: the LOCAL command, family UNSPEC, no addresses).
    """
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL_COMMAND, 0x00, 0)
