"""
Logging helpers: a JSON observer for twistd's C{--logger} option,
reopening twistd's log file on SIGHUP, and log lines limited in rate for
what a client can repeat at will::

    twistd --logger shifter.logs.json -n shifter --proxy ...

writes every event, the per-tunnel lines with their fields (client,
destination, proxy, how, bytes_up, bytes_down, duration) among them, as one
JSON object per line on standard output, for journald or a log shipper.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from typing import Any, Callable

from twisted.logger import ILogObserver, Logger, LogLevel, jsonFileLogObserver

log = Logger()


def json() -> ILogObserver:
    """
    One JSON object per line on standard output.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


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
    for logFile in logFiles:
        try:
            if logFile.reopen():
                reopened += 1
        except OSError as e:
            log.warn("cannot reopen {path}: {error}", path=logFile.path, error=e.strerror or e)
    return reopened


def reopenOnHangup(reactor: Any, then: Callable[[], object] | None = None) -> Callable[[], None]:
    """
    Reopen log files on SIGHUP, in the reactor, then call C{then} (such as
    reloading the configuration), if given.

    @return: a function that puts the previous SIGHUP handler back.
    """

    def reopen() -> None:
        log.info("SIGHUP: reopened {count} log files", count=reopenLogFiles())
        if then is not None:
            then()

    def onHangup(signum: int, frame: object) -> None:
        reactor.callFromThread(reopen)

    rememberOpenLogFile()
    previous = signal.signal(signal.SIGHUP, onHangup)

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

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
