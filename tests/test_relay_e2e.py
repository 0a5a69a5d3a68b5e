"""
End-to-end tests of each relay (C{--relay splice}, C{--relay twisted}) and
of C{--workers}: a real C{twistd shifter} on the namespaced gateway, with a
real Squid and a real TLS web server, fetched from by curl.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time

from tests.gateway import SERVER_V4, SQUID_PORT, waitFor
from tests.test_integration import PEER, GatewayTestCase


def pipeDescriptors(pid: int) -> int:
    """
    How many pipes process C{pid} holds open.
    """
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


class RelayTestsMixin:
    """
    Shifter forced to one relay: a slow download through it arrives
    intact, is logged with its byte counts, and a half-closing client gets
    its whole answer.
    """

    relay: str

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.shifter.options = (*self.shifter.options, "--relay", self.relay)
        self.squid.start()
        self.shifter.start()

    def slowFetch(self):  # type: ignore[no-untyped-def]
        """
        Fetch the 1 MiB file at 400 kB/s; return the curl process, still
        running, and the file it writes.
        """
        out = self.directory / "slow.bin"
        process = self.net.client.start(
            "curl", "-sS", "--max-time", "30", "--limit-rate", "400k",
            "--cacert", str(self.web.cert), "-o", str(out), f"https://{SERVER_V4}/file.bin",
            logTo=self.directory / "curl.log",
        )
        return process, out

    def relayPipes(self) -> tuple[int, int]:
        """
        Shifter's pipes before and during a slow download, whose body is
        checked once it is done.
        """
        pid = self.shifter.process.pid
        before = pipeDescriptors(pid)
        # Small buffers between Shifter and the slow client (its receive
        # buffer, and Shifter's send buffers on the gateway), so that the
        # client pushes back at once, Shifter stops reading from the proxy
        # and its next reads are bulk (what makes a splice relay take a
        # pipe).  Left to grow, Shifter's send buffer would take the whole
        # file, and whether reads were bulk would be a matter of timing.
        self.net.client.run("sysctl", "-qw", "net.ipv4.tcp_rmem=4096 16384 65536")
        self.net.gateway.run("sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 65536")
        process, out = self.slowFetch()
        during = 0
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            during = max(during, pipeDescriptors(pid))
            time.sleep(0.05)
        self.assertEqual(process.wait(30), 0, (self.directory / "curl.log").read_text())
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(self.payload).digest())
        line = self.shifter.waitForLog("tunnel ", f"-> {SERVER_V4}:443 via 127.0.0.1:{SQUID_PORT} closed")
        bytesDown = int(line.split(" bytes down")[0].rsplit(" ", 1)[1])
        self.assertGreater(bytesDown, len(self.payload))
        return before, during

    def test_halfClose(self) -> None:
        """
        A client that sends its data and shuts down its sending side still
        receives the whole answer, which the far end sends only after EOF
        (through a CONNECT proxy that keeps half-closed tunnels open).
        """
        gateway = self.net.gateway
        gateway.start(sys.executable, PEER, "proxy", "3129", logTo=self.directory / "peer.log")
        gateway.waitListening(3129)
        self.shifter.stop()
        self.shifter.options = (
            "--listen", "tcp6:12345:interface=\\:\\:", "--proxy", "127.0.0.1:3129", "--relay", self.relay,
        )
        self.shifter.start()
        result = self.net.client.run(sys.executable, PEER, "client", SERVER_V4, "443", "3000000")
        sent, received = result.stdout.split()
        self.assertEqual(sent, received)
        self.shifter.waitForLog("3000000 bytes up, 64 bytes down", "(both sides closed)")


class SpliceRelayTests(RelayTestsMixin, GatewayTestCase):
    relay = "splice"

    def test_download(self) -> None:
        """
        With C{--relay splice}, a download arrives intact and is counted,
        and Shifter moves it through pipes (two per tunnel while bytes
        flow both ways).
        """
        before, during = self.relayPipes()
        self.assertGreaterEqual(during - before, 2)


class TwistedRelayTests(RelayTestsMixin, GatewayTestCase):
    relay = "twisted"

    def test_download(self) -> None:
        """
        With C{--relay twisted}, a download arrives intact and is counted,
        and Shifter holds no pipe for it.
        """
        before, during = self.relayPipes()
        self.assertEqual(during, before)


class WorkersTests(GatewayTestCase):
    """
    C{--workers 2}: two processes behind one port.
    """

    def setUp(self) -> None:
        super().setUp()
        (self.web.site / "small.txt").write_text("small\n")
        self.shifter.options = (*self.shifter.options, "--workers", "2")
        self.squid.start()
        self.shifter.start()
        self.shifter.waitForLog("2 workers accepting on")

    def workerPids(self) -> dict[str, int]:
        return {
            index: int(pid)
            for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.shifter.logText())
        }

    def test_bothWorkersServe(self) -> None:
        """
        Connections are spread over both workers, each logging its tunnels
        tagged with its index; SIGTERM to the parent ends both workers.
        """
        pids = self.workerPids()
        self.assertEqual(sorted(pids), ["0", "1"])
        self.assertEqual(len(set(pids.values())), 2)
        for _ in range(24):
            result = self.fetch(f"https://{SERVER_V4}/small.txt")
            self.assertEqual((result.returncode, result.body), (0, b"small\n"), result.stderr)
        waitFor(lambda: self.shifter.logText().count(" closed (") >= 24, 10, "24 tunnel lines")
        lines = [line for line in self.shifter.logText().splitlines() if " closed (" in line]
        served = {index for index in "01" if any(f"[worker {index}#info] tunnel " in line for line in lines)}
        self.assertEqual(served, {"0", "1"})
        self.shifter.stop()
        for pid in pids.values():
            waitFor(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"worker {pid} to exit")

    def test_restart(self) -> None:
        """
        A worker that dies is restarted, and the port keeps being served.
        """
        pids = self.workerPids()
        os.kill(pids["1"], 9)
        waitFor(lambda: self.shifter.logText().count(" started (pid ") >= 3, 10, "a restarted worker")
        self.assertNotEqual(self.workerPids()["1"], pids["1"])
        self.shifter.waitForLog("worker 1 exited")
        waitFor(lambda: self.shifter.logText().count("accepting redirected") >= 3, 10, "it to accept")
        for _ in range(6):
            result = self.fetch(f"https://{SERVER_V4}/small.txt")
            self.assertEqual(result.returncode, 0, result.stderr)
