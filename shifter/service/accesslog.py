"""
The access log (C{--access-log}): one line per client connection once it
has ended, in a format of named fields (C{--access-log-format}), written
to a file of its own, standard output or syslog.

The line is rendered here, once, from the tunnel's
L{shifter.tunnel.tunnel.TunnelRecord}: no logging framework runs over it.
A file is written through a small buffer of Shifter's own, flushed within
a second (or at 64 KiB, or at shutdown), and reopened on SIGHUP or SIGUSR1
after logrotate has moved it.
"""

from __future__ import annotations

import errno
import os
import socket
import string
import time
from typing import Any, Callable

from twisted.logger import Logger

from shifter.logs import RateLimitedLog, ownFiles
from shifter.tunnel.tunnel import TunnelRecord

log = Logger()

# The destinations that are not file paths.
STDOUT = "-"
SYSLOG = "syslog"

# What --access-log-format is unless told: a Squid or HAProxy admin's
# order, start and duration first, the timers as HAProxy's, the reason last.
DEFAULT_FORMAT = (
    "{start} {duration} {client} {result}/{status} {bytes_up} {bytes_down} "
    "CONNECT {connect_target} {target_from} {destination} {proxy} {timers} {id} \"{how}\""
)

# A buffer flushes at this size, or this many seconds after its first line.
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0

# syslog: facility daemon, severity info.
_SYSLOG_PRIORITY = 3 * 8 + 6
_SYSLOG_SOCKET = "/dev/log"


def _iso(when: float) -> str:
    seconds = int(when)
    millis = int((when - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _ms(start: float | None, end: float | None) -> str:
    """
    Milliseconds from C{start} to C{end}, or C{"-"} if either is not
    known (a stage never reached).
    """
    if start is None or end is None or end < start:
        return "-"
    return str(round((end - start) * 1000))


def _clean(text: str) -> str:
    """
    C{text} safe inside double quotes on one line.
    """
    if text.isprintable() and '"' not in text:
        return text
    return "".join(c if c.isprintable() and c != '"' else "'" if c == '"' else " " for c in text)


def _sniffEnd(r: TunnelRecord) -> float | None:
    return r.sniffed if r.sniffed is not None else r.resolved


def _timers(r: TunnelRecord) -> list[str]:
    return [
        _ms(r.started, r.resolved),
        _ms(r.resolved, r.sniffed),
        _ms(_sniffEnd(r), r.connecting),
        _ms(r.connecting, r.connected),
        _ms(r.connected, r.opened),
        _ms(r.opened, r.firstByte),
    ]


# Every field: its meaning (for the README and --help) and how it is
# rendered.  A value never holds a space except "how", which the default
# format quotes.
FIELDS: dict[str, tuple[str, Callable[[TunnelRecord], str]]] = {
    "start": ("when the client connection was accepted, ISO 8601 in UTC with milliseconds",
              lambda r: _iso(r.started)),
    "start_epoch": ("the same in seconds since the epoch, with milliseconds (Squid's %ts.%03tu)",
                    lambda r: f"{r.started:.3f}"),
    "duration": ("milliseconds from accepting the client to the end of both connections",
                 lambda r: _ms(r.started, r.ended)),
    "id": ("the tunnel's id, sent to the proxy in the Shifter-Tunnel header",
           lambda r: r.tunnelId),
    "client": ("the client's address:port", lambda r: r.client),
    "destination": ("the original destination, address:port, or (unknown)",
                    lambda r: r.destination),
    "connect_target": ("what CONNECT asked for, host:port, or - if no proxy was asked",
                       lambda r: r.connectTarget or "-"),
    "target_from": ("how the CONNECT target was chosen: address, sni, host (a name the client sent) or policy",
                    lambda r: r.targetFrom),
    "name": ("the name read from the client (TLS SNI or HTTP Host), or -", lambda r: r.name or "-"),
    "ech": ("what the ClientHello showed of Encrypted Client Hello: ech, grease, inner, unknown, "
            "or -; when not -, name is the ECH outer (cover) name", lambda r: r.ech or "-"),
    "proxy": ("the last proxy asked (DIRECT for the DIRECT route), or -", lambda r: r.proxy or "-"),
    "status": ("that proxy's status code for CONNECT (a SOCKS5 server's reply as one), or - if it gave none",
               lambda r: "-" if r.status is None else str(r.status)),
    "bytes_up": ("bytes delivered from the client to the proxy", lambda r: str(r.bytesUp)),
    "bytes_down": ("bytes delivered from the proxy to the client", lambda r: str(r.bytesDown)),
    "result": ("ok for a tunnel that opened, else the failure's reason, as in "
               "shifter_tunnel_failures_total (proxy-status, proxy-connect, client-denied, ...)",
               lambda r: r.result),
    "how": ("how it ended, in words", lambda r: _clean(r.how) or "-"),
    "resolve": ("milliseconds to find the original destination", lambda r: _ms(r.started, r.resolved)),
    "sniff": ("milliseconds reading the client's first bytes for a name (- without --connect-target sni/host/auto)",
              lambda r: _ms(r.resolved, r.sniffed)),
    "decide": ("milliseconds the rules or the policy took, until the first proxy connection began",
               lambda r: _ms(_sniffEnd(r), r.connecting)),
    "connect": ("milliseconds from the first proxy connection's start to the TCP connection of the last proxy tried",
                lambda r: _ms(r.connecting, r.connected)),
    "handshake": ("milliseconds from that connection to the proxy's answer opening the tunnel",
                  lambda r: _ms(r.connected, r.opened)),
    "first_byte": ("milliseconds from the opening to the first byte delivered to the client",
                   lambda r: _ms(r.opened, r.firstByte)),
    "timers": ("resolve/sniff/decide/connect/handshake/first_byte, slash-separated as HAProxy writes its timers",
               lambda r: "/".join(_timers(r))),
}


class AccessLogFormat:
    """
    A format of literal text and field names in braces (a brace of the
    text doubled), checked once and rendered by joining.
    """

    def __init__(self, format: str) -> None:
        """
        @raise ValueError: for an unknown field, a conversion or a format
            spec, or unbalanced braces.
        """
        self.format = format
        pieces: list[str | Callable[[TunnelRecord], str]] = []
        try:
            parsed = list(string.Formatter().parse(format))
        except ValueError as e:
            raise ValueError(f"{e} in {format!r} (write a literal brace twice)") from None
        for literal, field, spec, conversion in parsed:
            if literal:
                pieces.append(literal)
            if field is None:
                continue
            if spec or conversion:
                raise ValueError(f"{{{field}}}: a field takes no conversion or format spec")
            if field not in FIELDS:
                raise ValueError(f"unknown field {{{field}}}; the fields are: {', '.join(FIELDS)}")
            pieces.append(FIELDS[field][1])
        self._pieces = pieces

    def render(self, record: TunnelRecord) -> str:
        return "".join(piece if isinstance(piece, str) else piece(record) for piece in self._pieces)


class BufferedFile:
    """
    Lines appended to a file (or standard output) through a buffer: one
    C{write(2)} per second or per 64 KiB at most, whatever the number of
    tunnels.  Writing to a local file does not block for long; a failure
    is logged, limited in rate, and the lines are dropped.

    @ivar path: the file, or C{None} for standard output.
    """

    def __init__(self, path: str | None, reactor: Any, errors: RateLimitedLog | None = None) -> None:
        self.path = os.path.abspath(path) if path is not None else None
        self._reactor = reactor
        self._buffer: list[bytes] = []
        self._size = 0
        self._timer: Any = None
        self._errors = errors or RateLimitedLog(log, reactor, interval=60.0)
        self.fd = self._open() if self.path is not None else 1

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "replace") + b"\n"
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._reactor.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._buffer or self.fd < 0:
            return
        data = memoryview(b"".join(self._buffer))
        self._buffer, self._size = [], 0
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError as e:
            self._errors.warn(
                "access-log", "access log {path}: {error}; lines lost",
                path=self.path or "(standard output)", error=e.strerror or e,
            )

    def reopen(self) -> bool:
        """
        Flush, then open the path again (logrotate has moved the file).

        @return: whether a file was reopened.
        """
        if self.path is None:
            return False
        self.flush()
        new = self._open()
        old, self.fd = self.fd, new
        if old >= 0:
            os.close(old)
        return True

    def close(self) -> None:
        self.flush()
        self._errors.stop()
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SyslogWriter:
    """
    Each line as one datagram to the local syslog socket (facility daemon,
    severity info, tag C{shifter}), never blocking: a line the socket
    cannot take now is dropped and counted.

    @ivar dropped: lines dropped.
    """

    def __init__(self, address: str = _SYSLOG_SOCKET, tag: str = "shifter") -> None:
        self.address = address
        self._prefix = f"<{_SYSLOG_PRIORITY}>{tag}[{os.getpid()}]: ".encode()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._socket.connect(address)
        self.dropped = 0

    def write(self, line: str) -> None:
        try:
            self._socket.send(self._prefix + line.encode("utf-8", "replace"))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.ENOENT):
                raise
            self.dropped += 1

    def flush(self) -> None:
        pass

    def reopen(self) -> bool:
        return False

    def close(self) -> None:
        self._socket.close()


class AccessLog:
    """
    One line per client connection once it has ended, through C{writer}
    (a L{BufferedFile} or L{SyslogWriter}), in C{format}.  The factory calls
    L{tunnelEnded}.
    """

    def __init__(self, format: AccessLogFormat, writer: Any) -> None:
        self.format = format
        self.writer = writer
        self.lines = 0

    def tunnelEnded(self, record: TunnelRecord) -> None:
        self.writer.write(self.format.render(record))
        self.lines += 1

    def reopen(self) -> bool:
        return bool(self.writer.reopen())

    def close(self) -> None:
        if self in ownFiles:
            ownFiles.remove(self)
        self.writer.close()


def openAccessLog(destination: str, format: str, reactor: Any) -> AccessLog:
    """
    The access log C{--access-log} names: a file path, C{"-"} (standard
    output) or C{"syslog"}; reopened with the other log files on SIGHUP and
    SIGUSR1.

    @raise OSError: if the file or the syslog socket cannot be opened.
    @raise ValueError: if C{format} is not a valid format.
    """
    parsed = AccessLogFormat(format)
    writer: Any
    if destination == SYSLOG:
        writer = SyslogWriter()
    else:
        writer = BufferedFile(None if destination == STDOUT else destination, reactor)
    accessLog = AccessLog(parsed, writer)
    ownFiles.append(accessLog)
    return accessLog


def checkDestination(destination: str) -> None:
    """
    Check, without opening anything, that C{--access-log} can be opened.

    @raise ValueError: with the reason it cannot.
    """
    if destination == STDOUT:
        return
    if destination == SYSLOG:
        if not os.path.exists(_SYSLOG_SOCKET):
            raise ValueError(f"syslog: {_SYSLOG_SOCKET} does not exist (no syslog daemon or journald here)")
        return
    path = os.path.abspath(destination)
    if os.path.isdir(path):
        raise ValueError(f"{destination!r} is a directory")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{destination!r} is not writable")
        return
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"{destination!r}: no directory {directory!r}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{destination!r}: cannot create files in {directory!r}")
