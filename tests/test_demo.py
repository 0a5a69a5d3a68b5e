"""
The demo (C{make run}) end to end: its narration proves the flow, and it
leaves nothing behind, also when interrupted.

Needs root, namespaces, Squid, iptables, curl and openssl.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import requireHost

DEMO = str(Path(__file__).resolve().parent.parent / "demo" / "demo.py")


def namespaces(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class DemoTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireHost(root=True, programs=("ip", "iptables", "ip6tables", "squid", "curl", "openssl"))
        self.prefix = f"shfdemo{os.getpid()}"
        self.addCleanup(subprocess.run, [sys.executable, DEMO, "--down", self.prefix], capture_output=True)

    def demo(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, DEMO, "--name", self.prefix, *arguments],
            capture_output=True, text=True, timeout=120,
        )

    def assertNarratesFlow(self, output: str, server: str, squidTarget: str) -> None:
        self.assertIn(f"curl --cacert server.pem https://{server}/hello.txt", output)
        self.assertRegex(output, r"The rule matched [1-9]\d* packet")
        self.assertRegex(output, rf"TCP_TUNNEL/200 \d+ CONNECT {re.escape(squidTarget)} ")
        tunnel = re.search(r"tunnel \S+ -> (\S+) via \S+ closed .*: (\d+) bytes up, (\d+) bytes down", output)
        self.assertIsNotNone(tunnel, output)
        self.assertEqual(tunnel.group(1), squidTarget)
        self.assertGreater(int(tunnel.group(2)), 0)
        self.assertGreater(int(tunnel.group(3)), 0)

    def test_narration(self) -> None:
        """
        The demo shows the client's request, the rule, the destination
        Shifter found, Squid's CONNECT line and Shifter's tunnel line with
        its byte counts, and then removes its namespaces.
        """
        result = self.demo()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNarratesFlow(result.stdout, "203.0.113.7", "203.0.113.7:443")
        self.assertIn("(resolver sockopt): 203.0.113.7:443", result.stdout)
        self.assertEqual(namespaces(self.prefix), [])

    def test_ipv6(self) -> None:
        """
        With --ipv6 the same flow runs over IPv6.
        """
        result = self.demo("--ipv6")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNarratesFlow(result.stdout, "[2001:db8:2::7]", "[2001:db8:2::7]:443")

    def test_keepAndDown(self) -> None:
        """
        With --keep the gateway stays up and the demo prints the command
        that tears it down; that command removes it.
        """
        result = self.demo("--keep")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"make demo-down NAME={self.prefix}", result.stdout)
        self.assertEqual(len(namespaces(self.prefix)), 3)
        pids = self.namespacePids()
        self.assertTrue(pids)
        subprocess.run([sys.executable, DEMO, "--down", self.prefix], check=True, capture_output=True)
        self.assertEqual(namespaces(self.prefix), [])
        self.waitDead(pids)

    def test_interrupted(self) -> None:
        """
        A demo interrupted once its programs run stops them and removes
        its namespaces.
        """
        process = subprocess.Popen(
            [sys.executable, DEMO, "--name", self.prefix],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for line in process.stdout:
            if line.startswith("1. The gateway redirects"):
                break
        pids = self.namespacePids()
        self.assertTrue(pids, "no programs running in the demo's namespaces")
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
        self.assertEqual(process.returncode, 130, rest)
        self.assertIn("Torn down", rest)
        self.assertEqual(namespaces(self.prefix), [])
        self.waitDead(pids)

    def namespacePids(self) -> list[int]:
        pids = []
        for name in namespaces(self.prefix):
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
            pids += [int(pid) for pid in out.split()]
        return pids

    def waitDead(self, pids: list[int]) -> None:
        from tests.gateway import waitFor

        waitFor(lambda: not any(alive(pid) for pid in pids), 15, f"demo processes {pids} to end")
