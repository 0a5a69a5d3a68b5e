"""
A plain TCP connection to a proxy at a known address, made with as little
work per connection as Twisted allows.

C{reactor.connectTCP} waits a reactor turn before it even calls
C{connect()}, goes through a C{Deferred} for the address it was given,
calls C{connect()} twice and schedules a timeout of its own.  Here the
socket is made and C{connect()} called at once, the reactor watches it for
writability, and the connected socket becomes an ordinary Twisted TCP
transport (L{ProxyConnection}, a C{tcp.Connection}) holding the same
descriptor: a tunnel never needs a third one, even for a moment.  There is
no timeout here: the tunnel's deadline covers it.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from shifter.transports import QuickClose

# linux/socket.h
SO_MARK = 36

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 0)


@dataclass(frozen=True)
class DirectTCP:
    """
    Where and how a proxy is reached over plain TCP.

    @ivar reactor: the reactor (with C{IReactorFDSet} and C{IReactorSocket}).
    @ivar host: the proxy's IP address.
    @ivar port: the proxy's port.
    @ivar mark: a netfilter mark (C{SO_MARK}) for the connection, or 0.
    """

    reactor: Any
    host: str
    port: int
    mark: int = 0

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@implementer(IReadWriteDescriptor)
class PendingConnection:
    """
    A connection being made: the socket is watched for writability, then
    becomes a L{ProxyConnection} for the protocol C{factory.buildProtocol}
    gives; if it cannot be made, C{factory.clientConnectionFailed} is told
    why (with C{None} for the connector).
    """

    def __init__(self, target: DirectTCP, factory: ClientFactory) -> None:
        self.target = target
        self.factory = factory
        self.socket: socket.socket | None = None

    def start(self) -> None:
        target = self.target
        try:
            sock = socket.socket(target.family, socket.SOCK_STREAM)
        except OSError as e:
            self._failed(error.ConnectBindError(e.errno, e.strerror))
            return
        sock.setblocking(False)
        try:
            # Without Nagle: the client's early bytes go right behind the
            # CONNECT request, not a round trip later (when the proxy has
            # acknowledged it), and so does each chunk relayed after.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, target.mark)
            result = sock.connect_ex((target.host, target.port))
        except OSError as e:
            result = e.errno or errno.EIO
        if result not in _IN_PROGRESS and result != errno.EISCONN:
            sock.close()
            self._failed(error.getConnectError((result, os.strerror(result))))
            return
        self.socket = sock
        target.reactor.addWriter(self)

    def stop(self) -> None:
        """
        Give up: stop watching and close the socket.  The factory is told
        with C{UserError}, as for a connector that stopped connecting.
        """
        if self.socket is not None:
            self._close()
            self._failed(error.UserError())

    def _close(self) -> None:
        sock, self.socket = self.socket, None
        self.target.reactor.removeWriter(self)
        sock.close()  # type: ignore[union-attr]

    def _failed(self, reason: Exception) -> None:
        self.factory.clientConnectionFailed(None, Failure(reason))  # type: ignore[arg-type]

    # IReadWriteDescriptor, for the reactor.

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "shifter proxy connection"

    def doWrite(self) -> None:
        sock = self.socket
        if sock is None:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._close()
            self._failed(error.getConnectError((code, os.strerror(code))))
            return
        target = self.target
        reactor = target.reactor
        peer = (IPv6Address if target.family == socket.AF_INET6 else IPv4Address)("TCP", target.host, target.port)
        protocol = self.factory.buildProtocol(peer)
        if protocol is None:
            self._close()
            return
        transport = ProxyConnection(sock, protocol, reactor, peer)
        # On Shifter's reactor the transport takes this registration over
        # (its startReading below then has nothing to do).
        becomesReader = getattr(reactor, "writerBecomesReader", None)
        if becomesReader is None or not becomesReader(self, transport):
            reactor.removeWriter(self)
        self.socket = None
        # Reading first, as Twisted's own clients do: the protocol may hand
        # the socket over (to the splice relay) from connectionMade.
        transport.startReading()
        protocol.makeConnection(transport)

    def doRead(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error or hang-up on the socket.
        sock = self.socket
        if sock is None:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
        self.socket = None
        sock.close()
        self._failed(error.getConnectError((code, os.strerror(code))))


class ProxyConnection(QuickClose, tcp.Connection):
    """
    A connected socket to a proxy, as a Twisted TCP transport (closed with
    L{QuickClose}).
    """

    logstr = "shifter proxy connection"

    def __init__(self, sock: socket.socket, protocol: Any, reactor: Any, peer: IPv4Address | IPv6Address) -> None:
        super().__init__(sock, protocol, reactor)
        self.connected = 1
        self.peer = peer

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self.peer

    def unsent(self) -> int:
        """
        Bytes written to this transport that Twisted has yet to send.
        """
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)

    def __repr__(self) -> str:
        return f"<ProxyConnection to {self.peer.host}:{self.peer.port}>"


def noDelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under C{transport}
    (a TLS transport passes it on), as L{PendingConnection} does for the
    sockets it makes itself.
    """
    if isinstance(transport, ProxyConnection):
        return  # made without it
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass  # not TCP after all, or already gone


def connectNow(target: DirectTCP, factory: ClientFactory) -> PendingConnection:
    """
    Start connecting to C{target}; C{factory} builds the protocol once
    connected, or hears why not.

    @return: the pending connection, whose C{stop} gives up on it.
    """
    pending = PendingConnection(target, factory)
    pending.start()
    return pending

