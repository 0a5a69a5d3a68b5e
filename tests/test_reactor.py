"""
Shifter's reactor (L{shifter.service.reactor}): Twisted's epoll reactor
dispatching without a log context, run in a process of its own as
C{shifter run} and C{twistd --reactor shifter} run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
