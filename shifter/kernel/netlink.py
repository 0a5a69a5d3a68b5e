"""
Netlink in the reactor.

A netlink socket is a datagram socket the kernel answers on.  Twisted has
no port for it (C{adoptDatagramPort} refuses the address family), so
L{NetlinkPort} joins the reactor the way Twisted's inotify support does: a
L{FileDescriptor} with C{fileno}, C{doRead} and C{connectionLost} around a
non-blocking descriptor, with the one OS call that makes the socket held in
a class attribute so tests can swap it.

L{NetlinkProtocol} speaks the request/reply half of netlink on top of it:
each request gets a sequence number and a C{Deferred}; replies are matched
back by that number, however many requests are in flight and in whatever
order the answers come; dumps are gathered up to C{NLMSG_DONE}; error
replies become L{NetlinkError}; requests that get no answer time out; and
closing the port fails everything still waiting.  It also resolves generic
netlink family ids through the controller.

pyroute2 is used for its message classes only (encoding and decoding).  Its
sockets run an event loop of their own and are never used here.  Framing,
error replies and acknowledgements are handled by the small sans-I/O
functions below, so that untrusted bytes from the socket never reach a code
path that could loop or raise out of the reactor.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NETLINK_GENERIC,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    ctrlmsg,
    nlmsg,
)

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "NETLINK_GENERIC",
    "NETLINK_NETFILTER",
    "NetlinkException",
    "NetlinkError",
    "NetlinkNotFound",
    "FamilyNotFound",
    "NetlinkOverrun",
    "NetlinkTimeout",
    "NetlinkClosed",
    "NetlinkDecodeError",
    "MalformedMessage",
    "Header",
    "encodeMessage",
    "encodeRequest",
    "encodeAttribute",
    "parseAttributes",
    "splitMessages",
    "parseError",
    "parseDone",
    "decodeMessage",
    "NetlinkPort",
    "NetlinkProtocol",
]

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

NLMSG_NOOP = 1
NLMSG_OVERRUN = 4
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NLA_TYPE_MASK = 0x3FFF
GENL_NAMSIZ = 16

_HEADER = struct.Struct("=IHHII")
_INT = struct.Struct("=i")
_NLA = struct.Struct("=HH")
HEADER_SIZE = _HEADER.size


def _align(length: int) -> int:
    return (length + 3) & ~3


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class NetlinkException(Exception):
    """
    A netlink request did not get the answer it asked for.
    """


class NetlinkError(NetlinkException):
    """
    The kernel answered a request with an error (C{NLMSG_ERROR} with a
    negative errno, or a failed dump).

    @ivar errno: the (positive) error number.
    @ivar message: the kernel's extended-ack message, or C{strerror}.
    """

    def __init__(self, errno: int, message: Optional[str] = None) -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.message} ({name})"

    @classmethod
    def fromErrno(cls, errno: int, message: Optional[str] = None) -> "NetlinkError":
        """
        The most specific L{NetlinkError} for C{errno}.
        """
        if errno == _errno.ENOENT:
            return NetlinkNotFound(errno, message)
        if errno == _errno.ENOBUFS:
            return NetlinkOverrun(errno, message)
        return cls(errno, message)


class NetlinkNotFound(NetlinkError):
    """
    The kernel has no such object (C{-ENOENT}).
    """


class FamilyNotFound(NetlinkNotFound):
    """
    The generic netlink controller knows no family by this name (its module
    is not loaded, or the kernel lacks it).

    @ivar family: the name that was asked for.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        super().__init__(
            _errno.ENOENT, f"generic netlink family {family!r} not found"
        )


class NetlinkOverrun(NetlinkError):
    """
    The socket's receive buffer overflowed (C{ENOBUFS}): the kernel dropped
    replies, so no request still waiting can be trusted to get one.
    """


class NetlinkTimeout(NetlinkException):
    """
    No answer came within the time allowed.
    """


class NetlinkClosed(NetlinkException):
    """
    The netlink socket was closed while a request was waiting.
    """


class NetlinkDecodeError(NetlinkException):
    """
    A reply arrived but could not be decoded.
    """


class MalformedMessage(ValueError):
    """
    Bytes from the socket that are not a well-formed netlink message.
    """


# --------------------------------------------------------------------------
# The codec: bytes in, bytes out, no I/O
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """
    A netlink message header (C{struct nlmsghdr}).
    """

    length: int
    type: int
    flags: int
    sequence: int
    pid: int


def encodeMessage(
    message: Union[nlmsg, bytes],
    messageType: int,
    flags: int,
    sequence: int,
    pid: int = 0,
) -> bytes:
    """
    Encode one netlink message.

    @param message: a pyroute2 message with its fields and attributes
        filled in (its header is overwritten), or the bytes that follow the
        netlink header (for generic netlink, the family header and the
        attributes), already encoded.
    @param messageType: the netlink message type (for generic netlink, the
        family id).
    @param flags: its C{NLM_F_*} flags.
    @param sequence: its sequence number.
    @param pid: its port id.
    """
    if isinstance(message, (bytes, bytearray)):
        return (
            _HEADER.pack(HEADER_SIZE + len(message), messageType, flags, sequence, pid)
            + message
        )
    message["header"]["type"] = messageType
    message["header"]["flags"] = flags
    message["header"]["sequence_number"] = sequence
    message["header"]["pid"] = pid
    message.reset()
    message.encode()
    return bytes(message.data)


def encodeRequest(
    message: Union[nlmsg, bytes],
    messageType: int,
    flags: int,
    sequence: int,
    pid: int = 0,
) -> bytes:
    """
    Encode a request: L{encodeMessage} with C{NLM_F_REQUEST} added to
    C{flags}.
    """
    return encodeMessage(message, messageType, flags | NLM_F_REQUEST, sequence, pid)


def encodeAttribute(kind: int, payload: bytes) -> bytes:
    """
    One netlink attribute (C{struct nlattr} and its payload), padded to
    four bytes.
    """
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def parseAttributes(data: bytes, offset: int) -> dict[int, bytes]:
    """
    The attributes in C{data} from C{offset} to its end, by type (the
    C{NLA_F_NESTED} and C{NLA_F_NET_BYTEORDER} bits cleared); the last of
    repeated types wins.

    @raise MalformedMessage: for an attribute that does not fit.
    """
    attributes = {}
    end = len(data)
    while offset < end:
        if end - offset < _NLA.size:
            raise MalformedMessage(f"{end - offset} trailing bytes after the attributes")
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > end:
            raise MalformedMessage(
                f"attribute {kind & NLA_TYPE_MASK} claims {length} bytes "
                f"with {end - offset} left"
            )
        attributes[kind & NLA_TYPE_MASK] = data[offset + _NLA.size : offset + length]
        offset += _align(length)
    return attributes


def splitMessages(data: bytes) -> Iterator[tuple[Header, bytes]]:
    """
    Split a datagram into its netlink messages.

    Yields each message's header and its bytes (header included, padding
    excluded), then raises L{MalformedMessage} if the rest of the datagram
    is not a whole message: the messages before a bad one are still good.
    """
    offset = 0
    while offset < len(data):
        remaining = len(data) - offset
        if remaining < HEADER_SIZE:
            raise MalformedMessage(
                f"{remaining} trailing bytes at offset {offset}, "
                f"too short for a netlink header"
            )
        header = Header(*_HEADER.unpack_from(data, offset))
        if header.length < HEADER_SIZE or header.length > remaining:
            raise MalformedMessage(
                f"message at offset {offset} claims {header.length} bytes "
                f"with {remaining} left"
            )
        yield header, data[offset : offset + header.length]
        offset += _align(header.length)


def _nlaString(data: bytes, offset: int, wanted: int) -> Optional[str]:
    """
    Find attribute C{wanted} among the NLAs in C{data} from C{offset} and
    return it as a NUL-terminated string.
    """
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > len(data):
            return None
        if kind & NLA_TYPE_MASK == wanted:
            raw = data[offset + _NLA.size : offset + length]
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += _align(length)
    return None


def parseError(message: bytes) -> tuple[int, Optional[str]]:
    """
    Read an C{NLMSG_ERROR} message.

    @param message: the whole message, header included.
    @return: the error number (0 for an acknowledgement, negative for an
        error, as the kernel sends it) and the extended-ack message if the
        kernel gave one.
    @raise MalformedMessage: if the message is too short to hold one.
    """
    header = Header(*_HEADER.unpack_from(message, 0))
    if len(message) < HEADER_SIZE + _INT.size:
        raise MalformedMessage(f"error message of {len(message)} bytes")
    (error,) = _INT.unpack_from(message, HEADER_SIZE)
    text = None
    if header.flags & NLM_F_ACK_TLVS:
        # struct nlmsgerr: the error, then the request's header (and its
        # payload unless the kernel capped it), then the TLVs.
        original = HEADER_SIZE + _INT.size
        if header.flags & NLM_F_CAPPED:
            tlvs = original + HEADER_SIZE
        elif original + HEADER_SIZE <= len(message):
            (requestLength,) = struct.unpack_from("=I", message, original)
            tlvs = original + _align(requestLength)
        else:
            tlvs = len(message)
        text = _nlaString(message, tlvs, NLMSGERR_ATTR_MSG)
    return error, text or None


def parseDone(message: bytes) -> int:
    """
    Read an C{NLMSG_DONE} message: the dump's status, 0 or a negative
    errno (0 when the kernel sent none).
    """
    if len(message) >= HEADER_SIZE + _INT.size:
        return int(_INT.unpack_from(message, HEADER_SIZE)[0])
    return 0


def decodeMessage(message: bytes, messageClass: type[nlmsg]) -> nlmsg:
    """
    Decode one message with a pyroute2 message class.

    @raise MalformedMessage: if the class cannot decode it.
    """
    decoded = messageClass(message)
    try:
        decoded.decode()
    except Exception as e:  # pyroute2 raises many kinds on bad bytes
        raise MalformedMessage(
            f"{messageClass.__name__} cannot decode {len(message)} bytes: {e}"
        ) from e
    return decoded


# --------------------------------------------------------------------------
# The socket in the reactor
# --------------------------------------------------------------------------


class NetlinkPort(FileDescriptor):
    """
    A netlink socket driven by the reactor.

    Datagrams from the kernel go to the protocol's C{datagramReceived};
    datagrams from anyone else (another process can unicast to our port)
    are dropped.  A receive-buffer overrun (C{ENOBUFS}) is reported to the
    protocol's C{receiveOverrun}.  The protocol must also have
    C{makeConnection(port)} and C{connectionLost(reason)}.

    @cvar _socketFactory: makes the socket: called with
        C{(AF_NETLINK, SOCK_RAW, netlinkProtocol)}.  Tests swap it.
    """

    log = Logger()
    _socketFactory: Callable[[int, int, int], Any] = socket.socket

    maxPacketSize = 65536
    # Datagrams read per doRead call, so a burst cannot starve the reactor.
    maxDatagramsPerRead = 256

    def __init__(
        self,
        netlinkProtocol: int,
        protocol: Any,
        reactor: Optional[IReactorFDSet] = None,
        receiveBuffer: int = 1 << 20,
        groups: int = 0,
    ) -> None:
        """
        @param netlinkProtocol: the netlink protocol number
            (C{NETLINK_GENERIC}, C{NETLINK_NETFILTER}, ...).
        @param protocol: what the datagrams go to (a L{NetlinkProtocol}).
        @param receiveBuffer: the receive buffer to ask for, in bytes:
            beyond C{net.core.rmem_max} only with C{CAP_NET_ADMIN}.
        @param groups: the multicast groups to bind to, as a bit mask.
        """
        FileDescriptor.__init__(self, reactor=reactor)
        self.netlinkProtocol = netlinkProtocol
        self.protocol = protocol
        self.receiveBuffer = receiveBuffer
        self.groups = groups
        self.socket: Any = None
        self.portId: Optional[int] = None

    def __repr__(self) -> str:
        return f"<NetlinkPort protocol={self.netlinkProtocol} port={self.portId}>"

    def startListening(self) -> None:
        """
        Open and bind the socket, start reading, and connect the protocol.

        @raise OSError: if the socket cannot be made (unknown protocol,
            no permission).
        """
        sock = type(self)._socketFactory(
            socket.AF_NETLINK, socket.SOCK_RAW, self.netlinkProtocol
        )
        try:
            sock.setblocking(False)
            self._sizeReceiveBuffer(sock)
            # Error replies carry the kernel's message, and not the whole
            # request back.  Older kernels lack these; nothing depends on them.
            for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                try:
                    sock.setsockopt(SOL_NETLINK, option, 1)
                except OSError:
                    pass
            sock.bind((0, self.groups))
            self.portId = sock.getsockname()[0]
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        # As in inotify: nothing to write, so loseConnection closes at once.
        self.connected = 1
        self._writeDisconnected = True
        self.startReading()
        self.protocol.makeConnection(self)

    def _sizeReceiveBuffer(self, sock: Any) -> None:
        # A privileged process may pass net.core.rmem_max; others get what
        # it allows.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.receiveBuffer)
            return
        except OSError:
            pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBuffer)
        except OSError as e:
            self.log.warn("cannot size the netlink receive buffer: {error}", error=e)

    def fileno(self) -> int:
        if self.socket is None:
            return -1
        return int(self.socket.fileno())

    def sendBufferSize(self) -> Optional[int]:
        """
        The socket's send buffer, in bytes (C{SO_SNDBUF}, as the kernel
        reports it), or C{None} if it cannot be read.  Netlink refuses a
        datagram longer than this (less a few bytes) with C{EMSGSIZE}.
        """
        if self.socket is None:
            return None
        try:
            return int(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        except OSError:
            return None

    def send(self, datagram: bytes) -> None:
        """
        Send one datagram to the kernel.

        @raise OSError: if the kernel refuses it.
        """
        if not self.connected or self.disconnecting or self.socket is None:
            raise OSError(_errno.ENOTCONN, "netlink socket is closed")
        self.socket.sendto(datagram, (0, 0))

    def doRead(self) -> Optional[Failure]:
        for _ in range(self.maxDatagramsPerRead):
            if self.socket is None:
                return None
            try:
                data, _, flags, address = self.socket.recvmsg(self.maxPacketSize)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno == _errno.ENOBUFS:
                    self.log.warn(
                        "netlink receive buffer overrun on {port}: replies lost",
                        port=self,
                    )
                    self.protocol.receiveOverrun(e)
                    continue
                self.log.failure("netlink socket {port} failed", port=self)
                return Failure(main.CONNECTION_LOST)
            if flags & socket.MSG_TRUNC:
                self.log.warn(
                    "dropped a netlink datagram longer than {size} bytes",
                    size=self.maxPacketSize,
                )
                continue
            if address and address[0] != 0:
                self.log.warn(
                    "dropped a netlink datagram from port {sender}, not the kernel",
                    sender=address[0],
                )
                continue
            try:
                self.protocol.datagramReceived(data)
            except Exception:
                self.log.failure("netlink protocol failed on a datagram")
        return None

    def connectionLost(self, reason: Failure) -> None:
        FileDescriptor.connectionLost(self, reason)
        sock, self.socket = self.socket, None
        if sock is not None:
            sock.close()
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


# --------------------------------------------------------------------------
# Requests and replies
# --------------------------------------------------------------------------


@dataclass
class _Request:
    sequence: int
    datagram: bytes
    dump: bool
    ack: bool
    raw: bool
    deferred: Deferred[list[Any]]
    timer: Optional[IDelayedCall] = None
    replies: list[Any] = field(default_factory=list)
    sent: bool = False


class NetlinkProtocol:
    """
    Requests to the kernel over a L{NetlinkPort}, each answered through its
    own C{Deferred}.

    Replies are matched to requests by sequence number.  At most
    C{maxInFlight} requests are sent and unanswered at once; more wait in
    order, so that a burst cannot overflow the socket's receive buffer.

    @ivar messageClasses: netlink message type -> pyroute2 class that
        decodes replies of that type; others are decoded with
        C{defaultMessageClass}.  L{resolveFamily} adds generic netlink
        families here.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float = 5.0,
        defaultMessageClass: type[nlmsg] = nlmsg,
        messageClasses: Optional[dict[int, type[nlmsg]]] = None,
        maxInFlight: int = 64,
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.defaultMessageClass = defaultMessageClass
        self.messageClasses: dict[int, type[nlmsg]] = {GENL_ID_CTRL: ctrlmsg}
        if messageClasses:
            self.messageClasses.update(messageClasses)
        self.maxInFlight = maxInFlight
        self.transport: Optional[NetlinkPort] = None
        self._pending: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._inFlight = 0
        self._sequence = int.from_bytes(os.urandom(4), "little") or 1
        self._closed: Optional[Failure] = None

    # The port's side ------------------------------------------------------

    def makeConnection(self, transport: NetlinkPort) -> None:
        self.transport = transport

    def connectionLost(self, reason: Failure) -> None:
        """
        Fail every request still waiting with L{NetlinkClosed}.
        """
        self.transport = None
        self._closed = reason
        self._failAll(NetlinkClosed(f"netlink socket closed: {reason.getErrorMessage()}"))

    def receiveOverrun(self, error: OSError) -> None:
        """
        The receive buffer overflowed and replies were lost: fail every
        request sent so far with L{NetlinkOverrun}, since any of them may
        never be answered.  Requests not yet sent go ahead.
        """
        exception = NetlinkOverrun(
            _errno.ENOBUFS,
            "netlink receive buffer overrun, replies were lost",
        )
        for request in [r for r in self._pending.values() if r.sent]:
            self._finish(request, Failure(exception))

    def datagramReceived(self, data: bytes) -> None:
        """
        Deliver each message in a datagram to the request it answers.
        Malformed bytes and answers to no request are logged and dropped;
        a message whose handling raises is logged, and the next one is
        still delivered.
        """
        try:
            for header, message in splitMessages(data):
                try:
                    self._messageReceived(header, message)
                except Exception:
                    # One message's failure is that message's alone: the
                    # rest of the datagram still goes where it belongs.
                    self.log.failure(
                        "netlink message type {type} (sequence {sequence}) failed",
                        type=header.type,
                        sequence=header.sequence,
                    )
        except MalformedMessage as e:
            self.log.warn("dropped malformed netlink data: {reason}", reason=e)

    def unsolicitedReceived(self, header: Header, message: bytes) -> None:
        """
        A message that answers no request waiting here: a late answer to a
        request that timed out, or one the kernel sends on its own (an
        nfnetlink_queue packet, an error for a message sent with
        L{NetlinkPort.send} directly).  This protocol drops it; subclasses
        that expect such messages override this.

        @param header: the message's header.
        @param message: the whole message, header included.
        """
        self.log.debug(
            "dropped netlink message type {type} for no request "
            "(sequence {sequence})",
            type=header.type,
            sequence=header.sequence,
        )

    # The user's side -----------------------------------------------------

    def request(
        self,
        message: Union[nlmsg, bytes],
        messageType: int,
        *,
        dump: bool = False,
        ack: bool = False,
        raw: bool = False,
        timeout: Optional[float] = None,
    ) -> Deferred[list[Any]]:
        """
        Send a request and wait for its answer.

        @param message: a pyroute2 message with its fields and attributes
            set (the header is filled in here), or the bytes that follow the
            netlink header, already encoded (see L{encodeMessage}).
        @param messageType: its netlink type (a generic netlink family id).
        @param dump: ask for a dump (C{NLM_F_DUMP}): every part up to
            C{NLMSG_DONE} is gathered.
        @param ack: ask for an acknowledgement (C{NLM_F_ACK}): every reply
            up to the acknowledgement is gathered (commands that answer
            nothing else on success need this).
        @param raw: answer with each reply's bytes (header included) rather
            than a decoded message, for callers that decode their own hot
            path.
        @param timeout: seconds to wait for the whole answer (default:
            the protocol's C{timeout}), counted from this call.
        @return: a C{Deferred} firing with the list of reply messages (for
            a plain request, the one reply; for C{ack}, possibly none), or
            failing with a L{NetlinkException}.  Error replies never reach
            the list, raw or not: they fail the C{Deferred}.
        """
        if self._closed is not None or self.transport is None:
            return fail(NetlinkClosed("netlink socket is not open"))
        sequence = self._nextSequence()
        flags = NLM_F_REQUEST
        if dump:
            flags |= NLM_F_DUMP
        if ack:
            flags |= NLM_F_ACK
        datagram = encodeRequest(
            message, messageType, flags, sequence, self.transport.portId or 0
        )
        request = _Request(
            sequence,
            datagram,
            dump,
            ack,
            raw,
            Deferred(lambda d: self._cancel(sequence)),
        )
        self._pending[sequence] = request
        wait = self.timeout if timeout is None else timeout
        request.timer = self.reactor.callLater(wait, self._timedOut, sequence, wait)
        self._waiting.append(request)
        self._sendWaiting()
        return request.deferred

    def resolveFamily(
        self, name: str, messageClass: Optional[type[nlmsg]] = None
    ) -> Deferred[int]:
        """
        Find a generic netlink family's id through the controller.

        @param messageClass: if given, replies of that family are decoded
            with it from now on.
        @return: a C{Deferred} firing with the id, or failing with
            L{FamilyNotFound} when the kernel has no such family (or
            L{ValueError} for a name too long to be one).
        """
        if len(name.encode("utf-8")) >= GENL_NAMSIZ:
            return fail(
                ValueError(
                    f"{name!r}: generic netlink family names are at most "
                    f"{GENL_NAMSIZ - 1} bytes"
                )
            )
        query = ctrlmsg()
        query["cmd"] = CTRL_CMD_GETFAMILY
        query["version"] = 1
        query["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])

        def found(replies: list[nlmsg]) -> int:
            familyId = replies[0].get_attr("CTRL_ATTR_FAMILY_ID")
            if not isinstance(familyId, int):
                raise NetlinkDecodeError(
                    f"controller answered for {name!r} without a family id"
                )
            if messageClass is not None:
                self.messageClasses[familyId] = messageClass
            return familyId

        def notFound(reason: Failure) -> Failure:
            reason.trap(NetlinkNotFound)
            return Failure(FamilyNotFound(name))

        return (
            self.request(query, GENL_ID_CTRL)
            .addCallback(found)
            .addErrback(notFound)
        )

    def close(self) -> None:
        """
        Close the socket; requests still waiting fail with L{NetlinkClosed}.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    @property
    def pendingCount(self) -> int:
        """
        How many requests are waiting for an answer (sent or not).
        """
        return len(self._pending)

    # Internals -----------------------------------------------------------

    def _nextSequence(self) -> int:
        while True:
            self._sequence = (self._sequence + 1) & 0xFFFFFFFF
            if self._sequence and self._sequence not in self._pending:
                return self._sequence

    def _sendWaiting(self) -> None:
        while self._waiting and self._inFlight < self.maxInFlight:
            request = self._waiting.popleft()
            if self._pending.get(request.sequence) is not request:
                continue  # timed out or cancelled while waiting
            if self.transport is None:
                self._finish(
                    request,
                    Failure(NetlinkClosed("netlink socket closed")),
                    sendMore=False,
                )
                continue
            try:
                self.transport.send(request.datagram)
            except OSError as e:
                error = NetlinkError.fromErrno(
                    e.errno or _errno.EIO, f"sending failed: {e.strerror or e}"
                )
                self._finish(request, Failure(error), sendMore=False)
                continue
            request.sent = True
            self._inFlight += 1

    def _messageReceived(self, header: Header, message: bytes) -> None:
        request = self._pending.get(header.sequence)
        if request is None:
            self.unsolicitedReceived(header, message)
            return
        if header.type == NLMSG_ERROR:
            try:
                error, text = parseError(message)
            except MalformedMessage as e:
                self._finish(request, Failure(NetlinkDecodeError(str(e))))
                return
            if error == 0:
                self._finish(request, request.replies)
            else:
                self._finish(request, Failure(NetlinkError.fromErrno(-error, text)))
            return
        if header.type == NLMSG_DONE:
            if not request.dump:
                self.log.debug("ignored NLMSG_DONE for a request that was no dump")
                return
            status = parseDone(message)
            if status < 0:
                self._finish(request, Failure(NetlinkError.fromErrno(-status)))
            elif not request.ack:
                self._finish(request, request.replies)
            return
        if header.type in (NLMSG_NOOP, NLMSG_OVERRUN):
            return
        if request.raw:
            request.replies.append(message)
            if not request.dump and not request.ack:
                self._finish(request, request.replies)
            return
        messageClass = self.messageClasses.get(header.type, self.defaultMessageClass)
        try:
            decoded = decodeMessage(message, messageClass)
        except MalformedMessage as e:
            self.log.warn(
                "malformed netlink reply to request {sequence}: {reason}",
                sequence=header.sequence,
                reason=e,
            )
            self._finish(request, Failure(NetlinkDecodeError(str(e))))
            return
        request.replies.append(decoded)
        if not request.dump and not request.ack:
            self._finish(request, request.replies)

    def _finish(
        self, request: _Request, result: Union[list[Any], Failure], sendMore: bool = True
    ) -> None:
        if self._pending.pop(request.sequence, None) is None:
            return
        if request.sent:
            self._inFlight -= 1
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        if isinstance(result, Failure):
            request.deferred.errback(result)
        else:
            request.deferred.callback(result)
        if sendMore:
            self._sendWaiting()

    def _timedOut(self, sequence: int, wait: float) -> None:
        request = self._pending.get(sequence)
        if request is not None:
            request.timer = None
            self._finish(
                request,
                Failure(NetlinkTimeout(f"no netlink answer within {wait:g} s")),
            )

    def _cancel(self, sequence: int) -> None:
        request = self._pending.pop(sequence, None)
        if request is None:
            return
        if request.sent:
            self._inFlight -= 1
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        self._sendWaiting()

    def _failAll(self, exception: NetlinkException) -> None:
        self._waiting.clear()
        for request in list(self._pending.values()):
            self._finish(request, Failure(exception))
