"""
Helpers for the tests that run inside the booted test kernel: whether we
are there, the module and its parameters, throwaway network namespaces and
the links between them, a small blocking client of the C{shifter} generic
netlink family, and raw TCP packets built by hand.

Only the tests use the blocking client; the service's own client is the
reactor-driven one in L{shifter.kernel.netlink}.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import struct
import subprocess
import time
from contextlib import contextmanager
from ipaddress import ip_address
from typing import Iterator, Sequence

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.generic import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, ctrlmsg
from twisted.trial.unittest import SkipTest

from shifter.resolvers.kmod import (
    SHIFTER_CMD_DISABLE,
    SHIFTER_CMD_ENABLE,
    SHIFTER_CMD_GET,
    SHIFTER_CMD_GET_CONFIG,
    SHIFTER_CMD_SET_PORTS,
    SHIFTER_CMD_STATS,
    SHIFTER_GENL_NAME,
    SHIFTER_GENL_VERSION,
    shifter_msg,
)
from tests.tcp_peer import internetChecksum

GUEST_SKIP = "runs inside the booted test kernel; tests/test_kernel.py boots it"

# How many times slower than Debian's kernel the guest kernel runs (the
# debug kernel, with KASAN and lockdep, sets it): tests' timeouts scale.
SLOW = float(os.environ.get("SHIFTER_GUEST_SLOW", "1"))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE_NAME = "shifter"

# Where redirected connections are accepted, in every topology below.
LISTEN_PORT = 12345
# Where nat OUTPUT's REDIRECT sends local programs' connections.
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

# Documentation ranges only, and only inside namespaces the tests create.
LOCAL_V4 = "192.0.2.1"
LOCAL_V6 = "2001:db8:1::1"
CLIENT_V4, GATEWAY_V4 = "198.51.100.2", "198.51.100.1"
CLIENT_V6, GATEWAY_V6 = "2001:db8:2::2", "2001:db8:2::1"
REMOTE_V4 = "203.0.113.7"
REMOTE_V6 = "2001:db8:ff::7"
REMOTE_NET = {socket.AF_INET: "203.0.113.0/24", socket.AF_INET6: "2001:db8:ff::/64"}


def requireGuest() -> None:
    """
    Skip the calling test unless it runs in the booted test kernel.
    """
    if os.environ.get("SHIFTER_GUEST") != "1":
        raise SkipTest(GUEST_SKIP)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """
    Run a program, failing with its output when it fails.
    """
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


# The module.


def modulePath() -> str:
    """
    The built module: C{SHIFTER_MODULE} as C{guest-run.sh} sets it, or the
    one in the work tree.
    """
    return os.environ.get(
        "SHIFTER_MODULE", os.path.join(ROOT, "kernel_module", "shifter.ko")
    )


def moduleLoaded() -> bool:
    return os.path.isdir(f"/sys/module/{MODULE_NAME}")


def moduleParameters() -> dict[str, str]:
    directory = f"/sys/module/{MODULE_NAME}/parameters"
    return {
        name: open(os.path.join(directory, name)).read().strip()
        for name in os.listdir(directory)
    }


def loadConntrack() -> None:
    """
    Load conntrack, which the module needs, unless it is there (built in,
    or loaded already).
    """
    if not os.path.isdir("/sys/module/nf_conntrack"):
        run("modprobe", "nf_conntrack")


def loadModule(**parameters: object) -> None:
    """
    Load the module afresh with these parameters, unloading it first if it
    is loaded.
    """
    if moduleLoaded():
        run("rmmod", MODULE_NAME)
    loadConntrack()
    run("insmod", modulePath(), *(f"{k}={v}" for k, v in parameters.items()))


# Network namespaces.

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_names = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Namespace:
    """
    A network namespace made for one test, with its loopback up.
    """

    def __init__(self) -> None:
        self.name = f"shifter-test-{os.getpid()}-{next(_names)}"
        run("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *argv: str) -> None:
        run("ip", "-n", self.name, *argv)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *argv, check=check)

    def iptables(self, family: int, *argv: str) -> None:
        program = "iptables" if family == socket.AF_INET else "ip6tables"
        self.exec(program, "-w", *argv)

    def nft(self, ruleset: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
            input=ruleset, capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(f"nft -f - failed:\n{ruleset}\n{result.stderr}")

    def ifindex(self, device: str) -> int:
        return int(self.exec("cat", f"/sys/class/net/{device}/ifindex").stdout)

    def addAddress(self, device: str, address: str, prefix: int) -> None:
        if ":" in address:
            self.ip("-6", "addr", "add", f"{address}/{prefix}", "dev", device, "nodad")
        else:
            self.ip("addr", "add", f"{address}/{prefix}", "dev", device)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """
        Run the body with this thread in the namespace: sockets made there
        stay in it.
        """
        with open("/proc/self/ns/net") as home, open(f"/run/netns/{self.name}") as ns:
            _setns(ns.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def socket(self, family: int, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        with self.inside():
            return socket.socket(family, kind, proto)

    def module(self) -> "ShifterClient":
        """
        A client of the module that sees this namespace.
        """
        with self.inside():
            return ShifterClient()

    def delete(self) -> None:
        run("ip", "netns", "del", self.name)


def vethPair(a: Namespace, aName: str, b: Namespace, bName: str) -> None:
    """
    Join two namespaces (or one namespace to itself) with a veth pair and
    bring both ends up.
    """
    a.ip("link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.name)
    a.ip("link", "set", aName, "up")
    b.ip("link", "set", bName, "up")


def makeLocalClient(
    test, family: int, ports: Sequence[int] = (443,), enable: bool = True,
) -> Namespace:
    """
    A namespace whose own (local) clients have their connections to
    C{REMOTE_NET} on C{ports} redirected in nat OUTPUT to C{LISTEN_PORT} (on
    C{LOOPBACK}), with the module enabled there for C{ports} unless
    C{enable} is false.  Its client address is C{LOCAL_V4}/C{LOCAL_V6}.
    """
    ns = Namespace()
    test.addCleanup(ns.delete)
    vethPair(ns, "sh0", ns, "sh1")
    if family == socket.AF_INET:
        ns.addAddress("sh0", LOCAL_V4, 24)
    else:
        ns.addAddress("sh0", LOCAL_V6, 64)
    ns.ip("route", "add", REMOTE_NET[family], "dev", "sh0")
    for port in ports:
        ns.iptables(
            family, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
            REMOTE_NET[family], "--dport", str(port),
            "-j", "REDIRECT", "--to-ports", str(LISTEN_PORT),
        )
    if enable:
        enableIn(ns, ports)
    return ns


def enableIn(ns: Namespace, ports: Sequence[int] = (443,), ifindex: int | None = None) -> None:
    """
    Have the module record in C{ns}, for C{ports}.
    """
    kmod = ns.module()
    try:
        kmod.enable(ports, ifindex)
    finally:
        kmod.close()


def makeGateway(
    test, family: int, enable: bool = True, nft: str | None = None,
) -> tuple[Namespace, Namespace]:
    """
    Two namespaces, a client and a gateway, joined by a veth pair; the
    gateway redirects the client's connections to C{REMOTE_NET} port 443 in
    nat PREROUTING to C{LISTEN_PORT} (with iptables, or with the nft
    ruleset C{nft}), with the module enabled there unless C{enable} is
    false.
    """
    client, gateway = Namespace(), Namespace()
    test.addCleanup(gateway.delete)
    test.addCleanup(client.delete)
    vethPair(client, "cl0", gateway, "gw0")
    if family == socket.AF_INET:
        client.addAddress("cl0", CLIENT_V4, 24)
        gateway.addAddress("gw0", GATEWAY_V4, 24)
        via = GATEWAY_V4
    else:
        client.addAddress("cl0", CLIENT_V6, 64)
        gateway.addAddress("gw0", GATEWAY_V6, 64)
        via = GATEWAY_V6
    client.ip("route", "add", REMOTE_NET[family], "via", via, "dev", "cl0")
    if nft is None:
        gateway.iptables(
            family, "-t", "nat", "-A", "PREROUTING", "-i", "gw0", "-p", "tcp",
            "--dport", "443", "-j", "REDIRECT", "--to-ports", str(LISTEN_PORT),
        )
    else:
        gateway.nft(nft)
    if enable:
        enableIn(gateway)
    return client, gateway


def listen(ns: Namespace, family: int, port: int = LISTEN_PORT) -> socket.socket:
    server = ns.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    server.listen(16)
    server.settimeout(10)
    return server


def connect(ns: Namespace, family: int, address: str, port: int) -> socket.socket:
    client = ns.socket(family)
    client.settimeout(10)
    client.connect((address, port))
    return client


# The generic netlink family.

_NLMSG = struct.Struct("=IHHII")
_GENLMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_NLMSG_ERROR_CODE = struct.Struct("=i")
_NETLINK_GENERIC = 16
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NLMSGERR_ATTR_MSG = 1


class NetlinkError(OSError):
    """
    A request answered with an error; C{message} is the kernel's extended
    ACK message, if it gave one.
    """

    def __init__(self, code: int, message: str | None) -> None:
        super().__init__(code, os.strerror(code))
        self.message = message


def nlattr(kind: int, payload: bytes) -> bytes:
    """
    One netlink attribute, padded.
    """
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def genlRequest(
    familyId: int, cmd: int, attrs: bytes, *, seq: int,
    flags: int = NLM_F_REQUEST | NLM_F_ACK, version: int = SHIFTER_GENL_VERSION,
    reserved: int = 0, length: int | None = None,
) -> bytes:
    """
    A generic netlink request built by hand, so that it can be wrong.
    """
    body = _GENLMSG.pack(cmd, version, reserved) + attrs
    if length is None:
        length = _NLMSG.size + len(body)
    return _NLMSG.pack(length, familyId, flags, seq, 0) + body


def _extackMessage(message: bytes) -> str | None:
    # nlmsghdr, error, the request's nlmsghdr (its payload capped), TLVs.
    offset = _NLMSG.size + _NLMSG_ERROR_CODE.size + _NLMSG.size
    while offset + _NLATTR.size <= len(message):
        length, kind = _NLATTR.unpack_from(message, offset)
        if length < _NLATTR.size:
            break
        if kind == _NLMSGERR_ATTR_MSG:
            return message[offset + _NLATTR.size:offset + length].rstrip(b"\0").decode()
        offset += (length + 3) & ~3
    return None


class ShifterClient:
    """
    A blocking client of the C{shifter} generic netlink family, seeing the
    namespace it was made in.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self.sock.settimeout(timeout)
        self.seq = itertools.count(1)
        self.familyId = self._resolve()

    def close(self) -> None:
        self.sock.close()

    def _resolve(self) -> int:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", SHIFTER_GENL_NAME)]
        seq = next(self.seq)
        msg["header"]["type"] = GENL_ID_CTRL
        msg["header"]["flags"] = NLM_F_REQUEST
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self.sock.send(msg.data)
        for kind, data in self.receive(seq, untilAck=False):
            reply = ctrlmsg(data)
            reply.decode()
            return reply.get_attr("CTRL_ATTR_FAMILY_ID")
        raise AssertionError("no reply from the generic netlink controller")

    def encode(
        self,
        cmd: int,
        attrs: Sequence[tuple[str, object]] = (),
        *,
        seq: int,
        flags: int = NLM_F_REQUEST | NLM_F_ACK,
        version: int = SHIFTER_GENL_VERSION,
    ) -> bytes:
        msg = shifter_msg()
        msg["cmd"] = cmd
        msg["version"] = version
        msg["attrs"] = list(attrs)
        msg["header"]["type"] = self.familyId
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        return bytes(msg.data)

    def receive(self, seq: int, untilAck: bool = True) -> list[tuple[int, bytes]]:
        """
        The messages answering request C{seq}, up to and including its ACK;
        an error in the ACK raises L{NetlinkError}.
        """
        messages = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, flags, mseq, pid = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise AssertionError(f"bad netlink message length {length}")
                message = data[offset:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = _NLMSG_ERROR_CODE.unpack_from(message, _NLMSG.size)
                    if code:
                        raise NetlinkError(-code, _extackMessage(message))
                    return messages
                messages.append((kind, message))
                if not untilAck:
                    return messages

    def request(self, cmd: int, attrs: Sequence[tuple[str, object]] = (), **kw) -> shifter_msg | None:
        """
        Send one request, wait for its ACK and return its reply, if any.
        """
        seq = next(self.seq)
        self.sock.send(self.encode(cmd, attrs, seq=seq, **kw))
        return self.decode(self.receive(seq))

    def requestRaw(self, cmd: int, attrs: bytes = b"", **kw) -> shifter_msg | None:
        """
        Send one request built by L{genlRequest} and wait for its answer.
        """
        seq = next(self.seq)
        self.sock.send(genlRequest(self.familyId, cmd, attrs, seq=seq, **kw))
        return self.decode(self.receive(seq))

    def decode(self, messages: list[tuple[int, bytes]]) -> shifter_msg | None:
        if not messages:
            return None
        if len(messages) != 1:
            raise AssertionError(f"expected one reply, got {len(messages)}")
        kind, data = messages[0]
        if kind != self.familyId:
            raise AssertionError(f"reply of type {kind}, not {self.familyId}")
        reply = shifter_msg(data)
        reply.decode()
        return reply

    def get(
        self, family: int, address: str, port: int, local: str | None = None,
        localPort: int = LISTEN_PORT,
    ) -> tuple[str, int]:
        """
        The original destination of the connection accepted from
        C{address}:C{port} on C{local}:C{localPort} (by default
        C{LOOPBACK}, where nat OUTPUT redirects), or L{NetlinkError}
        (C{ENOENT} for none).
        """
        local = LOOPBACK[family] if local is None else local
        reply = self.request(
            SHIFTER_CMD_GET,
            [
                ("SHIFTER_A_FAMILY", family),
                ("SHIFTER_A_SRC_ADDR", socket.inet_pton(family, address)),
                ("SHIFTER_A_SRC_PORT", port),
                ("SHIFTER_A_LOCAL_ADDR", socket.inet_pton(family, local)),
                ("SHIFTER_A_LOCAL_PORT", localPort),
            ],
        )
        assert reply is not None and reply["cmd"] == SHIFTER_CMD_GET
        assert reply.get_attr("SHIFTER_A_FAMILY") == family
        assert reply.get_attr("SHIFTER_A_SRC_ADDR") == socket.inet_pton(family, address)
        assert reply.get_attr("SHIFTER_A_SRC_PORT") == port
        assert reply.get_attr("SHIFTER_A_LOCAL_ADDR") == socket.inet_pton(family, local)
        assert reply.get_attr("SHIFTER_A_LOCAL_PORT") == localPort
        return (
            socket.inet_ntop(family, reply.get_attr("SHIFTER_A_DST_ADDR")),
            reply.get_attr("SHIFTER_A_DST_PORT"),
        )

    def getAccepted(self, accepted: socket.socket) -> tuple[str, int]:
        """
        The original destination of an accepted socket's connection.
        """
        peer, local = accepted.getpeername(), accepted.getsockname()
        family = accepted.family
        return self.get(family, peer[0], peer[1], local[0], local[1])

    def stats(self) -> dict[str, int]:
        reply = self.request(SHIFTER_CMD_STATS)
        assert reply is not None and reply["cmd"] == SHIFTER_CMD_STATS
        nest = reply.get_attr("SHIFTER_A_STATS")
        return {
            name[len("SHIFTER_STAT_"):].lower(): value
            for name, value in nest["attrs"]
        }

    def config(self) -> tuple[bool, int, list[int]]:
        """
        Whether the namespace records, its interface index, its ports.
        """
        reply = self.request(SHIFTER_CMD_GET_CONFIG)
        assert reply is not None and reply["cmd"] == SHIFTER_CMD_GET_CONFIG
        nest = reply.get_attr("SHIFTER_A_PORTS")
        ports = [] if nest is None else nest.get_attrs("SHIFTER_A_PORTS_PORT")
        return bool(reply.get_attr("SHIFTER_A_ENABLED")), reply.get_attr("SHIFTER_A_IFINDEX"), ports

    def getPorts(self) -> list[int]:
        return self.config()[2]

    def setPorts(self, ports: Sequence[int]) -> None:
        reply = self.request(
            SHIFTER_CMD_SET_PORTS,
            [("SHIFTER_A_PORTS", {"attrs": [("SHIFTER_A_PORTS_PORT", p) for p in ports]})],
        )
        assert reply is None

    def enable(self, ports: Sequence[int] | None = None, ifindex: int | None = None) -> None:
        attrs: list[tuple[str, object]] = []
        if ports is not None:
            attrs.append(("SHIFTER_A_PORTS", {"attrs": [("SHIFTER_A_PORTS_PORT", p) for p in ports]}))
        if ifindex is not None:
            attrs.append(("SHIFTER_A_IFINDEX", ifindex))
        assert self.request(SHIFTER_CMD_ENABLE, attrs) is None

    def disable(self) -> None:
        assert self.request(SHIFTER_CMD_DISABLE) is None


def waitFor(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """
    Poll C{predicate} until it is true or C{timeout} seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# Raw TCP packets, for what a real stack never sends.

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
IP_MF = 0x2000


def tcpHeader(
    family: int, src: str, dst: str, sport: int, dport: int, flags: int,
    *, dataOffset: int = 5,
) -> bytes:
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, 1000, 0, dataOffset << 4, flags, 65535, 0, 0
    )
    header += b"\0" * max(0, dataOffset * 4 - len(header))
    pseudo = (
        ip_address(src).packed + ip_address(dst).packed
        + (struct.pack("!HH", 6, len(header)) if family == socket.AF_INET
           else struct.pack("!IxxxB", len(header), 6))
    )
    checksum = internetChecksum(pseudo + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def ipv4Packet(src: str, dst: str, payload: bytes, *, fragment: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, fragment, 64, 6, 0,
        ip_address(src).packed, ip_address(dst).packed,
    )
    return header + payload


def ipv6Packet(src: str, dst: str, payload: bytes, *, fragmentHeader: bytes | None = None) -> bytes:
    nextHeader = 6
    if fragmentHeader is not None:
        payload = fragmentHeader + payload
        nextHeader = 44
    return struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), nextHeader, 64,
        ip_address(src).packed, ip_address(dst).packed,
    ) + payload


def ipv6FragmentHeader(offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", 6, 0, (offset << 3) | int(more), 0x1234)


def sendRaw(ns: Namespace, family: int, packet: bytes, dst: str) -> None:
    """
    Send a whole IP packet, header included, from inside C{ns}: it passes
    LOCAL_OUT like any locally sent packet.
    """
    with ns.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(packet, (dst, 0))

