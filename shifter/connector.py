"""
A plain TCP connection to a proxy at a known address, made with as little
work per connection as the reactor's public API allows.

C{reactor.connectTCP} waits a reactor turn before it even calls
C{connect()}, goes through a C{Deferred} for the address it was given,
calls C{connect()} twice and schedules a timeout of its own.  Here the
socket is made and C{connect()} called at once, the reactor watches it for
writability, and the connected socket is handed to the reactor with
L{IReactorSocket.adoptStreamConnection}, which gives an ordinary TCP
transport.  There is no timeout here: the tunnel's deadline covers it.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from twisted.internet import error
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

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
    adopted by the reactor with C{factory}, whose C{buildProtocol} gives the
    protocol; if it cannot be made, C{factory.clientConnectionFailed} is
    told why (with C{None} for the connector).
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
        self.target.reactor.removeWriter(self)
        self.socket = None
        try:
            self.target.reactor.adoptStreamConnection(sock.fileno(), self.target.family, self.factory)
        except OSError as e:
            # The reactor takes a descriptor of its own (a dup), which can
            # run out like any other.
            self._failed(error.getConnectError((e.errno, e.strerror)))
        finally:
            sock.close()  # the reactor holds its own descriptor now

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


def connectNow(target: DirectTCP, factory: ClientFactory) -> PendingConnection:
    """
    Start connecting to C{target}; C{factory} builds the protocol once
    connected, or hears why not.

    @return: the pending connection, whose C{stop} gives up on it.
    """
    pending = PendingConnection(target, factory)
    pending.start()
    return pending

