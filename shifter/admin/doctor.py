"""
C{python -m shifter.doctor}: check a gateway for the mistakes that make a
transparent redirector fail silently, and say what to change.

Run it on the gateway, with Shifter's own options or C{--config} file (its
C{[gateway]} table names the LAN interfaces and ports)::

    python -m shifter.doctor --config /etc/shifter/shifter.toml
    python -m shifter.doctor --lan-interface lan0 --ports 443,8443 \\
        --listen 'tcp6:12345:interface=\\:\\:' --proxy 127.0.0.1:3128

It reads the rules (iptables, ip6tables and nftables alike) and follows
through them, as netfilter would, the packets that matter: a client's SYN
to each redirected port arriving on each LAN interface, the proxy's own
connections, Shifter's own connections to the proxy, a client's QUIC
datagram.  It also reads the sysctls, routes, policy routing, limits and
modules that matter for the chosen resolver, and asks the proxy for a
CONNECT.  Checks:

  - forwarding: C{ip_forward} (and IPv6 forwarding where the LAN has IPv6);
  - redirect: each port, on each LAN interface, reaches Shifter's port, by
    the kind of rule the resolver needs (REDIRECT/DNAT, NFQUEUE then
    REDIRECT, TPROXY with its policy routing), on an address Shifter
    listens on;
  - loop: the proxy's and Shifter's own connections are not redirected
    back to Shifter;
  - rp_filter and route_localnet, where they decide the fate of clients'
    packets;
  - conntrack: the redirected connections are tracked (no NOTRACK), and
    ctnetlink answers for C{--resolver conntrack};
  - kmod: the kernel module is loaded, records in this namespace and
    watches the ports, for C{--resolver kmod};
  - descriptors: the open-file limit allows C{--max-connections};
  - quic: UDP to the redirected ports from the LAN is refused, as
    C{python -m shifter.rules} does, so browsers fall back to TCP;
  - listening: something listens on Shifter's port;
  - kerberos: with a keytab, the gateway logs in to the KDC and gets a
    ticket for each proxy's C{HTTP/} service (the keytab readable and
    holding the principal, the KDC reachable, the clocks in step);
  - proxy: each proxy answers a CONNECT with 2xx (logged in, where it
    asks for it).

With a control socket (C{--control}, or the file's C{control}), it also
reports the share of the connections read since start whose ClientHello
offered Encrypted Client Hello (a line C{note: ech: ...}): a rule on
names does not see the names those hide.

Each finding is one line, C{error: CHECK: what is wrong; what to change}
or C{warning: ...}; a good gateway prints nothing.  Exit status: 1 if
there is an error, 0 otherwise, 2 for bad options.

Doctor is a command, not part of the service: it runs programs (C{ip},
C{iptables-save}, C{nft}) and waits for them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python import usage

from shifter.admin.netfilter import Address, Outcome, Packet, Ruleset, loadRuleset, traverse

# Where a client's connection is going, in the simulated packets.
_REMOTE = {4: ipaddress.ip_address("198.51.100.10"), 6: ipaddress.ip_address("2001:db8:ffff::10")}
_DEFAULT_CHECK_TARGET = "example.com:443"


@dataclass(frozen=True)
class Finding:
    """
    One thing wrong with the gateway.

    @ivar severity: C{"error"} (Shifter cannot work as configured, or
        traffic escapes the proxy) or C{"warning"}.
    @ivar check: which check found it.
    @ivar message: what is wrong and what to change, in one line.
    """

    severity: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.check}: {self.message}"


@dataclass
class Expectations:
    """
    What the gateway should do, from Shifter's options and doctor's own.
    """

    lanInterfaces: list[str]
    ports: list[int]
    listenPort: Optional[int]
    listenAddress: Optional[Address]
    listenFamilies: set[int]
    resolver: str = "sockopt"
    queueNum: int = 0
    queueMark: int = 0x10000
    directMark: int = 0
    proxies: list[Any] = field(default_factory=list)
    proxyMarks: list[Optional[int]] = field(default_factory=list)
    proxyUser: Optional[str] = None
    proxyUid: Optional[int] = None
    proxyMark: Optional[int] = None
    shifterUid: int = 0
    maxConnections: Optional[int] = None
    clientNetworks: list[Any] = field(default_factory=list)
    checkTarget: tuple[str, int] = ("example.com", 443)
    quic: str = "reject"
    credentialsGiven: bool = False


@dataclass
class GatewayState:
    """
    What doctor read of the gateway.

    @ivar sysctls: values by dotted name, read on demand.
    @ivar interfaces: each interface's addresses.
    @ivar routeDevice: the interface the route to an address leaves by.
    @ivar ipRules: C{ip -j rule} for IPv4 and IPv6.
    @ivar tableRoutes: C{ip -j route show table N}, by (family, table).
    @ivar listeners: the PIDs listening on a TCP port.
    @ivar openFileLimit: the soft C{RLIMIT_NOFILE} of a PID (C{None}: ours).
    """

    ruleset: Ruleset
    interfaces: dict[str, list[Any]]
    sysctl: Callable[[str], Optional[str]]
    routeDevice: Callable[[Address], Optional[str]]
    ipRules: Callable[[int], list[dict[str, Any]]]
    tableRoutes: Callable[[int, str], list[dict[str, Any]]]
    listeners: Callable[[int], Optional[list[int]]]
    openFileLimit: Callable[[Optional[int]], Optional[int]]
    processUid: Callable[[int], Optional[int]] = lambda pid: None
    rulesRead: bool = True

    @property
    def localAddresses(self) -> frozenset[Address]:
        return frozenset(i.ip for addresses in self.interfaces.values() for i in addresses)

    def addresses(self, interface: str, family: int) -> list[Any]:
        return [i for i in self.interfaces.get(interface, []) if i.version == family]


# --------------------------------------------------------------------------
# Reading the gateway
# --------------------------------------------------------------------------


def _run(*command: str) -> str:
    if shutil.which(command[0]) is None:
        return ""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def _json(*command: str) -> Any:
    text = _run(*command)
    try:
        return json.loads(text) if text.strip() else []
    except ValueError:
        return []


def readGateway() -> GatewayState:
    """
    Read this network namespace's rules, interfaces, routes and limits.
    """
    listings = (
        _run("iptables-save"), _run("ip6tables-save"),
        _run("nft", "-j", "list", "ruleset"), _run("nft", "-a", "list", "ruleset"),
    )
    ruleset = loadRuleset(*listings)
    # iptables-save prints its header even with no rules; nft prints its
    # metainfo: nothing at all means neither could read (not root).
    rulesRead = any(listing.strip() for listing in listings)
    interfaces: dict[str, list[Any]] = {}
    for link in _json("ip", "-j", "addr", "show"):
        addresses = interfaces.setdefault(link.get("ifname", "?"), [])
        for info in link.get("addr_info", []):
            try:
                addresses.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
            except (KeyError, ValueError):
                pass

    def sysctl(name: str) -> Optional[str]:
        try:
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                return f.read().strip()
        except OSError:
            return None

    def routeDevice(address: Address) -> Optional[str]:
        routes = _json("ip", "-j", "route", "get", str(address))
        return routes[0].get("dev") if routes else None

    def ipRules(family: int) -> list[dict[str, Any]]:
        return _json("ip", "-j", f"-{family}", "rule", "show")  # type: ignore[no-any-return]

    def tableRoutes(family: int, table: str) -> list[dict[str, Any]]:
        return _json("ip", "-j", f"-{family}", "route", "show", "table", table)  # type: ignore[no-any-return]

    def listeners(port: int) -> Optional[list[int]]:
        if shutil.which("ss") is None:
            return None
        out = _run("ss", "-Htlnp", f"sport = :{port}")
        if not out.strip():
            return []
        return [int(pid) for pid in re.findall(r"pid=(\d+)", out)] or [-1]

    def openFileLimit(pid: Optional[int]) -> Optional[int]:
        if pid is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return None if soft == resource.RLIM_INFINITY else soft
        try:
            with open(f"/proc/{pid}/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        value = line.split()[3]
                        return None if value == "unlimited" else int(value)
        except OSError:
            return None
        return None

    def processUid(pid: int) -> Optional[int]:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None

    return GatewayState(
        ruleset, interfaces, sysctl, routeDevice, ipRules, tableRoutes, listeners, openFileLimit, processUid,
        rulesRead,
    )


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


def _family(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


def _lanClients(state: GatewayState, lan: str) -> Iterable[tuple[int, Address]]:
    """
    For each family a client on C{lan} can use (IPv6 only where C{lan} has
    a global address), that family and such a client's address.
    """
    for version in (4, 6):
        client = _clientAddress(state, lan, version)
        if client is None or (version == 6 and not _hasGlobal(state, lan, 6)):
            continue
        yield version, client


def _clientAddress(state: GatewayState, interface: str, version: int) -> Optional[Address]:
    """
    An address a client on C{interface} could have: one of its network's,
    not the gateway's own.
    """
    for address in state.addresses(interface, version):
        if version == 6 and address.ip.is_link_local:
            continue
        network = address.network
        for offset in (2, 3, 1):
            if network.num_addresses > offset:
                candidate = network.network_address + offset
                if candidate != address.ip:
                    return candidate  # type: ignore[no-any-return]
        return address.ip  # type: ignore[no-any-return]
    return None


def _hasGlobal(state: GatewayState, interface: str, version: int) -> bool:
    return any(not a.ip.is_link_local and not a.ip.is_loopback for a in state.addresses(interface, version))


def _forwarding(state: GatewayState, version: int) -> bool:
    name = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
    return state.sysctl(name) == "1"


def checkForwarding(expected: Expectations, state: GatewayState) -> list[Finding]:
    findings = []
    if not _forwarding(state, 4):
        findings.append(Finding(
            "error", "forwarding",
            "net.ipv4.ip_forward is 0: the gateway routes nothing for its clients but what it redirects "
            "(no DNS, no other port); set net.ipv4.ip_forward=1 (sysctl -w, and in /etc/sysctl.d/)",
        ))
    v6Lans = [lan for lan in expected.lanInterfaces if _hasGlobal(state, lan, 6)]
    if v6Lans and not _forwarding(state, 6):
        findings.append(Finding(
            "warning", "forwarding",
            f"{', '.join(v6Lans)} has IPv6 addresses but net.ipv6.conf.all.forwarding is 0: IPv6 clients "
            "get nothing routed; set it to 1, or remove IPv6 from the LAN",
        ))
    return findings


def _ruleHint(expected: Expectations, lan: str, port: int) -> str:
    resolver = expected.resolver if expected.resolver != "auto" else "sockopt"
    listen = expected.listenPort or 12345
    return f"python -m shifter.rules --resolver {resolver} --lan-interface {lan} --ports {port} --listen-port {listen}"


def _onQueue(expected: Expectations) -> Callable[[int], Optional[int]]:
    def onQueue(number: int) -> Optional[int]:
        if expected.resolver == "nfqueue" and number == expected.queueNum:
            return expected.queueMark
        return None

    return onQueue


def _redirectedTo(outcome: Outcome, packet: Packet, state: GatewayState) -> Optional[tuple[Optional[Address], int]]:
    """
    Where a NAT rule sends the packet: (address, port); the address is
    C{None} for the incoming interface's own (REDIRECT).
    """
    if outcome.nat is None:
        return None
    kind, address, port, _ = outcome.nat
    port = port or packet.dport
    if kind == "redirect":
        if packet.hook == "output":
            return ipaddress.ip_address("127.0.0.1" if packet.family == 4 else "::1"), port
        return None, port
    if address is None:
        return None, port
    return ipaddress.ip_address(address), port


def _reachesShifter(expected: Expectations, target: tuple[Optional[Address], int]) -> bool:
    return target[1] == expected.listenPort


def checkRedirect(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    Each port, on each LAN interface and family, reaches Shifter.
    """
    findings: list[Finding] = []
    for lan in expected.lanInterfaces:
        if lan not in state.interfaces:
            findings.append(Finding(
                "error", "redirect", f"there is no interface {lan} on this gateway (interfaces: "
                f"{', '.join(sorted(n for n in state.interfaces if n != 'lo'))}): give the LAN interface",
            ))
            continue
        for version, client in _lanClients(state, lan):
            for port in expected.ports:
                finding = _checkOne(expected, state, lan, version, client, port)
                if finding is not None:
                    findings.append(finding)
    return findings


def _lanPacket(state: GatewayState, lan: str, version: int, client: Address, port: int,
               protocol: str = "tcp", hook: str = "prerouting", oif: Optional[str] = None) -> Packet:
    return Packet(version, hook, protocol, client, _REMOTE[version], port, iif=lan, oif=oif,
                  localAddresses=state.localAddresses)


def _checkOne(expected: Expectations, state: GatewayState, lan: str, version: int, client: Address,
              port: int) -> Optional[Finding]:
    what = f"TCP port {port} arriving on {lan} ({_family(version)})"
    packet = _lanPacket(state, lan, version, client, port)
    outcome = traverse(state.ruleset, packet, _onQueue(expected))
    hint = _ruleHint(expected, lan, port)
    if outcome.verdict in ("drop", "reject") and outcome.queue is not None and outcome.by == outcome.queue[1] + \
            " (nothing reads the queue)":
        number, rule = outcome.queue
        if expected.resolver == "nfqueue":
            why = f"but Shifter reads queue {expected.queueNum}: make them the same (--queue-num)"
        else:
            why = f"which --resolver {expected.resolver} does not read: these rules are for --resolver nfqueue"
        return Finding("error", "redirect", f"{what} is queued to NFQUEUE {number} ({rule}), {why}")
    if outcome.verdict in ("drop", "reject"):
        verdict = "dropped" if outcome.verdict == "drop" else "rejected"
        return Finding("error", "redirect", f"{what} is {verdict} before it reaches Shifter, by "
                       f"{outcome.by}: remove that rule or let these connections through")
    if expected.resolver == "tproxy":
        return _checkTproxy(expected, state, what, outcome, version, hint)
    if expected.resolver == "nfqueue" and outcome.queue is None:
        return Finding("error", "redirect", f"{what} is not queued to Shifter (NFQUEUE --queue-num "
                       f"{expected.queueNum}), so --resolver nfqueue never sees its SYN; {hint} prints the rules")
    if outcome.notrack is not None:
        return Finding("error", "conntrack", f"{what} is not tracked ({outcome.notrack}): without conntrack "
                       "there is no NAT, so no redirect; remove the rule or keep these ports out of it")
    target = _redirectedTo(outcome, packet, state)
    if target is None:
        if version == 6 and not _forwarding(state, 6) and not _anyRedirect(expected, state, 6):
            return None
        severity = "error"
        escape = " and goes around the proxy" if _forwarding(state, version) else ""
        others = [
            other for other in state.interfaces
            if other not in (lan, "lo") and _reachesShifterFrom(expected, state, other, version, port)
        ]
        elsewhere = f" (a rule redirects it when it arrives on {', '.join(others)}: is that the LAN " \
                    f"interface?)" if others else ""
        return Finding(severity, "redirect", f"{what} is not redirected to Shifter{escape}{elsewhere}; "
                       f"add the rule: {hint} prints it")
    address, toPort = target
    rule = outcome.nat[3] if outcome.nat else ""
    if toPort != expected.listenPort:
        return Finding("error", "redirect", f"{what} is redirected to port {toPort}, but Shifter listens on "
                       f"{expected.listenPort}: fix the rule ({rule}) or --listen")
    if address is not None:
        if address not in state.localAddresses and not address.is_loopback:
            return Finding("error", "redirect", f"{what} is DNATed to {address}, not an address of this "
                           f"gateway ({rule}): DNAT to one of its own addresses, or REDIRECT")
        if address.is_loopback:
            if version == 6:
                return Finding("error", "route_localnet", f"{what} is DNATed to {address} ({rule}): IPv6 "
                               "never routes packets from outside to ::1; use REDIRECT")
            if state.sysctl(f"net.ipv4.conf.{lan}.route_localnet") != "1" and \
                    state.sysctl("net.ipv4.conf.all.route_localnet") != "1":
                return Finding("error", "route_localnet", f"{what} is DNATed to {address} ({rule}), which the "
                               f"kernel drops as a martian unless net.ipv4.conf.{lan}.route_localnet=1: set it, "
                               f"or use REDIRECT (--to-ports {expected.listenPort})")
    if version not in expected.listenFamilies:
        return Finding("error", "redirect", f"{what} is redirected to port {toPort}, but Shifter listens on "
                       f"{_family(4 if version == 6 else 6)} only: listen on tcp6:{toPort}:interface=\\:\\: for both")
    listening = expected.listenAddress
    if listening is not None and not listening.is_unspecified:
        landing = address if address is not None else (
            state.addresses(lan, version)[0].ip if state.addresses(lan, version) else None
        )
        if landing is not None and landing != listening:
            return Finding("error", "redirect", f"{what} is redirected to {landing} port {toPort}, but Shifter "
                           f"listens on {listening} only: listen on every address (interface=\\:\\:) or on {landing}")
    return None


def _directOutcomes(expected: Expectations, state: GatewayState) -> Iterable[tuple[str, str, Packet, Outcome]]:
    """
    With a direct mark: for each LAN interface, family and port, what
    befalls a SYN that Shifter sends DIRECT at the SYN (it reads it from
    the queue and gives it the direct mark), as (what, rules hint, SYN,
    outcome).
    """
    if expected.resolver != "nfqueue" or not expected.directMark:
        return

    def onQueue(number: int) -> Optional[int]:
        return expected.directMark if number == expected.queueNum else None

    for lan in expected.lanInterfaces:
        if lan not in state.interfaces:
            continue
        for version, client in _lanClients(state, lan):
            for port in expected.ports:
                packet = _lanPacket(state, lan, version, client, port)
                outcome = traverse(state.ruleset, packet, onQueue)
                if outcome.queue is None or outcome.by == outcome.queue[1] + " (nothing reads the queue)":
                    continue  # not queued to Shifter: checkRedirect says so
                what = f"TCP port {port} arriving on {lan} ({_family(version)})"
                yield what, _ruleHint(expected, lan, port), packet, outcome


def checkDirect(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    With a direct mark (C{--direct-mark}, C{--resolver nfqueue}): a SYN
    Shifter sends DIRECT at the SYN is not redirected to Shifter, its mark
    is saved to its connection, and that connection's packets are not
    queued again.
    """
    findings = []
    mark = f"{expected.directMark:#x}"
    for what, hint, packet, outcome in _directOutcomes(expected, state):
        sent = f"a SYN of {what} that Shifter sends DIRECT at the SYN (direct mark {mark})"
        if outcome.verdict in ("drop", "reject"):
            verdict = "dropped" if outcome.verdict == "drop" else "rejected"
            findings.append(Finding("error", "direct", f"{sent} is {verdict} by {outcome.by}: "
                                    f"{hint} prints rules that forward it, or give --direct-mark 0"))
        elif _redirectedTo(outcome, packet, state) is not None:
            rule = outcome.nat[3] if outcome.nat else ""
            findings.append(Finding("error", "direct", f"{sent} is redirected to Shifter anyway ({rule}), which "
                                    f"has no record of it and refuses it: {hint} prints rules that forward it, "
                                    "or give --direct-mark 0"))
        elif outcome.connmark & expected.directMark != expected.directMark:
            findings.append(Finding("warning", "direct", f"{sent} is forwarded, but its mark is not saved to its "
                                    f"connection (CONNMARK, ct mark), so copies of its SYN are queued again: "
                                    f"{hint} prints the rule"))
        elif traverse(state.ruleset, replace(packet, connmark=outcome.connmark),
                      lambda number: expected.directMark).queue is not None:
            findings.append(Finding("warning", "direct", f"{sent} is forwarded and its mark saved to its connection "
                                    f"({outcome.connmarkBy}), but that connection's packets are still queued: "
                                    f"{hint} prints the rule that skips them"))
    return findings


def directNotes(expected: Expectations, state: GatewayState) -> list[str]:
    """
    How the connections Shifter sends DIRECT at the SYN bypass it, when
    the rules do what L{checkDirect} checks: one line for each rule that
    saves the direct mark.
    """
    if checkDirect(expected, state):
        return []
    savedBy = sorted({outcome.connmarkBy for _, _, _, outcome in _directOutcomes(expected, state)
                      if outcome.connmarkBy is not None})
    return [f"connections marked {expected.directMark:#x} (sent DIRECT at the SYN) bypass Shifter: forwarded, "
            f"not queued again, their mark saved to the connection by {rule}" for rule in savedBy]


def _anyRedirect(expected: Expectations, state: GatewayState, version: int) -> bool:
    return any(
        _reachesShifterFrom(expected, state, lan, version, port)
        for lan in state.interfaces for port in expected.ports
    )


def _reachesShifterFrom(expected: Expectations, state: GatewayState, lan: str, version: int, port: int) -> bool:
    client = _clientAddress(state, lan, version) or _REMOTE[version]
    packet = _lanPacket(state, lan, version, client, port)
    outcome = traverse(state.ruleset, packet, _onQueue(expected))
    if outcome.tproxy is not None:
        return outcome.tproxy[0] == expected.listenPort
    target = _redirectedTo(outcome, packet, state)
    return target is not None and _reachesShifter(expected, target)


def _checkTproxy(expected: Expectations, state: GatewayState, what: str, outcome: Outcome, version: int,
                 hint: str) -> Optional[Finding]:
    if outcome.tproxy is None:
        if outcome.nat is not None:
            return Finding("error", "redirect", f"{what} is NATed ({outcome.nat[3]}), but --resolver tproxy "
                           f"needs TPROXY rules instead; {hint} prints them")
        return Finding("error", "redirect", f"{what} is not sent to Shifter by a TPROXY rule; {hint} prints "
                       "the rules")
    port, _, rule = outcome.tproxy
    if port != expected.listenPort:
        return Finding("error", "redirect", f"{what} goes by TPROXY to port {port}, but Shifter listens on "
                       f"{expected.listenPort}: fix the rule ({rule}) or --listen")
    mark = outcome.mark
    table = None
    for entry in sorted(state.ipRules(version), key=lambda r: r.get("priority", 0)):
        fwmark = entry.get("fwmark")
        if fwmark is None:
            continue
        value = int(str(fwmark), 0)
        mask = int(str(entry.get("fwmask", "0xffffffff")), 0)
        if mark & mask == value & mask:
            table = str(entry.get("table"))
            break
    if table is None:
        return Finding("error", "redirect", f"{what} is marked {mark:#x} by TPROXY, but no ip rule "
                       f"(ip -{version} rule) routes that mark to a local table: "
                       f"ip -{version} rule add fwmark {mark:#x}/{mark:#x} lookup 100")
    local = any(route.get("type") == "local" and route.get("dst") in ("default", "0.0.0.0/0", "::/0")
                for route in state.tableRoutes(version, table))
    if not local:
        default = "0.0.0.0/0" if version == 4 else "::/0"
        return Finding("error", "redirect", f"{what} is routed by its mark to table {table}, which has no local "
                       f"default route: ip -{version} route add local {default} dev lo table {table}")
    return None


def checkLoops(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    Neither the proxy's connections nor Shifter's own come back to Shifter.
    """
    findings: list[Finding] = []
    local = state.localAddresses
    versions = [4] + ([6] if 6 in expected.listenFamilies else [])
    proxyIsLocal = False
    for proxy in expected.proxies:
        if proxy.address is None:
            continue
        address = ipaddress.ip_address(proxy.address[0])
        if address in local or address.is_loopback:
            proxyIsLocal = True
        else:
            device = state.routeDevice(address)
            if device in expected.lanInterfaces:
                for port in expected.ports:
                    packet = Packet(address.version, "prerouting", "tcp", address, _REMOTE[address.version], port,
                                    iif=device, localAddresses=local)
                    outcome = traverse(state.ruleset, packet, _onQueue(expected))
                    target = _redirectedTo(outcome, packet, state)
                    if (target is not None and _reachesShifter(expected, target)) or (
                            outcome.tproxy is not None and outcome.tproxy[0] == expected.listenPort):
                        findings.append(Finding(
                            "error", "loop",
                            f"the proxy {address} is on the LAN side ({device}) and its own connections to port "
                            f"{port} are redirected back to Shifter: exclude it from the rule (! -s {address})",
                        ))
                        break
    if proxyIsLocal or not expected.proxies:
        who = f"user {expected.proxyUser}" if expected.proxyUser else "the proxy, whose user doctor does not know"
        for version in versions:
            source = ipaddress.ip_address("127.0.0.1" if version == 4 else "::1")
            for port in expected.ports:
                packet = Packet(version, "output", "tcp", source, _REMOTE[version], port,
                                uid=expected.proxyUid, mark=expected.proxyMark or 0, localAddresses=local)
                outcome = traverse(state.ruleset, packet, _onQueue(expected))
                target = _redirectedTo(outcome, packet, state)
                if target is not None and _reachesShifter(expected, target):
                    findings.append(Finding(
                        "error", "loop",
                        f"the proxy's own connections ({who}) to port {port} ({_family(version)}) are redirected "
                        f"back to Shifter by {outcome.nat[3] if outcome.nat else '?'}: exclude them "
                        f"(-m owner ! --uid-owner {expected.proxyUser or 'proxy'}, or a mark the proxy sets)",
                    ))
                    break
            else:
                continue
            break
    for proxy, mark in zip(expected.proxies, expected.proxyMarks):
        if proxy.address is None:
            continue
        address = ipaddress.ip_address(proxy.address[0])
        source = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        packet = Packet(address.version, "output", "tcp", source, address, proxy.address[1],
                        uid=expected.shifterUid, mark=mark or 0, localAddresses=local)
        outcome = traverse(state.ruleset, packet, _onQueue(expected))
        if outcome.nat is not None:
            findings.append(Finding(
                "error", "loop",
                f"Shifter's own connections to the proxy {proxy.description} are NATed by {outcome.nat[3]}: "
                f"exclude Shifter's user (uid {expected.shifterUid}) or its --mark from that rule",
            ))
    return findings


def checkGatewayDestination(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    A client's connection to the gateway's own address is not redirected:
    Shifter refuses it as a destination, so the gateway's own services on
    those ports would be out of the LAN's reach.
    """
    findings: list[Finding] = []
    for lan in expected.lanInterfaces:
        for version in (4, 6):
            client = _clientAddress(state, lan, version)
            own = [a.ip for a in state.addresses(lan, version) if not a.ip.is_link_local]
            if client is None or not own:
                continue
            for port in expected.ports:
                packet = Packet(version, "prerouting", "tcp", client, own[0], port, iif=lan,
                                localAddresses=state.localAddresses)
                outcome = traverse(state.ruleset, packet, _onQueue(expected))
                target = _redirectedTo(outcome, packet, state)
                if (target is not None and _reachesShifter(expected, target)) or outcome.tproxy is not None:
                    findings.append(Finding(
                        "warning", "gateway",
                        f"connections from {lan} to the gateway's own {own[0]} port {port} are redirected to "
                        f"Shifter, which refuses them: exclude local destinations from the rule "
                        f"(-m addrtype ! --dst-type LOCAL, nft: fib daddr type != local)",
                    ))
                    break
    return findings


# The ACLs Squid must deny before any allow, so that no name a client sends
# has Squid connect to the gateway itself or its link.
_SQUID_GUARDS = ("to_localhost", "to_linklocal")
SQUID_CONF = "/etc/squid/squid.conf"


def checkSquidAccess(path: str) -> list[Finding]:
    """
    Squid's configuration at C{path} denies CONNECT to this machine and its
    link (C{http_access deny to_localhost}, C{to_linklocal}) before its
    first C{http_access allow}: Shifter checks every address it is given,
    but a name is resolved by Squid, and only Squid can refuse what it
    resolves to.  (Lines of files it includes are not followed.)
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as conf:
            words = [line.split("#", 1)[0].split() for line in conf]
    except OSError:
        return []
    denied: set[str] = set()
    for fields in words:
        if len(fields) < 3 or fields[0] != "http_access":
            continue
        if fields[1] == "allow":
            break
        if fields[1] == "deny" and len(fields) == 3 and fields[2] in _SQUID_GUARDS:
            denied.add(fields[2])
    missing = [acl for acl in _SQUID_GUARDS if acl not in denied]
    if not missing:
        return []
    lines = " and ".join(f"'http_access deny {acl}'" for acl in missing)
    return [Finding(
        "warning", "squid",
        f"{path} has no {lines} before its first http_access allow: a client whose name resolves to this "
        f"gateway (or its link) reaches it through Squid; add {'them' if len(missing) > 1 else 'it'} above the "
        "allow lines",
    )]


def checkReversePath(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    With strict rp_filter on a LAN interface, the clients' networks must
    be routed back through the LAN.
    """
    findings: list[Finding] = []
    strict = []
    for lan in expected.lanInterfaces:
        values = [state.sysctl("net.ipv4.conf.all.rp_filter"), state.sysctl(f"net.ipv4.conf.{lan}.rp_filter")]
        if max(int(v) if v and v.isdigit() else 0 for v in values) == 1:
            strict.append(lan)
    if not strict:
        return findings
    local = state.localAddresses
    for network in expected.clientNetworks:
        if network.version != 4:
            continue
        address = next((a for a in _firstAddresses(network) if a not in local), None)
        if address is None:
            continue
        device = state.routeDevice(address)
        if device is not None and device not in expected.lanInterfaces:
            findings.append(Finding(
                "error", "rp_filter",
                f"rp_filter is strict on {', '.join(strict)} and the route back to clients in {network} leaves by "
                f"{device}, so the kernel drops their packets: route {network} via the LAN "
                f"(ip route add {network} via ROUTER dev {strict[0]}), or set net.ipv4.conf.{strict[0]}.rp_filter=2",
            ))
    return findings


def _firstAddresses(network: Any) -> list[Address]:
    if network.num_addresses <= 2:
        return [network.network_address]
    return [network.network_address + offset for offset in range(1, min(network.num_addresses - 1, 4))]


def checkQuic(expected: Expectations, state: GatewayState) -> list[Finding]:
    """
    UDP to the redirected ports from the LAN is refused, so that browsers
    use TCP (which is redirected) rather than QUIC around the proxy.
    """
    if expected.quic == "pass":
        return []
    findings = []
    for lan in expected.lanInterfaces:
        for version, client in _lanClients(state, lan):
            if not _forwarding(state, version):
                continue
            for port in expected.ports:
                before = traverse(state.ruleset, _lanPacket(state, lan, version, client, port, "udp"))
                if before.verdict in ("drop", "reject"):
                    continue
                uplink = state.routeDevice(_REMOTE[version])
                forwarded = traverse(
                    state.ruleset, _lanPacket(state, lan, version, client, port, "udp", "forward", uplink)
                )
                if forwarded.verdict in ("drop", "reject"):
                    continue
                command = "iptables" if version == 4 else "ip6tables"
                findings.append(Finding(
                    "warning", "quic",
                    f"UDP port {port} arriving on {lan} ({_family(version)}) is forwarded: browsers' QUIC (HTTP/3) "
                    f"goes around the proxy; refuse it ({command} -A FORWARD -i {lan} -p udp --dport {port} "
                    f"-j REJECT), as python -m shifter.rules does",
                ))
    return findings


def checkListening(expected: Expectations, state: GatewayState) -> tuple[list[Finding], Optional[int]]:
    """
    Something listens on Shifter's port; its PID, if known.
    """
    if expected.listenPort is None:
        return [], None
    pids = state.listeners(expected.listenPort)
    if pids is None:
        return [], None
    if not pids:
        return [Finding(
            "warning", "listening",
            f"nothing listens on TCP port {expected.listenPort} here: is Shifter running (in this network "
            "namespace)?",
        )], None
    return [], pids[0] if pids[0] > 0 else None


def checkDescriptors(expected: Expectations, state: GatewayState, pid: Optional[int]) -> list[Finding]:
    if expected.maxConnections is None:
        return []
    limit = state.openFileLimit(pid)
    if limit is None:
        return []
    needed = 2 * expected.maxConnections + 32
    if needed <= limit:
        return []
    whose = f"the running Shifter's (pid {pid})" if pid is not None else "this shell's"
    return [Finding(
        "error", "descriptors",
        f"--max-connections {expected.maxConnections} needs {needed} descriptors (two per tunnel, and a reserve), "
        f"but {whose} open-file limit is {limit}: raise it (LimitNOFILE= in the systemd unit, ulimit -n) "
        f"or lower --max-connections to {max(1, (limit - 32) // 2)}",
    )]


def checkRules(expected: Expectations, state: GatewayState) -> tuple[list[Finding], Optional[int]]:
    """
    Every check that reads the gateway without talking to anything.
    """
    if not state.rulesRead:
        return [Finding("error", "doctor", "cannot read the netfilter rules (iptables-save, nft): run doctor as "
                        "root, in the gateway's network namespace")], None
    listening, pid = checkListening(expected, state)
    if pid is not None:
        uid = state.processUid(pid)
        if uid is not None:
            expected.shifterUid = uid
    findings = checkForwarding(expected, state)
    findings += checkRedirect(expected, state)
    findings += checkDirect(expected, state)
    findings += checkLoops(expected, state)
    findings += checkGatewayDestination(expected, state)
    findings += checkReversePath(expected, state)
    findings += checkQuic(expected, state)
    findings += listening
    findings += checkDescriptors(expected, state, pid)
    return findings, pid


# --------------------------------------------------------------------------
# Checks that ask: the kernel module, ctnetlink, the proxy
# --------------------------------------------------------------------------


@inlineCallbacks
def checkKernelModule(expected: Expectations, reactor: Any):  # type: ignore[no-untyped-def]
    from shifter.resolvers.kmod import ShifterClient

    if expected.resolver != "kmod":
        return []
    loaded = os.path.isdir("/sys/module/shifter")
    try:
        client = yield ShifterClient.connect(reactor, timeout=2.0)
    except Exception as e:
        why = "is not loaded" if not loaded else f"does not answer: {e}"
        return [Finding("error", "kmod", f"the kernel module shifter {why} (--resolver kmod): build and load it "
                        "(make -C kernel_module; insmod kernel_module/shifter.ko, or dkms)")]
    try:
        config = yield client.getConfig()
    except Exception as e:
        return [Finding("error", "kmod", f"the kernel module shifter does not answer: {e} (CAP_NET_ADMIN?)")]
    finally:
        client.close()
    ports = list(config.ports)
    if not config.enabled:
        return [Finding("error", "kmod", "the kernel module shifter does not record in this network namespace: "
                        "python -m shifter.kmod enable --ports "
                        f"{','.join(str(p) for p in sorted(set(ports) | set(expected.ports)))}")]
    missing = [port for port in expected.ports if port not in ports]
    if missing:
        watched = " ".join(str(p) for p in ports) or "none"
        return [Finding("error", "kmod", f"the kernel module watches ports {watched} in this network namespace, "
                        f"not {' '.join(map(str, missing))}: python -m shifter.kmod set-ports "
                        f"{' '.join(str(p) for p in sorted(set(ports) | set(expected.ports)))}")]
    return []


@inlineCallbacks
def checkConntrack(expected: Expectations, reactor: Any):  # type: ignore[no-untyped-def]
    from shifter.resolvers.conntrack import ConntrackResolver

    if expected.resolver != "conntrack":
        return []
    resolver = ConntrackResolver(reactor)
    try:
        yield resolver.start()
    except Exception as e:
        return [Finding("error", "conntrack", f"--resolver conntrack cannot ask conntrack: {e}; load "
                        "nf_conntrack_netlink (modprobe) and give Shifter CAP_NET_ADMIN")]
    finally:
        yield resolver.stop()
    return []


@inlineCallbacks
def _askProxy(proxy: Any, host: str, port: int, reactor: Any, timeout: float,  # type: ignore[no-untyped-def]
              extraHeaders: Sequence[tuple[str, str]] = ()):
    from shifter.upstream.probe import askProxy

    exchange = proxy.auth.exchange() if proxy.auth is not None else None
    refusal = None
    for attempt in range(2):
        response = yield askProxy(proxy, host, port, reactor, timeout, timeout, exchange=exchange,
                                  extraHeaders=extraHeaders)
        if response.status == 407 and exchange is not None and attempt == 0:
            challenges = [v for n, v in response.headers if n.lower() == b"proxy-authenticate"]
            refusal = exchange.challenged(challenges)
            if refusal is None:
                continue
        return response, refusal
    return response, refusal


@inlineCallbacks
def checkKerberos(expected: Expectations):  # type: ignore[no-untyped-def]
    """
    Log in with the keytab of each proxy that has one, as Shifter does
    (through the ticket helper), and say why not where it fails.  The
    tickets stay cached for the proxy check that follows.
    """
    findings = []
    for proxy in expected.proxies:
        login = proxy.auth.negotiateLogin if proxy.auth is not None else None
        if login is None:
            continue
        keeper = login.keeper
        keeper.start()
        yield keeper.settled()
        if keeper.ticket is None:
            findings.append(Finding(
                "error", "kerberos",
                f"{proxy.description}: {keeper.lastError}: check the keytab (klist -k), --proxy-principal, "
                f"the realm's KDC in krb5.conf and the clock",
            ))
    return findings


@inlineCallbacks
def checkProxies(expected: Expectations, reactor: Any, timeout: float = 5.0,  # type: ignore[no-untyped-def]
                 idHeader: str = "", sentIds: Optional[list[str]] = None):
    """
    Ask each proxy for one CONNECT to the check target, as Shifter would.

    @param idHeader: the tunnel id header Shifter sends (C{""}: none); an
        HTTP proxy's CONNECT carries it with an id of doctor's own, added
        to C{sentIds}, for L{checkTunnelIdJoin}.
    """
    from shifter.upstream.probe import ProbeConnectFailed, ProbeNoAnswer

    host, port = expected.checkTarget
    findings = []
    prefix = f"doctor-{secrets.token_hex(4)}"
    for number, proxy in enumerate(expected.proxies):
        socks = getattr(proxy, "kind", None) == "socks5"
        target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if proxy.name is not None and not proxy.name.addresses:
            # A proxy named by host name: looked up as Shifter does at start.
            from twisted.names.client import createResolver

            from shifter.tunnel.destinations import resolveAll

            try:
                proxy.name.setAddresses((yield resolveAll(createResolver(), proxy.name.name)))
            except Exception:
                pass  # the connection then fails, saying the name is not known
        extraHeaders: list[tuple[str, str]] = []
        if idHeader and not socks:
            extraHeaders.append((idHeader, f"{prefix}-{number}"))
            if sentIds is not None:
                sentIds.append(f"{prefix}-{number}")
        try:
            response, refusal = yield _askProxy(proxy, host, port, reactor, timeout, extraHeaders)
        except ProbeConnectFailed as e:
            findings.append(Finding("error", "proxy", f"{proxy.description}: {e}: start the proxy, or fix --proxy"))
            continue
        except Exception as e:
            reason = "no answer" if isinstance(e, ProbeNoAnswer) else str(e)
            findings.append(Finding("error", "proxy", f"{proxy.description} {reason} to CONNECT {target}"
                                    f"{' within %g s' % timeout if reason == 'no answer' else ''}: "
                                    f"is it {'a SOCKS5 server' if socks else 'an HTTP proxy'}?"))
            continue
        status = f"{response.status} {response.reason}".strip()
        if 200 <= response.status < 300:
            continue
        if socks:
            if response.status == 407:
                advice = ("give it a username and password (socks5://user:password@...)" if proxy.login is None
                          else "its username and password were refused")
            elif response.status == 403:
                advice = "its rules refuse CONNECT from this gateway to that destination"
            else:
                advice = "it cannot reach the destination (DNS, routing, its own firewall); try --check-target"
            findings.append(Finding("error", "proxy", f"{proxy.description} answered CONNECT {target}: "
                                    f"{response.refusal}: {advice}"))
            continue
        if response.status == 407:
            advice = ("give it credentials (--proxy http://user:password@..., --proxy-credentials, or the proxy's "
                      "credentials in the file)") if proxy.auth is None else (refusal or "its credentials were refused")
        elif response.status == 403:
            advice = "its ACLs refuse CONNECT from this gateway to that port (Squid: http_access, SSL_ports)"
        elif response.status >= 500:
            advice = "it cannot reach the destination (DNS, routing, its own firewall); try --check-target"
        else:
            advice = "it does not allow CONNECT"
        findings.append(Finding("error", "proxy", f"{proxy.description} answered CONNECT {target} with {status}: "
                                f"{advice}"))
    return findings


@inlineCallbacks
def checkTunnelIdJoin(path: str, ids: list[str], idHeader: str, reactor: Any,  # type: ignore[no-untyped-def]
                      wait: float = 3.0):
    """
    Look for the tunnel ids doctor's CONNECTs carried in the proxy's
    access log (C{[gateway] proxy-access-log}), so that one grep joins
    Shifter's lines and the proxy's; say how to log them where they are
    missing.
    """
    if not idHeader:
        return [Finding("warning", "tunnel-id",
                        f"{path} is named as the proxy's access log, but --tunnel-id-header none sends no id "
                        f"for it to log: leave --tunnel-id-header at Shifter-Tunnel")]
    if not ids:
        return []
    deadline = reactor.seconds() + wait
    while True:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return [Finding("warning", "tunnel-id", f"cannot read the proxy's access log {path}: {e.strerror}")]
        if any(tunnelId in text for tunnelId in ids):
            return []
        if reactor.seconds() >= deadline:
            break
        yield deferLater(reactor, 0.2, lambda: None)
    return [Finding(
        "warning", "tunnel-id",
        f"the tunnel id doctor sent the proxy ({ids[0]}) is not in {path}: to log it, add the header to "
        f"Squid's log format, as in: logformat shifter %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru "
        f"%{{{idHeader}}}>h, then access_log {path} shifter",
    )]


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def _listenFacts(description: str) -> tuple[Optional[int], Optional[Address], set[int]]:
    """
    The port, address (C{None}: every address) and families a C{--listen}
    endpoint string accepts on.
    """
    kind, _, rest = description.partition(":")
    parts = re.split(r"(?<!\\):", rest)
    port = None
    interface = None
    for part in parts:
        if part.startswith("port="):
            part = part[len("port="):]
        if part.isdigit() and port is None:
            port = int(part)
        elif part.startswith("interface="):
            interface = part[len("interface="):].replace("\\:", ":")
    if kind not in ("tcp", "tcp6", "tproxy"):
        return None, None, {4, 6}
    if interface in (None, ""):
        return port, None, {6} if kind == "tcp6" else {4}
    address = ipaddress.ip_address(interface)
    if address.is_unspecified:
        families = {4, 6} if address.version == 6 else {4}
        return port, None, families
    return port, address, {address.version}


def expectationsFrom(config: usage.Options, arguments: argparse.Namespace) -> Expectations:
    """
    What to check, from Shifter's parsed options and doctor's own.

    @raise ValueError: when something doctor needs is missing.
    """
    from shifter.service.tap import buildProxy, directMarkOf

    gateway = config.configFile.gateway if config.configFile is not None else {}  # type: ignore[attr-defined]
    lans = arguments.lan_interface or gateway.get("lan-interface")
    if not lans:
        raise ValueError("which interface do the clients' connections arrive on? "
                         "--lan-interface, or lan-interface in the file's [gateway] table")
    ports = arguments.ports or gateway.get("ports") or sorted(config["allow-port"]) or [443]
    port, address, families = _listenFacts(config["listen"])
    if arguments.listen_port is not None:
        port = arguments.listen_port
    if port is None:
        raise ValueError(f"cannot tell the port of --listen {config['listen']!r}: give --listen-port")
    proxyUser = arguments.proxy_user or gateway.get("proxy-user")
    if proxyUser is None:
        try:
            pwd.getpwnam("proxy")
            proxyUser = "proxy"
        except KeyError:
            pass
    proxyUid = None
    if proxyUser is not None:
        try:
            proxyUid = pwd.getpwnam(proxyUser).pw_uid if not proxyUser.isdigit() else int(proxyUser)
        except KeyError:
            raise ValueError(f"no user {proxyUser!r} here (--proxy-user)") from None
    from twisted.internet import reactor

    specs = config.proxySpecs  # type: ignore[attr-defined]
    proxies = [buildProxy(spec, config, reactor) for spec in specs]  # type: ignore[arg-type]
    marks = [spec.mark if spec.mark is not None else config["mark"] for spec in specs]
    explicit = any(a == "--max-connections" or a.startswith("--max-connections=")
                   for a in (config.configFile.arguments if config.configFile else []) + list(arguments.shifter))  # type: ignore[attr-defined]
    networks = list(config["allow"])
    if config.configFile is not None:  # type: ignore[attr-defined]
        for rule in config.configFile.rules:  # type: ignore[attr-defined]
            networks.extend(rule.clients)
    target = arguments.check_target or gateway.get("check-target") or _DEFAULT_CHECK_TARGET
    host, _, targetPort = target.rpartition(":")
    if not host or not targetPort.isdigit():
        raise ValueError(f"--check-target: expected host:port, got {target!r}")
    return Expectations(
        lanInterfaces=list(lans),
        ports=list(ports),
        listenPort=port,
        listenAddress=address,
        listenFamilies=families,
        resolver=config["resolver"],
        queueNum=config["queue-num"],
        queueMark=config["queue-mark"],
        directMark=directMarkOf(config),  # type: ignore[arg-type]
        proxies=proxies,
        proxyMarks=marks,
        proxyUser=proxyUser,
        proxyUid=proxyUid,
        proxyMark=arguments.proxy_mark,
        shifterUid=os.geteuid(),
        maxConnections=config["max-connections"] if explicit else None,
        clientNetworks=networks,
        checkTarget=(host.strip("[]"), int(targetPort)),
        quic=arguments.quic,
    )


def _ports(value: str) -> list[int]:
    try:
        ports = [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ports like 443,8443, got {value!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"expected ports like 443,8443, got {value!r}")
    return ports


def _parser(prog: str = "python -m shifter.doctor") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Check this gateway for the mistakes that make Shifter fail silently. Give Shifter's own "
        "options (or --config FILE) as well; each finding is one line with what to change.",
        epilog="Any other option is Shifter's own (--config, --listen, --proxy, --resolver, --max-connections, "
        "...), as twistd shifter takes it.",
    )
    parser.add_argument("--lan-interface", action="append", metavar="IFACE",
                        help="an interface the clients' connections arrive on (repeatable; default: the file's "
                        "[gateway] lan-interface)")
    parser.add_argument("--ports", type=_ports, metavar="PORT,...",
                        help="the redirected ports (default: the file's [gateway] ports, --allow-port, or 443)")
    parser.add_argument("--proxy-user", metavar="USER",
                        help="the user the proxy runs as (default: [gateway] proxy-user, or 'proxy' if it exists)")
    parser.add_argument("--proxy-mark", type=lambda v: int(v, 0), metavar="MARK",
                        help="the mark the proxy puts on its connections (Squid's tcp_outgoing_mark), if any")
    parser.add_argument("--check-target", metavar="HOST:PORT",
                        help=f"what to ask each proxy to CONNECT to (default: [gateway] check-target, or "
                        f"{_DEFAULT_CHECK_TARGET})")
    parser.add_argument("--listen-port", type=int, metavar="PORT",
                        help="Shifter's port, when --listen does not say (systemd socket activation)")
    parser.add_argument("--quic", choices=("reject", "drop", "pass"), default="reject",
                        help="what the rules should do with QUIC (UDP to the ports): pass skips the check")
    parser.add_argument("--squid-conf", metavar="FILE",
                        help=f"Squid's configuration, checked for 'http_access deny to_localhost' and "
                        f"'to_linklocal' before its allow lines, if it exists (default: [gateway] squid-conf, "
                        f"or {SQUID_CONF})")
    parser.add_argument("--proxy-access-log", metavar="FILE",
                        help="the proxy's access log: doctor's CONNECT carries a tunnel id, which must appear "
                        "there (default: [gateway] proxy-access-log; not checked without one)")
    parser.add_argument("--no-proxy-check", action="store_true", help="do not ask the proxies for a CONNECT")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each proxy")
    parser.add_argument("-v", "--verbose", action="store_true", help="also say what was checked")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Any = None, state: Optional[GatewayState] = None,
         err: Any = None, prog: str = "python -m shifter.doctor") -> int:
    """
    The C{python -m shifter.doctor} command.

    @return: the exit status: 1 if an error was found, else 0; 2 for bad
        options.
    """
    from twisted.internet import task

    from shifter.service.tap import Options

    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser(prog)
    arguments, shifterArguments = parser.parse_known_args(argv)
    arguments.shifter = shifterArguments
    if arguments.listen_port is not None:
        shifterArguments = [*shifterArguments, "--listen", f"tcp6:{arguments.listen_port}:interface=\\:\\:"]
    config = Options()
    try:
        config.parseOptions(shifterArguments)
        expected = expectationsFrom(config, arguments)
    except (usage.UsageError, ValueError) as e:
        print(f"shifter.doctor: {e}", file=err)
        return 2
    if state is None:
        state = readGateway()
    findings, _ = checkRules(expected, state)
    gateway = config.configFile.gateway if config.configFile is not None else {}  # type: ignore[attr-defined]
    findings += checkSquidAccess(arguments.squid_conf or gateway.get("squid-conf") or SQUID_CONF)
    proxyLog = arguments.proxy_access_log or gateway.get("proxy-access-log")
    idHeader = "" if config["tunnel-id-header"].lower() == "none" else config["tunnel-id-header"]

    def asks(reactor: Any) -> Deferred:
        if any(proxy.address is None for proxy in expected.proxies):
            # Names resolved in the reactor, not in a thread pool.
            from twisted.names.client import createResolver

            reactor.installResolver(createResolver())
        checks = [checkKernelModule(expected, reactor), checkConntrack(expected, reactor)]
        if not arguments.no_proxy_check:

            @inlineCallbacks
            def loggedIn():  # type: ignore[no-untyped-def]
                # The proxy is asked once the Kerberos tickets are known.
                try:
                    found = yield checkKerberos(expected)
                    sentIds: list[str] = []
                    found += yield checkProxies(expected, reactor, arguments.timeout, idHeader, sentIds)
                    if proxyLog:
                        found += yield checkTunnelIdJoin(proxyLog, sentIds, idHeader, reactor)
                finally:
                    for proxy in expected.proxies:
                        if proxy.auth is not None:
                            proxy.auth.stop()
                return found

            checks.append(loggedIn())

        def gather(results: list[tuple[bool, Any]]) -> None:
            for ok, result in results:
                if ok:
                    findings.extend(result)
                else:
                    findings.append(Finding("error", "doctor", f"a check failed: {result.getErrorMessage()}"))

        return DeferredList(checks, consumeErrors=True).addCallback(gather)

    try:
        task.react(asks)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    share = None
    if config["control"] is not None:
        share, problem = echShare(config["control"], config["workers"], arguments.timeout)
        if problem is not None:
            findings.append(problem)
    for finding in findings:
        print(finding, file=out)
    if share is not None:
        print(f"note: ech: {share}", file=out)
    if arguments.verbose:
        unknown = sorted({text for text in _unknownRules(expected, state)})
        for text in unknown:
            print(f"note: doctor could not follow this rule, and treated it as not matching: {text}", file=out)
        for line in directNotes(expected, state):
            print(f"note: direct: {line}", file=out)
        print(f"checked: LAN {', '.join(expected.lanInterfaces)}, ports {','.join(map(str, expected.ports))}, "
              f"Shifter on port {expected.listenPort}, resolver {expected.resolver}, "
              f"{len(expected.proxies)} proxies: {len(findings)} findings", file=out)
    return 1 if any(f.severity == "error" for f in findings) else 0


def echShare(control: str, workers: int, timeout: float) -> tuple[Optional[str], Optional[Finding]]:
    """
    The share of ECH since start, from the running Shifter's control
    socket (each worker's, with C{--workers}), as a line for people; or
    the finding that says why it could not be asked.
    """
    from shifter.admin.ctl import ControlError, ask, formatECHShare
    from shifter.service.control import controlPath

    try:
        path = controlPath(control)
    except ValueError as e:
        return None, Finding("warning", "ech", f"--control: {e}")
    paths = [f"{path}.{worker}" for worker in range(workers)] if workers > 1 else [path]
    counts: dict[str, int] = {}
    for each in paths:
        try:
            answer = ask(each, "tunnels", timeout)
        except ControlError as e:
            return None, Finding("warning", "ech", f"{e}: the share of ECH is not known")
        for kind, count in (answer.get("ech") or {}).items():
            if isinstance(count, int):
                counts[kind] = counts.get(kind, 0) + count
    return formatECHShare(counts), None


def _unknownRules(expected: Expectations, state: GatewayState) -> Iterable[str]:
    for lan in expected.lanInterfaces:
        for version in (4, 6):
            client = _clientAddress(state, lan, version)
            if client is None:
                continue
            for port in expected.ports:
                yield from traverse(state.ruleset, _lanPacket(state, lan, version, client, port),
                                    _onQueue(expected)).unknown


if __name__ == "__main__":
    sys.exit(main())
