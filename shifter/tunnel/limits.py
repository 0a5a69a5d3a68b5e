"""
Staying up when descriptors or memory run out.

When C{accept()} fails for lack of descriptors (EMFILE, ENFILE) or kernel
memory (ENOBUFS, ENOMEM), the waiting connection stays in the backlog and
the listening socket stays readable, so a reactor that merely logs and
retries spins on it.  L{pauseOnExhaustion} makes the listening port stop
reading instead, and try again after a jittered, growing back-off; the
clients wait in the kernel's backlog meanwhile rather than being dropped.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
from typing import Any, Callable

from twisted.logger import Logger

_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

log = Logger()


class _GuardedListener:
    """
    Stands in for a listening socket: C{accept()} failures that mean
    "out of descriptors or memory" call C{onExhausted} and then look, to
    the port, like an empty backlog (EAGAIN).
    """

    def __init__(self, socket: Any, onExhausted: Callable[[OSError], None]) -> None:
        self._socket = socket
        self._onExhausted = onExhausted

    def accept(self) -> tuple[Any, Any]:
        try:
            return self._socket.accept()
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                raise
            self._onExhausted(e)
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN)) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


class AcceptPauser:
    """
    Pauses a listening port while accepting is impossible.

    @ivar pauses: how many times accepting was paused.
    """

    def __init__(
        self,
        port: Any,
        reactor: Any,
        onPause: Callable[[], None] = lambda: None,
        firstDelay: float = 0.05,
        maxDelay: float = 2.0,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._port = port
        self._reactor = reactor
        self._onPause = onPause
        self._firstDelay = firstDelay
        self._maxDelay = maxDelay
        self._random = random
        self._delay = firstDelay
        self._resumeCall: Any = None
        self._resumedAt = float("-inf")
        self.pauses = 0
        port.socket = _GuardedListener(port.socket, self._exhausted)

    def _exhausted(self, error: OSError) -> None:
        if self._resumeCall is not None:
            return
        if self._reactor.seconds() - self._resumedAt > self._maxDelay:
            # Accepting worked for a while since the last pause: start the
            # back-off from the beginning.
            self._delay = self._firstDelay
        self.pauses += 1
        self._onPause()
        # Jitter spreads the retries of several workers or services.
        delay = self._delay * (0.5 + self._random())
        log.warn(
            "cannot accept connections: {error}; pausing accepts for {delay:.3f} s",
            error=error.strerror or error,
            delay=delay,
        )
        self._port.stopReading()
        self._resumeCall = self._reactor.callLater(delay, self._resume)
        self._delay = min(self._delay * 2, self._maxDelay)

    def _resume(self) -> None:
        self._resumeCall = None
        self._resumedAt = self._reactor.seconds()
        if self._port.connected:
            self._port.startReading()

    def stop(self) -> None:
        """
        Cancel a pending resume (the port is closing).
        """
        if self._resumeCall is not None:
            self._resumeCall.cancel()
            self._resumeCall = None


def pauseOnExhaustion(port: Any, reactor: Any, onPause: Callable[[], None]) -> AcceptPauser | None:
    """
    Guard C{port}'s accepts with an L{AcceptPauser}, if it is a port of
    the kind that accepts from a socket (TCP, UNIX, systemd-passed).
    """
    if not hasattr(port, "socket") or not hasattr(port, "stopReading"):
        return None
    return AcceptPauser(port, reactor, onPause)


def clientKey(host: str) -> str:
    """
    What counts as one client for a per-client limit: its IPv4 address, or
    its IPv6 /64 (a host can take any address of its /64, so counting
    addresses would let it past the limit).  IPv4-mapped addresses count
    as their IPv4 address.

    @param host: the client's address.
    """
    if ":" not in host:
        return host  # IPv4, as the kernel gives it
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ClientLimit:
    """
    At most C{limit} connections at once per client (L{clientKey}), so that
    one host cannot take every C{--max-connections} slot.

    The caller calls L{admit} when a client connects, and, for each
    admitted connection, L{release} once when it is gone.

    @ivar counts: open connections by client key, for those that have any.
    """

    def __init__(self, limit: int) -> None:
        """
        @param limit: connections per client; 0 for no limit.
        """
        self.limit = limit
        self.counts: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        """
        Count a new connection from C{host}, if the client is under its
        limit.

        @return: whether it was admitted (and must be released).
        """
        key = clientKey(host)
        count = self.counts.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self.counts[key] = count + 1
        return True

    def release(self, host: str) -> None:
        """
        An admitted connection from C{host} is gone.
        """
        key = clientKey(host)
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)
