"""
Tests for L{shifter.kernel.localaddresses}: the netlink address dump, on canned
bytes and against this machine's kernel.
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.kernel.localaddresses import (
    IFA_ADDRESS,
    IFA_LOCAL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_GETADDR,
    RTM_NEWADDR,
    NetlinkDumpError,
    dumpRequest,
    parseDump,
    readLocalAddresses,
)


def attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(kind: int, body: bytes, sequence: int = 7) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, sequence, 0) + body


def address(family: int, *attributes: bytes) -> bytes:
    return message(RTM_NEWADDR, struct.pack("=BBBBI", family, 24, 0, 0, 2) + b"".join(attributes))


class ParseTests(SynchronousTestCase):
    def test_request(self) -> None:
        """
        The request is an RTM_GETADDR dump of every family.
        """
        data = dumpRequest(7)
        length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", data)
        self.assertEqual((length, kind, flags & 0x301, sequence), (len(data), RTM_GETADDR, 0x301, 7))
        self.assertEqual(data[16], socket.AF_UNSPEC)

    def test_addresses(self) -> None:
        """
        IPv4 and IPv6 addresses are read; where a message has both, the
        local address wins over the peer's (point-to-point links).
        """
        data = (
            address(socket.AF_INET, attribute(IFA_ADDRESS, bytes([10, 0, 0, 9])), attribute(IFA_LOCAL, bytes([10, 0, 0, 1])))
            + address(socket.AF_INET6, attribute(IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "2001:db8::5")))
            + address(socket.AF_INET, attribute(8, b"eth0\0"), attribute(IFA_LOCAL, bytes([192, 0, 2, 1])))
        )
        found, ended = parseDump(data, 7)
        self.assertEqual(found, {"10.0.0.1", "2001:db8::5", "192.0.2.1"})
        self.assertFalse(ended)
        self.assertEqual(parseDump(message(NLMSG_DONE, b"\0" * 4), 7), (set(), True))

    def test_otherSequenceIgnored(self) -> None:
        """
        Messages of another request are not this dump's.
        """
        data = message(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 8, 0, 0, 1)
                       + attribute(IFA_LOCAL, bytes([1, 2, 3, 4])), sequence=8)
        self.assertEqual(parseDump(data, 7), (set(), False))

    def test_error(self) -> None:
        """
        An error answer fails with the kernel's reason.
        """
        data = message(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16)
        error = self.assertRaises(NetlinkDumpError, parseDump, data, 7)
        self.assertIn("not permitted", str(error))

    def test_cutShort(self) -> None:
        """
        A message longer than the datagram is refused, not read past.
        """
        data = address(socket.AF_INET, attribute(IFA_LOCAL, bytes([1, 2, 3, 4])))
        self.assertRaises(NetlinkDumpError, parseDump, data[:-3], 7)

    def test_badAttributeStops(self) -> None:
        """
        An attribute whose length runs past its message ends the reading
        of that message without an error or a wrong address.
        """
        broken = struct.pack("=HH", 200, IFA_LOCAL) + bytes([1, 2, 3, 4])
        data = address(socket.AF_INET, broken)
        self.assertEqual(parseDump(data, 7), (set(), False))


class KernelTests(TestCase):
    def test_thisMachine(self) -> Deferred:
        """
        The kernel's own answer, read in the reactor without any netlink
        library: the loopback address is among this machine's.
        """

        def check(addresses: frozenset[str]) -> None:
            self.assertIn("127.0.0.1", addresses)

        return readLocalAddresses(reactor).addCallback(check)

    def test_noNetlinkLibrary(self) -> None:
        """
        A Shifter with the default resolver, its destinations checked with
        this machine's addresses, loads no netlink library (pyroute2 alone
        costs about 10 MB of memory).
        """
        code = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from shifter.service.tap import Options, makeService\n"
            "config = Options(); config.parseOptions(['--proxy', '127.0.0.1:3128', '--listen', 'tcp:0'])\n"
            "makeService(config, reactor=reactor)\n"
            "from shifter.kernel.localaddresses import readLocalAddresses\n"
            "readLocalAddresses(reactor)\n"
            "print('pyroute2' in sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)
