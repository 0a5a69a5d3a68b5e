"""
The Shifter service: start the resolver, then accept redirected connections.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

import shifter
from shifter.downstream import ShifterFactory


class ShifterService(Service):
    """
    Listens on C{endpoint} for redirected connections once the factory's
    resolver is ready, and stops both in the reverse order.

    If the resolver or the listening endpoint cannot start, the reason is
    logged and the reactor is stopped: a redirector that silently does not
    listen would black-hole every redirected connection.

    @ivar ready: a L{Deferred} that fires with the listening port once
        Shifter accepts connections.
    """

    log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, description: str, factory: ShifterFactory
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None
        self.ready: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        self._start().addErrback(self._cannotStart)

    @inlineCallbacks
    def _start(self):  # type: ignore[no-untyped-def]
        factory = self.factory
        yield factory.resolver.start()
        self.port = yield self.endpoint.listen(factory)
        self.log.info(
            "Shifter {version} accepting redirected connections on {listen} "
            "(resolver {resolver}, proxy {proxy})",
            version=shifter.__version__,
            listen=self.description,
            resolver=factory.resolver.name,
            proxy=factory.proxy.description,
        )
        self.ready.callback(self.port)

    def _cannotStart(self, reason: Failure) -> None:
        self.log.critical(
            "Shifter cannot start: {reason}", reason=reason.getErrorMessage()
        )
        self.ready.errback(reason)
        self.ready.addErrback(lambda _: None)
        reactor = self.factory.reactor
        reactor.callWhenRunning(reactor.stop)

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        yield self.factory.resolver.stop()
