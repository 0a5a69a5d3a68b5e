"""
Authentication to the upstream proxy, sans I/O: the C{Proxy-Authorization}
values Shifter sends with CONNECT and the reading of a 407's
C{Proxy-Authenticate} challenges.

Basic (RFC 7617) goes up front, since most proxies use it and it costs no
round trip.  Once a proxy has asked for Digest (RFC 7616), Shifter answers
every following CONNECT to it with Digest, reusing the proxy's nonce with an
incrementing nonce count, and never sends the password in the clear to it
again.  A challenge that cannot be answered gives a one-line reason instead
of another attempt, so a wrong password is a log line, not a retry loop.

Every header value built here is printable ASCII: nothing from a challenge
or from the credentials can add a line to the CONNECT request.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED_STRING = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x20-\x7e\x80-\xff])*"'
_END_OF_ELEMENT = r"[ \t]*(?=,|$)"
_PARAM = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|{_QUOTED_STRING}){_END_OF_ELEMENT}")
_TOKEN68 = re.compile(rf"([A-Za-z0-9._~+/-]+=*){_END_OF_ELEMENT}")
_SCHEME = re.compile(_TOKEN)
_SEPARATORS = re.compile(r"[ \t,]*")
_SPACES = re.compile(r" +")
_ALONE = re.compile(_END_OF_ELEMENT)
_QUOTED_PAIR = re.compile(r"\\(.)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTABLE = re.compile(r"[\t\x20-\x7e]*")

_HASHES = {"MD5": "md5", "SHA-256": "sha256"}
# Digest algorithms Shifter answers, strongest first, by RFC 7616's names.
_ALGORITHMS = {
    "SHA-256": 3,
    "SHA-256-SESS": 3,
    "MD5": 2,
    "MD5-SESS": 2,
}
_CANONICAL = {
    "SHA-256": "SHA-256",
    "SHA-256-SESS": "SHA-256-sess",
    "MD5": "MD5",
    "MD5-SESS": "MD5-sess",
}
_BASIC_STRENGTH = 1
_MAX_NONCE_COUNT = 0xFFFFFFFF
# How many answered nonces to remember, to tell a refusal from a new nonce.
_ANSWERED_NONCES = 32


@dataclass(frozen=True)
class Credentials:
    """
    A user name and password for the upstream proxy.

    @raise ValueError: if the user name holds a colon, which Basic cannot
        carry (RFC 7617 section 2), or either holds a control character: so
        a bad credentials file stops Shifter at start, not at the first
        connection.
    """

    username: str
    password: str

    def __post_init__(self) -> None:
        if ":" in self.username:
            raise ValueError("the proxy user name may not contain a colon")
        if _CONTROL.search(self.username) or _CONTROL.search(self.password):
            raise ValueError("the proxy user name and password may not contain control characters")

    def __repr__(self) -> str:
        # Keep the password out of logs and tracebacks.
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class Challenge:
    """
    One challenge from a C{Proxy-Authenticate} header (RFC 9110 11.6.1).

    @ivar scheme: the auth-scheme, lowercased (schemes are case-insensitive).
    @ivar params: the auth-params, names lowercased, quoted-string values
        unquoted.
    @ivar token68: the token68 form's value (for example Negotiate's), when
        the challenge has one instead of parameters.
    """

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


def basicAuthorization(credentials: Credentials) -> str:
    """
    The C{Proxy-Authorization} value for Basic: C{user:password} in UTF-8,
    base64-encoded (RFC 7617).
    """
    pair = f"{credentials.username}:{credentials.password}".encode("utf-8")
    return "Basic " + base64.b64encode(pair).decode("ascii")


def parseChallenges(values: list[bytes]) -> list[Challenge]:
    """
    Read the challenges in all the C{Proxy-Authenticate} values of a 407.

    One value may hold several challenges, separated by commas like their
    parameters (RFC 9110 11.6.1: C{auth-scheme [ 1*SP ( token68 /
    #auth-param ) ]}); a quoted-string may hold commas and escaped quotes.
    A challenge that does not follow the grammar, or repeats a parameter, is
    skipped, and the rest are still read.

    @param values: the raw header values, in the order received.
    @return: the well-formed challenges, in order.
    """
    challenges: list[Challenge] = []
    for value in values:
        challenges.extend(_parseValue(value.decode("latin-1")))
    return challenges


class _Pending:
    """
    A challenge being read, until the next one starts.
    """

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.params: dict[str, str] = {}
        self.token68: str | None = None
        self.broken = False

    def addParam(self, name: str, value: str) -> None:
        name = name.lower()
        if self.token68 is not None or name in self.params:
            self.broken = True
        self.params[name] = value

    def challenge(self) -> Challenge | None:
        if self.broken:
            return None
        return Challenge(self.scheme, self.params, self.token68)


def _parseValue(text: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    current: _Pending | None = None

    def finish() -> None:
        if current is not None:
            challenge = current.challenge()
            if challenge is not None:
                challenges.append(challenge)

    pos = 0
    while True:
        pos = _SEPARATORS.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string too
        if pos >= len(text):
            break
        param = _PARAM.match(text, pos)
        if param is not None:
            # A parameter of the challenge being read; one before any
            # challenge belongs to nothing and is dropped.
            if current is not None:
                current.addParam(param.group(1), _unquote(param.group(2)))
            pos = param.end()
            continue
        scheme = _SCHEME.match(text, pos)
        if scheme is None:
            if current is not None:
                current.broken = True
            pos = _skipElement(text, pos)
            continue
        finish()
        current = _Pending(scheme.group().lower())
        pos = scheme.end()
        alone = _ALONE.match(text, pos)
        if alone is not None:
            pos = alone.end()
            continue
        spaces = _SPACES.match(text, pos)
        if spaces is None:
            current.broken = True
            pos = _skipElement(text, pos)
            continue
        pos = spaces.end()
        param = _PARAM.match(text, pos)
        if param is not None:
            current.addParam(param.group(1), _unquote(param.group(2)))
            pos = param.end()
            continue
        token68 = _TOKEN68.match(text, pos)
        if token68 is not None:
            current.token68 = token68.group(1)
            pos = token68.end()
            continue
        current.broken = True
        pos = _skipElement(text, pos)
    finish()
    return challenges


def _skipElement(text: str, pos: int) -> int:
    """
    Skip to the next comma that is not inside a quoted-string: where the
    next list element, maybe a new challenge, begins.
    """
    quoted = False
    while pos < len(text):
        char = text[pos]
        if quoted and char == "\\":
            pos += 1
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            return pos
        pos += 1
    return pos


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


def _quote(value: str) -> str:
    """
    A quoted-string for C{value}, which must be printable ASCII (or tabs).
    """
    if _QUOTABLE.fullmatch(value) is None:
        raise ValueError(f"cannot quote {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hash(algorithm: str, data: str) -> str:
    name = _HASHES[algorithm.upper().removesuffix("-SESS")]
    return hashlib.new(name, data.encode("utf-8")).hexdigest()


def digestResponse(
    credentials: Credentials,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    algorithm: str = "MD5",
    qop: str | None = "auth",
    nc: int = 1,
    cnonce: str = "",
) -> str:
    """
    The Digest C{response} value (RFC 7616 section 3.4.1).

    For the C{-sess} algorithms A1 also holds the nonce and cnonce (3.4.2);
    with C{qop} C{None} the response is RFC 2069's, for proxies that offer
    no qop.  C{auth-int} hashes an empty body, which is what CONNECT has.

    @param algorithm: C{MD5}, C{SHA-256}, C{MD5-sess} or C{SHA-256-sess},
        in any case.
    @param qop: C{auth}, C{auth-int} or C{None}.
    @param nc: the nonce count, how many requests have used this nonce.
    @return: the response as lowercase hexadecimal.
    @raise ValueError: for an algorithm or qop Shifter does not implement.
    """
    key = algorithm.upper()
    if key not in _ALGORITHMS:
        raise ValueError(f"unsupported Digest algorithm {algorithm!r}")
    if qop not in ("auth", "auth-int", None):
        raise ValueError(f"unsupported Digest qop {qop!r}")
    a1 = f"{credentials.username}:{realm}:{credentials.password}"
    hashA1 = _hash(key, a1)
    if key.endswith("-SESS"):
        hashA1 = _hash(key, f"{hashA1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + _hash(key, "")
    hashA2 = _hash(key, a2)
    if qop is None:
        return _hash(key, f"{hashA1}:{nonce}:{hashA2}")
    return _hash(key, f"{hashA1}:{nonce}:{nc:08x}:{cnonce}:{qop}:{hashA2}")


def _digestQop(challenge: Challenge) -> tuple[bool, str | None]:
    """
    Which qop to answer C{challenge} with: C{auth} if offered, else
    C{auth-int}; C{None} if the challenge names none (RFC 2069).

    @return: whether the challenge can be answered, and the qop.
    """
    if "qop" not in challenge.params:
        return True, None
    offered = {option.strip().lower() for option in challenge.params["qop"].split(",")}
    for qop in ("auth", "auth-int"):
        if qop in offered:
            return True, qop
    return False, None


def _strength(challenge: Challenge) -> int:
    """
    How strong a supported challenge is (higher is stronger), or 0 if
    Shifter cannot answer it.
    """
    if challenge.scheme == "basic":
        return _BASIC_STRENGTH
    if challenge.scheme != "digest":
        return 0
    params = challenge.params
    if "nonce" not in params or "realm" not in params:
        return 0
    # Everything echoed back must fit in a quoted-string of ASCII.
    for name in ("nonce", "realm", "opaque"):
        if name in params and _QUOTABLE.fullmatch(params[name]) is None:
            return 0
    if not _digestQop(challenge)[0]:
        return 0
    return _ALGORITHMS.get(params.get("algorithm", "MD5").upper(), 0)


def strongestChallenge(challenges: list[Challenge]) -> Challenge | None:
    """
    The challenge to answer: Digest SHA-256, else Digest MD5, else Basic;
    the first offered among equals.  C{None} if none can be answered.
    """
    best: Challenge | None = None
    for challenge in challenges:
        if _strength(challenge) > (_strength(best) if best is not None else 0):
            best = challenge
    return best


def digestAuthorization(
    credentials: Credentials, challenge: Challenge, method: str, uri: str, nc: int, cnonce: str
) -> str:
    """
    The C{Proxy-Authorization} value answering a Digest C{challenge} for a
    request (RFC 7616 3.4).

    A user name that is not ASCII goes in C{username*} (RFC 8187), unless
    the proxy asked for C{userhash}.

    @param uri: the request-target; for CONNECT, the C{host:port} authority.
    @raise ValueError: if the challenge cannot be answered; check it with
        L{strongestChallenge} first.
    """
    if challenge.scheme != "digest" or not _strength(challenge):
        raise ValueError("not a Digest challenge Shifter can answer")
    params = challenge.params
    realm, nonce = params["realm"], params["nonce"]
    algorithm = params.get("algorithm")
    _, qop = _digestQop(challenge)
    response = digestResponse(
        credentials, realm, nonce, method, uri, algorithm or "MD5", qop, nc, cnonce
    )
    fields = []
    if params.get("userhash", "").lower() == "true":
        hashed = _hash(algorithm or "MD5", f"{credentials.username}:{realm}")
        fields += [f"username={_quote(hashed)}", "userhash=true"]
    elif _QUOTABLE.fullmatch(credentials.username):
        fields.append(f"username={_quote(credentials.username)}")
    else:
        fields.append(f"username*=UTF-8''{quote(credentials.username, safe='')}")
    fields += [f"realm={_quote(realm)}", f"uri={_quote(uri)}"]
    if algorithm is not None:
        fields.append(f"algorithm={_CANONICAL[algorithm.upper()]}")
    fields.append(f"nonce={_quote(nonce)}")
    if qop is not None:
        fields += [f"nc={nc:08x}", f"cnonce={_quote(cnonce)}", f"qop={qop}"]
    fields.append(f"response={_quote(response)}")
    if "opaque" in params:
        fields.append(f"opaque={_quote(params['opaque'])}")
    return "Digest " + ", ".join(fields)


def _randomCnonce() -> str:
    return secrets.token_hex(16)


class ProxyAuth:
    """
    Per-proxy authentication state.

    One instance serves every connection to one proxy, so a Digest nonce
    learned on one connection is used, with the next nonce count, by all
    that follow (RFC 7616 3.4: a client may reuse a nonce, counting).

    The caller adds L{headersFor} to each CONNECT; on a 407 it passes the
    C{Proxy-Authenticate} values to L{challenged} and, if that returns
    C{None}, sends the CONNECT again once on a new connection.
    """

    def __init__(self, credentials: Credentials, cnonce: Callable[[], str] = _randomCnonce) -> None:
        """
        @param credentials: the user name and password for this proxy.
        @param cnonce: makes a client nonce; a test passes a fixed one.
        """
        self._credentials = credentials
        self._newCnonce = cnonce
        self._digest: Challenge | None = None
        self._cnonce = ""
        self._nc = 0
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._basicSent = False

    @property
    def scheme(self) -> str:
        """
        C{"digest"} once the proxy has asked for Digest, else C{"basic"}.
        """
        return "digest" if self._digest is not None else "basic"

    def headersFor(self, method: str, target: str) -> list[tuple[str, str]]:
        """
        The headers to send with the next request to this proxy.

        @param method: the request method, C{"CONNECT"}.
        @param target: the request-target, the C{host:port} of the CONNECT.
        @return: a C{Proxy-Authorization} header: Basic until a Digest
            challenge has been seen, Digest from then on.  None once a nonce
            has been used 2**32 - 1 times, so that the proxy sends a new one.
        """
        if self._digest is None:
            self._basicSent = True
            return [("Proxy-Authorization", basicAuthorization(self._credentials))]
        if self._nc >= _MAX_NONCE_COUNT:
            return []
        self._nc += 1
        nonce = self._digest.params["nonce"]
        self._answered[nonce] = None
        self._answered.move_to_end(nonce)
        while len(self._answered) > _ANSWERED_NONCES:
            self._answered.popitem(last=False)
        value = digestAuthorization(
            self._credentials, self._digest, method, target, self._nc, self._cnonce
        )
        return [("Proxy-Authorization", value)]

    def challenged(self, headerValues: list[bytes]) -> str | None:
        """
        Learn from a 407 and say whether the next CONNECT can answer it.

        The strongest supported challenge is taken: Digest SHA-256, Digest
        MD5, then Basic.  A Digest challenge's nonce is kept for every
        following request; C{stale=true} means the password was right and
        only the nonce old.

        @param headerValues: the 407's C{Proxy-Authenticate} values.
        @return: C{None} if a new CONNECT can answer (send it once), else
            why not, as one line for the log: no supported scheme, or the
            credentials were refused (Basic already sent, or a Digest nonce
            already answered and not stale).
        """
        challenges = parseChallenges(headerValues)
        best = strongestChallenge(challenges)
        if best is None:
            offered = ", ".join(sorted({c.scheme for c in challenges})) or "none"
            return f"proxy offers no supported authentication scheme (offered: {offered})"
        if best.scheme == "basic":
            if self._digest is not None:
                return "proxy asks for Basic after Digest; not sending the password in clear"
            if self._basicSent:
                return "proxy refused the credentials (Basic)"
            return None
        nonce = best.params["nonce"]
        stale = best.params.get("stale", "").lower() == "true"
        if not stale and nonce in self._answered:
            return "proxy refused the credentials (Digest)"
        if self._digest is None or self._digest.params["nonce"] != nonce:
            # A new nonce: count from one again, with a client nonce of its
            # own, kept for as long as the nonce so that a -sess session
            # key means the same to every proxy implementation.
            self._nc = 0
            self._cnonce = self._newCnonce()
        self._digest = best
        return None
