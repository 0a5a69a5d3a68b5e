"""
The C{conntrack} resolver: ask ctnetlink for the connection's original
tuple.

A REDIRECT or DNAT rule rewrites the destination of a connection, and
conntrack keeps both tuples: the original one, as the client sent it, and
the reply one, as the rewritten connection looks from Shifter's side.  The
accepted socket knows the reply tuple (its own address is the source, the
client's is the destination), so a C{IPCTNL_MSG_CT_GET} by that tuple
returns the entry, and its original tuple holds the destination.

This answers the same question as C{SO_ORIGINAL_DST}, at the cost of one
netlink round trip, but through a separate interface: it works where the
socket option does not reach (a socket handed over from another process,
a kernel whose getsockopt hook is missing) and it shows what conntrack
itself believes, which helps when debugging NAT.  It needs CAP_NET_ADMIN.

pyroute2 provides the message classes (C{nfct_msg}); the requests go
through L{NetlinkProtocol} on a L{NetlinkPort} in the reactor, so many
look-ups can be in flight on one socket without blocking.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any, Optional

from pyroute2.netlink import nla_base
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW, nfct_msg
from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.kernel.netlink import (
    NETLINK_NETFILTER,
    NetlinkError,
    NetlinkException,
    NetlinkNotFound,
    NetlinkPort,
    NetlinkProtocol,
    NetlinkTimeout,
)
from shifter.resolvers.resolver import (
    Destination,
    DestinationUnknown,
    IOriginalDestinationResolver,
    ResolverError,
    ResolverUnavailable,
)
from shifter.resolvers.sockopt import unmapAddress


# nfnetlink message types are the subsystem in the high byte, the
# subsystem's message in the low one.
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
# The kernel answers a GET with the entry as a NEW message.
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW

_ADDRESS_ATTRS: dict[int, str] = {socket.AF_INET: "CTA_IP_V4", socket.AF_INET6: "CTA_IP_V6"}


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def encodeReplyQuery(local: Destination, peer: Destination) -> nfct_msg:
    """
    The C{IPCTNL_MSG_CT_GET} request for the TCP connection that an
    accepted socket with address C{local} and peer C{peer} belongs to.

    The reply tuple runs from Shifter's side back to the client: its source
    is the local address, its destination the peer.  IPv4 peers of a
    dual-stack socket (C{::ffff:a.b.c.d}) are looked up as the IPv4
    connections they are.

    @raise ValueError: if the two addresses are not of one family.
    """
    localHost = unmapAddress(local.host.split("%", 1)[0])
    peerHost = unmapAddress(peer.host.split("%", 1)[0])
    family = _family(localHost)
    if _family(peerHost) != family:
        raise ValueError(f"local {localHost} and peer {peerHost} differ in family")
    prefix = _ADDRESS_ATTRS[family]
    message = nfct_msg()
    message["nfgen_family"] = family
    message["version"] = 0
    message["res_id"] = 0
    message["attrs"] = [
        [
            "CTA_TUPLE_REPLY",
            {
                "attrs": [
                    [
                        "CTA_TUPLE_IP",
                        {"attrs": [[prefix + "_SRC", localHost], [prefix + "_DST", peerHost]]},
                    ],
                    [
                        "CTA_TUPLE_PROTO",
                        {
                            "attrs": [
                                ["CTA_PROTO_NUM", socket.IPPROTO_TCP],
                                ["CTA_PROTO_SRC_PORT", local.port],
                                ["CTA_PROTO_DST_PORT", peer.port],
                            ]
                        },
                    ],
                ]
            },
        ]
    ]
    return message


def decodeOriginalDestination(reply: nfct_msg) -> Destination:
    """
    The destination of the original tuple in a ctnetlink entry.

    @raise ValueError: if the entry holds none, or not a TCP one.
    """
    # A nested attribute too short for its structure is left as bytes by
    # pyroute2: such an entry is as malformed as one without it.
    original = reply.get_attr("CTA_TUPLE_ORIG")
    if not isinstance(original, nla_base):
        raise ValueError("conntrack entry without an original tuple")
    ip = original.get_attr("CTA_TUPLE_IP")
    proto = original.get_attr("CTA_TUPLE_PROTO")
    if not isinstance(ip, nla_base) or not isinstance(proto, nla_base):
        raise ValueError("conntrack original tuple without addresses or ports")
    if proto.get_attr("CTA_PROTO_NUM") != socket.IPPROTO_TCP:
        raise ValueError(f"conntrack entry for protocol {proto.get_attr('CTA_PROTO_NUM')}, not TCP")
    port = proto.get_attr("CTA_PROTO_DST_PORT")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"conntrack original tuple with bad port {port!r}")
    v4 = ip.get_attr("CTA_IP_V4_DST")
    if v4 is not None:
        return IPv4Address("TCP", str(ipaddress.IPv4Address(v4)), port)
    v6 = ip.get_attr("CTA_IP_V6_DST")
    if v6 is not None:
        return IPv6Address("TCP", ipaddress.IPv6Address(v6).compressed, port)
    raise ValueError("conntrack original tuple without a destination address")


@implementer(IOriginalDestinationResolver)
class ConntrackResolver:
    """
    C{--resolver=conntrack}: the original destination from conntrack, over
    ctnetlink, for connections redirected by REDIRECT or DNAT rules.
    """

    name = "conntrack"
    log = Logger()

    # The start-up probe asks for a connection nobody has: an answer of
    # "no such entry" proves that ctnetlink is there and answers us.
    _PROBE = (IPv4Address("TCP", "0.0.0.0", 1), IPv4Address("TCP", "0.0.0.0", 1))

    def __init__(
        self, reactor: Optional[Any] = None, timeout: float = 2.0, maxInFlight: int = 64
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.timeout = timeout
        self.maxInFlight = maxInFlight
        self.protocol: Optional[NetlinkProtocol] = None

    def start(self) -> Deferred[None]:
        """
        Open a netfilter netlink socket and check that ctnetlink answers.

        @return: a C{Deferred} failing with L{ResolverUnavailable} when the
            socket cannot be opened, ctnetlink is missing (module
            C{nf_conntrack_netlink}) or refuses us (CAP_NET_ADMIN).
        """
        protocol = NetlinkProtocol(
            self.reactor,
            timeout=self.timeout,
            messageClasses={CT_GET: nfct_msg, CT_NEW: nfct_msg},
            maxInFlight=self.maxInFlight,
        )
        port = NetlinkPort(NETLINK_NETFILTER, protocol, reactor=self.reactor)
        try:
            port.startListening()
        except OSError as e:
            return fail(ResolverUnavailable(f"cannot open a netfilter netlink socket: {e}"))

        def answered(_: object) -> None:
            # Some entry matched the probe: ctnetlink works all the same.
            self.protocol = protocol

        def failed(reason: Failure) -> Optional[Failure]:
            if reason.check(NetlinkNotFound):
                self.protocol = protocol
                self.log.info("conntrack: ctnetlink answers")
                return None
            protocol.close()
            if reason.check(NetlinkError) and getattr(reason.value, "errno", None) == errno.EPERM:
                return Failure(ResolverUnavailable("ctnetlink refuses us: CAP_NET_ADMIN is needed"))
            if reason.check(NetlinkException):
                return Failure(ResolverUnavailable(f"ctnetlink does not answer: {reason.value}"))
            return reason

        return (
            protocol.request(encodeReplyQuery(*self._PROBE), CT_GET)
            .addCallbacks(answered, failed)
        )

    def stop(self) -> Deferred[None]:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.close()
        return succeed(None)

    def resolve(self, transport: ITCPTransport) -> Deferred[Destination]:
        if self.protocol is None:
            return fail(ResolverUnavailable("the conntrack resolver is not started"))
        local, peer = transport.getHost(), transport.getPeer()
        try:
            query = encodeReplyQuery(local, peer)
        except ValueError as e:
            return fail(ResolverError(f"cannot look up {peer!r}: {e}"))
        what = f"{unmapAddress(peer.host)} port {peer.port}"

        def found(replies: list[nfct_msg]) -> Destination:
            return decodeOriginalDestination(replies[0])

        def failed(reason: Failure) -> Failure:
            if reason.check(NetlinkNotFound):
                return Failure(DestinationUnknown(f"conntrack has no entry for {what}"))
            if reason.check(NetlinkTimeout):
                return Failure(ResolverError(f"ctnetlink did not answer for {what}"))
            if reason.check(NetlinkException, ValueError):
                return Failure(ResolverError(f"conntrack look-up of {what} failed: {reason.value}"))
            return reason

        return self.protocol.request(query, CT_GET).addCallback(found).addErrback(failed)
