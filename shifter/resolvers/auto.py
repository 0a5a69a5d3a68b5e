"""
The C{auto} resolver: the first resolver that starts on this host.

Only resolvers that answer correctly under the same rules are candidates:
the REDIRECT/DNAT rules of the README serve C{kmod} and C{sockopt} alike.
C{sockopt} comes first and, needing nothing, always starts: the kernel
module answers only while conntrack holds the very entry
C{SO_ORIGINAL_DST} reads, so its answers are a subset of C{sockopt}'s, at
a fifth of the rate or less, with CAP_NET_ADMIN, a table that can fill and
an expiry (measured in the booted kernels: see the README).  C{kmod} is
therefore only used when named; the start-up log says so.  (Asked to try
it, with C{candidates}, C{auto} still takes C{kmod} only when the loaded
module is exact, family version 2 or later, and records in this network
namespace.)  C{conntrack} answers the same question as C{sockopt} with a
netlink round trip more, and C{nfqueue} and C{tproxy} need rules of their
own, so those are only used when named too.
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

CANDIDATES = ("sockopt",)

# Why a resolver that serves the same rules is not among the candidates,
# for the start-up log.
PASSED_OVER = {
    "kmod": "not tried: SO_ORIGINAL_DST answers every connection the module does, "
            "faster and with no privilege (--resolver kmod to use the module)",
}


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
        reasons = [
            f"{name}: {why}" for name, why in PASSED_OVER.items() if name not in self.candidates
        ]
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
