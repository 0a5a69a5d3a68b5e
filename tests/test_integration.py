"""
End-to-end tests: a real C{twistd shifter} on a gateway built of network
namespaces, with a real Squid upstream, a real TLS web server behind it and
real clients (curl) that know nothing about the proxy.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    GATEWAY_V4,
    GATEWAY_V6,
    SERVER_V4,
    SERVER_V6,
    SQUID_PORT,
    ShifterProcess,
    Squid,
    WebServer,
    gatewayFor,
)
from tests.support import requireHost

PEER = str(Path(__file__).resolve().parent / "halfclose_peer.py")


class GatewayTestCase(SynchronousTestCase):
    """
    A gateway with the REDIRECT rules in place, a TLS web server with a
    random 1 MiB file, and Shifter pointed at a Squid on the gateway's
    loopback.  Squid is configured but started by each test.
    """

    squidDeny: tuple[str, ...] = ()
    nftables = False

    def setUp(self) -> None:
        requireHost(
            root=True,
            programs=("ip", "iptables", "ip6tables", "nft", "squid", "curl", "openssl", "ss"),
        )
        self.net = gatewayFor(self)
        self.directory = self.net.directory
        self.net.redirect(443, nft=self.nftables)
        self.squid = Squid(self.net.gateway, self.directory / "squid", deny=self.squidDeny)
        self.web = WebServer(self.net.server, self.directory / "web")
        self.payload = os.urandom(1024 * 1024)
        (self.web.site / "file.bin").write_bytes(self.payload)
        self.web.start()
        self.shifter = ShifterProcess(self.net.gateway, self.directory)

    def fetch(self, url: str, timeout: float = 20):  # type: ignore[no-untyped-def]
        """
        Fetch C{url} from the client namespace with curl, verifying the
        server's certificate.
        """
        out = self.directory / f"fetched-{time.monotonic_ns()}"
        started = time.monotonic()
        result = self.net.client.run(
            "curl", "-sS", "--max-time", str(timeout), "--cacert", str(self.web.cert),
            "-o", str(out), url, check=False, timeout=timeout + 10,
        )
        result.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        result.body = out.read_bytes() if out.exists() else b""  # type: ignore[attr-defined]
        return result


class TunnelTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.squid.start()
        self.shifter.start()

    def assertFetched(self, url: str, squidTarget: str, destination: str) -> None:
        result = self.fetch(url)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {squidTarget} ")
        line = self.shifter.waitForLog("tunnel ", f"-> {destination} via 127.0.0.1:{SQUID_PORT} closed")
        bytesDown = int(line.split(" bytes down")[0].rsplit(" ", 1)[1])
        self.assertGreater(bytesDown, len(self.payload))

    def test_ipv4(self) -> None:
        """
        An HTTPS request from the client to the server's IPv4 address is
        redirected to Shifter, tunnelled through Squid as CONNECT to that
        address, and completes with the file intact.
        """
        self.assertFetched(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443", f"{SERVER_V4}:443")

    def test_ipv6(self) -> None:
        """
        The same over IPv6, on Shifter's dual-stack listener.
        """
        self.assertFetched(
            f"https://[{SERVER_V6}]/file.bin", f"[{SERVER_V6}]:443", f"[{SERVER_V6}]:443"
        )

    def assertDirectRefused(self, url: str, address: str) -> None:
        result = self.fetch(url, timeout=10)
        self.assertNotEqual(result.returncode, 0)
        self.assertNotEqual(result.returncode, 28, "refusal took until curl's timeout")
        self.shifter.waitForLog(f"-> {address} via", "connected to Shifter directly")
        self.assertEqual([l for l in self.squid.accessLogLines() if "CONNECT" in l], [])

    def test_directConnectionRefused(self) -> None:
        """
        A client connecting to Shifter's port itself is refused, with one
        line, and nothing reaches Squid.
        """
        self.assertDirectRefused(f"https://{GATEWAY_V4}:12345/", f"{GATEWAY_V4}:12345")

    def test_directConnectionRefusedIPv6(self) -> None:
        """
        The same over IPv6.  (A test of its own: refusal lines are one per
        reason every few seconds, so a second one in the same run would be
        counted, not logged.)
        """
        self.assertDirectRefused(f"https://[{GATEWAY_V6}]:12345/", f"[{GATEWAY_V6}]:12345")

    def test_serialConnectionsAfterRefusal(self) -> None:
        """
        After refusing a direct connection Shifter keeps serving: several
        redirected fetches in a row succeed.
        """
        self.fetch(f"https://{GATEWAY_V4}:12345/", timeout=10)
        for _ in range(5):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)


class NftablesTests(TunnelTests):
    """
    The tunnel tests again, with the README's nftables rules in place of
    the iptables ones.
    """

    nftables = True


class SquidDeniesTests(GatewayTestCase):
    squidDeny = (SERVER_V4,)

    def test_denied(self) -> None:
        """
        When Squid denies the destination, the client's connection is
        closed promptly and Shifter logs the 403.
        """
        self.squid.start()
        self.shifter.start()
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.assertLess(result.elapsed, 10)
        self.squid.waitForLog("TCP_DENIED/403", f"CONNECT {SERVER_V4}:443")
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via", "failed: proxy answered 403 Forbidden")


class SquidDownTests(GatewayTestCase):
    def test_squidNotRunning(self) -> None:
        """
        With Squid not running, the client is closed at once with a log
        line; once Squid is up, the next connection goes through.
        """
        self.shifter.start()
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.assertLess(result.elapsed, 10)
        self.shifter.waitForLog("failed: cannot connect to proxy", "refused")
        self.squid.start()
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)


class HalfCloseTests(GatewayTestCase):
    def test_clientHalfClose(self) -> None:
        """
        A client that sends its data and shuts down its sending side still
        receives the whole answer, which the far end sends only after EOF.

        Squid closes a tunnel on the first EOF, so the upstream here is a
        CONNECT proxy that keeps half-closed tunnels open.
        """
        gateway = self.net.gateway
        gateway.start(sys.executable, PEER, "proxy", "3129", logTo=self.directory / "peer.log")
        gateway.waitListening(3129)
        self.shifter.options = (
            "--listen", "tcp6:12345:interface=\\:\\:", "--proxy", "127.0.0.1:3129",
        )
        self.shifter.start()
        result = self.net.client.run(sys.executable, PEER, "client", SERVER_V4, "443", "300000")
        sent, received = result.stdout.split()
        self.assertEqual(sent, received)
        self.shifter.waitForLog("300000 bytes up, 64 bytes down")
