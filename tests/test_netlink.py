"""
Tests for L{shifter.kernel.netlink}: the codec on canned bytes, the port and the
protocol against a fake kernel, and family look-ups against the host
kernel's own generic netlink controller.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from typing import Any, Callable, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    ctrlmsg,
    genlmsg,
)

from twisted.internet import main
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.kernel.netlink import (
    FamilyNotFound,
    Header,
    MalformedMessage,
    NetlinkClosed,
    NetlinkDecodeError,
    NetlinkError,
    NetlinkNotFound,
    NetlinkOverrun,
    NetlinkPort,
    NetlinkProtocol,
    NetlinkTimeout,
    decodeMessage,
    encodeAttribute,
    encodeMessage,
    encodeRequest,
    parseAttributes,
    parseDone,
    parseError,
    splitMessages,
)

# Datagrams captured from a Linux 6.18 kernel's generic netlink controller
# (the port id in the headers is the capturing socket's).
#
# CTRL_CMD_GETFAMILY "nosuchfamily", sequence 7: -ENOENT, NLM_F_CAPPED.
CAPTURED_ENOENT = bytes.fromhex(
    "24000000020000010700000083370000feffffff28000000100001000700000000000000"
)
# CTRL_CMD_GETFAMILY "nlctrl", sequence 8: the family (id 16, version 2,
# its ops and its "notify" multicast group).
CAPTURED_NLCTRL = bytes.fromhex(
    "88000000100000000800000083370000010200000b0002006e6c6374726c0000"
    "06000100100000000800030002000000080004000000000008000500000000002c"
    "000600140001000800010003000000080002000e00000014000200080001000a00"
    "0000080002000c0000001c0007001800010008000200100000000b0001006e6f74"
    "6966790000"
)

PORT_ID = 4242


def netlinkHeader(length: int, type: int, flags: int, sequence: int, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", length, type, flags, sequence, pid)


def nlattr(kind: int, payload: bytes) -> bytes:
    """
    One netlink attribute, padded to four bytes.
    """
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def errorMessage(
    sequence: int,
    code: int,
    request: Optional[bytes] = None,
    extack: Optional[str] = None,
    capped: bool = True,
) -> bytes:
    """
    An C{NLMSG_ERROR} as the kernel builds it (struct nlmsgerr), for the
    request with C{sequence}, optionally with an extended-ack message.
    """
    if request is None:
        request = netlinkHeader(20, 0x20, NLM_F_REQUEST, sequence) + b"\1\1\0\0"
    flags = 0
    body = struct.pack("=i", code)
    if capped:
        flags |= 0x100
        body += request[:16]
    else:
        body += request
    if extack is not None:
        flags |= 0x200
        body += nlattr(1, extack.encode() + b"\0")
    return netlinkHeader(16 + len(body), NLMSG_ERROR, flags, sequence) + body


def doneMessage(sequence: int, status: int = 0) -> bytes:
    return netlinkHeader(20, NLMSG_DONE, NLM_F_MULTI, sequence) + struct.pack("=i", status)


def familyReply(sequence: int, name: str, familyId: int, flags: int = 0) -> bytes:
    """
    The controller's answer describing one family.
    """
    reply = ctrlmsg()
    reply["cmd"] = 1  # CTRL_CMD_NEWFAMILY
    reply["version"] = 2
    reply["attrs"] = [
        ["CTRL_ATTR_FAMILY_ID", familyId],
        ["CTRL_ATTR_FAMILY_NAME", name],
    ]
    return encodeMessage(reply, GENL_ID_CTRL, flags, sequence)


def requestedFamily(request: bytes) -> str:
    """
    The family name asked for in a CTRL_CMD_GETFAMILY request.
    """
    message = decodeMessage(request, ctrlmsg)
    return str(message.get_attr("CTRL_ATTR_FAMILY_NAME"))


# SO_SNDBUF as a netlink socket reports it with net.core.wmem_default at
# its usual 212992.
DEFAULT_SEND_BUFFER = 212992


class FakeNetlinkSocket:
    """
    Stands in for a netlink socket: records what is sent and set, and
    hands out queued datagrams (or errors) to C{recvmsg}.
    """

    def __init__(self, kernel: "FakeKernel", family: int, type: int, proto: int) -> None:
        self.kernel = kernel
        self.family = family
        self.type = type
        self.proto = proto
        self.options: dict[tuple[int, int], int] = {}
        self.blocking = True
        self.bound: Optional[tuple[int, int]] = None
        self.closed = False
        self.inbound: deque[Any] = deque()
        self.bindError: Optional[OSError] = None
        self.sendError: Optional[OSError] = None

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[(level, option)] = value

    def getsockopt(self, level: int, option: int) -> int:
        if (level, option) == (socket.SOL_SOCKET, socket.SO_SNDBUF):
            return self.options.get((level, option), DEFAULT_SEND_BUFFER)
        return self.options.get((level, option), 0)

    def bind(self, address: tuple[int, int]) -> None:
        if self.bindError is not None:
            raise self.bindError
        self.bound = address

    def getsockname(self) -> tuple[int, int]:
        return (PORT_ID, 0)

    def fileno(self) -> int:
        return -1 if self.closed else 1000

    def sendto(self, data: bytes, address: tuple[int, int]) -> int:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.sendError is not None:
            raise self.sendError
        if len(data) > self.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32:
            # As netlink_sendmsg refuses a datagram its send buffer cannot hold.
            raise OSError(errno.EMSGSIZE, "Message too long")
        assert address == (0, 0), address
        self.kernel.received(self, bytes(data))
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[Any], int, tuple[int, int]]:
        if not self.inbound:
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
        item = self.inbound.popleft()
        if isinstance(item, OSError):
            raise item
        data, flags, address = item
        return data[:size], [], flags, address

    def close(self) -> None:
        self.closed = True

    def deliver(self, data: bytes, flags: int = 0, address: tuple[int, int] = (0, 0)) -> None:
        """
        Queue a datagram for the next read.
        """
        self.inbound.append((data, flags, address))


class FakeKernel:
    """
    A fake kernel behind L{FakeNetlinkSocket}s: each request is recorded
    and given to C{answer}, which returns the datagrams to queue in reply
    (or nothing, to leave the request unanswered for now).
    """

    def __init__(self, answer: Optional[Callable[[Header, bytes], list[bytes]]] = None) -> None:
        self.answer = answer or (lambda header, request: [])
        self.sockets: list[FakeNetlinkSocket] = []
        self.requests: list[tuple[Header, bytes]] = []
        self.datagrams = 0

    def socket(self, family: int, type: int, proto: int) -> FakeNetlinkSocket:
        sock = FakeNetlinkSocket(self, family, type, proto)
        self.sockets.append(sock)
        return sock

    def received(self, sock: FakeNetlinkSocket, data: bytes) -> None:
        # As the kernel does, each message of a datagram is taken in turn.
        self.datagrams += 1
        for header, request in splitMessages(data):
            self.requests.append((header, request))
            for reply in self.answer(header, request) or []:
                sock.deliver(reply)


def pump(reactor: MemoryReactorClock) -> None:
    """
    Let every reader registered with the memory reactor read what is queued
    for it, until nothing more arrives.
    """
    for _ in range(1000):
        readers = [r for r in reactor.getReaders() if getattr(r, "socket", None) is not None]
        if not any(r.socket.inbound for r in readers):
            return
        for reader in readers:
            reader.doRead()
    raise AssertionError("the fake kernel never stopped answering")


def genericRequest(cmd: int = 1) -> genlmsg:
    message = genlmsg()
    message["cmd"] = cmd
    message["version"] = 1
    return message


def genericReply(sequence: int, cmd: int = 1, familyId: int = 0x20, flags: int = 0) -> bytes:
    return encodeMessage(genericRequest(cmd), familyId, flags, sequence)


class CodecTests(SynchronousTestCase):
    """
    The sans-I/O codec on canned bytes.
    """

    def test_encodeRequestHeader(self) -> None:
        """
        L{encodeRequest} writes the netlink header (length, type, flags with
        C{NLM_F_REQUEST}, sequence, port id) before the encoded message.
        """
        data = encodeRequest(genericRequest(3), 0x1D, NLM_F_ACK, 77, pid=9)
        self.assertEqual(
            data,
            netlinkHeader(20, 0x1D, NLM_F_REQUEST | NLM_F_ACK, 77, 9) + b"\x03\x01\x00\x00",
        )

    def test_encodeRequestAttributes(self) -> None:
        """
        Attributes follow the generic netlink header, each padded to four
        bytes, and the header's length counts them.
        """
        query = ctrlmsg()
        query["cmd"] = CTRL_CMD_GETFAMILY
        query["version"] = 1
        query["attrs"].append(["CTRL_ATTR_FAMILY_NAME", "nlctrl"])
        data = encodeRequest(query, GENL_ID_CTRL, 0, 5)
        body = b"\x03\x01\x00\x00" + nlattr(2, b"nlctrl\0")
        self.assertEqual(data, netlinkHeader(16 + len(body), GENL_ID_CTRL, NLM_F_REQUEST, 5) + body)

    def test_encodeRequestReusesMessage(self) -> None:
        """
        Encoding the same message twice with new sequence numbers gives two
        whole requests, not one appended to the other.
        """
        message = genericRequest()
        first = encodeRequest(message, 0x20, 0, 1)
        second = encodeRequest(message, 0x20, 0, 2)
        self.assertEqual(len(first), len(second))
        self.assertEqual(list(splitMessages(second))[0][0].sequence, 2)

    def test_splitCapturedReply(self) -> None:
        """
        A captured controller reply is one message whose header is read
        field by field.
        """
        ((header, message),) = list(splitMessages(CAPTURED_NLCTRL))
        self.assertEqual(header, Header(len(CAPTURED_NLCTRL), GENL_ID_CTRL, 0, 8, 0x3783))
        self.assertEqual(message, CAPTURED_NLCTRL)

    def test_splitSeveral(self) -> None:
        """
        Several messages in one datagram come out one by one, the padding
        between them skipped.
        """
        first = netlinkHeader(21, 0x20, 0, 1) + b"\1\1\0\0\x55"
        second = doneMessage(2)
        parts = list(splitMessages(first + b"\0\0\0" + second))
        self.assertEqual([(h.sequence, m) for h, m in parts], [(1, first), (2, second)])

    def test_splitTruncated(self) -> None:
        """
        A message whose header claims more bytes than the datagram holds is
        malformed; the whole messages before it still come out.
        """
        good = doneMessage(1)
        parts = []
        with self.assertRaises(MalformedMessage):
            for part in splitMessages(good + CAPTURED_NLCTRL[:40]):
                parts.append(part)
        self.assertEqual([m for _, m in parts], [good])

    def test_splitShortTail(self) -> None:
        """
        Fewer trailing bytes than a header are malformed.
        """
        with self.assertRaises(MalformedMessage):
            list(splitMessages(doneMessage(1) + b"\1\2\3"))

    def test_splitZeroLength(self) -> None:
        """
        A header claiming a length shorter than itself (0 included) is
        malformed, rather than read forever.
        """
        for length in (0, 15):
            with self.assertRaises(MalformedMessage):
                list(splitMessages(netlinkHeader(length, 0x20, 0, 1) + b"\0" * 16))

    def test_splitEmpty(self) -> None:
        """
        An empty datagram holds no messages.
        """
        self.assertEqual(list(splitMessages(b"")), [])

    @given(st.binary(max_size=200))
    @settings(max_examples=300)
    def test_splitGarbage(self, data: bytes) -> None:
        """
        Whatever the bytes, splitting yields messages lying within them, or
        raises L{MalformedMessage}, and nothing else.
        """
        try:
            for header, message in splitMessages(data):
                self.assertEqual(len(message), header.length)
                self.assertIn(message, data)
        except MalformedMessage:
            pass

    def test_parseCapturedError(self) -> None:
        """
        The captured -ENOENT answer reads as -2, with no extended-ack text.
        """
        self.assertEqual(parseError(CAPTURED_ENOENT), (-errno.ENOENT, None))

    def test_parseAck(self) -> None:
        """
        An acknowledgement is an error message with code 0.
        """
        self.assertEqual(parseError(errorMessage(3, 0)), (0, None))

    def test_parseExtackCapped(self) -> None:
        """
        With C{NLM_F_ACK_TLVS}, the kernel's message is found after the
        capped copy of the request's header.
        """
        data = errorMessage(3, -errno.EINVAL, extack="Attribute failed policy validation")
        self.assertEqual(parseError(data), (-errno.EINVAL, "Attribute failed policy validation"))

    def test_parseExtackUncapped(self) -> None:
        """
        Without C{NLM_F_CAPPED}, the whole request is skipped to find the
        kernel's message.
        """
        request = netlinkHeader(28, 0x20, NLM_F_REQUEST, 3) + b"\1\1\0\0" + nlattr(1, b"\2\0\0\0")
        data = errorMessage(3, -errno.EINVAL, request=request, capped=False, extack="bad family")
        self.assertEqual(parseError(data), (-errno.EINVAL, "bad family"))

    def test_parseExtackBroken(self) -> None:
        """
        A broken extended-ack attribute leaves the error code readable and
        the message absent.
        """
        data = errorMessage(3, -errno.EINVAL, extack="x")
        broken = data[:-8] + struct.pack("=HH", 200, 1) + data[-4:]
        self.assertEqual(parseError(broken), (-errno.EINVAL, None))

    def test_parseErrorTooShort(self) -> None:
        """
        An error message with no room for its code is malformed.
        """
        with self.assertRaises(MalformedMessage):
            parseError(netlinkHeader(16, NLMSG_ERROR, 0, 1))

    def test_parseDone(self) -> None:
        """
        C{NLMSG_DONE} carries the dump's status; without a payload it is 0.
        """
        self.assertEqual(parseDone(doneMessage(1, -errno.EMSGSIZE)), -errno.EMSGSIZE)
        self.assertEqual(parseDone(doneMessage(1)), 0)
        self.assertEqual(parseDone(netlinkHeader(16, NLMSG_DONE, 0, 1)), 0)

    def test_encodeAttribute(self) -> None:
        """
        An attribute is its length (header included, padding not), its
        type, its payload, and zeros up to four bytes.
        """
        self.assertEqual(encodeAttribute(3, b"\x01\xbb"), b"\x06\x00\x03\x00\x01\xbb\x00\x00")
        self.assertEqual(encodeAttribute(2, b"\x0a\x00\x00\x01"), b"\x08\x00\x02\x00\x0a\x00\x00\x01")

    def test_parseAttributes(self) -> None:
        """
        Attributes are read by type, flag bits cleared, from the offset to
        the end of the data.
        """
        data = b"xx" + encodeAttribute(1, b"\x02") + encodeAttribute(0x8000 | 7, b"nest")
        self.assertEqual(parseAttributes(data, 2), {1: b"\x02", 7: b"nest"})

    def test_parseAttributesTruncated(self) -> None:
        """
        An attribute longer than what is left, shorter than its own header,
        or a few stray bytes at the end, are malformed.
        """
        good = encodeAttribute(1, b"abcd")
        for data in (good[:-1], struct.pack("=HH", 2, 1) + b"\0\0", good + b"\0\0"):
            with self.assertRaises(MalformedMessage):
                parseAttributes(data, 0)

    @given(st.binary(max_size=100))
    def test_parseAttributesGarbage(self, data: bytes) -> None:
        """
        Whatever the bytes, attributes parse or raise L{MalformedMessage}.
        """
        try:
            parseAttributes(data, 0)
        except MalformedMessage:
            pass

    def test_decodeCapturedReply(self) -> None:
        """
        The captured controller reply decodes to the nlctrl family, id 16.
        """
        message = decodeMessage(CAPTURED_NLCTRL, ctrlmsg)
        self.assertEqual(message.get_attr("CTRL_ATTR_FAMILY_NAME"), "nlctrl")
        self.assertEqual(message.get_attr("CTRL_ATTR_FAMILY_ID"), GENL_ID_CTRL)

    def test_decodeGarbage(self) -> None:
        """
        A message too short for its class's fields is malformed, not a
        pyroute2 exception.
        """
        with self.assertRaises(MalformedMessage):
            decodeMessage(netlinkHeader(18, 0x20, 0, 1) + b"\1\1", genlmsg)


class PortTests(SynchronousTestCase):
    """
    L{NetlinkPort} in a memory reactor, over a fake socket.
    """

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.patch(NetlinkPort, "_socketFactory", self.kernel.socket)
        self.reactor = MemoryReactorClock()
        self.received: list[Any] = []
        self.lost: list[Failure] = []
        self.overruns: list[OSError] = []
        test = self

        class Recorder:
            def makeConnection(self, transport: NetlinkPort) -> None:
                test.received.append(("connected", transport))

            def datagramReceived(self, data: bytes) -> None:
                test.received.append(data)

            def receiveOverrun(self, error: OSError) -> None:
                test.overruns.append(error)

            def connectionLost(self, reason: Failure) -> None:
                test.lost.append(reason)

        self.port = NetlinkPort(NETLINK_GENERIC, Recorder(), reactor=self.reactor)

    def test_startListening(self) -> None:
        """
        Listening opens a non-blocking raw netlink socket of the protocol
        asked for, binds it to a kernel-chosen port, asks for a larger
        receive buffer (C{SO_RCVBUFFORCE}, 33) and extended acks, reads it in the reactor, and
        connects the protocol.
        """
        self.port.startListening()
        (sock,) = self.kernel.sockets
        self.assertEqual((sock.family, sock.type, sock.proto), (socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC))
        self.assertFalse(sock.blocking)
        self.assertEqual(sock.bound, (0, 0))
        self.assertEqual(sock.options[(socket.SOL_SOCKET, 33)], self.port.receiveBuffer)
        self.assertEqual(sock.options[(270, 11)], 1)
        self.assertIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.received, [("connected", self.port)])
        self.assertEqual(self.port.portId, PORT_ID)

    def test_receiveBufferUnprivileged(self) -> None:
        """
        When the privileged C{SO_RCVBUFFORCE} is refused, the buffer is
        asked for with C{SO_RCVBUF} (which the kernel caps at rmem_max).
        """
        original = self.kernel.socket

        def unprivileged(*args: int) -> FakeNetlinkSocket:
            sock = original(*args)
            setsockopt = sock.setsockopt

            def refuseForce(level: int, option: int, value: int) -> None:
                if (level, option) == (socket.SOL_SOCKET, 33):
                    raise OSError(errno.EPERM, "Operation not permitted")
                setsockopt(level, option, value)

            sock.setsockopt = refuseForce  # type: ignore[method-assign]
            return sock

        self.patch(NetlinkPort, "_socketFactory", unprivileged)
        self.port.startListening()
        options = self.kernel.sockets[0].options
        self.assertNotIn((socket.SOL_SOCKET, 33), options)
        self.assertEqual(options[(socket.SOL_SOCKET, socket.SO_RCVBUF)], self.port.receiveBuffer)

    def test_groups(self) -> None:
        """
        The socket is bound to the multicast groups asked for.
        """
        port = NetlinkPort(NETLINK_GENERIC, self.port.protocol, reactor=self.reactor, groups=0b101)
        port.startListening()
        self.assertEqual(self.kernel.sockets[0].bound, (0, 0b101))

    def test_startListeningFails(self) -> None:
        """
        When the socket cannot be bound, the error is raised and the socket
        closed; nothing is read.
        """
        original = self.kernel.socket

        def failing(*args: int) -> FakeNetlinkSocket:
            sock = original(*args)
            sock.bindError = OSError(errno.EPERM, "no")
            return sock

        self.patch(NetlinkPort, "_socketFactory", failing)
        with self.assertRaises(OSError):
            self.port.startListening()
        self.assertTrue(self.kernel.sockets[0].closed)
        self.assertEqual(self.reactor.getReaders(), [])

    def test_readKernelDatagrams(self) -> None:
        """
        Every datagram queued from the kernel reaches the protocol, in order.
        """
        self.port.startListening()
        sock = self.kernel.sockets[0]
        sock.deliver(b"one")
        sock.deliver(b"two")
        self.port.doRead()
        self.assertEqual(self.received[1:], [b"one", b"two"])

    def test_dropForeignDatagrams(self) -> None:
        """
        A datagram from another process's port is dropped and logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, NetlinkPort.log.observer)
        self.port.startListening()
        self.kernel.sockets[0].deliver(b"spoof", address=(31337, 0))
        self.port.doRead()
        self.assertEqual(self.received[1:], [])
        self.assertIn("not the kernel", observer[0]["log_format"])

    def test_dropTruncatedDatagrams(self) -> None:
        """
        A datagram longer than the read buffer (C{MSG_TRUNC}) is dropped.
        """
        self.port.startListening()
        self.kernel.sockets[0].deliver(b"cut", flags=socket.MSG_TRUNC)
        self.kernel.sockets[0].deliver(b"whole")
        self.port.doRead()
        self.assertEqual(self.received[1:], [b"whole"])

    def test_overrun(self) -> None:
        """
        C{ENOBUFS} from a read is reported to the protocol, and reading
        goes on.
        """
        self.port.startListening()
        sock = self.kernel.sockets[0]
        sock.inbound.append(OSError(errno.ENOBUFS, "No buffer space available"))
        sock.deliver(b"after")
        self.port.doRead()
        self.assertEqual([e.errno for e in self.overruns], [errno.ENOBUFS])
        self.assertEqual(self.received[1:], [b"after"])

    def test_readError(self) -> None:
        """
        Any other read error loses the connection.
        """
        self.port.startListening()
        self.kernel.sockets[0].inbound.append(OSError(errno.EBADF, "Bad file descriptor"))
        result = self.port.doRead()
        self.assertIsInstance(result, Failure)
        self.assertIs(result.value, main.CONNECTION_LOST)
        self.flushLoggedErrors(OSError)

    def test_readBurstBounded(self) -> None:
        """
        One read call takes at most C{maxDatagramsPerRead} datagrams, so a
        flood cannot starve the reactor; the rest wait for the next call.
        """
        self.port.maxDatagramsPerRead = 3
        self.port.startListening()
        for i in range(5):
            self.kernel.sockets[0].deliver(b"%d" % i)
        self.port.doRead()
        self.assertEqual(len(self.received) - 1, 3)
        self.port.doRead()
        self.assertEqual(len(self.received) - 1, 5)

    def test_protocolErrorLogged(self) -> None:
        """
        An exception from the protocol is logged; the port keeps reading.
        """
        self.port.startListening()

        def broken(data: bytes) -> None:
            raise RuntimeError("boom")

        self.port.protocol.datagramReceived = broken
        self.kernel.sockets[0].deliver(b"x")
        self.kernel.sockets[0].deliver(b"y")
        self.port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_send(self) -> None:
        """
        L{NetlinkPort.send} sends one datagram to the kernel.
        """
        self.port.startListening()
        request = doneMessage(5)
        self.port.send(request)
        self.assertEqual(self.kernel.requests, [(list(splitMessages(request))[0])])

    def test_loseConnection(self) -> None:
        """
        Losing the connection stops reading, closes the socket and tells the
        protocol; sending afterwards is refused.
        """
        self.port.startListening()
        self.port.loseConnection()
        self.assertTrue(self.kernel.sockets[0].closed)
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(len(self.lost), 1)
        with self.assertRaises(OSError):
            self.port.send(b"late")


class ProtocolTests(SynchronousTestCase):
    """
    L{NetlinkProtocol} against a fake kernel, with a memory reactor for the
    socket and its clock for timeouts.
    """

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.patch(NetlinkPort, "_socketFactory", self.kernel.socket)
        self.reactor = MemoryReactorClock()
        self.protocol = NetlinkProtocol(self.reactor, timeout=5.0, messageClasses={0x20: genlmsg})
        self.port = NetlinkPort(NETLINK_GENERIC, self.protocol, reactor=self.reactor)
        self.port.startListening()
        self.sock = self.kernel.sockets[0]

    def deliver(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.sock.deliver(datagram)
        self.port.doRead()

    def test_requestSent(self) -> None:
        """
        A request goes out as one datagram with C{NLM_F_REQUEST}, the type
        asked for, and a sequence number.
        """
        self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.assertEqual((header.type, header.flags), (0x20, NLM_F_REQUEST))
        self.assertNotEqual(header.sequence, 0)

    def test_requestFlags(self) -> None:
        """
        C{dump} and C{ack} add C{NLM_F_DUMP} and C{NLM_F_ACK}.
        """
        self.protocol.request(genericRequest(), 0x20, dump=True, ack=True)
        ((header, _),) = self.kernel.requests
        self.assertEqual(header.flags, NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK)

    def test_reply(self) -> None:
        """
        The reply carrying the request's sequence number fires its
        L{Deferred} with the decoded message.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.assertNoResult(d)
        self.deliver(genericReply(header.sequence, cmd=9))
        (reply,) = self.successResultOf(d)
        self.assertEqual(reply["cmd"], 9)
        self.assertEqual(self.protocol.pendingCount, 0)

    def test_outOfOrderReplies(self) -> None:
        """
        With many requests in flight, replies arriving in any order each
        reach the request whose sequence number they carry.
        """
        ds = [self.protocol.request(genericRequest(), 0x20) for _ in range(10)]
        sequences = [h.sequence for h, _ in self.kernel.requests]
        self.assertEqual(len(set(sequences)), 10)
        order = [3, 9, 0, 7, 1, 8, 2, 6, 4, 5]
        for i in order[:5]:
            self.deliver(genericReply(sequences[i], cmd=100 + i))
        self.sock.deliver(b"".join(genericReply(sequences[i], cmd=100 + i) for i in order[5:]))
        self.port.doRead()
        self.assertEqual([self.successResultOf(d)[0]["cmd"] for d in ds], [100 + i for i in range(10)])

    def test_strangerDropped(self) -> None:
        """
        A reply with a sequence number no request has is logged and dropped;
        the waiting request still gets its own.
        """
        observer = EventLoggingObserver.createWithCleanup(self, NetlinkProtocol.log.observer)
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence + 1))
        self.assertNoResult(d)
        self.assertIn("for no request", observer[-1]["log_format"])
        self.deliver(genericReply(header.sequence))
        self.successResultOf(d)

    def test_unsolicitedReceived(self) -> None:
        """
        A message that answers no request goes to C{unsolicitedReceived}
        with its header and bytes, and a waiting request is not disturbed.
        """
        received: list[tuple[Header, bytes]] = []
        self.protocol.unsolicitedReceived = lambda h, m: received.append((h, m))  # type: ignore[method-assign]
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        stranger = genericReply(0, cmd=7)
        self.deliver(stranger)
        self.assertEqual([(h.sequence, m) for h, m in received], [(0, stranger)])
        self.assertNoResult(d)
        self.deliver(genericReply(header.sequence))
        self.successResultOf(d)

    def test_failingMessageAlone(self) -> None:
        """
        A message whose handling raises is logged, and the messages after it
        in the same datagram are still delivered: the request they answer
        gets its reply.
        """
        received: list[int] = []

        def unsolicited(header: Header, message: bytes) -> None:
            received.append(header.sequence)
            if header.sequence == 1:
                raise RuntimeError("this message broke")

        self.protocol.unsolicitedReceived = unsolicited  # type: ignore[method-assign]
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(1) + genericReply(2) + genericReply(header.sequence, cmd=5))
        self.assertEqual(received, [1, 2])
        self.assertEqual(self.successResultOf(d)[0]["cmd"], 5)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_error(self) -> None:
        """
        An error reply fails the request with L{NetlinkError} carrying the
        errno and the kernel's extended-ack message.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(errorMessage(header.sequence, -errno.EINVAL, extack="missing attribute"))
        error = self.failureResultOf(d, NetlinkError).value
        self.assertEqual(error.errno, errno.EINVAL)
        self.assertEqual(str(error), "missing attribute (EINVAL)")
        self.assertNotIsInstance(error, NetlinkNotFound)

    def test_errorNotFound(self) -> None:
        """
        C{-ENOENT} fails the request with L{NetlinkNotFound}.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(errorMessage(header.sequence, -errno.ENOENT))
        self.assertEqual(self.failureResultOf(d, NetlinkNotFound).value.errno, errno.ENOENT)

    def test_errorWithoutText(self) -> None:
        """
        Without an extended-ack message, the error reads as strerror.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(errorMessage(header.sequence, -errno.EPERM))
        self.assertEqual(str(self.failureResultOf(d, NetlinkError).value), "Operation not permitted (EPERM)")

    def test_dump(self) -> None:
        """
        A dump gathers every part, in one datagram or several, up to
        C{NLMSG_DONE}.
        """
        d = self.protocol.request(genericRequest(), 0x20, dump=True)
        ((header, _),) = self.kernel.requests
        seq = header.sequence
        self.deliver(genericReply(seq, cmd=1, flags=NLM_F_MULTI) + genericReply(seq, cmd=2, flags=NLM_F_MULTI))
        self.deliver(genericReply(seq, cmd=3, flags=NLM_F_MULTI))
        self.assertNoResult(d)
        self.deliver(doneMessage(seq))
        self.assertEqual([m["cmd"] for m in self.successResultOf(d)], [1, 2, 3])

    def test_dumpEmpty(self) -> None:
        """
        A dump answered by C{NLMSG_DONE} alone fires with no messages.
        """
        d = self.protocol.request(genericRequest(), 0x20, dump=True)
        ((header, _),) = self.kernel.requests
        self.deliver(doneMessage(header.sequence))
        self.assertEqual(self.successResultOf(d), [])

    def test_dumpFailed(self) -> None:
        """
        A dump whose C{NLMSG_DONE} carries a negative status fails.
        """
        d = self.protocol.request(genericRequest(), 0x20, dump=True)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence, flags=NLM_F_MULTI), doneMessage(header.sequence, -errno.EMSGSIZE))
        self.assertEqual(self.failureResultOf(d, NetlinkError).value.errno, errno.EMSGSIZE)

    def test_rawReply(self) -> None:
        """
        With C{raw}, a request may be given as the bytes after the netlink
        header and fires with the reply's bytes, undecoded.
        """
        d = self.protocol.request(b"\x07\x01\x00\x00", 0x20, raw=True)
        ((header, request),) = self.kernel.requests
        self.assertEqual(request[16:], b"\x07\x01\x00\x00")
        self.assertEqual(header.length, 20)
        reply = genericReply(header.sequence, cmd=7)
        self.deliver(reply)
        self.assertEqual(self.successResultOf(d), [reply])

    def test_rawError(self) -> None:
        """
        A raw request answered with an error fails like any other.
        """
        d = self.protocol.request(b"\x07\x01\x00\x00", 0x20, raw=True)
        ((header, _),) = self.kernel.requests
        self.deliver(errorMessage(header.sequence, -errno.ENOENT))
        self.failureResultOf(d, NetlinkNotFound)

    def test_ackAfterReply(self) -> None:
        """
        With C{ack}, replies are gathered until the acknowledgement.
        """
        d = self.protocol.request(genericRequest(), 0x20, ack=True)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence, cmd=4))
        self.assertNoResult(d)
        self.deliver(errorMessage(header.sequence, 0))
        self.assertEqual([m["cmd"] for m in self.successResultOf(d)], [4])

    def test_ackAlone(self) -> None:
        """
        A command acknowledged with no other reply fires with an empty list.
        """
        d = self.protocol.request(genericRequest(), 0x20, ack=True)
        ((header, _),) = self.kernel.requests
        self.deliver(errorMessage(header.sequence, 0))
        self.assertEqual(self.successResultOf(d), [])

    def test_timeout(self) -> None:
        """
        A request with no answer fails with L{NetlinkTimeout} once its
        timeout has passed, not before; a late reply is then dropped.
        """
        d = self.protocol.request(genericRequest(), 0x20, timeout=2.0)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("2 s", str(self.failureResultOf(d, NetlinkTimeout).value))
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence))
        self.assertEqual(self.protocol.pendingCount, 0)

    def test_defaultTimeout(self) -> None:
        """
        Without a timeout of its own, a request gets the protocol's.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, NetlinkTimeout)

    def test_answeredNoTimer(self) -> None:
        """
        An answered request leaves no timer behind.
        """
        self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closeFailsPending(self) -> None:
        """
        Closing fails every waiting request with L{NetlinkClosed} and
        leaves no timer behind.
        """
        ds = [self.protocol.request(genericRequest(), 0x20) for _ in range(3)]
        self.protocol.close()
        for d in ds:
            self.failureResultOf(d, NetlinkClosed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(self.sock.closed)

    def test_requestAfterClose(self) -> None:
        """
        A request made after closing fails at once with L{NetlinkClosed}.
        """
        self.protocol.close()
        self.failureResultOf(self.protocol.request(genericRequest(), 0x20), NetlinkClosed)
        self.assertEqual(self.kernel.requests, [])

    def test_requestBeforeConnected(self) -> None:
        """
        A protocol with no port refuses requests with L{NetlinkClosed}.
        """
        protocol = NetlinkProtocol(self.reactor)
        self.failureResultOf(protocol.request(genericRequest(), 0x20), NetlinkClosed)

    def test_overrunFailsSent(self) -> None:
        """
        A receive-buffer overrun fails every request already sent with
        L{NetlinkOverrun}, whose replies may be lost; requests still
        waiting to be sent go out afterwards and are answered normally.
        """
        self.protocol.maxInFlight = 2
        ds = [self.protocol.request(genericRequest(), 0x20) for _ in range(3)]
        self.sock.inbound.append(OSError(errno.ENOBUFS, "No buffer space available"))
        self.port.doRead()
        for d in ds[:2]:
            self.assertEqual(self.failureResultOf(d, NetlinkOverrun).value.errno, errno.ENOBUFS)
        self.assertEqual(len(self.kernel.requests), 3)
        self.deliver(genericReply(self.kernel.requests[2][0].sequence))
        self.successResultOf(ds[2])

    def test_maxInFlight(self) -> None:
        """
        No more than C{maxInFlight} requests are sent unanswered; the rest
        go out, in order, as answers come in.
        """
        self.protocol.maxInFlight = 3
        ds = [self.protocol.request(genericRequest(cmd=i), 0x20) for i in range(5)]
        self.assertEqual(len(self.kernel.requests), 3)
        self.deliver(genericReply(self.kernel.requests[1][0].sequence))
        self.assertEqual(len(self.kernel.requests), 4)
        self.deliver(errorMessage(self.kernel.requests[0][0].sequence, -errno.EINVAL))
        self.assertEqual(len(self.kernel.requests), 5)
        self.assertEqual(
            [decodeMessage(r, genlmsg)["cmd"] for _, r in self.kernel.requests], [0, 1, 2, 3, 4]
        )
        for header, _ in self.kernel.requests[2:]:
            self.deliver(genericReply(header.sequence))
        self.assertEqual(self.protocol.pendingCount, 0)
        self.failureResultOf(ds[0], NetlinkError)
        for d in ds[1:]:
            self.successResultOf(d)

    def test_queuedTimeout(self) -> None:
        """
        A request still waiting to be sent times out like any other, and is
        then never sent.
        """
        self.protocol.maxInFlight = 1
        first = self.protocol.request(genericRequest(), 0x20, timeout=10)
        second = self.protocol.request(genericRequest(), 0x20, timeout=1)
        self.reactor.advance(1)
        self.failureResultOf(second, NetlinkTimeout)
        self.deliver(genericReply(self.kernel.requests[0][0].sequence))
        self.successResultOf(first)
        self.assertEqual(len(self.kernel.requests), 1)

    def test_sendError(self) -> None:
        """
        A request the kernel refuses to take fails with L{NetlinkError}
        carrying the send error's errno.
        """
        self.sock.sendError = OSError(errno.ECONNREFUSED, "Connection refused")
        d = self.protocol.request(genericRequest(), 0x20)
        error = self.failureResultOf(d, NetlinkError).value
        self.assertEqual(error.errno, errno.ECONNREFUSED)
        self.assertEqual(self.protocol.pendingCount, 0)

    def test_sendErrorFreesSlot(self) -> None:
        """
        Requests that fail to send do not hold in-flight slots: once sending
        works again, new requests go out.
        """
        self.protocol.maxInFlight = 1
        self.sock.sendError = OSError(errno.ENOMEM, "no memory")
        failed = [self.protocol.request(genericRequest(), 0x20) for _ in range(3)]
        for d in failed:
            self.failureResultOf(d, NetlinkError)
        self.sock.sendError = None
        d = self.protocol.request(genericRequest(), 0x20)
        self.deliver(genericReply(self.kernel.requests[0][0].sequence))
        self.successResultOf(d)

    def test_malformedReply(self) -> None:
        """
        A reply that cannot be decoded fails its request with
        L{NetlinkDecodeError}, and is logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, NetlinkProtocol.log.observer)
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(netlinkHeader(18, 0x20, 0, header.sequence) + b"\1\1")
        self.failureResultOf(d, NetlinkDecodeError)
        self.assertIn("malformed netlink reply", observer[-1]["log_format"])

    def test_malformedError(self) -> None:
        """
        An error message too short for its code fails its request with
        L{NetlinkDecodeError}.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(netlinkHeader(16, NLMSG_ERROR, 0, header.sequence))
        self.failureResultOf(d, NetlinkDecodeError)

    def test_garbageDatagram(self) -> None:
        """
        A datagram that is not netlink is logged and dropped; the requests
        waiting are untouched and still answered.
        """
        observer = EventLoggingObserver.createWithCleanup(self, NetlinkProtocol.log.observer)
        d = self.protocol.request(genericRequest(), 0x20)
        self.deliver(b"\xff" * 7)
        self.assertNoResult(d)
        self.assertIn("malformed", observer[-1]["log_format"])
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence))
        self.successResultOf(d)

    def test_truncatedAfterGood(self) -> None:
        """
        In a datagram with a whole reply followed by a truncated message,
        the whole reply still reaches its request.
        """
        d = self.protocol.request(genericRequest(), 0x20)
        ((header, _),) = self.kernel.requests
        self.deliver(genericReply(header.sequence) + CAPTURED_NLCTRL[:30])
        self.successResultOf(d)

    @given(st.binary(max_size=300))
    @settings(max_examples=300)
    def test_fuzzedDatagrams(self, data: bytes) -> None:
        """
        No datagram, however garbled, makes the protocol raise.
        """
        self.protocol.datagramReceived(data)

    def test_cancel(self) -> None:
        """
        Cancelling a request's L{Deferred} forgets the request and frees its
        slot for the next one.
        """
        self.protocol.maxInFlight = 1
        d = self.protocol.request(genericRequest(), 0x20)
        waiting = self.protocol.request(genericRequest(), 0x20)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.kernel.requests), 2)
        self.deliver(genericReply(self.kernel.requests[1][0].sequence))
        self.successResultOf(waiting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_sequenceWraps(self) -> None:
        """
        Sequence numbers wrap around 2**32 and skip 0 and numbers still in
        use.
        """
        self.protocol._sequence = 0xFFFFFFFE
        self.protocol.request(genericRequest(), 0x20)
        self.protocol.request(genericRequest(), 0x20)
        self.protocol._sequence = 0xFFFFFFFE
        self.protocol.request(genericRequest(), 0x20)
        self.assertEqual([h.sequence for h, _ in self.kernel.requests], [0xFFFFFFFF, 1, 2])

    def test_callbackMayRequest(self) -> None:
        """
        A request made from another request's callback is sent and answered.
        """
        inner: list[Deferred[Any]] = []
        d = self.protocol.request(genericRequest(), 0x20)
        d.addCallback(lambda _: inner.append(self.protocol.request(genericRequest(), 0x20)))
        self.deliver(genericReply(self.kernel.requests[0][0].sequence))
        self.deliver(genericReply(self.kernel.requests[1][0].sequence))
        self.successResultOf(inner[0])


class FamilyTests(SynchronousTestCase):
    """
    L{NetlinkProtocol.resolveFamily} against a fake controller.
    """

    def setUp(self) -> None:
        families = {"nlctrl": GENL_ID_CTRL, "shifter": 0x1D}

        def controller(header: Header, request: bytes) -> list[bytes]:
            name = requestedFamily(request)
            if name in families:
                return [familyReply(header.sequence, name, families[name])]
            return [errorMessage(header.sequence, -errno.ENOENT, request=request)]

        self.kernel = FakeKernel(controller)
        self.patch(NetlinkPort, "_socketFactory", self.kernel.socket)
        self.reactor = MemoryReactorClock()
        self.protocol = NetlinkProtocol(self.reactor)
        NetlinkPort(NETLINK_GENERIC, self.protocol, reactor=self.reactor).startListening()

    def test_query(self) -> None:
        """
        The query is CTRL_CMD_GETFAMILY with the family's name, sent to the
        controller.
        """
        self.protocol.resolveFamily("shifter")
        ((header, request),) = self.kernel.requests
        self.assertEqual(header.type, GENL_ID_CTRL)
        message = decodeMessage(request, ctrlmsg)
        self.assertEqual(message["cmd"], CTRL_CMD_GETFAMILY)
        self.assertEqual(message.get_attr("CTRL_ATTR_FAMILY_NAME"), "shifter")

    def test_found(self) -> None:
        """
        A known family resolves to the id the controller gives, and the
        message class given decodes that family's replies from then on.
        """
        d = self.protocol.resolveFamily("shifter", genlmsg)
        pump(self.reactor)
        self.assertEqual(self.successResultOf(d), 0x1D)
        self.assertIs(self.protocol.messageClasses[0x1D], genlmsg)

    def test_notFound(self) -> None:
        """
        An absent family fails with L{FamilyNotFound}, naming it.
        """
        d = self.protocol.resolveFamily("absent")
        pump(self.reactor)
        error = self.failureResultOf(d, FamilyNotFound).value
        self.assertEqual(error.family, "absent")
        self.assertEqual(error.errno, errno.ENOENT)
        self.assertIn("'absent' not found", str(error))

    def test_nameTooLong(self) -> None:
        """
        A name longer than any family's (15 bytes) fails with L{ValueError}
        and is never sent.
        """
        d = self.protocol.resolveFamily("a-very-long-family-name")
        self.assertIn("15 bytes", str(self.failureResultOf(d, ValueError).value))
        self.assertEqual(self.kernel.requests, [])

    def test_otherErrorsKept(self) -> None:
        """
        Errors other than ENOENT are not mistaken for an absent family.
        """
        self.kernel.answer = lambda header, request: [errorMessage(header.sequence, -errno.EPERM)]
        d = self.protocol.resolveFamily("shifter")
        pump(self.reactor)
        failure = self.failureResultOf(d, NetlinkError)
        self.assertNotIsInstance(failure.value, FamilyNotFound)


class HostKernelTests(TestCase):
    """
    L{NetlinkProtocol} in the real reactor against the host kernel's own
    generic netlink controller, which every Linux kernel has: no module, no
    privilege needed.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.protocol = NetlinkProtocol(reactor, timeout=5.0)
        port = NetlinkPort(NETLINK_GENERIC, self.protocol, reactor=reactor)
        try:
            port.startListening()
        except OSError as e:  # not Linux, or netlink forbidden here
            from twisted.trial.unittest import SkipTest

            raise SkipTest(f"no generic netlink socket: {e}")
        self.addCleanup(self.protocol.close)

    @inlineCallbacks
    def test_resolveController(self) -> Any:
        """
        The controller's own family, "nlctrl", resolves to GENL_ID_CTRL.
        """
        familyId = yield self.protocol.resolveFamily("nlctrl")
        self.assertEqual(familyId, GENL_ID_CTRL)

    @inlineCallbacks
    def test_resolveAbsent(self) -> Any:
        """
        A family no kernel has fails with L{FamilyNotFound}.
        """
        with self.assertRaises(FamilyNotFound) as caught:
            yield self.protocol.resolveFamily("shifter-absent")
        self.assertIn("'shifter-absent' not found", str(caught.exception))

    @inlineCallbacks
    def test_dumpFamilies(self) -> Any:
        """
        A dump of every family (a multi-part answer) includes nlctrl.
        """
        query = ctrlmsg()
        query["cmd"] = CTRL_CMD_GETFAMILY
        query["version"] = 1
        families = yield self.protocol.request(query, GENL_ID_CTRL, dump=True)
        names = [m.get_attr("CTRL_ATTR_FAMILY_NAME") for m in families]
        self.assertIn("nlctrl", names)
        self.assertEqual(len(names), len(set(names)))

    @inlineCallbacks
    def test_concurrentLookups(self) -> Any:
        """
        Many look-ups in flight at once on one socket each get their own
        answer, found or not.
        """
        from twisted.internet.defer import gatherResults

        names = ["nlctrl", "absent-a", "nlctrl", "absent-b"] * 25

        def outcome(d: Deferred[int]) -> Deferred[Any]:
            return d.addErrback(lambda f: f.trap(FamilyNotFound) and "absent")

        results = yield gatherResults([outcome(self.protocol.resolveFamily(n)) for n in names])
        self.assertEqual(results, [GENL_ID_CTRL if n == "nlctrl" else "absent" for n in names])

    @inlineCallbacks
    def test_kernelError(self) -> Any:
        """
        A malformed request (GETFAMILY with neither name nor id) is answered
        with an error by the kernel, surfacing as L{NetlinkError}.
        """
        query = ctrlmsg()
        query["cmd"] = CTRL_CMD_GETFAMILY
        query["version"] = 1
        with self.assertRaises(NetlinkError) as caught:
            yield self.protocol.request(query, GENL_ID_CTRL)
        self.assertEqual(caught.exception.errno, errno.EINVAL)
