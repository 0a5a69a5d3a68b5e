"""
Tunnel ids: a short name for each tunnel that Shifter's access log, its
tunnel line, C{ctl tunnels} and the proxy's own log (through the
C{Shifter-Tunnel} request header on CONNECT) share, so one grep joins them.

An id is a random prefix drawn once per process and a counter, both in
lowercase base32 (C{"k7q2mx4d-1b"}): unique across restarts and across the
workers of C{--workers} (each a process of its own) without coordination,
and short enough to read aloud.  The prefix has 40 random bits: two
processes share one with a chance of one in a trillion.
"""

from __future__ import annotations

import os

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"

# The header CONNECT carries the id in, unless told otherwise.
DEFAULT_HEADER = "Shifter-Tunnel"


def _base32(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 32)
        digits.append(_ALPHABET[digit])
        if not number:
            return "".join(reversed(digits))


class TunnelIds:
    """
    The ids of one process's tunnels: a fresh random prefix, then a
    counter.  A process forked from this one (twistd's daemon) draws a
    prefix of its own at its first id.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._count = 0

    @property
    def prefix(self) -> str:
        """
        This process's prefix.
        """
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            self._prefix = _base32(int.from_bytes(os.urandom(5), "big")).rjust(8, "a")
            self._count = 0
        return self._prefix

    def next(self) -> str:
        """
        A new id, never given before by this process.
        """
        prefix = self.prefix
        self._count += 1
        return f"{prefix}-{_base32(self._count)}"


tunnelIds = TunnelIds()


def newTunnelId() -> str:
    """
    A new tunnel id for this process.
    """
    return tunnelIds.next()
