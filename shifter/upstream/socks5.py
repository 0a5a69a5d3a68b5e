"""
The SOCKS5 handshake (RFC 1928, with RFC 1929 username/password), sans
I/O: the messages Shifter sends and a strict, bounded reader of the
server's answers.

A SOCKS5 server's answer is given to the rest of Shifter as the CONNECT
codec's L{ConnectResponse}, with an HTTP status that says what the
tunnel does next (see L{REPLIES}) and a line in SOCKS's own words for the
log, so that a SOCKS5 upstream fails over, counts and logs like an HTTP
one.  Nothing here touches a socket, so every path is tested with plain
bytes.
"""

from __future__ import annotations

import ipaddress
import struct

from shifter.interfaces import ConnectResponse
from shifter.upstream.connect import checkHost, checkPort

VERSION = 5
AUTH_VERSION = 1  # RFC 1929's subnegotiation

# Methods (RFC 1928 section 3).
NO_AUTHENTICATION = 0x00
USERNAME_PASSWORD = 0x02
NO_ACCEPTABLE_METHODS = 0xFF

CONNECT = 0x01

# Address types.
IPV4 = 0x01
DOMAIN_NAME = 0x03
IPV6 = 0x04

# The longest server reply: four bytes, a name of up to 255 bytes with its
# length byte, and the port.
MAX_REPLY_BYTES = 4 + 1 + 255 + 2

# What each reply code (RFC 1928 section 6) says, and the HTTP status it
# counts as: a 5xx sends the tunnel to the next proxy (another may reach
# the destination), anything else ends it.  Only the server's own rules
# refusing the connection are final.
REPLIES: dict[int, tuple[str, int]] = {
    0x01: ("general SOCKS server failure", 502),
    0x02: ("connection not allowed by ruleset", 403),
    0x03: ("network unreachable", 502),
    0x04: ("host unreachable", 502),
    0x05: ("connection refused", 502),
    0x06: ("TTL expired", 504),
    0x07: ("command not supported", 501),
    0x08: ("address type not supported", 501),
}

# The status of a refusal of Shifter's credentials, or of every method
# it offered: counted as the proxy asking for authentication.
AUTH_REFUSED = 407

SUCCEEDED = ConnectResponse(200, "SOCKS5 request granted")


class Socks5Error(Exception):
    """
    The server's bytes are not a SOCKS5 answer Shifter accepts.

    The message is the reason given in the log line.
    """


def formatGreeting(withPassword: bool) -> bytes:
    """
    The first message: the methods Shifter offers, no authentication, and
    username/password when it has credentials.
    """
    if withPassword:
        return bytes((VERSION, 2, NO_AUTHENTICATION, USERNAME_PASSWORD))
    return bytes((VERSION, 1, NO_AUTHENTICATION))


def checkCredentials(username: str, password: str) -> tuple[bytes, bytes]:
    """
    The username and password as RFC 1929 sends them: UTF-8, the username
    1 to 255 bytes, the password at most 255.

    @raise ValueError: with the reason, for credentials that cannot be sent.
    """
    user = username.encode("utf-8")
    secret = password.encode("utf-8")
    if not 0 < len(user) < 256:
        raise ValueError(f"a SOCKS5 username is 1 to 255 bytes, not {len(user)}")
    if len(secret) > 255:
        raise ValueError(f"a SOCKS5 password is at most 255 bytes, not {len(secret)}")
    return user, secret


def formatPasswordRequest(username: bytes, password: bytes) -> bytes:
    """
    The RFC 1929 username/password request.
    """
    return bytes((AUTH_VERSION, len(username))) + username + bytes((len(password),)) + password


def formatConnectRequest(host: str, port: int) -> bytes:
    """
    The CONNECT request for C{host:port}: an IP address as one (IPv4 or
    IPv6), a hostname as a name (address type 3), for the server to
    resolve.  The host goes through the same check as an HTTP CONNECT's.

    @raise shifter.upstream.connect.InvalidAuthority: if C{host} or C{port}
        is refused.
    """
    port = checkPort(port)
    host = checkHost(host)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        target = bytes((DOMAIN_NAME, len(name))) + name
    else:
        kind = IPV4 if address.version == 4 else IPV6
        target = bytes((kind,)) + address.packed
    return bytes((VERSION, CONNECT, 0)) + target + struct.pack("!H", port)


# The handshake's states.
METHOD = "method"  # greeting sent: the server's choice of method awaited
AUTHENTICATING = "authenticating"  # username/password sent: its status awaited
REPLY = "reply"  # CONNECT sent: the server's reply awaited
DONE = "done"


class Socks5Handshake:
    """
    Shifter's side of one SOCKS5 handshake: L{greeting} gives the first
    bytes; each read from the server goes to L{feed}, which says what to
    send next and, once the server has answered CONNECT, the answer.

    Every answer is read to its exact length (at most L{MAX_REPLY_BYTES}),
    and anything that cannot become a valid one is refused as soon as it
    is seen.

    @ivar state: L{METHOD}, L{AUTHENTICATING}, L{REPLY} or L{DONE}.
    """

    def __init__(self, request: bytes, credentials: tuple[bytes, bytes] | None = None) -> None:
        """
        @param request: the CONNECT request (L{formatConnectRequest}).
        @param credentials: the username and password, as
            L{checkCredentials} gives them, if any.
        """
        self.request = request
        self.credentials = credentials
        self.state = METHOD
        self._buffer = b""

    def greeting(self) -> bytes:
        return formatGreeting(self.credentials is not None)

    def feed(self, data: bytes) -> tuple[bytes, ConnectResponse | None]:
        """
        Add bytes received from the server.

        @return: the bytes to send to the server now (perhaps none), and
            the answer to CONNECT once complete (its C{leftover} holds the
            tunnel bytes that came after it), else C{None}.
        @raise Socks5Error: if the bytes cannot be a valid answer.
        """
        if self.state == DONE:
            raise Socks5Error("bytes after the handshake ended")
        self._buffer += data
        send = b""
        while True:
            state = self.state
            if state == METHOD:
                step = self._method()
            elif state == AUTHENTICATING:
                step = self._authenticated()
            else:
                answer = self._reply()
                if answer is not None:
                    self.state = DONE
                return send, answer
            if step is None:
                return send, None
            if isinstance(step, ConnectResponse):
                self.state = DONE
                return send, step
            send += step

    def _take(self, n: int) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < n:
            return None
        self._buffer = buffer[n:]
        return buffer[:n]

    def _method(self) -> bytes | ConnectResponse | None:
        head = self._buffer[:2]
        if head:
            _checkVersion(head[0], VERSION, "method choice", self._buffer)
        answer = self._take(2)
        if answer is None:
            return None
        method = answer[1]
        if method == NO_AUTHENTICATION:
            self.state = REPLY
            return self.request
        if method == USERNAME_PASSWORD and self.credentials is not None:
            self.state = AUTHENTICATING
            return formatPasswordRequest(*self.credentials)
        if method == NO_ACCEPTABLE_METHODS:
            if self.credentials is None:
                why = ("SOCKS5 server accepts none of the offered methods (no authentication): "
                       "it may want a username and password, and none are configured")
            else:
                why = "SOCKS5 server accepts none of the offered methods (no authentication, username/password)"
            return _refusal(AUTH_REFUSED, "no acceptable methods", why)
        raise Socks5Error(f"SOCKS5 server chose method {method:#04x}, which was not offered")

    def _authenticated(self) -> bytes | ConnectResponse | None:
        head = self._buffer[:1]
        if head:
            _checkVersion(head[0], AUTH_VERSION, "username/password status", self._buffer)
        answer = self._take(2)
        if answer is None:
            return None
        status = answer[1]
        if status != 0:
            return _refusal(
                AUTH_REFUSED, "authentication failed",
                f"SOCKS5 server refused the username and password (RFC 1929 status {status:#04x})",
            )
        self.state = REPLY
        return self.request

    def _reply(self) -> ConnectResponse | None:
        buffer = self._buffer
        if buffer:
            _checkVersion(buffer[0], VERSION, "reply", buffer)
        if len(buffer) >= 3 and buffer[2] != 0:
            raise Socks5Error(f"SOCKS5 reply with reserved byte {buffer[2]:#04x}, not 0")
        if len(buffer) < 4:
            return None
        kind = buffer[3]
        if kind == IPV4:
            length = 4 + 4 + 2
        elif kind == IPV6:
            length = 4 + 16 + 2
        elif kind == DOMAIN_NAME:
            if len(buffer) < 5:
                return None
            if buffer[4] == 0:
                raise Socks5Error("SOCKS5 reply with an empty bound name")
            length = 4 + 1 + buffer[4] + 2
        else:
            raise Socks5Error(f"SOCKS5 reply with unknown address type {kind:#04x}")
        reply = self._take(length)
        if reply is None:
            return None
        code = reply[1]
        leftover, self._buffer = self._buffer, b""
        if code == 0:
            if not leftover:
                return SUCCEEDED
            return ConnectResponse(SUCCEEDED.status, SUCCEEDED.reason, [], leftover)
        text, status = REPLIES.get(code, ("unassigned reply code", 502))
        return _refusal(status, text, f"SOCKS5 server answered {code:#04x} ({text})")


def _refusal(status: int, reason: str, line: str) -> ConnectResponse:
    return ConnectResponse(status, reason, refusal=line)


def _checkVersion(version: int, expected: int, what: str, data: bytes) -> None:
    if version == expected:
        return
    if data.startswith(b"HTTP/"[: len(data)]):
        raise Socks5Error(f"answered what looks like HTTP, not SOCKS5 ({_excerpt(data)}): is it an HTTP proxy?")
    raise Socks5Error(f"SOCKS5 {what} with version {version:#04x}, not {expected}: {_excerpt(data)}")


def _excerpt(data: bytes, limit: int = 16) -> str:
    """
    A short, printable rendering of untrusted bytes for a log line.
    """
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
