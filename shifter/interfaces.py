"""
The interfaces between the tunnel and the layers below it.

The tunnel (L{shifter.tunnel.tunnel}) drives proxy attempts and relays through
these, and they report back through them; neither the upstream side nor
the relays import the tunnel.  It imports nothing of Shifter: every layer
may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface

from twisted.python.failure import Failure


# The CONNECT codec (L{shifter.upstream.connect}) builds it; it is here because the
# proxy events below carry it, and the relays must not import the upstream side.
@dataclass(frozen=True)
class ConnectResponse:
    """
    A complete answer to CONNECT.

    @ivar status: the three-digit status code.
    @ivar reason: the reason phrase, decoded leniently for the log.
    @ivar headers: (name, value) pairs in the order received.
    @ivar leftover: bytes after the header block; they belong to the tunnel
        (after a 2xx) or to the answer's body.
    @ivar version: the HTTP version of the status line, C{"1.0"} or
        C{"1.1"}.
    @ivar refusal: for an answer in another protocol than HTTP (a SOCKS5
        server's), how its refusal reads in the log line; its C{status}
        then says only what the tunnel does next (a 407 counts as the
        proxy wanting authentication, a 5xx tries the next proxy).
    """

    status: int
    reason: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    leftover: bytes = b""
    version: str = "1.1"
    refusal: str = ""

    @property
    def opensTunnel(self) -> bool:
        """
        Whether this answer opens the tunnel: any 2xx does (RFC 9110 9.3.6).
        """
        return 200 <= self.status < 300


class IProxyAttempt(Interface):
    """
    One try at one proxy for one tunnel: a connection being made, then
    made.  It reports to the tunnel with the proxy events, naming itself.
    """

    proxy = Attribute("The L{shifter.upstream.proxy.UpstreamProxy} being tried.")
    transport = Attribute("The connection's transport once connected, else C{None}.")

    def connect() -> None:
        """
        Start connecting; what happens is reported to the attempt's
        receiver, perhaps at once.
        """

    def write(data: bytes) -> None:
        """
        Send C{data} to the proxy (the CONNECT request, then tunnel bytes).
        """

    def again(request: bytes, response: ConnectResponse) -> None:
        """
        Send C{request} on this same connection once the body of
        C{response}, the answer just reported (one that did not open the
        tunnel), has been read past; the answer to C{request} is reported
        like the first.  Call it only for an answer that
        L{shifter.upstream.connect.reuseRefusal} accepts.
        """

    def halfClose() -> None:
        """
        Tell the proxy that the client has finished sending (through the
        TLS layer, for a TLS proxy).
        """

    def finish() -> None:
        """
        End the connection without losing a byte either way: send what was
        written, then the end (a FIN, or TLS's close_notify); read and
        discard what the proxy still sends until its own end; then close.
        Closing with unread bytes would reset the connection, and a reset
        makes the kernel throw away what it has not sent yet.
        """

    def abort() -> None:
        """
        Give up on this attempt now: stop connecting, or drop the
        connection without flushing.  Safe to call more than once.
        """


class IRelay(Interface):
    """
    Moves the bytes of one open tunnel both ways.
    """

    def start(toProxy: bytes, toClient: bytes, clientEnded: bool) -> None:
        """
        Start relaying, first delivering what was read before the tunnel
        opened: the client's early bytes and the tunnel bytes that came
        with the proxy's answer.

        @param clientEnded: whether the client has already finished sending.
        """

    def clientFinished() -> None:
        """
        The client has finished sending: pass that on to the proxy.
        """

    def proxyFinished() -> None:
        """
        The proxy has finished sending: pass that on to the client.
        """

    def up(data: bytes) -> None:
        """
        Bytes the client sent, for the proxy (a relay whose bytes pass
        through the tunnel).
        """

    def down(data: bytes) -> None:
        """
        Bytes the proxy sent, for the client.
        """

    def clientGone() -> None:
        """
        The client connection is gone, or about to be dropped: count what
        it never sent as dropped.
        """

    def proxyGone() -> None:
        """
        The same for the proxy connection.
        """

    def stop() -> None:
        """
        Stop relaying now and let go of both transports (no producer left
        registered), leaving the caller to close them.  What the relay
        holds is dropped (and counted).
        """


class IProxyReceiver(Interface):
    """
    Who is told what happens to a L{IProxyAttempt}.
    """

    def proxyConnected(attempt: IProxyAttempt) -> None:
        """
        The connection to the proxy is made.
        """

    def proxyConnectFailed(attempt: IProxyAttempt, reason: Failure) -> None:
        """
        The connection could not be made (or the attempt was abandoned
        while connecting).
        """

    def proxyAnswered(attempt: IProxyAttempt, response: ConnectResponse) -> None:
        """
        The proxy answered CONNECT.  After a 2xx, the tunnel's bytes follow
        as L{proxyData}; after any other answer, nothing does.
        """

    def proxyInvalid(attempt: IProxyAttempt, reason: str) -> None:
        """
        The proxy's answer cannot be read as HTTP that Shifter accepts.
        """

    def proxyData(attempt: IProxyAttempt, data: bytes) -> None:
        """
        Tunnel bytes from the proxy (only ever after a 2xx answer).
        """

    def proxyEnded(attempt: IProxyAttempt) -> None:
        """
        The proxy has finished sending.
        """

    def proxyLost(attempt: IProxyAttempt, reason: Failure) -> None:
        """
        The connection to the proxy is gone.
        """
