"""
C{--resolver=kmod} through the real Shifter kernel module, in a booted
kernel.

These tests run inside the guest that C{tests.test_kernel} boots (Debian's
kernel under qemu, the module loaded, C{SHIFTER_GUEST=1}, as root); on any
other machine they skip.  Each test builds network namespaces of its own,
with real REDIRECT rules, so that the module sees real SYNs:

  - L{ResolverTests}: a client in the test's namespace connects to a
    documentation address, nat OUTPUT redirects it to a listener in the
    same process, and L{KernelModuleResolver} finds the original
    destination (IPv4, IPv6, and IPv4 on a dual-stack listener); then the
    same through nat PREROUTING from a client namespace over veth.
  - L{LookupRateTests}: the look-up rate through L{NetlinkProtocol} with
    many requests in flight, and C{sockopt}'s on the same connections in
    the same guest, printed, never asserted.
  - L{TwistdTests}: a real C{twistd shifter --resolver=kmod} relaying a
    real HTTPS connection through a real Squid, on a gateway set up by the
    script C{python -m shifter.rules --resolver kmod} prints, run as
    printed.

The test process enters a namespace with setns(2) only around the calls
that make sockets: a socket stays in the namespace it was made in, so one
reactor serves sockets in several namespaces.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import TestCase

from shifter.resolvers.kmod import AcceptedConnection, KernelModuleResolver, ShifterClient
from shifter.resolvers.resolver import DestinationUnknown
from shifter.resolvers.sockopt import SocketOptionResolver
from tests.guest import support
from tests.gateway import (
    PROJECT,
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    SQUID_PORT,
    Gateway,
    Namespace,
    QuickWebServer,
    ShifterProcess,
    Squid,
    waitFor,
)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# Documentation addresses the clients "mean" to reach; only the REDIRECT
# rules ever answer for them.
TARGET_V4 = "203.0.113.7"
TARGET_V6 = "2001:db8:7::7"


def requireGuest() -> None:
    """
    Skip unless running in the booted test kernel; there, make sure the
    module is loaded with its default table size and expiry (another guest
    test may have left it loaded with shortened ones).
    """
    support.requireGuest()
    if not support.moduleLoaded():
        support.loadModule()
        return
    parameters = support.moduleParameters()
    if (
        int(parameters.get("max_entries", 0)) < 4096
        or int(parameters.get("expiry_secs", 0)) < 60
        or parameters.get("ports") != "443"
    ):
        support.loadModule()


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def inNamespace(namespace: Namespace, call: Callable[[], T]) -> T:
    """
    Run C{call} with this thread in C{namespace}'s network namespace, so
    the sockets it makes belong there, then come back.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace.name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return call()
        finally:
            _setns(home)
    finally:
        os.close(home)


def enableModule(namespace: Namespace, ports: tuple[int, ...] = (443,)) -> None:
    """
    Have the module record in C{namespace}, for C{ports}.
    """

    def enable() -> None:
        client = support.ShifterClient()
        try:
            client.enable(list(ports))
        finally:
            client.close()

    inNamespace(namespace, enable)


def localNamespace(name: str) -> Namespace:
    """
    A namespace where locally made connections to L{TARGET_V4} and
    L{TARGET_V6} are routed out of a veth (and so can be redirected by nat
    OUTPUT rules).
    """
    namespace = Namespace(name)
    try:
        namespace.run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        namespace.run("ip", "addr", "add", "10.77.0.1/24", "dev", "v0")
        namespace.run("ip", "-6", "addr", "add", "2001:db8:77::1/64", "dev", "v0", "nodad")
        for device in ("v0", "v1"):
            namespace.run("ip", "link", "set", device, "up")
        namespace.run("ip", "route", "add", "203.0.113.0/24", "dev", "v0")
        namespace.run("ip", "-6", "route", "add", "2001:db8:7::/64", "dev", "v0")
    except BaseException:
        namespace.destroy()
        raise
    return namespace


def redirectOutput(namespace: Namespace, toPort: int) -> None:
    """
    nat OUTPUT rules: this namespace's connections to the targets' port 443
    go to C{toPort} on loopback instead.
    """
    for iptables, target in (("iptables", TARGET_V4), ("ip6tables", TARGET_V6)):
        namespace.run(
            iptables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", target,
            "--dport", "443", "-j", "REDIRECT", "--to-ports", str(toPort),
        )


class Recorder(Protocol):
    """
    Server side: hands each accepted transport to the factory's callback.
    """

    def connectionMade(self) -> None:
        self.factory.accepted(self.transport)  # type: ignore[attr-defined]


class Holder(Protocol):
    """
    Client side: keeps the connection open until told to go.
    """

    def connectionMade(self) -> None:
        self.factory.connected.callback(self.transport)  # type: ignore[attr-defined]


class HolderFactory(ClientFactory):
    protocol = Holder

    def __init__(self) -> None:
        self.connected: Deferred[Any] = Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.connected.errback(reason)


class RedirectedConnections:
    """
    A listener in a namespace, and connections made to it through
    REDIRECT rules, each side's transport kept.
    """

    def __init__(self, namespace: Namespace, interface: str) -> None:
        self.namespace = namespace
        self.waiting: list[Deferred[Any]] = []
        self.acceptedQueue: list[Any] = []
        factory = Factory.forProtocol(Recorder)
        factory.accepted = self._accepted  # type: ignore[attr-defined]
        self.listener = inNamespace(
            namespace, lambda: reactor.listenTCP(0, factory, interface=interface)
        )
        self.port = self.listener.getHost().port
        self.clients: list[Any] = []
        self.servers: list[Any] = []

    def _accepted(self, transport: Any) -> None:
        self.servers.append(transport)
        if self.waiting:
            self.waiting.pop(0).callback(transport)
        else:
            self.acceptedQueue.append(transport)

    def nextAccepted(self) -> Deferred[Any]:
        if self.acceptedQueue:
            return succeed(self.acceptedQueue.pop(0))
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d

    @inlineCallbacks
    def connect(self, namespace: Namespace, host: str, port: int = 443) -> Iterator[Any]:
        """
        Connect from C{namespace} to C{host}:C{port}; fire with the client's
        and the server's transports once both ends exist.
        """
        factory = HolderFactory()
        inNamespace(namespace, lambda: reactor.connectTCP(host, port, factory, timeout=10))
        client = yield factory.connected
        self.clients.append(client)
        server = yield self.nextAccepted()
        return client, server

    def close(self) -> Deferred[Any]:
        for transport in self.clients + self.servers:
            transport.abortConnection()
        return self.listener.stopListening()


class ResolverTests(TestCase):
    """
    L{KernelModuleResolver} finds the original destination of connections
    that real REDIRECT rules sent to a listener, through the real module.
    """

    timeout = 120 * support.SLOW

    def setUp(self) -> Deferred[None]:
        requireGuest()
        self.namespace = localNamespace(f"shkr{os.getpid()}")
        self.addCleanup(self.namespace.destroy)
        return self.startResolver(self.namespace)

    @inlineCallbacks
    def startResolver(self, namespace: Namespace) -> Iterator[Any]:
        enableModule(namespace)
        self.resolver = KernelModuleResolver(reactor=reactor, timeout=5.0)
        yield inNamespace(namespace, self.resolver.start)
        self.addCleanup(self.resolver.stop)

    def listen(self, namespace: Namespace, interface: str) -> RedirectedConnections:
        connections = RedirectedConnections(namespace, interface)
        self.addCleanup(connections.close)
        return connections

    @inlineCallbacks
    def test_ipv4(self) -> Iterator[Any]:
        """
        An IPv4 connection to 203.0.113.7:443 redirected by nat OUTPUT
        resolves to 203.0.113.7:443, looked up by the client's own address
        and port.
        """
        connections = self.listen(self.namespace, "127.0.0.1")
        redirectOutput(self.namespace, connections.port)
        client, server = yield connections.connect(self.namespace, TARGET_V4)
        self.assertEqual(server.getPeer().port, client.getHost().port)
        destination = yield self.resolver.resolve(server)
        self.assertEqual(destination, IPv4Address("TCP", TARGET_V4, 443))

    @inlineCallbacks
    def test_ipv6(self) -> Iterator[Any]:
        """
        An IPv6 connection redirected by nat OUTPUT resolves to its original
        IPv6 destination.
        """
        connections = self.listen(self.namespace, "::1")
        redirectOutput(self.namespace, connections.port)
        client, server = yield connections.connect(self.namespace, TARGET_V6)
        destination = yield self.resolver.resolve(server)
        self.assertEqual(destination, IPv6Address("TCP", TARGET_V6, 443))

    @inlineCallbacks
    def test_ipv4OnDualStack(self) -> Iterator[Any]:
        """
        An IPv4 connection accepted on a dual-stack IPv6 listener (its peer
        reads ::ffff:127.0.0.1) is looked up as IPv4 and resolves.
        """
        connections = self.listen(self.namespace, "::")
        redirectOutput(self.namespace, connections.port)
        client, server = yield connections.connect(self.namespace, TARGET_V4)
        self.assertTrue(server.getPeer().host.startswith("::ffff:"), server.getPeer())
        destination = yield self.resolver.resolve(server)
        self.assertEqual(destination, IPv4Address("TCP", TARGET_V4, 443))

    @inlineCallbacks
    def test_manyConnections(self) -> Iterator[Any]:
        """
        Many redirected connections, looked up all at once, each resolve to
        their own destination (the rules send two targets to one listener).
        """
        connections = self.listen(self.namespace, "::")
        redirectOutput(self.namespace, connections.port)
        pairs = []
        for i in range(40):
            pair = yield connections.connect(self.namespace, TARGET_V4 if i % 2 else TARGET_V6)
            pairs.append(pair)
        destinations = yield gatherResults([self.resolver.resolve(server) for _, server in pairs])
        self.assertEqual(
            [d.host for d in destinations],
            [TARGET_V4 if i % 2 else TARGET_V6 for i in range(40)],
        )

    @inlineCallbacks
    def test_notEnabled(self) -> Iterator[Any]:
        """
        In a namespace where the module does not record, the resolver does
        not start, and says why.
        """
        other = localNamespace(f"shkn{os.getpid()}")
        self.addCleanup(other.destroy)
        resolver = KernelModuleResolver(reactor=reactor, timeout=5.0)
        with self.assertRaises(Exception) as raised:
            yield inNamespace(other, resolver.start)
        self.assertIn("not enabled in this network namespace", str(raised.exception))

    @inlineCallbacks
    def test_notRedirected(self) -> Iterator[Any]:
        """
        A connection made straight to the listener, never redirected, is
        unknown to the module: L{DestinationUnknown}.
        """
        connections = self.listen(self.namespace, "127.0.0.1")
        _, server = yield connections.connect(self.namespace, "127.0.0.1", connections.port)
        with self.assertRaises(DestinationUnknown):
            yield self.resolver.resolve(server)

    @inlineCallbacks
    def test_otherNamespaceUnknown(self) -> Iterator[Any]:
        """
        A resolver in another namespace does not see this namespace's
        connections.
        """
        connections = self.listen(self.namespace, "127.0.0.1")
        redirectOutput(self.namespace, connections.port)
        _, server = yield connections.connect(self.namespace, TARGET_V4)
        other = localNamespace(f"shko{os.getpid()}")
        self.addCleanup(other.destroy)
        enableModule(other)
        elsewhere = KernelModuleResolver(reactor=reactor, timeout=5.0)
        yield inNamespace(other, elsewhere.start)
        self.addCleanup(elsewhere.stop)
        with self.assertRaises(DestinationUnknown):
            yield elsewhere.resolve(server)
        destination = yield self.resolver.resolve(server)
        self.assertEqual(destination.host, TARGET_V4)


class GatewayResolverTests(TestCase):
    """
    The gateway case: a client namespace sends through a gateway namespace
    whose nat PREROUTING rule redirects to a listener there.
    """

    timeout = 120 * support.SLOW

    @inlineCallbacks
    def setUp(self) -> Iterator[Any]:
        requireGuest()
        directory = Path(tempfile.mkdtemp(prefix="shifter-kmod-gw-"))
        self.gateway = Gateway(directory)
        self.addCleanup(self.gateway.destroy)
        enableModule(self.gateway.gateway)
        self.resolver = KernelModuleResolver(reactor=reactor, timeout=5.0)
        yield inNamespace(self.gateway.gateway, self.resolver.start)
        self.addCleanup(self.resolver.stop)
        self.connections = RedirectedConnections(self.gateway.gateway, "::")
        self.addCleanup(self.connections.close)
        self.gateway.redirect(443, self.connections.port)

    @inlineCallbacks
    def check(self, target: str, client: str, address: type) -> Iterator[Any]:
        _, server = yield self.connections.connect(self.gateway.client, target)
        self.assertEqual(server.getPeer().host.removeprefix("::ffff:"), client)
        destination = yield self.resolver.resolve(server)
        self.assertEqual(destination, address("TCP", target, 443))

    def test_ipv4(self) -> Deferred[Any]:
        """
        An IPv4 client's connection through the gateway resolves to the
        server it was sent to.
        """
        return self.check(SERVER_V4, CLIENT_V4, IPv4Address)

    def test_ipv6(self) -> Deferred[Any]:
        """
        An IPv6 client's connection through the gateway resolves to the
        server it was sent to.
        """
        return self.check(SERVER_V6, CLIENT_V6, IPv6Address)


class LookupRateTests(TestCase):
    """
    How many look-ups per second C{kmod} (through L{NetlinkProtocol}, with
    many requests in flight) and C{sockopt} (a getsockopt per connection)
    get on the same connections in the same guest.  The figures are
    printed, with their ratio; timing is never asserted (under software
    emulation only the ratio means anything).
    """

    timeout = 300 * support.SLOW
    connections = 64
    seconds = 3.0

    def setUp(self) -> None:
        requireGuest()
        self.namespace = localNamespace(f"shkb{os.getpid()}")
        self.addCleanup(self.namespace.destroy)

    @inlineCallbacks
    def measure(self, lookUp: Callable[[Any], Deferred[Any]], keys: list[tuple[Any, Any]], inFlight: int) -> Iterator[Any]:
        """
        Keep C{inFlight} look-ups going for L{seconds}; return how many
        were answered per second, checking every answer.
        """
        done = 0
        wrong: list[Any] = []
        deadline = time.monotonic() + self.seconds

        @inlineCallbacks
        def worker(offset: int) -> Iterator[Any]:
            nonlocal done
            i = offset
            while time.monotonic() < deadline:
                key, expected = keys[i % len(keys)]
                destination = yield lookUp(key)
                if destination != expected:
                    wrong.append((key, destination, expected))
                done += 1
                i += inFlight

        started = time.monotonic()
        yield gatherResults([worker(n) for n in range(inFlight)])
        elapsed = time.monotonic() - started
        self.assertEqual(wrong, [])
        return done / elapsed

    @inlineCallbacks
    def test_lookupRate(self) -> Iterator[Any]:
        """
        With connections recorded by the module, look-ups of them through one
        socket, 1, 16 and 64 in flight, all answer correctly, and so do
        sockopt's of the same connections; the rates are printed as
        "kmod lookups/s: N" and "sockopt lookups/s: N".
        """
        namespace = self.namespace
        enableModule(namespace)
        resolver = KernelModuleResolver(reactor=reactor, timeout=10.0, maxInFlight=256)
        yield inNamespace(namespace, resolver.start)
        self.addCleanup(resolver.stop)
        client = resolver.client
        assert client is not None
        connections = RedirectedConnections(namespace, "::")
        self.addCleanup(connections.close)
        redirectOutput(namespace, connections.port)
        keys, transports = [], []
        for i in range(self.connections):
            target = TARGET_V4 if i % 2 else TARGET_V6
            _, server = yield connections.connect(namespace, target)
            expected = (IPv4Address if i % 2 else IPv6Address)("TCP", target, 443)
            keys.append((AcceptedConnection.fromTransport(server), expected))
            transports.append((server, expected))
        before = yield client.stats()
        sockopt = SocketOptionResolver(reactor)
        lines = []
        for inFlight in (1, 16, 64):
            kmodRate = yield self.measure(client.get, keys, inFlight)
            sockoptRate = yield self.measure(sockopt.resolve, transports, inFlight)
            lines.append(f"kmod lookups/s: {kmodRate:.0f} ({inFlight} in flight, {len(keys)} connections, one socket)")
            lines.append(f"sockopt lookups/s: {sockoptRate:.0f} ({inFlight} in flight, same connections); "
                         f"kmod/sockopt {kmodRate / sockoptRate:.2f}")
        after = yield client.stats()
        for line in lines:
            print(line)
            sys.stdout.flush()
            with open(os.environ.get("SHIFTER_GUEST_REPORT", "/tmp/shifter-kmod-rate.txt"), "a") as report:
                report.write(line + "\n")
        # The module counted every look-up as a hit.
        self.assertEqual(after["misses"], before["misses"])
        self.assertGreater(after["hits"] - before["hits"], 0)
        self.assertEqual(after["hits"] - before["hits"], after["lookups"] - before["lookups"])


# Under qemu without KVM a Python program takes tens of seconds to start;
# tests.gateway waits 20 s.  These wait longer once that has run out.
GUEST_START_TIMEOUT = 180.0 * support.SLOW


class GuestSquid(Squid):
    def start(self) -> None:
        try:
            super().start()
        except AssertionError:
            self.namespace.waitListening(SQUID_PORT, GUEST_START_TIMEOUT)


class GuestShifterProcess(ShifterProcess):
    def start(self) -> None:
        try:
            super().start()
        except AssertionError:
            process = self.process
            assert process is not None
            waitFor(
                lambda: process.poll() is not None or "accepting redirected" in self.logText(),
                GUEST_START_TIMEOUT,
                "Shifter to start",
            )
            assert process.poll() is None, f"Shifter exited:\n{self.logText()}"


class TwistdTests(TestCase):
    """
    A real C{twistd shifter --resolver=kmod} on a gateway, relaying real
    HTTPS requests from a client namespace through a real Squid to a real
    web server.

    The programs are started and driven with blocking calls: nothing else
    runs in this test's reactor meanwhile.
    """

    timeout = 1200 * support.SLOW

    def setUp(self) -> None:
        requireGuest()
        for program in ("squid", "curl", "openssl", "iptables", "ip6tables", "ss"):
            if subprocess.run(["which", program], capture_output=True).returncode:
                raise AssertionError(f"the guest lacks {program}")
        self.directory = Path(tempfile.mkdtemp(prefix="shifter-kmod-twistd-"))
        os.chmod(self.directory, 0o755)
        self.gateway = Gateway(self.directory)
        self.addCleanup(self.gateway.destroy)
        self.squid = GuestSquid(self.gateway.gateway, self.directory / "squid")
        self.squid.start()
        self.addCleanup(self.squid.stop)
        self.web = QuickWebServer(self.gateway.server, self.directory, GUEST_START_TIMEOUT)
        (self.web.site / "hello.txt").write_text("hello through the kernel module\n")
        self.web.start()
        self.shifter = GuestShifterProcess(
            self.gateway.gateway,
            self.directory,
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:",
            "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--resolver", "kmod",
        )
        self.applyPrintedRules()
        self.shifter.start()
        self.addCleanup(self.shifter.stop)

    def applyPrintedRules(self) -> None:
        """
        Run the script C{python -m shifter.rules --resolver kmod} prints for
        this gateway, as printed, with sh in the gateway namespace (its
        C{python3} this project's): the REDIRECT rules, and the command that
        has the module record in this namespace, without which Shifter's
        kmod resolver would not start.
        """
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        script = subprocess.run(
            [sys.executable, "-m", "shifter.rules", "--resolver", "kmod", "--lan-interface", "c1",
             "--ports", "443", "--listen-port", str(SHIFTER_PORT)],
            capture_output=True, text=True, check=True, env=env,
        ).stdout
        self.assertIn("python3 -m shifter.kmod enable --ports 443 --interface c1", script)
        result = subprocess.run(
            ["ip", "netns", "exec", self.gateway.gateway.name, "sh", "-e"],
            input=script, capture_output=True, text=True, timeout=GUEST_START_TIMEOUT, env=env,
        )
        self.assertEqual(result.returncode, 0, f"{script}\n{result.stdout}{result.stderr}")

    @inlineCallbacks
    def stats(self) -> Iterator[Any]:
        """
        The module's counters in the gateway namespace.
        """
        client = yield inNamespace(
            self.gateway.gateway, lambda: ShifterClient.connect(reactor)
        )
        try:
            return (yield client.stats())
        finally:
            client.close()

    def fetch(self, host: str) -> str:
        url = f"https://[{host}]/hello.txt" if ":" in host else f"https://{host}/hello.txt"
        result = self.gateway.client.run(
            "curl", "--silent", "--show-error", "--max-time", "60",
            "--cacert", str(self.web.cert), url,
            check=False, timeout=GUEST_START_TIMEOUT,
        )
        self.assertEqual(
            result.returncode, 0, f"curl {url} failed: {result.stderr}\n{self.shifter.logText()}"
        )
        return result.stdout

    @inlineCallbacks
    def test_relay(self) -> Iterator[Any]:
        """
        HTTPS requests from an IPv4 and an IPv6 client reach the server
        through Shifter and Squid: Squid logs a CONNECT to each original
        destination, which only the kernel module knew, and the module
        counts both look-ups as hits.  (One test for both families: under
        qemu without KVM, starting Shifter alone takes about a minute.)
        """
        before = yield self.stats()
        self.assertEqual(self.fetch(SERVER_V4), "hello through the kernel module\n")
        self.squid.waitForLog("CONNECT", f"{SERVER_V4}:443")
        self.assertEqual(self.fetch(SERVER_V6), "hello through the kernel module\n")
        self.squid.waitForLog("CONNECT", SERVER_V6)
        after = yield self.stats()
        self.assertEqual(after["hits"] - before["hits"], 2, (before, after))
        self.assertEqual(after["misses"], before["misses"], (before, after))
