"""
The Shifter service: start the resolver, then accept redirected connections;
on shutdown, stop accepting and let open tunnels drain.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

import shifter
from shifter.tunnel.downstream import ShifterFactory
from shifter.tunnel.limits import AcceptPauser, pauseOnExhaustion
from shifter.logs import reopenOnHangup


class ShifterService(Service):
    """
    Listens on C{endpoint} for redirected connections once the factory's
    resolver is ready, and stops both in the reverse order.

    If the resolver or the listening endpoint cannot start, the reason is
    logged and the reactor is stopped: a redirector that silently does not
    listen would black-hole every redirected connection.  With
    C{exitStatusOnFailure} (under twistd), the process then exits with
    status 1, so that a supervisor (systemd's C{Restart=on-failure}) or a
    script sees the failure.

    Stopping (SIGTERM under twistd) closes the listening port at once, then
    waits up to C{drainTimeout} seconds for open tunnels to finish before
    closing those that remain.  With C{handleHangup}, SIGHUP reopens the
    log files (for logrotate), then reloads the configuration file.

    @ivar ready: a C{Deferred} that fires with the listening port once
        Shifter accepts connections.
    @ivar reloader: reloads the configuration: returns what changed, in
        words, or raises C{ValueError} with the reason it cannot; C{None}
        when nothing can be reloaded.
    @ivar accessLogOpener: opens the access log (C{--access-log}) and
        returns it, for the factory; called before privileges are shed
        where twistd sheds them.  C{None} for no access log.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        factory: ShifterFactory,
        drainTimeout: float = 30.0,
        handleHangup: bool = False,
        exitStatusOnFailure: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.drainTimeout = drainTimeout
        self.port: IListeningPort | None = None
        self._pauser: AcceptPauser | None = None
        self._handleHangup = handleHangup
        self.exitStatusOnFailure = exitStatusOnFailure
        self._restoreHangup: Callable[[], None] | None = None
        self.ready: Deferred[IListeningPort] = Deferred()
        self._starting: Deferred[None] | None = None
        self.reloader: Callable[[], str] | None = None
        self.accessLogOpener: Callable[[], Any] | None = None
        self._stopWaiters: list[Deferred[None]] | None = None  # while stopping
        self.draining = False
        self.failed = False

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._openAccessLog()

    def _openAccessLog(self) -> None:
        opener, self.accessLogOpener = self.accessLogOpener, None
        if opener is None:
            return
        try:
            self.factory.accessLog = opener()
        except (OSError, ValueError):
            self.cannotStart(Failure(), "--access-log")

    def startService(self) -> None:
        Service.startService(self)
        self._openAccessLog()
        if self.failed:
            return  # a port it needs beside its own could not be opened
        if self._handleHangup:
            self._restoreHangup = reopenOnHangup(self.factory.reactor, self._reloadOnHangup)
        self._starting = self._start()
        self._starting.addErrback(self._cannotStart)

    def _reloadOnHangup(self) -> None:
        if self.reloader is not None and getattr(self.reloader, "path", True) is not None:
            self.reload("SIGHUP")

    def reload(self, why: str = "request") -> tuple[bool, str]:
        """
        Reload the configuration file: the new settings, proxies and rules
        apply to connections accepted from now on; open tunnels keep
        theirs.  A file that cannot be used changes nothing.  Either way
        one log line says what happened.

        @param why: what asked for the reload, for the log line.
        @return: whether it was reloaded, and what changed or why not.
        """
        if self.reloader is None:
            return False, "nothing to reload"
        try:
            changes = self.reloader()
        except ValueError as e:
            self.log.error(
                "{why}: configuration not reloaded, the running one stays: {reason}",
                why=why,
                reason=str(e),
            )
            return False, str(e)
        self.log.info(
            "{why}: configuration reloaded for new connections ({changes}); "
            "{count} open connections keep theirs",
            why=why,
            changes=changes,
            count=len(self.factory.active),
        )
        return True, changes

    def drain(self, why: str = "request") -> int:
        """
        Stop accepting, let open tunnels finish (up to C{drainTimeout}),
        then stop the process: what SIGTERM does.

        @return: how many connections are open now.
        """
        count = len(self.factory.active)
        if not self.draining:
            self.draining = True
            self.log.info("{why}: draining {count} connections, then stopping", why=why, count=count)
            reactor = self.factory.reactor
            reactor.callLater(0, reactor.stop)
        return count

    @inlineCallbacks
    def _start(self):  # type: ignore[no-untyped-def]
        factory = self.factory
        yield factory.resolver.start()
        # This machine's addresses before the first client: until they are
        # known, every destination is refused.
        yield factory.proxyAddresses.readLocal()
        # The gateway's Kerberos tickets before the first client, where a
        # proxy may ask for Negotiate: logged in, or the reason why not
        # logged (within the ticket helper's time limit).
        yield factory.pool.start()
        port = yield self.endpoint.listen(factory)
        if not self.running:
            # Stopped while starting: stopService did not see this port.
            yield port.stopListening()
            return
        self.port = port
        factory.listeningAddress = port.getHost()  # type: ignore[assignment]
        self._pauser = pauseOnExhaustion(self.port, factory.reactor, factory.acceptPaused)
        self.log.info(
            "Shifter {version} accepting redirected connections on {listen} "
            "(resolver {resolver}, proxy {proxy})",
            version=shifter.__version__,
            listen=self.description,
            resolver=factory.resolver.name,
            proxy=", ".join(proxy.description for proxy in factory.pool.proxies) or "none but the PAC script's",
        )
        self.ready.callback(self.port)

    def _cannotStart(self, reason: Failure) -> None:
        if reason.check(CancelledError) and not self.running:
            return  # stopped while starting
        self.cannotStart(reason)

    def cannotStart(self, reason: Failure, what: str = "") -> None:
        """
        Give up: something Shifter needs (its resolver, its port, or
        C{what}: a port beside it) could not start.  One critical line,
        then the reactor stops, with a failure status under twistd.
        """
        if self.failed:
            return
        self.failed = True
        self.log.critical(
            "Shifter cannot start: {what}{reason}",
            what=f"{what}: " if what else "",
            reason=reason.getErrorMessage(),
        )
        if not self.ready.called:
            self.ready.errback(reason)
            self.ready.addErrback(lambda _: None)
        stopWithFailure(self.factory.reactor, self.exitStatusOnFailure)

    def stopService(self) -> Deferred[None]:
        self._stopWaiters = []
        stopping = self._stop()

        def stopped(result: object) -> object:
            waiters, self._stopWaiters = self._stopWaiters or [], None
            for waiter in waiters:
                waiter.callback(None)
            return result

        return stopping.addBoth(stopped)

    def whenStopped(self) -> Deferred[None]:
        """
        @return: a C{Deferred} that fires once a stop under way (its drain
            included) has ended; at once if none is.
        """
        waiters = self._stopWaiters
        if waiters is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        waiters.append(waiter)
        return waiter

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
        Service.stopService(self)
        factory = self.factory
        starting, self._starting = self._starting, None
        if starting is not None and not starting.called:
            starting.cancel()
        if self._restoreHangup is not None:
            self._restoreHangup()
            self._restoreHangup = None
        if self._pauser is not None:
            self._pauser.stop()
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        if factory.active:
            self.log.info(
                "stopped accepting; draining {count} connections for up to {timeout:g} s",
                count=len(factory.active),
                timeout=self.drainTimeout,
            )
            idle = factory.whenIdle()
            idle.addTimeout(self.drainTimeout, factory.reactor)
            try:
                yield idle
            except TimeoutError:
                self.log.warn(
                    "closing {count} connections still open after {timeout:g} s of draining",
                    count=len(factory.active),
                    timeout=self.drainTimeout,
                )
                yield factory.closeAll()
        factory.pool.stop()
        factory.deadlines.stop()
        accessLog, factory.accessLog = factory.accessLog, None
        if accessLog is not None:
            accessLog.close()
        yield factory.resolver.stop()


class SidePortService(Service):
    """
    A port Shifter serves beside the redirected one (C{--metrics}, the
    control socket), opened before it and closed after it has stopped, its
    drain included.  One that cannot be opened stops Shifter as any
    start-up failure does, instead of leaving it running without.

    @ivar what: what the port is, for the log lines.
    @ivar description: where it listens, for the log lines.
    @ivar hint: said in parentheses once it listens.
    """

    log = Logger()

    def __init__(
        self,
        what: str,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: Any,
        shifterService: Any,
        hint: str = "",
    ) -> None:
        self.what = what
        self.hint = hint
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.shifterService = shifterService
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        Service.startService(self)
        listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(
            self._listening, self.shifterService.cannotStart, errbackArgs=(f"{self.what} {self.description}",)
        )

    def _listening(self, port: IListeningPort) -> None:
        if not self.running:
            port.stopListening()
            return
        self.port = port
        self.log.info(
            "{what} on {listen}{hint}", what=self.what, listen=self.description,
            hint=f" ({self.hint})" if self.hint else "",
        )

    def stopService(self) -> Any:
        """
        Close the port once Shifter has stopped, its drain included, so
        that the drain can be watched (C{ctl tunnels}, the metrics).
        """
        Service.stopService(self)
        whenStopped = getattr(self.shifterService, "whenStopped", None)
        waiting = whenStopped() if whenStopped is not None else succeed(None)

        def close(_: object) -> Any:
            if self.port is not None:
                port, self.port = self.port, None
                return port.stopListening()
            return None

        return waiting.addCallback(close)


# The status the process exits with once twistd has finished, if not 0.
_exitStatus = 0


def stopWithFailure(reactor: Any, exitStatus: bool) -> None:
    """
    Stop the reactor because Shifter cannot run; with C{exitStatus}, make
    the process exit with status 1 once twistd has finished (removed its
    pid file, stopped logging).

    twistd has no way to say a run failed: it exits 0 whenever the reactor
    stops.  So the status is set at the very end, from an C{atexit}
    handler, after the standard streams and the C{logging} module have been
    flushed.
    """
    global _exitStatus
    if exitStatus and not _exitStatus:
        _exitStatus = 1
        atexit.register(_exitWithStatus)
    reactor.callWhenRunning(reactor.stop)


def _exitWithStatus() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(_exitStatus)
