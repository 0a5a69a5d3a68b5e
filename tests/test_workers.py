"""
Tests for L{shifter.service.workers}: the listener read from its string, the
workers' log events published by the parent, the restart policy, and the
bootstrap that ties a worker's life to its parent's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, eventAsJSON, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import shifter
from shifter.service import service
from shifter.service.workers import _TWISTD, PARENT_PID, ReusePortEndpoint, WorkersService
from tests.gateway import SERVER_V4
from tests.test_integration import GatewayTestCase


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class ProcessClock(Clock):
    """
    A clock that also records the processes it is asked to spawn.
    """

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[object, list[str], dict]] = []
        self.stopped = False

    def spawnProcess(self, protocol, executable, args, env, path, childFDs):  # type: ignore[no-untyped-def]
        self.spawned.append((protocol, args, env))
        return FakeTransport(1000 + len(self.spawned))

    def callWhenRunning(self, f, *args):  # type: ignore[no-untyped-def]
        f(*args)

    def stop(self) -> None:
        self.stopped = True


class ReusePortEndpointTests(SynchronousTestCase):
    def test_fromString(self) -> None:
        """
        The listener is read from the --listen string: port, interface,
        backlog, with the wildcard of its family by default.
        """
        for description, expected in [
            ("tcp:12345", (socket.AF_INET, 12345, "0.0.0.0", 50)),
            ("tcp:port=12345:interface=192.0.2.1:backlog=128", (socket.AF_INET, 12345, "192.0.2.1", 128)),
            ("tcp6:12345:interface=\\:\\:", (socket.AF_INET6, 12345, "::", 50)),
            ("tcp6:port=12345", (socket.AF_INET6, 12345, "::", 50)),
            # Twisted's positional order: tcp has the interface second,
            # tcp6 the backlog.
            ("tcp:12345:192.0.2.1:64", (socket.AF_INET, 12345, "192.0.2.1", 64)),
            ("tcp6:12345:64:2001\\:db8\\:\\:1", (socket.AF_INET6, 12345, "2001:db8::1", 64)),
        ]:
            endpoint = ReusePortEndpoint.fromString(None, description)
            self.assertEqual(
                (endpoint.family, endpoint.port, endpoint.interface, endpoint.backlog), expected, description
            )
        for description in ("unix:/run/s.sock", "systemd:domain=INET6:index=0", "tcp:port=x", "tproxy:12345"):
            self.assertIsNone(ReusePortEndpoint.fromString(None, description))


class WorkersServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessClock()
        self.published: list[dict] = []
        self.workers = WorkersService(
            self.reactor, 2, ["--proxy", "127.0.0.1:3128"], 30, "tcp:12345",
            exitStatusOnFailure=False, publisher=self.published.append,
        )
        self.patch(signal, "signal", lambda signum, handler: signal.SIG_DFL)

    def worker(self, index: int):  # type: ignore[no-untyped-def]
        return self.workers.workers[index]

    def test_whenStopped(self) -> None:
        """
        A stop is over once every worker has ended (their drains included):
        the ports beside the workers (the sum of their metrics) wait for
        it.
        """
        self.workers.startService()
        self.successResultOf(self.workers.whenStopped())  # not stopping: at once
        self.workers.pids = {}  # no real process to signal
        stopping = self.workers.stopService()
        waiting = self.workers.whenStopped()
        self.worker(0).processEnded(Failure(ProcessTerminated(0)))
        self.assertNoResult(waiting)
        self.worker(1).processEnded(Failure(ProcessTerminated(0)))
        self.successResultOf(waiting)
        self.successResultOf(stopping)

    def test_user1PassedOn(self) -> None:
        """
        SIGUSR1 (reopen the access log) is passed on to every worker, a
        real process here, and then to the handler before it (twistd's,
        which rotates its --logfile).
        """
        before: list[int] = []
        # The handlers in place: twistd's for SIGUSR1 first.
        handlers: dict[int, object] = {signal.SIGUSR1: lambda signum, frame: before.append(signum)}

        def install(signum: int, handler: object) -> object:
            previous = handlers.get(signum, signal.SIG_DFL)
            handlers[signum] = handler
            return previous

        self.patch(signal, "signal", install)
        self.reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import signal, sys\n"
             "signal.signal(signal.SIGUSR1, lambda n, f: sys.exit(7))\n"
             "print('ready', flush=True)\n"
             "signal.pause()\n"],
            stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(child.kill)
        self.assertEqual(child.stdout.readline().strip(), "ready")
        self.workers.startService()
        self.workers.pids = {0: child.pid}
        handlers[signal.SIGUSR1](signal.SIGUSR1, None)  # type: ignore[operator]
        self.assertEqual(child.wait(30), 7)
        self.assertEqual(before, [signal.SIGUSR1])

    def test_arguments(self) -> None:
        """
        Each worker runs twistd in the foreground, logging JSON events to
        the parent, with the parent's options and its index; it is told
        the parent's pid.
        """
        self.workers.startService()
        [(_, args, env), _] = self.reactor.spawned
        self.assertEqual(args[1:3], ["-c", _TWISTD])
        self.assertEqual(args[3:], ["-n", "--pidfile=", "--logger", "shifter.logs.events", "shifter",
                                    "--proxy", "127.0.0.1:3128", "--worker", "0"])
        self.assertEqual(env[PARENT_PID], str(os.getpid()))

    def test_eventsPublished(self) -> None:
        """
        A worker's JSON events are published in the parent as events (so
        they take the parent's format and destination), their fields and
        system kept; other output is published as a warning, tagged.
        """
        self.workers.startService()
        seen: list[dict] = []
        Logger(observer=seen.append).info(
            "tunnel {client} closed", client="192.0.2.2:5", log_system="worker 0#info"
        )
        line = eventAsJSON(seen[0]).encode() + b"\n"
        worker = self.worker(0)
        worker.childDataReceived(1, line[:10])
        self.assertEqual(self.published, [])
        worker.childDataReceived(1, line[10:] + b"Traceback (most recent call last):\n")
        first, second = self.published
        self.assertEqual(formatEvent(first), "tunnel 192.0.2.2:5 closed")
        self.assertEqual((first["log_system"], first["log_level"]), ("worker 0#info", LogLevel.info))
        self.assertEqual(formatEvent(second), "Traceback (most recent call last):")
        self.assertEqual((second["log_system"], second["log_level"]), ("worker 0", LogLevel.warn))
        worker.childDataReceived(2, b"partial")
        worker.processEnded(Failure(ProcessTerminated(1)))
        self.assertEqual(formatEvent(self.published[-1]), "partial")

    def test_firstStartFailureStops(self) -> None:
        """
        A worker that exits before accepting during the first start stops
        the parent.
        """
        self.workers.startService()
        self.worker(0).processEnded(Failure(ProcessTerminated(2)))
        self.assertTrue(self.reactor.stopped)

    def test_failedRestartKeepsOthers(self) -> None:
        """
        Once the workers are up, a worker that dies is restarted, and one
        whose restart fails before accepting is retried later, with a
        longer delay, while the other serves; the parent never stops.
        """
        self.workers.startService()
        for index in (0, 1):
            self.worker(index).childDataReceived(3, b"ready\n")
        self.assertTrue(self.workers.ready.called)
        self.worker(1).processEnded(Failure(ProcessTerminated(1)))
        delays = []
        for _ in range(4):
            [call] = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
            self.worker(1).processEnded(Failure(ProcessTerminated(1)))
        self.assertFalse(self.reactor.stopped)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])
        self.assertIn(0, self.workers.workers)


class BootstrapTests(SynchronousTestCase):
    def run_(self, env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _TWISTD, *args], env=dict(os.environ, **env),
            capture_output=True, text=True, timeout=timeout,
        )

    def test_parentGone(self) -> None:
        """
        A worker whose parent is not the process that started it (it died
        before the worker could arm the parent-death signal) exits at once,
        saying why, before starting twistd.
        """
        result = self.run_({PARENT_PID: "1"}, "--version")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("the parent is gone", result.stderr)
        self.assertNotIn("twistd", result.stdout)

    def test_parentDeathEndsWorker(self) -> None:
        """
        For real: a worker (a real twistd shifter) whose parent dies gets
        SIGTERM from the kernel and exits.
        """
        parent = subprocess.Popen(
            [sys.executable, "-c",
             "import os, subprocess, sys, time\n"
             f"env = dict(os.environ, {PARENT_PID}=str(os.getpid()))\n"
             f"child = subprocess.Popen([sys.executable, '-c', {_TWISTD!r}, '-n', '--pidfile=',"
             " 'shifter', '--proxy', '127.0.0.1:9', '--listen', 'tcp:0:interface=127.0.0.1'], env=env,"
             " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print(child.pid, flush=True)\n"
             "time.sleep(3)\n"
             "print('alive' if child.poll() is None else 'dead', flush=True)\n"
             "os._exit(0)\n"],
            stdout=subprocess.PIPE, text=True,
        )
        childPid = int(parent.stdout.readline())
        self.assertEqual(parent.stdout.readline().strip(), "alive")
        parent.wait(30)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{childPid}") and _state(childPid) != "Z":
            if time.monotonic() > deadline:
                os.kill(childPid, signal.SIGKILL)
                self.fail("the worker outlived its parent")
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class WorkersLoggingTests(GatewayTestCase):
    """
    End to end: with C{--workers 2} and C{--logger shifter.logs.json}, the
    workers' lines come out of the parent in the parent's format.
    """

    def test_oneFormat(self) -> None:
        """
        Every line Shifter writes is a JSON event, the workers' tunnel
        lines among them, tagged with their worker.
        """
        from tests.gateway import SHIFTER_PORT, SQUID_PORT, VENV_BIN, PROJECT, waitFor

        self.squid.start()
        out = self.directory / "shifter-json.out"
        process = self.net.gateway.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logger", "shifter.logs.json", "shifter",
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:", "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--workers", "2",
            logTo=out, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        )
        text = lambda: out.read_text() if out.exists() else ""  # noqa: E731
        waitFor(lambda: "workers accepting on" in text() or process.poll() is not None, 30, "two workers")
        self.assertIsNone(process.poll(), text())
        for _ in range(4):
            self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)

        def events() -> list[dict]:
            # Whole lines only: the last may still be being written.
            return [json.loads(line) for line in text().split("\n")[:-1] if line.strip()]

        waitFor(lambda: len([e for e in events() if "tunnel_line" in e]) >= 4, 15, "four tunnel lines")
        tunnels = [e for e in events() if "tunnel_line" in e]
        self.assertEqual(len(tunnels), 4)
        for event in tunnels:
            self.assertRegex(event["system"], r"^worker [01]#info$")


class WorkersMetricsTests(GatewayTestCase):
    """
    End to end: with C{--workers 2 --metrics}, Prometheus scrapes one
    endpoint, the parent's, which serves the sum of both workers'.
    """

    def scrape(self, port: int) -> dict[str, float]:
        result = self.net.gateway.run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/metrics")
        samples = {}
        for line in result.stdout.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def test_summed(self) -> None:
        """
        Tunnels spread over both workers are all counted on the parent's
        port, which is the sum of the workers' own (ports 9101 and 9102);
        scrapes add no line to the log.
        """
        from tests.gateway import SHIFTER_PORT, SQUID_PORT, VENV_BIN, PROJECT, stopProcess, waitFor

        self.squid.start()
        log = self.directory / "shifter-workers.log"
        process = self.net.gateway.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={log}", "shifter",
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:", "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--workers", "2", "--metrics", "tcp:9100:interface=127.0.0.1",
            logTo=self.directory / "shifter-workers.out", env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        )
        self.addCleanup(stopProcess, process)
        text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
        waitFor(lambda: "workers accepting on" in text() or process.poll() is not None, 30, "two workers")
        self.assertIsNone(process.poll(), text())
        for _ in range(6):
            self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        waitFor(lambda: self.scrape(9100).get("shifter_tunnels_opened_total") == 6, 15, "six tunnels in the sum")
        lines = text().count("\n")
        for _ in range(5):
            summed = self.scrape(9100)
        workers = [self.scrape(9101), self.scrape(9102)]
        self.assertEqual(summed["shifter_workers_scraped"], 2)
        self.assertEqual(sum(w["shifter_tunnels_opened_total"] for w in workers), 6)
        self.assertEqual(
            summed['shifter_bytes_total{direction="down"}'],
            sum(w['shifter_bytes_total{direction="down"}'] for w in workers),
        )
        self.assertEqual(summed['shifter_tunnel_failures_total{reason="proxy-status"}'], 0)
        self.assertEqual(summed[f'shifter_build_info{{version="{shifter.__version__}"}}'], 1)
        self.assertEqual(text().count("\n"), lines, text().splitlines()[lines:])
