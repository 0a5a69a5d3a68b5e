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

from twisted.logger import ILogObserver, Logger, globalLogPublisher, jsonFileLogObserver

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
