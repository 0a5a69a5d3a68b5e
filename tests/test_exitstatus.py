"""
A start that fails ends the process with a failure status, so that
systemd's C{Restart=on-failure} and scripts see it: real C{twistd shifter}
processes, directly, with C{--workers}, and under
C{systemd-socket-activate}.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import requireHost

PROJECT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
ENV = dict(os.environ, PYTHONPATH=str(PROJECT))


def busyPort() -> socket.socket:
    """
    A listening socket on 127.0.0.1, keeping its port taken.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def requireNoModule() -> None:
    if os.path.exists("/sys/module/shifter"):
        raise SkipTest("Shifter's kernel module is loaded here: --resolver kmod would start")


class ExitStatusTests(SynchronousTestCase):
    def twistd(self, *arguments: str, log: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", f"--logfile={log}", "shifter", *arguments],
            env=ENV, capture_output=True, text=True, timeout=60,
        )

    def test_listenFails(self) -> None:
        """
        A --listen port already taken: one critical line, exit status 1.
        """
        taken = busyPort()
        self.addCleanup(taken.close)
        log = Path(self.mktemp())
        result = self.twistd(
            "--proxy", "127.0.0.1:9", "--listen", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", log=log
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("Shifter cannot start", log.read_text())
        self.assertIn("Server Shut Down.", log.read_text())

    def test_sidePortsFail(self) -> None:
        """
        A --metrics port already taken, or a --control socket that cannot
        be made: one critical line naming it, exit status 1, and Shifter
        never says it accepts connections.
        """
        taken = busyPort()
        self.addCleanup(taken.close)
        cases = [
            (("--metrics", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"),
             f"Shifter cannot start: metrics tcp:{taken.getsockname()[1]}:interface=127.0.0.1: Couldn't listen on 127.0.0.1"),
            (("--control", "unix:/nonexistent-shifter-directory/control"),
             "Shifter cannot start: control socket /nonexistent-shifter-directory/control: "),
        ]
        for arguments, line in cases:
            log = Path(self.mktemp())
            result = self.twistd("--proxy", "127.0.0.1:9", "--listen", "tcp:0:interface=127.0.0.1", *arguments, log=log)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertIn(line, log.read_text())
            self.assertNotIn("accepting redirected connections", log.read_text())

    def test_resolverFails(self) -> None:
        """
        --resolver kmod without the module: exit status 1.
        """
        requireNoModule()
        log = Path(self.mktemp())
        result = self.twistd("--proxy", "127.0.0.1:9", "--resolver", "kmod", "--listen", "tcp:0:interface=127.0.0.1",
                             log=log)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("cannot start: module shifter not loaded", log.read_text())

    def test_workersFail(self) -> None:
        """
        With --workers, workers that cannot start stop the parent, which
        exits with status 1.
        """
        requireNoModule()
        log = Path(self.mktemp())
        result = self.twistd("--proxy", "127.0.0.1:9", "--resolver", "kmod", "--workers", "2",
                             "--listen", "tcp:0:interface=127.0.0.1", log=log)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("before accepting connections; stopping", log.read_text())

    def test_socketActivation(self) -> None:
        """
        Started by systemd-socket-activate on the first connection, a
        Shifter that cannot start exits with status 1, which
        systemd-socket-activate (replaced by it) ends with.
        """
        requireHost(programs=("systemd-socket-activate",))
        requireNoModule()
        probe = busyPort()
        port = probe.getsockname()[1]
        probe.close()
        log = Path(self.mktemp()).resolve()
        process = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=shifter",
             "-E", f"PYTHONPATH={PROJECT}",
             TWISTD, "-n", "--pidfile=", f"--logfile={log}", "shifter",
             "--listen", "systemd:domain=INET:index=0", "--proxy", "127.0.0.1:9", "--resolver", "kmod"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    self.fail(f"systemd-socket-activate never listened: {process.stdout.read()}")
                time.sleep(0.1)
        self.assertEqual(process.wait(60), 1, process.stdout.read())
        self.assertIn("cannot start: module shifter not loaded", log.read_text())
