"""
The access log (L{shifter.service.accesslog}) and tunnel ids
(L{shifter.tunnel.tunnelid}): formats, and the lines of real tunnels
through Shifter's factory on loopback (an opened tunnel, a proxy's 403, a
dead proxy, a refusal), the id on CONNECT, and reopening on SIGHUP.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from shifter.logs import ownFiles, reopenOnHangup
from shifter.service.accesslog import (
    DEFAULT_FORMAT,
    FIELDS,
    FLUSH_BYTES,
    FLUSH_SECONDS,
    AccessLogFormat,
    BufferedFile,
    SyslogWriter,
    openAccessLog,
)
from shifter.service.tap import Options, makeService
from shifter.tunnel.tunnel import TunnelRecord
from shifter.tunnel.tunnelid import TunnelIds
from tests.support import socketDirectory
from tests.test_lifecycle import LifecycleTestCase, drain

# Every field, "|" apart, to check each.
EVERY_FIELD = "|".join(f"{{{name}}}" for name in FIELDS)
ID = re.compile(r"^[a-z2-7]{8}-[a-z2-7]+$")
MS = re.compile(r"^\d+$")


def fields(line: str) -> dict[str, str]:
    return dict(zip(FIELDS, line.split("|")))


class AnsweringProxy(Protocol):
    """
    A CONNECT proxy that answers its factory's C{status}: 200 opens a
    tunnel that echoes, anything else is refused with that status.  It
    records each request's header block.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.open = False

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        self.factory.requests.append(head.decode("latin-1"))
        status = self.factory.status
        if status == 200:
            self.open = True
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + rest)
        else:
            self.transport.write(f"HTTP/1.1 {status} Forbidden\r\nContent-Length: 0\r\n\r\n".encode())
            self.transport.loseConnection()


class AnsweringProxyFactory(Factory):
    protocol = AnsweringProxy

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[str] = []


def record(**changes: Any) -> TunnelRecord:
    facts: dict[str, Any] = dict(
        tunnelId="k7q2mx4d-1b", started=1796652130.25, ended=1796652131.5, client="192.0.2.2:50000",
        destination="203.0.113.7:443", connectTarget="www.example.test:443", targetFrom="sni",
        name="www.example.test", proxy="127.0.0.1:3128", status=200, bytesUp=727, bytesDown=1252,
        result="ok", how="both sides closed", resolved=1796652130.251, sniffed=1796652130.262,
        connecting=1796652130.263, connected=1796652130.266, opened=1796652130.278,
        firstByte=1796652130.318,
    )
    facts.update(changes)
    return TunnelRecord(**facts)


class FormatTests(SynchronousTestCase):
    def test_ech(self) -> None:
        """
        The ech field says what the hello showed of ECH, or -.
        """
        form = AccessLogFormat("{ech} {name}")
        self.assertEqual(form.render(record(ech="ech", name="cover.example.test")), "ech cover.example.test")
        self.assertEqual(form.render(record()), "- www.example.test")

    def test_default(self) -> None:
        """
        The default line: start, duration, client, result/status, bytes,
        CONNECT and its target, how it was chosen, destination, proxy, the
        timers, the id and how it ended, quoted.
        """
        line = AccessLogFormat(DEFAULT_FORMAT).render(record())
        self.assertEqual(
            line,
            "2026-12-07T14:02:10.250Z 1250 192.0.2.2:50000 ok/200 727 1252 CONNECT www.example.test:443 sni "
            '203.0.113.7:443 127.0.0.1:3128 1/11/1/3/12/40 k7q2mx4d-1b "both sides closed"',
        )

    def test_missingStages(self) -> None:
        """
        What a tunnel never reached is C{-}: no proxy, no status, no timer.
        """
        line = AccessLogFormat("{proxy} {status} {connect_target} {timers} {name}").render(record(
            proxy="", status=None, connectTarget="", name=None, sniffed=None, connecting=None, connected=None,
            opened=None, firstByte=None,
        ))
        self.assertEqual(line, "- - - 1/-/-/-/-/- -")

    def test_custom(self) -> None:
        """
        A custom format has the fields it names, in its order, with its
        text and literal braces.
        """
        line = AccessLogFormat("{{{id}}} {start_epoch} {client}->{destination} {result}").render(record())
        self.assertEqual(line, "{k7q2mx4d-1b} 1796652130.250 192.0.2.2:50000->203.0.113.7:443 ok")

    def test_howCleaned(self) -> None:
        """
        Quotes and line breaks in how a tunnel ended cannot break the line.
        """
        line = AccessLogFormat('"{how}"').render(record(how='proxy said "no"\nnext'))
        self.assertEqual(line, "\"proxy said 'no' next\"")

    def test_refused(self) -> None:
        """
        An unknown field, a conversion or a spec, or a lone brace is refused
        with the reason; the option names itself.
        """
        for bad, reason in [
            ("{nope}", "unknown field {nope}"),
            ("{id!r}", "no conversion"),
            ("{duration:>8}", "no conversion or format spec"),
            ("{id", "brace"),
        ]:
            with self.assertRaises(ValueError) as caught:
                AccessLogFormat(bad)
            self.assertIn(reason, str(caught.exception))
        options = Options()
        with self.assertRaises(Exception) as caught:
            options.parseOptions(["--proxy", "127.0.0.1:3128", "--access-log-format", "{nope}"])
        self.assertIn("--access-log-format: unknown field {nope}", str(caught.exception))

    def test_everyFieldInReadme(self) -> None:
        """
        The README documents every field.
        """
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        self.assertEqual([name for name in FIELDS if f"| `{name}` |" not in readme], [])


class OptionTests(SynchronousTestCase):
    def test_wired(self) -> None:
        """
        --access-log opens its file before privileges are shed (twistd's
        privilegedStartService), for the factory; --tunnel-id-header names
        the header, none sends none; the default is Shifter-Tunnel.
        """
        path = Path(self.mktemp())
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128", "--access-log", str(path), "--tunnel-id-header", "X-Id"])
        service = makeService(options, reactor=MemoryReactorClock()).getServiceNamed("shifter")
        factory = service.factory
        self.assertEqual(factory.settings.tunnelIdHeader, "X-Id")
        self.assertIsNone(factory.accessLog)
        service.privilegedStartService()
        self.addCleanup(lambda: factory.accessLog and factory.accessLog.close())
        self.assertEqual(factory.accessLog.writer.path, str(path.resolve()))
        self.assertTrue(path.exists())
        for header, sent in [(None, "Shifter-Tunnel"), ("none", "")]:
            options = Options()
            options.parseOptions(["--proxy", "127.0.0.1:3128"] + (["--tunnel-id-header", header] if header else []))
            service = makeService(options, reactor=MemoryReactorClock()).getServiceNamed("shifter")
            self.assertEqual(service.factory.settings.tunnelIdHeader, sent)

    def test_configFile(self) -> None:
        """
        The configuration file takes access-log, access-log-format,
        tunnel-id-header and log-format as keys.
        """
        config = Path(self.mktemp())
        config.write_text(
            'proxy = ["127.0.0.1:3128"]\n'
            f'access-log = "{config}.access"\n'
            'access-log-format = "{id} {client}"\n'
            'tunnel-id-header = "X-Id"\n'
            'log-format = "json"\n'
        )
        options = Options()
        options.parseOptions(["--config", str(config)])
        self.assertEqual(
            (options["access-log"], options["access-log-format"], options["tunnel-id-header"], options["log-format"]),
            (f"{config}.access", "{id} {client}", "X-Id", "json"),
        )

    def test_refusedOptions(self) -> None:
        """
        An access log that cannot be opened, and a header name that is not
        one, are refused with the options, naming them.
        """
        for arguments, message in [
            (["--access-log", "/nonexistent/access.log"], "--access-log: '/nonexistent/access.log': no directory"),
            (["--access-log", "/"], "--access-log: '/' is a directory"),
            (["--tunnel-id-header", "Shifter Tunnel"], "--tunnel-id-header: expected a header name"),
            (["--tunnel-id-header", "X-Id:"], "--tunnel-id-header: expected a header name"),
        ]:
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions(["--proxy", "127.0.0.1:3128", *arguments])
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))


class BufferedFileTests(SynchronousTestCase):
    def test_buffered(self) -> None:
        """
        Lines are written a second after the first of them, in one write,
        or at once past 64 KiB; what is left is written at close.
        """
        clock = Clock()
        path = Path(self.mktemp())
        writer = BufferedFile(str(path), clock)
        writer.write("one")
        writer.write("two")
        self.assertEqual(path.read_text(), "")
        clock.advance(FLUSH_SECONDS)
        self.assertEqual(path.read_text(), "one\ntwo\n")
        big = "x" * FLUSH_BYTES
        writer.write(big)
        self.assertEqual(path.read_text(), f"one\ntwo\n{big}\n")
        writer.write("last")
        writer.close()
        self.assertTrue(path.read_text().endswith(f"{big}\nlast\n"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_writeFailureLogged(self) -> None:
        """
        A write that fails (the disk full) loses those lines with one line
        saying so, and writing goes on.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        writer = BufferedFile("/dev/full", clock)
        self.addCleanup(writer.close)
        writer.write("lost")
        clock.advance(FLUSH_SECONDS)
        [event] = events
        self.assertIn("access log /dev/full: No space left on device; lines lost", formatEvent(event))
        writer.write("lost too")
        clock.advance(FLUSH_SECONDS)
        self.assertEqual(len(events), 1)  # one line per minute
        writer.close()
        self.assertEqual(formatEvent(events[-1]), "1 more like it not logged in the last 60 s (access-log)")
        self.assertEqual(clock.getDelayedCalls(), [])


class SyslogWriterTests(SynchronousTestCase):
    def test_datagrams(self) -> None:
        """
        --access-log syslog sends each line as one datagram to the syslog
        socket (here one of the test's own): facility daemon, severity
        info, tag shifter with the pid; a socket that cannot take one drops
        it, counted, and never blocks.
        """
        path = str(socketDirectory(self) / "log")
        syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        syslog.bind(path)
        self.addCleanup(syslog.close)
        writer = SyslogWriter(path)
        self.addCleanup(writer.close)
        writer.write("k7q2mx4d-1b 192.0.2.2:50000 ok")
        self.assertEqual(syslog.recv(4096), f"<30>shifter[{os.getpid()}]: k7q2mx4d-1b 192.0.2.2:50000 ok".encode())
        for _ in range(10000):
            writer.write("x" * 1000)
            if writer.dropped:
                break
        self.assertEqual(writer.dropped, 1)


class TunnelIdTests(SynchronousTestCase):
    def test_unique(self) -> None:
        """
        Ids are short, of base32 letters, never repeated in a process, and
        two processes (two prefixes drawn) do not share them.
        """
        ids = TunnelIds()
        seen = {ids.next() for _ in range(5000)}
        self.assertEqual(len(seen), 5000)
        for one in seen:
            self.assertRegex(one, ID)
            self.assertLessEqual(len(one), 12)
        other = TunnelIds()
        self.assertNotEqual(other.prefix, ids.prefix)

    def test_forkedProcessDrawsAgain(self) -> None:
        """
        A process forked after ids were given (twistd's daemon) draws a
        prefix of its own.
        """
        ids = TunnelIds()
        first = ids.next()
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(writer, ids.next().encode())
            os._exit(0)
        os.close(writer)
        child = os.read(reader, 100).decode()
        os.close(reader)
        os.waitpid(pid, 0)
        self.assertRegex(child, ID)
        self.assertNotEqual(child.split("-")[0], first.split("-")[0])


class AccessLogTests(LifecycleTestCase):
    """
    The access-log line of real tunnels, every field checked.
    """

    @inlineCallbacks
    def startWith(  # type: ignore[no-untyped-def]
        self, status: int | None, format: str = EVERY_FIELD, accessLog: bool = True, **settings: Any
    ):
        """
        Shifter with an access log in this test's directory, through a
        proxy answering C{status}, or through a dead one if C{None}.
        """
        if status is None:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            proxyPort = sock.getsockname()[1]
            sock.close()  # nothing listens there now
            self.proxy = None
        else:
            self.proxy = AnsweringProxyFactory(status)
            port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.proxy)
            self.addCleanup(port.stopListening)
            proxyPort = port.getHost().port
        self.proxyLabel = f"127.0.0.1:{proxyPort}"
        settings.setdefault("tunnelIdHeader", "Shifter-Tunnel")
        yield self.startShifter([self.proxyLabel], **settings)
        if not accessLog:
            return
        self.path = self.directory / "access.log"
        self.accessLog = openAccessLog(str(self.path), format, reactor)
        self.factory.accessLog = self.accessLog
        self.addCleanup(self.accessLog.close)

    @inlineCallbacks
    def refusedClient(self, count: int = 1):  # type: ignore[no-untyped-def]
        """
        A client whose tunnel does not open: wait for its line to be
        rendered (the C{count}th), then check that its connection ended.
        """
        sock = self.client()
        yield self.waitUntil(lambda: self.accessLog.lines >= count, 10, "the tunnel to end")
        self.assertEqual(drain(sock), (b"", "eof"))
        return sock

    @inlineCallbacks
    def logLines(self, count: int = 1):  # type: ignore[no-untyped-def]
        """
        Wait until the access log holds C{count} lines (it is flushed
        within a second); return them.
        """
        yield self.waitUntil(
            lambda: self.path.exists() and self.path.read_text().count("\n") >= count, 10, "access-log lines"
        )
        return self.path.read_text().splitlines()

    def assertStart(self, line: dict[str, str], before: float, after: float) -> None:
        self.assertLessEqual(before - 0.001, float(line["start_epoch"]))
        self.assertLessEqual(float(line["start_epoch"]), after)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(line["start_epoch"])))
        self.assertTrue(line["start"].startswith(when), line["start"])
        self.assertRegex(line["start"], r"\.\d{3}Z$")
        self.assertRegex(line["duration"], MS)
        self.assertRegex(line["id"], ID)
        self.assertRegex(line["resolve"], MS)
        self.assertEqual(line["sniff"], "-")

    @inlineCallbacks
    def test_opened(self):  # type: ignore[no-untyped-def]
        """
        A tunnel that opened and ended in order: ok, the proxy's 200, the
        bytes delivered each way, every timer, and the id the proxy was
        sent in the Shifter-Tunnel header.
        """
        yield self.startWith(200)
        before = time.time()
        sock = self.client()
        sock.sendall(b"hello")
        echoed = yield self.receive(sock, 5)
        self.assertEqual(echoed, b"hello")
        sock.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel to end")
        after = time.time()
        [text] = yield self.logLines()
        line = fields(text)
        self.assertStart(line, before, after)
        self.assertEqual(line["client"], f"127.0.0.1:{sock.getsockname()[1]}")
        self.assertEqual(line["destination"], "203.0.113.7:443")
        self.assertEqual(line["connect_target"], "203.0.113.7:443")
        self.assertEqual(line["target_from"], "address")
        self.assertEqual(line["name"], "-")
        self.assertEqual(line["ech"], "-")
        self.assertEqual(line["proxy"], self.proxyLabel)
        self.assertEqual(line["status"], "200")
        self.assertEqual((line["bytes_up"], line["bytes_down"]), ("5", "5"))
        self.assertEqual(line["result"], "ok")
        self.assertIn("closed", line["how"])
        for timer in ("decide", "connect", "handshake", "first_byte"):
            self.assertRegex(line[timer], MS, timer)
        self.assertEqual(
            line["timers"],
            "/".join(line[t] for t in ("resolve", "sniff", "decide", "connect", "handshake", "first_byte")),
        )
        [request] = self.proxy.requests
        self.assertIn(f"\r\nShifter-Tunnel: {line['id']}", request)
        self.assertEqual(self.lines("closed ("), [])

    @inlineCallbacks
    def test_tunnelLineWithoutAccessLog(self):  # type: ignore[no-untyped-def]
        """
        Without an access log, a tunnel that opened has its line in the
        service log, ending with its id, the one its CONNECT carried.
        """
        yield self.startWith(200, accessLog=False)
        sock = self.client()
        sock.sendall(b"hi")
        self.assertEqual((yield self.receive(sock, 2)), b"hi")
        sock.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: self.lines("closed ("), 10, "the tunnel line")
        [closed] = self.lines("closed (")
        [request] = self.proxy.requests
        tunnelId = re.search(r"\r\nShifter-Tunnel: (\S+)", request).group(1)
        self.assertTrue(closed.endswith(f" id={tunnelId}"), closed)

    @inlineCallbacks
    def test_forbidden(self):  # type: ignore[no-untyped-def]
        """
        A 403 from the proxy: result proxy-status, status 403, nothing
        relayed, no handshake or first-byte time.
        """
        yield self.startWith(403)
        before = time.time()
        yield self.refusedClient()
        [text] = yield self.logLines()
        line = fields(text)
        self.assertStart(line, before, time.time())
        self.assertEqual(line["proxy"], self.proxyLabel)
        self.assertEqual(line["connect_target"], "203.0.113.7:443")
        self.assertEqual((line["result"], line["status"]), ("proxy-status", "403"))
        self.assertEqual((line["bytes_up"], line["bytes_down"]), ("0", "0"))
        self.assertEqual(line["how"], "proxy answered 403 Forbidden")
        self.assertRegex(line["connect"], MS)
        self.assertEqual((line["handshake"], line["first_byte"]), ("-", "-"))
        [request] = self.proxy.requests
        self.assertIn(f"\r\nShifter-Tunnel: {line['id']}", request)
        [failed] = self.lines("failed: proxy answered 403")
        self.assertTrue(failed.endswith(f" id={line['id']}"), failed)

    @inlineCallbacks
    def test_deadProxy(self):  # type: ignore[no-untyped-def]
        """
        A proxy nothing listens for: result proxy-connect, no status, no
        connection time.
        """
        yield self.startWith(None)
        yield self.refusedClient()
        [text] = yield self.logLines()
        line = fields(text)
        self.assertRegex(line["id"], ID)
        self.assertEqual(line["proxy"], self.proxyLabel)
        self.assertEqual((line["result"], line["status"]), ("proxy-connect", "-"))
        self.assertIn("cannot connect to proxy", line["how"])
        self.assertEqual([line[t] for t in ("connect", "handshake", "first_byte")], ["-", "-", "-"])
        self.assertRegex(line["resolve"], MS)

    @inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        """
        A destination Shifter refuses (its port is not an --allow-port):
        the refusal's reason, no proxy, no CONNECT, no status.
        """
        yield self.startWith(200, allowedPorts=frozenset({80}))
        yield self.refusedClient()
        [text] = yield self.logLines()
        line = fields(text)
        self.assertEqual(line["result"], "port-denied")
        self.assertEqual((line["proxy"], line["connect_target"], line["status"]), ("-", "-", "-"))
        self.assertEqual(line["how"], "destination port 443 is not an --allow-port")
        self.assertEqual(line["destination"], "203.0.113.7:443")
        self.assertEqual(line["timers"].split("/")[2:], ["-"] * 4)
        self.assertEqual(self.proxy.requests, [])

    @inlineCallbacks
    def test_customFormat(self):  # type: ignore[no-untyped-def]
        """
        A custom format gives exactly its fields.
        """
        yield self.startWith(403, format="{id} {result} {status}")
        yield self.refusedClient()
        [text] = yield self.logLines()
        tunnelId, result, status = text.split(" ")
        self.assertRegex(tunnelId, ID)
        self.assertEqual((result, status), ("proxy-status", "403"))

    @inlineCallbacks
    def test_noHeader(self):  # type: ignore[no-untyped-def]
        """
        With no tunnel-id header (--tunnel-id-header none), CONNECT carries
        no id.
        """
        yield self.startWith(403, tunnelIdHeader="")
        yield self.refusedClient()
        yield self.logLines()
        [request] = self.proxy.requests
        self.assertNotIn("shifter-tunnel", request.lower())

    @inlineCallbacks
    def test_reopenOnSignals(self):  # type: ignore[no-untyped-def]
        """
        After logrotate has moved the file, SIGHUP (and SIGUSR1) make the
        next lines go to a new file at the path; the moved file keeps
        what was written before.
        """
        yield self.startWith(403, format="{id}")
        # Whatever handlers other tests left behind are not called.
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            self.addCleanup(signal.signal, sig, signal.signal(sig, signal.SIG_IGN))
        restore = reopenOnHangup(reactor)
        self.addCleanup(restore)
        self.assertIn(self.accessLog, ownFiles)
        ids = []
        for number, sig in enumerate((signal.SIGHUP, signal.SIGUSR1)):
            yield self.refusedClient(number + 1)
            [line] = yield self.logLines()
            ids.append(line)
            rotated = self.directory / f"access.log.{number}"
            self.path.rename(rotated)
            os.kill(os.getpid(), sig)
            yield self.waitUntil(self.path.exists, 10, "a new access log")
            self.assertEqual(rotated.read_text(), line + "\n")
        yield self.refusedClient(3)
        [last] = yield self.logLines()
        self.assertNotIn(last, ids)
        self.assertEqual(len(self.lines("reopened 1 log files")), 2)
