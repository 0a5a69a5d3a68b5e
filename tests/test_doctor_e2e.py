"""
C{python -m shifter.doctor} on real gateways in network namespaces: a good
one (the rules C{python -m shifter.rules} prints, Squid, Shifter), about
which it says nothing, and broken ones, each with one mistake, each of
which it names.

These need root (namespaces, iptables, nft), Squid, curl and openssl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    PROJECT,
    SERVER_V4,
    SHIFTER_PORT,
    SQUID_PORT,
    ShifterProcess,
    Squid,
    WebServer,
    gatewayFor,
)
from tests.support import requireHost
from tests.test_resolvers_e2e import LAN, printedRules

LISTEN = f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"


class DoctorTestCase(SynchronousTestCase):
    """
    A gateway with the printed rules for C{resolver} applied (QUIC refused
    among them); each test makes one mistake, then asks doctor.
    """

    resolver = "sockopt"
    ruleFormat = "iptables"
    ruleOptions: tuple[str, ...] = ()
    shifterOptions: tuple[str, ...] = ()

    def setUp(self) -> None:
        requireHost(root=True, programs=("ip", "iptables", "ip6tables", "nft", "squid", "openssl", "ss"))
        self.net = gatewayFor(self)
        self.directory = self.net.directory
        rules = printedRules(self.resolver, self.ruleFormat, *self.ruleOptions)
        self.assertIn("udp", rules, "the printed rules refuse QUIC")
        self.gw("sh", "-c", rules)
        self.listen = LISTEN

    def gw(self, *command: str) -> str:
        return self.net.gateway.run(*command).stdout

    def startShifter(self, *options: str) -> ShifterProcess:
        shifter = ShifterProcess(
            self.net.gateway, self.directory, "--listen", self.listen, "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--resolver", self.resolver, *self.shifterOptions, *options,
        )
        shifter.start()
        self.addCleanup(shifter.stop)
        return shifter

    def doctor(self, *options: str, proxyCheck: bool = False) -> tuple[int, list[str]]:
        """
        Run doctor in the gateway namespace; its exit status and lines.
        """
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "shifter.doctor",
            "--lan-interface", LAN, "--ports", "443", "--check-target", f"{SERVER_V4}:443",
            "--squid-conf", str(self.guardedSquidConf()),
            *(() if proxyCheck else ("--no-proxy-check",)),
            "--listen", self.listen, "--proxy", f"127.0.0.1:{SQUID_PORT}", "--resolver", self.resolver,
            *self.shifterOptions, *options,
            check=False,
        )
        self.assertEqual(result.stderr, "")
        lines = result.stdout.splitlines()
        (self.directory / "doctor.txt").write_text(result.stdout)
        return result.returncode, lines

    def guardedSquidConf(self) -> Path:
        """
        A Squid configuration that denies CONNECT to this machine and its
        link before it allows anything, as doctor asks.
        """
        path = self.directory / "guarded-squid.conf"
        path.write_text("http_access deny to_localhost\nhttp_access deny to_linklocal\n"
                        "http_access allow localhost\nhttp_access deny all\n")
        return path

    def assertNamed(self, *expected: str, status: int = 1, **kwargs: object) -> list[str]:
        """
        Doctor exits with C{status} and prints one line per fragment in
        C{expected}, each holding it, and nothing else.
        """
        code, lines = self.doctor(**kwargs)  # type: ignore[arg-type]
        self.assertEqual(len(lines), len(expected), lines)
        for line, fragment in zip(sorted(lines), sorted(expected)):
            self.assertIn(fragment, line, lines)
        self.assertEqual(code, status, lines)
        return lines


class GoodGatewayTests(DoctorTestCase):
    def test_silent(self) -> None:
        """
        On a good gateway (the printed rules, QUIC refused, Squid and
        Shifter running, the proxy answering CONNECT), doctor prints
        nothing and exits 0.
        """
        squid = Squid(self.net.gateway, self.directory / "squid")
        squid.start()
        self.addCleanup(squid.stop)
        web = WebServer(self.net.server, self.directory / "web")
        web.start()
        self.startShifter()
        self.assertEqual(self.doctor(proxyCheck=True), (0, []))
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443")

    def test_squidWithoutGuards(self) -> None:
        """
        A Squid whose configuration allows localhost (as Debian's does)
        without denying to_localhost and to_linklocal first is a warning.
        """
        squid = Squid(self.net.gateway, self.directory / "squid")
        self.startShifter()
        code, lines = self.doctor("--squid-conf", str(squid.config))
        self.assertEqual(code, 0, lines)
        [line] = lines
        self.assertTrue(line.startswith(f"warning: squid: {squid.config} has no 'http_access deny to_localhost' and "
                                        "'http_access deny to_linklocal' before its first http_access allow"), line)

    def test_silentWithConfig(self) -> None:
        """
        Doctor takes what it needs from Shifter's configuration file (its
        [gateway] table included).
        """
        self.startShifter()
        config = self.directory / "shifter.toml"
        config.write_text(
            f"listen = '{LISTEN}'\nproxy = ['127.0.0.1:{SQUID_PORT}']\n"
            f"[gateway]\nlan-interface = '{LAN}'\nports = [443]\nsquid-conf = '{self.guardedSquidConf()}'\n"
        )
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "shifter.doctor", "--no-proxy-check",
            "--config", str(config), check=False,
        )
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))


class GoodNftGatewayTests(GoodGatewayTests):
    ruleFormat = "nft"


class GoodNfqueueGatewayTests(DoctorTestCase):
    resolver = "nfqueue"

    def test_silent(self) -> None:
        """
        The nfqueue resolver's printed rules (NFQUEUE, then REDIRECT of
        the SYNs Shifter marks) satisfy doctor.
        """
        self.startShifter()
        self.assertEqual(self.doctor(), (0, []))

    def test_wrongQueue(self) -> None:
        """
        Mistake: Shifter reads another queue than the rules fill.
        """
        self.shifterOptions = ("--queue-num", "1")
        self.startShifter()
        lines = self.assertNamed("error: redirect: TCP port 443 arriving on c1 (IPv4) is queued to NFQUEUE 0",
                                 "error: redirect: TCP port 443 arriving on c1 (IPv6) is queued to NFQUEUE 0")
        for line in lines:
            self.assertTrue(line.endswith("--queue-num 0), but Shifter reads queue 1: make them the same "
                                          "(--queue-num)"), line)


class DirectAtSynGatewayTests(DoctorTestCase):
    """
    The rules printed for --resolver nfqueue --hold-syn, with their direct
    mark rules (-m connmark, CONNMARK; ct mark in the nft form).
    """

    resolver = "nfqueue"
    ruleOptions: tuple[str, ...] = ("--hold-syn",)
    shifterOptions: tuple[str, ...] = ("--hold-syn",)

    def test_understood(self) -> None:
        """
        Doctor follows every rule (none it treated as not matching), finds
        nothing wrong, and says that connections with the direct mark
        bypass Shifter, by the rule that saves the mark.
        """
        self.startShifter()
        code, lines = self.doctor("-v")
        self.assertEqual(code, 0, lines)
        self.assertEqual([line for line in lines if not line.startswith(("note:", "checked:"))], [])
        self.assertEqual([line for line in lines if "could not follow" in line], [])
        notes = [line for line in lines if line.startswith("note: direct: ")]
        self.assertTrue(notes, lines)
        for line in notes:
            self.assertIn("note: direct: connections marked 0x40000 (sent DIRECT at the SYN) bypass Shifter: "
                          "forwarded, not queued again, their mark saved to the connection by ", line)
            self.assertIn("ct mark set ct mark | 0x00040000" if self.ruleFormat == "nft"
                          else "-j CONNMARK --set-xmark 0x40000/0x40000", line)

    def test_markNotSaved(self) -> None:
        """
        Mistake: the rule that saves the direct mark to the connection is
        gone.
        """
        if self.ruleFormat == "nft":
            self.gw("nft", "flush", "chain", "inet", "shifter", "prerouting")
            self.gw("nft", "add", "rule", "inet", "shifter", "prerouting", "iifname", LAN, "tcp", "dport", "443",
                    "meta", "mark", "&", "0x10000", "==", "0x10000", "redirect", "to", f":{SHIFTER_PORT}")
        else:
            for command in ("iptables", "ip6tables"):
                self.gw(command, "-t", "nat", "-D", "PREROUTING", "-i", LAN, "-p", "tcp", "-m", "mark", "--mark",
                        "0x40000/0x40000", "-j", "CONNMARK", "--set-mark", "0x40000/0x40000")
        self.startShifter()
        lines = self.assertNamed(
            "warning: direct: a SYN of TCP port 443 arriving on c1 (IPv4) that Shifter sends DIRECT at the SYN",
            "warning: direct: a SYN of TCP port 443 arriving on c1 (IPv6) that Shifter sends DIRECT at the SYN",
            status=0,
        )
        for line in lines:
            self.assertIn("is forwarded, but its mark is not saved to its connection", line)


class DirectAtSynNftGatewayTests(DirectAtSynGatewayTests):
    ruleFormat = "nft"


class DirectAtSynNfqueueGatewayTests(DirectAtSynGatewayTests):
    """
    The same with the rules printed for --resolver nfqueue alone, whose
    direct mark rules are the same.
    """

    ruleOptions = ()
    shifterOptions = ()


class DirectAtSynNfqueueNftGatewayTests(DirectAtSynNfqueueGatewayTests):
    ruleFormat = "nft"


class TproxyGatewayTests(DoctorTestCase):
    resolver = "tproxy"

    def setUp(self) -> None:
        super().setUp()
        self.listen = f"tproxy:{SHIFTER_PORT}:interface=\\:\\:"

    def test_silent(self) -> None:
        """
        The tproxy resolver's printed rules (TPROXY, policy routing)
        satisfy doctor.
        """
        self.startShifter()
        self.assertEqual(self.doctor(), (0, []))

    def test_noPolicyRouting(self) -> None:
        """
        Mistake: the TPROXY rule without the ip rule that delivers its
        marked packets locally.
        """
        self.gw("ip", "rule", "del", "fwmark", "0x1/0x1", "lookup", "100")
        self.startShifter()
        self.assertNamed("error: redirect: TCP port 443 arriving on c1 (IPv4) is marked 0x1 by TPROXY, but no ip "
                         "rule (ip -4 rule) routes that mark to a local table: ip -4 rule add fwmark 0x1/0x1 lookup 100")


class BrokenGatewayTests(DoctorTestCase):
    """
    One mistake each, on the iptables sockopt gateway.
    """

    def test_forwardingOff(self) -> None:
        self.gw("sysctl", "-qw", "net.ipv4.ip_forward=0")
        self.startShifter()
        self.assertNamed("error: forwarding: net.ipv4.ip_forward is 0")

    def test_wrongInterface(self) -> None:
        """
        Mistake: the redirect is on the uplink (s1), not the LAN (c1).
        """
        for command in ("iptables", "ip6tables"):
            self.gw(command, "-t", "nat", "-F", "PREROUTING")
            self.gw(command, "-t", "nat", "-A", "PREROUTING", "-i", "s1", "-p", "tcp", "--dport", "443",
                    "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.startShifter()
        self.assertNamed(
            "error: redirect: TCP port 443 arriving on c1 (IPv4) is not redirected to Shifter and goes around the "
            "proxy (a rule redirects it when it arrives on s1: is that the LAN interface?)",
            "error: redirect: TCP port 443 arriving on c1 (IPv6) is not redirected to Shifter and goes around the "
            "proxy (a rule redirects it when it arrives on s1: is that the LAN interface?)",
        )

    def test_wrongPort(self) -> None:
        self.gw("iptables", "-t", "nat", "-R", "PREROUTING", "1", "-i", LAN, "-p", "tcp", "--dport", "443",
                "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT + 1))
        self.startShifter()
        self.assertNamed(f"error: redirect: TCP port 443 arriving on c1 (IPv4) is redirected to port "
                         f"{SHIFTER_PORT + 1}, but Shifter listens on {SHIFTER_PORT}")

    def test_proxyRedirectedBack(self) -> None:
        """
        Mistake: the gateway's own connections to 443 are redirected, the
        proxy's included.
        """
        self.gw("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "443",
                "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.startShifter()
        self.assertNamed("error: loop: the proxy's own connections (user proxy) to port 443 (IPv4) are redirected "
                         "back to Shifter")

    def test_shifterRedirectedBack(self) -> None:
        """
        Mistake: every local TCP connection but the proxy's is redirected,
        Shifter's own to the proxy included.
        """
        self.gw("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "!", "--uid-owner", "proxy",
                "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.startShifter()
        self.assertNamed(f"error: loop: Shifter's own connections to the proxy 127.0.0.1:{SQUID_PORT} are NATed")

    def test_dnatWithoutRouteLocalnet(self) -> None:
        """
        Mistake: DNAT to 127.0.0.1 without route_localnet.
        """
        self.gw("iptables", "-t", "nat", "-R", "PREROUTING", "1", "-i", LAN, "-p", "tcp",
                "-m", "addrtype", "!", "--dst-type", "LOCAL", "--dport", "443",
                "-j", "DNAT", "--to-destination", f"127.0.0.1:{SHIFTER_PORT}")
        self.startShifter()
        [line] = self.assertNamed("error: route_localnet: TCP port 443 arriving on c1 (IPv4) is DNATed to 127.0.0.1")
        self.assertIn("unless net.ipv4.conf.c1.route_localnet=1", line)

    def test_gatewayDestinationRedirected(self) -> None:
        """
        Mistake: a redirect that also takes connections to the gateway's
        own address (Shifter refuses them).
        """
        self.gw("iptables", "-t", "nat", "-R", "PREROUTING", "1", "-i", LAN, "-p", "tcp", "--dport", "443",
                "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.startShifter()
        [line] = self.assertNamed("warning: gateway: connections from c1 to the gateway's own 192.0.2.1 port 443",
                                  status=0)
        self.assertIn("-m addrtype ! --dst-type LOCAL", line)

    def test_reversePath(self) -> None:
        """
        Mistake: clients of a network behind the LAN, with no route back
        through it, on a strict rp_filter LAN.
        """
        self.gw("ip", "route", "add", "default", "via", SERVER_V4)
        self.gw("sysctl", "-qw", f"net.ipv4.conf.{LAN}.rp_filter=1")
        self.startShifter()
        code, lines = self.doctor("--allow", "192.0.2.0/24", "--allow", "198.51.100.0/24")
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("error: rp_filter: rp_filter is strict on c1 and the route back to clients in "
                      "198.51.100.0/24 leaves by s1", lines[0])

    def test_notrack(self) -> None:
        """
        Mistake: a raw-table rule takes the redirected port out of
        conntrack, so nothing is NATed (also for --resolver conntrack).
        """
        self.gw("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "443", "-j", "CT", "--notrack")
        self.startShifter()
        self.assertNamed("error: conntrack: TCP port 443 arriving on c1 (IPv4) is not tracked (iptables -t raw "
                         "-A PREROUTING -p tcp -m tcp --dport 443 -j CT --notrack)")

    def test_quicNotRefused(self) -> None:
        """
        Mistake: UDP 443 is forwarded; a warning, so the exit status is 0.
        """
        self.gw("iptables", "-F", "FORWARD")
        self.startShifter()
        self.assertNamed("warning: quic: UDP port 443 arriving on c1 (IPv4) is forwarded", status=0)

    def test_descriptors(self) -> None:
        """
        Mistake: --max-connections more than the running Shifter's
        open-file limit allows.
        """
        shifter = self.startShifter()
        subprocess.run(["prlimit", f"--pid={shifter.process.pid}", "--nofile=1024:1024"], check=True)
        code, lines = self.doctor("--max-connections", "10000")
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("error: descriptors: --max-connections 10000 needs 20032 descriptors (two per tunnel, and a "
                      "reserve), but the running Shifter's", lines[0])
        self.assertIn("open-file limit is 1024", lines[0])

    def test_listensOnLoopbackOnly(self) -> None:
        """
        Mistake: Shifter listens on 127.0.0.1, where REDIRECT from the LAN
        never lands.
        """
        self.listen = f"tcp:{SHIFTER_PORT}:interface=127.0.0.1"
        self.startShifter()
        self.assertNamed(f"error: redirect: TCP port 443 arriving on c1 (IPv4) is redirected to 192.0.2.1 port "
                         f"{SHIFTER_PORT}, but Shifter listens on 127.0.0.1 only",
                         f"error: redirect: TCP port 443 arriving on c1 (IPv6) is redirected to port {SHIFTER_PORT}, "
                         "but Shifter listens on IPv4 only")

    def test_proxyDown(self) -> None:
        """
        Mistake: nothing answers on the proxy's port.
        """
        self.startShifter()
        self.assertNamed(f"error: proxy: 127.0.0.1:{SQUID_PORT}: cannot connect", proxyCheck=True)

    def test_proxyRefusesConnect(self) -> None:
        """
        Mistake: the proxy's ACLs refuse CONNECT from the gateway.
        """
        squid = Squid(self.net.gateway, self.directory / "squid", deny=(SERVER_V4,))
        squid.start()
        self.addCleanup(squid.stop)
        self.startShifter()
        self.assertNamed(f"error: proxy: 127.0.0.1:{SQUID_PORT} answered CONNECT {SERVER_V4}:443 with 403 Forbidden",
                         proxyCheck=True)

    def test_kernelModuleMissing(self) -> None:
        """
        Mistake: --resolver kmod without the module loaded (this host's
        kernel cannot load it).
        """
        requireHost(root=True)
        if os.path.isdir("/sys/module/shifter"):
            self.skipTest("the shifter module is loaded on this host")
        self.resolver = "kmod"
        self.assertNamed("error: kmod: the kernel module shifter is not loaded (--resolver kmod)",
                         "warning: listening: nothing listens on TCP port 12345")
