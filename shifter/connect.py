"""
The HTTP CONNECT handshake, sans I/O: the request Shifter sends and a strict,
bounded parser for the proxy's answer.

Nothing here touches a socket, so every path is tested with plain bytes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# Status line, headers and the blank line together may not exceed this.
MAX_RESPONSE_HEADER_BYTES = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")
_PREFIX = b"HTTP/"


class ProxyResponseError(Exception):
    """
    The proxy's answer to CONNECT is not an HTTP response Shifter accepts.

    The message is the reason given in the log line.
    """


@dataclass(frozen=True)
class ConnectResponse:
    """
    A complete answer to CONNECT.

    @ivar status: the three-digit status code.
    @ivar reason: the reason phrase, decoded leniently for the log.
    @ivar headers: (name, value) pairs in the order received.
    @ivar leftover: bytes after the header block; they belong to the tunnel.
    """

    status: int
    reason: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    leftover: bytes = b""

    @property
    def opensTunnel(self) -> bool:
        """
        Whether this answer opens the tunnel: any 2xx does (RFC 9110 9.3.6).
        """
        return 200 <= self.status < 300


def isValidHostname(name: str) -> bool:
    """
    Whether C{name} is a DNS hostname (letters, digits and hyphens in labels
    of at most 63 characters, at most 253 in all): the only names Shifter
    puts into a CONNECT request.
    """
    return _HOSTNAME.fullmatch(name) is not None


def formatAuthority(host: str, port: int) -> str:
    """
    Format C{host:port} for a CONNECT request target, with IPv6 literals in
    brackets.

    @raise ValueError: if C{host} is neither an IP address nor a valid
        hostname, or C{port} is out of range, so that nothing can be
        injected into the request.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not isValidHostname(host):
            raise ValueError(f"not an IP address or hostname: {host!r}") from None
        return f"{host}:{port}"
    if address.version == 6:
        return f"[{address.compressed}]:{port}"
    return f"{address}:{port}"


def formatConnectRequest(
    host: str, port: int, headers: list[tuple[str, str]] | None = None
) -> bytes:
    """
    Build the CONNECT request for C{host:port}, with its C{Host} header and
    any extra C{headers} (for example C{Proxy-Authorization}).
    """
    authority = formatAuthority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    for name, value in headers or ():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"line break in header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class ConnectResponseParser:
    """
    Reads a proxy's answer to CONNECT from bytes fed in any pieces.

    The answer must be an HTTP/1.0 or HTTP/1.1 status line and header fields,
    each ended by CRLF, then an empty line, in at most
    L{MAX_RESPONSE_HEADER_BYTES}.  Anything that cannot become such an
    answer is refused as soon as it is seen, without waiting for more.
    """

    def __init__(self, maxBytes: int = MAX_RESPONSE_HEADER_BYTES) -> None:
        self._maxBytes = maxBytes
        self._buffer = b""
        self._searchFrom = 0

    def feed(self, data: bytes) -> ConnectResponse | None:
        """
        Add bytes received from the proxy.

        @return: the complete L{ConnectResponse} once the header block has
            ended, else C{None} while more bytes are needed.
        @raise ProxyResponseError: if the bytes cannot be a valid answer.
        """
        self._buffer += data
        buffer = self._buffer
        if not buffer.startswith(_PREFIX[: len(buffer)]):
            raise ProxyResponseError(f"not an HTTP response: {_excerpt(buffer)}")
        end = buffer.find(b"\r\n\r\n", self._searchFrom)
        if end == -1:
            if len(buffer) > self._maxBytes:
                raise ProxyResponseError(
                    f"response header block exceeds {self._maxBytes} bytes"
                )
            self._searchFrom = max(0, len(buffer) - 3)
            if b"\r\n" not in buffer:
                return None
            # The status line is complete: check it now rather than after
            # the whole block, so garbage is refused at once.
            _parseStatusLine(buffer.split(b"\r\n", 1)[0])
            return None
        if end + 4 > self._maxBytes:
            raise ProxyResponseError(
                f"response header block exceeds {self._maxBytes} bytes"
            )
        block, leftover = buffer[:end], buffer[end + 4 :]
        lines = block.split(b"\r\n")
        status, reason = _parseStatusLine(lines[0])
        headers = [_parseHeaderLine(line) for line in lines[1:]]
        self._buffer = b""
        return ConnectResponse(status, reason, headers, leftover)


def _parseStatusLine(line: bytes) -> tuple[int, str]:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProxyResponseError(f"malformed status line: {_excerpt(line)}")
    reason = (match.group(2) or b"").decode("latin-1")
    return int(match.group(1)), reason


def _parseHeaderLine(line: bytes) -> tuple[bytes, bytes]:
    # No regular expression around the value's optional whitespace: one
    # that backtracks over it takes time quadratic in the line's length.
    name, colon, value = line.partition(b":")
    value = value.strip(b"\t ")
    if not colon or _HEADER_NAME.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
        raise ProxyResponseError(f"malformed header line: {_excerpt(line)}")
    return name, value


def _excerpt(data: bytes, limit: int = 40) -> str:
    """
    A short, printable rendering of untrusted bytes for a log line.
    """
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
