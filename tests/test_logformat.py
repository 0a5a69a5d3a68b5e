"""
The service log's forms (C{--log-format}, L{shifter.logs}): JSON with
stable field names and none of Twisted's bookkeeping, journald's native
protocol sent to a datagram socket of the test's own, the fall back to
text without a journal, and the observer handed to twistd's application.
"""

from __future__ import annotations

import io
import json
import socket
import struct

from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher, jsonFileLogObserver
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.task import Clock
from twisted.logger import textFileLogObserver

from shifter import logs
from shifter.logs import (
    TEXT_FLUSH_DELAY,
    JournaldObserver,
    JsonObserver,
    TextObserver,
    eventAsDict,
    journalFields,
    logObserver,
)
from shifter.service.tap import LoggingService, Options, makeService
from tests.support import socketDirectory

# What Twisted's own JSON writes that says nothing about the event.
TWISTED_INTERNALS = ("log_flattened", "__class_uuid__", "unpersistable", "log_logger", "log_source", "log_format")


def tunnelEvent(level: LogLevel = LogLevel.warn, **more: object) -> dict:
    """
    A tunnel's failure line as the tunnel emits it, with a logger and a
    source that Twisted's JSON would flatten.
    """
    events: list[dict] = []

    class Tunnel:
        log = Logger(observer=events.append)

    facts: dict[str, object] = dict(
        client="192.0.2.2:50000", destination="203.0.113.7:443", proxy="127.0.0.1:3128",
        reason="proxy answered 403 Forbidden", tunnel="k7q2mx4d-1b", failure_kind="proxy-status", status=403,
    )
    facts.update(more)
    Tunnel().log.emit(level, "tunnel {client} -> {destination} via {proxy} failed: {reason} id={tunnel}", **facts)
    return events[0]


def parseJournal(data: bytes) -> dict[str, str]:
    """
    journald's native protocol: C{KEY=value} lines, or C{KEY}, a newline,
    a 64-bit little-endian length and that many bytes, then a newline.
    """
    fields = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            at = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            at = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


class JsonTests(SynchronousTestCase):
    def test_stableFields(self) -> None:
        """
        A tunnel's line is an object with time, level, namespace and
        message, and the line's own facts under their names; nothing of
        Twisted's (which its own JSON observer writes for the same event).
        """
        event = tunnelEvent()
        facts = eventAsDict(event)
        self.assertRegex(facts.pop("time"), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(facts, {
            "level": "warn",
            "namespace": "tests.test_logformat.Tunnel",
            "message": "tunnel 192.0.2.2:50000 -> 203.0.113.7:443 via 127.0.0.1:3128 failed: "
                       "proxy answered 403 Forbidden id=k7q2mx4d-1b",
            "client": "192.0.2.2:50000",
            "destination": "203.0.113.7:443",
            "proxy": "127.0.0.1:3128",
            "reason": "proxy answered 403 Forbidden",
            "tunnel": "k7q2mx4d-1b",
            "failure_kind": "proxy-status",
            "status": 403,
        })
        # The same event through Twisted's own JSON has its internals.
        twisted = io.StringIO()
        jsonFileLogObserver(twisted, recordSeparator="")(event)
        self.assertTrue(any(name in twisted.getvalue() for name in TWISTED_INTERNALS))

    def test_oneObjectPerLine(self) -> None:
        """
        The observer writes one JSON object per line, without Twisted's
        internals, whatever the fields hold (an object becomes its text).
        """
        stream = io.StringIO()
        observer = JsonObserver(stream)
        observer(tunnelEvent(source=object(), address=("192.0.2.2", 5)))
        observer(tunnelEvent())
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            facts = json.loads(line)
            self.assertEqual(facts["tunnel"], "k7q2mx4d-1b")
            for name in TWISTED_INTERNALS:
                self.assertNotIn(name, line)
        self.assertIsInstance(json.loads(lines[0])["source"], str)

    def test_failureAsTraceback(self) -> None:
        """
        An error's failure is its traceback, as text.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            event = tunnelEvent(log_failure=Failure())
        facts = eventAsDict(event)
        self.assertIn("ZeroDivisionError", facts["traceback"])
        self.assertNotIn("log_failure", facts)

    def test_legacyEvent(self) -> None:
        """
        An event from Twisted's legacy log (much of Twisted still logs
        so) has the same fields, none of the legacy ones.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        legacyLog.msg("legacy line", system="-")
        [event] = events
        facts = eventAsDict(event)
        self.assertEqual(facts["message"], "legacy line")
        self.assertEqual(set(facts), {"time", "level", "namespace", "message"})


class JournaldTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = str(socketDirectory(self) / "journal")
        self.journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.journal.bind(self.path)
        self.journal.settimeout(5)
        self.addCleanup(self.journal.close)

    def receive(self) -> dict[str, str]:
        return parseJournal(self.journal.recv(1 << 20))

    def test_nativeProtocol(self) -> None:
        """
        Each event is one datagram in journald's native protocol: the
        message, PRIORITY from the level (warning: 4), the identifier, and
        the fields as SHIFTER_*.
        """
        observer = JournaldObserver(self.path)
        self.addCleanup(observer.socket.close)
        observer(tunnelEvent())
        fields = self.receive()
        self.assertEqual(fields["MESSAGE"], "tunnel 192.0.2.2:50000 -> 203.0.113.7:443 via 127.0.0.1:3128 "
                                            "failed: proxy answered 403 Forbidden id=k7q2mx4d-1b")
        self.assertEqual(fields["PRIORITY"], "4")
        self.assertEqual(fields["SYSLOG_IDENTIFIER"], "shifter")
        self.assertEqual(fields["SHIFTER_CLIENT"], "192.0.2.2:50000")
        self.assertEqual(fields["SHIFTER_TUNNEL"], "k7q2mx4d-1b")
        self.assertEqual(fields["SHIFTER_FAILURE_KIND"], "proxy-status")
        self.assertEqual(fields["SHIFTER_STATUS"], "403")
        self.assertEqual(fields["SHIFTER_NAMESPACE"], "tests.test_logformat.Tunnel")
        for name in fields:
            self.assertRegex(name, r"^[A-Z][A-Z0-9_]*$")

    def test_priorities(self) -> None:
        """
        Each level has its syslog priority, so journalctl -p filters by it.
        """
        observer = JournaldObserver(self.path)
        self.addCleanup(observer.socket.close)
        log = Logger(observer=observer)
        for emit, priority in [
            (log.debug, "7"), (log.info, "6"), (log.warn, "4"), (log.error, "3"), (log.critical, "2"),
        ]:
            emit("a line")
            self.assertEqual(self.receive()["PRIORITY"], priority)

    def test_multilineValue(self) -> None:
        """
        A value with line breaks (a traceback) is sent in the binary form.
        """
        observer = JournaldObserver(self.path)
        self.addCleanup(observer.socket.close)
        try:
            1 / 0
        except ZeroDivisionError:
            observer(tunnelEvent(LogLevel.error, log_failure=Failure()))
        fields = self.receive()
        self.assertEqual(fields["PRIORITY"], "3")
        self.assertIn("\n", fields["SHIFTER_TRACEBACK"])
        self.assertIn("ZeroDivisionError", fields["SHIFTER_TRACEBACK"])

    def test_tooBig(self) -> None:
        """
        An event too big for one datagram is sent cut short, not lost.
        """
        observer = JournaldObserver(self.path)
        self.addCleanup(observer.socket.close)
        observer(tunnelEvent(reason="x" * (4 << 20)))
        fields = self.receive()
        self.assertTrue(fields["MESSAGE"].endswith(" [cut short]"))
        self.assertEqual(observer.dropped, 0)

    def test_encoding(self) -> None:
        """
        The whole datagram parses back to the fields sent.
        """
        data = journalFields(tunnelEvent(reason="line one\nline two"))
        fields = parseJournal(data)
        self.assertEqual(fields["SHIFTER_REASON"], "line one\nline two")

    def test_noJournal(self) -> None:
        """
        Without a journal socket, the log is text, and one line says so.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        observer = logObserver("journald", self.mktemp(), journalSocket=self.path + ".absent")
        self.assertNotIsInstance(observer, JournaldObserver)
        [event] = events
        self.assertEqual(
            formatEvent(event), f"--log-format journald: no journal socket at {self.path}.absent; logging as text"
        )

    def test_journalFound(self) -> None:
        """
        With the socket there, the observer is journald's.
        """
        observer = logObserver("journald", None, journalSocket=self.path)
        self.assertIsInstance(observer, JournaldObserver)
        observer.socket.close()  # type: ignore[attr-defined]


class CountingStream(io.StringIO):
    """
    A text stream that counts its flushes and keeps what was flushed apart
    from what waits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()


class TextObserverTests(SynchronousTestCase):
    """
    L{TextObserver} writes what twistd's text observer writes, with the
    pre-rendered tunnel line used as it is and lines buffered briefly.
    """

    def events(self) -> list[dict]:
        events: list[dict] = []
        logger = Logger(namespace="shifter.tunnel.tunnel.Tunnel", observer=events.append)
        logger.info("{tunnel_line}", tunnel_line="tunnel 192.0.2.2:50000 -> 203.0.113.7:443 via 127.0.0.1:3128 closed "
                    "(client): 10 bytes up, 20 bytes down, 0.004 s id=k7q2mx4d-1b", tunnel="k7q2mx4d-1b")
        logger.warn("proxy {proxy} down: {why}", proxy="127.0.0.1:3128", why="refused")
        logger.info("two lines:\nthe second")
        logger.info("{count} tunnels", count=3)
        logger.info("{tunnel_line}", tunnel_line=7)  # not text: Twisted renders it
        logger.emit(LogLevel.info, "from a worker", log_system="worker 0#info")
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("tunnel {tunnel} failed", Failure(), tunnel="k7q2mx4d-1c")
        return events

    def test_sameAsTwistd(self) -> None:
        """
        Every event is the line twistd's own text observer writes: time
        stamp, system, message, continuation lines and traceback alike.
        """
        ours, theirs = io.StringIO(), io.StringIO()
        observer, twistds = TextObserver(ours), textFileLogObserver(theirs)
        for event in self.events():
            observer(event)
            twistds(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("] tunnel 192.0.2.2:50000 -> 203.0.113.7:443 via", ours.getvalue())
        self.assertIn("ZeroDivisionError", ours.getvalue())

    def test_preRenderedLineNotFormatted(self) -> None:
        """
        A line logged as one text field is written as it is, without
        Twisted's formatter; any other event goes through it.
        """
        calls: list[dict] = []

        def formatter(event: dict, **kwargs: object) -> str:
            calls.append(event)
            return "formatted"

        self.patch(logs, "eventAsText", formatter)
        stream = io.StringIO()
        observer = TextObserver(stream)
        observer({"log_format": "{tunnel_line}", "tunnel_line": "a {brace} stays", "log_time": 0.0,
                  "log_namespace": "n", "log_level": LogLevel.info})
        self.assertEqual(calls, [])
        self.assertTrue(stream.getvalue().endswith(" [n#info] a {brace} stays\n"), stream.getvalue())
        observer({"log_format": "{count} tunnels", "count": 3, "log_time": 0.0,
                  "log_namespace": "n", "log_level": LogLevel.info})
        self.assertEqual(len(calls), 1)
        self.assertTrue(stream.getvalue().endswith(" [n#info] formatted\n"), stream.getvalue())

    def test_buffered(self) -> None:
        """
        With a reactor, info lines wait for its next turn (L{TEXT_FLUSH_DELAY})
        and are flushed together; a warning is flushed at once.
        """
        stream, clock = CountingStream(), Clock()
        observer = TextObserver(stream, clock)
        info, warning = self.events()[0], self.events()[1]
        observer(info)
        observer(info)
        self.assertEqual((stream.flushes, stream.flushed), (0, ""))
        clock.advance(TEXT_FLUSH_DELAY)
        self.assertEqual(stream.flushes, 1)
        self.assertEqual(stream.flushed.count("\n"), 2)
        observer(info)
        observer(warning)
        self.assertEqual(stream.flushes, 2)
        self.assertEqual(stream.flushed.count("\n"), 4)
        clock.advance(TEXT_FLUSH_DELAY)
        self.assertEqual(stream.flushes, 2, "the timer of the flushed line was cancelled")

    def test_unbufferedWhenNotRunning(self) -> None:
        """
        While the reactor is not running (before it starts, after it
        stops), each line is flushed as it comes: no later turn would.
        """
        stream, clock = CountingStream(), Clock()
        clock.running = False  # type: ignore[attr-defined]
        TextObserver(stream, clock)(self.events()[0])
        self.assertEqual(stream.flushes, 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class QuickLoggerTests(SynchronousTestCase):
    """
    L{logs.QuickLogger}, the tunnels' logger.
    """

    def test_sharedAndTwistedsEvents(self) -> None:
        """
        Every instance of the class that holds it reads the same logger,
        and its events are Twisted's: the namespace it was given, the
        level, the format and fields, a time, no source; Twisted renders
        them as its own.
        """
        from shifter.tunnel.tunnel import Tunnel

        class Holder:
            log = logs.QuickLogger("a.b.Holder")

        first, second = Holder(), Holder()
        self.assertIs(first.log, second.log)
        self.assertIs(Tunnel.log, Tunnel.__dict__["log"])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        first.log.warn("{what} happened", what="something")
        (event,) = events
        self.assertEqual(
            (event["log_namespace"], event["log_level"], event["log_format"], event["what"], event["log_source"]),
            ("a.b.Holder", LogLevel.warn, "{what} happened", "something", None),
        )
        self.assertIsInstance(event["log_time"], float)
        self.assertEqual(formatEvent(event), "something happened")


class ServiceTests(SynchronousTestCase):
    def test_applicationLogsThroughIt(self) -> None:
        """
        The service of --log-format json hands twistd's application its
        observer, which twistd then logs through; text, when not run by
        twistd, leaves the observer alone.
        """
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128", "--log-format", "json"])
        top = makeService(options)
        self.assertIsInstance(top, LoggingService)
        application = Application("shifter")
        top.setServiceParent(application)
        self.assertIsInstance(ILogObserver(application), JsonObserver)
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128"])
        application = Application("shifter")
        makeService(options).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))

    def test_textUnderTwistd(self) -> None:
        """
        Run by twistd, text too is Shifter's own observer, on the file
        twistd was told; with twistd's --syslog or --logger, twistd's own.
        """
        path = self.mktemp()
        for twistd, expected in [
            ({"logfile": path, "nodaemon": True}, TextObserver),
            ({"logfile": path, "nodaemon": True, "syslog": True}, None),
            ({"logfile": path, "nodaemon": True, "logger": "x.y"}, None),
        ]:
            options = Options()
            options.parseOptions(["--proxy", "127.0.0.1:3128"])
            options.parent = twistd  # type: ignore[attr-defined]
            application = Application("shifter")
            makeService(options).setServiceParent(application)
            observer = application.getComponent(ILogObserver)
            if expected is None:
                self.assertIsNone(observer, twistd)
            else:
                self.assertIsInstance(observer, expected)
                self.assertEqual(observer.stream.name, path)
                observer.stream.close()

    def test_refused(self) -> None:
        """
        An unknown form is refused, naming the option.
        """
        with self.assertRaises(Exception) as caught:
            Options().parseOptions(["--proxy", "127.0.0.1:3128", "--log-format", "xml"])
        self.assertEqual(str(caught.exception), "--log-format: expected one of text, json, journald, got 'xml'")
