"""
Running Shifter as infrastructure, end to end on the namespace gateway:
metrics scraped during real traffic, the connection cap, running out of
descriptors, draining on SIGTERM, systemd socket activation, allow-lists and
JSON logs.

These need root (namespaces, iptables), Squid, curl, openssl, prlimit and
systemd-socket-activate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import time

from tests.gateway import (
    PROJECT,
    SERVER_V4,
    SHIFTER_PORT,
    SQUID_PORT,
    VENV_BIN,
    stopProcess,
    waitFor,
)
from tests.support import requireHost
from tests.test_integration import GatewayTestCase

LISTEN = ("--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:")
PROXY = ("--proxy", f"127.0.0.1:{SQUID_PORT}")


def cpuSeconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def openDescriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class OperationsTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        requireHost(programs=("prlimit", "systemd-socket-activate"))
        self.squid.start()

    def startShifter(self, *options: str) -> None:
        self.shifter.options = LISTEN + PROXY + options
        self.shifter.start()
        self.addCleanup(self.shifter.stop)

    def tlsConnection(self) -> ssl.SSLSocket:
        """
        A TLS connection from the client namespace to the server, through
        the redirect, with the handshake done.
        """
        context = ssl.create_default_context(cafile=str(self.web.cert))
        raw = self.net.client.connect(SERVER_V4, 443)
        connection = context.wrap_socket(raw, server_hostname=SERVER_V4)
        self.addCleanup(connection.close)
        return connection

    def get(self, connection: ssl.SSLSocket) -> bytes:
        connection.sendall(b"GET /file.bin HTTP/1.0\r\nHost: server\r\n\r\n")
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
        return response.split(b"\r\n\r\n", 1)[1]

    def test_metricsMatchTraffic(self) -> None:
        """
        Metrics scraped over HTTP after real fetches count every tunnel and
        exactly the bytes that Shifter's tunnel lines report.
        """
        self.startShifter("--metrics", "tcp:9100:interface=127.0.0.1")
        for _ in range(3):
            self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        waitFor(lambda: self.shifter.logText().count(" closed (") == 3, 10, "three tunnel lines")
        counts = re.findall(r"(\d+) bytes up, (\d+) bytes down", self.shifter.logText())
        scrape = self.net.gateway.run("curl", "-sS", "http://127.0.0.1:9100/metrics").stdout
        (self.directory / "metrics.txt").write_text(scrape)
        samples = dict(
            line.rsplit(" ", 1) for line in scrape.splitlines() if line and not line.startswith("#")
        )
        self.assertEqual(float(samples["shifter_tunnels_opened_total"]), 3)
        self.assertEqual(float(samples["shifter_tunnels_open"]), 0)
        self.assertEqual(float(samples['shifter_bytes_total{direction="up"}']), sum(int(u) for u, _ in counts))
        self.assertEqual(float(samples['shifter_bytes_total{direction="down"}']), sum(int(d) for _, d in counts))
        self.assertGreater(float(samples['shifter_bytes_total{direction="down"}']), 3 * len(self.payload))
        self.assertEqual(float(samples["shifter_resolve_seconds_count"]), 3)
        self.assertEqual(float(samples["shifter_connect_seconds_count"]), 3)
        self.assertEqual(float(samples['shifter_proxy_answers_total{status_class="2xx"}']), 3)

    def test_connectionCap(self) -> None:
        """
        Past --max-connections, new clients are refused at once while the
        open tunnels keep working; a freed place is served again.
        """
        self.startShifter("--max-connections", "2", "--max-connections-per-client", "0")
        held = [self.tlsConnection() for _ in range(2)]
        extra = self.net.client.connect(SERVER_V4, 443)
        self.addCleanup(extra.close)
        extra.settimeout(5)
        started = time.monotonic()
        try:
            self.assertEqual(extra.recv(1), b"")
        except ConnectionResetError:
            pass
        self.assertLess(time.monotonic() - started, 5)
        self.shifter.waitForLog("refused", "2 tunnels already open")
        for connection in held:
            self.assertEqual(hashlib.sha256(self.get(connection)).digest(), hashlib.sha256(self.payload).digest())
            connection.close()
        waitFor(lambda: self.shifter.logText().count(" closed (") == 2, 10, "held tunnels to end")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)

    def test_outOfDescriptors(self) -> None:
        """
        When accept() runs out of descriptors, Shifter pauses accepting
        instead of spinning (its CPU stays low), and serves again once
        descriptors are free.
        """
        self.startShifter("--max-connections", "1000")
        pid = self.shifter.process.pid
        tunnels = 4
        limit = openDescriptors(pid) + 2 * tunnels
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
        held = [self.tlsConnection() for _ in range(tunnels)]
        waitFor(lambda: openDescriptors(pid) == limit, 10, f"{limit} descriptors in use")
        waiting = [self.net.client.connect(SERVER_V4, 443) for _ in range(3)]
        self.shifter.waitForLog("cannot accept connections: Too many open files; pausing accepts")
        before = cpuSeconds(pid)
        time.sleep(3)
        self.assertLess(cpuSeconds(pid) - before, 0.5, "Shifter spun while it could not accept")
        for connection in waiting:
            connection.close()
        held[0].close()
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)

    def test_drainOnSigterm(self) -> None:
        """
        On SIGTERM Shifter stops accepting, lets a transfer in progress
        finish, then exits.
        """
        big = os.urandom(12 * 1024 * 1024)
        (self.web.site / "big.bin").write_bytes(big)
        self.startShifter("--drain-timeout", "60")
        out = self.directory / "big.out"
        download = subprocess.Popen(
            ["ip", "netns", "exec", self.net.client.name, "curl", "-sS", "--limit-rate", "3M",
             "--cacert", str(self.web.cert), "-o", str(out), f"https://{SERVER_V4}/big.bin"],
        )
        self.addCleanup(stopProcess, download)
        waitFor(lambda: out.exists() and out.stat().st_size > 1024 * 1024, 15, "the download to start")
        self.shifter.process.send_signal(signal.SIGTERM)
        self.shifter.waitForLog("stopped accepting; draining 1 connections")
        refused = self.fetch(f"https://{SERVER_V4}/file.bin", timeout=10)
        self.assertNotEqual(refused.returncode, 0)
        self.assertEqual(download.wait(60), 0)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(big).digest())
        # twistd ends by re-raising the signal it was stopped with.
        self.assertEqual(self.shifter.process.wait(30), -signal.SIGTERM)

    def test_socketActivation(self) -> None:
        """
        Started by systemd socket activation (the listening socket passed in
        LISTEN_FDS), Shifter serves on the socket it was given.
        """
        log = self.directory / "activated.log"
        self.net.gateway.start(
            "systemd-socket-activate", "-l", str(SHIFTER_PORT), "--fdname=shifter",
            "-E", f"PYTHONPATH={PROJECT}",
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={log}",
            "shifter", "--listen", "systemd:domain=INET6:index=0", *PROXY,
            logTo=self.directory / "activated.out",
        )
        self.net.gateway.waitListening(SHIFTER_PORT)
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        text = log.read_text()
        self.assertIn("accepting redirected connections on systemd:domain=INET6:index=0", text)
        self.assertIn(f"-> {SERVER_V4}:443 via", text)

    def test_allowLists(self) -> None:
        """
        A client outside --allow is refused with a log line; one inside,
        to an --allow-port, is served.
        """
        self.startShifter("--allow", "198.18.0.0/15", "--allow", "192.0.2.0/24", "--allow-port", "443")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        self.shifter.stop()
        self.shifter.options = LISTEN + PROXY + ("--allow", "198.18.0.0/15")
        self.shifter.start()
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        self.shifter.waitForLog("client 192.0.2.2 is not in an --allow network")

    def test_hangupReopensLog(self) -> None:
        """
        After logrotate moves the log file away, SIGHUP makes Shifter write
        to a new file at the configured path, and keeps it serving.
        """
        self.startShifter()
        rotated = self.shifter.log.with_suffix(".log.1")
        self.shifter.log.rename(rotated)
        self.shifter.process.send_signal(signal.SIGHUP)
        self.shifter.waitForLog("SIGHUP: reopened 1 log files")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via", "closed")
        self.assertIn("accepting redirected connections", rotated.read_text())
        self.assertIsNone(self.shifter.process.poll())

    def test_mark(self) -> None:
        """
        With --mark, Shifter's connections to the proxy carry that mark
        from their first packet: a firewall rule matching it counts them.
        """
        self.net.gateway.run(
            "iptables", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(SQUID_PORT),
            "--syn", "-m", "mark", "--mark", "0x5f", "-j", "ACCEPT",
        )
        self.startShifter("--mark", "0x5f")
        for _ in range(2):
            self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        counters = self.net.gateway.run("iptables", "-L", "OUTPUT", "-v", "-x", "-n").stdout
        marked = re.search(r"^\s*(\d+)\s+\d+\s+ACCEPT.*mark match 0x5f", counters, re.M)
        self.assertIsNotNone(marked, counters)
        self.assertEqual(int(marked.group(1)), 2, "SYNs to the proxy carrying the mark")

    def test_jsonLogs(self) -> None:
        """
        With twistd's --logger shifter.logs.json, the tunnel line is a JSON
        object with its facts as fields.
        """
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        out = self.directory / "json.out"
        process = self.net.gateway.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logger", "shifter.logs.json",
            "shifter", *LISTEN, *PROXY, logTo=out, env=env,
        )
        self.net.gateway.waitListening(SHIFTER_PORT)
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)

        def tunnelEvent() -> dict | None:
            for line in out.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if "bytes_down" in event:
                    return event
            return None

        event = waitFor(tunnelEvent, 10, "a JSON tunnel event")
        stopProcess(process)
        self.assertEqual(event["destination"], f"{SERVER_V4}:443")
        self.assertEqual(event["client"].split(":")[0], "192.0.2.2")
        self.assertGreater(event["bytes_down"], len(self.payload))
        self.assertEqual(event["level"], "info")
        self.assertRegex(event["tunnel"], r"^[a-z2-7]{8}-[a-z2-7]+$")
        self.assertTrue(event["message"].endswith(f" id={event['tunnel']}"))
        for line in out.read_text().splitlines():
            if line.startswith("{"):
                self.assertEqual([k for k in json.loads(line) if k.startswith(("log_", "__"))], [], line)

    def test_jsonLogFormat(self) -> None:
        """
        With --log-format json, every line of twistd's --logfile is a JSON
        object with the stable fields, from the first to the last.
        """
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        logFile = self.directory / "shifter-json.log"
        process = self.net.gateway.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={logFile}",
            "shifter", *LISTEN, *PROXY, "--log-format", "json",
            logTo=self.directory / "shifter-json.out", env=env,
        )
        self.net.gateway.waitListening(SHIFTER_PORT)
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        waitFor(lambda: '"bytes_down"' in logFile.read_text(), 10, "the tunnel's JSON line")
        stopProcess(process)
        lines = logFile.read_text().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertTrue(any("accepting redirected connections" in e["message"] for e in events))
        for event in events:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(event))
            self.assertEqual([k for k in event if k.startswith(("log_", "__"))], [])
