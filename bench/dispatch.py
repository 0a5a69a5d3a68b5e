"""
What one event costs a state machine: automat's MethodicalMachine (the
style of txtorcon's _SocksMachine) against a plain table of (state, event)
-> method, as shifter.tunnel.tunnel uses.  A tunnel handles about ten events, so
the difference is paid ten times per connection.

    python bench/dispatch.py

Prints nanoseconds per event for each, and their ratio, measured in one
run.
"""

from __future__ import annotations

import timeit

from automat import MethodicalMachine

A, B = "a", "b"


class WithAutomat:
    _machine = MethodicalMachine()

    def __init__(self) -> None:
        self.n = 0

    @_machine.state(initial=True)
    def a(self) -> None:
        "waiting for go"

    @_machine.state()
    def b(self) -> None:
        "waiting for back"

    @_machine.input()
    def go(self, x: int) -> None:
        "go"

    @_machine.input()
    def back(self, x: int) -> None:
        "back"

    @_machine.output()
    def _count(self, x: int) -> None:
        self.n += x

    a.upon(go, enter=b, outputs=[_count])
    b.upon(back, enter=a, outputs=[_count])


class WithTable:
    __slots__ = ("state", "n")

    def __init__(self) -> None:
        self.state = A
        self.n = 0

    def _goFromA(self, x: int) -> None:
        self.state = B
        self.n += x

    def _backFromB(self, x: int) -> None:
        self.state = A
        self.n += x

    def go(self, x: int) -> None:
        _GO[self.state](self, x)

    def back(self, x: int) -> None:
        _BACK[self.state](self, x)


_GO = {A: WithTable._goFromA}
_BACK = {B: WithTable._backFromB}


def perEvent(machine: type, rounds: int = 100_000) -> float:
    instance = machine()

    def run() -> None:
        instance.go(1)
        instance.back(1)

    return min(timeit.repeat(run, number=rounds, repeat=5)) / (2 * rounds) * 1e9


def main() -> None:
    automat = perEvent(WithAutomat)
    table = perEvent(WithTable)
    print(f"automat MethodicalMachine: {automat:7.0f} ns per event")
    print(f"plain (state, event) table: {table:7.0f} ns per event")
    print(f"ratio: {automat / table:.0f}x")


if __name__ == "__main__":
    main()
