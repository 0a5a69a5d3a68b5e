"""
Tests for L{shifter.upstream.auth}: Basic and Digest answers to a proxy's challenges,
the challenge parser, and the per-proxy state machine, on plain values.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from shifter.upstream.auth import (
    MAX_RENEWALS,
    Challenge,
    Credentials,
    ProxyAuth,
    basicAuthorization,
    digestAuthorization,
    digestResponse,
    parseChallenges,
    strongestChallenge,
)
from shifter.upstream.connect import formatConnectRequest

from tests.support import knowLocalAddresses
from tests.test_tunnel import PROXY, TunnelTestCase

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

    def test_sessWithoutQop(self) -> None:
        """
        A -sess algorithm without a qop cannot be answered (its session key
        hashes a cnonce that only a qop lets the client send): Basic wins,
        or nothing.
        """
        for algorithm in ("MD5-sess", "SHA-256-sess"):
            bad = f'Digest realm="p", nonce="n", algorithm={algorithm}'.encode()
            self.assertIsNone(strongestChallenge(parseChallenges([bad])))
            self.assertEqual(strongestChallenge(parseChallenges([bad, b'Basic realm="p"'])).scheme, "basic")
        plain = b'Digest realm="p", nonce="n", algorithm=MD5'
        self.assertEqual(strongestChallenge(parseChallenges([plain])).scheme, "digest")

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

    def authorization(self, exchange, target: str = "a.test:443") -> str | None:  # type: ignore[no-untyped-def]
        headers = exchange.headersFor("CONNECT", target)
        if not headers:
            return None
        self.assertEqual([name for name, _ in headers], ["Proxy-Authorization"])
        return headers[0][1]

    def answered(self, nonce: str = "n1", algorithm: str = "MD5"):  # type: ignore[no-untyped-def]
        """
        An exchange that sent nothing, was challenged with C{nonce}, and
        answered it.
        """
        exchange = self.auth.exchange()
        self.assertIsNone(self.authorization(exchange))
        self.assertIsNone(exchange.challenged([digest(nonce, algorithm)]))
        return exchange, fields(self.authorization(exchange))

    def test_nothingBeforeChallenge(self) -> None:
        """
        Before any challenge, a CONNECT carries no credentials at all.
        """
        for _ in range(3):
            self.assertIsNone(self.authorization(self.auth.exchange()))
        self.assertEqual(self.auth.scheme, "none")

    def test_preemptiveBasic(self) -> None:
        """
        With preemptiveBasic, Basic goes with every CONNECT from the first.
        """
        auth = ProxyAuth(Credentials("user", "pass"), preemptiveBasic=True)
        self.assertEqual(
            auth.exchange().headersFor("CONNECT", "a.test:443"),
            [("Proxy-Authorization", basicAuthorization(Credentials("user", "pass")))],
        )
        self.assertEqual(auth.scheme, "basic")

    def test_basicAfterChallenge(self) -> None:
        """
        A Basic challenge is answered once; from then on Basic goes up front
        to that proxy; a second Basic challenge after Basic refuses.
        """
        exchange = self.auth.exchange()
        self.assertIsNone(self.authorization(exchange))
        self.assertIsNone(exchange.challenged([b'Basic realm="p"']))
        basic = basicAuthorization(Credentials("user", "pass"))
        self.assertEqual(self.authorization(exchange), basic)
        self.assertEqual(self.authorization(self.auth.exchange()), basic)
        self.assertEqual(exchange.challenged([b'Basic realm="p"']), "proxy refused the credentials (Basic)")

    def test_digestWithOwnNonce(self) -> None:
        """
        A tunnel answers its Digest challenge with that challenge's nonce,
        count one, and a response computed for its target.
        """
        _, value = self.answered("n1", "SHA-256")
        self.assertEqual((value["nonce"], value["nc"], value["cnonce"]), ("n1", "00000001", "cnonce0"))
        self.assertEqual(
            value["response"],
            digestResponse(Credentials("user", "pass"), "proxy", "n1", "CONNECT", "a.test:443",
                           "SHA-256", "auth", 1, "cnonce0"),
        )

    def test_sharedOnlyAfterSuccess(self) -> None:
        """
        A nonce is shared with later tunnels only once the proxy has opened
        a tunnel with it; they count on from there, each response for its
        own count and target.
        """
        first, _ = self.answered("n1", "SHA-256")
        self.assertIsNone(self.authorization(self.auth.exchange()))
        first.succeeded()
        self.assertEqual(self.auth.scheme, "digest")
        for count in range(2, 6):
            target = f"host{count}.test:443"
            value = fields(self.authorization(self.auth.exchange(), target))
            self.assertEqual((value["nonce"], value["nc"], value["cnonce"], value["uri"]),
                             ("n1", f"{count:08x}", "cnonce0", target))
            self.assertEqual(
                value["response"],
                digestResponse(Credentials("user", "pass"), "proxy", "n1", "CONNECT", target,
                               "SHA-256", "auth", count, "cnonce0"),
            )

    def test_concurrentFirstChallenges(self) -> None:
        """
        Tunnels challenged at the same time each answer their own nonce at
        count one, with a client nonce of its own.
        """
        values = [self.answered(f"n{i}")[1] for i in range(3)]
        self.assertEqual([(v["nonce"], v["nc"]) for v in values], [(f"n{i}", "00000001") for i in range(3)])
        self.assertEqual(len({v["cnonce"] for v in values}), 3)

    def test_spentSharedNonceRenewedFree(self) -> None:
        """
        A 407 bringing another nonce to a tunnel that used the shared one
        means the shared nonce was spent: the tunnel answers the new nonce
        without spending its retry, and no new tunnel gets the spent one.
        """
        first, _ = self.answered("n1")
        first.succeeded()
        tunnel = self.auth.exchange()
        self.assertEqual(fields(self.authorization(tunnel))["nc"], "00000002")
        self.assertIsNone(tunnel.challenged([digest("n2")]))
        self.assertEqual(tunnel.renewals, 1)
        value = fields(self.authorization(tunnel))
        self.assertEqual((value["nonce"], value["nc"]), ("n2", "00000001"))
        self.assertIsNone(self.authorization(self.auth.exchange()))
        tunnel.succeeded()
        self.assertEqual(fields(self.authorization(self.auth.exchange()))["nonce"], "n2")

    def test_staleRenewedFree(self) -> None:
        """
        stale=true means only the nonce was old: the tunnel answers the new
        one, even after its own nonce, without spending its retry.
        """
        tunnel, _ = self.answered("n1")
        self.assertIsNone(tunnel.challenged([digest("n2", stale=True)]))
        value = fields(self.authorization(tunnel))
        self.assertEqual((value["nonce"], value["nc"], value["cnonce"]), ("n2", "00000001", "cnonce1"))

    def test_renewalsBounded(self) -> None:
        """
        A tunnel renews a spent nonce at most MAX_RENEWALS times.
        """
        tunnel, _ = self.answered("n0")
        for i in range(1, MAX_RENEWALS + 1):
            self.assertIsNone(tunnel.challenged([digest(f"n{i}", stale=True)]))
            self.authorization(tunnel)
        self.assertEqual(
            tunnel.challenged([digest("last", stale=True)]), "proxy refused the credentials (Digest)"
        )

    def test_wrongPassword(self) -> None:
        """
        A tunnel whose own nonce is answered with a new challenge that is
        not stale had its password refused: no further retry.
        """
        tunnel, _ = self.answered("n1")
        self.assertEqual(tunnel.challenged([digest("n2")]), "proxy refused the credentials (Digest)")

    def test_sameNonceAgainRefused(self) -> None:
        """
        A proxy that names the same nonce again, not stale, refused the
        password (proxies that always send one nonce).
        """
        tunnel, _ = self.answered("n1")
        self.assertEqual(tunnel.challenged([digest("n1")]), "proxy refused the credentials (Digest)")

    def test_sameNonceCountsOn(self) -> None:
        """
        Proxies that always send one nonce: every tunnel that answers it
        counts on from the last count used, so counts only go up.
        """
        counts = [self.answered("same")[1]["nc"] for _ in range(3)]
        self.assertEqual(counts, ["00000001", "00000002", "00000003"])

    def test_neverBasicAgain(self) -> None:
        """
        Once Digest has been asked for, Basic is never sent to that proxy,
        even if a later 407 offers only Basic.
        """
        tunnel, _ = self.answered("n1")
        self.assertEqual(
            tunnel.challenged([b'Basic realm="p"']),
            "proxy asks for Basic after Digest; not sending the password in clear",
        )
        preemptive = ProxyAuth(Credentials("user", "pass"), preemptiveBasic=True)
        exchange = preemptive.exchange()
        exchange.headersFor("CONNECT", "a.test:443")
        self.assertIsNone(exchange.challenged([digest("n1")]))
        self.assertTrue(exchange.headersFor("CONNECT", "a.test:443")[0][1].startswith("Digest "))
        self.assertEqual(preemptive.exchange().headersFor("CONNECT", "a.test:443"), [])

    def test_noSupportedScheme(self) -> None:
        """
        A 407 offering only schemes Shifter does not speak, or none, says
        which were offered.
        """
        exchange = self.auth.exchange()
        self.assertEqual(
            exchange.challenged([b"Negotiate", b'Bearer realm="p"']),
            "proxy offers no supported authentication scheme (offered: bearer, negotiate); "
            "Negotiate needs the gateway's keytab (--proxy-keytab) and the proxy's host name",
        )
        self.assertEqual(
            exchange.challenged([]), "proxy offers no supported authentication scheme (offered: none)"
        )

    def test_nonceCountExhausted(self) -> None:
        """
        A nonce used 2**32 - 1 times is not used again: the next tunnel
        sends nothing, so the proxy challenges with a new nonce.
        """
        first, _ = self.answered("n1")
        first.succeeded()
        self.auth.shared.count = 0xFFFFFFFE
        self.assertEqual(fields(self.authorization(self.auth.exchange()))["nc"], "ffffffff")
        self.assertIsNone(self.authorization(self.auth.exchange()))
        self.assertEqual(self.auth.scheme, "none")


class SquidLikeProxy:
    """
    A proxy that checks Digest answers as Squid does, with its own
    arithmetic: every 407 brings a new nonce; a nonce's count must go up
    from request to request as they arrive (a count that goes back
    invalidates the nonce), and a nonce serves at most C{maxUses}
    requests.  A spent or unknown nonce with the right password is
    answered stale=true (or not, as older Squids did, with C{staleFlag}
    off); a wrong password, stale=false.
    """

    def __init__(self, password: str, maxUses: int = 50, staleFlag: bool = True) -> None:
        self.password = password
        self.maxUses = maxUses
        self.staleFlag = staleFlag
        self.issued = 0
        self.nonces: dict[str, list[int]] = {}  # value -> [last count, uses, valid]

    def challenge(self, stale: bool = False) -> list[bytes]:
        self.issued += 1
        value = f"nonce{self.issued}"
        self.nonces[value] = [0, 0, 1]
        return [b'Basic realm="proxy"', digest(value, "MD5", stale)]

    def handle(self, headers: list[tuple[str, str]], target: str) -> tuple[int, list[bytes]]:
        values = [value for name, value in headers if name == "Proxy-Authorization"]
        if not values or not values[0].startswith("Digest "):
            return 407, self.challenge()
        value = fields(values[0])
        a1 = H("MD5", f"{value['username']}:proxy:{self.password}")
        a2 = H("MD5", f"CONNECT:{value['uri']}")
        expected = H("MD5", f"{a1}:{value['nonce']}:{value['nc']}:{value['cnonce']}:auth:{a2}")
        if value["response"] != expected or value["uri"] != target:
            return 407, self.challenge()
        state = self.nonces.get(value["nonce"])
        count = int(value["nc"], 16)
        if state is None or not state[2] or count <= state[0] or state[1] >= self.maxUses:
            if state is not None:
                state[2] = 0
            return 407, self.challenge(stale=self.staleFlag)
        state[0] = count
        state[1] += 1
        return 200, []


def burst(auth: ProxyAuth, proxy: SquidLikeProxy, count: int, seed: int) -> list[tuple[int, int, str | None]]:
    """
    C{count} tunnels opened at once: each builds its CONNECT in turn, the
    proxy reads them in a random order, and each follows its exchange's
    verdicts (a retry is built when its 407 is read, and goes to the back
    of a randomly ordered queue).

    @return: for each tunnel, its final status, its CONNECTs, the reason.
    """
    shuffle = random.Random(seed)
    tunnels = [auth.exchange() for _ in range(count)]
    sent = [0] * count
    result: list[tuple[int, int, str | None]] = [(0, 0, None)] * count
    queue = []
    for index, exchange in enumerate(tunnels):
        queue.append((index, exchange.headersFor("CONNECT", f"h{index}.test:443")))
        sent[index] += 1
    while queue:
        at = shuffle.randrange(min(len(queue), 8))
        index, headers = queue.pop(at)
        target = f"h{index}.test:443"
        status, challenges = proxy.handle(headers, target)
        exchange = tunnels[index]
        if status == 200:
            exchange.succeeded()
            result[index] = (200, sent[index], None)
            continue
        reason = exchange.challenged(challenges)
        if reason is not None:
            result[index] = (407, sent[index], reason)
            continue
        queue.append((index, exchange.headersFor("CONNECT", target)))
        sent[index] += 1
    return result


class ConversationTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, 2**32), st.sampled_from([3, 50]), st.booleans())
    def test_burstNoneRefused(self, seed: int, maxUses: int, staleFlag: bool) -> None:
        """
        A hundred tunnels at once, their CONNECTs read in any order, nonces
        spent after a few uses, stale flagged or not: every tunnel opens,
        each with at most its one retry and MAX_RENEWALS renewals.
        """
        proxy = SquidLikeProxy("secret", maxUses=maxUses, staleFlag=staleFlag)
        auth = ProxyAuth(Credentials("user", "secret"))
        results = burst(auth, proxy, 100, seed)
        self.assertEqual([status for status, _, _ in results], [200] * 100, results)
        self.assertLessEqual(max(sent for _, sent, _ in results), 2 + MAX_RENEWALS)
        # Once a nonce is shared, later tunnels need no extra round trip.
        later = burst(auth, proxy, 1, seed)
        self.assertEqual(later, [(200, 1, None)])

    def test_sequentialOneRoundTripOnce(self) -> None:
        """
        Tunnels one after another: the first takes two CONNECTs, the
        following ones one each until the proxy spends the nonce, then two
        once.
        """
        proxy = SquidLikeProxy("secret", maxUses=3)
        auth = ProxyAuth(Credentials("user", "secret"))
        attempts = [burst(auth, proxy, 1, i)[0][1] for i in range(8)]
        self.assertEqual(attempts, [2, 1, 1, 2, 1, 1, 2, 1])

    @settings(max_examples=30, deadline=None)
    @given(st.integers(0, 2**32))
    def test_wrongPassword(self, seed: int) -> None:
        """
        With a wrong password every tunnel ends after two CONNECTs, with
        the reason.
        """
        proxy = SquidLikeProxy("secret")
        auth = ProxyAuth(Credentials("user", "wrong"))
        for status, sent, reason in burst(auth, proxy, 20, seed):
            self.assertEqual((status, sent, reason), (407, 2, "proxy refused the credentials (Digest)"))


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
        auth = ProxyAuth(Credentials(username, password), preemptiveBasic=True)
        for values in [[], junk, [challenge], junk + [challenge]]:
            exchange = auth.exchange()
            exchange.headersFor("CONNECT", "a.test:443")
            exchange.challenged(values)
            headers = exchange.headersFor("CONNECT", "a.test:443")
            for name, value in headers:
                self.assertIsNotNone(_SAFE_VALUE.fullmatch(value), value)
                self.assertNotIn("\r", value)
                self.assertNotIn("\n", value)
            formatConnectRequest("a.test", 443, headers)


class TunnelAuthTests(TunnelTestCase):
    """
    The tunnel follows its exchange's verdicts on a 407, in memory.
    """

    def makeFactory(self):  # type: ignore[no-untyped-def]
        from shifter.tunnel.downstream import ShifterFactory
        from shifter.upstream.pool import ProxyPool
        from shifter.upstream.proxy import UpstreamProxy

        self.auth = ProxyAuth(Credentials("user", "secret"), cnonce=lambda: "c")
        proxy = UpstreamProxy("proxy.test:3128", self.endpoint, PROXY, self.auth)
        self.pool = ProxyPool([proxy], self.clock)
        self.factory = ShifterFactory(self.resolver, self.pool, self.settings, self.clock)
        knowLocalAddresses(self.factory)
        return self.factory

    def answer(self, status: bytes, *challenges: bytes):  # type: ignore[no-untyped-def]
        """
        Accept the pending proxy connection and answer its CONNECT.

        @return: the CONNECT request it was sent.
        """
        upstream, transport = self.endpoint.accept()
        sent = transport.value()
        headers = b"".join(b"Proxy-Authenticate: " + c + b"\r\n" for c in challenges)
        upstream.dataReceived(b"HTTP/1.1 " + status + b"\r\n" + headers + b"\r\n")
        return sent

    def test_challengeThenShared(self) -> None:
        """
        The first tunnel sends no credentials, answers the Digest challenge
        on a new connection, and once open shares the nonce: the next
        tunnel is opened with one CONNECT.
        """
        self.connectClient()
        first = self.answer(b"407 Proxy Authentication Required", digest("n1"))
        self.assertNotIn(b"Proxy-Authorization", first)
        second = self.answer(b"200 Connection established")
        self.assertIn(b'nonce="n1", nc=00000001', second)
        self.connectClient()
        third = self.answer(b"200 Connection established")
        self.assertIn(b'nonce="n1", nc=00000002', third)
        self.assertEqual(self.factory.counters["opened"], 2)

    def test_wrongPasswordOneLine(self) -> None:
        """
        A password the proxy refuses ends the tunnel after its one retry,
        with one failure line that gives the reason.
        """
        _, clientTransport = self.connectClient()
        self.answer(b"407 Proxy Authentication Required", digest("n1"))
        self.answer(b"407 Proxy Authentication Required", digest("n2"))
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(clientTransport.disconnecting)
        [line] = self.failureLines()
        self.assertIn("proxy answered 407: proxy refused the credentials (Digest)", line)
        self.assertEqual(self.factory.counters["proxy-auth"], 1)

    def test_spentNonceRenewedWithoutSpendingTheRetry(self) -> None:
        """
        A tunnel that used the shared nonce and is told it is stale
        answers again, and still opens.
        """
        self.connectClient()
        self.answer(b"407 Proxy Authentication Required", digest("n1"))
        self.answer(b"200 Connection established")
        self.connectClient()
        self.answer(b"407 Proxy Authentication Required", digest("n2", stale=True))
        renewed = self.answer(b"200 Connection established")
        self.assertIn(b'nonce="n2", nc=00000001', renewed)
        self.assertEqual(self.factory.counters["opened"], 2)
        self.assertEqual(self.factory.counters["proxy-auth"], 0)
