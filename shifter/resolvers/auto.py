"""
The C{auto} resolver: the first resolver that starts on this host.

Only resolvers that answer correctly under the same rules are candidates:
the REDIRECT/DNAT rules of the README serve C{kmod} and C{sockopt} alike.
C{kmod} comes first, but only when it is exact: its C{start} fails, and
C{auto} passes it over, unless the loaded module is one that answers for
exactly the connection accepted (family version 2 or later: it files each
connection under the accepted socket's two ends as conntrack names them
once NAT has decided, and answers only while conntrack holds that very
connection) and records in this network namespace (an administrator
enabled it here, which is a deliberate choice).  A version 1 module, keyed
on the client's address alone, could answer for the wrong connection and
is never used.  C{sockopt} needs nothing and always starts, so it is the
last resort and anything after it would never be tried.  C{conntrack}
answers the same question as C{sockopt} with a netlink round trip more,
and C{nfqueue} and C{tproxy} need rules of their own, so those are only
used when named.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from zope.interface import implementer

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.resolvers.resolver import (
    Destination,
    IOriginalDestinationResolver,
    ResolverUnavailable,
    makeResolver,
)

CANDIDATES = ("kmod", "sockopt")


@implementer(IOriginalDestinationResolver)
class AutoResolver:
    """
    C{--resolver=auto}: try each of C{candidates} in order and use the
    first whose C{start} succeeds; the start-up log names it, and says why
    each one before it was passed over.

    @ivar chosen: the resolver in use, once started.
    """

    log = Logger()

    def __init__(self, reactor: Optional[Any] = None, candidates: Sequence[str] = CANDIDATES) -> None:
        self.reactor = reactor
        self.candidates = tuple(candidates)
        self.chosen: Optional[IOriginalDestinationResolver] = None

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.chosen is None:
            return "auto"
        return f"auto: {self.chosen.name}"

    def start(self) -> Deferred[None]:
        """
        @return: a C{Deferred} firing once one candidate started, or failing
            with L{ResolverUnavailable} listing why none could.
        """
        reasons: list[str] = []
        remaining = list(self.candidates)

        def tryNext(_: object = None) -> Deferred[None]:
            if not remaining:
                return fail(ResolverUnavailable(
                    "no resolver works on this host: " + "; ".join(reasons)
                ))
            name = remaining.pop(0)
            try:
                resolver = makeResolver(name, self.reactor)
            except Exception as e:
                return unusable(Failure(e), name)
            return resolver.start().addCallbacks(
                started, unusable, callbackArgs=(resolver,), errbackArgs=(name,)
            )

        def started(_: object, resolver: IOriginalDestinationResolver) -> None:
            self.chosen = resolver
            self.log.info(
                "resolver auto chose {chosen}{passed}",
                chosen=resolver.name,
                passed=f" ({'; '.join(reasons)})" if reasons else "",
            )

        def unusable(reason: Failure, name: str) -> Deferred[None]:
            reasons.append(f"{name}: {reason.getErrorMessage()}")
            self.log.info("resolver auto: {name} unavailable: {reason}",
                          name=name, reason=reason.getErrorMessage())
            return tryNext()

        return tryNext()

    def stop(self) -> Deferred[None]:
        chosen, self.chosen = self.chosen, None
        if chosen is None:
            return succeed(None)
        return chosen.stop()

    def resolve(self, transport: ITCPTransport) -> Destination | Deferred[Destination]:
        if self.chosen is None:
            raise ResolverUnavailable("the auto resolver is not started")
        return self.chosen.resolve(transport)
