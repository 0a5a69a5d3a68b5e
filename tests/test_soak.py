"""
Load and soak, end to end: thousands of tunnels through a real C{twistd
shifter} and a real Squid on the namespaced gateway, to a server that
checks every byte (L{tests.soakpeer}: each connection's bytes are echoed
and digested by the server, and the client compares both digests with its
own).

Bounded in count and time.  By default (about two minutes, for CI):

 - 2,000 tunnels open at once, then 64 KiB each way on every one of them;
 - connections opened and closed one after another (8 at a time) for up
   to 60 seconds or 50,000 connections, whichever comes first.

C{SHIFTER_SOAK=long} runs the longer mode: 1 MiB each way on each of the
2,000 tunnels, and up to 200,000 connections in up to 15 minutes.

Each test checks that no connection was lost or corrupted, that Shifter's
descriptors return to their baseline, and that its resident memory stays
flat once warmed up; the figures (connections, bytes, duration, memory
samples) are written to C{figures.json} in the test's directory.

These need root (namespaces, iptables), Squid and prlimit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    SERVER_V4,
    SHIFTER_PORT,
    SQUID_PORT,
    ShifterProcess,
    Squid,
    gatewayFor,
    stopProcess,
    waitFor,
)
from tests.support import requireHost
from tests.test_faults_e2e import openDescriptors, parseMetrics, residentBytes

PEER = str(Path(__file__).resolve().parent / "soakpeer.py")
METRICS_PORT = 9100
LONG = os.environ.get("SHIFTER_SOAK") == "long"

CONCURRENT = 2000
CONCURRENT_SIZE = (1024 if LONG else 64) * 1024
SERIAL_COUNT = 200_000 if LONG else 50_000
SERIAL_SECONDS = 900 if LONG else 60
SERIAL_PARALLEL = 8
SERIAL_SIZE = 512
# Fewest serial connections that make the soak mean something, however
# slow the machine.
SERIAL_MINIMUM = 5000

MiB = 1024 * 1024


class SoakTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireHost(root=True, programs=("ip", "iptables", "ip6tables", "squid", "curl", "ss", "prlimit"))
        self.net = gatewayFor(self)
        self.directory = self.net.directory
        self.net.redirect(443)
        for namespace in (self.net.client, self.net.gateway, self.net.server):
            # Tens of thousands of connections in a minute: all the
            # ephemeral ports, and TIME_WAIT tuples reused when safe.
            namespace.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
            namespace.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        self.net.gateway.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10")
        self.squid = Squid(
            self.net.gateway, self.directory / "squid",
            extra="max_filedescriptors 16384\nclient_persistent_connections off\n",
        )
        self.squid.start()
        self.net.server.start(sys.executable, PEER, "server", "443", logTo=self.directory / "server.log")
        self.net.server.waitListening(443)
        self.shifter = ShifterProcess(
            self.net.gateway, self.directory,
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\::backlog=1024",
            "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--max-connections", str(CONCURRENT * 2),
            # The whole load comes from one client host.
            "--max-connections-per-client", "0",
            "--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1",
        )
        self.shifter.start()
        self.addCleanup(self.shifter.stop)
        self.pid = self.shifter.process.pid
        subprocess.run(["prlimit", f"--pid={self.pid}", "--nofile=16384:16384"], check=True)
        self.net.gateway.waitListening(METRICS_PORT)
        self.figures: dict[str, object] = {}
        self.addCleanup(self.writeFigures)

    def writeFigures(self) -> None:
        (self.directory / "figures.json").write_text(json.dumps(self.figures, indent=2) + "\n")

    def logText(self) -> str:
        """
        Shifter's log, with the files twistd rotated away (every 1 MB).
        """
        return "".join(path.read_text() for path in self.directory.glob("shifter.log*"))

    def scrape(self) -> dict[str, float]:
        result = self.net.gateway.run(
            "curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{METRICS_PORT}/metrics"
        )
        return parseMetrics(result.stdout)

    def serial(self, count: int, seconds: float) -> dict:
        result = self.net.client.run(
            sys.executable, PEER, "serial", SERVER_V4, "443", str(count), str(SERIAL_SIZE),
            str(SERIAL_PARALLEL), str(seconds), timeout=seconds + 120,
        )
        return json.loads(result.stdout)

    def ownDescriptors(self) -> int:
        """
        Shifter's descriptors, less the warm connections it keeps open to
        the proxy ahead of demand (they come and go with the rate of new
        tunnels and their lifetime, not with the tunnels that ended).
        """
        warm = int(self.scrape().get("shifter_warm_connections_open", 0))
        return openDescriptors(self.pid) - warm

    def warmUp(self) -> tuple[int, int]:
        """
        A few hundred connections, then Shifter's descriptors and resident
        memory once they are done.
        """
        result = self.serial(300, 60)
        self.assertEqual((result["ok"], result["failed"]), (300, 0), result)
        waitFor(lambda: self.scrape().get("shifter_connections_active") == 0, 30, "warm-up to end")
        return self.ownDescriptors(), residentBytes(self.pid)

    def assertClean(self, descriptors: int, opened: int) -> None:
        """
        Every tunnel has ended, each with its line, none failed, and
        Shifter's descriptors are back to C{descriptors}.
        """
        waitFor(lambda: self.scrape().get("shifter_connections_active") == 0, 60, "every tunnel to end")
        samples = self.scrape()
        self.assertEqual(samples["shifter_tunnels_opened_total"], opened)
        self.assertEqual(samples["shifter_tunnels_open"], 0)
        failures = {k: v for k, v in samples.items() if k.startswith("shifter_tunnel_failures_total") and v}
        self.assertEqual(failures, {})
        waitFor(lambda: self.ownDescriptors() == descriptors, 30,
                f"descriptors (less warm connections) back to {descriptors} (now {self.ownDescriptors()})")
        waitFor(lambda: self.logText().count(" closed (") == opened, 30, f"{opened} tunnel lines")
        self.assertNotIn(" failed: ", self.logText())
        self.assertIsNone(self.shifter.process.poll())

    def test_concurrentTunnels(self) -> None:
        """
        2,000 tunnels open at once (Shifter holds them all), then bytes
        flow on every one: every connection completes with every byte
        checked at both ends; afterwards Shifter holds no more descriptors
        than before.
        """
        descriptors, rssBefore = self.warmUp()
        started = time.monotonic()
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.net.client.name, sys.executable, PEER, "concurrent",
             SERVER_V4, "443", str(CONCURRENT), str(CONCURRENT_SIZE), "300"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(stopProcess, client)
        opened = client.stdout.readline().strip()
        openSeconds = time.monotonic() - started
        self.assertEqual(opened, f"open {CONCURRENT}")
        samples = self.scrape()
        self.assertEqual(samples["shifter_tunnels_open"], CONCURRENT)
        held = openDescriptors(self.pid)
        self.assertGreaterEqual(held - descriptors, 2 * CONCURRENT)
        rssHeld = residentBytes(self.pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        self.assertEqual(client.wait(30), 0)
        seconds = time.monotonic() - started
        self.figures.update(
            connections=CONCURRENT, ok=result["ok"], failed=result["failed"],
            bytesEachWay=result["bytes"], seconds=round(seconds, 1),
            secondsToOpenAll=round(openSeconds, 1), descriptorsBefore=descriptors,
            descriptorsWithAllOpen=held, rssBeforeMiB=round(rssBefore / MiB, 1),
            rssWithAllOpenMiB=round(rssHeld / MiB, 1),
        )
        self.assertEqual((result["ok"], result["failed"]), (CONCURRENT, 0), result)
        self.assertEqual(result["bytes"], CONCURRENT * CONCURRENT_SIZE)
        self.assertClean(descriptors, 300 + CONCURRENT)
        self.figures["rssAfterMiB"] = round(residentBytes(self.pid) / MiB, 1)

    def test_serialConnections(self) -> None:
        """
        Tens of thousands of connections opened and closed one after
        another: none is lost, Shifter's descriptors return to their
        baseline, and its resident memory stays flat after the warm-up.
        """
        descriptors, rssBefore = self.warmUp()
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(2):
                samples.append((round(time.monotonic() - started, 1), residentBytes(self.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = self.serial(SERIAL_COUNT, SERIAL_SECONDS)
        finally:
            done.set()
            sampler.join()
        self.figures.update(
            connections=result["ok"] + result["failed"], ok=result["ok"], failed=result["failed"],
            bytesEachWay=result["bytes"], seconds=result["seconds"],
            rssBeforeMiB=round(rssBefore / MiB, 1),
            rssSamplesMiB=[(t, round(rss / MiB, 1)) for t, rss in samples],
        )
        self.assertEqual(result["failed"], 0, result)
        self.assertGreaterEqual(result["ok"], min(SERIAL_COUNT, SERIAL_MINIMUM), result)
        self.assertEqual(result["bytes"], result["ok"] * SERIAL_SIZE)
        self.assertClean(descriptors, 300 + result["ok"])
        # Flat after the warm-up: the samples from the second quarter of the
        # run on are within a few MiB of each other and of the warm-up's.
        self.assertGreaterEqual(len(samples), 4, samples)
        later = [rss for _, rss in samples[len(samples) // 4 :]]
        self.figures["rssAfterMiB"] = round(residentBytes(self.pid) / MiB, 1)
        self.assertLess(max(later) - min(later), 4 * MiB, self.figures["rssSamplesMiB"])
        self.assertLess(max(later) - rssBefore, 8 * MiB, self.figures["rssSamplesMiB"])
