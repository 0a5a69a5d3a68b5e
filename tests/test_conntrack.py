"""
Tests for the C{conntrack} resolver: the ctnetlink codec on bytes the
kernel sent, and the resolver against a fake kernel.
"""

from __future__ import annotations

import errno
import socket

from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from shifter.resolvers.conntrack import (
    CT_GET,
    CT_NEW,
    ConntrackResolver,
    decodeOriginalDestination,
    encodeReplyQuery,
)
from shifter.kernel.netlink import NetlinkPort, decodeMessage, encodeMessage, splitMessages
from shifter.resolvers.resolver import DestinationUnknown, ResolverError, ResolverUnavailable
from tests.test_netlink import FakeKernel, errorMessage

# ctnetlink answers captured from a 6.x kernel for connections REDIRECTed
# (nat OUTPUT) to port 12345: 127.0.0.1:44842 -> 127.0.0.2:443 and
# [::1]:55614 -> [::1]:443.
CAPTURED_REPLY_V4 = bytes.fromhex(
    "d4000000000102000dd6815c9a9187e5020000003400018014000180080001007f000001080002007f000002"
    "1c000280050001000600000006000200af2a00000600030001bb00003400028014000180080001007f000001"
    "080002007f0000011c0002800500010006000000060002003039000006000300af2a000008000300000001ae"
    "080008000000000008000c003853420f08000b0000000002080007000006977f300004802c00018005000100"
    "03000000050002000a000000050003000a00000006000400230000000600050023000000"
)
CAPTURED_REPLY_V6 = bytes.fromhex(
    "04010000000102000ed6815c9a9187e50a0000004c0001802c00018014000300000000000000000000000000"
    "0000000114000400000000000000000000000000000000011c000280050001000600000006000200d93e0000"
    "0600030001bb00004c0002802c00018014000300000000000000000000000000000000011400040000000000"
    "0000000000000000000000011c0002800500010006000000060002003039000006000300d93e000008000300"
    "000001ae080008000000000008000c00533bfdfd08000b0000000002080007000006977f300004802c000180"
    "0500010003000000050002000a000000050003000a00000006000400230000000600050023000000"
)


class CodecTests(SynchronousTestCase):
    def test_capturedIPv4(self) -> None:
        """
        The original destination of a captured IPv4 entry is the address
        and port the client sent its SYN to.
        """
        ((header, message),) = list(splitMessages(CAPTURED_REPLY_V4))
        self.assertEqual(header.type, CT_NEW)
        reply = decodeMessage(message, nfct_msg)
        self.assertEqual(decodeOriginalDestination(reply), IPv4Address("TCP", "127.0.0.2", 443))

    def test_capturedIPv6(self) -> None:
        """
        The same for a captured IPv6 entry.
        """
        reply = decodeMessage(CAPTURED_REPLY_V6, nfct_msg)
        self.assertEqual(decodeOriginalDestination(reply), IPv6Address("TCP", "::1", 443))

    def test_queryIsReplyTuple(self) -> None:
        """
        The query's reply tuple runs from Shifter's address and port to the
        client's, as TCP.
        """
        message = encodeReplyQuery(IPv4Address("TCP", "192.0.2.1", 12345), IPv4Address("TCP", "192.0.2.2", 40000))
        data = encodeMessage(message, CT_GET, 1, 7)
        decoded = decodeMessage(data, nfct_msg)
        self.assertEqual(decoded["nfgen_family"], socket.AF_INET)
        tuple_ = decoded.get_attr("CTA_TUPLE_REPLY")
        ip, proto = tuple_.get_attr("CTA_TUPLE_IP"), tuple_.get_attr("CTA_TUPLE_PROTO")
        self.assertEqual((ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")), ("192.0.2.1", "192.0.2.2"))
        self.assertEqual(
            (proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT")),
            (6, 12345, 40000),
        )
        self.assertIsNone(decoded.get_attr("CTA_TUPLE_ORIG"))

    def test_queryDualStackIsIPv4(self) -> None:
        """
        IPv4-mapped addresses from a dual-stack socket are queried as IPv4.
        """
        message = encodeReplyQuery(IPv6Address("TCP", "::ffff:192.0.2.1", 12345),
                                   IPv6Address("TCP", "::ffff:192.0.2.2", 40000))
        self.assertEqual(message["nfgen_family"], socket.AF_INET)

    def test_queryIPv6(self) -> None:
        """
        IPv6 connections are queried with IPv6 addresses.
        """
        message = encodeReplyQuery(IPv6Address("TCP", "2001:db8:1::1", 12345), IPv6Address("TCP", "2001:db8:1::2", 1))
        decoded = decodeMessage(encodeMessage(message, CT_GET, 1, 7), nfct_msg)
        ip = decoded.get_attr("CTA_TUPLE_REPLY").get_attr("CTA_TUPLE_IP")
        self.assertEqual(decoded["nfgen_family"], socket.AF_INET6)
        self.assertEqual(ip.get_attr("CTA_IP_V6_DST"), "2001:db8:1::2")

    def test_entryWithoutOriginal(self) -> None:
        """
        An entry without an original tuple is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, decodeOriginalDestination, nfct_msg())


def ctReply(sequence: int) -> bytes:
    data = bytearray(CAPTURED_REPLY_V4)
    data[8:12] = sequence.to_bytes(4, "little")
    return bytes(data)


class ResolverTests(SynchronousTestCase):
    """
    L{ConntrackResolver} on a fake kernel.
    """

    def setUp(self) -> None:
        self.answers: list = []

        def answer(header, request):  # type: ignore[no-untyped-def]
            kind = self.answers.pop(0) if self.answers else -errno.ENOENT
            if kind == "entry":
                return [ctReply(header.sequence)]
            return [errorMessage(header.sequence, kind)]

        self.kernel = FakeKernel(answer)
        self.patch(NetlinkPort, "_socketFactory", self.kernel.socket)
        self.reactor = MemoryReactorClock()
        self.resolver = ConntrackResolver(reactor=self.reactor)

    def start(self):  # type: ignore[no-untyped-def]
        d = self.resolver.start()
        for reader in list(self.reactor.getReaders()):
            reader.doRead()
        return d

    def transport(self) -> StringTransport:
        return StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 12345),
                               peerAddress=IPv4Address("TCP", "127.0.0.1", 44842))

    def resolve(self):  # type: ignore[no-untyped-def]
        d = self.resolver.resolve(self.transport())
        self.resolver.protocol.transport.doRead()
        return d

    def test_startProbe(self) -> None:
        """
        ctnetlink answering "no such entry" to the probe means it works.
        """
        self.successResultOf(self.start())
        self.assertIsNotNone(self.resolver.protocol)

    def test_startRefused(self) -> None:
        """
        Without CAP_NET_ADMIN the resolver is unavailable and says why.
        """
        self.answers = [-errno.EPERM]
        failure = self.failureResultOf(self.start(), ResolverUnavailable)
        self.assertIn("CAP_NET_ADMIN", str(failure.value))

    def test_resolve(self) -> None:
        """
        The entry's original destination is the answer.
        """
        self.successResultOf(self.start())
        self.answers = ["entry"]
        self.assertEqual(self.successResultOf(self.resolve()), IPv4Address("TCP", "127.0.0.2", 443))

    def test_unknown(self) -> None:
        """
        No entry means L{DestinationUnknown}, naming the client.
        """
        self.successResultOf(self.start())
        failure = self.failureResultOf(self.resolve(), DestinationUnknown)
        self.assertIn("127.0.0.1 port 44842", str(failure.value))

    def test_otherError(self) -> None:
        """
        Another kernel error is a L{ResolverError} with its reason.
        """
        self.successResultOf(self.start())
        self.answers = [-errno.EINVAL]
        failure = self.failureResultOf(self.resolve(), ResolverError)
        self.assertIn("failed", str(failure.value))

    def test_notStarted(self) -> None:
        """
        Resolving before start fails plainly.
        """
        self.failureResultOf(self.resolver.resolve(self.transport()), ResolverUnavailable)
