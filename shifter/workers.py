"""
C{--workers N}: N processes serving one listening port, each with its own
reactor and no threads.

The parent (L{WorkersService}) does no relaying.  It starts N copies of
C{twistd -n shifter} with the same options plus C{--worker I}, watches
them, restarts one that dies, and passes SIGTERM (drain, then exit) and
SIGHUP (reopen logs) on to all of them.

Each worker listens on its own socket bound with C{SO_REUSEPORT}
(L{ReusePortEndpoint}), so the kernel spreads new connections over the
workers by hash, with no shared accept queue to contend on and no thundering
herd; a worker that restarts simply binds again.  Only C{tcp:} and C{tcp6:}
listeners can be shared this way.

Logs: every worker tags its events C{[worker I#level]}.  When the parent logs to
a file (C{--logfile}), the workers' output comes to it through a pipe and is
appended to that file as whole lines, so rotation and SIGHUP reopening stay
the parent's; otherwise the workers write to the parent's own standard
output.  Metrics (C{--metrics}): worker I serves on the given port plus I
(scrape them all; the counters are per worker).
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
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from shifter.logs import reopenLogFiles

# The descriptor on which a worker says it is accepting connections.
READY_FD = 3

# How a worker runs twistd: as the parent did, from the same interpreter.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

_PR_SET_PDEATHSIG = 1


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
    def fromEndpoint(cls, reactor: Any, endpoint: object) -> ReusePortEndpoint | None:
        """
        The same listener as a C{tcp:} or C{tcp6:} endpoint, or C{None} for
        any other kind.
        """
        if isinstance(endpoint, TCP6ServerEndpoint):
            family = socket.AF_INET6
        elif isinstance(endpoint, TCP4ServerEndpoint):
            family = socket.AF_INET
        else:
            return None
        interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        return cls(reactor, family, endpoint._port, interface, endpoint._backlog)

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


def workerReady() -> None:
    """
    Tell the parent that this worker accepts connections.
    """
    try:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)
    except OSError:
        pass  # not started by a parent


def _logFile(publisher: Any = globalLogPublisher) -> Any:
    """
    The file that twistd's C{--logfile} observer writes to, if any.
    """
    for observer in getattr(publisher, "_observers", ()):
        outFile = getattr(observer, "_outFile", None)
        if outFile is not None and hasattr(outFile, "rotate"):
            return outFile
    return None


class _Worker(ProcessProtocol):
    """
    The parent's view of one worker: its output, its readiness, its end.
    """

    ready = False

    def __init__(self, service: WorkersService, index: int, logFile: Any) -> None:
        self.service = service
        self.index = index
        self.logFile = logFile
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD:
            if not self.ready:
                self.ready = True
                self.service.workerReady(self)
            return
        # Whole lines only, so that two workers' lines never interleave.
        data = self._partial[childFD] + data
        cut = data.rfind(b"\n") + 1
        self._partial[childFD] = data[cut:]
        if cut:
            self.logFile.write(data[:cut])
            self.logFile.flush()

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest and self.logFile is not None:
                self.logFile.write(rest + b"\n")
        self.ended.callback(None)
        self.service.workerEnded(self, reason)


class WorkersService(Service):
    """
    Starts C{count} worker processes, restarts those that die after they
    started accepting, and stops them all (draining) when stopped.

    A worker that exits before it ever accepted (a bad option, a port in
    use) stops the parent too: restarting it would fail the same way.
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
    ) -> None:
        """
        @param arguments: the C{shifter} subcommand's arguments, to which
            each worker's C{--worker I} is added.
        """
        self.reactor = reactor
        self.count = count
        self.arguments = arguments
        self.drainTimeout = drainTimeout
        self.listen = listen
        self.workers: dict[int, _Worker] = {}
        self.pids: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._restoreHangup: Callable[[], object] | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        previous = signal.signal(signal.SIGHUP, self._onHangup)
        self._restoreHangup = lambda: signal.signal(signal.SIGHUP, previous)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        logFile = _logFile()
        worker = _Worker(self, index, logFile)
        output: object = "r" if logFile is not None else None
        childFDs = {0: 0, 1: output or 1, 2: output or 2, READY_FD: "r"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        args = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "shifter", *self.arguments, "--worker", str(index)]
        transport = self.reactor.spawnProcess(
            worker, sys.executable, args, env=env, path=os.getcwd(), childFDs=childFDs
        )
        self.workers[index] = worker
        self.pids[index] = transport.pid
        worker.started = self.reactor.seconds()  # type: ignore[attr-defined]
        self.log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

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
        if not worker.ready:
            self.log.critical(
                "worker {index} exited (status {status}) before accepting connections; stopping",
                index=index,
                status=status,
            )
            self.reactor.callWhenRunning(self.reactor.stop)
            return
        failures = self._failures.get(index, 0) + 1
        self._failures[index] = failures
        delay = min(30.0, 0.5 * 2 ** (failures - 1))
        self.log.warn(
            "worker {index} exited ({reason}); restarting in {delay:g} s",
            index=index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def _onHangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._hangup)

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

        def done(_: object) -> None:
            if killer.active():
                killer.cancel()

        from twisted.internet.defer import gatherResults

        result = gatherResults(ended)
        result.addCallback(done)
        return result
