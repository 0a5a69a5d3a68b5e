"""
Tests for running Shifter as infrastructure, in memory: metrics, allow-lists,
draining on shutdown, and pausing accepts when descriptors run out.
"""

from __future__ import annotations

import errno
import os
import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from shifter.tunnel.downstream import TunnelSettings
from shifter.tunnel.limits import AcceptPauser
from shifter import logs
from shifter.service.metricspage import MetricsPage
from shifter.service.service import ShifterService
from tests.test_tap import parse
from tests.test_tunnel import CLIENT, OK, TunnelTestCase


def scrape(factory) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """
    Render the metrics page and read its samples into a dict keyed by the
    sample's name and labels, as written.
    """
    request = DummyRequest([b""])
    text = MetricsPage(factory.metrics.registry).render_GET(request).decode()
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class MetricsTests(TunnelTestCase):
    def test_tunnelCountsAndBytes(self) -> None:
        """
        The metrics count open and finished tunnels and the bytes relayed,
        also of tunnels still open.
        """
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        client.dataReceived(b"a" * 100)
        upstream.dataReceived(b"b" * 250)
        samples = scrape(self.factory)
        self.assertEqual(samples["shifter_tunnels_open"], 1)
        self.assertEqual(samples["shifter_tunnels_opened_total"], 1)
        self.assertEqual(samples['shifter_bytes_total{direction="up"}'], 100)
        self.assertEqual(samples['shifter_bytes_total{direction="down"}'], 250)
        self.assertEqual(samples['shifter_proxy_answers_total{status_class="2xx"}'], 1)
        self.lose(client, clientTransport)
        self.lose(upstream, upstreamTransport)
        samples = scrape(self.factory)
        self.assertEqual(samples["shifter_tunnels_open"], 0)
        self.assertEqual(samples["shifter_connections_active"], 0)
        self.assertEqual(samples['shifter_bytes_total{direction="up"}'], 100)
        self.assertEqual(samples['shifter_bytes_total{direction="down"}'], 250)

    def test_countersOnlyGoUp(self) -> None:
        """
        Every counter only ever goes up, with tunnels failing as well as
        opening: a client's early bytes count once its tunnel opens and
        they are relayed, and not at all when it fails first, so nothing
        is counted and then taken back (which Prometheus would read as a
        reset).
        """
        counters = []

        def check() -> None:
            samples = scrape(self.factory)
            now = {k: v for k, v in samples.items() if k.startswith(("shifter_bytes_total", "shifter_tunnel"))
                   and "_open" not in k}
            if counters:
                for key, value in counters[-1].items():
                    self.assertGreaterEqual(now.get(key, 0), value, key)
            counters.append(now)

        client, clientTransport = self.connectClient()
        client.dataReceived(b"e" * 40)
        check()
        upstream, _ = self.endpoint.accept()
        upstream.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.lose(client, clientTransport)
        check()
        self.assertEqual(counters[-1]['shifter_bytes_total{direction="up"}'], 0)
        client, clientTransport = self.connectClient()
        client.dataReceived(b"f" * 30)
        check()
        upstream, upstreamTransport = self.endpoint.accept()
        upstream.dataReceived(OK + b"g" * 5)
        check()
        self.assertEqual(counters[-1]['shifter_bytes_total{direction="up"}'], 30)
        self.assertEqual(counters[-1]['shifter_bytes_total{direction="down"}'], 5)
        self.lose(client, clientTransport)
        self.lose(upstream, upstreamTransport)
        check()

    def test_failuresByReason(self) -> None:
        """
        Failures are counted by reason, and proxy answers by status class.
        """
        self.openTunnel(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.openTunnel(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        self.connectClient()
        self.endpoint.refuse()
        samples = scrape(self.factory)
        self.assertEqual(samples['shifter_tunnel_failures_total{reason="proxy-status"}'], 2)
        self.assertEqual(samples['shifter_tunnel_failures_total{reason="proxy-connect"}'], 1)
        self.assertEqual(samples['shifter_proxy_answers_total{status_class="4xx"}'], 1)
        self.assertEqual(samples['shifter_proxy_answers_total{status_class="5xx"}'], 1)

    def test_proxyHealth(self) -> None:
        """
        A proxy is reported up until it is marked down.
        """
        self.makeFactory()
        self.assertEqual(scrape(self.factory)['shifter_proxy_up{proxy="proxy.test:3128"}'], 1)
        for _ in range(3):
            self.connectClient()
            self.endpoint.refuse()
        self.assertEqual(scrape(self.factory)['shifter_proxy_up{proxy="proxy.test:3128"}'], 0)

    def test_latencyHistograms(self) -> None:
        """
        The time to resolve and the time to the proxy's 2xx are observed.
        """
        client, _ = self.connectClient()
        upstream, _ = self.endpoint.accept()
        self.clock.advance(0.02)
        upstream.dataReceived(OK)
        samples = scrape(self.factory)
        self.assertEqual(samples["shifter_resolve_seconds_count"], 1)
        self.assertEqual(samples["shifter_connect_seconds_count"], 1)
        self.assertEqual(samples['shifter_connect_seconds_bucket{le="0.01"}'], 0)
        self.assertEqual(samples['shifter_connect_seconds_bucket{le="0.025"}'], 1)


class AllowListTests(TunnelTestCase):
    def test_clientNotAllowed(self) -> None:
        """
        A client outside every --allow network is refused before anything
        is resolved or connected, with a log line and a counter.
        """
        self.settings = TunnelSettings(allowedClients=(ipaddress.ip_network("10.0.0.0/8"),))
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(self.factory.counters["client-denied"], 1)
        self.assertIn("192.0.2.2 is not in an --allow network", self.failureLines()[0])

    def test_clientAllowed(self) -> None:
        """
        A client inside an --allow network is served.
        """
        self.settings = TunnelSettings(
            allowedClients=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"))
        )
        self.openTunnel()
        self.assertEqual(self.factory.counters["opened"], 1)

    def test_portNotAllowed(self) -> None:
        """
        A destination port outside --allow-port is refused without a proxy
        connection.
        """
        self.settings = TunnelSettings(allowedPorts=frozenset({8443}))
        _, clientTransport = self.connectClient()
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertIn("destination port 443 is not an --allow-port", self.failureLines()[0])

    def test_options(self) -> None:
        """
        --allow and --allow-port are repeatable; bad values are one-line
        errors.
        """
        options = parse(
            "--proxy", "127.0.0.1:3128", "--allow", "192.168.0.0/16", "--allow", "2001:db8::/32",
            "--allow-port", "443,8443", "--allow-port", "993",
        )
        self.assertEqual(
            options["allow"],
            [ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("2001:db8::/32")],
        )
        self.assertEqual(options["allow-port"], {443, 8443, 993})
        for bad in (["--allow", "192.168.0.0/33"], ["--allow-port", "0"], ["--allow-port", "https"]):
            self.assertRaises(UsageError, parse, "--proxy", "127.0.0.1:3128", *bad)


class DrainTests(TunnelTestCase):
    def makeService(self, drainTimeout: float) -> ShifterService:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        factory = self.makeFactory()
        service = ShifterService(TCP4ServerEndpoint(self.clock, 12345), "tcp:12345", factory, drainTimeout)
        service.startService()
        return service

    def test_drainWaitsForTunnels(self) -> None:
        """
        Stopping stops accepting at once, and finishes when the open tunnels
        have ended by themselves within the drain timeout.
        """
        service = self.makeService(30)
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(clientTransport.disconnecting)
        self.clock.advance(10)
        upstream.dataReceived(b"the rest of the download")
        self.lose(upstream, upstreamTransport)
        self.lose(client, clientTransport)
        self.successResultOf(stopped)
        self.assertIn(b"the rest of the download", clientTransport.value())

    def test_drainTimeoutClosesTunnels(self) -> None:
        """
        Tunnels still open when the drain timeout ends are closed, and
        stopping then finishes.
        """
        service = self.makeService(5)
        client, clientTransport, upstream, upstreamTransport = self.openTunnel()
        stopped = service.stopService()
        self.clock.advance(5.1)
        self.assertTrue(clientTransport.disconnecting)
        self.assertTrue(upstreamTransport.disconnecting)
        self.lose(client, clientTransport)
        self.lose(upstream, upstreamTransport)
        self.successResultOf(stopped)
        self.assertTrue(any("closed at shutdown" in m for m in self.messages("info")))

    def test_idleStopsAtOnce(self) -> None:
        """
        With no connection open, stopping does not wait.
        """
        service = self.makeService(30)
        self.successResultOf(service.stopService())


class FakeListener:
    def __init__(self) -> None:
        self.errors: list[int] = []
        self.accepted = 0

    def accept(self):  # type: ignore[no-untyped-def]
        if self.errors:
            raise OSError(self.errors.pop(0), "out of something")
        self.accepted += 1
        return object(), ("192.0.2.2", 1)

    def fileno(self) -> int:
        return 42


class FakePort:
    connected = True

    def __init__(self) -> None:
        self.socket = FakeListener()
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class AcceptPauserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.port = FakePort()
        self.listener = self.port.socket
        self.paused = 0
        self.pauser = AcceptPauser(
            self.port, self.clock, onPause=self.countPause, firstDelay=0.1, maxDelay=1.0,
            random=lambda: 0.5,
        )

    def countPause(self) -> None:
        self.paused += 1

    def test_pausesOnExhaustion(self) -> None:
        """
        EMFILE and ENFILE from accept() stop reading from the port (so the
        reactor does not spin on it) and look like an empty backlog; reading
        resumes after the back-off.
        """
        for error in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.listener.errors = [error]
            with self.assertRaises(BlockingIOError):
                self.port.socket.accept()
            self.assertFalse(self.port.reading)
            self.clock.advance(5)
            self.assertTrue(self.port.reading)
        self.assertEqual((self.pauser.pauses, self.paused), (4, 4))
        self.assertEqual(self.port.socket.fileno(), 42)

    def test_backOffGrowsWhileFailing(self) -> None:
        """
        Failures right after a resume double the pause, up to the maximum;
        with jitter 0.5 the pause is exactly the back-off.
        """
        delays = []
        for _ in range(6):
            self.listener.errors = [errno.EMFILE]
            self.assertRaises(BlockingIOError, self.port.socket.accept)
            [call] = self.clock.getDelayedCalls()
            delays.append(round(call.getTime() - self.clock.seconds(), 3))
            self.clock.advance(call.getTime() - self.clock.seconds())
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])

    def test_backOffResetsAfterRecovery(self) -> None:
        """
        Once accepting has worked for longer than the maximum back-off, the
        next pause is short again.
        """
        for _ in range(3):
            self.listener.errors = [errno.EMFILE]
            self.assertRaises(BlockingIOError, self.port.socket.accept)
            [call] = self.clock.getDelayedCalls()
            self.clock.advance(call.getTime() - self.clock.seconds())
        self.clock.advance(1.5)
        self.listener.errors = [errno.EMFILE]
        self.assertRaises(BlockingIOError, self.port.socket.accept)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - self.clock.seconds(), 0.1)

    def test_otherErrorsPassThrough(self) -> None:
        """
        Other accept() errors are the port's to handle, unchanged.
        """
        self.listener.errors = [errno.ECONNABORTED]
        with self.assertRaises(OSError) as caught:
            self.port.socket.accept()
        self.assertEqual(caught.exception.errno, errno.ECONNABORTED)
        self.assertTrue(self.port.reading)
        self.assertEqual(self.pauser.pauses, 0)


class ReopenLogFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "shifter.log")
        self.addCleanup(logs.useLogFile, None)

    def openAsTwistd(self):  # type: ignore[no-untyped-def]
        """
        The file as twistd's LogFile opens it: unbuffered, read-write, at
        its end.
        """
        f = open(self.path, "ab+", 0)
        self.addCleanup(f.close)
        return f

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def test_reopensAfterRotation(self) -> None:
        """
        After logrotate has moved the file, SIGHUP's reopen makes the same
        file object write to a new file at the path.
        """
        twistdFile = self.openAsTwistd()
        twistdFile.write(b"before\n")
        logs.useLogFile(self.path)
        logs.rememberOpenLogFile()
        os.rename(self.path, self.path + ".1")
        self.assertEqual(logs.reopenLogFiles(), 1)
        twistdFile.write(b"after\n")
        self.assertEqual(self.read(self.path), b"after\n")
        self.assertEqual(self.read(self.path + ".1"), b"before\n")

    def test_rotatedByTwistdFirst(self) -> None:
        """
        If twistd has rotated the file itself since (a new file at the
        path, open under a new descriptor), that one is found and reopened.
        """
        old = self.openAsTwistd()
        logs.useLogFile(self.path)
        logs.rememberOpenLogFile()
        old.close()
        os.rename(self.path, self.path + ".1")
        current = self.openAsTwistd()
        self.assertEqual(logs.reopenLogFiles(), 1)
        current.write(b"still here\n")
        self.assertEqual(self.read(self.path), b"still here\n")

    def test_notOpen(self) -> None:
        """
        With no log file, or one this process does not hold, nothing is
        reopened.
        """
        logs.useLogFile(None)
        self.assertEqual(logs.reopenLogFiles(), 0)
        logs.useLogFile(self.path)
        self.assertEqual(logs.reopenLogFiles(), 0)

    def test_twistdOptions(self) -> None:
        """
        The file twistd logs to follows its options.
        """
        for options, expected in [
            ({"logfile": "/var/log/s.log", "nodaemon": True}, "/var/log/s.log"),
            ({"logfile": "-", "nodaemon": True}, None),
            ({"logfile": None, "nodaemon": True}, None),
            ({"logfile": None, "nodaemon": False}, "twistd.log"),
            ({"logfile": "/var/log/s.log", "syslog": True}, None),
            ({"logfile": "/var/log/s.log", "logger": "shifter.logs.json"}, None),
        ]:
            self.assertEqual(logs.twistdLogFile(options), expected, options)
