"""
Where the PAC script comes from: a file, or an HTTP(S) URL fetched with
Twisted's client in the reactor, at start, every C{refresh} seconds and on
reload, with a conditional GET (C{If-None-Match}, C{If-Modified-Since}).

A fetch that fails, or brings a script that does not load, keeps the one in
force, with one line saying so.  A body larger than C{maxSize} is cut off
and refused as it arrives, never held whole.  Host names in the URL are
looked up with C{twisted.names} (the system's C{/etc/resolv.conf} and
C{/etc/hosts}), not with the reactor's default resolver, which would use a
thread.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from zope.interface import implementer

from twisted.internet.defer import Deferred, succeed
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.pac.evaluator import PacError, PacEvaluator

DEFAULT_REFRESH = 300.0
DEFAULT_FETCH_TIMEOUT = 10.0
# The largest PAC script accepted: real ones are a few KiB.
DEFAULT_MAX_SIZE = 1024 * 1024


class FetchError(Exception):
    """
    The script could not be fetched; the message says why.
    """


class _NotModified(Exception):
    pass


class _BoundedBody(Protocol):
    def __init__(self, limit: int, finished: Deferred[bytes]) -> None:
        self.limit = limit
        self.finished = finished
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(Failure(FetchError(f"larger than {self.limit} bytes")))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.finished.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(Failure(FetchError(f"body cut short: {reason.getErrorMessage()}")))


@implementer(IReactorPluggableNameResolver)
class _NamesReactor:
    """
    The reactor as the HTTP client sees it: host names looked up with
    C{twisted.names}, in the reactor, never in a thread.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.nameResolver = _NamesResolver()

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IHostnameResolver)
class _NamesResolver:
    """
    An address for itself; a name through C{twisted.names}, made when
    first needed.
    """

    def __init__(self) -> None:
        self._names: Any = None

    def resolveHostName(  # type: ignore[no-untyped-def]
        self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes=None, transportSemantics: str = "TCP",
    ) -> Any:
        from twisted.internet._resolver import HostResolution, SimpleResolverComplexifier

        if isIPAddress(hostName) or isIPv6Address(hostName):
            resolution = HostResolution(hostName)
            receiver.resolutionBegan(resolution)
            kind = IPv6Address if ":" in hostName else IPv4Address
            receiver.addressResolved(kind("TCP", hostName, portNumber))
            receiver.resolutionComplete()
            return resolution
        if self._names is None:
            from twisted.names.client import createResolver

            self._names = SimpleResolverComplexifier(createResolver())
        return self._names.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)


class PacSource:
    """
    The PAC script at C{location}, loaded into C{evaluator} and kept
    current.

    @ivar loadedAt: when the script in force was loaded, or C{None}.
    @ivar firstAttempt: fires once the first fetch has ended, loaded or not.
    """

    log = Logger()

    def __init__(
        self,
        location: str,
        evaluator: PacEvaluator,
        reactor: Any,
        refresh: float = DEFAULT_REFRESH,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        maxSize: int = DEFAULT_MAX_SIZE,
        withoutScript: str = "",
    ) -> None:
        """
        @param withoutScript: what decides while no script is in force, for
            the line that says the first one could not be had.
        """
        self.location = location
        self.evaluator = evaluator
        self.reactor = reactor
        self.refresh = refresh
        self.timeout = timeout
        self.maxSize = maxSize
        self.withoutScript = withoutScript
        self.loadedAt: Optional[float] = None
        self.firstAttempt: Deferred[None] = Deferred()
        self._etag: Optional[bytes] = None
        self._modified: Optional[bytes] = None
        self._mtime: Optional[float] = None
        self._loop: Optional[LoopingCall] = None
        self._fetching: Optional[Deferred[None]] = None
        self._agent: Any = None
        # The validators and time of what was fetched, kept once it loads.
        self._pendingValidators: tuple[Optional[bytes], Optional[bytes]] = (None, None)
        self._pendingMtime: Optional[float] = None
        # WPAD: the URLs to try, the one that answered, and where they
        # come from (a DHCP lease, or the search domain), in words.
        self.wpadUrls: list[str] = []
        self.origin: Optional[str] = None
        self.found: Optional[str] = None
        self._pendingFound: Optional[str] = None
        self._wpadError: Optional[str] = None
        if self.isWpad:
            from shifter.pac.wpad import WpadError, wpadCandidates

            try:
                self.origin, self.wpadUrls = wpadCandidates()
            except WpadError as e:
                self._wpadError = str(e)

    @property
    def isURL(self) -> bool:
        return self.isWpad or self.location.startswith(("http://", "https://"))

    @property
    def isWpad(self) -> bool:
        return self.location == "wpad"

    @property
    def shown(self) -> str:
        """
        Where the script comes from, for log lines.
        """
        if self.isWpad:
            return f"wpad ({self.found})" if self.found else "wpad"
        return self.location

    def start(self) -> Deferred[None]:
        """
        Fetch now, then every C{refresh} seconds.

        @return: L{firstAttempt}.
        """
        if self._loop is None:
            self._loop = LoopingCall(self.update)
            self._loop.clock = self.reactor
            self._loop.start(self.refresh, now=True)
        return self.firstAttempt

    def stop(self) -> None:
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()
        fetching, self._fetching = self._fetching, None
        if fetching is not None and not fetching.called:
            fetching.cancel()

    def update(self, why: str = "") -> Deferred[None]:
        """
        Fetch the script (conditionally), and load it if it changed.  One
        at a time: a call while a fetch runs waits for it.

        @return: a C{Deferred} that fires when done, never with a failure.
        """
        if self._fetching is not None:
            waiting: Deferred[None] = Deferred()
            self._fetching.addBoth(lambda _: waiting.callback(None))
            return waiting
        fetching = self._fetching = Deferred()
        try:
            got = self._fetch()
        except Exception:
            got = Deferred()
            got.errback(Failure())
        got.addCallback(self._load)
        got.addCallbacks(self._updated, self._notUpdated)

        def done(_: object) -> None:
            self._fetching = None
            if not self.firstAttempt.called:
                self.firstAttempt.callback(None)
            fetching.callback(None)

        got.addBoth(done)
        return fetching

    def _fetch(self) -> Deferred[Optional[bytes]]:
        if self.isWpad:
            return self._discover()
        if self.isURL:
            return self._fetchURL()
        path = self.location[len("file://"):] if self.location.startswith("file://") else self.location
        try:
            status = os.stat(path)
            if status.st_size > self.maxSize:
                raise FetchError(f"{status.st_size} bytes, larger than {self.maxSize}")
            if self._mtime == status.st_mtime and self.loadedAt is not None:
                return succeed(None)
            with open(path, "rb") as f:
                body = f.read(self.maxSize + 1)
        except OSError as e:
            raise FetchError(e.strerror or str(e)) from None
        if len(body) > self.maxSize:
            raise FetchError(f"larger than {self.maxSize} bytes")
        self._pendingMtime = status.st_mtime
        return succeed(body)

    def _discover(self) -> Deferred[Optional[bytes]]:
        """
        WPAD: the script at the URL found before, else at the first
        candidate that gives one.
        """
        if self._wpadError is not None:
            raise FetchError(self._wpadError)
        urls = [self.found] if self.found else list(self.wpadUrls)
        result: Deferred[Optional[bytes]] = Deferred()
        tried: list[str] = []

        def attempt(index: int) -> None:
            if index >= len(urls):
                self.found = None
                result.errback(Failure(FetchError(
                    f"WPAD found no script ({self.origin}): " + "; ".join(tried)
                )))
                return
            url = urls[index]

            def got(body: Optional[bytes]) -> None:
                self._pendingFound = url
                result.callback(body)

            def failed(reason: Failure) -> None:
                tried.append(f"{url}: {reason.getErrorMessage()}")
                attempt(index + 1)

            try:
                fetching = self._fetchURL(url)
            except Exception:
                failed(Failure())
                return
            fetching.addCallbacks(got, failed)

        attempt(0)
        return result

    def _fetchURL(self, url: Optional[str] = None) -> Deferred[Optional[bytes]]:
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers

        if self._agent is None:
            self._agent = Agent(_NamesReactor(self.reactor), connectTimeout=self.timeout)
        url = url or self.location
        headers = Headers({b"User-Agent": [b"Shifter PAC"]})
        if self.loadedAt is not None and (not self.isWpad or url == self.found):
            if self._etag is not None:
                headers.addRawHeader(b"If-None-Match", self._etag)
            if self._modified is not None:
                headers.addRawHeader(b"If-Modified-Since", self._modified)
        request = self._agent.request(b"GET", url.encode(), headers)
        request.addTimeout(self.timeout, self.reactor)

        def answered(response: Any) -> Deferred[Optional[bytes]]:
            if response.code == 304:
                response.deliverBody(Protocol())
                return succeed(None)
            if response.code != 200:
                response.deliverBody(Protocol())
                raise FetchError(f"HTTP {response.code} {response.phrase.decode('latin-1', 'replace')}")
            length = response.length
            if isinstance(length, int) and length > self.maxSize:
                response.deliverBody(Protocol())
                raise FetchError(f"{length} bytes, larger than {self.maxSize}")
            finished: Deferred[bytes] = Deferred()
            response.deliverBody(_BoundedBody(self.maxSize, finished))
            finished.addTimeout(self.timeout, self.reactor)
            self._pendingValidators = (
                (response.headers.getRawHeaders(b"etag") or [None])[0],
                (response.headers.getRawHeaders(b"last-modified") or [None])[0],
            )
            return finished  # type: ignore[return-value]

        return request.addCallback(answered)

    def _load(self, body: Optional[bytes]) -> Deferred[bool]:
        if body is None:
            return succeed(False)  # not modified
        try:
            script = body.decode("utf-8")
        except UnicodeDecodeError:
            script = body.decode("latin-1")
        if script == self.evaluator.script:
            self._commit()
            return succeed(False)
        def loaded(_: None) -> bool:
            self._commit()
            return True

        return self.evaluator.load(script).addCallback(loaded)

    def _commit(self) -> None:
        if self.isWpad and self._pendingFound != self.found:
            self.found = self._pendingFound
            self.log.info(
                "PAC wpad: found {url} ({origin})",
                url=self.found, origin=self.origin,
            )
        if self.isURL:
            self._etag, self._modified = self._pendingValidators
        else:
            self._mtime = self._pendingMtime

    def _updated(self, changed: bool) -> None:
        if not changed:
            return
        first = self.loadedAt is None
        self.loadedAt = self.reactor.seconds()
        self.log.info(
            "PAC {location} {what} ({size} bytes)",
            location=self.shown,
            what="loaded" if first else "changed: the new script is in force, answers cached before are dropped",
            size=len((self.evaluator.script or "").encode()),
        )

    def _notUpdated(self, reason: Failure) -> None:
        why = reason.getErrorMessage()
        if reason.check(PacError):
            why = f"the script does not load: {why}"
        elif not reason.check(FetchError):
            why = f"cannot fetch it: {why}"
        if self.loadedAt is not None:
            self.log.warn("PAC {location}: {why}; keeping the script in force", location=self.shown, why=why)
        else:
            self.log.warn(
                "PAC {location}: {why}; no PAC script, so {fallback} until one loads",
                location=self.shown, why=why, fallback=self.withoutScript or "the fallback decides",
            )
