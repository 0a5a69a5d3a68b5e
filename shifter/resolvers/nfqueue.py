"""
The C{nfqueue} resolver: Shifter reads the SYNs itself.

An C{NFQUEUE} rule in the mangle table hands each SYN to be redirected to
Shifter over nfnetlink_queue (the modern form of IP Queue) before the nat
table rewrites it, so Shifter sees where the client was going.  Shifter
files the destination under the SYN's source (address, port) in a bounded,
expiring table -- the kernel module's semantics, in user space, except
that a source that cannot name one connection answers none (L{SynTable})
-- and returns the verdict at once: ACCEPT, with a mark that says "Shifter has
recorded this SYN".  The nat rule redirects only marked SYNs, so a SYN
Shifter never saw (it was not running, and the rule has C{--queue-bypass})
is not redirected at all: it goes to its destination unproxied, instead of
reaching Shifter with a destination nobody knows.  When Shifter then
accepts the redirected connection, its peer address is the key.

The queue protocol (config bind, copy-packet parameters, packets, verdicts)
is written with pyroute2's nla message classes and driven by
L{NetlinkProtocol} in the reactor: configuration commands are requests
with acknowledgements, packets arrive as messages that answer no request
(L{NetlinkProtocol.unsolicitedReceived}).  Verdicts for all the packets
read in one reactor turn go out together, as one C{NFQNL_MSG_VERDICT_BATCH}
when they can, else in datagrams well under the socket's send buffer;
those the kernel does not take are sent again.  Every packet gets its
verdict, even when its handling fails.

Without C{--hold-syn}, a SYN whose connection the policy sends DIRECT at
once gets the direct mark instead (L{shifter.tunnel.directsyn}): it is not
redirected but forwarded.  With C{--hold-syn} (L{shifter.tunnel.holdsyn})
a SYN's verdict waits for the proxy's answer: the packet is I{held}.  A batch verdict applies to every
packet queued with an id up to the one it names, so verdicts are batched
only when no held packet has a lower id; otherwise each packet gets a
verdict of its own (many to a datagram).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from pyroute2.netlink import NLMSG_ERROR, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_QUEUE, nfgen_msg
from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.resolvers.kmod import ConnectionKey
from shifter.kernel.netlink import (
    NETLINK_NETFILTER,
    Header,
    MalformedMessage,
    NetlinkError,
    NetlinkException,
    NetlinkPort,
    NetlinkProtocol,
    decodeMessage,
    encodeMessage,
    parseError,
)
from shifter.resolvers.resolver import (
    DEFAULT_DIRECT_MARK,
    DEFAULT_REJECT_MARK,
    Destination,
    DestinationUnknown,
    IOriginalDestinationResolver,
    ResolverError,
    ResolverUnavailable,
)


# linux/netfilter/nfnetlink_queue.h
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQNL_CFG_CMD_NONE = 0
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2

NFQNL_COPY_NONE = 0
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2

NFQA_CFG_F_FAIL_OPEN = 1 << 0

# linux/netfilter.h
NF_DROP = 0
NF_ACCEPT = 1

# nfnetlink message types: the subsystem in the high byte.
QUEUE_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
QUEUE_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
QUEUE_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
QUEUE_VERDICT_BATCH = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH

# Bytes of each packet to copy: an IPv4 header with the most options, or
# an IPv6 header with a few extension headers, then the TCP ports and flags.
COPY_RANGE = 128

DEFAULT_QUEUE_MARK = 0x10000

# The most bytes of verdicts sent in one datagram.  Netlink refuses a
# datagram longer than the socket's send buffer (less 32 bytes) with
# EMSGSIZE: at the usual 208 KiB, about 5,300 verdicts of their own.  A
# quarter of the send buffer at most, whatever it is.
MAX_VERDICT_DATAGRAM = 16384
# The longest wait before verdicts the kernel did not take are sent again.
MAX_VERDICT_RETRY = 1.0

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


class nfqnl_config_msg(nfgen_msg):
    """
    C{NFQNL_MSG_CONFIG}: bind a queue, set what is copied and how.
    """

    prefix = "NFQA_CFG_"
    nla_map = (
        ("NFQA_CFG_UNSPEC", "none"),
        ("NFQA_CFG_CMD", "cmd"),
        ("NFQA_CFG_PARAMS", "params"),
        ("NFQA_CFG_QUEUE_MAXLEN", "be32"),
        ("NFQA_CFG_MASK", "be32"),
        ("NFQA_CFG_FLAGS", "be32"),
        ("NFQA_CFG_SECCTX", "none"),
    )

    # struct nfqnl_msg_config_cmd
    class cmd(nla):
        fields = (("command", "B"), ("__pad", "x"), ("pf", ">H"))

    # struct nfqnl_msg_config_params (packed)
    class params(nla):
        fields = (("copy_range", ">I"), ("copy_mode", "B"))


class nfqnl_msg(nfgen_msg):
    """
    C{NFQNL_MSG_PACKET} from the kernel, C{NFQNL_MSG_VERDICT} and
    C{NFQNL_MSG_VERDICT_BATCH} to it.
    """

    prefix = "NFQA_"
    nla_map = (
        ("NFQA_UNSPEC", "none"),
        ("NFQA_PACKET_HDR", "packet_hdr"),
        ("NFQA_VERDICT_HDR", "verdict_hdr"),
        ("NFQA_MARK", "be32"),
        ("NFQA_TIMESTAMP", "hex"),
        ("NFQA_IFINDEX_INDEV", "be32"),
        ("NFQA_IFINDEX_OUTDEV", "be32"),
        ("NFQA_IFINDEX_PHYSINDEV", "be32"),
        ("NFQA_IFINDEX_PHYSOUTDEV", "be32"),
        ("NFQA_HWADDR", "hex"),
        ("NFQA_PAYLOAD", "cdata"),
        ("NFQA_CT", "hex"),
        ("NFQA_CT_INFO", "be32"),
        ("NFQA_CAP_LEN", "be32"),
        ("NFQA_SKB_INFO", "be32"),
        ("NFQA_EXP", "hex"),
        ("NFQA_UID", "be32"),
        ("NFQA_GID", "be32"),
        ("NFQA_SECCTX", "hex"),
        ("NFQA_VLAN", "hex"),
        ("NFQA_L2HDR", "hex"),
        ("NFQA_PRIORITY", "be32"),
        ("NFQA_CGROUP_CLASSID", "be32"),
    )

    # struct nfqnl_msg_packet_hdr (packed)
    class packet_hdr(nla):
        fields = (("packet_id", ">I"), ("hw_protocol", ">H"), ("hook", "B"))

    # struct nfqnl_msg_verdict_hdr
    class verdict_hdr(nla):
        fields = (("verdict", ">I"), ("id", ">I"))


# --------------------------------------------------------------------------
# The codec: no I/O
# --------------------------------------------------------------------------


def encodeConfig(
    queueNum: int,
    command: Optional[int] = None,
    copyRange: Optional[int] = None,
    maxLength: Optional[int] = None,
    flags: Optional[tuple[int, int]] = None,
) -> nfqnl_config_msg:
    """
    An C{NFQNL_MSG_CONFIG} message for queue C{queueNum}.

    @param command: C{NFQNL_CFG_CMD_BIND} or C{_UNBIND}, if any.
    @param copyRange: if given, copy this many bytes of each packet.
    @param maxLength: if given, the most packets the kernel keeps waiting
        for a verdict.
    @param flags: if given, C{(mask, flags)} of C{NFQA_CFG_F_*} to set.
    """
    message = nfqnl_config_msg()
    message["nfgen_family"] = socket.AF_UNSPEC
    message["version"] = 0
    message["res_id"] = queueNum
    attrs: list[Any] = []
    if command is not None:
        attrs.append(["NFQA_CFG_CMD", {"command": command, "pf": 0}])
    if copyRange is not None:
        attrs.append(["NFQA_CFG_PARAMS", {"copy_range": copyRange, "copy_mode": NFQNL_COPY_PACKET}])
    if maxLength is not None:
        attrs.append(["NFQA_CFG_QUEUE_MAXLEN", maxLength])
    if flags is not None:
        attrs.append(["NFQA_CFG_MASK", flags[0]])
        attrs.append(["NFQA_CFG_FLAGS", flags[1]])
    message["attrs"] = attrs
    return message


def encodeVerdict(
    queueNum: int, packetId: int, verdict: int = NF_ACCEPT, mark: Optional[int] = None,
    batch: bool = False,
) -> bytes:
    """
    The verdict on one packet, or with C{batch} on every packet queued with
    an id up to C{packetId}, as one netlink message.

    @param mark: if given, the packet mark to set.
    """
    message = nfqnl_msg()
    message["nfgen_family"] = socket.AF_UNSPEC
    message["version"] = 0
    message["res_id"] = queueNum
    message["attrs"] = [["NFQA_VERDICT_HDR", {"verdict": verdict, "id": packetId}]]
    if mark is not None:
        message["attrs"].append(["NFQA_MARK", mark])
    return encodeMessage(message, QUEUE_VERDICT_BATCH if batch else QUEUE_VERDICT, 0x1, 0)


# The longest single verdict message (with a mark).
_VERDICT_SIZE = len(encodeVerdict(0, 0, NF_ACCEPT, 0))


@dataclass(frozen=True)
class Segment:
    """
    What Shifter needs of a queued TCP segment.
    """

    family: int
    source: bytes
    sourcePort: int
    destination: bytes
    destinationPort: int
    flags: int
    sequence: int = 0  # the segment's sequence number: a SYN's initial one

    @property
    def isSyn(self) -> bool:
        """
        A connection's first segment: SYN alone (no ACK, RST or FIN).
        """
        return self.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN

    def key(self) -> ConnectionKey:
        return ConnectionKey(self.family, self.source, self.sourcePort)

    def destinationAddress(self) -> Destination:
        host = socket.inet_ntop(self.family, self.destination)
        if self.family == socket.AF_INET:
            return IPv4Address("TCP", host, self.destinationPort)
        return IPv6Address("TCP", host, self.destinationPort)


_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT, _IPV6_AH = 44, 51


def parseSegment(payload: bytes) -> Segment:
    """
    Read the addresses, ports and flags of a TCP segment from the start of
    an IPv4 or IPv6 packet.

    @raise ValueError: for anything else, a non-first fragment, or too few
        bytes.
    """
    if not payload:
        raise ValueError("empty packet")
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            raise ValueError("IPv4 header cut short")
        headerLength = (payload[0] & 0x0F) * 4
        if headerLength < 20:
            raise ValueError(f"IPv4 header length {headerLength}")
        if struct.unpack_from("!H", payload, 6)[0] & 0x1FFF:
            raise ValueError("not a first fragment")
        if payload[9] != socket.IPPROTO_TCP:
            raise ValueError(f"IPv4 protocol {payload[9]}, not TCP")
        family, source, destination = socket.AF_INET, payload[12:16], payload[16:20]
        offset = headerLength
    elif version == 6:
        if len(payload) < 40:
            raise ValueError("IPv6 header cut short")
        family, source, destination = socket.AF_INET6, payload[8:24], payload[24:40]
        nextHeader, offset = payload[6], 40
        for _ in range(8):
            if nextHeader == socket.IPPROTO_TCP:
                break
            if offset + 8 > len(payload):
                raise ValueError("IPv6 extension header cut short")
            if nextHeader in _IPV6_EXTENSIONS:
                length = (payload[offset + 1] + 1) * 8
            elif nextHeader == _IPV6_FRAGMENT:
                if struct.unpack_from("!H", payload, offset + 2)[0] & 0xFFF8:
                    raise ValueError("not a first fragment")
                length = 8
            elif nextHeader == _IPV6_AH:
                length = (payload[offset + 1] + 2) * 4
            else:
                raise ValueError(f"IPv6 next header {nextHeader}, not TCP")
            nextHeader = payload[offset]
            offset += length
        else:
            raise ValueError("too many IPv6 extension headers")
    else:
        raise ValueError(f"IP version {version}")
    if offset + 14 > len(payload):
        raise ValueError("TCP header cut short")
    sourcePort, destinationPort, sequence = struct.unpack_from("!HHI", payload, offset)
    return Segment(family, bytes(source), sourcePort, bytes(destination), destinationPort,
                   payload[offset + 13], sequence)


@dataclass(frozen=True)
class QueuedPacket:
    """
    A packet the kernel queued to Shifter.

    @ivar segment: its TCP segment, or C{None} if it could not be read.
    @ivar mark: its packet mark.
    """

    packetId: int
    mark: int
    segment: Optional[Segment]


def decodePacket(message: bytes) -> QueuedPacket:
    """
    Decode an C{NFQNL_MSG_PACKET} message.

    @raise MalformedMessage: if it has no packet header (without its id,
        no verdict can be given).
    """
    decoded = decodeMessage(message, nfqnl_msg)
    header = decoded.get_attr("NFQA_PACKET_HDR")
    # pyroute2 leaves an attribute too short for its structure as bytes.
    if not isinstance(header, dict) or not isinstance(header.get("packet_id"), int):
        raise MalformedMessage("queued packet without NFQA_PACKET_HDR")
    mark = decoded.get_attr("NFQA_MARK")
    if not isinstance(mark, int):
        mark = 0
    payload = decoded.get_attr("NFQA_PAYLOAD")
    segment = None
    if isinstance(payload, (bytes, bytearray)):
        try:
            segment = parseSegment(bytes(payload))
        except ValueError:
            segment = None
    return QueuedPacket(header["packet_id"], mark, segment)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


class SourceAmbiguous(DestinationUnknown):
    """
    The table cannot tell which connection from a source an accepted one
    is, so it answers none: two SYNs from that source to different
    destinations could both still be waiting to be accepted, or its one
    record already answered an earlier connection.
    """


@dataclass
class _Record:
    stamp: float  # when its SYN (or the SYN's last copy) was queued
    destination: Destination
    sequence: Optional[int]  # the SYN's initial sequence number, if known
    answered: bool = False  # a connection was told this destination
    # Until then, a SYN from this source to C{other} may still be waiting
    # for its connection to be accepted.
    ambiguousUntil: float = 0.0
    other: Optional[Destination] = None


class SynTable:
    """
    Original destinations by connection source, with the kernel module's
    semantics: a new SYN from the same source replaces the entry (and makes
    it the newest); entries are never removed on FIN or RST, since Shifter
    may accept a connection only after its client has sent everything and
    closed; past C{maxEntries} the oldest entry is evicted; an entry older
    than C{expiry} seconds is never returned and is dropped.

    A source is all the key there is, so where it cannot name one
    connection the table answers none (L{SourceAmbiguous}), rather than
    give one connection another's destination:

      - a SYN to a different destination replaces an entry no connection
        has been answered from yet: either connection may be the next one
        accepted from that source (a client reusing its port at once, or a
        SYN spoofed with another client's address and port), so until the
        replaced entry would have expired, no look-up is answered;
      - an entry answers one look-up: another connection from the same
        source without a SYN of its own (NAT gave a second connection from
        one address and port this port; or its SYN went around the queue)
        would otherwise get an earlier connection's destination.  A copy of
        the SYN (same destination and initial sequence number) does not
        make the entry answer again.

    @ivar counters: C{inserts}, C{lookups}, C{hits}, C{misses},
        C{evictions}, C{expiries}, as the module counts them, and
        C{ambiguous} and C{reanswers}: look-ups refused for each reason.
    """

    def __init__(self, clock: IReactorTime, maxEntries: int = 65536, expiry: float = 120.0) -> None:
        if maxEntries < 1:
            raise ValueError("maxEntries must be at least 1")
        if not expiry > 0:
            raise ValueError("expiry must be more than 0 seconds")
        self.clock = clock
        self.maxEntries = maxEntries
        self.expiry = expiry
        self._entries: OrderedDict[ConnectionKey, _Record] = OrderedDict()
        self.counters = dict.fromkeys(
            ("inserts", "lookups", "hits", "misses", "evictions", "expiries", "ambiguous", "reanswers"), 0
        )

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, record = next(iter(entries.items()))
            if now - record.stamp < self.expiry:
                return
            del entries[key]
            self.counters["expiries"] += 1

    def insert(self, key: ConnectionKey, destination: Destination, sequence: Optional[int] = None) -> None:
        """
        Record that the connection from C{key} was sent to C{destination}.

        @param sequence: the SYN's initial sequence number, which tells a
            copy of a SYN from a new connection's.
        """
        now = self.clock.seconds()
        self._expire(now)
        entries = self._entries
        old = entries.pop(key, None)
        if old is None and len(entries) >= self.maxEntries:
            entries.popitem(last=False)
            self.counters["evictions"] += 1
        record = _Record(now, destination, sequence)
        if old is not None:
            record.ambiguousUntil, record.other = old.ambiguousUntil, old.other
            if old.destination == destination:
                record.answered = old.answered and sequence is not None and old.sequence == sequence
            elif not old.answered:
                record.ambiguousUntil = max(old.ambiguousUntil, old.stamp + self.expiry)
                record.other = old.destination
        entries[key] = record
        self.counters["inserts"] += 1

    def lookup(self, key: ConnectionKey) -> Optional[Destination]:
        """
        The destination recorded for C{key}, unless there is none or it
        expired.

        @raise SourceAmbiguous: if the record may be another connection's.
        """
        now = self.clock.seconds()
        self._expire(now)
        self.counters["lookups"] += 1
        record = self._entries.get(key)
        if record is None:
            self.counters["misses"] += 1
            return None
        if now < record.ambiguousUntil:
            self.counters["ambiguous"] += 1
            raise SourceAmbiguous(
                f"SYNs from {key} to two destinations ({_show(record.other)}, then "
                f"{_show(record.destination)}) within {self.expiry:g} s, neither answered yet: "
                f"cannot tell which this connection is (a client reusing its port, "
                f"or a spoofed SYN); refused for {record.ambiguousUntil - now:.0f} s more"
            )
        if record.answered:
            self.counters["reanswers"] += 1
            raise SourceAmbiguous(
                f"the SYN from {key} (to {_show(record.destination)}) already answered an "
                f"earlier connection, and this one's SYN was not seen (NAT gave it this "
                f"port, or it went around the queue)"
            )
        record.answered = True
        self.counters["hits"] += 1
        return record.destination


def _show(destination: Optional[Destination]) -> str:
    if destination is None:
        return "?"
    if isinstance(destination, IPv6Address):
        return f"[{destination.host}]:{destination.port}"
    return f"{destination.host}:{destination.port}"


# --------------------------------------------------------------------------
# The queue in the reactor
# --------------------------------------------------------------------------


def _idBefore(a: int, b: int) -> bool:
    """
    Whether packet id C{a} was queued before C{b}, as the kernel compares
    ids (32 bits, wrapping).
    """
    return 0 < ((b - a) & 0xFFFFFFFF) < 0x80000000


class QueueProtocol(NetlinkProtocol):
    """
    One bound nfnetlink_queue queue: records each queued SYN in C{table}
    and gives every packet its ACCEPT verdict, marked with C{mark}.

    Verdicts wait only for the end of the current reactor turn, so that
    all packets read in one turn are answered together: with one
    C{NFQNL_MSG_VERDICT_BATCH} when they are to get the same verdict and
    mark (the usual case) and no held packet would be covered by it, else
    with one verdict each, as many to a datagram as C{datagramLimit}
    allows.  Verdicts the kernel does not take stay owed and are sent
    again (L{flush}); a packet whose handling raises gets one that does not
    let it around Shifter (L{_failClosed}).

    With a C{holder}, each SYN is handed to it instead.  A
    L{shifter.tunnel.holdsyn.SynHolder} (C{--hold-syn}) calls L{hold}, then
    one of L{accept}, L{reject}, L{direct} or L{drop} when it has decided;
    a L{shifter.tunnel.directsyn.SynDirector} calls L{accept} or L{direct}
    at once.

    @ivar received: packets read from the queue.
    @ivar verdicts: packets given a verdict the kernel took (by batch or
        alone).
    @ivar datagramLimit: the most bytes of verdicts sent in one datagram.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        queueNum: int,
        table: SynTable,
        mark: int = DEFAULT_QUEUE_MARK,
        timeout: float = 2.0,
        rejectMark: int = DEFAULT_REJECT_MARK,
        holder: Any = None,
        directMark: int = DEFAULT_DIRECT_MARK,
    ) -> None:
        NetlinkProtocol.__init__(self, reactor, timeout=timeout)
        self.queueNum = queueNum
        self.table = table
        self.mark = mark
        self.rejectMark = rejectMark
        self.directMark = directMark
        self.holder = holder
        self.received = 0
        self.verdicts = 0
        self.unreadable = 0
        # (packet id, verdict, mark) of the verdicts owed, in the order given.
        self._pendingVerdicts: list[tuple[int, int, Optional[int]]] = []
        # The ids of held packets, oldest first.
        self._held: dict[int, None] = {}
        self._flushCall: Any = None
        # The packet being handled, and whether it has its verdict yet.
        self._answering: Optional[int] = None
        self._answered = False
        self.datagramLimit = MAX_VERDICT_DATAGRAM
        # Sends the kernel refused in a row, since the first refusal.
        self._sendFailures = 0

    @property
    def held(self) -> int:
        """
        Packets held: queued, read, and given no verdict yet.
        """
        return len(self._held)

    def unsolicitedReceived(self, header: Header, message: bytes) -> None:
        if header.type == QUEUE_PACKET:
            self._packetReceived(message)
        elif header.type == NLMSG_ERROR:
            try:
                error, text = parseError(message)
            except MalformedMessage:
                return
            if error:
                self.log.warn(
                    "nfqueue {queue}: the kernel refused a verdict: {error}",
                    queue=self.queueNum,
                    error=NetlinkError.fromErrno(-error, text),
                )
        else:
            NetlinkProtocol.unsolicitedReceived(self, header, message)

    def _packetReceived(self, message: bytes) -> None:
        try:
            packet = decodePacket(message)
        except MalformedMessage as e:
            self.log.warn("nfqueue {queue}: dropped an unreadable message: {reason}",
                          queue=self.queueNum, reason=e)
            return
        self.received += 1
        self._answering, self._answered = packet.packetId, False
        try:
            self._handlePacket(packet)
        except Exception:
            self.log.failure("nfqueue {queue}: internal error on packet {id}",
                             queue=self.queueNum, id=packet.packetId)
            if not self._answered:
                self._failClosed(packet)
        finally:
            self._answering = None

    def _handlePacket(self, packet: QueuedPacket) -> None:
        segment = packet.segment
        if segment is None:
            self.unreadable += 1
        elif segment.isSyn:
            if self.holder is not None:
                self.holder.synReceived(self, packet)  # recorded if accepted
                return
            self.table.insert(segment.key(), segment.destinationAddress(), segment.sequence)
        self.accept(packet)

    def _failClosed(self, packet: QueuedPacket) -> None:
        """
        The verdict for a packet whose handling failed, such that it never
        reaches its destination around Shifter: a SYN the holder had is
        refused with a reset, as a held SYN's internal error is; any other
        packet is accepted with the queue mark, so a SYN among them is
        redirected to Shifter, which, finding no record of it, refuses the
        connection (unmarked, it would go to its destination unproxied).
        """
        segment = packet.segment
        if self.holder is not None and segment is not None and segment.isSyn:
            self.reject(packet)
        else:
            self._verdict(packet.packetId, NF_ACCEPT, packet.mark | self.mark if self.mark else None)

    # The verdicts.

    def accept(self, packet: QueuedPacket) -> None:
        """
        Accept C{packet} with the queue mark: the nat rule redirects it.
        With a holder, a SYN is recorded only now: one it refuses never
        reaches Shifter, and its record could only hide that of another
        connection from the same port.
        """
        if self.holder is not None:
            segment = packet.segment
            if segment is not None and segment.isSyn:
                self.table.insert(segment.key(), segment.destinationAddress(), segment.sequence)
        self._verdict(packet.packetId, NF_ACCEPT, packet.mark | self.mark if self.mark else None)

    def reject(self, packet: QueuedPacket) -> None:
        """
        Accept C{packet} with the reject mark and without the queue mark: it
        is not redirected, and the C{REJECT --reject-with tcp-reset} rule
        answers the client with a reset.
        """
        self._verdict(packet.packetId, NF_ACCEPT, (packet.mark & ~self.mark & 0xFFFFFFFF) | self.rejectMark)

    def direct(self, packet: QueuedPacket) -> None:
        """
        Accept C{packet} with the direct mark and without the queue mark: it
        is not redirected, the printed rules save the mark to its connection
        so that no later packet of it is queued, and the gateway forwards
        it to its destination like any routed traffic.
        """
        self._verdict(packet.packetId, NF_ACCEPT, (packet.mark & ~self.mark & 0xFFFFFFFF) | self.directMark)

    def drop(self, packet: QueuedPacket) -> None:
        """
        Drop C{packet} (a copy of a SYN already held, or a held SYN when
        Shifter stops: its client sends it again).
        """
        self._verdict(packet.packetId, NF_DROP, None)

    def hold(self, packet: QueuedPacket) -> None:
        """
        Give C{packet} no verdict until L{accept}, L{reject}, L{direct} or
        L{drop} is called for it; until then, no batch verdict covers it.
        """
        self._held[packet.packetId] = None

    def _verdict(self, packetId: int, verdict: int, mark: Optional[int]) -> None:
        if packetId == self._answering:
            self._answered = True
        self._held.pop(packetId, None)
        self._pendingVerdicts.append((packetId, verdict, mark))
        if self._flushCall is None:
            self._flushCall = self.reactor.callLater(0, self.flush)

    def _batchable(self, pending: list[tuple[int, int, Optional[int]]]) -> Optional[int]:
        """
        The id up to which one batch verdict gives every verdict in
        C{pending}, or C{None} when one batch cannot: the verdicts differ,
        or a held packet was queued before one of them.
        """
        _, verdict, mark = pending[0]
        if any(v != verdict or m != mark for _, v, m in pending):
            return None
        if self._held:
            oldestHeld = next(iter(self._held))
            if not all(_idBefore(packetId, oldestHeld) for packetId, _, _ in pending):
                return None
        first = pending[0][0]
        return max((packetId for packetId, _, _ in pending),
                   key=lambda packetId: (packetId - first + 0x80000000) & 0xFFFFFFFF)

    @property
    def owed(self) -> int:
        """
        Verdicts given but not yet taken by the kernel.
        """
        return len(self._pendingVerdicts)

    def makeConnection(self, transport: NetlinkPort) -> None:
        NetlinkProtocol.makeConnection(self, transport)
        size = transport.sendBufferSize()
        if size is not None:
            self.datagramLimit = max(_VERDICT_SIZE, min(MAX_VERDICT_DATAGRAM, size // 4))

    def _datagrams(self, pending: list[tuple[int, int, Optional[int]]]) -> Iterator[tuple[bytes, int]]:
        """
        The datagrams that give the verdicts in C{pending}, each with how
        many of them it gives, in order: one batch verdict when one can
        give them all; else one message each, as many to a datagram as fit
        in C{datagramLimit} bytes (the kernel answers each message on its
        own: an error for one does not stop the rest).
        """
        last = self._batchable(pending)
        if last is not None:
            _, verdict, mark = pending[0]
            yield encodeVerdict(self.queueNum, last, verdict, mark, batch=True), len(pending)
            return
        messages: list[bytes] = []
        size = 0
        for packetId, verdict, mark in pending:
            message = encodeVerdict(self.queueNum, packetId, verdict, mark)
            if messages and size + len(message) > self.datagramLimit:
                yield b"".join(messages), len(messages)
                messages, size = [], 0
            messages.append(message)
            size += len(message)
        if messages:
            yield b"".join(messages), len(messages)

    def flush(self) -> None:
        """
        Send the verdicts owed so far.  Those the kernel does not take (no
        memory for the datagram, a send buffer too small for it) stay owed
        and are sent again: on the next reactor turn, then less and less
        often, up to once every C{MAX_VERDICT_RETRY} seconds.
        """
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if not self._pendingVerdicts or self.transport is None:
            return
        pending = self._pendingVerdicts
        try:
            for datagram, count in list(self._datagrams(pending)):
                self.transport.send(datagram)
                del pending[:count]
                self.verdicts += count
        except OSError as e:
            self._sendFailed(e)
            return
        if self._sendFailures:
            self.log.info("nfqueue {queue}: verdicts sent again after {failures} refused sends",
                          queue=self.queueNum, failures=self._sendFailures)
            self._sendFailures = 0

    def _sendFailed(self, error: OSError) -> None:
        """
        Keep the verdicts the kernel did not take, and send them again
        later; say so once for each run of refusals.
        """
        if error.errno == errno.EMSGSIZE and self.datagramLimit > _VERDICT_SIZE:
            self.datagramLimit = max(_VERDICT_SIZE, self.datagramLimit // 2)
        if not self._sendFailures:
            self.log.warn(
                "nfqueue {queue}: the kernel did not take {owed} verdicts: {error}; "
                "sending them again (datagrams of {limit} bytes at most)",
                queue=self.queueNum, owed=len(self._pendingVerdicts), error=error,
                limit=self.datagramLimit,
            )
        self._sendFailures += 1
        if self.transport is not None and not self.transport.disconnecting:
            # The next reactor turn first; then 2 ms, 4 ms, ... up to the most.
            tries = self._sendFailures
            delay = 0.0 if tries == 1 else min(MAX_VERDICT_RETRY, 0.001 * 2 ** min(tries - 1, 20))
            self._flushCall = self.reactor.callLater(delay, self.flush)

    def receiveOverrun(self, error: OSError) -> None:
        # The kernel could not deliver some packets: it dropped them (or,
        # with the fail-open flag, accepted them unmarked) rather than
        # queue them, so none of them waits for a verdict of ours.
        self.log.warn("nfqueue {queue}: receive buffer overrun, SYNs were not seen",
                      queue=self.queueNum)
        NetlinkProtocol.receiveOverrun(self, error)

    def connectionLost(self, reason: Failure) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if self._pendingVerdicts or self._held:
            # Unbinding the queue makes the kernel drop every packet still
            # in it: their clients send their SYNs again.
            self.log.error(
                "nfqueue {queue}: closed owing {owed} verdicts the kernel did not take and "
                "{held} for packets still held; the kernel drops those packets",
                queue=self.queueNum, owed=len(self._pendingVerdicts), held=len(self._held),
            )
        NetlinkProtocol.connectionLost(self, reason)


@implementer(IOriginalDestinationResolver)
class QueueResolver:
    """
    C{--resolver=nfqueue}: read the SYNs an C{NFQUEUE} rule queues, and
    answer from what they said.

    @param queueNum: the queue to bind (C{--queue-num} of the rule).
    @param queueBypass: ask the kernel to accept packets rather than drop
        them when the queue is full (C{NFQA_CFG_F_FAIL_OPEN}); such SYNs
        go unmarked, so unproxied.
    @param mark: the mark bit set on every packet given a verdict; the nat
        rule redirects only SYNs that carry it.  0 sets no mark.
    @param rejectMark: with a L{holder}, the mark bit set, in place of
        C{mark}, on a SYN whose tunnel was refused; a C{REJECT} rule
        answers it with a reset.
    @param directMark: the mark bit set, in place of C{mark}, on a SYN
        its L{holder} decides DIRECT at the SYN; the printed rules save it
        to the connection and never redirect nor queue it.  0: no decision
        is given at the SYN, DIRECT tunnels go through Shifter.

    @ivar holder: if set before L{start}, what decides each SYN's verdict:
        the L{shifter.tunnel.holdsyn.SynHolder} (C{--hold-syn}), or,
        without it, the L{shifter.tunnel.directsyn.SynDirector} that gives
        DIRECT at the SYN.
    """

    name = "nfqueue"
    log = Logger()

    def __init__(
        self,
        reactor: Optional[Any] = None,
        queueNum: int = 0,
        queueBypass: bool = False,
        mark: int = DEFAULT_QUEUE_MARK,
        maxEntries: int = 65536,
        expiry: float = 120.0,
        maxQueueLength: int = 8192,
        receiveBuffer: int = 4 << 20,
        timeout: float = 2.0,
        rejectMark: int = DEFAULT_REJECT_MARK,
        directMark: int = DEFAULT_DIRECT_MARK,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if not 0 <= queueNum <= 65535:
            raise ValueError(f"queue number {queueNum} is not between 0 and 65535")
        if not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {mark:#x} does not fit in 32 bits")
        self.reactor = reactor
        self.queueNum = queueNum
        self.queueBypass = queueBypass
        if not 0 <= rejectMark <= 0xFFFFFFFF:
            raise ValueError(f"reject mark {rejectMark:#x} does not fit in 32 bits")
        if not 0 <= directMark <= 0xFFFFFFFF:
            raise ValueError(f"direct mark {directMark:#x} does not fit in 32 bits")
        self.mark = mark
        self.rejectMark = rejectMark
        self.directMark = directMark
        self.holder: Any = None
        self.maxQueueLength = maxQueueLength
        self.receiveBuffer = receiveBuffer
        self.timeout = timeout
        self.table = SynTable(reactor, maxEntries, expiry)
        self.protocol: Optional[QueueProtocol] = None

    def start(self) -> Deferred[None]:
        """
        Bind the queue and ask for the first bytes of each packet.

        @return: a C{Deferred} failing with L{ResolverUnavailable} when the
            queue cannot be bound (no CAP_NET_ADMIN, another process has
            it, no nfnetlink_queue in the kernel).
        """
        protocol = QueueProtocol(self.reactor, self.queueNum, self.table, self.mark, self.timeout,
                                 self.rejectMark, self.holder, self.directMark)
        port = NetlinkPort(NETLINK_NETFILTER, protocol, reactor=self.reactor,
                           receiveBuffer=self.receiveBuffer)
        try:
            port.startListening()
        except OSError as e:
            return fail(ResolverUnavailable(f"cannot open a netfilter netlink socket: {e}"))
        flags = NFQA_CFG_F_FAIL_OPEN if self.queueBypass else 0

        def configure(_: object) -> Deferred[list[Any]]:
            return protocol.request(
                encodeConfig(self.queueNum, copyRange=COPY_RANGE,
                             maxLength=self.maxQueueLength,
                             flags=(NFQA_CFG_F_FAIL_OPEN, flags)),
                QUEUE_CONFIG, ack=True,
            )

        def bound(_: object) -> None:
            self.protocol = protocol
            self.log.info(
                "nfqueue: bound queue {queue} (mark {mark}, {bypass})",
                queue=self.queueNum,
                mark=f"{self.mark:#x}" if self.mark else "none",
                bypass="fail-open when full" if self.queueBypass else "drop when full",
            )

        def failed(reason: Failure) -> Failure:
            protocol.close()
            if reason.check(NetlinkError):
                code = getattr(reason.value, "errno", None)
                if code == errno.EPERM:
                    why = "CAP_NET_ADMIN is needed"
                elif code == errno.EBUSY:
                    why = "another process has bound it"
                else:
                    why = str(reason.value)
                return Failure(ResolverUnavailable(f"cannot bind nfqueue {self.queueNum}: {why}"))
            if reason.check(NetlinkException):
                return Failure(ResolverUnavailable(f"cannot bind nfqueue {self.queueNum}: {reason.value}"))
            return reason

        return (
            protocol.request(encodeConfig(self.queueNum, command=NFQNL_CFG_CMD_BIND),
                             QUEUE_CONFIG, ack=True)
            .addCallback(configure)
            .addCallbacks(bound, failed)
        )

    def stop(self) -> Deferred[None]:
        """
        Give the verdicts still owed (held SYNs are dropped: their clients
        send them again), then close the socket, which unbinds the queue:
        from then on the rule's C{--queue-bypass} decides.  Verdicts the
        kernel would not take by then are counted in a line.
        """
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            if self.holder is not None:
                self.holder.stop()
            protocol.flush()
            protocol.close()
            self.log.info(
                "nfqueue {queue}: {received} packets read, {verdicts} verdicts given, "
                "{inserts} SYNs recorded, {hits} connections found, {misses} not found, "
                "{ambiguous} refused as their source could be another connection's",
                queue=self.queueNum,
                received=protocol.received,
                verdicts=protocol.verdicts,
                inserts=self.table.counters["inserts"],
                hits=self.table.counters["hits"],
                misses=self.table.counters["misses"],
                ambiguous=self.table.counters["ambiguous"] + self.table.counters["reanswers"],
            )
        return succeed(None)

    def resolve(self, transport: ITCPTransport) -> Deferred[Destination]:
        if self.protocol is None:
            return fail(ResolverUnavailable("the nfqueue resolver is not started"))
        peer = transport.getPeer()
        try:
            key = ConnectionKey.fromPeer(peer)
        except (ValueError, OSError) as e:
            return fail(ResolverError(f"cannot look up {peer!r}: {e}"))
        try:
            destination = self.table.lookup(key)
        except SourceAmbiguous as e:
            return fail(SourceAmbiguous(f"nfqueue {self.queueNum}: {e}"))
        if destination is None:
            return fail(DestinationUnknown(
                f"no SYN from {key} seen on nfqueue {self.queueNum} "
                f"(missed, or its record expired or was evicted)"
            ))
        return succeed(destination)
