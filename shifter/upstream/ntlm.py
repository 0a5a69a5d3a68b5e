"""
NTLM to the upstream proxy, sans I/O: the negotiate message, then the
authenticate message that answers the proxy's challenge (NTLMv2 only),
made by pyspnego's NTLM, which is pure Python: no crypto of Shifter's own,
no system library, nothing that waits.

NTLM authenticates a connection, not a request: the challenge belongs to
the connection that carried the negotiate message, and the authenticate
message must go on that same connection (L{shifter.upstream.auth}).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any


class NTLMError(Exception):
    """
    The proxy's NTLM challenge cannot be answered; the message says why,
    for the log line.
    """


def ntlmCredential(username: str, password: str) -> Any:
    """
    The credential every NTLM context of one proxy is made from: the user
    name with the password's NT hash, computed once, so that a tunnel's
    context costs no hashing (pyspnego hashes a password given as such for
    every context, LM hash included, in pure Python: milliseconds).

    @param username: C{DOMAIN\\user} (or C{user@domain}, or a bare user
        name for a proxy that needs no domain).
    """
    import spnego

    try:
        from spnego._ntlm_raw.crypto import ntowfv1
    except ImportError:  # a pyspnego that moved its helper: hash per context
        return spnego.Password(username, password)
    return spnego.NTLMHash(username, nt_hash=ntowfv1(password).hex())


class NTLMContext:
    """
    One NTLM exchange, for one connection to the proxy: a fresh context
    each time, as every connection gets its own challenge.

    @param credential: from L{ntlmCredential}.
    """

    def __init__(self, credential: Any) -> None:
        import spnego

        self._context: Any = spnego.client(credential, protocol="ntlm")

    def negotiate(self) -> str:
        """
        The C{Proxy-Authorization} value that starts the exchange.
        """
        return "NTLM " + base64.b64encode(self._context.step()).decode("ascii")

    def authenticate(self, challenge: str) -> str:
        """
        The C{Proxy-Authorization} value that answers C{challenge}, the
        token68 of the proxy's C{NTLM} challenge.

        @raise NTLMError: if the challenge is not one that can be answered.
        """
        try:
            token = base64.b64decode(challenge, validate=True)
        except (binascii.Error, ValueError):
            raise NTLMError("the proxy's NTLM challenge is not base64") from None
        try:
            answer = self._context.step(token)
        except Exception as e:  # pyspnego meets bad tokens with errors of many kinds
            raise NTLMError(f"the proxy's NTLM challenge cannot be read ({type(e).__name__}: {e})") from None
        if not answer:
            raise NTLMError("the proxy's NTLM challenge gave no answer to send")
        return "NTLM " + base64.b64encode(answer).decode("ascii")
