"""
Negotiate to the upstream proxy: the choice of scheme, the per-tunnel
exchange, and the ticket keeper that runs the ticket helper as a child
process (with the real reactor: the reactor must keep serving while the
helper waits on a KDC).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.upstream.auth import Challenge, Credentials, ProxyAuth, strongestChallenge
from shifter.upstream.kerberos import FETCHING, IDLE, NegotiateError, TicketKeeper
from shifter.upstream.proxy import parseProxy
from shifter.service.tap import Options

from tests.support import knowLocalAddresses
from tests.test_tunnel import PROXY, TunnelTestCase


class FakeKeeper:
    who = "host/gw.example.test@EXAMPLE.TEST"


class FakeLogin:
    """
    A Negotiate login that makes numbered tokens, or fails with C{error}.
    """

    def __init__(self) -> None:
        self.keeper = FakeKeeper()
        self.made = 0
        self.error: str | None = None

    def authorization(self) -> str:
        if self.error is not None:
            raise NegotiateError(self.error)
        self.made += 1
        return f"Negotiate token{self.made}"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def authorization(exchange: Any) -> str | None:
    headers = exchange.headersFor("CONNECT", "a.test:443")
    return headers[0][1] if headers else None


class SchemeChoiceTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        Of what is offered and can be answered: Negotiate, then NTLM, then
        Digest, then Basic.
        """
        basic = Challenge("basic", {"realm": "r"})
        digest = Challenge("digest", {"realm": "r", "nonce": "n"})
        ntlm = Challenge("ntlm")
        negotiate = Challenge("negotiate")
        offered = [basic, digest, ntlm, negotiate]
        everything = {"basic", "digest", "ntlm", "negotiate"}
        self.assertIs(strongestChallenge(offered, everything), negotiate)
        self.assertIs(strongestChallenge(offered, everything - {"negotiate"}), ntlm)
        self.assertIs(strongestChallenge(offered, {"basic", "digest"}), digest)
        self.assertIs(strongestChallenge([basic, negotiate], {"basic"}), basic)
        self.assertIsNone(strongestChallenge([negotiate], {"basic", "digest"}))

    def test_neverBasicWhereNegotiateOffered(self) -> None:
        """
        A proxy that offers Negotiate and Basic, to a gateway with a
        password and no keytab, is not sent the password: one line says
        why, and no later CONNECT carries Basic either.
        """
        auth = ProxyAuth(Credentials("user", "pass"))
        exchange = auth.exchange()
        self.assertIsNone(authorization(exchange))
        reason = exchange.challenged([b"Negotiate", b'Basic realm="squid"'])
        self.assertEqual(
            reason,
            "proxy offers basic, negotiate: Basic is never sent to a proxy that offers Negotiate or NTLM; "
            "Negotiate needs the gateway's keytab (--proxy-keytab) and the proxy's host name",
        )
        self.assertIsNone(authorization(auth.exchange()))

    def test_neverBasicAfterNTLMOffered(self) -> None:
        """
        A proxy that offers NTLM beside Basic, even with Basic sent up front
        before it said so, is answered with NTLM, and no tunnel sends it
        Basic again.
        """
        auth = ProxyAuth(Credentials("CORP\\user", "pass"), preemptiveBasic=True)
        exchange = auth.exchange()
        self.assertTrue(authorization(exchange).startswith("Basic "))  # type: ignore[union-attr]
        self.assertIsNone(exchange.challenged([b"NTLM", b'Basic realm="squid"']))
        self.assertTrue(authorization(exchange).startswith("NTLM "))  # type: ignore[union-attr]
        self.assertTrue(authorization(auth.exchange()).startswith("NTLM "))  # type: ignore[union-attr]
        self.assertEqual(auth.scheme, "ntlm")
        self.assertTrue(auth.noBasic)


class NegotiateExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = FakeLogin()
        self.auth = ProxyAuth(Credentials("user", "pass"), negotiate=self.login)  # type: ignore[arg-type]

    def test_answersNegotiate(self) -> None:
        """
        A 407 offering Negotiate, Digest and Basic is answered with a
        Negotiate token; the tunnels that follow send a token of their own
        with their first CONNECT.
        """
        exchange = self.auth.exchange()
        self.assertIsNone(authorization(exchange))
        self.assertIsNone(exchange.challenged([b'Basic realm="r"', b'Digest realm="r", nonce="n"', b"Negotiate"]))
        self.assertEqual(authorization(exchange), "Negotiate token1")
        exchange.succeeded()
        self.assertEqual(self.auth.scheme, "negotiate")
        self.assertEqual(authorization(self.auth.exchange()), "Negotiate token2")
        self.assertEqual(authorization(self.auth.exchange()), "Negotiate token3")

    def test_refusedOnce(self) -> None:
        """
        A 407 to a Negotiate token ends the tunnel with one line: no second
        attempt.
        """
        exchange = self.auth.exchange()
        authorization(exchange)
        self.assertIsNone(exchange.challenged([b"Negotiate"]))
        authorization(exchange)
        self.assertEqual(
            exchange.challenged([b"Negotiate"]),
            "Negotiate: proxy refused the Kerberos login of host/gw.example.test@EXAMPLE.TEST",
        )

    def test_noTicket(self) -> None:
        """
        When no token can be made (no valid ticket cached), the 407 ends
        the tunnel with the reason; a tunnel that finds the proxy known to
        want Negotiate sends nothing, and its 407 gives the same line.
        """
        self.login.error = "no Kerberos ticket for HTTP/proxy.example.test (Cannot contact any KDC)"
        exchange = self.auth.exchange()
        authorization(exchange)
        self.assertEqual(
            exchange.challenged([b"Negotiate"]),
            "Negotiate: no Kerberos ticket for HTTP/proxy.example.test (Cannot contact any KDC)",
        )
        later = self.auth.exchange()
        self.assertIsNone(authorization(later))
        self.assertEqual(
            later.challenged([b"Negotiate", b'Basic realm="r"']),
            "Negotiate: no Kerberos ticket for HTTP/proxy.example.test (Cannot contact any KDC)",
        )

    def test_keytabOnly(self) -> None:
        """
        A proxy with a keytab and no password answers Negotiate, and offers
        nothing for Basic or Digest.
        """
        auth = ProxyAuth(None, negotiate=self.login)  # type: ignore[arg-type]
        self.assertEqual(auth.schemes, frozenset({"negotiate"}))
        exchange = auth.exchange()
        self.assertIn("no supported", exchange.challenged([b'Basic realm="r"']) or "")
        exchange = auth.exchange()
        self.assertIsNone(exchange.challenged([b"Negotiate"]))
        self.assertEqual(authorization(exchange), "Negotiate token1")


class ProxyOptionTests(SynchronousTestCase):
    def keytab(self) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\x05\x02")
        return path

    def test_serviceFromHostName(self) -> None:
        """
        A proxy named by host name is answered as C{HTTP/<host name>},
        with the keytab and principal given.
        """
        keytab = self.keytab()
        proxy = parseProxy(
            "http://Proxy.Example.Test:3128", MemoryReactorClock(), keytab=keytab, principal="host/gw"
        )
        keeper = proxy.auth.negotiateLogin.keeper  # type: ignore[union-attr]
        self.assertEqual((keeper.keytab, keeper.principal, keeper.service),
                         (keytab, "host/gw", "HTTP/proxy.example.test"))
        self.assertEqual(proxy.auth.schemes, frozenset({"negotiate"}))  # type: ignore[union-attr]

    def test_namedByAddress(self) -> None:
        """
        A proxy named by address cannot be answered with Kerberos: one
        line says so, and the proxy has no Negotiate login.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proxy = parseProxy("10.0.0.5:3128", MemoryReactorClock(), keytab=self.keytab())
        self.assertIsNone(proxy.auth)
        lines = [e["log_format"].format(**e) for e in events if "log_format" in e]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("proxy 10.0.0.5:3128 is named by address: Kerberos needs its host name", lines[0])

    def test_keytabUnreadable(self) -> None:
        """
        A keytab that cannot be read stops Shifter at start, with the
        reason.
        """
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--proxy", "proxy.example.test:3128", "--proxy-keytab", "/nonexistent/keytab"])
        self.assertIn("--proxy-keytab: cannot read '/nonexistent/keytab': No such file or directory", str(caught.exception))


# A stand-in for the ticket helper: waits for a file to exist (when
# told), then answers as the real one does.
_HELPER = """\
import json, os, sys, time
answer, release = sys.argv[1], sys.argv[2]
while release and not os.path.exists(release):
    time.sleep(0.02)
print(answer)
"""


class TicketKeeperTests(TestCase):
    """
    The keeper with the real reactor and a real child process standing in
    for the helper.
    """

    def keeper(self, answer: dict[str, Any] | str, release: str = "", **settings: Any) -> TicketKeeper:
        text = answer if isinstance(answer, str) else json.dumps(answer)

        def command(keytab: str, principal: str | None, ccache: str, service: str) -> list[str]:
            self.commands.append((keytab, principal, ccache, service))
            return [sys.executable, "-c", _HELPER, text, release]

        self.commands: list[tuple[str, str | None, str, str]] = []
        keeper = TicketKeeper("/etc/gw.keytab", None, "HTTP/proxy.example.test", reactor, command)
        for name, value in settings.items():
            setattr(keeper, name, value)
        self.addCleanup(keeper.stop)
        return keeper

    def ticket(self, lifetime: float = 3600) -> dict[str, Any]:
        return {
            "principal": "host/gw.example.test@EXAMPLE.TEST",
            "target": "HTTP/proxy.example.test@EXAMPLE.TEST",
            "expires": reactor.seconds() + lifetime,
        }

    @inlineCallbacks
    def waitUntil(self, predicate: Any, turns: int = 500) -> Any:
        for _ in range(turns):
            if predicate():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("condition never met")

    @inlineCallbacks
    def test_ticketCached(self) -> None:
        """
        After the helper's answer, the cache and the service principal
        are given for contexts, and the next run is scheduled before the
        tickets expire.
        """
        keeper = self.keeper(self.ticket())
        keeper.start()
        self.assertEqual(keeper.state, FETCHING)
        yield self.waitUntil(lambda: keeper.state == IDLE)
        ccache, target = keeper.credentials()
        self.assertEqual(target, "HTTP/proxy.example.test@EXAMPLE.TEST")
        self.assertEqual(ccache, "FILE:" + keeper.ccache)
        self.assertEqual(os.stat(os.path.dirname(keeper.ccache)).st_mode & 0o077, 0)
        self.assertEqual(self.commands[0][2], keeper.ccache)
        self.assertLess(keeper._timer.getTime(), keeper.ticket.expires - keeper.grace)  # type: ignore[union-attr]

    @inlineCallbacks
    def test_failureGivesReason(self) -> None:
        """
        A helper's error is the reason a context cannot be built, and the
        helper runs again after a pause.
        """
        keeper = self.keeper({"error": "cannot log in: Cannot contact any KDC for realm 'EXAMPLE.TEST'"})
        keeper.start()
        yield self.waitUntil(lambda: keeper.state == IDLE)
        with self.assertRaises(NegotiateError) as caught:
            keeper.credentials()
        self.assertEqual(
            str(caught.exception),
            "no Kerberos ticket for HTTP/proxy.example.test as the first principal of /etc/gw.keytab "
            "(cannot log in: Cannot contact any KDC for realm 'EXAMPLE.TEST')",
        )
        self.assertTrue(keeper._timer.active())  # type: ignore[union-attr]

    @inlineCallbacks
    def test_expiringTicketNotUsed(self) -> None:
        """
        A ticket in its last seconds is not used (the library would go to
        the KDC itself): the context is refused instead.
        """
        keeper = self.keeper(self.ticket(lifetime=5))
        keeper.start()
        yield self.waitUntil(lambda: keeper.ticket is not None)
        self.assertRaises(NegotiateError, keeper.credentials)

    @inlineCallbacks
    def test_reactorServesWhileHelperWaits(self) -> None:
        """
        While the helper waits (on a KDC that answers late), the reactor
        goes on serving: a connection made meanwhile is answered while the
        helper has still not answered, and only then is the helper let go.
        """
        release = self.mktemp()
        keeper = self.keeper(self.ticket(), release=release)
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        keeper.start()
        echoed: Deferred[bytes] = Deferred()
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.setblocking(False)
        client.sendall(b"ping")

        def read() -> None:
            try:
                data = client.recv(4)
            except BlockingIOError:
                reactor.callLater(0.01, read)
                return
            echoed.callback(data)

        read()
        data = yield echoed
        self.assertEqual(data, b"ping")
        self.assertEqual(keeper.state, FETCHING)
        open(release, "w").close()
        yield self.waitUntil(lambda: keeper.state == IDLE)
        self.assertIsNotNone(keeper.ticket)

    @inlineCallbacks
    def test_slowHelperKilled(self) -> None:
        """
        A helper that outlives its time limit is killed, and the reason
        says the KDC did not answer.
        """
        keeper = self.keeper(self.ticket(), release=self.mktemp(), timeLimit=0.5)
        keeper.start()
        process = keeper._process
        yield self.waitUntil(lambda: keeper.lastError is not None)
        self.assertIn("did not answer within 0.5 s", keeper.lastError)  # type: ignore[arg-type]
        self.assertIsNone(keeper._process)
        self.assertIsNotNone(process.status)  # type: ignore[union-attr]

    @inlineCallbacks
    def test_stopKillsHelper(self) -> None:
        """
        Stopping kills a running helper and removes the cache's directory.
        """
        keeper = self.keeper(self.ticket(), release=self.mktemp())
        keeper.start()
        process = keeper._process
        directory = os.path.dirname(keeper.ccache)
        keeper.stop()
        yield self.waitUntil(lambda: process.pid is None)  # type: ignore[union-attr]
        self.assertFalse(os.path.exists(directory))


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class TunnelNegotiateTests(TunnelTestCase):
    """
    A tunnel to a proxy that asks for Negotiate, in memory.
    """

    def makeFactory(self):  # type: ignore[no-untyped-def]
        from shifter.tunnel.downstream import ShifterFactory
        from shifter.upstream.pool import ProxyPool
        from shifter.upstream.proxy import UpstreamProxy

        self.login = FakeLogin()
        self.auth = ProxyAuth(None, negotiate=self.login)  # type: ignore[arg-type]
        proxy = UpstreamProxy("proxy.test:3128", self.endpoint, PROXY, self.auth)
        self.pool = ProxyPool([proxy], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        return self.factory

    def answer(self, status: bytes, *challenges: bytes) -> bytes:
        """
        Accept the pending proxy connection and answer its CONNECT; the
        request it was sent.
        """
        upstream, transport = self.endpoint.accept()
        sent = transport.value()
        headers = b"".join(b"Proxy-Authenticate: " + c + b"\r\n" for c in challenges)
        upstream.dataReceived(b"HTTP/1.1 " + status + b"\r\n" + headers + b"\r\n")
        return sent

    def test_opensWithToken(self) -> None:
        """
        The first CONNECT goes without credentials; the 407 is answered on
        a new connection with a token; the next tunnel sends a new token
        with its first CONNECT.
        """
        self.connectClient()
        first = self.answer(b"407 Proxy Authentication Required", b"Negotiate", b'Basic realm="r"')
        self.assertNotIn(b"Proxy-Authorization", first)
        second = self.answer(b"200 Connection established")
        self.assertIn(b"\r\nProxy-Authorization: Negotiate token1\r\n", second)
        self.connectClient()
        third = self.answer(b"200 Connection established")
        self.assertIn(b"\r\nProxy-Authorization: Negotiate token2\r\n", third)
        self.assertEqual(self.factory.counters["opened"], 2)

    def test_noTicketOneLine(self) -> None:
        """
        With no ticket, the 407 ends the client connection at once with
        one line naming Negotiate and the reason, counted under
        C{proxy-auth}; no second CONNECT is sent.
        """
        _, clientTransport = self.connectClient()
        self.login.error = "no Kerberos ticket for HTTP/proxy.test as host/gw (Cannot contact any KDC)"
        self.answer(b"407 Proxy Authentication Required", b"Negotiate")
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn(
            "proxy answered 407: Negotiate: no Kerberos ticket for HTTP/proxy.test as host/gw "
            "(Cannot contact any KDC)", line,
        )
        self.assertEqual(self.factory.counters["proxy-auth"], 1)

    def test_refusedTokenOneLine(self) -> None:
        """
        A token the proxy refuses ends the tunnel with one line, counted
        under C{proxy-auth}: no retry loop.
        """
        _, clientTransport = self.connectClient()
        self.answer(b"407 Proxy Authentication Required", b"Negotiate")
        self.answer(b"407 Proxy Authentication Required", b"Negotiate")
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn("Negotiate: proxy refused the Kerberos login of host/gw.example.test@EXAMPLE.TEST", line)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)
