"""
Tests for L{shifter.upstream.connect}: the CONNECT request and the parser of the
proxy's answer, on plain bytes.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import (
    MAX_RESPONSE_HEADER_BYTES,
    ConnectResponseParser,
    ProxyResponseError,
    formatAuthority,
    formatConnectRequest,
)

OK = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 squid\r\n\r\n"


class ConnectRequestTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """
        The request names the destination as address:port in the request
        line and in the Host header.
        """
        self.assertEqual(
            formatConnectRequest("203.0.113.7", 443),
            b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n\r\n",
        )

    def test_ipv6InBrackets(self) -> None:
        """
        IPv6 literals are written in brackets, compressed.
        """
        self.assertEqual(
            formatConnectRequest("2001:0db8:0002:0000::7", 8443),
            b"CONNECT [2001:db8:2::7]:8443 HTTP/1.1\r\nHost: [2001:db8:2::7]:8443\r\n\r\n",
        )

    def test_hostname(self) -> None:
        """
        A valid hostname is used as it is.
        """
        self.assertEqual(formatAuthority("www.example.test", 443), "www.example.test:443")

    def test_extraHeaders(self) -> None:
        """
        Extra headers follow the Host header.
        """
        self.assertEqual(
            formatConnectRequest("192.0.2.1", 443, [("Proxy-Authorization", "Basic eDp5")]),
            b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n"
            b"Proxy-Authorization: Basic eDp5\r\n\r\n",
        )

    def test_injectionRefused(self) -> None:
        """
        A host that is neither an address nor a hostname, a port out of
        range, or a header with a line break cannot make it into a request.
        """
        for host in ["evil.test:80 HTTP/1.1\r\nX: y", "a b", "", "x" * 300, "a..b", "-a.test"]:
            self.assertRaises(ValueError, formatAuthority, host, 443)
        for port in [0, 65536, -1]:
            self.assertRaises(ValueError, formatAuthority, "192.0.2.1", port)
        self.assertRaises(
            ValueError, formatConnectRequest, "192.0.2.1", 443, [("X", "a\r\nInjected: 1")]
        )


class ConnectResponseParserTests(SynchronousTestCase):
    def test_complete(self) -> None:
        """
        A whole answer in one piece gives its status, reason and headers.
        """
        response = ConnectResponseParser().feed(OK)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.reason, "Connection established")
        self.assertEqual(response.headers, [(b"Via", b"1.1 squid")])
        self.assertEqual(response.leftover, b"")
        self.assertTrue(response.opensTunnel)

    @given(st.data())
    def test_splitAnywhere(self, data: st.DataObject) -> None:
        """
        The answer may arrive split at any byte positions; the result is the
        same, and nothing is returned before the header block ends.
        """
        wire = OK + b"tunnel bytes"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
        pieces = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
        parser = ConnectResponseParser()
        fed = b""
        for piece in pieces:
            fed += piece
            response = parser.feed(piece)
            if response is not None:
                break
            self.assertLess(len(fed), len(OK))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers, [(b"Via", b"1.1 squid")])
        # What came after the header block in the final piece is tunnel data.
        self.assertEqual(response.leftover, fed[len(OK) :])

    def test_leftoverTunnelBytes(self) -> None:
        """
        Bytes after the empty line, received in the same read, are tunnel
        bytes, kept exactly.
        """
        response = ConnectResponseParser().feed(OK + b"\x16\x03\x01server hello")
        self.assertEqual(response.leftover, b"\x16\x03\x01server hello")

    def test_commonAnswerAsParsed(self) -> None:
        """
        Squid's usual answer, whole in one read (known without parsing),
        gives what parsing it gives: status, reason, no headers, the
        version, and the tunnel bytes behind it.
        """
        from shifter.upstream import connect

        for version in (b"1.1", b"1.0"):
            answer = b"HTTP/" + version + b" 200 Connection established\r\n\r\n"
            fast = ConnectResponseParser().feed(answer + b"\x16\x03")
            common, connect._COMMON_ANSWERS = connect._COMMON_ANSWERS, ()
            try:
                parsed = ConnectResponseParser().feed(answer + b"\x16\x03")
            finally:
                connect._COMMON_ANSWERS = common
            self.assertEqual(fast, parsed)
            self.assertEqual((fast.status, fast.version, fast.leftover), (200, version.decode(), b"\x16\x03"))

    def test_http10(self) -> None:
        """
        An HTTP/1.0 answer is accepted, and the reason phrase may be empty.
        """
        response = ConnectResponseParser().feed(b"HTTP/1.0 200\r\n\r\n")
        self.assertEqual((response.status, response.reason), (200, ""))

    def test_non2xx(self) -> None:
        """
        Non-2xx answers parse, and do not open the tunnel.
        """
        for status in (101, 302, 403, 407, 502, 503):
            response = ConnectResponseParser().feed(b"HTTP/1.1 %d No\r\n\r\n" % status)
            self.assertEqual(response.status, status)
            self.assertFalse(response.opensTunnel)

    def test_garbageRefusedAtOnce(self) -> None:
        """
        Bytes that cannot begin an HTTP response are refused as soon as
        they arrive, without waiting for a complete header block.
        """
        for garbage in [b"SSH-2.0-OpenSSH\r\n", b"<html>", b"\x00\x01", b"http/1.1 200 OK\r\n"]:
            self.assertRaises(ProxyResponseError, ConnectResponseParser().feed, garbage)

    def test_http09Refused(self) -> None:
        """
        An HTTP/0.9-style or otherwise malformed status line is refused once
        the line is complete.
        """
        for line in [
            b"HTTP/0.9 200 OK\r\n",
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 200OK\r\n",
            b"HTTP/2 200\r\n",
            b"HTTP/1.1 099 x\r\n",
            b"HTTP/1.1 200 OK\x00\r\n",
        ]:
            self.assertRaises(ProxyResponseError, ConnectResponseParser().feed, line)

    def test_malformedHeaderRefused(self) -> None:
        """
        Header lines without a colon, with a space before the colon, folded
        lines and bare line feeds are refused.
        """
        for header in [b"NoColon", b"Bad : x", b" folded", b"X: a\nY: b", b"X: a\rb"]:
            self.assertRaises(
                ProxyResponseError,
                ConnectResponseParser().feed,
                b"HTTP/1.1 200 OK\r\n" + header + b"\r\n\r\n",
            )

    def test_oversizedRefused(self) -> None:
        """
        A header block larger than the limit is refused, both when it never
        ends and when its end arrives past the limit.
        """
        parser = ConnectResponseParser()
        parser.feed(b"HTTP/1.1 200 OK\r\n")
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        with self.assertRaises(ProxyResponseError) as caught:
            for _ in range(MAX_RESPONSE_HEADER_BYTES // len(filler) + 2):
                parser.feed(filler)
        self.assertIn("exceeds", str(caught.exception))
        big = b"HTTP/1.1 200 OK\r\n" + filler * 20 + b"\r\n"
        self.assertGreater(len(big), MAX_RESPONSE_HEADER_BYTES)
        self.assertRaises(ProxyResponseError, ConnectResponseParser().feed, big)

    def test_justUnderLimitAccepted(self) -> None:
        """
        A header block of exactly the limit is accepted.
        """
        head = b"HTTP/1.1 200 OK\r\nX: "
        tail = b"\r\n\r\n"
        wire = head + b"a" * (MAX_RESPONSE_HEADER_BYTES - len(head) - len(tail)) + tail
        self.assertEqual(len(wire), MAX_RESPONSE_HEADER_BYTES)
        self.assertEqual(ConnectResponseParser().feed(wire).status, 200)

    def test_controlCharactersInValueRefused(self) -> None:
        """
        A header value holding NUL or another control character (other
        than a tab) is refused, as RFC 9110 asks.
        """
        for value in [b"a\x00b", b"\x01", b"a\x1fb", b"a\x7fb", b"a\x0bb"]:
            self.assertRaises(
                ProxyResponseError,
                ConnectResponseParser().feed,
                b"HTTP/1.1 200 OK\r\nX: " + value + b"\r\n\r\n",
            )

    def test_whitespaceAroundValue(self) -> None:
        """
        Spaces and tabs around a value are not part of it, those inside
        are, however many: a header line of 16 KiB of spaces is read (in
        linear time; a backtracking pattern took seconds of the reactor).
        """
        response = ConnectResponseParser().feed(
            b"HTTP/1.1 200 OK\r\nX: \t a \t b \t \r\nY:" + b" " * 16000 + b"c\r\n\r\n"
        )
        self.assertEqual(response.headers, [(b"X", b"a \t b"), (b"Y", b"c")])
        wide = b"HTTP/1.1 200 OK\r\nZ: a" + b" " * 16000 + b"b\r\n\r\n"
        self.assertEqual(ConnectResponseParser().feed(wide).headers, [(b"Z", b"a" + b" " * 16000 + b"b")])

    @settings(max_examples=2000)
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Any bytes either parse, need more, or raise L{ProxyResponseError};
        nothing else escapes the parser.
        """
        try:
            response = ConnectResponseParser().feed(data)
        except ProxyResponseError:
            return
        if response is not None:
            self.assertTrue(100 <= response.status <= 999)
