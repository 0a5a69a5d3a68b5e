"""
C{python -m shifter.rules}: print the gateway rules for a resolver.

Each resolver needs its own netfilter rules: REDIRECT for C{sockopt},
C{conntrack} and C{kmod} (and, for C{kmod}, the command that has the
kernel module record in this namespace); TPROXY and policy routing for
C{tproxy}; an
C{NFQUEUE} rule in the mangle table and a REDIRECT of the SYNs Shifter
marked for C{nfqueue} (with C{--hold-syn}, also a C{REJECT} of the SYNs it
marked as refused), and the rules that keep the connections it sent DIRECT
at the SYN out of the queue and the redirect.  This command prints them as a shell script, for
iptables (ip6tables) or nftables, IPv4 and IPv6, for the LAN interface,
ports and listening port given, with the exclusion that keeps the proxy's
own connections out of the redirect when the gateway's own traffic is
redirected too, and (unless C{--quic pass}) a filter rule that refuses UDP
to the redirected ports from the LAN: QUIC (HTTP/3) would otherwise go
around the proxy.  It prints and never applies: the administrator reviews
the rules, then runs them (C{python -m shifter.rules ... | sh}).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from shifter.resolvers.nfqueue import DEFAULT_QUEUE_MARK
from shifter.resolvers.resolver import DEFAULT_DIRECT_MARK, DEFAULT_REJECT_MARK

RESOLVER_NAMES = ("sockopt", "conntrack", "kmod", "nfqueue", "tproxy")
FORMATS = ("iptables", "nft")
QUIC_CHOICES = ("reject", "drop", "pass")


class RulesError(ValueError):
    """
    The options describe rules that cannot work; the message says why.
    """


@dataclass(frozen=True)
class RuleOptions:
    """
    What the rules are for.

    @ivar proxyUser: if set, the gateway's own connections are redirected
        too, except those of this user (the proxy's).
    @ivar mark: if set, the gateway's own connections are redirected too,
        except those carrying this mark (the proxy's C{tcp_outgoing_mark},
        Shifter's C{--mark}).
    @ivar queueMark: with C{nfqueue}, the mark Shifter sets on the SYNs it
        recorded (its C{--queue-mark}); 0 redirects every SYN.
    @ivar quic: what becomes of UDP from the LAN to the redirected ports
        (QUIC, HTTP/3), which no TCP rule catches: C{reject} (an ICMP
        port-unreachable, so clients fall back to TCP at once), C{drop}
        (they fall back after their own timeout) or C{pass} (it goes
        around the proxy).
    @ivar holdSyn: with C{nfqueue}, Shifter holds each SYN until the proxy
        answers (its C{--hold-syn}), and the SYNs it refuses are reset.
    @ivar rejectMark: with C{holdSyn}, the mark Shifter sets on the SYNs it
        refuses (its C{--reject-mark}).
    @ivar directMark: with C{nfqueue} and a queue mark, the mark Shifter
        sets on the SYNs it sends DIRECT at the SYN (its C{--direct-mark}):
        the rules save it to the connection, and neither queue nor redirect
        a connection that carries it; 0 for none.
    """

    resolver: str
    format: str
    lanInterface: str
    ports: tuple[int, ...]
    listenPort: int = 12345
    ipv6: bool = True
    proxyUser: Optional[str] = None
    mark: Optional[int] = None
    queueNum: int = 0
    queueBypass: bool = False
    queueMark: int = DEFAULT_QUEUE_MARK
    tproxyMark: int = 0x1
    routeTable: int = 100
    quic: str = "reject"
    holdSyn: bool = False
    rejectMark: int = DEFAULT_REJECT_MARK
    directMark: int = DEFAULT_DIRECT_MARK

    def check(self) -> None:
        """
        @raise RulesError: for options that make no working rules.
        """
        if self.resolver not in RESOLVER_NAMES:
            raise RulesError(f"unknown resolver {self.resolver!r}; choose one of {', '.join(RESOLVER_NAMES)}")
        if self.format not in FORMATS:
            raise RulesError(f"unknown format {self.format!r}; choose iptables or nft")
        if self.quic not in QUIC_CHOICES:
            raise RulesError(f"unknown --quic {self.quic!r}; choose one of {', '.join(QUIC_CHOICES)}")
        if not self.lanInterface or any(c in self.lanInterface for c in " \t\n\"'\\;$`"):
            raise RulesError(f"bad interface name {self.lanInterface!r}")
        if not self.ports:
            raise RulesError("no ports to redirect")
        for port in (*self.ports, self.listenPort):
            if not 0 < port < 65536:
                raise RulesError(f"port {port} is not between 1 and 65535")
        if self.listenPort in self.ports:
            raise RulesError(
                f"the listening port {self.listenPort} is among the redirected ports: "
                "connections to it could not be told from direct ones"
            )
        if self.proxyUser is not None and self.mark is not None:
            raise RulesError("give --proxy-user or --mark, not both")
        if self.proxyUser is not None and not self.proxyUser.replace("-", "").replace("_", "").isalnum():
            raise RulesError(f"bad user name {self.proxyUser!r}")
        if self.resolver == "tproxy" and self.excludes:
            raise RulesError(
                "TPROXY works in PREROUTING only: the gateway's own connections are "
                "never intercepted, so there is nothing to exclude (drop --proxy-user/--mark)"
            )
        for name, value in (("mark", self.mark), ("queue mark", self.queueMark),
                            ("tproxy mark", self.tproxyMark)):
            if value is not None and not 0 <= value <= 0xFFFFFFFF:
                raise RulesError(f"{name} {value:#x} does not fit in 32 bits")
        if self.resolver == "nfqueue":
            if not 0 <= self.queueNum <= 65535:
                raise RulesError(f"queue number {self.queueNum} is not between 0 and 65535")
            if self.mark is not None and self.mark & self.queueMark:
                raise RulesError("--mark shares bits with the queue mark")
            if not 0 <= self.directMark <= 0xFFFFFFFF:
                raise RulesError(f"direct mark {self.directMark:#x} does not fit in 32 bits")
            if self.directMark & self.queueMark:
                raise RulesError("the direct mark shares bits with the queue mark")
            if self.mark is not None and self.mark & self.directMark:
                raise RulesError("--mark shares bits with the direct mark")
        if self.holdSyn:
            if self.resolver != "nfqueue":
                raise RulesError("--hold-syn needs --resolver nfqueue: only there does Shifter see the SYN first")
            if not self.queueMark:
                raise RulesError("--hold-syn needs a queue mark: only the SYNs Shifter accepted may be redirected")
            if not 0 < self.rejectMark <= 0xFFFFFFFF:
                raise RulesError(f"reject mark {self.rejectMark:#x} is not from 1 to 0xffffffff")
            if self.rejectMark & self.queueMark:
                raise RulesError("the reject mark shares bits with the queue mark")
            if self.mark is not None and self.mark & self.rejectMark:
                raise RulesError("--mark shares bits with the reject mark: the proxy's connections would be reset")
            if self.directMark & self.rejectMark:
                raise RulesError("the direct mark shares bits with the reject mark")
        if self.resolver == "tproxy" and not self.tproxyMark:
            raise RulesError("the TPROXY mark must not be 0")
        if not 0 < self.routeTable < 0xFFFFFFFF or self.routeTable in (253, 254, 255):
            raise RulesError(f"routing table {self.routeTable} is reserved or out of range")

    @property
    def excludes(self) -> bool:
        return self.proxyUser is not None or self.mark is not None

    @property
    def directAtSyn(self) -> bool:
        """
        Whether Shifter sends connections DIRECT at the SYN: with
        C{nfqueue}, a direct mark and a queue mark (without one, the nat
        rule redirects every SYN, whatever else it carries).
        """
        return self.resolver == "nfqueue" and bool(self.directMark) and bool(self.queueMark)


# --------------------------------------------------------------------------
# iptables
# --------------------------------------------------------------------------


def _iptPorts(ports: Sequence[int]) -> str:
    if len(ports) == 1:
        return f"--dport {ports[0]}"
    return "-m multiport --dports " + ",".join(str(p) for p in ports)


# Connections to the gateway's own addresses are never redirected: through
# Shifter and the proxy they would reach the gateway's services from the
# gateway itself, around every INPUT rule.  (Shifter refuses them too.)
_NOT_LOCAL_IPT = "-m addrtype ! --dst-type LOCAL"
_NOT_LOCAL_NFT = "fib daddr type != local"


def _iptExclusion(o: RuleOptions) -> str:
    if o.proxyUser is not None:
        return f"-m owner ! --uid-owner {o.proxyUser}"
    return f"-m mark ! --mark {o.mark:#x}"


def _commands(o: RuleOptions) -> list[str]:
    return ["iptables", "ip6tables"] if o.ipv6 else ["iptables"]


def _iptablesRedirect(o: RuleOptions) -> list[str]:
    ports, lines = _iptPorts(o.ports), []
    for ipt in _commands(o):
        lines.append(f"{ipt} -t nat -A PREROUTING -i {o.lanInterface} -p tcp {_NOT_LOCAL_IPT} {ports} "
                     f"-j REDIRECT --to-ports {o.listenPort}")
    if o.excludes:
        lines.append(f"# The gateway's own connections too, except the proxy's ({_exclusionText(o)}):")
        for ipt in _commands(o):
            lines.append(f"{ipt} -t nat -A OUTPUT -p tcp {_NOT_LOCAL_IPT} {ports} {_iptExclusion(o)} "
                         f"-j REDIRECT --to-ports {o.listenPort}")
    return lines


def _iptablesQueue(o: RuleOptions) -> list[str]:
    ports, lines = _iptPorts(o.ports), []
    bypass = " --queue-bypass" if o.queueBypass else ""
    marked = f" -m mark --mark {o.queueMark:#x}/{o.queueMark:#x}" if o.queueMark else ""
    lines.append("# Queue each SYN to Shifter before NAT (mangle runs before nat):")
    direct = o.directAtSyn
    if direct:
        lines.append("# (except a connection Shifter sent DIRECT at the SYN: its copies of the SYN too)")
        lines += _iptablesDirectSkip(o)
    for ipt in _commands(o):
        lines.append(f"{ipt} -t mangle -A PREROUTING -i {o.lanInterface} -p tcp --syn {_NOT_LOCAL_IPT} {ports} "
                     f"-j NFQUEUE --queue-num {o.queueNum}{bypass}")
    if o.excludes:
        for ipt in _commands(o):
            lines.append(f"{ipt} -t mangle -A OUTPUT -p tcp --syn {_NOT_LOCAL_IPT} {ports} {_iptExclusion(o)} "
                         f"-j NFQUEUE --queue-num {o.queueNum}{bypass}")
    if direct:
        lines += _iptablesDirectSave(o)
    lines.append("# Redirect the SYNs Shifter recorded (and marked) to it:" if o.queueMark
                 else "# Redirect the queued connections to Shifter:")
    for ipt in _commands(o):
        lines.append(f"{ipt} -t nat -A PREROUTING -i {o.lanInterface} -p tcp {_NOT_LOCAL_IPT} {ports}{marked} "
                     f"-j REDIRECT --to-ports {o.listenPort}")
    if o.excludes:
        for ipt in _commands(o):
            exclusion = "" if o.queueMark else f" {_iptExclusion(o)}"
            lines.append(f"{ipt} -t nat -A OUTPUT -p tcp {_NOT_LOCAL_IPT} {ports}{marked}{exclusion} "
                         f"-j REDIRECT --to-ports {o.listenPort}")
    if o.holdSyn:
        lines += _iptablesReject(o)
    return lines


def _iptablesDirectSkip(o: RuleOptions) -> list[str]:
    mark, lines = f"{o.directMark:#x}", []
    for ipt in _commands(o):
        lines.append(f"{ipt} -t mangle -A PREROUTING -i {o.lanInterface} -p tcp -m connmark --mark {mark}/{mark} "
                     "-j RETURN")
    if o.excludes:
        for ipt in _commands(o):
            lines.append(f"{ipt} -t mangle -A OUTPUT -p tcp -m connmark --mark {mark}/{mark} -j RETURN")
    return lines


def _iptablesDirectSave(o: RuleOptions) -> list[str]:
    mark = f"{o.directMark:#x}"
    lines = ["# A SYN Shifter sent DIRECT at the SYN (direct mark, not the queue mark) is not",
             "# redirected: the gateway forwards it. Its mark is saved to its connection:"]
    for ipt in _commands(o):
        lines.append(f"{ipt} -t nat -A PREROUTING -i {o.lanInterface} -p tcp -m mark --mark {mark}/{mark} "
                     f"-j CONNMARK --set-mark {mark}/{mark}")
    if o.excludes:
        for ipt in _commands(o):
            lines.append(f"{ipt} -t nat -A OUTPUT -p tcp -m mark --mark {mark}/{mark} "
                         f"-j CONNMARK --set-mark {mark}/{mark}")
    return lines


_REJECT_COMMENT = [
    "# Reset the SYNs whose tunnel the proxy refused (Shifter gave them the reject",
    "# mark, not the queue mark, so they were not redirected): the client's connect()",
    "# fails at once, as if the server had refused it. First in their chains, before",
    "# any ACCEPT there, or a refused SYN would reach its server unproxied:",
]


def _iptablesReject(o: RuleOptions) -> list[str]:
    mark = f"{o.rejectMark:#x}"
    chains = ["FORWARD", "INPUT"] + (["OUTPUT"] if o.excludes else [])
    lines = list(_REJECT_COMMENT)
    for ipt in _commands(o):
        for chain in chains:
            lines.append(f"{ipt} -t filter -I {chain} -p tcp --syn -m mark --mark {mark}/{mark} "
                         f"-j REJECT --reject-with tcp-reset")
    return lines


def _iptablesQuic(o: RuleOptions) -> list[str]:
    # Inserted at the top of FORWARD: an ACCEPT already there for the LAN
    # must not let QUIC past.
    if o.quic == "pass":
        return []
    ports, lines = _iptPorts(o.ports), []
    for ipt in _commands(o):
        if o.quic == "drop":
            target = "DROP"
        elif ipt == "ip6tables":
            target = "REJECT --reject-with icmp6-port-unreachable"
        else:
            target = "REJECT --reject-with icmp-port-unreachable"
        lines.append(f"{ipt} -I FORWARD -i {o.lanInterface} -p udp {ports} -j {target}")
    return lines


def _iptablesTproxy(o: RuleOptions) -> list[str]:
    ports, lines = _iptPorts(o.ports), []
    mark = f"{o.tproxyMark:#x}"
    for ipt in _commands(o):
        lines.append(f"{ipt} -t mangle -A PREROUTING -i {o.lanInterface} -p tcp {_NOT_LOCAL_IPT} {ports} "
                     f"-j TPROXY --on-port {o.listenPort} --tproxy-mark {mark}/{mark}")
    return lines


# --------------------------------------------------------------------------
# nftables
# --------------------------------------------------------------------------


def _nftPorts(ports: Sequence[int], protocol: str = "tcp") -> str:
    if len(ports) == 1:
        return f"{protocol} dport {ports[0]}"
    return f"{protocol} dport {{ " + ", ".join(str(p) for p in ports) + " }"


def _nftExclusion(o: RuleOptions) -> str:
    if o.proxyUser is not None:
        return f'meta skuid != "{o.proxyUser}"'
    return f"meta mark != {o.mark:#x}"


def _nftTable(o: RuleOptions, chains: list[tuple[str, str, list[str]]]) -> list[str]:
    family = "inet" if o.ipv6 else "ip"
    lines = [
        "nft -f - <<'EOF'",
        f"table {family} shifter",
        f"delete table {family} shifter",
        f"table {family} shifter {{",
    ]
    for name, hook, rules in chains:
        lines.append(f"    chain {name} {{")
        lines.append(f"        {hook}")
        lines.extend(f"        {rule}" for rule in rules)
        lines.append("    }")
    lines.append("}")
    lines.append("EOF")
    return lines


_NAT_PREROUTING = "type nat hook prerouting priority dstnat; policy accept;"
_NAT_OUTPUT = "type nat hook output priority -100; policy accept;"
_MANGLE_PREROUTING = "type filter hook prerouting priority mangle; policy accept;"
_FILTER = "type filter hook {hook} priority filter; policy accept;"
_FILTER_FORWARD = "type filter hook forward priority filter; policy accept;"


def _nftQuic(o: RuleOptions) -> list[tuple[str, str, list[str]]]:
    # A base chain of its own: an accept in another forward chain does not
    # end a packet's way through this one.
    if o.quic == "pass":
        return []
    if o.quic == "drop":
        verdict = "drop"
    else:
        verdict = f"reject with {'icmpx' if o.ipv6 else 'icmp'} type port-unreachable"
    return [("forward", _FILTER_FORWARD,
             [f'iifname "{o.lanInterface}" {_nftPorts(o.ports, "udp")} {verdict}'])]


def _nftRedirect(o: RuleOptions) -> list[str]:
    ports = _nftPorts(o.ports)
    chains = [("prerouting", _NAT_PREROUTING,
               [f'iifname "{o.lanInterface}" {_NOT_LOCAL_NFT} {ports} redirect to :{o.listenPort}'])]
    if o.excludes:
        chains.append(("output", _NAT_OUTPUT,
                       [f"{_nftExclusion(o)} {_NOT_LOCAL_NFT} {ports} redirect to :{o.listenPort}"]))
    lines = _nftTable(o, chains + _nftQuic(o))
    if o.excludes:
        lines.insert(0, f"# The output chain redirects the gateway's own connections too, "
                        f"except the proxy's ({_exclusionText(o)}).")
    return lines


def _nftQueue(o: RuleOptions) -> list[str]:
    # The NFQUEUE rule in iptables-nft form: it runs on nftables, and unlike
    # nft's own queue statement it needs no nft_queue in the kernel.
    lines = ["# Queue each SYN to Shifter before NAT, in iptables-nft form (nft's own",
             "# queue statement needs nft_queue, which not every kernel has):"]
    lines.extend(line for line in _iptablesQueue(o) if "-t mangle" in line)
    ports = _nftPorts(o.ports)
    marked = f" meta mark & {o.queueMark:#x} == {o.queueMark:#x}" if o.queueMark else ""
    # A SYN sent DIRECT at the SYN: its mark saved to its connection, and
    # not redirected.
    direct = (f"meta l4proto tcp meta mark & {o.directMark:#x} == {o.directMark:#x} "
              f"ct mark set ct mark | {o.directMark:#x} accept")
    first = [direct] if o.directAtSyn else []
    chains = [("prerouting", _NAT_PREROUTING,
               [f'iifname "{o.lanInterface}" {direct}' for direct in first]
               + [f'iifname "{o.lanInterface}" {_NOT_LOCAL_NFT} {ports}{marked} redirect to :{o.listenPort}'])]
    if o.excludes:
        exclusion = "" if o.queueMark else f" {_nftExclusion(o)}"
        chains.append(("output", _NAT_OUTPUT,
                       first + [f"{_NOT_LOCAL_NFT} {ports}{marked}{exclusion} redirect to :{o.listenPort}"]))
    if o.holdSyn:
        # A base chain of its own: an accept in another table's chain does
        # not stop it, so the reset cannot be bypassed.
        reject = (f"meta l4proto tcp meta mark & {o.rejectMark:#x} == {o.rejectMark:#x} "
                  "reject with tcp reset")
        for hook in ["forward", "input"] + (["output"] if o.excludes else []):
            chains.append((f"refused-{hook}", _FILTER.format(hook=hook), [reject]))
    lines.append("# Redirect the SYNs Shifter recorded (and marked) to it:" if o.queueMark
                 else "# Redirect the queued connections to Shifter:")
    if o.holdSyn:
        lines[-1] = ("# Redirect the SYNs Shifter accepted (queue mark) to it; reset those it "
                     "refused (reject mark), in chains of their own, whatever other tables accept:")
    if o.directAtSyn:
        if not o.holdSyn:
            lines[-1] = lines[-1][:-1] + ";"
        lines.append("# a SYN it sent DIRECT at the SYN (direct mark) is not redirected but forwarded, "
                     "its mark saved to its connection (ct mark), which the NFQUEUE rules skip:")
    lines.extend(_nftTable(o, chains + _nftQuic(o)))
    return lines


def _nftTproxy(o: RuleOptions) -> list[str]:
    ports, mark = _nftPorts(o.ports), f"{o.tproxyMark:#x}"
    return _nftTable(o, [(
        "prerouting", _MANGLE_PREROUTING,
        [f'iifname "{o.lanInterface}" {_NOT_LOCAL_NFT} {ports} tproxy to :{o.listenPort} '
         f"meta mark set meta mark | {mark} accept"],
    )] + _nftQuic(o))


# --------------------------------------------------------------------------
# The whole script
# --------------------------------------------------------------------------


def _exclusionText(o: RuleOptions) -> str:
    if o.proxyUser is not None:
        return f"user {o.proxyUser}"
    return f"mark {o.mark:#x}"


def _quic(o: RuleOptions) -> list[str]:
    ports = ",".join(str(p) for p in o.ports)
    if o.quic == "pass":
        return [f"# UDP to ports {ports} passes (--quic pass): QUIC (HTTP/3) goes around the proxy."]
    verb = ("the forward chain " if o.format == "nft" else "") + (
        ("drops" if o.format == "nft" else "drop") if o.quic == "drop"
        else ("refuses" if o.format == "nft" else "refuse"))
    how = " with an ICMP port-unreachable" if o.quic == "reject" else ""
    when = "once their QUIC attempt times out" if o.quic == "drop" else "at once"
    lines = [f"# QUIC (HTTP/3 over UDP) to ports {ports} would go around the proxy: {verb} it{how},",
             f"# so clients fall back to TCP, and so to the proxy, {when} (--quic reject|drop|pass)"]
    if o.format == "iptables":
        lines[-1] += ":"
        lines += _iptablesQuic(o)
    else:
        lines[-1] += "."
    return lines


def _policyRouting(o: RuleOptions) -> list[str]:
    mark = f"{o.tproxyMark:#x}"
    lines = ["# Deliver the marked packets locally, whatever their destination:",
             f"ip rule add fwmark {mark}/{mark} lookup {o.routeTable}",
             f"ip route add local 0.0.0.0/0 dev lo table {o.routeTable}"]
    if o.ipv6:
        lines += [f"ip -6 rule add fwmark {mark}/{mark} lookup {o.routeTable}",
                  f"ip -6 route add local ::/0 dev lo table {o.routeTable}"]
    return lines


def _shifterCommand(o: RuleOptions) -> str:
    if o.resolver == "tproxy":
        listen = f"tproxy:{o.listenPort}:interface=\\:\\:" if o.ipv6 else f"tproxy:{o.listenPort}:interface=0.0.0.0"
    elif o.ipv6:
        listen = f"tcp6:{o.listenPort}:interface=\\:\\:"
    else:
        listen = f"tcp:{o.listenPort}"
    extra = ""
    if o.resolver == "nfqueue":
        extra = f" --queue-num {o.queueNum}"
        if o.queueMark != DEFAULT_QUEUE_MARK:
            extra += f" --queue-mark {o.queueMark:#x}"
        if o.queueBypass:
            extra += " --queue-bypass"
        if o.holdSyn:
            extra += " --hold-syn"
            if o.rejectMark != DEFAULT_REJECT_MARK:
                extra += f" --reject-mark {o.rejectMark:#x}"
        if o.directMark != DEFAULT_DIRECT_MARK:
            extra += f" --direct-mark {o.directMark:#x}"
    if o.mark is not None:
        extra += f" --mark {o.mark:#x}"
    return f"twistd shifter --resolver {o.resolver} --listen '{listen}'{extra} --proxy HOST:PORT"


def _kmodEnable(o: RuleOptions) -> list[str]:
    # The module records nothing in a namespace until it is enabled there.
    # Connections redirected in nat OUTPUT arrive on lo, so with them the
    # module records from every interface.
    interface = "any" if o.excludes else o.lanInterface
    ports = ",".join(str(p) for p in o.ports)
    return [
        "# The Shifter kernel module (loaded beforehand: modprobe shifter, or insmod",
        "# kernel_module/shifter.ko) records this namespace's redirected connections",
        f"# to these ports, arriving on {'any interface' if o.excludes else o.lanInterface}:",
        f"python3 -m shifter.kmod enable --ports {ports} --interface {interface}",
    ]


def generateRules(o: RuleOptions) -> str:
    """
    The rules for C{o} as a shell script, comments included.

    @raise RulesError: if C{o} describes rules that cannot work.
    """
    o.check()
    ports = ",".join(str(p) for p in o.ports)
    families = "IPv4 and IPv6" if o.ipv6 else "IPv4"
    how = {
        "sockopt": "REDIRECT",
        "conntrack": "REDIRECT",
        "kmod": "REDIRECT",
        "nfqueue": "NFQUEUE, then REDIRECT",
        "tproxy": "TPROXY",
    }[o.resolver]
    header = (f"# Shifter, --resolver {o.resolver}: {how} of TCP ports {ports} arriving on "
              f"{o.lanInterface} to Shifter on port {o.listenPort}, {families}.")
    if o.holdSyn:
        header = (f"# Shifter, --resolver nfqueue --hold-syn: NFQUEUE, then REDIRECT of TCP ports "
                  f"{ports} arriving on {o.lanInterface} to Shifter on port {o.listenPort} once the "
                  f"proxy has opened the tunnel, or a reset if it refuses, {families}.")
    lines = [
        header,
        f"# Run Shifter with: {_shifterCommand(o)}",
    ]
    if o.resolver == "nfqueue" and o.queueBypass:
        lines.append("# --queue-bypass: while Shifter is not running, SYNs pass unmarked, "
                     "so unproxied, instead of being dropped.")
    if o.mark is not None:
        lines.append(f"# Have the proxy mark its connections {o.mark:#x} too "
                     f"(Squid: tcp_outgoing_mark {o.mark:#x} all).")
    if o.format == "iptables":
        body = {"nfqueue": _iptablesQueue, "tproxy": _iptablesTproxy}.get(o.resolver, _iptablesRedirect)(o)
    else:
        body = {"nfqueue": _nftQueue, "tproxy": _nftTproxy}.get(o.resolver, _nftRedirect)(o)
    lines += body
    if o.resolver == "tproxy":
        lines += _policyRouting(o)
    elif not o.excludes:
        lines.append("# The gateway's own connections are not redirected; --proxy-user or "
                     "--mark redirects them too, except the proxy's.")
    lines += _quic(o)
    if o.resolver == "kmod":
        lines += _kmodEnable(o)
    return "\n".join(lines) + "\n"


def _ports(value: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ports like 443,8443, got {value!r}") from None
    if not ports:
        raise argparse.ArgumentTypeError("no ports given")
    return tuple(dict.fromkeys(ports))


def _number(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (decimal or 0x...), got {value!r}") from None


def _parser(prog: str = "python -m shifter.rules") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print (never apply) the netfilter rules that send a LAN's "
        "connections to Shifter, for the chosen resolver, as a shell script.",
    )
    parser.add_argument("--resolver", choices=RESOLVER_NAMES, default="sockopt",
                        help="the resolver Shifter runs with (default: sockopt)")
    parser.add_argument("--format", choices=FORMATS, default="iptables",
                        help="iptables/ip6tables commands or an nftables table (default: iptables)")
    parser.add_argument("--lan-interface", required=True, metavar="IFACE",
                        help="the interface the clients' connections arrive on")
    parser.add_argument("--ports", type=_ports, default=(443,), metavar="PORT,...",
                        help="destination ports to redirect (default: 443)")
    parser.add_argument("--listen-port", type=int, default=12345, metavar="PORT",
                        help="Shifter's listening port (default: 12345)")
    parser.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True,
                        help="IPv6 rules too (default: yes)")
    exclusion = parser.add_mutually_exclusive_group()
    exclusion.add_argument("--proxy-user", metavar="USER",
                           help="redirect the gateway's own connections too, except this user's (the proxy's)")
    exclusion.add_argument("--mark", type=_number, metavar="MARK",
                           help="redirect the gateway's own connections too, except those with this "
                           "mark (the proxy's tcp_outgoing_mark, Shifter's --mark)")
    parser.add_argument("--queue-num", type=int, default=0, metavar="N",
                        help="nfqueue: the queue number (default: 0)")
    parser.add_argument("--queue-bypass", action="store_true",
                        help="nfqueue: let SYNs through, unproxied, while Shifter is not running")
    parser.add_argument("--queue-mark", type=_number, default=DEFAULT_QUEUE_MARK, metavar="MARK",
                        help=f"nfqueue: the mark Shifter sets on recorded SYNs (default: {DEFAULT_QUEUE_MARK:#x})")
    parser.add_argument("--hold-syn", action="store_true",
                        help="nfqueue: Shifter holds each SYN until the proxy answers CONNECT; "
                        "add the rules that reset the SYNs it refuses")
    parser.add_argument("--reject-mark", type=_number, default=DEFAULT_REJECT_MARK, metavar="MARK",
                        help=f"nfqueue --hold-syn: the mark Shifter sets on refused SYNs "
                        f"(default: {DEFAULT_REJECT_MARK:#x})")
    parser.add_argument("--direct-mark", type=_number, default=DEFAULT_DIRECT_MARK, metavar="MARK",
                        help=f"nfqueue: the mark Shifter sets on SYNs it sends DIRECT at the SYN; "
                        f"their connections are neither queued nor redirected, 0 for none "
                        f"(default: {DEFAULT_DIRECT_MARK:#x})")
    parser.add_argument("--tproxy-mark", type=_number, default=0x1, metavar="MARK",
                        help="tproxy: the mark that routes packets to the local socket (default: 0x1)")
    parser.add_argument("--route-table", type=int, default=100, metavar="TABLE",
                        help="tproxy: the routing table for marked packets (default: 100)")
    parser.add_argument("--quic", choices=QUIC_CHOICES, default="reject",
                        help="UDP from the LAN to the redirected ports (QUIC, HTTP/3), which would "
                        "go around the proxy: reject it with an ICMP port-unreachable so clients "
                        "fall back to TCP at once, drop it, or pass it (default: reject)")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Any = None, prog: str = "python -m shifter.rules") -> None:
    """
    The C{python -m shifter.rules} command; exits 2 with the reason for
    options that make no working rules.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    options = RuleOptions(
        resolver=args.resolver, format=args.format, lanInterface=args.lan_interface,
        ports=args.ports, listenPort=args.listen_port, ipv6=args.ipv6,
        proxyUser=args.proxy_user, mark=args.mark, queueNum=args.queue_num,
        queueBypass=args.queue_bypass, queueMark=args.queue_mark,
        tproxyMark=args.tproxy_mark, routeTable=args.route_table, quic=args.quic,
        holdSyn=args.hold_syn, rejectMark=args.reject_mark, directMark=args.direct_mark,
    )
    try:
        text = generateRules(options)
    except RulesError as e:
        parser.error(str(e))
    (out or sys.stdout).write(text)


if __name__ == "__main__":
    main()
