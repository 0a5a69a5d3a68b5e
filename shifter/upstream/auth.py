"""
Authentication to the upstream proxy, sans I/O: the C{Proxy-Authorization}
values Shifter sends with CONNECT and the reading of a 407's
C{Proxy-Authenticate} challenges.

Credentials are sent only after the proxy has asked for them: the first
CONNECT to a proxy carries none, and the proxy's 407 says which scheme it
wants.  Basic (RFC 7617) is then sent up front to that proxy from then on
(it asked for it); C{preemptiveBasic} sends it from the first CONNECT, for
proxies known to want it.  Once a proxy has asked for Digest (RFC 7616),
Basic is never sent to it again.

Digest under concurrency: a nonce's count must only go up as the proxy sees
it (Squid invalidates a nonce whose count goes back, and serves each nonce
a limited number of times), but concurrent tunnels reach the proxy on
separate connections in no set order.  So a tunnel answers its first
challenge with the nonce of that very challenge (count 1: its first use),
and only a nonce whose first use the proxy has accepted is shared with the
tunnels that follow, counting on.  A 407 to a request that used a shared
nonce, if it is stale or brings another nonce, means that nonce was spent,
not that the password is wrong: the tunnel answers again with its own new
nonce, without spending its one retry (at most L{MAX_RENEWALS} times).  A
challenge that cannot be answered gives a one-line reason instead of
another attempt, so a wrong password is a log line, not a retry loop.

NTLM (L{shifter.upstream.ntlm}) authenticates a connection, not a request:
once a proxy has asked for it, each tunnel's first CONNECT carries a
negotiate message of a context of its own, and the 407 that answers it
holds the challenge; the authenticate message goes with the next CONNECT
on that same connection (L{AuthExchange.sameConnection}).  A 407 to the
authenticate message means the credentials were refused.  Basic is never
sent to a proxy that asked for NTLM.

The per-tunnel side of this is an L{AuthExchange} (L{ProxyAuth.exchange}).

Of the schemes a 407 offers, the strongest Shifter can answer for that
proxy is taken: Negotiate (Kerberos, L{shifter.upstream.kerberos}), then
NTLM, then Digest, then Basic.  A proxy that offers Negotiate or NTLM is
never sent Basic, whatever else it offers: it is a site that keeps
passwords off the wire.  Once a proxy has asked for Negotiate, each new
tunnel sends it a token of its own with its first CONNECT.

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
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import quote

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from shifter.upstream.kerberos import NegotiateLogin
    from shifter.upstream.ntlm import NTLMContext

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
# Negotiate and NTLM, strongest first, both above every Digest.
_SCHEME_STRENGTH = {"negotiate": 5, "ntlm": 4}
# Schemes after which Basic is never sent to the proxy.
_NO_BASIC_AFTER = frozenset({"negotiate", "ntlm"})
# What credentials alone can answer.
PASSWORD_SCHEMES = frozenset({"basic", "digest", "ntlm"})
_MAX_NONCE_COUNT = 0xFFFFFFFF
# How many nonces to remember, each with its count.
_KNOWN_NONCES = 32
# Retries a tunnel may make for a spent nonce (stale, or replaced), on top
# of its one retry to answer a challenge.
MAX_RENEWALS = 3


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
    if challenge.scheme in _SCHEME_STRENGTH:
        return _SCHEME_STRENGTH[challenge.scheme]
    if challenge.scheme != "digest":
        return 0
    params = challenge.params
    if "nonce" not in params or "realm" not in params:
        return 0
    # Everything echoed back must fit in a quoted-string of ASCII.
    for name in ("nonce", "realm", "opaque"):
        if name in params and _QUOTABLE.fullmatch(params[name]) is None:
            return 0
    answerable, qop = _digestQop(challenge)
    if not answerable:
        return 0
    algorithm = params.get("algorithm", "MD5").upper()
    if qop is None and algorithm.endswith("-SESS"):
        # The session key hashes a cnonce, which is only sent with a qop
        # (RFC 7616 3.4): without one the proxy cannot check the answer.
        return 0
    return _ALGORITHMS.get(algorithm, 0)


def strongestChallenge(
    challenges: list[Challenge], schemes: Iterable[str] = PASSWORD_SCHEMES
) -> Challenge | None:
    """
    The challenge to answer: Negotiate, else NTLM, else Digest SHA-256,
    else Digest MD5, else Basic, of those whose scheme is in C{schemes}
    (what Shifter can answer for this proxy); the first offered among
    equals.  C{None} if none can be answered.
    """
    schemes = frozenset(schemes)
    best: Challenge | None = None
    for challenge in challenges:
        if challenge.scheme not in schemes:
            continue
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


def _missing(offered: set[str]) -> str:
    """
    What would let Shifter answer a scheme offered that it cannot, as a
    hint for the log line.
    """
    if "negotiate" in offered:
        return "; Negotiate needs the gateway's keytab (--proxy-keytab) and the proxy's host name"
    return ""


def _randomCnonce() -> str:
    return secrets.token_hex(16)


class _Nonce:
    """
    A Digest challenge being answered, with the client nonce and the last
    count used with it (shared by every tunnel that uses the nonce, so that
    counts only go up in the order requests are made).
    """

    def __init__(self, challenge: Challenge, cnonce: str) -> None:
        self.challenge = challenge
        self.value = challenge.params["nonce"]
        self.cnonce = cnonce
        self.count = 0
        self.spent = False

    def nextCount(self) -> int | None:
        if self.count >= _MAX_NONCE_COUNT:
            return None
        self.count += 1
        return self.count


class ProxyAuth:
    """
    Per-proxy authentication state: the credentials, what the proxy has
    asked for, and the Digest nonce shared by its tunnels.

    One instance serves every tunnel to one proxy; each tunnel talks to it
    through an L{AuthExchange} of its own (L{exchange}).
    """

    def __init__(
        self,
        credentials: Credentials | None,
        cnonce: Callable[[], str] = _randomCnonce,
        preemptiveBasic: bool = False,
        negotiate: NegotiateLogin | None = None,
    ) -> None:
        """
        @param credentials: the user name and password for this proxy, if
            any (Basic, Digest).
        @param cnonce: makes a client nonce; a test passes a fixed one.
        @param preemptiveBasic: send Basic with the first CONNECT, before
            any challenge.
        @param negotiate: the gateway's Kerberos login for this proxy, if
            it has one (Negotiate).
        """
        self.credentials = credentials
        self.newCnonce = cnonce
        self.preemptiveBasic = preemptiveBasic and credentials is not None
        self.basic = self.preemptiveBasic
        self.digest = False
        self.ntlm = False
        self._ntlmCredential: object = None
        self.negotiateLogin = negotiate
        # The proxy asked for Negotiate: each tunnel sends a token up front.
        self.negotiate = False
        # The proxy offered a scheme after which Basic is never sent.
        self.noBasic = False
        self.shared: _Nonce | None = None
        self._nonces: OrderedDict[str, _Nonce] = OrderedDict()

    @property
    def scheme(self) -> str:
        """
        What a new tunnel sends up front: C{"negotiate"} (the proxy asked
        for it), C{"ntlm"} (a negotiate message), C{"digest"} (a shared
        nonce is known), C{"basic"}, or C{"none"}.
        """
        if self.negotiate:
            return "negotiate"
        if self.ntlm:
            return "ntlm"
        if self.shared is not None and not self.shared.spent:
            return "digest"
        if self.basic and not self.digest and not self.noBasic:
            return "basic"
        return "none"

    def ntlmContext(self) -> NTLMContext:
        """
        A new NTLM context for one connection, from the credentials hashed
        once for all of them.
        """
        from shifter.upstream.ntlm import NTLMContext, ntlmCredential

        assert self.credentials is not None  # NTLM was chosen for them
        if self._ntlmCredential is None:
            self._ntlmCredential = ntlmCredential(self.credentials.username, self.credentials.password)
        return NTLMContext(self._ntlmCredential)

    @property
    def schemes(self) -> frozenset[str]:
        """
        The schemes Shifter can answer for this proxy.
        """
        schemes: set[str] = set()
        if self.credentials is not None:
            schemes |= PASSWORD_SCHEMES
        if self.negotiateLogin is not None:
            schemes.add("negotiate")
        return frozenset(schemes)

    def start(self) -> Deferred[None] | None:
        """
        Start what logging in needs beforehand (the Kerberos tickets).

        @return: C{None}, or a C{Deferred} that fires once the first
            login has succeeded or failed.
        """
        if self.negotiateLogin is not None:
            return self.negotiateLogin.start()
        return None

    def stop(self) -> None:
        if self.negotiateLogin is not None:
            self.negotiateLogin.stop()

    def exchange(self) -> AuthExchange:
        """
        The authentication of one tunnel with this proxy, for every
        CONNECT the tunnel sends it.
        """
        return AuthExchange(self)

    def nonceFor(self, challenge: Challenge) -> _Nonce:
        """
        The state of the nonce C{challenge} carries: the one already known
        (its count goes on), or a new one.
        """
        value = challenge.params["nonce"]
        known = self._nonces.get(value)
        if known is None:
            known = self._nonces[value] = _Nonce(challenge, self.newCnonce())
            while len(self._nonces) > _KNOWN_NONCES:
                self._nonces.popitem(last=False)
        else:
            self._nonces.move_to_end(value)
        return known


class AuthExchange:
    """
    The authentication of one tunnel with one proxy.

    The tunnel adds L{headersFor} to each CONNECT it sends the proxy.  On a
    407 it passes the C{Proxy-Authenticate} values to L{challenged}: if that
    returns C{None} it sends the CONNECT again on a new connection (with
    L{headersFor} again), else it ends with the reason.  On a 2xx it calls
    L{succeeded}.  The exchange bounds the retries: one to answer a
    challenge, and up to L{MAX_RENEWALS} for spent nonces.

    @ivar sameConnection: set by L{challenged}: the next CONNECT (NTLM's
        authenticate message) must go on the connection that carried the
        407, not on a new one.
    """

    def __init__(self, auth: ProxyAuth) -> None:
        self._auth = auth
        self._sent: _Nonce | str | None = None  # what the last CONNECT carried
        self._sentShared = False
        self._own: _Nonce | None = None  # from this tunnel's own 407
        self._answered = False
        self._token: str | None = None  # a Negotiate answer made on a 407
        self.renewals = 0
        self._ntlm: NTLMContext | None = None
        self._ntlmAnswer: str | None = None  # the authenticate message to send
        self.sameConnection = False

    def headersFor(self, method: str, target: str) -> list[tuple[str, str]]:
        """
        The headers for the next CONNECT of this tunnel to the proxy.

        @param method: the request method, C{"CONNECT"}.
        @param target: the request-target, the C{host:port} of the CONNECT.
        @return: a C{Proxy-Authorization} header, or none: a Negotiate
            token of its own if the proxy asked for Negotiate, else Digest
            with this tunnel's own nonce if a 407 gave it one, else with the shared
            nonce if there is one, else Basic if the proxy asked for it (or
            C{preemptiveBasic}), else nothing.
        """
        auth = self._auth
        if self._ntlmAnswer is not None:
            value, self._ntlmAnswer = self._ntlmAnswer, None
            self._sent, self._sentShared = "ntlm-authenticate", False
            return [("Proxy-Authorization", value)]
        if auth.negotiate:
            return self._negotiateHeaders()
        if auth.ntlm:
            self._ntlm = auth.ntlmContext()
            self._sent, self._sentShared = "ntlm-negotiate", False
            return [("Proxy-Authorization", self._ntlm.negotiate())]
        shared = auth.shared
        for nonce, isShared in ((self._own, False), (shared, True)):
            if nonce is None or (isShared and nonce.spent):
                continue
            count = nonce.nextCount()
            if count is None:
                nonce.spent = True
                continue
            self._sent, self._sentShared = nonce, isShared
            assert auth.credentials is not None  # Digest was chosen for them
            value = digestAuthorization(
                auth.credentials, nonce.challenge, method, target, count, nonce.cnonce
            )
            return [("Proxy-Authorization", value)]
        if auth.basic and not auth.digest and not auth.noBasic and auth.credentials is not None:
            self._sent, self._sentShared = "basic", False
            return [("Proxy-Authorization", basicAuthorization(auth.credentials))]
        self._sent, self._sentShared = None, False
        return []

    def _negotiateHeaders(self) -> list[tuple[str, str]]:
        """
        A Negotiate token of this CONNECT's own: the one made when the 407
        came, else a new one.  If none can be made now, nothing is sent,
        and the proxy's 407 brings the reason (L{challenged}).
        """
        token, self._token = self._token, None
        login = self._auth.negotiateLogin
        if token is None and login is not None:
            from shifter.upstream.kerberos import NegotiateError

            try:
                token = login.authorization()
            except NegotiateError:
                token = None
        if token is None:
            self._sent, self._sentShared = None, False
            return []
        self._sent, self._sentShared = "negotiate", False
        return [("Proxy-Authorization", token)]

    def challenged(self, headerValues: list[bytes]) -> str | None:
        """
        Learn from a 407 and say whether the tunnel may send its CONNECT
        again.

        The strongest challenge Shifter can answer for this proxy is taken:
        Negotiate, NTLM, Digest SHA-256, Digest MD5, then Basic (never
        Basic if Negotiate or NTLM is offered).  After NTLM's negotiate
        message, the 407 holds the challenge: if it can be answered,
        L{sameConnection} is set.

        @param headerValues: the 407's C{Proxy-Authenticate} values.
        @return: C{None} if a new CONNECT can answer (send it once more),
            else why not, as one line for the log: no supported scheme,
            the credentials refused, Basic asked for after Digest or beside
            Negotiate or NTLM, or no Negotiate token (and why).
        """
        auth = self._auth
        self.sameConnection = False
        challenges = parseChallenges(headerValues)
        if self._sent == "ntlm-negotiate":
            return self._ntlmChallenged(challenges)
        if self._sent == "ntlm-authenticate":
            return "proxy refused the credentials (NTLM)"
        offered = {c.scheme for c in challenges}
        best = strongestChallenge(challenges, auth.schemes)
        sent, sentShared = self._sent, self._sentShared
        if isinstance(sent, _Nonce):
            # Whatever the reason, this nonce is not to be handed out again.
            sent.spent = True
            self._own = None
        if offered & _NO_BASIC_AFTER:
            auth.noBasic = True
        if best is None or (best.scheme == "basic" and auth.noBasic):
            names = ", ".join(sorted(offered)) or "none"
            if best is not None:
                return (f"proxy offers {names}: Basic is never sent to a proxy that offers Negotiate or NTLM"
                        f"{_missing(offered)}")
            return f"proxy offers no supported authentication scheme (offered: {names}){_missing(offered)}"
        if best.scheme == "negotiate":
            return self._negotiateChallenged(sent)
        if best.scheme == "ntlm":
            if self._answered:
                return "proxy refused the credentials"
            self._answered = True
            auth.ntlm = True
            return None
        if best.scheme == "basic":
            if auth.ntlm:
                return "proxy asks for Basic after NTLM; not sending the password in clear"
            if auth.digest:
                return "proxy asks for Basic after Digest; not sending the password in clear"
            if sent == "basic":
                return "proxy refused the credentials (Basic)"
            if self._answered:
                return "proxy refused the credentials"
            self._answered = True
            auth.basic = True
            return None
        auth.digest = True
        stale = best.params.get("stale", "").lower() == "true"
        nonce = auth.nonceFor(best)
        if isinstance(sent, _Nonce):
            renew = stale or (sentShared and nonce is not sent)
            if not renew or self.renewals >= MAX_RENEWALS:
                return "proxy refused the credentials (Digest)"
            self.renewals += 1
        elif self._answered:
            return "proxy refused the credentials"
        else:
            self._answered = True
        if nonce.spent:
            # The proxy named a nonce already spent; it still counts on.
            nonce.spent = False
        self._own = nonce
        return None

    @property
    def awaitsChallenge(self) -> bool:
        """
        Whether the last CONNECT carried NTLM's negotiate message: a 407 to
        it holds the challenge, to be answered on the same connection.
        """
        return self._sent == "ntlm-negotiate"

    def _ntlmChallenged(self, challenges: list[Challenge]) -> str | None:
        """
        The 407 that answered NTLM's negotiate message: its challenge is
        answered on the same connection.
        """
        tokens = [c.token68 for c in challenges if c.scheme == "ntlm" and c.token68 is not None]
        if not tokens or self._ntlm is None:
            return "proxy refused the NTLM negotiate message (its 407 holds no NTLM challenge)"
        from shifter.upstream.ntlm import NTLMError

        try:
            self._ntlmAnswer = self._ntlm.authenticate(tokens[0])
        except NTLMError as e:
            return f"NTLM: {e}"
        self.sameConnection = True
        return None

    def _negotiateChallenged(self, sent: _Nonce | str | None) -> str | None:
        """
        The proxy asks for Negotiate: answer once with a new token, unless
        the one just sent was refused or none can be made.
        """
        auth = self._auth
        login = auth.negotiateLogin
        assert login is not None  # Negotiate was chosen for it
        auth.negotiate = True
        if sent == "negotiate":
            return f"Negotiate: proxy refused the Kerberos login of {login.keeper.who}"
        if self._answered:
            return "proxy refused the credentials"
        from shifter.upstream.kerberos import NegotiateError

        try:
            self._token = login.authorization()
        except NegotiateError as e:
            return f"Negotiate: {e}"
        self._answered = True
        return None

    def succeeded(self) -> None:
        """
        The proxy opened the tunnel: the nonce this tunnel used is good, and
        is shared with the tunnels that follow if none is.
        """
        sent = self._sent
        auth = self._auth
        if isinstance(sent, _Nonce) and not sent.spent:
            if auth.shared is None or auth.shared.spent:
                auth.shared = sent
