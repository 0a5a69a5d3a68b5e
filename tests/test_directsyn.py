"""
Tests for DIRECT at the SYN without C{--hold-syn}
(L{shifter.tunnel.directsyn}): the director driven without sockets, with a
recording queue and the holder tests' owner; then on the nfqueue resolver's
queue over a fake kernel, the verdicts and marks it gives.
(tests/test_holdsyn_e2e.py runs it on a real gateway.)
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from shifter.resolvers.nfqueue import NF_ACCEPT, QUEUE_VERDICT_BATCH
from shifter.service.config import Rule, RulePolicy
from shifter.tunnel.directsyn import SynDirector
from shifter.tunnel.policy import TunnelDecision
from shifter.upstream.proxy import directRoute

from tests.test_holdsyn import DirectQueue, Owner, syn
from tests.test_nfqueue import QueueHarness, ipv4Packet, queuedPacket


class DirectorTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.makeDirector()

    def makeDirector(self, **settings: Any) -> None:
        self.owner = Owner(**settings)
        self.clock = self.owner.reactor
        self.direct = directRoute(self.clock)
        self.director = SynDirector(self.owner)
        self.queue = DirectQueue()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def rules(self, *rules: Rule) -> None:
        self.owner.policy = RulePolicy(list(rules), {"default": self.owner.pool.proxies}, self.direct)

    def answer(self, result: Any) -> list[Any]:
        """
        An embedding program's policy that answers C{result}; the requests
        it was asked.
        """
        asked: list[Any] = []

        class Policy:
            def decide(self, request: Any) -> Any:
                asked.append(request)
                return result

        self.owner.policy = Policy()
        return asked

    def lines(self, fragment: str = "") -> list[str]:
        return [text for text in (formatEvent(e) for e in self.events) if fragment in text]

    def send(self, *packets: Any) -> None:
        for packet in packets:
            self.director.synReceived(self.queue, packet)


DIRECT_NETWORK = Rule(line=2, destinations=(ipaddress.ip_network("203.0.113.0/24"),), direct=True)
BY_NAME = Rule(line=1, names=("example.test",), refuse="not that name")


class DirectorTests(DirectorTestCase):
    def test_directByRule(self) -> None:
        """
        A rule that sends the destination's network DIRECT: the SYN gets the
        direct verdict, one line says so (with what decided), and the
        director counts it; a SYN elsewhere is accepted as usual.
        """
        self.rules(DIRECT_NETWORK)
        self.send(syn(1), syn(2, destination="198.51.100.7"))
        self.assertEqual(self.queue.verdicts, [("direct", 1), ("accept", 2)])
        self.assertEqual(len(self.lines("192.0.2.2:40000 -> 203.0.113.7:443 DIRECT at the SYN "
                                        "(not through Shifter)")), 1)
        self.assertEqual((self.director.counters["seen"], self.director.counters["direct"]), (2, 1))

    def test_accessLogLine(self) -> None:
        """
        A SYN sent DIRECT has its access-log record, as a held one does.
        """
        records: list[Any] = []
        self.owner.accessLog = type("AccessLog", (), {"tunnelEnded": lambda self, record: records.append(record)})()
        self.answer(TunnelDecision(proxies=[self.direct], label="PAC: DIRECT"))
        self.send(syn(1))
        [record] = records
        self.assertEqual(
            (record.client, record.destination, record.proxy, record.result, record.how),
            ("192.0.2.2:40000", "203.0.113.7:443", "DIRECT", "direct",
             "DIRECT at the SYN (not through Shifter) (PAC: DIRECT)"),
        )

    def test_notDirect(self) -> None:
        """
        No policy, a proxy first, or a refusal: the SYN is accepted as
        usual (Shifter refuses the connection itself, after the handshake).
        """
        self.send(syn(1))
        for decision in (TunnelDecision(proxies=[self.owner.pool.proxies[0], self.direct]),
                         TunnelDecision(refuse="no")):
            self.answer(decision)
            self.send(syn(len(self.queue.verdicts) + 1))
        self.assertEqual(self.queue.verdicts, [("accept", 1), ("accept", 2), ("accept", 3)])
        self.assertEqual(self.director.counters["direct"], 0)

    def test_checksFirst(self) -> None:
        """
        A SYN Shifter would refuse (loopback, a client not --allow-ed, the
        tunnels cap) is accepted as usual, whatever the policy says: its
        connection is refused by Shifter, never forwarded.
        """
        self.makeDirector(allowedClients=(ipaddress.ip_network("192.0.2.0/28"),), maxConnections=1)
        self.rules(Rule(line=1, direct=True))
        self.send(syn(1, destination="127.0.0.1"), syn(2, source="192.0.2.200"))
        self.owner.active.add(object())
        self.send(syn(3))
        self.owner.active.clear()
        self.send(syn(4))
        self.assertEqual(self.queue.verdicts, [("accept", 1), ("accept", 2), ("accept", 3), ("direct", 4)])

    def test_pendingAnswer(self) -> None:
        """
        A policy whose answer is not there at once: the SYN is accepted as
        usual (the tunnel asks again), and the wait is cancelled.
        """
        pending: Deferred[Any] = Deferred()
        self.answer(pending)
        self.send(syn(1))
        self.assertEqual(self.queue.verdicts, [("accept", 1)])
        self.assertTrue(pending.called)  # cancelled

    def test_firedAnswer(self) -> None:
        """
        A C{Deferred} that has fired already is an answer at once.
        """
        self.answer(_fired(TunnelDecision(proxies=[self.direct])))
        self.send(syn(1))
        self.assertEqual(self.queue.verdicts, [("direct", 1)])

    def test_nameRead(self) -> None:
        """
        With --connect-target sni, the tunnel asks with the name it reads: a
        rule by name before the DIRECT rule could decide otherwise, so the
        SYN is accepted as usual; with the rule by name after it, the SYN
        goes DIRECT.  A rule on ECH reads the hello too.  A policy that
        cannot say whether a name changes its answer is not asked at the
        SYN.  With --connect-target ip nothing is read: the rules decide as
        the tunnel's question would.
        """
        self.makeDirector(connectTarget="sni")
        self.rules(BY_NAME, DIRECT_NETWORK)
        self.send(syn(1))
        self.rules(DIRECT_NETWORK, BY_NAME)
        self.send(syn(2))
        asked = self.answer(TunnelDecision(proxies=[self.direct]))
        self.send(syn(3))
        self.rules(Rule(line=1, ech=False, refuse="hello read through"), DIRECT_NETWORK)
        self.send(syn(4))
        self.assertEqual(self.queue.verdicts, [("accept", 1), ("direct", 2), ("accept", 3), ("accept", 4)])
        self.assertEqual(asked, [])
        self.makeDirector(connectTarget="ip")
        self.rules(Rule(line=1, ech=False, refuse="hello read through"), DIRECT_NETWORK)
        self.send(syn(5))
        self.assertEqual(self.queue.verdicts, [("accept", 5)])  # no hello is read: the ECH rule matches

    def test_policyError(self) -> None:
        """
        A policy that raises: the SYN is accepted as usual, one line says
        so, and the director counts it.
        """

        class Broken:
            def decide(self, request: Any) -> Any:
                raise RuntimeError("policy broke")

        self.owner.policy = Broken()
        self.send(syn(1))
        self.assertEqual(self.queue.verdicts, [("accept", 1)])
        self.assertEqual(self.director.counters["errors"], 1)
        self.assertEqual(len(self.lines("internal error deciding DIRECT at the SYN; accepted")), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_stopLine(self) -> None:
        """
        At stop, one line gives the counts.
        """
        self.rules(DIRECT_NETWORK)
        self.send(syn(1), syn(2, destination="198.51.100.7"))
        self.director.stop()
        self.assertEqual(self.lines("direct at the SYN: "),
                         ["direct at the SYN: 2 SYNs seen, 1 sent DIRECT at the SYN, 0 errors"])


def _fired(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


class QueueVerdictTests(QueueHarness, SynchronousTestCase):
    """
    The director on the nfqueue resolver's queue: a SYN sent DIRECT gets
    ACCEPT with the direct mark in place of the queue mark, and is not
    recorded; another gets the queue mark and is recorded, as without it.
    """

    def test_verdicts(self) -> None:
        self.owner = Owner()
        self.owner.policy = RulePolicy([DIRECT_NETWORK], {}, directRoute(self.owner.reactor))
        self.resolver.holder = SynDirector(self.owner)
        self.start()
        self.deliver(queuedPacket(1, ipv4Packet("192.0.2.2", "203.0.113.7", 40000, 443), mark=0x4),
                     queuedPacket(2, ipv4Packet("192.0.2.2", "198.51.100.7", 40001, 443), mark=0x4))
        self.reactor.advance(0)
        given = [(h.type, v.get_attr("NFQA_VERDICT_HDR")["id"], v.get_attr("NFQA_VERDICT_HDR")["verdict"],
                  v.get_attr("NFQA_MARK")) for h, v in self.verdicts()]
        self.assertEqual(sorted(given, key=lambda g: g[1]),
                         [(given[0][0], 1, NF_ACCEPT, 0x40004), (given[0][0], 2, NF_ACCEPT, 0x10004)])
        self.assertNotEqual(given[0][0], QUEUE_VERDICT_BATCH)  # two marks: a verdict each
        self.assertEqual(len(self.resolver.table), 1)
        self.failureResultOf(self.resolver.resolve(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2",
                                                                                           40000))))
        self.assertEqual(self.successResultOf(self.resolver.resolve(
            StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 40001)))),
            IPv4Address("TCP", "198.51.100.7", 443))
