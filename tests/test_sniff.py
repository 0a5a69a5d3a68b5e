"""
Tests for L{shifter.tunnel.sniff}: the server name from a TLS ClientHello, the host
from an HTTP request, on plain bytes.

The ClientHellos are real ones, written by OpenSSL through the C{ssl} module
into a memory BIO, re-framed or extended where a test needs a shape OpenSSL
does not produce on its own.
"""

from __future__ import annotations

import ipaddress
import ssl
import string
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import isValidHostname
from shifter.tunnel.sniff import (
    ECH,
    ECH_GREASE,
    ECH_INNER,
    ECH_UNKNOWN as UNREAD,
    MAX_CLIENT_HELLO_BYTES,
    MAX_CLIENT_HELLO_RECORDS,
    MAX_REQUEST_HEADER_BYTES,
    HostSniffer,
    NameSniffer,
    ServerNameSniffer,
    Sniffed,
    isLocalhostName,
    sniffHost,
    sniffServerName,
    sniffTarget,
)

_CLIENT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_CLIENT_NO_SNI = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_CLIENT_NO_SNI.check_hostname = False

# The size of an X25519MLKEM768 key share: what makes today's hellos big.
_PQ_KEY_SHARE = 1216
_GREASE_EXTENSION = 0x0A0A
_PADDING_EXTENSION = 21


def realHello(serverName: str | None) -> bytes:
    """
    The records of a ClientHello as OpenSSL writes it for C{serverName}.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = _CLIENT if serverName is not None else _CLIENT_NO_SNI
    connection = context.wrap_bio(incoming, outgoing, server_hostname=serverName)
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def fragments(records: bytes) -> list[bytes]:
    """
    The fragments of a run of well-formed TLS records.
    """
    result = []
    pos = 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        result.append(records[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return result


def frame(message: bytes, sizes: list[int] = (), version: bytes = b"\x03\x01") -> bytes:
    """
    Carry C{message} in handshake records: the first fragments of the given
    C{sizes}, the rest in the largest records allowed.
    """
    records = []
    pos = 0
    sizes = list(sizes)
    while pos < len(message):
        size = sizes.pop(0) if sizes else 2**14
        fragment = message[pos : pos + size]
        records.append(b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment)
        pos += size
    return b"".join(records)


@dataclass(frozen=True)
class Hello:
    """
    The fields of a ClientHello, to take real ones apart and build others.
    """

    version: bytes = b"\x03\x03"
    random: bytes = bytes(32)
    sessionId: bytes = b""
    cipherSuites: bytes = b"\x13\x01"
    compression: bytes = b"\x00"
    extensions: tuple[tuple[int, bytes], ...] | None = ()

    @classmethod
    def fromMessage(cls, message: bytes) -> Hello:
        body = message[4:]
        pos = 34
        fields = []
        for size in (1, 2, 1):
            length = int.from_bytes(body[pos : pos + size], "big")
            fields.append(body[pos + size : pos + size + length])
            pos += size + length
        extensions = []
        pos += 2
        while pos < len(body):
            kind = int.from_bytes(body[pos : pos + 2], "big")
            length = int.from_bytes(body[pos + 2 : pos + 4], "big")
            extensions.append((kind, body[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        return cls(body[:2], body[2:34], *fields, tuple(extensions))

    def lengthFields(self) -> list[tuple[int, int, int]]:
        """
        Each length field of the encoded message that is bounded by the
        structure around it, as (offset, size, its value).
        """
        return self._encode()[1]

    def encode(self) -> bytes:
        return self._encode()[0]

    def _encode(self) -> tuple[bytes, list[tuple[int, int, int]]]:
        out = bytearray(b"\x01\x00\x00\x00" + self.version + self.random)
        fields: list[tuple[int, int, int]] = []

        def vector(size: int, content: bytes) -> None:
            fields.append((len(out), size, len(content)))
            out.extend(len(content).to_bytes(size, "big") + content)

        vector(1, self.sessionId)
        vector(2, self.cipherSuites)
        vector(1, self.compression)
        if self.extensions is not None:
            start = len(out)
            block = b"".join(
                kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
                for kind, data in self.extensions
            )
            vector(2, block)
            pos = start + 2
            for kind, data in self.extensions:
                fields.append((pos + 2, 2, len(data)))
                if kind == 0 and len(data) >= 2:
                    fields.append((pos + 4, 2, len(data) - 2))
                    entries = pos + 6
                    while entries < pos + 4 + len(data):
                        length = int.from_bytes(out[entries + 1 : entries + 3], "big")
                        fields.append((entries + 1, 2, pos + 4 + len(data) - entries - 3))
                        entries += 3 + length
                pos += 4 + len(data)
        out[1:4] = (len(out) - 4).to_bytes(3, "big")
        return bytes(out), fields


def serverName(*entries: tuple[int, bytes]) -> tuple[int, bytes]:
    """
    A server_name extension holding C{entries} of (name type, name).
    """
    names = b"".join(bytes([kind]) + len(name).to_bytes(2, "big") + name for kind, name in entries)
    return (0, len(names).to_bytes(2, "big") + names)


def withName(name: bytes, *others: tuple[int, bytes]) -> bytes:
    """
    A framed ClientHello whose SNI holds C{name}, with other extensions.
    """
    return frame(Hello(extensions=(serverName((0, name)),) + others).encode())


def bigHello(name: str, extra: int) -> bytes:
    """
    A real ClientHello for C{name} grown by an extension of C{extra} bytes,
    as its handshake message (not framed).
    """
    hello = Hello.fromMessage(b"".join(fragments(realHello(name))))
    return replace(
        hello, extensions=hello.extensions + ((_GREASE_EXTENSION, bytes(extra)),)
    ).encode()


_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?"
_TOP_LABEL = r"[a-zA-Z]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?"

hostnames = st.builds(
    lambda labels, top, dot: ".".join(labels + [top]) + ("." if dot else ""),
    st.lists(st.from_regex(_LABEL, fullmatch=True), max_size=4),
    st.from_regex(_TOP_LABEL, fullmatch=True),
    st.booleans(),
).filter(lambda name: not isLocalhostName(name.lower().removesuffix(".")))

_BAD_CHARACTERS = [" ", ":", "_", "/", "@", "\r", "\n", "\x00", '"', "%", "*", "é", "\x7f", "\t"]

invalidNames = st.one_of(
    # A character no hostname has, anywhere in a valid one.
    st.builds(
        lambda name, bad, at: name[: at % (len(name) + 1)] + bad + name[at % (len(name) + 1) :],
        hostnames,
        st.sampled_from(_BAD_CHARACTERS),
        st.integers(0, 300),
    ),
    # Labels or names too long, empty labels, hyphens at label ends.
    st.builds(lambda n: "a" * n + ".test", st.integers(64, 300)),
    st.builds(lambda n: ".".join(["abcdefghi"] * n) + ".test", st.integers(26, 40)),
    st.sampled_from(["a..test", ".a.test", "-a.test", "a-.test", "a.test..", "..", "."]),
)

numericNames = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.sampled_from(["127.1", "2130706433", "0x7f000001", "0x7f.1", "10.0.0.0x1", "1.2.3.4."]),
)


class SafeNameMixin:
    def assertSafe(self, verdict: Sniffed | None) -> None:
        """
        A verdict is None or a Sniffed, and any name in it is a lowercased
        hostname with no trailing dot that is not an IP address.
        """
        if verdict is None:
            return
        self.assertIsInstance(verdict, Sniffed)
        self.assertIsInstance(verdict.reason, str)
        if verdict.name is not None:
            self.assertTrue(isValidHostname(verdict.name), verdict.name)
            self.assertEqual(verdict.name, verdict.name.lower())
            self.assertFalse(verdict.name.endswith("."))
            self.assertRaises(ValueError, ipaddress.ip_address, verdict.name)
            self.assertFalse(verdict.name.rsplit(".", 1)[-1].isdigit())

    def assertMonotonic(self, sniff, data: bytes, cut: int) -> None:
        """
        A verdict given for a prefix of C{data} is the verdict for all of it.
        """
        early = sniff(data[:cut])
        whole = sniff(data)
        self.assertSafe(early)
        self.assertSafe(whole)
        if early is not None:
            self.assertEqual(early, whole)


class ServerNameTests(SafeNameMixin, SynchronousTestCase):
    def test_realHello(self) -> None:
        """
        The server name of a real ClientHello is found.
        """
        self.assertEqual(
            sniffServerName(realHello("www.example.test")), Sniffed("www.example.test", "SNI")
        )

    @settings(max_examples=200, deadline=None)
    @given(hostnames)
    def test_realHelloNames(self, name: str) -> None:
        """
        Any valid name in a real ClientHello comes back lowercased, without a
        trailing dot.
        """
        expected = name.lower().removesuffix(".")
        self.assertEqual(sniffServerName(realHello(name)), Sniffed(expected, "SNI"))

    @settings(max_examples=300)
    @given(hostnames)
    def test_builtHelloNames(self, name: str) -> None:
        """
        A valid name round-trips through a built ClientHello too.
        """
        expected = name.lower().removesuffix(".")
        self.assertEqual(sniffServerName(withName(name.encode())), Sniffed(expected, "SNI"))

    def test_longestName(self) -> None:
        """
        A name of 253 characters, the most DNS allows, is accepted.
        """
        name = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(name), 253)
        self.assertEqual(sniffServerName(withName(name.encode())), Sniffed(name, "SNI"))

    @settings(max_examples=500)
    @given(invalidNames)
    def test_invalidNames(self, name: str) -> None:
        """
        A server name that is not a hostname is refused, and the reason says
        so.
        """
        verdict = sniffServerName(withName(name.encode("utf-8")))
        self.assertIsNone(verdict.name)
        self.assertTrue(verdict.reason.startswith("invalid server name: "), verdict.reason)

    @settings(max_examples=200)
    @given(numericNames)
    def test_numericNames(self, name: str) -> None:
        """
        A server name that a resolver would read as an IPv4 address is
        refused as an IP address.
        """
        verdict = sniffServerName(withName(name.encode()))
        self.assertEqual(
            verdict, Sniffed(None, f"server name is an IP address: {name.removesuffix('.')}")
        )

    @given(st.ip_addresses(v=6))
    def test_ipv6Names(self, address: ipaddress.IPv6Address) -> None:
        """
        An IPv6 literal as a server name is refused.
        """
        verdict = sniffServerName(withName(str(address).encode()))
        self.assertIsNone(verdict.name)
        self.assertTrue(verdict.reason.startswith("invalid server name: "))

    def test_injectionRefused(self) -> None:
        """
        A name carrying a CONNECT request of its own is refused.
        """
        verdict = sniffServerName(withName(b"evil.test:80 HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET"))
        self.assertIsNone(verdict.name)
        self.assertTrue(verdict.reason.startswith("invalid server name: "))

    def test_noServerName(self) -> None:
        """
        A real ClientHello without SNI says so.
        """
        self.assertEqual(sniffServerName(realHello(None)), Sniffed(None, "no SNI extension"))

    def test_noExtensions(self) -> None:
        """
        A ClientHello with no extensions block at all, as SSL 3.0 sent them,
        has no SNI.
        """
        self.assertEqual(
            sniffServerName(frame(Hello(extensions=None).encode())),
            Sniffed(None, "no SNI extension"),
        )

    def test_otherNameTypes(self) -> None:
        """
        Entries of name types other than host_name are skipped.
        """
        self.assertEqual(
            sniffServerName(
                frame(Hello(extensions=(serverName((7, b"x.test"), (0, b"y.test")),)).encode())
            ),
            Sniffed("y.test", "SNI"),
        )
        self.assertEqual(
            sniffServerName(frame(Hello(extensions=(serverName((7, b"x.test")),)).encode())),
            Sniffed(None, "no host_name in the SNI extension"),
        )

    def test_structuralErrors(self) -> None:
        """
        Two host names, an empty list or name, a repeated extension, an
        empty server_name extension, too long a session id, odd cipher
        suites, no compression method are each refused as malformed.
        """
        sni = serverName((0, b"a.test"))
        cases = {
            "two host names": Hello(extensions=(serverName((0, b"a.test"), (0, b"b.test")),)),
            "empty server name list": Hello(extensions=(serverName(),)),
            "empty host name": Hello(extensions=(serverName((0, b"")),)),
            "extension 0 twice": Hello(extensions=(sni, sni)),
            "extension 21 twice": Hello(extensions=((21, b""), sni, (21, b""))),
            "server name list length runs past its enclosing structure": Hello(
                extensions=((0, b""),)
            ),
            "session id of 33 bytes": Hello(sessionId=bytes(33), extensions=(sni,)),
            "cipher suites length 3": Hello(cipherSuites=b"\x13\x01\x13", extensions=(sni,)),
            "cipher suites length 0": Hello(cipherSuites=b"", extensions=(sni,)),
            "no compression methods": Hello(compression=b"", extensions=(sni,)),
            "client version 0200": Hello(version=b"\x02\x00", extensions=(sni,)),
        }
        for what, hello in cases.items():
            self.assertEqual(
                sniffServerName(frame(hello.encode())),
                Sniffed(None, f"malformed ClientHello: {what}", UNREAD),
                what,
            )

    def test_bytesAfterExtensions(self) -> None:
        """
        A handshake message longer than its fields is refused.
        """
        message = bytearray(Hello(extensions=(serverName((0, b"a.test")),)).encode() + b"\x00")
        message[1:4] = (len(message) - 4).to_bytes(3, "big")
        self.assertEqual(
            sniffServerName(frame(bytes(message))),
            Sniffed(None, "malformed ClientHello: bytes after the extensions", UNREAD),
        )

    @settings(max_examples=500)
    @given(st.data())
    def test_lengthPastItsStructure(self, data: st.DataObject) -> None:
        """
        Any length field of a real ClientHello made to reach past the
        structure around it gives a malformed verdict, at once.
        """
        message = bytearray(b"".join(fragments(realHello("www.example.test"))))
        offset, size, _ = data.draw(
            st.sampled_from(Hello.fromMessage(bytes(message)).lengthFields())
        )
        room = len(message) - offset - size
        # The field's structure ends at most at the end of the message.
        if room + 1 >= 256**size:
            return
        value = data.draw(st.integers(room + 1, 256**size - 1))
        message[offset : offset + size] = value.to_bytes(size, "big")
        verdict = sniffServerName(frame(bytes(message)))
        self.assertIsNone(verdict.name)
        self.assertTrue(verdict.reason.startswith("malformed ClientHello: "), verdict.reason)

    @given(st.integers(33, 255))
    def test_sessionIdTooLong(self, length: int) -> None:
        """
        A session id over 32 bytes is refused.
        """
        message = Hello(sessionId=bytes(length), extensions=(serverName((0, b"a.test")),)).encode()
        self.assertEqual(
            sniffServerName(frame(message)),
            Sniffed(None, f"malformed ClientHello: session id of {length} bytes", UNREAD),
        )

    def test_everyPrefix(self) -> None:
        """
        Split anywhere, a real ClientHello gives no verdict until its last
        byte, and the same verdict with anything after it.
        """
        hello = realHello("split.example.test")
        for cut in range(len(hello)):
            self.assertIsNone(sniffServerName(hello[:cut]), cut)
        self.assertEqual(sniffServerName(hello), Sniffed("split.example.test", "SNI"))
        self.assertEqual(
            sniffServerName(hello + b"\x17\x03\x03\x00\x05early"),
            Sniffed("split.example.test", "SNI"),
        )

    def test_postQuantumSizedHello(self) -> None:
        """
        A hello with a post-quantum-sized key share, carried in several
        records as clients split it, gives no verdict until its last byte.
        """
        message = bigHello("pq.example.test", _PQ_KEY_SHARE)
        self.assertGreater(len(message), 1500)
        hello = frame(message, [512, 700, 1])
        self.assertEqual(len(fragments(hello)), 4)
        for cut in range(len(hello)):
            self.assertIsNone(sniffServerName(hello[:cut]), cut)
        self.assertEqual(sniffServerName(hello), Sniffed("pq.example.test", "SNI"))

    def test_largerThanOneRecord(self) -> None:
        """
        A hello larger than the largest record is reassembled from two.
        """
        hello = frame(bigHello("big.example.test", 20000))
        self.assertEqual(len(fragments(hello)), 2)
        self.assertEqual(sniffServerName(hello), Sniffed("big.example.test", "SNI"))
        self.assertIsNone(sniffServerName(hello[:-1]))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.integers(1, 2**14), max_size=8),
        st.integers(0, 4000),
        st.data(),
    )
    def test_anyFraming(self, sizes: list[int], extra: int, data: st.DataObject) -> None:
        """
        However the hello is cut into records and the records into reads,
        there is no verdict before its last byte and the SNI after.
        """
        hello = frame(bigHello("frames.example.test", extra), sizes)
        cut = data.draw(st.integers(0, len(hello) - 1))
        self.assertIsNone(sniffServerName(hello[:cut]))
        self.assertEqual(sniffServerName(hello), Sniffed("frames.example.test", "SNI"))

    def test_overLimitByDeclaredLength(self) -> None:
        """
        A hello that says it is longer than the limit is refused from its
        first nine bytes, without waiting for the rest.
        """
        hello = frame(bigHello("huge.example.test", 40000))
        self.assertEqual(
            sniffServerName(hello[:9]),
            Sniffed(None, f"ClientHello over {MAX_CLIENT_HELLO_BYTES} bytes", UNREAD),
        )
        self.assertIsNone(sniffServerName(hello[:8]))

    def test_limitIsAParameter(self) -> None:
        """
        The limit counts the records carrying the hello, headers included.
        """
        hello = realHello("limit.example.test")
        self.assertEqual(
            sniffServerName(hello, limit=len(hello)), Sniffed("limit.example.test", "SNI")
        )
        self.assertEqual(
            sniffServerName(hello, limit=len(hello) - 1),
            Sniffed(None, f"ClientHello over {len(hello) - 1} bytes", UNREAD),
        )

    def test_tinyRecordsOverLimit(self) -> None:
        """
        A small hello cut into one-byte records costs five bytes of header
        for each: past the limit it is refused rather than waited for.
        """
        message = b"".join(fragments(realHello("tiny.example.test")))
        hello = frame(message, [1] * len(message))
        self.assertLess(len(hello), MAX_CLIENT_HELLO_BYTES)
        many = len(message)
        self.assertEqual(
            sniffServerName(hello, maxRecords=many), Sniffed("tiny.example.test", "SNI")
        )
        self.assertEqual(
            sniffServerName(hello, limit=4 * len(message), maxRecords=many),
            Sniffed(None, f"ClientHello over {4 * len(message)} bytes", UNREAD),
        )
        self.assertEqual(
            sniffServerName(hello, limit=6 * len(message), maxRecords=many),
            Sniffed("tiny.example.test", "SNI"),
        )

    def test_recordCount(self) -> None:
        """
        A hello in more records than the cap is refused when the record one
        past the cap begins, without waiting for the rest; one in exactly
        as many is read.
        """
        message = b"".join(fragments(realHello("count.example.test")))
        cap = MAX_CLIENT_HELLO_RECORDS
        sizes = [1] * (cap - 1)
        exact = frame(message, sizes + [len(message)])
        self.assertEqual(len(fragments(exact)), cap)
        self.assertEqual(sniffServerName(exact), Sniffed("count.example.test", "SNI"))
        over = frame(message, sizes + [1])
        refused = Sniffed(None, f"ClientHello in more than {cap} records", UNREAD)
        pastCap = 6 * cap
        self.assertEqual(sniffServerName(over[: pastCap + 5]), refused)
        self.assertIsNone(sniffServerName(over[: pastCap + 4]))
        self.assertEqual(sniffServerName(over, maxRecords=3), Sniffed(None, "ClientHello in more than 3 records", UNREAD))

    @given(st.integers(0, 255).filter(lambda b: b != 0x16))
    def test_notTLSAtOnce(self, first: int) -> None:
        """
        A first byte that is not a handshake record's is refused at once.
        """
        self.assertEqual(sniffServerName(bytes([first])), Sniffed(None, "not a TLS handshake"))

    @given(st.integers(0, 255).filter(lambda b: b != 3))
    def test_notTLSVersion(self, major: int) -> None:
        """
        A handshake record whose version is not 3.x is refused at its second
        byte.
        """
        self.assertEqual(
            sniffServerName(bytes([0x16, major])), Sniffed(None, "not a TLS handshake")
        )

    def test_recordLengths(self) -> None:
        """
        An empty handshake record, or one over 2^14 bytes, is malformed.
        """
        self.assertEqual(
            sniffServerName(b"\x16\x03\x01\x00\x00"),
            Sniffed(None, "malformed ClientHello: record length 0", UNREAD),
        )
        self.assertEqual(
            sniffServerName(b"\x16\x03\x01\x40\x01"),
            Sniffed(None, "malformed ClientHello: record length 16385", UNREAD),
        )

    def test_notClientHello(self) -> None:
        """
        A handshake message other than ClientHello is refused at its first
        byte.
        """
        self.assertEqual(
            sniffServerName(b"\x16\x03\x01\x00\x30\x02"),
            Sniffed(None, "malformed ClientHello: handshake type 2, not a ClientHello", UNREAD),
        )

    def test_otherRecordInside(self) -> None:
        """
        A record of another type before the hello is complete is malformed:
        handshake messages may not be interleaved with other records.
        """
        hello = frame(b"".join(fragments(realHello("x.example.test"))), [100])
        second = len(fragments(hello)[0]) + 5
        for kind in (20, 21, 23):
            corrupted = hello[:second] + bytes([kind]) + hello[second + 1 :]
            self.assertEqual(
                sniffServerName(corrupted[: second + 1]),
                Sniffed(None, f"malformed ClientHello: record of type {kind} inside it", UNREAD),
            )

    @settings(max_examples=3000)
    @given(st.binary(max_size=600))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Arbitrary bytes give None or a verdict, never an exception.
        """
        self.assertSafe(sniffServerName(data))

    @settings(max_examples=2000)
    @given(st.binary(max_size=600), st.integers(0, 600))
    def test_arbitraryAfterRecordHeader(self, data: bytes, cut: int) -> None:
        """
        Arbitrary bytes behind a plausible record and handshake header reach
        the ClientHello parser; the verdicts are safe and do not change with
        more bytes.
        """
        record = b"\x16\x03\x01" + min(len(data) + 4, 2**14).to_bytes(2, "big")
        handshake = b"\x01" + len(data).to_bytes(3, "big")
        self.assertMonotonic(sniffServerName, record + handshake + data, cut)

    @settings(max_examples=1000, deadline=None)
    @given(st.data())
    def test_corruptedHellos(self, data: st.DataObject) -> None:
        """
        A real hello with bytes changed anywhere, framed in any way, gives a
        safe verdict that does not change with more bytes.
        """
        message = bytearray(bigHello("corrupt.example.test", data.draw(st.integers(0, 3000))))
        hello = bytearray(
            frame(bytes(message), data.draw(st.lists(st.integers(1, 2000), max_size=4)))
        )
        for _ in range(data.draw(st.integers(1, 4))):
            hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
        hello += data.draw(st.binary(max_size=20))
        self.assertMonotonic(sniffServerName, bytes(hello), data.draw(st.integers(0, len(hello))))

    @settings(max_examples=1000)
    @given(
        st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=40)), max_size=6),
        st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=30)), max_size=4),
        st.data(),
    )
    def test_randomExtensions(self, extensions, entries, data: st.DataObject) -> None:
        """
        Hellos with random extensions and random server_name entries give
        safe verdicts, found alike from any prefix.
        """
        extensions = list(extensions)
        extensions.insert(data.draw(st.integers(0, len(extensions))), serverName(*entries))
        hello = frame(Hello(extensions=tuple(extensions)).encode())
        self.assertMonotonic(sniffServerName, hello, data.draw(st.integers(0, len(hello))))

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 20000))
    def test_oversized(self, extra: int) -> None:
        """
        Hellos up to and past the limit: within it the name is found, past
        it the verdict says the hello is too big.
        """
        hello = frame(bigHello("size.example.test", extra))
        limit = 8192
        expected = (
            Sniffed("size.example.test", "SNI")
            if len(hello) <= limit
            else Sniffed(None, f"ClientHello over {limit} bytes", UNREAD)
        )
        self.assertEqual(sniffServerName(hello, limit=limit), expected)


class CountingBytes(bytes):
    """
    Bytes that count how many of themselves are sliced out, to check that a
    sniffer reads each byte it is fed once.
    """

    sliced = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        value = super().__getitem__(index)
        if isinstance(index, slice):
            type(self).sliced += len(value)
        return value


class IncrementalTests(SafeNameMixin, SynchronousTestCase):
    def feedAll(self, sniffer, pieces: list[bytes]):  # type: ignore[no-untyped-def]
        verdicts = [sniffer.feed(piece) for piece in pieces]
        firstVerdict = next((at for at, v in enumerate(verdicts) if v is not None), len(verdicts))
        self.assertEqual(verdicts[firstVerdict:], [verdicts[-1]] * (len(verdicts) - firstVerdict))
        return verdicts[-1] if verdicts else None

    def test_oneByteReads(self) -> None:
        """
        A hello fed one byte at a time gives no verdict until its last byte,
        then the name, and the same verdict for whatever follows.
        """
        hello = realHello("bytes.example.test")
        sniffer = ServerNameSniffer()
        for byte in hello[:-1]:
            self.assertIsNone(sniffer.feed(bytes([byte])))
        self.assertEqual(sniffer.feed(hello[-1:]), Sniffed("bytes.example.test", "SNI"))
        self.assertEqual(sniffer.feed(b"\x17anything"), Sniffed("bytes.example.test", "SNI"))
        self.assertEqual(sniffer.verdict, Sniffed("bytes.example.test", "SNI"))

    def test_eachByteReadOnce(self) -> None:
        """
        However a hello or a request head is cut into reads, each byte fed
        is taken out of its read at most once: nothing is parsed again when
        more arrives.
        """
        message = b"".join(fragments(realHello("once.example.test")))
        tinyRecords = frame(message, [1] * MAX_CLIENT_HELLO_RECORDS)
        head = request(headers=[(b"X-Pad", b"p" * 300)] * 5)
        for data, sniffer in [
            (tinyRecords, ServerNameSniffer()),
            (realHello("once.example.test"), NameSniffer("auto")),
            (head, HostSniffer()),
            (head, NameSniffer("auto")),
        ]:
            CountingBytes.sliced = 0
            for at in range(len(data)):
                sniffer.feed(CountingBytes(data[at : at + 1]))
            self.assertIsNotNone(sniffer.verdict)
            self.assertLessEqual(CountingBytes.sliced, len(data))

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_anySplitSameVerdict(self, data: st.DataObject) -> None:
        """
        Fed in reads cut anywhere, each sniffer gives the verdict it gives
        for all the bytes at once, from the read where that verdict's last
        byte arrives on.
        """
        whole = data.draw(
            st.one_of(
                st.sampled_from(
                    [
                        realHello("split.example.test"),
                        frame(bigHello("split.example.test", 3000), [10, 1, 200]),
                        request(),
                        request(b"localhost"),
                    ]
                ),
                st.binary(max_size=200),
            )
        )
        cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        for make, atOnce in [
            (ServerNameSniffer, sniffServerName),
            (HostSniffer, sniffHost),
            *[(lambda m=mode: NameSniffer(m), lambda d, m=mode: sniffTarget(m, d)) for mode in ("sni", "host", "auto")],
        ]:
            verdict = self.feedAll(make(), pieces)
            self.assertEqual(verdict, atOnce(whole))
            self.assertSafe(verdict)

    def test_finish(self) -> None:
        """
        Finishing before a verdict gives no name with the reason given, and
        that verdict stays; finishing after one gives that one.
        """
        hello = realHello("finish.example.test")
        sniffer = NameSniffer("sni")
        sniffer.feed(hello[:10])
        self.assertEqual(sniffer.finish("timed out"), Sniffed(None, "timed out", UNREAD))
        self.assertEqual(sniffer.feed(hello[10:]), Sniffed(None, "timed out", UNREAD))
        done = NameSniffer("auto")
        done.feed(hello)
        self.assertEqual(done.finish("timed out"), Sniffed("finish.example.test", "SNI"))
        self.assertEqual(NameSniffer("auto").finish("nothing"), Sniffed(None, "nothing"))

    def test_hostBytesPastLimitIgnored(self) -> None:
        """
        The Host sniffer reads no byte past its limit, however they arrive.
        """
        head = request()
        sniffer = HostSniffer(limit=len(head))
        CountingBytes.sliced = 0
        self.assertEqual(
            sniffer.feed(CountingBytes(head + b"x" * 10000)), Sniffed("www.example.test", "Host header")
        )
        self.assertEqual(CountingBytes.sliced, len(head))


# The encrypted_client_hello extension (draft-ietf-tls-esni, section 5).
_ECH_EXTENSION = 0xFE0D
# HPKE: HKDF-SHA256, AES-128-GCM, as Chrome and Firefox offer; an X25519 enc.
_ECH_SUITE = b"\x00\x01\x00\x01"
_X25519_ENC = 32
_AEAD_TAG = 16


def echOuter(
    configId: int = 0x2A, enc: bytes = b"e" * _X25519_ENC, payload: bytes = b"p" * (32 * 5 + _AEAD_TAG),
    suite: bytes = _ECH_SUITE,
) -> tuple[int, bytes]:
    """
    An encrypted_client_hello extension of the outer type.  Its defaults
    have the shape of a real offer and of GREASE ECH alike (section 6.2:
    a config_id, a cipher suite the client supports, an enc of the KEM's
    size, a payload padded to a multiple of 32 plus the AEAD's tag, as
    BoringSSL pads its GREASE).
    """
    return (
        _ECH_EXTENSION,
        b"\x00" + suite + bytes([configId])
        + len(enc).to_bytes(2, "big") + enc + len(payload).to_bytes(2, "big") + payload,
    )


ECH_INNER_EXTENSION = (_ECH_EXTENSION, b"\x01")

# Extensions a hello carries beside these, to put the ECH one among.
_OTHERS = [
    (_GREASE_EXTENSION, b""),
    (10, b"\x00\x04\x00\x1d\x00\x17"),  # supported_groups
    (43, b"\x04\x03\x04\x03\x03"),  # supported_versions
    (51, b"\x00\x26\x00\x1d\x00\x20" + bytes(32)),  # key_share
    (16, b"\x00\x03\x02h2"),  # ALPN
    (_PADDING_EXTENSION, bytes(100)),
]


def echHello(ech: tuple[int, bytes] | None, name: bytes = b"cover.example.test", at: int = 1,
             others: list[tuple[int, bytes]] = _OTHERS) -> bytes:
    """
    A ClientHello message (not framed) for C{name} with the ECH extension
    C{ech} at position C{at} among the others.
    """
    extensions = [serverName((0, name)), *others]
    if ech is not None:
        extensions.insert(at, ech)
    return Hello(cipherSuites=b"\x13\x01\x13\x02", extensions=tuple(extensions)).encode()


class EncryptedClientHelloTests(SynchronousTestCase):
    """
    The encrypted_client_hello extension in ClientHellos built by the test:
    the verdict's C{ech}, and the name read marked as the outer (cover)
    name.
    """

    def test_noExtension(self) -> None:
        """
        A hello without the extension, OpenSSL's or built, says no ECH, and
        its name is no cover name.
        """
        for hello in (realHello("plain.example.test"), frame(echHello(None))):
            verdict = sniffServerName(hello)
            self.assertIsNone(verdict.ech)
            self.assertIsNotNone(verdict.name)
            self.assertFalse(verdict.coverName)

    def test_outer(self) -> None:
        """
        The outer type with a real offer's shape is C{ech}; the name read is
        the outer name, marked as a cover.
        """
        verdict = sniffServerName(frame(echHello(echOuter())))
        self.assertEqual(verdict, Sniffed("cover.example.test", "SNI", ECH))
        self.assertTrue(verdict.coverName)

    @given(
        st.integers(0, 255),
        st.sampled_from([b"\x00\x01\x00\x01", b"\x00\x01\x00\x03", b"\x00\x02\x00\x02"]),
        st.sampled_from([32, 65, 97, 1120]),
        st.integers(128 // 32, 224 // 32),
        st.binary(min_size=32, max_size=32),
    )
    def test_greaseLooksReal(self, configId: int, suite: bytes, encSize: int, blocks: int, noise: bytes) -> None:
        """
        GREASE ECH as section 6.2 and BoringSSL build it (a random
        config_id, a supported cipher suite, a random enc of a KEM's size,
        a random payload of 32 * (4..7) bytes plus the tag) is C{ech}: the
        bytes cannot tell it from a real offer, only the server can.
        """
        enc = (noise * 40)[:encSize]
        payload = (noise * 8)[: 32 * blocks] + noise[:_AEAD_TAG]
        verdict = sniffServerName(frame(echHello(echOuter(configId, enc, payload, suite))))
        self.assertEqual(verdict.ech, ECH)
        self.assertTrue(verdict.coverName)

    def test_greaseByShape(self) -> None:
        """
        An outer extension that cannot be a real offer is C{grease}, and
        the name is then not marked as a cover: an empty enc (only a hello
        after a HelloRetryRequest leaves it empty), or a payload too short
        for any encrypted ClientHelloInner (under 71 bytes).  A payload of
        71 bytes can be real.
        """
        for extension, expected in [
            (echOuter(enc=b""), ECH_GREASE),
            (echOuter(payload=b"p"), ECH_GREASE),
            (echOuter(payload=b"p" * 70), ECH_GREASE),
            (echOuter(payload=b"p" * 71), ECH),
        ]:
            verdict = sniffServerName(frame(echHello(extension)))
            self.assertEqual(verdict.ech, expected, extension)
            self.assertEqual(verdict.name, "cover.example.test")
            self.assertEqual(verdict.coverName, expected == ECH)

    def test_inner(self) -> None:
        """
        The inner type on the wire is C{inner}: it belongs inside the
        encryption, and the name beside it is the real one, not a cover.
        """
        verdict = sniffServerName(frame(echHello(ECH_INNER_EXTENSION)))
        self.assertEqual(verdict, Sniffed("cover.example.test", "SNI", ECH_INNER))
        self.assertFalse(verdict.coverName)

    def test_malformedStillECH(self) -> None:
        """
        A malformed ECH extension makes the hello malformed (no name), and
        the verdict still says C{ech}, so that rules about ECH still apply.
        """
        good = echOuter()[1]
        for content, why in [
            (b"\x02" + good[1:], "ECH type 2"),
            (b"\x01\x00", "bytes after the inner ECH type"),
            (good + b"x", "bytes after the ECH payload"),
            (good[:-20], "ECH payload length 176 runs past its enclosing structure"),
            (b"\x00" + _ECH_SUITE + b"\x2a\x00\x00\x00\x00", "empty ECH payload"),
            (b"", "ECH type runs past its enclosing structure"),
        ]:
            verdict = sniffServerName(frame(echHello((_ECH_EXTENSION, content))))
            self.assertEqual(verdict, Sniffed(None, f"malformed ClientHello: {why}", ECH), why)

    def test_malformedAfterECH(self) -> None:
        """
        A hello malformed after its ECH extension still says C{ech}, as
        does one cut short once the extension's type was read; one
        malformed or cut short before it says C{unknown}: the rest might
        have held one.
        """
        broken = (_PADDING_EXTENSION, bytes(10))
        after = sniffServerName(frame(echHello(echOuter(), others=[broken, broken])))
        self.assertEqual(after, Sniffed(None, "malformed ClientHello: extension 21 twice", ECH))
        before = sniffServerName(frame(echHello(echOuter(), at=3, others=[broken, broken])))
        self.assertEqual(before, Sniffed(None, "malformed ClientHello: extension 21 twice", UNREAD))
        last = frame(echHello(echOuter(), at=len(_OTHERS) + 1))
        extensionSize = 4 + len(echOuter()[1])
        for cut, expected in [(extensionSize + 1, UNREAD), (extensionSize - 4, ECH), (20, ECH)]:
            sniffer = NameSniffer("auto")
            self.assertIsNone(sniffer.feed(last[:-cut]))
            self.assertEqual(sniffer.finish("timed out"), Sniffed(None, "timed out", expected), cut)

    def test_notTLS(self) -> None:
        """
        What is not a TLS handshake says no ECH, not C{unknown}: an HTTP
        request, other bytes, nothing at all.
        """
        self.assertIsNone(sniffTarget("auto", request()).ech)
        self.assertIsNone(sniffTarget("auto", b"SSH-2.0-OpenSSH_9.2\r\n").ech)
        self.assertIsNone(sniffServerName(b"\x16\x02").ech)
        self.assertIsNone(NameSniffer("sni").finish("nothing").ech)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([echOuter(), echOuter(enc=b""), ECH_INNER_EXTENSION, (_ECH_EXTENSION, b"\x07"), None]),
        st.permutations(_OTHERS),
        st.data(),
    )
    def test_anyPositionAnySplit(self, ech, others, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
        """
        With the extension at any position among the others, the hello cut
        into records of any sizes and the records into reads anywhere, the
        sniffer never fails and gives the verdict it gives for the whole
        hello at once, which is the one the extension calls for.
        """
        at = data.draw(st.integers(0, len(others) + 1))
        message = echHello(ech, others=list(others), at=at)
        sizes = data.draw(st.lists(st.integers(1, 400), max_size=MAX_CLIENT_HELLO_RECORDS - 2))
        whole = frame(message, sizes)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=12)))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        atOnce = sniffServerName(whole)
        for sniffer in (ServerNameSniffer(), NameSniffer("sni"), NameSniffer("auto")):
            verdicts = [sniffer.feed(piece) for piece in pieces]
            self.assertEqual(verdicts[-1], atOnce)
        if ech is None:
            self.assertEqual(atOnce, Sniffed("cover.example.test", "SNI"))
        elif ech == echOuter():
            self.assertEqual(atOnce, Sniffed("cover.example.test", "SNI", ECH))
        elif ech == echOuter(enc=b""):
            self.assertEqual(atOnce, Sniffed("cover.example.test", "SNI", ECH_GREASE))
        elif ech == ECH_INNER_EXTENSION:
            self.assertEqual(atOnce, Sniffed("cover.example.test", "SNI", ECH_INNER))
        else:
            self.assertEqual(atOnce, Sniffed(None, "malformed ClientHello: ECH type 7", ECH))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=0, max_size=300), st.integers(0, len(_OTHERS) + 1), st.data())
    def test_arbitraryContent(self, content: bytes, at: int, data: st.DataObject) -> None:
        """
        Any bytes as the extension's content, split anywhere, never crash
        the sniffer; the verdict is the same however split and always says
        ECH in some form.
        """
        whole = frame(echHello((_ECH_EXTENSION, content), at=at))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        atOnce = sniffServerName(whole)
        sniffer = ServerNameSniffer()
        self.assertEqual([sniffer.feed(piece) for piece in pieces][-1], atOnce)
        self.assertIn(atOnce.ech, (ECH, ECH_GREASE, ECH_INNER))


class LocalhostTests(SynchronousTestCase):
    refused = ["localhost", "LOCALHOST", "localhost.", "a.localhost", "x.y.LocalHost."]
    allowed = ["localhost.example.test", "notlocalhost", "localhosts", "localhost-1.test"]

    def test_predicate(self) -> None:
        """
        C{localhost} and names under it are localhost names; names that
        only look alike are not.
        """
        for name in ["localhost", "a.localhost", "b.a.localhost"]:
            self.assertTrue(isLocalhostName(name), name)
        for name in self.allowed:
            self.assertFalse(isLocalhostName(name), name)

    def test_serverName(self) -> None:
        """
        A server name that is C{localhost} or under it is refused: the
        proxy would connect to itself.
        """
        for name in self.refused:
            expected = name.lower().removesuffix(".")
            self.assertEqual(
                sniffServerName(withName(name.encode())),
                Sniffed(None, f"server name is a localhost name: {expected}"),
            )
        for name in self.allowed:
            self.assertEqual(sniffServerName(withName(name.encode())), Sniffed(name, "SNI"))

    def test_hostHeader(self) -> None:
        """
        A Host header that is C{localhost} or under it, with or without a
        port, is refused.
        """
        for name in self.refused:
            expected = name.lower().removesuffix(".")
            for value in (name, name + ":8080"):
                self.assertEqual(
                    sniffHost(request(value.encode())),
                    Sniffed(None, f"Host header is a localhost name: {expected}"),
                )
        for name in self.allowed:
            self.assertEqual(sniffHost(request(name.encode())), Sniffed(name, "Host header"))


def request(
    host: bytes | None = b"www.example.test",
    headers: list[tuple[bytes, bytes]] = (),
    requestLine: bytes = b"GET / HTTP/1.1",
) -> bytes:
    """
    An HTTP request head with C{host} as its Host header (none if None).
    """
    lines = [requestLine]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


_TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits, min_size=1, max_size=12
)
_FIELD_VALUE = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t")
)


class HostTests(SafeNameMixin, SynchronousTestCase):
    def test_host(self) -> None:
        """
        The Host header of a request is found.
        """
        self.assertEqual(sniffHost(request()), Sniffed("www.example.test", "Host header"))

    @settings(max_examples=500)
    @given(
        hostnames,
        st.one_of(st.none(), st.integers(0, 99999).map(str), st.just("")),
        st.lists(st.tuples(_TOKEN.filter(lambda t: t.lower() != "host"), _FIELD_VALUE), max_size=6),
        st.data(),
    )
    def test_hostNames(self, name: str, port: str | None, headers, data: st.DataObject) -> None:
        """
        Any valid name comes back lowercased, without a trailing dot or the
        port, wherever the Host header is among the others and however its
        name is capitalized.
        """
        value = name if port is None else f"{name}:{port}"
        spelling = data.draw(st.sampled_from([b"Host", b"host", b"HOST", b"hOsT"]))
        headers = [(n.encode(), v) for n, v in headers]
        headers.insert(data.draw(st.integers(0, len(headers))), (spelling, value.encode()))
        method = data.draw(_TOKEN).encode()
        head = request(None, headers, method + b" /x?y=1 HTTP/1.0")
        self.assertEqual(sniffHost(head), Sniffed(name.lower().removesuffix("."), "Host header"))

    def test_whitespaceAroundValue(self) -> None:
        """
        Spaces and tabs around the value are not part of it.
        """
        self.assertEqual(
            sniffHost(b"GET / HTTP/1.1\r\nHost:\t a.test \t\r\n\r\n"),
            Sniffed("a.test", "Host header"),
        )

    def test_everyPrefix(self) -> None:
        """
        Split anywhere, a request gives no verdict until the empty line
        ends, and the same verdict with a body after it.
        """
        head = request(headers=[(b"User-Agent", b"curl/8"), (b"Accept", b"*/*")])
        for cut in range(len(head)):
            self.assertIsNone(sniffHost(head[:cut]), cut)
        self.assertEqual(sniffHost(head), Sniffed("www.example.test", "Host header"))
        self.assertEqual(
            sniffHost(head + b"body bytes"), Sniffed("www.example.test", "Host header")
        )

    @settings(max_examples=500)
    @given(
        invalidNames.filter(
            lambda n: not set(n) & set("\r\n:") and n == n.strip(" \t") and n != "."
        )
    )
    def test_invalidNames(self, name: str) -> None:
        """
        A Host that is not a hostname is refused, and the reason says so.
        """
        verdict = sniffHost(b"GET / HTTP/1.1\r\nHost: " + name.encode("utf-8") + b"\r\n\r\n")
        if verdict.reason.startswith("malformed header line"):
            # Control characters break the header line itself.
            self.assertTrue(set(name) & set("\x00\x7f"), name)
            return
        self.assertIsNone(verdict.name)
        self.assertTrue(verdict.reason.startswith("invalid Host header: "), verdict.reason)

    @given(numericNames, st.booleans())
    def test_ipv4(self, name: str, withPort: bool) -> None:
        """
        An IPv4 address, or what a resolver would take for one, gives no
        name.
        """
        value = name + (":80" if withPort else "")
        self.assertEqual(
            sniffHost(request(value.encode())),
            Sniffed(None, f"Host header is an IP address: {name.removesuffix('.')}"),
        )

    @given(st.ip_addresses(v=6), st.booleans())
    def test_ipv6(self, address: ipaddress.IPv6Address, withPort: bool) -> None:
        """
        A bracketed IPv6 literal gives no name.
        """
        value = f"[{address}]" + (":8080" if withPort else "")
        self.assertEqual(
            sniffHost(request(value.encode())),
            Sniffed(None, f"Host header is an IP address: [{address}]"),
        )

    def test_invalidHostValues(self) -> None:
        """
        Bad brackets, ports that are not numbers, user info, unbracketed
        IPv6 are refused as invalid.
        """
        for value in [
            b"[::1",
            b"[nothost]",
            b"[::1]x",
            b"[::1]:a",
            b"a.test:x",
            b"a.test:80:80",
            b"u@a.test",
            b"::1",
        ]:
            self.assertEqual(
                sniffHost(request(value)).reason[: len("invalid Host header: ")],
                "invalid Host header: ",
                value,
            )

    def test_noHost(self) -> None:
        """
        A request without a Host header, or with an empty one, says so.
        """
        self.assertEqual(
            sniffHost(request(None, [(b"Accept", b"*/*")])), Sniffed(None, "no Host header")
        )
        self.assertEqual(sniffHost(request(b"")), Sniffed(None, "empty Host header"))

    def test_severalHosts(self) -> None:
        """
        Two Host headers are refused, even with the same value: a proxy and
        the server might each believe another one.
        """
        for other in [b"www.example.test", b"other.test"]:
            self.assertEqual(
                sniffHost(request(headers=[(b"host", other)])),
                Sniffed(None, "several Host headers"),
            )

    def test_malformedHeaderLines(self) -> None:
        """
        A folded line, a space before the colon, a line without a colon, a
        bare LF or a NUL in a header line is refused.
        """
        for line in [
            b" folded",
            b"Host : a.test",
            b"NoColon",
            b"X: a\nb",
            b"X: a\x00b",
            b": empty",
        ]:
            head = b"GET / HTTP/1.1\r\nHost: a.test\r\n" + line + b"\r\n\r\n"
            self.assertTrue(sniffHost(head).reason.startswith("malformed header line: "), line)

    def test_notHTTPAtOnce(self) -> None:
        """
        Bytes that cannot begin an HTTP/1.x request line are refused as soon
        as they are seen.
        """
        for data in [
            b"\x00",
            b"{",
            b"GET\t",
            b"GET  ",
            b"GET /\x01",
            b"GET / HTTP/2",
            b"GET / http",
            b"GET / HTTP/1.1x",
            b"GET / HTTP/1.1\n",
            b"GET /\r",
            b"GET / HTTP/1.1 x",
        ]:
            self.assertEqual(sniffHost(data), Sniffed(None, "not an HTTP request"), data)

    def test_http2Preface(self) -> None:
        """
        HTTP/2's connection preface is not an HTTP/1.x request, and is
        refused before its first line ends.
        """
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        self.assertEqual(sniffHost(preface[:12]), Sniffed(None, "not an HTTP request"))

    def test_overLimit(self) -> None:
        """
        A header block that does not end within the limit is refused; one
        that ends exactly at it is read.
        """
        head = request(headers=[(b"X-Pad", b"p" * 200)])
        self.assertEqual(
            sniffHost(head, limit=len(head)), Sniffed("www.example.test", "Host header")
        )
        self.assertEqual(
            sniffHost(head, limit=len(head) - 1),
            Sniffed(None, f"HTTP request header over {len(head) - 1} bytes"),
        )
        self.assertIsNone(sniffHost(head[: len(head) - 2], limit=len(head) - 1))
        endless = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000
        self.assertEqual(
            sniffHost(endless),
            Sniffed(None, f"HTTP request header over {MAX_REQUEST_HEADER_BYTES} bytes"),
        )
        self.assertEqual(
            sniffHost(b"GET /" + b"a" * 9000),
            Sniffed(None, f"HTTP request header over {MAX_REQUEST_HEADER_BYTES} bytes"),
        )

    @settings(max_examples=3000)
    @given(st.binary(max_size=300), st.integers(0, 300))
    def test_arbitraryBytes(self, data: bytes, cut: int) -> None:
        """
        Arbitrary bytes, bare or behind a request line, give safe verdicts
        that do not change with more bytes.
        """
        self.assertMonotonic(sniffHost, data, cut)
        self.assertMonotonic(sniffHost, b"GET / HTTP/1.1\r\n" + data, cut + 16)

    @settings(max_examples=1000)
    @given(
        st.lists(st.tuples(_TOKEN, _FIELD_VALUE), max_size=6),
        st.binary(max_size=30),
        st.data(),
    )
    def test_randomHeaders(self, headers, tail: bytes, data: st.DataObject) -> None:
        """
        Requests with random headers, Host among them or not, give safe
        verdicts found alike from any prefix.
        """
        head = request(None, [(n.encode(), v) for n, v in headers]) + tail
        self.assertMonotonic(sniffHost, head, data.draw(st.integers(0, len(head))))


class TargetTests(SynchronousTestCase):
    def test_modes(self) -> None:
        """
        C{sni} and C{host} use their parser whatever the bytes are.
        """
        hello = realHello("mode.example.test")
        self.assertEqual(sniffTarget("sni", hello), sniffServerName(hello))
        self.assertEqual(sniffTarget("host", request()), sniffHost(request()))
        self.assertEqual(sniffTarget("sni", request()), Sniffed(None, "not a TLS handshake"))
        self.assertEqual(sniffTarget("host", hello), Sniffed(None, "not an HTTP request"))

    def test_autoTLS(self) -> None:
        """
        In C{auto}, a handshake record is read for SNI.
        """
        hello = realHello("auto.example.test")
        self.assertEqual(sniffTarget("auto", hello), Sniffed("auto.example.test", "SNI"))
        self.assertIsNone(sniffTarget("auto", hello[:1]))

    def test_autoHTTP(self) -> None:
        """
        In C{auto}, an uppercase first byte is read as an HTTP request.
        """
        self.assertEqual(sniffTarget("auto", request()), Sniffed("www.example.test", "Host header"))
        self.assertIsNone(sniffTarget("auto", b"G"))

    def test_autoEmpty(self) -> None:
        """
        With no bytes yet, C{auto} waits.
        """
        self.assertIsNone(sniffTarget("auto", b""))

    @given(
        st.binary(min_size=1, max_size=50).filter(
            lambda b: b[0] != 0x16 and not 0x41 <= b[0] <= 0x5A
        )
    )
    def test_autoOther(self, data: bytes) -> None:
        """
        In C{auto}, anything else is refused from its first byte.
        """
        self.assertEqual(
            sniffTarget("auto", data[:1]),
            Sniffed(None, "neither a TLS handshake nor an HTTP request"),
        )
        self.assertEqual(sniffTarget("auto", data), sniffTarget("auto", data[:1]))

    def test_unknownMode(self) -> None:
        """
        An unknown mode is a programming error.
        """
        self.assertRaises(ValueError, sniffTarget, "ip", b"x")
