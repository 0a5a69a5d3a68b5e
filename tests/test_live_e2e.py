"""
Operating a running Shifter end to end, on the namespace gateway with real
Squids and curl: reloading C{--config} under traffic (SIGHUP and the control
socket), swapping the proxy, and C{python -m shifter.ctl} against open
tunnels.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

from tests.gateway import PROJECT, SERVER_V4, SHIFTER_PORT, SQUID_PORT, Squid, stopProcess, waitFor
from tests.test_control import NOBODY, asUser
from tests.support import socketDirectory
from tests.test_integration import GatewayTestCase

OTHER_SQUID_PORT = SQUID_PORT + 1
BIG = 12 * 1024 * 1024


class LiveTestCase(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.squid.start()
        self.config = self.directory / "shifter.toml"
        self.control = socketDirectory(self) / "control"

    def writeConfig(self, proxyPort: int = SQUID_PORT, extra: str = "") -> None:
        self.config.write_text(
            f"listen = 'tcp6:{SHIFTER_PORT}:interface=\\:\\:'\n"
            f"control = 'unix:{self.control}'\n"
            f"{extra}\n"
            f"[[proxy]]\naddress = '127.0.0.1:{proxyPort}'\n"
        )

    def startShifter(self) -> None:
        self.shifter.options = ("--config", str(self.config))
        self.shifter.start()
        self.addCleanup(self.shifter.stop)
        waitFor(self.control.exists, 10, "the control socket")

    def ctl(self, *arguments: str) -> subprocess.CompletedProcess:
        return self.net.gateway.run(
            sys.executable, "-m", "shifter.ctl", "--control", f"unix:{self.control}", *arguments,
            check=False,
        )

    def download(self, name: str, rate: str):  # type: ignore[no-untyped-def]
        """
        Start a rate-limited curl of C{name}; return it and its output file.
        """
        out = self.directory / f"{name}.out"
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.net.client.name, "curl", "-sS", "--limit-rate", rate,
             "--cacert", str(self.web.cert), "-o", str(out), f"https://{SERVER_V4}/{name}"],
        )
        self.addCleanup(stopProcess, process)
        return process, out

    def connects(self, squid: Squid) -> int:
        return sum(" CONNECT " in line for line in squid.accessLogLines())


class ReloadTests(LiveTestCase):
    def test_downloadSurvivesReloads(self) -> None:
        """
        A 12 MiB download through an open tunnel goes on, byte for byte,
        through three reloads: SIGHUP with new settings, SIGHUP with an
        invalid file (refused with one line naming the line and reason),
        and a reload through the control socket.
        """
        big = os.urandom(BIG)
        (self.web.site / "big.bin").write_bytes(big)
        self.writeConfig()
        self.startShifter()
        process, out = self.download("big.bin", "1M")

        def past(mebibytes: int) -> None:
            waitFor(lambda: out.exists() and out.stat().st_size > mebibytes * 1024 * 1024, 30,
                    f"{mebibytes} MiB downloaded")

        past(2)
        self.writeConfig(extra="idle-timeout = 600")
        self.shifter.process.send_signal(signal.SIGHUP)
        self.shifter.waitForLog("SIGHUP: configuration reloaded", "changed: idle-timeout", "1 open connections")
        past(4)
        self.writeConfig(extra="idle-timeout = 60\nmax-connections = 0")
        self.shifter.process.send_signal(signal.SIGHUP)
        refusal = self.shifter.waitForLog("SIGHUP: configuration not reloaded")
        self.assertIn(
            f"the running one stays: {self.config} line 4: max-connections: expected a positive integer", refusal
        )
        past(6)
        self.writeConfig(extra="idle-timeout = 300\nconnect-timeout = 5")
        reloaded = self.ctl("reload")
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.assertEqual(reloaded.stdout.strip(), "reloaded: changed: connect-timeout, idle-timeout")
        [tunnel] = json.loads(self.ctl("tunnels", "--json").stdout)["tunnels"]
        self.assertEqual((tunnel["state"], tunnel["proxy"]), ("relaying", f"127.0.0.1:{SQUID_PORT}"))
        self.assertEqual(process.wait(60), 0)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(big).digest())
        line = self.shifter.waitForLog(f"-> {SERVER_V4}:443 via 127.0.0.1:{SQUID_PORT} closed")
        self.assertGreater(int(line.split(" bytes down")[0].rsplit(" ", 1)[1]), BIG)
        self.assertEqual(self.shifter.logText().count("configuration not reloaded"), 1)
        self.assertIsNone(self.shifter.process.poll())

    def test_proxySwap(self) -> None:
        """
        After a reload that swaps the proxy, new tunnels go to the new
        Squid and the old one sees no new CONNECT; a tunnel opened before
        the reload stays on the old Squid and keeps working.
        """
        other = Squid(self.net.gateway, self.directory / "squid2", port=OTHER_SQUID_PORT)
        other.start()
        self.addCleanup(other.stop)
        big = os.urandom(4 * 1024 * 1024)
        (self.web.site / "big.bin").write_bytes(big)
        self.writeConfig(SQUID_PORT)
        self.startShifter()
        held, out = self.download("big.bin", "512K")
        waitFor(lambda: out.exists() and out.stat().st_size > 512 * 1024, 30, "the held download to start")
        self.writeConfig(OTHER_SQUID_PORT)
        self.shifter.process.send_signal(signal.SIGHUP)
        self.shifter.waitForLog("configuration reloaded", "proxies")
        for _ in range(3):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)
        waitFor(lambda: self.connects(other) == 3, 10, "three CONNECTs in the new Squid's log")
        proxies = json.loads(self.ctl("proxies", "--json").stdout)["proxies"]
        self.assertEqual([p["proxy"] for p in proxies], [f"127.0.0.1:{OTHER_SQUID_PORT}"])
        self.assertEqual(held.wait(60), 0)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(big).digest())
        # Squid logs a tunnel when it ends: the held one, and nothing else.
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443")
        self.assertEqual(self.connects(self.squid), 1)
        self.assertEqual(self.connects(other), 3)
        self.shifter.waitForLog(f"via 127.0.0.1:{SQUID_PORT} closed")


class ControlTests(LiveTestCase):
    def test_tunnelsAndProxies(self) -> None:
        """
        With tunnels open, ctl lists each (client, destination, CONNECT
        target, proxy, relaying, bytes, age) as a table and as JSON, and
        the proxy as up.
        """
        (self.web.site / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        self.writeConfig()
        self.startShifter()
        downloads = [self.download("big.bin", "256K") for _ in range(3)]
        for _, out in downloads:
            waitFor(lambda: out.exists() and out.stat().st_size > 0, 30, "a download to start")
        listed = self.ctl("tunnels")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        (self.directory / "ctl-tunnels.txt").write_text(listed.stdout)
        lines = listed.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["CLIENT", "DESTINATION", "CONNECT", "PROXY", "STATE", "UP", "DOWN", "AGE", "ECH", "ID"])
        self.assertEqual(lines[-1], "3 connections")
        for row in lines[1:-1]:
            cells = row.split()
            self.assertTrue(cells[0].startswith("192.0.2.2:"), row)
            self.assertEqual(cells[1:5], [f"{SERVER_V4}:443", f"{SERVER_V4}:443", f"127.0.0.1:{SQUID_PORT}", "relaying"])
        tunnels = json.loads(self.ctl("tunnels", "--json").stdout)["tunnels"]
        self.assertEqual(len(tunnels), 3)
        for tunnel in tunnels:
            self.assertGreater(tunnel["bytesDown"], 0)
            self.assertGreater(tunnel["bytesUp"], 0)
            self.assertGreater(tunnel["age"], 0)
        proxies = self.ctl("proxies")
        self.assertEqual(proxies.stdout.splitlines()[1].split(), [f"127.0.0.1:{SQUID_PORT}", "up", "0", "default", "none", "-"])
        for process, _ in downloads:
            process.kill()

    def test_otherUserRefused(self) -> None:
        """
        The running Shifter's socket is owner-only: another user (a forked
        child that became nobody) cannot connect to it.
        """
        self.writeConfig()
        self.startShifter()
        path = str(self.control)

        def attempt() -> int:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(path)
            except PermissionError:
                return 0
            except OSError:
                return 2
            return 1

        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = attempt()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertEqual(self.ctl("tunnels").stdout.strip(), "no connections")

    def test_drain(self) -> None:
        """
        ctl drain stops accepting at once, lets the open download finish,
        then Shifter exits.
        """
        big = os.urandom(4 * 1024 * 1024)
        (self.web.site / "big.bin").write_bytes(big)
        self.writeConfig(extra="drain-timeout = 60")
        self.startShifter()
        process, out = self.download("big.bin", "1M")
        waitFor(lambda: out.exists() and out.stat().st_size > 256 * 1024, 30, "the download to start")
        drained = self.ctl("drain")
        self.assertEqual(drained.returncode, 0, drained.stderr)
        self.assertEqual(drained.stdout.strip(),
                         "draining 1 connections for up to 60 s; Shifter stops once they have finished")
        self.shifter.waitForLog("stopped accepting; draining 1 connections")
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin", timeout=10).returncode, 0)
        self.assertEqual(process.wait(60), 0)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(big).digest())
        self.assertEqual(self.shifter.process.wait(30), 0)
        self.assertFalse(self.control.exists())
