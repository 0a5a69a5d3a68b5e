"""
Tests for the one check every CONNECT authority goes through
(L{shifter.upstream.connect.checkHost}, L{checkPort}, L{formatAuthority}), directly
and through each way a host reaches it: a policy's target, a name sniffed
from the client's first bytes, and the C{--proxy} option.
"""

from __future__ import annotations

import ipaddress
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.connect import InvalidAuthority, checkHost, checkPort, formatAuthority, formatConnectRequest
from shifter.tunnel.downstream import TunnelSettings
from shifter.tunnel.policy import TunnelDecision
from shifter.service.tap import Options
from tests.test_sniff import request, withName
from tests.test_tunnel import RecordingPolicy, TunnelTestCase

# What may appear in an authority Shifter writes: a hostname or an address.
_SAFE_AUTHORITY = re.compile(r"(\[[0-9a-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")

_ZONE_ATTACKS = [
    "fe80::1%x\r\nX-Injected: yes",
    "fe80::1%eth0",
    "fe80::1%25eth0",
    "::1%0",
    "2001:db8::1%lo",
]

# Whitespace and control characters that Python's str.isspace() and the
# IP parsers treat in different ways.
_UNSAFE_CHARACTERS = ["\r", "\n", "\t", " ", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\xa0",
                      "\u2028", "\u3000", "\u2003"]

hostileText = st.one_of(
    st.text(max_size=60),
    st.sampled_from(_ZONE_ATTACKS),
    st.builds(
        lambda address, zone: f"{address}%{zone}", st.ip_addresses(v=6).map(str), st.text(max_size=20)
    ),
    st.builds(
        lambda name, bad, at: name[:at] + bad + name[at:],
        st.sampled_from(["www.example.test", "203.0.113.7", "2001:db8::7"]),
        st.sampled_from(_UNSAFE_CHARACTERS + ["%", "[", "]", "/", "@", ":", "#", "?"]),
        st.integers(0, 16),
    ),
)


def assertSafe(test: SynchronousTestCase, authority: str) -> None:
    """
    An authority holds only a hostname or a bracketed IPv6 address, and a
    port: no zone ID, no space, no control character.
    """
    test.assertIsNotNone(_SAFE_AUTHORITY.fullmatch(authority), authority)


class CheckHostTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """
        Addresses (IPv6 written back compressed) and hostnames pass.
        """
        for host, expected in [
            ("203.0.113.7", "203.0.113.7"),
            ("2001:0DB8:0:0::7", "2001:db8::7"),
            ("www.example.test", "www.example.test"),
            ("www.example.test.", "www.example.test."),
            ("xn--bcher-kva.test", "xn--bcher-kva.test"),
            ("a-1.b2", "a-1.b2"),
        ]:
            self.assertEqual(checkHost(host), expected)

    def test_zoneIdRefused(self) -> None:
        """
        An IPv6 zone ID is refused, whatever follows the C{%}: Python's
        own parser accepts any text there.
        """
        for host in _ZONE_ATTACKS:
            with self.assertRaises(InvalidAuthority) as caught:
                checkHost(host)
            self.assertTrue(
                "zone ID" in str(caught.exception) or "control character" in str(caught.exception),
                caught.exception,
            )
        self.assertRaises(InvalidAuthority, checkHost, "fe80::1%eth0")

    def test_controlAndWhitespaceRefused(self) -> None:
        """
        Control characters and whitespace of any kind, anywhere, are
        refused, with the host shown escaped in the reason.
        """
        for bad in _UNSAFE_CHARACTERS:
            for host in (bad + "a.test", "a" + bad + ".test", "a.test" + bad, "203.0.113.7" + bad):
                with self.assertRaises(InvalidAuthority) as caught:
                    checkHost(host)
                self.assertNotIn("\n", str(caught.exception))
                self.assertNotIn("\r", str(caught.exception))

    def test_numericNamesRefused(self) -> None:
        """
        Names that a resolver reads as IPv4 addresses are refused.
        """
        for host in ["127.1", "2130706433", "0x7f000001", "0x7f.1", "10.0.0.0x1", "1.2.3.4."]:
            self.assertRaises(InvalidAuthority, checkHost, host)

    def test_otherRefusals(self) -> None:
        """
        Empty hosts, brackets, user info, ports, paths and non-text are
        refused.
        """
        for host in ["", "[2001:db8::7]", "u@a.test", "a.test:80", "a/b", "a..b", "-a.test", "x" * 300, b"a.test"]:
            self.assertRaises(InvalidAuthority, checkHost, host)

    def test_ports(self) -> None:
        """
        Ports are integers from 1 to 65535; booleans and strings are not.
        """
        self.assertEqual(checkPort(1), 1)
        self.assertEqual(checkPort(65535), 65535)
        for port in [0, 65536, -1, True, "443", 443.0, None]:
            self.assertRaises(InvalidAuthority, checkPort, port)

    def test_isValueError(self) -> None:
        """
        The refusal is a C{ValueError}, as callers of L{formatAuthority}
        have always caught.
        """
        self.assertRaises(ValueError, formatAuthority, "fe80::1%eth0", 443)

    @settings(max_examples=3000, deadline=None, database=None)
    @given(hostileText, st.integers(-5, 70000))
    def test_anyHost(self, host: str, port: int) -> None:
        """
        Whatever the host, it is refused, or the authority and the request
        built from it are safe and agree.
        """
        try:
            authority = formatAuthority(host, port)
        except InvalidAuthority:
            return
        assertSafe(self, authority)
        self.assertNotIn("%", authority)
        requestBytes = formatConnectRequest(host, port)
        self.assertEqual(requestBytes.split(b"\r\n")[:2],
                         [f"CONNECT {authority} HTTP/1.1".encode(), f"Host: {authority}".encode()])

    @settings(max_examples=500, deadline=None, database=None)
    @given(st.ip_addresses(v=6), st.text(max_size=30))
    def test_anyZone(self, address: ipaddress.IPv6Address, zone: str) -> None:
        """
        An IPv6 address with any zone ID is refused.
        """
        self.assertRaises(InvalidAuthority, checkHost, f"{address}%{zone}")

    @settings(max_examples=500, deadline=None, database=None)
    @given(st.text(max_size=20), st.text(max_size=40))
    def test_headerValues(self, name: str, value: str) -> None:
        """
        A header is refused, or adds exactly one line of visible ASCII.
        """
        try:
            built = formatConnectRequest("203.0.113.7", 443, [(name, value)])
        except ValueError:
            return
        lines = built.split(b"\r\n")
        self.assertEqual(len(lines), 5)
        self.assertTrue(all(0x20 <= c <= 0x7E or c == 0x09 for c in lines[2]), lines[2])


class PolicyTargetTests(TunnelTestCase):
    @settings(
        max_examples=400, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(hostileText)
    def test_anyPolicyTarget(self, target: str) -> None:
        """
        Whatever target a policy gives, the proxy is asked for it through
        the check, or the connection is refused with the reason and no
        proxy is contacted.
        """
        self.endpoint.attempts.clear()
        self.makeFactory()
        self.factory.policy = RecordingPolicy(TunnelDecision(target=target))
        _, clientTransport = self.connectClient()
        try:
            expected = formatAuthority(target, 443)
        except InvalidAuthority as e:
            self.assertEqual(self.endpoint.attempts, [])
            self.assertTrue(clientTransport.disconnecting)
            self.assertIn(f"policy gave an invalid target: {e}", self.failureLines()[-1])
            return
        _, upstreamTransport = self.endpoint.accept()
        first = upstreamTransport.value().split(b"\r\n", 1)[0]
        self.assertEqual(first, f"CONNECT {expected} HTTP/1.1".encode())
        assertSafe(self, expected)

    def test_zoneIdTarget(self) -> None:
        """
        The zone ID injection from a policy target is refused before any
        proxy is contacted.
        """
        self.makeFactory()
        self.factory.policy = RecordingPolicy(TunnelDecision(target="fe80::1%x\r\nX-Injected: yes"))
        _, clientTransport = self.connectClient()
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(clientTransport.disconnecting)
        self.assertIn("policy gave an invalid target", self.failureLines()[0])


class SniffedNameTests(TunnelTestCase):
    @settings(
        max_examples=400, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(hostileText, st.sampled_from(["sni", "host"]))
    def test_anySniffedName(self, name: str, mode: str) -> None:
        """
        Whatever name a client puts in its SNI or Host header, the proxy is
        asked for a checked name, or for the address.
        """
        self.endpoint.attempts.clear()
        self.settings = TunnelSettings(connectTarget=mode, earlyDataLimit=65536)
        self.makeFactory()
        client, _ = self.connectClient()
        raw = name.encode("utf-8", "surrogatepass")
        client.dataReceived(withName(raw) if mode == "sni" else request(raw))
        client.readConnectionLost()
        _, upstreamTransport = self.endpoint.accept()
        first = upstreamTransport.value().split(b"\r\n", 1)[0].decode("ascii")
        method, authority, version = first.split(" ")
        self.assertEqual((method, version), ("CONNECT", "HTTP/1.1"))
        assertSafe(self, authority)
        host = authority.rsplit(":", 1)[0]
        if host != "203.0.113.7":
            self.assertEqual(checkHost(host), host)
            self.assertFalse(host == "localhost" or host.endswith(".localhost"))


class ProxyOptionTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None, database=None)
    @given(hostileText, st.sampled_from(["{}:3128", "http://{}:3128", "https://{}:3128", "http://u:p@{}:3128"]))
    def test_anyProxyHost(self, host: str, form: str) -> None:
        """
        A --proxy whose host fails the check stops Shifter with a usage
        error; one that passes is a host the check accepts.
        """
        value = form.format(f"[{host}]" if ":" in host and form != "{}:3128" else host)
        options = Options()
        try:
            options.parseOptions(["--proxy", value])
        except usage.UsageError:
            return
        from urllib.parse import urlsplit

        parsed = urlsplit(value if "://" in value else "//" + value)
        self.assertEqual(checkHost(parsed.hostname), ipaddress.ip_address(parsed.hostname).compressed
                         if _isAddress(parsed.hostname) else parsed.hostname)

    def test_zoneIdProxyRefused(self) -> None:
        """
        A proxy URL with an IPv6 zone ID is refused at start.
        """
        for value in ["http://[fe80::1%25eth0]:3128", "[fe80::1%eth0]:3128"]:
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--proxy", value])


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
