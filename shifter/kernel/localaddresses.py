"""
This machine's addresses, from a netlink C{RTM_GETADDR} dump read in the
reactor.

The request and the few fields read from the answer (the address family
and the C{IFA_LOCAL}/C{IFA_ADDRESS} attributes) are packed and unpacked
here with C{struct}, so that reading them needs no netlink library: a
Shifter with the default resolver never loads one.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr
_ERROR = struct.Struct("=i")
_SIZES: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}


class NetlinkDumpError(Exception):
    """
    The kernel refused the dump, or its answer could not be read.
    """


def dumpRequest(sequence: int) -> bytes:
    """
    The C{RTM_GETADDR} dump request for every address of every family.
    """
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _HEADER.pack(_HEADER.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + body


def parseDump(data: bytes, sequence: int) -> tuple[set[str], bool]:
    """
    The addresses in one datagram of the answer, and whether it ended the
    dump.

    @raise NetlinkDumpError: for an error answer or a message cut short.
    """
    found: set[str] = set()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise NetlinkDumpError(f"netlink message of {length} bytes cut short")
        body = offset + _HEADER.size
        end = offset + length
        offset += (length + 3) & ~3
        if seq != sequence:
            continue
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (code,) = _ERROR.unpack_from(data, body)
            if code:
                raise NetlinkDumpError(os.strerror(-code))
            continue
        if kind != RTM_NEWADDR or body + _IFADDRMSG.size > end:
            continue
        family = data[body]
        size = _SIZES.get(family)
        if size is None:
            continue
        position = body + _IFADDRMSG.size
        chosen = None
        while position + _ATTRIBUTE.size <= end:
            attributeLength, attributeType = _ATTRIBUTE.unpack_from(data, position)
            if attributeLength < _ATTRIBUTE.size or position + attributeLength > end:
                break
            value = data[position + _ATTRIBUTE.size : position + attributeLength]
            if attributeType in (IFA_LOCAL, IFA_ADDRESS) and len(value) == size:
                # IFA_LOCAL is the address itself where the two differ
                # (point-to-point links).
                if attributeType == IFA_LOCAL or chosen is None:
                    chosen = value
            position += (attributeLength + 3) & ~3
        if chosen is not None:
            found.add(socket.inet_ntop(family, chosen))
    return found, False


@implementer(IReadDescriptor)
class _DumpReader:
    """
    A netlink route socket in the reactor, reading one dump's answer.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.done: Deferred[frozenset[str]] = Deferred()
        self.found: set[str] = set()
        self.sequence = 1
        self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.socket.setblocking(False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        self.timer = reactor.callLater(timeout, self._finish, Failure(NetlinkDumpError("no answer in time")))

    def start(self) -> None:
        self.socket.send(dumpRequest(self.sequence))
        # The kernel answers a dump request while it is sent, so reading
        # now usually ends it here, before the reactor turns.
        self.doRead()
        if not self.done.called:
            self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "netlink address dump"

    def doRead(self) -> None:
        while not self.done.called:
            try:
                data = self.socket.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                self._finish(Failure(NetlinkDumpError(e.strerror or errno.errorcode.get(e.errno or 0, "error"))))
                return
            try:
                addresses, ended = parseDump(data, self.sequence)
            except NetlinkDumpError:
                self._finish(Failure())
                return
            self.found |= addresses
            if ended:
                self._finish(frozenset(self.found))

    def connectionLost(self, reason: Failure) -> None:
        self._finish(Failure(NetlinkDumpError(reason.getErrorMessage())))

    def _finish(self, result: Any) -> None:
        if self.done.called:
            return
        if self.timer.active():
            self.timer.cancel()
        self.reactor.removeReader(self)
        self.socket.close()
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)


def readLocalAddresses(reactor: Any, timeout: float = 5.0) -> Deferred[frozenset[str]]:
    """
    This machine's addresses (in this network namespace), compressed.

    @return: a C{Deferred} firing with them, or failing with
        L{NetlinkDumpError} (or C{OSError} if no netlink socket can be
        made).
    """
    try:
        reader = _DumpReader(reactor, timeout)
    except OSError:
        from twisted.internet.defer import fail

        return fail()
    reader.start()
    return reader.done
