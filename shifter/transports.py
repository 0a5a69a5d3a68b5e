"""
Twisted's TCP transports, closed with less work: Shifter's client and
plain proxy connections.

A tunnel's connections usually end once both ends have been passed on (by
the splice relay, or by the protocol): the transport has read its peer's
end and sent its own.  Twisted's C{loseConnection} then stops reading and
writing, and its C{connectionLost} stops both again; it builds a new
C{Failure} for the close, whose check for an abort then names every class
of the failure's type.  Several dozen Python calls per connection, at every
tunnel's end, for nothing.

L{QuickClose} closes such a connection with one shared failure (its class
names looked up once) and stops watching the socket once, and only for
what the reactor watches it for.  Every other close, and everything else,
is Twisted's own.  L{TunnelServer} is Twisted's server-side transport with
it; L{TunnelPort} accepts into it, and Shifter's reactor listens with it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, main, tcp
from twisted.python.failure import Failure

# The failure of every orderly close (Twisted once shared one the same way):
# it has no traceback, and its class names are looked up here, once.
CONNECTION_DONE = Failure(main.CONNECTION_DONE)
CONNECTION_DONE.parents  # noqa: B018 (fills the cache that check() reads)


class QuickClose:
    """
    A mixin for C{tcp.Connection}s: a connection that has already sent its
    end closes with the shared L{CONNECTION_DONE}, and a closed connection
    stops being watched with one check of the reactor's registrations.
    """

    # tcp.Connection's attributes this reads and sets.
    connected: int
    disconnecting: int
    disconnected: int
    producer: Any
    reactor: Any
    socket: Any
    protocol: Any
    TLS: bool
    _writeDisconnected: bool

    def loseConnection(self) -> None:
        if self._writeDisconnected and self.connected and not self.disconnecting and not self.TLS:
            # Nothing left to write (Twisted would stop reading and writing
            # here, and again in connectionLost).
            self.connectionLost(CONNECTION_DONE)
            return
        super().loseConnection()  # type: ignore[misc]

    def connectionLost(self, reason: Failure) -> None:
        # tcp.Connection.connectionLost and FileDescriptor.connectionLost,
        # stopping reading and writing with one look at the reactor's sets.
        if not hasattr(self, "socket"):
            return  # called twice (an abort from dataReceived, then an exception)
        self.disconnected = 1
        self.connected = 0
        if self.producer is not None:
            self.producer.stopProducing()
            self.producer = None
        unwatch(self.reactor, self)
        self._closeSocket(reason is CONNECTION_DONE or not reason.check(error.ConnectionAborted))  # type: ignore[attr-defined]
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno  # type: ignore[attr-defined]
        protocol.connectionLost(reason)


def unwatch(reactor: Any, selectable: Any) -> None:
    """
    Stop C{reactor} watching C{selectable}, for reading and writing: one
    call on Shifter's reactor (which keeps to what it watches the
    descriptor for), stopReading and stopWriting on another.
    """
    forget = getattr(reactor, "forget", None)
    if forget is not None:
        forget(selectable)
    else:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)


class TunnelServer(QuickClose, tcp.Server):
    """
    An accepted TCP connection: Twisted's, with L{QuickClose}.
    """


class TunnelPort(tcp.Port):
    """
    A TCP listening port whose connections are L{TunnelServer}s.
    """

    transport = TunnelServer
