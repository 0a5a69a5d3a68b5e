"""
C{--config FILE}: Shifter's settings in a TOML file.

Every command-line option of C{twistd shifter} is a key of the same name
at the top of the file (C{idle-timeout = 600}, C{allow = ["10.0.0.0/8"]});
the keys are read from the L{shifter.service.tap.Options} definitions themselves,
so an option added there is a key here at once.  Besides those:

  - C{[[proxy]]} tables: one upstream proxy each, with its own settings
    (C{address}, C{group}, C{credentials}, C{ca}, C{mark}, C{keytab},
    C{principal});
  - C{[[rule]]} tables: per-connection policy without Python, matched in
    order, the first that matches deciding (L{RulePolicy}): a proxy group,
    a CONNECT target, C{direct = true} (Shifter connects to the original
    destination itself) or a refusal;
  - a C{[gateway]} table that Shifter itself ignores and that
    C{python -m shifter.doctor} reads (the LAN interfaces and ports).

Command-line options given with C{--config} override the file's;
repeatable ones (C{--proxy}, C{--allow}, C{--allow-port}) add to it.
Errors name the file, the line and the reason.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from zope.interface import implementer

from twisted.python import usage

from shifter.tunnel.policy import ISynPolicy, TunnelDecision, TunnelRequest
from shifter.tunnel.sniff import ECH_MAY_HIDE
from shifter.upstream.proxy import UpstreamProxy

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_GROUP = "default"

# Options that have no place in a file: internal, or about the file itself.
_NOT_IN_FILE = frozenset({"config", "worker", "help", "version"})

_PROXY_KEYS = ("address", "group", "credentials", "ca", "mark", "pass-client", "keytab", "principal")
_RULE_KEYS = ("client", "destination", "port", "name", "ech", "proxy", "connect-target", "refuse", "direct")
_RULE_TARGETS = ("ip", "name")
GATEWAY_KEYS = ("lan-interface", "ports", "proxy-user", "check-target", "squid-conf", "proxy-access-log")


class ConfigError(ValueError):
    """
    The configuration file cannot be used.

    @ivar path: the file.
    @ivar line: the line the reason is about, if one is.
    @ivar reason: why, in one line.
    """

    def __init__(self, path: str, line: Optional[int], reason: str) -> None:
        super().__init__(path, line, reason)
        self.path = path
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.reason}"
        return f"{self.path} line {self.line}: {self.reason}"


@dataclass(frozen=True)
class OptionKind:
    """
    How a command-line option is written in the file.

    @ivar flag: it takes no value (C{true} or C{false} in the file).
    @ivar repeatable: it may be given more than once (a list in the file).
    """

    flag: bool
    repeatable: bool


def optionKinds(optionsClass: type[usage.Options]) -> dict[str, OptionKind]:
    """
    The options of C{optionsClass} that a file may set, by long name, from
    the definitions that C{getopt} itself is given.
    """
    kinds = {}
    for spec in optionsClass().longOpt:
        name = spec.rstrip("=")
        if name in _NOT_IN_FILE:
            continue
        kinds[name] = OptionKind(
            flag=not spec.endswith("="),
            repeatable=callable(getattr(optionsClass, "opt_" + name.replace("-", "_"), None)),
        )
    return kinds


@dataclass(frozen=True)
class ProxySpec:
    """
    One upstream proxy as configured, before it is built.

    @ivar address: any form C{--proxy} takes.
    @ivar groups: the groups that rules can send connections to.
    @ivar credentials: a C{user:password} file for this proxy, if any.
    @ivar ca: the CA file for this C{https://} proxy, if any.
    @ivar mark: the socket mark on connections to this proxy, if any.
    @ivar passClient: what this proxy is told of each client, if not
        C{--pass-client}.
    @ivar line: where the file defines it (C{None}: the command line).
    @ivar keytab: the gateway's keytab for Negotiate to this proxy, if
        not C{--proxy-keytab}.
    @ivar principal: the gateway's principal in it, if not
        C{--proxy-principal}.
    """

    address: str
    groups: tuple[str, ...] = (DEFAULT_GROUP,)
    credentials: Optional[str] = None
    ca: Optional[str] = None
    mark: Optional[int] = None
    line: Optional[int] = None
    passClient: Optional[str] = None
    keytab: Optional[str] = None
    principal: Optional[str] = None


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


@dataclass(frozen=True)
class Rule:
    """
    One C{[[rule]]}: conditions (all those given must hold) and what to do.

    @ivar clients: client networks, any of which matches.
    @ivar destinations: original destination networks.
    @ivar ports: original destination ports and ranges.
    @ivar names: suffixes of the name read from the client's first bytes
        (C{example.com} matches it and its subdomains, C{.example.com}
        only subdomains); a connection with no name never matches.
    @ivar ech: if set, whether the client's ClientHello must offer
        Encrypted Client Hello (C{True}) or not (C{False}).  A hello that
        may hide its name offers it: one with the ECH extension that is not
        known to be GREASE, and one not read through (malformed, cut
        short), which might.  See L{shifter.tunnel.sniff.ECH_MAY_HIDE}.
    @ivar group: the proxy group to use.
    @ivar connectTarget: C{"ip"} (CONNECT to the address even if a name was
        read) or C{"name"} (to the name read, if any).
    @ivar refuse: if set, refuse the connection, with this reason.
    @ivar direct: whether Shifter connects to the original destination
        itself (DIRECT), through no proxy.
    @ivar line: where the rule starts in the file.
    """

    line: int
    clients: tuple[Network, ...] = ()
    destinations: tuple[Network, ...] = ()
    ports: tuple[PortRange, ...] = ()
    names: tuple[str, ...] = ()
    ech: Optional[bool] = None
    group: Optional[str] = None
    connectTarget: Optional[str] = None
    refuse: Optional[str] = None
    direct: bool = False

    def matches(self, request: TunnelRequest) -> bool:
        if self.clients and not _inAny(request.client.host, self.clients):
            return False
        if self.destinations and not _inAny(request.destination.host, self.destinations):
            return False
        if self.ports and not any(request.destination.port in r for r in self.ports):
            return False
        if self.names:
            name = (request.name or "").lower().rstrip(".")
            if not name or not any(_nameMatches(name, suffix) for suffix in self.names):
                return False
        if self.ech is not None and (request.ech in ECH_MAY_HIDE) != self.ech:
            return False
        return True

    @property
    def needsName(self) -> bool:
        """
        Whether the rule needs the name read from the client's first bytes.
        """
        return bool(self.names) or self.connectTarget == "name"


def _inAny(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _nameMatches(name: str, suffix: str) -> bool:
    if suffix.startswith("."):
        return name.endswith(suffix)
    return name == suffix or name.endswith("." + suffix)


@dataclass
class ConfigFile:
    """
    A configuration file, read and checked.

    @ivar arguments: its options, as command-line arguments.
    @ivar optionLines: the line of each option set in it, by long name.
    """

    path: str
    arguments: list[str] = field(default_factory=list)
    optionLines: dict[str, int] = field(default_factory=dict)
    proxies: list[ProxySpec] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)
    gatewayLines: dict[str, int] = field(default_factory=dict)

    def error(self, message: str, commandLine: Sequence[str] = ()) -> str:
        """
        C{message}, an error about the options, prefixed with the file and
        line of the option it names, when that option came from the file
        (and not from the command line, which overrides it).
        """
        if message.startswith(self.path):
            return message
        match = re.search(r"--([a-z0-9][a-z0-9-]*)", message)
        if match is None:
            return f"{self.path}: {message}"
        name = match.group(1)
        given = any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in commandLine)
        if name in self.optionLines and not given:
            return f"{self.path} line {self.optionLines[name]}: {message}"
        return message

    def checkRules(self, connectTarget: str, groups: Iterable[str]) -> None:
        """
        Check the rules against the options and proxies finally in force.

        @raise ConfigError: for a rule that can never work as written.
        """
        known = set(groups)
        for rule in self.rules:
            if rule.group is not None and rule.group not in known:
                raise ConfigError(
                    self.path, rule.line,
                    f"rule: no proxy is in group {rule.group!r} (groups: {', '.join(sorted(known))})",
                )
            if rule.needsName and connectTarget == "ip":
                raise ConfigError(
                    self.path, rule.line,
                    "rule: names are read from the client's first bytes only with "
                    "connect-target sni, host or auto, not ip",
                )
            if rule.ech is not None and connectTarget not in ("sni", "auto"):
                raise ConfigError(
                    self.path, rule.line,
                    f"rule: ech: the ClientHello is read only with connect-target sni or auto, "
                    f"not {connectTarget}",
                )


def findConfigPath(arguments: Sequence[str]) -> Optional[str]:
    """
    The value of the last C{--config} in C{arguments}, if any.
    """
    path = None
    for i, argument in enumerate(arguments):
        if argument == "--config" and i + 1 < len(arguments):
            path = arguments[i + 1]
        elif argument.startswith("--config="):
            path = argument[len("--config="):]
    return path


def loadConfig(path: str, optionsClass: type[usage.Options]) -> ConfigFile:
    """
    Read and check the configuration file at C{path} for the options of
    C{optionsClass}.

    @raise ConfigError: naming the line and the reason, for a file that
        cannot be read, is not TOML, or holds a setting that is wrong.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read it: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, line, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"\(at line (\d+), column \d+\)$", str(e))
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)$", "", str(e))
        line = int(match.group(1)) if match else text.count("\n") + 1
        raise ConfigError(path, line, f"not valid TOML: {reason}") from None
    return _Reader(path, _keyLines(text), optionsClass).read(document)


class _Reader:
    def __init__(self, path: str, lines: dict[tuple[Any, ...], int], optionsClass: type[usage.Options]) -> None:
        self.path = path
        self.lines = lines
        self.optionsClass = optionsClass
        self.kinds = optionKinds(optionsClass)
        self.result = ConfigFile(path)

    def fail(self, where: tuple[Any, ...], reason: str) -> ConfigError:
        line = None
        while where and line is None:
            line = self.lines.get(where)
            where = where[:-1]
        return ConfigError(self.path, line, reason)

    def read(self, document: Mapping[str, Any]) -> ConfigFile:
        for key, value in document.items():
            if key == "proxy":
                self.readProxies(value)
            elif key == "rule":
                self.readRules(value)
            elif key == "gateway":
                self.readGateway(value)
            elif key in self.kinds:
                self.readOption(key, value)
            else:
                known = [*self.kinds, "proxy", "rule", "gateway"]
                close = difflib.get_close_matches(key, known, 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail((key,), f"unknown setting {key!r}{hint}")
        return self.result

    # Command-line options.

    def readOption(self, name: str, value: Any) -> None:
        kind = self.kinds[name]
        where = (name,)
        if isinstance(value, dict):
            raise self.fail(where, f"{name}: expected a value, not a table")
        if kind.flag:
            if not isinstance(value, bool):
                raise self.fail(where, f"{name}: expected true or false, got {value!r}")
            arguments = [f"--{name}"] if value else []
        else:
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not kind.repeatable:
                raise self.fail(where, f"{name}: takes one value, not a list")
            arguments = []
            for item in values:
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise self.fail(where, f"{name}: expected a string or a number, got {item!r}")
                arguments.append(f"--{name}={item}")
        self.checkAlone(name, arguments)
        self.result.arguments += arguments
        self.result.optionLines[name] = self.lines.get(where, 0) or 1

    def checkAlone(self, name: str, arguments: list[str]) -> None:
        """
        Give the option's own checks (its type, its handler) the values,
        so that an error names this option and its line.
        """

        class Alone(self.optionsClass):  # type: ignore[name-defined, misc]
            def postOptions(self) -> None:
                pass

        try:
            Alone().parseOptions(arguments)
        except usage.UsageError as e:
            reason = str(e).replace("Parameter type enforcement failed: ", "")
            if not reason.startswith(f"--{name}"):
                reason = f"{name}: {reason}"
            raise self.fail((name,), reason.lstrip("-")) from None

    # [[proxy]]

    def readProxies(self, value: Any) -> None:
        if not isinstance(value, list):
            value = [value]
        for index, item in enumerate(value):
            where: tuple[Any, ...] = ("proxy", index)
            if isinstance(item, str):
                self.result.proxies.append(ProxySpec(item, line=self.lineOf(where)))
                continue
            if not isinstance(item, dict):
                raise self.fail(where, f"proxy: expected an address or a table, got {item!r}")
            for key in item:
                if key not in _PROXY_KEYS:
                    raise self.fail(where + (key,), f"proxy: unknown setting {key!r} (settings: {', '.join(_PROXY_KEYS)})")
            address = item.get("address")
            if not isinstance(address, str) or not address:
                raise self.fail(where, "proxy: needs an address, as --proxy takes it")
            groups = item.get("group", DEFAULT_GROUP)
            if isinstance(groups, str):
                groups = [groups]
            if not isinstance(groups, list) or not groups or not all(isinstance(g, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", g) for g in groups):
                raise self.fail(where + ("group",), f"proxy: a group is a name (letters, digits, - _ .), got {item['group']!r}")
            mark = item.get("mark")
            if mark is not None:
                if isinstance(mark, str):
                    try:
                        mark = int(mark, 0)
                    except ValueError:
                        mark = None
                if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark < 2**32:
                    raise self.fail(where + ("mark",), f"proxy: mark: expected a number from 1 to 0xffffffff, got {item['mark']!r}")
            for key in ("credentials", "ca", "keytab"):
                if key in item and not (isinstance(item[key], str) and item[key]):
                    raise self.fail(where + (key,), f"proxy: {key}: expected a file name")
            if "principal" in item and not (isinstance(item["principal"], str) and item["principal"]):
                raise self.fail(where + ("principal",), "proxy: principal: expected a Kerberos principal name")
            if address.startswith("socks5://"):
                for key in ("pass-client", "ca", "keytab", "principal"):
                    if key in item:
                        raise self.fail(where + (key,), f"proxy: {key} is for HTTP proxies, not a SOCKS5 server")
            passClient = item.get("pass-client")
            if passClient is not None:
                from shifter.upstream.passclient import PASS_CLIENT_MODES

                if passClient not in PASS_CLIENT_MODES:
                    raise self.fail(where + ("pass-client",), f"proxy: pass-client: expected one of "
                                    f"{', '.join(PASS_CLIENT_MODES)}, got {passClient!r}")
            self.result.proxies.append(ProxySpec(
                address, tuple(groups), item.get("credentials"), item.get("ca"), mark, self.lineOf(where), passClient,
                item.get("keytab"), item.get("principal"),
            ))

    def lineOf(self, where: tuple[Any, ...]) -> Optional[int]:
        while where:
            if where in self.lines:
                return self.lines[where]
            where = where[:-1]
        return None

    # [[rule]]

    def readRules(self, value: Any) -> None:
        if not isinstance(value, list):
            raise self.fail(("rule",), "rule: write each rule as a [[rule]] table")
        for index, item in enumerate(value):
            where: tuple[Any, ...] = ("rule", index)
            if not isinstance(item, dict):
                raise self.fail(where, "rule: write each rule as a [[rule]] table")
            for key in item:
                if key not in _RULE_KEYS:
                    close = difflib.get_close_matches(key, _RULE_KEYS, 1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise self.fail(where + (key,), f"rule: unknown setting {key!r}{hint}")
            self.result.rules.append(self.readRule(where, item))

    def readRule(self, where: tuple[Any, ...], item: dict[str, Any]) -> Rule:
        def strings(key: str) -> list[str]:
            values = item.get(key, [])
            values = values if isinstance(values, list) else [values]
            if not all(isinstance(v, str) for v in values):
                raise self.fail(where + (key,), f"rule: {key}: expected a string or a list of strings")
            return values

        def networks(key: str) -> tuple[Network, ...]:
            result = []
            for text in strings(key):
                try:
                    result.append(ipaddress.ip_network(text, strict=False))
                except ValueError as e:
                    raise self.fail(where + (key,), f"rule: {key}: {e}") from None
            return tuple(result)

        ports = []
        rawPorts = item.get("port", [])
        for port in rawPorts if isinstance(rawPorts, list) else [rawPorts]:
            ports.append(self.portRange(where + ("port",), port))
        names = []
        for name in strings("name"):
            bare = name.lower().rstrip(".")
            if not re.fullmatch(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*", bare):
                raise self.fail(where + ("name",), f"rule: name: expected a domain name or .suffix, got {name!r}")
            names.append(bare)
        ech = item.get("ech")
        if ech is not None and not isinstance(ech, bool):
            raise self.fail(where + ("ech",), f"rule: ech: expected true or false, got {ech!r}")
        group = item.get("proxy")
        if group is not None and not isinstance(group, str):
            raise self.fail(where + ("proxy",), "rule: proxy: expected the name of a proxy group")
        target = item.get("connect-target")
        if target is not None and target not in _RULE_TARGETS:
            raise self.fail(where + ("connect-target",), f"rule: connect-target: expected ip or name, got {target!r}")
        refuse = item.get("refuse")
        if refuse is not None:
            if refuse is True:
                refuse = "refused by a configured rule"
            elif refuse is False:
                refuse = None
            elif not isinstance(refuse, str) or not refuse or "\n" in refuse:
                raise self.fail(where + ("refuse",), "rule: refuse: expected true or a one-line reason")
        direct = item.get("direct", False)
        if not isinstance(direct, bool):
            raise self.fail(where + ("direct",), f"rule: direct: expected true or false, got {direct!r}")
        if refuse is not None and (group is not None or target is not None or direct):
            raise self.fail(where, "rule: refuse goes alone, without proxy, connect-target or direct")
        if direct and (group is not None or target is not None):
            raise self.fail(where, "rule: direct goes alone, without proxy or connect-target: "
                            "it connects to the destination's address itself")
        if refuse is None and group is None and target is None and not direct:
            raise self.fail(where, "rule: says nothing to do: give proxy, connect-target, direct or refuse")
        return Rule(
            line=self.lineOf(where) or 1,
            clients=networks("client"),
            destinations=networks("destination"),
            ports=tuple(ports),
            names=tuple(names),
            ech=ech,
            group=group,
            connectTarget=target,
            refuse=refuse,
            direct=direct,
        )

    def portRange(self, where: tuple[Any, ...], port: Any) -> PortRange:
        if isinstance(port, int) and not isinstance(port, bool):
            low = high = port
        elif isinstance(port, str) and re.fullmatch(r"\d{1,5}(-\d{1,5})?", port):
            first, _, last = port.partition("-")
            low, high = int(first), int(last or first)
        else:
            raise self.fail(where, f"rule: port: expected a port or a range like \"8000-8100\", got {port!r}")
        if not 0 < low <= high < 65536:
            raise self.fail(where, f"rule: port: {port!r} is not within 1-65535")
        return PortRange(low, high)

    # [gateway]

    def readGateway(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise self.fail(("gateway",), "gateway: expected a [gateway] table")
        for key, item in value.items():
            where = ("gateway", key)
            if key not in GATEWAY_KEYS:
                raise self.fail(where, f"gateway: unknown setting {key!r} (settings: {', '.join(GATEWAY_KEYS)})")
            if key == "ports":
                items = item if isinstance(item, list) else [item]
                if not items or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in items):
                    raise self.fail(where, "gateway: ports: expected a list of port numbers")
                item = items
            elif key == "lan-interface":
                items = item if isinstance(item, list) else [item]
                if not items or not all(isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_.@:-]{1,15}", i) for i in items):
                    raise self.fail(where, "gateway: lan-interface: expected an interface name or a list of them")
                item = items
            elif not isinstance(item, str):
                raise self.fail(where, f"gateway: {key}: expected a string")
            self.result.gateway[key] = item
            self.result.gatewayLines[key] = self.lineOf(where) or 1


_TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_-]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_-]+)\s*=')


def _keyLines(text: str) -> dict[tuple[Any, ...], int]:
    """
    Where each table and key is defined: C{("idle-timeout",)},
    C{("proxy", 0)} (the second C{[[proxy]]}'s header),
    C{("proxy", 0, "address")}, C{("gateway", "ports")}.  A line scan that
    is right for the files people write (tomllib has already said the
    file is valid TOML), used only to name lines in errors.
    """
    lines: dict[tuple[Any, ...], int] = {}
    current: tuple[Any, ...] = ()
    counts: dict[str, int] = {}
    inString: Optional[str] = None
    for number, line in enumerate(text.splitlines(), 1):
        if inString is not None:
            if line.count(inString) % 2 == 1:
                inString = None
            continue
        table = _TABLE.match(line)
        if table is not None:
            name = table.group(2)
            if table.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                current = (name, index)
            else:
                current = (name,)
            lines.setdefault(current, number)
            continue
        key = _KEY.match(line)
        if key is not None:
            name = key.group(1).strip('"')
            where = current + (name,)
            lines.setdefault(where, number)
            if not current and name in ("proxy", "rule"):
                # proxy = [...] at the top: its items follow on this line
                # and the next ones; each gets the line it starts on.
                _inlineItems(text.splitlines()[number - 1 :], name, number, lines)
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                inString = quote
    return lines


def _inlineItems(rest: list[str], name: str, first: int, lines: dict[tuple[Any, ...], int]) -> None:
    """
    Give each item of the array C{name = [...]} that starts on C{rest[0]}
    the line it starts on.
    """
    index = depth = 0
    for offset, line in enumerate(rest):
        quote = None
        for i, char in enumerate(line):
            if quote is not None:
                if char == quote and line[i - 1] != "\\":
                    quote = None
                continue
            if char == "#":
                break
            if char in "\"'":
                quote = char
                if depth == 1:
                    lines.setdefault((name, index), first + offset)
                    index += 1
            elif char in "[{":
                if depth == 1 and char == "{":
                    lines.setdefault((name, index), first + offset)
                    index += 1
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    return


@implementer(ISynPolicy)
class RulePolicy:
    """
    The C{[[rule]]}s of a configuration file as an L{ITunnelPolicy}: the
    first rule that matches a connection decides for it; a connection
    that no rule matches goes through the proxies of the C{default} group
    (every proxy, when none is in that group).

    @ivar rules: the rules, in order.
    @ivar groups: each group's proxies.
    @ivar decidesByAddress: whether a rule judges destinations by address:
        then a connection is CONNECTed by its address even when a name was
        read (unless its rule says C{connect-target = "name"}), since only
        the address is sure to be where the proxy connects.
    @ivar singleLabelNames: the single-label names (no dot) rules name,
        which clients may then have CONNECT ask for.
    """

    def __init__(
        self, rules: Sequence[Rule], groups: Mapping[str, Sequence[UpstreamProxy]],
        direct: Optional[UpstreamProxy] = None,
    ) -> None:
        """
        @param direct: the DIRECT route (L{shifter.upstream.proxy.directRoute})
            that rules with C{direct = true} choose.
        @raise ValueError: if a rule says C{direct} and there is no route.
        """
        if direct is None and any(rule.direct for rule in rules):
            raise ValueError("a rule says direct, and no DIRECT route was given")
        self.direct = direct
        self.rules = list(rules)
        self.groups = {name: frozenset(proxies) for name, proxies in groups.items()}
        self.decidesByAddress = any(rule.destinations for rule in self.rules)
        self.singleLabelNames = frozenset(
            name for rule in self.rules for name in rule.names if "." not in name
        )

    def decide(self, request: TunnelRequest) -> Optional[TunnelDecision]:
        for rule in self.rules:
            if rule.matches(request):
                return self._decision(request, rule)
        return self._decision(request, None)

    def decideAtSyn(self, request: TunnelRequest, nameRead: bool) -> tuple[bool, Optional[TunnelDecision]]:
        """
        See L{ISynPolicy.decideAtSyn}: the rules always answer at once, but
        when a name is read, a rule that looks at what was read (a name,
        ECH) at or before the one that matches could decide otherwise.
        """
        known, rule = self.ruleAtSyn(request, nameRead)
        return (True, self._decision(request, rule)) if known else (False, None)

    def ruleAtSyn(self, request: TunnelRequest, nameRead: bool) -> tuple[bool, Optional[Rule]]:
        """
        The rule that decides C{request} (asked with no name) whatever is
        read from the client later: C{(True, rule)}, or C{(True, None)} when
        none matches; C{(False, None)} when, with C{nameRead}, what is read
        could make another rule decide.
        """
        for rule in self.rules:
            if nameRead and (rule.needsName or rule.ech is not None):
                return False, None
            if rule.matches(request):
                return True, rule
        return True, None

    def _decision(self, request: TunnelRequest, rule: Optional[Rule]) -> Optional[TunnelDecision]:
        if rule is not None and rule.refuse is not None:
            return TunnelDecision(refuse=f"{rule.refuse} (rule at line {rule.line})")
        if rule is not None and rule.direct and self.direct is not None:  # (a route is given with such rules)
            return TunnelDecision(proxies=(self.direct,))
        group = rule.group if rule is not None and rule.group is not None else DEFAULT_GROUP
        members = self.groups.get(group)
        proxies = None
        if members is not None:
            chosen = [proxy for proxy in request.proxies if proxy in members]
            if len(chosen) != len(request.proxies):
                proxies = chosen
        target = None
        if rule is not None and rule.connectTarget == "ip":
            target = ipaddress.ip_address(request.destination.host.split("%", 1)[0]).compressed
        elif rule is not None and rule.connectTarget == "name":
            target = request.name
        if proxies is None and target is None:
            return None
        return TunnelDecision(proxies=proxies, target=target)


def groupsOf(specs: Sequence[ProxySpec], proxies: Sequence[UpstreamProxy]) -> dict[str, list[UpstreamProxy]]:
    """
    Each group's proxies, from the specs and the proxies built from them
    (in the same order).
    """
    groups: dict[str, list[UpstreamProxy]] = {}
    for spec, proxy in zip(specs, proxies):
        for group in spec.groups:
            groups.setdefault(group, []).append(proxy)
    return groups


def policyFor(
    config: Optional[ConfigFile], specs: Sequence[ProxySpec], proxies: Sequence[UpstreamProxy],
    direct: Optional[UpstreamProxy] = None,
) -> Optional[RulePolicy]:
    """
    The policy that the file's rules and proxy groups describe, or C{None}
    when there is nothing to decide (no rules, every proxy in the default
    group).

    @param direct: the DIRECT route, for rules that choose it.
    """
    groups = groupsOf(specs, proxies)
    rules = config.rules if config is not None else []
    if not rules and set(groups) == {DEFAULT_GROUP}:
        return None
    return RulePolicy(rules, groups, direct)
