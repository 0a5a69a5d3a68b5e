"""
DIRECT at the SYN without C{--hold-syn}: with C{--resolver nfqueue}, a SYN
whose connection the policy sends DIRECT is not redirected to Shifter.

Each queued SYN is otherwise accepted at once with the queue mark, to be
redirected, and Shifter, once it has the connection, connects to the
destination itself when the policy says DIRECT.  L{SynDirector} asks the
policy first, as a held SYN asks it (no name, the same checks before), and
gives the SYN the direct mark instead when the answer sends the connection
DIRECT first, to its own destination: the printed rules save that mark to
the connection, so the gateway forwards it like any routed traffic and its
bytes never reach Shifter.

The verdict cannot wait, so only an answer the policy has now counts (a
rule, a PAC answer already cached; see
L{shifter.tunnel.policy.ISynPolicy.decideAtSyn}), and only one that no
name read from the client later could change.  Anything else (no answer
yet, a refusal, a proxy, a check that fails, an error) accepts the SYN as
before: the connection goes through Shifter, which decides it with
everything it reads.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from shifter.tunnel.holdsyn import announceDirect, directAtSyn, refusalAtSyn
from shifter.tunnel.negotiation import canonicalHost, formatAddress
from shifter.tunnel.policy import ISynPolicy, TunnelDecision, TunnelRequest, decidedNow
from shifter.tunnel.tunnelid import newTunnelId


class SynDirector:
    """
    Gives each SYN the nfqueue resolver reads its verdict at once: DIRECT
    (the direct mark) when the policy can send its connection DIRECT now,
    else the queue mark, as without it.

    L{shifter.resolvers.nfqueue.QueueProtocol} hands it every SYN
    (L{synReceived}), as it does to a L{shifter.tunnel.holdsyn.SynHolder}.

    @ivar owner: the L{shifter.tunnel.downstream.ShifterFactory} (its
        settings, pool, policy and open tunnels at the time of each SYN).
    @ivar counters: C{seen} (SYNs), C{direct} (given the direct mark),
        C{errors} (accepted after an internal error).
    """

    log = Logger()

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.counters: Counter[str] = Counter()

    def synReceived(self, protocol: Any, packet: Any) -> None:
        """
        A SYN was queued: give it the direct verdict or the accept one.
        """
        self.counters["seen"] += 1
        segment = packet.segment
        try:
            client = canonicalHost(socket.inet_ntop(segment.family, segment.source))
            address = canonicalHost(socket.inet_ntop(segment.family, segment.destination))
            decision = self.directDecision(client, segment.sourcePort, address, segment.destinationPort)
        except Exception:
            # A bug a client's SYN sets off, it can set off again: one
            # rate-limited line, and the connection goes through Shifter.
            self.counters["errors"] += 1
            self.owner.refusals.emit(
                "internal", LogLevel.error, "SYN {packet}: internal error deciding DIRECT at the SYN; accepted",
                log_failure=Failure(), packet=packet.packetId,
            )
            decision = None
        if decision is None:
            protocol.accept(packet)
            return
        self.counters["direct"] += 1
        started = self.owner.reactor.seconds()
        announceDirect(self.owner, self.log, formatAddress(client, segment.sourcePort),
                       formatAddress(address, segment.destinationPort), decision.label, newTunnelId(), started)
        protocol.direct(packet)

    def directDecision(self, clientHost: str, clientPort: int, address: str, port: int) -> Optional[TunnelDecision]:
        """
        The policy's decision that sends a connection from
        C{clientHost:clientPort} to C{address:port} DIRECT at its SYN, or
        C{None} when its SYN is to be accepted as usual: Shifter would
        refuse it, there is no answer yet, or the answer is not DIRECT
        first to its own address.
        """
        owner = self.owner
        policy = owner.policy
        if policy is None or refusalAtSyn(owner, clientHost, address, port) is not None:
            return None
        pool = owner.pool
        kind = IPv6Address if ":" in address else IPv4Address
        request = TunnelRequest(
            (IPv6Address if ":" in clientHost else IPv4Address)("TCP", clientHost, clientPort),
            kind("TCP", address, port), None, tuple(pool.candidates(clientHost)),
        )
        nameRead = owner.settings.connectTarget != "ip"
        if ISynPolicy.providedBy(policy):
            known, decision = policy.decideAtSyn(request, nameRead)
        elif nameRead:
            return None  # what the tunnel reads could change its answer
        else:
            known, decision = decidedNow(policy.decide(request))
        if known and directAtSyn(decision, address, pool.usable):
            return decision  # type: ignore[no-any-return]
        return None

    def stop(self) -> None:
        """
        Say what was decided.
        """
        self.log.info("direct at the SYN: {seen} SYNs seen, {direct} sent DIRECT at the SYN, {errors} errors",
                      seen=self.counters["seen"], direct=self.counters["direct"], errors=self.counters["errors"])
