"""
How tunnels end, with real sockets and the real reactor.

A L{StringTransport} cannot show a producer that never lets go, a TLS
layer that keeps delivering bytes after a close, or a socket the kernel
keeps open; these tests run Shifter's factory in this process on loopback,
with scripted CONNECT proxies (plain TCP and TLS) and clients made of plain
sockets, and check what the client receives and which descriptors are
left.  The original destination comes from a fixed resolver: what is under
test is the tunnel's life, not the kernel's redirect.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from pathlib import Path
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IResolverSimple
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.trial.unittest import TestCase

from shifter.tunnel.destinations import ProxyAddresses, alwaysKnown
from shifter.tunnel.downstream import ShifterFactory, TunnelSettings
from shifter.tunnel.policy import ITunnelPolicy
from shifter.upstream.pool import ProxyPool
from shifter.upstream.proxy import parseProxy
from shifter.resolvers.resolver import IOriginalDestinationResolver
from tests.gateway import makeCertificate

DESTINATION = IPv4Address("TCP", "203.0.113.7", 443)
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


@implementer(IOriginalDestinationResolver)
class FixedResolver:
    name = "fixed"

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def resolve(self, transport: object) -> IPv4Address:
        return DESTINATION


@implementer(IHalfCloseableProtocol)
class ScriptedProxy(Protocol):
    """
    A CONNECT proxy that does what its factory's C{script} says once the
    request's header block is in: C{"flood-reset"} answers 200, sends
    C{floodBytes} and resets; C{"send-end"} answers 200, sends
    C{floodBytes} and finishes sending; C{"send-close"} answers 200, sends
    C{floodBytes} and closes (over TLS, a clean close: close_notify);
    C{"send-truncate"}, over TLS, the same but closes TCP without
    close_notify;
    C{"slow-read"} answers 200, sends C{floodBytes}, and reads slowly,
    counting what it gets in C{factory.received}; C{"407-body"} answers 407 with a body, in
    two writes; C{"silent"} never answers; C{"wedged"} answers the health
    probe's CONNECT with a 403 and never answers the others; C{"echo"}
    answers 200 and echoes.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""
        self.answered = False

    def readConnectionLost(self) -> None:
        if self.factory.script == "answer-at-end":
            # The client has finished: now the answer, then the end.
            self.transport.write(b"z" * self.factory.floodBytes)
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.factory.lost.append(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            if self.factory.script == "echo":
                self.transport.write(data)
            elif self.factory.script == "slow-read":
                self._readSlowly(len(data))
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        self.answered = True
        script = self.factory.script
        isProbe = self.buffer.startswith(b"CONNECT 255.255.255.255:9 ")
        self.factory.timeline.append("probe" if isProbe else "client")
        if script == "wedged" and isProbe:
            # Its access rules still answer; its tunnels hang.
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        if script == "flood-reset":
            self.transport.write(OK + b"x" * self.factory.floodBytes)
            reactor.callLater(0.3, self.transport.abortConnection)
        elif script == "send-end":
            # All of it, then the end of what it sends (still reading, so
            # that no unread byte turns its close into a reset).
            self.transport.write(OK + b"y" * self.factory.floodBytes)
            self.transport.loseWriteConnection()
        elif script == "407-body":
            body = b"<html>SECRET 407 PAGE BODY</html>" * 20
            self.transport.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b"Proxy-Authenticate: Basic realm=\"test\"\r\n"
                b"Content-Length: " + str(2 * len(body)).encode() + b"\r\n\r\n" + body
            )
            reactor.callLater(0.05, self.transport.write, body)
        elif script == "send-close":
            self.transport.write(OK + b"y" * self.factory.floodBytes)
            self.transport.loseConnection()
        elif script == "send-truncate":
            # Over TLS: a FIN without close_notify (still reading, so
            # that no unread byte turns it into a reset).
            self.transport.write(OK + b"y" * self.factory.floodBytes)
            self.transport.transport.loseWriteConnection()
        elif script == "slow-read":
            # An answer the client may never read, and then slow reading.
            self.transport.write(OK + b"r" * self.factory.floodBytes)
            self._readSlowly(len(self.buffer.split(b"\r\n\r\n", 1)[1]))
        elif script == "answer-at-end":
            self.transport.write(OK)
        elif script == "echo":
            self.transport.write(OK)
            rest = self.buffer.split(b"\r\n\r\n", 1)[1]
            if rest:
                self.transport.write(rest)


    def _readSlowly(self, n: int) -> None:
        # One read, then a pause: the tunnel's bytes pile up in Shifter.
        self.factory.received += n
        self.transport.pauseProducing()
        reactor.callLater(0.005, self.transport.resumeProducing)


class ScriptedProxyFactory(Factory):
    protocol = ScriptedProxy

    def __init__(self, script: str, floodBytes: int = 8 << 20) -> None:
        self.script = script
        self.floodBytes = floodBytes
        self.connections = 0
        self.received = 0
        self.lost: list[Any] = []
        # What each CONNECT was, in order: "probe" (the health probe's
        # target) or "client"; a test may share the list with other
        # records.
        self.timeline: list[Any] = []


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class LifecycleTestCase(TestCase):
    """
    Shifter's factory listening on loopback, proxies started on demand.
    """

    timeout = 60

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.directory = Path(self.mktemp())
        self.directory.mkdir(parents=True)

    @inlineCallbacks
    def startProxy(self, script: str, tls: bool = False, receiveBuffer: int = 0):  # type: ignore[no-untyped-def]
        factory = ScriptedProxyFactory(script)
        if tls:
            key, cert = makeCertificate(self.directory, names=("IP:127.0.0.1",))
            self.proxyCA = str(cert)
            description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        else:
            description = "tcp:0:interface=127.0.0.1"
        port = yield serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        if receiveBuffer:
            # Accepted connections take the listening socket's buffer size.
            port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
        scheme = "https" if tls else "http"
        return factory, f"{scheme}://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def startShifter(  # type: ignore[no-untyped-def]
        self, proxies: list[str], policy: Any = None, listen: str = "tcp:0:interface=127.0.0.1", **settings: Any
    ):
        parsed = [parseProxy(p, reactor, caFile=getattr(self, "proxyCA", None)) for p in proxies]
        backoff = settings.pop("backoff", 10.0)
        failures = settings.pop("failures", 3)
        tunnelSettings = TunnelSettings(**settings)
        self.pool = ProxyPool(
            parsed, reactor, failureThreshold=failures, downFor=backoff, maxDownFor=30 * backoff,
            connectTimeout=tunnelSettings.connectTimeout, handshakeTimeout=tunnelSettings.handshakeTimeout,
        )
        self.factory = ShifterFactory(FixedResolver(), self.pool, tunnelSettings, reactor, policy)
        if hasattr(self, "proxyAddresses"):
            self.factory.proxyAddresses = self.proxyAddresses(self.pool.proxies)
        yield self.factory.proxyAddresses.readLocal()  # as the service does before it listens
        port = yield serverFromString(reactor, listen).listen(self.factory)
        self.factory.listeningAddress = port.getHost()

        @inlineCallbacks
        def stop():  # type: ignore[no-untyped-def]
            yield port.stopListening()
            yield self.factory.closeAll()
            self.pool.stop()
            self.factory.deadlines.stop()

        self.addCleanup(stop)
        self.shifterPort = port.getHost().port

    def client(self, receiveBuffer: int = 0) -> socket.socket:
        sock = socket.socket()
        if receiveBuffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
        sock.connect(("127.0.0.1", self.shifterPort))
        self.addCleanup(sock.close)
        return sock

    @inlineCallbacks
    def waitUntil(self, predicate: Callable[[], object], seconds: float, what: str):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"not within {seconds} s: {what}")
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def receive(self, sock: socket.socket, size: int, seconds: float = 10.0):  # type: ignore[no-untyped-def]
        """
        Wait, letting the reactor run, until C{size} bytes can be read from
        C{sock}; read them.
        """

        def ready() -> bool:
            try:
                return len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= size
            except BlockingIOError:
                return False

        yield self.waitUntil(ready, seconds, f"{size} bytes for the client")
        return sock.recv(size)

    def lines(self, *fragments: str) -> list[str]:
        found = []
        for event in self.events:
            text = formatEvent(event)
            if all(fragment in text for fragment in fragments):
                found.append(text)
        return found


def drain(sock: socket.socket, seconds: float = 5.0) -> tuple[bytes, str]:
    """
    Read what C{sock} has until its end; return the bytes and how it ended
    (C{"eof"}, C{"reset"} or C{"timeout"}).
    """
    sock.settimeout(seconds)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks), "eof"
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    except socket.timeout:
        return b"".join(chunks), "timeout"


class SlowReaderTests(LifecycleTestCase):
    """
    A client that stops reading while the proxy floods it and then resets:
    Shifter's side of the client connection holds unsent bytes and a
    producer that would keep it open; the closing grace ends it.
    """

    @inlineCallbacks
    def assertReleased(self, tls: bool, relay: str):  # type: ignore[no-untyped-def]
        proxyFactory, proxy = yield self.startProxy("flood-reset", tls=tls)
        yield self.startShifter([proxy], relay=relay, idleTimeout=2.0, closeGrace=0.5)
        # A turn of the reactor first: starting to run opens descriptors of
        # its own.
        yield deferLater(reactor, 0, lambda: None)
        baseline = descriptors()
        client = self.client(receiveBuffer=4096)
        client.sendall(b"hello")
        yield self.waitUntil(lambda: self.factory.counters["opened"] == 1, 10, "the tunnel to open")
        # Idle timeout plus grace, and some slack: the client never reads.
        yield self.waitUntil(lambda: not self.factory.active, 2.0 + 0.5 + 3.0, "the tunnel to be gone")
        yield deferLater(reactor, 0.2, lambda: None)
        # Shifter holds nothing for this client any more: only the test's
        # own client socket is left over the baseline.
        self.assertEqual(descriptors(), baseline + 1)
        self.assertEqual(self.factory.counters["closed"], 1)
        data, how = drain(client)
        self.assertIn(how, ("eof", "reset"))
        self.assertEqual(set(data), {ord("x")} if data else set())

    def test_twistedRelay(self):  # type: ignore[no-untyped-def]
        """
        With the Twisted relay over plain TCP, the client connection is
        dropped once the closing grace runs out, and every descriptor is
        back.
        """
        return self.assertReleased(tls=False, relay="twisted")

    def test_tlsProxy(self):  # type: ignore[no-untyped-def]
        """
        The same through an https:// proxy (the Twisted relay over TLS).
        """
        return self.assertReleased(tls=True, relay="auto")

    def test_spliceRelay(self):  # type: ignore[no-untyped-def]
        """
        The same with the splice relay.
        """
        return self.assertReleased(tls=False, relay="splice")


class DeliveryTests(LifecycleTestCase):
    @inlineCallbacks
    def assertAllDelivered(self, relay: str):  # type: ignore[no-untyped-def]
        proxyFactory, proxy = yield self.startProxy("send-end")
        proxyFactory.floodBytes = 4 << 20
        yield self.startShifter([proxy], relay=relay)
        client = self.client(receiveBuffer=8192)
        client.sendall(b"hello")
        client.setblocking(False)
        received = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = client.recv(1 << 16)
            except BlockingIOError:
                yield deferLater(reactor, 0.01, lambda: None)
                continue
            if not chunk:
                break
            received += len(chunk)
        self.assertEqual(received, 4 << 20)
        client.close()
        yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel to end")
        self.assertEqual(len(self.lines("closed (", f"{4 << 20} bytes down")), 1)

    def test_splice(self):  # type: ignore[no-untyped-def]
        """
        Everything a proxy sent before finishing reaches a slow client
        through the splice relay, to the last byte, and then the end.
        """
        return self.assertAllDelivered("splice")

    def test_twisted(self):  # type: ignore[no-untyped-def]
        """
        The same through the Twisted relay.
        """
        return self.assertAllDelivered("twisted")

    @inlineCallbacks
    def test_answerAfterHalfClose(self):  # type: ignore[no-untyped-def]
        """
        A client that finishes sending first, then reads slowly: the answer
        its server sends after that end, and then its own end, all reach
        the client although the relay is done before the client has read
        them (they wait in the kernel, and closing must not throw them
        away).
        """
        proxyFactory, proxy = yield self.startProxy("answer-at-end")
        proxyFactory.floodBytes = 64 << 10
        yield self.startShifter([proxy], relay="splice")
        client = self.client(receiveBuffer=8192)
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: self.factory.counters["closed"] == 1, 10, "the relay to finish")
        yield deferLater(reactor, 0.1, lambda: None)
        data, how = drain(client)
        self.assertEqual((len(data), how), (64 << 10, "eof"))

    @inlineCallbacks
    def test_endedBothWaysClosesAtOnce(self):  # type: ignore[no-untyped-def]
        """
        Once the splice relay has passed on both ends, each connection is
        closed then and there: neither Twisted transport registers with the
        reactor again (to read an end the relay has already read, or to
        find it has nothing to write), the tunnel finishes without a closing
        grace, and the client's close is orderly, with everything delivered.
        """
        proxyFactory, proxy = yield self.startProxy("answer-at-end")
        proxyFactory.floodBytes = 1000
        yield self.startShifter([proxy], relay="splice")
        client = self.client()
        client.sendall(b"hello")
        yield self.waitUntil(lambda: self.factory.openTunnels == 1, 10, "the tunnel to open")
        (tunnel,) = self.factory.active
        transports = (tunnel.client.transport, tunnel.attempt.transport)
        registered: list[Any] = []
        for name in ("addReader", "addWriter"):
            def record(selectable: Any, original: Any = getattr(reactor, name)) -> None:
                registered.append(selectable)
                original(selectable)
            self.patch(reactor, name, record)
        deadlines: list[float | None] = []
        setDeadline = self.factory.deadlines.set
        self.patch(self.factory.deadlines, "set", lambda item, when: (deadlines.append(when), setDeadline(item, when)))
        client.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: self.factory.counters["closed"] == 1, 10, "the tunnel to close")
        self.assertEqual([t for t in registered if t in transports], [])
        # Finished while closing: no closing grace to wait for.
        self.assertEqual(deadlines, [None])
        data, how = drain(client)
        self.assertEqual((data, how), (b"z" * 1000, "eof"))
        self.assertEqual([bool(t.disconnected) for t in transports], [True, True])


def unsentBytes(sock: socket.socket) -> int:
    """
    Bytes C{sock} has sent that its peer's kernel has not acknowledged yet.
    """
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class LingeringCloseTests(LifecycleTestCase):
    """
    A tunnel that ends because one side is gone first delivers what
    Shifter has accepted from that side, and closes the other side only
    once it has read that side's end: closing a socket with unread bytes
    resets it, and a reset throws away what the peer has not read yet.
    """

    @inlineCallbacks
    def assertUploadDelivered(self, relay: str):  # type: ignore[no-untyped-def]
        size = 2 << 20
        proxyFactory, proxy = yield self.startProxy("slow-read", receiveBuffer=16384)
        proxyFactory.floodBytes = 8 << 20
        yield self.startShifter([proxy], relay=relay, closeGrace=20.0)
        client = self.client(receiveBuffer=8192)
        client.sendall(b"u")
        yield self.waitUntil(lambda: self.factory.counters["opened"], 10, "the tunnel to open")
        # A small send buffer towards the proxy, so that the client's bytes
        # wait in Shifter's socket for the client, not in the kernel's
        # buffers towards the proxy, where nothing can lose them.
        [tunnel] = self.factory.active
        tunnel.attempt.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        client.setblocking(False)
        data = memoryview(b"u" * size)
        sent = 1
        deadline = time.monotonic() + 30
        # Everything sent and acknowledged by the gateway's kernel, while
        # the proxy has read only part of it.
        while sent < size or unsentBytes(client):
            self.assertLess(time.monotonic(), deadline, "the upload to be acknowledged")
            if sent < size:
                try:
                    sent += client.send(data[sent:])
                except BlockingIOError:
                    pass
            yield deferLater(reactor, 0.001, lambda: None)
        self.assertLess(proxyFactory.received, size)
        # Then a reset, as a client that gives up does.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        yield self.waitUntil(lambda: not self.factory.active, 30, "the tunnel to end")
        yield self.waitUntil(lambda: proxyFactory.lost, 10, "the proxy connection to end")
        self.assertEqual(proxyFactory.received, size)
        self.assertTrue(proxyFactory.lost[0].check(ConnectionDone), proxyFactory.lost[0])
        # Counted as delivered, every byte (what was on its way to the
        # client when it reset, if anything, is counted as dropped).
        [line] = self.lines("closed (")
        self.assertIn(f"{size} bytes up,", line)
        self.assertNotIn("bytes up dropped", line)

    def test_uploadBeforeResetSplice(self):  # type: ignore[no-untyped-def]
        """
        A client that uploads 2 MiB and resets while the proxy reads
        slowly: every byte the gateway acknowledged reaches the proxy
        through the splice relay, and the tunnel line counts them.
        """
        return self.assertUploadDelivered("splice")

    def test_uploadBeforeResetTwisted(self):  # type: ignore[no-untyped-def]
        """
        The same through the Twisted relay.
        """
        return self.assertUploadDelivered("twisted")

    @inlineCallbacks
    def assertDownloadDelivered(self, script: str):  # type: ignore[no-untyped-def]
        """
        An https:// proxy sends 8 MiB and ends as C{script} says while the
        client reads slowly and, once the proxy's end has reached Shifter,
        writes a few bytes (a pipelined request): the client gets all 8 MiB,
        then the end.

        @return: the tunnel line.
        """
        size = 8 << 20
        proxyFactory, proxy = yield self.startProxy(script, tls=True)
        proxyFactory.floodBytes = size
        yield self.startShifter([proxy], closeGrace=20.0)
        client = self.client(receiveBuffer=8192)
        client.sendall(b"hello")
        client.setblocking(False)
        received = 0
        wroteLate = False
        how = "timeout"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not wroteLate and self.factory.counters["opened"] and not any(
                t.state == "relaying" for t in self.factory.active
            ):
                # The proxy's end has reached Shifter: now a pipelined
                # request, which Shifter must read to close cleanly.
                client.send(b"GET /next HTTP/1.1\r\n\r\n")
                wroteLate = True
            try:
                chunk = client.recv(4096)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
                continue
            except ConnectionResetError:
                how = "reset"
                break
            if not chunk:
                how = "eof"
                break
            received += len(chunk)
            yield deferLater(reactor, 0, lambda: None)
        self.assertTrue(wroteLate)
        self.assertEqual((received, how), (size, "eof"))
        client.close()
        yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel to end")
        [line] = self.lines("closed (")
        self.assertIn(f"{size} bytes down,", line)
        self.assertNotIn("dropped", line)
        return line

    @inlineCallbacks
    def test_tlsProxyCleanCloseDelivered(self):  # type: ignore[no-untyped-def]
        """
        An https:// proxy that sends 8 MiB and closes cleanly (close_notify)
        while the client writes a few bytes late: the client gets all 8 MiB,
        and the tunnel ended as the proxy's end, not a loss.
        """
        line = yield self.assertDownloadDelivered("send-close")
        self.assertIn("closed (proxy closed)", line)

    @inlineCallbacks
    def test_tlsCloseAfterClientEnd(self):  # type: ignore[no-untyped-def]
        """
        A client that finishes sending, through an https:// proxy that
        answers and then closes cleanly: the proxy's clean TLS close is its
        end of the tunnel, so both sides have ended, nothing was lost.
        """
        proxyFactory, proxy = yield self.startProxy("echo", tls=True)
        yield self.startShifter([proxy])
        client = self.client()
        client.sendall(b"ping")
        self.assertEqual((yield self.receive(client, 4)), b"ping")
        client.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel to end")
        self.assertEqual(drain(client), (b"", "eof"))
        self.assertEqual(len(self.lines("closed (both sides closed)")), 1)

    @inlineCallbacks
    def test_tlsProxyTruncationDelivered(self):  # type: ignore[no-untyped-def]
        """
        An https:// proxy whose TCP connection ends without close_notify (a
        truncation) is a loss, but what it sent before is delivered all the
        same.
        """
        line = yield self.assertDownloadDelivered("send-truncate")
        self.assertIn("closed (proxy connection lost", line)


class RefusalTests(LifecycleTestCase):
    @inlineCallbacks
    def test_407BodyOverTLSNeverReachesClient(self):  # type: ignore[no-untyped-def]
        """
        A 407 through a TLS proxy, whose page body arrives with the answer
        and after it: the client gets nothing at all, only the end of its
        connection, and the log has one line for it.
        """
        _, proxy = yield self.startProxy("407-body", tls=True)
        yield self.startShifter([proxy])
        client = self.client()
        client.sendall(b"\x16\x03\x01hello")
        yield self.waitUntil(lambda: self.factory.counters["proxy-auth"] == 1, 10, "the 407")
        data, how = yield deferLater(reactor, 0.2, drain, client, 2.0)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(len(self.lines("failed", "407")), 1)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)


class HalfCloseTests(LifecycleTestCase):
    @inlineCallbacks
    def test_halfCloseOverTLSIsATLSClose(self):  # type: ignore[no-untyped-def]
        """
        A client that finishes sending, through a TLS proxy: the proxy sees
        the TLS layer's close (close_notify), a clean end, not a bare FIN
        under TLS, which it could not tell from a truncation.
        """
        proxyFactory, proxy = yield self.startProxy("echo", tls=True)
        yield self.startShifter([proxy])
        client = self.client()
        client.sendall(b"ping")
        self.assertEqual((yield self.receive(client, 4)), b"ping")
        client.shutdown(socket.SHUT_WR)
        yield self.waitUntil(lambda: proxyFactory.lost, 10, "the proxy to see the end")
        self.assertTrue(proxyFactory.lost[0].check(ConnectionDone), proxyFactory.lost[0])
        yield self.waitUntil(lambda: not self.factory.active, 10, "the tunnel to end")
        self.assertEqual(len(self.lines("closed (both sides closed)")) + len(self.lines("closed (proxy closed)")), 1)


@implementer(ITunnelPolicy)
class RaisingPolicy:
    def decide(self, request: object) -> None:
        raise RuntimeError("the policy has a bug")


@implementer(ITunnelPolicy)
class NeverPolicy:
    def decide(self, request: object) -> Deferred:
        return Deferred()


class PolicyFailureTests(LifecycleTestCase):
    @inlineCallbacks
    def test_raisingPolicy(self):  # type: ignore[no-untyped-def]
        """
        A policy that raises ends the client with one line and the
        C{policy} counter; no proxy is asked.
        """
        proxyFactory, proxy = yield self.startProxy("echo")
        yield self.startShifter([proxy], policy=RaisingPolicy())
        client = self.client()
        yield self.waitUntil(lambda: self.factory.counters["policy"] == 1, 10, "the policy failure")
        data, how = yield deferLater(reactor, 0.1, drain, client, 2.0)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(len(self.lines("failed", "policy error: the policy has a bug")), 1)
        self.assertEqual(proxyFactory.connections, 0)
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_neverFiringPolicy(self):  # type: ignore[no-untyped-def]
        """
        A policy whose answer never comes holds the client only until the
        set-up deadline, then ends it with one line.
        """
        _, proxy = yield self.startProxy("echo")
        yield self.startShifter([proxy], policy=NeverPolicy(), setupTimeout=1.0)
        client = self.client()
        yield self.waitUntil(lambda: self.factory.counters["setup-timeout"] == 1, 5, "the set-up deadline")
        data, how = yield deferLater(reactor, 0.1, drain, client, 2.0)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(len(self.lines("failed", "not set up within 1 s (was deciding)")), 1)
        self.assertEqual(self.factory.counters["setup-timeout"], 1)


class SilentProxyTests(LifecycleTestCase):
    @inlineCallbacks
    def test_markedDownAfterHandshakeTimeouts(self):  # type: ignore[no-untyped-def]
        """
        A proxy that accepts and never answers fails each client's
        handshake; those clients are carried by the next proxy.  After
        C{--proxy-failures} such timeouts it is marked down, and the next
        client goes to the next proxy without trying it.
        """
        silentFactory, silent = yield self.startProxy("silent")
        echoFactory, echo = yield self.startProxy("echo")
        yield self.startShifter([silent, echo], failures=2, handshakeTimeout=0.5)
        for n in range(3):
            client = self.client()
            client.sendall(b"ping %d" % n)
            data = yield self.receive(client, 6)
            self.assertEqual(data, b"ping %d" % n)
            client.close()
        self.assertEqual(silentFactory.connections, 2)
        self.assertEqual(echoFactory.connections, 3)
        self.assertFalse(self.pool.health[self.pool.proxies[0]].up)
        self.assertEqual(len(self.lines("marked down", "did not answer CONNECT within 0.5 s")), 1)


class DeadlineOrderTests(LifecycleTestCase):
    @inlineCallbacks
    def test_silentClientBesideReArmingIdleCheck(self):  # type: ignore[no-untyped-def]
        """
        A silent client's set-up deadline falls just after a busy tunnel's
        idle check, which re-arms that tunnel's idle deadline an idle
        timeout later: the silent client is closed at its own deadline,
        while the busy tunnel still carries bytes (its re-armed deadline,
        which would close it for idleness, has not come), not held until
        that far deadline fires.
        """
        _, proxy = yield self.startProxy("echo")
        # With connect-target auto, a client that sends nothing waits for
        # its first bytes until the set-up deadline (the sniff timeout is
        # longer); "ping" is no handshake, so the busy client's tunnel opens
        # at once.
        yield self.startShifter(
            [proxy], connectTarget="auto", sniffTimeout=60.0, setupTimeout=0.5, idleTimeout=3.0,
        )
        busy = self.client()
        busy.sendall(b"ping")
        self.assertEqual((yield self.receive(busy, 4)), b"ping")
        opened = time.monotonic()
        # Bytes keep the busy tunnel from idling; its first idle check
        # comes 3 s after it opened and re-arms for 3 s after the last.
        while time.monotonic() - opened < 2.6:
            yield deferLater(reactor, 0.2, lambda: None)
            busy.sendall(b"ping")
            self.assertEqual((yield self.receive(busy, 4)), b"ping")
        # Its set-up deadline half a second from now: after the busy
        # tunnel's idle check, before its re-armed deadline.
        silent = self.client()
        busy.sendall(b"ping")
        self.assertEqual((yield self.receive(busy, 4)), b"ping")
        yield self.waitUntil(lambda: self.factory.counters["setup-timeout"] == 1, 10, "the set-up deadline")
        # The busy tunnel is still open: its idle deadline, the one the
        # silent client must not wait for, has not fired.
        busy.sendall(b"pong")
        self.assertEqual((yield self.receive(busy, 4)), b"pong")
        self.assertEqual(self.factory.counters["closed"], 0)
        data, how = drain(silent, 2.0)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(len(self.lines("failed", "not set up within 0.5 s (was sniffing)")), 1)


class BackOffTests(LifecycleTestCase):
    """
    Proxies [bad, good], failover, a short handshake timeout and back-off:
    clients one after another while the bad proxy goes down and is probed
    several times.
    """

    timeout = 120

    @inlineCallbacks
    def runClients(self, script: str, downPeriods: int):  # type: ignore[no-untyped-def]
        """
        Start the two proxies and Shifter, then send clients three at a
        time, each echoed by the good proxy in the end, until the bad proxy
        has been marked down C{downPeriods} times.

        @return: the bad proxy's timeline: "client" and "probe" for each
            CONNECT it got, and the seconds of each "marked down" line, in
            the order they came.
        """
        badFactory, bad = yield self.startProxy(script)
        _, good = yield self.startProxy("echo")
        timeline = badFactory.timeline

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_format", "").startswith("proxy {proxy} marked down") and event["proxy"] == bad[7:]:
                timeline.append(event["seconds"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        yield self.startShifter([bad, good], failures=2, handshakeTimeout=0.3, backoff=0.3)
        deadline = time.monotonic() + 60
        n = 0
        while sum(isinstance(entry, float) for entry in timeline) < downPeriods:
            self.assertLess(time.monotonic(), deadline, f"not marked down {downPeriods} times: {timeline}")
            batch = []
            for _ in range(3):
                client = self.client()
                message = b"ping %d" % n
                client.sendall(message)
                batch.append((client, message))
                n += 1
            for client, message in batch:
                data = yield self.receive(client, len(message))
                self.assertEqual(data, message)
                client.close()
            yield deferLater(reactor, 0.02, lambda: None)
        return timeline

    def clientsPerBackOff(self, timeline: list[Any]) -> list[int]:
        """
        How many clients the bad proxy got after each time it was marked
        down, before the next.
        """
        counts: list[int] = []
        for entry in timeline:
            if isinstance(entry, float):
                counts.append(0)
            elif entry == "client" and counts:
                counts[-1] += 1
        return counts

    @inlineCallbacks
    def test_hungProxyStaysDown(self):  # type: ignore[no-untyped-def]
        """
        A proxy that accepts connections and never answers fails every
        probe: after it is marked down no client waits for it again, and
        each down period is twice the last.
        """
        timeline = yield self.runClients("silent", downPeriods=4)
        downs = [entry for entry in timeline if isinstance(entry, float)]
        self.assertEqual(downs[:4], [0.3, 0.6, 1.2, 2.4])
        self.assertEqual(self.clientsPerBackOff(timeline)[:4], [0, 0, 0, 0], timeline)
        self.assertEqual(set(timeline[:timeline.index(0.3)]), {"client"}, timeline)
        self.assertGreaterEqual(timeline.count("probe"), 3)
        self.assertTrue(self.lines("probe CONNECT 255.255.255.255:9 failed: no answer to CONNECT within 0.3 s"))

    @inlineCallbacks
    def test_wedgedProxyOneCanaryPerBackOff(self):  # type: ignore[no-untyped-def]
        """
        A proxy that answers the probe (its access rules refuse the probe
        target) but never answers a tunnel's CONNECT comes back after each
        back-off, on trial: one client, its canary, waits for it, the
        others go to the good proxy, and the canary's failure marks it
        down again for twice as long.
        """
        timeline = yield self.runClients("wedged", downPeriods=4)
        downs = [entry for entry in timeline if isinstance(entry, float)]
        self.assertEqual(downs[:4], [0.3, 0.6, 1.2, 2.4])
        self.assertEqual(self.clientsPerBackOff(timeline)[:3], [1, 1, 1], timeline)
        self.assertEqual(len(self.lines("marked down", "its canary tunnel failed")), len(downs) - 1)


class CountingNames:
    """
    A C{twisted.names} resolver for L{ProxyAddresses}: C{proxy.test} is
    127.0.0.1 (no IPv6 address), each look-up counted; with C{hold}, no
    look-up ever answers.
    """

    def __init__(self) -> None:
        self.lookups: list[tuple[str, str]] = []
        self.hold = False

    def _answer(self, kind: str, name: str, records: list[Any]) -> Deferred:
        self.lookups.append((kind, name))
        if self.hold:
            return Deferred()
        return succeed((records, [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred:
        return self._answer("A", name, [dns.RRHeader(name, dns.A, dns.IN, 60, dns.Record_A("127.0.0.1"))])

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred:
        return self._answer("AAAA", name, [])


@implementer(IResolverSimple)
class CountingSimpleResolver:
    """
    The reactor's own resolver (C{reactor.resolve}, what a TCP connection
    to a hostname asks), counting every call.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def getHostByName(self, name: str, timeout: Any = None) -> Deferred:
        self.calls.append(name)
        return succeed("127.0.0.1")


class ProxyNameTests(LifecycleTestCase):
    """
    A proxy named by hostname (C{http://proxy.test:PORT}).
    """

    def setUp(self) -> None:
        super().setUp()
        self.names = CountingNames()
        self.simple = CountingSimpleResolver()
        previous = reactor.installResolver(self.simple)
        self.addCleanup(reactor.installResolver, previous)

    def proxyAddresses(self, proxies: list[Any]) -> ProxyAddresses:
        return ProxyAddresses(proxies, reactor, self.names, alwaysKnown(["127.0.0.1"]))

    @inlineCallbacks
    def startNamedProxy(self):  # type: ignore[no-untyped-def]
        factory, address = yield self.startProxy("echo")
        yield self.startShifter([address.replace("127.0.0.1", "proxy.test")])
        return factory

    @inlineCallbacks
    def test_noLookUpPerTunnel(self):  # type: ignore[no-untyped-def]
        """
        Tunnels go to the address the name was resolved to at start: five
        tunnels, one look-up (A and AAAA), and no call to the reactor's
        resolver (which, as twisted.names, reads /etc/hosts each time).
        """
        proxy = yield self.startNamedProxy()
        for n in range(5):
            client = self.client()
            client.sendall(b"ping %d" % n)
            data = yield self.receive(client, 6)
            self.assertEqual(data, b"ping %d" % n)
            client.close()
        self.assertEqual(proxy.connections, 5)
        self.assertEqual(self.simple.calls, [])
        self.assertEqual(sorted(self.names.lookups), [("A", "proxy.test"), ("AAAA", "proxy.test")])

    @inlineCallbacks
    def test_failsClosedUntilResolved(self):  # type: ignore[no-untyped-def]
        """
        Until the name has been resolved, a tunnel through the proxy fails
        at once with a reason that says so; nothing looks the name up in
        its place.
        """
        self.names.hold = True
        proxy = yield self.startNamedProxy()
        client = self.client()
        client.sendall(b"ping")
        reason = "the address of proxy host proxy.test is not known yet"
        yield self.waitUntil(lambda: self.lines("failed", reason), 10, "the tunnel's failure line")
        data, how = drain(client)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(proxy.connections, 0)
        self.assertEqual(self.simple.calls, [])
        self.assertEqual(len(self.lines("failed", reason)), 1)
