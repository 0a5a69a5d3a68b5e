"""
End-to-end: C{--pac} in a real gateway.  The PAC script is served over
HTTP from the server's namespace (or read from a file), Squid runs on the
gateway's loopback, and a real client fetches through the REDIRECT rule.

  - C{PROXY dead; PROXY live}: the dead proxy fails, the live Squid
    carries the tunnel, and the tunnel's line names the PAC answer.
  - Hostile scripts (a loop, an allocation without end, a throw, garbage,
    a look-up whose DNS server never answers): each gives one line and the
    fallback, the helper is replaced where it was killed, and an ordinary
    tunnel opened meanwhile opens.
  - A PAC file past the size limit: one line, and the fallback (refuse).
  - C{ctl explain}: a rule, a PAC answer (fresh, then cached), a refusal.

Needs root and network namespaces (it says so when it skips).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    CLIENT_V4, GATEWAY_V4, PROJECT, SERVER_V4, SHIFTER_PORT, SQUID_PORT, ShifterProcess, gatewayFor, waitFor,
)
from tests.support import requireHost
from tests.test_resolvers_e2e import ResolverGatewayTestCase

PAC_PORT = 8080

HOSTILE = """
function FindProxyForURL(url, host) {
  if (host == "loop.test") { while (true) {} }
  if (host == "alloc.test") { var a = []; while (true) { a.push(new Array(1000000).fill(a.length)); } }
  if (host == "throw.test") { throw new Error("no such luck"); }
  if (host == "garbage.test") { return "TELEPORT now"; }
  if (host == "dns.test") { return dnsResolve("never.answers.test") ? "DIRECT" : "DIRECT"; }
  return "PROXY 127.0.0.1:%d";
}
""" % SQUID_PORT

# A DNS server that reads every query and never answers.
_SILENT_DNS = """\
import socket
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.53", 53))
print("listening", flush=True)
while True:
    server.recv(4096)
"""

NAMES = ("loop.test", "alloc.test", "throw.test", "garbage.test", "dns.test", "www.example.test")


class PacGatewayTestCase(ResolverGatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.pacDirectory = self.directory / "pac"
        self.pacDirectory.mkdir()
        os.chmod(self.pacDirectory, 0o755)
        self.control = self.directory / "control"

    def startShifter(self, *options: str) -> None:
        self.shifter = ShifterProcess(
            self.net.gateway, self.directory,
            "--listen", self.listen, "--resolver", self.resolver, "--control", f"unix:{self.control}", *options,
        )
        self.shifter.start()

    def servePac(self, script: str) -> str:
        """
        Serve C{script} over HTTP from the server's namespace; its URL.
        """
        (self.pacDirectory / "proxy.pac").write_text(script)
        self.net.server.start(
            sys.executable, "-m", "http.server", str(PAC_PORT), "--bind", SERVER_V4,
            "--directory", str(self.pacDirectory), logTo=self.directory / "pac-server.log",
        )
        self.net.server.waitListening(PAC_PORT)
        return f"http://{SERVER_V4}:{PAC_PORT}/proxy.pac"

    def pacFile(self, script: str) -> str:
        path = self.pacDirectory / "proxy.pac"
        path.write_text(script)
        return str(path)

    def fetchNamed(self, name: str, background: bool = False):  # type: ignore[no-untyped-def]
        """
        Fetch the file from the server's address, naming C{name} in SNI.
        """
        out = self.directory / f"fetched-{name}"
        command = [
            "curl", "-sSk", "--max-time", "30", "--connect-to", f"{name}:443:{SERVER_V4}:443",
            "-o", str(out), f"https://{name}/file.bin",
        ]
        if background:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.net.client.name, *command],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            ), out
        return self.net.client.run(*command, check=False, timeout=60), out

    def assertFetched(self, result, out: Path) -> None:  # type: ignore[no-untyped-def]
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(self.payload).digest())

    def ctl(self, *arguments: str) -> subprocess.CompletedProcess:
        return self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "shifter.ctl",
            "--control", f"unix:{self.control}", *arguments, check=False,
        )


class PacFailoverTests(PacGatewayTestCase):
    def test_deadThenLive(self) -> None:
        """
        A PAC served over HTTP answers C{PROXY dead; PROXY live}, and
        Shifter runs with no --proxy at all: the dead proxy refuses, the
        live Squid carries the tunnel, and the tunnel's line names the PAC
        answer that decided.
        """
        url = self.servePac(
            "function FindProxyForURL(url, host) {\n"
            f"  return 'PROXY 127.0.0.1:3999; PROXY 127.0.0.1:{SQUID_PORT}';\n"
            "}\n"
        )
        self.startShifter("--pac", url)
        self.shifter.waitForLog(f"PAC {url} loaded")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        self.shifter.waitForLog("via 127.0.0.1:3999", f"trying 127.0.0.1:{SQUID_PORT}")
        self.shifter.waitForLog(
            f"via 127.0.0.1:{SQUID_PORT} (PAC: PROXY 127.0.0.1:3999; PROXY 127.0.0.1:{SQUID_PORT}) closed"
        )


class HostilePacTests(PacGatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        # The gateway's own hosts file and resolver (ip netns exec mounts
        # them for what runs there): the test names lead to the server,
        # and any other name is asked of a DNS server that never answers
        # (a UDP socket on the namespace's loopback that reads and drops).
        self.etc = Path("/etc/netns") / self.net.gateway.name
        self.etc.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, self.etc, True)
        (self.etc / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{SERVER_V4} {name}\n" for name in NAMES)
        )
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.53\noptions timeout:5 attempts:2\n")
        silent = self.directory / "silent-dns.log"
        self.net.gateway.start(sys.executable, "-c", _SILENT_DNS, logTo=silent)
        waitFor(lambda: silent.exists() and "listening" in silent.read_text(), 20, "the silent DNS server")
        self.squid.stop()
        self.squid.start()  # now reading that hosts file

    def test_hostileScripts(self) -> None:
        """
        Each hostile answer gives one line and the fallback (the default
        group's Squid), the helper killed at the time limit is replaced,
        and ordinary tunnels opened meanwhile open.
        """
        self.startShifter(
            "--proxy", f"127.0.0.1:{SQUID_PORT}", "--connect-target", "sni",
            "--pac", self.pacFile(HOSTILE), "--pac-fallback", "default", "--pac-timeout", "1",
        )
        self.shifter.waitForLog("PAC", "loaded")
        reasons = {
            "loop.test": "did not answer within 1 s",
            "alloc.test": "memory",
            "throw.test": "no such luck",
            "garbage.test": "no usable entry",
            "dns.test": "did not answer within 1 s",
        }
        for name, reason in reasons.items():
            slow, slowOut = self.fetchNamed(name, background=True)
            result, out = self.fetchNamed("www.example.test")
            self.assertFetched(result, out)
            stdout, stderr = slow.communicate(timeout=60)
            self.assertEqual(slow.returncode, 0, stderr)
            self.assertEqual(slowOut.read_bytes(), self.payload)
            line = self.shifter.waitForLog(f"PAC for https://{name}/:", reason)
            self.assertIn("connections go through proxy group default (--pac-fallback)", line)
            self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {name}:443 ")
        log = self.shifter.logText()
        for name in reasons:
            self.assertEqual(log.count(f"PAC for https://{name}/:"), 1, name)
        self.assertGreaterEqual(log.count("; starting another"), 2)
        self.assertIn("(PAC: PROXY 127.0.0.1:3128) closed", log)

    def test_tooLarge(self) -> None:
        """
        A PAC file past the size limit is refused with one line; with no
        script and --pac-fallback refuse, connections are refused, and
        Squid never sees them.
        """
        script = "function FindProxyForURL(u, h) { return 'DIRECT'; }\n" + "// padding\n" * 200_000
        self.startShifter("--pac", self.pacFile(script))
        line = self.shifter.waitForLog("PAC", "larger than")
        self.assertIn("no PAC script, so connections are refused (--pac-fallback refuse) until one loads", line)
        result, _ = self.fetchNamed("www.example.test")
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog("no PAC answer (no PAC script is loaded) and --pac-fallback refuse")
        self.assertEqual(self.squid.accessLogLines(), [])


class ExplainTests(PacGatewayTestCase):
    def test_explain(self) -> None:
        """
        C{ctl explain} says which rule matched, the PAC answer (fresh, then
        cached) with the proxies in order and their health and the CONNECT
        target, and a refusal; C{--json} gives the same facts.
        """
        config = self.directory / "shifter.toml"
        config.write_text(
            '[[rule]]\ndestination = "198.51.100.0/24"\nrefuse = "no test net"\n'
        )
        self.startShifter(
            "--config", str(config), "--pac", self.pacFile(
                "function FindProxyForURL(url, host) {\n"
                f"  return 'PROXY 127.0.0.1:3999; PROXY 127.0.0.1:{SQUID_PORT}; DIRECT';\n"
                "}\n"
            ),
        )
        self.shifter.waitForLog("PAC", "loaded")
        rule = self.ctl("explain", CLIENT_V4, "198.51.100.9:443")
        self.assertEqual(rule.returncode, 0, rule.stderr)
        self.assertIn("rule:       the rule at line 1 matches", rule.stdout)
        self.assertIn("refused:    no test net (rule at line 1)", rule.stdout)
        self.assertNotIn("PAC", rule.stdout)

        fresh = self.ctl("explain", CLIENT_V4, f"{SERVER_V4}:443", "www.example.test")
        self.assertEqual(fresh.returncode, 0, fresh.stderr)
        self.assertIn("rule:       none matches", fresh.stdout)
        self.assertIn("PAC asked:  FindProxyForURL('https://www.example.test/', 'www.example.test')", fresh.stdout)
        self.assertIn(f"PAC answer: PROXY 127.0.0.1:3999; PROXY 127.0.0.1:{SQUID_PORT}; DIRECT (fresh)", fresh.stdout)
        self.assertIn("try 1:      127.0.0.1:3999: up", fresh.stdout)
        self.assertIn(f"try 2:      127.0.0.1:{SQUID_PORT}: up", fresh.stdout)
        self.assertIn("try 3:      DIRECT: direct", fresh.stdout)
        self.assertIn(f"CONNECT:    {SERVER_V4}:443", fresh.stdout)

        cached = self.ctl("explain", "--json", CLIENT_V4, f"{SERVER_V4}:443", "www.example.test")
        self.assertEqual(cached.returncode, 0, cached.stderr)
        explained = json.loads(cached.stdout)["explain"]
        self.assertEqual(explained["pac"]["cached"], True)
        self.assertEqual([p["proxy"] for p in explained["proxies"]],
                         ["127.0.0.1:3999", f"127.0.0.1:{SQUID_PORT}", "DIRECT"])
        self.assertEqual(explained["connectTarget"], f"{SERVER_V4}:443")
        self.assertIsNone(explained["refused"])

        refused = self.ctl("explain", CLIENT_V4, f"{GATEWAY_V4}:443")
        self.assertEqual(refused.returncode, 0, refused.stderr)
        self.assertIn(f"refused:    destination {GATEWAY_V4} is an address of this machine", refused.stdout)
        self.assertIn("decided by: destination checks", refused.stdout)


class PacDirectAndSocksTests(PacGatewayTestCase):
    """
    PAC answers that name no HTTP proxy: DIRECT, and a SOCKS5 server (a
    real Dante in the server's namespace).
    """

    def test_direct(self) -> None:
        """
        C{DIRECT}: Shifter connects to the original destination itself; the
        file arrives, Squid never sees the connection, and the tunnel's
        line names the answer.
        """
        self.startShifter("--pac", self.pacFile("function FindProxyForURL(url, host) { return 'DIRECT'; }"))
        self.shifter.waitForLog("PAC", "loaded")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via DIRECT (PAC: DIRECT) closed")
        self.assertEqual(self.squid.accessLogLines(), [])

    def test_socks5(self) -> None:
        """
        C{SOCKS5 host:port} (after a SOCKS4 entry, which is skipped): the
        tunnel goes through the SOCKS5 server, and Squid never sees it.
        """
        from tests.test_socks_direct_e2e import SOCKS_PORT, Dante

        requireHost(root=True, programs=("danted",))
        dante = Dante(self.net.server, self.directory / "dante", SERVER_V4)
        dante.start()
        self.addCleanup(dante.stop)
        self.startShifter("--pac", self.pacFile(
            "function FindProxyForURL(url, host) {\n"
            f"  return 'SOCKS4 {SERVER_V4}:{SOCKS_PORT}; SOCKS5 {SERVER_V4}:{SOCKS_PORT}';\n"
            "}\n"
        ))
        self.shifter.waitForLog("PAC", "loaded")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.shifter.waitForLog(
            f"via socks5://{SERVER_V4}:{SOCKS_PORT} (PAC: SOCKS4 {SERVER_V4}:{SOCKS_PORT}; "
            f"SOCKS5 {SERVER_V4}:{SOCKS_PORT}) closed"
        )
        dante.waitForLog("pass", "tcp/connect", f"{SERVER_V4}.443")
        self.assertEqual(self.squid.accessLogLines(), [])


class PacHttpsTests(PacGatewayTestCase):
    def test_https(self) -> None:
        """
        C{HTTPS host:port}: an https:// proxy (a Squid's https_port), its
        certificate checked against --proxy-ca, which applies to the
        proxies the script names.
        """
        from tests.gateway import Squid, makeCertificate

        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        tlsSquid = Squid(self.net.gateway, self.directory / "squid-tls", port=3129,
                         extra=f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n")
        tlsSquid.start()
        self.addCleanup(tlsSquid.stop)
        self.net.gateway.waitListening(3443)
        self.startShifter("--proxy-ca", str(cert), "--pac", self.pacFile(
            "function FindProxyForURL(url, host) { return 'HTTPS 127.0.0.1:3443'; }"
        ))
        self.shifter.waitForLog("PAC", "loaded")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        tlsSquid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        self.shifter.waitForLog("via https://127.0.0.1:3443 (PAC: HTTPS 127.0.0.1:3443) closed")
        self.assertEqual(self.squid.accessLogLines(), [])


class WpadTests(PacGatewayTestCase):
    """
    C{--pac wpad} through a real DNS server (dnsmasq, in the server's
    namespace) that the gateway's resolv.conf names, with the gateway's
    search domain; the script served over HTTP on port 80.
    """

    def setUp(self) -> None:
        requireHost(root=True, programs=("dnsmasq",))
        super().setUp()
        self.etc = Path("/etc/netns") / self.net.gateway.name
        self.etc.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, self.etc, True)
        (self.pacDirectory / "wpad.dat").write_text(
            f"function FindProxyForURL(url, host) {{ return 'PROXY 127.0.0.1:{SQUID_PORT}'; }}\n"
        )
        self.net.server.start(
            sys.executable, "-m", "http.server", "80", "--bind", SERVER_V4,
            "--directory", str(self.pacDirectory), logTo=self.directory / "wpad-server.log",
        )
        self.net.server.waitListening(80)
        self.dnsLog = self.directory / "dnsmasq.log"

    def startDns(self, searchDomain: str, *names: str) -> None:
        """
        dnsmasq answering C{names} (and nothing else) with the server's
        address, and the gateway searching C{searchDomain}.
        """
        (self.etc / "resolv.conf").write_text(f"search {searchDomain}\nnameserver {SERVER_V4}\n")
        self.net.server.start(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root",
            f"--listen-address={SERVER_V4}", "--bind-interfaces", "--log-queries",
            f"--log-facility={self.dnsLog}", f"--pid-file={self.directory / 'dnsmasq.pid'}",
            *(f"--address=/{name}/{SERVER_V4}" for name in names),
            logTo=self.directory / "dnsmasq.out",
        )
        waitFor(lambda: self.dnsLog.exists() and "started" in self.dnsLog.read_text(), 20, "dnsmasq")

    def queried(self) -> list[str]:
        text = self.dnsLog.read_text() if self.dnsLog.exists() else ""
        return [line.split()[-3] for line in text.splitlines() if "query[" in line]

    def test_found(self) -> None:
        """
        From the search domain a.b.example.test down, the first name that
        gives a script is used, and says so; connections follow it.
        """
        self.startDns("a.b.example.test", "wpad.example.test", "wpad.test")
        self.startShifter("--pac", "wpad")
        self.shifter.waitForLog(
            "PAC wpad: found http://wpad.example.test/wpad.dat (search domain a.b.example.test, "
            "looked for down to http://wpad.example.test/wpad.dat)"
        )
        self.shifter.waitForLog("PAC wpad (http://wpad.example.test/wpad.dat) loaded")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        queried = self.queried()
        self.assertIn("wpad.a.b.example.test", queried)
        self.assertIn("wpad.b.example.test", queried)
        self.assertNotIn("wpad.test", queried)

    def test_neverAboveRegistrable(self) -> None:
        """
        With only wpad.test answered (a name above the registrable domain,
        where anyone could publish one), nothing is found, wpad.test is
        never asked for, and the fallback refuses.
        """
        self.startDns("b.example.test", "wpad.test")
        self.startShifter("--pac", "wpad")
        line = self.shifter.waitForLog(
            "PAC wpad: WPAD found no script (search domain b.example.test, "
            "looked for down to http://wpad.example.test/wpad.dat)"
        )
        self.assertIn("no PAC script, so connections are refused (--pac-fallback refuse)", line)
        self.assertIn("wpad.example.test", self.queried())
        self.assertNotIn("wpad.test", self.queried())
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)


class PacReloadTests(PacGatewayTestCase):
    def test_reloadRefreshes(self) -> None:
        """
        C{pac = FILE} in the configuration file; a reload fetches the
        script again, and a changed one is in force for the next
        connections (answers cached before are dropped).
        """
        pac = self.pacFile(f"function FindProxyForURL(url, host) {{ return 'PROXY 127.0.0.1:{SQUID_PORT}'; }}\n")
        config = self.directory / "shifter.toml"
        config.write_text(f'pac = "{pac}"\n')
        self.startShifter("--config", str(config))
        self.shifter.waitForLog("PAC", "loaded")
        first = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(first.returncode, 0, first.stderr)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        Path(pac).write_text("function FindProxyForURL(url, host) { return 'DIRECT'; }\n")
        reloaded = self.ctl("reload")
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.shifter.waitForLog("changed: the new script is in force")
        second = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual(second.body, self.payload)
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via DIRECT (PAC: DIRECT) closed")
        # One CONNECT through Squid (its other lines, if any, are warm
        # connections closed unused: transaction-end-before-headers).
        self.assertEqual(len([line for line in self.squid.accessLogLines() if " CONNECT " in line]), 1)


class DhcpLeaseTests(SynchronousTestCase):
    """
    The PAC URL of DHCP's option 252, from a real exchange: dnsmasq serving
    DHCP on the gateway's LAN side with option 252, ISC dhclient on the
    client side asking for it and writing its lease file, which Shifter's
    WPAD reads.
    """

    def test_option252(self) -> None:
        """
        The URL the DHCP server gave is the one WPAD takes, before DNS.
        """
        requireHost(root=True, programs=("dnsmasq", "dhclient"))
        from shifter.pac.wpad import dhcpWpadURL, wpadCandidates

        net = gatewayFor(self)
        url = "http://wpad.corp.example.test/proxy.pac"
        net.gateway.start(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=0", "--user=root",
            "--interface=c1", "--bind-interfaces", "--dhcp-authoritative",
            f"--dhcp-range={CLIENT_V4.rsplit('.', 1)[0]}.50,{CLIENT_V4.rsplit('.', 1)[0]}.60,1h",
            f"--dhcp-option=252,{url}", f"--dhcp-leasefile={net.directory / 'dnsmasq.leases'}",
            f"--pid-file={net.directory / 'dnsmasq.pid'}",
            logTo=net.directory / "dnsmasq.out",
        )
        config = net.directory / "dhclient.conf"
        config.write_text("option wpad code 252 = text;\nrequest subnet-mask, routers, wpad;\n")
        leases = net.directory / "dhclient.c0.leases"
        net.client.start(
            "dhclient", "-d", "-1", "-v", "-cf", str(config), "-lf", str(leases),
            "-pf", str(net.directory / "dhclient.pid"), "-sf", "/bin/true", "c0",
            logTo=net.directory / "dhclient.out",
        )
        waitFor(lambda: leases.exists() and "lease {" in leases.read_text(), 60, "dhclient's lease")
        self.assertIn(f'option wpad "{url}";', leases.read_text())
        self.assertEqual(dhcpWpadURL([str(leases)]), (url, str(leases)))
        resolv = net.directory / "resolv.conf"
        resolv.write_text("search elsewhere.example.com\n")
        self.assertEqual(wpadCandidates(str(resolv), leases=[str(leases)]),
                         (f"DHCP option 252 in {leases}", [url]))
