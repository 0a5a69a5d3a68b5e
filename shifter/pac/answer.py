"""
A PAC answer (C{"PROXY a:3128; HTTPS b:443; SOCKS5 c:1080; DIRECT"}) read
into typed choices, sans I/O: the order in which a connection tries them.

Entries of an unknown kind are skipped, as browsers skip them; an answer
with no usable entry, or one longer than L{MAX_ANSWER}, is refused with
the reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

# The longest answer read, and the most entries kept: a PAC that answers
# more is broken or hostile.
MAX_ANSWER = 4096
MAX_CHOICES = 16

PAC_PROXY = "PROXY"
PAC_HTTPS = "HTTPS"
PAC_SOCKS4 = "SOCKS4"
PAC_SOCKS5 = "SOCKS5"
PAC_DIRECT = "DIRECT"

# What each keyword means: HTTP is Firefox's name for PROXY, and a bare
# SOCKS is SOCKS5 here (Shifter speaks no SOCKS4).
_KINDS = {
    "PROXY": PAC_PROXY, "HTTP": PAC_PROXY, "HTTPS": PAC_HTTPS, "SOCKS": PAC_SOCKS5, "SOCKS5": PAC_SOCKS5,
    "SOCKS4": PAC_SOCKS4,
}

_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>[0-9]{1,5})")


class AnswerError(ValueError):
    """
    The answer holds no usable choice; the message says why.
    """


@dataclass(frozen=True)
class PacChoice:
    """
    One entry of a PAC answer.

    @ivar kind: L{PAC_PROXY}, L{PAC_HTTPS}, L{PAC_SOCKS4}, L{PAC_SOCKS5} or
        L{PAC_DIRECT}.
    @ivar host: the proxy's host name or address; C{""} for DIRECT.
    @ivar port: the proxy's port; 0 for DIRECT.
    """

    kind: str
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == PAC_DIRECT:
            return PAC_DIRECT
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind} {host}:{self.port}"

    @property
    def isAddress(self) -> bool:
        """
        Whether the host is an IP address (no look-up needed).
        """
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parseAnswer(answer: object) -> tuple[PacChoice, ...]:
    """
    The choices of a C{FindProxyForURL} answer, in order.

    @raise AnswerError: if it is not a string, is too long, or holds no
        choice Shifter can read.
    """
    if not isinstance(answer, str):
        raise AnswerError(f"FindProxyForURL returned {type(answer).__name__}, not a string")
    if len(answer) > MAX_ANSWER:
        raise AnswerError(f"FindProxyForURL returned {len(answer)} characters (at most {MAX_ANSWER} are read)")
    choices: list[PacChoice] = []
    skipped: list[str] = []
    for entry in answer.split(";"):
        words = entry.split()
        if not words:
            continue
        keyword = words[0].upper()
        if keyword == PAC_DIRECT and len(words) == 1:
            choice: Optional[PacChoice] = PacChoice(PAC_DIRECT)
        elif keyword in _KINDS and len(words) == 2:
            choice = _proxyChoice(_KINDS[keyword], words[1])
        else:
            choice = None
        if choice is None:
            skipped.append(entry.strip())
        elif choice not in choices and len(choices) < MAX_CHOICES:
            choices.append(choice)
    if not choices:
        shown = answer.strip()
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise AnswerError(f"FindProxyForURL returned no usable entry: {shown!r}")
    return tuple(choices)


def _proxyChoice(kind: str, text: str) -> Optional[PacChoice]:
    match = _HOST.fullmatch(text)
    if match is None:
        return None
    port = int(match.group("port"))
    if not 0 < port < 65536:
        return None
    host = match.group("v6") or match.group("host")
    if match.group("v6"):
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            return None
    elif host.startswith(".") or host.endswith("..") or ".." in host:
        return None
    return PacChoice(kind, host.lower().rstrip("."), port)


def formatChoices(choices: tuple[PacChoice, ...]) -> str:
    """
    The choices as a PAC answer, normalised.
    """
    return "; ".join(str(choice) for choice in choices)
