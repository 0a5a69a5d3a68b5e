"""
Deadlines for many tunnels with one timer.

Every tunnel has at most one deadline at a time (the end of its set-up
stage, of its idle period or of its closing grace).  Rather than a
C{DelayedCall} per tunnel, rescheduled at every stage, L{Deadlines} keeps
tunnels in buckets of C{resolution} seconds and runs one reactor timer, set
for the earliest bucket that holds anything.  Setting a deadline is a set
insertion; a deadline fires at most C{resolution} seconds late, never
early.

While the timer's sweep runs, the items it fires set new deadlines (an
idle check re-arming, a close starting its grace, the next proxy's
connect deadline), for other items too.  The sweep never schedules the
timer for those one by one: a far key scheduled first would hold back the
earlier ones.  Once the sweep is over, the timer is set once, for the
earliest key that still holds an item.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Protocol

from twisted.logger import Logger


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

    An item is in the bucket named by its C{deadlineBucket}, or in none
    (C{None}): the buckets, the heap of their keys and the count always
    agree, also while the sweep runs (it takes a bucket's items out before
    it fires any of them).

    @ivar resolution: the width of a bucket, in seconds.
    """

    log = Logger()

    def __init__(self, reactor: Any, resolution: float = 0.1) -> None:
        self.reactor = reactor
        self.resolution = resolution
        self._buckets: dict[int, set[HasDeadline]] = {}
        self._keys: list[int] = []  # a heap of the keys of _buckets
        self._timer: Any = None
        self._timerKey: int | None = None
        self._count = 0
        self._firing: list[HasDeadline] | None = None  # the items the sweep has taken out, not yet fired

    def __len__(self) -> int:
        return self._count

    def set(self, item: HasDeadline, when: float | None) -> None:
        """
        Give C{item} the deadline C{when} (replacing any it had), or none.
        """
        key = None if when is None else math.ceil(when / self.resolution)
        if key is not None and key == item.deadlineBucket:
            item.deadline = when  # the same bucket: the next stage of a set-up often ends with it
            return
        self._remove(item)
        item.deadline = when
        if key is None:
            if not self._count and self._firing is None:
                self._cancelTimer()  # no timer runs for nothing
            return
        self._add(item, key)

    def _remove(self, item: HasDeadline) -> None:
        old = item.deadlineBucket
        if old is not None:
            item.deadlineBucket = None
            self._buckets[old].discard(item)
            self._count -= 1

    def _add(self, item: HasDeadline, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
        bucket.add(item)
        item.deadlineBucket = key
        self._count += 1
        # While the sweep runs, it schedules the timer itself when done.
        if self._firing is None and (self._timerKey is None or key < self._timerKey):
            self._schedule(key)

    def _schedule(self, key: int) -> None:
        self._cancelTimer()
        self._timerKey = key
        delay = max(0.0, key * self.resolution - self.reactor.seconds())
        self._timer = self.reactor.callLater(delay, self._fire)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timerKey = None

    def _fire(self) -> None:
        """
        The timer: fire every item whose deadline has passed, in the order
        of their keys, then set the timer for the earliest key left.
        """
        scheduled = self._timerKey
        self._timer = None
        self._timerKey = None
        now = self.reactor.seconds()
        # The key the timer was set for is due, whatever rounding says of
        # the clock's reading.
        due = math.floor(now / self.resolution)
        if scheduled is not None and scheduled > due:
            due = scheduled
        keys = self._keys
        try:
            while keys and keys[0] <= due:
                key = heapq.heappop(keys)
                bucket = self._buckets.pop(key, None)
                if not bucket:
                    continue
                firing = self._firing = list(bucket)
                for item in firing:
                    item.deadlineBucket = None
                self._count -= len(firing)
                while firing:
                    item = firing.pop()
                    if item.deadlineBucket is not None:
                        continue  # given a new deadline by an item fired before it
                    deadline = item.deadline
                    if deadline is None:
                        continue  # cleared by an item fired before it
                    if deadline > now:
                        # Rounding put it a bucket early: a later one, never
                        # this one again.
                        self._add(item, max(math.ceil(deadline / self.resolution), key + 1))
                        continue
                    item.deadline = None
                    try:
                        item.timedOut()
                    except Exception:
                        self.log.failure("a deadline's action failed: {item!r}", item=item)
        finally:
            self._firing = None
            while keys and not self._buckets.get(keys[0]):
                self._buckets.pop(heapq.heappop(keys), None)
            if keys:
                self._schedule(keys[0])

    def stop(self) -> None:
        """
        Forget every deadline and stop the timer.
        """
        self._cancelTimer()
        for bucket in self._buckets.values():
            for item in bucket:
                item.deadlineBucket = None
                item.deadline = None
        firing = self._firing
        if firing is not None:
            # Stopped by an item the sweep fired: the rest of its bucket
            # are forgotten too.
            for item in firing:
                item.deadline = None
            firing.clear()
        self._buckets.clear()
        self._keys.clear()
        self._count = 0
