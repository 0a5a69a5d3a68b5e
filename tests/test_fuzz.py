"""
Hostile input, fuzzed with hypothesis: the CONNECT answer parser, the SNI
and Host sniffers, and the netlink codecs and protocols (generic netlink,
the kernel module's GET reply, ctnetlink entries, nfnetlink_queue packets).

Each property is one of two kinds: whatever the bytes, a decoder returns
or raises only its documented error; and a protocol fed hostile datagrams
never raises, never leaves its bookkeeping inconsistent, and still
answers what it must (every queued packet its verdict, every request its
answer or its timeout).

The number of cases is set by the C{SHIFTER_FUZZ} environment variable:
unset (CI), about 21,000 cases in all, in about a minute; C{long}, twenty
times as many (about 420,000).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR, genlmsg
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import (
    ConnectResponseParser,
    ProxyResponseError,
    formatAuthority,
    formatConnectRequest,
)
from shifter.resolvers.conntrack import decodeOriginalDestination
from shifter.resolvers.kmod import SHIFTER_CMD_GET, ConnectionKey, decodeGetReply
from shifter.kernel.netlink import (
    HEADER_SIZE,
    MalformedMessage,
    NetlinkException,
    NetlinkProtocol,
    decodeMessage,
    parseAttributes,
    parseDone,
    parseError,
    splitMessages,
)
from shifter.resolvers.nfqueue import (
    QUEUE_PACKET,
    QUEUE_VERDICT,
    QUEUE_VERDICT_BATCH,
    QueueProtocol,
    SynTable,
    decodePacket,
    nfqnl_msg,
    parseSegment,
)
from shifter.tunnel.sniff import NameSniffer, sniffHost, sniffServerName, sniffTarget
from tests.test_nfqueue import CAPTURED_SYN_V4, CAPTURED_SYN_V6, ipv4Packet, queuedPacket
from tests.test_sniff import realHello, withName

LONG = os.environ.get("SHIFTER_FUZZ") == "long"


def fuzz(examples: int):  # type: ignore[no-untyped-def]
    """
    Hypothesis settings for a property run C{examples} times in CI, twenty
    times as many with C{SHIFTER_FUZZ=long}; no deadline (the machine is
    shared), no database (runs are independent).
    """
    return settings(
        max_examples=examples * 20 if LONG else examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """
    C{seed} with a few random edits: bytes flipped, inserted, deleted,
    the tail cut or a slice repeated.
    """
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat", "set"]))
        at = draw(st.integers(0, max(0, len(data))))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[at:]
        elif kind == "repeat" and data:
            piece = data[at : at + draw(st.integers(1, 16))]
            data[at:at] = piece
        elif kind == "set" and data:
            at = min(at, len(data) - 1)
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x0D, 0x0A, 0x20, 0x3A, 0x7F, 0x80]))
    return bytes(data)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """
    C{data} cut into pieces at random places.
    """
    return st.lists(st.integers(0, len(data)), max_size=6).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    )


# --------------------------------------------------------------------------
# The CONNECT answer
# --------------------------------------------------------------------------

tokens = st.text("!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=20)
fieldValues = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c == 0x09 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t")
)
answers = st.builds(
    lambda status, reason, headers, tail: (
        b"HTTP/1.1 %d %s\r\n" % (status, reason)
        + b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
        + b"\r\n",
        status,
        [(name.encode(), value) for name, value in headers],
        tail,
    ),
    st.integers(100, 999),
    st.text("abcdefghijklmnopqrstuvwxyz ", max_size=20).map(str.encode),
    st.lists(st.tuples(tokens, fieldValues), max_size=8),
    st.binary(max_size=40),
)


def parseWhole(pieces: list[bytes]) -> object:
    """
    Feed C{pieces} to a new parser: the answer (with every byte after it
    as its tunnel bytes), C{"more"} while it needs more, or C{"error"} for
    a L{ProxyResponseError}.
    """
    parser = ConnectResponseParser()
    try:
        for at, piece in enumerate(pieces):
            response = parser.feed(piece)
            if response is not None:
                # What follows belongs to the tunnel, as Shifter relays it.
                rest = b"".join(pieces[at + 1 :])
                return replace(response, leftover=response.leftover + rest)
    except ProxyResponseError:
        return "error"
    return "more"


class ConnectAnswerFuzzTests(SynchronousTestCase):
    @fuzz(1500)
    @given(st.data())
    def test_generatedAnswersAnySplit(self, data: st.DataObject) -> None:
        """
        Any well-formed answer, cut anywhere, parses to the status, headers
        and tunnel bytes it was made of.
        """
        wire, status, headers, tail = data.draw(answers)
        response = parseWhole(data.draw(splits(wire + tail)))
        self.assertNotIn(response, ("error", "more"))
        self.assertEqual((response.status, response.headers, response.leftover), (status, headers, tail))

    @fuzz(2000)
    @given(st.data())
    def test_mutatedAnswers(self, data: st.DataObject) -> None:
        """
        Mutated answers, cut anywhere, parse or raise L{ProxyResponseError}
        and nothing else, with the same verdict however they are cut; what
        parses holds a status of three digits and clean header fields.
        """
        wire, _, _, tail = data.draw(answers)
        hostile = data.draw(mutated(wire + tail))
        whole = parseWhole([hostile])
        pieces = parseWhole(data.draw(splits(hostile)))
        if isinstance(whole, str):
            # Cut into pieces, bytes may be refused before the whole is seen
            # but never accepted when the whole is refused.
            self.assertIn(pieces, (whole, "error") if whole == "more" else (whole,))
            return
        self.assertEqual(
            (pieces.status, pieces.headers, pieces.leftover),
            (whole.status, whole.headers, whole.leftover),
        )
        self.assertTrue(100 <= whole.status <= 999)
        for name, value in whole.headers:
            self.assertNotIn(b":", name)
            for forbidden in (b"\r", b"\n", b"\0"):
                self.assertNotIn(forbidden, name + value)

    @fuzz(2000)
    @given(st.binary(max_size=2000), st.data())
    def test_arbitraryBytesAnySplit(self, wire: bytes, data: st.DataObject) -> None:
        """
        Arbitrary bytes, with or without an HTTP prefix, parse or raise only
        L{ProxyResponseError}.
        """
        prefix = data.draw(st.sampled_from([b"", b"HTTP/", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n"]))
        parseWhole(data.draw(splits(prefix + wire)))

    @fuzz(100)
    @given(st.integers(1, 64), st.integers(16 * 1024 - 200, 16 * 1024 + 200))
    def test_sizeLimitAnyChunking(self, chunk: int, size: int) -> None:
        """
        Around the 16 KiB limit, however the bytes arrive: a block within
        it parses, a longer one is refused, and the parser never holds more
        than the limit and one chunk.
        """
        head = b"HTTP/1.1 200 OK\r\nX: "
        wire = head + b"a" * max(0, size - len(head) - 4) + b"\r\n\r\n"
        parser = ConnectResponseParser()
        outcome: object = "more"
        try:
            for at in range(0, len(wire), chunk):
                outcome = parser.feed(wire[at : at + chunk])
                self.assertLessEqual(len(parser._buffer), 16 * 1024 + chunk)
                if outcome is not None:
                    break
        except ProxyResponseError:
            outcome = "error"
        self.assertEqual(outcome == "error", len(wire) > 16 * 1024)


class ConnectRequestFuzzTests(SynchronousTestCase):
    @fuzz(3000)
    @given(st.text(max_size=80), st.integers(-10, 70000))
    def test_noInjection(self, host: str, port: int) -> None:
        """
        Whatever host and port, the request is refused with L{ValueError}
        or is exactly two header lines with nothing smuggled in: one
        request line, one Host header, the same authority in both.
        """
        try:
            request = formatConnectRequest(host, port)
        except (ValueError, UnicodeEncodeError):
            return
        lines = request.split(b"\r\n")
        self.assertEqual(len(lines), 4, request)
        self.assertEqual(lines[2:], [b"", b""])
        method, authority, version = lines[0].split(b" ")
        self.assertEqual((method, version), (b"CONNECT", b"HTTP/1.1"))
        self.assertEqual(lines[1], b"Host: " + authority)
        self.assertTrue(all(0x21 <= c <= 0x7E for c in authority), authority)

    @fuzz(1000)
    @given(st.text(max_size=30), st.text(max_size=60))
    def test_headersNoInjection(self, name: str, value: str) -> None:
        """
        Extra headers (credentials) with line breaks are refused; any that
        pass add exactly one line.
        """
        try:
            request = formatConnectRequest("192.0.2.1", 443, [(name, value)])
        except (ValueError, UnicodeEncodeError):
            return
        self.assertEqual(request.count(b"\r\n"), 4)
        self.assertEqual(request.count(b"\n"), 4)
        self.assertNotIn(b"\r", request.replace(b"\r\n", b""))


# --------------------------------------------------------------------------
# SNI and Host
# --------------------------------------------------------------------------


def assertSafeName(test: SynchronousTestCase, sniffed: Any) -> None:
    """
    A sniffing verdict: no name, or a name that goes into a CONNECT
    request as it is.
    """
    if sniffed is None or sniffed.name is None:
        return
    test.assertEqual(formatAuthority(sniffed.name, 443), f"{sniffed.name}:443")
    test.assertEqual(sniffed.name, sniffed.name.lower())
    test.assertFalse(sniffed.name == "localhost" or sniffed.name.endswith(".localhost"), sniffed.name)


HELLOS = [realHello("www.example.test"), realHello("x" * 63 + ".test"), realHello(None),
          withName(b"a.b"), withName(b"www.example.test\r\nX: y"), withName(b"localhost")]
REQUESTS = [b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: " + host + b"\r\nAccept: */*\r\n\r\n"
            for host in (b"www.example.test", b"www.example.test:8080", b"[2001:db8::1]", b"a.localhost")]


class SniffFuzzTests(SynchronousTestCase):
    @fuzz(1500)
    @given(st.data())
    def test_mutatedHellos(self, data: st.DataObject) -> None:
        """
        Mutated ClientHellos never raise from any mode, and any name they
        give is a safe hostname.
        """
        hello = data.draw(st.sampled_from(HELLOS))
        hostile = data.draw(mutated(hello))
        for mode in ("sni", "auto"):
            assertSafeName(self, sniffTarget(mode, hostile))
        assertSafeName(self, sniffServerName(hostile, limit=data.draw(st.integers(0, 40000))))

    @fuzz(1500)
    @given(st.data())
    def test_mutatedRequests(self, data: st.DataObject) -> None:
        """
        Mutated HTTP requests never raise, and any name they give is a safe
        hostname.
        """
        host = data.draw(st.sampled_from([b"www.example.test", b"www.example.test:8080", b"[2001:db8::1]", b"a"]))
        request = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: " + host + b"\r\nAccept: */*\r\n\r\n"
        hostile = data.draw(mutated(request))
        for mode in ("host", "auto"):
            assertSafeName(self, sniffTarget(mode, hostile))
        assertSafeName(self, sniffHost(hostile, limit=data.draw(st.integers(0, 40000))))

    @fuzz(1500)
    @given(st.data())
    def test_mutatedAnySplit(self, data: st.DataObject) -> None:
        """
        Mutated hellos and requests fed in reads cut anywhere, as Shifter
        feeds what each read brings, give in every mode the verdict the
        whole bytes give at once, and a safe name.
        """
        seed = data.draw(st.sampled_from(HELLOS + REQUESTS))
        hostile = data.draw(mutated(seed))
        pieces = data.draw(splits(hostile))
        for mode in ("sni", "host", "auto"):
            sniffer = NameSniffer(mode)
            verdict = None
            for piece in pieces:
                verdict = sniffer.feed(piece)
            self.assertEqual(verdict, sniffTarget(mode, hostile))
            assertSafeName(self, verdict)

    @fuzz(2000)
    @given(st.binary(max_size=600))
    def test_everyPrefixOfHostileBytes(self, hostile: bytes) -> None:
        """
        As the bytes arrive (every prefix, as Shifter sniffs after each
        read), no mode raises and no name is unsafe.
        """
        for end in range(0, len(hostile) + 1, max(1, len(hostile) // 16)):
            for mode in ("sni", "host", "auto"):
                assertSafeName(self, sniffTarget(mode, hostile[:end]))


# --------------------------------------------------------------------------
# Netlink
# --------------------------------------------------------------------------

_HEADER = struct.Struct("=IHHII")


@st.composite
def netlinkMessages(draw: st.DrawFn, sequences: tuple[int, ...] = (1, 2, 3)) -> bytes:
    """
    One netlink message with a plausible or hostile header (its length
    right, off, or absurd; its type an error, done, a family's or random)
    and a random or attribute-shaped payload.
    """
    kind = draw(st.sampled_from([NLMSG_ERROR, NLMSG_DONE, 1, 4, 0x20, 0x1D, QUEUE_PACKET, 0xFFFF]))
    flags = draw(st.sampled_from([0, NLM_F_MULTI, 0x100, 0x200, 0x300, 0xFFFF]))
    sequence = draw(st.sampled_from(sequences) | st.integers(0, 0xFFFFFFFF))
    if draw(st.booleans()):
        payload = draw(st.binary(max_size=120))
    else:
        attributes = b""
        for _ in range(draw(st.integers(0, 6))):
            body = draw(st.binary(max_size=24))
            length = draw(st.sampled_from([4 + len(body), 0, 3, 4, 0xFFFF, 4 + len(body) + 4]))
            attributes += struct.pack("=HH", length, draw(st.integers(0, 0xFFFF))) + body
            attributes += b"\0" * (-len(attributes) % 4)
        payload = draw(st.binary(min_size=4, max_size=4)) + attributes
    length = HEADER_SIZE + len(payload)
    length = draw(st.sampled_from([length, length, length, 0, 15, length + 4, length - 1, 0xFFFFFFFF]))
    return _HEADER.pack(length & 0xFFFFFFFF, kind, flags, sequence, 0) + payload


class FakePort:
    """
    What a netlink protocol needs of its port: a port id and a send that
    records the datagrams.
    """

    portId = 4242

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, datagram: bytes) -> None:
        self.sent.append(datagram)

    def sendBufferSize(self) -> None:
        return None  # unknown: the protocol's own limit stands

    def loseConnection(self) -> None:
        pass


class NetlinkCodecFuzzTests(SynchronousTestCase):
    @fuzz(1500)
    @given(st.lists(netlinkMessages(), max_size=4).map(b"".join), st.binary(max_size=8))
    def test_splitAndParse(self, datagram: bytes, tail: bytes) -> None:
        """
        Splitting and reading any datagram raises nothing but
        L{MalformedMessage}, and every message it yields lies within it.
        """
        try:
            for header, message in splitMessages(datagram + tail):
                self.assertEqual(len(message), header.length)
                for parse in (lambda: parseError(message), lambda: parseAttributes(message, HEADER_SIZE + 4)):
                    try:
                        parse()
                    except MalformedMessage:
                        pass
                self.assertIsInstance(parseDone(message), int)
                for messageClass in (genlmsg, nfct_msg, nfqnl_msg):
                    try:
                        decodeMessage(message, messageClass)
                    except MalformedMessage:
                        pass
        except MalformedMessage:
            pass

    @fuzz(1500)
    @given(st.data())
    def test_kmodGetReply(self, data: st.DataObject) -> None:
        """
        A hostile GET reply from the module yields a destination or raises
        L{ValueError}, nothing else.
        """
        key = ConnectionKey(socket.AF_INET, b"\xc0\x00\x02\x02", 40000)
        attributes = b""
        for _ in range(data.draw(st.integers(0, 5))):
            kind = data.draw(st.integers(0, 6))
            body = data.draw(st.sampled_from([b"\x02", b"\x0a", b"\xcb\x00\x71\x07", b"\x01\xbb", b"\0" * 16])
                             | st.binary(max_size=20))
            attributes += struct.pack("=HH", 4 + len(body), kind) + body + b"\0" * (-len(body) % 4)
        genl = struct.pack("=BBH", data.draw(st.sampled_from([SHIFTER_CMD_GET, 0, 7])), 1, 0)
        reply = _HEADER.pack(HEADER_SIZE + 4 + len(attributes), 0x1D, 0, 1, 0) + genl + attributes
        reply = data.draw(st.sampled_from([reply]) | mutated(reply))
        try:
            destination = decodeGetReply(reply, key)
        except ValueError:
            return
        self.assertTrue(0 < destination.port < 65536)

    @fuzz(1000)
    @given(st.data())
    def test_conntrackEntry(self, data: st.DataObject) -> None:
        """
        A hostile ctnetlink entry decodes to a destination or raises
        L{ValueError} (L{MalformedMessage} is one), nothing else.
        """
        entry = nfct_msg()
        entry["nfgen_family"] = socket.AF_INET
        entry["attrs"] = [
            ["CTA_TUPLE_ORIG", {"attrs": [
                ["CTA_TUPLE_IP", {"attrs": [["CTA_IP_V4_SRC", "192.0.2.2"], ["CTA_IP_V4_DST", "203.0.113.7"]]}],
                ["CTA_TUPLE_PROTO", {"attrs": [["CTA_PROTO_NUM", 6], ["CTA_PROTO_SRC_PORT", 40000],
                                               ["CTA_PROTO_DST_PORT", 443]]}],
            ]}],
        ]
        entry.encode()
        wire = data.draw(mutated(bytes(entry.data)))
        try:
            destination = decodeOriginalDestination(decodeMessage(wire, nfct_msg))
        except ValueError:
            return
        self.assertTrue(0 < destination.port < 65536)

    @fuzz(1500)
    @given(st.data())
    def test_queuedPackets(self, data: st.DataObject) -> None:
        """
        A hostile queued packet decodes or raises L{MalformedMessage}; a
        hostile IP packet reads as a segment or raises L{ValueError}.
        """
        seed = data.draw(st.sampled_from([CAPTURED_SYN_V4, CAPTURED_SYN_V6,
                                          queuedPacket(9, ipv4Packet("192.0.2.2", "203.0.113.7", 1, 443))]))
        try:
            packet = decodePacket(data.draw(mutated(seed)))
        except MalformedMessage:
            pass
        else:
            self.assertIsInstance(packet.packetId, int)
        try:
            segment = parseSegment(data.draw(mutated(ipv4Packet("192.0.2.2", "203.0.113.7", 40000, 443))))
        except ValueError:
            return
        self.assertTrue(0 <= segment.destinationAddress().port < 65536)


class NetlinkProtocolFuzzTests(SynchronousTestCase):
    @fuzz(500)
    @given(st.lists(st.lists(netlinkMessages(), min_size=1, max_size=4).map(b"".join), max_size=6))
    def test_requestsSurviveHostileReplies(self, datagrams: list[bytes]) -> None:
        """
        Requests waiting (a plain one, a dump, one with an acknowledgement)
        while hostile datagrams arrive: nothing raises, each request ends
        with a list of replies or a L{NetlinkException}, by its timeout at
        the latest, and the protocol's books balance.
        """
        reactor = MemoryReactorClock()
        protocol = NetlinkProtocol(reactor, timeout=5.0, messageClasses={0x20: genlmsg})
        protocol.makeConnection(FakePort())  # type: ignore[arg-type]
        message = genlmsg()
        message["cmd"] = 1
        requests = [
            protocol.request(message, 0x20),
            protocol.request(message, 0x20, dump=True),
            protocol.request(message, 0x20, ack=True, raw=True),
        ]
        outcomes: list[object] = []
        for request in requests:
            request.addBoth(outcomes.append)
        for datagram in datagrams:
            protocol.datagramReceived(datagram)
        reactor.advance(6)
        self.assertEqual(len(outcomes), 3)
        for outcome in outcomes:
            if not isinstance(outcome, list):
                self.assertIsInstance(outcome.value, NetlinkException)  # type: ignore[attr-defined]
        self.assertEqual(protocol.pendingCount, 0)
        self.assertEqual(protocol._inFlight, 0)
        self.assertEqual(reactor.getDelayedCalls(), [])

    @fuzz(600)
    @given(st.data())
    def test_queueGivesEveryVerdict(self, data: st.DataObject) -> None:
        """
        The nfqueue protocol fed hostile datagrams among real queued SYNs
        never raises, and every packet it could read (every one with a
        packet id) gets its verdict, whatever else came with it.
        """
        reactor = MemoryReactorClock()
        protocol = QueueProtocol(reactor, 0, SynTable(reactor))
        port = FakePort()
        protocol.makeConnection(port)  # type: ignore[arg-type]
        seeds = [CAPTURED_SYN_V4, CAPTURED_SYN_V6]
        readable = 0
        for _ in range(data.draw(st.integers(1, 6))):
            choice = data.draw(st.sampled_from(["real", "mutated", "random"]))
            if choice == "real":
                datagram = data.draw(st.sampled_from(seeds))
            elif choice == "mutated":
                datagram = data.draw(mutated(data.draw(st.sampled_from(seeds))))
            else:
                datagram = data.draw(netlinkMessages())
            expected = 0
            try:
                for header, message in splitMessages(datagram):
                    if header.type == QUEUE_PACKET:
                        try:
                            decodePacket(message)
                        except MalformedMessage:
                            continue
                        expected += 1
            except MalformedMessage:
                pass
            protocol.datagramReceived(datagram)
            readable += expected
        reactor.advance(0)
        self.assertEqual(protocol.received, readable)
        self.assertEqual(protocol.verdicts, readable)
        verdictTypes = {_HEADER.unpack_from(d)[1] for d in port.sent}
        self.assertLessEqual(verdictTypes, {QUEUE_VERDICT, QUEUE_VERDICT_BATCH})
        if readable:
            self.assertTrue(port.sent)


class DecoderRegressionTests(SynchronousTestCase):
    """
    What the fuzzing above found in the decoders, kept as plain cases.
    """

    # A queued-packet message, well framed, whose NFQA_PACKET_HDR claims
    # more bytes than the message holds: pyroute2 leaves it as bytes.
    CUT_PACKET_HEADER = bytes.fromhex("1c000000000300000000000000000000020000000b02010000000000")
    # A ctnetlink entry whose CTA_TUPLE_ORIG is cut short the same way.
    CUT_ORIGINAL_TUPLE = bytes.fromhex("1c000000000100000000000000000000020000003400018000000000")

    def test_cutPacketHeader(self) -> None:
        """
        A queued packet whose header attribute is cut short is a
        L{MalformedMessage}, not an C{AttributeError}.
        """
        self.assertRaises(MalformedMessage, decodePacket, self.CUT_PACKET_HEADER)

    def test_cutPacketHeaderAmongGoodOnes(self) -> None:
        """
        The nfqueue protocol drops such a message and still reads the SYN
        that follows it in the same datagram, and gives it its verdict.
        """
        reactor = MemoryReactorClock()
        protocol = QueueProtocol(reactor, 0, SynTable(reactor))
        port = FakePort()
        protocol.makeConnection(port)  # type: ignore[arg-type]
        protocol.datagramReceived(self.CUT_PACKET_HEADER + CAPTURED_SYN_V4)
        reactor.advance(0)
        self.assertEqual((protocol.received, protocol.verdicts), (1, 1))
        self.assertEqual(len(port.sent), 1)

    def test_cutOriginalTuple(self) -> None:
        """
        A ctnetlink entry whose original tuple is cut short is a
        L{ValueError}, as the resolver expects, not an C{AttributeError}.
        """
        self.assertRaises(
            ValueError, decodeOriginalDestination, decodeMessage(self.CUT_ORIGINAL_TUPLE, nfct_msg)
        )
