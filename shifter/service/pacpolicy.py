"""
C{--pac}: the site's PAC script decides where each connection goes that no
C{[[rule]]} decides.

For such a connection Shifter asks C{FindProxyForURL(url, host)}, with
C{host} the name read from the client (SNI, Host) or else its original
destination's address, and C{url} C{https://host/} for a name from a TLS
ClientHello, C{http://host/path} for one from a plain request's C{Host}
header, and by the port without a name (C{http://} on 80, C{https://}
elsewhere; the port in the URL when it is not the scheme's own).  The
answer is the order tried: C{PROXY} and C{HTTPS} entries
are HTTP proxies (C{http://}, C{https://}), C{SOCKS}/C{SOCKS5} SOCKS5
servers, C{DIRECT} Shifter's own connection to the original destination
address; C{SOCKS4} entries are skipped.  A proxy the answer names that is
also configured (same kind, host and port) is the configured one, with its
credentials and health; others are built once and kept (up to
L{MAX_PAC_PROXIES}), their health kept by the pool like any other's, so a
dead one is skipped by the next connections.

When there is no answer (no script yet, or the script fails, loops, runs
out of memory or answers garbage), C{--pac-fallback} decides: C{refuse},
C{direct}, or a proxy group; one line says so for each fresh failure
(failures are cached per host for a while, and not logged again).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Sequence

from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from shifter.logs import RateLimitedLog
from shifter.pac.answer import PAC_DIRECT, PAC_HTTPS, PAC_PROXY, PAC_SOCKS5, PacChoice, formatChoices
from shifter.pac.evaluator import PacError, PacEvaluator, PacResult
from shifter.pac.fetch import PacSource
from shifter.service.config import Rule, RulePolicy
from shifter.tunnel.holdsyn import directAtSyn
from shifter.tunnel.negotiation import destinationCheck, formatAddress
from shifter.tunnel.policy import ISynPolicy, TunnelDecision, TunnelRequest, decidedNow
from shifter.upstream.pool import ProxyPool
from shifter.upstream.proxy import DIRECT, HTTP, SOCKS5, UpstreamProxy

REFUSE = "refuse"
FALLBACK_DIRECT = "direct"

# The most proxies built from PAC answers that are kept at once (the
# least recently named go first).
MAX_PAC_PROXIES = 64

# Decisions kept, built from PAC answers: most connections get a cached
# answer, and the same answer is the same decision (until the proxies
# change, which forgets them all).
MAX_DECISIONS = 1024

_SCHEMES = {PAC_PROXY: "http", PAC_HTTPS: "https", PAC_SOCKS5: "socks5"}


def pacQuestion(
    name: Optional[str], address: str, port: int, scheme: Optional[str] = None, path: Optional[str] = None,
) -> tuple[str, str]:
    """
    The (url, host) that C{FindProxyForURL} is asked for a connection to
    C{address:port}, with C{name} read from the client, if any: from a TLS
    ClientHello (C{scheme} C{"https"}: C{https://name/}) or from a plain
    request's C{Host} (C{"http"}: C{http://name/path}).  Without a name,
    C{http://} on port 80 and C{https://} elsewhere.
    """
    host = name or address
    shown = f"[{host}]" if ":" in host else host
    if name is None or scheme is None:
        scheme = "http" if port == 80 else "https"
    default = 80 if scheme == "http" else 443
    authority = shown if port == default else f"{shown}:{port}"
    if scheme == "http" and name is not None and path:
        return f"http://{authority}{path}", host
    return f"{scheme}://{authority}/", host


@implementer(ISynPolicy)
class PacPolicy:
    """
    The rules first, then the PAC script, then the fallback.

    @ivar rules: the C{[[rule]]}s, as a L{RulePolicy}, or C{None}.
    @ivar fallback: C{"refuse"}, C{"direct"} or a proxy group's name.
    """

    log = Logger()

    def __init__(
        self,
        evaluator: PacEvaluator,
        source: PacSource,
        rules: Optional[RulePolicy],
        groups: Mapping[str, Sequence[UpstreamProxy]],
        pool: ProxyPool,
        direct: UpstreamProxy,
        makeProxy: Callable[[str], UpstreamProxy],
        fallback: str = REFUSE,
    ) -> None:
        self.evaluator = evaluator
        self.source = source
        self.rules = rules
        self.groups = {name: list(proxies) for name, proxies in groups.items()}
        self.pool = pool
        self.direct = direct
        self.makeProxy = makeProxy
        self.fallback = fallback
        self.decidesByAddress = rules.decidesByAddress if rules is not None else False
        self.singleLabelNames = rules.singleLabelNames if rules is not None else frozenset()
        self.built: OrderedDict[tuple[str, str, int], UpstreamProxy] = OrderedDict()
        self.decisions: dict[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], TunnelDecision] = {}
        # One line per host and reason (failures are cached per host, so
        # that is once per host and period), at most 64 of them per 10 s:
        # a script that fails for every host cannot flood the log.
        self.lines = RateLimitedLog(self.log, evaluator.reactor, interval=10.0, maxKeys=64)

    def fallbackWords(self) -> str:
        """
        What the fallback does, in words, for log lines.
        """
        if self.fallback == REFUSE:
            return "connections are refused (--pac-fallback refuse)"
        if self.fallback == FALLBACK_DIRECT:
            return "connections go DIRECT (--pac-fallback direct)"
        return f"connections go through proxy group {self.fallback} (--pac-fallback)"

    # ITunnelPolicy

    def decide(self, request: TunnelRequest) -> Any:
        return self.explained(request).addCallback(lambda pair: pair[0])

    def explained(self, request: TunnelRequest) -> Deferred[tuple[Optional[TunnelDecision], dict[str, Any]]]:
        """
        The decision for C{request}, and how it was reached: C{rule} (the
        rule's line, or C{None}), C{pac} (C{url}, C{host}, C{answer},
        C{cached}, C{error}; or C{None} when a rule decided), C{fallback}
        (whether the fallback decided).
        """
        rule = self._rule(request)
        if rule is not None:
            assert self.rules is not None
            decision = self.rules._decision(request, rule)
            label = f"rule at line {rule.line}"
            if decision is None:
                decision = TunnelDecision(label=label)
            else:
                decision = _labelled(decision, label)
            return succeed((decision, {"rule": rule.line, "pac": None, "fallback": False}))
        port = request.destination.port
        url, host = pacQuestion(request.name, request.destination.host, port, request.scheme, request.path)
        details: dict[str, Any] = {"rule": None, "fallback": False,
                                   "pac": {"url": url, "host": host, "answer": None, "cached": False, "error": None}}
        if self.evaluator.script is None and not self.source.firstAttempt.called:
            # The first fetch is still under way: wait for it.
            waiter: Deferred[None] = Deferred()

            def first(result: object) -> object:
                if not waiter.called:
                    waiter.callback(None)
                return result

            self.source.firstAttempt.addBoth(first)
            return waiter.addCallback(lambda _: self.explained(request))
        if self.evaluator.script is None:
            details["pac"]["error"] = "no PAC script is loaded"
            details["fallback"] = True
            return succeed((self._fallbackDecision(request, "no PAC script is loaded"), details))
        asking = self.evaluator.find(url, host, port)

        def answered(result: PacResult) -> tuple[Optional[TunnelDecision], dict[str, Any]]:
            details["pac"].update(answer=result.answer, cached=result.cached)
            decision = self._fromAnswer(request, result)
            if decision is None:
                why = f"PAC answered {formatChoices(result.choices)}, and Shifter can use none of it"
                details["pac"]["error"] = why
                details["fallback"] = True
                return self._fallbackDecision(request, why), details
            return decision, details

        def failed(reason: Failure) -> Any:
            if reason.check(CancelledError) or not reason.check(PacError):
                return reason
            why = reason.getErrorMessage()
            details["pac"]["error"] = why
            details["fallback"] = True
            cached = why.endswith("(cached)")
            details["pac"]["cached"] = cached
            if not cached:
                self.lines.emit(
                    f"{host} {why}", LogLevel.warn,
                    "PAC for {url}: {why}; {fallback}", url=url, why=why, fallback=self.fallbackWords(),
                )
            return self._fallbackDecision(request, why), details

        return asking.addCallbacks(answered, failed)

    def decideAtSyn(self, request: TunnelRequest, nameRead: bool) -> tuple[bool, Optional[TunnelDecision]]:
        """
        See L{ISynPolicy.decideAtSyn}: a rule that needs nothing read from
        the client, or, when no name is read, a PAC answer already cached
        for the address (or the fallback, with no script).  Nothing is
        evaluated: an answer not cached waits for the tunnel's question.
        """
        known, rule = self.rules.ruleAtSyn(request, nameRead) if self.rules is not None else (True, None)
        if not known:
            return False, None
        if rule is None:
            if nameRead:
                return False, None  # the script is asked with the name read
            if self.evaluator.script is None:
                if not self.source.firstAttempt.called:
                    return False, None
            else:
                port = request.destination.port
                _, host = pacQuestion(None, request.destination.host, port)
                if self.evaluator.cached(host, port) is None:
                    return False, None
        known, pair = decidedNow(self.explained(request))
        return (True, pair[0]) if known else (False, None)

    def _rule(self, request: TunnelRequest) -> Optional[Rule]:
        if self.rules is None:
            return None
        for rule in self.rules.rules:
            if rule.matches(request):
                return rule
        return None

    def _fallbackDecision(self, request: TunnelRequest, why: str) -> TunnelDecision:
        if self.fallback == REFUSE:
            return TunnelDecision(refuse=f"no PAC answer ({why}) and --pac-fallback refuse", label="PAC fallback")
        if self.fallback == FALLBACK_DIRECT:
            return TunnelDecision(proxies=(self.direct,), label=f"PAC fallback DIRECT: {why}")
        members = self.groups.get(self.fallback, [])
        return TunnelDecision(proxies=tuple(members), label=f"PAC fallback group {self.fallback}: {why}")

    def _fromAnswer(self, request: TunnelRequest, result: PacResult) -> Optional[TunnelDecision]:
        """
        The decision a PAC answer makes, built once per answer and the
        addresses of the proxy names it holds (L{decisions}).
        """
        key = (result.answer, tuple(sorted(result.addresses.items())))
        decision = self.decisions.get(key)
        if decision is None:
            decision = self._buildDecision(result)
            if decision is not None:
                if len(self.decisions) >= MAX_DECISIONS:
                    self.decisions.clear()
                self.decisions[key] = decision
        return decision

    def _buildDecision(self, result: PacResult) -> Optional[TunnelDecision]:
        proxies: list[UpstreamProxy] = []
        for choice in result.choices:
            if choice.kind == PAC_DIRECT:
                proxies.append(self.direct)
            elif choice.kind in _SCHEMES:
                proxy = self._proxyFor(choice, result.addresses.get(choice.host, ()))
                if proxy is not None:
                    proxies.append(proxy)
        if not proxies:
            return None
        return TunnelDecision(proxies=tuple(proxies), label=f"PAC: {formatChoices(result.choices)}")

    def _proxyFor(self, choice: PacChoice, addresses: Sequence[str]) -> Optional[UpstreamProxy]:
        """
        The proxy a PAC entry names: a configured one if it is the same,
        else one built for PAC answers (and kept).
        """
        for configured in self.pool.proxies:
            if _same(configured, choice):
                return configured
        key = (choice.kind, choice.host, choice.port)
        proxy: Optional[UpstreamProxy] = self.built.get(key)
        if proxy is None:
            authority = formatAddress(choice.host, choice.port)
            try:
                proxy = self.makeProxy(f"{_SCHEMES[choice.kind]}://{authority}")
            except ValueError as e:
                self.log.warn("PAC named proxy {entry}, which cannot be used: {why}", entry=str(choice), why=str(e))
                return None
            self.built[key] = proxy
            self.decisions.clear()  # the proxies PAC names are others now
            self.pool.track(proxy)
            while len(self.built) > MAX_PAC_PROXIES:
                _, old = self.built.popitem(last=False)
                self.pool.forget(old)
        else:
            self.built.move_to_end(key)
        if proxy.name is not None and addresses:
            proxy.name.setAddresses(frozenset(addresses))
        return proxy

    def stop(self) -> Deferred[None]:
        """
        Stop fetching, and end the helpers.

        @return: a C{Deferred} that fires once every helper has ended.
        """
        self.source.stop()
        self.lines.stop()
        return self.evaluator.stop()


def _same(proxy: UpstreamProxy, choice: PacChoice) -> bool:
    if proxy.host is None or proxy.port != choice.port:
        return False
    if proxy.host.lower().rstrip(".") != choice.host:
        return False
    tls = proxy.description.startswith("https://")
    if choice.kind == PAC_PROXY:
        return proxy.kind == HTTP and not tls
    if choice.kind == PAC_HTTPS:
        return proxy.kind == HTTP and tls
    return proxy.kind == SOCKS5


def _labelled(decision: TunnelDecision, label: str) -> TunnelDecision:
    from dataclasses import replace

    return replace(decision, label=label)


def explain(factory: Any, client: str, destination: str, port: int, name: Optional[str]) -> Deferred[dict[str, Any]]:
    """
    What Shifter would do now with a connection from C{client} to
    C{destination:port} (with C{name} read from its first bytes, if any):
    the checks, the rule or PAC answer, the proxies in order with their
    health, the CONNECT target, and whether a DIRECT answer is given at
    the SYN (with C{--hold-syn}, asked with no name; with the nfqueue
    resolver alone, when the policy has it at once whatever the name).  A PAC answer not
    cached yet is asked for (and then cached).

    @param factory: the L{shifter.tunnel.downstream.ShifterFactory}.
    @raise ValueError: if C{client} or C{destination} is not an IP address.
    """
    clientIP = ipaddress.ip_address(client)
    destinationIP = ipaddress.ip_address(destination)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    host = destinationIP.compressed
    kind = IPv6Address if destinationIP.version == 6 else IPv4Address
    pool = factory.pool
    settings = factory.settings
    out: dict[str, Any] = {
        "client": clientIP.compressed, "destination": formatAddress(host, port), "name": name,
        "rule": None, "pac": None, "fallback": False, "refused": None, "proxies": [], "connectTarget": None,
        "decidedBy": "default proxies", "directAtSyn": False,
    }
    refusal = destinationCheck(factory, settings, host, port)
    if settings.allowedClients and not any(clientIP in network for network in settings.allowedClients):
        refusal = ("client-denied", f"client {clientIP} is not in an --allow network")
    if refusal is not None:
        out["refused"] = refusal[1]
        out["decidedBy"] = "destination checks"
        return succeed(out)
    candidates = pool.candidates(clientIP.compressed)
    request = TunnelRequest(
        (IPv6Address if clientIP.version == 6 else IPv4Address)("TCP", clientIP.compressed, 0),
        kind("TCP", host, port), name, tuple(candidates),
    )
    policy = factory.policy
    if isinstance(policy, PacPolicy):
        deciding: Deferred[Any] = policy.explained(request)
    elif policy is not None:
        deciding = maybeDeferred(policy.decide, request).addCallback(lambda d: (d, {}))
    else:
        deciding = succeed((None, {}))

    def decided(pair: tuple[Optional[TunnelDecision], dict[str, Any]]) -> dict[str, Any]:
        decision, details = pair
        out.update(details)
        if isinstance(policy, RulePolicy):
            for rule in policy.rules:
                if rule.matches(request):
                    out["rule"] = rule.line
                    break
        if decision is not None and decision.label:
            out["decidedBy"] = decision.label
        elif out["rule"] is not None:
            out["decidedBy"] = f"rule at line {out['rule']}"
        if decision is not None and decision.refuse is not None:
            out["refused"] = decision.refuse
            return out
        proxies = list(candidates) if decision is None or decision.proxies is None else list(decision.proxies)
        for proxy in proxies:
            health = pool.health.get(proxy)
            out["proxies"].append({
                "proxy": proxy.description,
                "state": "direct" if proxy.kind == DIRECT else (health.state if health is not None else "untracked"),
                "usable": pool.usable(proxy),
                "lastError": health.lastError if health is not None else "",
            })
        target = host
        if decision is not None and decision.target is not None:
            target = decision.target
        elif name and settings.connectTarget != "ip" and not factory.connectByAddress:
            target = name
        out["connectTarget"] = formatAddress(target, port)
        if not any(p["usable"] for p in out["proxies"]):
            out["refused"] = pool.unavailable() if out["proxies"] else "no proxy to try"
        # With --hold-syn, the SYN's policy is asked with no name: a DIRECT
        # answer then is given at the SYN.  Without it, the nfqueue
        # resolver's director gives one at the SYN when the policy has it
        # at once and no name read could change it (the answer just asked
        # for is cached now).
        holder = getattr(factory, "holder", None)
        director = getattr(factory, "director", None)
        if name is None and holder is not None and holder.direct and directAtSyn(decision, host, pool.usable):
            out["directAtSyn"] = True
        elif director is not None and director.directDecision(clientIP.compressed, 0, host, port) is not None:
            out["directAtSyn"] = True
        return out

    return deciding.addCallback(decided)
