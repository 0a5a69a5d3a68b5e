"""
Asking a proxy CONNECT on a connection of Shifter's own, to learn whether
it answers: the pool's health probe (L{shifter.upstream.pool}) and C{doctor}'s
check of each proxy share it.  A SOCKS5 server is asked the same in SOCKS5
(L{Socks5Probe}): any complete answer counts, as any HTTP status does.

The request is the tunnel's (L{shifter.upstream.passclient.probeRequest}: over TLS
for an C{https://} proxy, with its authentication headers and, for the
PROXY protocol, a header saying that no client is relayed), so a proxy
that answers it would answer a tunnel's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from shifter.upstream.connect import (
    BodySkipper,
    ConnectResponse,
    ConnectResponseParser,
    ProxyResponseError,
    formatAuthority,
    reuseRefusal,
)
from shifter.upstream.passclient import probeRequest
from shifter.upstream.proxy import HTTP, SOCKS5
from shifter.upstream.socks5 import Socks5Error, Socks5Handshake
from shifter.upstream.socks5 import formatConnectRequest as socks5Request

# What the health probe asks for unless --probe-target says otherwise.
# The proxy must answer it at once, by itself: no DNS, no connection out,
# nothing towards this gateway.
#   - Port 9 (discard) is in neither of Squid's default port lists, so a
#     standard Squid refuses it with a 403 from "http_access deny
#     !Safe_ports" (Debian) or "deny CONNECT !SSL_ports", rules checked
#     before any look-up or connection; most proxies limit CONNECT to 443
#     likewise (tinyproxy's ConnectPort).
#   - The limited broadcast address is no host's: an IP literal needs no
#     DNS, and a proxy that allowed the port anyway cannot connect to it
#     (Linux refuses TCP to a broadcast address with ENETUNREACH before
#     any packet), so it answers an error at once instead of waiting on a
#     connection, and never reaches this gateway.
DEFAULT_PROBE_TARGET = ("255.255.255.255", 9)


class ProbeFailed(Exception):
    """
    The proxy did not answer the probe; the message says why, for a log
    line.
    """


class ProbeConnectFailed(ProbeFailed):
    """
    No connection to the proxy could be made.
    """


class ProbeNoAnswer(ProbeFailed):
    """
    The proxy took the connection and did not answer in time.
    """


class ConnectProbe(Protocol):
    """
    Sends the probe's request and reports the proxy's answer to C{done}:
    the whole header block, or with C{statusOnly} the status line alone
    (a L{ConnectResponse} without headers); then drops the connection,
    ignoring whatever else the proxy sends.

    With C{followUp}, an answer that did not open the tunnel is first
    passed to it: if it gives a request (NTLM's authenticate message), the
    answer's body is read past and that request sent on this connection,
    and the answer to it is the one reported.
    """

    def __init__(
        self,
        request: bytes,
        done: Deferred[ConnectResponse],
        statusOnly: bool,
        followUp: Callable[[ConnectResponse], bytes | None] | None = None,
    ) -> None:
        self.request = request
        self.done = done
        self.statusOnly = statusOnly
        self.followUp = followUp
        self.parser = ConnectResponseParser()
        self.skipper: BodySkipper | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            if self.skipper is not None:
                after = self.skipper.feed(data)
                if after is None:
                    return
                self.skipper = None
                self.parser = ConnectResponseParser()
                self.transport.write(self.request)  # type: ignore[union-attr]
                data = after
            response = self.parser.feed(data)
        except ProxyResponseError as e:
            self._finish(Failure(ProbeFailed(f"answered something that is not HTTP: {e}")))
            return
        if response is None and self.statusOnly and self.parser.statusLine is not None:
            response = ConnectResponse(*self.parser.statusLine)
        if response is None:
            return
        if self.followUp is not None and not response.opensTunnel:
            request, self.followUp = self.followUp(response), None
            if request is not None:
                self.request = request
                self.skipper = BodySkipper(response)
                self.dataReceived(response.leftover)
                return
        self._finish(response)

    def _finish(self, result: Any) -> None:
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ConnectionDone):
            why = "closed the connection without answering"
        else:
            why = f"connection lost before an answer: {reason.getErrorMessage()}"
        self.done.errback(Failure(ProbeFailed(why)))


class Socks5Probe(ConnectProbe):
    """
    The probe of a SOCKS5 server: the greeting, the credentials if it asks
    for them, then its CONNECT; any complete answer, a refusal included
    (of the credentials, of every method, of the CONNECT), is an answer.
    """

    def __init__(
        self, request: bytes, done: Deferred[ConnectResponse], statusOnly: bool,
        login: tuple[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(request, done, statusOnly)
        self.handshake = Socks5Handshake(request, login)

    def connectionMade(self) -> None:
        self.transport.write(self.handshake.greeting())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            send, response = self.handshake.feed(data)
        except Socks5Error as e:
            self._finish(Failure(ProbeFailed(f"answered something that is not SOCKS5: {e}")))
            return
        if send:
            self.transport.write(send)  # type: ignore[union-attr]
        if response is not None:
            self._finish(response)


class _ProbeFactory(Factory):
    noisy = False

    def __init__(
        self,
        request: bytes,
        done: Deferred[ConnectResponse],
        statusOnly: bool,
        proxy: Any = None,
        followUp: Callable[[ConnectResponse], bytes | None] | None = None,
    ) -> None:
        self.request = request
        self.done = done
        self.statusOnly = statusOnly
        self.proxy = proxy
        self.followUp = followUp
        self.protocol_: ConnectProbe | None = None

    def buildProtocol(self, addr: Any) -> ConnectProbe:
        proxy = self.proxy
        if proxy is not None and proxy.kind == SOCKS5:
            self.protocol_ = Socks5Probe(self.request, self.done, self.statusOnly, proxy.login)
        else:
            self.protocol_ = ConnectProbe(self.request, self.done, self.statusOnly, self.followUp)
        return self.protocol_


def askProxy(
    proxy: Any,
    host: str,
    port: int,
    reactor: Any,
    connectTimeout: float,
    answerTimeout: float,
    statusOnly: bool = False,
    exchange: Any = None,
    extraHeaders: Sequence[tuple[str, str]] = (),
) -> Deferred[ConnectResponse]:
    """
    Connect to C{proxy} (its endpoint: TLS for an C{https://} proxy, the
    addresses its name was resolved to), send C{CONNECT host:port} and
    wait for the answer.

    @param connectTimeout: seconds for the connection.
    @param answerTimeout: seconds from the connection to the answer (the
        TLS handshake included).
    @param statusOnly: answer as soon as the status line is in.
    @param exchange: the L{shifter.upstream.auth.AuthExchange} whose headers the
        request carries, to answer a 407 with another probe; by default a
        new one, if the proxy has credentials.  A 407 to NTLM's negotiate
        message is answered on the same connection, and the answer to that
        is the one given.
    @param extraHeaders: more headers for an HTTP proxy's CONNECT (doctor's
        tunnel id).
    @return: a C{Deferred} firing with the L{ConnectResponse}, whatever
        its status, or failing with a L{ProbeFailed} that says why; its
        cancellation drops the connection.
    @raise ValueError: if C{host:port} cannot go into a request.
    """
    if getattr(proxy, "kind", HTTP) == SOCKS5:
        request = socks5Request(host, port)
    else:
        if exchange is None and proxy.auth is not None:
            exchange = proxy.auth.exchange()
        headers = exchange.headersFor("CONNECT", formatAuthority(host, port)) if exchange is not None else []
        request = probeRequest(proxy, host, port, [*headers, *extraHeaders])

    def dropConnection(_: Deferred[ConnectResponse]) -> None:
        protocol = factory.protocol_
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def ntlmFollowUp(response: ConnectResponse) -> bytes | None:
        if response.status != 407 or exchange is None or not exchange.awaitsChallenge:
            return None
        challenges = [value for name, value in response.headers if name.lower() == b"proxy-authenticate"]
        if exchange.challenged(challenges) is not None or not exchange.sameConnection:
            return None
        if reuseRefusal(response) is not None:
            return None
        headers = exchange.headersFor("CONNECT", formatAuthority(host, port))
        return probeRequest(proxy, host, port, [*headers, *extraHeaders], first=False)

    answer: Deferred[ConnectResponse] = Deferred(dropConnection)
    followUp = ntlmFollowUp if exchange is not None and not statusOnly else None
    factory = _ProbeFactory(request, answer, statusOnly, proxy, followUp)
    connecting = proxy.endpoint.connect(factory)
    connecting.addTimeout(connectTimeout, reactor)

    def connected(_: object) -> Deferred[ConnectResponse]:
        answer.addTimeout(answerTimeout, reactor)
        return answer.addErrback(noAnswer)

    def connectFailed(reason: Failure) -> None:
        if reason.check(TimeoutError):
            raise ProbeConnectFailed(f"no connection within {connectTimeout:g} s")
        if reason.check(CancelledError):
            reason.raiseException()
        why = reason.getErrorMessage().rstrip(".").replace("Connection was refused by other side: 111: ", "")
        raise ProbeConnectFailed(f"cannot connect: {why}")

    def noAnswer(reason: Failure) -> Failure:
        if reason.check(TimeoutError):
            return Failure(ProbeNoAnswer(f"no answer to CONNECT within {answerTimeout:g} s"))
        return reason

    return connecting.addCallbacks(connected, connectFailed)
