"""
End-to-end tests of C{--hold-syn}: the rules C{python -m shifter.rules
--resolver nfqueue --hold-syn} prints, applied as printed in a gateway
namespace; a real C{twistd shifter --resolver nfqueue --hold-syn}; a real
Squid that denies some destinations; real clients in the client namespace.

What the client sees is the point: a tunnel the proxy opens works as ever;
a tunnel it refuses (403), or cannot open because the proxy is down, makes
the client's connect() fail with ECONNREFUSED within the hold timeout, and
a burst of SYNs all get their verdicts, none held past the timeout.

These need root (namespaces, iptables, nft, nfnetlink_queue, raw sockets),
Squid, curl and openssl.
"""

from __future__ import annotations

import errno
import re
import socket
import sys
import time
from typing import Any

from twisted.logger import Logger

from tests.gateway import (
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    SQUID_PORT,
    insideNamespace,
    waitFor,
)
from tests.test_resolvers_e2e import PEER, ResolverGatewayTestCase

log = Logger()

# Destinations Squid refuses (403); they need not exist.
DENIED_V4, DENIED_V6 = "203.0.113.8", "2001:db8:2::8"
# A destination whose server drops every TCP segment: Squid never
# connects, so never answers CONNECT.
SILENT_V4 = "203.0.113.9"
# A destination a --config rule refuses.
RULE_REFUSED_V4 = "203.0.113.10"


def holdStats(line: str) -> dict[str, int]:
    """
    The counts of Shifter's C{hold-syn: ...} line at stop.
    """
    names = {"SYNs held": "held", "accepted": "accepted", "refused": "refused",
             "joined to their connection": "joined", "never taken": "unclaimed",
             "copies recognised": "copies", "passed unheld": "passed", "direct at the SYN": "direct"}
    line = line.split("hold-syn:", 1)[1]
    found = {names[name]: int(n) for n, name in re.findall(r"(\d+) ([a-zA-Z ]+?)(?:,|;)", line) if name in names}
    found["longest"] = float(re.search(r"longest hold ([\d.]+) s", line).group(1))  # type: ignore[union-attr]
    return found


class HoldSynGatewayTestCase(ResolverGatewayTestCase):
    """
    A gateway with the --hold-syn rules, a Squid denying L{DENIED_V4} and
    L{DENIED_V6}, a TLS web server (unless C{webServer} is false) and
    Shifter with --hold-syn, not yet started.
    """

    resolver = "nfqueue"
    ruleOptions: tuple[str, ...] = ("--hold-syn",)
    holdTimeout = 5.0
    # As the printed command line has it.
    listen = f"tcp6:{SHIFTER_PORT}:interface=\\:\\::backlog=1024"

    squidDeny = (DENIED_V4, DENIED_V6)

    def shifterArguments(self) -> tuple[str, ...]:
        return ("--resolver", "nfqueue", "--hold-syn", "--hold-timeout", f"{self.holdTimeout:g}",
                *self.shifterOptions)

    def connectFromClient(self, host: str, port: int = 443) -> tuple[int, float]:
        """
        connect() from the client namespace, with the hold timeout as the
        socket's timeout (so a refusal that came later is a timeout here).

        @return: the errno (0 if it connected, -1 for a timeout) and the
            seconds it took.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with insideNamespace(self.net.client.name):
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.holdTimeout)
        started = time.monotonic()
        try:
            sock.connect((host, port))
            code = 0
        except socket.timeout:
            code = -1
        except OSError as e:
            code = e.errno or -2
        finally:
            elapsed = time.monotonic() - started
            sock.close()
        log.info("connect to {host}:{port}: {error} after {ms:.1f} ms",
                 host=host, port=port, error=errno.errorcode.get(code, code), ms=elapsed * 1000)
        return code, elapsed

    def stoppedStats(self) -> dict[str, int]:
        """
        Stop Shifter; the counts of its hold-syn line.
        """
        self.shifter.stop()
        return holdStats(self.shifter.waitForLog("hold-syn:", "SYNs held"))


class AllowedAndRefusedMixin:
    def test_allowedIPv4(self) -> None:
        """
        An HTTPS fetch to a destination Squid allows goes through: the SYN
        was held, accepted once Squid said 200, and the accepted connection
        took the tunnel opened for it (one CONNECT in Squid's log).
        """
        self.shifter.start()
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")
        stats = self.stoppedStats()
        self.assertEqual((stats["accepted"], stats["joined"], stats["refused"]), (1, 1, 0), stats)
        self.assertEqual(len([line for line in self.squid.accessLogLines() if "CONNECT" in line]), 1)

    def test_deniedIPv4(self) -> None:
        """
        A destination Squid denies (403): the client's connect() fails with
        ECONNREFUSED, before the hold timeout, and Shifter says why once.
        """
        self.shifter.start()
        code, _ = self.connectFromClient(DENIED_V4)
        self.assertEqual(code, errno.ECONNREFUSED)
        self.shifter.waitForLog(f"-> {DENIED_V4}:443 via 127.0.0.1:{SQUID_PORT} refused at the SYN: "
                                "proxy answered 403 Forbidden")
        self.squid.waitForLog("TCP_DENIED/403", f"CONNECT {DENIED_V4}:443")


class HoldSynIptablesTests(AllowedAndRefusedMixin, HoldSynGatewayTestCase):
    ruleFormat = "iptables"

    def test_allowedIPv6(self) -> None:
        """
        The same over IPv6.
        """
        self.shifter.start()
        self.assertTunnelled(f"https://[{SERVER_V6}]/file.bin", f"[{SERVER_V6}]:443")
        stats = self.stoppedStats()
        self.assertEqual((stats["accepted"], stats["joined"]), (1, 1), stats)

    def test_deniedIPv6(self) -> None:
        """
        A denied IPv6 destination: ECONNREFUSED too.
        """
        self.shifter.start()
        code, _ = self.connectFromClient(DENIED_V6)
        self.assertEqual(code, errno.ECONNREFUSED)
        self.shifter.waitForLog(f"-> [{DENIED_V6}]:443 via", "refused at the SYN: proxy answered 403 Forbidden")

    def test_ruleRefusesAtTheSyn(self) -> None:
        """
        A --config rule that refuses a destination refuses its SYN, before
        any proxy is asked: ECONNREFUSED, and nothing in Squid's log.
        """
        config = self.directory / "shifter.toml"
        config.write_text(f'[[rule]]\ndestination = "{RULE_REFUSED_V4}/32"\nrefuse = "not from here"\n')
        self.shifter.options += ("--config", str(config))
        self.shifter.start()
        code, _ = self.connectFromClient(RULE_REFUSED_V4)
        self.assertEqual(code, errno.ECONNREFUSED)
        self.shifter.waitForLog(f"-> {RULE_REFUSED_V4}:443 via (none) refused at the SYN: "
                                "refused by policy: not from here (rule at line 1)")
        self.assertEqual([line for line in self.squid.accessLogLines() if "CONNECT" in line], [])

    def test_squidDown(self) -> None:
        """
        With Squid down, the client's connect() fails with ECONNREFUSED,
        over IPv4 and IPv6: first because Squid cannot be reached, then,
        once Squid is marked down, because no proxy is up.
        """
        self.shifter.start()
        self.squid.stop()
        for host in (SERVER_V4, SERVER_V6, SERVER_V4, SERVER_V4):
            code, _ = self.connectFromClient(host)
            self.assertEqual(code, errno.ECONNREFUSED, host)
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via 127.0.0.1:{SQUID_PORT} refused at the SYN: "
                                "cannot connect to proxy")
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via (none) refused at the SYN: every proxy is down")
        stats = self.stoppedStats()
        self.assertEqual((stats["refused"], stats["accepted"]), (4, 0), stats)


class HoldSynNftTests(AllowedAndRefusedMixin, HoldSynGatewayTestCase):
    ruleFormat = "nft"


class DirectAtSynMixin:
    """
    What the DIRECT at the SYN tests read of the gateway and of Shifter.
    """

    net: Any
    shifter: Any

    def directByDestination(self) -> None:
        """
        Have a --config rule send the server's networks DIRECT, and start
        Shifter.
        """
        config = self.directory / "shifter.toml"  # type: ignore[attr-defined]
        config.write_text(f'[[rule]]\ndestination = "{SERVER_V4}/24"\ndirect = true\n'
                          f'[[rule]]\ndestination = "{SERVER_V6}/64"\ndirect = true\n')
        self.shifter.options += ("--config", str(config))
        self.shifter.start()

    def fetchDirect(self) -> None:
        """
        Fetch the file from the server over IPv4 and IPv6: it arrives, the
        server logs the client's own address (routed, not proxied), and
        the rest of each connection skipped the queue by its connmark.
        """
        for url, client, command in ((f"https://{SERVER_V4}/file.bin", CLIENT_V4, "iptables"),
                                     (f"https://[{SERVER_V6}]/file.bin", CLIENT_V6, "ip6tables")):
            result = self.fetch(url)  # type: ignore[attr-defined]
            self.assertEqual(result.returncode, 0, result.stderr)  # type: ignore[attr-defined]
            self.assertEqual(result.body, self.payload)  # type: ignore[attr-defined]
            # (an IPv4 client may be logged IPv4-mapped: the server listens on ::)
            waitFor(lambda: f'{client}" - - ' in self.web.log.read_text(), 10,  # type: ignore[attr-defined]
                    f"the server to log the fetch from {client}")
            self.assertGreater(self.skippedByConnmark(command), 0)  # type: ignore[attr-defined]
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 DIRECT at the SYN (not through Shifter)")
        self.shifter.waitForLog(f"-> [{SERVER_V6}]:443 DIRECT at the SYN (not through Shifter)")
        # The kernel's count: two packets ever queued (the last id), none waiting.
        queue = self.net.gateway.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
        self.assertEqual((queue[2], queue[7]), ("0", "2"), queue)  # type: ignore[attr-defined]

    def queueCounts(self) -> tuple[int, int]:
        """
        Shifter's nfqueue counts at stop: packets read and verdicts given.
        """
        line = self.shifter.waitForLog("nfqueue 0:", "packets read")
        received, verdicts = map(int, re.findall(r"(\d+) (?:packets read|verdicts given)", line))
        return received, verdicts

    def skippedByConnmark(self, command: str) -> int:
        """
        Packets the mangle rule skipping the direct connmark matched: the
        connection's packets after its SYN, kept out of the queue.
        """
        listing = self.net.gateway.run(command, "-t", "mangle", "-nvxL", "PREROUTING").stdout
        (line,) = [line for line in listing.splitlines() if "connmark match" in line]
        return int(line.split()[0])


class DirectAtSynIptablesTests(DirectAtSynMixin, HoldSynGatewayTestCase):
    """
    DIRECT at the SYN: a --config rule sends the server's network DIRECT;
    the held SYN gets the direct mark and its connection is forwarded by
    the gateway, never through Shifter nor Squid.
    """

    ruleFormat = "iptables"

    def test_directByDestination(self) -> None:
        """
        A fetch from the client to the server, whose network a rule sends
        DIRECT, works end to end, over IPv4 and IPv6; the server sees the
        client's own address (routed, not proxied); Shifter read nothing
        of it but each SYN (the queue's count and its own), opened no
        tunnel, said DIRECT at the SYN once for each; Squid logged nothing;
        the rest of each connection skipped the queue by its connmark.
        """
        self.directByDestination()
        self.fetchDirect()
        stats = self.stoppedStats()
        self.assertEqual((stats["held"], stats["direct"], stats["accepted"], stats["joined"], stats["refused"]),
                         (2, 2, 0, 0, 0), stats)
        self.assertEqual(self.queueCounts(), (2, 2))
        self.assertNotIn("closed", "".join(line for line in self.shifter.logText().splitlines()
                                           if " via " in line))
        self.assertEqual(self.squid.accessLogLines(), [])


class DirectAtSynNftTests(DirectAtSynIptablesTests):
    ruleFormat = "nft"


class DirectAtSynNfqueueIptablesTests(DirectAtSynMixin, ResolverGatewayTestCase):
    """
    DIRECT at the SYN without --hold-syn: with --resolver nfqueue alone and
    the rules printed for it, a --config rule sends the server's network
    DIRECT; the queued SYN gets the direct mark at once and its connection
    is forwarded by the gateway, never through Shifter nor Squid.
    """

    resolver = "nfqueue"
    ruleFormat = "iptables"
    # As the printed command line has it.
    listen = f"tcp6:{SHIFTER_PORT}:interface=\\:\\::backlog=1024"

    def test_directByDestination(self) -> None:
        """
        A fetch from the client to the server, whose network a rule sends
        DIRECT, works end to end, over IPv4 and IPv6; the server sees the
        client's own address; Shifter read nothing of it but each SYN (the
        queue's count and its own), recorded none, accepted no connection
        (no tunnel line), said DIRECT at the SYN once for each; Squid
        logged nothing; the rest of each connection skipped the queue by
        its connmark.
        """
        self.directByDestination()
        self.fetchDirect()
        self.shifter.stop()
        line = self.shifter.waitForLog("direct at the SYN:", "SYNs seen")
        self.assertIn("direct at the SYN: 2 SYNs seen, 2 sent DIRECT at the SYN, 0 errors", line)
        self.assertEqual(self.queueCounts(), (2, 2))
        self.assertIn(" 0 SYNs recorded, 0 connections found", self.shifter.waitForLog("nfqueue 0:", "packets read"))
        self.assertEqual([line for line in self.shifter.logText().splitlines() if " via " in line], [])
        self.assertEqual(self.squid.accessLogLines(), [])


class DirectAtSynNfqueueNftTests(DirectAtSynNfqueueIptablesTests):
    ruleFormat = "nft"


class HoldSynBurstTests(HoldSynGatewayTestCase):
    ruleFormat = "iptables"
    webServer = False
    holdTimeout = 3.0
    allowed, denied, silent, halfOpen = 300, 50, 50, 40
    # Every connection comes from the one client host.
    shifterOptions = ("--max-connections-per-client", "0")

    def test_burst(self) -> None:
        """
        400 connections opened at once (300 to a destination Squid allows,
        50 to one it denies, 50 to one whose server never answers Squid),
        and 40 SYNs whose handshake is never completed: every allowed
        connection is echoed; every other is refused with ECONNREFUSED;
        every queued packet got exactly one verdict and none is waiting;
        no SYN was held past the hold timeout; every tunnel whose client
        never completed its handshake was closed.
        """
        self.net.server.run("ip", "addr", "add", f"{SILENT_V4}/24", "dev", "s0")
        self.net.server.run("iptables", "-A", "INPUT", "-d", SILENT_V4, "-p", "tcp", "-j", "DROP")
        self.net.server.start(sys.executable, PEER, "echo", "443", logTo=self.directory / "echo.log")
        self.net.server.waitListening(443)
        self.shifter.start()
        half = self.net.client.run(sys.executable, PEER, "syns", SERVER_V4, "443", str(self.halfOpen))
        self.assertEqual(half.stdout.strip(), f"sent {self.halfOpen}")
        result = self.net.client.run(
            sys.executable, PEER, "outcomes", "30",
            SERVER_V4, "443", str(self.allowed),
            DENIED_V4, "443", str(self.denied),
            SILENT_V4, "443", str(self.silent),
            timeout=90,
        )
        log.info("clients: {out}", out=result.stdout)
        lines = result.stdout.splitlines()
        counts = {}
        for line in lines[:3]:
            host, _, *rest = line.split()
            counts[host] = dict(zip(rest[::2], map(float, rest[1::2])))
        self.assertEqual(counts[SERVER_V4]["ok"], self.allowed, result.stdout)
        self.assertEqual(counts[DENIED_V4]["refused"], self.denied, result.stdout)
        self.assertEqual(counts[SILENT_V4]["refused"], self.silent, result.stdout)
        # Every open tunnel not taken has been closed by now.
        waitFor(lambda: self.shifter.logText().count("no connection took it within") >= self.halfOpen,
                3 * self.holdTimeout + 10, "the half-open SYNs' tunnels to be closed")
        queue = self.net.gateway.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
        # queue, portid, waiting, copy mode, copy range, dropped, user dropped, last id, 1
        self.assertEqual((queue[2], queue[5], queue[6]), ("0", "0", "0"), queue)
        stats = self.stoppedStats()
        line = self.shifter.waitForLog("nfqueue 0:", "packets read")
        received, verdicts = map(int, re.findall(r"(\d+) (?:packets read|verdicts given)", line))
        log.info("shifter: {queue} / {hold}", queue=line, hold=self.shifter.waitForLog("hold-syn:", "SYNs held"))
        self.assertEqual(received, verdicts)
        self.assertEqual(received, int(queue[7]))
        total = self.allowed + self.denied + self.silent + self.halfOpen
        self.assertEqual(stats["held"] + stats["copies"] + stats["passed"], received, stats)
        self.assertEqual(stats["passed"], 0, stats)
        self.assertEqual(stats["held"], total, stats)
        self.assertEqual(stats["joined"], self.allowed, stats)
        self.assertEqual(stats["refused"], self.denied + self.silent, stats)
        self.assertEqual(stats["unclaimed"], self.halfOpen, stats)
        # The hold timeout is Shifter's own deadline, kept to its timer's
        # 0.1 s buckets; a second of slack for a busy reactor.
        self.assertLessEqual(stats["longest"], self.holdTimeout + 1.0, stats)
