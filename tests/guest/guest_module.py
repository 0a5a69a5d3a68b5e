"""
The Shifter kernel module in a booted kernel: what it records from real
connections and from packets built by hand, that it answers for exactly
the connection accepted whatever NAT did, where it records and where it
does not, how its generic netlink family answers good and bad requests,
and that namespaces come and go under load without leaving anything.

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
import re
import socket
import struct
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from shifter.resolvers.kmod import (
    SHIFTER_CMD_DISABLE,
    SHIFTER_CMD_GET,
    SHIFTER_CMD_SET_PORTS,
    SHIFTER_CMD_STATS,
    SHIFTER_MAX_PORTS,
)
from tests.guest import spec as ynl
from tests.guest.support import (
    CLIENT_V4,
    CLIENT_V6,
    GATEWAY_V4,
    GATEWAY_V6,
    IP_MF,
    LISTEN_PORT,
    LOCAL_V4,
    LOCAL_V6,
    LOOPBACK,
    REMOTE_NET,
    REMOTE_V4,
    REMOTE_V6,
    ROOT,
    SLOW,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Namespace,
    NetlinkError,
    ShifterClient,
    connect,
    enableIn,
    genlRequest,
    ipv4Packet,
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
    run,
    sendRaw,
    tcpHeader,
    waitFor,
)

DEFAULTS = {"ports": "443", "max_entries": "65536", "max_entries_total": "262144",
            "expiry_secs": "120", "max_entries_userns": "4096", "max_entries_userns_total": "16384",
            "userns": "N"}

# enum shifter_attr, for requests built by hand.
A_FAMILY, A_SRC_ADDR, A_SRC_PORT, A_DST_ADDR, A_DST_PORT = 1, 2, 3, 4, 5
A_STATS, A_PORTS, A_LOCAL_ADDR, A_LOCAL_PORT, A_ENABLED, A_IFINDEX = 6, 7, 8, 9, 10, 11
A_PORTS_PORT = 1

STATS = ("entries", "inserts", "lookups", "hits", "misses", "expiries", "gone", "full", "ambiguous",
         "skipped", "evicted_gone", "evicted_answered", "evicted_early", "evicted_oldest")
EVICTED = ("evicted_gone", "evicted_answered", "evicted_early", "evicted_oldest")

TCP_FIN_WAIT2 = 5
SO_ORIGINAL_DST = 80
# How long the module lets a new entry's connection wait for conntrack to
# confirm it before it checks, once, and drops the entry as gone
# (SHIFTER_GRACE), with room for the work to run: an unconfirmed entry is
# gone after it.
GONE_AFTER = 2.5

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


def originalDst(accepted: socket.socket) -> tuple[str, int]:
    """
    What SO_ORIGINAL_DST (the sockopt resolver) says of an accepted IPv4
    connection.
    """
    raw = accepted.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(address), port


class GuestTestCase(TestCase):
    """
    A test in the booted kernel, with the module loaded with its defaults.
    """

    timeout = 120 * SLOW

    def setUp(self) -> None:
        requireGuest()
        if not moduleLoaded() or moduleParameters() != DEFAULTS:
            loadModule()

    def client(self, ns: Namespace) -> ShifterClient:
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

    def accept(self, server: socket.socket) -> socket.socket:
        accepted, _ = server.accept()
        return self.closing(accepted)


def redirectedNamespace(test: TestCase, family: int, enable: bool = True) -> Namespace:
    """
    A namespace whose local address is C{LOCAL_V4}/C{LOCAL_V6}, where nat
    OUTPUT redirects packets to C{REMOTE_NET} ports 443 and 8443 to
    C{LISTEN_PORT}, where a listener answers them, with the module
    enabled for port 443 only (unless C{enable} is false): hand-made
    packets sent to C{REMOTE_NET} are redirected like a local program's.

    A hand-made SYN gets the listener's SYN-ACK, which the namespace's
    own stack answers with a reset, leaving the connection closed in
    conntrack: for 5 minutes here, rather than 10 seconds, so that its
    entry answers for as long as a slow test needs.  (With no listener
    the first reply would be a reset, and conntrack would drop the
    connection, and its entry with it, at once.)
    """
    ns = makeLocalClient(test, family, ports=(443, 8443), enable=False)
    ns.exec("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_close=300")
    server = listen(ns, socket.AF_INET6)
    test.addCleanup(server.close)
    if enable:
        enableIn(ns, (443,))
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
        accepted = self.accept(server)
        peer = accepted.getpeername()
        self.assertEqual(peer[0], local)
        self.assertEqual(client.getsockname()[:2], peer[:2])
        self.assertEqual(accepted.getsockname()[:2], (LOOPBACK[family], LISTEN_PORT))
        self.assertEqual(self.client(ns).getAccepted(accepted), (remote, 443))

    def test_ipv4(self) -> None:
        """
        An IPv4 connection redirected in nat OUTPUT is found by the accepted
        socket's two ends, with the destination it had before NAT.
        """
        self.roundTrip(socket.AF_INET, LOCAL_V4, REMOTE_V4)

    def test_ipv6(self) -> None:
        """
        An IPv6 connection redirected in nat OUTPUT is found by the accepted
        socket's two ends, with the destination it had before NAT.
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
        accepted = []
        for remote in remotes:
            self.closing(connect(ns, socket.AF_INET, remote, 443))
            accepted.append(self.accept(server))
        for remote, sock in zip(remotes, accepted):
            self.assertEqual(kmod.getAccepted(sock), (remote, 443))

    def test_wrongLocalEnd(self) -> None:
        """
        The right peer asked for with another local address or port is not
        that connection, and is not answered.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        peer = self.accept(server).getpeername()
        kmod = self.client(ns)
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, *peer, LOCAL_V4)
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, *peer, "127.0.0.1", 12346)
        self.assertEqual(kmod.get(socket.AF_INET, *peer), (REMOTE_V4, 443))


class GatewayTests(GuestTestCase):
    """
    Clients in another namespace whose connections a gateway namespace
    redirects in nat PREROUTING.
    """

    def roundTrip(self, family: int, clientAddress: str, gatewayAddress: str, remote: str) -> None:
        clientNs, gateway = makeGateway(self, family)
        server = self.closing(listen(gateway, family))
        client = self.closing(connect(clientNs, family, remote, 443))
        accepted = self.accept(server)
        self.assertEqual(accepted.getpeername()[0], clientAddress)
        self.assertEqual(accepted.getsockname()[:2], (gatewayAddress, LISTEN_PORT))
        client.sendall(b"through the gateway")
        self.assertEqual(accepted.recv(100), b"through the gateway")
        self.assertEqual(self.client(gateway).getAccepted(accepted), (remote, 443))

    def test_ipv4(self) -> None:
        """
        An IPv4 connection from a client namespace, redirected by the
        gateway in nat PREROUTING, is found in the gateway's namespace.
        """
        self.roundTrip(socket.AF_INET, CLIENT_V4, GATEWAY_V4, REMOTE_V4)

    def test_ipv6(self) -> None:
        """
        An IPv6 connection from a client namespace, redirected by the
        gateway in nat PREROUTING, is found in the gateway's namespace.
        """
        self.roundTrip(socket.AF_INET6, CLIENT_V6, GATEWAY_V6, REMOTE_V6)


class ExactnessTests(GuestTestCase):
    """
    The module answers for exactly the connection accepted, whatever NAT
    did to it, and nothing that does not become a connection changes what
    it answers.
    """

    def sameSourcePair(
        self, clientNs: Namespace, port: int, remotes: list[str], source: str = CLIENT_V4,
    ) -> list[socket.socket | None]:
        """
        Connections from C{source}:C{port} to each of C{remotes}:443, all
        bound to the same address and port, each naming its destination
        in its first line; L{None} for one the kernel did not complete.
        """
        sockets: list[socket.socket | None] = []
        for remote in remotes:
            sock = self.closing(clientNs.socket(socket.AF_INET))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((source, port))
            sock.settimeout(10)
            try:
                sock.connect((remote, 443))
            except OSError:
                sockets.append(None)
                continue
            sock.sendall(remote.encode() + b"\n")
            sockets.append(sock)
        return sockets

    def acceptedByRemote(self, server: socket.socket, count: int) -> dict[str, socket.socket]:
        """
        C{count} accepted connections, by the destination their client
        named in its first line.
        """
        found = {}
        for _ in range(count):
            accepted = self.accept(server)
            accepted.settimeout(10)
            line = b""
            while not line.endswith(b"\n"):
                chunk = accepted.recv(100)
                self.assertTrue(chunk, "the client closed before naming its destination")
                line += chunk
            found[line.strip().decode()] = accepted
        return found

    def test_sameSourceTwoDestinations(self) -> None:
        """
        Two connections from one source address and port to two
        destinations, open at once, redirected in nat OUTPUT: NAT gives the
        second another source port, and each is answered with its own
        destination (as SO_ORIGINAL_DST says too).
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        remotes = ["203.0.113.7", "203.0.113.8"]
        clients = self.sameSourcePair(ns, 40000, remotes, source=LOCAL_V4)
        self.assertNotIn(None, clients, "the kernel did not complete both connections")
        accepted = self.acceptedByRemote(server, 2)
        ports = {sock.getpeername()[1] for sock in accepted.values()}
        self.assertEqual(len(ports), 2, "NAT did not remap the second connection's port")
        self.assertIn(40000, ports)
        kmod = self.client(ns)
        for remote, sock in accepted.items():
            self.assertEqual(kmod.getAccepted(sock), (remote, 443))
            self.assertEqual(originalDst(sock), (remote, 443))

    def test_sameSourceThroughGateway(self) -> None:
        """
        The same through a gateway's nat PREROUTING: the first connection is
        answered with its own destination, and so is the second if the
        kernel completes it (NAT remaps its port at LOCAL_IN; Debian's 6.1
        then never answers the SYN, with or without the module, while 6.12
        does).
        """
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        server = self.closing(listen(gateway, socket.AF_INET))
        remotes = ["203.0.113.7", "203.0.113.8"]
        clients = self.sameSourcePair(clientNs, 40000, remotes)
        self.assertIsNotNone(clients[0], "the first connection did not complete")
        accepted = self.acceptedByRemote(server, 2 - clients.count(None))
        kmod = self.client(gateway)
        self.assertEqual(accepted["203.0.113.7"].getpeername(), (CLIENT_V4, 40000))
        for remote, sock in accepted.items():
            self.assertEqual(kmod.getAccepted(sock), (remote, 443))
            self.assertEqual(originalDst(sock), (remote, 443))
        print(f"through the gateway: {len(accepted)} of 2 connections completed")

    def test_droppedSynChangesNothing(self) -> None:
        """
        A SYN dropped after the module's hook (by an nft filter chain at the
        last priority, just before conntrack would confirm it) changes no
        entry: a live connection is still answered, the dropped one never
        is, its entry goes once a sweep finds conntrack never held it, and a
        later connection from its source is answered with its own
        destination.
        """
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        server = self.closing(listen(gateway, socket.AF_INET))
        self.sameSourcePair(clientNs, 40000, ["203.0.113.7"])
        liveAccepted = self.acceptedByRemote(server, 1)["203.0.113.7"]
        kmod = self.client(gateway)
        before = kmod.stats()

        gateway.nft(
            "table inet late {\n"
            "  chain input {\n"
            "    type filter hook input priority 2147483647; policy accept;\n"
            f"    tcp dport {LISTEN_PORT} tcp flags & (syn|ack) == syn counter drop\n"
            "  }\n"
            "}\n"
        )
        doomed = self.closing(clientNs.socket(socket.AF_INET))
        doomed.bind((CLIENT_V4, 40001))
        doomed.settimeout(1.5)
        self.assertRaises(OSError, doomed.connect, ("203.0.113.9", 443))
        doomed.close()
        dropped = gateway.exec("nft", "list", "chain", "inet", "late", "input").stdout
        self.assertNotIn("packets 0 ", dropped, "the late chain dropped nothing")
        self.assertGreater(kmod.stats()["inserts"], before["inserts"], "the hook never saw the SYN")

        self.assertEqual(kmod.getAccepted(liveAccepted), ("203.0.113.7", 443))
        self.assertNetlinkError(errno.ENOENT, kmod.get, socket.AF_INET, CLIENT_V4, 40001,
                                GATEWAY_V4)
        self.assertTrue(waitFor(lambda: kmod.stats()["entries"] == before["entries"],
                                timeout=GONE_AFTER * 4),
                        f"the dropped SYN's entry stayed: {kmod.stats()}")
        self.assertGreater(kmod.stats()["gone"], before["gone"])

        gateway.exec("nft", "delete", "table", "inet", "late")
        self.sameSourcePair(clientNs, 40001, ["203.0.113.10"])
        laterAccepted = self.acceptedByRemote(server, 1)["203.0.113.10"]
        self.assertEqual(laterAccepted.getpeername(), (CLIENT_V4, 40001))
        self.assertEqual(kmod.getAccepted(laterAccepted), ("203.0.113.10", 443))
        self.assertEqual(kmod.getAccepted(liveAccepted), ("203.0.113.7", 443))

    def test_spoofedSynChangesNothing(self) -> None:
        """
        SYNs sent from the LAN with a live connection's source address and
        port, to its destination and to another, change nothing: the live
        connection is still answered with its own destination.
        """
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        server = self.closing(listen(gateway, socket.AF_INET))
        self.sameSourcePair(clientNs, 40000, ["203.0.113.7"])
        liveAccepted = self.acceptedByRemote(server, 1)["203.0.113.7"]
        kmod = self.client(gateway)
        for remote in ("203.0.113.7", "203.0.113.66"):
            for _ in range(3):
                packet = ipv4Packet(CLIENT_V4, remote,
                                    tcpHeader(socket.AF_INET, CLIENT_V4, remote, 40000, 443, TCP_SYN))
                sendRaw(clientNs, socket.AF_INET, packet, remote)
        time.sleep(0.5)
        self.assertEqual(kmod.getAccepted(liveAccepted), ("203.0.113.7", 443))
        self.assertEqual(originalDst(liveAccepted), ("203.0.113.7", 443))

    def test_natChainPriorities(self) -> None:
        """
        With the redirect in an nft nat chain at a lower priority than
        iptables' and than destination NAT's (-150; a version 1 module
        recorded at -101, after such a chain had rewritten the SYN), and a
        source NAT chain on input at a high one (300), the connection is still filed under what the accepting
        socket sees (the rewritten source) and answered with its original
        destination.
        """
        nft = (
            "table ip early {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority -150; policy accept;\n"
            f'    iifname "gw0" tcp dport 443 redirect to :{LISTEN_PORT}\n'
            "  }\n"
            "  chain input {\n"
            "    type nat hook input priority 300; policy accept;\n"
            f"    ip saddr {CLIENT_V4} tcp dport {LISTEN_PORT} snat to 198.51.100.99\n"
            "  }\n"
            "}\n"
        )
        clientNs, gateway = makeGateway(self, socket.AF_INET, nft=nft)
        server = self.closing(listen(gateway, socket.AF_INET))
        self.closing(connect(clientNs, socket.AF_INET, REMOTE_V4, 443))
        accepted = self.accept(server)
        self.assertEqual(accepted.getpeername()[0], "198.51.100.99")
        self.assertEqual(self.client(gateway).getAccepted(accepted), (REMOTE_V4, 443))

    def test_secondAttemptKeepsFirst(self) -> None:
        """
        A second SYN from the same source to another destination, while
        conntrack still holds the first connection, is filed apart and does
        not replace the first's entry.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.8")
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["inserts"]), (2, 2))

    def test_twoZonesShareReplyTuple(self) -> None:
        """
        Two connections from one source address and port to two
        destinations, put in two conntrack zones by destination: conntrack
        keeps reply tuples unique per zone only, so NAT leaves the second
        its port and both share one reply tuple.  The second is recorded
        all the same, and a look-up, which names no zone, is never
        answered with the other zone's destination: while both live it is
        refused as ambiguous (ENOTUNIQ, counted), and once the second
        zone's connection is gone the first is answered again.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        ns.nft(
            "table ip zones {\n"
            "  chain output {\n"
            "    type filter hook output priority -300; policy accept;\n"
            "    ip daddr 203.0.113.7 ct zone set 1\n"
            "    ip daddr 203.0.113.8 ct zone set 2\n"
            "  }\n"
            "}\n"
        )
        kmod = self.client(ns)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.7")
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.7", 443))
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.8")

        listed = ns.exec("conntrack", "-L", "-p", "tcp", "--sport", "40000").stdout
        tuple_ = r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)"
        zones, replies = [], set()
        for line in listed.splitlines():
            tuples = re.findall(tuple_, line)
            zone = re.search(r"\bzone=(\d+)", line)
            if len(tuples) == 2 and zone:
                zones.append(zone.group(1))
                replies.add(tuples[1])
        self.assertEqual(sorted(zones), ["1", "2"], listed)
        self.assertEqual(len(replies), 1, f"the two zones' connections do not share a reply tuple:\n{listed}")
        self.assertEqual(kmod.stats()["entries"], 2)

        for _ in range(3):
            self.assertNetlinkError(errno.ENOTUNIQ, kmod.get, socket.AF_INET, LOCAL_V4, 40000)
        self.assertEqual(kmod.stats()["ambiguous"], 3)

        ns.exec("conntrack", "-D", "-p", "tcp", "--orig-dst", "203.0.113.8", "-w", "2")
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.7", 443))

    def test_retransmittedSyn(self) -> None:
        """
        The same SYN again makes no second entry.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))
        self.assertEqual(kmod.stats()["entries"], 1)

    def test_goneWithConntrack(self) -> None:
        """
        An entry answers only while conntrack holds its connection: once
        the connection is deleted from conntrack, the look-up fails and a
        sweep drops the entry.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        accepted = self.accept(server)
        kmod = self.client(ns)
        self.assertEqual(kmod.getAccepted(accepted), (REMOTE_V4, 443))
        ns.exec("conntrack", "-D", "-p", "tcp", "--orig-dst", REMOTE_V4)
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, accepted)
        self.assertTrue(waitFor(lambda: kmod.stats()["entries"] == 0, timeout=GONE_AFTER * 4))
        self.assertEqual(kmod.stats()["gone"], 1)


class PacketTests(GuestTestCase):
    """
    What is recorded from single packets, built by hand where a real stack
    would not send them, and redirected by nat OUTPUT.
    """

    def assertNotRecorded(self, ns: Namespace, family: int, sport: int) -> None:
        kmod = self.client(ns)
        self.assertNetlinkError(errno.ENOENT, kmod.get, family,
                                LOCAL_V4 if family == socket.AF_INET else LOCAL_V6, sport)
        self.assertEqual(kmod.stats()["inserts"], 0)

    def test_syn(self) -> None:
        """
        A redirected SYN to a watched port is recorded under the reply
        tuple: its source, and the loopback address and port it was
        redirected to.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        kmod = self.client(ns)
        self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 40000, "127.0.0.1", LISTEN_PORT),
                         (REMOTE_V4, 443))
        self.assertEqual(kmod.stats()["inserts"], 1)

    def test_otherFlags(self) -> None:
        """
        SYN-ACK, SYN with RST or FIN, and segments without SYN (which
        conntrack may pick up as connections already established) are not
        recorded.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        for port, flags in enumerate(
            [TCP_SYN | TCP_ACK, TCP_SYN | TCP_RST, TCP_SYN | TCP_FIN, TCP_ACK,
             TCP_FIN | TCP_ACK, 0],
            start=40000,
        ):
            sendSegment(ns, socket.AF_INET, port, 443, flags)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_unwatchedPort(self) -> None:
        """
        A redirected SYN to a port that is not watched is not recorded.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 8443, TCP_SYN)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_notRedirected(self) -> None:
        """
        A real connection to a local listener that no rule redirected is
        not recorded, on a watched port too.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET, 443))
        self.closing(connect(ns, socket.AF_INET, LOCAL_V4, 443))
        accepted = self.accept(server)
        self.assertNotRecorded(ns, socket.AF_INET, accepted.getpeername()[1])

    def test_truncated(self) -> None:
        """
        A SYN cut short inside its TCP header, and one whose data offset is
        below the header's size, are not recorded.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        header = tcpHeader(socket.AF_INET, LOCAL_V4, REMOTE_V4, 40000, 443, TCP_SYN)
        sendRaw(ns, socket.AF_INET, ipv4Packet(LOCAL_V4, REMOTE_V4, header[:14]), REMOTE_V4)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN, dataOffset=4)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_fragments(self) -> None:
        """
        IPv4 fragments that never make a whole packet are not recorded,
        though they hold a SYN to a watched port.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        header = tcpHeader(socket.AF_INET, LOCAL_V4, REMOTE_V4, 40000, 443, TCP_SYN)
        for fragment in (IP_MF, IP_MF | 8):
            sendRaw(ns, socket.AF_INET,
                    ipv4Packet(LOCAL_V4, REMOTE_V4, header, fragment=fragment), REMOTE_V4)
        self.assertNotRecorded(ns, socket.AF_INET, 40000)

    def test_ipv6Syn(self) -> None:
        """
        A redirected IPv6 SYN to a watched port is recorded, also behind an
        extension header.
        """
        ns = redirectedNamespace(self, socket.AF_INET6)
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

    def test_manyEntries(self) -> None:
        """
        Hundreds of sources are each found with their own destination.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        for n in range(300):
            sendSegment(ns, socket.AF_INET, 20000 + n, 443, TCP_SYN,
                        dst=f"203.0.113.{n % 250 + 1}")
        kmod = self.client(ns)
        for n in range(300):
            self.assertEqual(kmod.get(socket.AF_INET, LOCAL_V4, 20000 + n),
                             (f"203.0.113.{n % 250 + 1}", 443))
        self.assertEqual(kmod.stats()["entries"], 300)


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
        The counters count entries, connections recorded, look-ups, hits
        and misses.
        """
        ns = redirectedNamespace(self, socket.AF_INET)
        sendSegment(ns, socket.AF_INET, 40000, 443, TCP_SYN)
        sendSegment(ns, socket.AF_INET, 40001, 443, TCP_SYN)
        kmod = self.client(ns)
        kmod.get(socket.AF_INET, LOCAL_V4, 40000)
        self.assertRaises(NetlinkError, kmod.get, socket.AF_INET, LOCAL_V4, 40002)
        self.assertRaises(NetlinkError, kmod.get, socket.AF_INET, REMOTE_V4, 40000)
        self.assertEqual(kmod.stats(), {
            "entries": 2, "inserts": 2, "lookups": 3, "hits": 1, "misses": 2,
            "expiries": 0, "gone": 0, "full": 0, "ambiguous": 0, "skipped": 0,
            "evicted_gone": 0, "evicted_answered": 0, "evicted_early": 0, "evicted_oldest": 0,
        })


class EnableTests(GuestTestCase):
    """
    The module records only in namespaces that enabled it, and there only
    what arrives on the interface they name.
    """

    def test_notEnabledRecordsNothing(self) -> None:
        """
        In a namespace that did not enable the module, redirected
        connections work but nothing is recorded or answered, while another
        namespace records.
        """
        quiet = makeLocalClient(self, socket.AF_INET, enable=False)
        busy = makeLocalClient(self, socket.AF_INET)
        for ns in (quiet, busy):
            server = self.closing(listen(ns, socket.AF_INET))
            self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
            accepted = self.accept(server)
            if ns is quiet:
                error = self.assertNetlinkError(errno.ENOENT, self.client(ns).getAccepted, accepted)
                self.assertEqual(error.message, "not enabled in this network namespace")
            else:
                self.assertEqual(self.client(ns).getAccepted(accepted), (REMOTE_V4, 443))
        kmod = self.client(quiet)
        self.assertEqual(kmod.config(), (False, 0, [443]))
        self.assertEqual(kmod.stats()["inserts"], 0)

    def test_disable(self) -> None:
        """
        Disabling drops the namespace's entries and stops recording;
        enabling again records again; the ports stay.
        """
        ns = makeLocalClient(self, socket.AF_INET, ports=(443,))
        kmod = self.client(ns)
        kmod.setPorts([443, 8443])
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        first = self.accept(server)
        self.assertEqual(kmod.getAccepted(first), (REMOTE_V4, 443))
        kmod.disable()
        self.assertEqual(kmod.config(), (False, 0, [443, 8443]))
        self.assertEqual(kmod.stats()["entries"], 0)
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, first)
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        second = self.accept(server)
        kmod.disable()
        kmod.enable()
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, second)
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        self.assertEqual(kmod.getAccepted(self.accept(server)), (REMOTE_V4, 443))

    def interfaceCase(self) -> tuple[Namespace, Namespace, socket.socket]:
        """
        A gateway that redirects its client's connections (arriving on
        gw0) and its own (arriving on lo), and a listener there.
        """
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        gateway.ip("route", "add", REMOTE_NET[socket.AF_INET], "dev", "gw0")
        gateway.iptables(socket.AF_INET, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                         REMOTE_NET[socket.AF_INET], "--dport", "443",
                         "-j", "REDIRECT", "--to-ports", str(LISTEN_PORT))
        return clientNs, gateway, self.closing(listen(gateway, socket.AF_INET))

    def test_interface(self) -> None:
        """
        With an interface named, only connections arriving on it are
        recorded: the LAN's on gw0, the gateway's own on lo.
        """
        clientNs, gateway, server = self.interfaceCase()
        kmod = self.client(gateway)
        for device, recorded in (("gw0", "lan"), ("lo", "own")):
            kmod.enable(ifindex=gateway.ifindex(device))
            self.assertEqual(kmod.config()[1], gateway.ifindex(device))
            self.closing(connect(clientNs, socket.AF_INET, REMOTE_V4, 443))
            lan = self.accept(server)
            self.closing(connect(gateway, socket.AF_INET, REMOTE_V4, 443))
            own = self.accept(server)
            for name, accepted in (("lan", lan), ("own", own)):
                if name == recorded:
                    self.assertEqual(kmod.getAccepted(accepted), (REMOTE_V4, 443), device)
                else:
                    self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, accepted)
        kmod.enable(ifindex=0)
        self.assertEqual(kmod.config()[1], 0)

    def test_unknownInterface(self) -> None:
        """
        An interface index the namespace does not have is refused with
        ENODEV, and the settings stay.
        """
        ns = makeLocalClient(self, socket.AF_INET, enable=False)
        kmod = self.client(ns)
        error = self.assertNetlinkError(errno.ENODEV, kmod.enable, ifindex=99999)
        self.assertEqual(error.message, "no such interface in this network namespace")
        self.assertEqual(kmod.config(), (False, 0, [443]))

    def test_interfaceIndexRange(self) -> None:
        """
        An interface index above INT_MAX is refused by the policy (ERANGE),
        and the settings stay.
        """
        ns = makeLocalClient(self, socket.AF_INET, enable=False)
        kmod = self.client(ns)
        self.assertNetlinkError(errno.ERANGE, kmod.enable, ifindex=2**31)
        self.assertEqual(kmod.config(), (False, 0, [443]))

    def test_interfaceRemoved(self) -> None:
        """
        When the interface named goes away, the namespace records on no
        interface (GET_CONFIG says 0xffffffff), rather than on whatever
        interface gets its index next, until ENABLE names one again.
        """
        clientNs, gateway, server = self.interfaceCase()
        gateway.ip("link", "add", "gone0", "type", "veth", "peer", "name", "gone1")
        kmod = self.client(gateway)
        kmod.enable(ifindex=gateway.ifindex("gone0"))
        gateway.ip("link", "del", "gone0")
        self.assertEqual(kmod.config()[1], 0xFFFFFFFF)
        self.closing(connect(gateway, socket.AF_INET, REMOTE_V4, 443))
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, self.accept(server))
        kmod.enable(ifindex=gateway.ifindex("lo"))
        self.closing(connect(gateway, socket.AF_INET, REMOTE_V4, 443))
        self.assertEqual(kmod.getAccepted(self.accept(server)), (REMOTE_V4, 443))


class ConfigTests(GuestTestCase):
    """
    The GET_CONFIG, SET_PORTS and ENABLE commands' ports.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ns = redirectedNamespace(self, socket.AF_INET, enable=False)
        self.kmod = self.client(self.ns)

    def test_default(self) -> None:
        """
        A namespace starts disabled, with every interface and the ports of
        the module parameter.
        """
        self.assertEqual(self.kmod.config(), (False, 0, [443]))

    def test_set(self) -> None:
        """
        SET_PORTS replaces the ports that GET_CONFIG reads, in order and
        without repeats, and enables the namespace.
        """
        self.kmod.setPorts([8443, 80, 8443])
        self.assertEqual(self.kmod.config(), (True, 0, [8443, 80]))

    def test_enableWithPorts(self) -> None:
        """
        ENABLE may set the ports too.
        """
        self.kmod.enable([8443])
        self.assertEqual(self.kmod.config(), (True, 0, [8443]))

    def test_setChangesRecording(self) -> None:
        """
        Only connections to the ports set are recorded afterwards.
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
        Port 0 is refused by the policy (ERANGE), and nothing changes.
        """
        self.assertNetlinkError(errno.ERANGE, self.kmod.setPorts, [80, 0])
        self.assertEqual(self.kmod.config(), (False, 0, [443]))

    def test_missingNest(self) -> None:
        """
        SET_PORTS without its nest of ports is refused.
        """
        self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_SET_PORTS)
        self.assertEqual(self.kmod.config(), (False, 0, [443]))

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
        self.assertEqual(self.client(other).config(), (False, 0, [443]))


class IsolationTests(GuestTestCase):
    """
    Each network namespace sees only its own entries and counters.
    """

    def test_entryInvisibleElsewhere(self) -> None:
        """
        An entry recorded in one namespace is not found from another that
        has the same addresses, nor counted there.
        """
        one = redirectedNamespace(self, socket.AF_INET)
        other = redirectedNamespace(self, socket.AF_INET)
        sendSegment(one, socket.AF_INET, 40000, 443, TCP_SYN)
        otherModule = self.client(other)
        self.assertNetlinkError(errno.ENOENT, otherModule.get, socket.AF_INET, LOCAL_V4, 40000)
        self.assertEqual(otherModule.stats()["inserts"], 0)
        self.assertEqual(self.client(one).get(socket.AF_INET, LOCAL_V4, 40000), (REMOTE_V4, 443))

    def test_sameSourceInTwoNamespaces(self) -> None:
        """
        The same source in two namespaces can have two destinations.
        """
        one = redirectedNamespace(self, socket.AF_INET)
        other = redirectedNamespace(self, socket.AF_INET)
        sendSegment(one, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.1")
        sendSegment(other, socket.AF_INET, 40000, 443, TCP_SYN, dst="203.0.113.2")
        self.assertEqual(self.client(one).get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.1", 443))
        self.assertEqual(self.client(other).get(socket.AF_INET, LOCAL_V4, 40000), ("203.0.113.2", 443))


COMMANDS = ("GET", "STATS", "GET_CONFIG", "SET_PORTS", "ENABLE", "DISABLE")


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
                        "GET_CONFIG": kmod.config,
                        "SET_PORTS": lambda: kmod.setPorts([443]),
                        "ENABLE": kmod.enable,
                        "DISABLE": kmod.disable,
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

    def inNewNamespace(self):  # type: ignore[no-untyped-def]
        ns = Namespace()
        self.addCleanup(ns.delete)
        return lambda: _setnsTo(ns)

    def test_admin(self) -> None:
        """
        A process with CAP_NET_ADMIN may use every command.
        """
        report = self.child(self.inNewNamespace())
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"], dict(dict.fromkeys(COMMANDS, 0), GET=errno.ENOENT))

    def test_withoutNetAdmin(self) -> None:
        """
        Root without CAP_NET_ADMIN is refused every command.
        """
        report = self.child(self.inNewNamespace(), dropNetAdmin)
        self.assertFalse(report["netAdmin"])
        self.assertEqual(report["results"], dict.fromkeys(COMMANDS, errno.EPERM))

    def test_otherUserNamespace(self) -> None:
        """
        A process with every capability in a new user namespace has no say
        over a network namespace its user namespace does not own, and is
        refused every command there.
        """
        report = self.child(self.inNewNamespace(), lambda: unshare(CLONE_NEWUSER))
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"], dict.fromkeys(COMMANDS, errno.EPERM))

    def test_ownNetworkNamespace(self) -> None:
        """
        A process with every capability in a new user namespace may use
        every command in a network namespace that its user namespace owns,
        except those that enable recording there, which need the initial
        user namespace's CAP_NET_ADMIN.
        """
        report = self.child(lambda: unshare(CLONE_NEWUSER), lambda: unshare(CLONE_NEWNET))
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"], dict(dict.fromkeys(COMMANDS, 0), GET=errno.ENOENT,
                                                 SET_PORTS=errno.EPERM, ENABLE=errno.EPERM))

    def test_ownNetworkNamespaceAllowed(self) -> None:
        """
        With the module parameter userns, such a process may use every
        command in its own network namespace.
        """
        loadModule(userns=1)
        self.addCleanup(loadModule)
        report = self.child(lambda: unshare(CLONE_NEWUSER), lambda: unshare(CLONE_NEWNET))
        self.assertTrue(report["netAdmin"])
        self.assertEqual(report["results"], dict(dict.fromkeys(COMMANDS, 0), GET=errno.ENOENT))


TENANT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tenant.py")


class TenancyTests(GuestTestCase):
    """
    Network namespaces owned by other user namespaces than the initial
    one never take the initial namespaces' room.
    """

    def test_userNamespacesCannotCrowdHost(self) -> None:
        """
        Four unprivileged users' namespaces (made as uid 65534 with
        unshare, allowed to enable by the module parameter userns) fill
        their tables, and their shared room, with loopback connections;
        a namespace of the initial user namespace, whose room is exactly
        its own share, still records and answers every connection, with
        nothing evicted.
        """
        share = 8
        # Entries kept for an hour: in a slow guest (a debug kernel under
        # emulation) the four tenants take minutes, and the first ones'
        # entries expiring at the default 120 s would free the shared room.
        loadModule(userns=1, max_entries=share, max_entries_total=share,
                   max_entries_userns=share, max_entries_userns_total=2 * share, expiry_secs=3600)
        self.addCleanup(loadModule)
        # What the tenants' rules need, loaded here: a user namespace may
        # not load modules.  Debian's switch for unprivileged user
        # namespaces, where there is one, on.
        if subprocess.run(["modprobe", "-a", "nf_tables", "nft_chain_nat", "nft_redir"],
                          capture_output=True).returncode != 0:
            run("nft", "list", "tables")  # built in (the debug kernel): no module to load
        if os.path.exists("/proc/sys/kernel/unprivileged_userns_clone"):
            run("sysctl", "-q", "-w", "kernel.unprivileged_userns_clone=1")
        tenants, reports = [], []
        for _ in range(4):
            tenant = subprocess.Popen(
                [sys.executable, TENANT_SCRIPT, str(3 * share)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, PYTHONPATH=ROOT),
            )
            tenants.append(tenant)
            self.addCleanup(tenant.wait)
            self.addCleanup(tenant.stdin.close)
            line = tenant.stdout.readline()
            self.assertTrue(line, "a tenant ended without a report")
            report = json.loads(line)
            self.assertNotIn("error", report, report)
            reports.append(report)
        for report in reports:
            self.assertEqual(report["uid"], 65534, report)
            self.assertLessEqual(report["stats"]["entries"], share, report)
        self.assertEqual(sum(report["stats"]["entries"] for report in reports), 2 * share, reports)
        self.assertGreater(sum(report["stats"]["full"] for report in reports), 0, reports)

        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        kmod = self.client(ns)
        accepted = []
        for n in range(share):
            self.closing(connect(ns, socket.AF_INET, f"203.0.113.{n + 1}", 443))
            accepted.append(self.accept(server))
        for n, sock in enumerate(accepted):
            self.assertEqual(kmod.getAccepted(sock), (f"203.0.113.{n + 1}", 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["full"]), (share, 0), stats)
        self.assertEqual([stats[name] for name in EVICTED], [0] * len(EVICTED), stats)
        print(f"tenants: {[report['stats'] for report in reports]}")


MEMORY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.py")
CGROUP_ROOT = "/sys/fs/cgroup"


class MemoryTests(GuestTestCase):
    """
    What enabling the module costs a network namespace.
    """

    def memoryCgroup(self) -> str:
        """
        A memory cgroup of its own (cgroup2 mounted, and its memory
        controller enabled, where the guest had not).
        """
        if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
            run("mount", "-t", "cgroup2", "cgroup2", CGROUP_ROOT)
        with open(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
        path = os.path.join(CGROUP_ROOT, f"shifter-memory-{os.getpid()}")
        os.mkdir(path)
        self.addCleanup(os.rmdir, path)
        return path

    def test_enabledCostsLessThanBare(self) -> None:
        """
        Enabling the module in a network namespace (its table, empty, and
        its hooks) costs no more kernel memory than the bare namespace
        itself, counted both in the memory cgroup charged and in the whole
        machine.  The figures are printed, per namespace.
        """
        count = 64
        result = subprocess.run(
            [sys.executable, MEMORY_SCRIPT, self.memoryCgroup(), str(count)],
            capture_output=True, text=True, timeout=300 * SLOW,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        figures = {
            where: ((report["bare"][where] - report["before"][where]) / count,
                    (report["enabled"][where] - report["bare"][where]) / count)
            for where in ("cgroup", "machine")
        }
        print("memory per namespace: " + "; ".join(
            f"{where}: bare {bare / 1024:.1f} KiB, enabling {enabled / 1024:.1f} KiB"
            for where, (bare, enabled) in figures.items()) + f"; {report}")
        for bare, enabled in figures.values():
            self.assertGreater(bare, 0, report)
            self.assertLessEqual(enabled, bare, report)


TRACING = "/sys/kernel/tracing"
WORK_EVENT = os.path.join(TRACING, "events", "workqueue", "workqueue_execute_start", "enable")


def _traceWrite(name: str, text: str) -> None:
    with open(os.path.join(TRACING, name), "w") as f:
        f.write(text)


def countWork(seconds: float, function: str = "shifter_table_gc", during=None) -> int:
    """
    How many times a work item running C{function} starts in the next
    C{seconds} (after calling C{during}, if given), from the kernel's
    workqueue_execute_start trace events.
    """
    if not os.path.exists(os.path.join(TRACING, "trace")):
        run("mount", "-t", "tracefs", "tracefs", TRACING)
    _traceWrite("tracing_on", "0")
    _traceWrite("trace", "")
    with open(WORK_EVENT, "w") as f:
        f.write("1")
    try:
        _traceWrite("tracing_on", "1")
        if during is not None:
            during()
        time.sleep(seconds)
        _traceWrite("tracing_on", "0")
        trace = open(os.path.join(TRACING, "trace")).read()
    finally:
        with open(WORK_EVENT, "w") as f:
            f.write("0")
    return sum(1 for line in trace.splitlines() if f"function {function}" in line)


class IdleTests(GuestTestCase):
    """
    The module's work runs only when entries are due to be checked or to
    expire: an idle table, with entries or without, costs no work, and
    expiry runs in proportion to what expires, not to the table.  The
    counts are printed.
    """

    def test_idleWithEntriesAndWithout(self) -> None:
        """
        New entries are checked once, past their grace, by the work; then,
        while they wait for expiry, the work does not run at all; once the
        last entry expired, it never runs again.  Expiring runs it at most
        once per entry expired, never once a second.
        """
        expiry = int(15 * SLOW)
        loadModule(expiry_secs=expiry)
        self.addCleanup(loadModule)
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        kmod = self.client(ns)
        count = 20

        def openConnections() -> None:
            for n in range(count):
                self.closing(connect(ns, socket.AF_INET, f"203.0.113.{n + 1}", 443))
                self.accept(server)

        started = time.monotonic()
        checking = countWork(3.0, during=openConnections)
        self.assertGreaterEqual(checking, 1, "the work that checks new entries was not seen")
        self.assertEqual(kmod.stats()["entries"], count)
        idleFor = expiry - (time.monotonic() - started) - 3
        self.assertGreater(idleFor, 3, "too slow to watch the table idle before expiry")
        idle = countWork(idleFor)
        self.assertEqual(kmod.stats()["entries"], count)
        expiring = countWork(7.0)
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["expiries"]), (0, count), stats)
        empty = countWork(5.0)
        print(f"work runs: {checking} checking {count} new entries; {idle} in {idleFor:.1f} s idle "
              f"with {count} entries; {expiring} expiring them; {empty} in 5 s with none")
        self.assertEqual(idle, 0)
        self.assertGreaterEqual(expiring, 1)
        self.assertLessEqual(expiring, count)
        self.assertEqual(empty, 0)


class GrowthTests(GuestTestCase):
    """
    A namespace's table starts with few chains and grows as it fills.
    """

    def test_growsWhileAnswering(self) -> None:
        """
        700 connections, each looked up as soon as it is accepted (while
        the table grows under the look-ups) and then closed: every one is
        answered right, none is evicted or refused, and the table grew
        twice (64 chains to 256, at 129 entries, and to 1,024, at 513).
        """
        count = 700
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        kmod = self.client(ns)
        wrong = []

        def openConnections() -> None:
            for n in range(count):
                destination = f"203.0.113.{n % 250 + 1}"
                client = connect(ns, socket.AF_INET, destination, 443)
                accepted, _ = server.accept()
                answer = kmod.getAccepted(accepted)
                if answer != (destination, 443):
                    wrong.append((n, answer))
                client.close()
                accepted.close()

        grown = countWork(2.0, function="shifter_table_grow", during=openConnections)
        stats = kmod.stats()
        print(f"growth: {grown} runs of the growing work for {count} entries; {stats}")
        self.assertEqual(wrong, [])
        # Every connection was recorded: in the table still, or forgotten
        # with its conntrack entry (a closed connection's can end while
        # the loop runs, on a slow guest).
        self.assertEqual((stats["entries"] + stats["gone"], stats["hits"], stats["full"]), (count, count, 0), stats)
        self.assertEqual([stats[name] for name in EVICTED], [0] * len(EVICTED), stats)
        self.assertEqual(grown, 2)


def _setnsTo(ns: Namespace) -> None:
    with open(f"/run/netns/{ns.name}") as f:
        _check(_libc.setns(f.fileno(), CLONE_NEWNET))


class RecordedEntryTestCase(GuestTestCase):
    """
    A namespace with one live recorded connection, and a client of the
    family that must still find it after whatever the test sent.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(self.ns, socket.AF_INET))
        self.closing(connect(self.ns, socket.AF_INET, REMOTE_V4, 443))
        self.accepted = self.accept(server)
        self.peer = self.accepted.getpeername()
        self.kmod = self.client(self.ns)
        # A request that is right, to prove that the wrong ones are wrong.
        self.good = {
            A_FAMILY: nlattr(A_FAMILY, bytes([socket.AF_INET])),
            A_SRC_ADDR: nlattr(A_SRC_ADDR, socket.inet_aton(self.peer[0])),
            A_SRC_PORT: nlattr(A_SRC_PORT, struct.pack("=H", self.peer[1])),
            A_LOCAL_ADDR: nlattr(A_LOCAL_ADDR, socket.inet_aton("127.0.0.1")),
            A_LOCAL_PORT: nlattr(A_LOCAL_PORT, struct.pack("=H", LISTEN_PORT)),
        }
        reply = self.kmod.requestRaw(SHIFTER_CMD_GET, b"".join(self.good.values()))
        self.assertEqual(reply.get_attr("SHIFTER_A_DST_PORT"), 443)
        # Whatever the test sent, the family still answers on this socket
        # afterwards (cleanups run last first: this before the close).
        self.addCleanup(self.stillAnswers)

    def stillAnswers(self) -> None:
        self.assertEqual(self.kmod.getAccepted(self.accepted), (REMOTE_V4, 443))


def _payload(attr: dict) -> bytes:
    """
    A well-formed value for an attribute of the spec's type.
    """
    kind = attr["type"]
    if kind == "nest":
        return nlattr(A_PORTS_PORT, struct.pack("=H", 443)) if attr["name"] == "ports" else b""
    return {"u8": b"\2", "u16": struct.pack("=H", 443), "u32": struct.pack("=I", 1),
            "u64": struct.pack("=Q", 1), "binary": socket.inet_aton("127.0.0.1")}[kind]


class PolicyTests(RecordedEntryTestCase):
    """
    Every command refuses attributes that are not its own, as the YNL spec
    lists them: each of the family's other attributes, well formed, is
    refused with EINVAL and changes nothing.
    """

    def test_foreignAttributes(self) -> None:
        """
        Each command, given a request that is right for it plus one
        attribute its operation does not list, is refused with EINVAL and
        "Unsupported attribute"; the request alone is accepted.
        """
        spec = ynl.loadSpec()
        attributes = ynl.attributes(spec, "shifter")
        baseFor = {
            "SHIFTER_CMD_GET": b"".join(self.good.values()),
            "SHIFTER_CMD_SET_PORTS": nlattr(A_PORTS | 0x8000, _payload({"type": "nest", "name": "ports"})),
        }
        refused = 0
        for opName, (cmd, op) in ynl.operations(spec).items():
            if opName == "SHIFTER_CMD_DISABLE":
                continue  # its own request alone would drop the entry checked afterwards
            own = set(ynl.requestAttributes(spec, opName))
            base = baseFor.get(opName, b"")
            self.kmod.requestRaw(cmd, base)
            for name, (value, attr) in attributes.items():
                if name in own:
                    continue
                kind = value | (0x8000 if attr["type"] == "nest" else 0)
                error = self.assertNetlinkError(
                    errno.EINVAL, self.kmod.requestRaw, cmd, base + nlattr(kind, _payload(attr)))
                self.assertEqual(error.message, "Unsupported attribute", (opName, name))
                refused += 1
        self.assertGreater(refused, 30)
        self.kmod.enable([443], 0)

    def test_disableRefusesAttributes(self) -> None:
        """
        DISABLE, which takes no attribute, refuses each one and stays
        enabled.
        """
        spec = ynl.loadSpec()
        for name, (value, attr) in ynl.attributes(spec, "shifter").items():
            kind = value | (0x8000 if attr["type"] == "nest" else 0)
            self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, SHIFTER_CMD_DISABLE,
                                    nlattr(kind, _payload(attr)))
        self.assertTrue(self.kmod.config()[0])

    def test_unknownAttribute(self) -> None:
        """
        An attribute beyond the family's last is refused by every command.
        """
        for cmd in (SHIFTER_CMD_GET, SHIFTER_CMD_STATS, SHIFTER_CMD_DISABLE):
            self.assertNetlinkError(errno.EINVAL, self.kmod.requestRaw, cmd,
                                    nlattr(99, b"\0\0\0\0"))


class MalformedRequestTests(RecordedEntryTestCase):
    """
    Requests that the family's policies or commands refuse, each with an
    error and none with a crash.
    """

    def get(self, code: int, **replace: bytes) -> NetlinkError:
        attrs = dict(self.good)
        names = {"family": A_FAMILY, "addr": A_SRC_ADDR, "port": A_SRC_PORT,
                 "local": A_LOCAL_ADDR, "localPort": A_LOCAL_PORT}
        for name, value in replace.items():
            attrs[names[name]] = value
        return self.assertNetlinkError(code, self.kmod.requestRaw, SHIFTER_CMD_GET,
                                       b"".join(attrs.values()))

    def test_missingAttributes(self) -> None:
        """
        GET without any one of its five attributes is refused with EINVAL.
        """
        for name in ("family", "addr", "port", "local", "localPort"):
            self.get(errno.EINVAL, **{name: b""})

    def test_wrongAddressLength(self) -> None:
        """
        An address that is not as long as its family's is refused with
        EINVAL.
        """
        v6 = socket.inet_pton(socket.AF_INET6, LOCAL_V6)
        error = self.get(errno.EINVAL, addr=nlattr(A_SRC_ADDR, v6))
        self.assertEqual(error.message, "address length does not match the family")
        self.get(errno.EINVAL, local=nlattr(A_LOCAL_ADDR, v6))
        self.get(errno.EINVAL, family=nlattr(A_FAMILY, bytes([socket.AF_INET6])))
        for length in (0, 3, 5, 15, 17, 32):
            self.get(errno.EINVAL, addr=nlattr(A_SRC_ADDR, b"\1" * length))
            self.get(errno.EINVAL, local=nlattr(A_LOCAL_ADDR, b"\1" * length))

    def test_unknownFamily(self) -> None:
        """
        A family other than AF_INET and AF_INET6 is refused with EINVAL.
        """
        for family in (0, socket.AF_UNIX, socket.AF_PACKET, 255):
            self.get(errno.EINVAL, family=nlattr(A_FAMILY, bytes([family])))

    def test_portZero(self) -> None:
        """
        Port 0, as the client's or the local one, is refused by the policy
        with ERANGE.
        """
        self.get(errno.ERANGE, port=nlattr(A_SRC_PORT, struct.pack("=H", 0)))
        self.get(errno.ERANGE, localPort=nlattr(A_LOCAL_PORT, struct.pack("=H", 0)))

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

    def test_unknownCommand(self) -> None:
        """
        A command the family does not have is refused with EOPNOTSUPP.
        """
        for cmd in (0, SHIFTER_CMD_DISABLE + 1, 255):
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
        kind = rng.choice([rng.randrange(14), rng.randrange(1 << 14)])
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
        and the recorded connection is still found afterwards.  DISABLE is
        left out: it would rightly drop the entry checked afterwards.
        """
        rng = random.Random(0x5F1F7E5)
        answered = refused = 0
        for _ in range(2000):
            cmd = rng.choice([0, 1, 2, 3, 4, 5, 7, rng.randrange(256)])
            if cmd == SHIFTER_CMD_DISABLE:
                cmd = SHIFTER_CMD_DISABLE + 1
            seq = next(self.kmod.seq)
            self.kmod.sock.send(genlRequest(
                self.kmod.familyId, cmd, randomAttributes(rng), seq=seq,
                version=rng.choice([2, 2, 0, 1, 255]),
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

    def openConnections(self, ns: Namespace, server: socket.socket, count: int) -> list[socket.socket]:
        accepted = []
        for n in range(count):
            self.closing(connect(ns, socket.AF_INET, f"203.0.113.{n + 1}", 443))
            accepted.append(self.accept(server))
        return accepted

    def test_expiry(self) -> None:
        """
        A live connection's entry is found until expiry_secs have passed
        since its SYN, and then no longer, and is counted as expired.
        """
        expiry = int(3 * SLOW)
        self.reload(expiry_secs=expiry)
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        kmod = self.client(ns)
        sent = time.monotonic()
        (accepted,) = self.openConnections(ns, server, 1)
        self.assertEqual(kmod.getAccepted(accepted), ("203.0.113.1", 443))
        self.assertLess(time.monotonic() - sent, expiry - 0.1, "too slow to look before expiry")
        self.assertEqual(kmod.stats()["expiries"], 0)
        self.assertTrue(waitFor(lambda: kmod.stats()["expiries"] == 1, timeout=20 + expiry))
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, accepted)
        self.assertEqual(kmod.stats()["entries"], 0)

    def test_sizeBound(self) -> None:
        """
        A namespace holds at most max_entries entries; a new connection is
        never locked out: past that, with every connection live, assured
        and not yet answered, the oldest entry makes room (and is counted).
        """
        self.reload(max_entries=4)
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        accepted = self.openConnections(ns, server, 6)
        kmod = self.client(ns)
        for sock in accepted[:2]:
            self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, sock)
        for n, sock in enumerate(accepted[2:], 2):
            self.assertEqual(kmod.getAccepted(sock), (f"203.0.113.{n + 1}", 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["inserts"], stats["full"]), (4, 6, 0))
        self.assertEqual({name: stats[name] for name in EVICTED},
                         dict(dict.fromkeys(EVICTED, 0), evicted_oldest=2))

    def test_answeredEvictedFirst(self) -> None:
        """
        When a full namespace needs room, an entry already answered goes
        before an older one not answered yet: the redirector asks once per
        connection.
        """
        self.reload(max_entries=4)
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        accepted = self.openConnections(ns, server, 4)
        kmod = self.client(ns)
        self.assertEqual(kmod.getAccepted(accepted[2]), ("203.0.113.3", 443))
        self.closing(connect(ns, socket.AF_INET, "203.0.113.5", 443))
        accepted.append(self.accept(server))
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, accepted[2])
        for n in (0, 1, 3, 4):
            self.assertEqual(kmod.getAccepted(accepted[n]), (f"203.0.113.{n + 1}", 443))
        stats = kmod.stats()
        self.assertEqual({name: stats[name] for name in EVICTED},
                         dict(dict.fromkeys(EVICTED, 0), evicted_answered=1))

    def test_sizeBoundPerNamespace(self) -> None:
        """
        A full namespace makes room from its own entries, and does not stop
        another from recording.
        """
        self.reload(max_entries=2)
        busy = makeLocalClient(self, socket.AF_INET)
        quiet = makeLocalClient(self, socket.AF_INET)
        busyServer = self.closing(listen(busy, socket.AF_INET))
        quietServer = self.closing(listen(quiet, socket.AF_INET))
        busyAccepted = self.openConnections(busy, busyServer, 5)
        (accepted,) = self.openConnections(quiet, quietServer, 1)
        self.assertEqual(self.client(quiet).getAccepted(accepted), ("203.0.113.1", 443))
        busyModule = self.client(busy)
        self.assertEqual(busyModule.getAccepted(busyAccepted[4]), ("203.0.113.5", 443))
        stats = busyModule.stats()
        self.assertEqual((stats["entries"], stats["full"], stats["evicted_oldest"]), (2, 0, 3))

    def test_globalCap(self) -> None:
        """
        All namespaces together hold at most max_entries_total entries: a
        namespace makes room from its own entries, and one with none finds
        no room (counted as full), and takes none from the others.
        """
        self.reload(max_entries=100, max_entries_total=3)
        one = makeLocalClient(self, socket.AF_INET)
        other = makeLocalClient(self, socket.AF_INET)
        oneServer = self.closing(listen(one, socket.AF_INET))
        otherServer = self.closing(listen(other, socket.AF_INET))
        oneAccepted = self.openConnections(one, oneServer, 3)
        (otherAccepted,) = self.openConnections(other, otherServer, 1)
        kmod = self.client(other)
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, otherAccepted)
        self.assertEqual((kmod.stats()["entries"], kmod.stats()["full"]), (0, 1))
        oneModule = self.client(one)
        for n, sock in enumerate(oneAccepted):
            self.assertEqual(oneModule.getAccepted(sock), (f"203.0.113.{n + 1}", 443))
        self.closing(connect(one, socket.AF_INET, "203.0.113.4", 443))
        self.assertEqual(oneModule.getAccepted(self.accept(oneServer)), ("203.0.113.4", 443))
        stats = oneModule.stats()
        self.assertEqual((stats["entries"], stats["evicted_answered"], stats["full"]), (3, 1, 0))

    def test_spoofedSynFlood(self) -> None:
        """
        A flood of spoofed SYNs from unroutable sources, three times the
        namespace's room, fills the table with entries whose connections
        conntrack never assures; a real connection after it is still
        recorded and answered, the flood's entries evicted to make room.
        """
        room = 64
        self.reload(max_entries=room)
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        gateway.exec("sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.gw0.rp_filter=0")
        server = self.closing(listen(gateway, socket.AF_INET))
        kmod = self.client(gateway)
        flood = 3 * room
        with clientNs.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            for n in range(flood):
                source = f"198.18.{n // 250}.{n % 250 + 1}"
                packet = ipv4Packet(source, REMOTE_V4,
                                    tcpHeader(socket.AF_INET, source, REMOTE_V4, 40000, 443, TCP_SYN))
                raw.sendto(packet, (REMOTE_V4, 0))
        self.assertTrue(waitFor(lambda: kmod.stats()["inserts"] >= flood, timeout=20 * SLOW),
                        f"the flood was not recorded: {kmod.stats()}")
        self.closing(connect(clientNs, socket.AF_INET, REMOTE_V4, 443))
        accepted = self.accept(server)
        self.assertEqual(kmod.getAccepted(accepted), (REMOTE_V4, 443))
        stats = kmod.stats()
        self.assertEqual((stats["entries"], stats["full"]), (room, 0), stats)
        self.assertGreaterEqual(stats["evicted_early"], flood - room + 1, stats)
        print(f"spoofed SYN flood: {stats}")

    def test_connectAndCloseChurn(self) -> None:
        """
        One client opening and closing connections as fast as it can
        (550 a second at most) for a few seconds, far more than the
        namespace's room: their closing connections' entries make room, and
        a real connection after it is answered.  The rate reached is
        printed.
        """
        room = 64
        self.reload(max_entries=room)
        clientNs, gateway = makeGateway(self, socket.AF_INET)
        server = self.closing(listen(gateway, socket.AF_INET))
        server.listen(128)
        kmod = self.client(gateway)
        # A few seconds, and on a slow guest (the debug kernel) as long as
        # it takes to open several times the room, within a bound.
        seconds, rate = 5.0, 550
        started = time.monotonic()
        opened = 0
        while (time.monotonic() - started < seconds
               or (opened <= 3 * room and time.monotonic() - started < seconds * SLOW * 4)):
            if opened >= rate * (time.monotonic() - started):
                time.sleep(0.001)
                continue
            client = connect(clientNs, socket.AF_INET, f"203.0.113.{opened % 250 + 1}", 443)
            accepted, _ = server.accept()
            client.close()
            accepted.close()
            opened += 1
        elapsed = time.monotonic() - started
        self.assertGreater(opened, 3 * room, f"only {opened} connections in {elapsed:.1f} s")
        self.closing(connect(clientNs, socket.AF_INET, REMOTE_V4, 443))
        self.assertEqual(kmod.getAccepted(self.accept(server)), (REMOTE_V4, 443))
        stats = kmod.stats()
        self.assertEqual(stats["full"], 0, stats)
        self.assertGreater(stats["evicted_early"], 0, stats)
        print(f"connect-and-close: {opened} connections in {elapsed:.1f} s "
              f"({opened / elapsed:.0f}/s); {stats}")

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
        for bad in ("max_entries=0", "max_entries_total=0", "expiry_secs=0", "ports=443,0"):
            result = subprocess.run(["insmod", modulePath(), bad],
                                    capture_output=True, text=True)
            self.assertNotEqual(result.returncode, 0, bad)
            self.assertFalse(moduleLoaded(), bad)

    def test_unloadWithLiveEntries(self) -> None:
        """
        The module unloads while namespaces record and hold entries and
        connections are open; loaded again, it starts with those namespaces
        disabled and empty, and records again once enabled.
        """
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        (accepted,) = self.openConnections(ns, server, 1)
        kmod = self.client(ns)
        self.assertEqual(kmod.getAccepted(accepted), ("203.0.113.1", 443))
        kmod.close()

        loadModule()

        kmod = self.client(ns)
        self.assertEqual(kmod.stats(), dict.fromkeys(STATS, 0))
        self.assertEqual(kmod.config(), (False, 0, [443]))
        self.assertNetlinkError(errno.ENOENT, kmod.getAccepted, accepted)
        kmod.enable()
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        self.assertEqual(kmod.getAccepted(self.accept(server)), (REMOTE_V4, 443))


CHURN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "churn.py")


class ChurnTests(GuestTestCase):
    """
    Namespaces created, enabled, loaded with SYNs and look-ups, and
    destroyed while the load runs, several at a time: nothing is left
    behind (guest-run.sh then unloads the module and checks the kernel
    log, and in the debug kernel kmemleak).
    """

    timeout = 1800 * SLOW

    def test_churn(self) -> None:
        """
        For C{SHIFTER_CHURN_SECONDS} (default 20), and for six namespaces at
        least, namespaces come and go under SYN load and look-ups; each
        look-up of a live connection is answered right, the churn ends with
        no error, and a fresh namespace records afterwards.
        """
        seconds = float(os.environ.get("SHIFTER_CHURN_SECONDS", "20"))
        result = subprocess.run(
            [sys.executable, CHURN_SCRIPT, "--seconds", str(seconds), "--parallel", "3"],
            capture_output=True, text=True, timeout=seconds + 600 * SLOW,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        print(result.stdout.strip())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertGreaterEqual(report["namespaces"], 6, report)
        self.assertGreater(report["syns"], 0, report)
        self.assertGreater(report["hits"], 0, report)
        self.assertEqual(report["wrong"], 0, report)
        ns = makeLocalClient(self, socket.AF_INET)
        server = self.closing(listen(ns, socket.AF_INET))
        self.closing(connect(ns, socket.AF_INET, REMOTE_V4, 443))
        self.assertEqual(self.client(ns).getAccepted(self.accept(server)), (REMOTE_V4, 443))
