"""
C{--pac wpad}: where the site's PAC script is, from the gateway's DHCP
lease (option 252), else found by the DNS devolution of the gateway's
search domain, never above the registrable domain.

For the search domain C{a.b.corp.example.com} Shifter tries, in order,
C{http://wpad.a.b.corp.example.com/wpad.dat}, C{wpad.b.corp...},
C{wpad.corp.example.com}, C{wpad.example.com}, and stops there: the
registrable domain (the public suffix, from the Public Suffix List, and
one label more) is the last.  Above it (C{wpad.com}, C{wpad.co.uk}) a
stranger could publish a PAC script for every gateway that asks: the
classic WPAD hijack.  A domain that is itself a public suffix gives no
candidate at all.

The list is Debian's C{publicsuffix} package
(C{/usr/share/publicsuffix/public_suffix_list.dat}); without it WPAD is
refused rather than guessed.

Before DNS, the gateway's DHCP lease is read: where the site's DHCP
server gave the PAC URL in option 252 (as Windows clients ask for it), that
URL is the one, as browsers take it.  The leases read are ISC dhclient's
(C{/var/lib/dhcp/dhclient*.leases}: C{option wpad "URL";} when
dhclient.conf names the option, else C{option unknown-252 ...}, as text
or hex) and systemd-networkd's (C{/run/systemd/netif/leases/*}:
C{OPTION_252=} in hex), the newest file first and the last lease in it.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterable, Optional

PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
RESOLV_CONF = "/etc/resolv.conf"
DHCP_LEASES = (
    "/var/lib/dhcp/dhclient*.leases",
    "/var/lib/dhclient/*.leases",
    "/run/systemd/netif/leases/*",
)
# The longest URL taken from a lease.
MAX_URL = 2048

_DHCLIENT_OPTION = re.compile(
    r'^\s*option\s+(?:wpad|wpad-url|unknown-252)\s+("(?:[^"\\]|\\.)*"|[0-9a-fA-F:]+)\s*;', re.M
)
_NETWORKD_OPTION = re.compile(r"^OPTION_252=([0-9a-fA-F]+)\s*$", re.M)


class WpadError(ValueError):
    """
    WPAD cannot be used here; the message says why.
    """


class PublicSuffixes:
    """
    The Public Suffix List's rules: plain, wildcard (C{*.ck}) and
    exceptions (C{!www.ck}); a name no rule covers has its last label as
    its public suffix (the list's default rule, C{*}).
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.rules: set[str] = set()
        self.exceptions: set[str] = set()
        for line in lines:
            rule = line.split("//", 1)[0].strip().lower()
            if not rule:
                continue
            rule = rule.split()[0]
            if rule.startswith("!"):
                self.exceptions.add(rule[1:])
            else:
                self.rules.add(rule)

    @classmethod
    def load(cls, path: str = PUBLIC_SUFFIX_LIST) -> PublicSuffixes:
        """
        @raise WpadError: if the list cannot be read.
        """
        try:
            with open(path, encoding="utf-8") as f:
                return cls(f)
        except OSError as e:
            raise WpadError(f"cannot read the Public Suffix List {path}: {e.strerror} "
                            "(Debian's publicsuffix package)") from None

    def suffixLength(self, labels: list[str]) -> int:
        """
        How many of C{labels}' last labels make its public suffix.
        """
        longest = 1
        for count in range(1, len(labels) + 1):
            tail = ".".join(labels[-count:])
            if tail in self.exceptions:
                return count - 1
            wildcard = ".".join(["*"] + labels[-count + 1:]) if count > 1 else "*"
            if tail in self.rules or (count > 1 and wildcard in self.rules):
                longest = count
        return longest

    def registrable(self, name: str) -> Optional[str]:
        """
        The registrable domain of C{name} (its public suffix and one label
        more), or C{None} when C{name} is a public suffix itself.
        """
        labels = name.lower().rstrip(".").split(".")
        length = self.suffixLength(labels)
        if len(labels) <= length:
            return None
        return ".".join(labels[-length - 1:])


def searchDomain(path: str = RESOLV_CONF) -> Optional[str]:
    """
    The gateway's search domain: the first of the last C{search} or
    C{domain} line of C{path}, or C{None}.
    """
    found = None
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] in ("search", "domain"):
                    found = words[1].rstrip(".").lower()
    except OSError:
        return None
    return found or None


def candidates(domain: str, suffixes: PublicSuffixes) -> list[str]:
    """
    The WPAD URLs for C{domain}, most specific first, down to the
    registrable domain and never above it.
    """
    registrable = suffixes.registrable(domain)
    if registrable is None:
        return []
    labels = domain.lower().rstrip(".").split(".")
    stop = len(registrable.split("."))
    return [f"http://wpad.{'.'.join(labels[i:])}/wpad.dat" for i in range(0, len(labels) - stop + 1)]


def _leaseValue(raw: str) -> Optional[str]:
    """
    An option's value as a lease writes it: a quoted string (with
    backslash and octal escapes), or hex octets with or without colons.
    """
    if raw.startswith('"'):
        # dhclient writes what is not printable as octal escapes.
        value = re.sub(r"\\([0-7]{3}|.)",
                       lambda m: chr(int(m.group(1), 8)) if len(m.group(1)) == 3 else m.group(1), raw[1:-1])
    else:
        try:
            value = bytes.fromhex(raw.replace(":", "")).decode("utf-8")
        except ValueError:
            return None
    return value.rstrip("\x00")


def _usableURL(value: Optional[str]) -> Optional[str]:
    if (value and len(value) <= MAX_URL and value.isprintable() and " " not in value
            and value.lower().startswith(("http://", "https://"))):
        return value
    return None


def leaseWpadURL(text: str) -> Optional[str]:
    """
    The option 252 URL of the last lease in a lease file's C{text}, or
    C{None}.
    """
    found = [m.group(1) for m in _DHCLIENT_OPTION.finditer(text)]
    if not found:
        found = [m.group(1) for m in _NETWORKD_OPTION.finditer(text)]
    if not found:
        return None
    if "lease {" in text:
        # dhclient appends leases: only the last one's options count.
        last = text.rsplit("lease {", 1)[1]
        found = [m.group(1) for m in _DHCLIENT_OPTION.finditer(last)]
        if not found:
            return None
    return _usableURL(_leaseValue(found[-1]))


def dhcpWpadURL(patterns: Iterable[str] = DHCP_LEASES) -> Optional[tuple[str, str]]:
    """
    The PAC URL the gateway's DHCP lease gives (option 252), with the
    lease file it came from: the newest lease file that has one.
    """
    paths = sorted(
        {path for pattern in patterns for path in glob.glob(pattern)},
        key=lambda path: os.stat(path).st_mtime if os.path.exists(path) else 0.0,
        reverse=True,
    )
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 20)
        except OSError:
            continue
        url = leaseWpadURL(text)
        if url is not None:
            return url, path
    return None


def wpadCandidates(
    resolvConf: str = RESOLV_CONF,
    publicSuffixes: str = PUBLIC_SUFFIX_LIST,
    leases: Iterable[str] = DHCP_LEASES,
) -> tuple[str, list[str]]:
    """
    Where the WPAD URLs come from, in words, and the URLs: the one a DHCP
    lease gives, else the search domain's.

    @raise WpadError: with no DHCP URL and no search domain, no list, or no
        candidate.
    """
    fromDhcp = dhcpWpadURL(leases)
    if fromDhcp is not None:
        url, path = fromDhcp
        return f"DHCP option 252 in {path}", [url]
    domain = searchDomain(resolvConf)
    if domain is None:
        raise WpadError(f"no search domain in {resolvConf} to look for wpad.<domain> in")
    urls = candidates(domain, PublicSuffixes.load(publicSuffixes))
    if not urls:
        raise WpadError(f"the search domain {domain} is a public suffix: no wpad name under it is the site's")
    return f"search domain {domain}, looked for down to {urls[-1]}", urls
