"""
The zero-copy relay: once a tunnel is open, bytes go from one socket to the
other through a pipe with C{splice(2)}, so they never enter Python.

Each direction (a L{_Flow}) moves bytes socket -> pipe -> socket.  The
reactor tells each socket's L{_Socket} when it is readable or writable; the
flow splices what the source has into its pipe and at once on into the
destination.  When the destination cannot take it all, the flow stops
reading the source and waits until the destination is writable again, so
at most a pipe's worth of bytes is in flight per direction: the same flow
control as Twisted's producers and consumers, with the kernel holding the
bytes.  An end of file is passed on as C{shutdown(SHUT_WR)} once the pipe is
drained; the relay ends when both directions have ended.

A socket that fails (a reset, an error) can take nothing more, so what is
on its way to it is dropped; but what it sent before failing was
acknowledged to its peer, and is delivered: the kernel keeps it readable
after a reset, so the failed side is read to its end, its bytes pushed on
through the pipe, and its end passed on like any other.  The owner is told
of bytes as they are delivered (written into the receiving socket), and of
bytes dropped.

Everything runs in the reactor: each socket is registered with
L{IReactorFDSet} under its own descriptor (the Twisted transport that owned
it having stopped reading and writing), and every call is non-blocking.

Small messages (a request, an answer) are cheaper to copy than to splice
through a pipe that must first be made: each direction starts by copying
one read at a time (at most 64 KiB), and makes its pipe when a read comes
back nearly full, the sign of bulk transfer.  An empty pipe that has not
moved a byte for a while is closed again (L{_PipeReaper}), so an idle
tunnel holds its two sockets and nothing else.  When no pipe can be made
(the descriptor limit), the flow keeps copying.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet.interfaces import IHalfCloseableDescriptor, IReadWriteDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

SPLICE_AVAILABLE = hasattr(os, "splice")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032

# Bytes asked of one splice(2) from a socket: more than a pipe holds, so the
# pipe, not the request, is the limit.
_REQUEST = 1 << 20

# Bytes read at once when a flow has no pipe and copies instead.
_COPY_CHUNK = 1 << 16

# A copied read at least this long makes the flow splice from then on.
_SPLICE_AFTER = _COPY_CHUNK // 2

_NO_PIPE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)

# A pipe smaller than this moves less per splice than one copied read: a
# flow that can only get such pipes copies instead.
_SMALLEST_USEFUL_PIPE = _COPY_CHUNK

# Seconds to go without asking for larger pipes (or making tiny ones) after
# the system has refused: pipes close as tunnels end, and it may allow them
# again.
PIPE_RETRY = 10.0

_PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"


@implementer(IReadWriteDescriptor, IHalfCloseableDescriptor)
class _Socket:
    """
    One of the relay's two sockets as the reactor sees it: readable means
    its outgoing flow may pull, writable means its incoming flow may push.
    """

    # Every tunnel the splice relay carries has two of these and two
    # flows: slots keep an idle tunnel small.
    __slots__ = ("relay", "sock", "fd", "side", "prefix", "outgoing", "incoming", "reading", "writing")

    def __init__(self, relay: SpliceRelay, sock: socket.socket, side: str) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.side = side
        self.prefix = f"splice {side}"
        self.outgoing: _Flow
        self.incoming: _Flow
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return self.prefix

    def startReading(self) -> None:
        if not self.reading:
            self.reading = True
            self.relay.reactor.addReader(self)

    def stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.reactor.removeReader(self)

    def startWriting(self) -> None:
        if not self.writing:
            self.writing = True
            self.relay.reactor.addWriter(self)

    def stopWriting(self) -> None:
        if self.writing:
            self.writing = False
            self.relay.reactor.removeWriter(self)

    def doRead(self) -> None:
        if not self.relay.stopped:
            self.outgoing.pull()

    def doWrite(self) -> None:
        if not self.relay.stopped:
            self.incoming.push()

    def readConnectionLost(self, reason: object) -> None:
        # The reactor saw a hang-up with nothing left to read; it has
        # already removed us as a reader.  A reset looks the same, but
        # leaves its error on the socket.
        self.reading = False
        if not self.relay.stopped:
            error = self._error()
            if error:
                self.outgoing.sourceFailed(error)
            else:
                self.outgoing.ended()

    def writeConnectionLost(self, reason: object) -> None:
        # Part of IHalfCloseableDescriptor; the relay shuts down writing
        # itself and the reactor never calls this.
        pass

    def connectionLost(self, reason: object) -> None:
        # The reactor saw an error or hang-up while we were not reading;
        # it has removed us both as reader and writer.
        self.reading = self.writing = False
        if not self.relay.stopped:
            self.relay.broken(self, self._error() or errno.EPIPE)

    def _error(self) -> int:
        try:
            return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            return e.errno or errno.EIO


class _Flow:
    """
    One direction of the relay: bytes from C{source} to C{sink}.

    @ivar pending: bytes to write to the sink before anything else (what
        Twisted had already read, or a copied chunk), with C{sent} of them
        written.
    @ivar inPipe: bytes in the pipe, not yet in the sink.
    @ivar eof: whether the source has ended.
    @ivar done: whether this direction is over: its end passed on to the
        sink (C{endSent}), or abandoned.
    @ivar endSent: whether the sink's sending side was shut down.
    """

    __slots__ = (
        "relay", "source", "sink", "up", "pending", "pipe", "inPipe", "eof", "done", "endSent", "moved", "sent",
    )

    def __init__(self, relay: SpliceRelay, source: _Socket, sink: _Socket, up: bool) -> None:
        self.relay = relay
        self.source = source
        self.sink = sink
        self.up = up
        self.pending = b""
        self.pipe: tuple[int, int] | None = None
        self.inPipe = 0
        self.eof = False
        self.done = False
        self.endSent = False
        self.moved = False
        self.sent = 0
        source.outgoing = self
        sink.incoming = self

    def start(self, pending: bytes, eof: bool) -> None:
        if self.done:
            # The sink failed before the relay started.
            if pending:
                self.relay.owner.relayDropped(self.up, len(pending))
            return
        self.pending = pending
        self.eof = eof
        self.push()

    def pull(self) -> None:
        """
        The source is readable: move what it has into the pipe, then on.
        """
        pipe = self.pipe
        if pipe is None:
            self._copy()
            return
        try:
            n = os.splice(self.source.fd, pipe[1], _REQUEST, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self.sourceFailed(e.errno or errno.EIO)
            return
        if n == 0:
            self.ended()
            return
        self.inPipe += n
        self.moved = True
        self.push()

    def sourceFailed(self, error: int) -> None:
        """
        The source failed with C{error}.  A read fails only once the kernel
        has handed over all the source sent: this direction has ended, and
        the source can take nothing more.
        """
        self.eof = True
        self.relay.broken(self.source, error)
        self.ended()

    def _copy(self) -> None:
        """
        Pull without a pipe: read a chunk into C{pending}.  A chunk that
        fills most of the buffer says bulk is flowing: the next pulls
        splice, through a pipe made now (if a descriptor is left for it).
        """
        try:
            data = os.read(self.source.fd, _COPY_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self.sourceFailed(e.errno or errno.EIO)
            return
        if not data:
            self.ended()
            return
        self.pending = data
        self.sent = 0
        if len(data) >= _SPLICE_AFTER:
            self.relay.openPipe(self)
        self.push()

    def push(self) -> None:
        """
        Move what is pending and what is in the pipe into the sink; if the
        sink cannot take it all, stop reading the source until it can.
        """
        sink = self.sink
        owner = self.relay.owner
        if self.pending:
            try:
                n = os.write(sink.fd, memoryview(self.pending)[self.sent :])
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.relay.broken(sink, e.errno or errno.EIO)
                return
            if n:
                owner.relayed(self.up, n)
            self.sent += n
            if self.sent < len(self.pending):
                self._blocked()
                return
            self.pending = b""
            self.sent = 0
        if self.inPipe:
            try:
                n = os.splice(self.pipe[0], sink.fd, self.inPipe, flags=_FLAGS)  # type: ignore[index]
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.relay.broken(sink, e.errno or errno.EIO)
                return
            if n:
                owner.relayed(self.up, n)
            self.inPipe -= n
            if self.inPipe:
                # A short write means the sink's buffer is full: waiting
                # for it to be writable saves a splice that would say so.
                self._blocked()
                return
        sink.stopWriting()
        if self.eof:
            self._finish()
        else:
            self.source.startReading()

    def _blocked(self) -> None:
        self.source.stopReading()
        self.sink.startWriting()

    def ended(self) -> None:
        """
        The source has no more bytes: pass that on once the pipe is empty.
        """
        self.eof = True
        self.source.stopReading()
        if not self.inPipe and not self.pending:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.relay.closePipe(self)
        try:
            self.sink.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sink is gone too; its own flow will say how
        self.endSent = True
        self.relay.flowDone()

    def held(self) -> int:
        """
        Bytes read from the source and not yet written to the sink.
        """
        return len(self.pending) - self.sent + self.inPipe

    def abandon(self) -> None:
        """
        The sink is gone: what this direction holds can never be delivered
        (the owner is told how much), and nothing more is read for it.
        """
        if self.done:
            return
        self.done = self.eof = True
        dropped = self.held()
        self.pending = b""
        self.sent = 0
        self.relay.closePipe(self)
        self.source.stopReading()
        self.sink.stopWriting()
        if dropped:
            self.relay.owner.relayDropped(self.up, dropped)
        self.relay.flowDone()


class _PipeReaper:
    """
    Closes the pipes of flows that have moved nothing for a while, so that
    idle tunnels hold no pipe descriptors.  One timer for all the relays of
    a reactor, running only while some flow holds a pipe.
    """

    def __init__(self, reactor: Any, interval: float) -> None:
        self.reactor = reactor
        self.interval = interval
        self.flows: set[_Flow] = set()
        self._loop: LoopingCall | None = None

    def add(self, flow: _Flow) -> None:
        self.flows.add(flow)
        if self._loop is None:
            self._loop = LoopingCall(self._sweep)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False)

    def discard(self, flow: _Flow) -> None:
        self.flows.discard(flow)
        if not self.flows and self._loop is not None:
            loop, self._loop = self._loop, None
            loop.stop()

    def _sweep(self) -> None:
        for flow in list(self.flows):
            if flow.moved or flow.inPipe:
                flow.moved = False
            else:
                flow.relay.closePipe(flow)


_reapers: dict[int, _PipeReaper] = {}

# Seconds without a byte after which a flow's empty pipe is closed.
PIPE_IDLE = 5.0


class PipeSizes:
    """
    What pipe sizes this process gets, learned as pipes are made.

    Linux caps pipes in two ways for a process without C{CAP_SYS_RESOURCE}:
    no pipe larger than C{/proc/sys/fs/pipe-max-size} (1 MiB by default),
    and, once a user's pipes hold C{/proc/sys/fs/pipe-user-pages-soft}
    pages in all (16384, 64 MiB, by default: 64 pipes of 1 MiB), new pipes
    get the smallest size and cannot be enlarged.  So each size asked for
    is checked against the size obtained (C{F_GETPIPE_SZ}).  A request over
    C{pipe-max-size} is lowered to it for good; a refusal under the
    per-user limit stops requests, and tiny pipes, for L{PIPE_RETRY}
    seconds.  The first time a pipe comes out smaller than asked, one line
    says so and why.

    @cvar _fcntl: the C{fcntl} call; tests swap it.
    """

    log = Logger()
    _fcntl: Callable[[int, int, int], int] = staticmethod(fcntl.fcntl)  # type: ignore[assignment]

    def __init__(self) -> None:
        self.ceiling: int | None = None  # pipe-max-size, once a request over it was refused
        self.noResizeUntil = float("-inf")
        self.noTinyUntil = float("-inf")
        self.warned = False

    def mayOpen(self, now: float) -> bool:
        """
        Whether a new pipe may be worth making: not while recent ones came
        out too small.
        """
        return now >= self.noTinyUntil

    def tooSmall(self, now: float) -> None:
        """
        A pipe came out too small to use: make none for a while.
        """
        self.noTinyUntil = now + PIPE_RETRY

    def fit(self, fd: int, wanted: int, now: float) -> int:
        """
        Make the pipe C{fd} C{wanted} bytes large, as far as allowed.

        @return: the size it has.
        """
        size = self._fcntl(fd, _F_GETPIPE_SZ, 0)
        if size >= wanted or now < self.noResizeUntil:
            return size
        ask = wanted if self.ceiling is None else min(wanted, self.ceiling)
        why = ""
        for _ in range(2):
            try:
                size = self._fcntl(fd, _F_SETPIPE_SZ, ask)
                break
            except OSError as e:
                if e.errno != errno.EPERM:
                    why = os.strerror(e.errno or errno.EIO)
                    break
                limit = _pipeMaxSize()
                if self.ceiling is None and limit is not None and ask > limit:
                    self.ceiling = ask = limit
                    why = f"fs.pipe-max-size is {limit}"
                    continue
                why = "this user's pipes hold fs.pipe-user-pages-soft pages already"
                self.noResizeUntil = now + PIPE_RETRY
                break
        size = self._fcntl(fd, _F_GETPIPE_SZ, 0)
        if size < wanted and not self.warned:
            self.warned = True
            self.log.warn(
                "splice relay: pipes of {size} bytes, not the {wanted} asked for ({why}); "
                "{then}. Shifter with CAP_SYS_RESOURCE (as root), or larger fs.pipe-max-size "
                "and fs.pipe-user-pages-soft, gets them whole",
                size=size,
                wanted=wanted,
                why=why or "the system gave less",
                then="tunnels copy instead while pipes are this small"
                if size < min(wanted, _SMALLEST_USEFUL_PIPE)
                else "more splices per megabyte",
            )
        return size


def _pipeMaxSize() -> int | None:
    try:
        with open(_PIPE_MAX_SIZE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# The limits are the user's and the process's: one for all relays.
pipeSizes = PipeSizes()


def _reaperFor(reactor: Any) -> _PipeReaper:
    reaper = _reapers.get(id(reactor))
    if reaper is None or reaper.reactor is not reactor:
        reaper = _reapers[id(reactor)] = _PipeReaper(reactor, PIPE_IDLE)
    return reaper


class SpliceRelay:
    """
    Relays bytes both ways between two connected TCP sockets with
    C{splice(2)}, in the reactor.

    The caller must have stopped its own reading and writing on both
    sockets, and must not use them until its owner's C{relayEnded} has been
    called or L{stop} has returned; closing the sockets stays the caller's
    job.

    @ivar stopped: whether the relay has let go of the sockets.
    """

    log = Logger()
    __slots__ = (
        "reactor", "owner", "_pipeSize", "_reaper", "_sizes",
        "client", "proxy", "up", "down", "stopped", "_done", "how",
    )

    def __init__(
        self,
        reactor: Any,
        clientSocket: socket.socket,
        proxySocket: socket.socket,
        owner: Any,
        pipeSize: int = 0,
    ) -> None:
        """
        @param owner: told of the relay's progress: C{owner.relayed(up, n)}
            when C{n} bytes were delivered to the proxy (C{up}) or to the
            client, which also says that bytes moved (for idle timeouts);
            C{owner.relayDropped(up, n)} when C{n} bytes read from one side
            can no longer be delivered to the other; C{owner.relayEnded(how)}
            once, after the relay has let go of the sockets.  One object
            rather than several callbacks keeps a tunnel small.
        @param pipeSize: the pipes' size in bytes; 0 for the system's.
        """
        self.stopped = False
        self._done = 0
        self.how: str | None = None  # the first failure, if any
        self.reactor = reactor
        self.owner = owner
        self._pipeSize = pipeSize
        self._reaper = _reaperFor(reactor)
        self._sizes = pipeSizes
        self.client = _Socket(self, clientSocket, "client")
        self.proxy = _Socket(self, proxySocket, "proxy")
        self.up = _Flow(self, self.client, self.proxy, True)
        self.down = _Flow(self, self.proxy, self.client, False)

    def start(self, toProxy: bytes = b"", toClient: bytes = b"", clientEnded: bool = False) -> None:
        """
        Start relaying, first writing the bytes already read from either
        side.

        @param clientEnded: whether the client has already finished sending.
        """
        self.down.start(toClient, False)
        if not self.stopped:
            self.up.start(toProxy, clientEnded)

    def openPipe(self, flow: _Flow) -> tuple[int, int] | None:
        """
        Give C{flow} a pipe, or C{None} if it had better keep copying: no
        descriptor is left for one, or the system only gives pipes too
        small to be worth it (see L{PipeSizes}).
        """
        sizes = self._sizes
        now = self.reactor.seconds()
        if not sizes.mayOpen(now):
            return None
        try:
            read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in _NO_PIPE:
                return None
            raise
        if self._pipeSize:
            size = sizes.fit(write, self._pipeSize, now)
            if size < min(self._pipeSize, _SMALLEST_USEFUL_PIPE):
                sizes.tooSmall(now)
                os.close(read)
                os.close(write)
                return None
        flow.pipe = (read, write)
        self._reaper.add(flow)
        return flow.pipe

    def closePipe(self, flow: _Flow) -> None:
        """
        Close C{flow}'s pipe, if it has one; bytes still in it are lost.
        """
        pipe = flow.pipe
        if pipe is not None:
            flow.pipe = None
            flow.inPipe = 0
            self._reaper.discard(flow)
            os.close(pipe[0])
            os.close(pipe[1])

    def flowDone(self) -> None:
        self._done += 1
        if self._done == 2:
            self._end(self.how or "both sides closed")

    def broken(self, where: _Socket, error: int) -> None:
        """
        C{where}'s connection failed with C{error}: what is on its way to
        it is dropped, and what it sent before failing is still read and
        passed on, up to its end.
        """
        if self.how is None:
            self.how = f"{where.side} connection lost: {os.strerror(error) if error else 'hang-up'}"
        where.incoming.abandon()
        outgoing = where.outgoing
        if not (self.stopped or outgoing.eof or outgoing.held()):
            where.startReading()

    def _end(self, how: str) -> None:
        if self.stopped:
            return
        self.stop()
        self.owner.relayEnded(how)

    def stop(self) -> None:
        """
        Let go of both sockets now (unregister them from the reactor) and
        close the pipes, without calling the owner's C{relayEnded}; the
        owner is told of the bytes this drops.
        """
        if self.stopped:
            return
        self.stopped = True
        for sock in (self.client, self.proxy):
            sock.stopReading()
            sock.stopWriting()
        for flow in (self.up, self.down):
            dropped = flow.held()
            flow.pending = b""
            flow.sent = 0
            self.closePipe(flow)
            if dropped:
                self.owner.relayDropped(flow.up, dropped)
