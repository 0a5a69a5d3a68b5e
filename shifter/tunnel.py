"""
The life of one tunnel, as an explicit state machine.

(The machine itself is being written; for now this module holds what the
control socket and other readers see of a tunnel.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TunnelInfo:
    """
    A snapshot of one client connection and its tunnel, for operators.

    @ivar client: the client's address and port, as C{"192.0.2.2:50000"}
        or C{"[2001:db8::2]:50000"}.
    @ivar destination: the original destination, or C{"(unknown)"} until
        it is resolved.
    @ivar connectTarget: what CONNECT asks for (C{host:port}), or C{""}
        until that is decided.
    @ivar proxy: the proxy being tried or in use, or C{""} before one is.
    @ivar state: the tunnel's state (C{"resolving"}, C{"relaying"}, ...).
    @ivar bytesUp: bytes received from the client so far.
    @ivar bytesDown: bytes received from the proxy (after its answer) so far.
    @ivar age: seconds since the client connection was accepted.
    """

    client: str
    destination: str
    connectTarget: str
    proxy: str
    state: str
    bytesUp: int
    bytesDown: int
    age: float
