"""
Tests for what bounds one client's cost: the rate-limited log line
(L{shifter.logs.RateLimitedLog}), the per-client connection count
(L{shifter.tunnel.limits.ClientLimit}) and its option.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from shifter.tunnel.limits import ClientLimit, clientKey
from shifter.logs import RateLimitedLog
from shifter.service.tap import Options, defaultMaxConnectionsPerClient
from tests.test_lifecycle import LifecycleTestCase


class RateLimitedLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.log = RateLimitedLog(Logger(namespace="test"), self.clock, interval=10)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_oneLinePerReasonPerInterval(self) -> None:
        """
        The first line of a reason is logged, the next ones in the interval
        are counted, and when it ends one line says how many were left out.
        """
        for client in range(5):
            self.log.warn("limit", "refused {client}: too many", client=client)
        self.assertEqual(self.lines(), ["refused 0: too many"])
        self.clock.advance(10)
        self.assertEqual(self.lines()[1], "4 more like it not logged in the last 10 s (limit)")
        self.assertEqual(self.events[1]["log_level"], LogLevel.warn)
        self.assertEqual(self.events[1]["suppressed"], 4)

    def test_reasonsApart(self) -> None:
        """
        Each reason has its own window.
        """
        self.assertTrue(self.log.warn("limit", "a"))
        self.assertTrue(self.log.warn("per-client", "b"))
        self.assertFalse(self.log.warn("limit", "c"))
        self.assertEqual(self.lines(), ["a", "b"])

    def test_quietWindowNoSummary(self) -> None:
        """
        A window with nothing left out ends without a line, and the next
        line is logged at once.
        """
        self.log.warn("limit", "first")
        self.clock.advance(10)
        self.assertTrue(self.log.warn("limit", "second"))
        self.assertEqual(self.lines(), ["first", "second"])

    def test_keysBounded(self) -> None:
        """
        Past the most keys at once, new keys share one window.
        """
        log = RateLimitedLog(Logger(), self.clock, interval=10, maxKeys=2)
        self.assertTrue(log.warn("a", "a"))
        self.assertTrue(log.warn("b", "b"))
        self.assertTrue(log.warn("c", "c"))
        self.assertFalse(log.warn("d", "d"))
        self.assertEqual(len(self.clock.getDelayedCalls()), 3)

    def test_stop(self) -> None:
        """
        Stopping says at once what was left out and leaves no timer.
        """
        self.log.warn("limit", "x")
        self.log.warn("limit", "x")
        self.log.stop()
        self.assertEqual(self.lines()[-1], "1 more like it not logged in the last 10 s (limit)")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @settings(max_examples=200)
    @given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 25)), max_size=60))
    def test_bounded(self, events: list[tuple[str, float]]) -> None:
        """
        However lines arrive, each key logs at most two lines per interval
        (its first, and a count), and every line is logged or counted.
        """
        clock = Clock()
        seen: list[dict] = []
        logger = Logger(observer=lambda event: seen.append(dict(event, at=clock.seconds())))
        log = RateLimitedLog(logger, clock, interval=10)
        for key, wait in events:
            clock.advance(wait)
            log.warn(key, "line")
        log.stop()
        logged = sum(1 for e in seen if "suppressed" not in e)
        counted = sum(e["suppressed"] for e in seen if "suppressed" in e)
        self.assertEqual(logged + counted, len(events))
        for key in "abc":
            times = [e["at"] for e in seen if e["rate_limit_key"] == key and "suppressed" not in e]
            self.assertTrue(all(b - a >= 10 - 1e-6 for a, b in zip(times, times[1:])), times)


class ClientLimitTests(SynchronousTestCase):
    def test_perClient(self) -> None:
        """
        Each client gets up to the limit; released connections make room.
        """
        limit = ClientLimit(2)
        self.assertTrue(limit.admit("192.0.2.2"))
        self.assertTrue(limit.admit("192.0.2.2"))
        self.assertFalse(limit.admit("192.0.2.2"))
        self.assertTrue(limit.admit("192.0.2.3"))
        limit.release("192.0.2.2")
        self.assertTrue(limit.admit("192.0.2.2"))
        for _ in range(2):
            limit.release("192.0.2.2")
        limit.release("192.0.2.3")
        self.assertEqual(limit.counts, {})

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 clients count by /64; IPv4-mapped ones by their IPv4 address.
        """
        self.assertEqual(clientKey("2001:db8:1:2::5"), "2001:db8:1:2::/64")
        self.assertEqual(clientKey("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64")
        self.assertEqual(clientKey("::ffff:192.0.2.2"), "192.0.2.2")
        limit = ClientLimit(1)
        self.assertTrue(limit.admit("2001:db8:1:2::5"))
        self.assertFalse(limit.admit("2001:db8:1:2::6"))
        self.assertTrue(limit.admit("2001:db8:1:3::6"))

    def test_noLimit(self) -> None:
        """
        A limit of 0 admits everyone, still counting.
        """
        limit = ClientLimit(0)
        self.assertTrue(all(limit.admit("192.0.2.2") for _ in range(1000)))
        self.assertEqual(limit.counts, {"192.0.2.2": 1000})


class OptionTests(SynchronousTestCase):
    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128", *arguments])
        return options

    def test_default(self) -> None:
        """
        By default a client may hold a quarter of --max-connections, at most
        1024 and at least 1.
        """
        self.assertEqual(self.parse("--max-connections", "400")["max-connections-per-client"], 100)
        self.assertEqual(self.parse("--max-connections", "100000")["max-connections-per-client"], 1024)
        self.assertEqual(self.parse("--max-connections", "2")["max-connections-per-client"], 1)
        self.assertEqual(defaultMaxConnectionsPerClient(10), 2)

    def test_values(self) -> None:
        """
        A number is taken as it is, 0 turns the limit off, and anything
        else stops Shifter with a usage error.
        """
        self.assertEqual(self.parse("--max-connections-per-client", "7")["max-connections-per-client"], 7)
        self.assertEqual(self.parse("--max-connections-per-client", "0")["max-connections-per-client"], 0)
        for bad in ("-1", "many", "1.5"):
            self.assertRaises(UsageError, self.parse, "--max-connections-per-client", bad)


class ConnectAndResetTests(LifecycleTestCase):
    CLIENTS = 200

    @inlineCallbacks
    def test_boundedLines(self):  # type: ignore[no-untyped-def]
        """
        200 clients that connect and reset at once, before their tunnels
        open: each is counted, and the log has a handful of lines for them
        (the first, then a count), not one each.
        """
        _, proxy = yield self.startProxy("echo")
        # Waiting for their first bytes (connect-target auto, a long sniff
        # timeout), none of them is tunnelled before it resets.
        yield self.startShifter(
            [proxy], listen="tcp:0:interface=127.0.0.1:backlog=1024", connectTarget="auto", sniffTimeout=60.0,
        )
        clients = [self.client() for _ in range(self.CLIENTS)]
        yield self.waitUntil(lambda: len(self.factory.active) == self.CLIENTS, 20, "every client accepted")
        for client in clients:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        yield self.waitUntil(
            lambda: self.factory.counters["client-gone"] == self.CLIENTS, 20, "every client gone"
        )
        lines = self.lines("tunnel 127.0.0.1:")
        self.assertLessEqual(len(lines), 5, lines[:3])
        self.assertEqual(len(self.lines("failed: client left before the tunnel opened")), 1)
        self.factory.refusals.stop()
        self.assertEqual(
            self.lines("more like it not logged"),
            [f"{self.CLIENTS - 1} more like it not logged in the last 10 s (client-gone)"],
        )
