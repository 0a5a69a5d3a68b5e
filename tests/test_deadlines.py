"""
Tests for L{shifter.tunnel.deadlines.Deadlines}: every deadline fires once, never
early and at most a resolution late, however items re-arm while they fire.
"""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shifter.tunnel.deadlines import Deadlines

# Offsets from now, in 64ths of a second: with resolutions and clock steps
# that are powers of two too, every sum is exact, so the bounds below hold
# to the last bit.
OFFSETS = st.integers(-16, 320).map(lambda n: n / 64)


class Item:
    def __init__(self, name: int, onFire: Callable[[Item], None]) -> None:
        self.name = name
        self.onFire = onFire
        self.deadline: float | None = None
        self.deadlineBucket: int | None = None

    def timedOut(self) -> None:
        self.onFire(self)

    def __hash__(self) -> int:
        # By name, so that a bucket's order, and so each example's draws,
        # are the same from run to run.
        return self.name

    def __repr__(self) -> str:
        return f"<Item {self.name}>"


class DeadlinesPropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_everyDeadlineOnTime(self, data: Any) -> None:
        """
        Items with random deadlines, re-armed, cleared and moved (earlier,
        later, their own and others') from inside C{timedOut} and from
        outside, the clock advancing in small steps: each live deadline
        fires exactly once, never before it, and no later than it plus the
        resolution (a deadline set in the past: than the time it was set
        plus the resolution).
        """
        resolution = data.draw(st.sampled_from([0.25, 0.5, 1.0]), "resolution")
        step = resolution / 4
        clock = Clock()
        deadlines = Deadlines(clock, resolution)
        # The live deadline of each item, and the latest it may fire.
        expected: dict[Item, tuple[float, float]] = {}
        problems: list[str] = []
        quiet = [False]

        def arm(item: Item, offset: float | None) -> None:
            now = clock.seconds()
            if offset is None:
                deadlines.set(item, None)
                expected.pop(item, None)
                return
            when = now + offset
            deadlines.set(item, when)
            expected[item] = (when, max(when, now) + resolution)

        def fired(item: Item) -> None:
            now = clock.seconds()
            if item not in expected:
                problems.append(f"{item} fired at {now} with no live deadline")
                return
            when, latest = expected.pop(item)
            if not when <= now <= latest:
                problems.append(f"{item} with deadline {when} fired at {now} (latest {latest})")
            if quiet[0]:
                return
            actions = data.draw(st.lists(st.tuples(st.sampled_from(items), st.none() | OFFSETS), max_size=3))
            for target, offset in actions:
                arm(target, offset)

        count = data.draw(st.integers(1, 8), "items")
        items = [Item(n, fired) for n in range(count)]

        def check() -> None:
            now = clock.seconds()
            self.assertEqual(problems, [])
            late = {item: latest for item, (_, latest) in expected.items() if latest < now}
            self.assertEqual(late, {}, f"not fired by {now}")
            self.assertEqual(len(deadlines), len(expected))

        for item in items:
            arm(item, data.draw(st.none() | OFFSETS))
        for _ in range(data.draw(st.integers(1, 12), "moves")):
            if data.draw(st.booleans()):
                arm(data.draw(st.sampled_from(items)), data.draw(st.none() | OFFSETS))
            else:
                for _ in range(data.draw(st.integers(1, 24), "steps")):
                    clock.advance(step)
                    check()
        # The end: no more re-arming; every deadline left fires.
        quiet[0] = True
        while expected:
            clock.advance(step)
            check()
        self.assertEqual(len(deadlines), 0)


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 0.1)
        self.fired: list[tuple[str, float]] = []

    def item(self, name: str, onFire: Callable[[], None] = lambda: None) -> Any:
        test = self

        class Named:
            deadline: float | None = None
            deadlineBucket: int | None = None

            def timedOut(self) -> None:
                test.fired.append((name, test.clock.seconds()))
                onFire()

        return Named()

    def test_farReArmDoesNotHoldBackEarlierKeys(self) -> None:
        """
        An item that re-arms far away while it fires does not hold back
        an earlier deadline already set: the case of an idle check beside a
        silent client's set-up deadline.
        """
        idle = self.item("idle", lambda: self.deadlines.set(idle, 3600.0))
        silent = self.item("silent")
        self.deadlines.set(idle, 1.0)
        self.deadlines.set(silent, 1.5)
        self.clock.pump([0.1] * 20)
        self.assertEqual([name for name, _ in self.fired], ["idle", "silent"])

    def test_floatKeysFire(self) -> None:
        """
        A deadline whose bucket's time the clock reads a hair early (4.3 s
        at a resolution of 0.1: 43 * 0.1 / 0.1 rounds below 43) fires when
        the timer does, without the timer spinning at the same instant.
        """
        clock = self.clock
        callLater = clock.callLater
        timers = []

        def countedCallLater(*args: Any, **kwargs: Any) -> Any:
            # A timer spinning at one instant would hang advance(): stop it.
            timers.append(args)
            if len(timers) > 10:
                raise AssertionError("the timer spins")
            return callLater(*args, **kwargs)

        clock.callLater = countedCallLater  # type: ignore[method-assign]
        item = self.item("a")
        self.deadlines.set(item, 4.3)
        self.clock.advance(4.3)
        self.clock.advance(0.1)
        self.assertEqual(len(self.fired), 1)
        self.assertGreaterEqual(self.fired[0][1], 4.3)

    def test_raisingItemDoesNotStopTheOthers(self) -> None:
        """
        An item whose C{timedOut} raises is logged; the other items of its
        bucket still fire and the timer goes on.
        """

        def fail() -> None:
            raise RuntimeError("broken")

        self.deadlines.set(self.item("bad", fail), 1.0)
        self.deadlines.set(self.item("good"), 1.0)
        later = self.item("later")
        self.deadlines.set(later, 2.0)
        self.clock.pump([0.5] * 5)
        self.assertEqual(sorted(name for name, _ in self.fired), ["bad", "good", "later"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopWhileFiring(self) -> None:
        """
        Stopping from inside an item's C{timedOut} forgets the rest of its
        bucket too, and leaves no timer.
        """
        first = self.item("first", lambda: self.deadlines.stop())
        second = self.item("second", lambda: self.deadlines.stop())
        self.deadlines.set(first, 1.0)
        self.deadlines.set(second, 1.0)
        self.deadlines.set(self.item("later"), 2.0)
        self.clock.pump([0.5] * 6)
        self.assertEqual(len(self.fired), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)
