"""
Running a PAC script: helper processes (L{shifter.pac.child}) that the
reactor drives over their pipes, a time limit on every call, a restart for
every helper that dies or is killed, and a cache of answers.

A helper answers one call at a time; calls wait in a bounded queue for a
free one.  A call that outlasts C{timeout} kills its helper (SIGKILL: a
loop in the script, or a look-up whose DNS server never answers) and fails
with the reason; a helper that dies (its memory limit, a crash) fails its
call the same way.  Either way a new helper takes its place, at once the
first time and after a growing pause when they keep dying, so that a
script that kills every helper costs a bounded number of processes.

Answers are cached by (host, port), each for C{ttl} seconds, at most
C{cacheSize} of them (the least recently used go first).  Failures are
cached too, for C{errorTtl}: a hostile script costs one helper per host
and period, not one per connection.

A new script is loaded into new helpers; only once one of them has
compiled it do they replace the old ones (one answering a call finishes
it first, so a reload costs no connection its answer) and the cache is
emptied.  A
script that does not compile, or does not finish loading in time, leaves
the running one in place.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.pac.answer import AnswerError, PacChoice, parseAnswer

DEFAULT_TIMEOUT = 2.0
DEFAULT_MEMORY = 256 * 1024 * 1024
DEFAULT_TTL = 300.0
DEFAULT_ERROR_TTL = 30.0
DEFAULT_CACHE_SIZE = 10000
DEFAULT_HELPERS = 2
DEFAULT_QUEUE = 1000
# The largest answer frame read from a helper.
MAX_ANSWER_FRAME = 64 * 1024
# Pauses before a helper is started again, when they keep dying.
_RESTART_PAUSES = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)


class PacError(Exception):
    """
    No answer from the PAC script; the message says why, in one line.
    """


@dataclass(frozen=True)
class PacResult:
    """
    The PAC script's answer for one connection.

    @ivar answer: what C{FindProxyForURL} returned.
    @ivar choices: its entries, in order.
    @ivar addresses: the addresses of the proxy names it holds, looked up
        by the helper.
    @ivar cached: whether it came from the cache.
    """

    answer: str
    choices: tuple[PacChoice, ...]
    addresses: dict[str, tuple[str, ...]]
    cached: bool = False


class _Call:
    __slots__ = ("request", "deferred", "helper", "timer")

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.deferred: Deferred[dict[str, Any]] = Deferred()
        self.helper: Optional[_Helper] = None
        self.timer: Any = None


class _Helper(ProcessProtocol):
    """
    One helper process: frames out on its stdin, in from its stdout.
    """

    log = Logger()

    def __init__(self, owner: Any, generation: int) -> None:
        self.owner = owner
        self.generation = generation
        self.buffer = b""
        self.call: Optional[_Call] = None
        self.loaded = False
        self.ended = False
        self.whenEnded: Deferred[None] = Deferred()
        self.killedBecause: Optional[str] = None

    def send(self, call: _Call) -> None:
        self.call = call
        call.helper = self
        body = json.dumps(call.request).encode()
        self.transport.write(struct.pack(">I", len(body)) + body)  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if length > MAX_ANSWER_FRAME:
                self.kill(f"the PAC helper sent a frame of {length} bytes")
                return
            if len(self.buffer) < 4 + length:
                return
            body, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
            call, self.call = self.call, None
            if call is None:
                self.kill("the PAC helper answered a question it was not asked")
                return
            try:
                answer = json.loads(body)
                if not isinstance(answer, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.owner._callFailed(call, "the PAC helper sent garbage")
                self.kill("the PAC helper sent garbage")
                return
            self.owner._callDone(self, call, answer)

    def errReceived(self, data: bytes) -> None:
        pass  # a traceback of the helper's own: its end is reported once

    def kill(self, why: str) -> None:
        if self.ended or self.killedBecause is not None:
            return
        self.killedBecause = why
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self.killedBecause is not None:
            why = self.killedBecause
        elif reason.check(ProcessDone):
            why = "the PAC helper exited"
        elif reason.check(ProcessTerminated):
            value: Any = reason.value
            if value.signal is not None:
                why = f"the PAC helper was killed by signal {value.signal}"
            else:
                why = f"the PAC helper exited with status {value.exitCode}"
        else:
            why = f"the PAC helper ended: {reason.getErrorMessage()}"
        self.owner._helperEnded(self, why)
        self.whenEnded.callback(None)


class PacEvaluator:
    """
    The PAC script, run in helper processes.

    @ivar script: the script in force, or C{None} before one has loaded.
    @ivar cache: (host, port) to (expiry, L{PacResult} or L{PacError}).
    @ivar restarts: helpers started again after dying or being killed.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        helpers: int = DEFAULT_HELPERS,
        timeout: float = DEFAULT_TIMEOUT,
        memory: int = DEFAULT_MEMORY,
        ttl: float = DEFAULT_TTL,
        errorTtl: float = DEFAULT_ERROR_TTL,
        cacheSize: int = DEFAULT_CACHE_SIZE,
        queueSize: int = DEFAULT_QUEUE,
        myIp: Optional[str] = None,
        command: Optional[list[str]] = None,
    ) -> None:
        self.reactor = reactor
        self.helperCount = helpers
        self.timeout = timeout
        self.memory = memory
        self.ttl = ttl
        self.errorTtl = errorTtl
        self.cacheSize = cacheSize
        self.queueSize = queueSize
        self.myIp = myIp
        self.command = command or [sys.executable, "-m", "shifter.pac.child", str(memory)]
        self.script: Optional[str] = None
        self.cache: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()
        self.restarts = 0
        self._generation = 0
        self._helpers: list[_Helper] = []
        self._idle: deque[_Helper] = deque()
        self._queue: deque[_Call] = deque()
        self._candidate: Optional[tuple[str, list[_Helper], Deferred[None]]] = None
        self._deaths = 0
        self._pending: list[Any] = []
        self._alive: list[_Helper] = []  # every helper not ended yet
        self._stopped = False

    # The script.

    def load(self, script: str) -> Deferred[None]:
        """
        Put C{script} in force once a helper has compiled it.

        @return: a C{Deferred} that fires when it is in force, or fails
            with a L{PacError} saying why it cannot be (the running script,
            if any, stays).
        """
        if self._candidate is not None:
            _, helpers, replaced = self._candidate
            self._candidate = None
            for each in helpers:
                each.kill("replaced by a newer script")
            replaced.errback(Failure(PacError("replaced by a newer script before it loaded")))
        self._generation += 1
        waiting: Deferred[None] = Deferred()
        helper = self._spawn(self._generation)
        self._candidate = (script, [helper], waiting)
        call = _Call({"op": "load", "script": script, "myIp": self.myIp})
        self._start(helper, call)
        call.deferred.addCallbacks(lambda answer: self._loaded(script, helper, answer),
                                   lambda f: self._loadFailed(script, helper, f.getErrorMessage()))
        return waiting

    def _loaded(self, script: str, helper: _Helper, answer: dict[str, Any]) -> None:
        if self._candidate is None or self._candidate[0] is not script:
            return
        if not answer.get("ok"):
            self._loadFailed(script, helper, str(answer.get("error", "the script did not load")))
            return
        _, _, waiting = self._candidate
        self._candidate = None
        old = self._helpers
        self._helpers = [helper]
        self._idle = deque()
        for each in old:
            # One answering a call finishes it (under its time limit), then
            # goes; the others go now.
            if each.call is None:
                each.kill("replaced by a newer script")
        self.script = script
        self.cache.clear()
        self._deaths = 0
        helper.loaded = True
        self._idle.append(helper)
        for _ in range(self.helperCount - 1):
            self._startHelper()
        self._next()
        waiting.callback(None)

    def _loadFailed(self, script: str, helper: _Helper, why: str) -> None:
        if self._candidate is None or self._candidate[0] is not script:
            return
        _, _, waiting = self._candidate
        self._candidate = None
        helper.kill(why)
        waiting.errback(Failure(PacError(why)))

    # Helpers.

    def _spawn(self, generation: int) -> _Helper:
        helper = _Helper(self, generation)
        env = dict(os.environ)
        path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
        self.reactor.spawnProcess(helper, self.command[0], self.command, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self._alive.append(helper)
        return helper

    def _startHelper(self) -> None:
        """
        A helper for the script in force: loaded first, then given calls.
        """
        if self._stopped or self.script is None:
            return
        generation = self._generation
        helper = self._spawn(generation)
        self._helpers.append(helper)
        call = _Call({"op": "load", "script": self.script, "myIp": self.myIp})

        def loaded(answer: dict[str, Any]) -> None:
            if helper.generation != self._generation or helper.ended:
                return
            if not answer.get("ok"):
                helper.kill(f"the script did not load again: {answer.get('error')}")
                return
            helper.loaded = True
            self._idle.append(helper)
            self._next()

        call.deferred.addCallbacks(loaded, lambda _: None)
        self._start(helper, call)

    def _start(self, helper: _Helper, call: _Call) -> None:
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = self.reactor.callLater(self.timeout, self._timedOut, call)
        helper.send(call)

    def _timedOut(self, call: _Call) -> None:
        call.timer = None
        helper = call.helper
        if helper is None:
            # Still waiting for a helper: none came free in time.
            if call in self._queue:
                self._queue.remove(call)
            self._callFailed(call, f"no PAC helper was free within {self.timeout:g} s")
            return
        why = f"the PAC script did not answer within {self.timeout:g} s"
        self._callFailed(call, why)
        if helper is not None:
            helper.call = None
            helper.kill(why)

    def _callDone(self, helper: _Helper, call: _Call, answer: dict[str, Any]) -> None:
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if answer.get("ok") and helper.loaded:
            self._deaths = 0  # helpers answer again: the next restart is at once
        if not call.deferred.called:
            call.deferred.callback(answer)
        if helper.generation != self._generation and helper not in self._helpers:
            helper.kill("replaced by a newer script")
            return
        free = helper.call is None and helper not in self._idle
        if free and helper.loaded and helper in self._helpers and helper.killedBecause is None:
            self._idle.append(helper)
            self._next()

    def _callFailed(self, call: _Call, why: str) -> None:
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if not call.deferred.called:
            call.deferred.errback(Failure(PacError(why)))

    def _helperEnded(self, helper: _Helper, why: str) -> None:
        if helper in self._alive:
            self._alive.remove(helper)
        call, helper.call = helper.call, None
        if call is not None:
            self._callFailed(call, why)
        if helper in self._idle:
            self._idle.remove(helper)
        if helper not in self._helpers:
            return  # an old generation's, or a candidate's
        self._helpers.remove(helper)
        if self._stopped or helper.generation != self._generation:
            return
        self.log.warn("{why}; starting another", why=why)
        self.restarts += 1
        pause = _RESTART_PAUSES[min(self._deaths, len(_RESTART_PAUSES) - 1)]
        self._deaths += 1
        if pause:
            self._pending.append(self.reactor.callLater(pause, self._restart))
        else:
            self._startHelper()

    def _restart(self) -> None:
        self._pending = [p for p in self._pending if p.active()]
        if len(self._helpers) < self.helperCount:
            self._startHelper()

    def _next(self) -> None:
        while self._queue and self._idle:
            call = self._queue.popleft()
            if call.deferred.called:
                continue
            self._start(self._idle.popleft(), call)

    @property
    def ready(self) -> int:
        """
        How many helpers have the script in force loaded and are alive.
        """
        return sum(1 for h in self._helpers if h.loaded and not h.ended and h.killedBecause is None)

    # Answers.

    def find(self, url: str, host: str, port: int) -> Deferred[PacResult]:
        """
        C{FindProxyForURL(url, host)}, from the cache under (host, port)
        when it holds a fresh answer.

        @return: a C{Deferred} firing with a L{PacResult}, or failing with
            a L{PacError}.
        """
        key = (host, port)
        now = self.reactor.seconds()
        entry = self.cache.get(key)
        if entry is not None:
            expiry, value = entry
            if expiry > now:
                self.cache.move_to_end(key)
                if isinstance(value, PacError):
                    return fail(Failure(PacError(f"{value} (cached)")))
                return succeed(PacResult(value.answer, value.choices, value.addresses, cached=True))
            del self.cache[key]
        if self.script is None:
            return fail(Failure(PacError("no PAC script is loaded")))
        if len(self._queue) >= self.queueSize:
            return fail(Failure(PacError(f"{self.queueSize} PAC calls are waiting already")))
        call = _Call({"op": "find", "url": url, "host": host})
        generation = self._generation
        call.timer = self.reactor.callLater(self.timeout, self._timedOut, call)
        self._queue.append(call)
        self._next()
        result: Deferred[PacResult] = Deferred(lambda _: self._cancel(call))

        def answered(answer: dict[str, Any]) -> None:
            try:
                value: Any = self._result(answer)
            except PacError as e:
                value = e
            if generation == self._generation:
                self._remember(key, value, self.ttl if isinstance(value, PacResult) else self.errorTtl)
            if result.called:
                return
            if isinstance(value, PacError):
                result.errback(Failure(value))
            else:
                result.callback(value)

        def failed(reason: Failure) -> None:
            error = reason.value if isinstance(reason.value, PacError) else PacError(reason.getErrorMessage())
            if generation == self._generation and not self._stopped:
                self._remember(key, error, self.errorTtl)
            if not result.called:
                result.errback(Failure(error))

        call.deferred.addCallbacks(answered, failed)
        return result

    def _cancel(self, call: _Call) -> None:
        # The connection gave up: the call goes on if it has started (its
        # answer is cached), else it is dropped from the queue.
        if call.helper is None and call in self._queue:
            self._queue.remove(call)
            self._callFailed(call, "given up by its connection")

    def _result(self, answer: dict[str, Any]) -> PacResult:
        if not answer.get("ok"):
            raise PacError(str(answer.get("error", "no answer")))
        text = answer.get("answer")
        try:
            choices = parseAnswer(text)
        except AnswerError as e:
            raise PacError(str(e)) from None
        raw = answer.get("addresses") or {}
        addresses = {
            str(name): tuple(str(a) for a in found)
            for name, found in (raw.items() if isinstance(raw, dict) else ())
            if isinstance(found, list)
        }
        return PacResult(str(text), choices, addresses)

    def _remember(self, key: tuple[str, int], value: Any, ttl: float) -> None:
        if ttl <= 0 or self.cacheSize <= 0:
            return
        self.cache[key] = (self.reactor.seconds() + ttl, value)
        self.cache.move_to_end(key)
        while len(self.cache) > self.cacheSize:
            self.cache.popitem(last=False)

    def cached(self, host: str, port: int) -> Optional[Any]:
        """
        The fresh cache entry for (host, port), a L{PacResult} or a
        L{PacError}, or C{None}; the cache is not changed.
        """
        entry = self.cache.get((host, port))
        if entry is None or entry[0] <= self.reactor.seconds():
            return None
        return entry[1]

    def stop(self) -> Deferred[None]:
        """
        Kill every helper and start no more.

        @return: a C{Deferred} that fires once every helper has ended.
        """
        self._stopped = True
        for pending in self._pending:
            if pending.active():
                pending.cancel()
        self._pending = []
        helpers = list(self._alive)
        for helper in helpers:
            helper.kill("Shifter is stopping")
        for call in list(self._queue):
            self._callFailed(call, "Shifter is stopping")
        self._queue.clear()
        if self._candidate is not None:
            _, _, waiting = self._candidate
            self._candidate = None
            waiting.errback(Failure(PacError("Shifter is stopping")))
            waiting.addErrback(lambda _: None)
        ends = [helper.whenEnded for helper in helpers if not helper.ended]
        from twisted.internet.defer import gatherResults

        return gatherResults(ends).addCallback(lambda _: None)
