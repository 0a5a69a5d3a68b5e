"""
The name to CONNECT to, read from the first bytes a redirected client sends,
sans I/O.

A proxy with domain rules (Squid's C{dstdomain}, C{ssl_bump} peek policies)
needs C{CONNECT www.example.test:443}, not the bare address the kernel gives
Shifter.  The client says the name itself: in the server_name extension of
its TLS ClientHello (RFC 6066 section 3), or in the C{Host} header of a plain
HTTP/1.x request (RFC 9112 section 3.2).  These parsers read those bytes
without consuming them: the caller keeps every byte and sends it through the
tunnel unchanged.

Each parser takes I{all} the bytes the client has sent so far and returns
C{None} while it needs more, else a L{Sniffed} verdict.  A verdict depends
only on the bytes it was given, and more bytes never change it, so the
caller may re-call with whatever has arrived.  Every length is checked
against its enclosing structure, every wait is bounded by a byte limit, and
a name is only ever returned after L{isValidHostname} has accepted it and it
cannot be read as an IP address, so the client cannot inject anything into
the CONNECT request.  On any other outcome the caller connects to the
original address, which is always a safe choice.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shifter.connect import isValidHostname

# The largest ClientHello, record headers included, that Shifter waits for.
# Hellos with post-quantum key shares are 1.5-2 KiB today; big session
# tickets or many extensions stay well below this.
MAX_CLIENT_HELLO_BYTES = 32768

# The largest HTTP request header block (request line to the empty line)
# that Shifter waits for.
MAX_REQUEST_HEADER_BYTES = 8192

MODES = ("sni", "host", "auto")

_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXTENSION_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_RECORD_HEADER = 5
_MAX_RECORD = 2**14  # RFC 8446 5.1, RFC 5246 6.2.1
_HANDSHAKE_HEADER = 4

_TCHAR = frozenset(
    b"!#$%&'*+-.^_`|~0123456789" b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_VCHAR = frozenset(range(0x21, 0x7F))
_FIELD_VALUE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
_HTTP_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_PORT = re.compile(r"[0-9]*")
_HEX = re.compile(r"0x[0-9a-f]*")


@dataclass(frozen=True)
class Sniffed:
    """
    What the client's first bytes say about where to CONNECT.

    @ivar name: a validated, lowercased hostname without a trailing dot, to
        put into the CONNECT request with the original port; or C{None}:
        connect to the original IP address.
    @ivar reason: why, for the log line: C{"SNI"}, C{"Host header"}, or what
        was wrong.
    """

    name: str | None
    reason: str


class _NeedMore(Exception):
    """
    The bytes so far end inside a structure that has not ended yet.
    """


class _Malformed(Exception):
    """
    A structure does not fit its enclosing one; the message says which.
    """


class _Reader:
    """
    Reads a TLS structure from the bytes of a message received so far.

    C{end} is where the enclosing structure ends by its declared length:
    reading past it is malformed, whereas reading past the bytes received is
    only a reason to wait.  So a malformation is found from the declared
    lengths alone, the same however many bytes have arrived.
    """

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self._data = data
        self.pos = start
        self.end = end

    def take(self, count: int, what: str) -> bytes:
        if self.pos + count > self.end:
            raise _Malformed(f"{what} runs past its enclosing structure")
        if self.pos + count > len(self._data):
            raise _NeedMore()
        value = self._data[self.pos : self.pos + count]
        self.pos += count
        return value

    def integer(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, lengthSize: int, what: str) -> _Reader:
        """
        Read a length-prefixed vector and return a reader bounded by it,
        skipping past it here.
        """
        length = self.integer(lengthSize, f"{what} length")
        if self.pos + length > self.end:
            raise _Malformed(f"{what} length {length} runs past its enclosing structure")
        inner = _Reader(self._data, self.pos, self.pos + length)
        self.pos += length
        return inner

    def rest(self, what: str) -> bytes:
        return self.take(self.end - self.pos, what)

    def done(self) -> bool:
        return self.pos >= self.end


def sniffServerName(data: bytes, limit: int = MAX_CLIENT_HELLO_BYTES) -> Sniffed | None:
    """
    Read the server name from a TLS ClientHello.

    The handshake message is reassembled from as many handshake records as
    carry it (RFC 8446 5.1 lets a ClientHello span records, and large ones
    do), as long as those records, headers included, fit in C{limit} bytes.
    Bytes after the ClientHello are not looked at.

    @param data: every byte the client has sent so far.
    @param limit: the most bytes to wait for.
    @return: C{None} while more bytes are needed; else a L{Sniffed} with the
        host_name of the server_name extension, or with no name and why not.
    """
    try:
        message, recordProblem = _reassemble(data, limit)
    except _Malformed as e:
        return Sniffed(None, str(e))
    # A malformation inside the message is found from the bytes before any
    # record-layer problem, so it is what the same bytes always report.
    if len(message) < _HANDSHAKE_HEADER:
        return recordProblem
    length = int.from_bytes(message[1:4], "big")
    try:
        verdict = _parseClientHello(_Reader(message, _HANDSHAKE_HEADER, _HANDSHAKE_HEADER + length))
    except _Malformed as e:
        return Sniffed(None, f"malformed ClientHello: {e}")
    except _NeedMore:
        return recordProblem
    if recordProblem is not None:
        return recordProblem
    if len(message) < _HANDSHAKE_HEADER + length:
        return None
    return verdict


def _reassemble(data: bytes, limit: int) -> tuple[bytes, Sniffed | None]:
    """
    Gather the bytes of the first handshake message from the records in
    C{data}.

    @return: the message bytes received so far (header included), and
        C{None} or the verdict that ends the record walk: a record-layer
        problem, or the limit.  The message bytes are cut at the point of
        that problem.
    @raise _Malformed: with the whole reason, for what is not TLS at all.
    """
    message = bytearray()
    needed: int | None = None  # the message's full length, once known
    pos = 0
    first = True
    while needed is None or len(message) < needed:
        if pos + _RECORD_HEADER > limit:
            return bytes(message), _overLimit(limit)
        header = data[pos : pos + _RECORD_HEADER]
        problem = _checkRecordHeader(header, first)
        if problem is not None:
            return bytes(message), problem
        if len(header) < _RECORD_HEADER:
            return bytes(message), None
        first = False
        cursor = pos + _RECORD_HEADER
        recordEnd = cursor + int.from_bytes(header[3:5], "big")
        while cursor < recordEnd and (needed is None or len(message) < needed):
            # Take the message header first, then the rest of the message:
            # whatever follows the message in its last record is not ours.
            goal = _HANDSHAKE_HEADER if needed is None else needed
            want = min(recordEnd - cursor, goal - len(message))
            if cursor + want > limit:
                return bytes(message), _overLimit(limit)
            chunk = data[cursor : cursor + want]
            message += chunk
            cursor += len(chunk)
            if message and message[0] != _HANDSHAKE_CLIENT_HELLO:
                return bytes(message), Sniffed(
                    None, f"malformed ClientHello: handshake type {message[0]}, not a ClientHello"
                )
            if len(chunk) < want:
                return bytes(message), None
            if needed is None and len(message) == _HANDSHAKE_HEADER:
                needed = _HANDSHAKE_HEADER + int.from_bytes(message[1:4], "big")
                if needed + _RECORD_HEADER > limit:
                    return bytes(message), _overLimit(limit)
        pos = recordEnd
    return bytes(message), None


def _checkRecordHeader(header: bytes, first: bool) -> Sniffed | None:
    """
    Check as much of a record header as has arrived: the very first byte
    already tells a TLS handshake from anything else.
    """
    if header[:1] not in (b"", bytes([_CONTENT_TYPE_HANDSHAKE])):
        if first:
            raise _Malformed("not a TLS handshake")
        return Sniffed(None, f"malformed ClientHello: record of type {header[0]} inside it")
    if header[1:2] not in (b"", b"\x03"):
        if first:
            raise _Malformed("not a TLS handshake")
        return Sniffed(None, f"malformed ClientHello: record version {header[1]}.x")
    if len(header) == _RECORD_HEADER:
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD:
            return Sniffed(None, f"malformed ClientHello: record length {length}")
    return None


def _overLimit(limit: int) -> Sniffed:
    return Sniffed(None, f"ClientHello over {limit} bytes")


def _parseClientHello(body: _Reader) -> Sniffed:
    """
    Walk a ClientHello body (RFC 8446 4.1.2, RFC 5246 7.4.1.2) to its
    server_name extension, checking every length on the way.

    @raise _Malformed: if a length does not fit.
    @raise _NeedMore: if the bytes end before the walk does.
    """
    version = body.take(2, "client version")
    if version[0] != 3:
        raise _Malformed(f"client version {version.hex()}")
    body.take(32, "random")
    sessionId = body.vector(1, "session id")
    if sessionId.end - sessionId.pos > 32:
        raise _Malformed(f"session id of {sessionId.end - sessionId.pos} bytes")
    cipherSuites = body.vector(2, "cipher suites")
    count = cipherSuites.end - cipherSuites.pos
    if count == 0 or count % 2:
        raise _Malformed(f"cipher suites length {count}")
    compression = body.vector(1, "compression methods")
    if compression.done():
        raise _Malformed("no compression methods")
    if body.done():
        # SSL 3.0 and old TLS 1.0 clients may send no extensions at all.
        return Sniffed(None, "no SNI extension")
    extensions = body.vector(2, "extensions")
    if not body.done():
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    hostName: bytes | None = None
    sawServerName = False
    while not extensions.done():
        extensionType = extensions.integer(2, "extension type")
        extension = extensions.vector(2, "extension")
        if extensionType in seen:
            raise _Malformed(f"extension {extensionType} twice")
        seen.add(extensionType)
        if extensionType == _EXTENSION_SERVER_NAME:
            sawServerName = True
            hostName = _parseServerName(extension)
    if not sawServerName:
        return Sniffed(None, "no SNI extension")
    if hostName is None:
        return Sniffed(None, "no host_name in the SNI extension")
    return _checkName(hostName, "SNI", "invalid server name", "server name is an IP address")


def _parseServerName(extension: _Reader) -> bytes | None:
    """
    Read the server_name extension (RFC 6066 section 3): a non-empty list of
    (name_type, name) in which only host_name (type 0) is defined, at most
    once.

    @return: the host_name's bytes, or C{None} if the list holds none.
    """
    names = extension.vector(2, "server name list")
    if not extension.done():
        raise _Malformed("bytes after the server name list")
    if names.done():
        raise _Malformed("empty server name list")
    hostName: bytes | None = None
    while not names.done():
        nameType = names.integer(1, "server name type")
        name = names.vector(2, "server name")
        if nameType != _NAME_TYPE_HOST_NAME:
            continue
        if hostName is not None:
            raise _Malformed("two host names")
        hostName = name.rest("server name")
        if not hostName:
            raise _Malformed("empty host name")
    return hostName


def sniffHost(data: bytes, limit: int = MAX_REQUEST_HEADER_BYTES) -> Sniffed | None:
    """
    Read the host from the C{Host} header of an HTTP/1.x request.

    The request line must be C{method SP request-target SP HTTP/1.x} and
    every line must end with CRLF (RFC 9112 sections 2.2 and 3); a prefix
    that cannot begin such a request is refused at once.  The header block
    must end within C{limit} bytes.  The port in the C{Host} value is
    ignored: the caller always keeps the original port.

    @param data: every byte the client has sent so far.
    @param limit: the most bytes to wait for.
    @return: C{None} while more bytes are needed; else a L{Sniffed} with the
        host, or with no name and why not.
    """
    view = data[:limit]
    lines = view.split(b"\r\n")
    partial = lines.pop()  # what follows the last CRLF: an unfinished line
    if not lines:
        if not _requestLinePrefix(partial):
            return Sniffed(None, "not an HTTP request")
        return _waitOrOver(data, limit)
    if not _requestLine(lines[0]):
        return Sniffed(None, "not an HTTP request")
    host: bytes | None = None
    for line in lines[1:]:
        if not line:
            if host is None:
                return Sniffed(None, "no Host header")
            return _checkHostValue(host)
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TCHAR:
            return Sniffed(None, f"malformed header line: {_excerpt(line)}")
        value = value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            return Sniffed(None, f"malformed header line: {_excerpt(line)}")
        if name.lower() == b"host":
            if host is not None:
                return Sniffed(None, "several Host headers")
            host = value
    return _waitOrOver(data, limit)


def _waitOrOver(data: bytes, limit: int) -> Sniffed | None:
    if len(data) >= limit:
        return Sniffed(None, f"HTTP request header over {limit} bytes")
    return None


def _requestLine(line: bytes) -> bool:
    """
    Whether C{line} is a whole HTTP/1.x request line.
    """
    parts = line.split(b" ")
    return (
        len(parts) == 3
        and bool(parts[0])
        and set(parts[0]) <= _TCHAR
        and bool(parts[1])
        and set(parts[1]) <= _VCHAR
        and _HTTP_VERSION.fullmatch(parts[2]) is not None
    )


def _requestLinePrefix(prefix: bytes) -> bool:
    """
    Whether C{prefix} may still become an HTTP/1.x request line, so that
    anything else is refused without waiting for a line end.
    """
    if prefix.endswith(b"\r"):
        return _requestLine(prefix[:-1])
    parts = prefix.split(b" ")
    if len(parts) > 3 or not set(parts[0]) <= _TCHAR:
        return False
    if len(parts) == 1:
        return True
    if not parts[0] or not set(parts[1]) <= _VCHAR:
        return False
    if len(parts) == 2:
        return True
    version = parts[2]
    return (
        bool(parts[1])
        and len(version) <= 8
        and (_HTTP_VERSION.fullmatch(version + b"HTTP/1.0"[len(version) :]) is not None)
    )


def _checkHostValue(value: bytes) -> Sniffed:
    """
    Take the host out of a C{Host} value (RFC 9110 7.2: C{uri-host [ ":"
    port ]}), dropping the port.
    """
    if not value:
        return Sniffed(None, "empty Host header")
    text = value.decode("latin-1")
    if text.startswith("["):
        literal, bracket, port = text[1:].partition("]")
        if bracket and (not port or (port[0] == ":" and _PORT.fullmatch(port[1:]))):
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                pass
            else:
                return Sniffed(None, f"Host header is an IP address: [{literal}]")
        return Sniffed(None, f"invalid Host header: {_excerpt(value)}")
    host, colon, port = text.partition(":")
    if colon and _PORT.fullmatch(port) is None:
        return Sniffed(None, f"invalid Host header: {_excerpt(value)}")
    return _checkName(
        host.encode("latin-1"), "Host header", "invalid Host header", "Host header is an IP address"
    )


def _checkName(raw: bytes, source: str, invalid: str, numeric: str) -> Sniffed:
    """
    Normalize a name the client sent and accept it only if it is a hostname
    that no resolver could take for an IP address.

    @param source: the reason to give when the name is accepted.
    @param invalid: how to begin the reason when it is not a hostname.
    @param numeric: how to begin the reason when it is an IP address.
    """
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        return Sniffed(None, f"{invalid}: {_excerpt(raw)}")
    if name.endswith("."):
        name = name[:-1]
    if not name or name.endswith(".") or not isValidHostname(name):
        return Sniffed(None, f"{invalid}: {_excerpt(raw)}")
    if _looksNumeric(name):
        return Sniffed(None, f"{numeric}: {name}")
    return Sniffed(name, source)


def _looksNumeric(name: str) -> bool:
    """
    Whether C{name} ends in a number, as the WHATWG URL standard puts it:
    C{inet_aton} and browsers then read it as an IPv4 address (C{127.1},
    C{0x7f000001}), so a domain rule in the proxy would not see it as a
    name.  Real top-level domains never look like this.
    """
    last = name.rsplit(".", 1)[-1]
    return last.isdigit() or _HEX.fullmatch(last) is not None


def sniffTarget(mode: str, data: bytes) -> Sniffed | None:
    """
    Read the CONNECT target as C{--connect-target} says.

    @param mode: C{"sni"}, C{"host"}, or C{"auto"}: a TLS handshake (first
        byte 0x16) is read for SNI, an HTTP request (first byte an uppercase
        letter, as every method name begins) for Host, and anything else is
        refused at once.
    @param data: every byte the client has sent so far.
    @return: C{None} while more bytes are needed, else the verdict.
    @raise ValueError: for an unknown mode.
    """
    if mode == "sni":
        return sniffServerName(data)
    if mode == "host":
        return sniffHost(data)
    if mode != "auto":
        raise ValueError(f"unknown connect target mode: {mode!r}")
    if not data:
        return None
    if data[0] == _CONTENT_TYPE_HANDSHAKE:
        return sniffServerName(data)
    if 0x41 <= data[0] <= 0x5A:
        return sniffHost(data)
    return Sniffed(None, "neither a TLS handshake nor an HTTP request")


def _excerpt(data: bytes, limit: int = 40) -> str:
    """
    A short, printable rendering of untrusted bytes for a log line.
    """
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
