"""
Tests for L{shifter.resolvers.kmod}: the module's messages, L{ShifterClient} and
C{--resolver=kmod} against a fake kernel.
"""

from __future__ import annotations

import errno
import io
import re
import socket
import struct
from pathlib import Path
from typing import Any

import yaml

from pyroute2.netlink import GENL_ID_CTRL, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.generic import ctrlmsg
from zope.interface.verify import verifyObject

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from shifter.resolvers import kmod
from shifter.resolvers.kmod import (
    SHIFTER_A_FAMILY,
    SHIFTER_A_IFINDEX,
    SHIFTER_A_LOCAL_ADDR,
    SHIFTER_A_LOCAL_PORT,
    SHIFTER_A_PORTS,
    SHIFTER_A_PORTS_PORT,
    SHIFTER_A_SRC_ADDR,
    SHIFTER_A_SRC_PORT,
    SHIFTER_CMD_DISABLE,
    SHIFTER_CMD_ENABLE,
    SHIFTER_CMD_GET,
    SHIFTER_CMD_GET_CONFIG,
    SHIFTER_CMD_SET_PORTS,
    SHIFTER_CMD_STATS,
    SHIFTER_GENL_VERSION,
    STAT_NAMES,
    AcceptedConnection,
    ConnectionKey,
    ModuleConfig,
    KernelModuleResolver,
    ShifterClient,
    decodeGetReply,
    encodeGet,
    shifter_msg,
)
from shifter.kernel.netlink import Header, NetlinkPort, decodeMessage, encodeMessage, encodeRequest
from shifter.resolvers.resolver import (
    DestinationUnknown,
    IOriginalDestinationResolver,
    ResolverError,
    ResolverUnavailable,
    makeResolver,
)
from tests.guest import spec as ynl
from tests.test_netlink import (
    FakeKernel,
    errorMessage,
    nlattr,
    pump,
)

FAMILY_ID = 0x1D
V4 = socket.AF_INET
V6 = socket.AF_INET6


def v4(host: str) -> bytes:
    return socket.inet_pton(V4, host)


def v6(host: str) -> bytes:
    return socket.inet_pton(V6, host)


Key = tuple[int, bytes, int, bytes, int]


class FakeShifterModule:
    """
    The generic netlink controller and the shifter family of a fake
    kernel: a table of connections (family, peer address and port, local
    address and port), counters and settings.
    """

    def __init__(self, loaded: bool = True) -> None:
        self.loaded = loaded
        self.version = SHIFTER_GENL_VERSION
        self.table: dict[Key, tuple[int, bytes, int]] = {}
        self.stats = {name: 0 for name in STAT_NAMES}
        self.enabled = True
        self.ifindex = 0
        self.ports = [443]
        # cmd -> errno to answer with instead
        self.errors: dict[int, int] = {}
        self.silent = False
        self.requests: list[shifter_msg] = []

    def __call__(self, header: Header, request: bytes) -> list[bytes]:
        if header.type == GENL_ID_CTRL:
            return self.controller(header, request)
        assert header.type == FAMILY_ID, header
        message = decodeMessage(request, shifter_msg)
        self.requests.append(message)
        if self.silent:
            return []
        cmd = message["cmd"]
        if cmd in self.errors:
            return [errorMessage(header.sequence, -self.errors[cmd], request=request)]
        if cmd == SHIFTER_CMD_GET:
            return self.get(header, message, request)
        reply = shifter_msg()
        reply["cmd"] = cmd
        reply["version"] = self.version
        if cmd == SHIFTER_CMD_STATS:
            reply["attrs"] = [
                [
                    "SHIFTER_A_STATS",
                    {"attrs": [["SHIFTER_STAT_" + n.upper(), v] for n, v in self.stats.items()]},
                ]
            ]
        elif cmd == SHIFTER_CMD_GET_CONFIG:
            reply["attrs"] = [
                ["SHIFTER_A_ENABLED", int(self.enabled)],
                ["SHIFTER_A_IFINDEX", self.ifindex],
                ["SHIFTER_A_PORTS", {"attrs": [["SHIFTER_A_PORTS_PORT", p] for p in self.ports]}],
            ]
        elif cmd in (SHIFTER_CMD_SET_PORTS, SHIFTER_CMD_ENABLE, SHIFTER_CMD_DISABLE):
            # As the kernel's strict validation: a nest needs NLA_F_NESTED.
            for kind, _ in walkAttributes(request):
                if kind & 0x7FFF == SHIFTER_A_PORTS and not kind & NLA_F_NESTED:
                    return [errorMessage(header.sequence, -errno.EINVAL, request=request,
                                         extack="NLA_F_NESTED is missing")]
            nest = message.get_attr("SHIFTER_A_PORTS")
            if nest is not None:
                self.ports = list(nest.get_attrs("SHIFTER_A_PORTS_PORT"))
            ifindex = message.get_attr("SHIFTER_A_IFINDEX")
            if ifindex is not None:
                self.ifindex = ifindex
            self.enabled = cmd != SHIFTER_CMD_DISABLE
            return [errorMessage(header.sequence, 0, request=request)]
        else:
            return [errorMessage(header.sequence, -errno.EOPNOTSUPP, request=request)]
        return [encodeMessage(reply, FAMILY_ID, 0, header.sequence)]

    def controller(self, header: Header, request: bytes) -> list[bytes]:
        query = decodeMessage(request, ctrlmsg)
        wanted = (query.get_attr("CTRL_ATTR_FAMILY_NAME"), query.get_attr("CTRL_ATTR_FAMILY_ID"))
        if not self.loaded or wanted not in (("shifter", None), (None, FAMILY_ID)):
            return [errorMessage(header.sequence, -errno.ENOENT, request=request)]
        reply = ctrlmsg()
        reply["cmd"] = 1  # CTRL_CMD_NEWFAMILY
        reply["version"] = 2
        reply["attrs"] = [
            ["CTRL_ATTR_FAMILY_ID", FAMILY_ID],
            ["CTRL_ATTR_FAMILY_NAME", "shifter"],
            ["CTRL_ATTR_VERSION", self.version],
        ]
        return [encodeMessage(reply, GENL_ID_CTRL, 0, header.sequence)]

    def get(self, header: Header, message: shifter_msg, request: bytes) -> list[bytes]:
        self.stats["lookups"] += 1
        key = (
            message.get_attr("SHIFTER_A_FAMILY"),
            message.get_attr("SHIFTER_A_SRC_ADDR"),
            message.get_attr("SHIFTER_A_SRC_PORT"),
            message.get_attr("SHIFTER_A_LOCAL_ADDR"),
            message.get_attr("SHIFTER_A_LOCAL_PORT"),
        )
        if key not in self.table:
            self.stats["misses"] += 1
            return [errorMessage(header.sequence, -errno.ENOENT, request=request)]
        self.stats["hits"] += 1
        family, address, port = self.table[key]
        reply = shifter_msg()
        reply["cmd"] = SHIFTER_CMD_GET
        reply["version"] = self.version
        reply["attrs"] = [
            ["SHIFTER_A_FAMILY", family],
            ["SHIFTER_A_SRC_ADDR", key[1]],
            ["SHIFTER_A_SRC_PORT", key[2]],
            ["SHIFTER_A_LOCAL_ADDR", key[3]],
            ["SHIFTER_A_LOCAL_PORT", key[4]],
            ["SHIFTER_A_DST_ADDR", address],
            ["SHIFTER_A_DST_PORT", port],
        ]
        return [encodeMessage(reply, FAMILY_ID, 0, header.sequence)]


def walkAttributes(request: bytes, offset: int = 20) -> list[tuple[int, bytes]]:
    """
    The top-level attributes of a generic netlink request, types with
    their flags.
    """
    found = []
    while offset + 4 <= len(request):
        length, kind = struct.unpack_from("=HH", request, offset)
        if length < 4:
            break
        found.append((kind, request[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return found


LOCAL_V4 = IPv4Address("TCP", "192.0.2.1", 12345)
LOCAL_V6 = IPv6Address("TCP", "2001:db8::1", 12345)


def accepted(peer: Any, local: Any = None) -> StringTransport:
    """
    A transport standing for a connection accepted from C{peer} on
    C{local} (Shifter's port, on an address of C{peer}'s family).
    """
    if local is None:
        local = LOCAL_V6 if isinstance(peer, IPv6Address) and not peer.host.startswith("::ffff:") else LOCAL_V4
        if isinstance(peer, IPv6Address) and peer.host.startswith("::ffff:"):
            local = IPv6Address("TCP", "::ffff:192.0.2.1", 12345)
    return StringTransport(hostAddress=local, peerAddress=peer)


def key(peer: str, port: int, local: str = "192.0.2.1", localPort: int = 12345) -> Key:
    family = V6 if ":" in peer else V4
    return (family, socket.inet_pton(family, peer), port, socket.inet_pton(family, local), localPort)


def conn(peer: str, port: int, local: str = "192.0.2.1", localPort: int = 12345) -> AcceptedConnection:
    family = V6 if ":" in peer else V4
    return AcceptedConnection(
        ConnectionKey(family, socket.inet_pton(family, peer), port),
        ConnectionKey(family, socket.inet_pton(family, local), localPort),
    )


class ConnectionKeyTests(SynchronousTestCase):
    """
    L{ConnectionKey.fromPeer}: what the module is asked for.
    """

    def test_ipv4(self) -> None:
        """
        An IPv4 peer is looked up as AF_INET with its 4-byte address.
        """
        key = ConnectionKey.fromPeer(IPv4Address("TCP", "10.1.2.3", 40000))
        self.assertEqual(key, ConnectionKey(V4, v4("10.1.2.3"), 40000))

    def test_ipv6(self) -> None:
        """
        An IPv6 peer is looked up as AF_INET6 with its 16-byte address.
        """
        key = ConnectionKey.fromPeer(IPv6Address("TCP", "2001:db8::7", 50000))
        self.assertEqual(key, ConnectionKey(V6, v6("2001:db8::7"), 50000))

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4 client accepted on a dual-stack socket (::ffff:a.b.c.d) sent
        an IPv4 SYN: it is looked up as AF_INET.
        """
        key = ConnectionKey.fromPeer(IPv6Address("TCP", "::ffff:192.0.2.9", 1234))
        self.assertEqual(key, ConnectionKey(V4, v4("192.0.2.9"), 1234))

    def test_scoped(self) -> None:
        """
        A link-local peer's scope is not part of its address.
        """
        key = ConnectionKey.fromPeer(IPv6Address("TCP", "fe80::1%eth0", 99))
        self.assertEqual(key, ConnectionKey(V6, v6("fe80::1"), 99))

    def test_notIP(self) -> None:
        """
        A peer that is no IP address cannot be looked up.
        """
        with self.assertRaises(ValueError):
            ConnectionKey.fromPeer(UNIXAddress("/tmp/x"))  # type: ignore[arg-type]

    def test_str(self) -> None:
        """
        A key reads as host:port, IPv6 hosts in brackets.
        """
        self.assertEqual(str(ConnectionKey(V4, v4("10.0.0.1"), 5)), "10.0.0.1:5")
        self.assertEqual(str(ConnectionKey(V6, v6("2001:db8::1"), 5)), "[2001:db8::1]:5")


class AcceptedConnectionTests(SynchronousTestCase):
    """
    L{AcceptedConnection}: the two ends of the accepted socket, what the
    module is asked for.
    """

    def test_fromTransport(self) -> None:
        """
        An accepted transport's connection is its peer and its own address.
        """
        connection = AcceptedConnection.fromTransport(
            accepted(IPv4Address("TCP", "10.0.0.2", 40000), IPv4Address("TCP", "10.0.0.1", 12345))
        )
        self.assertEqual(connection, conn("10.0.0.2", 40000, "10.0.0.1", 12345))
        self.assertEqual(connection.family, V4)

    def test_dualStack(self) -> None:
        """
        An IPv4 connection accepted on a dual-stack socket, both ends
        ::ffff:a.b.c.d, is an IPv4 connection.
        """
        connection = AcceptedConnection.fromAddresses(
            IPv6Address("TCP", "::ffff:10.0.0.2", 40000), IPv6Address("TCP", "::ffff:10.0.0.1", 12345)
        )
        self.assertEqual(connection, conn("10.0.0.2", 40000, "10.0.0.1", 12345))

    def test_mixedFamilies(self) -> None:
        """
        Ends of two families are no connection.
        """
        with self.assertRaises(ValueError):
            AcceptedConnection.fromAddresses(
                IPv4Address("TCP", "10.0.0.2", 1), IPv6Address("TCP", "2001:db8::1", 2)
            )

    def test_str(self) -> None:
        """
        A connection reads as its peer on its local address.
        """
        self.assertEqual(str(conn("10.0.0.2", 5, "10.0.0.1", 6)), "10.0.0.2:5 on 10.0.0.1:6")


class MessageTests(SynchronousTestCase):
    """
    The GET request and reply on the wire.
    """

    def test_encodeGetIPv4(self) -> None:
        """
        GET for an IPv4 connection carries the family (u8), the peer's
        4-byte address and port (u16, host order), then the local address
        and port, as the uapi header defines.
        """
        data = encodeRequest(encodeGet(conn("10.1.2.3", 40000)), FAMILY_ID, 0, 9)
        body = (
            struct.pack("=BBH", SHIFTER_CMD_GET, SHIFTER_GENL_VERSION, 0)
            + nlattr(SHIFTER_A_FAMILY, struct.pack("=B", V4))
            + nlattr(SHIFTER_A_SRC_ADDR, v4("10.1.2.3"))
            + nlattr(SHIFTER_A_SRC_PORT, struct.pack("=H", 40000))
            + nlattr(SHIFTER_A_LOCAL_ADDR, v4("192.0.2.1"))
            + nlattr(SHIFTER_A_LOCAL_PORT, struct.pack("=H", 12345))
        )
        header = struct.pack("=IHHII", 16 + len(body), FAMILY_ID, NLM_F_REQUEST, 9, 0)
        self.assertEqual(data, header + body)

    def test_encodeGetIPv6(self) -> None:
        """
        GET for an IPv6 connection carries AF_INET6 and 16-byte addresses.
        """
        data = encodeRequest(encodeGet(conn("2001:db8::7", 50000, "2001:db8::1", 8080)), FAMILY_ID, 0, 9)
        self.assertIn(nlattr(SHIFTER_A_FAMILY, struct.pack("=B", V6)), data)
        self.assertIn(nlattr(SHIFTER_A_SRC_ADDR, v6("2001:db8::7")), data)
        self.assertIn(nlattr(SHIFTER_A_SRC_PORT, struct.pack("=H", 50000)), data)
        self.assertIn(nlattr(SHIFTER_A_LOCAL_ADDR, v6("2001:db8::1")), data)
        self.assertIn(nlattr(SHIFTER_A_LOCAL_PORT, struct.pack("=H", 8080)), data)

    def test_encodeGetAgreesWithMirror(self) -> None:
        """
        The struct-built GET decodes, with the header's Python mirror
        L{shifter_msg}, to the same command and attributes.
        """
        data = encodeRequest(encodeGet(conn("2001:db8::7", 50000, "2001:db8::1", 8080)), FAMILY_ID, 0, 9)
        message = decodeMessage(data, shifter_msg)
        self.assertEqual((message["cmd"], message["version"]), (SHIFTER_CMD_GET, SHIFTER_GENL_VERSION))
        self.assertEqual(
            [(name, value) for name, value in message["attrs"]],
            [
                ("SHIFTER_A_FAMILY", V6),
                ("SHIFTER_A_SRC_ADDR", v6("2001:db8::7")),
                ("SHIFTER_A_SRC_PORT", 50000),
                ("SHIFTER_A_LOCAL_ADDR", v6("2001:db8::1")),
                ("SHIFTER_A_LOCAL_PORT", 8080),
            ],
        )

    def reply(self, *attrs: Any, cmd: int = SHIFTER_CMD_GET) -> bytes:
        """
        A GET reply encoded with the mirror L{shifter_msg}.
        """
        message = shifter_msg()
        message["cmd"] = cmd
        message["version"] = 1
        message["attrs"] = list(attrs)
        return encodeMessage(message, FAMILY_ID, 0, 1)

    def test_decodeIPv4(self) -> None:
        """
        An AF_INET reply decodes to a TCP L{IPv4Address}.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 443],
        )
        key = ConnectionKey(V4, v4("10.0.0.1"), 1)
        self.assertEqual(decodeGetReply(reply, key), IPv4Address("TCP", "203.0.113.7", 443))

    def test_decodeIPv6(self) -> None:
        """
        An AF_INET6 reply decodes to a TCP L{IPv6Address}.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V6],
            ["SHIFTER_A_DST_ADDR", v6("2001:db8::443")],
            ["SHIFTER_A_DST_PORT", 8443],
        )
        key = ConnectionKey(V6, v6("2001:db8::1"), 1)
        self.assertEqual(decodeGetReply(reply, key), IPv6Address("TCP", "2001:db8::443", 8443))

    def test_decodeFullReply(self) -> None:
        """
        A reply as the module sends it, echoing the source before the
        destination, decodes to the destination.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_SRC_ADDR", v4("10.0.0.1")],
            ["SHIFTER_A_SRC_PORT", 40000],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 443],
        )
        key = ConnectionKey(V4, v4("10.0.0.1"), 40000)
        self.assertEqual(decodeGetReply(reply, key), IPv4Address("TCP", "203.0.113.7", 443))

    def test_decodeFamilyFromKey(self) -> None:
        """
        A reply without SHIFTER_A_FAMILY is read in the family asked for.
        """
        reply = self.reply(["SHIFTER_A_DST_ADDR", v6("2001:db8::1")], ["SHIFTER_A_DST_PORT", 443])
        key = ConnectionKey(V6, v6("2001:db8::2"), 1)
        self.assertEqual(decodeGetReply(reply, key), IPv6Address("TCP", "2001:db8::1", 443))

    def test_decodeWrongCommand(self) -> None:
        """
        A reply of another command is rejected.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 443],
            cmd=SHIFTER_CMD_STATS,
        )
        with self.assertRaises(ValueError):
            decodeGetReply(reply, ConnectionKey(V4, v4("10.0.0.1"), 1))

    def test_decodeTruncated(self) -> None:
        """
        A reply cut inside an attribute, or inside its generic netlink
        header, is rejected with L{ValueError}.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 443],
        )
        key = ConnectionKey(V4, v4("10.0.0.1"), 1)
        # The last attribute is the port: 6 bytes and 2 of padding.
        for length in (18, len(reply) - 4, len(reply) - 7):
            with self.assertRaises(ValueError):
                decodeGetReply(reply[:length], key)

    def test_decodeBadPortSize(self) -> None:
        """
        A destination port attribute that is not two bytes is rejected.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
        ) + nlattr(5, b"\1\2\3\4")
        reply = struct.pack("=I", len(reply)) + reply[4:]
        with self.assertRaises(ValueError):
            decodeGetReply(reply, ConnectionKey(V4, v4("10.0.0.1"), 1))

    def test_decodeMissingAddress(self) -> None:
        """
        A reply without a destination address is rejected.
        """
        reply = self.reply(["SHIFTER_A_FAMILY", V4], ["SHIFTER_A_DST_PORT", 443])
        with self.assertRaises(ValueError):
            decodeGetReply(reply, ConnectionKey(V4, v4("10.0.0.1"), 1))

    def test_decodeWrongLength(self) -> None:
        """
        A destination address of the wrong length for its family is
        rejected.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V6],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 443],
        )
        with self.assertRaises(ValueError):
            decodeGetReply(reply, ConnectionKey(V6, v6("::1"), 1))

    def test_decodeBadPort(self) -> None:
        """
        A destination port of 0 is rejected.
        """
        reply = self.reply(
            ["SHIFTER_A_FAMILY", V4],
            ["SHIFTER_A_DST_ADDR", v4("203.0.113.7")],
            ["SHIFTER_A_DST_PORT", 0],
        )
        with self.assertRaises(ValueError):
            decodeGetReply(reply, ConnectionKey(V4, v4("10.0.0.1"), 1))


class FakeKernelCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.module = FakeShifterModule()
        self.kernel = FakeKernel(self.module)
        self.patch(NetlinkPort, "_socketFactory", self.kernel.socket)
        self.reactor = MemoryReactorClock()

    def settle(self, d: Deferred[Any]) -> Deferred[Any]:
        pump(self.reactor)
        return d


class ResolverTests(FakeKernelCase):
    """
    L{KernelModuleResolver} against a fake kernel with a fake module.
    """

    def started(self, **kwargs: Any) -> KernelModuleResolver:
        resolver = KernelModuleResolver(reactor=self.reactor, **kwargs)
        self.successResultOf(self.settle(resolver.start()))
        return resolver

    def test_interface(self) -> None:
        """
        The resolver provides L{IOriginalDestinationResolver} under the name
        "kmod", and the registry builds it from that name.
        """
        resolver = makeResolver("kmod", reactor=self.reactor)
        self.assertIsInstance(resolver, KernelModuleResolver)
        self.assertTrue(verifyObject(IOriginalDestinationResolver, resolver))
        self.assertEqual(resolver.name, "kmod")

    def test_startFindsFamily(self) -> None:
        """
        Starting opens a generic netlink socket, resolves the "shifter"
        family and its version, and checks that the module records in this
        namespace (GET_CONFIG) and answers (STATS).
        """
        resolver = self.started()
        (sock,) = self.kernel.sockets
        self.assertEqual(sock.proto, 16)
        self.assertEqual([h.type for h, _ in self.kernel.requests[:2]], [GENL_ID_CTRL, GENL_ID_CTRL])
        self.assertEqual([m["cmd"] for m in self.module.requests], [SHIFTER_CMD_GET_CONFIG, SHIFTER_CMD_STATS])
        self.assertIsNotNone(resolver.client)
        self.assertEqual(resolver.client.version, SHIFTER_GENL_VERSION)  # type: ignore[union-attr]

    def test_oldModule(self) -> None:
        """
        A version 1 module, which answered by the client's address alone,
        is refused with L{ResolverUnavailable} saying so.
        """
        self.module.version = 1
        resolver = KernelModuleResolver(reactor=self.reactor)
        failure = self.failureResultOf(self.settle(resolver.start()), ResolverUnavailable)
        self.assertIn("version 1", str(failure.value))
        self.assertTrue(self.kernel.sockets[0].closed)

    def test_notEnabled(self) -> None:
        """
        A module that does not record in this namespace makes starting fail
        with L{ResolverUnavailable} saying how to enable it.
        """
        self.module.enabled = False
        resolver = KernelModuleResolver(reactor=self.reactor)
        failure = self.failureResultOf(self.settle(resolver.start()), ResolverUnavailable)
        self.assertIn("not enabled in this network namespace", str(failure.value))
        self.assertIn("python -m shifter.kmod enable", str(failure.value))
        self.assertTrue(self.kernel.sockets[0].closed)

    def test_moduleNotLoaded(self) -> None:
        """
        Without the family, starting fails with L{ResolverUnavailable}
        saying the module is not loaded, and the socket is closed.
        """
        self.module.loaded = False
        resolver = KernelModuleResolver(reactor=self.reactor)
        failure = self.failureResultOf(self.settle(resolver.start()), ResolverUnavailable)
        self.assertTrue(str(failure.value).startswith("module shifter not loaded: "), str(failure.value))
        self.assertIn("'shifter' not found", str(failure.value))
        self.assertTrue(self.kernel.sockets[0].closed)

    def test_notPermitted(self) -> None:
        """
        A module that refuses this process (no CAP_NET_ADMIN) makes starting
        fail with L{ResolverUnavailable} giving the reason.
        """
        self.module.errors[SHIFTER_CMD_GET_CONFIG] = errno.EPERM
        resolver = KernelModuleResolver(reactor=self.reactor)
        failure = self.failureResultOf(self.settle(resolver.start()), ResolverUnavailable)
        self.assertIn("EPERM", str(failure.value))
        self.assertTrue(self.kernel.sockets[0].closed)

    def test_noSocket(self) -> None:
        """
        When no netlink socket can be opened, starting fails with
        L{ResolverUnavailable}.
        """

        def refuse(*args: int) -> Any:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

        self.patch(NetlinkPort, "_socketFactory", refuse)
        resolver = KernelModuleResolver(reactor=self.reactor)
        failure = self.failureResultOf(resolver.start(), ResolverUnavailable)
        self.assertIn("cannot open a generic netlink socket", str(failure.value))

    def test_resolveIPv4(self) -> None:
        """
        An IPv4 connection the module recorded resolves to its original
        destination; the request named the peer's address and port and
        the accepting socket's.
        """
        self.module.table[key("10.0.0.2", 40001)] = (V4, v4("203.0.113.7"), 443)
        resolver = self.started()
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 40001)))
        self.assertEqual(self.successResultOf(self.settle(d)), IPv4Address("TCP", "203.0.113.7", 443))
        get = self.module.requests[-1]
        self.assertEqual(get["cmd"], SHIFTER_CMD_GET)
        self.assertEqual(get.get_attr("SHIFTER_A_SRC_ADDR"), v4("10.0.0.2"))
        self.assertEqual(get.get_attr("SHIFTER_A_LOCAL_ADDR"), v4("192.0.2.1"))
        self.assertEqual(get.get_attr("SHIFTER_A_LOCAL_PORT"), 12345)

    def test_resolveIPv6(self) -> None:
        """
        An IPv6 connection resolves to an L{IPv6Address}.
        """
        self.module.table[key("2001:db8::2", 40002, "2001:db8::1")] = (V6, v6("2001:db8::443"), 443)
        resolver = self.started()
        d = resolver.resolve(accepted(IPv6Address("TCP", "2001:db8::2", 40002)))
        self.assertEqual(self.successResultOf(self.settle(d)), IPv6Address("TCP", "2001:db8::443", 443))

    def test_resolveIPv4Mapped(self) -> None:
        """
        An IPv4 client accepted on a dual-stack socket is asked for as
        AF_INET and resolves to an L{IPv4Address}.
        """
        self.module.table[key("10.0.0.3", 40003)] = (V4, v4("198.51.100.1"), 443)
        resolver = self.started()
        d = resolver.resolve(accepted(IPv6Address("TCP", "::ffff:10.0.0.3", 40003)))
        self.assertEqual(self.successResultOf(self.settle(d)), IPv4Address("TCP", "198.51.100.1", 443))
        self.assertEqual(self.module.requests[-1].get_attr("SHIFTER_A_FAMILY"), V4)

    def test_unknown(self) -> None:
        """
        A connection the module has no record of (-ENOENT) fails with
        L{DestinationUnknown} naming it.
        """
        resolver = self.started()
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.9", 1)))
        failure = self.failureResultOf(self.settle(d), DestinationUnknown)
        self.assertIn("10.0.0.9:1 on 192.0.2.1:12345", str(failure.value))

    def test_otherError(self) -> None:
        """
        Any other error answer fails with L{ResolverError}, not
        L{DestinationUnknown}.
        """
        resolver = self.started()
        self.module.errors[SHIFTER_CMD_GET] = errno.EINVAL
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.9", 1)))
        failure = self.failureResultOf(self.settle(d), ResolverError)
        self.assertNotIsInstance(failure.value, DestinationUnknown)
        self.assertIn("EINVAL", str(failure.value))

    def test_timeout(self) -> None:
        """
        A look-up the module never answers fails with L{ResolverError} after
        the resolver's timeout.
        """
        resolver = self.started(timeout=0.5)
        self.module.silent = True
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.9", 1)))
        self.settle(d)
        self.assertNoResult(d)
        self.reactor.advance(0.5)
        failure = self.failureResultOf(d, ResolverError)
        self.assertNotIsInstance(failure.value, DestinationUnknown)
        self.assertIn("did not answer", str(failure.value))

    def test_malformedAnswer(self) -> None:
        """
        A reply without a usable destination fails with L{ResolverError}.
        """
        self.module.table[key("10.0.0.2", 40001)] = (V4, b"\1\2", 443)
        resolver = self.started()
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 40001)))
        failure = self.failureResultOf(self.settle(d), ResolverError)
        self.assertIn("bad destination address", str(failure.value))

    def test_notIP(self) -> None:
        """
        A connection whose peer is no IP address fails with
        L{ResolverError} without asking the module.
        """
        resolver = self.started()
        before = len(self.module.requests)
        d = resolver.resolve(accepted(UNIXAddress("/tmp/sock")))
        self.failureResultOf(d, ResolverError)
        self.assertEqual(len(self.module.requests), before)

    def test_notStarted(self) -> None:
        """
        Resolving before starting fails with L{ResolverUnavailable}.
        """
        resolver = KernelModuleResolver(reactor=self.reactor)
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 1)))
        self.failureResultOf(d, ResolverUnavailable)

    def test_stop(self) -> None:
        """
        Stopping closes the socket; a look-up still waiting fails with
        L{ResolverError}, and later ones with L{ResolverUnavailable}.
        """
        resolver = self.started()
        self.module.silent = True
        d = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 1)))
        self.successResultOf(resolver.stop())
        self.assertTrue(self.kernel.sockets[0].closed)
        self.failureResultOf(d, ResolverError)
        later = resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 1)))
        self.failureResultOf(later, ResolverUnavailable)
        self.assertEqual(self.reactor.getReaders(), [])

    def test_manyInFlight(self) -> None:
        """
        Many look-ups at once each get their own connection's destination.
        """
        for i in range(200):
            self.module.table[key("10.0.0.2", 10000 + i)] = (V4, v4("203.0.113.7"), 1000 + i)
        resolver = self.started()
        ds = [
            resolver.resolve(accepted(IPv4Address("TCP", "10.0.0.2", 10000 + i)))
            for i in range(200)
        ]
        self.settle(ds[0])
        self.assertEqual(
            [self.successResultOf(d).port for d in ds], [1000 + i for i in range(200)]
        )


class ClientTests(FakeKernelCase):
    """
    L{ShifterClient}'s STATS and port commands, and C{python -m shifter.kmod}.
    """

    def client(self) -> ShifterClient:
        return self.successResultOf(self.settle(ShifterClient.connect(self.reactor)))

    def test_stats(self) -> None:
        """
        STATS decodes to every counter by name.
        """
        self.module.stats.update(entries=3, inserts=10, lookups=7, hits=5, misses=2, expiries=4, gone=1, full=6,
                                 ambiguous=8, skipped=9, evicted_gone=11, evicted_answered=12,
                                 evicted_early=13, evicted_oldest=14)
        stats = self.successResultOf(self.settle(self.client().stats()))
        self.assertEqual(stats, dict(self.module.stats))
        self.assertEqual(
            list(stats),
            ["entries", "inserts", "lookups", "hits", "misses", "expiries", "gone", "full", "ambiguous",
             "skipped", "evicted_gone", "evicted_answered", "evicted_early", "evicted_oldest"],
        )

    def test_version(self) -> None:
        """
        The client knows the family's version from the controller.
        """
        self.module.version = 7
        self.assertEqual(self.client().version, 7)

    def test_getConfig(self) -> None:
        """
        GET_CONFIG decodes to whether the namespace records, its interface
        and its ports.
        """
        self.module.enabled, self.module.ifindex, self.module.ports = False, 3, [443, 8443]
        self.assertEqual(
            self.successResultOf(self.settle(self.client().getConfig())),
            ModuleConfig(False, 3, (443, 8443)),
        )

    def test_getPorts(self) -> None:
        """
        The ports are those of GET_CONFIG.
        """
        self.module.ports = [443, 8443]
        self.assertEqual(self.successResultOf(self.settle(self.client().getPorts())), [443, 8443])

    def test_enable(self) -> None:
        """
        ENABLE carries the ports in a nest and the interface index, and
        waits for the acknowledgement.
        """
        self.module.enabled = False
        client = self.client()
        d = client.enable([80, 443], ifindex=4)
        header, request = self.kernel.requests[-1]
        self.assertTrue(header.flags & NLM_F_ACK)
        self.assertIsNone(self.successResultOf(self.settle(d)))
        self.assertEqual((self.module.enabled, self.module.ifindex, self.module.ports), (True, 4, [80, 443]))
        self.assertIn(nlattr(SHIFTER_A_IFINDEX, struct.pack("=I", 4)), request)

    def test_enableAsIs(self) -> None:
        """
        ENABLE without ports or interface carries no attribute.
        """
        client = self.client()
        self.successResultOf(self.settle(client.enable()))
        _, request = self.kernel.requests[-1]
        self.assertEqual(request[16:], struct.pack("=BBH", SHIFTER_CMD_ENABLE, SHIFTER_GENL_VERSION, 0))

    def test_disable(self) -> None:
        """
        DISABLE carries no attribute and is acknowledged.
        """
        client = self.client()
        self.successResultOf(self.settle(client.disable()))
        _, request = self.kernel.requests[-1]
        self.assertEqual(request[16:], struct.pack("=BBH", SHIFTER_CMD_DISABLE, SHIFTER_GENL_VERSION, 0))
        self.assertFalse(self.module.enabled)

    def test_setPorts(self) -> None:
        """
        SET_PORTS sends the ports in a nest and waits for the kernel's
        acknowledgement.
        """
        client = self.client()
        d = client.setPorts([80, 443])
        header, _ = self.kernel.requests[-1]
        self.assertTrue(header.flags & NLM_F_ACK)
        self.assertIsNone(self.successResultOf(self.settle(d)))
        self.assertEqual(self.module.ports, [80, 443])

    def test_setPortsEncoding(self) -> None:
        """
        SET_PORTS carries SHIFTER_A_PORTS flagged NLA_F_NESTED (strict
        validation requires it) holding one u16 attribute per port.
        """
        self.client().setPorts([80, 443])
        _, request = self.kernel.requests[-1]
        ports = nlattr(SHIFTER_A_PORTS_PORT, struct.pack("=H", 80)) + nlattr(
            SHIFTER_A_PORTS_PORT, struct.pack("=H", 443)
        )
        nest = struct.pack("=HH", 4 + len(ports), NLA_F_NESTED | SHIFTER_A_PORTS) + ports
        self.assertEqual(request[16:], struct.pack("=BBH", SHIFTER_CMD_SET_PORTS, SHIFTER_GENL_VERSION, 0) + nest)

    def test_setPortsRefused(self) -> None:
        """
        A refused SET_PORTS fails with the kernel's error.
        """
        self.module.errors[SHIFTER_CMD_SET_PORTS] = errno.EINVAL
        from shifter.kernel.netlink import NetlinkError

        d = self.client().setPorts([0])
        self.assertEqual(self.failureResultOf(self.settle(d), NetlinkError).value.errno, errno.EINVAL)

    def command(self, *argv: str) -> str:
        """
        Run the command's body in the memory reactor; return its output.
        """
        out = io.StringIO()
        options = kmod._parser().parse_args(argv)
        d = Deferred.fromCoroutine(kmod._run(self.reactor, options, out))
        pump(self.reactor)
        self.successResultOf(d)
        return out.getvalue()

    def test_commandStats(self) -> None:
        """
        C{stats} prints one "name: value" line per counter.
        """
        self.module.stats.update(entries=2, hits=9)
        output = self.command("stats")
        self.assertEqual(output, "".join(f"{n}: {self.module.stats[n]}\n" for n in STAT_NAMES))
        self.assertIn("hits: 9\n", output)

    def test_commandSetPorts(self) -> None:
        """
        C{set-ports} replaces the ports and prints the new list.
        """
        self.assertEqual(self.command("set-ports", "443", "8443"), "443 8443\n")
        self.assertEqual(self.module.ports, [443, 8443])

    def test_commandEnable(self) -> None:
        """
        C{enable --ports --interface} enables with those settings and
        prints the namespace's status.
        """
        self.module.enabled = False
        output = self.command("enable", "--ports", "443,8443", "--interface", "lo")
        self.assertEqual((self.module.enabled, self.module.ports), (True, [443, 8443]))
        self.assertEqual(self.module.ifindex, socket.if_nametoindex("lo"))
        self.assertEqual(output, "enabled; interface lo; ports 443 8443\n")

    def test_statusInterfaceRemoved(self) -> None:
        """
        C{status} says so when the interface the namespace named was
        removed, and it records on none.
        """
        self.module.ifindex = 0xFFFFFFFF
        self.assertEqual(
            self.command("status"),
            "enabled; interface none (the interface named was removed); ports 443\n",
        )

    def test_commandDisable(self) -> None:
        """
        C{disable} disables and prints the status.
        """
        self.assertEqual(self.command("disable"), "disabled; interface any; ports 443\n")
        self.assertFalse(self.module.enabled)

    def test_commandClosesSocket(self) -> None:
        """
        The command closes its socket when done.
        """
        self.command("ports")
        self.assertTrue(self.kernel.sockets[0].closed)


class CommandLineTests(SynchronousTestCase):
    """
    C{python -m shifter.kmod} as a real process.
    """

    def test_moduleNotLoaded(self) -> None:
        """
        Without the module, the command exits 1 and says the module is not
        loaded.
        """
        import os
        import subprocess
        import sys
        from pathlib import Path

        if Path("/sys/module/shifter").exists():
            raise SkipTest("the shifter module is loaded on this host")
        project = str(Path(__file__).resolve().parent.parent)
        result = subprocess.run(
            [sys.executable, "-m", "shifter.kmod", "stats"],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, PYTHONPATH=project),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertIn("module shifter not loaded", result.stderr)


HEADER_PATH = Path(__file__).resolve().parent.parent / "kernel_module" / "include" / "uapi" / "linux" / "shifter.h"

# YNL attribute types -> pyroute2 nla_map types of the codec.
_NLA_TYPES = {"u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
              "binary": "cdata", "pad": "none"}


def headerEnum(name: str) -> list[str]:
    """
    The members of a C enum in the uapi header, in order, without the
    UNSPEC first and the __MAX last.
    """
    text = HEADER_PATH.read_text()
    match = re.search(r"enum %s \{(.*?)\};" % name, text, re.S)
    assert match, f"no enum {name} in {HEADER_PATH}"
    members = [m.group(1) for m in re.finditer(r"^\s*(\w+)", match.group(1), re.M)]
    assert members[0].endswith("_UNSPEC") and members[-1].startswith("__"), members
    return members[1:-1]


class SpecTests(SynchronousTestCase):
    """
    The family's YNL spec is what the uapi header and the Python codec
    implement: names, numbers, types, and what each request carries.
    """

    def setUp(self) -> None:
        self.spec = ynl.loadSpec()

    def test_header(self) -> None:
        """
        The uapi header's enums list the spec's commands and attributes by
        the names YNL gives them, in the spec's order, and its family name
        is the spec's.
        """
        self.assertEqual(headerEnum("shifter_cmd"), list(ynl.operations(self.spec)))
        for setName, enum in (("shifter", "shifter_attr"), ("ports", "shifter_ports_attr"),
                              ("stats", "shifter_stat")):
            self.assertEqual(headerEnum(enum), list(ynl.attributes(self.spec, setName)), setName)
        self.assertIn(f'#define SHIFTER_GENL_NAME\t"{self.spec["name"]}"', HEADER_PATH.read_text())
        self.assertIn(f"#define SHIFTER_MAX_PORTS\t{kmod.SHIFTER_MAX_PORTS}", HEADER_PATH.read_text())

    def test_constants(self) -> None:
        """
        Every SHIFTER_CMD_, SHIFTER_A_ and SHIFTER_STAT_ constant of the
        codec has the spec's value, and the codec has one for each of the
        spec's.
        """
        expected = {name: value for name, (value, _) in ynl.operations(self.spec).items()}
        for setName in ("shifter", "ports", "stats"):
            expected.update(
                (name, value) for name, (value, _) in ynl.attributes(self.spec, setName).items()
            )
        actual = {
            name: getattr(kmod, name) for name in dir(kmod)
            if re.fullmatch(r"SHIFTER_(CMD|A|STAT)_\w+", name) and not name.endswith("_UNSPEC")
        }
        self.assertEqual(actual, expected)
        self.assertEqual(self.spec["definitions"][0]["value"], kmod.SHIFTER_MAX_PORTS)

    def test_types(self) -> None:
        """
        The codec decodes each attribute as the spec types it: integers of
        the spec's width, binary as bytes, nests with the spec's attribute
        set.
        """
        nests = {"stats": shifter_msg.stats, "ports": shifter_msg.ports}
        for setName, messageClass in (("shifter", shifter_msg), ("stats", shifter_msg.stats),
                                      ("ports", shifter_msg.ports)):
            nlaMap = {name: kind for name, kind in messageClass.nla_map}
            for name, (value, attr) in ynl.attributes(self.spec, setName).items():
                self.assertEqual(messageClass.nla_map[value][0], name)
                if attr["type"] == "nest":
                    self.assertIs(getattr(shifter_msg, nlaMap[name]), nests[attr["nested-attributes"]])
                else:
                    self.assertEqual(nlaMap[name], _NLA_TYPES[attr["type"]], name)

    def requestsOf(self, call: Any) -> list[tuple[int, list[str]]]:
        """
        The commands and top-level attribute names that C{call(client)}
        sent to a fake module.
        """
        module = FakeShifterModule()
        kernel = FakeKernel(module)
        self.patch(NetlinkPort, "_socketFactory", kernel.socket)
        reactor = MemoryReactorClock()
        d = ShifterClient.connect(reactor)
        pump(reactor)
        client = self.successResultOf(d)
        d = call(client)
        pump(reactor)
        self.successResultOf(d)
        return [(m["cmd"], [name for name, _ in m["attrs"]]) for m in module.requests]

    def test_requests(self) -> None:
        """
        Each request the client sends carries attributes its operation's
        spec lists, and GET all of them.
        """
        ops = ynl.operations(self.spec)
        names = {value: name for name, (value, _) in ops.items()}
        calls = [
            lambda c: c.get(conn("10.0.0.2", 1)).addErrback(lambda f: f.trap(Exception)),
            lambda c: c.stats(),
            lambda c: c.getConfig(),
            lambda c: c.setPorts([443]),
            lambda c: c.enable([443], ifindex=1),
            lambda c: c.enable(),
            lambda c: c.disable(),
        ]
        seen = set()
        for call in calls:
            for cmd, attrs in self.requestsOf(call):
                allowed = ynl.requestAttributes(self.spec, names[cmd])
                self.assertLessEqual(set(attrs), set(allowed), names[cmd])
                if cmd == SHIFTER_CMD_GET:
                    self.assertEqual(attrs, allowed)
                seen.add(names[cmd])
        self.assertEqual(seen, set(ops))

    def test_versionsInStep(self) -> None:
        """
        The module's MODULE_VERSION and dkms.conf's PACKAGE_VERSION are the
        Python package's version.
        """
        import shifter

        moduleDir = HEADER_PATH.parents[3]
        main = (moduleDir / "shifter_main.c").read_text()
        dkms = (moduleDir / "dkms.conf").read_text()
        self.assertEqual(re.findall(r'MODULE_VERSION\("([^"]+)"\)', main), [shifter.__version__])
        self.assertEqual(re.findall(r'^PACKAGE_VERSION="([^"]+)"', dkms, re.M), [shifter.__version__])
        self.assertEqual(set(re.findall(r"shifter[-/](\d[\w.]*)", dkms)), {shifter.__version__})

    def test_kernelSchema(self) -> None:
        """
        The spec passes the kernel's own schema for its protocol
        (C{genetlink-legacy}, the one that can state a version and the
        C{uns-admin-perm} flag), read by the kernel's own YNL spec reader,
        and that reader numbers operations and attributes as the header and
        the codec do.
        """
        from jsonschema.exceptions import ValidationError

        from tests import kernelsource

        self.assertEqual(self.spec["protocol"], "genetlink-legacy")
        nlspec = kernelsource.nlspec()
        try:
            family = nlspec.SpecFamily(ynl.SPEC_PATH, kernelsource.schemaPath(self.spec["protocol"]))
        except ValidationError as e:
            self.fail(f"the spec fails the kernel's schema: {e.message} at {list(e.absolute_path)}")
        opPrefix = self.spec["operations"]["name-prefix"]
        self.assertEqual(
            {ynl.cName(opPrefix, name): op.req_value for name, op in family.ops.items()},
            {name: value for name, (value, _) in ynl.operations(self.spec).items()},
        )
        for setName in ("shifter", "ports", "stats"):
            prefix = ynl.attributeSet(self.spec, setName)["name-prefix"]
            self.assertEqual(
                {ynl.cName(prefix, name): attr.value
                 for name, attr in family.attr_sets[setName].attrs.items()},
                {name: value for name, (value, _) in ynl.attributes(self.spec, setName).items()},
            )

    def test_kernelSchemaRefusesOldForm(self) -> None:
        """
        The kernel's schema is strict enough to matter: the spec in the
        plain C{genetlink} form (which has no C{uns-admin-perm} nor a
        version) fails it.
        """
        from jsonschema.exceptions import ValidationError

        from tests import kernelsource

        spec = dict(self.spec, protocol="genetlink")
        for key in ("c-family-name", "c-version-name", "version", "kernel-policy"):
            spec.pop(key)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(open(ynl.SPEC_PATH).readline())  # the SPDX line the reader requires
            yaml.safe_dump(spec, f)
        nlspec = kernelsource.nlspec()
        self.assertRaises(ValidationError, nlspec.SpecFamily, path, kernelsource.schemaPath("genetlink"))

    def test_versionDefines(self) -> None:
        """
        The spec names the header's family-name and version defines, and
        its version is the header's and the codec's.
        """
        header = HEADER_PATH.read_text()
        self.assertIn(f"#define {ynl.cName('', self.spec['c-family-name'])}\t\"{self.spec['name']}\"",
                      header)
        self.assertIn(f"#define {ynl.cName('', self.spec['c-version-name'])}\t{self.spec['version']}",
                      header)
        self.assertEqual(self.spec["version"], kmod.SHIFTER_GENL_VERSION)

    def test_adminOnly(self) -> None:
        """
        Every operation is for the namespace's admins only.
        """
        for name, (_, op) in ynl.operations(self.spec).items():
            self.assertEqual(op["flags"], ["uns-admin-perm"], name)


class AutoTests(FakeKernelCase):
    """
    C{--resolver auto} prefers sockopt to the module, and says why; asked
    to try the module first, it takes it only when it is exact: a module
    of version 2 or later that records in this namespace.
    """

    def chosen(self, candidates: tuple[str, ...] | None = None) -> str:
        from shifter.resolvers.auto import AutoResolver

        if candidates is None:
            resolver = AutoResolver(reactor=self.reactor)
        else:
            resolver = AutoResolver(reactor=self.reactor, candidates=candidates)
        self.successResultOf(self.settle(resolver.start()))
        self.addCleanup(resolver.stop)
        return resolver.name

    def test_sockoptPreferred(self) -> None:
        """
        Even with an exact module that records here, sockopt is chosen,
        and the start-up log says why the module was not tried.
        """
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertEqual(self.chosen(), "auto: sockopt")
        lines = [formatEvent(event) for event in logged]
        self.assertTrue(
            any("resolver auto chose sockopt" in line and "kmod: not tried" in line for line in lines),
            lines,
        )
        self.assertEqual(self.module.requests, [])

    def test_exactModule(self) -> None:
        """
        Asked to try the module first, an exact module that records here
        is chosen.
        """
        self.assertEqual(self.chosen(("kmod", "sockopt")), "auto: kmod")

    def test_oldModule(self) -> None:
        """
        A version 1 module, keyed on the client's address alone, is passed
        over for sockopt.
        """
        self.module.version = 1
        self.assertEqual(self.chosen(("kmod", "sockopt")), "auto: sockopt")

    def test_notEnabled(self) -> None:
        """
        A module that does not record in this namespace is passed over for
        sockopt.
        """
        self.module.enabled = False
        self.assertEqual(self.chosen(("kmod", "sockopt")), "auto: sockopt")
