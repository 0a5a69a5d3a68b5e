"""
Shifter's reactor: Twisted's epoll reactor, dispatching each ready
descriptor straight to its handler.

Twisted's reactor wraps every dispatch in C{log.callWithLogger}, which sets
a logging context (the legacy log's C{system} prefix) through four calls
and a dictionary per event: several dispatches per tunnel, and a tenth of
the reactor's own time at a few thousand new connections a second.
Shifter logs through L{twisted.logger}, which reads no such context; an
exception a handler lets escape is still logged, and the loop goes on.

It also lets a reader take over another's registration
(L{ShifterReactor.replaceReader}), which the splice relay uses to take a
transport's socket without two calls to epoll_ctl, and a connecting
socket's writer hand its registration to the transport that reads the
connected socket (L{ShifterReactor.writerBecomesReader}): one call where
removing and adding take two.  A closing connection stops being watched
with at most one (L{ShifterReactor.forget}), and TCP ports accept into
L{shifter.transports.TunnelServer}, which closes with less work.

C{shifter run} installs it; with twistd, C{twistd --reactor shifter
shifter ...}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.epollreactor import EPOLLIN, EPollReactor
from twisted.logger import Logger

from shifter.transports import TunnelPort


class ShifterReactor(EPollReactor):
    """
    The epoll reactor without a log context per dispatch.
    """

    _dispatchLog = Logger()

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something is ready
        try:
            ready = self._poller.poll(timeout, len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier dispatch of this turn
            try:
                dispatch(selectable, fd, event)
            except Exception:
                self._dispatchLog.failure("while dispatching an event of {selectable!r}", selectable=selectable)

    doIteration = doPoll

    def replaceReader(self, old: Any, new: Any) -> bool:
        """
        Make C{new} the reader of the descriptor C{old} reads from, in its
        place, keeping the descriptor's registration: no call to the
        kernel (the splice relay taking over a transport's socket).

        @return: whether it was done; nothing changed if C{old} is not the
            descriptor's reader, if C{new} has another descriptor, or if the
            descriptor is registered for writing too.
        """
        fd = self._soleWatcher(old, new, self._reads, self._writes)
        if fd is None:
            return False
        self._selectables[fd] = new
        return True

    def writerBecomesReader(self, old: Any, new: Any) -> bool:
        """
        Make C{new} the reader of the descriptor C{old} writes to, and stop
        watching it for writing: one epoll_ctl (a connected socket going
        from its connector, which waited for writability, to its transport).

        @return: whether it was done; nothing changed if C{old} is not the
            descriptor's writer, if C{new} has another descriptor, or if the
            descriptor is registered for reading too.
        """
        fd = self._soleWatcher(old, new, self._writes, self._reads)
        if fd is None:
            return False
        self._poller.modify(fd, EPOLLIN)
        self._writes.discard(fd)
        self._reads.add(fd)
        self._selectables[fd] = new
        return True

    def forget(self, selectable: Any) -> None:
        """
        Stop watching C{selectable}'s descriptor, for reading and writing:
        one epoll_ctl if it is watched, none if not (removeReader then
        removeWriter look it up twice, and may call the kernel twice).
        Like them, it forgets the descriptor whoever watches it.
        """
        fd = selectable.fileno()
        if fd == -1:
            # Closed already: removeReader and removeWriter find it by identity.
            self.removeReader(selectable)
            self.removeWriter(selectable)
            return
        reads, writes = self._reads, self._writes
        if fd in reads or fd in writes:
            reads.discard(fd)
            writes.discard(fd)
            self._selectables.pop(fd, None)
            self._poller.unregister(fd)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """
        Listen as Twisted does, accepting into L{shifter.transports.TunnelServer}.
        """
        listening = TunnelPort(port, factory, backlog, interface, self)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        """
        Listen on a socket made elsewhere (C{--workers}), as L{listenTCP}.
        """
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        listening = TunnelPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        listening.startListening()
        return listening

    def _soleWatcher(self, old: Any, new: Any, watched: set[int], notWatched: set[int]) -> int | None:
        """
        C{old}'s descriptor, if C{new} may take over its registration:
        C{old} is the descriptor's handler, C{new} has the same descriptor,
        and it is in C{watched} (reads or writes) and not in C{notWatched};
        else C{None}.
        """
        fd = old.fileno()
        if fd < 0 or new.fileno() != fd or self._selectables.get(fd) is not old:
            return None
        if fd not in watched or fd in notWatched:
            return None
        return fd


def install() -> Any:
    """
    Install L{ShifterReactor} as the reactor.
    """
    from twisted.internet.main import installReactor

    reactor = ShifterReactor()
    installReactor(reactor)
    return reactor
