"""
NTLM to the upstream proxy, in memory: the body of a refusal read past on
a kept-alive connection (L{shifter.upstream.connect.BodySkipper}), the
exchange's messages checked by pyspnego's own NTLM acceptor, and whole
tunnels through L{shifter.upstream.upstream} with Twisted's test doubles.
The same with real sockets, Squid and a test proxy is in
C{tests/test_ntlm_e2e.py}.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shifter.interfaces import ConnectResponse
from shifter.upstream.auth import Credentials, ProxyAuth
from shifter.upstream.connect import (
    MAX_REFUSAL_BODY_BYTES,
    BodySkipper,
    ConnectResponseParser,
    ProxyResponseError,
    reuseRefusal,
)
from shifter.upstream.proxy import readCredentials

from tests.support import knowLocalAddresses, ntlmUsers
from tests.test_tunnel import PROXY, TunnelTestCase

CHALLENGE_407 = b"HTTP/1.1 407 Proxy Authentication Required\r\n"
_AUTHORIZATION = re.compile(rb"Proxy-Authorization: NTLM ([A-Za-z0-9+/=]+)\r\n")


def response(*headers: tuple[bytes, bytes], version: str = "1.1") -> ConnectResponse:
    return ConnectResponse(407, "Proxy Authentication Required", list(headers), b"", version)


class ReuseTests(SynchronousTestCase):
    def test_keptAliveWithLength(self) -> None:
        """
        An HTTP/1.1 answer with a Content-Length or a chunked body leaves
        the connection usable; HTTP/1.0 needs keep-alive.
        """
        self.assertIsNone(reuseRefusal(response((b"Content-Length", b"12"))))
        self.assertIsNone(reuseRefusal(response((b"Transfer-Encoding", b"chunked"))))
        self.assertIsNone(
            reuseRefusal(response((b"Content-Length", b"0"), (b"Connection", b"keep-alive"), version="1.0"))
        )
        self.assertIsNone(
            reuseRefusal(response((b"Content-Length", b"0"), (b"Proxy-Connection", b"Keep-Alive"), version="1.0"))
        )

    def test_refusals(self) -> None:
        """
        A connection the proxy closes, or whose answer's end cannot be found
        within the bound, cannot carry the next request; the reason says
        which.
        """
        cases = [
            (response((b"Content-Length", b"0"), (b"Connection", b"close")), "Connection: close"),
            (response((b"Content-Length", b"0"), (b"Proxy-Connection", b"close")), "Connection: close"),
            (response((b"Content-Length", b"0"), version="1.0"), "HTTP/1.0 without keep-alive"),
            (response(), "no Content-Length"),
            (response((b"Content-Length", b"1"), (b"Content-Length", b"2")), "not one number"),
            (response((b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")), "both"),
            (response((b"Transfer-Encoding", b"gzip")), "ends only when the connection closes"),
            (response((b"Content-Length", str(MAX_REFUSAL_BODY_BYTES + 1).encode())), "exceeds"),
        ]
        for answer, fragment in cases:
            self.assertIn(fragment, reuseRefusal(answer) or "", answer)


class BodySkipperTests(SynchronousTestCase):
    def feedBytewise(self, skipper: BodySkipper, data: bytes) -> tuple[int, bytes | None]:
        """
        Feed C{data} one byte at a time; return how many bytes were fed
        when the body ended, and what followed it.
        """
        for n in range(len(data)):
            after = skipper.feed(data[n:n + 1])
            if after is not None:
                return n + 1, after
        return len(data), None

    def test_contentLength(self) -> None:
        """
        The body ends after Content-Length bytes, however they arrive.
        """
        skipper = BodySkipper(response((b"Content-Length", b"5")))
        self.assertIsNone(skipper.feed(b"ab"))
        self.assertEqual(skipper.feed(b"cde"), b"")

    def test_chunked(self) -> None:
        """
        A chunked body, with a chunk extension and a trailer, ends after its
        last chunk and trailer, fed a byte at a time.
        """
        body = b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
        used, after = self.feedBytewise(BodySkipper(response((b"Transfer-Encoding", b"chunked"))), body)
        self.assertEqual((used, after), (len(body), b""))

    def test_chunkedBounded(self) -> None:
        """
        A chunked body longer than the bound, or a chunk-size line that
        never ends, is refused instead of read on.
        """
        skipper = BodySkipper(response((b"Transfer-Encoding", b"chunked")), maxBytes=100)
        with self.assertRaises(ProxyResponseError) as caught:
            for _ in range(10):
                skipper.feed(b"10\r\n" + b"x" * 16 + b"\r\n")
        self.assertIn("exceeds 100 bytes", str(caught.exception))
        skipper = BodySkipper(response((b"Transfer-Encoding", b"chunked")), maxBytes=100)
        with self.assertRaises(ProxyResponseError):
            skipper.feed(b"1" * 101)

    def test_malformedChunks(self) -> None:
        """
        A chunk size that is not hexadecimal, or a chunk not followed by
        CRLF, is refused.
        """
        for body in (b"zz\r\n", b"2\r\nabXY"):
            skipper = BodySkipper(response((b"Transfer-Encoding", b"chunked")))
            with self.assertRaises(ProxyResponseError):
                skipper.feed(body + b"\r\n")

    def test_versionRead(self) -> None:
        """
        The parser keeps the status line's HTTP version.
        """
        answer = ConnectResponseParser().feed(b"HTTP/1.0 407 Auth\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((answer.status, answer.reason, answer.version), (407, "Auth", "1.0"))


class Acceptor:
    """
    pyspnego's NTLM acceptor as a proxy uses it: one per connection, the
    challenge for the negotiate message, then the check of the
    authenticate message's NTLMv2 response against a user file.
    """

    def __init__(self, directory: Path, *users: str) -> None:
        self.directory = directory
        self.users = users or ("CORP:alice:s3cret",)
        self.context: Any = None

    def challenge(self, request: bytes) -> bytes:
        import spnego

        with ntlmUsers(self.directory, *self.users):
            self.context = spnego.server(protocol="ntlm")
            token = self.context.step(base64.b64decode(_token(request)))
        return base64.b64encode(token)

    def check(self, request: bytes) -> str | None:
        """
        The user the authenticate message in C{request} proves, or C{None}
        if its response is wrong.
        """
        from spnego.exceptions import SpnegoError

        with ntlmUsers(self.directory, *self.users):
            try:
                self.context.step(base64.b64decode(_token(request)))
            except SpnegoError:
                return None
        return str(self.context.client_principal)


def _token(request: bytes) -> bytes:
    match = _AUTHORIZATION.search(request)
    assert match is not None, request
    return match.group(1)


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()

    def test_ntlmChosenOverDigestAndBasic(self) -> None:
        """
        Of NTLM, Digest and Basic, NTLM is answered; from then on a
        tunnel's first CONNECT carries a negotiate message, and Basic is
        never sent to that proxy.
        """
        auth = ProxyAuth(Credentials("CORP\\alice", "s3cret"))
        exchange = auth.exchange()
        self.assertEqual(exchange.headersFor("CONNECT", "a.test:443"), [])
        offered = [b'Basic realm="p"', b'Digest realm="p", nonce="n", qop="auth"', b"NTLM"]
        self.assertIsNone(exchange.challenged(offered))
        self.assertFalse(exchange.sameConnection)
        [(name, value)] = exchange.headersFor("CONNECT", "a.test:443")
        self.assertTrue(value.startswith("NTLM "), value)
        self.assertEqual(auth.scheme, "ntlm")
        other = auth.exchange()
        other.headersFor("CONNECT", "a.test:443")
        self.assertEqual(
            other.challenged([b'Basic realm="p"']),
            "proxy refused the NTLM negotiate message (its 407 holds no NTLM challenge)",
        )

    def test_basicNeverAfterNtlm(self) -> None:
        """
        A 407 offering only Basic, to a proxy that asked for NTLM, is not
        answered.
        """
        auth = ProxyAuth(Credentials("CORP\\alice", "s3cret"), preemptiveBasic=True)
        auth.ntlm = True
        exchange = auth.exchange()
        exchange._sent = None  # a tunnel whose CONNECT carried nothing
        self.assertEqual(
            exchange.challenged([b'Basic realm="p"']),
            "proxy asks for Basic after NTLM; not sending the password in clear",
        )

    def ntlmRound(self, password: str) -> tuple[Any, str | None]:
        auth = ProxyAuth(Credentials("CORP\\alice", password))
        auth.ntlm = True
        exchange = auth.exchange()
        acceptor = Acceptor(self.directory)
        [(_, negotiate)] = exchange.headersFor("CONNECT", "a.test:443")
        challenge = acceptor.challenge(f"Proxy-Authorization: {negotiate}\r\n".encode())
        self.assertIsNone(exchange.challenged([b"NTLM " + challenge]))
        self.assertTrue(exchange.sameConnection)
        [(_, authenticate)] = exchange.headersFor("CONNECT", "a.test:443")
        return exchange, acceptor.check(f"Proxy-Authorization: {authenticate}\r\n".encode())

    def test_ntlmv2Verified(self) -> None:
        """
        The authenticate message answers the challenge with an NTLMv2
        response that the acceptor verifies for the configured user.
        """
        _, user = self.ntlmRound("s3cret")
        self.assertEqual(user, "CORP\\alice")

    def test_wrongPasswordRefused(self) -> None:
        """
        With a wrong password the acceptor refuses the response, and the
        proxy's 407 to the authenticate message ends the exchange with the
        scheme named.
        """
        exchange, user = self.ntlmRound("wrong")
        self.assertIsNone(user)
        self.assertEqual(exchange.challenged([b"NTLM"]), "proxy refused the credentials (NTLM)")

    def test_badChallenge(self) -> None:
        """
        A challenge that is not base64, or not an NTLM challenge, is one
        reason, not an exception.
        """
        for token in (b"abc-_", base64.b64encode(b"garbage")):
            auth = ProxyAuth(Credentials("CORP\\alice", "s3cret"))
            auth.ntlm = True
            exchange = auth.exchange()
            exchange.headersFor("CONNECT", "a.test:443")
            reason = exchange.challenged([b"NTLM " + token])
            self.assertTrue(reason is not None and reason.startswith("NTLM: the proxy's NTLM challenge"), reason)
            self.assertFalse(exchange.sameConnection)


class CredentialsFileTests(SynchronousTestCase):
    def test_domainUser(self) -> None:
        """
        A credentials file may hold DOMAIN\\user:password.
        """
        path = Path(self.mktemp())
        path.write_text("CORP\\alice:pass:word\n")
        credentials = readCredentials(str(path))
        self.assertEqual((credentials.username, credentials.password), ("CORP\\alice", "pass:word"))

    def test_systemdCredential(self) -> None:
        """
        A bare name is read from $CREDENTIALS_DIRECTORY when it is set (a
        systemd LoadCredential=); a path is read as it is.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "proxy").write_text("CORP\\bob:secret\n")
        environ = {"CREDENTIALS_DIRECTORY": str(directory)}
        self.assertEqual(readCredentials("proxy", environ).username, "CORP\\bob")
        with self.assertRaises(ValueError):
            readCredentials("proxy", {})
        elsewhere = Path(self.mktemp())
        elsewhere.write_text("carol:x\n")
        self.assertEqual(readCredentials(str(elsewhere), environ).username, "carol")


class NTLMTunnelTests(TunnelTestCase):
    """
    Whole tunnels to a proxy that asks for NTLM, in memory, with the real
    upstream protocol and pyspnego's acceptor as the proxy's check.
    """

    password = "s3cret"
    passClient = "none"

    def makeFactory(self):  # type: ignore[no-untyped-def]
        from shifter.tunnel.downstream import ShifterFactory
        from shifter.upstream.pool import ProxyPool
        from shifter.upstream.proxy import UpstreamProxy

        self.auth = ProxyAuth(Credentials("CORP\\alice", self.password))
        proxy = UpstreamProxy("proxy.test:3128", self.endpoint, PROXY, self.auth, passClient=self.passClient)
        self.pool = ProxyPool([proxy], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        return self.factory

    def challengeOn(
        self, upstream: Any, transport: Any, body: bytes = b"", extra: bytes = b"", length: int | None = None
    ) -> Acceptor:
        """
        Answer the negotiate message just sent on C{transport} with a 407
        holding the challenge, and C{body} (the start of one of C{length}
        bytes, if given).
        """
        acceptor = Acceptor(self.directory)
        challenge = acceptor.challenge(transport.value())
        transport.clear()
        upstream.dataReceived(
            CHALLENGE_407 + b"Proxy-Authenticate: NTLM " + challenge + b"\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body
        )
        return acceptor

    def firstTunnel(self) -> tuple[Any, Any, Any]:
        """
        A client whose tunnel has sent NTLM's negotiate message: the
        proxy's first 407 offered NTLM and Basic.

        @return: the client's transport, and the upstream protocol and
            transport carrying the negotiate message.
        """
        _, clientTransport = self.connectClient()
        upstream, transport = self.endpoint.accept()
        self.assertNotIn(b"Proxy-Authorization", transport.value())
        upstream.dataReceived(
            CHALLENGE_407 + b"Proxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=\"p\"\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        upstream, transport = self.endpoint.accept()
        self.assertIn(b"Proxy-Authorization: NTLM ", transport.value())
        return clientTransport, upstream, transport

    def test_authenticateOnTheSameConnection(self) -> None:
        """
        The authenticate message goes on the connection that carried the
        challenge, only once the 407's body (by its Content-Length) has all
        arrived; the proxy's 200 to it opens the tunnel; the next tunnel
        sends the negotiate message with its first CONNECT.
        """
        clientTransport, upstream, transport = self.firstTunnel()
        body = b"<html>" + b"x" * 3000 + b"</html>"
        acceptor = self.challengeOn(upstream, transport, body[:100], length=len(body))
        self.assertEqual(transport.value(), b"")  # the body is not over yet
        upstream.dataReceived(body[100:])
        request = transport.value()
        self.assertTrue(request.startswith(b"CONNECT 203.0.113.7:443 HTTP/1.1\r\n"), request)
        self.assertEqual(acceptor.check(request), "CORP\\alice")
        self.assertEqual(self.endpoint.attempts, [])  # no new connection
        upstream.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(self.factory.counters["opened"], 1)
        self.assertFalse(clientTransport.disconnecting)
        self.connectClient()
        _, transport = self.endpoint.accept()
        self.assertIn(b"Proxy-Authorization: NTLM ", transport.value())

    def test_wrongPasswordOneLine(self) -> None:
        """
        A proxy that refuses the authenticate message ends the client's
        connection with one line naming NTLM, counted under proxy-auth,
        and no other attempt.
        """
        self.password = "wrong"
        clientTransport, upstream, transport = self.firstTunnel()
        acceptor = self.challengeOn(upstream, transport)
        self.assertIsNone(acceptor.check(transport.value()))
        upstream.dataReceived(CHALLENGE_407 + b"Proxy-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        [line] = self.failureLines()
        self.assertIn("proxy answered 407: proxy refused the credentials (NTLM)", line)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)
        self.assertNotIn("wrong", " ".join(self.messages()))

    def test_connectionCloseAfterChallenge(self) -> None:
        """
        A challenge whose 407 says Connection: close cannot be answered:
        one line says so, and nothing is sent.
        """
        clientTransport, upstream, transport = self.firstTunnel()
        self.challengeOn(upstream, transport, extra=b"Connection: close\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn("NTLM challenge, but it says Connection: close: NTLM needs that connection kept open", line)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)

    def test_closedAfterChallenge(self) -> None:
        """
        A proxy that closes the connection while the 407's body is still
        being read ends the client's connection with one line naming NTLM.
        """
        clientTransport, upstream, transport = self.firstTunnel()
        acceptor = Acceptor(self.directory)
        challenge = acceptor.challenge(transport.value())
        upstream.dataReceived(
            CHALLENGE_407 + b"Proxy-Authenticate: NTLM " + challenge + b"\r\nContent-Length: 100\r\n\r\nabc"
        )
        upstream.readConnectionLost()
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn("proxy closed the connection after its NTLM challenge", line)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)

    def test_endlessBodyBounded(self) -> None:
        """
        A chunked 407 body longer than the bound ends the client's
        connection with one line, instead of being read for ever.
        """
        clientTransport, upstream, transport = self.firstTunnel()
        acceptor = Acceptor(self.directory)
        challenge = acceptor.challenge(transport.value())
        upstream.dataReceived(
            CHALLENGE_407 + b"Proxy-Authenticate: NTLM " + challenge + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
        for _ in range(MAX_REFUSAL_BODY_BYTES // len(chunk) + 2):
            if clientTransport.disconnecting:
                break
            upstream.dataReceived(chunk)
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn(f"NTLM authentication with the proxy failed: the answer's body exceeds {MAX_REFUSAL_BODY_BYTES}", line)


class NTLMWithProxyProtocolTests(NTLMTunnelTests):
    """
    The same, to a proxy told about each client with the PROXY protocol.
    """

    passClient = "proxy-v1"

    def test_proxyHeaderOnce(self) -> None:
        """
        The PROXY header opens the connection and is not sent again with
        the authenticate message on it.
        """
        _, upstream, transport = self.firstTunnel()
        self.assertTrue(transport.value().startswith(b"PROXY TCP4 192.0.2.2 203.0.113.7 50000 443\r\n"))
        self.challengeOn(upstream, transport)
        self.assertTrue(transport.value().startswith(b"CONNECT 203.0.113.7:443 HTTP/1.1\r\n"), transport.value())
