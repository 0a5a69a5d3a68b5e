"""
C{twistd shifter}: the command-line options and the service they describe.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import resource
import sys
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from shifter.upstream.connect import formatAuthority
from shifter.service.config import (
    ConfigError,
    ConfigFile,
    ProxySpec,
    RulePolicy,
    findConfigPath,
    loadConfig,
    policyFor,
)
from shifter.tunnel.downstream import ShifterFactory, TunnelSettings
from shifter.upstream.endpointstrings import withBacklog
from shifter.tunnel.directsyn import SynDirector
from shifter.tunnel.holdsyn import DEFAULT_HOLD_TIMEOUT, SynHolder
from shifter.upstream.passclient import PASS_CLIENT_MODES
from shifter.upstream.pool import BALANCES, ProxyPool
from shifter.upstream.probe import DEFAULT_PROBE_TARGET
from shifter.upstream.proxy import (
    MarkingReactor,
    UpstreamProxy,
    credentialsPath,
    directRoute,
    parseProxy,
    readCredentials,
    readTrustRoot,
)
from shifter.relay.relay import RELAYS
from shifter.resolvers.resolver import DEFAULT_DIRECT_MARK, DEFAULT_REJECT_MARK, RESOLVERS, makeResolver
from shifter.logs import LOG_FORMATS, logObserver, twistdLogFile, useLogFile
from shifter.service.accesslog import DEFAULT_FORMAT as DEFAULT_ACCESS_LOG_FORMAT
from shifter.service.accesslog import FIELDS as ACCESS_LOG_FIELDS
from shifter.service.accesslog import AccessLogFormat, checkDestination
from shifter.tunnel.tunnelid import DEFAULT_HEADER as DEFAULT_TUNNEL_ID_HEADER
from shifter.service.notify import SystemdNotifier
from shifter.service.pacpolicy import PacPolicy
from shifter.service.service import ShifterService, SidePortService
from shifter.relay.splice import SPLICE_AVAILABLE
from shifter.service.workers import ReusePortEndpoint, WorkersService, becomeWorker, workerReady

CONNECT_TARGETS = ("ip", "sni", "host", "auto")

# --early-data: what becomes of the client's bytes before its tunnel opens.
EARLY_DATA = ("send", "wait")

# A header name Shifter may send: an HTTP token.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")

# The listening queue when --listen names none: new connections come in
# bursts (a page's worth of them, or accepted held SYNs at once), and
# Twisted's default of 50 would drop SYNs the kernel could have queued.
LISTEN_BACKLOG = 1024

# Descriptors kept back from the connection cap for listening sockets,
# resolver sockets, log files and the like.
_RESERVED_DESCRIPTORS = 32


# The longest any duration option may be (idle, set-up, connect,
# handshake, sniff, hold, drain, the proxy back-off): one week.  Longer
# means "never" in practice, and a timer that far (1e308 s) cannot even be
# set.
MAX_SECONDS = 604800.0


def _duration(value: str, zeroIsOff: bool) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zeroIsOff):
        expected = "a number of seconds (0 for off)" if zeroIsOff else "a positive number of seconds"
        raise ValueError(f"expected {expected}, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"at most {MAX_SECONDS:g} seconds, got {seconds!r}")
    return seconds


def _seconds(value: str) -> float:
    return _duration(value, zeroIsOff=False)


_seconds.coerceDoc = f"Seconds, more than 0, at most {MAX_SECONDS:g}."  # type: ignore[attr-defined]


def _secondsOrOff(value: str) -> float:
    return _duration(value, zeroIsOff=True)


_secondsOrOff.coerceDoc = f"Seconds, at most {MAX_SECONDS:g}; 0 turns it off."  # type: ignore[attr-defined]


def _mark(value: str) -> int:
    mark = int(value, 0)
    if not 0 < mark < 2**32:
        raise ValueError(f"expected a mark from 1 to 0xffffffff, got {value!r}")
    return mark


_mark.coerceDoc = "A number, decimal or 0x-hexadecimal."  # type: ignore[attr-defined]


def _probeTarget(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    try:
        formatAuthority(host, int(port))
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost"):
            raise ValueError(f"{value!r} would make the proxy connect to itself") from None
    else:
        if address.is_loopback or address.is_unspecified:
            raise ValueError(f"{value!r} would make the proxy connect to itself") from None
    return host, int(port)


_probeTarget.coerceDoc = "HOST:PORT or [IPV6]:PORT."  # type: ignore[attr-defined]


def _positiveInt(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def versionLine() -> str:
    """
    What C{--version} says: Shifter's version, and Twisted's and Python's.
    """
    import platform

    import shifter
    from twisted import version as twistedVersion

    return f"Shifter {shifter.__version__} (Twisted {twistedVersion.short()}, Python {platform.python_version()})"


def defaultMaxConnections() -> int:
    """
    The connection cap that the descriptor limit allows: each tunnel holds
    two descriptors, the client's and the proxy's.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(1, (soft - _RESERVED_DESCRIPTORS) // 2)


def defaultMaxConnectionsPerClient(maxConnections: int) -> int:
    """
    The per-client cap when none is given: a quarter of the connection cap,
    so that no one host can take every slot, at most 1024 and at least 1.
    """
    return max(1, min(1024, maxConnections // 4))


def _countOrOff(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected a number of connections (0 for no limit), got {value!r}")
    return number


_countOrOff.coerceDoc = "A number; 0 for no limit."  # type: ignore[attr-defined]


class _NamedParameter(usage.CoerceParameter):
    """
    An option with a type whose bad value is refused naming the option
    (C{--idle-timeout: at most 604800 seconds, got 1e+308}), where Twisted
    would only say C{Parameter type enforcement failed}.
    """

    def dispatch(self, parameterName: str, value: str) -> None:
        try:
            super().dispatch(parameterName, value)
        except usage.UsageError as e:
            reason = str(e).removeprefix("Parameter type enforcement failed: ")
            reason = re.sub(r"^invalid literal for int\(\) with base \d+: (.*)$", r"expected a whole number, got \1", reason)
            raise usage.UsageError(f"--{parameterName}: {reason}") from None


def printable(text: str) -> str:
    """
    C{text} with every character that is not printable (a line break, a
    terminal's control sequence) written as its Python escape: what was
    typed is shown, on one line.
    """
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def usageFailure(command: str, error: Exception, err: TextIO | None = None) -> int:
    """
    Say on standard error (or C{err}) why the command line cannot be used,
    in one line with one hint after it, and give the exit status for it.
    """
    (sys.stderr if err is None else err).write(f"{command}: {printable(str(error))}\nTry '{command} --help' for the options.\n")
    return 1


class Options(usage.Options):
    synopsis = "[--config FILE] [--proxy HOST:PORT] [options]"

    # How the command that parses these options is run, for its errors:
    # twistd shifter, or shifter run.
    command = "twistd shifter"
    longdesc = (
        "Relay TCP connections that netfilter redirected to Shifter through an "
        "upstream HTTP proxy. For each connection Shifter finds the destination "
        "the client was originally sending to, asks the proxy for CONNECT to it, "
        "and relays the bytes both ways. Redirect with a rule such as "
        "'iptables -t nat -A PREROUTING -i lan0 -p tcp --dport 443 -j REDIRECT "
        "--to-ports 12345'. A connection made to Shifter's port directly, not "
        "through a redirect, is refused: Shifter is never an open proxy."
    )

    optFlags = [
        [
            "proxy-preemptive-basic",
            None,
            "Send the proxy credentials with Basic on the first CONNECT, before "
            "the proxy asks. Default: only once the proxy has challenged, in the "
            "scheme it asks for (Basic then goes up front to that proxy).",
        ],
        [
            "queue-bypass",
            None,
            "With --resolver nfqueue: when the queue is full, the kernel "
            "accepts SYNs unmarked (so unproxied) instead of dropping them.",
        ],
        [
            "hold-syn",
            None,
            "With --resolver nfqueue: hold each SYN until the proxy has answered "
            "CONNECT for it; accept it if the tunnel is open (the client's "
            "connection then uses it), else answer the client with a TCP reset "
            "(through the REJECT rule that python -m shifter.rules --hold-syn "
            "prints), so its connect() fails with ECONNREFUSED.",
        ],
    ]

    optParameters = [
        [
            "config",
            None,
            None,
            "A TOML file holding these options (by their long names), proxies "
            "with settings of their own, and rules that choose a proxy group, "
            "the CONNECT target or a refusal per connection. Options given here "
            "override the file's; --proxy, --allow and --allow-port add to it. "
            "SIGHUP reloads it: new connections get the new settings, open "
            "tunnels keep theirs, and a file with an error is refused with a "
            "log line while the running settings stay.",
        ],
        [
            "control",
            None,
            None,
            "A control socket, unix:PATH, for python -m shifter.ctl (tunnels, "
            "proxies, reload, drain); only its owner (and root) may use it. "
            "With --workers, worker I listens on PATH.I. Default: none.",
        ],
        [
            "listen",
            "l",
            "tcp:12345",
            "Where to accept redirected connections, as a Twisted server "
            "endpoint string. For IPv4 and IPv6 together: "
            "tcp6:12345:interface=\\:\\:. A tcp, tcp6 or tproxy endpoint "
            f"that names no backlog gets backlog={LISTEN_BACKLOG}.",
        ],
        [
            "balance",
            None,
            "failover",
            "With several --proxy: failover (the first that is up), "
            "round-robin, or source-hash (a client keeps its proxy).",
        ],
        [
            "proxy-failures",
            None,
            3,
            "Mark a proxy down after this many connection failures in a row.",
            _positiveInt,
        ],
        [
            "proxy-backoff",
            None,
            10.0,
            "Seconds a proxy stays marked down before it is probed (a CONNECT "
            "to --probe-target); doubled each time it is marked down again "
            "before a tunnel through it has opened, up to 30 times this.",
            _seconds,
        ],
        [
            "probe-target",
            None,
            None,
            "What the probe of a proxy whose back-off has ended asks CONNECT "
            "for; any HTTP status line within --handshake-timeout (a 403 as "
            "well as a 200) brings the proxy back, on trial: one tunnel at a "
            "time until one is answered. Default: "
            f"{DEFAULT_PROBE_TARGET[0]}:{DEFAULT_PROBE_TARGET[1]}, which a "
            "standard Squid refuses at once by its port ACLs, without DNS "
            "or a connection out.",
            _probeTarget,
        ],
        [
            "proxy-credentials",
            None,
            None,
            "A file whose first line is user:password, for proxies whose "
            "--proxy names no credentials (keeps the password out of ps).",
        ],
        [
            "proxy-keytab",
            None,
            None,
            "The gateway's keytab, for proxies that ask for Negotiate "
            "(Kerberos): Shifter logs in as the gateway and asks for "
            "HTTP/<the proxy's host name>, so name the proxy by its host "
            "name. Tickets are kept fresh by a helper process.",
        ],
        [
            "proxy-principal",
            None,
            None,
            "The gateway's principal in --proxy-keytab, when it holds "
            "several. Default: its first.",
        ],
        [
            "proxy-ca",
            None,
            None,
            "A PEM file of the CA that signs https:// proxies' certificates. "
            "Default: the system's trust store.",
        ],
        [
            "pass-client",
            None,
            "none",
            "What each proxy is told about the client: none, x-forwarded-for "
            "(an X-Forwarded-For header on CONNECT), proxy-v1 or proxy-v2 (a "
            "PROXY protocol header, text or binary, before CONNECT). A proxy "
            "URL's ?pass-client=MODE sets it for that proxy alone.",
        ],
        [
            "connect-target",
            None,
            "ip",
            "What CONNECT asks for: ip (the original address), sni (the name in "
            "the client's TLS ClientHello), host (the HTTP Host header) or auto "
            "(whichever the client sends). The original port is kept; without a "
            "usable name, the address is used.",
        ],
        [
            "sniff-timeout",
            None,
            2.0,
            "With --connect-target sni, host or auto: seconds to wait for the "
            "client's first bytes before using the address.",
            _seconds,
        ],
        [
            "resolver",
            "r",
            "sockopt",
            "How to find each connection's original destination: "
            + ", ".join(sorted(RESOLVERS))
            + ". sockopt reads SO_ORIGINAL_DST (REDIRECT and DNAT rules); "
            "kmod asks Shifter's kernel module; conntrack asks ctnetlink "
            "(REDIRECT and DNAT rules); nfqueue reads the SYNs an NFQUEUE rule "
            "queues; tproxy takes the local address of connections a TPROXY "
            "rule delivers to a tproxy: listener; auto uses kmod if the module "
            "is loaded, exact (version 2) and enabled in this namespace, else sockopt. python -m shifter.rules prints the rules "
            "for each.",
        ],
        [
            "queue-num",
            None,
            0,
            "With --resolver nfqueue: the NFQUEUE queue number to bind "
            "(the rule's --queue-num), 0 to 65535.",
            int,
        ],
        [
            "queue-mark",
            None,
            0x10000,
            "With --resolver nfqueue: the mark bit Shifter sets on each SYN it "
            "has recorded; the nat rule redirects only SYNs with it, so SYNs "
            "Shifter missed go unproxied rather than to Shifter. 0 for none.",
            lambda value: int(value, 0),
        ],
        [
            "hold-timeout",
            None,
            DEFAULT_HOLD_TIMEOUT,
            "With --hold-syn: the longest a SYN is held before the client is "
            "refused, and the longest an open tunnel waits for its client to "
            "complete the handshake.",
            _seconds,
        ],
        [
            "reject-mark",
            None,
            DEFAULT_REJECT_MARK,
            "With --hold-syn: the mark bit Shifter sets, in place of --queue-mark, "
            "on a SYN whose tunnel was refused; the REJECT rule resets the "
            "client's connection for it.",
            lambda value: int(value, 0),
        ],
        [
            "direct-mark",
            None,
            DEFAULT_DIRECT_MARK,
            "With --resolver nfqueue: the mark bit Shifter sets, in place of "
            "--queue-mark, on a SYN its rules or PAC send DIRECT (without "
            "--hold-syn, only when they can say so at once, with no name read): "
            "the connection is not redirected but forwarded, and its bytes never "
            "reach Shifter.  0: DIRECT connections go through Shifter.",
            lambda value: int(value, 0),
        ],
        [
            "connect-timeout",
            None,
            10.0,
            "Seconds to wait for the TCP connection to the proxy.",
            _seconds,
        ],
        [
            "handshake-timeout",
            None,
            10.0,
            "Seconds to wait for the proxy's answer to CONNECT.",
            _seconds,
        ],
        [
            "setup-timeout",
            None,
            30.0,
            "Seconds from accepting a client to its tunnel's opening, "
            "whatever resolving, the policy and every proxy tried take; past "
            "it the client is closed.",
            _seconds,
        ],
        [
            "idle-timeout",
            None,
            3600.0,
            "Close a tunnel after this many seconds without a byte either way.",
            _secondsOrOff,
        ],
        [
            "max-connections",
            None,
            None,
            "Tunnels open at once; clients past this are refused. "
            "Default: half the open-file limit, less a reserve.",
            _positiveInt,
        ],
        [
            "max-connections-per-client",
            None,
            None,
            "Tunnels one client (an IPv4 address, or an IPv6 /64) may hold at "
            "once; its connections past this are refused. 0 for no limit. "
            "Default: a quarter of --max-connections, at most 1024",
            _countOrOff,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM, stop accepting and give open tunnels this many "
            "seconds to finish before closing them.",
            _secondsOrOff,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on this Twisted server endpoint, for "
            "example tcp:9100:interface=127.0.0.1. Default: off.",
        ],
        [
            "workers",
            None,
            1,
            "Processes serving the --listen port (tcp: or tcp6: only), each "
            "with its own socket (SO_REUSEPORT) and reactor, started, watched "
            "and restarted by this one. With --metrics, this one serves the "
            "sum of the workers' metrics there, and worker I its own on the "
            "metrics port plus 1 + I.",
            _positiveInt,
        ],
        [
            "worker",
            None,
            None,
            "Internal: set by the parent of --workers on each of its workers.",
            int,
        ],
        [
            "relay",
            None,
            "auto",
            "How open tunnels move bytes: splice (zero-copy, splice(2) through "
            "a pipe per direction; for plain TCP to the proxy, https:// proxies "
            "keep the Twisted relay), twisted (Twisted's producers and "
            "consumers), or auto (splice wherever it works).",
        ],
        [
            "early-data",
            None,
            "send",
            "What the client sends before its tunnel opens: send (to an HTTP "
            "proxy right behind the CONNECT request, a round trip sooner; "
            "never to SOCKS5, nor with NTLM or Negotiate) or wait (until the "
            "proxy has answered 2xx).",
        ],
        [
            "pac",
            None,
            None,
            "The site's proxy auto-config script, an http://, https:// or file "
            "URL, a file name, or wpad (the URL of DHCP option 252 in the "
            "gateway's lease, else http://wpad.DOMAIN/wpad.dat, DOMAIN the "
            "search domain and its parents down to the registrable domain, never "
            "above): for each connection no rule decides, its "
            "FindProxyForURL(url, host) answer (PROXY, HTTPS, SOCKS5, DIRECT, "
            "in order) chooses the way out, run in helper processes with a "
            "time and memory limit, answers cached per host and port. Fetched "
            "at start, every --pac-refresh seconds and on reload. With --pac, "
            "--proxy may be left out.",
        ],
        [
            "pac-fallback",
            None,
            "refuse",
            "What decides when the PAC script gives no answer (none loaded, a "
            "failure, a time-out, garbage): refuse, direct, or the name of a "
            "proxy group (default for the --proxy ones).",
        ],
        [
            "pac-refresh",
            None,
            300.0,
            "Seconds between fetches of the --pac script (a conditional GET).",
            _seconds,
        ],
        [
            "pac-timeout",
            None,
            2.0,
            "Seconds one FindProxyForURL call may take (DNS look-ups included) "
            "before its helper process is killed and the fallback decides.",
            _seconds,
        ],
        [
            "mark",
            None,
            None,
            "Put this netfilter mark (SO_MARK) on connections to the proxy, so "
            "firewall rules can keep them out of the redirect. Needs "
            "CAP_NET_ADMIN. Default: no mark",
            _mark,
        ],
        [
            "access-log",
            None,
            None,
            "Write one line per client connection, once it has ended, to this "
            "file (reopened on SIGHUP and SIGUSR1, for logrotate), to - "
            "(standard output) or to syslog (facility daemon). Default: none.",
        ],
        [
            "access-log-format",
            None,
            DEFAULT_ACCESS_LOG_FORMAT,
            "The access log's line, of {field} names and text: "
            + ", ".join(ACCESS_LOG_FIELDS)
            + " (the README says what each holds).",
        ],
        [
            "warm-connections",
            None,
            "8",
            "Connections kept open to each proxy ahead of demand, so that a "
            "tunnel's CONNECT goes out without waiting for a connection (and "
            "a TLS handshake, for https://): at most this many per proxy, as "
            "many as the recent rate of new tunnels needs, none while idle; "
            "off for none. Only HTTP proxies without NTLM or Negotiate.",
        ],
        [
            "warm-lifetime",
            None,
            60.0,
            "Seconds a warm connection is kept unused before it is closed "
            "(and replaced while tunnels still come); keep it below the "
            "proxy's own idle limit (Squid: request_start_timeout, 5 minutes).",
            _seconds,
        ],
        [
            "tunnel-id-header",
            None,
            DEFAULT_TUNNEL_ID_HEADER,
            "The request header in which every CONNECT carries the tunnel's "
            "id (the id of the access log, the tunnel line and ctl tunnels), "
            "for the proxy's own log; none to send nothing.",
        ],
        [
            "log-format",
            None,
            "text",
            "The service log's form: text (twistd's lines), json (one object "
            "per line, with stable field names) or journald (straight to "
            "journald, with its priority and SHIFTER_* fields; text where no "
            "journal socket is found). json and text go to twistd's --logfile.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedParameter(self, handler.coerce)
        self.arguments: list[str] = []
        self["proxy"] = []
        self["allow"] = []
        self["allow-port"] = set()
        self.configFile: ConfigFile | None = None
        self.proxySpecs: list[ProxySpec] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse C{options}; under twistd (which would print the whole
        C{--help} for any mistake), an error is one line on standard error
        and the exit status 1.
        """
        if getattr(self, "parent", None) is None:
            self._parseOptions(options)
            return
        try:
            self._parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(usageFailure(self.command, e)) from None

    def getSynopsis(self) -> str:
        if self.command == "twistd shifter":
            return super().getSynopsis()
        return f"Usage: {self.command} {self.synopsis}"

    def opt_version(self) -> None:
        """
        Display Shifter's version and exit.
        """
        print(versionLine())
        sys.exit(0)

    def _parseOptions(self, options: list[str] | None) -> None:
        # Kept for --workers, whose workers are started with the same ones,
        # and for reloading --config.
        self.arguments = list(sys.argv[1:] if options is None else options)
        path = findConfigPath(self.arguments)
        if path is None:
            super().parseOptions(self.arguments)
            return
        try:
            self.configFile = loadConfig(path, type(self))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            super().parseOptions(self.configFile.arguments + self.arguments)
        except usage.UsageError as e:
            raise usage.UsageError(self.configFile.error(str(e), self.arguments)) from None

    def opt_proxy(self, proxy: str) -> None:
        """
        An upstream proxy (at least one): HOST:PORT, [IPV6]:PORT,
        http://[USER:PASSWORD@]HOST:PORT, https://[USER:PASSWORD@]HOST:PORT
        (TLS to the proxy), socks5://[USER:PASSWORD@]HOST:PORT (a SOCKS5
        server), or a Twisted client endpoint string such as
        tcp:host=10.0.0.5:port=3128. Repeatable; see --balance. An HTTP
        URL may end with ?pass-client=MODE, this proxy's own --pass-client.
        """
        self["proxy"].append(proxy)

    opt_p = opt_proxy

    def opt_allow(self, network: str) -> None:
        """
        Serve only clients in this network, such as 192.168.0.0/16;
        repeatable. Default: every client the rules redirect.
        """
        try:
            self["allow"].append(ipaddress.ip_network(network, strict=False))
        except ValueError as e:
            raise usage.UsageError(f"--allow: {e}") from None

    def opt_allow_port(self, ports: str) -> None:
        """
        Serve only these original destination ports (comma-separated;
        repeatable). Default: every port the rules redirect.
        """
        for port in ports.split(","):
            if not port.strip().isdigit() or not 0 < int(port) < 65536:
                raise usage.UsageError(f"--allow-port: not a port number: {port!r}")
            self["allow-port"].add(int(port))

    def postOptions(self) -> None:
        from twisted.internet import reactor

        configFile = self.configFile
        self.proxySpecs = (configFile.proxies if configFile is not None else []) + [
            ProxySpec(proxy) for proxy in self["proxy"]
        ]
        if not self.proxySpecs and not self["pac"]:
            raise usage.UsageError("--proxy is required (for example --proxy 127.0.0.1:3128), unless --pac is given")
        if self["pac"] is not None:
            self._checkPac()
        elif self["pac-fallback"] != "refuse":
            raise usage.UsageError("--pac-fallback: applies only with --pac")
        self._checkKeytab()
        if self["proxy-credentials"] is not None:
            try:
                self["proxy-credentials"] = readCredentials(self["proxy-credentials"])
            except ValueError as e:
                raise usage.UsageError(f"--proxy-credentials: {e}") from None
        self._checkCertificateAuthorities()
        if self["pass-client"] not in PASS_CLIENT_MODES:
            raise usage.UsageError(
                f"--pass-client: expected one of {', '.join(PASS_CLIENT_MODES)}, "
                f"got {self['pass-client']!r}"
            )
        for spec in self.proxySpecs:
            try:
                buildProxy(spec, self, reactor)
            except ValueError as e:
                if spec.line is None:
                    raise usage.UsageError(f"--proxy: {e}") from None
                raise usage.UsageError(f"{configFile.path} line {spec.line}: proxy: {e}") from None  # type: ignore[union-attr]
        if self["balance"] not in BALANCES:
            raise usage.UsageError(
                f"--balance: expected one of {', '.join(BALANCES)}, got {self['balance']!r}"
            )
        if self["connect-target"] not in CONNECT_TARGETS:
            raise usage.UsageError(
                f"--connect-target: expected one of {', '.join(CONNECT_TARGETS)}, "
                f"got {self['connect-target']!r}"
            )
        try:
            serverFromString(reactor, self["listen"])
        except IndexError:
            raise usage.UsageError(
                f"--listen: {self['listen']!r}: no such descriptor was passed "
                "(LISTEN_FDS and LISTEN_FDNAMES, set by systemd socket activation)"
            ) from None
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen: invalid endpoint {self['listen']!r}: {e}") from None
        if self["resolver"] not in RESOLVERS:
            raise usage.UsageError(
                f"--resolver: unknown resolver {self['resolver']!r}; "
                f"choose one of {', '.join(sorted(RESOLVERS))}"
            )
        if not 0 <= self["queue-num"] <= 65535:
            raise usage.UsageError(f"--queue-num: {self['queue-num']} is not between 0 and 65535")
        if not 0 <= self["queue-mark"] <= 0xFFFFFFFF:
            raise usage.UsageError(f"--queue-mark: {self['queue-mark']:#x} does not fit in 32 bits")
        if not 0 <= self["reject-mark"] <= 0xFFFFFFFF:
            raise usage.UsageError(f"--reject-mark: {self['reject-mark']:#x} does not fit in 32 bits")
        if not 0 <= self["direct-mark"] <= 0xFFFFFFFF:
            raise usage.UsageError(f"--direct-mark: {self['direct-mark']:#x} does not fit in 32 bits")
        if self["relay"] not in RELAYS:
            raise usage.UsageError(
                f"--relay: expected one of {', '.join(RELAYS)}, got {self['relay']!r}"
            )
        if self["early-data"] not in EARLY_DATA:
            raise usage.UsageError(
                f"--early-data: expected one of {', '.join(EARLY_DATA)}, got {self['early-data']!r}"
            )
        if self["relay"] == "splice" and not SPLICE_AVAILABLE:
            raise usage.UsageError("--relay splice: this Python has no os.splice (3.10+ on Linux)")
        if self["max-connections"] is None:
            self["max-connections"] = defaultMaxConnections()
        if self["max-connections-per-client"] is None:
            self["max-connections-per-client"] = defaultMaxConnectionsPerClient(self["max-connections"])
        if self["metrics"] is not None:
            try:
                serverFromString(reactor, self["metrics"])
            except IndexError:
                raise usage.UsageError(
                    f"--metrics: {self['metrics']!r}: no such descriptor was passed "
                    "(LISTEN_FDS and LISTEN_FDNAMES, set by systemd socket activation)"
                ) from None
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--metrics: invalid endpoint {self['metrics']!r}: {e}") from None
        self._checkLogging()
        self.checkCombinations()

    def _checkCertificateAuthorities(self) -> None:
        """
        A CA file is for C{https://} proxies: given where none would use it
        (a typing mistake, or a proxy meant to be https://), it is refused.
        """
        configFile = self.configFile
        for spec in self.proxySpecs:
            if spec.ca is not None and not spec.address.startswith("https://"):
                raise usage.UsageError(
                    f"{configFile.path} line {spec.line}: proxy: ca applies only to an https:// proxy, "  # type: ignore[union-attr]
                    f"not {spec.address!r}"
                )
        ca = self["proxy-ca"]
        if ca is None:
            return
        named = any(spec.address.startswith("https://") and spec.ca is None for spec in self.proxySpecs)
        if not named and self["pac"] is None:  # a PAC script's HTTPS answers use it too
            raise usage.UsageError(
                "--proxy-ca: applies only to https:// proxies (without a ca of their own) and to those a --pac "
                "script names, and there are none"
            )
        try:
            readTrustRoot(credentialsPath(ca))
        except ValueError as e:
            raise usage.UsageError(f"--proxy-ca: {e}") from None

    def _checkLogging(self) -> None:
        if self["access-log"] is not None:
            try:
                checkDestination(self["access-log"])
            except ValueError as e:
                raise usage.UsageError(f"--access-log: {e}") from None
        try:
            AccessLogFormat(self["access-log-format"])
        except ValueError as e:
            raise usage.UsageError(f"--access-log-format: {e}") from None
        warm = str(self["warm-connections"]).lower()
        if warm in ("off", "0", "none"):
            self["warm-connections"] = 0
        elif not warm.isdigit() or int(warm) > 1024:
            raise usage.UsageError(f"--warm-connections: expected a number from 0 to 1024, or off, got {warm!r}")
        else:
            self["warm-connections"] = int(warm)
        if self["warm-lifetime"] < 1.0:
            raise usage.UsageError("--warm-lifetime: expected at least 1 second")
        header = self["tunnel-id-header"]
        if header.lower() != "none" and not _TOKEN.fullmatch(header):
            raise usage.UsageError(
                f"--tunnel-id-header: expected a header name (letters, digits, -) or none, got {header!r}"
            )
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(
                f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {self['log-format']!r}"
            )

    def checkCombinations(self) -> None:
        """
        The checks across options: at the start, and at a reload with the
        values of the options that change only at restart still in force
        (L{Reloader}).

        @raise usage.UsageError: for a combination that cannot work.
        """
        from twisted.internet import reactor

        if self["resolver"] == "tproxy" and not self["listen"].startswith("tproxy:"):
            raise usage.UsageError(
                "--resolver tproxy needs a transparent listener: "
                "--listen 'tproxy:PORT:interface=\\:\\:'"
            )
        if self["hold-syn"]:
            self._checkHoldSyn()
        if self["resolver"] == "nfqueue" and self["direct-mark"]:
            self._checkDirectMark()
        if self["workers"] > 1:
            if ReusePortEndpoint.fromString(reactor, self["listen"]) is None:
                raise usage.UsageError("--workers: the --listen endpoint must be tcp: or tcp6:")
            if self["resolver"] == "nfqueue":
                raise usage.UsageError("--workers: --resolver nfqueue binds one queue, for one process")
        configFile = self.configFile
        if configFile is not None:
            groups = {group for spec in self.proxySpecs for group in spec.groups}
            try:
                configFile.checkRules(self["connect-target"], groups)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        if self["control"] is not None:
            from shifter.service.control import controlPath

            suffix = f".{self['workers'] - 1}" if self["workers"] > 1 else ""
            try:
                controlPath(self["control"], suffix)
            except ValueError as e:
                raise usage.UsageError(f"--control: {e}") from None

    def _checkKeytab(self) -> None:
        keytab = self["proxy-keytab"]
        if keytab is not None:
            try:
                with open(credentialsPath(keytab), "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(f"--proxy-keytab: cannot read {keytab!r}: {e.strerror}") from None
        principal = self["proxy-principal"]
        if principal is not None:
            if not principal.strip() or any(not char.isprintable() for char in principal):
                raise usage.UsageError(f"--proxy-principal: expected a Kerberos principal name, got {principal!r}")
            if keytab is None and not any(spec.keytab for spec in self.proxySpecs):
                raise usage.UsageError("--proxy-principal: applies only with --proxy-keytab (or a [[proxy]] keytab)")

    def _checkPac(self) -> None:
        pac = self["pac"]
        if pac == "wpad":
            pass
        elif pac.startswith(("http://", "https://")):
            from urllib.parse import urlsplit

            if not urlsplit(pac).hostname:
                raise usage.UsageError(f"--pac: no host in {pac!r}")
        elif "://" in pac and not pac.startswith("file://"):
            raise usage.UsageError(f"--pac: expected an http://, https:// or file:// URL or a file name, got {pac!r}")
        fallback = self["pac-fallback"]
        groups = {group for spec in self.proxySpecs for group in spec.groups}
        if fallback not in ("refuse", "direct") and fallback not in groups:
            known = ", ".join(sorted(groups)) or "none: no proxy is configured"
            raise usage.UsageError(
                f"--pac-fallback: expected refuse, direct or a proxy group, got {fallback!r} (groups: {known})"
            )

    def _checkHoldSyn(self) -> None:
        if self["resolver"] != "nfqueue":
            raise usage.UsageError(
                "--hold-syn needs --resolver nfqueue: only there does Shifter have the "
                "SYN before the client's handshake completes"
            )
        if self["connect-target"] != "ip":
            raise usage.UsageError(
                f"--hold-syn opens the tunnel before the client has sent a byte, so CONNECT "
                f"can only ask for the address: --connect-target {self['connect-target']} "
                "cannot work with it (use --connect-target ip)"
            )
        if not self["queue-mark"]:
            raise usage.UsageError(
                "--hold-syn needs a --queue-mark: the nat rule must redirect only the SYNs "
                "Shifter accepted, not those it refused"
            )
        reject = self["reject-mark"]
        if not 0 < reject <= 0xFFFFFFFF:
            raise usage.UsageError(f"--reject-mark: expected a mark from 1 to 0xffffffff, got {reject:#x}")
        if reject & self["queue-mark"]:
            raise usage.UsageError("--reject-mark shares bits with --queue-mark")
        if self["mark"] is not None and reject & self["mark"]:
            raise usage.UsageError("--reject-mark shares bits with --mark: Shifter's own connections would be reset")
        if self["direct-mark"] & reject:
            raise usage.UsageError("--direct-mark shares bits with --reject-mark")

    def _checkDirectMark(self) -> None:
        direct = self["direct-mark"]
        if direct & self["queue-mark"]:
            raise usage.UsageError("--direct-mark shares bits with --queue-mark")
        if self["mark"] is not None and direct & self["mark"]:
            raise usage.UsageError("--direct-mark shares bits with --mark")


def makeService(config: Options, reactor=None, exitStatusOnFailure: bool | None = None) -> IService:  # type: ignore[no-untyped-def]
    """
    Build the Shifter service that C{config} describes: the
    L{ShifterService} (named C{"shifter"}) and the ports beside it.

    @param exitStatusOnFailure: whether a start that fails makes the
        process exit with status 1; by default, when twistd runs Shifter
        (C{config} is the subcommand of twistd's options).
    """
    if reactor is None:
        from twisted.internet import reactor
    # Run by twistd (as its subcommand, the parent of config): twistd's own
    # options say where it logs, and a failed start must give a failure
    # status.
    twistd = getattr(config, "parent", None)
    if exitStatusOnFailure is None:
        exitStatusOnFailure = twistd is not None
    logFile = None
    if twistd is not None:
        logFile = twistdLogFile(twistd)
        useLogFile(logFile)
    top = MultiService()
    # --log-format, unless twistd was given a --logger of its own (as
    # each worker of --workers is).  Text too is Shifter's own observer
    # when twistd writes to a file or standard output (a line per tunnel
    # costs a fraction of what twistd's observer takes); syslog stays
    # twistd's.
    ownLogger = not (twistd is not None and twistd.get("logger"))
    if config["log-format"] != "text" and ownLogger:
        top = LoggingService(logObserver(config["log-format"], logFile, clock=reactor))
    elif ownLogger and twistd is not None and not twistd.get("syslog"):
        top = LoggingService(logObserver("text", logFile, clock=reactor))
    if config["workers"] > 1 and config["worker"] is None:
        workers = WorkersService(
            reactor, config["workers"], config.arguments, config["drain-timeout"], config["listen"],
            exitStatusOnFailure=exitStatusOnFailure,
        )
        if config["metrics"] is not None:
            from shifter.service.metricsum import summedSite

            summed = summedSite(reactor, config["metrics"], config["workers"])
            if summed is not None:
                SidePortService(
                    "metrics (the sum of the workers')", config["metrics"],
                    serverFromString(reactor, config["metrics"]), summed, workers,
                ).setServiceParent(top)
        workers.setServiceParent(top)
        serving = lambda: f"{sum(w.ready for w in workers.workers.values())} of {config['workers']} workers serving"  # noqa: E731
        SystemdNotifier(reactor, workers.ready, serving).setServiceParent(top)
        return top
    built = configure(config, reactor)
    resolver = makeResolver(config["resolver"], reactor, **resolverOptions(config))
    factory = ShifterFactory(resolver, built.pool, built.settings, reactor, policy=built.policy)
    if config["hold-syn"]:
        holder = SynHolder(factory, config["hold-timeout"], direct=bool(config["direct-mark"]))
        factory.holder = resolver.holder = holder  # type: ignore[attr-defined]
    elif directMarkOf(config):
        director = SynDirector(factory)
        factory.director = resolver.holder = director  # type: ignore[attr-defined]
    listen = withBacklog(config["listen"], LISTEN_BACKLOG)
    endpoint = serverFromString(reactor, listen)
    metrics = config["metrics"]
    control = config["control"]
    worker = config["worker"]
    if worker is not None:
        becomeWorker(worker)
        endpoint = ReusePortEndpoint.fromString(reactor, listen) or endpoint
        if metrics is not None:
            from shifter.service.metricsum import workerMetrics

            metrics = workerMetrics(metrics, worker) or (metrics if worker == 0 else None)
        if control is not None:
            control = f"{control}.{worker}"
    service = ShifterService(
        endpoint,
        config["listen"],
        factory,
        drainTimeout=config["drain-timeout"],
        handleHangup=True,
        exitStatusOnFailure=exitStatusOnFailure,
    )
    reloader = service.reloader = Reloader(config, built, service, reactor)
    accessLog = config["access-log"]
    if accessLog is not None:
        from shifter.service.accesslog import openAccessLog

        accessLogFormat = config["access-log-format"]
        service.accessLogOpener = lambda: openAccessLog(accessLog, accessLogFormat, reactor)
    service.setName("shifter")
    if built.pac is not None:
        PacService(reloader).setServiceParent(top)
    # The side ports first: once Shifter says it accepts connections,
    # they are open too.
    if metrics is not None:
        from shifter.service.metricspage import metricsSite

        site = metricsSite(factory.metrics.registry)
        metricsService = SidePortService("metrics", metrics, serverFromString(reactor, metrics), site, service)
        metricsService.setServiceParent(top)
    if control is not None:
        from shifter.service.control import ControlService

        ControlService(control, service, reactor).setServiceParent(top)
    service.setServiceParent(top)
    if worker is not None:
        service.ready.addCallback(lambda _: workerReady())
    else:
        # Last, so that it is the first told of a shutdown.
        SystemdNotifier(reactor, service.ready, lambda: f"{len(factory.active)} tunnels open").setServiceParent(top)
    return top


def buildProxy(spec: ProxySpec, config: Options, reactor) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    """
    The proxy that C{spec} describes, with the options' C{--mark},
    C{--proxy-credentials} and C{--proxy-ca} where it sets none of its own.

    @raise ValueError: with a one-line reason.
    """
    mark = spec.mark if spec.mark is not None else config["mark"]
    proxyReactor = MarkingReactor(reactor, mark) if mark else reactor
    credentials = config["proxy-credentials"]
    if spec.credentials is not None:
        credentials = readCredentials(spec.credentials)
    ca = spec.ca or config["proxy-ca"]
    keytab = spec.keytab or config["proxy-keytab"]
    return parseProxy(
        spec.address, proxyReactor, credentials, credentialsPath(ca) if ca is not None else None,
        spec.passClient or config["pass-client"],
        preemptiveBasic=bool(config["proxy-preemptive-basic"]),
        keytab=credentialsPath(keytab) if keytab is not None else None,
        principal=spec.principal or config["proxy-principal"],
    )


class LoggingService(MultiService):
    """
    Shifter's services, which also tell the twistd application they join
    which log observer to use (C{--log-format}): twistd logs through it,
    unless its own C{--logger} is given.
    """

    def __init__(self, observer: Any) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> Any:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)


@dataclass
class Configured:
    """
    What the options make of the tunnels: their settings, the proxies and
    the policy.

    @ivar poolKey: what the pool was built from, to tell whether a reload
        changes it.
    @ivar direct: the DIRECT route, which a policy may choose in place of
        a proxy.
    """

    settings: TunnelSettings
    pool: ProxyPool
    policy: RulePolicy | PacPolicy | None
    poolKey: tuple[object, ...]
    direct: UpstreamProxy | None = None
    pac: PacPolicy | None = None


def _poolKey(config: Options) -> tuple[object, ...]:
    proxies = []
    for spec in config.proxySpecs:
        credentials = config["proxy-credentials"]
        if spec.credentials is not None:
            credentials = readCredentials(spec.credentials)
        proxies.append((
            spec.address,
            credentials,
            spec.ca or config["proxy-ca"],
            spec.mark if spec.mark is not None else config["mark"],
            spec.passClient or config["pass-client"],
            spec.keytab or config["proxy-keytab"],
            spec.principal or config["proxy-principal"],
        ))
    return (
        tuple(proxies), config["balance"], config["proxy-failures"], config["proxy-backoff"],
        bool(config["proxy-preemptive-basic"]),
    )


def configure(config: Options, reactor, running: Configured | None = None) -> Configured:  # type: ignore[no-untyped-def]
    """
    Build the tunnel settings, proxy pool and policy that C{config}
    describes.  The C{running} pool is kept (with what it knows of each
    proxy's health, its probe's settings brought up to date) when the
    proxies and their settings are the same.

    @raise ValueError: if a proxy cannot be built (a credentials file gone).
    """
    settings = TunnelSettings(
        connectTimeout=config["connect-timeout"],
        handshakeTimeout=config["handshake-timeout"],
        setupTimeout=config["setup-timeout"],
        idleTimeout=config["idle-timeout"],
        maxConnections=config["max-connections"] or defaultMaxConnections(),
        maxConnectionsPerClient=config["max-connections-per-client"],
        allowedClients=tuple(config["allow"]),
        allowedPorts=frozenset(config["allow-port"]),
        connectTarget=config["connect-target"],
        sniffTimeout=config["sniff-timeout"],
        relay=config["relay"],
        tunnelIdHeader="" if config["tunnel-id-header"].lower() == "none" else config["tunnel-id-header"],
        warmConnections=config["warm-connections"],
        warmLifetime=config["warm-lifetime"],
        sendEarly=config["early-data"] == "send",
    )
    key = _poolKey(config)
    if running is not None and running.poolKey == key:
        pool = running.pool
    else:
        pool = ProxyPool(
            [buildProxy(spec, config, reactor) for spec in config.proxySpecs],
            reactor,
            config["balance"],
            failureThreshold=config["proxy-failures"],
            downFor=config["proxy-backoff"],
            maxDownFor=30 * config["proxy-backoff"],
        )
    direct = directRoute(reactor, config["mark"] or 0)
    rules = policyFor(config.configFile, config.proxySpecs, pool.proxies, direct)
    policy: RulePolicy | PacPolicy | None = rules
    pac = None
    if config["pac"] is not None:
        pac = policy = _pacPolicy(config, reactor, pool, rules, direct, running)
    # The probe's settings follow the options even in a pool kept across a
    # reload, with what it knows of each proxy's health.
    pool.probeTarget = config["probe-target"] or DEFAULT_PROBE_TARGET
    pool.connectTimeout = settings.connectTimeout
    pool.handshakeTimeout = settings.handshakeTimeout
    return Configured(settings, pool, policy, key, direct, pac)


def _pacPolicy(config: Options, reactor, pool: ProxyPool, rules: RulePolicy | None,  # type: ignore[no-untyped-def]
               direct: UpstreamProxy, running: Configured | None) -> PacPolicy:
    """
    The PAC policy C{config} describes: the running one, brought up to
    date, when it reads the same script from the same place; else a new
    one (started by the caller).
    """
    from shifter.pac.evaluator import PacEvaluator
    from shifter.pac.fetch import PacSource
    from shifter.service.config import groupsOf

    groups = groupsOf(config.proxySpecs, pool.proxies)
    old = running.pac if running is not None else None
    if old is not None and old.source.location == config["pac"]:
        if old.pool is not pool:
            for proxy in old.built.values():
                old.pool.forget(proxy)
            old.built.clear()
        old.rules, old.groups, old.pool, old.direct = rules, {k: list(v) for k, v in groups.items()}, pool, direct
        old.decisions.clear()  # built from the proxies that were
        old.fallback = config["pac-fallback"]
        old.evaluator.timeout = config["pac-timeout"]
        old.source.refresh = config["pac-refresh"]
        return old
    hint = next((proxy.address[0] for proxy in pool.proxies if proxy.address is not None), None)
    evaluator = PacEvaluator(reactor, timeout=config["pac-timeout"], myIp=hint)
    source = PacSource(config["pac"], evaluator, reactor, refresh=config["pac-refresh"])
    policy = PacPolicy(
        evaluator, source, rules, groups, pool, direct,
        lambda url: buildProxy(ProxySpec(url), config, reactor), config["pac-fallback"],
    )
    source.withoutScript = policy.fallbackWords()
    return policy


# Options that the running service cannot change: a reload that changes
# them says so, and they take effect at the next start.
RESTART_OPTIONS = (
    "listen", "resolver", "queue-num", "queue-bypass", "queue-mark", "workers", "metrics", "control",
    "hold-syn", "hold-timeout", "reject-mark", "direct-mark", "access-log", "access-log-format", "log-format",
)


class Reloader:
    """
    Reloads C{--config}: the same command line, the file read again, and
    the new settings, proxies and rules given to the factory for the
    connections it accepts from now on.
    """

    def __init__(self, config: Options, running: Configured, service: ShifterService, reactor) -> None:  # type: ignore[no-untyped-def]
        self.config = config
        self.running = running
        self.service = service
        self.reactor = reactor
        # What the options that change only at restart are while this
        # process runs, whatever later files say.
        self.restartOnly = {name: config[name] for name in RESTART_OPTIONS}

    @property
    def path(self) -> str | None:
        """
        The configuration file, if there is one.
        """
        return self.config["config"]

    def __call__(self) -> str:
        """
        Reload.

        @return: what changed, in words, for the log line.
        @raise ValueError: with the file, line and reason, when the file
            cannot be used; nothing has changed then.
        """
        if self.path is None:
            raise ValueError("no --config file to reload")
        new = type(self.config)()
        try:
            new.parseOptions(self.config.arguments)
            self._checkWithRunning(new)
            built = configure(new, self.reactor, self.running)
        except (usage.UsageError, ValueError) as e:
            raise ValueError(str(e).removeprefix("--config: ")) from None
        old, self.config = self.config, new
        previous, self.running = self.running, built
        if previous.pac is not None and previous.pac is not built.pac:
            previous.pac.stop()
        if built.pac is not None:
            if built.pac is previous.pac:
                built.pac.source.update()
            else:
                built.pac.source.start()
        factory = self.service.factory
        factory.reconfigure(
            settings=built.settings,
            pool=built.pool if built.pool is not previous.pool else None,
            policy=built.policy,
        )
        if built.policy is None:
            factory.policy = None
        self.service.drainTimeout = new["drain-timeout"]
        changed = [
            name for name in sorted(new.keys())
            if name not in ("config",) and _comparable(new[name]) != _comparable(old[name])
        ]
        if built.pool is not previous.pool:
            changed.append("proxies")
        if (old.configFile and old.configFile.rules) != (new.configFile and new.configFile.rules):
            changed.append("rules")
        later = [name for name in changed if name in RESTART_OPTIONS]
        summary = "changed: " + ", ".join(changed) if changed else "nothing changed"
        if later:
            summary += f" ({', '.join(later)} only at restart)"
        return summary

    def _checkWithRunning(self, new: Options) -> None:
        """
        Check C{new}'s combinations as they would be in force: with the
        running values of the options that change only at restart, not the
        file's (a file that drops C{hold-syn} leaves it on until then, so it
        cannot bring C{connect-target = "sni"} with it).

        @raise usage.UsageError: naming the running values the new ones
            cannot go with.
        """
        running = self.restartOnly
        waiting = [name for name in RESTART_OPTIONS if _comparable(new[name]) != _comparable(running[name])]
        if not waiting:
            return  # new's own checks were these
        inForce = type(new)()
        inForce.update(new)
        inForce.update(running)
        inForce.configFile = new.configFile
        inForce.proxySpecs = new.proxySpecs
        try:
            inForce.checkCombinations()
        except usage.UsageError as e:
            held = ", ".join(_describe(name, running[name]) for name in waiting)
            path = new.configFile.path if new.configFile is not None else self.path
            raise usage.UsageError(f"{path}: {e} (in force until a restart, whatever the file says: {held})") from None


class PacService(Service):
    """
    Fetches the C{--pac} script while Shifter runs (the one in force after
    each reload), and stops its helper processes at the end.
    """

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    def startService(self) -> None:
        Service.startService(self)
        pac = self.reloader.running.pac
        if pac is not None:
            pac.source.start()

    def stopService(self) -> Any:
        Service.stopService(self)
        pac = self.reloader.running.pac
        if pac is not None:
            return pac.stop()
        return None


def _describe(name: str, value: object) -> str:
    """
    C{name}'s C{value} in words: C{"hold-syn on"}, C{"resolver nfqueue"}.
    """
    if any(flag[0] == name for flag in Options.optFlags):
        return f"{name} {'on' if value else 'off'}"
    return f"{name} {'none' if value is None else value}"


def _comparable(value: object) -> object:
    return sorted(map(str, value)) if isinstance(value, (list, set, frozenset)) else value


def resolverOptions(config: Options) -> dict[str, object]:
    """
    The chosen resolver's own settings, as keyword arguments for
    L{makeResolver}.
    """
    if config["resolver"] == "nfqueue":
        return {
            "queueNum": config["queue-num"],
            "queueBypass": bool(config["queue-bypass"]),
            "mark": config["queue-mark"],
            "rejectMark": config["reject-mark"],
            "directMark": directMarkOf(config),
        }
    return {}


def directMarkOf(config: Options) -> int:
    """
    The direct mark the C{nfqueue} resolver gives the SYNs it sends DIRECT
    at the SYN, or 0 for none: none without a C{--queue-mark}, since the
    nat rule then redirects every SYN, whatever its mark.
    """
    if config["resolver"] != "nfqueue" or not config["queue-mark"]:
        return 0
    return config["direct-mark"]  # type: ignore[no-any-return]

