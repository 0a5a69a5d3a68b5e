"""
Tests for L{shifter.relay.splice}: the zero-copy relay on real loopback TCP
sockets, driven by the real reactor.

Each test builds two TCP connections on 127.0.0.1: the client's (a peer
playing the client, and the socket the relay reads as the client side) and
the proxy's (the relay's proxy side, and a peer playing the proxy).  The
peers are ordinary Twisted protocols.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import struct
import termios

from zope.interface import implementer

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from shifter.relay import splice
from shifter.relay.splice import SpliceRelay
from tests.support import requireHost


def tcpPair() -> tuple[socket.socket, socket.socket]:
    """
    Two ends of one loopback TCP connection, both non-blocking.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    one = socket.create_connection(listener.getsockname())
    other, _ = listener.accept()
    listener.close()
    for sock in (one, other):
        sock.setblocking(False)
    return one, other


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    One far end of the relay: hashes what it receives, and says when the
    other side finished sending and when the connection is gone.
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.received = 0
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.received += len(data)

    def readConnectionLost(self) -> None:
        self.ended.callback(None)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:  # type: ignore[no-untyped-def]
        self.reason = reason
        if not self.ended.called:
            self.ended.callback(None)
        self.lost.callback(None)


def adopt(sock: socket.socket) -> Peer:
    """
    Hand C{sock} to the reactor with a L{Peer} on it.
    """
    peer = Peer()
    factory = Factory.forProtocol(lambda: peer)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, factory)
    sock.close()
    return peer


def describeDescriptors() -> str:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return " ".join(names)


def payload(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def waitUntil(predicate, timeout: float = 10.0) -> defer.Deferred:  # type: ignore[no-untyped-def]
    """
    Poll C{predicate} in the reactor until it is true (or fail after
    C{timeout} seconds).
    """

    @defer.inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"timed out waiting for {predicate}")

    return poll()


class EndsWith:
    """
    A relay owner that only says how the relay ended.
    """

    def __init__(self, how: defer.Deferred[str]) -> None:
        self.how = how

    def relayed(self, up: bool, n: int) -> None:
        pass

    def relayDropped(self, up: bool, n: int) -> None:
        pass

    def relayEnded(self, how: str) -> None:
        self.how.callback(how)


class SpliceRelayTests(TestCase):
    """
    L{SpliceRelay} between a client connection and a proxy connection.
    """

    def setUp(self) -> None:
        if not splice.SPLICE_AVAILABLE:
            raise SkipTest("this Python has no os.splice")
        clientPeer, self.clientSide = tcpPair()
        self.proxySide, proxyPeer = tcpPair()
        self.client = adopt(clientPeer)
        self.proxy = adopt(proxyPeer)
        self.up = self.down = self.touched = 0
        self.dropped = {True: 0, False: 0}
        self.closeAtEnd = True
        self.how: defer.Deferred[str] = defer.Deferred()
        self.relay = SpliceRelay(reactor, self.clientSide, self.proxySide, self)
        self.addCleanup(self.closeAll)

    # The relay's owner.

    def relayed(self, up: bool, n: int) -> None:
        if up:
            self.up += n
        else:
            self.down += n
        self.touched += 1

    def relayDropped(self, up: bool, n: int) -> None:
        self.dropped[up] += n

    def relayEnded(self, how: str) -> None:
        if self.closeAtEnd:
            self.clientSide.close()
            self.proxySide.close()
        self.how.callback(how)

    @defer.inlineCallbacks
    def closeAll(self):  # type: ignore[no-untyped-def]
        if not self.relay.stopped:
            self.relay.stop()
            self.clientSide.close()
            self.proxySide.close()
        for peer in (self.client, self.proxy):
            if peer.transport.connected:
                peer.transport.abortConnection()
            yield peer.lost

    def peerTransport(self, peer: Peer):  # type: ignore[no-untyped-def]
        return peer.transport

    @defer.inlineCallbacks
    def test_bytesBothWays(self):  # type: ignore[no-untyped-def]
        """
        Several megabytes each way arrive intact, and are counted.
        """
        upBytes = payload(5_000_000, b"up")
        downBytes = payload(7_000_000, b"down")
        self.relay.start()
        self.client.transport.write(upBytes)
        self.proxy.transport.write(downBytes)
        self.client.transport.loseWriteConnection()
        self.proxy.transport.loseWriteConnection()
        how = yield self.how
        yield self.client.ended
        yield self.proxy.ended
        self.assertEqual(how, "both sides closed")
        self.assertEqual(self.proxy.hash.hexdigest(), hashlib.sha256(upBytes).hexdigest())
        self.assertEqual(self.client.hash.hexdigest(), hashlib.sha256(downBytes).hexdigest())
        self.assertEqual((self.up, self.down), (len(upBytes), len(downBytes)))
        self.assertGreater(self.touched, 0)

    @defer.inlineCallbacks
    def test_bufferedBytesFirst(self):  # type: ignore[no-untyped-def]
        """
        Bytes already read before the relay started go first, each to its
        side, and are counted as they are delivered, as every byte is.
        """
        self.relay.start(toProxy=b"early ", toClient=b"leftover ")
        self.client.transport.write(b"later")
        self.proxy.transport.write(b"later")
        yield waitUntil(lambda: self.proxy.received == 11 and self.client.received == 14)
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(b"early later").digest())
        self.assertEqual(self.client.hash.digest(), hashlib.sha256(b"leftover later").digest())
        self.assertEqual((self.up, self.down), (11, 14))

    @defer.inlineCallbacks
    def test_backpressure(self):  # type: ignore[no-untyped-def]
        """
        When the proxy's peer does not read, the relay stops reading the
        client: what it holds stays within a pipe, and the rest waits in
        the client's socket.  Once the peer reads again, everything
        arrives.
        """
        data = payload(32_000_000, b"slow")
        self.proxy.transport.pauseProducing()
        self.relay.start()
        self.client.transport.write(data)
        yield waitUntil(lambda: not self.relay.client.reading and self.relay.proxy.writing)
        yield deferLater(reactor, 0.2, lambda: None)
        stalled = self.up
        self.assertLess(stalled, len(data))
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.up, stalled, "the relay kept reading a blocked direction")
        self.assertLessEqual(self.relay.up.inPipe, 1 << 20)
        self.proxy.transport.resumeProducing()
        yield waitUntil(lambda: self.proxy.received == len(data), timeout=30)
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(data).digest())

    @defer.inlineCallbacks
    def test_countedWhenDelivered(self):  # type: ignore[no-untyped-def]
        """
        Bytes are counted once they are in the receiving socket, not when
        they are read: while the proxy's peer does not read, the count is
        what the proxy's side of the relay has taken (sent or queued), and
        not what waits in the pipe.
        """
        self.proxy.transport.pauseProducing()
        self.relay.start()
        self.client.transport.write(payload(32_000_000, b"counted"))
        yield waitUntil(lambda: not self.relay.client.reading and self.relay.proxy.writing)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertGreater(self.relay.up.held(), 0)
        queued = struct.unpack("i", fcntl.ioctl(self.proxySide.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        waiting = struct.unpack("i", fcntl.ioctl(self.proxy.transport.socket.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        self.assertEqual(self.up, queued + waiting + self.proxy.received)

    @defer.inlineCallbacks
    def test_halfCloseFromClient(self):  # type: ignore[no-untyped-def]
        """
        The client's end of sending reaches the proxy's peer as an end of
        file, and the proxy's answer still reaches the client; the relay
        ends when the proxy finishes too.
        """
        self.relay.start()
        self.client.transport.write(b"request")
        self.client.transport.loseWriteConnection()
        yield self.proxy.ended
        self.assertFalse(self.how.called)
        self.proxy.transport.write(b"answer")
        yield waitUntil(lambda: self.client.received == 6)
        self.proxy.transport.loseWriteConnection()
        how = yield self.how
        self.assertEqual(how, "both sides closed")
        self.assertEqual(self.client.hash.digest(), hashlib.sha256(b"answer").digest())

    @defer.inlineCallbacks
    def test_halfCloseFromProxy(self):  # type: ignore[no-untyped-def]
        """
        The proxy's end of sending reaches the client as an end of file,
        and the client may still send.
        """
        self.relay.start()
        self.proxy.transport.write(b"banner")
        self.proxy.transport.loseWriteConnection()
        yield self.client.ended
        self.client.transport.write(b"more")
        yield waitUntil(lambda: self.proxy.received == 4)
        self.assertFalse(self.how.called)
        self.client.transport.loseWriteConnection()
        self.assertEqual((yield self.how), "both sides closed")

    @defer.inlineCallbacks
    def test_clientAlreadyEnded(self):  # type: ignore[no-untyped-def]
        """
        A client that finished sending before the relay started has its
        early bytes delivered, then the end of file.
        """
        self.relay.start(toProxy=b"all of it", clientEnded=True)
        yield self.proxy.ended
        self.assertEqual(self.proxy.received, 9)

    @defer.inlineCallbacks
    def test_endOfFileWithBytesInPipe(self):  # type: ignore[no-untyped-def]
        """
        An end of file that arrives while bytes wait in the pipe is passed
        on only after them.
        """
        data = payload(32_000_000, b"tail")
        self.proxy.transport.pauseProducing()
        self.relay.start()
        self.client.transport.write(data)
        self.client.transport.loseWriteConnection()
        yield waitUntil(lambda: self.relay.up.inPipe > 0 and not self.relay.client.reading)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(self.proxy.ended.called)
        self.proxy.transport.resumeProducing()
        yield self.proxy.ended
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(data).digest())
        self.assertIsNone(self.relay.up.pipe, "the ended direction's pipe was kept")

    @defer.inlineCallbacks
    def test_reset(self):  # type: ignore[no-untyped-def]
        """
        A client that resets its connection ends the relay at once, saying
        so.
        """
        self.relay.start()
        self.client.transport.write(b"x")
        yield waitUntil(lambda: self.proxy.received == 1)
        self.client.transport.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.client.transport.abortConnection()
        how = yield self.how
        self.assertTrue(how.startswith("client connection lost"), how)

    @defer.inlineCallbacks
    def test_resetDeliversWhatWasSent(self):  # type: ignore[no-untyped-def]
        """
        A client that resets while the relay holds bytes it sent (the proxy
        not reading) and bytes for it (the client not reading): what the
        client sent before its reset, every byte its kernel acknowledged,
        reaches the proxy, then the end; the bytes that were on their way to
        the client are counted as dropped; the relay says the client was
        lost.
        """
        data = payload(1_000_000, b"before the reset")
        self.closeAtEnd = False
        self.client.transport.pauseProducing()
        self.proxy.transport.pauseProducing()
        self.relay.start()
        self.client.transport.write(data)
        self.proxy.transport.write(payload(16_000_000, b"never read"))
        clientSocket = self.client.transport.socket

        def acknowledged() -> bool:
            unsent = struct.unpack("i", fcntl.ioctl(clientSocket.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            return not self.client.transport.dataBuffer and not self.client.transport._tempDataLen and not unsent

        yield waitUntil(acknowledged)
        # Both ways jammed: the relay writes to the client when it resets.
        yield waitUntil(lambda: self.relay.down.inPipe or self.relay.down.pending)
        clientSocket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.transport.abortConnection()
        yield self.client.lost
        yield deferLater(reactor, 0.1, lambda: None)
        self.proxy.transport.resumeProducing()
        how = yield self.how
        self.assertTrue(how.startswith("client connection lost"), how)
        yield waitUntil(lambda: self.proxy.ended.called)
        self.assertEqual(self.proxy.received, len(data))
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(data).digest())
        self.assertEqual(self.up, len(data))
        self.assertEqual(self.dropped[True], 0)
        self.assertGreater(self.dropped[False], 0)
        self.clientSide.close()
        self.proxySide.close()

    @defer.inlineCallbacks
    def test_resetWhileWriting(self):  # type: ignore[no-untyped-def]
        """
        A proxy that resets while the relay writes to it ends the relay.
        """
        self.relay.start()
        self.proxy.transport.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.proxy.transport.abortConnection()
        yield self.proxy.lost
        self.client.transport.write(payload(1_000_000, b"to nobody"))
        how = yield self.how
        self.assertTrue(how.startswith("proxy connection lost"), how)

    @defer.inlineCallbacks
    def test_stop(self):  # type: ignore[no-untyped-def]
        """
        L{SpliceRelay.stop} lets go of both sockets without a word: the
        caller closes them.
        """
        self.relay.start()
        self.client.transport.write(b"x")
        yield waitUntil(lambda: self.proxy.received == 1)
        self.relay.stop()
        self.assertFalse(self.how.called)
        self.assertEqual((self.relay.client.reading, self.relay.proxy.reading), (False, False))
        self.assertIsNone(self.relay.up.pipe)

    @defer.inlineCallbacks
    def test_pipesMadeLazily(self):  # type: ignore[no-untyped-def]
        """
        A relay holds no pipe while only small messages flow, makes one
        when bulk flows, and gives it back once idle.
        """
        self.patch(splice, "_reapers", {})
        self.patch(splice, "PIPE_IDLE", 0.05)
        self.relay = SpliceRelay(reactor, self.clientSide, self.proxySide, EndsWith(self.how))
        self.relay.start()
        self.assertIsNone(self.relay.up.pipe)
        self.assertIsNone(self.relay.down.pipe)
        self.client.transport.write(b"x")
        self.proxy.transport.write(b"y")
        yield waitUntil(lambda: self.proxy.received == 1 and self.client.received == 1)
        self.assertIsNone(self.relay.up.pipe)
        self.assertIsNone(self.relay.down.pipe)
        self.proxy.transport.pauseProducing()
        self.client.transport.write(payload(16_000_000, b"bulk"))
        yield waitUntil(lambda: self.relay.up.pipe is not None)
        self.proxy.transport.resumeProducing()
        yield waitUntil(lambda: self.proxy.received == 16_000_001, timeout=30)
        yield waitUntil(lambda: self.relay.up.pipe is None)
        self.client.transport.write(b"z")
        yield waitUntil(lambda: self.proxy.received == 16_000_002)
        self.relay.stop()
        self.clientSide.close()
        self.proxySide.close()

    @defer.inlineCallbacks
    def test_copiesWithoutPipes(self):  # type: ignore[no-untyped-def]
        """
        When no pipe can be made (no descriptor left), bytes are copied
        instead, intact.
        """

        def noPipe(flags: int) -> tuple[int, int]:
            raise OSError(24, "Too many open files")

        self.patch(os, "pipe2", noPipe)
        data = payload(2_000_000, b"copy")
        self.relay.start()
        self.client.transport.write(data)
        self.client.transport.loseWriteConnection()
        self.proxy.transport.loseWriteConnection()
        self.assertEqual((yield self.how), "both sides closed")
        yield self.proxy.ended
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(data).digest())

    @defer.inlineCallbacks
    def test_copiesWhenPipesAreTiny(self):  # type: ignore[no-untyped-def]
        """
        When the system only gives one-page pipes (a user over
        fs.pipe-user-pages-soft), the relay copies instead, intact, and
        holds no pipe.
        """
        sizes = splice.PipeSizes()
        self.patch(splice, "pipeSizes", sizes)
        self.patch(sizes, "_fcntl", FakeFcntl(obtained=4096, refuse=True))
        self.relay = SpliceRelay(reactor, self.clientSide, self.proxySide, EndsWith(self.how), pipeSize=1 << 20)
        data = payload(4_000_000, b"tiny")
        self.relay.start()
        self.client.transport.write(data)
        self.client.transport.loseWriteConnection()
        self.proxy.transport.loseWriteConnection()
        self.assertEqual((yield self.how), "both sides closed")
        self.clientSide.close()
        self.proxySide.close()
        yield self.proxy.ended
        self.assertEqual(self.proxy.hash.digest(), hashlib.sha256(data).digest())
        self.assertIsNone(self.relay.up.pipe)
        self.assertTrue(sizes.warned)

    @defer.inlineCallbacks
    def test_descriptorsClosed(self):  # type: ignore[no-untyped-def]
        """
        Once the relay has ended and the sockets are closed, every
        descriptor it used (pipes included) is closed.
        """
        yield deferLater(reactor, 0, lambda: None)  # the reactor's own pipes are made
        # The two relay sockets and the two peers' are open now.
        before = openDescriptors() - 4
        self.relay.start()
        self.client.transport.write(payload(1_000_000, b"a"))
        self.proxy.transport.write(payload(1_000_000, b"b"))
        yield waitUntil(lambda: self.relay.up.pipe is not None and self.relay.down.pipe is not None)
        self.client.transport.loseConnection()
        self.proxy.transport.loseConnection()
        yield self.how
        yield self.client.lost
        yield self.proxy.lost
        self.assertEqual(openDescriptors(), before, describeDescriptors())


class FakeFcntl:
    """
    F_GETPIPE_SZ and F_SETPIPE_SZ as a system with limits answers them.
    """

    def __init__(self, obtained: int = 65536, maxSize: int = 1 << 20, refuse: bool = False) -> None:
        self.obtained = obtained
        self.maxSize = maxSize
        self.refuse = refuse
        self.sets: list[int] = []

    def __call__(self, fd: int, command: int, argument: int) -> int:
        if command == splice._F_GETPIPE_SZ:
            return self.obtained
        self.sets.append(argument)
        if argument > self.maxSize or self.refuse:
            raise OSError(errno.EPERM, "Operation not permitted")
        self.obtained = argument
        return argument


class PipeSizesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sizes = splice.PipeSizes()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        maxSize = self.mktemp()
        with open(maxSize, "w") as f:
            f.write("262144\n")
        self.patch(splice, "_PIPE_MAX_SIZE", maxSize)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]

    def test_obtained(self) -> None:
        """
        A size the system allows is set, and checked; nothing is logged.
        """
        fake = FakeFcntl(maxSize=1 << 20)
        self.patch(self.sizes, "_fcntl", fake)
        self.assertEqual(self.sizes.fit(3, 1 << 20, 0), 1 << 20)
        self.assertEqual(self.warnings(), [])

    def test_overPipeMaxSize(self) -> None:
        """
        Over fs.pipe-max-size (unprivileged), the request is lowered to it,
        for this pipe and the next ones, and one line says so.
        """
        fake = FakeFcntl(maxSize=262144)
        self.patch(self.sizes, "_fcntl", fake)
        self.assertEqual(self.sizes.fit(3, 1 << 20, 0), 262144)
        self.assertEqual(self.sizes.fit(4, 1 << 20, 1), 262144)
        self.assertEqual(fake.sets, [1 << 20, 262144, 262144])
        [line] = self.warnings()
        self.assertIn("pipes of 262144 bytes, not the 1048576 asked for (fs.pipe-max-size is 262144)", line)

    def test_overUserPages(self) -> None:
        """
        Over fs.pipe-user-pages-soft, pipes stay at the smallest size: no
        more requests for a while, then one again; one line in all.
        """
        with open(splice._PIPE_MAX_SIZE, "w") as f:
            f.write("1048576\n")
        fake = FakeFcntl(obtained=8192, maxSize=1 << 20, refuse=True)
        self.patch(self.sizes, "_fcntl", fake)
        self.assertEqual(self.sizes.fit(3, 1 << 20, 0), 8192)
        self.assertEqual(self.sizes.fit(4, 1 << 20, 5), 8192)
        self.assertEqual(len(fake.sets), 1)
        self.sizes.fit(5, 1 << 20, splice.PIPE_RETRY + 1)
        self.assertEqual(len(fake.sets), 2)
        [line] = self.warnings()
        self.assertIn("pipes of 8192 bytes", line)
        self.assertIn("fs.pipe-user-pages-soft", line)
        self.assertIn("tunnels copy instead", line)

    def test_tinyPipesPause(self) -> None:
        """
        After a pipe too small to use, none is made for a while.
        """
        self.assertTrue(self.sizes.mayOpen(0))
        self.sizes.tooSmall(0)
        self.assertFalse(self.sizes.mayOpen(splice.PIPE_RETRY - 1))
        self.assertTrue(self.sizes.mayOpen(splice.PIPE_RETRY))


class RealPipeLimitTests(SynchronousTestCase):
    def test_unprivilegedUserIsCapped(self) -> None:
        """
        For real, in this kernel: as root every 1 MiB pipe is obtained; as
        an unprivileged user, once its pipes hold fs.pipe-user-pages-soft
        pages, new ones come out smaller and the sizes say so.
        """
        requireHost(root=True)
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            softPages = int(f.read())
        wanted = 1 << 20
        count = softPages * 4096 // wanted + 4
        if count > 1000:
            raise SkipTest(f"fs.pipe-user-pages-soft is {softPages}: too many pipes to reach it")
        self.assertEqual(pipeSizesAs(None, count, wanted), [wanted] * count)
        sizes = pipeSizesAs(65534, count, wanted)
        self.assertEqual(sizes[: count - 5], [wanted] * (count - 5))
        self.assertLess(sizes[-1], wanted)


def pipeSizesAs(uid: int | None, count: int, wanted: int) -> list[int]:
    """
    In a child process (as C{uid}, if given), make C{count} pipes, keeping
    them open, each fitted to C{wanted} bytes by a new L{splice.PipeSizes}:
    the sizes obtained.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            sizes = splice.PipeSizes()
            kept = []
            obtained = []
            for _ in range(count):
                pipe = os.pipe()
                kept.append(pipe)
                obtained.append(sizes.fit(pipe[1], wanted, 0))
            os.write(write, " ".join(map(str, obtained)).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return [int(n) for n in data.split()]
