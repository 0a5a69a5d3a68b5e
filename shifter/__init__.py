"""
Shifter: a transparent-proxy redirector.

Connections that netfilter redirects to Shifter are tunnelled, with an HTTP
C{CONNECT}, through an upstream proxy to the destination the client was
really trying to reach.

The names listed in C{__all__} are Shifter's public API, for Twisted
programs that embed it: they keep their meaning from release to release.
Everything else, including the submodules themselves, is internal and may
change.  A program embeds Shifter by building a L{ShifterFactory} (or a
whole service with L{makeService}) and listening with it on an endpoint::

    from twisted.internet.endpoints import serverFromString
    from shifter import ProxyPool, ShifterFactory, SocketOptionResolver, TunnelSettings, parseProxy

    pool = ProxyPool([parseProxy("10.0.0.5:3128", reactor)], reactor)
    factory = ShifterFactory(SocketOptionResolver(), pool, TunnelSettings(), reactor)
    serverFromString(reactor, "tcp:12345").listen(factory)

See C{examples/} for a program with its own L{ITunnelPolicy}.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# Where each public name lives.  They are imported when first used, so
# that a process pays only for what it uses: C{twistd shifter} with the
# default resolver never loads netlink (pyroute2) or the other resolvers.
_PUBLIC = {
    "AutoResolver": "shifter.resolvers.auto",
    "ConntrackResolver": "shifter.resolvers.conntrack",
    "Credentials": "shifter.upstream.auth",
    "DestinationUnknown": "shifter.resolvers.resolver",
    "IOriginalDestinationResolver": "shifter.resolvers.resolver",
    "ITunnelPolicy": "shifter.tunnel.policy",
    "KernelModuleResolver": "shifter.resolvers.kmod",
    "Options": "shifter.service.tap",
    "ProxyPool": "shifter.upstream.pool",
    "QueueResolver": "shifter.resolvers.nfqueue",
    "ResolverError": "shifter.resolvers.resolver",
    "ResolverUnavailable": "shifter.resolvers.resolver",
    "ShifterFactory": "shifter.tunnel.downstream",
    "SocketOptionResolver": "shifter.resolvers.sockopt",
    "TransparentResolver": "shifter.resolvers.tproxy",
    "TunnelDecision": "shifter.tunnel.policy",
    "TunnelRequest": "shifter.tunnel.policy",
    "TunnelSettings": "shifter.tunnel.downstream",
    "UpstreamProxy": "shifter.upstream.proxy",
    "makeService": "shifter.service.tap",
    "parseProxy": "shifter.upstream.proxy",
}

__all__ = [
    "AutoResolver",
    "ConntrackResolver",
    "Credentials",
    "DestinationUnknown",
    "IOriginalDestinationResolver",
    "ITunnelPolicy",
    "KernelModuleResolver",
    "Options",
    "ProxyPool",
    "QueueResolver",
    "ResolverError",
    "ResolverUnavailable",
    "ShifterFactory",
    "SocketOptionResolver",
    "TransparentResolver",
    "TunnelDecision",
    "TunnelRequest",
    "TunnelSettings",
    "UpstreamProxy",
    "makeService",
    "parseProxy",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'shifter' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # the same names, for type checkers and the API documentation
    from shifter.upstream.auth import Credentials
    from shifter.resolvers.auto import AutoResolver
    from shifter.resolvers.conntrack import ConntrackResolver
    from shifter.tunnel.downstream import ShifterFactory, TunnelSettings
    from shifter.resolvers.kmod import KernelModuleResolver
    from shifter.resolvers.nfqueue import QueueResolver
    from shifter.tunnel.policy import ITunnelPolicy, TunnelDecision, TunnelRequest
    from shifter.upstream.pool import ProxyPool
    from shifter.upstream.proxy import UpstreamProxy, parseProxy
    from shifter.resolvers.resolver import (
        DestinationUnknown,
        IOriginalDestinationResolver,
        ResolverError,
        ResolverUnavailable,
    )
    from shifter.resolvers.sockopt import SocketOptionResolver
    from shifter.service.tap import Options, makeService
    from shifter.resolvers.tproxy import TransparentResolver
