"""
Logging helpers: a JSON observer for twistd's C{--logger} option, and
reopening log files on SIGHUP::

    twistd --logger shifter.logs.json -n shifter --proxy ...

writes every event, the per-tunnel lines with their fields (client,
destination, proxy, how, bytes_up, bytes_down, duration) among them, as one
JSON object per line on standard output, for journald or a log shipper.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher, jsonFileLogObserver

log = Logger()


def json() -> ILogObserver:
    """
    One JSON object per line on standard output.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def reopenLogFiles(publisher: Any = globalLogPublisher) -> int:
    """
    Reopen the log files that observers of C{publisher} write to (twistd's
    C{--logfile}), so that a file moved away by logrotate is let go of.

    @return: how many files were reopened.
    """
    reopened = 0
    for observer in getattr(publisher, "_observers", ()):
        outFile = getattr(observer, "_outFile", None)
        reopen = getattr(outFile, "reopen", None)
        if reopen is not None:
            reopen()
            reopened += 1
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
