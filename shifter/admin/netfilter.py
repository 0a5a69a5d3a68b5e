"""
The gateway's netfilter rules as data, and where a given packet goes
through them: for C{python -m shifter.doctor}.

The rules are read from C{iptables-save} / C{ip6tables-save} (legacy or
nf_tables back end alike) and from C{nft -j list ruleset} (the tables that
iptables-nft does not own), into L{Chain}s of L{Rule}s.  L{traverse} then
follows one packet (a client's SYN, a UDP datagram, the proxy's own
connection) through every base chain of its hook, in priority order,
following jumps, and says what befell it: dropped or rejected, NATed (and
to where), handed to TPROXY or NFQUEUE, left untracked, or let through.

Only what decides the fate of such packets is modelled: interfaces,
protocols, addresses, ports, marks, the connection's mark (C{-m connmark},
C{CONNMARK}, nft C{ct mark}), the socket's user, conntrack state and
address types.  A match the model does not know never matches, and is
remembered (L{Outcome.unknown}) so that a conclusion resting on it can say
so.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
import shlex
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence, Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Base chains of the iptables tables: (hook, priority).
_IPTABLES_CHAINS = {
    "raw": {"PREROUTING": ("prerouting", -300), "OUTPUT": ("output", -300)},
    "mangle": {
        "PREROUTING": ("prerouting", -150), "INPUT": ("input", -150), "FORWARD": ("forward", -150),
        "OUTPUT": ("output", -150), "POSTROUTING": ("postrouting", -150),
    },
    "nat": {
        "PREROUTING": ("prerouting", -100), "INPUT": ("input", 100), "OUTPUT": ("output", -100),
        "POSTROUTING": ("postrouting", 100),
    },
    "filter": {"INPUT": ("input", 0), "FORWARD": ("forward", 0), "OUTPUT": ("output", 0)},
    "security": {"INPUT": ("input", 50), "FORWARD": ("forward", 50), "OUTPUT": ("output", 50)},
}

# Tables that iptables-nft keeps in nftables: iptables-save shows them.
IPTABLES_TABLES = frozenset(_IPTABLES_CHAINS)


@dataclass(frozen=True)
class Packet:
    """
    The first packet of a connection, as netfilter sees it at C{hook}.

    @ivar uid: the sending socket's user, for locally made packets.
    @ivar connmark: its connection's mark (0 for a new connection's).
    @ivar localAddresses: this host's addresses (for C{addrtype} and
        C{fib daddr type local}).
    """

    family: int
    hook: str
    protocol: str
    src: Address
    dst: Address
    dport: int
    iif: Optional[str] = None
    oif: Optional[str] = None
    uid: Optional[int] = None
    mark: int = 0
    sport: int = 40000
    localAddresses: frozenset[Address] = frozenset()
    connmark: int = 0


# A match answers True, False, or None when it cannot tell.
Match = Callable[[Packet], Optional[bool]]


@dataclass(frozen=True)
class Target:
    """
    What a rule does: C{kind} is one of accept, drop, reject, return,
    jump, goto, redirect, dnat, tproxy, queue, notrack, mark, connmark
    (the connection's mark set: cleared in C{markMask}, then xored with
    C{markValue}), savemark (the packet's mark, in C{markMask}, to the
    connection's), restoremark (the other way), or other (a target that
    changes nothing this model follows).
    """

    kind: str
    port: Optional[int] = None
    address: Optional[str] = None
    chain: Optional[str] = None
    markValue: int = 0
    markMask: int = 0
    queueNum: Optional[int] = None
    terminal: bool = True


@dataclass
class Rule:
    """
    A rule: its matches, then its statements (iptables has one target;
    an nftables rule may set a mark, TPROXY, then accept).
    """

    matches: list[Match]
    statements: list[Target]
    text: str
    unknown: list[str] = field(default_factory=list)


@dataclass
class Chain:
    """
    A chain: a base chain has a C{hook} and C{priority}.

    @ivar family: C{ip}, C{ip6} or C{inet}.
    @ivar kind: the nftables chain type (C{filter}, C{nat}, C{route}).
    """

    source: str
    family: str
    table: str
    name: str
    hook: Optional[str] = None
    priority: int = 0
    kind: str = "filter"
    policy: str = "accept"
    rules: list[Rule] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.source == "nft":
            return f"nft {self.family} {self.table} {self.name}"
        command = "ip6tables" if self.family == "ip6" else "iptables"
        return f"{command} -t {self.table} {self.name}"


@dataclass
class Ruleset:
    """
    Every chain, by (source, family, table, name).
    """

    chains: dict[tuple[str, str, str, str], Chain] = field(default_factory=dict)

    def add(self, chain: Chain) -> None:
        self.chains[(chain.source, chain.family, chain.table, chain.name)] = chain

    def find(self, near: Chain, name: str) -> Optional[Chain]:
        return self.chains.get((near.source, near.family, near.table, name))

    def baseChains(self, family: int, hook: str) -> list[Chain]:
        families = ("ip", "inet") if family == 4 else ("ip6", "inet")
        chosen = [c for c in self.chains.values() if c.hook == hook and c.family in families]
        return sorted(chosen, key=lambda c: c.priority)


@dataclass
class Outcome:
    """
    What befell a packet.

    @ivar verdict: C{accept}, C{drop} or C{reject}.
    @ivar by: the rule (as text) that decided it, for drop and reject.
    @ivar nat: (C{redirect} or C{dnat}, address or C{None}, port or
        C{None}, rule text), if a NAT rule took it.
    @ivar tproxy: (port, mark after, rule text).
    @ivar queue: (queue number, rule text).
    @ivar notrack: the rule text that took it out of conntrack.
    @ivar mark: its mark on the way out.
    @ivar connmark: its connection's mark on the way out.
    @ivar connmarkBy: the last rule that changed the connection's mark.
    @ivar unknown: matches and targets not understood on its way.
    """

    verdict: str = "accept"
    by: Optional[str] = None
    nat: Optional[tuple[str, Optional[str], Optional[int], str]] = None
    tproxy: Optional[tuple[int, int, str]] = None
    queue: Optional[tuple[int, str]] = None
    notrack: Optional[str] = None
    mark: int = 0
    connmark: int = 0
    connmarkBy: Optional[str] = None
    unknown: list[str] = field(default_factory=list)


class _Verdict(Exception):
    def __init__(self, kind: str, rule: Optional[Rule]) -> None:
        self.kind = kind
        self.rule = rule


def traverse(
    ruleset: Ruleset,
    packet: Packet,
    onQueue: Callable[[int], Optional[int]] = lambda num: None,
) -> Outcome:
    """
    Follow C{packet} through the base chains of its hook.

    @param onQueue: what the queue's reader does with a queued packet:
        the mark it sets when it accepts it, or C{None} if it drops it (no
        reader).
    """
    outcome = Outcome(mark=packet.mark, connmark=packet.connmark)
    for chain in ruleset.baseChains(packet.family, packet.hook):
        if chain.kind == "nat" and (outcome.nat is not None or outcome.notrack is not None):
            continue
        current = replace(packet, mark=outcome.mark, connmark=outcome.connmark)
        try:
            result = _run(ruleset, chain, current, outcome, depth=0, base=chain)
        except _Verdict as verdict:
            result = verdict.kind
            if verdict.kind in ("drop", "reject"):
                outcome.by = verdict.rule.text if verdict.rule is not None else f"{chain.title} policy"
        if result is None:
            result = chain.policy
            if result == "drop":
                outcome.by = f"{chain.title} policy drop"
        if result in ("drop", "reject"):
            outcome.verdict = result
            return outcome
        if result == "queue":
            assert outcome.queue is not None
            mark = onQueue(outcome.queue[0])
            if mark is None:
                outcome.verdict = "drop"
                outcome.by = outcome.queue[1] + " (nothing reads the queue)"
                return outcome
            outcome.mark |= mark
    return outcome


def _run(ruleset: Ruleset, chain: Chain, packet: Packet, outcome: Outcome, depth: int, base: Chain) -> Optional[str]:
    """
    Run one chain (called, directly or not, from the base chain C{base});
    return a verdict, or C{None} when it ends without one (fell off its
    end, or returned).
    """
    if depth > 32:
        return None
    for rule in chain.rules:
        packet = replace(packet, mark=outcome.mark, connmark=outcome.connmark)
        results = [match(packet) for match in rule.matches]
        if False in results:
            continue
        if None in results:
            outcome.unknown.append(rule.text)
            continue
        outcome.unknown.extend(rule.unknown)
        for target in rule.statements:
            result = _statement(ruleset, chain, packet, outcome, depth, rule, target, base)
            if result is _CONTINUE:
                continue
            if result is _NEXT_RULE:
                break
            return result  # type: ignore[return-value]
    return None


_CONTINUE = object()
_NEXT_RULE = object()


def _statement(
    ruleset: Ruleset, chain: Chain, packet: Packet, outcome: Outcome, depth: int, rule: Rule, target: Target,
    base: Chain,
) -> object:
    """
    Carry out one statement: C{_CONTINUE} with the rule's next statement,
    C{_NEXT_RULE}, or the chain's result (a verdict, or C{None} to return).
    """
    kind = target.kind
    if kind == "mark":
        outcome.mark = (outcome.mark & ~target.markMask & 0xFFFFFFFF) ^ target.markValue
        return _CONTINUE
    if kind == "notrack":
        outcome.notrack = outcome.notrack or rule.text
        return _CONTINUE
    if kind in ("connmark", "savemark"):
        value = target.markValue if kind == "connmark" else outcome.mark & target.markMask
        outcome.connmark = (outcome.connmark & ~target.markMask & 0xFFFFFFFF) ^ value
        outcome.connmarkBy = rule.text
        return _CONTINUE
    if kind == "restoremark":
        outcome.mark = (outcome.mark & ~target.markMask & 0xFFFFFFFF) ^ (outcome.connmark & target.markMask)
        return _CONTINUE
    if kind == "other":
        return _NEXT_RULE if target.terminal else _CONTINUE
    if kind in ("redirect", "dnat"):
        if base.kind != "nat":
            return _NEXT_RULE
        outcome.nat = (kind, target.address, target.port, rule.text)
        return "accept"
    if kind == "tproxy":
        if target.markMask:
            outcome.mark = (outcome.mark & ~target.markMask & 0xFFFFFFFF) ^ target.markValue
        outcome.tproxy = (target.port or 0, outcome.mark, rule.text)
        return "accept" if target.terminal else _CONTINUE
    if kind == "queue":
        outcome.queue = (target.queueNum or 0, rule.text)
        return "queue"
    if kind == "accept":
        return "accept"
    if kind in ("drop", "reject"):
        raise _Verdict(kind, rule)
    if kind == "return":
        return None
    if kind in ("jump", "goto"):
        called = ruleset.find(chain, target.chain or "")
        if called is None:
            outcome.unknown.append(rule.text)
            return _NEXT_RULE
        result = _run(ruleset, called, packet, outcome, depth + 1, base)
        if result is not None:
            return result
        return None if kind == "goto" else _NEXT_RULE
    return _CONTINUE


# --------------------------------------------------------------------------
# Matches
# --------------------------------------------------------------------------


def _negate(match: Match, negated: bool) -> Match:
    if not negated:
        return match

    def negation(packet: Packet) -> Optional[bool]:
        result = match(packet)
        return None if result is None else not result

    return negation


def _interface(name: str, outgoing: bool) -> Match:
    pattern = name[:-1] + "*" if name.endswith("+") else name

    def match(packet: Packet) -> Optional[bool]:
        actual = packet.oif if outgoing else packet.iif
        if actual is None:
            return False
        return fnmatch.fnmatchcase(actual, pattern)

    return match


def _protocol(name: str) -> Match:
    name = {"6": "tcp", "17": "udp"}.get(name, name.lower())
    return lambda packet: packet.protocol == name


def _family(version: int) -> Match:
    return lambda packet: packet.family == version


def _networks(texts: Iterable[str], destination: bool) -> Match:
    networks = []
    for text in texts:
        networks.append(ipaddress.ip_network(text, strict=False))

    def match(packet: Packet) -> Optional[bool]:
        address = packet.dst if destination else packet.src
        return any(address.version == n.version and address in n for n in networks)

    return match


def _ports(ranges: Sequence[tuple[int, int]], destination: bool) -> Match:
    def match(packet: Packet) -> Optional[bool]:
        port = packet.dport if destination else packet.sport
        return any(low <= port <= high for low, high in ranges)

    return match


def _mark(value: int, mask: int) -> Match:
    return lambda packet: packet.mark & mask == value & mask


def _connmark(value: int, mask: int) -> Match:
    return lambda packet: packet.connmark & mask == value & mask


def _uid(low: int, high: int) -> Match:
    def match(packet: Packet) -> Optional[bool]:
        if packet.hook not in ("output", "postrouting"):
            return False
        if packet.uid is None:
            return None
        return low <= packet.uid <= high

    return match


def _localDestination(packet: Packet) -> Optional[bool]:
    return packet.dst in packet.localAddresses


def _localSource(packet: Packet) -> Optional[bool]:
    return packet.src in packet.localAddresses


def _new(states: Iterable[str]) -> Match:
    wanted = {state.strip().lower() for state in states}
    return lambda packet: "new" in wanted


def _unknown(packet: Packet) -> Optional[bool]:
    return None


def _always(packet: Packet) -> Optional[bool]:
    return True


def _never(packet: Packet) -> Optional[bool]:
    return False


def _anyPort(ranges: Sequence[tuple[int, int]]) -> Match:
    return lambda packet: any(low <= packet.dport <= high or low <= packet.sport <= high for low, high in ranges)


# --------------------------------------------------------------------------
# iptables-save
# --------------------------------------------------------------------------


def parseIptablesSave(text: str, family: int) -> list[Chain]:
    """
    The chains of C{iptables-save} (C{family} 4) or C{ip6tables-save} (6)
    output.
    """
    familyName = "ip" if family == 4 else "ip6"
    chains: dict[str, Chain] = {}
    table = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            base = _IPTABLES_CHAINS.get(table, {}).get(name)
            chain = Chain("iptables", familyName, table, name)
            if base is not None:
                chain.hook, chain.priority = base
                chain.kind = "nat" if table == "nat" else "filter"
                chain.policy = policy.lower() if policy in ("ACCEPT", "DROP") else "accept"
            chains[f"{table}/{name}"] = chain
        elif line.startswith("-A "):
            words = shlex.split(line)
            owner = chains.get(f"{table}/{words[1]}")
            if owner is not None:
                owner.rules.append(_iptablesRule(words[2:], line, owner))
    return list(chains.values())


def _iptablesRule(words: list[str], line: str, chain: Chain) -> Rule:
    matches: list[Match] = []
    unknown: list[str] = []
    target = Target("other", terminal=False)
    command = "ip6tables" if chain.family == "ip6" else "iptables"
    text = f"{command} -t {chain.table} {line}"
    i = 0
    negated = False
    module = ""

    def take() -> str:
        nonlocal i
        i += 1
        return words[i] if i < len(words) else ""

    while i < len(words):
        word = words[i]
        if word == "!":
            negated = True
            i += 1
            continue
        if word in ("-i", "--in-interface", "-o", "--out-interface"):
            matches.append(_negate(_interface(take(), word in ("-o", "--out-interface")), negated))
        elif word in ("-p", "--protocol"):
            matches.append(_negate(_protocol(take()), negated))
        elif word in ("-s", "--source", "-d", "--destination"):
            destination = word in ("-d", "--destination")
            matches.append(_negate(_networks(take().split(","), destination), negated))
        elif word == "-m":
            module = take()
        elif word in ("--dport", "--destination-port", "--sport", "--source-port"):
            destination = word in ("--dport", "--destination-port")
            matches.append(_negate(_ports(_portRanges(take(), ":"), destination), negated))
        elif word in ("--dports", "--destination-ports", "--sports", "--source-ports", "--ports"):
            ranges = _portRanges(take(), ":")
            if word == "--ports":
                matches.append(_negate(_anyPort(ranges), negated))
            else:
                matches.append(_negate(_ports(ranges, word.startswith("--d")), negated))
        elif word == "--syn":
            matches.append(_negate(_always, negated))
        elif word == "--tcp-flags":
            flags = {"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}
            maskText, compText = take(), take()
            mask = flags if maskText == "ALL" else set(maskText.split(","))
            comp = set() if compText == "NONE" else flags if compText == "ALL" else set(compText.split(","))
            isSyn = {"SYN"} & mask == comp
            matches.append(_negate(_always if isSyn else _never, negated))
        elif word == "--mark" and module in ("mark", "connmark") and i + 1 < len(words):
            markValue, _, markMask = take().partition("/")
            kind = _mark if module == "mark" else _connmark
            matches.append(_negate(kind(int(markValue, 0), int(markMask, 0) if markMask else 0xFFFFFFFF), negated))
        elif word == "--uid-owner":
            low, _, high = take().partition("-")
            if not low.isdigit():
                matches.append(_unknown)
            else:
                matches.append(_negate(_uid(int(low), int(high or low)), negated))
        elif word in ("--dst-type", "--src-type"):
            types = take().split(",")
            if types == ["LOCAL"]:
                matches.append(_negate(_localDestination if word == "--dst-type" else _localSource, negated))
            else:
                matches.append(_unknown)
        elif word in ("--ctstate", "--state"):
            matches.append(_negate(_new(take().split(",")), negated))
        elif word in ("--comment",):
            take()
        elif word in ("-j", "--jump", "-g", "--goto"):
            target = _iptablesTarget(words[i + 1:], word in ("-g", "--goto"))
            break
        elif word.startswith("-"):
            # An option of a match this model does not follow: skip its
            # value (if any) and never match, since we cannot tell.
            matches.append(_unknown)
            if i + 1 < len(words) and not words[i + 1].startswith("-"):
                i += 1
        negated = False
        i += 1
    return Rule(matches, [target], text, unknown)


def _portRanges(text: str, separator: str) -> list[tuple[int, int]]:
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition(separator)
        ranges.append((int(low), int(high or low)))
    return ranges


def _option(words: list[str], name: str) -> Optional[str]:
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
    return None


def _iptablesTarget(words: list[str], goto: bool) -> Target:
    name = words[0] if words else ""
    rest = words[1:]
    simple = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject", "RETURN": "return", "NOTRACK": "notrack"}
    if name in simple:
        return Target(simple[name], terminal=name != "NOTRACK")
    if name == "REDIRECT":
        ports = _option(rest, "--to-ports")
        return Target("redirect", port=int(ports.split("-")[0]) if ports else None)
    if name == "DNAT":
        destination = _option(rest, "--to-destination") or ""
        address, port = _splitHostPort(destination)
        return Target("dnat", address=address, port=port)
    if name == "TPROXY":
        onPort = _option(rest, "--on-port")
        markValue, _, markMask = (_option(rest, "--tproxy-mark") or "0").partition("/")
        return Target(
            "tproxy", port=int(onPort) if onPort else None, markValue=int(markValue, 0),
            markMask=int(markMask, 0) if markMask else (0xFFFFFFFF if int(markValue, 0) else 0),
        )
    if name == "NFQUEUE":
        number = _option(rest, "--queue-num") or (_option(rest, "--queue-balance") or "0").split(":")[0]
        return Target("queue", queueNum=int(number))
    if name == "CT" and "--notrack" in rest:
        return Target("notrack", terminal=False)
    if name == "MARK":
        for option in ("--set-xmark", "--set-mark"):
            given = _option(rest, option)
            if given is not None:
                mark, _, mask = given.partition("/")
                return Target("mark", markValue=int(mark, 0), markMask=int(mask, 0) if mask else 0xFFFFFFFF,
                              terminal=False)
        return Target("other", terminal=False)
    if name == "CONNMARK":
        return _connmarkTarget(rest)
    if name in ("LOG", "NFLOG", "CT", "TRACE", "CLASSIFY", "DSCP", "TOS", "TCPMSS", "TTL", "HL"):
        return Target("other", terminal=False)
    if name in ("MASQUERADE", "SNAT", "NETMAP"):
        return Target("other", terminal=True)
    return Target("goto" if goto else "jump", chain=name)


def _connmarkTarget(words: list[str]) -> Target:
    """
    C{CONNMARK}: C{--set-xmark}, C{--set-mark}, C{--and-mark},
    C{--or-mark}, C{--xor-mark}, C{--save-mark} and C{--restore-mark}
    (with C{--mask}, or C{--nfmask} and C{--ctmask} alike, as one mask).
    """
    def number(text: str) -> int:
        return int(text, 0)

    for option in ("--set-xmark", "--set-mark"):
        given = _option(words, option)
        if given is not None:
            markText, _, maskText = given.partition("/")
            value = number(markText)
            # --set-mark V/M clears M and sets V: as --set-xmark V/(V|M).
            bits = number(maskText) if maskText else 0xFFFFFFFF
            return Target("connmark", markValue=value, markMask=bits | value if option == "--set-mark" else bits,
                          terminal=False)
    for option, make in (("--and-mark", lambda v: (0, ~v & 0xFFFFFFFF)), ("--or-mark", lambda v: (v, v)),
                         ("--xor-mark", lambda v: (v, 0))):
        given = _option(words, option)
        if given is not None:
            value, mask = make(number(given))
            return Target("connmark", markValue=value, markMask=mask, terminal=False)
    masks = [_option(words, option) for option in ("--mask", "--nfmask", "--ctmask")]
    mask = next((number(m) for m in masks if m is not None), 0xFFFFFFFF)
    if "--save-mark" in words:
        return Target("savemark", markMask=mask, terminal=False)
    if "--restore-mark" in words:
        return Target("restoremark", markMask=mask, terminal=False)
    return Target("other", terminal=False)


def _splitHostPort(text: str) -> tuple[Optional[str], Optional[int]]:
    """
    C{addr}, C{addr:port}, C{[v6]:port}, C{:port}, with ranges cut to
    their first value.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    first = host.split("-")[0]
    return (first or None), int(port.split("-")[0]) if port else None


# --------------------------------------------------------------------------
# nft -j list ruleset
# --------------------------------------------------------------------------


def nftRuleTexts(text: str) -> dict[tuple[str, str, str, int], str]:
    """
    Each rule of C{nft -a list ruleset} output as written, by (family,
    table, chain, handle), to quote rules as people write them.
    """
    texts = {}
    table = chain = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            table = (words[1], words[2])
        elif len(words) >= 2 and words[0] == "chain":
            chain = words[1]
        elif table is not None and chain is not None and "# handle " in line and not line.strip().startswith("type "):
            rule, _, handle = line.strip().rpartition(" # handle ")
            if handle.isdigit():
                rule = re.sub(r" counter packets \d+ bytes \d+", "", rule)
                texts[(table[0], table[1], chain, int(handle))] = rule
    return texts


def parseNftJson(
    text: str,
    skipTables: Iterable[tuple[str, str]] = (),
    ruleTexts: Optional[dict[tuple[str, str, str, int], str]] = None,
) -> list[Chain]:
    """
    The chains of C{nft -j list ruleset} output, but those of the tables
    in C{skipTables} ((family, name): the ones iptables-save showed).

    @param ruleTexts: L{nftRuleTexts}, to quote the rules as written.
    """
    if not text.strip():
        return []
    skip = set(skipTables)
    chains: dict[tuple[str, str, str], Chain] = {}
    for item in json.loads(text).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            if (c["family"], c["table"]) in skip:
                continue
            chain = Chain("nft", c["family"], c["table"], c["name"])
            if "hook" in c:
                chain.hook = c["hook"]
                chain.priority = _priority(c.get("prio", 0))
                chain.kind = c.get("type", "filter")
                chain.policy = c.get("policy", "accept")
            chains[(c["family"], c["table"], c["name"])] = chain
        elif "rule" in item:
            r = item["rule"]
            owner = chains.get((r["family"], r["table"], r["chain"]))
            if owner is not None:
                written = (ruleTexts or {}).get((r["family"], r["table"], r["chain"], r.get("handle", -1)))
                owner.rules.append(_nftRule(r.get("expr", []), owner, written))
    return [c for c in chains.values() if c.family in ("ip", "ip6", "inet")]


def _priority(value: Any) -> int:
    if isinstance(value, int):
        return value
    names = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
    return names.get(str(value), 0)


def _nftRule(expressions: list[dict[str, Any]], chain: Chain, written: Optional[str] = None) -> Rule:
    matches: list[Match] = []
    unknown: list[str] = []
    statements: list[Target] = []
    text = f"nft {chain.family} {chain.table} {chain.name}: " + (written or _nftText(expressions))
    for expression in expressions:
        (kind, body), = expression.items()
        if kind == "match":
            matches.append(_nftMatch(body))
        elif kind in ("accept", "drop", "return", "reject"):
            statements.append(Target(kind))
        elif kind in ("jump", "goto"):
            statements.append(Target(kind, chain=body.get("target")))
        elif kind == "redirect":
            port = (body or {}).get("port")
            statements.append(Target("redirect", port=port if isinstance(port, int) else None))
        elif kind == "dnat":
            port, address = body.get("port"), body.get("addr")
            statements.append(Target("dnat", address=address if isinstance(address, str) else None,
                                     port=port if isinstance(port, int) else None))
        elif kind == "tproxy":
            port = body.get("port")
            statements.append(Target("tproxy", port=port if isinstance(port, int) else None, terminal=False))
        elif kind == "queue":
            number = body.get("num", 0)
            statements.append(Target("queue", queueNum=number if isinstance(number, int) else 0))
        elif kind == "notrack":
            statements.append(Target("notrack", terminal=False))
        elif kind == "mangle" and body.get("key") in (_META_MARK, _CT_MARK):
            statement = _nftMarkSet(body["key"], body.get("value"))
            if statement is None:
                unknown.append(text)
            else:
                statements.append(statement)
        elif kind in ("masquerade", "snat"):
            statements.append(Target("other", terminal=True))
        elif kind == "xt":
            matches.append(_unknown)
        elif kind not in ("counter", "log", "limit", "meter", "ct", "nflog", "mangle", "quota", "set", "dup",
                          "fwd", "synproxy", "flow"):
            matches.append(_unknown)
    return Rule(matches, statements, text, unknown)


_META_MARK = {"meta": {"key": "mark"}}
_CT_MARK = {"ct": {"key": "mark"}}


def _nftMarkSet(key: Any, value: Any) -> Optional[Target]:
    """
    C{meta mark set N}, C{meta mark set meta mark | N}, and the same of
    C{ct mark}; C{ct mark set meta mark} (the mark saved to the
    connection) and C{meta mark set ct mark} (restored from it).
    """
    kind = "mark" if key == _META_MARK else "connmark"
    if isinstance(value, int):
        return Target(kind, markValue=value, markMask=0xFFFFFFFF, terminal=False)
    if isinstance(value, dict) and "|" in value:
        left, right = value["|"]
        if left == key and isinstance(right, int):
            # mark | N: bits N set, the others kept.
            return Target(kind, markValue=right, markMask=right, terminal=False)
    if value in (_META_MARK, _CT_MARK) and value != key:
        return Target("savemark" if key == _CT_MARK else "restoremark", markMask=0xFFFFFFFF, terminal=False)
    return None


def _nftText(expressions: list[dict[str, Any]]) -> str:
    return json.dumps(expressions, separators=(",", ":"))


def _nftValues(right: Any) -> Optional[list[Any]]:
    """
    The values a match compares with: a list of scalars, (low, high)
    ranges and networks; C{None} for what cannot be read (a named set).
    """
    if isinstance(right, dict):
        if "set" in right:
            values: list[Any] = []
            for item in right["set"]:
                inner = _nftValues(item)
                if inner is None:
                    return None
                values.extend(inner)
            return values
        if "range" in right:
            return [tuple(right["range"])]
        if "prefix" in right:
            return [ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}", strict=False)]
        return None
    if isinstance(right, list):
        return right
    if isinstance(right, str) and right.startswith("@"):
        return None
    return [right]


def _valueMatches(actual: Any, values: list[Any]) -> bool:
    for value in values:
        if isinstance(value, tuple):
            if isinstance(actual, int) and value[0] <= actual <= value[1]:
                return True
            if not isinstance(actual, int):
                try:
                    low, high = (ipaddress.ip_address(v) for v in value)
                    if low.version == actual.version and low <= actual <= high:
                        return True
                except (ValueError, TypeError):
                    pass
        elif isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            if isinstance(actual, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and actual.version == value.version \
                    and actual in value:
                return True
        elif isinstance(actual, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and isinstance(value, str):
            try:
                if ipaddress.ip_address(value) == actual:
                    return True
            except ValueError:
                pass
        elif isinstance(actual, str) and isinstance(value, str):
            if fnmatch.fnmatchcase(actual, value.replace("\\*", "*")):
                return True
        elif actual == value:
            return True
    return False


def _nftMatch(body: dict[str, Any]) -> Match:
    op = body.get("op", "==")
    left = body.get("left")
    values = _nftValues(body.get("right"))
    if values is None or op not in ("==", "!=", "in"):
        return _unknown
    negated = op == "!="
    mask = None
    if isinstance(left, dict) and "&" in left:
        inner, mask = left["&"]
        left = inner
        if not isinstance(mask, int):
            if left == {"payload": {"protocol": "tcp", "field": "flags"}}:
                # tcp flags & (fin|syn|rst|ack) == syn: the first packet.
                return _negate(lambda p: p.protocol == "tcp" and "syn" in values, negated)
            return _unknown
    getter = _nftGetter(left)
    if getter is None:
        return _unknown
    protocolCheck = _nftImplied(left)

    def match(packet: Packet) -> Optional[bool]:
        if protocolCheck is not None and not protocolCheck(packet):
            return False
        actual = getter(packet)
        if actual is None:
            return None
        if mask is not None:
            actual = actual & mask
        if left == {"ct": {"key": "state"}}:
            result = "new" in values
        else:
            result = _valueMatches(actual, values)
        return not result if negated else result

    return match


def _nftImplied(left: Any) -> Optional[Match]:
    """
    What a payload expression implies: C{tcp dport} only matches TCP,
    C{ip saddr} only IPv4.
    """
    if isinstance(left, dict) and "payload" in left:
        protocol = left["payload"].get("protocol")
        if protocol in ("tcp", "udp"):
            return lambda p: p.protocol == protocol
        if protocol == "ip":
            return lambda p: p.family == 4
        if protocol == "ip6":
            return lambda p: p.family == 6
    return None


def _nftGetter(left: Any) -> Optional[Callable[[Packet], Any]]:
    if not isinstance(left, dict):
        return None
    if "meta" in left:
        key = left["meta"].get("key")
        return {
            "iifname": lambda p: p.iif,
            "oifname": lambda p: p.oif,
            "iif": lambda p: p.iif,
            "oif": lambda p: p.oif,
            "l4proto": lambda p: p.protocol,
            "protocol": lambda p: "ip" if p.family == 4 else "ip6",
            "nfproto": lambda p: "ipv4" if p.family == 4 else "ipv6",
            "mark": lambda p: p.mark,
            "skuid": lambda p: p.uid if p.hook in ("output", "postrouting") else -1,
        }.get(key)
    if "payload" in left:
        field = left["payload"].get("field")
        return {
            "dport": lambda p: p.dport,
            "sport": lambda p: p.sport,
            "saddr": lambda p: p.src,
            "daddr": lambda p: p.dst,
            "protocol": lambda p: p.protocol,
            "nexthdr": lambda p: p.protocol,
        }.get(field)
    if "ct" in left and left["ct"].get("key") == "state":
        return lambda p: "new"
    if left == _CT_MARK:
        return lambda p: p.connmark
    if "fib" in left:
        fib = left["fib"]
        if fib.get("result") == "type" and fib.get("flags") in (["daddr"], "daddr"):
            return lambda p: "local" if p.dst in p.localAddresses else "unicast"
    return None


def loadRuleset(iptables4: str, iptables6: str, nft: str, nftText: str = "") -> Ruleset:
    """
    The whole ruleset from the listings (any may be empty): C{iptables-save},
    C{ip6tables-save}, C{nft -j list ruleset} and C{nft -a list ruleset}.
    """
    ruleset = Ruleset()
    shown: set[tuple[str, str]] = set()
    for text, family in ((iptables4, 4), (iptables6, 6)):
        for chain in parseIptablesSave(text, family):
            ruleset.add(chain)
            shown.add((chain.family, chain.table))
    for chain in parseNftJson(nft, shown, nftRuleTexts(nftText)):
        ruleset.add(chain)
    return ruleset
