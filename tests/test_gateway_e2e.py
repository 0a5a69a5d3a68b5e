"""
End-to-end: the gateway itself is never a destination.  A banner service
listens on every address of the gateway (its loopback and its LAN side);
Squid runs with the ACLs of a stock Debian Squid (it allows CONNECT from
localhost, where Shifter is, and has no C{deny to_localhost}); a client
asks, through Shifter with C{--connect-target sni}, for names that are the
gateway's own, and connects to the gateway's LAN address.  The banner
must never see a connection from the gateway itself.

Needs root and network namespaces (it says so when it skips).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.gateway import CLIENT_V4, GATEWAY_V4, SERVER_V4, SHIFTER_PORT, waitFor
from tests.test_resolvers_e2e import ResolverGatewayTestCase

# A service on every address of the gateway: it greets each connection and
# writes down who made it.
_BANNER = """\
import socket, sys
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", 443))
server.listen(16)
print("listening", flush=True)
while True:
    connection, peer = server.accept()
    print("peer", peer[0], flush=True)
    try:
        connection.sendall(b"GATEWAY-ONLY BANNER\\n")
    except OSError:
        pass
    connection.close()
"""


class GatewayNeverADestinationTests(ResolverGatewayTestCase):
    shifterOptions = ("--connect-target", "sni")

    def setUp(self) -> None:
        super().setUp()
        # The gateway namespace's own hosts file (ip netns exec mounts it on
        # /etc/hosts for what runs there): names of the gateway, as
        # Debian writes them, and one of another machine.
        self.hostsDirectory = Path("/etc/netns") / self.net.gateway.name
        self.hostsDirectory.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, self.hostsDirectory, True)
        self.hostname = socket.gethostname()
        (self.hostsDirectory / "hosts").write_text(
            "127.0.0.1 localhost localhost.localdomain\n"
            f"127.0.1.1 gw.example.test {self.hostname}\n"
            f"{GATEWAY_V4} lan.example.test\n"
            f"{SERVER_V4} www.example.test\n"
        )
        self.squid.stop()
        self.squid.start()  # now reading that hosts file
        self.bannerLog = self.directory / "banner.log"
        self.net.gateway.start(sys.executable, "-c", _BANNER, logTo=self.bannerLog)
        waitFor(lambda: "listening" in self.bannerText(), 20, "the banner service to start")

    def bannerText(self) -> str:
        return self.bannerLog.read_text() if self.bannerLog.exists() else ""

    def bannerPeers(self) -> list[str]:
        return [line.split()[1] for line in self.bannerText().splitlines() if line.startswith("peer ")]

    def fetchNamed(self, name: str):  # type: ignore[no-untyped-def]
        """
        Fetch the file from the server's address, naming C{name} in SNI.
        """
        out = self.directory / f"fetched-{name}"
        result = self.net.client.run(
            "curl", "-sSk", "--max-time", "20", "--connect-to", f"{name}:443:{SERVER_V4}:443",
            "-o", str(out), f"https://{name}/file.bin", check=False, timeout=40,
        )
        return result, (out.read_bytes() if out.exists() else b"")

    def test_namesOfTheGateway(self) -> None:
        """
        A server name that is the gateway's (its host name, a loopback
        name, a name the hosts file gives its loopback or LAN address) is
        not asked for: the connection goes on to its original address, the
        real server, and the banner never sees the gateway connect to
        itself.  Another name is asked for as usual.
        """
        self.shifter.start()
        for name in [self.hostname, "localhost.localdomain", "gw.example.test", "lan.example.test"]:
            result, body = self.fetchNamed(name)
            self.assertEqual(result.returncode, 0, f"{name}: {result.stderr}")
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(self.payload).digest(), name)
            self.shifter.waitForLog(f"CONNECT by address: {name} is a name of this gateway")
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        result, body = self.fetchNamed("www.example.test")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.squid.waitForLog("TCP_TUNNEL/200", "CONNECT www.example.test:443 ")
        self.assertEqual(self.bannerPeers(), [])

    def test_gatewayAddressRefused(self) -> None:
        """
        Even redirected by a rule that does not leave the gateway's own
        addresses alone, a connection to the gateway's LAN address is
        refused by Shifter, and never reaches the banner from the gateway.
        """
        for iptables in ("iptables", "ip6tables"):
            self.net.gateway.run(iptables, "-t", "nat", "-I", "PREROUTING", "-i", "c1", "-p", "tcp",
                                 "--dport", "443", "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.shifter.start()
        received = self.exchange(GATEWAY_V4)
        self.assertEqual(received, b"")
        self.shifter.waitForLog(f"destination {GATEWAY_V4} is an address of this machine")
        self.assertEqual(self.bannerPeers(), [])

    def test_printedRulesLeaveTheGatewayAlone(self) -> None:
        """
        The printed rules do not redirect a connection to the gateway's own
        address: it reaches the gateway's service directly, from the
        client's own address, and Shifter never sees it.
        """
        self.shifter.start()
        received = self.exchange(GATEWAY_V4)
        self.assertEqual(received, b"GATEWAY-ONLY BANNER\n")
        self.assertEqual(self.bannerPeers(), [f"::ffff:{CLIENT_V4}"])
        self.assertNotIn(f"-> {GATEWAY_V4}:443", self.shifter.logText())

    def exchange(self, host: str) -> bytes:
        """
        Connect from the client to C{host}:443 and read until the end.
        """
        connection = self.net.client.connect(host, 443)
        received = b""
        try:
            while True:
                data = connection.recv(4096)
                if not data:
                    break
                received += data
        except OSError:
            pass
        finally:
            connection.close()
        return received
