"""
The HTTP CONNECT handshake, sans I/O: the request Shifter sends and a strict,
bounded parser for the proxy's answer.

Nothing here touches a socket, so every path is tested with plain bytes.
"""

from __future__ import annotations

import ipaddress
import re

from shifter.interfaces import ConnectResponse

# Status line, headers and the blank line together may not exceed this.
MAX_RESPONSE_HEADER_BYTES = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")
_PREFIX = b"HTTP/"
# Control characters (C0, DEL, C1) and every kind of whitespace.
_UNSAFE = re.compile(r"[\x00-\x20\x7f-\xa0\s]")
_HEX_LABEL = re.compile(r"0x[0-9a-f]*")
_HEADER_NAME_TEXT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_TEXT = re.compile(r"[\t\x20-\x7e]*")


class ProxyResponseError(Exception):
    """
    The proxy's answer to CONNECT is not an HTTP response Shifter accepts.

    The message is the reason given in the log line.
    """


def isValidHostname(name: str) -> bool:
    """
    Whether C{name} is a DNS hostname (letters, digits and hyphens in labels
    of at most 63 characters, at most 253 in all): the only names Shifter
    puts into a CONNECT request.
    """
    return _HOSTNAME.fullmatch(name) is not None


class InvalidAuthority(ValueError):
    """
    A host or port that must not go into a CONNECT request; the message
    says why, for the log line.
    """


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def isDottedQuad(host: str) -> bool:
    """
    Whether C{host} is an IPv4 address in the one form the kernel writes
    (four decimal numbers up to 255, no leading zeros): one pattern,
    cheaper than parsing, for the addresses every connection carries.
    """
    return _DOTTED_QUAD.fullmatch(host) is not None


def checkHost(host: str) -> str:
    """
    The one check every host Shifter asks a proxy for goes through: the
    destination's address, a sniffed name, a policy's target.

    Accepted: an IPv4 address in dotted-quad form, an IPv6 address
    (written back compressed), or a DNS hostname (L{isValidHostname})
    whose last label is not a number (C{127.1} or C{0x7f000001} would be
    read as an IPv4 address by the proxy's resolver).  Refused: anything
    else, an IPv6 zone ID (C{fe80::1%eth0}: it means nothing to the proxy,
    and Python's parser accepts any text after the C{%}), and any control
    character or whitespace.

    @return: the host as it goes into the request.
    @raise InvalidAuthority: with the reason.
    """
    if not isinstance(host, str):
        raise InvalidAuthority(f"host is not text: {host!r}")
    if isDottedQuad(host):
        return host  # already what the request holds (the usual case)
    if not host:
        raise InvalidAuthority("empty host")
    if _UNSAFE.search(host):
        raise InvalidAuthority(f"control character or whitespace in host {host!r}")
    if "%" in host:
        raise InvalidAuthority(f"IPv6 zone ID in host {host!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return address.compressed
    if not isValidHostname(host):
        raise InvalidAuthority(f"not an IP address or hostname: {host!r}")
    last = host.removesuffix(".").rsplit(".", 1)[-1].lower()
    if last.isdigit() or _HEX_LABEL.fullmatch(last):
        raise InvalidAuthority(f"hostname that reads as an IPv4 address: {host!r}")
    return host


def checkPort(port: int) -> int:
    """
    A TCP port for a CONNECT request: an integer from 1 to 65535.

    @raise InvalidAuthority: with the reason.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidAuthority(f"port is not an integer: {port!r}")
    if not 0 < port < 65536:
        raise InvalidAuthority(f"port out of range: {port!r}")
    return port


def formatAuthority(host: str, port: int) -> str:
    """
    Format C{host:port} for a CONNECT request target, with IPv6 literals in
    brackets, after L{checkHost} and L{checkPort}.

    @raise InvalidAuthority: (a C{ValueError}) if C{host} or C{port} is
        refused, so that nothing can be injected into the request.
    """
    port = checkPort(port)
    host = checkHost(host)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def formatConnectRequest(
    host: str, port: int, headers: list[tuple[str, str]] | None = None
) -> bytes:
    """
    Build the CONNECT request for C{host:port}, with its C{Host} header and
    any extra C{headers} (for example C{Proxy-Authorization}).

    @raise InvalidAuthority: if the host or port is refused.
    @raise ValueError: if a header's name is not a token or its value holds
        anything but visible ASCII, spaces and tabs.
    """
    authority = formatAuthority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    for name, value in headers or ():
        if _HEADER_NAME_TEXT.fullmatch(name) is None:
            raise ValueError(f"invalid header name {name!r}")
        if _HEADER_VALUE_TEXT.fullmatch(value) is None:
            raise ValueError(f"control character, line break or non-ASCII in header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


# Squid's answer to CONNECT (and most proxies'), as HTTP/1.1 and 1.0.
_COMMON_ANSWERS = (
    (b"HTTP/1.1 200 Connection established\r\n\r\n", "1.1"),
    (b"HTTP/1.0 200 Connection established\r\n\r\n", "1.0"),
)


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
        # (status, reason) once a valid status line has arrived, before
        # the rest of the header block: enough to know the proxy answers.
        self.statusLine: tuple[int, str] | None = None

    def feed(self, data: bytes) -> ConnectResponse | None:
        """
        Add bytes received from the proxy.

        @return: the complete L{ConnectResponse} once the header block has
            ended, else C{None} while more bytes are needed.
        @raise ProxyResponseError: if the bytes cannot be a valid answer.
        """
        if not self._buffer:
            for answer, version in _COMMON_ANSWERS:
                if data.startswith(answer):
                    # The answer nearly every tunnel gets, whole in one
                    # read: known without parsing it.
                    self.statusLine = (200, "Connection established")
                    return ConnectResponse(200, "Connection established", [], data[len(answer):], version)
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
            if self.statusLine is None:
                self.statusLine = _parseStatusLine(buffer.split(b"\r\n", 1)[0])
            return None
        if end + 4 > self._maxBytes:
            raise ProxyResponseError(
                f"response header block exceeds {self._maxBytes} bytes"
            )
        block, leftover = buffer[:end], buffer[end + 4 :]
        lines = block.split(b"\r\n")
        status, reason = self.statusLine = _parseStatusLine(lines[0])
        headers = [_parseHeaderLine(line) for line in lines[1:]]
        self._buffer = b""
        version = "1.0" if lines[0].startswith(b"HTTP/1.0") else "1.1"
        return ConnectResponse(status, reason, headers, leftover, version)


def _parseStatusLine(line: bytes) -> tuple[int, str]:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProxyResponseError(f"malformed status line: {_excerpt(line)}")
    reason = (match.group(3) or b"").decode("latin-1")
    return int(match.group(2)), reason


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


# The body of a refused answer that is read so that the same connection can
# carry the next request (an NTLM challenge's 407 page) may not exceed
# this, framing included.
MAX_REFUSAL_BODY_BYTES = 64 * 1024
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})[\t ]*(?:;[\t \x21-\x7e\x80-\xff]*)?")


def _tokens(response: ConnectResponse, name: bytes) -> list[str]:
    """
    The comma-separated elements of every C{name} header of C{response},
    lowercased.
    """
    values = [value for key, value in response.headers if key.lower() == name]
    return [t.strip().lower() for value in values for t in value.decode("latin-1").split(",") if t.strip()]


def reuseRefusal(response: ConnectResponse, maxBody: int = MAX_REFUSAL_BODY_BYTES) -> str | None:
    """
    Why the connection that carried C{response}, an answer that did not
    open the tunnel, cannot carry another request, or C{None} if it can:
    the proxy keeps it open and the body's end can be found (by its
    C{Content-Length}, or chunked) within C{maxBody} bytes.

    @return: the reason as the end of a sentence ("the proxy ..."), for
        the log line.
    """
    # Proxy-Connection: what older proxies (and ISA/TMG) send instead.
    connection = _tokens(response, b"connection") + _tokens(response, b"proxy-connection")
    if "close" in connection:
        return "it says Connection: close"
    if response.version == "1.0" and "keep-alive" not in connection:
        return "it answers HTTP/1.0 without keep-alive"
    codings = _tokens(response, b"transfer-encoding")
    lengths = {value.strip() for name, value in response.headers if name.lower() == b"content-length"}
    if codings:
        if lengths:
            return "its answer has both Content-Length and Transfer-Encoding"
        if codings != ["chunked"]:
            return "its answer's body ends only when the connection closes (Transfer-Encoding: " + ", ".join(codings) + ")"
        return None
    if not lengths:
        return "its answer has no Content-Length (the body ends only when the connection closes)"
    if len(lengths) > 1 or not lengths.pop().isdigit():
        return "its answer's Content-Length is not one number"
    length = int(_header(response, b"content-length"))
    if length > maxBody:
        return f"its answer's body of {length} bytes exceeds {maxBody}"
    return None


def _header(response: ConnectResponse, name: bytes) -> bytes:
    for key, value in response.headers:
        if key.lower() == name:
            return value.strip()
    raise KeyError(name)


# The states of a chunked body being read.
_SIZE, _DATA, _DATA_END, _TRAILER = "size", "data", "data-end", "trailer"


class BodySkipper:
    """
    Reads past the body of an answer that did not open the tunnel, so that
    its connection can carry the next request: by C{Content-Length}, or
    chunk by chunk (RFC 9112 7.1), in at most L{MAX_REFUSAL_BODY_BYTES}.
    The body itself is thrown away.

    Build it only for an answer that L{reuseRefusal} accepts.
    """

    def __init__(self, response: ConnectResponse, maxBytes: int = MAX_REFUSAL_BODY_BYTES) -> None:
        self._maxBytes = maxBytes
        self._seen = 0
        self._buffer = b""
        self._chunked = bool(_tokens(response, b"transfer-encoding"))
        self._state = _SIZE
        self._remaining = 0 if self._chunked else int(_header(response, b"content-length"))

    def feed(self, data: bytes) -> bytes | None:
        """
        Add bytes received after the answer's header block.

        @return: C{None} while the body goes on; once it has ended, the
            bytes that followed it (usually none).
        @raise ProxyResponseError: if the body is malformed or too long.
        """
        if not self._chunked:
            used = min(len(data), self._remaining)
            self._remaining -= used
            return data[used:] if self._remaining == 0 else None
        data = self._buffer + data
        self._buffer = b""
        pos = 0
        while True:
            if self._state == _DATA:
                used = min(len(data) - pos, self._remaining)
                self._count(used)
                pos += used
                self._remaining -= used
                if self._remaining:
                    return None
                self._state = _DATA_END
                continue
            end = data.find(b"\r\n", pos)
            if end == -1:
                self._buffer = data[pos:]
                self._count(0)
                return None
            line = data[pos:end]
            self._count(end + 2 - pos)
            pos = end + 2
            if self._state == _DATA_END:
                if line:
                    raise ProxyResponseError(f"malformed chunked body: {_excerpt(line)} after a chunk")
                self._state = _SIZE
            elif self._state == _SIZE:
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise ProxyResponseError(f"malformed chunk size line: {_excerpt(line)}")
                self._remaining = int(match.group(1), 16)
                self._state = _DATA if self._remaining else _TRAILER
            elif not line:  # the empty line that ends the trailer section
                return data[pos:]

    def _count(self, n: int) -> None:
        self._seen += n
        if self._seen + len(self._buffer) > self._maxBytes:
            raise ProxyResponseError(f"the answer's body exceeds {self._maxBytes} bytes")
