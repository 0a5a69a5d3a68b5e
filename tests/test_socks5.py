"""
Tests for L{shifter.upstream.socks5}: the SOCKS5 messages Shifter sends and
the reader of the server's answers, on plain bytes.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import InvalidAuthority
from shifter.upstream.socks5 import (
    AUTH_REFUSED,
    DONE,
    MAX_REPLY_BYTES,
    REPLIES,
    Socks5Error,
    Socks5Handshake,
    checkCredentials,
    formatConnectRequest,
    formatGreeting,
    formatPasswordRequest,
)

REQUEST = formatConnectRequest("203.0.113.7", 443)
GRANTED_V4 = b"\x05\x00\x00\x01\xc0\x00\x02\x01\x9c\x40"
CREDENTIALS = (b"alice", b"s3cret")


def _handshake(credentials=None):  # type: ignore[no-untyped-def]
    return Socks5Handshake(REQUEST, credentials)


class RequestTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """
        An IPv4 destination is sent as address type 1 with its four bytes.
        """
        self.assertEqual(formatConnectRequest("203.0.113.7", 443), b"\x05\x01\x00\x01\xcb\x00\x71\x07\x01\xbb")

    def test_ipv6(self) -> None:
        """
        An IPv6 destination is sent as address type 4 with its sixteen bytes.
        """
        self.assertEqual(
            formatConnectRequest("2001:db8::7", 8443),
            b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000007") + b"\x20\xfb",
        )

    def test_name(self) -> None:
        """
        A hostname is sent as a name (address type 3), for the server to
        resolve, never resolved by Shifter.
        """
        self.assertEqual(
            formatConnectRequest("www.example.test", 443),
            b"\x05\x01\x00\x03\x10www.example.test\x01\xbb",
        )

    def test_refused(self) -> None:
        """
        A host or port that no CONNECT may carry is refused here too.
        """
        for host, port in [("a b", 443), ("127.1", 443), ("fe80::1%eth0", 443), ("", 443), ("x.test", 0),
                           ("x.test", 65536)]:
            self.assertRaises(InvalidAuthority, formatConnectRequest, host, port)

    def test_greeting(self) -> None:
        """
        Without credentials only "no authentication" is offered; with them,
        username/password as well.
        """
        self.assertEqual(formatGreeting(False), b"\x05\x01\x00")
        self.assertEqual(formatGreeting(True), b"\x05\x02\x00\x02")

    def test_passwordRequest(self) -> None:
        """
        The RFC 1929 request: version 1, then each field after its length.
        """
        self.assertEqual(formatPasswordRequest(*CREDENTIALS), b"\x01\x05alice\x06s3cret")

    def test_credentialLimits(self) -> None:
        """
        A username must be 1 to 255 bytes, a password at most 255; UTF-8.
        """
        self.assertEqual(checkCredentials("é", ""), ("é".encode(), b""))
        self.assertRaises(ValueError, checkCredentials, "", "x")
        self.assertRaises(ValueError, checkCredentials, "u" * 256, "x")
        self.assertRaises(ValueError, checkCredentials, "u", "p" * 256)
        self.assertEqual(len(checkCredentials("u" * 255, "p" * 255)[1]), 255)


class HandshakeTests(SynchronousTestCase):
    def test_noAuthentication(self) -> None:
        """
        When the server chooses no authentication, the CONNECT request
        follows at once, and a success reply opens the tunnel.
        """
        hs = _handshake()
        self.assertEqual(hs.greeting(), b"\x05\x01\x00")
        self.assertEqual(hs.feed(b"\x05\x00"), (REQUEST, None))
        send, answer = hs.feed(GRANTED_V4)
        self.assertEqual(send, b"")
        assert answer is not None
        self.assertTrue(answer.opensTunnel)
        self.assertEqual(answer.leftover, b"")
        self.assertEqual(hs.state, DONE)

    def test_usernamePassword(self) -> None:
        """
        When the server chooses username/password, the credentials go
        first; the CONNECT request only once the server accepted them.
        """
        hs = _handshake(CREDENTIALS)
        self.assertEqual(hs.greeting(), b"\x05\x02\x00\x02")
        self.assertEqual(hs.feed(b"\x05\x02"), (b"\x01\x05alice\x06s3cret", None))
        self.assertEqual(hs.feed(b"\x01\x00"), (REQUEST, None))
        answer = hs.feed(GRANTED_V4)[1]
        assert answer is not None
        self.assertTrue(answer.opensTunnel)

    def test_credentialsOfferedServerSaysNone(self) -> None:
        """
        Credentials are offered, not forced: a server that needs none gets
        none.
        """
        hs = _handshake(CREDENTIALS)
        self.assertEqual(hs.feed(b"\x05\x00"), (REQUEST, None))

    def test_leftover(self) -> None:
        """
        Bytes after a success reply, in the same read, belong to the tunnel.
        """
        hs = _handshake()
        hs.feed(b"\x05\x00")
        answer = hs.feed(GRANTED_V4 + b"SSH-2.0-x\r\n")[1]
        assert answer is not None
        self.assertEqual(answer.leftover, b"SSH-2.0-x\r\n")

    def test_boundAddressKinds(self) -> None:
        """
        A reply's bound address may be IPv4, IPv6 or a name; each is read
        to its exact length.
        """
        for bound in (b"\x01" + bytes(4), b"\x04" + bytes(16), b"\x03\x09proxy.lan"):
            hs = _handshake()
            hs.feed(b"\x05\x00")
            answer = hs.feed(b"\x05\x00\x00" + bound + b"\x04\x38" + b"tail")[1]
            assert answer is not None
            self.assertEqual(answer.leftover, b"tail")

    @given(st.data())
    def test_splitAnywhere(self, data: st.DataObject) -> None:
        """
        The answers may come in any pieces: the outcome is the same.
        """
        stream = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x03\x05a.lan\x01\xbb" + b"tunnel"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        hs = _handshake(CREDENTIALS)
        sent = tunnel = b""
        answer = None
        bounds = [0] + cuts + [len(stream)]
        for start, end in zip(bounds, bounds[1:]):
            if start == end:
                continue
            if answer is not None:
                tunnel += stream[start:end]  # the tunnel's, once answered
                continue
            out, answer = hs.feed(stream[start:end])
            sent += out
            if answer is not None:
                tunnel += answer.leftover
        assert answer is not None
        self.assertEqual(sent, formatPasswordRequest(*CREDENTIALS) + REQUEST)
        self.assertTrue(answer.opensTunnel)
        self.assertEqual(tunnel, b"tunnel")

    def test_everyReplyCode(self) -> None:
        """
        Every reply code of RFC 1928 is an answer with a line that names it
        in SOCKS's words, and a status that counts it: the ruleset's refusal
        ends the tunnel (403), every other failure tries the next proxy
        (5xx).
        """
        expected = {
            1: ("general SOCKS server failure", 502),
            2: ("connection not allowed by ruleset", 403),
            3: ("network unreachable", 502),
            4: ("host unreachable", 502),
            5: ("connection refused", 502),
            6: ("TTL expired", 504),
            7: ("command not supported", 501),
            8: ("address type not supported", 501),
        }
        self.assertEqual(REPLIES, expected)
        for code, (text, status) in expected.items():
            hs = _handshake()
            hs.feed(b"\x05\x00")
            answer = hs.feed(b"\x05" + bytes((code,)) + b"\x00\x01" + bytes(6))[1]
            assert answer is not None
            self.assertFalse(answer.opensTunnel)
            self.assertEqual(answer.status, status)
            self.assertEqual(answer.refusal, f"SOCKS5 server answered {code:#04x} ({text})")

    def test_unassignedReplyCode(self) -> None:
        """
        A reply code RFC 1928 does not assign is a failure that tries the
        next proxy, named as such.
        """
        hs = _handshake()
        hs.feed(b"\x05\x00")
        answer = hs.feed(b"\x05\x42\x00\x01" + bytes(6))[1]
        assert answer is not None
        self.assertEqual(answer.status, 502)
        self.assertEqual(answer.refusal, "SOCKS5 server answered 0x42 (unassigned reply code)")

    def test_noAcceptableMethodWithoutCredentials(self) -> None:
        """
        A server that accepts no offered method, when Shifter has no
        credentials, is counted as wanting authentication, and the line
        says none are configured.
        """
        answer = _handshake().feed(b"\x05\xff")[1]
        assert answer is not None
        self.assertEqual(answer.status, AUTH_REFUSED)
        self.assertIn("none are configured", answer.refusal)

    def test_noAcceptableMethodWithCredentials(self) -> None:
        """
        The same with credentials names both methods offered.
        """
        answer = _handshake(CREDENTIALS).feed(b"\x05\xff")[1]
        assert answer is not None
        self.assertEqual(answer.status, AUTH_REFUSED)
        self.assertEqual(
            answer.refusal,
            "SOCKS5 server accepts none of the offered methods (no authentication, username/password)",
        )

    def test_passwordRefused(self) -> None:
        """
        A username/password refused is an authentication failure with its
        status in the line, and no CONNECT is sent.
        """
        hs = _handshake(CREDENTIALS)
        hs.feed(b"\x05\x02")
        send, answer = hs.feed(b"\x01\x01")
        self.assertEqual(send, b"")
        assert answer is not None
        self.assertEqual(answer.status, AUTH_REFUSED)
        self.assertEqual(answer.refusal, "SOCKS5 server refused the username and password (RFC 1929 status 0x01)")

    def test_methodNotOffered(self) -> None:
        """
        A server choosing a method Shifter did not offer (username/password
        without credentials, GSSAPI) is refused as garbage.
        """
        for choice in (b"\x05\x02", b"\x05\x01", b"\x05\x80"):
            self.assertRaises(Socks5Error, _handshake().feed, choice)

    def test_wrongVersions(self) -> None:
        """
        A wrong version byte in any answer is refused as soon as it comes.
        """
        self.assertRaises(Socks5Error, _handshake().feed, b"\x04")
        hs = _handshake(CREDENTIALS)
        hs.feed(b"\x05\x02")
        self.assertRaises(Socks5Error, hs.feed, b"\x05")
        hs = _handshake()
        hs.feed(b"\x05\x00")
        self.assertRaises(Socks5Error, hs.feed, b"\x04")

    def test_httpAnswerNamed(self) -> None:
        """
        An HTTP proxy configured as a SOCKS5 one is recognised in the line.
        """
        e = self.assertRaises(Socks5Error, _handshake().feed, b"HTTP/1.1 400 Bad Request\r\n")
        self.assertIn("is it an HTTP proxy?", str(e))

    def test_badReplyFields(self) -> None:
        """
        A reply with a reserved byte other than 0, an unknown address type
        or an empty bound name is refused as soon as that byte comes.
        """
        for reply in (b"\x05\x00\x01", b"\x05\x00\x00\x02", b"\x05\x00\x00\x03\x00"):
            hs = _handshake()
            hs.feed(b"\x05\x00")
            self.assertRaises(Socks5Error, hs.feed, reply)

    def test_truncatedWaits(self) -> None:
        """
        An answer cut short is waited for, not guessed at: a prefix of a
        valid answer gives nothing yet (the tunnel's handshake deadline
        bounds the wait).
        """
        hs = _handshake()
        self.assertEqual(hs.feed(b"\x05"), (b"", None))
        self.assertEqual(hs.feed(b"\x00"), (REQUEST, None))
        for i in range(len(GRANTED_V4) - 1):
            self.assertEqual(hs.feed(GRANTED_V4[i:i + 1]), (b"", None))
        self.assertIsNotNone(hs.feed(GRANTED_V4[-1:])[1])

    def test_bytesAfterDone(self) -> None:
        """
        The handshake reads nothing after it ended.
        """
        hs = _handshake()
        hs.feed(b"\x05\xff")
        self.assertRaises(Socks5Error, hs.feed, b"x")

    def test_boundedReads(self) -> None:
        """
        An answer never needs more than L{MAX_REPLY_BYTES}: the longest
        valid reply is read whole at that length, and its tunnel bytes
        begin right after it.
        """
        longest = b"\x05\x00\x00\x03\xff" + b"a" * 255 + b"\x00\x50"
        self.assertEqual(len(longest), MAX_REPLY_BYTES)
        hs = _handshake()
        hs.feed(b"\x05\x00")
        answer = hs.feed(longest + b"x" * 1000)[1]
        assert answer is not None
        self.assertEqual(answer.leftover, b"x" * 1000)

    @settings(max_examples=500)
    @given(st.binary(max_size=300), st.booleans())
    def test_arbitraryBytes(self, data: bytes, withCredentials: bool) -> None:
        """
        Whatever the server sends, the reader answers, waits or refuses
        with L{Socks5Error}; it never fails otherwise, and what it asks to
        send is only ever Shifter's own messages.
        """
        hs = _handshake(CREDENTIALS if withCredentials else None)
        allowed = {b"", REQUEST, formatPasswordRequest(*CREDENTIALS)}
        try:
            send, answer = hs.feed(data)
        except Socks5Error:
            return
        self.assertTrue(send in allowed or send == formatPasswordRequest(*CREDENTIALS) + REQUEST, send)
        if answer is not None:
            self.assertIsInstance(answer.status, int)
            self.assertLessEqual(len(data) - len(answer.leftover), 2 + 2 + MAX_REPLY_BYTES)

    @settings(max_examples=300)
    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=10))
    def test_arbitraryPieces(self, pieces: list[bytes]) -> None:
        """
        Fed in arbitrary pieces, the reader never fails with anything but
        L{Socks5Error}, and gives at most one answer.
        """
        hs = _handshake(CREDENTIALS)
        answers = 0
        try:
            for piece in pieces:
                answers += hs.feed(piece)[1] is not None
        except Socks5Error:
            pass
        self.assertLessEqual(answers, 1)
