"""
systemd's readiness protocol (C{Type=notify}): one datagram to the socket
named by C{$NOTIFY_SOCKET} per message, written here directly (sd_notify(3)
needs no library).

L{SystemdNotifier} says C{READY=1} once Shifter accepts connections (every
port open), C{STATUS=} with the open tunnels now and then, C{WATCHDOG=1}
at half the C{WatchdogSec=} interval, and C{STOPPING=1} when the shutdown
begins.  Without C{$NOTIFY_SOCKET} it does nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

# How often the status line is looked at (it is sent when it changes).
STATUS_INTERVAL = 5.0

log = Logger()


def notifyAddress(environ: Mapping[str, str] = os.environ) -> str | bytes | None:
    """
    The address of systemd's notification socket, from C{$NOTIFY_SOCKET}:
    a path, or an abstract name (C{@name}, a leading NUL byte on the wire);
    C{None} when it is not set or names another kind of socket.
    """
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{message} (lines of C{KEY=value}) to systemd, without blocking.

    @return: whether it was sent.
    """
    address = notifyAddress(environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.sendto(message.encode("utf-8", "replace"), address)
        except OSError as e:
            log.warn("cannot notify systemd ({socket}): {reason}", socket=environ.get("NOTIFY_SOCKET"),
                     reason=e.strerror)
            return False
    return True


def watchdogInterval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """
    Seconds between C{WATCHDOG=1} messages: half of C{$WATCHDOG_USEC}, when
    it is set for this process (C{$WATCHDOG_PID} absent or ours); else
    C{None}.
    """
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2e6


class SystemdNotifier(Service):
    """
    Tells systemd how Shifter is doing.

    @param ready: fires once Shifter accepts connections.
    @param status: the status line now (C{"12 tunnels open"}).
    """

    def __init__(
        self,
        reactor: Any,
        ready: Deferred[Any],
        status: Callable[[], str],
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.reactor = reactor
        self.status = status
        self.environ = dict(environ)
        self.lastStatus: str | None = None
        self.loops: list[LoopingCall] = []
        self.isReady = False
        # Seen from the start, before anyone handles a failure: a failed
        # start is never taken for a ready one.
        ready.addBoth(self._settled)

    def _settled(self, result: object) -> object:
        if not isinstance(result, Failure):
            self.isReady = True
            if self.running:
                self._ready()
        return result

    def startService(self) -> None:
        Service.startService(self)
        if notifyAddress(self.environ) is None:
            return
        interval = watchdogInterval(self.environ)
        if interval is not None:
            self._loop(lambda: notify("WATCHDOG=1", self.environ), interval)
        if self.isReady:
            self._ready()

    def _loop(self, call: Callable[[], object], interval: float) -> None:
        loop = LoopingCall(call)
        loop.clock = self.reactor
        loop.start(interval, now=True)
        self.loops.append(loop)

    def _ready(self) -> None:
        # Once the reactor runs, so that its signal handlers are in place:
        # a SIGTERM right after READY=1 then drains and stops as it should.
        self.reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        if not self.running or notifyAddress(self.environ) is None:
            return
        status = self.status()
        self.lastStatus = status
        notify(f"READY=1\nSTATUS={status}", self.environ)
        self._loop(self._sendStatus, STATUS_INTERVAL)

    def _sendStatus(self) -> None:
        status = self.status()
        if status != self.lastStatus:
            self.lastStatus = status
            notify(f"STATUS={status}", self.environ)

    def stopService(self) -> None:
        Service.stopService(self)
        for loop in self.loops:
            if loop.running:
                loop.stop()
        self.loops = []
        if notifyAddress(self.environ) is not None:
            notify("STOPPING=1\nSTATUS=draining, then stopping", self.environ)
