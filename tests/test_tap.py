"""
Tests for the command line and the service: L{shifter.service.tap},
L{shifter.upstream.proxy}, L{shifter.service.service}, the dropin and the .tac file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from zope.interface import implementer

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import IPlugin, getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.endpointstrings import withBacklog
from shifter.upstream.proxy import parseProxy
from shifter.resolvers.resolver import IOriginalDestinationResolver, ResolverUnavailable
from shifter.resolvers.sockopt import SocketOptionResolver
from shifter.service.tap import MAX_SECONDS, Options, defaultMaxConnections, makeService

PROJECT = Path(__file__).resolve().parent.parent

# Every option that is a duration in seconds.
DURATIONS = (
    "proxy-backoff", "sniff-timeout", "hold-timeout", "connect-timeout", "handshake-timeout",
    "setup-timeout", "idle-timeout", "drain-timeout", "pac-refresh", "pac-timeout", "warm-lifetime",
)


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(list(arguments))
    return options


class ProxyOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_shorthand(self) -> None:
        """
        C{host:port} with an IPv4 address becomes a TCP endpoint to it, and
        its address is known for loop detection.
        """
        proxy = parseProxy("10.0.0.5:3128", self.reactor)
        self.assertIsInstance(proxy.endpoint, TCP4ClientEndpoint)
        self.assertEqual(proxy.address, ("10.0.0.5", 3128))
        self.assertEqual(proxy.description, "10.0.0.5:3128")

    def test_ipv6Shorthand(self) -> None:
        """
        C{[v6]:port} becomes a TCP6 endpoint.
        """
        proxy = parseProxy("[2001:db8::5]:3128", self.reactor)
        self.assertIsInstance(proxy.endpoint, TCP6ClientEndpoint)
        self.assertEqual(proxy.address, ("2001:db8::5", 3128))

    def test_hostname(self) -> None:
        """
        A hostname is allowed; its address is not known in advance.
        """
        proxy = parseProxy("squid.example.test:3128", self.reactor)
        self.assertIsNone(proxy.address)

    def test_endpointString(self) -> None:
        """
        A Twisted client endpoint string is used as it is.
        """
        proxy = parseProxy("tcp:host=10.0.0.5:port=3128", self.reactor)
        self.assertIsInstance(proxy.endpoint, TCP4ClientEndpoint)
        self.assertEqual(proxy.address, ("10.0.0.5", 3128))

    def test_invalid(self) -> None:
        """
        Values that are neither form are rejected with a one-line reason.
        """
        for value in ["squid", "10.0.0.5:0", "10.0.0.5:70000", "[zz::1]:3128", "nosuch:host=x", ""]:
            with self.assertRaises(ValueError) as caught:
                parseProxy(value, self.reactor)
            self.assertNotIn("\n", str(caught.exception))


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        Only --proxy is needed; the rest have the documented defaults.
        """
        options = parse("--proxy", "127.0.0.1:3128")
        self.assertEqual(options["listen"], "tcp:12345")
        self.assertEqual(options["resolver"], "sockopt")
        self.assertEqual(options["connect-timeout"], 10.0)
        self.assertEqual(options["handshake-timeout"], 10.0)
        self.assertEqual(options["idle-timeout"], 3600.0)
        self.assertEqual(options["max-connections"], defaultMaxConnections())

    def test_values(self) -> None:
        """
        Each option is read into its value.
        """
        options = parse(
            "--proxy", "127.0.0.1:3128", "--listen", "tcp6:8080:interface=\\:\\:",
            "--connect-timeout", "2.5", "--handshake-timeout", "3",
            "--idle-timeout", "0", "--max-connections", "7",
        )
        self.assertEqual(
            (options["listen"], options["connect-timeout"], options["handshake-timeout"],
             options["idle-timeout"], options["max-connections"]),
            ("tcp6:8080:interface=\\:\\:", 2.5, 3.0, 0.0, 7),
        )

    def test_invalidValues(self) -> None:
        """
        Missing or invalid values are a L{UsageError} with a one-line
        message naming the problem.
        """
        cases = [
            ((), "--proxy is required"),
            (("--proxy", "nope"), "--proxy"),
            (("--proxy", "127.0.0.1:3128", "--listen", "bogus:1"), "--listen"),
            (("--proxy", "127.0.0.1:3128", "--resolver", "magic"), "unknown resolver 'magic'"),
            (("--proxy", "127.0.0.1:3128", "--connect-timeout", "0"), "positive number"),
            (("--proxy", "127.0.0.1:3128", "--handshake-timeout", "x"), "--handshake-timeout: expected a positive number"),
            (("--proxy", "127.0.0.1:3128", "--idle-timeout", "-1"), "0 for off"),
            (("--proxy", "127.0.0.1:3128", "--idle-timeout", "nan"), "0 for off"),
            (("--proxy", "127.0.0.1:3128", "--max-connections", "0"), "positive integer"),
        ]
        for arguments, expected in cases:
            with self.assertRaises(UsageError, msg=str(arguments)) as caught:
                parse(*arguments)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_durationsCapped(self) -> None:
        """
        Every duration option refuses NaN, infinities, negative values and
        anything past the one-week maximum, naming itself and the limit;
        the maximum itself is taken.
        """
        base = ("--proxy", "127.0.0.1:3128")
        for name in DURATIONS:
            option = f"--{name}"
            self.assertEqual(parse(*base, option, "604800")[name], MAX_SECONDS)
            for value, expected in [
                ("1e308", f"{option}: at most 604800 seconds, got 1e+308"),
                ("604800.5", f"{option}: at most 604800 seconds, got 604800.5"),
                ("inf", f"{option}: at most 604800 seconds, got inf"),
                ("nan", f"{option}: expected a"),
                ("-1", f"{option}: expected a"),
                ("-inf", f"{option}: expected a"),
            ]:
                with self.assertRaises(UsageError, msg=f"{option} {value}") as caught:
                    parse(*base, option, value)
                self.assertEqual(str(caught.exception)[:len(expected)], expected)

    def test_everyDurationListed(self) -> None:
        """
        Every option that takes seconds (a float by default) is one of the
        capped durations above.
        """
        seconds = {p[0] for p in Options.optParameters if isinstance(p[2], float)}
        self.assertEqual(seconds, set(DURATIONS))
        self.assertEqual(MAX_SECONDS, 7 * 24 * 3600)

    def test_warmConnections(self) -> None:
        """
        --warm-connections takes a count per proxy, or off (0); a count
        past its cap, or anything else, is refused.
        """
        self.assertEqual(parse("--proxy", "127.0.0.1:3128")["warm-connections"], 8)
        self.assertEqual(parse("--proxy", "127.0.0.1:3128", "--warm-connections", "3")["warm-connections"], 3)
        for off in ("off", "0", "none"):
            self.assertEqual(parse("--proxy", "127.0.0.1:3128", "--warm-connections", off)["warm-connections"], 0)
        for bad in ("-1", "many", "1025"):
            self.assertRaises(UsageError, parse, "--proxy", "127.0.0.1:3128", "--warm-connections", bad)
        self.assertRaises(UsageError, parse, "--proxy", "127.0.0.1:3128", "--warm-lifetime", "0.5")

    def test_mark(self) -> None:
        """
        --mark takes decimal or hexadecimal marks, not 0 or past 32 bits.
        """
        self.assertEqual(parse("--proxy", "127.0.0.1:3128", "--mark", "0x5f")["mark"], 0x5F)
        self.assertEqual(parse("--proxy", "127.0.0.1:3128", "--mark", "7")["mark"], 7)
        self.assertIsNone(parse("--proxy", "127.0.0.1:3128")["mark"])
        for bad in ("0", "0x100000000", "mark"):
            self.assertRaises(UsageError, parse, "--proxy", "127.0.0.1:3128", "--mark", bad)

    def test_defaultMaxConnectionsFollowsDescriptorLimit(self) -> None:
        """
        The default cap leaves two descriptors per tunnel and a reserve.
        """
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(defaultMaxConnections(), max(1, (soft - 32) // 2))


class HoldSynOptionTests(SynchronousTestCase):
    base = ("--proxy", "127.0.0.1:3128", "--resolver", "nfqueue", "--hold-syn")

    def test_defaults(self) -> None:
        """
        --hold-syn holds for 10 s at most, and refused SYNs get mark 0x20000.
        """
        options = parse(*self.base)
        self.assertEqual((options["hold-syn"], options["hold-timeout"], options["reject-mark"],
                          options["direct-mark"]), (1, 10.0, 0x20000, 0x40000))

    def test_refusedCombinations(self) -> None:
        """
        --hold-syn without the nfqueue resolver, with a CONNECT by name,
        without a queue mark or with marks that share bits is refused with
        a one-line reason.
        """
        cases = [
            (("--proxy", "127.0.0.1:3128", "--hold-syn"), "--hold-syn needs --resolver nfqueue"),
            (self.base + ("--connect-target", "sni"), "--connect-target sni cannot work with it"),
            (self.base + ("--connect-target", "host"), "--connect-target host cannot work with it"),
            (self.base + ("--queue-mark", "0"), "--hold-syn needs a --queue-mark"),
            (self.base + ("--reject-mark", "0x10000"), "--reject-mark shares bits with --queue-mark"),
            (self.base + ("--reject-mark", "0"), "--reject-mark: expected a mark"),
            (self.base + ("--mark", "0x20001"), "--reject-mark shares bits with --mark"),
            (self.base + ("--hold-timeout", "0"), "positive number"),
            (self.base + ("--direct-mark", "0x10000"), "--direct-mark shares bits with --queue-mark"),
            (self.base + ("--direct-mark", "0x20000"), "--direct-mark shares bits with --reject-mark"),
            (self.base + ("--mark", "0x40000"), "--direct-mark shares bits with --mark"),
            (self.base + ("--direct-mark", "0x100000000"), "--direct-mark: 0x100000000 does not fit in 32 bits"),
        ]
        for arguments, expected in cases:
            with self.assertRaises(UsageError, msg=str(arguments)) as caught:
                parse(*arguments)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_service(self) -> None:
        """
        The service's factory and its nfqueue resolver share one holder,
        with the hold timeout given; the resolver has the reject mark.
        """
        from shifter.tunnel.holdsyn import SynHolder

        reactor = MemoryReactorClock()
        service = makeService(parse(*self.base, "--hold-timeout", "4", "--reject-mark", "0x40"), reactor=reactor)
        factory = service.getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertIsInstance(factory.holder, SynHolder)
        self.assertIs(factory.resolver.holder, factory.holder)
        self.assertEqual((factory.holder.timeout, factory.resolver.rejectMark), (4.0, 0x40))
        self.assertEqual((factory.holder.direct, factory.resolver.directMark), (True, 0x40000))
        service = makeService(parse(*self.base, "--direct-mark", "0"), reactor=reactor)
        factory = service.getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertEqual((factory.holder.direct, factory.resolver.directMark), (False, 0))

    def test_noHolderByDefault(self) -> None:
        """
        Without --hold-syn, nothing is held: the nfqueue resolver's SYNs go
        to the director that sends them DIRECT at the SYN, with the direct
        mark; with --direct-mark 0, or --queue-mark 0 (the nat rule then
        redirects every SYN), there is none.
        """
        from shifter.tunnel.directsyn import SynDirector

        reactor = MemoryReactorClock()
        base = ("--proxy", "127.0.0.1:3128", "--resolver", "nfqueue")
        service = makeService(parse(*base), reactor=reactor)
        factory = service.getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertIsNone(factory.holder)
        self.assertIsInstance(factory.director, SynDirector)
        self.assertIs(factory.resolver.holder, factory.director)
        self.assertEqual(factory.resolver.directMark, 0x40000)
        for options in (("--direct-mark", "0"), ("--queue-mark", "0")):
            service = makeService(parse(*base, *options), reactor=reactor)
            factory = service.getServiceNamed("shifter").factory  # type: ignore[attr-defined]
            self.assertEqual((factory.director, factory.resolver.holder, factory.resolver.directMark),
                             (None, None, 0), options)

    def test_directMarkWithoutHoldSyn(self) -> None:
        """
        Without --hold-syn too, a direct mark that shares bits with the
        queue mark or --mark is refused; one sharing bits with the reject
        mark, unused then, is not.
        """
        base = ("--proxy", "127.0.0.1:3128", "--resolver", "nfqueue")
        for options, expected in ((("--direct-mark", "0x10000"), "--direct-mark shares bits with --queue-mark"),
                                  (("--mark", "0x40000"), "--direct-mark shares bits with --mark")):
            with self.assertRaises(UsageError) as caught:
                parse(*base, *options)
            self.assertIn(expected, str(caught.exception))
        parse(*base, "--direct-mark", "0x20000")


@implementer(IOriginalDestinationResolver)
class BrokenResolver:
    name = "broken"

    def __init__(self, reactor: object = None) -> None:
        pass

    def start(self):  # type: ignore[no-untyped-def]
        return fail(ResolverUnavailable("module shifter not loaded"))

    def stop(self):  # type: ignore[no-untyped-def]
        return succeed(None)

    def resolve(self, transport):  # type: ignore[no-untyped-def]
        raise AssertionError("never called")


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_listensOnStart(self) -> None:
        """
        Starting the service starts the resolver, then listens on the
        --listen endpoint, and logs one line saying so.
        """
        service = makeService(parse("--proxy", "127.0.0.1:3128", "--listen", "tcp:4321"), reactor=self.reactor)
        self.assertTrue(IService.providedBy(service))
        service.startService()
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (4321, ""))
        self.assertIsInstance(factory.resolver, SocketOptionResolver)
        self.assertTrue(any("accepting redirected connections on tcp:4321" in formatEvent(e) for e in self.events))
        self.successResultOf(service.stopService())

    def test_listenBacklog(self) -> None:
        """
        A --listen endpoint that names no backlog listens with a queue of
        1024 (not Twisted's 50); one that names its own keeps it.
        """
        for listen, expected in [
            ("tcp:4321", (4321, 1024, "")),
            ("tcp6:4321:interface=\\:\\:", (4321, 1024, "::")),
            ("tcp:4321:backlog=10", (4321, 10, "")),
            ("tcp:4321:127.0.0.1:10", (4321, 10, "127.0.0.1")),
        ]:
            reactor = MemoryReactorClock()
            service = makeService(parse("--proxy", "127.0.0.1:3128", "--listen", listen), reactor=reactor)
            service.startService()
            [(port, _, backlog, interface)] = reactor.tcpServers
            self.assertEqual((port, backlog, interface), expected, listen)
            self.successResultOf(service.stopService())

    def test_withBacklog(self) -> None:
        """
        Only listening strings that take a backlog and name none get one,
        whichever way (keyword or position) they name it.
        """
        self.assertEqual(withBacklog("tcp:1", 9), "tcp:1:backlog=9")
        self.assertEqual(withBacklog("tproxy:1:interface=0.0.0.0", 9), "tproxy:1:interface=0.0.0.0:backlog=9")
        for unchanged in ["tcp:1:backlog=5", "tcp:1:127.0.0.1:5", "tcp6:1:5", "unix:/run/s", "systemd:domain=INET:index=0"]:
            self.assertEqual(withBacklog(unchanged, 9), unchanged)

    def test_sidePortsFirst(self) -> None:
        """
        The metrics port opens before the redirected one, so that once
        Shifter says it accepts connections, its side ports are open too.
        """
        service = makeService(
            parse("--proxy", "127.0.0.1:3128", "--listen", "tcp:4321", "--metrics", "tcp:9100"), reactor=self.reactor
        )
        service.startService()
        self.assertEqual([server[0] for server in self.reactor.tcpServers], [9100, 4321])
        self.successResultOf(service.stopService())

    def test_resolverFailureStopsReactor(self) -> None:
        """
        A resolver that cannot start is a critical log line and the reactor
        stops: Shifter does not listen without a way to resolve.
        """
        from shifter.resolvers import resolver

        self.patch(resolver, "RESOLVERS", dict(resolver.RESOLVERS, broken=f"{__name__}.BrokenResolver"))
        config = parse("--proxy", "127.0.0.1:3128")
        config["resolver"] = "broken"
        service = makeService(config, reactor=self.reactor)
        service.startService()
        self.assertEqual(self.reactor.tcpServers, [])
        self.reactor.run()
        self.assertFalse(self.reactor.running)
        self.assertTrue(
            any("cannot start: module shifter not loaded" in formatEvent(e) for e in self.events)
        )

    def test_stoppedWhileStarting(self) -> None:
        """
        A service stopped while its resolver is still starting gives up
        the start (the resolver's start is cancelled), never listens, and
        logs no failure to start.
        """
        from shifter.resolvers import resolver

        self.patch(resolver, "RESOLVERS", dict(resolver.RESOLVERS, slow=f"{__name__}.SlowResolver"))
        config = parse("--proxy", "127.0.0.1:3128")
        config["resolver"] = "slow"
        service = makeService(config, reactor=self.reactor)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(SlowResolver.cancelled)
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertFalse(any("cannot start" in formatEvent(e) for e in self.events))


@implementer(IOriginalDestinationResolver)
class SlowResolver:
    """
    A resolver whose start finishes when the test says.
    """

    name = "slow"
    cancelled = False

    def __init__(self, reactor: object = None) -> None:
        SlowResolver.cancelled = False

        def cancel(d: Deferred) -> None:
            SlowResolver.cancelled = True

        self.started: Deferred = Deferred(cancel)

    def start(self) -> Deferred:
        return self.started

    def stop(self) -> Deferred:
        return succeed(None)

    def resolve(self, transport: object) -> Deferred:
        return Deferred()


class AuthOptionTests(SynchronousTestCase):
    def proxyAuth(self, *arguments: str):  # type: ignore[no-untyped-def]
        service = makeService(parse(*arguments), reactor=MemoryReactorClock())
        shifter = service.getServiceNamed("shifter")  # type: ignore[attr-defined]
        [proxy] = shifter.factory.pool.proxies
        return proxy.auth

    def test_credentialsAfterChallengeByDefault(self) -> None:
        """
        By default no credentials go with the first CONNECT.
        """
        auth = self.proxyAuth("--proxy", "http://u:p@127.0.0.1:3128")
        self.assertEqual(auth.exchange().headersFor("CONNECT", "a.test:443"), [])

    def test_preemptiveBasic(self) -> None:
        """
        --proxy-preemptive-basic sends Basic with the first CONNECT.
        """
        auth = self.proxyAuth("--proxy", "http://u:p@127.0.0.1:3128", "--proxy-preemptive-basic")
        [(name, value)] = auth.exchange().headersFor("CONNECT", "a.test:443")
        self.assertEqual((name, value), ("Proxy-Authorization", "Basic dTpw"))


class DropinTests(SynchronousTestCase):
    def test_plugin(self) -> None:
        """
        Twisted finds the dropin as the C{shifter} tap.
        """
        import twisted.plugins

        makers = {p.tapname: p for p in getPlugins(IPlugin, twisted.plugins) if hasattr(p, "tapname")}
        self.assertIn("shifter", makers)
        self.assertIs(makers["shifter"].options, Options)

    def twistd(self, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
        environment = dict(os.environ, PYTHONPATH=str(PROJECT), **(env or {}))
        return subprocess.run(
            [str(Path(sys.executable).parent / "twistd"), *arguments],
            capture_output=True, text=True, env=environment, cwd=str(PROJECT), timeout=60,
        )

    def test_help(self) -> None:
        """
        C{twistd shifter --help} documents every option.
        """
        result = self.twistd("shifter", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--listen", "--proxy", "--resolver", "--connect-timeout",
                       "--handshake-timeout", "--idle-timeout", "--max-connections"):
            self.assertIn(option, result.stdout)

    def test_badOptionIsOneLine(self) -> None:
        """
        An invalid value ends twistd with a one-line error on standard
        error (and one hint after it), not a traceback nor the whole help.
        """
        result = self.twistd("shifter", "--proxy", "127.0.0.1:3128", "--idle-timeout", "soon")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr.splitlines(), [
            "twistd shifter: --idle-timeout: expected a number of seconds (0 for off), got 'soon'",
            "Try 'twistd shifter --help' for the options.",
        ])

    def test_tac(self) -> None:
        """
        The .tac file builds the same service from SHIFTER_* variables.
        """
        namespace: dict = {}
        environment = {"SHIFTER_PROXY": "127.0.0.1:3128", "SHIFTER_LISTEN": "tcp:4322",
                       "SHIFTER_IDLE_TIMEOUT": "5"}
        self.patch(os, "environ", dict(self.cleanEnvironment(), **environment, SHIFTER_HOLD_SYN="no"))
        exec(compile((PROJECT / "shifter.tac").read_text(), "shifter.tac", "exec"), namespace)
        self.assertEqual(namespace["config"]["listen"], "tcp:4322")
        self.assertEqual(namespace["config"]["idle-timeout"], 5.0)
        self.assertFalse(namespace["config"]["hold-syn"])
        self.assertTrue(IService(namespace["application"]))

    def cleanEnvironment(self) -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if not name.startswith("SHIFTER_")}

    def test_tacFlag(self) -> None:
        """
        A flag's variable set to 1, true or yes sets the flag.
        """
        namespace: dict = {}
        environment = {"SHIFTER_PROXY": "127.0.0.1:3128", "SHIFTER_PROXY_PREEMPTIVE_BASIC": "true"}
        self.patch(os, "environ", dict(self.cleanEnvironment(), **environment))
        exec(compile((PROJECT / "shifter.tac").read_text(), "shifter.tac", "exec"), namespace)
        self.assertTrue(namespace["config"]["proxy-preemptive-basic"])

    def runTac(self, environment: dict[str, str]) -> subprocess.CompletedProcess:
        """
        twistd -ny shifter.tac, in a directory of the test's own, with only
        these SHIFTER_ variables.
        """
        twistd = Path(sys.executable).parent / "twistd"
        directory = self.mktemp()
        os.mkdir(directory)
        return subprocess.run(
            [str(twistd), "--pidfile=", "-ny", str(PROJECT / "shifter.tac")],
            env=dict(self.cleanEnvironment(), PYTHONPATH=str(PROJECT), **environment),
            cwd=directory,
            capture_output=True, text=True, timeout=60,
        )

    def test_tacUnknownVariable(self) -> None:
        """
        A SHIFTER_ variable that names no option is refused in one line
        naming it and the known ones, exit status 1, nothing started.
        """
        # Were it ignored, Shifter would start: on a port of loopback's
        # that nothing else uses, until the timeout.
        environment = {"SHIFTER_PROXY": "127.0.0.1:3128", "SHIFTER_LISTEN": "tcp:0:interface=127.0.0.1"}
        result = self.runTac(dict(environment, SHIFTER_LISTN="tcp:4323"))
        self.assertEqual(result.returncode, 1)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("shifter.tac: unknown variable SHIFTER_LISTN; the known ones are: "), lines[0])
        self.assertIn("SHIFTER_LISTEN, ", lines[0])
        self.assertIn("SHIFTER_ALLOW_PORT", lines[0])
        self.assertNotIn("SHIFTER_WORKER,", lines[0])

    def test_tacBadValue(self) -> None:
        """
        A bad value, or a flag's that is not a yes or a no, is one line
        naming what is wrong, with no traceback.
        """
        result = self.runTac({"SHIFTER_PROXY": "127.0.0.1:3128", "SHIFTER_IDLE_TIMEOUT": "xyz"})
        self.assertEqual((result.returncode, result.stderr.count("\n")), (1, 1), result.stderr)
        self.assertIn("--idle-timeout", result.stderr)
        result = self.runTac({"SHIFTER_PROXY": "127.0.0.1:3128", "SHIFTER_HOLD_SYN": "maybe"})
        self.assertEqual((result.returncode, result.stderr.count("\n")), (1, 1), result.stderr)
        self.assertIn("SHIFTER_HOLD_SYN", result.stderr)
