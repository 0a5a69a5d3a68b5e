"""
Shifter's reactor: Twisted's epoll reactor, dispatching each ready
descriptor straight to its handler.

Twisted's reactor wraps every dispatch in C{log.callWithLogger}, which sets
a logging context (the legacy log's C{system} prefix) through four calls
and a dictionary per event: several dispatches per tunnel, and a tenth of
the reactor's own time at a few thousand new connections a second.
Shifter logs through L{twisted.logger}, which reads no such context; an
exception a handler lets escape is still logged, and the loop goes on.

C{shifter run} installs it; with twistd, C{twistd --reactor shifter
shifter ...}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger


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


def install() -> Any:
    """
    Install L{ShifterReactor} as the reactor.
    """
    from twisted.internet.main import installReactor

    reactor = ShifterReactor()
    installReactor(reactor)
    return reactor
