"""
End-to-end tests of every resolver: the rules that C{python -m
shifter.rules} prints are applied, as printed, in the gateway namespace;
a real C{twistd shifter} runs with the resolver; real clients in the client
namespace reach a real TLS server (or an echo server) through a real Squid.

These need root (namespaces, iptables, nft, nfnetlink_queue, ctnetlink,
TPROXY), Squid, curl and openssl.  The kmod resolver needs the kernel
module, which this host's kernel cannot load: tests/guest/ runs it in a
booted kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    GATEWAY_V4,
    GATEWAY_V6,
    PROJECT,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    SQUID_PORT,
    ShifterProcess,
    Squid,
    WebServer,
    gatewayFor,
    waitFor,
)
from tests.support import requireHost

PEER = str(Path(__file__).resolve().parent / "tcp_peer.py")
LAN = "c1"  # the gateway's side of the client link


def printedRules(resolver: str, fmt: str, *extra: str) -> str:
    """
    What C{python -m shifter.rules} prints for the test gateway.
    """
    result = subprocess.run(
        [sys.executable, "-m", "shifter.rules", "--resolver", resolver, "--format", fmt,
         "--lan-interface", LAN, "--ports", "443", "--listen-port", str(SHIFTER_PORT), *extra],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
    )
    return result.stdout


class ResolverGatewayTestCase(SynchronousTestCase):
    """
    A gateway whose rules come from the rules command, a running Squid on
    its loopback and a TLS web server with a random file.
    """

    resolver = "sockopt"
    ruleFormat = "iptables"
    ruleOptions: tuple[str, ...] = ()
    shifterOptions: tuple[str, ...] = ()
    listen = f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"
    webServer = True
    squidDeny: tuple[str, ...] = ()  # destinations Squid refuses

    def setUp(self) -> None:
        requireHost(
            root=True,
            programs=("ip", "iptables", "ip6tables", "nft", "squid", "curl", "openssl", "ss"),
        )
        self.net = gatewayFor(self)
        self.directory = self.net.directory
        self.rules = printedRules(self.resolver, self.ruleFormat, *self.ruleOptions)
        self.applyRules(self.rules)
        self.squid = Squid(self.net.gateway, self.directory / "squid", deny=self.squidDeny)
        self.squid.start()
        if self.webServer:
            self.web = WebServer(self.net.server, self.directory / "web")
            self.payload = os.urandom(256 * 1024)
            (self.web.site / "file.bin").write_bytes(self.payload)
            self.web.start()
        self.shifter = ShifterProcess(
            self.net.gateway, self.directory,
            "--listen", self.listen, "--proxy", f"127.0.0.1:{SQUID_PORT}", *self.shifterArguments(),
        )

    def shifterArguments(self) -> tuple[str, ...]:
        """
        Shifter's options past --listen and --proxy.
        """
        return ("--resolver", self.resolver, *self.shifterOptions)

    def applyRules(self, script: str) -> None:
        """
        Run the printed rules, as printed, with sh in the gateway namespace.
        """
        result = subprocess.run(
            ["ip", "netns", "exec", self.net.gateway.name, "sh", "-e"],
            input=script, capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(result.returncode, 0, f"rules failed: {result.stderr}\n{script}")

    def fetch(self, url: str, namespace=None, timeout: float = 20):  # type: ignore[no-untyped-def]
        out = self.directory / f"fetched-{time.monotonic_ns()}"
        result = (namespace or self.net.client).run(
            "curl", "-sS", "--max-time", str(timeout), "--cacert", str(self.web.cert),
            "-o", str(out), url, check=False, timeout=timeout + 10,
        )
        result.body = out.read_bytes() if out.exists() else b""  # type: ignore[attr-defined]
        return result

    def assertTunnelled(self, url: str, destination: str, namespace=None) -> None:  # type: ignore[no-untyped-def]
        """
        Fetching C{url} returns the file intact, through Shifter and Squid,
        as a CONNECT to C{destination}.
        """
        result = self.fetch(url, namespace)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {destination} ")
        self.shifter.waitForLog(f"-> {destination} via 127.0.0.1:{SQUID_PORT} closed")


class DualStackMixin:
    def test_ipv4(self) -> None:
        """
        An IPv4 HTTPS fetch from the client goes through Shifter and Squid
        to the server's address, found by this resolver.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")

    def test_ipv6(self) -> None:
        """
        The same over IPv6.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://[{SERVER_V6}]/file.bin", f"[{SERVER_V6}]:443")


class SockoptIptablesTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "sockopt", "iptables"


class SockoptNftTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "sockopt", "nft"


class SockoptOwnerExclusionTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "sockopt", "iptables"
    ruleOptions = ("--proxy-user", "proxy")

    def test_gatewayOwnTraffic(self) -> None:
        """
        With --proxy-user, the gateway's own HTTPS goes through Shifter too,
        while Squid's connections (user proxy) are kept out of the redirect:
        the fetch from the gateway itself completes through Squid.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443", self.net.gateway)
        self.assertTunnelled(f"https://[{SERVER_V6}]/file.bin", f"[{SERVER_V6}]:443", self.net.gateway)


class SockoptNftOwnerExclusionTests(SockoptOwnerExclusionTests):
    ruleFormat = "nft"


class ConntrackIptablesTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "conntrack", "iptables"

    def test_directConnectionRefused(self) -> None:
        """
        A direct connection to Shifter's port has a conntrack entry without
        NAT: its original destination is Shifter itself, and it is refused.
        """
        self.shifter.start()
        result = self.fetch(f"https://{GATEWAY_V4}:{SHIFTER_PORT}/", timeout=10)
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog(f"-> {GATEWAY_V4}:{SHIFTER_PORT} via", "connected to Shifter directly")


class ConntrackNftTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "conntrack", "nft"


class NfqueueIptablesTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "iptables"
    ruleOptions = ("--queue-num", "7")
    shifterOptions = ("--queue-num", "7")


class NfqueueNftTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "nft"
    ruleOptions = ("--queue-num", "7")
    shifterOptions = ("--queue-num", "7")


class NfqueueBypassTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "iptables"
    ruleOptions = ("--queue-bypass",)
    shifterOptions = ("--queue-bypass",)

    def test_shifterStopped(self) -> None:
        """
        With --queue-bypass, traffic flows through Shifter while it runs,
        and after it stops it still flows, unproxied: the SYNs pass
        unmarked, so they are not redirected, and Squid sees nothing more.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")
        self.shifter.stop()
        self.shifter.waitForLog("nfqueue 0:", "packets read")
        connects = len([l for l in self.squid.accessLogLines() if "CONNECT" in l])
        for url in (f"https://{SERVER_V4}/file.bin", f"https://[{SERVER_V6}]/file.bin"):
            result = self.fetch(url, timeout=10)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)
        time.sleep(0.5)
        self.assertEqual(len([l for l in self.squid.accessLogLines() if "CONNECT" in l]), connects)


class NfqueueWithoutBypassTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "iptables"

    def test_shifterStopped(self) -> None:
        """
        Without --queue-bypass, while Shifter is not running the SYNs are
        dropped: nothing gets through unproxied.
        """
        result = self.fetch(f"https://{SERVER_V4}/file.bin", timeout=3)
        self.assertEqual(result.returncode, 28, result.stderr)  # curl: timed out
        self.assertEqual(result.body, b"")


class NfqueueBurstTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "iptables"
    webServer = False
    connections = 400

    def test_burst(self) -> None:
        """
        Hundreds of connections opened at once all get through the queue and
        the tunnel: every one is echoed, every queued packet got its verdict
        (the kernel has none waiting and dropped none), and Shifter found
        every connection's SYN.
        """
        self.net.server.start(sys.executable, PEER, "echo", "443", logTo=self.directory / "echo.log")
        self.net.server.waitListening(443)
        self.shifter.start()
        result = self.net.client.run(
            sys.executable, PEER, "burst", SERVER_V4, "443", str(self.connections), "60", timeout=90,
        )
        self.assertEqual(result.stdout.splitlines()[0], f"ok {self.connections} failed 0", result.stdout)
        queue = self.net.gateway.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
        # queue, portid, waiting, copy mode, copy range, dropped, user dropped, last id, 1
        self.assertEqual(queue[0], "0")
        self.assertEqual((queue[2], queue[5], queue[6]), ("0", "0", "0"), queue)
        waitFor(lambda: self.shifter.logText().count(" closed (") >= self.connections, 30,
                "every tunnel to close")
        self.shifter.stop()
        line = self.shifter.waitForLog("nfqueue 0:", "packets read")
        received, verdicts, recorded, found, missing = map(int, re.findall(r"(\d+) (?:packets|verdicts|SYNs|connections found|not found)", line))
        self.assertEqual(received, verdicts)
        self.assertEqual(received, int(queue[7]))
        self.assertGreaterEqual(recorded, self.connections)
        self.assertEqual((found, missing), (self.connections, 0))


class TproxyIptablesTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "tproxy", "iptables"
    listen = f"tproxy:{SHIFTER_PORT}:interface=\\:\\:"

    def assertDirectRefused(self, address: str) -> None:
        self.shifter.start()
        result = self.fetch(f"https://{address}:{SHIFTER_PORT}/", timeout=10)
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog(f"-> {address}:{SHIFTER_PORT} via", "connected to Shifter directly")
        self.assertEqual([l for l in self.squid.accessLogLines() if "CONNECT" in l], [])

    def test_directConnectionRefused(self) -> None:
        """
        Under TPROXY the local address is the destination of every
        connection; a direct connection to Shifter's port is still
        recognised, by the listening port, and refused.
        """
        self.assertDirectRefused(GATEWAY_V4)

    def test_directConnectionRefusedIPv6(self) -> None:
        """
        The same over IPv6.  (A test of its own: refusal lines are one per
        reason every few seconds.)
        """
        self.assertDirectRefused(f"[{GATEWAY_V6}]")

    def test_clientAddressKept(self) -> None:
        """
        No NAT: Shifter sees the client's own address.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")
        self.shifter.waitForLog("tunnel 192.0.2.2:", f"-> {SERVER_V4}:443")


class TproxyNftTests(DualStackMixin, ResolverGatewayTestCase):
    resolver, ruleFormat = "tproxy", "nft"
    listen = f"tproxy:{SHIFTER_PORT}:interface=\\:\\:"


class AutoTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "sockopt", "iptables"

    def test_autoChoosesAndLogs(self) -> None:
        """
        --resolver auto on a host without the kernel module chooses sockopt,
        says so in the start-up log with the reason kmod was passed over,
        and tunnels with it.
        """
        self.shifter.options = tuple("auto" if o == "sockopt" else o for o in self.shifter.options)
        self.shifter.start()
        self.shifter.waitForLog("resolver auto chose sockopt", "kmod:")
        self.shifter.waitForLog("accepting redirected connections", "resolver auto: sockopt")
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")
