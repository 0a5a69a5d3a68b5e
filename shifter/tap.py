"""
C{twistd shifter}: the command-line options and the service they describe.
"""

from __future__ import annotations

import ipaddress
import resource
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.web.server import Site

from shifter.downstream import ShifterFactory, TunnelSettings
from shifter.metrics import MetricsPage
from shifter.passclient import PASS_CLIENT_MODES
from shifter.pool import BALANCES, ProxyPool
from shifter.proxy import MarkingReactor, parseProxy, readCredentials
from shifter.relay import RELAYS
from shifter.resolver import RESOLVERS, makeResolver
from shifter.service import ShifterService
from shifter.splice import SPLICE_AVAILABLE
from shifter.workers import ReusePortEndpoint, WorkersService, becomeWorker, shiftPort, workerReady

CONNECT_TARGETS = ("ip", "sni", "host", "auto")

# Descriptors kept back from the connection cap for listening sockets,
# resolver sockets, log files and the like.
_RESERVED_DESCRIPTORS = 32


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return seconds


_seconds.coerceDoc = "Seconds, more than 0."  # type: ignore[attr-defined]


def _secondsOrOff(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"expected a number of seconds (0 for off), got {value!r}")
    return seconds


_secondsOrOff.coerceDoc = "Seconds; 0 turns it off."  # type: ignore[attr-defined]


def _mark(value: str) -> int:
    mark = int(value, 0)
    if not 0 < mark < 2**32:
        raise ValueError(f"expected a mark from 1 to 0xffffffff, got {value!r}")
    return mark


_mark.coerceDoc = "A number, decimal or 0x-hexadecimal."  # type: ignore[attr-defined]


def _positiveInt(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def defaultMaxConnections() -> int:
    """
    The connection cap that the descriptor limit allows: each tunnel holds
    two descriptors, the client's and the proxy's.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(1, (soft - _RESERVED_DESCRIPTORS) // 2)


class Options(usage.Options):
    synopsis = "--proxy HOST:PORT [options]"
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
            "queue-bypass",
            None,
            "With --resolver nfqueue: when the queue is full, the kernel "
            "accepts SYNs unmarked (so unproxied) instead of dropping them.",
        ],
    ]

    optParameters = [
        [
            "listen",
            "l",
            "tcp:12345",
            "Where to accept redirected connections, as a Twisted server "
            "endpoint string. For IPv4 and IPv6 together: "
            "tcp6:12345:interface=\\:\\:",
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
            "Seconds a proxy stays marked down before it is probed; doubled "
            "after each failed probe, up to 30 times this.",
            _seconds,
        ],
        [
            "proxy-credentials",
            None,
            None,
            "A file whose first line is user:password, for proxies whose "
            "--proxy names no credentials (keeps the password out of ps).",
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
            "is loaded, else sockopt. python -m shifter.rules prints the rules "
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
            "and restarted by this one. With --metrics, worker I serves on the "
            "metrics port plus I.",
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
            "mark",
            None,
            None,
            "Put this netfilter mark (SO_MARK) on connections to the proxy, so "
            "firewall rules can keep them out of the redirect. Needs "
            "CAP_NET_ADMIN. Default: no mark.",
            _mark,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.arguments: list[str] = []
        self["proxy"] = []
        self["allow"] = []
        self["allow-port"] = set()

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept for --workers, whose workers are started with the same ones.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_proxy(self, proxy: str) -> None:
        """
        An upstream HTTP proxy (at least one): HOST:PORT, [IPV6]:PORT,
        http://[USER:PASSWORD@]HOST:PORT, https://[USER:PASSWORD@]HOST:PORT
        (TLS to the proxy), or a Twisted client endpoint string such as
        tcp:host=10.0.0.5:port=3128. Repeatable; see --balance. A URL may
        end with ?pass-client=MODE, this proxy's own --pass-client.
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

        if not self["proxy"]:
            raise usage.UsageError("--proxy is required (for example --proxy 127.0.0.1:3128)")
        if self["proxy-credentials"] is not None:
            try:
                self["proxy-credentials"] = readCredentials(self["proxy-credentials"])
            except ValueError as e:
                raise usage.UsageError(f"--proxy-credentials: {e}") from None
        if self["pass-client"] not in PASS_CLIENT_MODES:
            raise usage.UsageError(
                f"--pass-client: expected one of {', '.join(PASS_CLIENT_MODES)}, "
                f"got {self['pass-client']!r}"
            )
        for proxy in self["proxy"]:
            try:
                parseProxy(
                    proxy, reactor, self["proxy-credentials"], self["proxy-ca"], self["pass-client"]
                )
            except ValueError as e:
                raise usage.UsageError(f"--proxy: {e}") from None
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
        if self["resolver"] == "tproxy" and not self["listen"].startswith("tproxy:"):
            raise usage.UsageError(
                "--resolver tproxy needs a transparent listener: "
                "--listen 'tproxy:PORT:interface=\\:\\:'"
            )
        if not 0 <= self["queue-num"] <= 65535:
            raise usage.UsageError(f"--queue-num: {self['queue-num']} is not between 0 and 65535")
        if not 0 <= self["queue-mark"] <= 0xFFFFFFFF:
            raise usage.UsageError(f"--queue-mark: {self['queue-mark']:#x} does not fit in 32 bits")
        if self["relay"] not in RELAYS:
            raise usage.UsageError(
                f"--relay: expected one of {', '.join(RELAYS)}, got {self['relay']!r}"
            )
        if self["relay"] == "splice" and not SPLICE_AVAILABLE:
            raise usage.UsageError("--relay splice: this Python has no os.splice (3.10+ on Linux)")
        if self["workers"] > 1:
            if ReusePortEndpoint.fromEndpoint(reactor, serverFromString(reactor, self["listen"])) is None:
                raise usage.UsageError("--workers: the --listen endpoint must be tcp: or tcp6:")
            if self["resolver"] == "nfqueue":
                raise usage.UsageError("--workers: --resolver nfqueue binds one queue, for one process")
        if self["max-connections"] is None:
            self["max-connections"] = defaultMaxConnections()
        if self["metrics"] is not None:
            try:
                serverFromString(reactor, self["metrics"])
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--metrics: invalid endpoint {self['metrics']!r}: {e}") from None


def makeService(config: Options, reactor=None) -> IService:  # type: ignore[no-untyped-def]
    """
    Build the Shifter service that C{config} describes.
    """
    if reactor is None:
        from twisted.internet import reactor
    if config["workers"] > 1 and config["worker"] is None:
        return WorkersService(
            reactor, config["workers"], config.arguments, config["drain-timeout"], config["listen"]
        )
    proxyReactor = MarkingReactor(reactor, config["mark"]) if config["mark"] else reactor
    proxies = [
        parseProxy(
            proxy, proxyReactor, config["proxy-credentials"], config["proxy-ca"], config["pass-client"]
        )
        for proxy in config["proxy"]
    ]
    if any(proxy.address is None for proxy in proxies):
        _resolveHostnamesInReactor(reactor)
    settings = TunnelSettings(
        connectTimeout=config["connect-timeout"],
        handshakeTimeout=config["handshake-timeout"],
        setupTimeout=config["setup-timeout"],
        idleTimeout=config["idle-timeout"],
        maxConnections=config["max-connections"] or defaultMaxConnections(),
        allowedClients=tuple(config["allow"]),
        allowedPorts=frozenset(config["allow-port"]),
        connectTarget=config["connect-target"],
        sniffTimeout=config["sniff-timeout"],
        relay=config["relay"],
    )
    pool = ProxyPool(
        proxies,
        reactor,
        config["balance"],
        failureThreshold=config["proxy-failures"],
        downFor=config["proxy-backoff"],
        maxDownFor=30 * config["proxy-backoff"],
    )
    factory = ShifterFactory(
        makeResolver(config["resolver"], reactor, **resolverOptions(config)), pool, settings, reactor
    )
    top = MultiService()
    endpoint = serverFromString(reactor, config["listen"])
    metrics = config["metrics"]
    worker = config["worker"]
    if worker is not None:
        becomeWorker(worker)
        endpoint = ReusePortEndpoint.fromEndpoint(reactor, endpoint) or endpoint
        if metrics is not None:
            metrics = shiftPort(metrics, worker) or (metrics if worker == 0 else None)
    service = ShifterService(
        endpoint,
        config["listen"],
        factory,
        drainTimeout=config["drain-timeout"],
        handleHangup=True,
    )
    service.setServiceParent(top)
    if worker is not None:
        service.ready.addCallback(lambda _: workerReady())
    if metrics is not None:
        site = Site(MetricsPage(factory.metrics.registry))
        site.noisy = False
        StreamServerEndpointService(serverFromString(reactor, metrics), site).setServiceParent(top)
    return top


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
        }
    return {}


def _resolveHostnamesInReactor(reactor) -> None:  # type: ignore[no-untyped-def]
    """
    Resolve the proxy's hostname with Twisted's own DNS client, which runs
    in the reactor, rather than the default resolver's thread pool.
    """
    from twisted.names.client import createResolver

    reactor.installResolver(createResolver())
