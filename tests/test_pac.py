"""
The PAC script: its answers read (sans I/O), the standard functions, and
the helper processes that run it under a time and memory limit, restarted
when they die, with a bounded cache; then the policy that puts the rules,
the answer and the fallback together.  The helpers are real processes
driven by the real reactor.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from shifter.pac.answer import PAC_DIRECT as DIRECT
from shifter.pac.answer import PAC_HTTPS as HTTPS
from shifter.pac.answer import PAC_PROXY as PROXY
from shifter.pac.answer import PAC_SOCKS5 as SOCKS5
from shifter.pac.answer import AnswerError, PacChoice, parseAnswer
from shifter.pac.child import Script
from shifter.pac.evaluator import PacError, PacEvaluator
from shifter.pac.fetch import PacSource

ORDINARY = """
function FindProxyForURL(url, host) {
  if (host == "loop.test") { while (true) {} }
  if (host == "alloc.test") { var a = []; while (true) { a.push(new Array(1000000).fill(a.length)); } }
  if (host == "throw.test") { throw new Error("no such luck"); }
  if (host == "garbage.test") { return "TELEPORT somewhere"; }
  if (host == "number.test") { return 42; }
  // Names are not looked up here: the tests send no DNS query.
  if (/^[0-9.]+$/.test(host) && isInNet(host, "10.0.0.0", "255.0.0.0")) return "DIRECT";
  return "PROXY 192.0.2.10:3128; HTTPS 192.0.2.11:443; DIRECT";
}
"""


class AnswerTests(SynchronousTestCase):
    def test_choicesInOrder(self) -> None:
        """
        Each entry becomes a typed choice, in the answer's order; C{HTTP}
        is C{PROXY}, C{SOCKS} is C{SOCKS5}, keywords in any case.
        """
        self.assertEqual(
            parseAnswer("PROXY a.example:3128; https b.example:443;SOCKS [2001:db8::1]:1080; HTTP c:80; DIRECT"),
            (PacChoice(PROXY, "a.example", 3128), PacChoice(HTTPS, "b.example", 443),
             PacChoice(SOCKS5, "2001:db8::1", 1080), PacChoice(PROXY, "c", 80), PacChoice(DIRECT)),
        )

    def test_unknownEntriesSkipped(self) -> None:
        """
        Entries Shifter cannot read are skipped, as browsers skip them.
        """
        self.assertEqual(parseAnswer("QUIC x:1; PROXY a:99999; PROXY a; DIRECT"), (PacChoice(DIRECT),))

    def test_garbageRefused(self) -> None:
        """
        An answer with no usable entry, one that is not a string, or one
        too long is refused with the reason.
        """
        for answer in ("", "TELEPORT now", 42, None, "PROXY a:1;" * 1000):
            self.assertRaises(AnswerError, parseAnswer, answer)


class FunctionTests(SynchronousTestCase):
    """
    The standard PAC functions, run by the helper's engine in this process.
    """

    def call(self, expression: str) -> Any:
        script = Script("function FindProxyForURL(url, host) { return eval(host); }", "192.0.2.1")
        return script.find("https://x/", expression)

    def test_names(self) -> None:
        self.assertEqual(self.call('isPlainHostName("www")'), True)
        self.assertEqual(self.call('isPlainHostName("www.example.com")'), False)
        self.assertEqual(self.call('dnsDomainIs("www.example.com", ".example.com")'), True)
        self.assertEqual(self.call('dnsDomainIs("www.example.org", ".example.com")'), False)
        self.assertEqual(self.call('localHostOrDomainIs("www", "www.example.com")'), True)
        self.assertEqual(self.call('localHostOrDomainIs("www.example.org", "www.example.com")'), False)
        self.assertEqual(self.call('dnsDomainLevels("a.b.c")'), 2)
        self.assertEqual(self.call('shExpMatch("http://x.example.com/a", "*.example.com/*")'), True)
        self.assertEqual(self.call('shExpMatch("www.example.com", "w?w.*")'), True)
        self.assertEqual(self.call('shExpMatch("www.example.com", "*.org")'), False)

    def test_addresses(self) -> None:
        self.assertEqual(self.call('isInNet("10.1.2.3", "10.0.0.0", "255.0.0.0")'), True)
        self.assertEqual(self.call('isInNet("11.1.2.3", "10.0.0.0", "255.0.0.0")'), False)
        self.assertEqual(self.call('isInNet("192.168.1.200", "192.168.1.128", "255.255.255.128")'), True)
        self.assertEqual(self.call('isInNetEx("2001:db8::5", "2001:db8::/32")'), True)
        self.assertEqual(self.call('isInNetEx("10.0.0.1", "10.0.0.0/8")'), True)
        self.assertEqual(self.call('isInNetEx("11.0.0.1", "10.0.0.0/8")'), False)
        self.assertEqual(self.call('sortIpAddressList("10.0.0.2;2001:db8::1;10.0.0.1")'), "2001:db8::1;10.0.0.1;10.0.0.2")
        self.assertEqual(self.call("myIpAddress()"), "192.0.2.1")
        self.assertEqual(self.call("myIpAddressEx()"), "192.0.2.1")
        self.assertEqual(self.call('dnsResolve("127.0.0.1")'), "127.0.0.1")
        self.assertEqual(self.call('isResolvable("127.0.0.1")'), True)

    def test_times(self) -> None:
        self.assertEqual(self.call('weekdayRange("SUN", "SAT")'), True)
        self.assertEqual(self.call('dateRange("JAN", "DEC")'), True)
        self.assertEqual(self.call("timeRange(0, 0, 0, 23, 59, 59)"), True)
        self.assertEqual(self.call('dateRange(1, 31, "GMT")'), True)
        self.assertEqual(self.call("dateRange(1800, 1900)"), False)


class EvaluatorTests(TestCase):
    """
    The helpers, real processes, driven by the real reactor.
    """

    timeout = 60

    @inlineCallbacks
    def waitFor(self, condition: Any, seconds: float = 20.0) -> Any:
        for _ in range(int(seconds * 20)):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("condition never held")

    def evaluator(self, **options: Any) -> PacEvaluator:
        options.setdefault("timeout", 2.0)
        evaluator = PacEvaluator(reactor, **options)
        self.addCleanup(evaluator.stop)
        return evaluator

    @inlineCallbacks
    def test_answerThenCached(self) -> Any:
        """
        The script's answer comes back read, and the next call for the same
        host and port is answered from the cache.
        """
        evaluator = self.evaluator()
        yield evaluator.load(ORDINARY)
        first = yield evaluator.find("https://www.example/", "www.example", 443)
        self.assertEqual(first.answer, "PROXY 192.0.2.10:3128; HTTPS 192.0.2.11:443; DIRECT")
        self.assertFalse(first.cached)
        second = yield evaluator.find("https://www.example/", "www.example", 443)
        self.assertTrue(second.cached)
        self.assertEqual(second.choices, first.choices)

    @inlineCallbacks
    def assertFailsThenWorks(self, host: str, reason: str, restarted: bool, timeout: float = 1.0) -> Any:
        # One helper: the calls after a kill need its replacement.
        evaluator = self.evaluator(timeout=timeout, helpers=1)
        yield evaluator.load(ORDINARY)
        try:
            yield evaluator.find(f"https://{host}/", host, 443)
        except PacError as e:
            self.assertIn(reason, str(e))
        else:
            self.fail(f"{host} was answered")
        if restarted:
            yield self.waitFor(lambda: evaluator.restarts == 1)
            yield self.waitFor(lambda: evaluator.ready == 1)
        for i in range(4):
            result = yield evaluator.find(f"https://ok{i}.example/", f"ok{i}.example", 443)
            self.assertEqual(result.choices[0], PacChoice(PROXY, "192.0.2.10", 3128))

    def test_loop(self) -> Any:
        """
        A script that never returns is killed at the time limit, its helper
        replaced; the next calls are answered.
        """
        return self.assertFailsThenWorks("loop.test", "did not answer within 1 s", restarted=True)

    def test_allocation(self) -> Any:
        """
        A script that allocates without end hits the helper's memory limit
        (given time enough to reach it on a busy machine).
        """
        return self.assertFailsThenWorks("alloc.test", "memory", restarted=False, timeout=30.0)

    def test_throw(self) -> Any:
        """
        A script that throws gives the exception's message.
        """
        return self.assertFailsThenWorks("throw.test", "no such luck", restarted=False)

    def test_garbage(self) -> Any:
        """
        An answer with nothing usable, or not a string, is refused.
        """
        return self.assertFailsThenWorks("garbage.test", "no usable entry", restarted=False)

    @inlineCallbacks
    def test_failureCached(self) -> Any:
        """
        A failure is cached too: the next connection to the same host gets
        it at once, without a helper killed again.
        """
        evaluator = self.evaluator(timeout=1.0)
        yield evaluator.load(ORDINARY)
        yield self.assertFailure(evaluator.find("https://loop.test/", "loop.test", 443), PacError)
        error = yield self.assertFailure(evaluator.find("https://loop.test/", "loop.test", 443), PacError)
        self.assertIn("(cached)", str(error))
        yield self.waitFor(lambda: evaluator.restarts == 1)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(evaluator.restarts, 1)

    @inlineCallbacks
    def test_badScriptKeepsRunning(self) -> Any:
        """
        A new script that does not compile, or loops while loading, leaves
        the one in force.
        """
        evaluator = self.evaluator(timeout=1.0)
        yield evaluator.load(ORDINARY)
        yield self.assertFailure(evaluator.load("function FindProxyForURL( {"), PacError)
        yield self.assertFailure(evaluator.load("while (true) {}"), PacError)
        yield self.assertFailure(evaluator.load("var x = 1;"), PacError)
        self.assertEqual(evaluator.script, ORDINARY)
        result = yield evaluator.find("https://10.1.1.1/", "10.1.1.1", 443)
        self.assertEqual(result.choices, (PacChoice(DIRECT),))

    @inlineCallbacks
    def test_newScriptLetsCallsFinish(self) -> Any:
        """
        A call under way when a new script comes into force is answered by
        the old one, not failed; the next calls get the new script.
        """
        evaluator = self.evaluator(timeout=5.0, helpers=1)
        yield evaluator.load(
            "function FindProxyForURL(u, h) { var t = Date.now(); while (Date.now() - t < 1000) {} return 'PROXY 192.0.2.1:1'; }"
        )
        slow = evaluator.find("https://slow.example/", "slow.example", 443)
        yield evaluator.load("function FindProxyForURL(u, h) { return 'PROXY 192.0.2.2:2'; }")
        old = yield slow
        self.assertEqual(old.choices, (PacChoice(PROXY, "192.0.2.1", 1),))
        new = yield evaluator.find("https://fast.example/", "fast.example", 443)
        self.assertEqual(new.choices, (PacChoice(PROXY, "192.0.2.2", 2),))
        self.assertIsNone(evaluator.cached("slow.example", 443))

    @inlineCallbacks
    def test_cacheBound(self) -> Any:
        """
        Many distinct hosts keep the cache within its bound, the latest
        ones kept.
        """
        evaluator = self.evaluator(cacheSize=50)
        yield evaluator.load(ORDINARY)
        for i in range(300):
            yield evaluator.find(f"https://h{i}.example/", f"h{i}.example", 443)
            self.assertLessEqual(len(evaluator.cache), 50)
        self.assertEqual(len(evaluator.cache), 50)
        self.assertIsNotNone(evaluator.cached("h299.example", 443))
        self.assertIsNone(evaluator.cached("h0.example", 443))

    @inlineCallbacks
    def test_noScript(self) -> Any:
        """
        Before a script has loaded, every call fails at once.
        """
        evaluator = self.evaluator()
        error = yield self.assertFailure(evaluator.find("https://x/", "x", 443), PacError)
        self.assertIn("no PAC script", str(error))

    @inlineCallbacks
    def test_fileSource(self) -> Any:
        """
        A PAC file is loaded at start; one larger than the limit is refused
        and the script in force stays.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(ORDINARY)
        evaluator = self.evaluator()
        source = PacSource(path, evaluator, reactor, refresh=3600, maxSize=4096)
        self.addCleanup(source.stop)
        yield source.start()
        self.assertEqual(evaluator.script, ORDINARY)
        with open(path, "w") as f:
            f.write("function FindProxyForURL(u, h) { return 'DIRECT'; }\n" + "//" * 4096)
        yield source.update()
        self.assertEqual(evaluator.script, ORDINARY)


class _PacResource(Resource):
    """
    A PAC script with an ETag, answering a conditional GET with 304, and
    counting what it was asked.
    """

    isLeaf = True

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> bytes:
        etag = b'"%d"' % (hash(self.script) & 0xFFFFFFFF)
        self.requests.append(request.getHeader(b"if-none-match"))
        request.setHeader(b"etag", etag)
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return self.script.encode()


class HTTPSourceTests(TestCase):
    """
    A PAC served over HTTP by a Twisted web server on the loopback.
    """

    timeout = 60

    @inlineCallbacks
    def test_conditionalRefresh(self) -> Any:
        """
        The script is fetched and loaded; a refresh asks with the ETag and
        a 304 changes nothing; a changed script is loaded; a server that is
        gone keeps the script in force.
        """
        from twisted.web.server import Site

        resource = _PacResource(ORDINARY)
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        stopped = False

        def stop() -> Any:
            return None if stopped else port.stopListening()

        self.addCleanup(stop)
        evaluator = PacEvaluator(reactor, timeout=2.0)
        self.addCleanup(evaluator.stop)
        source = PacSource(f"http://127.0.0.1:{port.getHost().port}/proxy.pac", evaluator, reactor, refresh=3600)
        self.addCleanup(source.stop)
        yield source.start()
        self.assertEqual(evaluator.script, ORDINARY)
        self.assertEqual(resource.requests, [None])
        yield source.update()
        self.assertIsNotNone(resource.requests[1])
        self.assertEqual(evaluator.script, ORDINARY)
        changed = "function FindProxyForURL(url, host) { return 'PROXY 192.0.2.99:8080'; }"
        resource.script = changed
        yield source.update()
        self.assertEqual(evaluator.script, changed)
        result = yield evaluator.find("https://a.example/", "a.example", 443)
        self.assertEqual(result.choices, (PacChoice(PROXY, "192.0.2.99", 8080),))
        yield port.stopListening()
        stopped = True
        yield source.update()
        self.assertEqual(evaluator.script, changed)


class PacOptionsTests(SynchronousTestCase):
    """
    C{--pac} and its options, on the command line and in the file.
    """

    def parse(self, *arguments: str) -> Any:
        from shifter.service.tap import Options

        options = Options()
        options.parseOptions(list(arguments))
        return options

    def test_alone(self) -> None:
        """
        --pac may stand without --proxy; without either, --proxy is asked for.
        """
        from twisted.python.usage import UsageError

        self.assertEqual(self.parse("--pac", "/etc/shifter/proxy.pac")["pac"], "/etc/shifter/proxy.pac")
        self.assertEqual(self.parse("--pac", "http://192.0.2.5/wpad.dat")["pac-fallback"], "refuse")
        error = self.assertRaises(UsageError, self.parse)
        self.assertIn("unless --pac is given", str(error))

    def test_refused(self) -> None:
        """
        A URL of another scheme, and a fallback group no proxy is in are
        refused with the reason.
        """
        from twisted.python.usage import UsageError

        for arguments, reason in [
            (("--pac", "ftp://192.0.2.5/proxy.pac"), "expected an http://"),
            (("--pac", "x.pac", "--pac-fallback", "office"), "groups: none"),
            (("--pac", "x.pac", "--proxy", "127.0.0.1:3128", "--pac-fallback", "office"), "groups: default"),
        ]:
            error = self.assertRaises(UsageError, self.parse, *arguments)
            self.assertIn(reason, str(error))
        self.assertEqual(
            self.parse("--pac", "x.pac", "--proxy", "127.0.0.1:3128", "--pac-fallback", "default")["pac-fallback"],
            "default",
        )

    def test_inFile(self) -> None:
        """
        C{pac = ...} in the configuration file is --pac.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('pac = "http://192.0.2.5/wpad.dat"\npac-fallback = "direct"\n')
        options = self.parse("--config", path)
        self.assertEqual((options["pac"], options["pac-fallback"]), ("http://192.0.2.5/wpad.dat", "direct"))

    def test_keptAcrossReload(self) -> None:
        """
        A reload that reads the same PAC keeps its policy (its helpers and
        cache) with the new rules; another PAC gets a policy of its own.
        """
        from twisted.internet.testing import MemoryReactorClock

        from shifter.service.tap import configure

        clock = MemoryReactorClock()
        first = configure(self.parse("--pac", "a.pac", "--proxy", "127.0.0.1:3128"), clock)
        again = configure(self.parse("--pac", "a.pac", "--proxy", "127.0.0.1:3128", "--pac-timeout", "3"),
                          clock, first)
        self.assertIs(again.pac, first.pac)
        self.assertEqual(again.pac.evaluator.timeout, 3.0)  # type: ignore[union-attr]
        other = configure(self.parse("--pac", "b.pac", "--proxy", "127.0.0.1:3128"), clock, again)
        self.assertIsNot(other.pac, first.pac)
        self.assertIs(other.policy, other.pac)


class PacPolicyTests(TestCase):
    """
    The rules, then the PAC answer, then the fallback; the proxies an
    answer names.
    """

    timeout = 60

    @inlineCallbacks
    def policy(self, script: str, fallback: str = "refuse", rules: Any = ()) -> Any:
        from shifter.service.config import RulePolicy
        from shifter.service.pacpolicy import PacPolicy
        from shifter.upstream.pool import ProxyPool
        from shifter.upstream.proxy import directRoute, parseProxy

        self.configured = parseProxy("127.0.0.1:3128", reactor)
        self.pool = ProxyPool([self.configured], reactor)
        self.addCleanup(self.pool.stop)
        evaluator = PacEvaluator(reactor, timeout=2.0)
        self.addCleanup(evaluator.stop)
        source = PacSource("unused", evaluator, reactor)
        source.firstAttempt.callback(None)
        if script:
            yield evaluator.load(script)
        groups = {"default": [self.configured]}
        self.direct = directRoute(reactor)
        policy = PacPolicy(evaluator, source, RulePolicy(list(rules), groups, self.direct) if rules else None,
                           groups, self.pool, self.direct, lambda url: parseProxy(url, reactor), fallback)
        self.addCleanup(policy.lines.stop)
        return policy

    def request(self, destination: str = "203.0.113.7", name: Any = None) -> Any:
        from shifter.tunnel.policy import TunnelRequest

        return TunnelRequest(IPv4Address("TCP", "192.0.2.2", 0), IPv4Address("TCP", destination, 443), name,
                             (self.configured,))

    @inlineCallbacks
    def test_answerMapped(self) -> Any:
        """
        Each entry becomes a proxy in the answer's order: the configured one
        where it is the same, others built once and kept with their health
        in the pool, DIRECT the DIRECT route; the decision names the answer.
        """
        policy = yield self.policy(
            "function FindProxyForURL(u, h) { return 'PROXY 192.0.2.50:8080; PROXY 127.0.0.1:3128; "
            "HTTPS 192.0.2.51:443; SOCKS 192.0.2.52:1080; DIRECT'; }"
        )
        decision = yield policy.decide(self.request())
        proxies = list(decision.proxies)
        self.assertEqual([p.description for p in proxies],
                         ["192.0.2.50:8080", "127.0.0.1:3128", "https://192.0.2.51:443", "socks5://192.0.2.52:1080",
                          "DIRECT"])
        self.assertIs(proxies[1], self.configured)
        self.assertIs(proxies[4], self.direct)
        self.assertIn(proxies[0], self.pool.health)
        self.assertNotIn(proxies[0], self.pool.proxies)
        self.assertEqual(decision.label, "PAC: PROXY 192.0.2.50:8080; PROXY 127.0.0.1:3128; HTTPS 192.0.2.51:443; "
                                         "SOCKS5 192.0.2.52:1080; DIRECT")
        again = yield policy.decide(self.request("203.0.113.8"))
        self.assertIs(again.proxies[0], proxies[0])

    @inlineCallbacks
    def test_decisionKeptPerAnswer(self) -> Any:
        """
        The same answer is the same decision, built once; a proxy built for
        another answer, or a reload's new proxies, forget what was built.
        """
        policy = yield self.policy(
            "function FindProxyForURL(u, h) { return h == 'other.test' ? 'PROXY 192.0.2.60:8080' "
            ": 'PROXY 192.0.2.50:8080; DIRECT'; }"
        )
        first = yield policy.decide(self.request())
        again = yield policy.decide(self.request("203.0.113.8"))
        self.assertIs(again, first)
        self.assertEqual(len(policy.decisions), 1)
        other = yield policy.decide(self.request(name="other.test"))
        self.assertEqual([p.description for p in other.proxies], ["192.0.2.60:8080"])
        self.assertEqual(len(policy.decisions), 1, "building 192.0.2.60:8080 forgot the decisions kept before")
        rebuilt = yield policy.decide(self.request())
        self.assertIsNot(rebuilt, first)
        self.assertEqual(rebuilt, first)

    @inlineCallbacks
    def test_ruleFirst(self) -> Any:
        """
        A rule that matches decides, and the PAC script is not asked.
        """
        from shifter.service.config import Rule

        rule = Rule(line=7, destinations=(ipaddress.ip_network("198.51.100.0/24"),), refuse="not there")
        policy = yield self.policy("function FindProxyForURL(u, h) { return 'DIRECT'; }", rules=[rule])
        decision = yield policy.decide(self.request("198.51.100.9"))
        self.assertEqual(decision.refuse, "not there (rule at line 7)")
        self.assertEqual(decision.label, "rule at line 7")
        self.assertEqual(len(policy.evaluator.cache), 0)

    @inlineCallbacks
    def test_fallbacks(self) -> Any:
        """
        With no script, or a failing one, the fallback decides: a refusal,
        DIRECT, or a proxy group.
        """
        policy = yield self.policy("")
        decision = yield policy.decide(self.request())
        self.assertIn("no PAC script is loaded", decision.refuse)
        policy.fallback = "direct"
        decision = yield policy.decide(self.request())
        self.assertEqual(list(decision.proxies), [self.direct])
        policy = yield self.policy("function FindProxyForURL(u, h) { throw 1; }", fallback="default")
        decision = yield policy.decide(self.request())
        self.assertEqual(list(decision.proxies), [self.configured])
        self.assertIn("PAC fallback group default", decision.label)


    @inlineCallbacks
    def test_decideAtSynCached(self) -> Any:
        """
        At the SYN, with no name read, the PAC answers only from its cache:
        nothing is evaluated for an answer not cached (no answer); once the
        tunnel's question has cached it, the same decision as C{decide}'s.
        """
        policy = yield self.policy("function FindProxyForURL(u, h) { return 'DIRECT'; }")
        self.assertEqual(policy.decideAtSyn(self.request(), False), (False, None))
        self.assertEqual(len(policy.evaluator.cache), 0)
        decided = yield policy.decide(self.request())
        known, atSyn = policy.decideAtSyn(self.request(), False)
        self.assertTrue(known)
        self.assertEqual((list(atSyn.proxies), atSyn.label), ([self.direct], "PAC: DIRECT"))
        self.assertEqual(atSyn, decided)

    @inlineCallbacks
    def test_decideAtSynNameRead(self) -> Any:
        """
        When the tunnel reads a name, the PAC is asked with it: no answer at
        the SYN, cached or not; a rule by address before any rule by name
        answers, one after a rule by name does not.
        """
        from shifter.service.config import Rule

        byAddress = Rule(line=3, destinations=(ipaddress.ip_network("198.51.100.0/24"),), direct=True)
        byName = Rule(line=5, names=("example.test",), refuse="no")
        policy = yield self.policy("function FindProxyForURL(u, h) { return 'DIRECT'; }", rules=[byAddress, byName])
        yield policy.decide(self.request())
        self.assertEqual(policy.decideAtSyn(self.request(), True), (False, None))
        known, decision = policy.decideAtSyn(self.request("198.51.100.9"), True)
        self.assertEqual((known, list(decision.proxies), decision.label), (True, [self.direct], "rule at line 3"))
        policy = yield self.policy("", rules=[byName, byAddress])
        self.assertEqual(policy.decideAtSyn(self.request("198.51.100.9"), True), (False, None))
        known, decision = policy.decideAtSyn(self.request("198.51.100.9"), False)
        self.assertEqual((known, decision.label), (True, "rule at line 3"))


class WpadTests(SynchronousTestCase):
    """
    WPAD's DNS devolution: the search domain and its parents, down to the
    registrable domain and never above it.
    """

    def suffixes(self) -> Any:
        from shifter.pac.wpad import PublicSuffixes

        return PublicSuffixes(["// a comment", "com", "uk", "co.uk", "*.ck", "!www.ck", ""])

    def test_devolution(self) -> None:
        """
        From the search domain down to the registrable domain, in order.
        """
        from shifter.pac.wpad import candidates

        self.assertEqual(candidates("a.b.corp.example.com", self.suffixes()), [
            "http://wpad.a.b.corp.example.com/wpad.dat", "http://wpad.b.corp.example.com/wpad.dat",
            "http://wpad.corp.example.com/wpad.dat", "http://wpad.example.com/wpad.dat",
        ])
        self.assertEqual(candidates("corp.example.co.uk", self.suffixes()), [
            "http://wpad.corp.example.co.uk/wpad.dat", "http://wpad.example.co.uk/wpad.dat",
        ])

    def test_neverAboveRegistrable(self) -> None:
        """
        No candidate is ever wpad.<public suffix>: not wpad.com, wpad.co.uk,
        wpad.b.ck (a wildcard suffix), nor wpad.test for an unlisted top
        level; a public suffix as the search domain gives none.
        """
        from shifter.pac.wpad import candidates

        suffixes = self.suffixes()
        for domain, lowest in [("example.com", "wpad.example.com"), ("example.co.uk", "wpad.example.co.uk"),
                               ("a.b.ck", "wpad.a.b.ck"), ("x.www.ck", "wpad.www.ck"),
                               ("a.b.example.test", "wpad.example.test")]:
            self.assertEqual(candidates(domain, suffixes)[-1], f"http://{lowest}/wpad.dat", domain)
        for domain in ("com", "co.uk", "b.ck", "test"):
            self.assertEqual(candidates(domain, suffixes), [], domain)

    def test_realList(self) -> None:
        """
        With the system's Public Suffix List, the same holds.
        """
        import os

        from shifter.pac.wpad import PUBLIC_SUFFIX_LIST, PublicSuffixes, candidates

        if not os.path.exists(PUBLIC_SUFFIX_LIST):
            self.skipTest(f"no {PUBLIC_SUFFIX_LIST} (Debian's publicsuffix package)")
        suffixes = PublicSuffixes.load()
        self.assertEqual(candidates("corp.example.co.uk", suffixes)[-1], "http://wpad.example.co.uk/wpad.dat")
        self.assertEqual(candidates("co.uk", suffixes), [])

    def test_searchDomain(self) -> None:
        """
        The search domain is the first of the last search or domain line.
        """
        from shifter.pac.wpad import searchDomain

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 192.0.2.53\ndomain old.example\nsearch corp.example.com other.example\n")
        self.assertEqual(searchDomain(path), "corp.example.com")
        self.assertIsNone(searchDomain(self.mktemp()))


class QuestionTests(SynchronousTestCase):
    """
    The URL and host C{FindProxyForURL} is asked.
    """

    def test_urls(self) -> None:
        from shifter.service.pacpolicy import pacQuestion

        self.assertEqual(pacQuestion("www.example", "203.0.113.7", 443, "https"), ("https://www.example/", "www.example"))
        self.assertEqual(pacQuestion("www.example", "203.0.113.7", 8443, "https"),
                         ("https://www.example:8443/", "www.example"))
        self.assertEqual(pacQuestion("www.example", "203.0.113.7", 80, "http", "/a/b?c=d"),
                         ("http://www.example/a/b?c=d", "www.example"))
        self.assertEqual(pacQuestion(None, "203.0.113.7", 80), ("http://203.0.113.7/", "203.0.113.7"))
        self.assertEqual(pacQuestion(None, "2001:db8::7", 443), ("https://[2001:db8::7]/", "2001:db8::7"))

    def test_pathFromHostSniffer(self) -> None:
        """
        The Host sniffer keeps a plain request's path; not an absolute
        target, nor one past the limit.
        """
        from shifter.tunnel.sniff import MAX_PATH, sniffHost

        request = b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example\r\n\r\n"
        self.assertEqual(sniffHost(request).path, "/a/b?c=d")  # type: ignore[union-attr]
        absolute = b"GET http://x/ HTTP/1.1\r\nHost: www.example\r\n\r\n"
        self.assertIsNone(sniffHost(absolute).path)  # type: ignore[union-attr]
        long = b"GET /" + b"a" * MAX_PATH + b" HTTP/1.1\r\nHost: www.example\r\n\r\n"
        self.assertIsNone(sniffHost(long).path)  # type: ignore[union-attr]


class OrphanTests(SynchronousTestCase):
    def test_diesWithParent(self) -> None:
        """
        A helper looping in a script is killed when the process that
        started it is killed outright (it never reads the end of its
        input).
        """
        import os
        import signal
        import subprocess
        import sys
        import time
        from pathlib import Path

        project = str(Path(__file__).resolve().parent.parent)
        parent = subprocess.Popen(
            [sys.executable, "-c", _ORPHAN_PARENT], stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=project),
        )
        try:
            line = parent.stdout.readline()  # type: ignore[union-attr]
            child = int(line)
        finally:
            parent.kill()
            parent.wait(10)
        for _ in range(200):
            try:
                with open(f"/proc/{child}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break  # dead, waiting for init to reap it
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            self.fail("the helper outlived the process that started it")


# A process that starts a PAC helper, has it loop in a script, prints the
# helper's process id, and waits to be killed.
_ORPHAN_PARENT = """\
import json, struct, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "shifter.pac.child", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
body = json.dumps({"op": "load", "script": "while (true) {}"}).encode()
child.stdin.write(struct.pack(">I", len(body)) + body)
child.stdin.flush()
time.sleep(0.5)
print(child.pid, flush=True)
time.sleep(60)
"""


DHCLIENT_LEASES = """\
lease {
  interface "eth0";
  fixed-address 192.0.2.51;
  option subnet-mask 255.255.255.0;
  option wpad "http://old.example.test/proxy.pac";
  renew 1 2026/12/07 14:00:00;
}
lease {
  interface "eth0";
  fixed-address 192.0.2.51;
  option subnet-mask 255.255.255.0;
  option wpad "http://wpad.example.test/proxy.pac";
  renew 1 2026/12/07 15:00:00;
}
"""


class DhcpWpadTests(SynchronousTestCase):
    """
    WPAD from the gateway's DHCP lease (option 252), before DNS.
    """

    def test_dhclient(self) -> None:
        """
        dhclient's leases: the last lease's option, named (quoted) or
        unknown-252 (quoted or hex); a last lease without it gives none.
        """
        from shifter.pac.wpad import leaseWpadURL

        self.assertEqual(leaseWpadURL(DHCLIENT_LEASES), "http://wpad.example.test/proxy.pac")
        hexURL = ":".join(f"{b:02x}" for b in b"http://hex.example.test/wpad.dat\x00")
        self.assertEqual(leaseWpadURL(f"lease {{\n  option unknown-252 {hexURL};\n}}\n"),
                         "http://hex.example.test/wpad.dat")
        self.assertEqual(leaseWpadURL('lease {\n  option unknown-252 "https://q.example.test/p.pac";\n}\n'),
                         "https://q.example.test/p.pac")
        self.assertIsNone(leaseWpadURL(DHCLIENT_LEASES + "lease {\n  fixed-address 192.0.2.52;\n}\n"))

    def test_networkd(self) -> None:
        """
        systemd-networkd's lease: OPTION_252 in hex.
        """
        from shifter.pac.wpad import leaseWpadURL

        text = "ADDRESS=192.0.2.51\nOPTION_252=" + b"http://nd.example.test/wpad.dat".hex() + "\n"
        self.assertEqual(leaseWpadURL(text), "http://nd.example.test/wpad.dat")

    def test_refused(self) -> None:
        """
        What is not an http(s) URL of printable characters, within 2048
        bytes, is not taken.
        """
        from shifter.pac.wpad import leaseWpadURL

        for value in ('"file:///etc/shadow"', '"http://a b/"', '"javascript:1"', '"http://x/\\012"',
                      '"http://' + "a" * 2050 + '/"', "zz:zz"):
            self.assertIsNone(leaseWpadURL(f"lease {{\n  option wpad {value};\n}}\n"), value)

    def test_newestLeaseFirst(self) -> None:
        """
        Of several lease files, the newest with a URL gives it; then
        wpadCandidates takes it before the search domain.
        """
        from shifter.pac.wpad import dhcpWpadURL, wpadCandidates

        directory = Path(self.mktemp())
        directory.mkdir()
        old, new, none = directory / "old.leases", directory / "new.leases", directory / "none.leases"
        old.write_text('lease {\n  option wpad "http://old.example.test/a.pac";\n}\n')
        new.write_text('lease {\n  option wpad "http://new.example.test/b.pac";\n}\n')
        none.write_text("lease {\n  fixed-address 192.0.2.9;\n}\n")
        os.utime(old, (1000, 1000))
        os.utime(new, (2000, 2000))
        os.utime(none, (3000, 3000))
        pattern = str(directory / "*.leases")
        self.assertEqual(dhcpWpadURL([pattern]), ("http://new.example.test/b.pac", str(new)))
        resolv = directory / "resolv.conf"
        resolv.write_text("search a.example.com\n")
        self.assertEqual(wpadCandidates(str(resolv), leases=[pattern]),
                         (f"DHCP option 252 in {new}", ["http://new.example.test/b.pac"]))
        origin, urls = wpadCandidates(str(resolv), leases=[str(directory / "nothing-*")])
        self.assertEqual(origin, "search domain a.example.com, looked for down to http://wpad.example.com/wpad.dat")
        self.assertEqual(urls[0], "http://wpad.a.example.com/wpad.dat")
