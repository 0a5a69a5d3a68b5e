"""
C{--pac wpad}: where the site's PAC script is, found by the DNS devolution
of the gateway's search domain, never above the registrable domain.

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
refused rather than guessed.  DHCP's option 252 is not read.
"""

from __future__ import annotations

from typing import Iterable, Optional

PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
RESOLV_CONF = "/etc/resolv.conf"


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


def wpadCandidates(resolvConf: str = RESOLV_CONF, publicSuffixes: str = PUBLIC_SUFFIX_LIST) -> tuple[str, list[str]]:
    """
    The search domain and its WPAD URLs.

    @raise WpadError: with no search domain, no list, or no candidate.
    """
    domain = searchDomain(resolvConf)
    if domain is None:
        raise WpadError(f"no search domain in {resolvConf} to look for wpad.<domain> in")
    urls = candidates(domain, PublicSuffixes.load(publicSuffixes))
    if not urls:
        raise WpadError(f"the search domain {domain} is a public suffix: no wpad name under it is the site's")
    return domain, urls
