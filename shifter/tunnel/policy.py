"""
A hook for programs that embed Shifter: per connection, which proxy and
which CONNECT target to use, or whether to refuse.

The policy is asked once per client connection, after the original
destination is known (and, with C{--connect-target sni}/C{host}/C{auto},
after the client's first bytes were read), before any proxy is contacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from zope.interface import Interface

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from shifter.upstream.passclient import checkPassClient
from shifter.upstream.proxy import UpstreamProxy
from shifter.resolvers.resolver import Destination


@dataclass(frozen=True)
class TunnelRequest:
    """
    What is known of a connection when the policy is asked.

    @ivar client: the client's address (IPv4-mapped addresses unmapped).
    @ivar destination: where the client was originally going.
    @ivar name: the server name read from the client's first bytes, if
        C{--connect-target} looked for one and found it.
    @ivar proxies: the proxies Shifter would try, best first (only those
        that are up).
    @ivar ech: what the client's ClientHello showed of Encrypted Client
        Hello (L{shifter.tunnel.sniff.Sniffed.ech}): C{None} for none (or
        nothing read), else C{"ech"} (then C{name} is the outer, cover
        name), C{"grease"}, C{"inner"} or C{"unknown"}.
    @ivar scheme: where C{name} came from: C{"https"} (the TLS
        ClientHello's SNI) or C{"http"} (a plain request's C{Host}
        header); C{None} without a name.
    @ivar path: for C{"http"}, the request's path when it was read.
    """

    client: Union[IPv4Address, IPv6Address]
    destination: Destination
    name: Optional[str]
    proxies: Sequence[UpstreamProxy]
    ech: Optional[str] = None
    scheme: Optional[str] = None
    path: Optional[str] = None


@dataclass(frozen=True)
class TunnelDecision:
    """
    The policy's answer.  Every field left at C{None} keeps Shifter's own
    choice.

    @ivar refuse: if set, the connection is refused, with this reason in
        its log line.
    @ivar proxies: the proxies to try, in order, instead of the pool's.
    @ivar target: the host name or address to ask CONNECT for; the
        original port is always kept.
    @ivar passClient: what the proxy is told about this client, whichever
        proxy carries the tunnel: C{"none"}, C{"x-forwarded-for"},
        C{"proxy-v1"} or C{"proxy-v2"} (see C{--pass-client}); C{None}
        keeps each proxy's own setting.
    @ivar label: what decided (C{"rule at line 12"}, C{"PAC: PROXY a:3128;
        DIRECT"}), named in the tunnel's log lines and by C{ctl tunnels}.
    @raise ValueError: if C{passClient} is none of these.
    """

    refuse: Optional[str] = None
    proxies: Optional[Sequence[UpstreamProxy]] = None
    target: Optional[str] = None
    passClient: Optional[str] = None
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if self.passClient is not None:
            checkPassClient(self.passClient)


class ITunnelPolicy(Interface):
    """
    Decides, per connection, where its tunnel goes.
    """

    def decide(request: TunnelRequest) -> Union[Optional[TunnelDecision], Deferred]:
        """
        Decide for one connection.

        @param request: what is known of the connection.
        @return: a L{TunnelDecision}, C{None} for Shifter's own choices, or
            a C{Deferred} firing with either.  A failure refuses the
            connection.
        """


class ISynPolicy(ITunnelPolicy):
    """
    A policy that can say at a connection's SYN, before anything is read
    from the client, what it will decide for it.
    """

    def decideAtSyn(request: TunnelRequest, nameRead: bool) -> tuple[bool, Optional[TunnelDecision]]:
        """
        The decision for C{request} (asked with no name), if it is known now
        without waiting or starting anything that takes time (a rule, a
        cached answer), and would be the same whatever name is read from
        the client later.

        @param nameRead: whether the tunnel reads a name from the client
            (C{--connect-target sni}, C{host}, C{auto}) and asks with it.
        @return: C{(True, decision)}, or C{(False, None)} when the decision
            has to wait for the tunnel.
        """


def decidedNow(result: Any) -> tuple[bool, Any]:
    """
    A policy's C{decide} result if it is there already: C{(True, value)}
    for a value or a C{Deferred} that has fired with one, else C{(False,
    None)}.  A C{Deferred} still waiting is cancelled; one that failed
    counts as no answer (its failure is consumed).
    """
    if not isinstance(result, Deferred):
        return True, result
    box: list[Any] = []
    result.addBoth(box.append)
    if not box:
        result.cancel()
        return False, None
    if isinstance(box[0], Failure):
        return False, None
    return True, box[0]
