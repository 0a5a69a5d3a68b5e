"""
The control socket (C{--control unix:PATH}): a running Shifter answers
C{python -m shifter.ctl} on a UNIX socket that only its owner may use.

The protocol is one JSON object per line each way: a request
C{{"command": "tunnels"}}, and an answer C{{"ok": true, ...}} or
C{{"ok": false, "error": "..."}}.  Commands:

  - C{tunnels}: every client connection not yet finished
    (L{shifter.tunnel.tunnel.TunnelInfo}'s fields), and C{ech}: the
    connections whose first bytes were read since start, by what they
    showed of Encrypted Client Hello (L{shifter.tunnel.metrics.TunnelStats.ech});
  - C{proxies}: each proxy, whether it is up, its failures in a row, the
    last error, its groups, the authentication scheme it asked for and,
    for Negotiate, the gateway's Kerberos ticket;
  - C{explain}, with C{client}, C{destination}, C{port} and optionally
    C{name}: what Shifter would do with such a connection now (the
    checks, the rule or PAC answer, the proxies in order with their
    health, the CONNECT target; L{shifter.service.pacpolicy.explain});
  - C{reload}: reload C{--config}, as SIGHUP does;
  - C{drain}: stop accepting and let open tunnels finish, then stop, as
    SIGTERM does.

The socket is created with mode 0600 (never, even for an instant, more
open), and each connection's peer credentials are checked as well: a user
other than Shifter's own (or root) is refused with a log line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from typing import Any, Callable, Optional

from zope.interface import implementer

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from shifter.service.config import DEFAULT_GROUP, RulePolicy
from shifter.service.service import ShifterService, SidePortService

COMMANDS = ("tunnels", "proxies", "explain", "reload", "drain")

# The largest request line; requests are a few dozen bytes.
MAX_REQUEST = 4096

# The longest path a UNIX socket can be bound to: sun_path's 108 bytes,
# less the terminating NUL.
MAX_SOCKET_PATH = 107


def controlPath(description: str, suffix: str = "") -> str:
    """
    The socket path that a C{--control} value names.

    @param suffix: what will be appended to the path (a worker's C{.N}),
        counted in the length check.
    @raise ValueError: for anything but C{unix:PATH}, or a path too long
        to bind.
    """
    if not description.startswith("unix:") or len(description) <= len("unix:"):
        raise ValueError(f"expected unix:PATH, got {description!r}")
    path = description[len("unix:"):]
    if "\0" in path:
        raise ValueError("the path holds a NUL byte")
    length = len(os.fsencode(path + suffix))
    if length > MAX_SOCKET_PATH:
        raise ValueError(
            f"{path + suffix} is {length} bytes long; a UNIX socket's path holds at most {MAX_SOCKET_PATH}"
        )
    return path


def peerUid(transport: Any) -> Optional[int]:
    """
    The user id of the process at the other end of a UNIX socket
    (C{SO_PEERCRED}), or C{None} if it cannot be known.
    """
    try:
        handle = transport.getHandle()
        credentials = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    _, uid, _ = struct.unpack("3i", credentials)
    return int(uid)


class ControlProtocol(LineOnlyReceiver):
    """
    One connection to the control socket: requests in, answers out.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    log = Logger()
    factory: ControlFactory

    def connectionMade(self) -> None:
        uid = self.factory.peerUid(self.transport)
        if uid is None or uid not in (0, os.geteuid()):
            own = os.geteuid()
            self.log.warn(
                "control socket: refused a connection from uid {uid}: only {allowed} may use it",
                uid="(unknown)" if uid is None else uid,
                allowed="root" if own == 0 else f"uid {own} (Shifter's) and root",
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.allowed = True

    allowed = False

    def lineReceived(self, line: bytes) -> None:
        if not self.allowed:
            return
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("expected an object with a command")
        except ValueError as e:
            self.answer({"ok": False, "error": f"bad request: {e}"})
            return
        command = request["command"]
        handler: Optional[Callable[..., Any]] = getattr(self, "command_" + command, None)
        if command not in COMMANDS or handler is None:
            self.answer({"ok": False, "error": f"unknown command {command!r}; commands: {', '.join(COMMANDS)}"})
            return
        if command == "explain":
            answering = handler(request)
            answering.addErrback(lambda f: {"ok": False, "error": f.getErrorMessage()})
            answering.addCallback(self.answer)
            return
        self.answer(handler())

    def lineLengthExceeded(self, line: bytes) -> None:
        self.answer({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
        self.transport.loseConnection()  # type: ignore[union-attr]

    def command_tunnels(self) -> dict[str, Any]:
        factory = self.factory.service.factory
        tunnels = sorted(factory.tunnels(), key=lambda t: -t.age)
        return {
            "ok": True,
            "tunnels": [dataclasses.asdict(tunnel) for tunnel in tunnels],
            "ech": dict(factory.stats.ech),
        }

    def command_proxies(self) -> dict[str, Any]:
        factory = self.factory.service.factory
        policy = factory.policy
        proxies = []
        for proxy in factory.pool.proxies:
            health = factory.pool.health[proxy]
            if isinstance(policy, RulePolicy):
                groups = sorted(name for name, members in policy.groups.items() if proxy in members)
            else:
                groups = [DEFAULT_GROUP]
            proxies.append({
                "proxy": proxy.description,
                "up": health.up,
                "state": health.state,
                "failures": health.failures,
                "lastError": health.lastError,
                "groups": groups,
                **_authState(proxy, factory.reactor.seconds()),
            })
        return {"ok": True, "proxies": proxies}

    def command_explain(self, request: dict[str, Any]) -> Deferred[dict[str, Any]]:
        from shifter.service.pacpolicy import explain

        client, destination, port, name = (request.get(k) for k in ("client", "destination", "port", "name"))
        if not isinstance(client, str) or not isinstance(destination, str) or not isinstance(port, int) \
                or isinstance(port, bool) or not (name is None or isinstance(name, str)):
            return succeed({"ok": False, "error": "explain needs client, destination (addresses), port and an optional name"})
        try:
            explaining = explain(self.factory.service.factory, client, destination, port, name or None)
        except ValueError as e:
            return succeed({"ok": False, "error": str(e)})
        return explaining.addCallback(lambda out: {"ok": True, "explain": out})

    def answer(self, answer: dict[str, Any]) -> None:
        if self.transport is None or not self.connected:
            return
        self.sendLine(json.dumps(answer, separators=(",", ":")).encode())

    def command_reload(self) -> dict[str, Any]:
        reloaded, message = self.factory.service.reload("control socket")
        if reloaded:
            return {"ok": True, "changes": message}
        return {"ok": False, "error": message}

    def command_drain(self) -> dict[str, Any]:
        service = self.factory.service
        return {"ok": True, "open": service.drain("control socket"), "timeout": service.drainTimeout}


class ControlFactory(Factory):
    """
    Serves the control socket for C{service}.

    @ivar peerUid: how a connection's peer user is found (replaceable in
        tests of the protocol on fake transports).
    """

    protocol = ControlProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, service: ShifterService, peerUid: Callable[[Any], Optional[int]] = peerUid) -> None:
        self.service = service
        self.peerUid = peerUid


@implementer(IStreamServerEndpoint)
class OwnerOnlyUNIXEndpoint:
    """
    A UNIX socket that is born owner-only: C{bind()} makes it with the
    umask, before Twisted's chmod, so the umask is narrowed around it (one
    thread, so the umask is ours alone).
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        previous = os.umask(0o177)
        try:
            return succeed(self.reactor.listenUNIX(self.path, factory, mode=0o600, wantPID=True))
        except Exception:
            return fail()
        finally:
            os.umask(previous)


class ControlService(SidePortService):
    """
    Listens on the control socket while Shifter runs.
    """

    def __init__(self, description: str, service: ShifterService, reactor: Any) -> None:
        self.path = controlPath(description)
        super().__init__(
            "control socket", self.path, OwnerOnlyUNIXEndpoint(reactor, self.path), ControlFactory(service), service,
            hint=f"python -m shifter.ctl --control unix:{self.path}",
        )


def _authState(proxy: Any, now: float) -> dict[str, Any]:
    """
    How Shifter logs in to C{proxy}: the scheme the proxy asked for
    (C{"none"} until it has), and, with a keytab, the Kerberos ticket:
    the gateway's principal, the service, the seconds it has left and the
    last error in getting it.
    """
    auth = proxy.auth
    if auth is None:
        return {"scheme": "none"}
    state: dict[str, Any] = {"scheme": auth.scheme}
    login = auth.negotiateLogin
    if login is not None:
        kerberos = login.keeper.describe()
        expires = kerberos.pop("expires")
        kerberos["expiresIn"] = None if expires is None else max(0.0, round(expires - now, 1))
        state["kerberos"] = kerberos
    return state
