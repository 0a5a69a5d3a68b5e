"""
C{--workers N}: N processes serving one listening port, each with its own
reactor and no threads.

The parent (L{WorkersService}) does no relaying.  It starts N copies of
C{twistd -n shifter} with the same options plus C{--worker I}, watches
them, restarts one that dies, and passes SIGTERM (drain, then exit),
SIGHUP and SIGUSR1 (reopen the access log) on to all of them.

Each worker listens on its own socket bound with C{SO_REUSEPORT}
(L{ReusePortEndpoint}), so the kernel spreads new connections over the
workers by hash, with no shared accept queue to contend on and no thundering
herd; a worker that restarts simply binds again.  Only C{tcp:} and C{tcp6:}
listeners can be shared this way.

Logs: a worker writes its log events, as JSON, to a pipe to the parent,
which publishes them as its own, tagged C{[worker I#level]}: so they go
where the parent's go (C{--logfile}, C{--syslog}, a C{--logger}), in the
format the parent's go in, and rotation and reopening stay the parent's.
Metrics (C{--metrics}): the parent serves the sum of the workers' on the
given port, worker I its own on that port plus 1 + I
(L{shifter.service.metricsum}).

A worker arms the parent-death signal before anything else (C{prctl
PR_SET_PDEATHSIG}) and then checks that its parent is still the process
that started it, so a worker never outlives its parent, even one that died
while the worker was starting.  A worker that cannot start during the
first start stops the parent, with a failure status; one that cannot start
again later is retried, with a growing delay, while the others serve.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from shifter.logs import rememberOpenLogFile, reopenLogFiles

# The descriptor on which a worker says it is accepting connections.
READY_FD = 3

# The environment variable that tells a worker its parent's pid.
PARENT_PID = "SHIFTER_WORKER_PARENT"

# How a worker starts: the parent-death signal first, then a check that
# the parent has not died already (the signal would never come), then
# twistd as the parent ran it, from the same interpreter.
_TWISTD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    f"if os.getppid() != int(os.environ['{PARENT_PID}']):\n"
    "    sys.exit('shifter worker: the parent is gone')\n"
    "from twisted.scripts.twistd import run\n"
    "sys.argv[0] = 'twistd'\n"
    "run()\n"
)

# What twistd is told in each worker: its log events go to the parent as
# JSON lines.
_WORKER_TWISTD_OPTIONS = ("-n", "--pidfile=", "--logger", "shifter.logs.events")

_PR_SET_PDEATHSIG = 1

# The longest line a worker may write before it is passed on as it is.
_MAX_LINE = 1 << 20


class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket is bound with C{SO_REUSEPORT}, so
    that several processes can listen on the same port.
    """

    def __init__(self, reactor: Any, family: int, port: int, interface: str, backlog: int) -> None:
        self.reactor = reactor
        self.family = family
        self.port = port
        self.interface = interface
        self.backlog = backlog

    @classmethod
    def fromString(cls, reactor: Any, description: str) -> ReusePortEndpoint | None:
        """
        The listener a C{tcp:} or C{tcp6:} server endpoint string describes
        (C{tcp:12345}, C{tcp6:port=12345:interface=\\:\\:}, with
        C{backlog=}), read from the string itself; C{None} for any other
        kind.
        """
        from shifter.upstream.endpointstrings import listeningArguments

        parsed = listeningArguments(description)
        if parsed is None or parsed[0] not in ("tcp", "tcp6"):
            return None
        kind, arguments = parsed
        family, wildcard = (socket.AF_INET6, "::") if kind == "tcp6" else (socket.AF_INET, "0.0.0.0")
        port = arguments.get("port", "")
        backlog = arguments.get("backlog", "50")
        if not port.isdigit() or not backlog.isdigit():
            return None
        return cls(reactor, family, int(port), arguments.get("interface") or wildcard, int(backlog))

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), self.family, factory)
        except OSError as e:
            return fail(error.CannotListenError(self.interface, self.port, e))
        finally:
            sock.close()  # the port holds its own duplicate
        return succeed(port)


def shiftPort(description: str, offset: int) -> str | None:
    """
    The endpoint string C{description} with its TCP port moved up by
    C{offset}, or C{None} if it names no TCP port.
    """
    match = re.match(r"^(tcp6?:(?:port=)?)(\d+)(.*)$", description)
    if match is None:
        match = re.match(r"^(tcp6?:.*?(?<!\\):port=)(\d+)(.*)$", description)
    if match is None:
        return None
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def becomeWorker(index: int) -> None:
    """
    Set up this process as worker C{index}: tag its log events, and have
    the kernel end it if the parent dies (it holds a share of the port).
    The bootstrap armed that already; arming it again here covers a worker
    started otherwise.  A worker whose parent is gone exits now.
    """

    def tag(event: dict) -> None:
        if event.get("log_system", "-") == "-":
            level = event.get("log_level")
            event["log_system"] = f"worker {index}#{level.name}" if level is not None else f"worker {index}"

    globalLogPublisher.addObserver(tag)  # type: ignore[arg-type]  # a plain function is an observer
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(PARENT_PID)
    if parent is not None and parent.isdigit() and os.getppid() != int(parent):
        sys.exit(f"shifter worker {index}: the parent (pid {parent}) is gone")


def workerReady() -> None:
    """
    Tell the parent that this worker accepts connections.
    """
    try:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)
    except OSError:
        pass  # not started by a parent


class _Worker(ProcessProtocol):
    """
    The parent's view of one worker: its log events, its readiness, its
    end.
    """

    ready = False

    def __init__(self, service: WorkersService, index: int) -> None:
        self.service = service
        self.index = index
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD:
            if not self.ready:
                self.ready = True
                self.service.workerReady(self)
            return
        if childFD not in self._partial:
            return
        data = self._partial[childFD] + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            if line:
                self.service.workerLine(self.index, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self.service.workerLine(self.index, childFD, rest)
        self._partial = {1: b"", 2: b""}
        self.ended.callback(None)
        self.service.workerEnded(self, reason)


class WorkersService(Service):
    """
    Starts C{count} worker processes, restarts those that die, publishes
    their log events as its own, and stops them all (draining) when
    stopped.

    A worker that exits before it ever accepted during the first start (a
    bad option, a port in use) stops the parent too, with a failure status
    if C{exitStatusOnFailure}: every worker would fail the same way.  Once
    the workers have started, one that exits is restarted after a delay
    that doubles with each failure in a row (up to 30 s), whether it
    failed to start again or not; the others serve meanwhile.
    """

    log = Logger()
    _stopping = False

    def __init__(
        self,
        reactor: Any,
        count: int,
        arguments: list[str],
        drainTimeout: float,
        listen: str,
        exitStatusOnFailure: bool = False,
        publisher: Callable[[dict], None] = globalLogPublisher,
    ) -> None:
        """
        @param arguments: the C{shifter} subcommand's arguments, to which
            each worker's C{--worker I} is added.
        @param exitStatusOnFailure: make the process exit with a failure
            status if the first start fails (under twistd).
        @param publisher: where the workers' log events are published.
        """
        self.reactor = reactor
        self.count = count
        self.arguments = arguments
        self.drainTimeout = drainTimeout
        self.listen = listen
        self.exitStatusOnFailure = exitStatusOnFailure
        self.publisher = publisher
        self.workers: dict[int, _Worker] = {}
        self.pids: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._restoreHangup: Callable[[], object] | None = None
        self._previousUser1: Any = None
        self._stopWaiters: list[Deferred[None]] | None = None  # while stopping
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        previous = signal.signal(signal.SIGHUP, self._onHangup)
        self._previousUser1 = signal.signal(signal.SIGUSR1, self._onUser1)

        def restore() -> None:
            signal.signal(signal.SIGHUP, previous)
            signal.signal(signal.SIGUSR1, self._previousUser1)

        self._restoreHangup = restore
        rememberOpenLogFile()
        for index in range(self.count):
            self._spawn(index)

    def workerArguments(self, index: int) -> list[str]:
        """
        The command line of worker C{index}.
        """
        return [
            sys.executable, "-c", _TWISTD, *_WORKER_TWISTD_OPTIONS,
            "shifter", *self.arguments, "--worker", str(index),
        ]

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        worker = _Worker(self, index)
        childFDs = {0: 0, 1: "r", 2: "r", READY_FD: "r"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env[PARENT_PID] = str(os.getpid())
        transport = self.reactor.spawnProcess(
            worker, sys.executable, self.workerArguments(index), env=env, path=os.getcwd(), childFDs=childFDs
        )
        self.workers[index] = worker
        self.pids[index] = transport.pid
        self.log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def workerLine(self, index: int, childFD: int, line: bytes) -> None:
        """
        A line from worker C{index}: a log event (JSON, on its standard
        output), published as the parent's own; anything else (a traceback
        on its standard error, say) is published as a warning.
        """
        event: dict[str, Any] | None = None
        if childFD == 1 and line.startswith(b"{"):
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except ValueError:
                event = None
        if event is None:
            event = {
                "log_format": "{worker_output}",
                "worker_output": line.decode("utf-8", "replace"),
                "log_level": LogLevel.warn,
                "log_namespace": "shifter.service.workers",
                "log_time": self.reactor.seconds(),
            }
        if event.get("log_system", "-") == "-":
            event["log_system"] = f"worker {index}"
        event.setdefault("shifter_worker", index)
        self.publisher(event)

    def workerReady(self, worker: _Worker) -> None:
        self._failures[worker.index] = 0
        if not self.ready.called and all(w.ready for w in self.workers.values()):
            self.log.info(
                "{count} workers accepting on {listen} (SO_REUSEPORT)",
                count=self.count,
                listen=self.listen,
            )
            self.ready.callback(None)

    def workerEnded(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        if self.workers.get(index) is worker:
            del self.workers[index]
            self.pids.pop(index, None)
        status = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0  # type: ignore[union-attr]
        if self._stopping:
            return
        if not worker.ready and not self.ready.called:
            self.log.critical(
                "worker {index} exited (status {status}) before accepting connections; stopping",
                index=index,
                status=status,
            )
            from shifter.service.service import stopWithFailure

            stopWithFailure(self.reactor, self.exitStatusOnFailure)
            return
        failures = self._failures.get(index, 0) + 1
        self._failures[index] = failures
        delay = min(30.0, 0.5 * 2 ** (failures - 1))
        self.log.warn(
            "worker {index} exited ({reason}{before}); restarting in {delay:g} s",
            index=index,
            reason=reason.getErrorMessage(),
            before="" if worker.ready else ", before accepting connections",
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def cannotStart(self, reason: Failure, what: str) -> None:
        """
        A port the parent serves beside the workers (the sum of their
        metrics) cannot be opened: one critical line, then stop, as when a
        worker cannot start.
        """
        self.log.critical("Shifter cannot start: {what}: {reason}", what=what, reason=reason.getErrorMessage())
        from shifter.service.service import stopWithFailure

        stopWithFailure(self.reactor, self.exitStatusOnFailure)

    def _onHangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._hangup)

    def _onUser1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._signalAll, signal.SIGUSR1)
        if callable(self._previousUser1):
            self._previousUser1(signum, frame)  # twistd's: it rotates its --logfile

    def _hangup(self) -> None:
        self.log.info("SIGHUP: reopened {count} log files", count=reopenLogFiles())
        self._signalAll(signal.SIGHUP)

    def _signalAll(self, signum: int) -> None:
        for index, pid in list(self.pids.items()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self._stopping = True
        if self._restoreHangup is not None:
            self._restoreHangup()
            self._restoreHangup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = [worker.ended for worker in self.workers.values()]
        self._signalAll(signal.SIGTERM)
        killer = self.reactor.callLater(self.drainTimeout + 10, self._signalAll, signal.SIGKILL)

        self._stopWaiters = []

        def done(_: object) -> None:
            if killer.active():
                killer.cancel()
            waiters, self._stopWaiters = self._stopWaiters or [], None
            for waiter in waiters:
                waiter.callback(None)

        from twisted.internet.defer import gatherResults

        result = gatherResults(ended)
        result.addCallback(done)
        return result

    def whenStopped(self) -> Deferred[None]:
        """
        @return: a C{Deferred} that fires once every worker has ended after
            a stop (their drains included); at once if none is under way.
        """
        if self._stopWaiters is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopWaiters.append(waiter)
        return waiter
