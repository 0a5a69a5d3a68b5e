"""
Tests for L{shifter.auth}: Basic and Digest answers to a proxy's challenges,
the challenge parser, and the per-proxy state machine, on plain values.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from shifter.auth import (
    Challenge,
    Credentials,
    ProxyAuth,
    basicAuthorization,
    digestAuthorization,
    digestResponse,
    parseChallenges,
    strongestChallenge,
)
from shifter.connect import formatConnectRequest

# RFC 7616 section 3.9.1.
RFC_CREDENTIALS = Credentials("Mufasa", "Circle of Life")
RFC_REALM = "http-auth@example.org"
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC_CHALLENGES = [
    b'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
    b'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
    b'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"',
    b'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, '
    b'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
    b'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"',
]
# The RFC's printed MD5 response had a typo, corrected by erratum; this is
# the corrected value, which hashlib confirms.
RFC_RESPONSE_MD5 = "8ca523f5e9506fed4657c9700eebdbec"
RFC_RESPONSE_SHA256 = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
RFC_AUTHORIZATION = (
    'Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", '
    'algorithm={algorithm}, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
    'nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, '
    'response="{response}", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)

_SAFE_VALUE = re.compile(r"[\x20-\x7e\t]*")


def H(algorithm: str, data: str) -> str:
    """
    The hash of RFC 7616 section 3.4, written out here independently.
    """
    name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm]
    return hashlib.new(name, data.encode("utf-8")).hexdigest()


def fields(authorization: str) -> dict[str, str]:
    """
    The fields of a Digest authorization value, unquoted.
    """
    scheme, _, rest = authorization.partition(" ")
    assert scheme == "Digest"
    result = {}
    for match in re.finditer(r'([\w*]+)=("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)', rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        result[match.group(1)] = value
    return result


class DigestComputationTests(SynchronousTestCase):
    def test_rfc7616MD5(self) -> None:
        """
        The MD5 response of RFC 7616 section 3.9.1.
        """
        response = digestResponse(
            RFC_CREDENTIALS,
            RFC_REALM,
            RFC_NONCE,
            "GET",
            "/dir/index.html",
            "MD5",
            "auth",
            1,
            RFC_CNONCE,
        )
        self.assertEqual(response, RFC_RESPONSE_MD5)

    def test_rfc7616SHA256(self) -> None:
        """
        The SHA-256 response of RFC 7616 section 3.9.1.
        """
        response = digestResponse(
            RFC_CREDENTIALS,
            RFC_REALM,
            RFC_NONCE,
            "GET",
            "/dir/index.html",
            "SHA-256",
            "auth",
            1,
            RFC_CNONCE,
        )
        self.assertEqual(response, RFC_RESPONSE_SHA256)

    def test_rfc7616Authorization(self) -> None:
        """
        Answering the RFC's two challenges gives the RFC's SHA-256
        Authorization value, field for field; answering the MD5 one alone
        gives its MD5 value.
        """
        challenges = parseChallenges(RFC_CHALLENGES)
        for challenge, algorithm, response in [
            (strongestChallenge(challenges), "SHA-256", RFC_RESPONSE_SHA256),
            (challenges[1], "MD5", RFC_RESPONSE_MD5),
        ]:
            self.assertEqual(
                digestAuthorization(
                    RFC_CREDENTIALS, challenge, "GET", "/dir/index.html", 1, RFC_CNONCE
                ),
                RFC_AUTHORIZATION.format(algorithm=algorithm, response=response),
            )

    def test_rfc2617(self) -> None:
        """
        The MD5 qop=auth example of RFC 2617 section 3.5.
        """
        response = digestResponse(
            Credentials("Mufasa", "Circle Of Life"),
            "testrealm@host.com",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "GET",
            "/dir/index.html",
            "MD5",
            "auth",
            1,
            "0a4f113b",
        )
        self.assertEqual(response, "6629fae49393a05397450978507c4ef1")

    def test_rfc2069(self) -> None:
        """
        Without qop, the response is RFC 2069's: its section 2.4 example.
        """
        response = digestResponse(
            Credentials("Mufasa", "CircleOfLife"),
            "testrealm@host.com",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "GET",
            "/dir/index.html",
            qop=None,
        )
        self.assertEqual(response, "1949323746fe6a43ef61f9606e7febea")

    @given(st.sampled_from(["MD5", "SHA-256"]), st.integers(1, 2**32 - 1), st.text(min_size=1))
    def test_sess(self, algorithm: str, nc: int, cnonce: str) -> None:
        """
        The -sess variants put the nonce and cnonce into A1 (RFC 7616
        3.4.2), whatever the case of the algorithm name.
        """
        a1 = H(
            algorithm,
            f"{H(algorithm, 'Mufasa:' + RFC_REALM + ':Circle of Life')}:{RFC_NONCE}:{cnonce}",
        )
        a2 = H(algorithm, "CONNECT:a.test:443")
        expected = H(algorithm, f"{a1}:{RFC_NONCE}:{nc:08x}:{cnonce}:auth:{a2}")
        for spelling in [
            algorithm + "-sess",
            (algorithm + "-sess").upper(),
            (algorithm + "-sess").lower(),
        ]:
            self.assertEqual(
                digestResponse(
                    RFC_CREDENTIALS,
                    RFC_REALM,
                    RFC_NONCE,
                    "CONNECT",
                    "a.test:443",
                    spelling,
                    "auth",
                    nc,
                    cnonce,
                ),
                expected,
            )

    def test_authInt(self) -> None:
        """
        qop=auth-int hashes the empty body of a CONNECT into A2.
        """
        a1 = H("SHA-256", f"Mufasa:{RFC_REALM}:Circle of Life")
        a2 = H("SHA-256", f"CONNECT:a.test:443:{H('SHA-256', '')}")
        expected = H("SHA-256", f"{a1}:{RFC_NONCE}:00000002:c:auth-int:{a2}")
        self.assertEqual(
            digestResponse(
                RFC_CREDENTIALS,
                RFC_REALM,
                RFC_NONCE,
                "CONNECT",
                "a.test:443",
                "SHA-256",
                "auth-int",
                2,
                "c",
            ),
            expected,
        )

    def test_unsupported(self) -> None:
        """
        An algorithm or qop Shifter does not implement is refused.
        """
        for algorithm, qop in [("SHA-512-256", "auth"), ("SHA1", "auth"), ("MD5", "token")]:
            self.assertRaises(
                ValueError,
                digestResponse,
                RFC_CREDENTIALS,
                "r",
                "n",
                "CONNECT",
                "a:1",
                algorithm,
                qop,
            )

    def test_userhash(self) -> None:
        """
        With userhash=true the username field is H(username:realm), and the
        response still uses the real name (RFC 7616 3.4.4).
        """
        challenge = Challenge(
            "digest",
            {
                "realm": RFC_REALM,
                "nonce": RFC_NONCE,
                "qop": "auth",
                "algorithm": "SHA-256",
                "userhash": "true",
            },
        )
        value = fields(
            digestAuthorization(RFC_CREDENTIALS, challenge, "GET", "/dir/index.html", 1, RFC_CNONCE)
        )
        self.assertEqual(value["username"], H("SHA-256", f"Mufasa:{RFC_REALM}"))
        self.assertEqual(value["userhash"], "true")
        self.assertEqual(value["response"], RFC_RESPONSE_SHA256)

    def test_nonAsciiUsername(self) -> None:
        """
        A user name that is not ASCII goes in username*, percent-encoded
        UTF-8 (RFC 8187), and the value stays ASCII.
        """
        credentials = Credentials("Jäsøn Doe", "Secret, or not?")
        challenge = Challenge("digest", {"realm": "api@example.org", "nonce": "n", "qop": "auth"})
        value = digestAuthorization(credentials, challenge, "CONNECT", "a.test:443", 1, "c")
        self.assertTrue(value.isascii())
        self.assertEqual(fields(value)["username*"], "UTF-8''J%C3%A4s%C3%B8n%20Doe")
        self.assertNotIn("username", fields(value))
        self.assertEqual(
            fields(value)["response"],
            digestResponse(
                credentials, "api@example.org", "n", "CONNECT", "a.test:443", "MD5", "auth", 1, "c"
            ),
        )

    def test_legacyChallenge(self) -> None:
        """
        A challenge without qop or algorithm is answered the RFC 2069 way:
        no nc, cnonce, qop or algorithm in the answer.
        """
        challenge = Challenge("digest", {"realm": "r", "nonce": "n"})
        value = fields(
            digestAuthorization(RFC_CREDENTIALS, challenge, "CONNECT", "a.test:443", 1, "c")
        )
        self.assertEqual(set(value), {"username", "realm", "uri", "nonce", "response"})
        self.assertEqual(
            value["response"],
            digestResponse(RFC_CREDENTIALS, "r", "n", "CONNECT", "a.test:443", qop=None),
        )


class BasicTests(SynchronousTestCase):
    def test_basic(self) -> None:
        """
        Basic is user:password in UTF-8, base64-encoded.
        """
        self.assertEqual(basicAuthorization(Credentials("user", "pass")), "Basic dXNlcjpwYXNz")
        value = basicAuthorization(Credentials("ü", "a:b"))
        self.assertEqual(base64.b64decode(value.removeprefix("Basic ")), "ü:a:b".encode("utf-8"))

    def test_credentialsRefused(self) -> None:
        """
        A colon in the user name, or a control character in either part, is
        refused when the credentials are made.
        """
        for username, password in [
            ("a:b", "p"),
            ("a\r\nb", "p"),
            ("a", "p\n"),
            ("a", "\x00"),
            ("\x7f", "p"),
        ]:
            self.assertRaises(ValueError, Credentials, username, password)

    def test_passwordHidden(self) -> None:
        """
        The password does not appear in the credentials' repr.
        """
        self.assertNotIn("hunter2", repr(Credentials("user", "hunter2")))
        self.assertIn("user", repr(Credentials("user", "hunter2")))


_TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
tokens = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=10)
quotedText = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    | st.just("\t"),
    max_size=20,
)


def quoteString(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def challenges(draw) -> tuple[str, Challenge]:
    """
    A challenge, and its text with random spacing and quoting.
    """
    scheme = draw(tokens)
    if draw(st.booleans()) and draw(st.booleans()):
        token68 = draw(st.from_regex(r"[A-Za-z0-9._~+/-]+=*", fullmatch=True))
        return f"{scheme} {token68}", Challenge(scheme.lower(), {}, token68)
    names = draw(st.lists(tokens, max_size=4, unique_by=str.lower))
    params = {}
    parts = []
    for name in names:
        value = draw(quotedText)
        bare = value and all(c in _TOKEN_CHARS for c in value) and draw(st.booleans())
        space = draw(st.sampled_from(["", " ", "\t", "  "]))
        parts.append(f"{name}{space}={space}{value if bare else quoteString(value)}")
        params[name.lower()] = value
    separator = draw(st.sampled_from([", ", ",", " , ", ",\t", ", ,"]))
    text = scheme + (" " + separator.join(parts) if parts else "")
    return text, Challenge(scheme.lower(), params)


class ParseChallengesTests(SynchronousTestCase):
    def test_rfcChallenges(self) -> None:
        """
        Two Digest challenges in two headers are both read, parameters
        unquoted.
        """
        parsed = parseChallenges(RFC_CHALLENGES)
        self.assertEqual([c.params["algorithm"] for c in parsed], ["SHA-256", "MD5"])
        self.assertEqual(parsed[0].params["qop"], "auth, auth-int")
        self.assertEqual(parsed[0].params["nonce"], RFC_NONCE)

    def test_severalPerHeader(self) -> None:
        """
        Several challenges in one header, with quoted commas and escaped
        quotes, token68 and parameterless schemes, are each read.
        """
        parsed = parseChallenges(
            [
                b'Basic realm="a, \\"b\\"\\\\", Negotiate abc==, NTLM, Digest realm=x, NONCE = "y,z"',
                b"Bearer",
            ]
        )
        self.assertEqual(
            parsed,
            [
                Challenge("basic", {"realm": 'a, "b"\\'}),
                Challenge("negotiate", {}, "abc=="),
                Challenge("ntlm", {}),
                Challenge("digest", {"realm": "x", "nonce": "y,z"}),
                Challenge("bearer", {}),
            ],
        )

    def test_garbageSkipped(self) -> None:
        """
        A malformed challenge is skipped and the ones around it are read:
        junk after a scheme, a repeated parameter, parameters after a
        token68, a parameter before any scheme, an unterminated quote.
        """
        parsed = parseChallenges(
            [
                b'realm=orphan, Basic realm="ok", Junk "x,y" z, Digest realm=a, realm=b, Basic realm="two"',
                b"Negotiate abc=, realm=x, Basic realm=three",
                b'Digest realm="open, Basic realm=hidden',
                b"\xff\x00, Basic realm=four",
            ]
        )
        self.assertEqual([c.params.get("realm") for c in parsed], ["ok", "two", "three", "four"])

    @settings(max_examples=1000)
    @given(st.lists(challenges(), min_size=1, max_size=5), st.data())
    def test_roundTrip(self, items, data: st.DataObject) -> None:
        """
        Challenges written with any spacing and quoting, spread over any
        number of headers, are read back in order.
        """
        texts = [text for text, _ in items]
        values = []
        while texts:
            count = data.draw(st.integers(1, len(texts)))
            values.append(", ".join(texts[:count]).encode("latin-1"))
            texts = texts[count:]
        self.assertEqual(parseChallenges(values), [challenge for _, challenge in items])

    @settings(max_examples=3000)
    @given(st.lists(st.binary(max_size=80), max_size=4))
    def test_arbitraryBytes(self, values: list[bytes]) -> None:
        """
        Arbitrary header values give a list of challenges, never an
        exception.
        """
        parsed = parseChallenges(values)
        self.assertIsInstance(parsed, list)
        for challenge in parsed:
            self.assertEqual(challenge.scheme, challenge.scheme.lower())

    @settings(max_examples=1000)
    @given(
        st.lists(st.text(alphabet='Digest Basic realm=nonce"\\, \t=abc', max_size=60), max_size=3)
    )
    def test_nearMisses(self, texts: list[str]) -> None:
        """
        Values made of the grammar's own characters, mostly malformed, give
        a list, never an exception.
        """
        self.assertIsInstance(parseChallenges([t.encode() for t in texts]), list)


def digest(
    nonce: str = "n1", algorithm: str | None = "MD5", stale: bool = False, **extra: str
) -> bytes:
    text = f'Digest realm="proxy", nonce="{nonce}", qop="auth"'
    if algorithm is not None:
        text += f", algorithm={algorithm}"
    if stale:
        text += ", stale=true"
    for name, value in extra.items():
        text += f', {name}="{value}"'
    return text.encode()


class StrongestTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        Digest SHA-256 is preferred to Digest MD5, which is preferred to
        Basic, in whatever order they come.
        """
        offered = [b'Basic realm="p"', digest("md5", "MD5"), digest("sha", "SHA-256")]
        for values in [offered, offered[::-1], [b", ".join(offered)]]:
            best = strongestChallenge(parseChallenges(values))
            self.assertEqual(best.params["nonce"], "sha")
        best = strongestChallenge(parseChallenges([b'Basic realm="p"', digest("md5", "MD5-sess")]))
        self.assertEqual(best.params["nonce"], "md5")
        best = strongestChallenge(parseChallenges([b'Basic realm="p"', b"Negotiate abc"]))
        self.assertEqual(best.scheme, "basic")

    def test_unsupportedDigest(self) -> None:
        """
        Digest challenges Shifter cannot answer lose to Basic: an unknown
        algorithm, a qop with neither auth nor auth-int, no nonce, no realm,
        a nonce that is not ASCII.
        """
        for bad in [
            digest(algorithm="SHA-512-256"),
            b'Digest realm="p", nonce="n", qop="auth-conf"',
            b'Digest realm="p", qop="auth"',
            b'Digest nonce="n", qop="auth"',
            'Digest realm="p", nonce="é"'.encode("latin-1"),
        ]:
            self.assertEqual(
                strongestChallenge(parseChallenges([bad, b'Basic realm="p"'])).scheme, "basic"
            )
            self.assertIsNone(strongestChallenge(parseChallenges([bad])))

    def test_authIntOnly(self) -> None:
        """
        A Digest challenge offering only auth-int is answered with it.
        """
        challenge = parseChallenges([b'Digest realm="p", nonce="n", qop="auth-int"'])[0]
        value = fields(
            digestAuthorization(RFC_CREDENTIALS, challenge, "CONNECT", "a.test:443", 1, "c")
        )
        self.assertEqual(value["qop"], "auth-int")


class ProxyAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cnonces = iter(f"cnonce{i}" for i in range(1000))
        self.auth = ProxyAuth(Credentials("user", "pass"), cnonce=lambda: next(self.cnonces))

    def authorization(self, target: str = "a.test:443") -> str:
        headers = self.auth.headersFor("CONNECT", target)
        self.assertEqual([name for name, _ in headers], ["Proxy-Authorization"])
        return headers[0][1]

    def test_basicUpFront(self) -> None:
        """
        Before any challenge, every CONNECT carries Basic.
        """
        for _ in range(3):
            self.assertEqual(self.authorization(), basicAuthorization(Credentials("user", "pass")))
        self.assertEqual(self.auth.scheme, "basic")

    def test_digestAfterChallenge(self) -> None:
        """
        After a Digest challenge the next CONNECT answers it, and the
        following ones reuse the nonce with the count going up and the same
        cnonce, each response computed for its own count and target.
        """
        self.authorization()
        self.assertIsNone(self.auth.challenged([digest("n1", "SHA-256")]))
        self.assertEqual(self.auth.scheme, "digest")
        for count in range(1, 6):
            target = f"host{count}.test:443"
            value = fields(self.authorization(target))
            self.assertEqual(value["nonce"], "n1")
            self.assertEqual(value["nc"], f"{count:08x}")
            self.assertEqual(value["cnonce"], "cnonce0")
            self.assertEqual(value["uri"], target)
            self.assertEqual(
                value["response"],
                digestResponse(
                    Credentials("user", "pass"),
                    "proxy",
                    "n1",
                    "CONNECT",
                    target,
                    "SHA-256",
                    "auth",
                    count,
                    "cnonce0",
                ),
            )

    def test_neverBasicAgain(self) -> None:
        """
        Once Digest has been asked for, Basic is never sent to that proxy,
        even if a later 407 offers only Basic.
        """
        self.authorization()
        self.auth.challenged([digest()])
        self.authorization()
        reason = self.auth.challenged([b'Basic realm="p"'])
        self.assertEqual(
            reason, "proxy asks for Basic after Digest; not sending the password in clear"
        )
        self.assertTrue(self.authorization().startswith("Digest "))

    def test_staleNonce(self) -> None:
        """
        stale=true after an answered nonce means only the nonce was old: the
        new one is taken, counting from one with a new cnonce, and a retry
        is allowed.
        """
        self.authorization()
        self.auth.challenged([digest("n1")])
        self.authorization()
        self.authorization()
        self.assertIsNone(self.auth.challenged([digest("n2", stale=True)]))
        value = fields(self.authorization())
        self.assertEqual(
            (value["nonce"], value["nc"], value["cnonce"]), ("n2", "00000001", "cnonce1")
        )

    def test_digestRefused(self) -> None:
        """
        A challenge that is not stale, for a nonce already answered, means
        the password was wrong: no retry.
        """
        self.authorization()
        self.assertIsNone(self.auth.challenged([digest("n1")]))
        self.authorization()
        self.assertEqual(
            self.auth.challenged([digest("n1")]), "proxy refused the credentials (Digest)"
        )

    def test_newNonceNotStale(self) -> None:
        """
        A fresh nonce that was never answered may be answered, even without
        stale=true; the count restarts.
        """
        self.authorization()
        self.auth.challenged([digest("n1")])
        self.authorization()
        self.assertIsNone(self.auth.challenged([digest("n2")]))
        self.assertEqual(fields(self.authorization())["nc"], "00000001")

    def test_sameNonceAgainBeforeAnswering(self) -> None:
        """
        Several connections that sent Basic before the first challenge was
        read all get a retry, and the shared nonce's count is not reset.
        """
        for _ in range(3):
            self.authorization()
        self.assertIsNone(self.auth.challenged([digest("n1")]))
        self.assertEqual(fields(self.authorization())["nc"], "00000001")
        self.assertIsNone(self.auth.challenged([digest("n1", stale=True)]))
        self.assertEqual(fields(self.authorization())["nc"], "00000002")

    def test_basicRefused(self) -> None:
        """
        A Basic challenge after Basic was sent means the password was wrong.
        """
        self.authorization()
        self.assertEqual(
            self.auth.challenged([b'Basic realm="p"']), "proxy refused the credentials (Basic)"
        )

    def test_basicBeforeSending(self) -> None:
        """
        A Basic challenge before anything was sent can be answered.
        """
        self.assertIsNone(self.auth.challenged([b'Basic realm="p"']))

    def test_noSupportedScheme(self) -> None:
        """
        A 407 offering only schemes Shifter does not speak, or none, says
        which were offered.
        """
        self.authorization()
        self.assertEqual(
            self.auth.challenged([b"Negotiate", b"NTLM"]),
            "proxy offers no supported authentication scheme (offered: negotiate, ntlm)",
        )
        self.assertEqual(
            self.auth.challenged([]),
            "proxy offers no supported authentication scheme (offered: none)",
        )

    def test_nonceCountExhausted(self) -> None:
        """
        After 2**32 - 1 uses of a nonce, no authorization is sent, so the
        proxy challenges with a new nonce, which is then used from one.
        """
        self.authorization()
        self.auth.challenged([digest("n1")])
        self.auth._nc = 0xFFFFFFFE
        self.assertEqual(fields(self.authorization())["nc"], "ffffffff")
        self.assertEqual(self.auth.headersFor("CONNECT", "a.test:443"), [])
        self.assertIsNone(self.auth.challenged([digest("n2")]))
        self.assertEqual(fields(self.authorization())["nc"], "00000001")


class FakeDigestProxy:
    """
    A proxy that checks Digest answers the way RFC 7616 describes, with its
    own arithmetic, and challenges everything else.
    """

    def __init__(self, password: str, algorithm: str = "SHA-256", nonceUses: int = 1000) -> None:
        self.password = password
        self.algorithm = algorithm
        self.nonceUses = nonceUses
        self.nonce = 0
        self.seen: set[int] = set()

    def challenge(self, stale: bool = False) -> list[bytes]:
        return [b'Basic realm="proxy"', digest(f"nonce{self.nonce}", self.algorithm, stale)]

    def handle(self, headers: list[tuple[str, str]], target: str) -> tuple[int, list[bytes]]:
        values = [value for name, value in headers if name == "Proxy-Authorization"]
        if not values or not values[0].startswith("Digest "):
            return 407, self.challenge()
        value = fields(values[0])
        count = int(value["nc"], 16)
        if value["nonce"] != f"nonce{self.nonce}" or len(self.seen) >= self.nonceUses:
            self.nonce += 1
            self.seen = set()
            return 407, self.challenge(stale=True)
        a1 = H(self.algorithm, f"{value['username']}:proxy:{self.password}")
        a2 = H(self.algorithm, f"CONNECT:{value['uri']}")
        expected = H(
            self.algorithm, f"{a1}:{value['nonce']}:{value['nc']}:{value['cnonce']}:auth:{a2}"
        )
        if value["response"] != expected or count in self.seen or value["uri"] != target:
            return 407, self.challenge()
        self.seen.add(count)
        return 200, []


def connect(auth: ProxyAuth, proxy: FakeDigestProxy, target: str) -> tuple[int, int, str | None]:
    """
    What a tunnel does: CONNECT, and on a 407 that can be answered, once
    more.

    @return: the final status, the number of CONNECTs sent, the reason.
    """
    attempts = 0
    reason = None
    for _ in range(2):
        attempts += 1
        status, challenges = proxy.handle(auth.headersFor("CONNECT", target), target)
        if status != 407:
            return status, attempts, None
        reason = auth.challenged(challenges)
        if reason is not None:
            break
    return 407, attempts, reason


class ConversationTests(SynchronousTestCase):
    def test_rightPassword(self) -> None:
        """
        With the right password the first tunnel takes two CONNECTs (Basic,
        then Digest), the following ones one each, across nonce expiries.
        """
        proxy = FakeDigestProxy("secret", nonceUses=3)
        auth = ProxyAuth(Credentials("user", "secret"))
        results = [connect(auth, proxy, f"h{i}.test:443") for i in range(10)]
        self.assertEqual([status for status, _, _ in results], [200] * 10)
        self.assertEqual(results[0][1], 2)
        # A nonce serves three tunnels, then one retry renews it.
        self.assertEqual([attempts for _, attempts, _ in results[1:]], [1, 1, 2, 1, 1, 2, 1, 1, 2])

    def test_wrongPassword(self) -> None:
        """
        With a wrong password each tunnel ends after at most two CONNECTs,
        with the reason.
        """
        proxy = FakeDigestProxy("secret")
        auth = ProxyAuth(Credentials("user", "wrong"))
        for _ in range(5):
            status, attempts, reason = connect(auth, proxy, "a.test:443")
            self.assertEqual(status, 407)
            self.assertLessEqual(attempts, 2)
            self.assertEqual(reason, "proxy refused the credentials (Digest)")


headerText = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=30)


class HeaderSafetyTests(SynchronousTestCase):
    @settings(max_examples=1000)
    @given(
        headerText.filter(lambda s: ":" not in s and not re.search(r"[\x00-\x1f\x7f]", s)),
        headerText.filter(lambda s: not re.search(r"[\x00-\x1f\x7f]", s)),
        st.lists(st.binary(max_size=60), max_size=3),
        quotedText,
        quotedText,
        st.sampled_from([None, "MD5", "SHA-256", "md5-sess", "SHA-256-SESS"]),
    )
    def test_headersAreSafe(self, username, password, junk, realm, nonce, algorithm) -> None:
        """
        Whatever the credentials and whatever the proxy sends, every header
        value is printable ASCII without CR or LF, and fits in a CONNECT.
        """
        challenge = (
            f"Digest realm={quoteString(realm)}, nonce={quoteString(nonce)}, opaque={quoteString(realm)}, "
            f'qop="auth"' + (f", algorithm={algorithm}" if algorithm else "")
        ).encode("latin-1")
        auth = ProxyAuth(Credentials(username, password))
        for values in [[], junk, [challenge], junk + [challenge]]:
            auth.challenged(values)
            headers = auth.headersFor("CONNECT", "a.test:443")
            for name, value in headers:
                self.assertIsNotNone(_SAFE_VALUE.fullmatch(value), value)
                self.assertNotIn("\r", value)
                self.assertNotIn("\n", value)
            formatConnectRequest("a.test", 443, headers)
