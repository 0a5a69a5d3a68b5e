"""
Tests for the control socket (L{shifter.service.control}) and its client
(L{shifter.admin.ctl}): the protocol in memory, then a real UNIX socket in the
reactor, used by C{python -m shifter.ctl} and refused to another user
(a forked child that changes its uid).
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import stat
import sys
from pathlib import Path

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shifter.admin import ctl
from shifter.service.control import ControlFactory, ControlService, controlPath
from shifter.resolvers.resolver import IOriginalDestinationResolver
from shifter.service.service import ShifterService
from shifter.service.tap import Options, makeService
from tests.support import requireHost, socketDirectory

PROJECT = Path(__file__).resolve().parent.parent
NOBODY = 65534


@implementer(IOriginalDestinationResolver)
class SilentResolver:
    """
    A resolver that never answers: connections stay in C{resolving}.
    """

    name = "silent"

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def resolve(self, transport: object) -> Deferred:
        return Deferred()


def shifterService(clock, *arguments: str) -> ShifterService:  # type: ignore[no-untyped-def]
    options = Options()
    options.parseOptions(["--proxy", "127.0.0.1:3128", "--proxy", "127.0.0.1:3129", *arguments])
    service: ShifterService = makeService(options, clock).getServiceNamed("shifter")  # type: ignore[attr-defined]
    service.factory.resolver = SilentResolver()
    return service


def connectClient(service: ShifterService, port: int) -> None:
    from twisted.internet.address import IPv4Address

    peer = IPv4Address("TCP", "192.0.2.2", port)
    protocol = service.factory.buildProtocol(peer)
    protocol.makeConnection(StringTransport(hostAddress=IPv4Address("TCP", "192.0.2.1", 12345), peerAddress=peer))


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.service = shifterService(self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def talk(self, *requests: bytes, uid: int | None = None) -> list[dict]:
        factory = ControlFactory(self.service, peerUid=lambda transport: os.geteuid() if uid is None else uid)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for request in requests:
            protocol.dataReceived(request)
        self.transport = transport
        return [json.loads(line) for line in transport.value().splitlines()]

    def test_tunnels(self) -> None:
        """
        C{tunnels} lists every connection not yet finished, oldest first,
        with the tunnel's fields.
        """
        connectClient(self.service, 50001)
        self.clock.advance(3)
        connectClient(self.service, 50002)
        [answer] = self.talk(b'{"command": "tunnels"}\n')
        self.assertTrue(answer["ok"])
        self.assertEqual([t["client"] for t in answer["tunnels"]], ["192.0.2.2:50001", "192.0.2.2:50002"])
        first = answer["tunnels"][0]
        self.assertEqual(
            set(first),
            {"tunnelId", "client", "destination", "connectTarget", "proxy", "state", "bytesUp", "bytesDown", "age",
             "ech", "decision"},
        )
        self.assertRegex(first["tunnelId"], "^[a-z2-7]{8}-[a-z2-7]+$")
        self.assertNotEqual(first["tunnelId"], answer["tunnels"][1]["tunnelId"])
        self.assertEqual(first["state"], "resolving")
        self.assertEqual(first["age"], 3.0)
        self.assertEqual(first["ech"], "")

    def test_tunnelsECHCounts(self) -> None:
        """
        C{tunnels} also gives the connections read since start by what
        they showed of ECH.
        """
        self.service.factory.stats.ech.update({"none": 3, "ech": 2, "grease": 1})
        [answer] = self.talk(b'{"command": "tunnels"}\n')
        self.assertEqual(answer["ech"], {"none": 3, "ech": 2, "grease": 1})

    def test_proxies(self) -> None:
        """
        C{proxies} gives each proxy's state, failures in a row, last error
        and groups.
        """
        pool = self.service.factory.pool
        pool.failed(pool.proxies[1], "cannot connect to proxy: refused")
        [answer] = self.talk(b'{"command": "proxies"}\n')
        self.assertEqual(answer["proxies"], [
            {"proxy": "127.0.0.1:3128", "up": True, "state": "up", "failures": 0, "lastError": "",
             "groups": ["default"], "scheme": "none"},
            {"proxy": "127.0.0.1:3129", "up": True, "state": "up", "failures": 1,
             "lastError": "cannot connect to proxy: refused", "groups": ["default"], "scheme": "none"},
        ])

    def test_reloadWithoutFile(self) -> None:
        """
        C{reload} without a configuration file says so.
        """
        [answer] = self.talk(b'{"command": "reload"}\n')
        self.assertEqual(answer, {"ok": False, "error": "no --config file to reload"})

    def test_reload(self) -> None:
        """
        C{reload} reloads the file and answers what changed.
        """
        path = Path(self.mktemp())
        path.write_text("proxy = ['127.0.0.1:3128']\n")
        service = shifterService(self.clock, "--config", str(path))
        self.service = service
        path.write_text("proxy = ['127.0.0.1:3128']\nidle-timeout = 7\n")
        [answer] = self.talk(b'{"command": "reload"}\n')
        self.assertEqual(answer, {"ok": True, "changes": "changed: idle-timeout"})
        self.assertEqual(service.factory.settings.idleTimeout, 7.0)

    def test_drain(self) -> None:
        """
        C{drain} starts what SIGTERM does (the reactor stops, and stopping
        the service drains) and answers how many connections are open.
        """
        connectClient(self.service, 50001)
        [answer] = self.talk(b'{"command": "drain"}\n')
        self.assertEqual(answer, {"ok": True, "open": 1, "timeout": 30.0})
        self.assertFalse(self.clock.running)
        self.clock.running = True
        self.clock.advance(0)
        self.assertFalse(self.clock.running)

    def test_explain(self) -> None:
        """
        C{explain} without a PAC script: the default proxies in order with
        their health, and the CONNECT target; a destination Shifter refuses
        says so; bad fields are an error, not a traceback.
        """
        from tests.support import knowLocalAddresses

        knowLocalAddresses(self.service.factory)
        [answer] = self.talk(b'{"command": "explain", "client": "192.0.2.2", "destination": "203.0.113.7", '
                             b'"port": 443, "name": null}\n')
        self.assertTrue(answer["ok"], answer)
        explained = answer["explain"]
        self.assertEqual([p["proxy"] for p in explained["proxies"]], ["127.0.0.1:3128", "127.0.0.1:3129"])
        self.assertEqual(explained["proxies"][0]["state"], "up")
        self.assertEqual(explained["connectTarget"], "203.0.113.7:443")
        self.assertIsNone(explained["refused"])
        [refused] = self.talk(b'{"command": "explain", "client": "192.0.2.2", "destination": "127.0.0.1", '
                              b'"port": 443}\n')
        self.assertIn("loopback", refused["explain"]["refused"])
        for bad in (b'{"command": "explain"}\n', b'{"command": "explain", "client": "x", "destination": "y", "port": 1}\n',
                    b'{"command": "explain", "client": "192.0.2.2", "destination": "203.0.113.7", "port": 0}\n'):
            [error] = self.talk(bad)
            self.assertFalse(error["ok"])
            self.assertIsInstance(error["error"], str)

    def test_explainDirectAtSyn(self) -> None:
        """
        With --hold-syn, C{explain} asked with no name says that a rule's
        DIRECT is given at the SYN, and C{ctl} words it; asked with a name,
        or with --direct-mark 0, it is not.
        """
        from tests.support import knowLocalAddresses

        path = Path(self.mktemp())
        path.write_text("proxy = ['127.0.0.1:3128']\n[[rule]]\ndestination = '203.0.113.0/24'\ndirect = true\n")
        request = (b'{"command": "explain", "client": "192.0.2.2", "destination": "203.0.113.7", '
                   b'"port": 443, "name": null}\n')
        for options, expected in ((("--direct-mark", "0x40000"), True), (("--direct-mark", "0"), False)):
            self.service = shifterService(self.clock, "--config", str(path), "--resolver", "nfqueue",
                                          "--hold-syn", *options)
            knowLocalAddresses(self.service.factory)
            [answer] = self.talk(request)
            self.assertIs(answer["explain"]["directAtSyn"], expected, answer)
            if expected:
                self.assertIn("connect:    DIRECT at the SYN (not through Shifter): forwarded to 203.0.113.7:443",
                              ctl.formatExplain(answer["explain"]))
                [named] = self.talk(request.replace(b'"name": null', b'"name": "www.example.test"'))
                self.assertIs(named["explain"]["directAtSyn"], False)
                self.assertIn("connect:    directly to", ctl.formatExplain(named["explain"]))

    def test_explainDirectAtSynNfqueue(self) -> None:
        """
        With --resolver nfqueue alone, C{explain} says that a rule's DIRECT
        by address is given at the SYN, and C{ctl} words it; with a rule by
        name before it and --connect-target sni it is not (the name read
        could decide otherwise), nor with --direct-mark 0.
        """
        from tests.support import knowLocalAddresses

        direct = "[[rule]]\ndestination = '203.0.113.0/24'\ndirect = true\n"
        byName = "[[rule]]\nname = 'example.test'\nrefuse = 'no'\n"
        request = (b'{"command": "explain", "client": "192.0.2.2", "destination": "203.0.113.7", '
                   b'"port": 443, "name": null}\n')
        for rules, options, expected in (
            (direct, (), True),
            (direct, ("--direct-mark", "0"), False),
            (byName + direct, ("--connect-target", "sni"), False),
            (direct + byName, ("--connect-target", "sni"), True),
        ):
            path = Path(self.mktemp())
            path.write_text("proxy = ['127.0.0.1:3128']\n" + rules)
            self.service = shifterService(self.clock, "--config", str(path), "--resolver", "nfqueue", *options)
            knowLocalAddresses(self.service.factory)
            [answer] = self.talk(request)
            self.assertIs(answer["explain"]["directAtSyn"], expected, (rules, options, answer))
            if expected:
                self.assertIn("connect:    DIRECT at the SYN (not through Shifter): forwarded to 203.0.113.7:443",
                              ctl.formatExplain(answer["explain"]))

    def test_badRequests(self) -> None:
        """
        Unknown commands and requests that are not JSON objects are
        answered with the reason; the connection stays usable.
        """
        answers = self.talk(b"nonsense\n", b'{"command": "reboot"}\n', b'["tunnels"]\n', b'{"command": "proxies"}\n')
        self.assertEqual([a["ok"] for a in answers], [False, False, False, True])
        self.assertIn("unknown command 'reboot'", answers[1]["error"])

    def test_tooLong(self) -> None:
        """
        A request line past the limit is refused and the connection closed.
        """
        [answer] = self.talk(b"x" * 5000)
        self.assertFalse(answer["ok"])
        self.assertTrue(self.transport.disconnecting)

    def test_otherUserRefused(self) -> None:
        """
        A peer that is neither Shifter's user nor root is closed without an
        answer, with one log line.
        """
        answers = self.talk(b'{"command": "tunnels"}\n', uid=os.geteuid() + 4242)
        self.assertEqual(answers, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(
            f"control socket: refused a connection from uid {os.geteuid() + 4242}",
            [formatEvent(e) for e in self.events][-1],
        )

    def test_controlPath(self) -> None:
        self.assertEqual(controlPath("unix:/run/shifter/control"), "/run/shifter/control")
        for bad in ["tcp:1234", "unix:", "/run/shifter/control"]:
            self.assertRaises(ValueError, controlPath, bad)

    def test_controlPathLength(self) -> None:
        """
        A path a UNIX socket cannot be bound to (more than 107 bytes, a
        worker's suffix included) is refused with its length.
        """
        longest = "/" + "c" * 106
        self.assertEqual(controlPath(f"unix:{longest}"), longest)
        error = self.assertRaises(ValueError, controlPath, f"unix:{longest}x")
        self.assertEqual(str(error), f"{longest}x is 108 bytes long; a UNIX socket's path holds at most 107")
        self.assertRaises(ValueError, controlPath, f"unix:{longest[:-1]}", ".1")

    def test_optionsRefuseLongPath(self) -> None:
        """
        C{--control} with a path too long to bind is a usage error, before
        anything starts; with C{--workers}, the longest worker's path counts.
        """
        options = Options()
        error = self.assertRaises(
            UsageError, options.parseOptions, ["--proxy", "127.0.0.1:3128", "--control", "unix:/" + "c" * 107]
        )
        self.assertIn("--control: /" + "c" * 107 + " is 108 bytes long", str(error))
        workers = ["--proxy", "127.0.0.1:3128", "--control", "unix:/" + "c" * 104, "--workers", "11"]
        error = self.assertRaises(UsageError, Options().parseOptions, workers)
        self.assertIn(".10 is 108 bytes long", str(error))


class FormatTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(
            [ctl.formatSize(n) for n in (0, 1023, 1536, 12 * 1024 * 1024, 3 * 1024**3)],
            ["0 B", "1023 B", "1.5 KiB", "12.0 MiB", "3.0 GiB"],
        )

    def test_ages(self) -> None:
        self.assertEqual([ctl.formatAge(s) for s in (4.24, 303, 7800)], ["4.2s", "5m03s", "2h10m"])

    def test_tunnelTable(self) -> None:
        """
        The table has a header, a row per tunnel in aligned columns, and a
        count.
        """
        text = ctl.formatTunnels([
            {"client": "192.0.2.2:41522", "destination": "203.0.113.7:443", "connectTarget": "www.example.test:443",
             "proxy": "127.0.0.1:3128", "state": "relaying", "bytesUp": 1200, "bytesDown": 12 * 1024 * 1024, "age": 3.25,
             "tunnelId": "k7q2mx4d-1b"},
            {"client": "[2001:db8:1::2]:41600", "destination": "(unknown)", "connectTarget": "",
             "proxy": "", "state": "resolving", "bytesUp": 0, "bytesDown": 0, "age": 0.01},
        ])
        lines = text.splitlines()
        self.assertEqual(lines[0].split(),
                         ["CLIENT", "DESTINATION", "CONNECT", "PROXY", "STATE", "UP", "DOWN", "AGE", "ECH", "ID"])
        self.assertEqual(lines[1].split(), ["192.0.2.2:41522", "203.0.113.7:443", "www.example.test:443",
                                            "127.0.0.1:3128", "relaying", "1.2", "KiB", "12.0", "MiB", "3.2s", "-",
                                            "k7q2mx4d-1b"])
        self.assertEqual(lines[0].index("STATE"), lines[2].index("resolving"))
        self.assertEqual(lines[-1], "2 connections")

    def test_tunnelTableDecision(self) -> None:
        """
        Where a policy named what decided (a rule, a PAC answer), the table
        says so in a last column.
        """
        text = ctl.formatTunnels([
            {"client": "192.0.2.2:41522", "destination": "203.0.113.7:443", "connectTarget": "203.0.113.7:443",
             "proxy": "127.0.0.1:3128", "state": "relaying", "bytesUp": 0, "bytesDown": 0, "age": 1.0,
             "decision": "PAC: PROXY 127.0.0.1:3128"},
            {"client": "192.0.2.2:41523", "destination": "203.0.113.7:443", "connectTarget": "203.0.113.7:443",
             "proxy": "127.0.0.1:3128", "state": "relaying", "bytesUp": 0, "bytesDown": 0, "age": 1.0,
             "decision": ""},
        ])
        lines = text.splitlines()
        self.assertTrue(lines[0].endswith("DECIDED BY"))
        self.assertTrue(lines[1].endswith("PAC: PROXY 127.0.0.1:3128"))
        self.assertTrue(lines[2].endswith("-"))

    def test_tunnelTableECH(self) -> None:
        """
        A tunnel whose ClientHello offered ECH says so in the ECH column.
        """
        text = ctl.formatTunnels([
            {"client": "192.0.2.2:41522", "destination": "203.0.113.7:443", "connectTarget": "cover.example.test:443",
             "proxy": "127.0.0.1:3128", "state": "relaying", "bytesUp": 0, "bytesDown": 0, "age": 1.0, "ech": "ech"},
        ])
        lines = text.splitlines()
        self.assertEqual(lines[1].split()[-2:], ["ech", "-"])
        self.assertEqual(lines[0].index("ECH"), lines[1].rindex("ech"))

    def test_doctorECHUnreachable(self) -> None:
        """
        Doctor says, as a warning, when the control socket cannot be asked
        for the share of ECH; with workers it asks each worker's socket.
        """
        from shifter.admin.doctor import echShare

        missing = str(Path(self.mktemp()).absolute())
        share, finding = echShare(f"unix:{missing}", 1, 1.0)
        self.assertIsNone(share)
        self.assertEqual(str(finding), f"warning: ech: cannot reach Shifter at {missing}: "
                         "No such file or directory: the share of ECH is not known")
        share, finding = echShare(f"unix:{missing}", 3, 1.0)
        self.assertIn(f"{missing}.0:", str(finding))

    def test_echShare(self) -> None:
        """
        The share of ECH since start counts the outer and inner types among
        every connection read, and names GREASE and unread hellos apart.
        """
        self.assertEqual(
            ctl.formatECHShare({"none": 6, "ech": 3, "inner": 1, "grease": 2, "unknown": 0}),
            "ECH since start: 4 of 12 connections read (33.3 %); 2 grease",
        )
        self.assertEqual(ctl.formatECHShare({}), "ECH: no client's first bytes read since start")


def childExit(pid: int, timeout: float = 20.0) -> Deferred[int]:
    """
    Wait, without blocking the reactor, for child C{pid}; fire with its
    exit status.
    """
    done: Deferred[int] = Deferred()
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]

    def poll() -> None:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            done.callback(os.waitstatus_to_exitcode(status))
        elif reactor.seconds() > deadline:  # type: ignore[attr-defined]
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            done.errback(AssertionError(f"child {pid} still running after {timeout:g} s"))
        else:
            reactor.callLater(0.02, poll)  # type: ignore[attr-defined]

    poll()
    return done


def asUser(uid: int, attempt) -> Deferred[int]:  # type: ignore[no-untyped-def]
    """
    Fork; the child becomes C{uid} and exits with C{attempt()}'s status,
    touching nothing of the reactor.
    """
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = attempt()
        finally:
            os._exit(code)
    return childExit(pid)


class SocketTests(TestCase):
    """
    The control socket for real, in this reactor.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.path = str(socketDirectory(self) / "control")
        # The tunnels' own clock is a fake one: only the socket is real.
        self.service = shifterService(MemoryReactorClock())
        self.control = ControlService(f"unix:{self.path}", self.service, reactor)
        self.control.startService()
        self.addCleanup(self.control.stopService)

    def test_ownerOnly(self) -> None:
        """
        The socket is created owner-only (0600).
        """
        mode = os.stat(self.path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    async def test_ctl(self) -> None:
        """
        C{python -m shifter.ctl} (as its own process, Shifter's user) gets
        the tunnels table and the proxies from the socket.
        """
        connectClient(self.service, 50001)
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "shifter.ctl", "--control", f"unix:{self.path}", "tunnels"], env=env
        )
        self.assertEqual((code, err), (0, b""))
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split()[:2], ["CLIENT", "DESTINATION"])
        self.assertEqual(lines[1].split()[:2], ["192.0.2.2:50001", "(unknown)"])
        # No ECH line until some client's first bytes were read.
        self.assertEqual(lines[-1], "1 connection")
        self.service.factory.stats.ech.update({"none": 3, "ech": 1})
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "shifter.ctl", "--control", f"unix:{self.path}", "tunnels"], env=env
        )
        self.assertEqual(out.decode().splitlines()[-1], "ECH since start: 1 of 4 connections read (25.0 %)")
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "shifter.ctl", "--control", f"unix:{self.path}", "proxies", "--json"], env=env
        )
        self.assertEqual(code, 0)
        self.assertEqual([p["proxy"] for p in json.loads(out)["proxies"]], ["127.0.0.1:3128", "127.0.0.1:3129"])

    async def test_doctorECHShare(self) -> None:
        """
        Doctor, given the control socket, reports the share of ECH since
        start that the running Shifter counted.
        """
        self.service.factory.stats.ech.update({"none": 6, "ech": 2})
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        script = (
            "import sys; from shifter.admin.doctor import echShare; "
            "print(echShare(sys.argv[1], 1, 10.0))"
        )
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", script, f"unix:{self.path}"], env=env
        )
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out.decode().strip(), "('ECH since start: 2 of 8 connections read (25.0 %)', None)")

    async def test_otherUserCannotConnect(self) -> None:
        """
        Another user (a forked child that became nobody) cannot even
        connect: the socket's mode refuses it.
        """
        requireHost(root=True)

        def attempt() -> int:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(self.path)
            except PermissionError:
                return 0
            except OSError:
                return 2
            return 1

        self.assertEqual(await asUser(NOBODY, attempt), 0)

    async def test_otherUserRefusedEvenIfOpened(self) -> None:
        """
        Should the socket's mode be opened up, another user's connection
        is still closed without an answer (peer credentials), with a log
        line naming its uid.
        """
        requireHost(root=True)
        os.chmod(self.path, 0o666)

        def attempt() -> int:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(10)
            try:
                connection.connect(self.path)
                connection.sendall(b'{"command": "tunnels"}\n')
                return 0 if connection.recv(100) == b"" else 1
            except OSError as e:
                # Closed before the request was written (EPIPE) or read
                # (ECONNRESET): closed without an answer all the same.
                return 0 if e.errno in (errno.ECONNRESET, errno.EPIPE) else 2

        self.assertEqual(await asUser(NOBODY, attempt), 0)
        self.assertTrue(any(
            formatEvent(e).startswith(f"control socket: refused a connection from uid {NOBODY}:")
            for e in self.events
        ))

    def test_ctlWithoutShifter(self) -> None:
        """
        With nothing listening, ctl says so and exits 2.
        """
        err = io.StringIO()
        self.assertEqual(ctl.main(["--control", f"unix:{self.path}-none", "tunnels"], err=err), 2)
        self.assertIn("cannot reach Shifter", err.getvalue())
