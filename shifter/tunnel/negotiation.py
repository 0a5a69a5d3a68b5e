"""
Asking a proxy for the tunnel: the part of a tunnel's set-up that a client
connection (L{shifter.tunnel.tunnel.Tunnel}) and a SYN held before the
connection exists (L{shifter.tunnel.holdsyn.HeldSyn}) go through alike.

L{ProxyNegotiation} applies a policy's decision, connects to the proxies
one after another, sends CONNECT (with authentication and
C{--pass-client}), reads the answer, counts each proxy's health, and moves
on to the next proxy when one fails before the tunnel opens.  The two
machines that mix it in declare, in their own tables, which of its steps
each of their events leads to, and give it these hooks:

  - C{_handle(event, *args)}: look C{event} up in their table;

  - C{_newAttempt(proxy)}: an unstarted L{shifter.interfaces.IProxyAttempt}
    reporting to them;
  - C{_open(leftover)}: the proxy answered 2xx;
  - C{_fail(kind, reason, **fields)}: give up, counted under C{kind};
  - C{_setupTimedOut()}: the whole set-up's deadline has passed;
  - C{_setDeadline(when)};

and these attributes: C{state}, C{owner} (for C{proxyAddresses}),
C{settings}, C{pool}, C{policy}, C{stats}, C{clock}, C{log}, C{retryLine}, C{pending}, C{clientHost},
C{clientPort}, C{clientLabel}, C{destination}, C{address}, C{target},
C{connectHost}, C{named}, C{candidates}, C{proxy}, C{attempt}, C{request},
C{passClient}, C{authExchange}, C{authProxy}, C{setupDeadline},
C{connectStarted}, C{tunnelId} (sent in C{settings.tunnelIdHeader}), C{sniffedScheme},
C{sniffedPath}, and C{targetFrom}, C{proxyConnectedAt} and C{proxyStatus}, which it sets.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from shifter.upstream.connect import ConnectResponse, formatAuthority, isDottedQuad, reuseRefusal
from shifter.tunnel.destinations import destinationRefusal
from shifter.interfaces import IProxyAttempt
from shifter.upstream.passclient import refusalHint, tunnelRequest
from shifter.upstream.proxy import DIRECT, HTTP, SOCKS5
from shifter.upstream.socks5 import formatConnectRequest as socks5Request
from shifter.tunnel.policy import TunnelDecision, TunnelRequest

# The states of this stage, in both machines.
DECIDING = "deciding"
CONNECTING = "connecting"
HANDSHAKING = "handshaking"
# The proxy's 407 held an NTLM challenge: its body is being read past, and
# the authenticate message sent, on the same connection; the answer to that
# is awaited.
AUTHENTICATING = "authenticating"

# The events of this stage, in both machines: the policy's answer, and what
# a proxy attempt reports.
DECIDED = "decided"
DECIDE_FAILED = "decide-failed"
PROXY_CONNECTED = "proxy-connected"
PROXY_CONNECT_FAILED = "proxy-connect-failed"
PROXY_ANSWERED = "proxy-answered"
PROXY_INVALID = "proxy-invalid"
PROXY_DATA = "proxy-data"
PROXY_ENDED = "proxy-ended"
PROXY_LOST = "proxy-lost"
PROXY_EVENTS = (
    PROXY_CONNECTED, PROXY_CONNECT_FAILED, PROXY_ANSWERED, PROXY_INVALID, PROXY_DATA, PROXY_ENDED, PROXY_LOST,
)


def destinationCheck(owner: Any, settings: Any, host: str, port: int) -> tuple[str, str] | None:
    """
    Why a connection to C{host:port} must not be tunnelled, as (counter,
    reason), or C{None}: it could reach an upstream proxy, it is this
    machine or an address no proxy should be asked for, or its port is not
    allowed.

    @param host: the destination's address, as L{canonicalHost} gives it.
    """
    addresses = owner.proxyAddresses
    refusal = addresses.refusal(host, port)
    if refusal is not None:
        return "loop", refusal
    refusal = destinationRefusal(host) or addresses.gatewayRefusal(host)
    if refusal is not None:
        return "destination", refusal
    if settings.allowedPorts and port not in settings.allowedPorts:
        return "port-denied", f"destination port {port} is not an --allow-port"
    return None


class ProxyNegotiation:
    """
    The steps from a list of proxies to an open tunnel or a failure; see
    the module's docstring for what the class that mixes it in provides.
    """

    __slots__ = ()
    pending: Deferred[Any] | None  # what L{_ask} waits for
    proxyStatus: int | None  # the last proxy's answer to CONNECT
    proxyConnectedAt: float | None  # when the connection to the last proxy tried was made

    # The events this stage receives, each looked up in the machine's table
    # by its C{_handle(event, *args)}.  One from a proxy attempt the
    # machine has given up on is not looked up: the attempt is aborted, and
    # nothing else happens.

    def decided(self: Any, decision: TunnelDecision | None) -> None:
        self._handle(DECIDED, decision)

    def decideFailed(self: Any, reason: Failure) -> None:
        self._handle(DECIDE_FAILED, reason)

    def proxyConnected(self: Any, attempt: IProxyAttempt) -> None:
        self._handleProxy(PROXY_CONNECTED, attempt)

    def proxyConnectFailed(self: Any, attempt: IProxyAttempt, reason: Failure) -> None:
        self._handleProxy(PROXY_CONNECT_FAILED, attempt, reason)

    def proxyAnswered(self: Any, attempt: IProxyAttempt, response: ConnectResponse) -> None:
        self._handleProxy(PROXY_ANSWERED, attempt, response)

    def proxyInvalid(self: Any, attempt: IProxyAttempt, reason: str) -> None:
        """
        The proxy's answer to CONNECT is not HTTP Shifter accepts.
        """
        self._handleProxy(PROXY_INVALID, attempt, reason)

    def proxyData(self: Any, attempt: IProxyAttempt, data: bytes) -> None:
        self._handleProxy(PROXY_DATA, attempt, data)

    def proxyEnded(self: Any, attempt: IProxyAttempt) -> None:
        self._handleProxy(PROXY_ENDED, attempt)

    def proxyLost(self: Any, attempt: IProxyAttempt, reason: Failure) -> None:
        self._handleProxy(PROXY_LOST, attempt, reason)

    def _handleProxy(self: Any, event: str, attempt: Any, *args: Any) -> None:
        if attempt is not self.attempt:
            attempt.abort()  # an attempt given up on: nothing else to do
            return
        self._handle(event, *args)

    # The actions every table names somewhere.

    def _impossible(self, *args: Any) -> None:
        raise AssertionError("an event this state never expects")

    def _ignore(self, *args: Any) -> None:
        pass

    # Asking something that may answer later (a resolver, the policy).

    def _ask(self: Any, call: Callable[[], Any], ok: Callable[[Any], None], failed: Callable[[Failure], None]) -> None:
        """
        Call C{call}; its result, at once or from a C{Deferred}, or its
        failure becomes an event.  An answer that comes after the machine
        gave up waiting (L{_cancelPending}) is not delivered.
        """
        try:
            result = call()
        except Exception:
            failed(Failure())
            return
        if not isinstance(result, Deferred):
            ok(result)
            return
        self.pending = result

        def fired(value: Any) -> None:
            if self.pending is result:
                self.pending = None
                ok(value)

        def errored(reason: Failure) -> None:
            if self.pending is result:
                self.pending = None
                failed(reason)

        result.addCallbacks(fired, errored)

    def _cancelPending(self: Any) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()

    # Stage: the policy's decision.

    def _askPolicy(self: Any, name: str | None, ech: str | None = None) -> None:
        """
        Ask the policy, if there is one, where the tunnel goes (with the
        sniffed C{name} and C{ech}, if any), then connect.
        """
        policy = self.policy
        if policy is None:
            self._connectFirst()
            return
        self.state = DECIDING
        self._setDeadline(self.setupDeadline)
        request = TunnelRequest(
            self._clientAddress(), self.destination, name, tuple(self.candidates), ech,
            scheme=self.sniffedScheme, path=self.sniffedPath,
        )
        self._ask(lambda: policy.decide(request), self.decided, self.decideFailed)

    def _decided(self: Any, decision: TunnelDecision | None) -> None:
        if decision is not None:
            if decision.label:
                self.decidedBy = f" ({decision.label})"
            if decision.refuse is not None:
                self._fail("policy", f"refused by policy: {decision.refuse}")
                return
            if decision.proxies is not None:
                self.candidates = [p for p in decision.proxies if self.pool.usable(p)]
            self.passClient = decision.passClient
            if decision.target is not None:
                port = self.destination.port
                try:
                    formatAuthority(decision.target, port)
                except (ValueError, TypeError) as e:
                    self._fail("policy", f"policy gave an invalid target: {e}")
                    return
                refusal = self._targetRefusal(decision.target, port)
                if refusal is not None:
                    self._fail("destination", f"policy's target refused: {refusal}")
                    return
                self.connectHost = decision.target
                if decision.target != self.address:
                    self.targetFrom = "policy"
                    self.named = f" (CONNECT {formatAddress(decision.target, port)}, from policy)"
        self._connectFirst()

    def _targetRefusal(self: Any, target: str, port: int) -> str | None:
        """
        Why a policy's CONNECT target must not be asked for: for an
        address, the same refusals as for an original destination (an
        upstream proxy, this machine, loopback, link-local, ...); for a
        name, a name of this machine.  Other names are the proxy's to
        resolve.
        """
        addresses = self.owner.proxyAddresses
        try:
            host = canonicalHost(target)
        except ValueError:
            name = target.lower().rstrip(".")
            return self.owner.gatewayNames.refusal(name, addresses.localAddresses, singleLabel=False)
        return addresses.refusal(host, port) or destinationRefusal(host) or addresses.gatewayRefusal(host)

    # Stage: a connection to a proxy, and its answer to CONNECT; the next
    # proxy is tried when one fails before the tunnel opens.

    def _connectFirst(self: Any) -> None:
        if not self.candidates:
            self._fail("no-proxy", self.pool.unavailable())
            return
        self.connectStarted = self.clock.seconds()
        self._connectNext()

    def _connectNext(self: Any) -> None:
        # A proxy on trial takes one tunnel at a time (its canary), and one
        # marked down since the candidates were chosen takes none: the
        # next candidate is tried instead.
        pool = self.pool
        proxy = self.candidates.pop(0)
        while not pool.claim(proxy, self):
            if not self.candidates:
                self._fail("no-proxy", pool.unavailable())
                return
            proxy = self.candidates.pop(0)
        self.proxy = proxy
        destination = self.destination
        port = destination.port
        kind = proxy.kind
        if kind == HTTP:
            headers: list[tuple[str, str]] = []
            if proxy.auth is not None:
                if self.authProxy is not proxy:
                    self.authExchange, self.authProxy = proxy.auth.exchange(), proxy
                headers = list(self.authExchange.headersFor("CONNECT", formatAuthority(self.connectHost, port)))
            idHeader = self.settings.tunnelIdHeader
            if idHeader:
                headers.append((idHeader, self.tunnelId))
            self.request = tunnelRequest(
                proxy, self._clientAddress(), destination, self.connectHost, port, headers, self.passClient
            )
        elif kind == SOCKS5:
            self.request = socks5Request(self.connectHost, port)
        else:
            # DIRECT: to the original destination's address, never to a
            # name (which could lead anywhere), under the same checks.
            refusal = destinationCheck(self.owner, self.settings, self.address, port) or self._directLoop(proxy)
            if refusal is not None:
                self._fail(refusal[0], f"DIRECT refused: {refusal[1]}")
                return
            self.proxy = proxy = proxy.toDestination(self.address, port)
            self.request = b""
        self.state = CONNECTING
        self._setDeadline(min(self.clock.seconds() + self.settings.connectTimeout, self.setupDeadline))
        # The current attempt before it starts: it may fail at once.
        attempt = self.attempt = self._newAttempt(proxy)
        attempt.connect()

    def _directLoop(self: Any, route: Any) -> tuple[str, str] | None:
        """
        Why a DIRECT connection for this client would come back to Shifter,
        or C{None}.  A client on this machine reaches Shifter only through
        rules that redirect the gateway's own connections; Shifter's DIRECT
        connection would be one of them, unless it carries the mark those
        rules leave alone (C{--mark}).
        """
        if route.direct.mark:
            return None
        host = self.clientHost
        local = self.owner.proxyAddresses.localAddresses
        if local is None or host in local or ipaddress.ip_address(host).is_loopback:
            return "loop", (f"the client {host} is this machine, whose own connections are redirected to Shifter, "
                            "and so would this one be: give Shifter the rules' --mark")
        return None

    def _proxyConnected(self: Any) -> None:
        self.proxyConnectedAt = self.clock.seconds()
        self.state = HANDSHAKING
        self._setDeadline(min(self.clock.seconds() + self.settings.handshakeTimeout, self.setupDeadline))
        request, self.request = self.request, b""
        self.attempt.write(request + self._earlyWithRequest())

    def _earlyWithRequest(self: Any) -> bytes:
        """
        The client's bytes to send behind the CONNECT request: none here (a
        held SYN's connection has sent nothing yet); a tunnel's, with
        C{--early-data send} (L{shifter.tunnel.tunnel.Tunnel}).
        """
        return b""

    def _mayWriteEarly(self: Any) -> bool:
        """
        Whether the client's bytes may go to this proxy before it has
        answered CONNECT: with C{--early-data send}, to an HTTP proxy whose
        login never goes on on the connection after a 407 (NTLM's does,
        Negotiate's may), where they would be read as the next request.
        """
        proxy = self.proxy
        if not self.settings.sendEarly or proxy.kind != HTTP:
            return False
        auth = proxy.auth
        return auth is None or not (auth.ntlm or auth.negotiate)

    def _connectFailed(self: Any, reason: Failure) -> None:
        why = f"cannot connect to proxy: {reason.getErrorMessage()}"
        self.pool.failed(self.proxy, why)
        self.attempt = None
        self._retryOrFail("proxy-connect", why)

    def _connectTimedOut(self: Any) -> None:
        self._proxyTimedOut(f"no connection to proxy within {self.settings.connectTimeout:g} s")

    def _handshakeTimedOut(self: Any) -> None:
        self._proxyTimedOut(f"proxy did not answer CONNECT within {self.settings.handshakeTimeout:g} s")

    def _proxyTimedOut(self: Any, why: str) -> None:
        if self.clock.seconds() >= self.setupDeadline:
            self._setupTimedOut()
            return
        self.pool.failed(self.proxy, why)
        self._dropAttempt()
        self._retryOrFail("timeout", why)

    def _answered(self: Any, response: ConnectResponse) -> None:
        status = response.status
        if self.proxy.kind != DIRECT:
            self.proxyStatus = status
            self.stats.proxyAnswers[f"{status // 100}xx"] += 1
        if response.opensTunnel:
            self.pool.succeeded(self.proxy)
            if self.authExchange is not None and self.authProxy is self.proxy:
                self.authExchange.succeeded()
            self._open(response.leftover)
            return
        self.pool.answered(self.proxy, status)
        if response.refusal:
            # A SOCKS5 server's refusal, in its own words; its status says
            # what follows.
            self._dropAttempt()
            if status == 407:
                self._fail("proxy-auth", response.refusal, status=status)
            elif status >= 500:
                self._retryOrFail("proxy-status", response.refusal, status=status)
            else:
                self._fail("proxy-status", response.refusal, status=status)
        elif status == 407:
            self._challenged(response)
        else:
            reason = f"proxy answered {status} {response.reason}".rstrip()
            reason += refusalHint("proxy-status", status, self._passClientMode())
            self._dropAttempt()
            if status >= 500:
                # This proxy could not serve the request; another may.
                self._retryOrFail("proxy-status", reason, status=status)
            else:
                self._fail("proxy-status", reason, status=status)

    def _challenged(self: Any, response: ConnectResponse) -> None:
        exchange = self.authExchange if self.authProxy is self.proxy else None
        if exchange is None:
            self._dropAttempt()
            self._fail("proxy-auth", "proxy answered 407: it needs credentials and none are configured", status=407)
            return
        challenges = [value for name, value in response.headers if name.lower() == b"proxy-authenticate"]
        cannot = exchange.challenged(challenges)
        if cannot is not None:
            self._dropAttempt()
            self._fail("proxy-auth", f"proxy answered 407: {cannot}", status=407)
            return
        if exchange.sameConnection:
            self._authenticate(exchange, response)
            return
        self._dropAttempt()
        self.candidates.insert(0, self.proxy)
        self._connectNext()

    def _authenticate(self: Any, exchange: Any, response: ConnectResponse) -> None:
        """
        Answer the NTLM challenge in C{response} on the connection that
        carried it, once its body has been read past.
        """
        why = reuseRefusal(response)
        if why is not None:
            self._dropAttempt()
            self._fail(
                "proxy-auth",
                f"proxy answered 407 with an NTLM challenge, but {why}: NTLM needs that connection kept open",
                status=407,
            )
            return
        port = self.destination.port
        headers = exchange.headersFor("CONNECT", formatAuthority(self.connectHost, port))
        request = tunnelRequest(
            self.proxy, self._clientAddress(), self.destination, self.connectHost, port, headers, self.passClient,
            first=False,
        )
        self.state = AUTHENTICATING
        self._setDeadline(min(self.clock.seconds() + self.settings.handshakeTimeout, self.setupDeadline))
        self.attempt.again(request, response)

    def _authenticationInvalid(self: Any, reason: str) -> None:
        self._dropAttempt()
        self._fail("proxy-auth", f"NTLM authentication with the proxy failed: {reason}")

    def _closedWhileAuthenticating(self: Any, reason: Failure | None = None) -> None:
        self._dropAttempt()
        self._fail(
            "proxy-auth",
            "proxy closed the connection after its NTLM challenge: NTLM needs that connection kept open",
        )

    def _answerInvalid(self: Any, reason: str) -> None:
        why = f"bad answer from proxy: {reason}"
        self.pool.failed(self.proxy, why)
        self._dropAttempt()
        self._retryOrFail("proxy-garbage", why)

    def _closedBeforeAnswer(self: Any, reason: Failure | None = None) -> None:
        if reason is None or reason.check(ConnectionDone):
            why = "proxy closed the connection before answering"
        else:
            why = f"proxy connection lost before answering: {reason.getErrorMessage()}"
        if self.proxy.kind == HTTP:
            why += refusalHint("proxy-closed", None, self._passClientMode())
        self.pool.failed(self.proxy, why)
        self._dropAttempt()
        self._retryOrFail("proxy-closed", why)

    def _retryOrFail(self: Any, kind: str, reason: str, **fields: Any) -> None:
        """
        Try the next proxy if one is left and time allows, else fail.
        """
        self.candidates = [proxy for proxy in self.candidates if self.pool.usable(proxy)]
        if not self.candidates or self.clock.seconds() >= self.setupDeadline:
            self._fail(kind, reason, **fields)
            return
        self.stats.retries += 1
        self.log.info(
            self.retryLine,
            client=self.clientLabel,
            destination=self.target,
            proxy=self.proxy.description,
            reason=reason,
            next=self.candidates[0].description,
        )
        self._connectNext()

    def _dropAttempt(self: Any) -> None:
        """
        Let go of the current attempt: it will not carry the tunnel.
        """
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.abort()
        if self.proxy is not None:
            # Given up on before a verdict: its canary place, if it had
            # one, goes to the next tunnel.
            self.pool.release(self.proxy, self)

    def _clientAddress(self: Any) -> IPv4Address | IPv6Address:
        host = self.clientHost
        return (IPv6Address if ":" in host else IPv4Address)("TCP", host, self.clientPort)

    def _passClientMode(self: Any) -> str:
        return self.passClient or self.proxy.passClient


def canonicalHost(host: str) -> str:
    """
    An IP address as the kernel reports it, in the one form Shifter
    compares and prints: IPv4-mapped IPv6 addresses unmapped, IPv6 ones
    compressed, any scope dropped.  A dotted quad from the kernel is
    already canonical, and is not parsed again.

    @raise ValueError: if C{host} is not an IP address.
    """
    if ":" not in host:
        if isDottedQuad(host):
            return host
        return ipaddress.IPv4Address(host).compressed
    if host.startswith("::ffff:") and "." in host:
        return canonicalHost(host[7:])
    return ipaddress.IPv6Address(host.split("%", 1)[0]).compressed


def formatAddress(host: str, port: int) -> str:
    """
    C{host:port}, with an IPv6 address in brackets.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
