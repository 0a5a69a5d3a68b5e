"""
Tests for C{python -m shifter.rules}: the text of the rules for each
resolver and format, and the QUIC rule applied as printed in namespaces.
(tests/test_resolvers_e2e.py applies the TCP rules in a gateway namespace
and sends traffic through them.)
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from shifter.admin.rules import RuleOptions, RulesError, generateRules, main
from tests.gateway import (
    PROJECT,
    SERVER_V4,
    SERVER_V6,
    UdpEcho,
    gatewayFor,
    udpExchange,
    waitFor,
)
from tests.support import requireHost


def rules(**kwargs: object) -> str:
    options = dict(resolver="sockopt", format="iptables", lanInterface="lan0", ports=(443, 8443),
                   listenPort=12345)
    options.update(kwargs)
    return generateRules(RuleOptions(**options))  # type: ignore[arg-type]


def commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


class RedirectTests(SynchronousTestCase):
    def test_iptables(self) -> None:
        """
        sockopt with iptables: one REDIRECT per family in nat PREROUTING for
        the LAN interface and ports.
        """
        self.assertEqual(commands(rules(quic="pass")), [
            "iptables -t nat -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL -m multiport --dports 443,8443 -j REDIRECT --to-ports 12345",
            "ip6tables -t nat -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL -m multiport --dports 443,8443 -j REDIRECT --to-ports 12345",
        ])

    def test_onePort(self) -> None:
        """
        A single port uses --dport, not multiport.
        """
        self.assertIn("-p tcp -m addrtype ! --dst-type LOCAL --dport 443 -j REDIRECT", rules(ports=(443,)))

    def test_noIPv6(self) -> None:
        """
        --no-ipv6 leaves out ip6tables, and nft uses an ip table.
        """
        self.assertNotIn("ip6tables", rules(ipv6=False))
        self.assertIn("table ip shifter {", rules(ipv6=False, format="nft"))

    def test_sameForConntrackAndKmod(self) -> None:
        """
        conntrack and kmod use the same REDIRECT rules; kmod's script then
        enables the module in the namespace for the ports and the LAN
        interface.
        """
        self.assertEqual(commands(rules(resolver="conntrack")), commands(rules()))
        self.assertEqual(commands(rules(resolver="kmod")), commands(rules()) + [
            "python3 -m shifter.kmod enable --ports 443,8443 --interface lan0",
        ])

    def test_kmodWithOwnTraffic(self) -> None:
        """
        When the gateway's own connections are redirected too (they arrive
        on lo), the module records from every interface.
        """
        self.assertIn("python3 -m shifter.kmod enable --ports 443,8443 --interface any\n",
                      rules(resolver="kmod", proxyUser="proxy", format="nft"))

    def test_ownerExclusion(self) -> None:
        """
        --proxy-user adds nat OUTPUT REDIRECTs that skip the proxy's user.
        """
        text = rules(proxyUser="proxy")
        self.assertIn("iptables -t nat -A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -m multiport --dports 443,8443 "
                      "-m owner ! --uid-owner proxy -j REDIRECT --to-ports 12345", text)
        self.assertIn('meta skuid != "proxy" fib daddr type != local tcp dport { 443, 8443 } redirect to :12345',
                      rules(proxyUser="proxy", format="nft"))

    def test_markExclusion(self) -> None:
        """
        --mark excludes marked connections instead.
        """
        self.assertIn("-m mark ! --mark 0x2 -j REDIRECT", rules(mark=2))
        self.assertIn("meta mark != 0x2 fib daddr type != local tcp dport", rules(mark=2, format="nft"))

    def test_nft(self) -> None:
        """
        nft: one inet table, replaced as a whole when the script is run
        again, with a nat prerouting chain.
        """
        text = rules(format="nft")
        self.assertIn("table inet shifter\ndelete table inet shifter\ntable inet shifter {", text)
        self.assertIn("type nat hook prerouting priority dstnat; policy accept;", text)
        self.assertIn('iifname "lan0" fib daddr type != local tcp dport { 443, 8443 } redirect to :12345', text)


class QueueTests(SynchronousTestCase):
    def test_iptables(self) -> None:
        """
        nfqueue: SYNs queued in mangle PREROUTING; nat redirects only those
        carrying Shifter's mark.
        """
        lines = commands(rules(resolver="nfqueue", ports=(443,), queueNum=3, queueBypass=True))
        self.assertIn("iptables -t mangle -A PREROUTING -i lan0 -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 "
                      "-j NFQUEUE --queue-num 3 --queue-bypass", lines)
        self.assertIn("ip6tables -t nat -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL --dport 443 "
                      "-m mark --mark 0x10000/0x10000 -j REDIRECT --to-ports 12345", lines)

    def test_noMark(self) -> None:
        """
        With queue mark 0 the redirect is unconditional.
        """
        self.assertNotIn("-m mark", rules(resolver="nfqueue", queueMark=0))

    def test_nftKeepsIptablesQueue(self) -> None:
        """
        In nft form the NFQUEUE rule stays in iptables-nft form (nft's own
        queue statement needs nft_queue); the redirect is in the nft table.
        """
        text = rules(resolver="nfqueue", format="nft")
        self.assertIn("iptables -t mangle -A PREROUTING", text)
        self.assertNotIn(" queue ", text.replace("# ", ""))
        self.assertIn("meta mark & 0x10000 == 0x10000 redirect to :12345", text)

    def test_shifterCommand(self) -> None:
        """
        The matching Shifter command line is given.
        """
        self.assertIn("--resolver nfqueue --listen 'tcp6:12345:interface=\\:\\:' --queue-num 2 --queue-bypass",
                      rules(resolver="nfqueue", queueNum=2, queueBypass=True))

    def test_markOverlap(self) -> None:
        """
        An exclusion mark sharing bits with the queue mark is refused.
        """
        self.assertRaises(RulesError, rules, resolver="nfqueue", mark=0x10000)

    def test_directIptables(self) -> None:
        """
        Without --hold-syn too, Shifter sends connections DIRECT at the
        SYN: a mangle rule keeps those with the direct connmark out of the
        queue, and a nat rule before the redirect saves a SYN's direct mark
        to its connection; the gateway's own connections likewise when
        they are queued.
        """
        self.assertEqual(commands(rules(resolver="nfqueue", ports=(443,), quic="pass", mark=0x1)), [
            "iptables -t mangle -A PREROUTING -i lan0 -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN",
            "ip6tables -t mangle -A PREROUTING -i lan0 -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN",
            "iptables -t mangle -A OUTPUT -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN",
            "ip6tables -t mangle -A OUTPUT -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN",
            "iptables -t mangle -A PREROUTING -i lan0 -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 "
            "-j NFQUEUE --queue-num 0",
            "ip6tables -t mangle -A PREROUTING -i lan0 -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 "
            "-j NFQUEUE --queue-num 0",
            "iptables -t mangle -A OUTPUT -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 -m mark ! --mark 0x1 "
            "-j NFQUEUE --queue-num 0",
            "ip6tables -t mangle -A OUTPUT -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 -m mark ! --mark 0x1 "
            "-j NFQUEUE --queue-num 0",
            "iptables -t nat -A PREROUTING -i lan0 -p tcp -m mark --mark 0x40000/0x40000 "
            "-j CONNMARK --set-mark 0x40000/0x40000",
            "ip6tables -t nat -A PREROUTING -i lan0 -p tcp -m mark --mark 0x40000/0x40000 "
            "-j CONNMARK --set-mark 0x40000/0x40000",
            "iptables -t nat -A OUTPUT -p tcp -m mark --mark 0x40000/0x40000 -j CONNMARK --set-mark 0x40000/0x40000",
            "ip6tables -t nat -A OUTPUT -p tcp -m mark --mark 0x40000/0x40000 -j CONNMARK --set-mark 0x40000/0x40000",
            "iptables -t nat -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL --dport 443 "
            "-m mark --mark 0x10000/0x10000 -j REDIRECT --to-ports 12345",
            "ip6tables -t nat -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL --dport 443 "
            "-m mark --mark 0x10000/0x10000 -j REDIRECT --to-ports 12345",
            "iptables -t nat -A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL --dport 443 "
            "-m mark --mark 0x10000/0x10000 -j REDIRECT --to-ports 12345",
            "ip6tables -t nat -A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL --dport 443 "
            "-m mark --mark 0x10000/0x10000 -j REDIRECT --to-ports 12345",
        ])

    def test_directNft(self) -> None:
        """
        In nft form, without --hold-syn: the same mangle rules
        (iptables-nft), and the nat table whose chains first save a SYN's
        direct mark to its connection and accept it unredirected.
        """
        text = rules(resolver="nfqueue", format="nft", ports=(443,), quic="pass", ipv6=False)
        self.assertEqual(commands(text), [
            "iptables -t mangle -A PREROUTING -i lan0 -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN",
            "iptables -t mangle -A PREROUTING -i lan0 -p tcp --syn -m addrtype ! --dst-type LOCAL --dport 443 "
            "-j NFQUEUE --queue-num 0",
            "nft -f - <<'EOF'",
            "table ip shifter",
            "delete table ip shifter",
            "table ip shifter {",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            '        iifname "lan0" meta l4proto tcp meta mark & 0x40000 == 0x40000 '
            "ct mark set ct mark | 0x40000 accept",
            '        iifname "lan0" fib daddr type != local tcp dport 443 meta mark & 0x10000 == 0x10000 '
            "redirect to :12345",
            "    }",
            "}",
            "EOF",
        ])
        self.assertIn("# Redirect the SYNs Shifter recorded (and marked) to it;\n"
                      "# a SYN it sent DIRECT at the SYN (direct mark) is not redirected but forwarded, "
                      "its mark saved to its connection (ct mark), which the NFQUEUE rules skip:\n", text)

    def test_noDirectRules(self) -> None:
        """
        With a direct mark of 0, or no queue mark (the nat rule then
        redirects every SYN, so Shifter sends none DIRECT), no direct rules.
        """
        for options in (dict(directMark=0), dict(queueMark=0)):
            for format in ("iptables", "nft"):
                text = rules(resolver="nfqueue", format=format, **options)
                self.assertNotIn("connmark", text.lower())
                self.assertNotIn("ct mark", text)

    def test_directMarkRefused(self) -> None:
        """
        A direct mark sharing bits with the queue mark or the exclusion
        mark, or too wide, is refused without --hold-syn too.
        """
        for bad in [dict(directMark=0x10000), dict(mark=0x40000), dict(directMark=0x100000000)]:
            self.assertRaises(RulesError, rules, resolver="nfqueue", **bad)

    def test_directMarkCommand(self) -> None:
        """
        The matching Shifter command line has --direct-mark when it is not
        the default.
        """
        self.assertIn("--queue-num 0 --direct-mark 0x8 --proxy", rules(resolver="nfqueue", directMark=8))
        self.assertIn("--queue-num 0 --proxy", rules(resolver="nfqueue"))


class HoldSynTests(SynchronousTestCase):
    def test_iptables(self) -> None:
        """
        nfqueue --hold-syn: the nfqueue rules, after a mangle rule that
        keeps the connections with the direct connmark out of the queue and
        with a nat rule before the redirect that saves the direct mark to
        the connection; then a REJECT with a TCP reset of SYNs carrying the
        reject mark, inserted first in FORWARD and INPUT, both families.
        """
        lines = commands(rules(resolver="nfqueue", ports=(443,), holdSyn=True, quic="pass"))
        plain = commands(rules(resolver="nfqueue", ports=(443,), quic="pass", directMark=0))
        families = ("iptables", "ip6tables")
        self.assertEqual(lines[:2], [
            f"{ipt} -t mangle -A PREROUTING -i lan0 -p tcp -m connmark --mark 0x40000/0x40000 -j RETURN"
            for ipt in families
        ])
        self.assertEqual(lines[2:4], plain[:2])
        self.assertEqual(lines[4:6], [
            f"{ipt} -t nat -A PREROUTING -i lan0 -p tcp -m mark --mark 0x40000/0x40000 "
            "-j CONNMARK --set-mark 0x40000/0x40000"
            for ipt in families
        ])
        self.assertEqual(lines[6:8], plain[2:4])
        self.assertEqual(lines[8:], [
            f"{ipt} -t filter -I {chain} -p tcp --syn -m mark --mark 0x20000/0x20000 -j REJECT --reject-with tcp-reset"
            for ipt in families for chain in ("FORWARD", "INPUT")
        ])

    def test_noDirectMark(self) -> None:
        """
        With a direct mark of 0, no direct rules.
        """
        text = rules(resolver="nfqueue", holdSyn=True, directMark=0)
        self.assertNotIn("connmark", text.lower())
        self.assertNotIn("ct mark set", rules(resolver="nfqueue", holdSyn=True, directMark=0, format="nft"))

    def test_directNft(self) -> None:
        """
        In nft form: the same mangle rules (iptables-nft), and in the nat
        chains, first, the direct mark saved to the connection (ct mark)
        and the SYN accepted unredirected.
        """
        text = rules(resolver="nfqueue", format="nft", holdSyn=True, directMark=0x80, proxyUser="proxy")
        direct = "meta l4proto tcp meta mark & 0x80 == 0x80 ct mark set ct mark | 0x80 accept"
        self.assertIn("        type nat hook prerouting priority dstnat; policy accept;\n"
                      f'        iifname "lan0" {direct}\n'
                      '        iifname "lan0" fib daddr type != local', text)
        self.assertIn(f"        type nat hook output priority -100; policy accept;\n        {direct}\n", text)
        for line in ("iptables -t mangle -A PREROUTING -i lan0 -p tcp -m connmark --mark 0x80/0x80 -j RETURN",
                     "ip6tables -t mangle -A OUTPUT -p tcp -m connmark --mark 0x80/0x80 -j RETURN"):
            self.assertIn(line + "\n", text)
        self.assertLess(text.index("-m connmark --mark 0x80/0x80 -j RETURN"), text.index("-j NFQUEUE"))

    def test_nft(self) -> None:
        """
        In nft form the reset is in base chains of the shifter table for
        forward and input, at filter priority.
        """
        text = rules(resolver="nfqueue", format="nft", holdSyn=True, rejectMark=0x40)
        for hook in ("forward", "input"):
            self.assertIn(f"    chain refused-{hook} {{\n"
                          f"        type filter hook {hook} priority filter; policy accept;\n"
                          "        meta l4proto tcp meta mark & 0x40 == 0x40 reject with tcp reset\n", text)
        self.assertNotIn("refused-output", text)

    def test_gatewayOwnTraffic(self) -> None:
        """
        With the gateway's own connections queued too, their refused SYNs
        are reset in OUTPUT.
        """
        self.assertIn("iptables -t filter -I OUTPUT -p tcp --syn -m mark --mark 0x20000/0x20000 -j REJECT",
                      rules(resolver="nfqueue", holdSyn=True, proxyUser="proxy"))
        self.assertIn("chain refused-output {", rules(resolver="nfqueue", holdSyn=True, mark=2, format="nft"))

    def test_shifterCommand(self) -> None:
        """
        The matching Shifter command line has --hold-syn, and --reject-mark
        when it is not the default.
        """
        text = rules(resolver="nfqueue", holdSyn=True)
        self.assertIn("--listen 'tcp6:12345:interface=\\:\\:' --queue-num 0 --hold-syn --proxy", text)
        self.assertIn("--hold-syn --reject-mark 0x4 --proxy", rules(resolver="nfqueue", holdSyn=True, rejectMark=4))
        self.assertIn("--hold-syn --direct-mark 0x8 --proxy", rules(resolver="nfqueue", holdSyn=True, directMark=8))

    def test_refused(self) -> None:
        """
        --hold-syn without nfqueue, without a queue mark, or with a reject
        mark sharing bits with the queue mark or the exclusion mark is
        refused.
        """
        for bad in [dict(resolver="sockopt"), dict(queueMark=0), dict(rejectMark=0x10000),
                    dict(rejectMark=0), dict(mark=0x20000), dict(directMark=0x10000),
                    dict(directMark=0x20000), dict(mark=0x40000), dict(directMark=0x100000000)]:
            options = dict(resolver="nfqueue", holdSyn=True)
            options.update(bad)
            self.assertRaises(RulesError, rules, **options)

    def test_command(self) -> None:
        """
        The command takes --hold-syn, --reject-mark and --direct-mark.
        """
        out = io.StringIO()
        main(["--resolver", "nfqueue", "--hold-syn", "--reject-mark", "0x8", "--direct-mark", "0x4",
              "--lan-interface", "lan0", "--ports", "443,8443"], out)
        self.assertEqual(out.getvalue(), rules(resolver="nfqueue", holdSyn=True, rejectMark=8, directMark=4))


class TproxyTests(SynchronousTestCase):
    def test_iptables(self) -> None:
        """
        tproxy: TPROXY in mangle PREROUTING, then policy routing of the
        mark to local delivery, both families.
        """
        self.assertEqual(commands(rules(resolver="tproxy", ports=(443,), quic="pass")), [
            "iptables -t mangle -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL --dport 443 -j TPROXY --on-port 12345 --tproxy-mark 0x1/0x1",
            "ip6tables -t mangle -A PREROUTING -i lan0 -p tcp -m addrtype ! --dst-type LOCAL --dport 443 -j TPROXY --on-port 12345 --tproxy-mark 0x1/0x1",
            "ip rule add fwmark 0x1/0x1 lookup 100",
            "ip route add local 0.0.0.0/0 dev lo table 100",
            "ip -6 rule add fwmark 0x1/0x1 lookup 100",
            "ip -6 route add local ::/0 dev lo table 100",
        ])

    def test_nft(self) -> None:
        """
        nft tproxy: a filter chain at mangle priority.
        """
        text = rules(resolver="tproxy", format="nft", tproxyMark=4, routeTable=7)
        self.assertIn('tproxy to :12345 meta mark set meta mark | 0x4 accept', text)
        self.assertIn("ip -6 route add local ::/0 dev lo table 7", text)

    def test_listener(self) -> None:
        """
        The Shifter command uses a tproxy: listener.
        """
        self.assertIn("--listen 'tproxy:12345:interface=\\:\\:'", rules(resolver="tproxy"))

    def test_noExclusion(self) -> None:
        """
        TPROXY never sees the gateway's own connections: an exclusion is
        refused with the reason.
        """
        with self.assertRaises(RulesError) as caught:
            rules(resolver="tproxy", proxyUser="proxy")
        self.assertIn("PREROUTING only", str(caught.exception))


class QuicTests(SynchronousTestCase):
    def test_rejectByDefault(self) -> None:
        """
        By default UDP from the LAN to the redirected ports is refused with
        an ICMP port-unreachable, per family, at the top of FORWARD.
        """
        lines = commands(rules())
        self.assertEqual(lines[-2:], [
            "iptables -I FORWARD -i lan0 -p udp -m multiport --dports 443,8443 "
            "-j REJECT --reject-with icmp-port-unreachable",
            "ip6tables -I FORWARD -i lan0 -p udp -m multiport --dports 443,8443 "
            "-j REJECT --reject-with icmp6-port-unreachable",
        ])
        self.assertIn("fall back to TCP, and so to the proxy, at once", rules())

    def test_everyResolver(self) -> None:
        """
        Every resolver's rules stop QUIC, in both formats.
        """
        for resolver in ("sockopt", "conntrack", "kmod", "nfqueue", "tproxy"):
            self.assertIn("-p udp -m multiport --dports 443,8443 -j REJECT", rules(resolver=resolver))
            self.assertIn('iifname "lan0" udp dport { 443, 8443 } reject with icmpx type port-unreachable',
                          rules(resolver=resolver, format="nft"))

    def test_drop(self) -> None:
        """
        --quic drop drops instead, and says that clients wait for their
        timeout.
        """
        text = rules(quic="drop", ports=(443,))
        self.assertIn("iptables -I FORWARD -i lan0 -p udp --dport 443 -j DROP", commands(text))
        self.assertIn("once their QUIC attempt times out", text)
        self.assertIn('iifname "lan0" udp dport 443 drop', rules(quic="drop", ports=(443,), format="nft"))

    def test_pass(self) -> None:
        """
        --quic pass prints no UDP rule, and a comment says QUIC goes
        around the proxy.
        """
        for fmt in ("iptables", "nft"):
            text = rules(quic="pass", format=fmt)
            self.assertNotIn("udp", text.replace("UDP", ""))
            self.assertIn("QUIC (HTTP/3) goes around the proxy", text)

    def test_nftChain(self) -> None:
        """
        In nft form the refusal is a forward filter chain of the shifter
        table; an IPv4-only table rejects with icmp rather than icmpx.
        """
        text = rules(format="nft")
        self.assertIn("    chain forward {\n"
                      "        type filter hook forward priority filter; policy accept;\n"
                      '        iifname "lan0" udp dport { 443, 8443 } reject with icmpx type port-unreachable\n'
                      "    }\n}\nEOF", text)
        self.assertIn("reject with icmp type port-unreachable", rules(format="nft", ipv6=False))

    def test_noIPv6(self) -> None:
        """
        Without IPv6, no ip6tables QUIC rule.
        """
        self.assertNotIn("ip6tables", rules(ipv6=False))

    def test_unknown(self) -> None:
        """
        Another --quic value is refused.
        """
        self.assertRaises(RulesError, rules, quic="allow")


class QuicGatewayTests(SynchronousTestCase):
    """
    The QUIC rule, applied as printed in a gateway namespace: datagrams
    from the client to a UDP echo server behind the gateway.
    """

    redirected, other = 443, 4433

    def setUp(self) -> None:
        requireHost(root=True, programs=("ip", "iptables", "ip6tables", "nft"))
        self.net = gatewayFor(self)
        UdpEcho(self.net.server, self.net.directory, self.redirected, self.other).start()

    def apply(self, *options: str) -> str:
        script = subprocess.run(
            [sys.executable, "-m", "shifter.rules", "--lan-interface", "c1",
             "--ports", str(self.redirected), *options],
            capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        ).stdout
        result = subprocess.run(["ip", "netns", "exec", self.net.gateway.name, "sh", "-e"],
                                input=script, capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, f"rules failed: {result.stderr}\n{script}")
        return script

    def exchanges(self, timeout: float = 2.0) -> dict[tuple[str, int], str]:
        return {
            (server, port): udpExchange(self.net.client, server, port, timeout)
            for server in (SERVER_V4, SERVER_V6)
            for port in (self.redirected, self.other)
        }

    def waitEchoed(self) -> None:
        """
        Wait until every datagram is echoed: the first over a new link may
        be lost while neighbour discovery settles.
        """
        seen: list[dict[tuple[str, int], str]] = []
        waitFor(lambda: seen.append(self.exchanges(timeout=0.5)) or set(seen[-1].values()) == {"echoed"},
                20, "every UDP datagram echoed before the rules")

    def assertRefusedAfterRules(self, *options: str) -> None:
        self.waitEchoed()
        self.apply(*options)
        after = self.exchanges()
        self.assertEqual(after, {
            (SERVER_V4, self.redirected): "refused", (SERVER_V4, self.other): "echoed",
            (SERVER_V6, self.redirected): "refused", (SERVER_V6, self.other): "echoed",
        })

    def test_iptables(self) -> None:
        """
        With the iptables rules, a datagram to the redirected port that was
        echoed before is refused after (ECONNREFUSED: the ICMP
        port-unreachable), IPv4 and IPv6; another UDP port is still echoed.
        """
        self.assertRefusedAfterRules("--format", "iptables")

    def test_nft(self) -> None:
        """
        The same with the nft table.
        """
        self.assertRefusedAfterRules("--format", "nft")

    def test_drop(self) -> None:
        """
        With --quic drop the datagram gets no answer at all; the other port
        is still echoed.
        """
        self.waitEchoed()
        self.apply("--quic", "drop")
        after = self.exchanges(timeout=1.0)
        self.assertEqual(after, {
            (SERVER_V4, self.redirected): "no answer", (SERVER_V4, self.other): "echoed",
            (SERVER_V6, self.redirected): "no answer", (SERVER_V6, self.other): "echoed",
        })

    def test_pass(self) -> None:
        """
        With --quic pass UDP to the redirected port is still echoed.
        """
        self.waitEchoed()
        self.apply("--quic", "pass")
        self.assertEqual(set(self.exchanges().values()), {"echoed"})


class CheckTests(SynchronousTestCase):
    def test_refused(self) -> None:
        """
        Options that make no working rules are refused.
        """
        for bad in [dict(ports=(12345,)), dict(ports=()), dict(ports=(0,)), dict(lanInterface="a b"),
                    dict(proxyUser="proxy", mark=1), dict(resolver="nope"), dict(format="pf"),
                    dict(proxyUser="x;rm")]:
            self.assertRaises(RulesError, rules, **bad)

    def test_command(self) -> None:
        """
        The command prints the same text as the function.
        """
        out = io.StringIO()
        main(["--resolver", "tproxy", "--lan-interface", "lan0", "--ports", "443,8443"], out)
        self.assertEqual(out.getvalue(), rules(resolver="tproxy"))

    def test_commandError(self) -> None:
        """
        The command exits 2 with the reason on bad options.
        """
        result = subprocess.run(
            [sys.executable, "-m", "shifter.rules", "--lan-interface", "lan0", "--ports", "443",
             "--listen-port", "443"], capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
        self.assertEqual(result.returncode, 2)
        self.assertIn("listening port 443 is among the redirected ports", result.stderr)
