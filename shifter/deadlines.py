"""
Deadlines for many tunnels with one timer.

Every tunnel has at most one deadline at a time (the end of its set-up
stage, of its idle period or of its closing grace).  Rather than a
C{DelayedCall} per tunnel, rescheduled at every stage, L{Deadlines} keeps
tunnels in buckets of C{resolution} seconds and runs one reactor timer, set
for the earliest bucket that holds anything.  Setting a deadline is a set
insertion; a deadline fires at most C{resolution} seconds late, never
early.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Protocol


class HasDeadline(Protocol):
    """
    What L{Deadlines} keeps: anything with a C{deadline} (seconds on the
    reactor's clock, or C{None}), a C{deadlineBucket} slot for its own
    bookkeeping, and a C{timedOut()} method.
    """

    deadline: float | None
    deadlineBucket: int | None

    def timedOut(self) -> None: ...


class Deadlines:
    """
    The deadlines of a set of tunnels, fired by one timer.

    @ivar resolution: the width of a bucket, in seconds.
    """

    def __init__(self, reactor: Any, resolution: float = 0.1) -> None:
        self.reactor = reactor
        self.resolution = resolution
        self._buckets: dict[int, set[HasDeadline]] = {}
        self._keys: list[int] = []  # a heap of the keys of _buckets
        self._timer: Any = None
        self._timerKey: int | None = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, item: HasDeadline, when: float | None) -> None:
        """
        Give C{item} the deadline C{when} (replacing any it had), or none.
        """
        old = item.deadlineBucket
        if old is not None:
            self._buckets[old].discard(item)
            self._count -= 1
        item.deadline = when
        if when is None:
            item.deadlineBucket = None
            if not self._count:
                self.stop()  # no timer runs for nothing
            return
        key = math.ceil(when / self.resolution)
        item.deadlineBucket = key
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
            if self._timerKey is None or key < self._timerKey:
                self._schedule(key)
        bucket.add(item)
        self._count += 1

    def _schedule(self, key: int) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timerKey = key
        delay = max(0.0, key * self.resolution - self.reactor.seconds())
        self._timer = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timerKey = None
        now = self.reactor.seconds()
        due = math.floor(now / self.resolution)
        keys = self._keys
        while keys and keys[0] <= due:
            key = heapq.heappop(keys)
            bucket = self._buckets.pop(key, ())
            self._count -= len(bucket)
            for item in bucket:
                item.deadlineBucket = None
                deadline = item.deadline
                if deadline is None:
                    continue
                if deadline > now:
                    # Rounding put it a bucket early: keep it for later.
                    self.set(item, deadline)
                    continue
                item.deadline = None
                item.timedOut()
        # Empty buckets left by items that moved away are dropped as their
        # key comes up; the timer waits for the earliest that still holds.
        while keys and not self._buckets.get(keys[0]):
            self._buckets.pop(heapq.heappop(keys), None)
        if keys and self._timerKey is None:
            self._schedule(keys[0])

    def stop(self) -> None:
        """
        Forget every deadline and stop the timer.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timerKey = None
        for bucket in self._buckets.values():
            for item in bucket:
                item.deadlineBucket = None
        self._buckets.clear()
        self._keys.clear()
        self._count = 0
