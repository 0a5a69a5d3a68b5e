"""
Tests for C{--config}: L{shifter.service.config} (the file, its errors, the
rules as a policy) and reloading it in a running service (L{shifter.service.tap},
L{shifter.service.service}), in memory.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from shifter.service.config import ConfigError, RulePolicy, loadConfig, optionKinds
from shifter.tunnel.downstream import ShifterFactory
from shifter.tunnel.policy import TunnelRequest
from shifter.upstream.proxy import MarkingReactor, UpstreamProxy
from shifter.service.service import ShifterService
from shifter.service.tap import Options, makeService

PROJECT = Path(__file__).resolve().parent.parent


def readmeExample() -> str:
    """
    The configuration file example of the README.
    """
    readme = (PROJECT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "the README has one TOML example"
    return blocks[0]


class ConfigTestCase(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def parse(self, text: str, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--config", self.write(text), *arguments])
        return options

    def refused(self, text: str, *arguments: str) -> str:
        with self.assertRaises(UsageError) as caught:
            self.parse(text, *arguments)
        return str(caught.exception)


class OptionTests(ConfigTestCase):
    def test_everyOptionIsAKey(self) -> None:
        """
        Every option of the command line (but the internal --worker and
        --config itself) is a key of the file, read from the option
        definitions.
        """
        kinds = optionKinds(Options)
        longNames = {spec.rstrip("=") for spec in Options().longOpt}
        self.assertEqual(set(kinds), longNames - {"worker", "config", "help", "version"})
        self.assertTrue(kinds["queue-bypass"].flag)
        self.assertTrue(kinds["allow"].repeatable)
        self.assertFalse(kinds["idle-timeout"].repeatable)

    def test_sameAsCommandLine(self) -> None:
        """
        Each option with a default, written in the file with that value (a
        flag as true), gives the value the command line gives.
        """
        for name, short, default, *_ in Options.optParameters:
            if default is None or name == "worker":
                continue
            value = json.dumps(default) if isinstance(default, str) else repr(default)
            fromFile = self.parse(f"{name} = {value}\nproxy = ['127.0.0.1:3128']\n")
            fromLine = Options()
            fromLine.parseOptions([f"--{name}={default}", "--proxy", "127.0.0.1:3128"])
            self.assertEqual(fromFile[name], fromLine[name], name)
        # What a flag needs beside it to be valid at all.
        needs = {"hold-syn": "resolver = 'nfqueue'\n"}
        for name, *_ in Options.optFlags:
            rest = f"proxy = ['127.0.0.1:3128']\n{needs.get(name, '')}"
            self.assertTrue(self.parse(f"{name} = true\n{rest}")[name], name)
            self.assertFalse(self.parse(f"{name} = false\n{rest}")[name], name)

    def test_values(self) -> None:
        """
        Numbers, strings, lists and flags become the options' values.
        """
        options = self.parse(
            'listen = "tcp:2000"\nidle-timeout = 600\nallow = ["10.0.0.0/8", "192.168.1.0/24"]\n'
            'allow-port = [443, "8443,8444"]\nqueue-bypass = true\nproxy = ["127.0.0.1:3128"]\n'
        )
        self.assertEqual(options["listen"], "tcp:2000")
        self.assertEqual(options["idle-timeout"], 600.0)
        self.assertEqual(options["allow"], [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24")])
        self.assertEqual(options["allow-port"], {443, 8443, 8444})
        self.assertTrue(options["queue-bypass"])

    def test_probeTarget(self) -> None:
        """
        probe-target in the file, or --probe-target, is what the pool's
        probe asks for; without either, the default.
        """
        proxies = "proxy = ['127.0.0.1:3128']\n"
        self.assertEqual(self.parse(f"probe-target = '192.0.2.9:1'\n{proxies}")["probe-target"], ("192.0.2.9", 1))
        self.assertEqual(
            self.parse(proxies, "--probe-target", "[2001:db8::9]:9")["probe-target"], ("2001:db8::9", 9)
        )
        self.assertEqual(self.parse(f"probe-target = 'squid-check.example:8'\n{proxies}")["probe-target"],
                         ("squid-check.example", 8))
        for text, target in [(proxies, ("255.255.255.255", 9)), (f"probe-target = '192.0.2.9:1'\n{proxies}", ("192.0.2.9", 1))]:
            service = makeService(self.parse(text, "--handshake-timeout", "3"), MemoryReactorClock())
            pool = service.getServiceNamed("shifter").factory.pool  # type: ignore[attr-defined]
            self.assertEqual((pool.probeTarget, pool.handshakeTimeout), (target, 3.0))

    def test_commandLineOverrides(self) -> None:
        """
        A command-line option overrides the file's; a repeatable one adds
        to it.
        """
        options = self.parse(
            'idle-timeout = 600\nallow = ["10.0.0.0/8"]\nproxy = ["127.0.0.1:3128"]\n',
            "--idle-timeout", "5", "--allow", "192.168.0.0/16", "--proxy", "127.0.0.1:3129",
        )
        self.assertEqual(options["idle-timeout"], 5.0)
        self.assertEqual(len(options["allow"]), 2)
        self.assertEqual([spec.address for spec in options.proxySpecs], ["127.0.0.1:3128", "127.0.0.1:3129"])

    def test_commandLineAlone(self) -> None:
        """
        Without --config, the command line works as before.
        """
        options = Options()
        options.parseOptions(["--proxy", "127.0.0.1:3128"])
        self.assertIsNone(options.configFile)
        self.assertEqual([spec.address for spec in options.proxySpecs], ["127.0.0.1:3128"])

    def test_readmeExample(self) -> None:
        """
        The README's example file loads: its options, proxies, groups,
        rules and gateway table are what it says.
        """
        credentials = Path(self.mktemp())
        credentials.write_text("lab:secret\n")
        keytab = Path(self.mktemp())
        keytab.write_bytes(b"\x05\x02")
        text = readmeExample().replace("/etc/shifter/lab-proxy.credentials", str(credentials))
        text = text.replace("/etc/shifter/gateway.keytab", str(keytab))
        options = self.parse(text)
        self.assertEqual(options["connect-target"], "auto")
        self.assertEqual(options["idle-timeout"], 900.0)
        self.assertEqual(options["control"], "unix:/run/shifter/control")
        self.assertEqual(
            [spec.groups for spec in options.proxySpecs],
            [("default",), ("default",), ("lab",), ("corp",), ("socks",)],
        )
        self.assertEqual(options.proxySpecs[2].mark, 2)
        rules = options.configFile.rules  # type: ignore[union-attr]
        self.assertEqual([(r.group, r.refuse is not None, r.connectTarget, r.direct) for r in rules],
                         [("lab", False, None, False), (None, True, None, False), (None, False, "name", False),
                          (None, False, None, True), ("socks", False, None, False)])
        self.assertEqual(options.configFile.gateway["lan-interface"], ["lan0"])  # type: ignore[union-attr]
        service = makeService(options, MemoryReactorClock())
        factory = service.getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertIsInstance(factory.policy, RulePolicy)
        lab = factory.pool.proxies[2]
        self.assertIsNotNone(lab.auth)
        self.assertEqual(factory.pool.proxies[4].kind, "socks5")
        self.assertIsInstance(lab.endpoint._reactor, MarkingReactor)
        keeper = factory.pool.proxies[3].auth.negotiateLogin.keeper
        self.assertEqual(
            (keeper.keytab, keeper.principal, keeper.service),
            (str(keytab), "host/gw.corp.example.com", "HTTP/proxy.corp.example.com"),
        )


class ErrorTests(ConfigTestCase):
    """
    Each mistake stops with one line naming the file, the line and why.
    """

    def assertLine(self, message: str, line: int, *fragments: str) -> None:
        self.assertIn(f" line {line}: ", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)

    def test_badValue(self) -> None:
        self.assertLine(
            self.refused("proxy = ['127.0.0.1:3128']\n\nidle-timeout = -5\n"),
            3, "idle-timeout", "-5",
        )

    def test_durationPastMaximum(self) -> None:
        """
        A duration past the one-week maximum, infinite or not a number is
        refused with its line, naming the option and the limit.
        """
        self.assertLine(
            self.refused("proxy = ['127.0.0.1:3128']\nidle-timeout = 1e308\n"),
            2, "idle-timeout: at most 604800 seconds, got 1e+308",
        )
        self.assertLine(
            self.refused("proxy = ['127.0.0.1:3128']\n\nhold-timeout = 604801\n"),
            3, "hold-timeout: at most 604800 seconds, got 604801.0",
        )
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\nsetup-timeout = inf\n"), 2, "setup-timeout: at most")
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\ndrain-timeout = nan\n"), 2, "drain-timeout: expected")
        self.assertEqual(self.parse("proxy = ['127.0.0.1:3128']\nproxy-backoff = 604800\n")["proxy-backoff"], 604800.0)

    def test_badProbeTarget(self) -> None:
        """
        A probe target must be HOST:PORT fit for a CONNECT request, and not
        the proxy itself.
        """
        for value, why in [
            ("squid", "expected HOST:PORT"),
            ("192.0.2.9:0", "port out of range"),
            ("2001:db8::9:9", "in brackets"),
            ("bad name:9", "control character or whitespace"),
            ("127.0.0.1:9", "connect to itself"),
            ("localhost:9", "connect to itself"),
        ]:
            self.assertLine(self.refused(f"proxy = ['127.0.0.1:3128']\nprobe-target = '{value}'\n"),
                            2, "probe-target", why)

    def test_unknownKey(self) -> None:
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\nidle-timout = 5\n"), 2, "did you mean 'idle-timeout'")

    def test_notToml(self) -> None:
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\nidle-timeout = = 5\n"), 2, "not valid TOML")

    def test_crossOption(self) -> None:
        """
        A check across options names the line of the option it is about.
        """
        message = self.refused("proxy = ['127.0.0.1:3128']\nresolver = 'tproxy'\n")
        self.assertLine(message, 2, "--resolver tproxy needs a transparent listener")

    def test_crossOptionFromCommandLine(self) -> None:
        """
        When the option at fault was given on the command line, no line of
        the file is blamed.
        """
        message = self.refused("proxy = ['127.0.0.1:3128']\nlisten = 'tcp:1'\n", "--resolver", "tproxy")
        self.assertNotIn(" line ", message)

    def test_notAList(self) -> None:
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\nidle-timeout = [1, 2]\n"), 2, "one value")

    def test_flagNotBoolean(self) -> None:
        self.assertLine(self.refused("proxy = ['127.0.0.1:3128']\nqueue-bypass = 'yes'\n"), 2, "true or false")

    def test_badProxy(self) -> None:
        message = self.refused("[[proxy]]\naddress = '127.0.0.1:3128'\n\n[[proxy]]\naddress = 'nohost'\n")
        self.assertLine(message, 4, "proxy", "nohost")

    def test_proxyUnknownSetting(self) -> None:
        message = self.refused("[[proxy]]\naddress = '127.0.0.1:3128'\nweight = 3\n")
        self.assertLine(message, 3, "unknown setting 'weight'")

    def test_proxyCredentialsMissing(self) -> None:
        message = self.refused("[[proxy]]\naddress = '127.0.0.1:3128'\ncredentials = '/nonexistent/file'\n")
        self.assertLine(message, 1, "cannot read")

    def test_noProxy(self) -> None:
        self.assertIn("--proxy is required", self.refused("idle-timeout = 5\n"))

    def test_ruleUnknownGroup(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n\n[[rule]]\nclient = '10.0.0.0/8'\nproxy = 'lab'\n")
        self.assertLine(message, 3, "no proxy is in group 'lab'")

    def test_ruleNeedsNames(self) -> None:
        """
        A rule on names, with connect-target ip (so no name is ever read),
        is refused.
        """
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\nname = 'example.com'\nproxy = 'default'\n")
        self.assertLine(message, 2, "connect-target sni, host or auto")

    def test_ruleBadNetwork(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\nrefuse = true\ndestination = '10.0.0.300/8'\n")
        self.assertLine(message, 4, "destination")

    def test_ruleBadPort(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\nrefuse = true\nport = '90-80'\n")
        self.assertLine(message, 4, "port")

    def test_ruleNothingToDo(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\nport = 443\n")
        self.assertLine(message, 2, "nothing to do")

    def test_ruleRefuseAlone(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\nrefuse = true\nproxy = 'default'\n")
        self.assertLine(message, 2, "refuse goes alone")

    def test_ruleDirect(self) -> None:
        """
        C{direct = true} makes a rule that sends its connections DIRECT,
        and the service's policy gives the DIRECT route for them.
        """
        from twisted.internet.testing import MemoryReactorClock

        from shifter.service.tap import configure
        from shifter.upstream.proxy import DIRECT

        options = self.parse("proxy = ['127.0.0.1:3128']\n[[rule]]\ndestination = '10.0.0.0/8'\ndirect = true\n")
        [rule] = options.configFile.rules  # type: ignore[union-attr]
        self.assertTrue(rule.direct)
        configured = configure(options, MemoryReactorClock())
        decision = configured.policy.decide(request(destination="10.1.2.3"))  # type: ignore[union-attr]
        [route] = decision.proxies  # type: ignore[union-attr, misc]
        self.assertIs(route, configured.direct)
        self.assertEqual(route.kind, DIRECT)
        self.assertIsNone(configured.policy.decide(request()))  # type: ignore[union-attr]

    def test_ruleDirectAlone(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\ndirect = true\nproxy = 'default'\n")
        self.assertLine(message, 2, "direct goes alone")
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\ndirect = true\nrefuse = true\n")
        self.assertLine(message, 2, "refuse goes alone")

    def test_ruleECHNeedsTheHello(self) -> None:
        """
        A rule on ECH needs the ClientHello read: connect-target sni or
        auto, not ip or host.
        """
        rule = "proxy = ['127.0.0.1:3128']\n[[rule]]\nech = true\nrefuse = true\n"
        self.assertLine(self.refused(rule), 2, "ech: the ClientHello is read only with connect-target sni or auto, not ip")
        self.assertLine(self.refused("connect-target = 'host'\n" + rule), 3, "not host")
        for target in ("sni", "auto"):
            [parsed] = self.parse(f"connect-target = '{target}'\n" + rule).configFile.rules  # type: ignore[union-attr]
            self.assertIs(parsed.ech, True)

    def test_ruleECHNotAFlag(self) -> None:
        message = self.refused("connect-target = 'sni'\nproxy = ['127.0.0.1:3128']\n[[rule]]\nech = 'yes'\nrefuse = true\n")
        self.assertLine(message, 4, "ech: expected true or false")

    def test_ruleDirectNotAFlag(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[[rule]]\ndirect = 'yes'\n")
        self.assertLine(message, 3, "direct: expected true or false")

    def test_socksProxyInFile(self) -> None:
        """
        A C{[[proxy]]} may be a SOCKS5 server, with its own credentials
        file, in a group like any other.
        """
        from twisted.internet.testing import MemoryReactorClock

        from shifter.service.tap import configure
        from shifter.upstream.proxy import SOCKS5

        credentials = self.write("alice:s3cret\n")
        options = self.parse(
            f"[[proxy]]\naddress = 'socks5://192.0.2.9:1080'\ncredentials = '{credentials}'\ngroup = 'socks'\n"
            "[[proxy]]\naddress = '127.0.0.1:3128'\n"
            "[[rule]]\nport = 22\nproxy = 'socks'\n"
        )
        configured = configure(options, MemoryReactorClock())
        socks = configured.pool.proxies[0]
        self.assertEqual((socks.kind, socks.login), (SOCKS5, (b"alice", b"s3cret")))
        decision = configured.policy.decide(request(port=22, proxies=tuple(configured.pool.proxies)))  # type: ignore[union-attr]
        self.assertEqual(list(decision.proxies), [socks])  # type: ignore[union-attr]

    def test_socksProxyHTTPSettings(self) -> None:
        message = self.refused("[[proxy]]\naddress = 'socks5://192.0.2.9:1080'\npass-client = 'proxy-v2'\n")
        self.assertLine(message, 3, "pass-client is for HTTP proxies, not a SOCKS5 server")

    def test_unreadable(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            loadConfig("/nonexistent/shifter.toml", Options)
        self.assertEqual(str(caught.exception), "/nonexistent/shifter.toml: cannot read it: No such file or directory")

    def test_gatewayTable(self) -> None:
        message = self.refused("proxy = ['127.0.0.1:3128']\n[gateway]\nports = [443]\nlan = 'x'\n")
        self.assertLine(message, 4, "unknown setting 'lan'")


def request(client: str = "192.0.2.2", destination: str = "203.0.113.7", port: int = 443,
            name: str | None = None, proxies: tuple[UpstreamProxy, ...] = (), ech: str | None = None) -> TunnelRequest:
    address = (IPv6Address if ":" in client else IPv4Address)("TCP", client, 50000)
    original = (IPv6Address if ":" in destination else IPv4Address)("TCP", destination, port)
    return TunnelRequest(address, original, name, proxies, ech)


class PolicyTests(ConfigTestCase):
    """
    The rules decide per connection, first match first.
    """

    def policy(self, rules: str) -> tuple[RulePolicy, list[UpstreamProxy]]:
        options = self.parse(
            "connect-target = 'auto'\n"
            "[[proxy]]\naddress = '127.0.0.1:3001'\n"
            "[[proxy]]\naddress = '127.0.0.1:3002'\ngroup = 'lab'\n"
            "[[proxy]]\naddress = '127.0.0.1:3003'\ngroup = ['lab', 'other']\n" + rules
        )
        factory = makeService(options, MemoryReactorClock()).getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertIsInstance(factory.policy, RulePolicy)
        return factory.policy, factory.pool.proxies

    def test_defaultGroup(self) -> None:
        """
        A connection that no rule matches goes through the default group.
        """
        policy, proxies = self.policy("")
        decision = policy.decide(request(proxies=tuple(proxies)))
        self.assertEqual(decision.proxies, [proxies[0]])

    def test_clientNetwork(self) -> None:
        """
        A rule on client networks sends those clients to its group, in
        the pool's order, and no one else.
        """
        policy, proxies = self.policy("[[rule]]\nclient = ['10.20.0.0/16', '2001:db8:20::/48']\nproxy = 'lab'\n")
        self.assertEqual(policy.decide(request("10.20.3.4", proxies=tuple(proxies))).proxies, proxies[1:])
        self.assertEqual(policy.decide(request("2001:db8:20::9", proxies=tuple(proxies))).proxies, proxies[1:])
        self.assertEqual(policy.decide(request("10.21.3.4", proxies=tuple(proxies))).proxies, proxies[:1])

    def test_groupDown(self) -> None:
        """
        When every proxy of the group is down (not among the request's),
        the decision leaves none to try.
        """
        policy, proxies = self.policy("[[rule]]\nclient = '10.20.0.0/16'\nproxy = 'other'\n")
        self.assertEqual(policy.decide(request("10.20.3.4", proxies=tuple(proxies[:2]))).proxies, [])

    def test_destinationAndPorts(self) -> None:
        """
        Destination networks and ports (single and ranges) must all hold.
        """
        policy, proxies = self.policy(
            "[[rule]]\ndestination = '198.51.100.0/24'\nport = [443, '8000-8100']\nrefuse = 'no'\n"
        )
        self.assertIsNotNone(policy.decide(request(destination="198.51.100.9", port=8050)).refuse)
        self.assertIsNotNone(policy.decide(request(destination="198.51.100.9", port=443)).refuse)
        self.assertIsNone(policy.decide(request(destination="198.51.100.9", port=8101, proxies=tuple(proxies))).refuse)
        self.assertIsNone(policy.decide(request(destination="198.51.101.9", port=443, proxies=tuple(proxies))).refuse)

    def test_nameSuffix(self) -> None:
        """
        C{example.com} matches it and its subdomains; C{.example.org}
        only subdomains; no name, no match.
        """
        policy, proxies = self.policy("[[rule]]\nname = ['example.com', '.example.org']\nrefuse = true\n")
        for name, refused in [("example.com", True), ("www.Example.com.", True), ("badexample.com", False),
                              ("example.org", False), ("a.example.org", True), (None, False)]:
            decision = policy.decide(request(name=name, proxies=tuple(proxies)))
            self.assertEqual(decision is not None and decision.refuse is not None, refused, name)

    def test_ech(self) -> None:
        """
        C{ech = true} matches a hello that may hide its name: the outer ECH
        extension (which may be GREASE), the inner type, and a hello not
        read through; not one known to be GREASE, nor none.  C{ech =
        false} matches the others.
        """
        policy, proxies = self.policy("[[rule]]\nech = true\nrefuse = 'ECH'\n")
        opposite, _ = self.policy("[[rule]]\nech = false\nrefuse = 'no ECH'\n")
        for ech, matches in [("ech", True), ("inner", True), ("unknown", True), ("grease", False), (None, False)]:
            decision = policy.decide(request(name="cover.example.com", ech=ech, proxies=tuple(proxies)))
            self.assertEqual(decision is not None and decision.refuse is not None, matches, ech)
            decision = opposite.decide(request(name="cover.example.com", ech=ech, proxies=tuple(proxies)))
            self.assertEqual(decision is not None and decision.refuse is not None, not matches, ech)

    def test_echActions(self) -> None:
        """
        An ECH rule takes any action: a proxy group, connect-target (CONNECT
        by address rather than the cover name), direct.
        """
        policy, proxies = self.policy(
            "[[rule]]\nech = true\nport = 443\nproxy = 'other'\n"
            "[[rule]]\nech = true\nport = 8443\nconnect-target = 'ip'\n"
            "[[rule]]\nech = true\nport = 9443\ndirect = true\n"
        )
        ech = dict(name="cover.example.com", ech="ech", proxies=tuple(proxies))
        self.assertEqual(policy.decide(request(**ech)).proxies, [proxies[2]])  # type: ignore[arg-type]
        self.assertEqual(policy.decide(request(name="cover.example.com", proxies=tuple(proxies))).proxies, proxies[:1])
        self.assertEqual(policy.decide(request(port=8443, **ech)).target, "203.0.113.7")  # type: ignore[arg-type]
        [route] = policy.decide(request(port=9443, **ech)).proxies  # type: ignore[arg-type, union-attr, misc]
        self.assertEqual(route.kind, "direct")

    def test_refuseReason(self) -> None:
        """
        A refusal carries the rule's reason and its line.
        """
        policy, _ = self.policy("[[rule]]\ndestination = '203.0.113.0/24'\nrefuse = 'VPN only'\n")
        self.assertEqual(policy.decide(request()).refuse, "VPN only (rule at line 10)")

    def test_connectTarget(self) -> None:
        """
        connect-target name asks CONNECT for the name read; ip for the
        address even when a name was read.
        """
        policy, proxies = self.policy(
            "[[rule]]\nport = 443\nconnect-target = 'ip'\n[[rule]]\nport = 8443\nconnect-target = 'name'\n"
        )
        self.assertEqual(policy.decide(request(name="www.example.com", proxies=tuple(proxies))).target, "203.0.113.7")
        self.assertEqual(
            policy.decide(request(port=8443, name="www.example.com", proxies=tuple(proxies))).target, "www.example.com"
        )

    def test_firstMatchWins(self) -> None:
        policy, proxies = self.policy(
            "[[rule]]\nclient = '10.0.0.0/8'\nproxy = 'other'\n[[rule]]\nclient = '10.20.0.0/16'\nrefuse = true\n"
        )
        decision = policy.decide(request("10.20.0.1", proxies=tuple(proxies)))
        self.assertIsNone(decision.refuse)
        self.assertEqual(decision.proxies, [proxies[2]])

    def test_noPolicyWhenNothingToDecide(self) -> None:
        """
        Without rules or groups, Shifter asks no policy at all.
        """
        options = self.parse("proxy = ['127.0.0.1:3128', '127.0.0.1:3129']\n")
        factory = makeService(options, MemoryReactorClock()).getServiceNamed("shifter").factory  # type: ignore[attr-defined]
        self.assertIsNone(factory.policy)


class ReloadTests(ConfigTestCase):
    """
    Reloading the file in a running service.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.path = self.write("idle-timeout = 600\nproxy = ['127.0.0.1:3128']\n")
        options = Options()
        options.parseOptions(["--config", self.path, "--connect-timeout", "4"])
        self.service: ShifterService = makeService(options, MemoryReactorClock()).getServiceNamed("shifter")  # type: ignore[attr-defined]
        self.factory: ShifterFactory = self.service.factory

    def rewrite(self, text: str) -> None:
        Path(self.path).write_text(text)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events if "configuration" in formatEvent(event)]

    def test_newSettings(self) -> None:
        """
        New settings go to the factory, for new connections; the command
        line still overrides the file; one line says what changed.
        """
        self.rewrite("idle-timeout = 60\nconnect-timeout = 9\nproxy = ['127.0.0.1:3128']\n")
        self.assertEqual(self.service.reload("SIGHUP"), (True, "changed: idle-timeout"))
        self.assertEqual(self.factory.settings.idleTimeout, 60.0)
        self.assertEqual(self.factory.settings.connectTimeout, 4.0)
        self.assertEqual(self.lines(), [
            "SIGHUP: configuration reloaded for new connections (changed: idle-timeout); "
            "0 open connections keep theirs"
        ])

    def test_poolKept(self) -> None:
        """
        With the same proxies, the pool (and what it knows of their
        health) is kept.
        """
        pool = self.factory.pool
        pool.failed(pool.proxies[0], "refused")
        self.rewrite("idle-timeout = 60\nproxy = ['127.0.0.1:3128']\n")
        self.service.reload()
        self.assertIs(self.factory.pool, pool)

    def test_probeSettingsFollowReload(self) -> None:
        """
        A kept pool takes the reloaded probe target and timeouts.
        """
        pool = self.factory.pool
        self.rewrite("probe-target = '192.0.2.9:1'\nhandshake-timeout = 2\nproxy = ['127.0.0.1:3128']\n")
        self.service.reload()
        self.assertIs(self.factory.pool, pool)
        self.assertEqual((pool.probeTarget, pool.connectTimeout, pool.handshakeTimeout), (("192.0.2.9", 1), 4.0, 2.0))

    def test_newProxies(self) -> None:
        """
        New proxies make a new pool, and rules come into force.
        """
        self.rewrite(
            "connect-target = 'sni'\n[[proxy]]\naddress = '127.0.0.1:3129'\n"
            "[[rule]]\nname = 'example.com'\nrefuse = true\n"
        )
        reloaded, changes = self.service.reload()
        self.assertTrue(reloaded)
        self.assertIn("proxies", changes)
        self.assertEqual([p.description for p in self.factory.pool.proxies], ["127.0.0.1:3129"])
        self.assertIsInstance(self.factory.policy, RulePolicy)
        self.assertEqual(self.factory.settings.connectTarget, "sni")

    def test_rulesRemoved(self) -> None:
        """
        A reload that removes every rule removes the policy.
        """
        self.rewrite("connect-target = 'sni'\nproxy = ['127.0.0.1:3128']\n[[rule]]\nname = 'a.test'\nrefuse = true\n")
        self.service.reload()
        self.rewrite("proxy = ['127.0.0.1:3128']\n")
        self.service.reload()
        self.assertIsNone(self.factory.policy)

    def test_invalidKeepsRunning(self) -> None:
        """
        A file with an error changes nothing, and one error line names the
        line and the reason.
        """
        settings, pool = self.factory.settings, self.factory.pool
        self.rewrite("idle-timeout = 60\nproxy = ['127.0.0.1:3128']\nmax-connections = 0\n")
        reloaded, reason = self.service.reload("SIGHUP")
        self.assertFalse(reloaded)
        self.assertIs(self.factory.settings, settings)
        self.assertIs(self.factory.pool, pool)
        self.assertEqual(self.lines(), [
            f"SIGHUP: configuration not reloaded, the running one stays: {self.path} line 3: "
            "max-connections: expected a positive integer, got '0'"
        ])
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)

    def test_restartOnly(self) -> None:
        """
        A change that needs a restart is named as such.
        """
        self.rewrite("idle-timeout = 600\nlisten = 'tcp:2222'\nproxy = ['127.0.0.1:3128']\n")
        self.assertEqual(self.service.reload(), (True, "changed: listen (listen only at restart)"))

    def test_checkedWithRestartOnlyValuesInForce(self) -> None:
        """
        A file that drops hold-syn (which stays on until a restart) and
        brings what hold-syn cannot go with (connect-target sni, a --mark
        sharing bits with the running reject mark) is refused as a whole:
        the running configuration stays and one line says why, naming
        what is in force.  That holds after a reload that dropped hold-syn
        as well: the running values are the start's, not the last file's.
        """
        base = "proxy = ['127.0.0.1:3128']\nresolver = 'nfqueue'\n"
        self.rewrite(base + "hold-syn = true\n")
        options = Options()
        options.parseOptions(["--config", self.path])
        service: ShifterService = makeService(options, MemoryReactorClock()).getServiceNamed("shifter")  # type: ignore[attr-defined]
        factory = service.factory
        self.rewrite(base)
        self.assertEqual(service.reload("SIGHUP"), (True, "changed: hold-syn (hold-syn only at restart)"))
        for text, fragment in [
            (base + "connect-target = 'sni'\n", "--connect-target sni cannot work with it"),
            (base + "mark = 0x20000\n", "--reject-mark shares bits with --mark"),
        ]:
            seen = len(self.lines())
            settings, pool, policy = factory.settings, factory.pool, factory.policy
            self.rewrite(text)
            reloaded, reason = service.reload("SIGHUP")
            self.assertFalse(reloaded, text)
            self.assertIn(fragment, reason)
            self.assertIn("(in force until a restart, whatever the file says: hold-syn on)", reason)
            self.assertEqual(
                (factory.settings, factory.pool, factory.policy, factory.settings.connectTarget),
                (settings, pool, policy, "ip"),
            )
            self.assertEqual(self.lines()[seen:], [
                f"SIGHUP: configuration not reloaded, the running one stays: {reason}"
            ])

    def test_drainTimeout(self) -> None:
        """
        A new drain timeout applies to the next drain.
        """
        self.rewrite("drain-timeout = 5\nproxy = ['127.0.0.1:3128']\n")
        self.service.reload()
        self.assertEqual(self.service.drainTimeout, 5.0)
