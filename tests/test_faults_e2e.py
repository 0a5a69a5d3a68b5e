"""
Faults, end to end: broken proxies, broken clients and resolvers that find
nothing, each met by a real C{twistd shifter} on the namespaced gateway.

The upstream proxy is L{tests.faultproxy}, a CONNECT proxy whose behaviour
depends on the port a client connected to (and the gateway redirected):
port 443 is a real tunnel to the TLS web server, the others are faults.
After each fault the test checks that Shifter

 - keeps serving: a real fetch through the same Shifter succeeds;
 - holds no more descriptors than before (C{/proc/PID/fd});
 - logged exactly one line for the connection, with the reason, and
   counted it (C{shifter_tunnel_failures_total{reason}} from C{--metrics}).

These need root (namespaces, iptables), curl and openssl.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from tests.gateway import (
    CLIENT_V4,
    GATEWAY_V4,
    SERVER_V4,
    SHIFTER_PORT,
    stopProcess,
    waitFor,
)
from tests.test_integration import GatewayTestCase
from tests.test_resolvers_e2e import ResolverGatewayTestCase

FAULT_PROXY = str(Path(__file__).resolve().parent / "faultproxy.py")
FAULT_PROXY_PORT = 3130
FAULT_PORTS = range(7001, 7013)
METRICS_PORT = 9100
HANDSHAKE_TIMEOUT = 4
IDLE_TIMEOUT = 4


def openDescriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def residentBytes(pid: int) -> int:
    """
    The resident set size of process C{pid}, in bytes.
    """
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def parseMetrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def failureCount(samples: dict[str, float], reason: str) -> float:
    return samples.get(f'shifter_tunnel_failures_total{{reason="{reason}"}}', 0.0)


def receiveAll(sock: socket.socket, timeout: float = 30) -> bytes:
    """
    Read until the end of file (or a reset, which ends it too).
    """
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class ShifterFaultTestCase(GatewayTestCase):
    """
    Shifter in front of the fault proxy, with short handshake and idle
    timeouts and its metrics served; the fault ports redirected too.
    """

    extraOptions: tuple[str, ...] = ()

    def setUp(self) -> None:
        super().setUp()
        for port in FAULT_PORTS:
            self.net.redirect(port)
        self.faultLog = self.directory / "faultproxy.log"
        self.startFaultProxy()
        self.shifter.options = (
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:",
            "--proxy", f"127.0.0.1:{FAULT_PROXY_PORT}",
            "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
            "--idle-timeout", str(IDLE_TIMEOUT),
            "--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1",
            # These tests count descriptors against a baseline and each
            # connection to the fault proxy: no warm connections (which
            # come and go on their own) among them.
            "--warm-connections", "off",
            *self.extraOptions,
        )
        self.shifter.start()
        self.addCleanup(self.shifter.stop)
        self.pid = self.shifter.process.pid
        self.net.gateway.waitListening(METRICS_PORT)
        # Warm up (first tunnel, first scrape), then note the baseline.
        self.assertFetched()
        self.scrape()
        time.sleep(0.5)
        self.baseline = openDescriptors(self.pid)

    def startFaultProxy(self) -> None:
        self.faultProxy = self.net.gateway.start(
            sys.executable, FAULT_PROXY, str(FAULT_PROXY_PORT), logTo=self.faultLog
        )
        self.net.gateway.waitListening(FAULT_PROXY_PORT)

    def scrape(self) -> dict[str, float]:
        result = self.net.gateway.run(
            "curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{METRICS_PORT}/metrics"
        )
        return parseMetrics(result.stdout)

    def assertFetched(self) -> None:
        """
        A real fetch through Shifter and the fault proxy's tunnel returns
        the file intact.
        """
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())

    def assertRecovered(self) -> None:
        """
        Shifter serves a new connection, and its descriptors return to the
        baseline.
        """
        self.assertFetched()
        waitFor(
            lambda: openDescriptors(self.pid) == self.baseline,
            20,
            f"Shifter's descriptors to return to {self.baseline} "
            f"(now {openDescriptors(self.pid)})",
        )
        self.assertIsNone(self.shifter.process.poll())

    def connect(self, port: int) -> socket.socket:
        """
        A connection from the client namespace to the server's C{port},
        which the gateway redirects to Shifter.
        """
        sock = self.net.client.connect(SERVER_V4, port, timeout=30)
        self.addCleanup(sock.close)
        return sock

    def linesFor(self, port: int) -> list[str]:
        return [
            line for line in self.shifter.logText().splitlines()
            if f"tunnel {CLIENT_V4}:{port} -> " in line
        ]

    def assertOneLine(self, port: int, *fragments: str) -> str:
        """
        Shifter logs exactly one line for the client's connection from
        C{port}, holding every one of C{fragments}.
        """
        waitFor(lambda: self.linesFor(port), 20, f"a line for client port {port}")
        time.sleep(0.3)  # a second line would come at once
        lines = self.linesFor(port)
        self.assertEqual(len(lines), 1, lines)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        return lines[0]

    def assertFailure(
        self, sock: socket.socket, port: int, reason: str, kind: str, before: dict[str, float]
    ) -> None:
        """
        The connection C{sock} to C{port} failed with one log line giving
        C{reason}, counted once under C{kind}; Shifter recovered.
        """
        self.assertOneLine(sock.getsockname()[1], f"-> {SERVER_V4}:{port} via", f"failed: {reason}")
        after = self.scrape()
        self.assertEqual(failureCount(after, kind) - failureCount(before, kind), 1, kind)
        self.assertRecovered()


class ProxyFaultTests(ShifterFaultTestCase):
    def proxyFault(self, port: int, reason: str, kind: str) -> None:
        """
        A client connecting to C{port} is closed with no byte sent to it,
        for C{reason}, counted under C{kind}.
        """
        before = self.scrape()
        sock = self.connect(port)
        clientPort = sock.getsockname()[1]
        self.assertEqual(receiveAll(sock, HANDSHAKE_TIMEOUT + 20), b"")
        self.assertFailure(sock, port, reason, kind, before)

    def test_proxyNotListening(self) -> None:
        """
        With nothing listening on the proxy's port, the client is closed at
        once with a line; with the proxy back, the next fetch succeeds.
        """
        stopProcess(self.faultProxy)
        before = self.scrape()
        sock = self.connect(443)
        clientPort = sock.getsockname()[1]
        self.assertEqual(receiveAll(sock), b"")
        self.assertOneLine(clientPort, "failed: cannot connect to proxy", "refused")
        after = self.scrape()
        self.assertEqual(failureCount(after, "proxy-connect") - failureCount(before, "proxy-connect"), 1)
        self.startFaultProxy()
        self.assertRecovered()

    def test_proxyNeverAnswers(self) -> None:
        """
        A proxy that accepts CONNECT and never answers is given up after
        --handshake-timeout.
        """
        self.proxyFault(7001, f"proxy did not answer CONNECT within {HANDSHAKE_TIMEOUT} s", "timeout")

    def test_slowloris(self) -> None:
        """
        A proxy that answers one byte every half second, without end, is
        given up after --handshake-timeout all the same: the timeout is not
        moved by bytes that trickle in.
        """
        self.proxyFault(7002, f"proxy did not answer CONNECT within {HANDSHAKE_TIMEOUT} s", "timeout")

    def test_garbage(self) -> None:
        """
        Bytes that are not HTTP end the handshake at once.
        """
        self.proxyFault(7003, "bad answer from proxy: not an HTTP response", "proxy-garbage")

    def test_http09(self) -> None:
        """
        An HTTP/0.9-style status line is refused.
        """
        self.proxyFault(7004, "bad answer from proxy: malformed status line: b'HTTP/0.9 200 OK'", "proxy-garbage")

    def test_oversizedHeaders(self) -> None:
        """
        A 20 KiB header block is refused at the 16 KiB limit.
        """
        self.proxyFault(7005, "bad answer from proxy: response header block exceeds 16384 bytes", "proxy-garbage")

    def test_closedMidAnswer(self) -> None:
        """
        A proxy that closes halfway through its status line ends the
        client's connection with a line.
        """
        self.proxyFault(7007, "proxy closed the connection before answering", "proxy-closed")

    def test_okThenClose(self) -> None:
        """
        A proxy that answers 200 and closes at once: the tunnel opens and
        the client gets its end of file at once; one tunnel line, counted as
        opened and closed.
        """
        before = self.scrape()
        sock = self.connect(7006)
        clientPort = sock.getsockname()[1]
        self.assertEqual(receiveAll(sock), b"")
        sock.close()
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:7006 via", "closed (", "0 bytes up, 0 bytes down")
        after = self.scrape()
        self.assertEqual(after["shifter_tunnels_opened_total"] - before["shifter_tunnels_opened_total"], 1)
        self.assertEqual(after["shifter_tunnels_open"], 0)
        self.assertRecovered()

    def test_proxyKilledMidTransfer(self) -> None:
        """
        A proxy killed (SIGKILL) in the middle of a large transfer: the
        client gets what was relayed, then its end of file; one tunnel line
        with the bytes counted; with the proxy back, Shifter serves again.
        """
        before = self.scrape()
        sock = self.connect(7008)
        clientPort = sock.getsockname()[1]
        sock.settimeout(30)
        received = 0
        while received < 8 * 1024 * 1024:
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "end of file before the proxy was killed")
            received += len(chunk)
        self.faultProxy.send_signal(signal.SIGKILL)
        self.faultProxy.wait(10)
        received += len(receiveAll(sock))
        sock.close()
        line = self.assertOneLine(clientPort, f"-> {SERVER_V4}:7008 via", "closed (")
        bytesDown = int(re.search(r"(\d+) bytes down", line).group(1))
        self.assertEqual(bytesDown, received)
        after = self.scrape()
        self.assertEqual(after["shifter_tunnels_opened_total"] - before["shifter_tunnels_opened_total"], 1)
        self.assertGreaterEqual(
            after['shifter_bytes_total{direction="down"}'] - before['shifter_bytes_total{direction="down"}'],
            received,
        )
        self.startFaultProxy()
        self.assertRecovered()


class ClientFaultTests(ShifterFaultTestCase):
    def test_resetDuringHandshake(self) -> None:
        """
        A client that resets its connection (SO_LINGER 0) while the proxy
        has not answered yet: one line, counted as client-gone, and the
        connection to the proxy is closed too.
        """
        before = self.scrape()
        sock = self.connect(7001)
        clientPort = sock.getsockname()[1]
        waitFor(lambda: self.scrape().get("shifter_connections_active") == 1, 10, "the handshake")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # The fault proxy logs the connection once Shifter has closed it.
        waitFor(lambda: "CONNECT 203.0.113.7:7001" in self.faultLog.read_text(), 10,
                "Shifter to close its connection to the proxy")
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:7001 via", "failed: client left before the tunnel opened")
        after = self.scrape()
        self.assertEqual(failureCount(after, "client-gone") - failureCount(before, "client-gone"), 1)
        self.assertRecovered()

    def test_megabytesBeforeTunnel(self) -> None:
        """
        A client that sends 16 MiB while the proxy takes a second to answer:
        Shifter buffers at most its early-data limit (reading pauses, its
        memory does not grow by megabytes), and every byte arrives once the
        tunnel opens.
        """
        size = 16 * 1024 * 1024
        payload = os.urandom(size)
        rssBefore = residentBytes(self.pid)
        rssMax = rssBefore
        sock = self.connect(7009)
        clientPort = sock.getsockname()[1]
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60
        while sent < size:
            self.assertLess(time.monotonic(), deadline, f"only {sent} bytes sent")
            select.select([], [sock], [], 0.05)
            try:
                sent += sock.send(payload[sent : sent + 256 * 1024])
            except BlockingIOError:
                pass
            rssMax = max(rssMax, residentBytes(self.pid))
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        answer = receiveAll(sock)
        self.assertEqual(answer.decode(), hashlib.sha256(payload).hexdigest())
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:7009 via", f"{size} bytes up, 64 bytes down")
        self.assertLess(rssMax - rssBefore, 4 * 1024 * 1024, "Shifter's memory grew by megabytes")
        self.assertRecovered()

    def test_halfCloseWaitsForAnswer(self) -> None:
        """
        A client that sends 1 MiB, shuts down its sending side and waits
        gets the whole answer, which the far end sends only after EOF.
        """
        payload = os.urandom(1024 * 1024)
        sock = self.connect(7010)
        clientPort = sock.getsockname()[1]
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(receiveAll(sock).decode(), hashlib.sha256(payload).hexdigest())
        self.assertOneLine(clientPort, "closed (both sides closed)", f"{len(payload)} bytes up, 64 bytes down")
        self.assertRecovered()

    def test_clientVanishes(self) -> None:
        """
        A client that disappears without a FIN (its packets dropped from
        then on): the idle timeout ends the tunnel, with one line.
        """
        before = self.scrape()
        sock = self.connect(7011)
        sock.sendall(b"ping")
        self.assertEqual(sock.recv(4), b"ping")
        port = clientPort = sock.getsockname()[1]
        for chain, direction in (("OUTPUT", "--sport"), ("INPUT", "--dport")):
            self.net.client.run("iptables", "-A", chain, "-p", "tcp", direction, str(port), "-j", "DROP")
        sock.close()
        started = time.monotonic()
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:7011 via", f"closed (idle for {IDLE_TIMEOUT} s)", "4 bytes up, 4 bytes down")
        self.assertGreaterEqual(time.monotonic() - started, IDLE_TIMEOUT - 1)
        after = self.scrape()
        self.assertEqual(after["shifter_tunnels_open"], 0)
        self.assertEqual(after["shifter_tunnels_opened_total"] - before["shifter_tunnels_opened_total"], 1)
        self.assertRecovered()


class EarlyDataTests(ShifterFaultTestCase):
    """
    C{--early-data send} (the default): what the client sends before the
    proxy answers reaches the proxy before its answer, over real sockets.
    """

    def test_beforeTheAnswer(self) -> None:
        """
        The proxy, which answers half a second after the CONNECT, has the
        client's bytes by then.
        """
        sock = self.connect(7012)
        sock.sendall(b"hello")
        self.assertEqual(receiveAll(sock), b"early=5")
        self.assertIn(f"CONNECT {SERVER_V4}:7012 early=5", self.faultLog.read_text())


class EarlyDataWaitTests(ShifterFaultTestCase):
    """
    C{--early-data wait}: nothing but the CONNECT before the proxy's 2xx.
    """

    extraOptions = ("--early-data", "wait")

    def test_afterTheAnswer(self) -> None:
        sock = self.connect(7012)
        sock.sendall(b"hello")
        self.assertEqual(receiveAll(sock), b"early=0")


class ResolverFaultTests(ShifterFaultTestCase):
    def test_noConntrackEntry(self) -> None:
        """
        A connection the kernel does not track (a NOTRACK rule) has no
        original destination for SO_ORIGINAL_DST: refused with a line,
        counted under resolver.
        """
        for iptables in ("iptables", "ip6tables"):
            self.net.gateway.run(iptables, "-t", "raw", "-A", "PREROUTING", "-p", "tcp",
                                 "--dport", str(SHIFTER_PORT), "-j", "NOTRACK")
        before = self.scrape()
        sock = self.net.client.connect(GATEWAY_V4, SHIFTER_PORT)
        clientPort = sock.getsockname()[1]
        self.addCleanup(sock.close)
        self.assertEqual(receiveAll(sock), b"")
        self.assertOneLine(clientPort, "failed: original destination unknown: SO_ORIGINAL_DST")
        after = self.scrape()
        self.assertEqual(failureCount(after, "resolver") - failureCount(before, "resolver"), 1)
        self.assertRecovered()

    def test_proxyConnectionRedirectedBack(self) -> None:
        """
        A gateway rule that redirects Shifter's own connections to the proxy
        back to Shifter (a rule without the proxy's exclusion): the looped
        connection's original destination is the proxy, so it is refused,
        and the client's connection fails with it: two lines, no loop.
        """
        rule = ("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
                "--dport", str(FAULT_PROXY_PORT), "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.net.gateway.run("iptables", *rule)
        before = self.scrape()
        sock = self.connect(443)
        clientPort = sock.getsockname()[1]
        self.assertEqual(receiveAll(sock), b"")
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:443 via", "failed: proxy closed the connection before answering")
        self.shifter.waitForLog(f"-> 127.0.0.1:{FAULT_PROXY_PORT} via", "failed: destination is an upstream proxy itself")
        after = self.scrape()
        self.assertEqual(failureCount(after, "loop") - failureCount(before, "loop"), 1)
        self.assertEqual(failureCount(after, "proxy-closed") - failureCount(before, "proxy-closed"), 1)
        self.net.gateway.run("iptables", *("-D" if r == "-A" else r for r in rule))
        self.assertRecovered()


class AllowListTests(ShifterFaultTestCase):
    extraOptions = ("--allow-port", "443", "--allow", "192.0.2.0/24")

    def test_portNotAllowed(self) -> None:
        """
        With --allow-port 443, a client (in an --allow network) connecting
        to another port is refused before any proxy is asked: one line,
        counted under port-denied, and the proxy never hears of it.
        """
        before = self.scrape()
        sock = self.connect(7011)
        clientPort = sock.getsockname()[1]
        self.assertEqual(receiveAll(sock), b"")
        self.assertOneLine(clientPort, f"-> {SERVER_V4}:7011 via (none) failed: destination port 7011 is not an --allow-port")
        after = self.scrape()
        self.assertEqual(failureCount(after, "port-denied") - failureCount(before, "port-denied"), 1)
        self.assertNotIn(":7011", self.faultLog.read_text())
        self.assertRecovered()


class NfqueueMissedSynTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "nfqueue", "iptables"

    def test_noSynSeen(self) -> None:
        """
        A connection redirected to Shifter without its SYN passing the
        queue (a REDIRECT rule for a port the NFQUEUE rule does not cover)
        is refused with one line naming the missed SYN, and the queued
        connections are served as before.
        """
        self.net.gateway.run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "c1", "-p", "tcp",
                             "--dport", "8443", "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.shifter.start()
        sock = self.net.client.connect(SERVER_V4, 8443)
        self.addCleanup(sock.close)
        self.assertEqual(receiveAll(sock), b"")
        port = sock.getsockname()[1]
        line = self.shifter.waitForLog(f"tunnel {CLIENT_V4}:{port} ->", "failed:")
        self.assertIn(
            f"original destination unknown: no SYN from {CLIENT_V4}:{port} seen on nfqueue 0", line
        )
        self.assertEqual(self.shifter.logText().count(f"tunnel {CLIENT_V4}:{port} ->"), 1)
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")


class ConntrackNoEntryTests(ResolverGatewayTestCase):
    resolver, ruleFormat = "conntrack", "iptables"

    def test_noEntry(self) -> None:
        """
        With the conntrack resolver, a connection the kernel does not track
        is refused with one line saying conntrack has no entry for it.
        """
        self.net.gateway.run("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp",
                             "--dport", str(SHIFTER_PORT), "-j", "NOTRACK")
        self.shifter.start()
        sock = self.net.client.connect(GATEWAY_V4, SHIFTER_PORT)
        self.addCleanup(sock.close)
        self.assertEqual(receiveAll(sock), b"")
        port = sock.getsockname()[1]
        line = self.shifter.waitForLog(f"tunnel {CLIENT_V4}:{port} ->", "failed:")
        self.assertIn(f"original destination unknown: conntrack has no entry for {CLIENT_V4} port {port}", line)
        self.assertTunnelled(f"https://{SERVER_V4}/file.bin", f"{SERVER_V4}:443")
