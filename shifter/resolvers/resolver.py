"""
The original-destination resolver: one interface, several implementations.

A redirected connection arrives at Shifter's own address; a resolver tells
where the client was really going.  Each implementation asks a different
part of the kernel (a socket option, conntrack, our netfilter module, ...),
but all of them answer the same question the same way, so the tunnel code
never knows which one is in use.
"""

from __future__ import annotations

from typing import Union

from zope.interface import Attribute, Interface

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport

Destination = Union[IPv4Address, IPv6Address]


class ResolverError(Exception):
    """
    The original destination of a connection could not be found.

    The message is meant for the log line that refuses the connection.
    """


class DestinationUnknown(ResolverError):
    """
    The resolver has no record of this connection: it was not redirected,
    its record expired, or the mechanism behind the resolver missed it.
    """


class ResolverUnavailable(ResolverError):
    """
    The mechanism behind the resolver cannot be used on this host (a kernel
    module not loaded, a missing privilege, a netlink family absent).
    """


class IOriginalDestinationResolver(Interface):
    """
    Finds the destination a redirected TCP connection was originally sent to.
    """

    name = Attribute("The name of this resolver, as given to --resolver.")

    def start() -> Deferred[None]:
        """
        Prepare the resolver (open sockets, look up netlink families).

        @return: a C{Deferred} that fires when L{resolve} may be called, or
            fails with L{ResolverUnavailable} saying why it cannot be.
        """

    def stop() -> Deferred[None]:
        """
        Release what L{start} acquired.

        @return: a C{Deferred} that fires when that is done.
        """

    def resolve(transport: ITCPTransport) -> Union[Destination, Deferred[Destination]]:
        """
        Find the original destination of an accepted connection.

        A resolver that knows at once (a socket option, the local address)
        answers at once: the tunnel then waits for nothing.

        @param transport: the accepted connection's transport.
        @return: an C{IPv4Address} or C{IPv6Address} of type C{"TCP"}, or a
            C{Deferred} that fires with one.
        @raise ResolverError: (or the C{Deferred} fails with one) when the
            destination cannot be found.
        """


# Each --resolver name, and where its implementation lives.  Implementations
# are imported only when chosen, so a host pays for none it does not use.
# Each is a class whose constructor takes the reactor as a keyword argument.
RESOLVERS = {
    "sockopt": "shifter.resolvers.sockopt.SocketOptionResolver",
    "kmod": "shifter.resolvers.kmod.KernelModuleResolver",
    "conntrack": "shifter.resolvers.conntrack.ConntrackResolver",
    "nfqueue": "shifter.resolvers.nfqueue.QueueResolver",
    "tproxy": "shifter.resolvers.tproxy.TransparentResolver",
    "auto": "shifter.resolvers.auto.AutoResolver",
}

# The mark bit the nfqueue reader gives a SYN refused at the gateway
# (--hold-syn), in place of the queue mark.  Here, not in
# shifter.resolvers.nfqueue, so that the options and the rules name it
# without loading netlink.
DEFAULT_REJECT_MARK = 0x20000

# The mark bit it gives a SYN decided DIRECT at the SYN (--hold-syn), in
# place of the queue mark: the connection goes to its destination,
# forwarded by the gateway, and never through Shifter.
DEFAULT_DIRECT_MARK = 0x40000


def makeResolver(name: str, reactor, **options: object) -> IOriginalDestinationResolver:  # type: ignore[no-untyped-def]
    """
    Build the resolver registered under C{name}.

    @param options: the resolver's own settings (C{queueNum=1} for
        C{nfqueue}, ...), passed to its constructor as keyword arguments.
    @raise KeyError: if no resolver has that name.
    """
    from twisted.python.reflect import namedAny

    return namedAny(RESOLVERS[name])(reactor=reactor, **options)
