"""
Tests for telling the proxy who the client is: the PROXY protocol encoders
(L{shifter.upstream.proxyprotocol}) against the examples and rules of HAProxy's
C{doc/proxy-protocol.txt}, the bytes written on a proxy connection
(L{shifter.upstream.passclient}), C{--pass-client} and its per-proxy and per-policy
forms.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import formatConnectRequest
from shifter.upstream.passclient import (
    PASS_CLIENT_MODES,
    clientEndpoints,
    forwardedFor,
    probeRequest,
    proxyHeader,
    refusalHint,
    tunnelRequest,
)
from shifter.tunnel.downstream import ShifterFactory
from shifter.tunnel.policy import ITunnelPolicy, TunnelDecision
from shifter.upstream.pool import ProxyPool
from shifter.upstream.proxy import UpstreamProxy, parseProxy
from shifter.upstream.proxyprotocol import V1_MAX_LENGTH, V2_SIGNATURE, encodeV1, encodeV2
from shifter.service.tap import Options

from tests.support import knowLocalAddresses
from tests.test_tunnel import OK, PROXY, FakeProxyEndpoint, RecordingPolicy, TunnelTestCase

CLIENT = IPv4Address("TCP", "192.0.2.2", 50000)
MAPPED_CLIENT = IPv6Address("TCP", "::ffff:192.0.2.2", 50000)
CLIENT6 = IPv6Address("TCP", "2001:db8:1::2", 50000)
DESTINATION = IPv4Address("TCP", "203.0.113.7", 443)
DESTINATION6 = IPv6Address("TCP", "2001:db8:2::7", 443)
CONNECT = formatConnectRequest("203.0.113.7", 443)


def readV2(data: bytes) -> tuple[int, int, tuple[str, str, int, int], bytes]:
    """
    Read a version 2 header as the specification's receiver (its section 9)
    does: signature and version, then C{16 + len} bytes, then the address
    block by family.

    @return: the command, the family-and-protocol byte, (source address,
        destination address, source port, destination port), and the bytes
        after the header.
    """
    assert len(data) >= 16, "a v2 header is at least 16 bytes"
    assert data[:12] == V2_SIGNATURE, "signature"
    assert data[12] & 0xF0 == 0x20, "version 2"
    command, family = data[12] & 0x0F, data[13]
    (length,) = struct.unpack("!H", data[14:16])
    size = 16 + length
    assert len(data) >= size, "truncated"
    block = data[16:size]
    if family == 0x11:
        source, destination, sport, dport = struct.unpack("!4s4sHH", block[:12])
    elif family == 0x21:
        source, destination, sport, dport = struct.unpack("!16s16sHH", block[:36])
    else:
        raise AssertionError(f"unexpected family byte {family:#x}")
    addresses = (
        ipaddress.ip_address(source).compressed,
        ipaddress.ip_address(destination).compressed,
        sport,
        dport,
    )
    return command, family, addresses, data[size:]


class ProbeRequestTests(SynchronousTestCase):
    def test_localHeaders(self) -> None:
        """
        A probe relays no client: with the PROXY protocol its header says
        so (v1 UNKNOWN, v2 LOCAL with no addresses), before the CONNECT;
        with x-forwarded-for it names no one.
        """
        request = formatConnectRequest("255.255.255.255", 9)
        for mode, header in [
            ("none", b""),
            ("x-forwarded-for", b""),
            ("proxy-v1", b"PROXY UNKNOWN\r\n"),
            ("proxy-v2", V2_SIGNATURE + b"\x20\x00\x00\x00"),
        ]:
            proxy = UpstreamProxy("p.test:3128", FakeProxyEndpoint(), passClient=mode)
            self.assertEqual(probeRequest(proxy, "255.255.255.255", 9), header + request, mode)


class ProxyV1Tests(SynchronousTestCase):
    def test_specificationExample(self) -> None:
        """
        The line of the specification's example (section 2.1).
        """
        self.assertEqual(
            encodeV1(("192.168.0.1", 56324), ("192.168.0.11", 443)),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        )

    def test_longestIPv4Line(self) -> None:
        """
        The longest TCP4 line is the specification's, 56 characters with
        the CRLF.
        """
        line = encodeV1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
        self.assertEqual(line, b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n")
        self.assertEqual(len(line), V1_MAX_LENGTH[4])
        self.assertEqual(len(line), 56)

    def test_longestIPv6Line(self) -> None:
        """
        The longest TCP6 line (eight groups of four digits each way) is 104
        characters, as the specification counts.
        """
        full = ":".join(["ffff"] * 8)
        line = encodeV1((full, 65535), (full, 65535))
        self.assertEqual(line, f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode())
        self.assertEqual(len(line), V1_MAX_LENGTH[6])
        self.assertEqual(len(line), 104)

    def test_ipv6Canonical(self) -> None:
        """
        IPv6 addresses are written compressed, with one C{::} for the
        longest run of zero groups and no leading zeros.
        """
        self.assertEqual(
            encodeV1(("2001:0db8:0001:0000:0000:0000:0000:0002", 50000), ("2001:db8:2::7", 443)),
            b"PROXY TCP6 2001:db8:1::2 2001:db8:2::7 50000 443\r\n",
        )

    def test_noLeadingZeros(self) -> None:
        """
        Ports are plain decimal, and IPv4 numbers with leading zeros (which
        a reader could take for octal) are refused rather than written.
        """
        self.assertEqual(encodeV1(("10.0.0.1", 8), ("10.0.0.2", 80)), b"PROXY TCP4 10.0.0.1 10.0.0.2 8 80\r\n")
        self.assertRaises(ValueError, encodeV1, ("010.0.0.1", 8), ("10.0.0.2", 80))

    def test_oneLineOfASCII(self) -> None:
        """
        The header is one line: exactly one CRLF, at its end, no other
        control character, and no space doubled.
        """
        for source, destination in [
            (("192.0.2.2", 1), ("203.0.113.7", 443)),
            (("2001:db8:1::2", 65535), ("::1", 0)),
        ]:
            line = encodeV1(source, destination)
            self.assertTrue(line.endswith(b"\r\n"))
            body = line[:-2]
            self.assertTrue(all(0x20 <= byte < 0x7F for byte in body), line)
            self.assertEqual(body.split(b" ")[0], b"PROXY")
            self.assertEqual(len(body.split(b" ")), 6)

    def test_refusals(self) -> None:
        """
        Names, out-of-range ports, addresses of two families and scoped
        addresses are refused: the header can state none of them.
        """
        cases = [
            (("squid.test", 1), ("203.0.113.7", 443)),
            (("192.0.2.2", 65536), ("203.0.113.7", 443)),
            (("192.0.2.2", -1), ("203.0.113.7", 443)),
            (("192.0.2.2", 1), ("2001:db8:2::7", 443)),
            (("fe80::1%eth0", 1), ("fe80::2", 443)),
            (("192.0.2.2\r\nX: y", 1), ("203.0.113.7", 443)),
        ]
        for source, destination in cases:
            for encoder in (encodeV1, encodeV2):
                self.assertRaises(ValueError, encoder, source, destination)


class ProxyV2Tests(SynchronousTestCase):
    def test_signature(self) -> None:
        """
        The signature is the specification's twelve bytes, a NUL fifth.
        """
        spec = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
        self.assertEqual(V2_SIGNATURE, spec)
        header = encodeV2(("192.0.2.2", 1), ("203.0.113.7", 443))
        self.assertEqual(header[:12], spec)

    def test_ipv4Bytes(self) -> None:
        """
        TCP over IPv4: version 2 with the PROXY command (C{\\x21}), family
        and protocol C{\\x11}, length 12, then the addresses and ports in
        network byte order; 16 + 12 bytes in all.
        """
        header = encodeV2(("192.168.0.1", 56324), ("192.168.0.11", 443))
        self.assertEqual(
            header,
            V2_SIGNATURE
            + bytes.fromhex("21 11 000c")
            + bytes.fromhex("c0a80001 c0a8000b dc04 01bb"),
        )
        self.assertEqual(len(header), 28)

    def test_ipv6Bytes(self) -> None:
        """
        TCP over IPv6: family and protocol C{\\x21}, length 36 (two
        sixteen-byte addresses, two ports); 16 + 36 bytes in all.
        """
        header = encodeV2(("2001:db8:1::2", 50000), ("2001:db8:2::7", 443))
        self.assertEqual(header[12:16], bytes.fromhex("21 21 0024"))
        self.assertEqual(
            header[16:],
            ipaddress.IPv6Address("2001:db8:1::2").packed
            + ipaddress.IPv6Address("2001:db8:2::7").packed
            + bytes.fromhex("c350 01bb"),
        )
        self.assertEqual(len(header), 52)

    def test_readAsTheSpecificationReads(self) -> None:
        """
        A receiver written from the specification's sample code finds the
        PROXY command, the family and the endpoints, and the bytes after
        the header untouched.
        """
        for source, destination, family in [
            (("192.0.2.2", 50000), ("203.0.113.7", 443), 0x11),
            (("2001:db8:1::2", 50001), ("2001:db8:2::7", 8443), 0x21),
        ]:
            header = encodeV2(source, destination)
            self.assertEqual(
                readV2(header + CONNECT),
                (0x1, family, (source[0], destination[0], source[1], destination[1]), CONNECT),
            )

    def test_versionDetection(self) -> None:
        """
        By the specification's rule a receiver sees version 2 (sixteen
        bytes or more, the signature and C{\\x2} in the next high nibble)
        and not version 1 (which starts with C{PROXY}); a version 1 line
        is the reverse.
        """
        v2 = encodeV2(("192.0.2.2", 1), ("203.0.113.7", 443))
        self.assertGreaterEqual(len(v2), 16)
        self.assertEqual(v2[:12], V2_SIGNATURE)
        self.assertEqual(v2[12] & 0xF0, 0x20)
        self.assertFalse(v2.startswith(b"PROXY"))
        v1 = encodeV1(("192.0.2.2", 1), ("203.0.113.7", 443))
        self.assertTrue(v1.startswith(b"\x50\x52\x4F\x58\x59"))
        self.assertNotEqual(v1[:12], V2_SIGNATURE)

    def test_fitsOneSegment(self) -> None:
        """
        Both headers fit in the smallest TCP segment every host accepts
        (536 bytes), so each goes out at once.
        """
        full = ":".join(["ffff"] * 8)
        self.assertLessEqual(len(encodeV1((full, 65535), (full, 65535))), 536)
        self.assertLessEqual(len(encodeV2((full, 65535), (full, 65535))), 536)

    @settings(max_examples=300)
    @given(st.data())
    def test_anyEndpoints(self, data: st.DataObject) -> None:
        """
        For any two addresses of one family and any ports, each header
        reads back (v1 split on its spaces, v2 as the specification's
        receiver reads it) as exactly those endpoints.
        """
        version = data.draw(st.sampled_from([4, 6]))
        source = data.draw(st.ip_addresses(v=version))
        destination = data.draw(st.ip_addresses(v=version))
        sport, dport = data.draw(st.integers(0, 65535)), data.draw(st.integers(0, 65535))
        line = encodeV1((str(source), sport), (str(destination), dport))
        self.assertLessEqual(len(line), V1_MAX_LENGTH[version])
        words = line[:-2].decode("ascii").split(" ")
        self.assertEqual(words[:2], ["PROXY", f"TCP{version}"])
        self.assertEqual(
            (ipaddress.ip_address(words[2]), ipaddress.ip_address(words[3]), words[4], words[5]),
            (source, destination, str(sport), str(dport)),
        )
        _, family, addresses, rest = readV2(encodeV2((str(source), sport), (str(destination), dport)))
        self.assertEqual(family, {4: 0x11, 6: 0x21}[version])
        self.assertEqual(addresses, (source.compressed, destination.compressed, sport, dport))
        self.assertEqual(rest, b"")


class ClientAddressTests(SynchronousTestCase):
    def test_mappedClientAsIPv4(self) -> None:
        """
        An IPv4 client seen through a dual-stack socket (C{::ffff:a.b.c.d})
        is stated as IPv4, with an IPv4 destination.
        """
        self.assertEqual(
            clientEndpoints(MAPPED_CLIENT, IPv6Address("TCP", "::ffff:203.0.113.7", 443)),
            (("192.0.2.2", 50000), ("203.0.113.7", 443)),
        )
        self.assertEqual(
            clientEndpoints(MAPPED_CLIENT, DESTINATION), (("192.0.2.2", 50000), ("203.0.113.7", 443))
        )

    def test_ipv6(self) -> None:
        """
        An IPv6 client and destination are stated as they are, compressed.
        """
        self.assertEqual(
            clientEndpoints(CLIENT6, DESTINATION6), (("2001:db8:1::2", 50000), ("2001:db8:2::7", 443))
        )

    def test_scopeDropped(self) -> None:
        """
        A link-local client's scope (C{%c1}) is not part of its address.
        """
        client = IPv6Address("TCP", "fe80::2%c1", 50000)
        self.assertEqual(clientEndpoints(client, DESTINATION6)[0], ("fe80::2", 50000))
        self.assertEqual(forwardedFor(client), ("X-Forwarded-For", "fe80::2"))

    def test_familiesAligned(self) -> None:
        """
        Should the two ever be of different families, the IPv4 one is
        stated as IPv4-mapped IPv6, so the header can still be written.
        """
        source, destination = clientEndpoints(CLIENT, DESTINATION6)
        self.assertEqual(source, ("::ffff:c000:202", 50000))
        self.assertEqual(destination, ("2001:db8:2::7", 443))
        self.assertTrue(encodeV2(source, destination))

    def test_forwardedFor(self) -> None:
        """
        X-Forwarded-For holds the address alone: IPv4, IPv6 without
        brackets, a mapped IPv4 address unmapped.
        """
        self.assertEqual(forwardedFor(CLIENT), ("X-Forwarded-For", "192.0.2.2"))
        self.assertEqual(forwardedFor(CLIENT6), ("X-Forwarded-For", "2001:db8:1::2"))
        self.assertEqual(forwardedFor(MAPPED_CLIENT), ("X-Forwarded-For", "192.0.2.2"))

    @settings(max_examples=500)
    @given(st.text(max_size=60))
    def test_forwardedForAnyHost(self, host: str) -> None:
        """
        Whatever the host string, X-Forwarded-For is an IP address or
        nothing at all.
        """
        try:
            _, value = forwardedFor(IPv4Address("TCP", host, 1))
        except ValueError:
            return
        self.assertEqual(ipaddress.ip_address(value).compressed, value)

    def test_forwardedForValidated(self) -> None:
        """
        A host that is not an IP address never reaches the header.
        """
        for host in ["client.test", "192.0.2.2, 10.0.0.1", "192.0.2.2\r\nX-Injected: 1", ""]:
            self.assertRaises(ValueError, forwardedFor, IPv4Address("TCP", host, 1))


class TunnelRequestTests(SynchronousTestCase):
    def proxy(self, passClient: str = "none") -> UpstreamProxy:
        return UpstreamProxy("squid.test:3128", None, passClient=passClient)  # type: ignore[arg-type]

    def request(self, proxyMode: str, client=CLIENT, destination=DESTINATION, **kwargs) -> bytes:  # type: ignore[no-untyped-def]
        return tunnelRequest(self.proxy(proxyMode), client, destination, "203.0.113.7", 443, **kwargs)

    def test_none(self) -> None:
        """
        With C{none} the proxy gets the CONNECT request and nothing else.
        """
        self.assertEqual(self.request("none"), CONNECT)

    def test_forwardedForAfterAuthorization(self) -> None:
        """
        With C{x-forwarded-for} the client's address is a header of the
        CONNECT request, after the authentication headers.
        """
        authorization = [("Proxy-Authorization", "Basic YTpi")]
        self.assertEqual(
            self.request("x-forwarded-for", authHeaders=authorization),
            b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n"
            b"Proxy-Authorization: Basic YTpi\r\nX-Forwarded-For: 192.0.2.2\r\n\r\n",
        )

    def test_proxyV1First(self) -> None:
        """
        With C{proxy-v1} the text header comes first, then the request.
        """
        self.assertEqual(
            self.request("proxy-v1", client=MAPPED_CLIENT),
            b"PROXY TCP4 192.0.2.2 203.0.113.7 50000 443\r\n" + CONNECT,
        )

    def test_proxyV2First(self) -> None:
        """
        With C{proxy-v2} the binary header comes first, then the request.
        """
        data = tunnelRequest(
            self.proxy("proxy-v2"), CLIENT6, DESTINATION6, "2001:db8:2::7", 443
        )
        self.assertEqual(
            readV2(data),
            (0x1, 0x21, ("2001:db8:1::2", "2001:db8:2::7", 50000, 443),
             formatConnectRequest("2001:db8:2::7", 443)),
        )

    def test_everyMode(self) -> None:
        """
        Every mode gives bytes that end with the same CONNECT request.
        """
        for mode in PASS_CLIENT_MODES:
            self.assertTrue(self.request(mode).endswith(b"\r\n\r\n"), mode)
            self.assertIn(b"CONNECT 203.0.113.7:443 HTTP/1.1\r\n", self.request(mode))

    def test_connectionModeWins(self) -> None:
        """
        A mode given for the connection (a policy's) replaces the proxy's.
        """
        self.assertEqual(self.request("proxy-v1", passClient="none"), CONNECT)
        self.assertTrue(self.request("none", passClient="proxy-v2").startswith(V2_SIGNATURE))

    def test_unknownModeRefused(self) -> None:
        """
        An unknown mode is an error, not a silent C{none}.
        """
        self.assertRaises(ValueError, self.request, "proxy-v3")
        self.assertRaises(ValueError, self.request, "none", passClient="xff")

    def test_proxyHeaderOnlyForProxyModes(self) -> None:
        """
        C{none} and C{x-forwarded-for} have no PROXY header.
        """
        self.assertEqual(proxyHeader("none", CLIENT, DESTINATION), b"")
        self.assertEqual(proxyHeader("x-forwarded-for", CLIENT, DESTINATION), b"")


class SettingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_defaultNone(self) -> None:
        """
        Without a word about it, a proxy is told nothing.
        """
        self.assertEqual(parseProxy("127.0.0.1:3128", self.reactor).passClient, "none")
        self.assertEqual(parseProxy("http://127.0.0.1:3128", self.reactor).passClient, "none")

    def test_defaultForEveryForm(self) -> None:
        """
        The default given to L{parseProxy} (C{--pass-client}) applies to
        every form of proxy.
        """
        for value in [
            "127.0.0.1:3128", "[::1]:3128", "http://127.0.0.1:3128", "https://127.0.0.1:3443",
            "tcp:host=127.0.0.1:port=3128",
        ]:
            self.assertEqual(parseProxy(value, self.reactor, passClient="proxy-v2").passClient, "proxy-v2")

    def test_urlQuery(self) -> None:
        """
        A proxy URL's C{?pass-client=} sets that proxy's mode over the
        default; its description stays without it.
        """
        proxy = parseProxy("http://127.0.0.1:3128?pass-client=proxy-v1", self.reactor, passClient="none")
        self.assertEqual(proxy.passClient, "proxy-v1")
        self.assertEqual(proxy.description, "127.0.0.1:3128")
        proxy = parseProxy("https://[::1]:3443/?pass-client=x-forwarded-for", self.reactor)
        self.assertEqual(proxy.passClient, "x-forwarded-for")
        self.assertEqual(proxy.description, "https://[::1]:3443")
        proxy = parseProxy("http://a:b@127.0.0.1:3128?pass-client=none", self.reactor, passClient="proxy-v2")
        self.assertEqual(proxy.passClient, "none")
        self.assertIsNotNone(proxy.auth)

    def test_badQueryRefused(self) -> None:
        """
        Unknown parameters, unknown modes, a repeated or malformed
        parameter are refused with one line naming the problem.
        """
        cases = [
            ("http://127.0.0.1:3128?pass-client=proxy-v3", "expected one of"),
            ("http://127.0.0.1:3128?passclient=proxy-v1", "unknown proxy URL parameter"),
            ("http://127.0.0.1:3128?pass-client=none&pass-client=proxy-v1", "more than once"),
            ("http://127.0.0.1:3128?pass-client", "malformed query"),
            ("http://127.0.0.1:3128?pass-client=", "expected one of"),
            ("http://127.0.0.1:3128#pass-client=none", "only a scheme"),
        ]
        for value, expected in cases:
            with self.assertRaises(ValueError, msg=value) as caught:
                parseProxy(value, self.reactor)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        self.assertRaises(ValueError, parseProxy, "127.0.0.1:3128", self.reactor, passClient="xff")

    def test_option(self) -> None:
        """
        C{--pass-client} takes the four modes, default C{none}; anything
        else is a one-line usage error.
        """
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128"])
        self.assertEqual(options["pass-client"], "none")
        for mode in PASS_CLIENT_MODES:
            options = Options()
            options.parseOptions(["--proxy", "127.0.0.1:3128", "--pass-client", mode])
            self.assertEqual(options["pass-client"], mode)
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--proxy", "127.0.0.1:3128", "--pass-client", "proxy"])
        self.assertIn("--pass-client: expected one of none, x-forwarded-for, proxy-v1, proxy-v2", str(caught.exception))
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--proxy", "http://127.0.0.1:3128?pass-client=v2"])
        self.assertIn("--proxy: pass-client in", str(caught.exception))

    def test_policyDecision(self) -> None:
        """
        A policy's decision may name a mode; an unknown one is refused when
        the decision is made.
        """
        self.assertIsNone(TunnelDecision().passClient)
        self.assertEqual(TunnelDecision(passClient="proxy-v2").passClient, "proxy-v2")
        self.assertRaises(ValueError, TunnelDecision, passClient="proxy-v9")


class TunnelWiringTests(TunnelTestCase):
    """
    The bytes a tunnel writes on its proxy connection, in memory: proxy A
    and, if a second mode is given, B, tried in that order.
    """

    def usePool(self, modeA: str = "none", modeB: str | None = None, policy: object = None) -> None:
        self.endpointB = FakeProxyEndpoint()
        proxies = [UpstreamProxy("a.test:3128", self.endpoint, PROXY, passClient=modeA)]
        if modeB is not None:
            proxies.append(UpstreamProxy("b.test:3128", self.endpointB, ("198.51.100.4", 3128), passClient=modeB))
        self.pool = ProxyPool(proxies, self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        if policy is not None:
            self.factory.policy = RecordingPolicy(policy)  # type: ignore[assignment]

    def test_proxyHeaderBeforeConnect(self) -> None:
        """
        A proxy set to C{proxy-v1} gets the client's and the original
        destination's addresses before CONNECT, and the tunnel opens as
        usual.
        """
        self.usePool("proxy-v1")
        client, clientTransport = self.connectClient()
        upstream, upstreamTransport = self.endpoint.accept()
        self.assertEqual(
            upstreamTransport.value(),
            b"PROXY TCP4 192.0.2.2 203.0.113.7 50000 443\r\n" + CONNECT,
        )
        upstream.dataReceived(OK)
        self.assertEqual(self.factory.counters["opened"], 1)

    def test_dualStackClientAsIPv4(self) -> None:
        """
        On a dual-stack listener an IPv4 client (and its destination) are
        seen IPv4-mapped, and are sent as IPv4.
        """
        self.usePool("proxy-v2")
        self.resolver.answer = IPv6Address("TCP", "::ffff:203.0.113.7", 443)
        self.connectClient(peer=MAPPED_CLIENT, host=IPv6Address("TCP", "::ffff:192.0.2.1", 12345))
        _, upstreamTransport = self.endpoint.accept()
        self.assertEqual(
            readV2(upstreamTransport.value()),
            (0x1, 0x11, ("192.0.2.2", "203.0.113.7", 50000, 443), CONNECT),
        )

    def test_eachProxyItsOwnMode(self) -> None:
        """
        When the first proxy fails, the next is sent its own mode, not the
        first one's.
        """
        self.usePool("proxy-v2", "x-forwarded-for")
        self.connectClient()
        self.endpoint.refuse()
        _, upstreamTransport = self.endpointB.accept()
        self.assertEqual(
            upstreamTransport.value(),
            b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n"
            b"X-Forwarded-For: 192.0.2.2\r\n\r\n",
        )

    def test_policyModeForEveryProxy(self) -> None:
        """
        A policy's mode applies to whichever proxy is tried for the
        connection.
        """
        self.usePool("none", "none", policy=TunnelDecision(passClient="proxy-v1"))
        self.connectClient()
        self.endpoint.refuse()
        _, upstreamTransport = self.endpointB.accept()
        self.assertTrue(upstreamTransport.value().startswith(b"PROXY TCP4 192.0.2.2 203.0.113.7 50000 443\r\n"))

    def test_policyNoneKeepsProxyMode(self) -> None:
        """
        A decision that leaves the mode at C{None} keeps the proxy's.
        """
        self.usePool("x-forwarded-for", policy=TunnelDecision(target="www.example.test"))
        self.connectClient()
        _, upstreamTransport = self.endpoint.accept()
        self.assertIn(b"\r\nX-Forwarded-For: 192.0.2.2\r\n", upstreamTransport.value())

    def test_invalidPolicyModeRefuses(self) -> None:
        """
        A policy that builds a decision with an unknown mode refuses the
        connection, as any policy error does; no proxy is contacted.
        """
        self.usePool()

        @implementer(ITunnelPolicy)
        class BadPolicy:
            def decide(self, request: object) -> TunnelDecision:
                return TunnelDecision(passClient="proxy-v9")

        self.factory.policy = BadPolicy()
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_missingHeaderHint(self) -> None:
        """
        A proxy that closes before answering a connection sent without the
        PROXY header (as Squid's require-proxy-header port does) gets a
        failure line that points at --pass-client.
        """
        self.usePool()
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.readConnectionLost()
        [line] = self.failureLines()
        self.assertIn(
            "failed: proxy closed the connection before answering (as a proxy port that requires "
            "a PROXY protocol header does; see --pass-client)",
            line,
        )

    def test_unexpectedHeaderHint(self) -> None:
        """
        A 400 to a connection that began with a PROXY header (as Squid's
        plain port answers) gets a failure line that says which was sent.
        """
        self.usePool("proxy-v1")
        self.connectClient()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        [line] = self.failureLines()
        self.assertIn("failed: proxy answered 400 Bad Request (as a proxy port that expects no PROXY "
                      "protocol header does; proxy-v1 was sent, see --pass-client)", line)

    def test_noHintOtherwise(self) -> None:
        """
        Other refusals, and these refusals in the other modes, have no
        hint.
        """
        self.assertEqual(refusalHint("proxy-status", 403, "proxy-v1"), "")
        self.assertEqual(refusalHint("proxy-status", 400, "none"), "")
        self.assertEqual(refusalHint("proxy-status", 400, "x-forwarded-for"), "")
        self.assertEqual(refusalHint("proxy-closed", None, "proxy-v2"), "")
        self.assertEqual(refusalHint("timeout", None, "none"), "")
        self.assertEqual(refusalHint("proxy-garbage", None, "none"), "")
