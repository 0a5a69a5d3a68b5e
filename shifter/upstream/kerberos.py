"""
Negotiate (SPNEGO over Kerberos, RFC 4559) to the upstream proxy, with the
gateway's own identity from a keytab.

Getting a ticket waits on the KDC, and the Kerberos library does that
blocking, so it never happens in the reactor: a L{TicketKeeper} runs the
ticket helper (L{shifter.upstream.tickethelper}) as a child process, which
logs in from the keytab and writes the ticket-granting ticket and the
proxy's service ticket into a private credential cache; the keeper runs it
again before the tickets expire, and after a failure with a growing pause.

Each CONNECT then gets a security context of its own (a proxy's replay
cache refuses an authenticator seen before), built in the reactor from the
cached service ticket alone (L{NegotiateLogin.authorization}).  The
service is named as a Kerberos principal, C{HTTP/host@REALM}, never as a
host-based name the library would canonicalize through DNS.  While no
valid ticket is cached the context is not built at all: the CONNECT is
refused with the reason the helper gave, and the KDC is not asked.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

# The SPNEGO mechanism (RFC 4178).
_SPNEGO_OID = "1.3.6.1.5.5.2"
# The helper's whole answer is one short JSON line.
_MAX_HELPER_OUTPUT = 64 * 1024

# The keeper's states.
IDLE = "idle"  # waiting for its next run
FETCHING = "fetching"  # the helper is running
STOPPED = "stopped"


class NegotiateError(Exception):
    """
    A Negotiate login cannot be made now; the message says why, in one
    line.
    """


@dataclass(frozen=True)
class Ticket:
    """
    What the helper last obtained.

    @ivar principal: the gateway's principal.
    @ivar target: the proxy's service principal.
    @ivar expires: when the first of the two tickets runs out (the
        reactor's clock, in seconds since the epoch).
    """

    principal: str
    target: str
    expires: float


def helperCommand(keytab: str, principal: str | None, ccache: str, service: str) -> list[str]:
    """
    The ticket helper's command line: this Python, this package.
    """
    command = [sys.executable, "-m", "shifter.upstream.tickethelper", "--keytab", keytab, "--ccache", ccache,
               "--service", service]
    if principal:
        command += ["--principal", principal]
    return command


class _HelperProtocol(ProcessProtocol):
    """
    One run of the helper: its output, bounded, and its end.
    """

    def __init__(self, ended: Callable[[bytes, bytes, Failure], None]) -> None:
        self.ended = ended
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        if len(self.out) < _MAX_HELPER_OUTPUT:
            self.out += data[: _MAX_HELPER_OUTPUT - len(self.out)]

    def errReceived(self, data: bytes) -> None:
        if len(self.err) < _MAX_HELPER_OUTPUT:
            self.err += data[: _MAX_HELPER_OUTPUT - len(self.err)]

    def processEnded(self, reason: Failure) -> None:
        self.ended(self.out, self.err, reason)


class TicketKeeper:
    """
    Keeps the gateway's tickets for one proxy fresh in a private
    credential cache, through the ticket helper.

    @ivar ticket: the tickets now cached, if any.
    @ivar lastError: why the last run of the helper failed, if it did.
    @ivar state: L{IDLE}, L{FETCHING} or L{STOPPED}.
    """

    log = Logger()

    # A helper run that takes longer is killed (the library's own KDC
    # timeouts are shorter).
    timeLimit = 30.0
    # Never use a ticket in its last seconds: the library would then ask
    # the KDC for a new one itself, in the reactor.
    grace = 10.0
    # Pauses between failed runs: doubling from the first to the last.
    retryFirst = 5.0
    retryMax = 60.0

    def __init__(
        self,
        keytab: str,
        principal: str | None,
        service: str,
        reactor: Any = None,
        command: Callable[[str, str | None, str, str], Sequence[str]] = helperCommand,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.keytab = keytab
        self.principal = principal
        self.service = service
        self.reactor = reactor
        self.command = command
        self.state = IDLE
        self.ticket: Ticket | None = None
        self.lastError: str | None = None
        self._directory: str | None = None
        self._timer: Any = None
        self._limit: Any = None
        self._process: Any = None
        self._retry = self.retryFirst
        self._started = False
        self._killed = False
        self._waiting: list[Deferred[None]] = []

    @property
    def ccache(self) -> str:
        """
        The credential cache's file name (in a directory only this user
        can read).
        """
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="shifter-krb5-")
        return os.path.join(self._directory, "ccache")

    @property
    def noKeytab(self) -> str:
        """
        A client keytab that does not exist, named to the library in the
        reactor: so that it never logs in by itself there, as it would
        from the default client keytab when a cache's tickets run out.
        """
        return "FILE:" + os.path.join(os.path.dirname(self.ccache), "no-client-keytab")

    @property
    def who(self) -> str:
        """
        The gateway's principal, as known so far.
        """
        if self.ticket is not None:
            return self.ticket.principal
        return self.principal or f"the first principal of {self.keytab}"

    def start(self) -> None:
        """
        Run the helper now, and keep the tickets fresh until L{stop}.
        """
        if self._started or self.state == STOPPED:
            return
        self._started = True
        self._run()

    def stop(self) -> None:
        """
        Stop: no more runs, a running helper killed, the cache removed.
        """
        if self.state == STOPPED:
            return
        self.state = STOPPED
        for call in (self._timer, self._limit):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._limit = None
        self.ticket = None
        self.lastError = "Shifter is stopping, or its proxies were reconfigured"
        self._settle()
        process, self._process = self._process, None
        if process is not None:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass  # it has just ended
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def settled(self) -> Deferred[None]:
        """
        Fires once the helper's current run has ended (at once if none is
        running): for C{doctor}, which waits for the first login.
        """
        if self.state != FETCHING:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _run(self) -> None:
        self._timer = None
        self.state = FETCHING
        protocol = _HelperProtocol(self._ended)
        command = list(self.command(self.keytab, self.principal, self.ccache, self.service))
        try:
            self._process = self.reactor.spawnProcess(
                protocol, command[0], command, env=os.environ.copy(), childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError as e:
            self._failed(f"cannot run the ticket helper: {e}")
            return
        self._limit = self.reactor.callLater(self.timeLimit, self._tooSlow)

    def _tooSlow(self) -> None:
        self._limit = None
        process = self._process
        if process is not None:
            self._killed = True
            process.signalProcess("KILL")

    def _ended(self, out: bytes, err: bytes, reason: Failure) -> None:
        if self.state == STOPPED:
            return
        self._process = None
        if self._limit is not None and self._limit.active():
            self._limit.cancel()
        self._limit = None
        if self._killed:
            self._killed = False
            self._failed(f"the ticket helper (the KDC) did not answer within {self.timeLimit:g} s")
            return
        answer = _parseAnswer(out)
        if answer is None:
            detail = err.decode("utf-8", "replace").strip().splitlines()
            why = detail[-1] if detail else reason.getErrorMessage()
            self._failed(f"the ticket helper gave no answer: {why}")
            return
        if "error" in answer:
            self._failed(str(answer["error"]))
            return
        try:
            ticket = Ticket(str(answer["principal"]), str(answer["target"]), float(answer["expires"]))
        except (KeyError, TypeError, ValueError):
            self._failed("the ticket helper gave an answer Shifter cannot read")
            return
        now = self.reactor.seconds()
        first = self.ticket is None or self.lastError is not None
        self.ticket, self.lastError = ticket, None
        self._retry = self.retryFirst
        self.state = IDLE
        # Renew once three quarters of what is left have passed, well
        # before the grace period starts.
        left = ticket.expires - now
        self._timer = self.reactor.callLater(max(1.0, min(left * 0.75, left - 2 * self.grace)), self._run)
        if first:
            self.log.info(
                "Kerberos: logged in as {principal} for {target}; tickets valid for {left:.0f} s, renewed before",
                principal=ticket.principal, target=ticket.target, left=left,
            )
        else:
            self.log.info("Kerberos: tickets renewed, valid for {left:.0f} s", left=left)
        self._settle()

    def _failed(self, why: str) -> None:
        repeated = why == self.lastError
        self.lastError = why
        self.state = IDLE
        pause = self._retry
        self._retry = min(self._retry * 2, self.retryMax)
        self._timer = self.reactor.callLater(pause, self._run)
        if not repeated:
            self.log.error(
                "Kerberos: no ticket for the proxy: {reason}; trying again in {pause:g} s", reason=why, pause=pause
            )
        self._settle()

    def credentials(self) -> tuple[str, str]:
        """
        The cache and the proxy's service principal, for a context built
        now.

        @raise NegotiateError: if no valid ticket is cached (none yet, or
            it expires within L{grace}), with the reason.
        """
        ticket = self.ticket
        if ticket is None or self.reactor.seconds() >= ticket.expires - self.grace:
            why = self.lastError or ("the first login is still running" if self.state == FETCHING else "none yet")
            raise NegotiateError(f"no Kerberos ticket for {self.service} as {self.who} ({why})")
        return "FILE:" + self.ccache, ticket.target

    def describe(self) -> dict[str, Any]:
        """
        The keeper's state for C{ctl proxies}.
        """
        ticket = self.ticket
        return {
            "principal": self.who,
            "service": ticket.target if ticket is not None else self.service,
            "expires": ticket.expires if ticket is not None else None,
            "error": self.lastError,
        }


def _parseAnswer(out: bytes) -> dict[str, Any] | None:
    lines = out.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        return None
    try:
        answer = json.loads(lines[-1])
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class NegotiateLogin:
    """
    The Negotiate answers for one proxy: a fresh SPNEGO token for each
    CONNECT, from the keeper's cached tickets.

    Each time the keeper reports new tickets, they are copied once from its
    cache file into a credential cache in this process's memory, of this
    login's own: a token is then made without reading and parsing the file
    again (which took half of a token's cost).  The context itself is new
    for every token.
    """

    def __init__(self, keeper: TicketKeeper) -> None:
        self.keeper = keeper
        # The tickets the handles were made for, the library's handle on
        # the credentials (in memory), the service's name and the SPNEGO
        # mechanism.
        self._handles: tuple[Ticket | None, Any, Any, Any] | None = None
        self._memory = f"MEMORY:shifter-negotiate-{id(self):x}"

    def start(self) -> Deferred[None]:
        """
        Start keeping the tickets; fires once the first login has
        succeeded or failed.
        """
        self.keeper.start()
        return self.keeper.settled()

    def stop(self) -> None:
        self.keeper.stop()
        self._handles = None

    def _handlesFor(self, ccache: str, target: str) -> tuple[Ticket | None, Any, Any, Any]:
        """
        The handles for the keeper's current tickets: made again, and the
        tickets copied into memory, when the keeper has new ones.
        """
        import gssapi

        handles = self._handles
        if handles is not None and handles[0] is self.keeper.ticket:
            return handles
        fromFile = gssapi.Credentials(usage="initiate", store={"ccache": ccache, "client_keytab": self.keeper.noKeytab})
        gssapi.raw.store_cred_into(
            {b"ccache": self._memory.encode()}, fromFile, usage="initiate", overwrite=True, set_default=False
        )
        creds = gssapi.Credentials(
            usage="initiate", store={"ccache": self._memory, "client_keytab": self.keeper.noKeytab}
        )
        name = gssapi.Name(target, gssapi.NameType.kerberos_principal)
        handles = self._handles = (self.keeper.ticket, creds, name, gssapi.OID.from_int_seq(_SPNEGO_OID))
        return handles

    def authorization(self) -> str:
        """
        The C{Proxy-Authorization} value: C{Negotiate} and a new token.

        @raise NegotiateError: with the reason, in one line (no valid
            ticket cached, or the library's own reason).
        """
        import gssapi.raw

        ccache, target = self.keeper.credentials()
        try:
            _, creds, name, mech = self._handlesFor(ccache, target)
            # A context of its own (none given), made and stepped once.
            result = gssapi.raw.init_sec_context(
                name, creds, None, mech, gssapi.raw.RequirementFlag.out_of_sequence_detection
            )
        except gssapi.raw.GSSError as e:
            from shifter.upstream.tickethelper import gssReason

            raise NegotiateError(f"cannot make a token for {target} as {self.keeper.who}: {gssReason(e)}") from None
        if not result.token:
            raise NegotiateError(f"cannot make a token for {target} as {self.keeper.who}: the library gave none")
        return "Negotiate " + base64.b64encode(result.token).decode("ascii")
