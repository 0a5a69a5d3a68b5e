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

A sniffer (L{NameSniffer}, or L{ServerNameSniffer} and L{HostSniffer}) is
fed each chunk the client sends, once, as it arrives, and parses each byte
once: the ClientHello is reassembled from its records and walked as its
bytes come in, the request head line by line.  So a client that trickles
its hello in one-byte records costs a constant amount per read, not a
re-parse of everything so far.  L{NameSniffer.feed} returns C{None} while
more bytes are needed, then a L{Sniffed} verdict, the same from then on;
L{NameSniffer.finish} ends the wait (a timeout, the client's end of
sending) with a verdict either way.  A verdict depends only on the bytes
before the point where it was reached, so it is the same however those
bytes were cut into reads.

Every length is checked against its enclosing structure, every wait is
bounded (a ClientHello's records, headers included, by bytes and by
number; a request head by bytes), and a name is only ever returned after
L{isValidHostname} has accepted it, it cannot be read as an IP address and
it is not C{localhost} or under it, so the client cannot inject anything
into the CONNECT request nor send the proxy to itself.  On any other
outcome the caller connects to the original address, which is always a
safe choice.

A ClientHello is also read for Encrypted Client Hello (ECH, the TLS
C{encrypted_client_hello} extension, 0xfe0d): with ECH the name the client
really wants travels encrypted, and the server_name read is a cover name
(the ECH configuration's C{public_name}, such as C{cloudflare-ech.com}).
The verdict's C{ech} says what was seen: see L{ECH_VERDICTS} and
L{_parseEncryptedClientHello} for what the bytes can and cannot tell.

The functions L{sniffServerName}, L{sniffHost} and L{sniffTarget} give the
verdict for a whole byte string at once.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Generator

from shifter.upstream.connect import isValidHostname

# The largest ClientHello, record headers included, that Shifter waits for.
# Hellos with post-quantum key shares are 1.5-2 KiB today; big session
# tickets or many extensions stay well below this.
MAX_CLIENT_HELLO_BYTES = 32768

# The most TLS records a ClientHello may come in.  Clients send it in one
# record, two when it is over 16 KiB, a few when a tool splits it on
# purpose; a hello in tiny records is refused (the address is used) rather
# than waited for.
MAX_CLIENT_HELLO_RECORDS = 64

# The largest HTTP request header block (request line to the empty line)
# that Shifter waits for.
MAX_REQUEST_HEADER_BYTES = 8192

MODES = ("sni", "host", "auto")

_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXTENSION_SERVER_NAME = 0
_EXTENSION_ENCRYPTED_CLIENT_HELLO = 0xFE0D
_ECH_OUTER = 0
_ECH_INNER = 1
# The smallest payload a real ECH offer can have: the AEAD's tag (16 bytes
# for every HPKE AEAD that encrypts) over the smallest
# EncodedClientHelloInner, which must hold a version, a random, an empty
# session id, one cipher suite, the null compression method, and the
# extensions a TLS 1.3 inner hello cannot do without: the
# encrypted_client_hello of the inner type (5 bytes) and supported_versions
# offering TLS 1.3 (7 bytes).
_ECH_MIN_PAYLOAD = 16 + (2 + 32 + 1 + 4 + 2 + 2 + 5 + 7)

# What a verdict's C{ech} may be.
ECH = "ech"  # the outer ECH extension: a real offer or GREASE, the bytes cannot tell
ECH_GREASE = "grease"  # the outer extension, and it cannot be a real offer
ECH_INNER = "inner"  # the inner type, which belongs inside the encryption, not on the wire
ECH_UNKNOWN = "unknown"  # a TLS handshake whose ClientHello was not read through
ECH_VERDICTS = (ECH, ECH_GREASE, ECH_INNER, ECH_UNKNOWN)
# The verdicts under which the name read may be a cover name, or no one
# can say that it is not: what a rule's C{ech = true} matches.
ECH_MAY_HIDE = frozenset((ECH, ECH_INNER, ECH_UNKNOWN))
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
_VERSION_PREFIX = b"HTTP/1."
_DIGITS = frozenset(b"0123456789")
_PORT = re.compile(r"[0-9]*")
_HEX = re.compile(r"0x[0-9a-f]*")
_SP, _CR = 0x20, 0x0D


# The longest request path kept (for a PAC script's URL).
MAX_PATH = 2048


@dataclass(frozen=True)
class Sniffed:
    """
    What the client's first bytes say about where to CONNECT.

    @ivar name: a validated, lowercased hostname without a trailing dot, to
        put into the CONNECT request with the original port; or C{None}:
        connect to the original IP address.
    @ivar reason: why, for the log line: C{"SNI"}, C{"Host header"}, or what
        was wrong.
    @ivar ech: C{None} when the bytes hold no C{encrypted_client_hello}
        extension (a ClientHello without it, an HTTP request, not TLS at
        all); else one of L{ECH_VERDICTS}: C{"ech"}, the outer extension
        (a real offer, and C{name} is the cover name, or GREASE: only the
        server can tell); C{"grease"}, the outer extension shaped so that
        it cannot be a real offer; C{"inner"}, the inner type, which never
        belongs on the wire; C{"unknown"}, a TLS handshake whose
        ClientHello was not read through (malformed, too big, cut short)
        before any such extension was seen.
    @ivar path: for a name from a C{Host} header, the request's target when
        it is a path (origin form, at most L{MAX_PATH} bytes); else C{None}.
        Not compared: two verdicts for the same name are the same verdict.
    """

    name: str | None
    reason: str
    ech: str | None = None
    path: str | None = field(default=None, compare=False)

    @property
    def coverName(self) -> bool:
        """
        Whether the name read is ECH's outer name: a cover for a name
        that travels encrypted (or GREASE's real name: no one but the
        server can tell).
        """
        return self.name is not None and self.ech == ECH


class _Malformed(Exception):
    """
    A structure does not fit its enclosing one; the message says which.
    """


class _NotTLS(_Malformed):
    """
    The first bytes are not those of a TLS handshake record.
    """


class _Reader:
    """
    Reads a TLS structure from the bytes of a message as they arrive.

    C{end} is where the enclosing structure ends by its declared length:
    reading past it is malformed, whereas reading past the bytes received
    yields until more have arrived.  So a malformation is found from the
    declared lengths alone, the same however many bytes have arrived.
    Each method is a generator, driven by L{ServerNameSniffer}: it yields
    while it waits, and returns what it read.
    """

    def __init__(self, data: bytearray, start: int, end: int) -> None:
        self._data = data
        self.pos = start
        self.end = end

    def take(self, count: int, what: str) -> Generator[None, None, bytes]:
        if self.pos + count > self.end:
            raise _Malformed(f"{what} runs past its enclosing structure")
        while self.pos + count > len(self._data):
            yield
        value = bytes(self._data[self.pos : self.pos + count])
        self.pos += count
        return value

    def integer(self, size: int, what: str) -> Generator[None, None, int]:
        return int.from_bytes((yield from self.take(size, what)), "big")

    def vector(self, lengthSize: int, what: str) -> Generator[None, None, _Reader]:
        """
        Read a length-prefixed vector's length and return a reader bounded
        by it, skipping past it here.
        """
        length = yield from self.integer(lengthSize, f"{what} length")
        if self.pos + length > self.end:
            raise _Malformed(f"{what} length {length} runs past its enclosing structure")
        inner = _Reader(self._data, self.pos, self.pos + length)
        self.pos += length
        return inner

    def rest(self, what: str) -> Generator[None, None, bytes]:
        return (yield from self.take(self.end - self.pos, what))

    def done(self) -> bool:
        return self.pos >= self.end


class ServerNameSniffer:
    """
    Reads the server name from a TLS ClientHello, fed in chunks.

    The handshake message is reassembled from as many handshake records as
    carry it (RFC 8446 5.1 lets a ClientHello span records, and large ones
    do), as long as those records, headers included, fit in C{limit} bytes
    and number at most C{maxRecords}.  Bytes after the ClientHello are not
    looked at.

    @ivar verdict: the verdict once there is one, else C{None}.
    """

    verdict: Sniffed | None = None

    def __init__(
        self, limit: int = MAX_CLIENT_HELLO_BYTES, maxRecords: int = MAX_CLIENT_HELLO_RECORDS
    ) -> None:
        self._limit = limit
        self._maxRecords = maxRecords
        self._consumed = 0  # bytes of records taken so far, headers included
        self._records = 0
        self._header = bytearray()  # the record header being read
        self._recordLeft = 0  # fragment bytes of the current record not yet read
        self._message = bytearray()
        self._needed: int | None = None  # the message's full length, once known
        self._parser: Generator[None, None, Sniffed] | None = None
        self._parsed: Sniffed | None = None  # the parse's verdict, kept until the message ends
        self._seen = _Seen()  # what the parse has seen so far of ECH

    def feed(self, data: bytes) -> Sniffed | None:
        """
        Read the next bytes the client sent.

        @return: C{None} while more bytes are needed; else a L{Sniffed}
            with the host_name of the server_name extension, or with no
            name and why not.
        """
        if self.verdict is None:
            try:
                self._feed(data)
            except _NotTLS as e:
                self.verdict = Sniffed(None, str(e))
                return self.verdict
            except _Malformed as e:
                self.verdict = Sniffed(None, str(e))
            if self.verdict is not None and self.verdict is not self._parsed:
                self.verdict = self.unfinished(self.verdict.reason)
        return self.verdict

    def unfinished(self, reason: str) -> Sniffed:
        """
        The verdict when the ClientHello is not read through, for
        C{reason}: no name, and as much as is known of ECH.  A TLS
        handshake cut short before an C{encrypted_client_hello} extension
        was seen is C{"unknown"}: the rest might have held one.
        """
        ech = self._seen.ech
        if ech is None and self._consumed:
            ech = ECH_UNKNOWN
        return Sniffed(None, reason, ech)

    def _feed(self, data: bytes) -> None:
        at, size = 0, len(data)
        while at < size and self.verdict is None:
            if not self._recordLeft:
                at = self._readHeader(data, at)
            else:
                at = self._readFragment(data, at)

    def _readHeader(self, data: bytes, at: int) -> int:
        header = self._header
        if not header and self._consumed + _RECORD_HEADER > self._limit:
            self.verdict = self._overLimit()
            return at
        take = min(_RECORD_HEADER - len(header), len(data) - at)
        header += data[at : at + take]
        self._consumed += take
        self.verdict = _checkRecordHeader(header, first=not self._records)
        if self.verdict is None and len(header) == _RECORD_HEADER:
            self._records += 1
            self._recordLeft = int.from_bytes(header[3:5], "big")
            header.clear()
            if self._records > self._maxRecords:
                self.verdict = Sniffed(None, f"ClientHello in more than {self._maxRecords} records")
        return at + take

    def _readFragment(self, data: bytes, at: int) -> int:
        message = self._message
        # Take the message header first, then the rest of the message:
        # whatever follows the message in its last record is not ours.
        goal = _HANDSHAKE_HEADER if self._needed is None else self._needed
        want = min(self._recordLeft, goal - len(message))
        if self._consumed + want > self._limit:
            self.verdict = self._overLimit()
            return at
        take = min(want, len(data) - at)
        wasEmpty = not message
        message += data[at : at + take]
        self._consumed += take
        self._recordLeft -= take
        if wasEmpty and message[0] != _HANDSHAKE_CLIENT_HELLO:
            self.verdict = Sniffed(
                None, f"malformed ClientHello: handshake type {message[0]}, not a ClientHello"
            )
            return at + take
        if self._needed is None and len(message) == _HANDSHAKE_HEADER:
            self._needed = _HANDSHAKE_HEADER + int.from_bytes(message[1:4], "big")
            if self._needed + _RECORD_HEADER > self._limit:
                self.verdict = self._overLimit()
                return at + take
            self._parser = _parseClientHello(_Reader(message, _HANDSHAKE_HEADER, self._needed), self._seen)
        if self._parser is not None:
            self._advance()
        if self.verdict is None and len(message) == self._needed:
            # The parse has read every byte it can: it has ended.
            self.verdict = self._parsed
        return at + take

    def _advance(self) -> None:
        """
        Let the ClientHello parse read what has arrived.
        """
        try:
            next(self._parser)  # type: ignore[arg-type]
        except StopIteration as stop:
            self._parser = None
            self._parsed = stop.value
        except _Malformed as e:
            self._parser = None
            self.verdict = Sniffed(None, f"malformed ClientHello: {e}")

    def _overLimit(self) -> Sniffed:
        return Sniffed(None, f"ClientHello over {self._limit} bytes")


def _checkRecordHeader(header: bytes | bytearray, first: bool) -> Sniffed | None:
    """
    Check as much of a record header as has arrived: the very first byte
    already tells a TLS handshake from anything else.

    @raise _Malformed: for what is not TLS at all.
    """
    if header[:1] not in (b"", bytes([_CONTENT_TYPE_HANDSHAKE])):
        if first:
            raise _NotTLS("not a TLS handshake")
        return Sniffed(None, f"malformed ClientHello: record of type {header[0]} inside it")
    if header[1:2] not in (b"", b"\x03"):
        if first:
            raise _NotTLS("not a TLS handshake")
        return Sniffed(None, f"malformed ClientHello: record version {header[1]}.x")
    if len(header) == _RECORD_HEADER:
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD:
            return Sniffed(None, f"malformed ClientHello: record length {length}")
    return None


class _Seen:
    """
    What a ClientHello's parse has seen of ECH so far, kept apart from the
    parse so that a hello found malformed later still says it.

    @ivar ech: C{None}, or one of L{ECH}, L{ECH_GREASE}, L{ECH_INNER}.
    """

    ech: str | None = None


def _parseClientHello(body: _Reader, echSeen: _Seen | None = None) -> Generator[None, None, Sniffed]:
    """
    Walk a ClientHello body (RFC 8446 4.1.2, RFC 5246 7.4.1.2) through its
    extensions, reading its server_name and encrypted_client_hello,
    checking every length on the way.

    @param echSeen: where to note ECH as soon as it is seen.
    @raise _Malformed: if a length does not fit.
    """
    if echSeen is None:
        echSeen = _Seen()
    version = yield from body.take(2, "client version")
    if version[0] != 3:
        raise _Malformed(f"client version {version.hex()}")
    yield from body.take(32, "random")
    sessionId = yield from body.vector(1, "session id")
    if sessionId.end - sessionId.pos > 32:
        raise _Malformed(f"session id of {sessionId.end - sessionId.pos} bytes")
    cipherSuites = yield from body.vector(2, "cipher suites")
    count = cipherSuites.end - cipherSuites.pos
    if count == 0 or count % 2:
        raise _Malformed(f"cipher suites length {count}")
    compression = yield from body.vector(1, "compression methods")
    if compression.done():
        raise _Malformed("no compression methods")
    if body.done():
        # SSL 3.0 and old TLS 1.0 clients may send no extensions at all.
        return Sniffed(None, "no SNI extension")
    extensions = yield from body.vector(2, "extensions")
    if not body.done():
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    hostName: bytes | None = None
    sawServerName = False
    while not extensions.done():
        extensionType = yield from extensions.integer(2, "extension type")
        extension = yield from extensions.vector(2, "extension")
        if extensionType in seen:
            raise _Malformed(f"extension {extensionType} twice")
        seen.add(extensionType)
        if extensionType == _EXTENSION_SERVER_NAME:
            sawServerName = True
            hostName = yield from _parseServerName(extension)
        elif extensionType == _EXTENSION_ENCRYPTED_CLIENT_HELLO:
            # Noted before its content is checked: a malformed one is
            # still an ECH extension to the rules.
            echSeen.ech = ECH
            echSeen.ech = yield from _parseEncryptedClientHello(extension)
    ech = echSeen.ech
    if not sawServerName:
        return Sniffed(None, "no SNI extension", ech)
    if hostName is None:
        return Sniffed(None, "no host_name in the SNI extension", ech)
    verdict = _checkName(hostName, "SNI", "server name")
    return Sniffed(verdict.name, verdict.reason, ech)


def _parseEncryptedClientHello(extension: _Reader) -> Generator[None, None, str]:
    """
    Read an C{encrypted_client_hello} extension (draft-ietf-tls-esni,
    section 5)::

        enum { outer(0), inner(1) } ECHClientHelloType;
        struct {
            ECHClientHelloType type;
            select (type) {
                case outer: HpkeSymmetricCipherSuite cipher_suite;  (2 + 2 bytes)
                            uint8 config_id;
                            opaque enc<0..2^16-1>;
                            opaque payload<1..2^16-1>;
                case inner: Empty;
            };
        } ECHClientHello;

    A real offer and GREASE ECH (section 6.2: a random config_id, a cipher
    suite the client supports, a random enc of the KEM's size, a random
    payload as long as a real one would be) are built to look the same:
    which one it is depends on whether the config_id and the key belong
    to the server's ECH configuration (from its HTTPS DNS record), which
    only the server knows.  So the outer type is C{"ech"}, unless its
    shape rules a real offer out: an empty enc (only the hello after a
    HelloRetryRequest may leave it empty, and a connection's first hello
    is the one read here) or a payload too short to hold any encrypted
    ClientHelloInner; then C{"grease"}.

    The inner type is sent only inside the encrypted payload (and by a
    client-facing server to its back end): on a client's connection it
    hides nothing, since the hello it is in is the real one, and a server
    should refuse it; it is C{"inner"}, which rules treat as ECH.

    @raise _Malformed: for an unknown type or a length that does not fit.
    """
    kind = yield from extension.integer(1, "ECH type")
    if kind == _ECH_INNER:
        if not extension.done():
            raise _Malformed("bytes after the inner ECH type")
        return ECH_INNER
    if kind != _ECH_OUTER:
        raise _Malformed(f"ECH type {kind}")
    yield from extension.take(4, "ECH cipher suite")
    yield from extension.take(1, "ECH config id")
    enc = yield from extension.vector(2, "ECH enc")
    payload = yield from extension.vector(2, "ECH payload")
    if not extension.done():
        raise _Malformed("bytes after the ECH payload")
    payloadLength = payload.end - payload.pos
    if payloadLength == 0:
        raise _Malformed("empty ECH payload")
    if enc.end == enc.pos or payloadLength < _ECH_MIN_PAYLOAD:
        return ECH_GREASE
    return ECH


def _parseServerName(extension: _Reader) -> Generator[None, None, bytes | None]:
    """
    Read the server_name extension (RFC 6066 section 3): a non-empty list of
    (name_type, name) in which only host_name (type 0) is defined, at most
    once.

    @return: the host_name's bytes, or C{None} if the list holds none.
    """
    names = yield from extension.vector(2, "server name list")
    if not extension.done():
        raise _Malformed("bytes after the server name list")
    if names.done():
        raise _Malformed("empty server name list")
    hostName: bytes | None = None
    while not names.done():
        nameType = yield from names.integer(1, "server name type")
        name = yield from names.vector(2, "server name")
        if nameType != _NAME_TYPE_HOST_NAME:
            continue
        if hostName is not None:
            raise _Malformed("two host names")
        hostName = yield from name.rest("server name")
        if not hostName:
            raise _Malformed("empty host name")
    return hostName


class HostSniffer:
    """
    Reads the host from the C{Host} header of an HTTP/1.x request, fed in
    chunks.

    The request line must be C{method SP request-target SP HTTP/1.x} and
    every line must end with CRLF (RFC 9112 sections 2.2 and 3); a prefix
    that cannot begin such a request is refused at once.  The header block
    must end within C{limit} bytes.  The port in the C{Host} value is
    ignored: the caller always keeps the original port.  Each complete
    line is read once; the request line is also checked byte by byte as
    it arrives.

    @ivar verdict: the verdict once there is one, else C{None}.
    """

    verdict: Sniffed | None = None

    def __init__(self, limit: int = MAX_REQUEST_HEADER_BYTES) -> None:
        self._limit = limit
        self._consumed = 0
        self._partial = bytearray()  # what follows the last CRLF
        self._lines = 0
        self._host: bytes | None = None
        self._path: str | None = None
        # The request line as far as it has been checked: which part
        # (method, target, version), that part's length, the version's
        # bytes, and whether a CR ended it.
        self._checked = 0
        self._part = 0
        self._partLength = 0
        self._version = bytearray()
        self._carriageReturn = False

    def feed(self, data: bytes) -> Sniffed | None:
        """
        Read the next bytes the client sent.

        @return: C{None} while more bytes are needed; else a L{Sniffed}
            with the host, or with no name and why not.
        """
        if self.verdict is not None:
            return self.verdict
        chunk = data[: self._limit - self._consumed]
        self._consumed += len(chunk)
        partial = self._partial
        # A CRLF may straddle the previous chunk and this one.
        search = max(0, len(partial) - 1)
        partial += chunk
        start = 0
        while self.verdict is None:
            end = partial.find(b"\r\n", search)
            if end == -1:
                break
            self.verdict = self._line(bytes(partial[start:end]))
            start = search = end + 2
        del partial[:start]
        if self.verdict is None and not self._lines:
            self._checkRequestLinePrefix()
        if self.verdict is None and self._consumed >= self._limit:
            self.verdict = Sniffed(None, f"HTTP request header over {self._limit} bytes")
        return self.verdict

    def _line(self, line: bytes) -> Sniffed | None:
        """
        Read one complete line.
        """
        self._lines += 1
        if self._lines == 1:
            if not _requestLine(line):
                return Sniffed(None, "not an HTTP request")
            target = line.split(b" ")[1]
            if target.startswith(b"/") and len(target) <= MAX_PATH:
                self._path = target.decode("ascii")
            return None
        if not line:
            if self._host is None:
                return Sniffed(None, "no Host header")
            sniffed = _checkHostValue(self._host)
            if sniffed.name is not None and self._path is not None:
                sniffed = Sniffed(sniffed.name, sniffed.reason, ech=sniffed.ech, path=self._path)
            return sniffed
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TCHAR:
            return Sniffed(None, f"malformed header line: {_excerpt(line)}")
        value = value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            return Sniffed(None, f"malformed header line: {_excerpt(line)}")
        if name.lower() == b"host":
            if self._host is not None:
                return Sniffed(None, "several Host headers")
            self._host = value
        return None

    def _checkRequestLinePrefix(self) -> None:
        """
        Check the bytes of the unfinished request line not checked yet:
        refuse at once what cannot become an HTTP/1.x request line.
        """
        partial = self._partial
        for byte in partial[self._checked :]:
            if not self._requestLineByte(byte):
                self.verdict = Sniffed(None, "not an HTTP request")
                return
        self._checked = len(partial)

    def _requestLineByte(self, byte: int) -> bool:
        if self._carriageReturn:
            # A CR not followed by LF: the line would go on past it.
            return False
        if byte == _SP:
            if not self._partLength or self._part == 2:
                return False
            self._part += 1
            self._partLength = 0
            return True
        self._partLength += 1
        if self._part == 0:
            return byte in _TCHAR
        if self._part == 1:
            return byte in _VCHAR
        version = self._version
        if byte == _CR:
            self._carriageReturn = True
            return len(version) == len(_VERSION_PREFIX) + 1
        if len(version) < len(_VERSION_PREFIX):
            ok = byte == _VERSION_PREFIX[len(version)]
        else:
            ok = len(version) == len(_VERSION_PREFIX) and byte in _DIGITS
        version.append(byte)
        return ok


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
    return _checkName(host.encode("latin-1"), "Host header", "Host header")


def _checkName(raw: bytes, source: str, what: str) -> Sniffed:
    """
    Normalize a name the client sent and accept it only if it is a hostname
    that no resolver could take for an IP address and that does not name
    the proxy's own host.

    @param source: the reason to give when the name is accepted.
    @param what: what the name is, to begin the reason when it is refused.
    """
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        return Sniffed(None, f"invalid {what}: {_excerpt(raw)}")
    if name.endswith("."):
        name = name[:-1]
    if not name or name.endswith(".") or not isValidHostname(name):
        return Sniffed(None, f"invalid {what}: {_excerpt(raw)}")
    if _looksNumeric(name):
        return Sniffed(None, f"{what} is an IP address: {name}")
    if isLocalhostName(name):
        return Sniffed(None, f"{what} is a localhost name: {name}")
    return Sniffed(name, source)


def isLocalhostName(name: str) -> bool:
    """
    Whether C{name} is C{localhost} or a name under it, which resolvers
    answer with a loopback address (RFC 6761 section 6.3): asking the proxy
    for it would have the proxy connect to itself.

    @param name: a lowercased hostname without a trailing dot.
    """
    return name == "localhost" or name.endswith(".localhost")


def _looksNumeric(name: str) -> bool:
    """
    Whether C{name} ends in a number, as the WHATWG URL standard puts it:
    C{inet_aton} and browsers then read it as an IPv4 address (C{127.1},
    C{0x7f000001}), so a domain rule in the proxy would not see it as a
    name.  Real top-level domains never look like this.
    """
    last = name.rsplit(".", 1)[-1]
    return last.isdigit() or _HEX.fullmatch(last) is not None


class NameSniffer:
    """
    Reads the CONNECT target as C{--connect-target} says, from chunks fed
    as they arrive.

    In C{auto} mode a TLS handshake (first byte 0x16) is read for SNI, an
    HTTP request (first byte an uppercase letter, as every method name
    begins) for Host, and anything else is refused at once.

    @ivar verdict: the verdict once there is one, else C{None}.
    """

    def __init__(self, mode: str) -> None:
        """
        @param mode: C{"sni"}, C{"host"} or C{"auto"}.
        @raise ValueError: for an unknown mode.
        """
        if mode not in MODES:
            raise ValueError(f"unknown connect target mode: {mode!r}")
        self.mode = mode
        self._inner: ServerNameSniffer | HostSniffer | None = None
        self._verdict: Sniffed | None = None
        if mode == "sni":
            self._inner = ServerNameSniffer()
        elif mode == "host":
            self._inner = HostSniffer()

    @property
    def verdict(self) -> Sniffed | None:
        if self._verdict is not None:
            return self._verdict
        return self._inner.verdict if self._inner is not None else None

    def feed(self, data: bytes) -> Sniffed | None:
        """
        Read the next bytes the client sent (each byte once: pass only
        what is new).

        @return: C{None} while more bytes are needed, else the verdict,
            the same from then on.
        """
        if self._verdict is not None:
            return self._verdict
        if self._inner is None:
            if not data:
                return None
            if data[0] == _CONTENT_TYPE_HANDSHAKE:
                self._inner = ServerNameSniffer()
            elif 0x41 <= data[0] <= 0x5A:
                self._inner = HostSniffer()
            else:
                self._verdict = Sniffed(None, "neither a TLS handshake nor an HTTP request")
                return self._verdict
        return self._inner.feed(data)

    def finish(self, reason: str) -> Sniffed:
        """
        Stop waiting (the sniff timeout, or the client finished sending):
        the verdict if there is one, else no name, for C{reason}.
        """
        verdict = self.verdict
        if verdict is None:
            if isinstance(self._inner, ServerNameSniffer):
                verdict = self._inner.unfinished(reason)
            else:
                verdict = Sniffed(None, reason)
            self._verdict = verdict
        return verdict


def sniffServerName(
    data: bytes, limit: int = MAX_CLIENT_HELLO_BYTES, maxRecords: int = MAX_CLIENT_HELLO_RECORDS
) -> Sniffed | None:
    """
    Read the server name from a TLS ClientHello, all at once: what
    L{ServerNameSniffer} says after C{data}.

    @param data: every byte the client has sent so far.
    @param limit: the most bytes to wait for.
    @param maxRecords: the most records to wait for.
    @return: C{None} while more bytes are needed, else the verdict.
    """
    return ServerNameSniffer(limit, maxRecords).feed(data)


def sniffHost(data: bytes, limit: int = MAX_REQUEST_HEADER_BYTES) -> Sniffed | None:
    """
    Read the host from the C{Host} header of an HTTP/1.x request, all at
    once: what L{HostSniffer} says after C{data}.

    @param data: every byte the client has sent so far.
    @param limit: the most bytes to wait for.
    @return: C{None} while more bytes are needed, else the verdict.
    """
    return HostSniffer(limit).feed(data)


def sniffTarget(mode: str, data: bytes) -> Sniffed | None:
    """
    Read the CONNECT target as C{--connect-target} says, all at once: what
    L{NameSniffer} says after C{data}.

    @param mode: C{"sni"}, C{"host"}, or C{"auto"}.
    @param data: every byte the client has sent so far.
    @return: C{None} while more bytes are needed, else the verdict.
    @raise ValueError: for an unknown mode.
    """
    return NameSniffer(mode).feed(data)


def _excerpt(data: bytes, limit: int = 40) -> str:
    """
    A short, printable rendering of untrusted bytes for a log line.
    """
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
