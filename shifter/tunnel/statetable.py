"""
The dispatch table of an explicit state machine: for every state and every
event, the one method that handles it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def buildTable(
    machine: type, states: Sequence[str], events: Sequence[str], *rows: tuple[Any, Any, str]
) -> dict[str, dict[str, Callable[..., Any]]]:
    """
    Build C{table[event][state]} from C{(states, events, action)} rows,
    where C{states} and C{events} are one name or a tuple of names and
    C{action} names a method of C{machine}.

    @raise AssertionError: when a (state, event) pair is named by no row,
        or by more than one: every pair is decided on purpose.
    """
    table: dict[str, dict[str, Callable[..., Any]]] = {event: {} for event in events}
    for rowStates, rowEvents, action in rows:
        for event in (rowEvents,) if isinstance(rowEvents, str) else rowEvents:
            for state in (rowStates,) if isinstance(rowStates, str) else rowStates:
                if state in table[event]:
                    raise AssertionError(f"({state}, {event}) is declared twice")
                table[event][state] = getattr(machine, action)
    missing = [(s, e) for e in events for s in states if s not in table[e]]
    if missing:
        raise AssertionError(f"undeclared (state, event) pairs: {missing}")
    return table
