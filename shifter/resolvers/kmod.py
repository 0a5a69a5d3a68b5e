"""
The Shifter kernel module, as seen from Python: its generic netlink
messages, a client for its commands, and C{--resolver=kmod}.

The names and numbers mirror C{kernel_module/include/uapi/linux/shifter.h}
and the family's YNL spec, C{kernel_module/Documentation/netlink/specs/
shifter.yaml}; the tests check all three agree.

Run as C{python -m shifter.kmod enable} (or C{disable}, C{status},
C{stats}, C{ports}, C{set-ports 443 8443}) to drive the module in this
network namespace.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from pyroute2.netlink import NLA_F_NESTED, genlmsg, nla
from pyroute2.netlink.generic import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, ctrlmsg
from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from shifter.kernel.netlink import (
    HEADER_SIZE,
    NETLINK_GENERIC,
    FamilyNotFound,
    NetlinkException,
    NetlinkNotFound,
    NetlinkPort,
    NetlinkProtocol,
    NetlinkTimeout,
    encodeAttribute,
    parseAttributes,
)
from shifter.resolvers.resolver import (
    Destination,
    DestinationUnknown,
    IOriginalDestinationResolver,
    ResolverError,
    ResolverUnavailable,
)

SHIFTER_GENL_NAME = "shifter"
SHIFTER_GENL_VERSION = 2
SHIFTER_MAX_PORTS = 64

SHIFTER_CMD_UNSPEC = 0
SHIFTER_CMD_GET = 1
SHIFTER_CMD_STATS = 2
SHIFTER_CMD_GET_CONFIG = 3
SHIFTER_CMD_SET_PORTS = 4
SHIFTER_CMD_ENABLE = 5
SHIFTER_CMD_DISABLE = 6

SHIFTER_A_UNSPEC = 0
SHIFTER_A_FAMILY = 1
SHIFTER_A_SRC_ADDR = 2
SHIFTER_A_SRC_PORT = 3
SHIFTER_A_DST_ADDR = 4
SHIFTER_A_DST_PORT = 5
SHIFTER_A_STATS = 6
SHIFTER_A_PORTS = 7
SHIFTER_A_LOCAL_ADDR = 8
SHIFTER_A_LOCAL_PORT = 9
SHIFTER_A_ENABLED = 10
SHIFTER_A_IFINDEX = 11

SHIFTER_A_PORTS_UNSPEC = 0
SHIFTER_A_PORTS_PORT = 1

# SHIFTER_A_IFINDEX once the interface a namespace named was removed: it
# records on none until enabled again.
IFINDEX_GONE = 0xFFFFFFFF

SHIFTER_STAT_UNSPEC = 0
SHIFTER_STAT_ENTRIES = 1
SHIFTER_STAT_INSERTS = 2
SHIFTER_STAT_LOOKUPS = 3
SHIFTER_STAT_HITS = 4
SHIFTER_STAT_MISSES = 5
SHIFTER_STAT_EXPIRIES = 6
SHIFTER_STAT_GONE = 7
SHIFTER_STAT_FULL = 8
SHIFTER_STAT_PAD = 9
SHIFTER_STAT_AMBIGUOUS = 10
SHIFTER_STAT_SKIPPED = 11
SHIFTER_STAT_EVICTED_GONE = 12
SHIFTER_STAT_EVICTED_ANSWERED = 13
SHIFTER_STAT_EVICTED_EARLY = 14
SHIFTER_STAT_EVICTED_OLDEST = 15

# The oldest family version that answers for exactly the connection
# accepted (version 1 keyed on the client's address and port alone).
EXACT_VERSION = 2


class shifter_msg(genlmsg):
    """
    A message of the C{shifter} generic netlink family.
    """

    prefix = "SHIFTER_A_"
    nla_map = (
        ("SHIFTER_A_UNSPEC", "none"),
        ("SHIFTER_A_FAMILY", "uint8"),
        ("SHIFTER_A_SRC_ADDR", "cdata"),
        ("SHIFTER_A_SRC_PORT", "uint16"),
        ("SHIFTER_A_DST_ADDR", "cdata"),
        ("SHIFTER_A_DST_PORT", "uint16"),
        ("SHIFTER_A_STATS", "stats"),
        ("SHIFTER_A_PORTS", "ports"),
        ("SHIFTER_A_LOCAL_ADDR", "cdata"),
        ("SHIFTER_A_LOCAL_PORT", "uint16"),
        ("SHIFTER_A_ENABLED", "uint8"),
        ("SHIFTER_A_IFINDEX", "uint32"),
    )

    # Nests carry NLA_F_NESTED: the kernel's strict validation refuses
    # them without it.
    class stats(nla):
        nla_flags = NLA_F_NESTED
        prefix = "SHIFTER_STAT_"
        nla_map = (
            ("SHIFTER_STAT_UNSPEC", "none"),
            ("SHIFTER_STAT_ENTRIES", "uint64"),
            ("SHIFTER_STAT_INSERTS", "uint64"),
            ("SHIFTER_STAT_LOOKUPS", "uint64"),
            ("SHIFTER_STAT_HITS", "uint64"),
            ("SHIFTER_STAT_MISSES", "uint64"),
            ("SHIFTER_STAT_EXPIRIES", "uint64"),
            ("SHIFTER_STAT_GONE", "uint64"),
            ("SHIFTER_STAT_FULL", "uint64"),
            ("SHIFTER_STAT_PAD", "none"),
            ("SHIFTER_STAT_AMBIGUOUS", "uint64"),
            ("SHIFTER_STAT_SKIPPED", "uint64"),
            ("SHIFTER_STAT_EVICTED_GONE", "uint64"),
            ("SHIFTER_STAT_EVICTED_ANSWERED", "uint64"),
            ("SHIFTER_STAT_EVICTED_EARLY", "uint64"),
            ("SHIFTER_STAT_EVICTED_OLDEST", "uint64"),
        )

    class ports(nla):
        nla_flags = NLA_F_NESTED
        prefix = "SHIFTER_A_PORTS_"
        nla_map = (
            ("SHIFTER_A_PORTS_UNSPEC", "none"),
            ("SHIFTER_A_PORTS_PORT", "uint16"),
        )


# The counters of SHIFTER_CMD_STATS, in the header's order, by the names
# the stats command prints.
STAT_NAMES = tuple(
    name[len("SHIFTER_STAT_") :].lower()
    for name, kind in shifter_msg.stats.nla_map
    if kind == "uint64"
)

_ADDRESS_LENGTHS: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}


@dataclass(frozen=True)
class ConnectionKey:
    """
    One end of a TCP connection: a family, a packed address and a port (the
    C{nfqueue} resolver files SYNs under their source).
    """

    family: int
    address: bytes
    port: int

    @classmethod
    def fromPeer(cls, peer: Destination) -> "ConnectionKey":
        """
        The key for an accepted connection's peer address.  An IPv4 client
        accepted on a dual-stack IPv6 socket (C{::ffff:a.b.c.d}) sent an
        IPv4 SYN, so its key is the IPv4 one.

        @raise ValueError: for an address that is not a TCP/IP one.
        """
        if isinstance(peer, IPv4Address):
            return cls(socket.AF_INET, socket.inet_pton(socket.AF_INET, peer.host), peer.port)
        if isinstance(peer, IPv6Address):
            packed = socket.inet_pton(socket.AF_INET6, peer.host.split("%", 1)[0])
            if packed[:12] == _V4_MAPPED:
                return cls(socket.AF_INET, packed[12:], peer.port)
            return cls(socket.AF_INET6, packed, peer.port)
        raise ValueError(f"not an IP address: {peer!r}")

    def __str__(self) -> str:
        host = socket.inet_ntop(self.family, self.address)
        if self.family == socket.AF_INET6:
            host = f"[{host}]"
        return f"{host}:{self.port}"


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class AcceptedConnection:
    """
    What the module files a connection under: the two ends of the accepted
    socket, its peer (the client, as NAT left it) and its own address.
    Together they name one connection, whatever NAT did to its ports.
    """

    peer: ConnectionKey
    local: ConnectionKey

    @property
    def family(self) -> int:
        return self.peer.family

    @classmethod
    def fromAddresses(cls, peer: Destination, local: Destination) -> "AcceptedConnection":
        """
        The connection accepted from C{peer} on C{local}; an IPv4 one on a
        dual-stack socket is an IPv4 connection.

        @raise ValueError: for addresses that are not TCP/IP ones, or not
            of one family.
        """
        peerKey, localKey = ConnectionKey.fromPeer(peer), ConnectionKey.fromPeer(local)
        if peerKey.family != localKey.family:
            raise ValueError(f"{peer!r} and {local!r} are not of one family")
        return cls(peerKey, localKey)

    @classmethod
    def fromTransport(cls, transport: ITCPTransport) -> "AcceptedConnection":
        """
        The connection of an accepted transport.

        @raise ValueError: as L{fromAddresses}.
        """
        return cls.fromAddresses(transport.getPeer(), transport.getHost())  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.peer} on {self.local}"


def _destination(family: int, address: bytes, port: int) -> Destination:
    host = socket.inet_ntop(family, address)
    if family == socket.AF_INET:
        return IPv4Address("TCP", host, port)
    return IPv6Address("TCP", host, port)


# GET is the look-up made for every accepted connection, so its request
# and reply are encoded with struct here rather than through shifter_msg,
# which costs some 70 us a look-up; the tests check both codecs agree.
_GENL = struct.Struct("=BBH")
_U16 = struct.Struct("=H")


def encodeGet(connection: AcceptedConnection) -> bytes:
    """
    The SHIFTER_CMD_GET request for an accepted connection: the generic
    netlink header and the attributes, to follow the netlink header.
    """
    return (
        _GENL.pack(SHIFTER_CMD_GET, SHIFTER_GENL_VERSION, 0)
        + encodeAttribute(SHIFTER_A_FAMILY, bytes((connection.family,)))
        + encodeAttribute(SHIFTER_A_SRC_ADDR, connection.peer.address)
        + encodeAttribute(SHIFTER_A_SRC_PORT, _U16.pack(connection.peer.port))
        + encodeAttribute(SHIFTER_A_LOCAL_ADDR, connection.local.address)
        + encodeAttribute(SHIFTER_A_LOCAL_PORT, _U16.pack(connection.local.port))
    )


def decodeGetReply(reply: bytes, key: Union[AcceptedConnection, ConnectionKey]) -> Destination:
    """
    The original destination in a SHIFTER_CMD_GET reply.

    @param reply: the whole reply message, netlink header included.
    @param key: what was asked for (the family when the reply omits it).
    @raise ValueError: if the reply lacks it or holds a malformed one.
    """
    if len(reply) < HEADER_SIZE + _GENL.size:
        raise ValueError(f"GET reply of {len(reply)} bytes")
    (cmd, _, _) = _GENL.unpack_from(reply, HEADER_SIZE)
    if cmd != SHIFTER_CMD_GET:
        raise ValueError(f"GET answered with command {cmd}")
    attributes = parseAttributes(reply, HEADER_SIZE + _GENL.size)
    rawFamily = attributes.get(SHIFTER_A_FAMILY)
    address = attributes.get(SHIFTER_A_DST_ADDR)
    rawPort = attributes.get(SHIFTER_A_DST_PORT)
    if rawFamily is None:
        family = key.family
    elif len(rawFamily) == 1:
        family = rawFamily[0]
    else:
        raise ValueError(f"bad address family attribute {rawFamily!r}")
    if family not in _ADDRESS_LENGTHS:
        raise ValueError(f"unknown address family {family}")
    if address is None or len(address) != _ADDRESS_LENGTHS[family]:
        raise ValueError(f"bad destination address {address!r} for family {family}")
    if rawPort is None or len(rawPort) != _U16.size:
        raise ValueError(f"bad destination port attribute {rawPort!r}")
    (port,) = _U16.unpack(rawPort)
    if port == 0:
        raise ValueError("destination port 0")
    return _destination(family, address, port)


def _command(cmd: int, attrs: Sequence[Any] = ()) -> shifter_msg:
    message = shifter_msg()
    message["cmd"] = cmd
    message["version"] = SHIFTER_GENL_VERSION
    message["attrs"] = list(attrs)
    return message


def _portsNest(ports: Sequence[int]) -> dict[str, Any]:
    return {"attrs": [["SHIFTER_A_PORTS_PORT", port] for port in ports]}


@dataclass(frozen=True)
class ModuleConfig:
    """
    A namespace's settings in the module (SHIFTER_CMD_GET_CONFIG).

    @ivar enabled: whether the namespace records connections.
    @ivar ifindex: the one interface recorded, or 0 for every one.
    @ivar ports: the watched original destination ports.
    """

    enabled: bool
    ifindex: int
    ports: tuple[int, ...]


class ShifterClient:
    """
    The module's commands over a L{NetlinkProtocol} whose socket is open and
    whose C{shifter} family id is known (see L{ShifterClient.connect}).

    @ivar version: the family's version, as the kernel reported it.
    """

    def __init__(self, protocol: NetlinkProtocol, familyId: int, version: int = SHIFTER_GENL_VERSION) -> None:
        self.protocol = protocol
        self.familyId = familyId
        self.version = version

    @classmethod
    def connect(
        cls,
        reactor: Any,
        timeout: float = 2.0,
        maxInFlight: int = 64,
    ) -> Deferred["ShifterClient"]:
        """
        Open a generic netlink socket in the reactor and find the family
        and its version.

        @return: a C{Deferred} firing with a client, or failing with
            L{ResolverUnavailable} saying why there can be none (the
            message starts "module shifter not loaded" when the family is
            absent).
        """
        protocol = NetlinkProtocol(reactor, timeout=timeout, maxInFlight=maxInFlight)
        port = NetlinkPort(NETLINK_GENERIC, protocol, reactor=reactor)
        try:
            port.startListening()
        except OSError as e:
            return fail(ResolverUnavailable(f"cannot open a generic netlink socket: {e}"))

        def failed(reason: Failure) -> Failure:
            protocol.close()
            if reason.check(FamilyNotFound):
                return Failure(ResolverUnavailable(f"module shifter not loaded: {reason.value}"))
            if reason.check(NetlinkException):
                return Failure(
                    ResolverUnavailable(f"cannot reach module shifter: {reason.value}")
                )
            return reason

        def versioned(familyId: int) -> Deferred["ShifterClient"]:
            query = ctrlmsg()
            query["cmd"] = CTRL_CMD_GETFAMILY
            query["version"] = 1
            query["attrs"].append(["CTRL_ATTR_FAMILY_ID", familyId])

            def found(replies: list[Any]) -> "ShifterClient":
                version = replies[0].get_attr("CTRL_ATTR_VERSION")
                if not isinstance(version, int):
                    raise ValueError("the controller gave no version for family shifter")
                return cls(protocol, familyId, version)

            return protocol.request(query, GENL_ID_CTRL).addCallback(found)

        return (
            protocol.resolveFamily(SHIFTER_GENL_NAME, shifter_msg)
            .addCallback(versioned)
            .addErrback(failed)
        )

    def close(self) -> None:
        """
        Close the socket; commands still waiting fail.
        """
        self.protocol.close()

    def get(self, connection: AcceptedConnection) -> Deferred[Destination]:
        """
        Look up an accepted connection's original destination.

        @return: a C{Deferred} firing with it, or failing with
            L{NetlinkNotFound} when the module has no record, another
            L{NetlinkException}, or L{ValueError} for a malformed answer.
        """
        return self.protocol.request(
            encodeGet(connection), self.familyId, raw=True
        ).addCallback(lambda replies: decodeGetReply(replies[0], connection))

    def stats(self) -> Deferred[dict[str, int]]:
        """
        This namespace's counters, by the names in L{STAT_NAMES}.
        """

        def decode(replies: list[shifter_msg]) -> dict[str, int]:
            nest = replies[0].get_attr("SHIFTER_A_STATS")
            if nest is None:
                raise ValueError("STATS reply without SHIFTER_A_STATS")
            stats = {}
            for name in STAT_NAMES:
                value = nest.get_attr("SHIFTER_STAT_" + name.upper())
                if not isinstance(value, int):
                    raise ValueError(f"STATS reply with a bad or no {name} counter")
                stats[name] = value
            return stats

        return self.protocol.request(
            _command(SHIFTER_CMD_STATS), self.familyId
        ).addCallback(decode)

    def getConfig(self) -> Deferred[ModuleConfig]:
        """
        This namespace's settings.
        """

        def decode(replies: list[shifter_msg]) -> ModuleConfig:
            reply = replies[0]
            enabled = reply.get_attr("SHIFTER_A_ENABLED")
            ifindex = reply.get_attr("SHIFTER_A_IFINDEX")
            nest = reply.get_attr("SHIFTER_A_PORTS")
            ports = [] if nest is None else nest.get_attrs("SHIFTER_A_PORTS_PORT")
            if enabled not in (0, 1) or not isinstance(ifindex, int):
                raise ValueError(f"GET_CONFIG reply without its settings: {reply!r}")
            if not all(isinstance(port, int) for port in ports):
                raise ValueError(f"GET_CONFIG reply with bad ports {ports!r}")
            return ModuleConfig(bool(enabled), ifindex, tuple(ports))

        return self.protocol.request(
            _command(SHIFTER_CMD_GET_CONFIG), self.familyId
        ).addCallback(decode)

    def getPorts(self) -> Deferred[list[int]]:
        """
        This namespace's watched destination ports.
        """
        return self.getConfig().addCallback(lambda config: list(config.ports))

    def setPorts(self, ports: Sequence[int]) -> Deferred[None]:
        """
        Replace this namespace's watched destination ports (and enable the
        namespace if it is not yet).
        """
        return self.protocol.request(
            _command(SHIFTER_CMD_SET_PORTS, [["SHIFTER_A_PORTS", _portsNest(ports)]]),
            self.familyId,
            ack=True,
        ).addCallback(lambda _: None)

    def enable(
        self, ports: Optional[Sequence[int]] = None, ifindex: Optional[int] = None
    ) -> Deferred[None]:
        """
        Have the module record in this namespace, with these ports (else
        those it has) and only from this interface (0: any; else as it
        is).
        """
        attrs: list[Any] = []
        if ports is not None:
            attrs.append(["SHIFTER_A_PORTS", _portsNest(ports)])
        if ifindex is not None:
            attrs.append(["SHIFTER_A_IFINDEX", ifindex])
        return self.protocol.request(
            _command(SHIFTER_CMD_ENABLE, attrs), self.familyId, ack=True
        ).addCallback(lambda _: None)

    def disable(self) -> Deferred[None]:
        """
        Stop recording in this namespace and drop its entries.
        """
        return self.protocol.request(
            _command(SHIFTER_CMD_DISABLE), self.familyId, ack=True
        ).addCallback(lambda _: None)


@implementer(IOriginalDestinationResolver)
class KernelModuleResolver:
    """
    C{--resolver=kmod}: ask the Shifter kernel module, over generic netlink,
    where each accepted connection was going.

    The module records each redirected connection as conntrack names it
    once NAT has decided, and answers for the accepted socket's two ends,
    only while conntrack still holds that very connection.  Every look-up
    is one request on a single socket in the reactor, so many can be in
    flight at once.

    @ivar exact: whether the module started with answers for exactly the
        connection accepted (its family version is L{EXACT_VERSION} or
        later) and records in this namespace; C{start} fails otherwise.
    """

    name = "kmod"
    log = Logger()

    def __init__(
        self,
        reactor: Optional[Any] = None,
        timeout: float = 2.0,
        maxInFlight: int = 64,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.timeout = timeout
        self.maxInFlight = maxInFlight
        self.client: Optional[ShifterClient] = None

    def start(self) -> Deferred[None]:
        """
        Open the socket and find the module's family, then check that it is
        a module that answers exactly, that it answers this process (it
        needs CAP_NET_ADMIN), and that it records in this namespace.

        @return: a C{Deferred} failing with L{ResolverUnavailable}
            ("module shifter not loaded: ...", "... not enabled in this
            network namespace ...") when it cannot be used.
        """

        def connected(client: ShifterClient) -> Deferred[None]:
            if client.version < EXACT_VERSION:
                client.close()
                return fail(ResolverUnavailable(
                    f"module shifter is version {client.version}, which answers by the "
                    f"client's address alone; load the module of this Shifter "
                    f"(version {EXACT_VERSION} or later)"
                ))

            def usable(config: ModuleConfig) -> Deferred[None]:
                if not config.enabled:
                    raise ResolverUnavailable(
                        "module shifter is not enabled in this network namespace "
                        "(python -m shifter.kmod enable)"
                    )

                def ready(stats: dict[str, int]) -> None:
                    self.client = client
                    self.log.info(
                        "kernel module shifter found (family {familyId}, version {version}, "
                        "ports {ports}, {entries} entries)",
                        familyId=client.familyId,
                        version=client.version,
                        ports=",".join(str(port) for port in config.ports),
                        entries=stats.get("entries"),
                    )

                return client.stats().addCallback(ready)

            def unusable(reason: Failure) -> Failure:
                client.close()
                if reason.check(ResolverUnavailable):
                    return reason
                reason.trap(NetlinkException, ValueError)
                return Failure(
                    ResolverUnavailable(f"module shifter refuses requests: {reason.value}")
                )

            return client.getConfig().addCallback(usable).addErrback(unusable)

        return ShifterClient.connect(
            self.reactor, timeout=self.timeout, maxInFlight=self.maxInFlight
        ).addCallback(connected)

    def stop(self) -> Deferred[None]:
        client, self.client = self.client, None
        if client is not None:
            client.close()
        return succeed(None)

    def resolve(self, transport: ITCPTransport) -> Deferred[Destination]:
        if self.client is None:
            return fail(ResolverUnavailable("the kmod resolver is not started"))
        try:
            connection = AcceptedConnection.fromTransport(transport)
        except (ValueError, OSError) as e:
            return fail(ResolverError(
                f"cannot look up {transport.getPeer()!r} on {transport.getHost()!r}: {e}"
            ))

        def failed(reason: Failure) -> Failure:
            if reason.check(NetlinkNotFound):
                return Failure(
                    DestinationUnknown(f"module shifter has no record of {connection}")
                )
            if reason.check(NetlinkTimeout):
                return Failure(ResolverError(
                    f"module shifter did not answer for {connection}: {reason.value}"
                ))
            if reason.check(NetlinkException, ValueError):
                return Failure(ResolverError(
                    f"module shifter look-up of {connection} failed: {reason.value}"
                ))
            return reason

        return self.client.get(connection).addErrback(failed)


# --------------------------------------------------------------------------
# python -m shifter.kmod
# --------------------------------------------------------------------------


def _portList(value: str) -> list[int]:
    try:
        ports = [int(p) for p in value.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ports like 443,8443, got {value!r}") from None
    if not ports or not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"ports must be between 1 and 65535: {value!r}")
    return ports


def _parser(prog: str = "python -m shifter.kmod") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Drive the Shifter kernel module in this network namespace.",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)
    enable = commands.add_parser(
        "enable", help="record redirected connections in this namespace from now on"
    )
    enable.add_argument("--ports", type=_portList, metavar="PORT,...",
                        help="original destination ports to record (default: as set, at "
                        "first the module's ports parameter)")
    enable.add_argument("--interface", metavar="IFACE",
                        help="record only connections arriving on this interface "
                        "(lo for local programs'); 'any' for every one")
    commands.add_parser("disable", help="stop recording here and drop the entries")
    commands.add_parser("status", help="print whether the namespace records, and how")
    commands.add_parser("stats", help="print the module's counters")
    commands.add_parser("ports", help="print the watched destination ports")
    setPorts = commands.add_parser(
        "set-ports", help="replace the watched destination ports (and enable)"
    )
    setPorts.add_argument("ports", type=int, nargs="*", metavar="PORT")
    return parser


def _interfaceName(ifindex: int) -> str:
    if not ifindex:
        return "any"
    if ifindex == IFINDEX_GONE:
        return "none (the interface named was removed)"
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"#{ifindex}"


async def _run(reactor: Any, options: argparse.Namespace, out: Any) -> None:
    client = await ShifterClient.connect(reactor, timeout=options.timeout)
    try:
        if options.command == "enable":
            ifindex = None
            if options.interface == "any":
                ifindex = 0
            elif options.interface is not None:
                try:
                    ifindex = socket.if_nametoindex(options.interface)
                except OSError:
                    raise ValueError(f"no interface {options.interface!r} here") from None
            await client.enable(options.ports, ifindex)
        elif options.command == "disable":
            await client.disable()
        elif options.command == "stats":
            stats = await client.stats()
            for name in STAT_NAMES:
                out.write(f"{name}: {stats[name]}\n")
            return
        elif options.command == "set-ports":
            await client.setPorts(options.ports)
        config = await client.getConfig()
        if options.command in ("ports", "set-ports"):
            out.write(" ".join(str(port) for port in config.ports) + "\n")
        else:
            out.write(
                f"{'enabled' if config.enabled else 'disabled'}; interface "
                f"{_interfaceName(config.ifindex)}; ports "
                f"{' '.join(str(port) for port in config.ports) or 'none'}\n"
            )
    finally:
        client.close()


def main(argv: Optional[Sequence[str]] = None, out: Any = None, prog: str = "python -m shifter.kmod") -> None:
    """
    The C{python -m shifter.kmod} command; exits 1 with the reason on
    failure.
    """
    from twisted.internet import task

    options = _parser(prog).parse_args(argv)
    out = sys.stdout if out is None else out

    def run(reactor: Any) -> Deferred[None]:
        def failed(reason: Failure) -> None:
            reason.trap(ResolverError, NetlinkException, ValueError)
            sys.stderr.write(f"shifter.kmod: {reason.value}\n")
            raise SystemExit(1)

        return Deferred.fromCoroutine(_run(reactor, options, out)).addErrback(failed)

    task.react(run)


if __name__ == "__main__":
    main()
