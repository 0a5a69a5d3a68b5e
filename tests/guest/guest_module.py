"""
The Shifter kernel module in a booted kernel: what it records from real
connections and from packets built by hand, and how its generic netlink
family answers good and bad requests.

Every test makes its own network namespaces and tears them down; the tests
that need other module parameters reload the module and put the defaults
back afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import socket
import struct
import subprocess
import time

from twisted.trial.unittest import TestCase

from shifter.kmod import (
    SHIFTER_CMD_GET,
    SHIFTER_CMD_SET_PORTS,
    SHIFTER_CMD_STATS,
    SHIFTER_MAX_PORTS,
)
from tests.guest.support import (
    CLIENT_V4,
    CLIENT_V6,
    IP_MF,
    LOCAL_V4,
    LOCAL_V6,
    REMOTE_NET,
    REMOTE_V4,
    REMOTE_V6,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Namespace,
    NetlinkError,
    ShifterClient,
    connect,
    genlRequest,
    ipv4Packet,
    ipv6FragmentHeader,
    ipv6Packet,
    listen,
    loadModule,
    makeGateway,
    makeLocalClient,
    moduleLoaded,
    moduleParameters,
    modulePath,
    nlattr,
    requireGuest,
    sendRaw,
    tcpHeader,
    vethPair,
    waitFor,
)

DEFAULTS = {"ports": "443", "max_entries": "65536", "expiry_secs": "120"}

# enum shifter_attr, for requests built by hand.
A_FAMILY, A_SRC_ADDR, A_SRC_PORT, A_DST_ADDR, A_DST_PORT = 1, 2, 3, 4, 5
A_PORTS, A_PORTS_PORT = 7, 1

STATS = ("entries", "inserts", "lookups", "hits", "misses", "evictions", "expiries")

TCP_FIN_WAIT2 = 5

CAP_NET_ADMIN = 12
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def hasNetAdmin() -> bool:
    status = open("/proc/self/status").read()
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    return bool(effective & (1 << CAP_NET_ADMIN))


def dropNetAdmin() -> None:
    """
    Give up CAP_NET_ADMIN for good, keeping the other capabilities.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data))
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & ~(1 << CAP_NET_ADMIN))
    _check(_libc.capset(ctypes.byref(header), data))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


class GuestTestCase(TestCase):
    """
    A test in the booted kernel, with the module loaded with its defaults.
    """

    def setUp(self) -> None:
        requireGuest()
        if not moduleLoaded() or moduleParameters() != DEFAULTS:
            loadModule()

    def client(self, ns: Namespace):
        kmod = ns.module()
        self.addCleanup(kmod.close)
        return kmod

    def assertNetlinkError(self, code: int, f, *args, **kw) -> NetlinkError:
        error = self.assertRaises(NetlinkError, f, *args, **kw)
        self.assertEqual(
            error.errno, code,
            f"expected {errno.errorcode[code]}, got {errno.errorcode.get(error.errno)}"
            f" ({error.message})",
        )
        return error

    def closing(self, sock: socket.socket) -> socket.socket:
        self.addCleanup(sock.close)
        return sock


def rawNamespace(test: TestCase, family: int) -> Namespace:
    """
    A namespace with no NAT at all whose local address is
    C{LOCAL_V4}/C{LOCAL_V6} and that routes C{REMOTE_NET} out of a veth:
    hand-made packets sent to C{REMOTE_NET} pass its LOCAL_OUT hooks.
    """
    ns = Namespace()
    test.addCleanup(ns.delete)
    vethPair(ns, "sh0", ns, "sh1")
    ns.addAddress("sh0", LOCAL_V4 if family == socket.AF_INET else LOCAL_V6,
                  24 if family == socket.AF_INET else 64)
    ns.ip("route", "add", REMOTE_NET[family], "dev", "sh0")
    return ns


def sendSegment(ns: Namespace, family: int, sport: int, dport: int, flags: int,
                dst: str | None = None, **kw) -> None:
    """
    Send one TCP segment from the namespace's local address.
    """
    if family == socket.AF_INET:
        src, dst = LOCAL_V4, dst or REMOTE_V4
        packet = ipv4Packet(src, dst, tcpHeader(family, src, dst, sport, dport, flags, **kw))
    else:
        src, dst = LOCAL_V6, dst or REMOTE_V6
        packet = ipv6Packet(src, dst, tcpHeader(family, src, dst, sport, dport, flags, **kw))
    sendRaw(ns, family, packet, dst)


class LocalRedirectTests(GuestTestCase):
    """
    Local clients whose connections nat OUTPUT redirects to a local
    listener.
    """

    def roundTrip(self, family: int, local: str, remote: str) -> None:
        ns = makeLocalClient(self, family)
        server = self.closing(listen(ns, family))
        client = self.closing(connect(ns, family, remote, 443))
        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertEqual(peer[0], local)
        self.assertEqual(client.getsockname()[:2], peer[:2])
        self.assertEqual(self.client(ns).get(family, peer[0], peer[1]), (remote, 443))

    def test_ipv4(self) -> None:
        """
        An IPv4 connection redirected in nat OUTPUT is found by its source
        address and port, with the destination it had before NAT.
        """
        self.roundTrip(socket.AF_INET, LOCAL_V4, REMOTE_V4)

    def test_ipv6(self) -> None:
        """
        An IPv6 connection redirected in nat OUTPUT is found by its source
        address and port, with the destination it had before NAT.
        """
        self.roundTrip(socket.AF_INET6, LOCAL_V6, REMOTE_V6)

    def test_manyConnections(self) -> None:
        """
        Each of several connections open at once is found with its own
        destination.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        kmod = self.client(ns)
        remotes = [f"203.0.113.{n}" for n in range(10, 30)]
        peers = []
        for remote in remotes:
            self.closing(connect(ns, socket.AF_INET, remote, 443))
            accepted, peer = server.accept()
            self.closing(accepted)
            peers.append(peer)
        for remote, peer in zip(remotes, peers):
            self.assertEqual(kmod.get(socket.AF_INET, *peer), (remote, 443))


class GatewayTests(GuestTestCase):
    """
    Clients in another namespace whose connections a gateway namespace
    redirects in nat PREROUTING.
    """

    def roundTrip(self, family: int, clientAddress: str, remote: str) -> None:
        clientNs, gateway = makeGateway(self, family)
        server = self.closing(listen(gateway, family))
        client = self.closing(connect(clientNs, family, remote, 443))
        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertEqual(peer[0], clientAddress)
        client.sendall(b"through the gateway")
        self.assertEqual(accepted.recv(100), b"through the gateway")
        self.assertEqual(self.client(gateway).get(family, peer[0], peer[1]), (remote, 443))

    def test_ipv4(self) -> None:
        """
        An IPv4 connection from a client namespace, redirected by the
        gateway in nat PREROUTING, is found in the gateway's namespace.
        """
        self.roundTrip(socket.AF_INET, CLIENT_V4, REMOTE_V4)

    def test_ipv6(self) -> None:
        """
        An IPv6 connection from a client namespace, redirected by the
        gateway in nat PREROUTING, is found in the gateway's namespace.
        """
        self.roundTrip(socket.AF_INET6, CLIENT_V6, REMOTE_V6)


class EarlyCloseTests(GuestTestCase):
    """
    A client may be done before the redirector accepts its connection.
    """

    def test_dataAndFinBeforeAccept(self) -> None:
        """
        A client that sends its data and its FIN before the listener
        accepts the connection can still be looked up once it is accepted,
        and its data is all there.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        client = self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        client.sendall(b"early data")
        client.shutdown(socket.SHUT_WR)

        def finAcked() -> bool:
            info = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
            return info[0] == TCP_FIN_WAIT2

        self.assertTrue(waitFor(finAcked), "the client's FIN was never acknowledged")
        source = client.getsockname()
        client.close()

        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertEqual(peer, source)
        self.assertEqual(self.client(ns).get(socket.AF_INET, *peer), (REMOTE_V4, 443))
        accepted.settimeout(10)
        received = b""
        while chunk := accepted.recv(100):
            received += chunk
        self.assertEqual(received, b"early data")


class PacketTests(GuestTestCase):
    """
    What the hooks record from single packets, built by hand where a real
    stack would not send them.
    """

    def assertNotRecorded(self, ns: Namespace, family: int, sport: int) -> None:
        kmod = self.client(ns)
        self.assertNetlinkError(errno.ENOENT, kmod.get, family,
                                LOCAL_V4 if family == socket.AF_INET else LOCAL_V6, sport)
        self.assertEqual(kmod.stats()["inserts"], 0)

    def test_syn(self) -> None:
        """
        A SYN to a watched port is recorded.
        """
        ns = rawNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        self.assertEqual(kmod.stats()["inserts"], 1)

    def test_newSynReplaces(self) -> None:
        """
        A new SYN from the same source address and port replaces the entry
        of the old one.
        """
        ns = rawNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.8")
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.8", 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["inserts"]), (1, 2))

    def test_synAck(self) -> None:
        """
        A SYN-ACK to a watched port is not recorded.
        """
        ns = rawNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN | TCP_ACK)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_realSynAck(self) -> None:
        """
        When a client's own port is watched, the SYN-ACK a real server
        sends to it is not recorded.
        """
        ns = rawNamespace(self, socket.AF_INET)
        kmod = self.client(ns)
        kmod.setPorts([8443])
        server = self.closing(listen(ns, socket.AF_INET, 9000))
        client = self.closing(ns.socket(socket.AF_INET))
        client.bind((LOCAL_V4, 8443))
        client.settimeout(10)
        client.connect((LOCAL_V4, 9000))
        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertEqual(peer, (LOCAL_V4, 8443))
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, LOCAL_V4, 9000)
        self.assertEqual(kmod.stats()["inserts"], 0)

    def test_otherFlags(self) -> None:
        """
        SYN with RST or FIN, and segments without SYN, are not recorded.
        """
        ns = rawNamespace(self, socket.AF_INET)
        for port, flags in enumerate(
            [TCP_SYN | TCP_RST, TCP_SYN | TCP_FIN, TCP_ACK, TCP_FIN | TCP_ACK, 0],
            start=40000,
        ):
            sendSegment(ns, socket.AF_INET, port, 443, flags)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_unwatchedPort(self) -> None:
        """
        A SYN to a port that is not watched is not recorded.
        """
        ns = rawNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 80, TCP_SYN)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_unwatchedPortRedirected(self) -> None:
        """
        A real connection to a port that is not watched is redirected as
        usual but not recorded.
        """
        ns = makeLocalClient(self, socket.AF_INET, ports=(80,))
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 80))
        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertNotRecorded(ns, socket.AF_INET, peer[1])

    def test_truncated(self) -> None:
        """
        A SYN cut short inside its TCP header, and one whose data offset is
        below the header's size, are ignored.
        """
        ns = rawNamespace(self, socket.AF_INET)
        header = tcpHeader(socket.AF_INET, LOCAL_V4, REMOTE_V4, 40000, 443, TCP_SYN)
        sendRaw(ns, socket.AF_INET, ipv4Packet(LOCAL_V4, REMOTE_V4, header[:14]), REMOTE_V4)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dataOffset=4)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_fragments(self) -> None:
        """
        IPv4 fragments, first or not, are ignored even when they hold a
        SYN to a watched port.
        """
        ns = rawNamespace(self, socket.AF_INET)
        header = tcpHeader(socket.AF_INET, LOCAL_V4, REMOTE_V4, 40000, 443, TCP_SYN)
        for fragment in (IP_MF, IP_MF | 8, 8):
            sendRaw(ns, socket.AF_INET,
                    ipv4Packet(LOCAL_V4, REMOTE_V4, header, fragment=fragment), REMOTE_V4)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_ipv6Syn(self) -> None:
        """
        An IPv6 SYN to a watched port is recorded, also behind an extension
        header.
        """
        ns = rawNamespace(self, socket.AF_INET6)
        sendSegment(ns, socket.AF_INET6, 40000, 443, TCP_SYN)
        tcp = tcpHeader(socket.AF_INET6, LOCAL_V6, REMOTE_V6, 40001, 443, TCP_SYN)
        # Destination options: next header TCP, length 0, a PadN of 4.
        options = struct.pack("!BBBB4x", 6, 0, 1, 4)
        packet = bytearray(ipv6Packet(LOCAL_V6, REMOTE_V6, options + tcp))
        packet[6] = 60
        sendRaw(ns, socket.AF_INET6, bytes(packet), REMOTE_V6)
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET6, LOCAL_V6, 40000), (REMOTE_V6, 443))
        self.assertEqual(kmod.get(socket.AF_INET6, LOCAL_V6, 40001), (REMOTE_V6, 443))

    def test_ipv6Malformed(self) -> None:
        """
        A truncated IPv6 SYN, and IPv6 fragments holding a SYN, are ignored.
        """
        ns = rawNamespace(self, socket.AF_INET6)
        tcp = tcpHeader(socket.AF_INET6, LOCAL_V6, REMOTE_V6, 40000, 443, TCP_SYN)
        packets = [
            ipv6Packet(LOCAL_V6, REMOTE_V6, tcp[:10]),
            ipv6Packet(LOCAL_V6, REMOTE_V6, tcp, fragmentHeader=ipv6FragmentHeader(0, True)),
            ipv6Packet(LOCAL_V6, REMOTE_V6, tcp, fragmentHeader=ipv6FragmentHeader(1, False)),
        ]
        for packet in packets:
            sendRaw(ns, socket.AF_INET6, packet, REMOTE_V6)
        self.assertNotRecorded(ns, socket.AF_INET6, 40000)

    def test_manyEntries(self) -> None:
        """
        Hundreds of sources are each found with their own destination.
        """
        ns = rawNamespace(self, socket.AF_INET)
        for n in range(500):
            sendSegment(ns, socket.AF_INET, 20000 + n, 443, TCP_SYN,
                        dst=f"203.0.113.{n % 250 + 1}")
        kmod = self.client(ns)
        for n in range(500):
            self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 20000 + n),
                             (f"203.0.113.{n % 250 + 1}", 443))
        self.assertEqual(kmod.stats()["entries"], 500)


class StatsTests(GuestTestCase):
    """
    The STATS command.
    """

    def test_fresh(self) -> None:
        """
        A new namespace's counters are all there, and all zero.
        """
        ns = Namespace()
        self.addCleanup(ns.delete)
        self.assertEqual(self.client(ns).stats(), dict.fromkeys(STATS, 0))

    def test_counts(self) -> None:
        """
        The counters count entries, SYNs recorded, look-ups, hits and
        misses.
        """
        ns = rawNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40001, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40001, 443, TCP_SYN)
        kmod = self.client(ns)
        kmod.get(socket.AF_INET, LOCAL_V4, 40000)
        self.assertRaises(NetlinkError, kmod.get, socket.AF_INET, LOCAL_V4, 40002)
        self.assertRaises(NetlinkError, kmod.get, socket.AF_INET, REMOTE_V4, 40000)
        self.assertEqual(kmod.stats(), {
            "entries": 2, "inserts": 3, "lookups": 3, "hits": 1, "misses": 2,
            "evictions": 0, "expiries": 0,
        })


class PortsTests(GuestTestCase):
    """
    The GET_PORTS and SET_PORTS commands.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ns = rawNamespace(self, socket.AF_INET)
        self.kmod = self.client(self.ns)

    def test_default(self) -> None:
        """
        A namespace starts with the ports of the module parameter.
        """
        self.assertEqual(self.kmod.getPorts(), [443])

    def test_set(self) -> None:
        """
        SET_PORTS replaces the ports that GET_PORTS reads, in order and
        without repeats.
        """
        self.kmod.setPorts([8443, 80, 8443])
        self.assertEqual(self.kmod.getPorts(), [8443, 80])

    def test_setChangesRecording(self) -> None:
        """
        Only SYNs to the ports set are recorded afterwards.
        """
        self.kmod.setPorts([8443])
        sendSegment(self.ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(self.ns, socket.AF_INET, 40001, 8443, TCP_SYN)
        self.assertNetlinkError(errno.ENOENT, self.kmod.get, socket.AF_INET, LOCAL_V4, 40000)
        self.assertEqual(self.kmod.get(socket.AF_INET, LOCAL_V4, 40001), (REMOTE_V4, 8443))

    def test_none(self) -> None:
        """
        A namespace may watch no port at all; then nothing is recorded.
        """
        self.kmod.setPorts([])
        self.assertEqual(self.kmod.getPorts(), [])
        sendSegment(self.ns, socket.AF_INET, 40000, 443, TCP_SYN)
        self.assertEqual(self.kmod.stats()["inserts"], 0)

    def test_most(self) -> None:
        """
        SHIFTER_MAX_PORTS ports may be set, and no more.
        """
        ports = list(range(1000, 1000 + SHIFTER_MAX_PORTS))
        self.kmod.setPorts(ports)
        self.assertEqual(self.kmod.getPorts(), ports)
        error = self.assertNetlinkError(errno.EINVAL, self.kmod.setPorts, ports + [2000])
        self.assertEqual(error.message, "too many ports")
        self.assertEqual(self.kmod.getPorts(), ports)

    def test_portZero(self) -> None:
        """
        Port 0 is refused, and the ports stay as they were.
        """
        self.assertNetlinkError(errno.EINVAL, self.kmod.setPorts, [80, 0])
        self.assertEqual(self.kmod.getPorts(), [443])

    def test_missingNest(self) -> None:
        """
        SET_PORTS without its nest of ports is refused.
        """
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_SET_PORTS)
        self.assertEqual(self.kmod.getPorts(), [443])

    def test_wrongAttributeInNest(self) -> None:
        """
        A nest of ports holding anything but ports is refused.
        """
        nest = nlattr(A_PORTS_PORT, struct.pack("=H", 80)) + nlattr(2, struct.pack("=H", 81))
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_SET_PORTS,
                                nlattr(A_PORTS | 0x8000, nest))
        self.assertEqual(self.kmod.getPorts(), [443])

    def test_perNamespace(self) -> None:
        """
        Setting one namespace's ports leaves another's alone.
        """
        other = Namespace()
        self.addCleanup(other.delete)
        self.kmod.setPorts([80])
        self.assertEqual(self.client(other).getPorts(), [443])


class IsolationTests(GuestTestCase):
    """
    Each network namespace sees only its own entries and counters.
    """

    def test_entryInvisibleElsewhere(self) -> None:
        """
        An entry recorded in one namespace is not found from another that
        has the same addresses, nor counted there.
        """
        one = rawNamespace(self, socket.AF_INET)
        other = rawNamespace(self, socket.AF_INET)
        sendSegment(one, socket.AF_INET, 40000, 443, TCP_SYN)
        otherModule = self.client(other)
        self.assertNetlinkError(errno.ENOENT, otherModule.get, socket.AF_INET, LOCAL_V4, 40000)
        self.assertEqual(otherModule.stats()["inserts"], 0)
        self.assertEqual(self.client(one).get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))

    def test_sameSourceInTwoNamespaces(self) -> None:
        """
        The same source in two namespaces can have two destinations.
        """
        one = rawNamespace(self, socket.AF_INET)
        other = rawNamespace(self, socket.AF_INET)
        sendSegment(one, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.1")
        sendSegment(other, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.2")
        self.assertEqual(self.client(one).get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.1", 443))
        self.assertEqual(self.client(other).get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.2", 443))


class PermissionTests(GuestTestCase):
    """
    Every command needs CAP_NET_ADMIN in the user namespace that owns the
    requester's network namespace.
    """

    def child(self, *steps) -> dict:
        """
        In a forked child, take C{steps}, then try every command on a new
        socket; return what each gave and whether CAP_NET_ADMIN was held.
        """
        readFd, writeFd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readFd)
                report: dict = {}
                try:
                    for step in steps:
                        step()
                    report["netAdmin"] = hasNetAdmin()
                    kmod = ShifterClient()
                    calls = {
                        "GET": lambda: kmod.get(socket.AF_INET, LOCAL_V4, 40000),
                        "STATS": kmod.stats,
                        "GET_PORTS": kmod.getPorts,
                        "SET_PORTS": lambda: kmod.setPorts([443]),
                    }
                    results = {}
                    for name, call in calls.items():
                        try:
                            call()
                            results[name] = 0
                        except NetlinkError as e:
                            results[name] = e.errno
                    report["results"] = results
                except BaseException as e:
                    report["error"] = repr(e)
                os.write(writeFd, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(writeFd)
        with os.fdopen(readFd, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        report = json.loads(data)
        self.assertNotIn("error", report)
        return report

    def test_admin(self) -> None:
        """
        A process with CAP_NET_ADMIN may use every command.
        """
        report = self.child()
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"],
                         {"GET": errno.ENOENT, "STATS": 0, "GET_PORTS": 0, "SET_PORTS": 0})

    def test_withoutNetAdmin(self) -> None:
        """
        Root without CAP_NET_ADMIN is refused every command.
        """
        report = self.child(dropNetAdmin)
        self.assertFalse(report["netAdmin"])
        self.assertEqual(report["results"], dict.fromkeys(
            ["GET", "STATS", "GET_PORTS", "SET_PORTS"], errno.EPERM))

    def test_otherUserNamespace(self) -> None:
        """
        A process with every capability in a new user namespace has no say
        over the initial network namespace, and is refused every command
        there.
        """
        report = self.child(lambda: unshare(CLONE_NEWUSER))
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"], dict.fromkeys(
            ["GET", "STATS", "GET_PORTS", "SET_PORTS"], errno.EPERM))

    def test_ownNetworkNamespace(self) -> None:
        """
        A process with every capability in a new user namespace may use
        every command in a network namespace that its user namespace owns.
        """
        report = self.child(lambda: unshare(CLONE_NEWUSER), lambda: unshare(CLONE_NEWNET))
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"],
                         {"GET": errno.ENOENT, "STATS": 0, "GET_PORTS": 0, "SET_PORTS": 0})


class RecordedEntryTestCase(GuestTestCase):
    """
    A namespace with one recorded connection, and a client of the family
    that must still find it after whatever the test sent.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ns = rawNamespace(self, socket.AF_INET)
        sendSegment(self.ns, socket.AF_INET, 40000, 443, TCP_SYN)
        self.kmod = self.client(self.ns)
        # A request that is right, to prove that the wrong ones are wrong.
        self.good = {
            A_FAMILY: nlattr(A_FAMILY, bytes([socket.AF_INET])),
            A_SRC_ADDR: nlattr(A_SRC_ADDR, socket.inet_aton(LOCAL_V4)),
            A_SRC_PORT: nlattr(A_SRC_PORT, struct.pack("=H", 40000)),
        }
        reply = self.kmod.requestRaw(SHIFTER_CMD_GET, b"".join(self.good.values()))
        self.assertEqual(reply.get_attr("SHIFTER_A_DST_PORT"), 443)
        # Whatever the test sent, the family still answers on this socket
        # afterwards (cleanups run last first: this before the close).
        self.addCleanup(self.stillAnswers)

    def stillAnswers(self) -> None:
        self.assertEqual(self.kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))


class MalformedRequestTests(RecordedEntryTestCase):
    """
    Requests that the family's policies or commands refuse, each with an
    error and none with a crash.
    """

    def get(self, code: int, **replace: bytes) -> NetlinkError:
        attrs = dict(self.good)
        for name, value in replace.items():
            attrs[{"family": A_FAMILY, "addr": A_SRC_ADDR, "port": A_SRC_PORT}[name]] = value
        return self.assertNetlinkError(code, self.kmod.requestRaw, SHIFTER_CMD_GET,
                                       b"".join(attrs.values()))

    def test_missingAttributes(self) -> None:
        """
        GET without its family, address or port is refused with EINVAL.
        """
        for name in ("family", "addr", "port"):
            self.get(errno.EINVAL, **{name: b""})

    def test_wrongAddressLength(self) -> None:
        """
        An address that is not as long as its family's is refused with
        EINVAL.
        """
        v6 = socket.inet_pton(socket.AF_INET6, LOCAL_V6)
        error = self.get(errno.EINVAL, addr=nlattr(A_SRC_ADDR, v6))
        self.assertEqual(error.message, "address length does not match the family")
        self.get(errno.EINVAL, family=nlattr(A_FAMILY, bytes([socket.AF_INET6])))
        for length in (0, 3, 5, 15, 17, 32):
            self.get(errno.EINVAL, addr=nlattr(A_SRC_ADDR, b"\1" * length))

    def test_unknownFamily(self) -> None:
        """
        A family other than AF_INET and AF_INET6 is refused with EINVAL.
        """
        for family in (0, socket.AF_UNIX, socket.AF_PACKET, 255):
            self.get(errno.EINVAL, family=nlattr(A_FAMILY, bytes([family])))

    def test_wrongSizedIntegers(self) -> None:
        """
        A port or family of the wrong size is refused with EINVAL.
        """
        self.get(errno.EINVAL, port=nlattr(A_SRC_PORT, struct.pack("=I", 40000)))
        self.get(errno.EINVAL, port=nlattr(A_SRC_PORT, b"\1"))
        self.get(errno.EINVAL, family=nlattr(A_FAMILY, struct.pack("=H", socket.AF_INET)))

    def test_replyAttributes(self) -> None:
        """
        Attributes that only replies carry are refused in requests.
        """
        for kind in (A_DST_ADDR, A_DST_PORT):
            attrs = b"".join(self.good.values()) + nlattr(kind, b"\0\0\0\0")
            self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_GET, attrs)

    def test_unknownAttribute(self) -> None:
        """
        An attribute the family does not know is refused.
        """
        attrs = b"".join(self.good.values()) + nlattr(99, b"\0\0\0\0")
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_GET, attrs)

    def test_unknownCommand(self) -> None:
        """
        A command the family does not have is refused with EOPNOTSUPP.
        """
        for cmd in (0, SHIFTER_CMD_SET_PORTS + 1, 255):
            self.assertNetlinkError(errno.EOPNOTSUPP, self.kmod.requestRaw, cmd)

    def test_reservedHeaderField(self) -> None:
        """
        A request whose generic netlink header has its reserved field set
        is refused.
        """
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_STATS,
                                reserved=1)

    def test_attributeOverrun(self) -> None:
        """
        An attribute that claims more bytes than the message holds is
        refused.
        """
        attrs = b"".join(self.good.values()) + struct.pack("=HH", 64, A_SRC_PORT) + b"\0\0\0\0"
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_GET, attrs)

    def test_oversizedAttribute(self) -> None:
        """
        A 60 KiB address is refused with EINVAL.
        """
        self.get(errno.EINVAL, addr=nlattr(A_SRC_ADDR, b"\1" * 60000))

    def test_oversizedMessage(self) -> None:
        """
        A message larger than the socket may send is refused with EMSGSIZE
        before it reaches the family.
        """
        sndbuf = self.kmod.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        attrs = b"".join(self.good.values()) + nlattr(A_SRC_ADDR, b"\1" * 60000) * (sndbuf // 60000 + 1)
        error = self.assertRaises(OSError, self.kmod.requestRaw, SHIFTER_CMD_GET, attrs)
        self.assertEqual(error.errno, errno.EMSGSIZE)

    def test_truncatedMessage(self) -> None:
        """
        A message shorter than its header says is dropped unanswered, and
        the socket goes on working.
        """
        seq = 1000
        self.kmod.sock.send(
            genlRequest(self.kmod.familyId, SHIFTER_CMD_STATS, b"", seq=seq, length=200)
        )
        self.kmod.sock.settimeout(1)
        try:
            self.assertRaises(socket.timeout, self.kmod.receive, seq)
        finally:
            self.kmod.sock.settimeout(5)




def randomAttributes(rng: random.Random, depth: int = 0) -> bytes:
    """
    Netlink attributes of random types (some flagged nested, some holding
    random attributes in turn), lengths and contents.
    """
    attrs = b""
    for _ in range(rng.randrange(6)):
        kind = rng.choice([rng.randrange(12), rng.randrange(1 << 14)])
        if depth < 2 and rng.random() < 0.3:
            kind |= 0x8000  # NLA_F_NESTED
            payload = randomAttributes(rng, depth + 1)
        else:
            payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 4, 8, 16, rng.randrange(64)])))
        attrs += nlattr(kind, payload)
    if rng.random() < 0.1 and attrs:
        # An attribute area that ends inside an attribute.
        attrs = attrs[: rng.randrange(len(attrs))]
    return attrs


class NetlinkFuzzTests(RecordedEntryTestCase):
    """
    Random requests: the module answers each with an error or a reply and
    keeps working (the kernel log is checked for warnings and oopses by
    guest-run.sh after the suite).
    """

    def test_randomRequests(self) -> None:
        """
        Two thousand random requests (random commands, versions, reserved
        fields and attributes, nested and cut short) each get an answer,
        and the recorded entry is still found afterwards.
        """
        rng = random.Random(0x5F1F7E5)
        answered = refused = 0
        for _ in range(2000):
            cmd = rng.choice([0, 1, 2, 3, 4, 5, rng.randrange(256)])
            seq = next(self.kmod.seq)
            self.kmod.sock.send(genlRequest(
                self.kmod.familyId, cmd, randomAttributes(rng), seq=seq,
                version=rng.choice([1, 1, 0, 2, 255]),
                reserved=rng.choice([0, 0, 0, rng.randrange(1 << 16)]),
            ))
            try:
                self.kmod.receive(seq)
            except NetlinkError:
                refused += 1
            answered += 1
        self.assertEqual(answered, 2000)
        self.assertGreater(refused, 1000)
        print(f"random requests: {answered} answered, {refused} refused with an error")

class ModuleParameterTests(GuestTestCase):
    """
    The module's parameters, each test with the module reloaded; the
    defaults come back afterwards.
    """

    def reload(self, **parameters: object) -> None:
        loadModule(**parameters)
        self.addCleanup(loadModule)

    def test_expiry(self) -> None:
        """
        An entry is found until expiry_secs have passed since its SYN, and
        then no longer, and is counted as expired.
        """
        self.reload(expiry_secs=2)
        ns = rawNamespace(self, socket.AF_INET)
        kmod = self.client(ns)
        sent = time.monotonic()
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        time.sleep(1)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        self.assertLess(time.monotonic() - sent, 1.9, "too slow to look before expiry")
        self.assertEqual(kmod.stats()["expiries"], 0)
        self.assertTrue(waitFor(lambda: kmod.stats()["expiries"] == 1, timeout=15))
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, LOCAL_V4, 40000)
        self.assertEqual(kmod.stats()["entries"], 0)

    def test_sizeBound(self) -> None:
        """
        A namespace holds at most max_entries entries; the oldest go first
        and are counted as evicted.
        """
        self.reload(max_entries=4)
        ns = rawNamespace(self, socket.AF_INET)
        for port in range(40001, 40007):
            sendSegment(ns, socket.AF_INET, port, 443, TCP_SYN)
        kmod = self.client(ns)
        for port in (40001, 40002):
            self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, LOCAL_V4, port)
        for port in range(40003, 40007):
            self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, port), (REMOTE_V4, 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["inserts"], stats["evictions"]), (4, 6, 2))

    def test_sizeBoundPerNamespace(self) -> None:
        """
        A full namespace evicts its own oldest entries, not another's.
        """
        self.reload(max_entries=2)
        busy = rawNamespace(self, socket.AF_INET)
        quiet = rawNamespace(self, socket.AF_INET)
        sendSegment(quiet, socket.AF_INET, 40000, 443, TCP_SYN)
        for port in range(40001, 40011):
            sendSegment(busy, socket.AF_INET, port, 443, TCP_SYN)
        self.assertEqual(self.client(quiet).get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        self.assertEqual(self.client(busy).stats()["evictions"], 8)

    def test_ports(self) -> None:
        """
        The ports parameter sets the ports a namespace starts with.
        """
        self.reload(ports="80,8443")
        ns = Namespace()
        self.addCleanup(ns.delete)
        self.assertEqual(self.client(ns).getPorts(), [80, 8443])

    def test_invalid(self) -> None:
        """
        The module refuses to load with no room, no time, or port 0.
        """
        loadModule()
        self.addCleanup(loadModule)
        subprocess.run(["rmmod", "shifter"], check=True)
        for bad in ("max_entries=0", "expiry_secs=0", "ports=443,0"):
            result = subprocess.run(["insmod", modulePath(), bad],
                                    capture_output=True, text=True)
            self.assertNotEqual(result.returncode, 0, bad)
            self.assertFalse(moduleLoaded(), bad)

    def test_unloadWithLiveEntries(self) -> None:
        """
        The module unloads while namespaces hold entries and connections
        are open; loaded again, it starts empty in those namespaces and
        records again.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        accepted, peer = server.accept()
        self.closing(accepted)
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, *peer), (REMOTE_V4, 443))
        kmod.close()

        loadModule()

        kmod = self.client(ns)
        self.assertEqual(kmod.stats(), dict.fromkeys(STATS, 0))
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, *peer)
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        accepted, peer = server.accept()
        self.closing(accepted)
        self.assertEqual(kmod.get(socket.AF_INET, *peer), (REMOTE_V4, 443))
