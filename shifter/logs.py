"""
Logging helpers: the service log's forms (C{--log-format text|json|journald}),
reopening log files on SIGHUP, and log lines limited in rate for what a
client can repeat at will.

C{--log-format json} writes every event as one JSON object per line, with
stable field names (L{eventAsDict}): C{time}, C{level}, C{namespace},
C{message}, C{system} (a worker's lines: C{"worker 0#info"}), the event's own fields (the per-tunnel lines' C{tunnel},
C{client}, C{destination}, C{proxy}, C{how}, C{bytes_up}, C{bytes_down},
C{duration} among them) and C{traceback} for a failure; nothing of
Twisted's own bookkeeping.  The same observer serves twistd's C{--logger}::

    twistd --logger shifter.logs.json -n shifter --proxy ...

C{--log-format journald} sends each event to journald in its native
protocol (L{JournaldObserver}): C{PRIORITY} from the level, so
C{journalctl -p warning} shows the warnings, and the fields as
C{SHIFTER_CLIENT}, C{SHIFTER_TUNNEL}, ...
"""

from __future__ import annotations

import errno
import json as _json
import os
import re
import signal
import socket
import stat
import struct
import sys
import time
from typing import IO, Any, Callable

from zope.interface import implementer

from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, formatEvent, formatTime, jsonFileLogObserver

log = Logger()

LOG_FORMATS = ("text", "json", "journald")

# Where journald listens for its native protocol.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Keys of an event that are Twisted's bookkeeping, or its legacy log's,
# not facts of the event.
_INTERNAL_KEYS = frozenset((
    "format", "message", "isError", "system", "time", "why", "failure", "printed",
))

# The syslog priority of each level (journald's PRIORITY).
_PRIORITIES = {
    LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2,
}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def eventAsDict(event: dict[str, Any]) -> dict[str, Any]:
    """
    An event as plain, stable fields: C{time} (ISO 8601, UTC, with
    milliseconds), C{level} (C{debug}, C{info}, C{warn}, C{error},
    C{critical}), C{namespace}, C{message} (the line as text), the event's
    own fields as strings, numbers, booleans or null, and C{traceback} when
    it carries a failure.
    """
    when = event.get("log_time") or time.time()
    level = event.get("log_level") or LogLevel.info
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z",
        "level": level.name,
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        out["system"] = str(system)  # a worker's lines: "worker 0#info"
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in _INTERNAL_KEYS or key in out:
            continue
        out[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    return out


@implementer(ILogObserver)
class JsonObserver:
    """
    One JSON object per line (L{eventAsDict}) on C{stream}.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self.stream.write(_json.dumps(eventAsDict(event), ensure_ascii=False) + "\n")
        self.stream.flush()


class QuickLogger(Logger):
    """
    A L{Logger} for the lines logged per connection, shared by every
    instance of the class that holds it (Twisted's makes a new logger each
    time an instance reads the attribute), with C{emit} without Twisted's
    check that the level is one of L{LogLevel}'s (it sorts them all, every
    event) nor its C{log_trace}.  The events are Twisted's, with
    C{log_source} C{None}.

    @param namespace: required: a shared logger cannot name itself after
        its class.
    """

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)

    def __get__(self, instance: object, owner: type | None = None) -> QuickLogger:
        return self

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        kwargs.update(
            log_logger=self, log_level=level, log_namespace=self.namespace, log_source=None,
            log_format=format, log_time=time.time(),
        )
        self.observer(kwargs)


# How long a line of the text log may wait in the buffer: until the
# reactor's next turn, when it has handled every event that was ready.
# Lines come in bursts of tunnels ending, and one write per burst costs
# less than one per line, while a reader of the file waits for nothing.
TEXT_FLUSH_DELAY = 0.0

# A format that is one field alone (C{"{tunnel_line}"}): a line rendered
# by the code that logs it.
_ONE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@implementer(ILogObserver)
class TextObserver:
    """
    Twisted's text form (C{time [system] message}, as twistd writes it),
    written cheaply enough for a line per tunnel: the time stamp rendered
    once a second, a line logged pre-rendered as a single field
    (C{log.info("{tunnel_line}", tunnel_line=...)}) used as it is, and lines
    buffered until the reactor's next turn (L{TEXT_FLUSH_DELAY}; a warning
    or worse is flushed at once).  Every other event is rendered by Twisted as twistd would.

    @param clock: the reactor, to flush later; without one, or while it is
        not running (starting, stopped), every line is flushed as it is
        written.
    """

    def __init__(self, stream: IO[str], clock: Any = None) -> None:
        self.stream = stream
        self.clock = clock
        self._second = -1
        self._stamp = ""
        self._flushCall: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.render(event)
        if not text:
            return
        self.stream.write(text)
        level = event.get("log_level")
        if (self.clock is None or not getattr(self.clock, "running", True)
                or (level is not None and level >= LogLevel.warn)):
            self.flush()  # no reactor turning to flush later, or a line that must not wait
        elif self._flushCall is None:
            self._flushCall = self.clock.callLater(TEXT_FLUSH_DELAY, self.flush)

    def render(self, event: dict[str, Any]) -> str:
        """
        C{event} as its line (or lines, continued with a tab), ending in a
        newline; empty if it has no text.
        """
        message = None
        if "log_failure" not in event:
            match = _ONE_FIELD.fullmatch(event.get("log_format") or "")
            if match is not None and isinstance(event.get(match.group(1)), str):
                message = event[match.group(1)]
        if message is None:
            message = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not message:
            return ""
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if second != self._second:
                self._second, self._stamp = second, formatTime(second)
            stamp = self._stamp
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{stamp} [{system}] {message}".replace("\n", "\n\t") + "\n"

    def flush(self) -> None:
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        try:
            self.stream.flush()
        except OSError:
            pass  # a full disk: the lines wait for the next flush


def json() -> ILogObserver:
    """
    One JSON object per line on standard output, for twistd's C{--logger}.
    """
    return JsonObserver(sys.stdout)


def events() -> ILogObserver:
    """
    Every event whole, in Twisted's own JSON, on standard output: how a
    worker of C{--workers} hands its events to the parent, which logs them
    in its own format.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


def journalFields(event: dict[str, Any], limit: int | None = None) -> bytes:
    """
    C{event} in journald's native protocol: C{MESSAGE}, C{PRIORITY},
    C{SYSLOG_IDENTIFIER=shifter}, C{SHIFTER_NAMESPACE}, and each field of
    L{eventAsDict} as C{SHIFTER_<NAME>} (C{SHIFTER_CLIENT},
    C{SHIFTER_TUNNEL}, C{SHIFTER_TRACEBACK}, ...).

    @param limit: if given, the most characters of any value; a longer
        one is cut there and ends with C{" [cut short]"}.
    """
    facts = eventAsDict(event)
    level = event.get("log_level") or LogLevel.info
    fields: list[tuple[str, str]] = [
        ("MESSAGE", facts.pop("message")),
        ("PRIORITY", str(_PRIORITIES.get(level, 6))),
        ("SYSLOG_IDENTIFIER", "shifter"),
    ]
    facts.pop("time")
    facts.pop("level")
    for key, value in facts.items():
        name = "SHIFTER_" + _FIELD_NAME.sub("_", key.upper())
        fields.append((name, "" if value is None else str(value)))
    out = bytearray()
    for name, value in fields:
        if limit is not None and len(value) > limit:
            value = value[:limit] + " [cut short]"
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


@implementer(ILogObserver)
class JournaldObserver:
    """
    Each event as one datagram to journald's native socket, never
    blocking: an event the socket cannot take now is dropped and counted.
    An event too big for a datagram is sent with its message and traceback
    cut short.

    @ivar dropped: events dropped.
    """

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.dropped = 0

    def __call__(self, event: dict[str, Any]) -> None:
        data = journalFields(event)
        try:
            self._send(data)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                try:
                    self._send(journalFields(event, limit=8192))
                    return
                except OSError:
                    pass
            self.dropped += 1

    def _send(self, data: bytes) -> None:
        self.socket.sendto(data, self.path)


def logObserver(
    format: str, path: str | None, journalSocket: str = JOURNAL_SOCKET, clock: Any = None,
) -> ILogObserver:
    """
    The observer for C{--log-format}: C{json} or C{text} (L{TextObserver},
    buffered with C{clock}) to the file at C{path} (twistd's
    C{--logfile}), or to standard output; C{journald} to C{journalSocket},
    or text, with one line saying so, where it does not exist.
    """
    if format == "journald":
        if os.path.exists(journalSocket):
            return JournaldObserver(journalSocket)
        log.warn(
            "--log-format journald: no journal socket at {path}; logging as text",
            path=journalSocket,
        )
        format = "text"
    stream: IO[str] = sys.stdout if path is None else open(path, "a", encoding="utf-8")
    if format == "json":
        return JsonObserver(stream)
    return TextObserver(stream, clock)


class LogFileReopener:
    """
    Reopens the log file twistd writes to (C{--logfile}) after logrotate
    has moved it, through values Shifter keeps itself rather than twistd's
    private ones: its path (from twistd's options) and the identity (device
    and inode) of the file open under that path once twistd has opened it.

    To reopen, the descriptor open on that file is found among this
    process's descriptors, a new file is opened at the path (appending,
    with the old file's permissions), and moved onto that descriptor
    (C{dup2}): twistd's file object goes on writing to the same descriptor,
    now the new file.  A descriptor is only ever replaced if it is the
    regular file recorded.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.identity: tuple[int, int] | None = None

    def remember(self) -> None:
        """
        Record which file is at the path now (twistd has opened it).
        """
        try:
            info = os.stat(self.path)
        except OSError:
            return
        self.identity = (info.st_dev, info.st_ino)

    def reopen(self) -> bool:
        """
        Point the descriptor of the recorded file at a new file at the
        path.

        @return: whether a descriptor was found and reopened.
        """
        fd = _descriptorOf(self.identity)
        if fd is None:
            # twistd rotated the file itself (it does, by size): what is at
            # the path now is what it has open.
            self.remember()
            fd = _descriptorOf(self.identity)
        if fd is None:
            return False
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        new = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            os.dup2(new, fd, inheritable=False)
        finally:
            os.close(new)
        info = os.fstat(fd)
        self.identity = (info.st_dev, info.st_ino)
        return True


def _descriptorOf(identity: tuple[int, int] | None) -> int | None:
    """
    A descriptor of this process open on the regular file C{identity}
    (device, inode), if any.
    """
    if identity is None:
        return None
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) == identity:
            return int(name)
    return None


# The log files this process writes through twistd, as Shifter was told.
logFiles: list[LogFileReopener] = []

# The files Shifter writes itself (the access log): each has a C{reopen()}
# that returns whether it reopened a file.
ownFiles: list[Any] = []


def twistdLogFile(options: Any) -> str | None:
    """
    The file twistd logs to, from its own options (C{--logfile},
    C{--nodaemon}, C{--syslog}, C{--logger}): C{None} for standard output,
    syslog or an observer of its own.
    """
    if options is None or options.get("syslog") or options.get("logger"):
        return None
    path = options.get("logfile")
    if path == "-":
        return None
    if not path:
        return None if options.get("nodaemon") else "twistd.log"
    return str(path)


def useLogFile(path: str | None) -> None:
    """
    Note the file twistd logs to (from L{twistdLogFile}), so that SIGHUP
    can reopen it.
    """
    logFiles.clear()
    if path is not None:
        logFiles.append(LogFileReopener(path))


def rememberOpenLogFile() -> None:
    """
    Record which files the log paths hold, once twistd has opened them
    (when the service starts).
    """
    for logFile in logFiles:
        logFile.remember()


def reopenLogFiles() -> int:
    """
    Reopen the log files noted with L{useLogFile} (twistd's C{--logfile}),
    so that a file moved away by logrotate is let go of.

    @return: how many files were reopened.
    """
    reopened = 0
    for logFile in [*logFiles, *ownFiles]:
        try:
            if logFile.reopen():
                reopened += 1
        except OSError as e:
            path = getattr(logFile, "path", None) or getattr(getattr(logFile, "writer", None), "path", "?")
            log.warn("cannot reopen {path}: {error}", path=path, error=e.strerror or e)
    return reopened


def reopenOnHangup(reactor: Any, then: Callable[[], object] | None = None) -> Callable[[], None]:
    """
    Reopen log files on SIGHUP, in the reactor, then call C{then} (such as
    reloading the configuration), if given; reopen the files Shifter
    writes itself (L{ownFiles}) on SIGUSR1 too, before the handler twistd
    has for it (which rotates its C{--logfile}).

    @return: a function that puts the previous SIGHUP handler back.
    """

    def reopen() -> None:
        log.info("SIGHUP: reopened {count} log files", count=reopenLogFiles())
        if then is not None:
            then()

    def onHangup(signum: int, frame: object) -> None:
        reactor.callFromThread(reopen)

    def onUser1(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopenOwn)
        if callable(previousUser1):
            previousUser1(signum, frame)  # twistd's: it rotates its --logfile

    def reopenOwn() -> None:
        reopened = 0
        for own in ownFiles:
            try:
                reopened += bool(own.reopen())
            except OSError as e:
                log.warn("cannot reopen {path}: {error}", path=own.writer.path, error=e.strerror or e)
        log.info("SIGUSR1: reopened {count} log files", count=reopened)

    rememberOpenLogFile()
    previous = signal.signal(signal.SIGHUP, onHangup)
    previousUser1 = signal.signal(signal.SIGUSR1, onUser1)

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)
        signal.signal(signal.SIGUSR1, previousUser1)

    return restore


class RateLimitedLog:
    """
    Log lines that an attacker could repeat at will (refused connections)
    without letting them flood the log: one line per key per C{interval}
    seconds; the lines that follow within the interval are only counted,
    and when it ends one line says how many were left out.

    Keys are reasons (C{"limit"}, C{"per-client limit"}, ...), not clients,
    so their number stays small; past C{maxKeys} at once, lines for new
    keys are counted under one shared key.
    """

    def __init__(
        self,
        logger: Logger,
        clock: Any,
        interval: float = 10.0,
        maxKeys: int = 64,
    ) -> None:
        """
        @param logger: where the lines go.
        @param clock: an C{IReactorTime}.
        """
        self._logger = logger
        self._clock = clock
        self.interval = interval
        self._maxKeys = maxKeys
        self._suppressed: dict[str, int] = {}
        self._timers: dict[str, Any] = {}

    def emit(self, key: str, level: LogLevel, format: str, **fields: object) -> bool:
        """
        Log C{format} with C{fields} at C{level}, unless a line for C{key}
        was logged less than C{interval} seconds ago; then only count it.

        @return: whether the line was logged.
        """
        if key not in self._timers and len(self._timers) >= self._maxKeys:
            key = "(other reasons)"
        if key in self._timers:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._logger.emit(level, format, rate_limit_key=key, **fields)
        self._suppressed[key] = 0
        self._timers[key] = self._clock.callLater(self.interval, self._windowEnded, key, level)
        return True

    def warn(self, key: str, format: str, **fields: object) -> bool:
        """
        L{emit} at the warning level.
        """
        return self.emit(key, LogLevel.warn, format, **fields)

    def _windowEnded(self, key: str, level: LogLevel) -> None:
        del self._timers[key]
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self._logger.emit(
                level,
                "{suppressed} more like it not logged in the last {interval:g} s ({rate_limit_key})",
                suppressed=suppressed,
                interval=self.interval,
                rate_limit_key=key,
            )

    def stop(self) -> None:
        """
        Say now how many lines were left out, and cancel the timers.
        """
        for key, timer in list(self._timers.items()):
            if timer.active():
                timer.cancel()
            self._windowEnded(key, LogLevel.warn)
