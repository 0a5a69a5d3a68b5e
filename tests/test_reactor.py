"""
Shifter's reactor (L{shifter.service.reactor}): Twisted's epoll reactor
dispatching without a log context, run in a process of its own as
C{shifter run} and C{twistd --reactor shifter} run it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

PROJECT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(PROJECT))

# Echo server and clients on loopback under ShifterReactor: the first
# connection's protocol raises in connectionLost (an exception that escapes
# Twisted's own handling of a dispatch), then a second connection must
# still be served.  Prints what happened as JSON.
SCRIPT = r"""
import json, socket, sys
from shifter.service.reactor import ShifterReactor, install
reactor = install()
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

logged = []
globalLogPublisher.addObserver(lambda event: logged.append(event.get("log_format") or ""))

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)
    def connectionLost(self, reason):
        if self.factory.raised == 0:
            self.factory.raised += 1
            raise ValueError("a handler that fails")

factory = protocol.ServerFactory.forProtocol(Echo)
factory.raised = 0
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
echoed = []

def client(then):
    s = socket.create_connection(("127.0.0.1", port.getHost().port))
    s.setblocking(False)
    s.sendall(b"ping")
    def read():
        try:
            echoed.append(s.recv(16).decode())
        except BlockingIOError:
            reactor.callLater(0.01, read)
            return
        s.close()
        reactor.callLater(0.05, then)
    reactor.callLater(0.01, read)

client(lambda: client(reactor.stop))
reactor.callLater(10, reactor.stop)
reactor.run(installSignalHandlers=False)
print(json.dumps({"reactor": type(reactor).__name__, "echoed": echoed, "raised": factory.raised,
                  "failureLogged": any("while dispatching" in f for f in logged)}))
"""


class ShifterReactorTests(SynchronousTestCase):
    def test_dispatchesAndSurvivesAFailingHandler(self) -> None:
        """
        Reads and writes on real sockets are dispatched; an exception that
        escapes a dispatch is logged and the loop serves the next
        connection.
        """
        result = subprocess.run([sys.executable, "-c", SCRIPT], env=ENV, capture_output=True, text=True,
                                timeout=60, cwd=str(PROJECT))
        self.assertEqual(result.returncode, 0, result.stderr)
        outcome = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(outcome, {"reactor": "ShifterReactor", "echoed": ["ping", "ping"], "raised": 1,
                                   "failureLogged": True})

    def test_shifterRunInstallsIt(self) -> None:
        """
        C{shifter run} runs Shifter on this reactor (twistd names the
        reactor class when it starts).
        """
        output = Path(self.mktemp())
        with output.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "shifter", "run", "--proxy", "127.0.0.1:9",
                 "--listen", "tcp:0:interface=127.0.0.1", "--warm-connections", "off"],
                env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=str(PROJECT),
            )
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.send_signal, signal.SIGTERM)
        text, deadline = "", time.monotonic() + 30
        while "accepting redirected" not in text and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            text = output.read_text()
        self.assertIn("accepting redirected", text)
        self.assertIn("reactor class: shifter.service.reactor.ShifterReactor", text)

    def test_twistdPlugin(self) -> None:
        """
        twistd knows the reactor by the name C{shifter}.
        """
        result = subprocess.run([str(Path(sys.executable).parent / "twistd"), "--help-reactors"], env=ENV,
                                capture_output=True, text=True, timeout=60, cwd=str(PROJECT))
        self.assertRegex(result.stdout, r"(?m)^\s*shifter\s+epoll, dispatching without a log context")


class Reader:
    """
    A descriptor the reactor can be told to read: a socket and a count of
    its reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        self.reads += 1

    def doWrite(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass

    # What the splice relay asks of a transport it takes the socket of.
    def getHandle(self) -> socket.socket:
        return self.sock

    def stopWriting(self) -> None:
        pass

    def stopReading(self) -> None:
        self.reactor.removeReader(self)


class CountingPoller:
    """
    An epoll object that counts the calls that change registrations: their
    names in C{changes}, and with each its descriptor in C{changed}.
    """

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.changed: list[tuple[str, int]] = []

    @property
    def changes(self) -> list[str]:
        return [name for name, _ in self.changed]

    def _record(self, name: str, fd: int) -> None:
        self.changed.append((name, fd))

    def register(self, fd: int, *args: Any) -> None:
        self._record("register", fd)
        self.poller.register(fd, *args)

    def unregister(self, fd: int) -> None:
        self._record("unregister", fd)
        self.poller.unregister(fd)

    def modify(self, fd: int, *args: Any) -> None:
        self._record("modify", fd)
        self.poller.modify(fd, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)


class OwnReactorTestCase(SynchronousTestCase):
    """
    A L{ShifterReactor} of the test's own that never runs, whose epoll
    object counts the changes to registrations, and two socket pairs.
    """

    def setUp(self) -> None:
        from shifter.service.reactor import ShifterReactor

        self.reactor = ShifterReactor()
        self.addCleanup(self.reactor._poller.close)
        self.poller = CountingPoller(self.reactor._poller)
        self.reactor._poller = self.poller
        self.pairs = [socket.socketpair() for _ in range(2)]
        for pair in self.pairs:
            for s in pair:
                self.addCleanup(s.close)

    def reader(self, sock: socket.socket) -> Reader:
        reader = Reader(sock)
        reader.reactor = self.reactor  # type: ignore[attr-defined]
        return reader

class ReplaceReaderTests(OwnReactorTestCase):
    """
    L{ShifterReactor.replaceReader}.
    """

    def test_takesTheRegistration(self) -> None:
        """
        The new reader gets the old one's events, with no epoll_ctl; it
        can then be removed as any reader.
        """
        old, new = self.reader(self.pairs[0][0]), self.reader(self.pairs[0][0])
        self.reactor.addReader(old)
        self.poller.changed.clear()
        self.assertTrue(self.reactor.replaceReader(old, new))
        self.assertEqual(self.poller.changes, [])
        self.pairs[0][1].send(b"x")
        self.reactor.doPoll(1)
        self.assertEqual((old.reads, new.reads), (0, 1))
        self.reactor.removeReader(new)
        self.assertEqual(self.poller.changes, ["unregister"])
        self.assertNotIn(new, self.reactor.getReaders())

    def test_refused(self) -> None:
        """
        Nothing changes when the old reader does not read that descriptor,
        when the new one has another, or when the descriptor is
        registered for writing too.
        """
        old, other = self.reader(self.pairs[0][0]), self.reader(self.pairs[1][0])
        self.assertFalse(self.reactor.replaceReader(old, self.reader(self.pairs[0][0])))
        self.reactor.addReader(old)
        self.assertFalse(self.reactor.replaceReader(old, other))
        self.reactor.addWriter(old)
        self.assertFalse(self.reactor.replaceReader(old, self.reader(self.pairs[0][0])))
        self.assertEqual([r for r in self.reactor.getReaders() if r is not self.reactor.waker], [old])

    def test_spliceRelayTakesOver(self) -> None:
        """
        The splice relay, started on two reading transports, reads through
        their registrations: no epoll_ctl for either socket.
        """
        from shifter.relay.relay import _SpliceTunnel
        from shifter.relay.splice import SPLICE_AVAILABLE

        if not SPLICE_AVAILABLE:
            raise SkipTest("os.splice is not available (Python 3.10 or later on Linux)")
        client, proxy = self.reader(self.pairs[0][0]), self.reader(self.pairs[1][0])
        self.reactor.addReader(client)
        self.reactor.addReader(proxy)
        self.poller.changed.clear()

        class Owner:
            def relayed(self, up: bool, n: int) -> None:
                pass

        tunnel = _SpliceTunnel(self.reactor, client, proxy, Owner())
        tunnel.start(b"", b"", False)
        self.assertEqual(self.poller.changes, [])
        self.assertEqual(
            sorted(type(r).__name__ for r in self.reactor.getReaders() if r is not self.reactor.waker),
            ["_Socket", "_Socket"],
        )


class WriterBecomesReaderTests(OwnReactorTestCase):
    """
    L{ShifterReactor.writerBecomesReader}.
    """

    def test_takesTheRegistration(self) -> None:
        """
        The new reader gets the descriptor's read events through one
        epoll_ctl, and the old writer none; the new one can then be removed
        as any reader.
        """
        old, new = self.reader(self.pairs[0][0]), self.reader(self.pairs[0][0])
        old.writes = 0  # type: ignore[attr-defined]
        old.doWrite = lambda: setattr(old, "writes", old.writes + 1)  # type: ignore[attr-defined]
        self.reactor.addWriter(old)
        self.poller.changed.clear()
        self.assertTrue(self.reactor.writerBecomesReader(old, new))
        self.assertEqual(self.poller.changes, ["modify"])
        readers = [r for r in self.reactor.getReaders() if r is not self.reactor.waker]
        self.assertEqual((self.reactor.getWriters(), readers), ([], [new]))
        self.pairs[0][1].send(b"x")
        self.reactor.doPoll(1)
        self.assertEqual((old.reads, old.writes, new.reads), (0, 0, 1))  # type: ignore[attr-defined]
        self.reactor.removeReader(new)
        self.assertEqual(self.poller.changes, ["modify", "unregister"])

    def test_refused(self) -> None:
        """
        Nothing changes when the old one does not write to that
        descriptor, when the new one has another, or when the descriptor
        is registered for reading too.
        """
        old, other = self.reader(self.pairs[0][0]), self.reader(self.pairs[1][0])
        self.assertFalse(self.reactor.writerBecomesReader(old, self.reader(self.pairs[0][0])))
        self.reactor.addWriter(old)
        self.assertFalse(self.reactor.writerBecomesReader(old, other))
        self.reactor.addReader(old)
        self.assertFalse(self.reactor.writerBecomesReader(old, self.reader(self.pairs[0][0])))
        self.assertEqual(self.reactor.getWriters(), [old])


class ForgetTests(OwnReactorTestCase):
    """
    L{ShifterReactor.forget}.
    """

    def test_readingAndWriting(self) -> None:
        """
        A descriptor watched for reading and writing is forgotten with one
        epoll_ctl: it is neither a reader nor a writer after.
        """
        reader = self.reader(self.pairs[0][0])
        self.reactor.addReader(reader)
        self.reactor.addWriter(reader)
        self.poller.changed.clear()
        self.reactor.forget(reader)
        self.assertEqual(self.poller.changed, [("unregister", reader.fileno())])
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(self.reactor.getWriters(), [])

    def test_notWatched(self) -> None:
        """
        A descriptor the reactor does not watch costs no epoll_ctl.
        """
        self.reactor.forget(self.reader(self.pairs[0][0]))
        self.assertEqual(self.poller.changes, [])
