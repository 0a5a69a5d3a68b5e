"""
Encrypted Client Hello governed by a C{[[rule]]}, end to end: Shifter's
factory listening on loopback with real sockets and the real reactor,
scripted CONNECT proxies, and clients made of plain sockets sending
ClientHellos built by the test (with and without the ECH extension).  The
original destination comes from a fixed resolver, as in
L{tests.test_lifecycle}: what is under test is what the rule does with the
hello.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from shifter.service.config import RulePolicy, Rule
from tests.test_lifecycle import LifecycleTestCase, drain
from tests.test_sniff import echHello, echOuter, frame, realHello

ECH_HELLO = frame(echHello(echOuter(), b"cover.example.test"))
PLAIN_HELLO = realHello("plain.example.test")


class ECHRuleTests(LifecycleTestCase):
    @inlineCallbacks
    def startWithRules(self, rules: list[Rule], groups: dict[str, list[int]], proxies: list[str]):  # type: ignore[no-untyped-def]
        """
        Shifter with C{--connect-target sni} and these rules; C{groups}
        names each group's proxies by their index in C{proxies}.
        """
        yield self.startShifter(proxies, connectTarget="sni", sniffTimeout=5.0)
        members = self.pool.proxies
        self.factory.policy = RulePolicy(rules, {group: [members[i] for i in indexes] for group, indexes in groups.items()})

    def send(self, hello: bytes) -> Any:
        client = self.client()
        client.sendall(hello)
        return client

    @inlineCallbacks
    def test_refuse(self):  # type: ignore[no-untyped-def]
        """
        With C{ech = true} and C{refuse}, a client whose hello offers ECH
        sees its connection closed (the end of the stream, a FIN) before
        any byte of a server, no proxy is asked, and the refusal is counted
        and logged with the rule and C{[ech=ech]}.  A hello without ECH
        goes on through the proxy.
        """
        proxyFactory, proxy = yield self.startProxy("echo")
        yield self.startWithRules([Rule(line=7, ech=True, refuse="ECH is not allowed here")], {"default": [0]}, [proxy])
        refused = self.send(ECH_HELLO)
        yield self.waitUntil(lambda: self.factory.counters["policy"] == 1, 10, "the refusal")
        data, how = yield deferLater(reactor, 0.1, drain, refused, 5.0)
        self.assertEqual((data, how), (b"", "eof"))
        self.assertEqual(proxyFactory.connections, 0)
        self.assertEqual(self.factory.stats.ech["ech"], 1)
        [line] = self.lines("failed", "refused by policy: ECH is not allowed here (rule at line 7)")
        self.assertIn("(CONNECT cover.example.test:443, from SNI, the ECH outer name) [ech=ech]", line)

        passed = self.send(PLAIN_HELLO)
        echoed = yield self.receive(passed, len(PLAIN_HELLO))
        self.assertEqual(echoed, PLAIN_HELLO)
        self.assertEqual(proxyFactory.connections, 1)
        self.assertEqual(self.factory.stats.ech, {"ech": 1, "none": 1})

    @inlineCallbacks
    def test_passByDefault(self):  # type: ignore[no-untyped-def]
        """
        Without a rule on ECH, an ECH hello passes: tunnelled, and counted.
        """
        proxyFactory, proxy = yield self.startProxy("echo")
        yield self.startWithRules([], {"default": [0]}, [proxy])
        client = self.send(ECH_HELLO)
        echoed = yield self.receive(client, len(ECH_HELLO))
        self.assertEqual(echoed, ECH_HELLO)
        self.assertEqual(proxyFactory.connections, 1)
        self.assertEqual(self.factory.stats.ech, {"ech": 1})

    @inlineCallbacks
    def test_accessLog(self):  # type: ignore[no-untyped-def]
        """
        The access log's record of a tunnel says what its hello showed of
        ECH, beside the (outer) name; a plain hello's says nothing.
        """
        proxyFactory, proxy = yield self.startProxy("echo")
        yield self.startWithRules([], {"default": [0]}, [proxy])
        records: list[Any] = []
        self.factory.accessLog = type("Recorder", (), {"tunnelEnded": staticmethod(records.append)})()
        for hello in (ECH_HELLO, PLAIN_HELLO):
            client = self.send(hello)
            yield self.receive(client, len(hello))
            client.close()
        yield self.waitUntil(lambda: len(records) == 2, 10, "both tunnels to end")
        self.assertEqual(
            sorted((r.name, r.ech) for r in records),
            [("cover.example.test", "ech"), ("plain.example.test", None)],
        )

    @inlineCallbacks
    def test_proxyGroup(self):  # type: ignore[no-untyped-def]
        """
        With C{ech = true} and a proxy group, ECH hellos go through that
        group's proxy and the others through the default group's.
        """
        defaultFactory, default = yield self.startProxy("echo")
        echFactory, echProxy = yield self.startProxy("echo")
        yield self.startWithRules(
            [Rule(line=3, ech=True, group="ech")], {"default": [0], "ech": [1]}, [default, echProxy]
        )
        ech = self.send(ECH_HELLO)
        echoed = yield self.receive(ech, len(ECH_HELLO))
        self.assertEqual(echoed, ECH_HELLO)
        self.assertEqual((defaultFactory.connections, echFactory.connections), (0, 1))
        plain = self.send(PLAIN_HELLO)
        echoed = yield self.receive(plain, len(PLAIN_HELLO))
        self.assertEqual(echoed, PLAIN_HELLO)
        self.assertEqual((defaultFactory.connections, echFactory.connections), (1, 1))
        [tunnel] = [t for t in self.factory.tunnels() if t.ech]
        self.assertEqual((tunnel.ech, tunnel.proxy), ("ech", echProxy.removeprefix("http://")))
