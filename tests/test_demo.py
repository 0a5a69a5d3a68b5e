"""
The demo (C{make run}) end to end, for every resolver: its narration
proves the flow through the rules C{python -m shifter.rules} prints, says
what the resolver saw, shows QUIC refused, and the demo leaves nothing
behind, also when interrupted or when it fails.  C{--resolver kmod} runs
the demo in Debian's kernel booted under qemu.

Needs root, namespaces, Squid, iptables, conntrack, curl and openssl; the
kmod demo also needs what tests/test_kernel.py needs.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import requireHost

DEMO = str(Path(__file__).resolve().parent.parent / "demo" / "demo.py")
PROGRAMS = ("ip", "iptables", "ip6tables", "nft", "squid", "curl", "openssl", "conntrack", "ss")
V4 = ("203.0.113.7", "192.0.2.2", "192.0.2.1")
V6 = ("[2001:db8:2::7]", "[2001:db8:1::2]", "[2001:db8:1::1]")


def namespaces(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class DemoTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        requireHost(root=True, programs=PROGRAMS)
        self.prefix = f"shfdemo{os.getpid()}"
        self.addCleanup(subprocess.run, [sys.executable, DEMO, "--down", self.prefix], capture_output=True)

    def demo(self, *arguments: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, DEMO, "--name", self.prefix, *arguments],
            capture_output=True, text=True, timeout=timeout, **kwargs,  # type: ignore[call-overload]
        )

    def assertNarratesFlow(self, output: str, resolver: str, ipv6: bool = False) -> None:
        """
        The narration common to every resolver: the printed rules applied
        and shown, Shifter started with the printed command line, the
        fetch, Squid's CONNECT, the tunnel with bytes both ways, and QUIC
        refused while other UDP passes.
        """
        server, client, _ = V6 if ipv6 else V4
        destination = f"{server}:443"
        iptables = "ip6tables" if ipv6 else "iptables"
        self.assertIn(f"as `python -m shifter.rules --resolver {resolver} --lan-interface c1 --ports 443 "
                      "--listen-port 12345` prints them, applied as printed:", output)
        self.assertIn(f"# Shifter, --resolver {resolver}: ", output)
        self.assertRegex(output, rf"\n     twistd shifter --resolver {resolver} --listen '\S+' .*--proxy 127\.0\.0\.1:3128\n")
        self.assertRegex(output, rf"-> Shifter \S+ accepting redirected connections on .* \(resolver {resolver}, ")
        self.assertIn(f"curl --cacert server.pem https://{server}/hello.txt", output)
        self.assertIn(f"-> Hello from {server.strip('[]')}, through Shifter and Squid.", output)
        self.assertRegex(output, rf"TCP_TUNNEL/200 \d+ CONNECT {re.escape(destination)} ")
        tunnel = re.search(r"tunnel (\S+):\d+ -> (\S+) via \S+ closed .*: (\d+) bytes up, (\d+) bytes down", output)
        self.assertIsNotNone(tunnel, output)
        self.assertEqual((tunnel.group(1), tunnel.group(2)), (client, destination))
        self.assertGreater(int(tunnel.group(3)), 0)
        self.assertGreater(int(tunnel.group(4)), 0)
        self.assertIn(f"{iptables} -I FORWARD -i c1 -p udp --dport 443 -j REJECT", output)
        self.assertRegex(output, rf"{re.escape(destination)} +-> refused at once: the gateway answered with an "
                                 r"ICMP port-unreachable \(ECONNREFUSED; its REJECT rule matched [1-9]\d* packets?\), "
                                 "and the server received nothing")
        self.assertRegex(output, rf"{re.escape(server)}:4433 +-> delivered: other UDP is untouched")

    def assertTornDown(self, result: subprocess.CompletedProcess) -> None:
        self.assertIn("Torn down: the demo's processes are stopped and its namespaces removed.", result.stdout)
        self.assertEqual(namespaces(self.prefix), [])


class ResolverDemoMixin:
    """
    The demo for one resolver, over IPv4 and IPv6.
    """

    resolver = "sockopt"

    def narration(self, ipv6: bool) -> str:
        result = self.demo("--resolver", self.resolver, *(["--ipv6"] if ipv6 else []))  # type: ignore[attr-defined]
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)  # type: ignore[attr-defined]
        self.assertEqual(result.stderr, "")  # type: ignore[attr-defined]
        self.assertNarratesFlow(result.stdout, self.resolver, ipv6)  # type: ignore[attr-defined]
        self.assertTornDown(result)  # type: ignore[attr-defined]
        return result.stdout

    def test_ipv4(self) -> None:
        """
        Over IPv4 the demo narrates the flow and what the resolver saw of
        the connection, then removes its namespaces.
        """
        self.assertSaw(self.narration(False), *V4, "iptables")

    def test_ipv6(self) -> None:
        """
        The same over IPv6.
        """
        self.assertSaw(self.narration(True), *V6, "ip6tables")

    def assertSaw(self, output: str, server: str, client: str, gateway: str, iptables: str) -> None:
        raise NotImplementedError()


class SockoptDemoTests(ResolverDemoMixin, DemoTestCase):
    resolver = "sockopt"

    def assertSaw(self, output: str, server: str, client: str, gateway: str, iptables: str) -> None:
        """
        The REDIRECT matched the SYN; the conntrack entry holds the
        original destination that SO_ORIGINAL_DST reads on a socket bound
        to Shifter's port.
        """
        self.assertIn(f"The {iptables} REDIRECT rule matched 1 packet: the SYN went to Shifter", output)
        self.assertRegex(output, rf"TIME_WAIT src={re.escape(client.strip('[]'))} dst={re.escape(server.strip('[]'))} "
                                 r"sport=\d+ dport=443 ")
        option = "IP6T_SO_ORIGINAL_DST" if iptables == "ip6tables" else "SO_ORIGINAL_DST"
        self.assertRegex(output, rf"Shifter's accepted socket is {re.escape(gateway)}:12345 <- {re.escape(client)}:\d+ "
                                 rf"\(its own port\); getsockopt\({option}\) on it reads this entry's original "
                                 rf"destination: {re.escape(server)}:443")


class ConntrackDemoTests(ResolverDemoMixin, DemoTestCase):
    resolver = "conntrack"

    def assertSaw(self, output: str, server: str, client: str, gateway: str, iptables: str) -> None:
        """
        The conntrack entry found by the reply tuple, its original tuple
        the destination.
        """
        self.assertIn("-> conntrack: ctnetlink answers", output)
        self.assertRegex(output, rf"original {re.escape(client)}:(\d+) -> {re.escape(server)}:443, "
                                 rf"reply {re.escape(gateway)}:12345 -> {re.escape(client)}:\1: the destination is "
                                 rf"the original tuple's, {re.escape(server)}:443")


class NfqueueDemoTests(ResolverDemoMixin, DemoTestCase):
    resolver = "nfqueue"

    def assertSaw(self, output: str, server: str, client: str, gateway: str, iptables: str) -> None:
        """
        The mangle rule queued the SYN, the kernel's queue counted it, and
        Shifter's own count says it recorded and found it.
        """
        self.assertIn(f"The {iptables} rules matched: NFQUEUE queued 1 packet to Shifter (the SYN), and the "
                      "REDIRECT of marked SYNs matched 1 packet.", output)
        self.assertRegex(output, rf"queued the client's SYN, {re.escape(client)}:\d+ -> {re.escape(server)}:443, to Shifter")
        self.assertRegex(output, r"nfnetlink_queue: queue 0, bound by Shifter \(netlink port \d+\), 1 packet queued "
                                 r"in all, 0 waiting for a verdict, 0 dropped")
        self.assertIn("nfqueue 0: 1 packets read, 1 verdicts given, 1 SYNs recorded, 1 connections found, "
                      "0 not found", output)


class TproxyDemoTests(ResolverDemoMixin, DemoTestCase):
    resolver = "tproxy"

    def assertSaw(self, output: str, server: str, client: str, gateway: str, iptables: str) -> None:
        """
        The TPROXY rule matched the client's packets, and Shifter's
        accepted socket has the server's address as its local address.
        """
        self.assertRegex(output, rf"The {iptables} TPROXY rule matched [1-9]\d* packets")
        self.assertRegex(output, rf"\n     local {re.escape(server)}:443, peer {re.escape(client)}:\d+: the socket's "
                                 r"local address is where the client was going")
        self.assertRegex(output, r'users:\(\("twistd"')


class LifecycleTests(DemoTestCase):
    def test_keepAndDown(self) -> None:
        """
        With --keep the gateway stays up and the demo prints the command
        that tears it down; that command removes it and the demo's files.
        """
        result = self.demo("--keep")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"make demo-down NAME={self.prefix}", result.stdout)
        self.assertEqual(len(namespaces(self.prefix)), 3)
        pids = self.namespacePids()
        self.assertTrue(pids)
        files = re.search(r"files in (\S+)\)", result.stdout)
        self.assertIsNotNone(files, result.stdout)
        self.assertTrue(Path(files.group(1)).is_dir())
        subprocess.run([sys.executable, DEMO, "--down", self.prefix], check=True, capture_output=True)
        self.assertEqual(namespaces(self.prefix), [])
        self.assertFalse(Path(files.group(1)).exists())
        self.waitDead(pids)

    def test_interrupted(self) -> None:
        """
        A demo interrupted once its programs run stops them and removes
        its namespaces.
        """
        process = subprocess.Popen(
            [sys.executable, DEMO, "--name", self.prefix],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith("2. Shifter runs as the rules say"):
                break
        pids = self.namespacePids()
        self.assertTrue(pids, "no programs running in the demo's namespaces")
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
        self.assertEqual(process.returncode, 130, rest)
        self.assertIn("Torn down", rest)
        self.assertNotIn("Traceback", rest)
        self.assertEqual(namespaces(self.prefix), [])
        self.waitDead(pids)

    def namespacePids(self) -> list[int]:
        pids = []
        for name in namespaces(self.prefix):
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
            pids += [int(pid) for pid in out.split()]
        return pids

    def waitDead(self, pids: list[int]) -> None:
        from tests.gateway import waitFor

        waitFor(lambda: not any(alive(pid) for pid in pids), 15, f"demo processes {pids} to end")


class FailureTests(DemoTestCase):
    def assertExplained(self, result: subprocess.CompletedProcess, what: str) -> None:
        """
        The demo failed with status 1, saying what went wrong and what to
        do, and no traceback.
        """
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"The demo failed: {what}", result.stderr)
        self.assertIn("What to do: ", result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_shifterCannotStart(self) -> None:
        """
        When Shifter cannot start (here: the kmod resolver in this kernel,
        which has no module), the demo says so with Shifter's reason and
        removes what it built.
        """
        if Path("/sys/module/shifter").exists():
            raise SkipTest("the shifter module is loaded in this kernel")
        result = self.demo("--resolver", "kmod", env=dict(os.environ, SHIFTER_DEMO_GUEST="1"))
        self.assertExplained(result, "")
        self.assertRegex(result.stderr, r"The demo failed: (Shifter did not start: .*module shifter|"
                                        r"the printed rules did not apply: .*shifter\.kmod)")
        self.assertTornDown(result)

    def test_missingProgram(self) -> None:
        """
        Without the programs it needs, the demo names them and says that
        `make setup` installs them.
        """
        result = self.demo(env=dict(os.environ, PATH="/nonexistent"))
        self.assertExplained(result, "this machine lacks ip, iptables")
        self.assertIn("`make setup` installs", result.stderr)
        self.assertEqual(namespaces(self.prefix), [])

    def test_notRoot(self) -> None:
        """
        Run by another user, the demo says it needs root.
        """
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, DEMO, "--name", self.prefix],
            capture_output=True, text=True, timeout=60,
        )
        self.assertExplained(result, "the demo builds network namespaces")
        self.assertIn("run it as root", result.stderr)


class KmodDemoTests(DemoTestCase):
    """
    C{--resolver kmod}: the module built, Debian's kernel booted under qemu,
    and the whole demo run there (one boot per test: some 90 s each).
    """

    def setUp(self) -> None:
        from tests.test_kernel import requireBootableKernel

        super().setUp()
        requireBootableKernel()

    def narration(self, *arguments: str) -> str:
        result = self.demo("--resolver", "kmod", *arguments, timeout=15 * 60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        output = result.stdout
        self.assertRegex(output, r"^Shifter demo \(resolver kmod, IPv[46]\): Shifter's kernel module, in Debian's "
                                 r"kernel \S+ booted under qemu .* This takes a minute or two \(more on a busy machine\)\.\n")
        self.assertRegex(output, r"\nBuilding the module against the headers of \S+ \.\.\. built \(\d+ s\)\.\n")
        self.assertIn("The module is loaded (insmod shifter.ko)", output)
        self.assertIn("a gateway in three network namespaces in the booted kernel.", output)
        self.assertIn("-> kernel module shifter found (family ", output)
        self.assertRegex(output, r"\nThe booted kernel has shut down \(\d+ s in all\)\.\n$")
        return output

    def assertModuleAnswered(self, output: str, server: str, client: str, ipv6: bool) -> None:
        """
        The narration holds the module's GET answer for the client's
        connection (the tunnel's client and destination), and its counters
        with every look-up a hit.
        """
        self.assertNarratesFlow(output, "kmod", ipv6)
        tunnel = re.search(r"tunnel (\S+) -> (\S+) via", output)
        self.assertIsNotNone(tunnel, output)
        self.assertIn(f"(SHIFTER_CMD_GET), it answers:\n     {tunnel.group(1)} -> {server}:443\n", output)
        self.assertTrue(tunnel.group(1).startswith(client + ":"), tunnel.group(1))
        stats = re.search(r"\n       entries (\d+), inserts (\d+), lookups (\d+), hits (\d+), misses (\d+)", output)
        self.assertIsNotNone(stats, output)
        entries, inserts, lookups, hits, misses = map(int, stats.groups())
        self.assertGreaterEqual(inserts, 1)
        self.assertEqual((lookups, hits, misses), (2, 2, 0))

    def test_ipv4(self) -> None:
        """
        RESOLVER=kmod over IPv4: the demo says up front how long it takes,
        builds the module, boots the kernel, and narrates the flow and the
        module's answer and counters from inside it.
        """
        self.assertModuleAnswered(self.narration(), *V4[:2], ipv6=False)

    def test_ipv6(self) -> None:
        """
        The same over IPv6.
        """
        self.assertModuleAnswered(self.narration("--ipv6"), *V6[:2], ipv6=True)


class BootRetryTests(SynchronousTestCase):
    """
    The kmod demo's boot, with a stand-in for virtme-ng: a boot that ends
    before the guest's first words is tried once more, saying so.
    """

    def setUp(self) -> None:
        spec = importlib.util.spec_from_file_location("vmdemo", Path(DEMO).parent / "vmdemo.py")
        assert spec is not None and spec.loader is not None
        self.vmdemo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.vmdemo)
        import tests.test_kernel

        module = Path(self.mktemp())
        module.write_bytes(b"")
        self.patch(self.vmdemo, "_bootable", lambda: ("6.99-test", "vng"))
        self.patch(tests.test_kernel, "build", lambda release: SimpleNamespace(returncode=0, module=module, output=""))
        self.boots = Path(self.mktemp()).resolve()
        self.output = io.StringIO()
        self.patch(sys, "stdout", self.output)

    def failFirst(self, failures: int) -> None:
        """
        Boots up to C{failures} end at once, having said only C{.}; the
        next runs a demo that narrates one line.
        """
        script = (
            f"n=$(($(cat {self.boots} 2>/dev/null || echo 0) + 1)); echo $n > {self.boots}; "
            f"if [ $n -le {failures} ]; then echo .; exit 1; fi; "
            "echo DEMO-BEGIN; echo the narration; echo 'DEMO-EXIT 0'"
        )
        self.patch(self.vmdemo, "_bootCommand", lambda *arguments: ["sh", "-c", script])

    def test_secondBootRuns(self) -> None:
        self.failFirst(1)
        self.assertEqual(self.vmdemo.runInBootedKernel(SimpleNamespace(ipv6=False, name=None)), 0)
        self.assertEqual(self.boots.read_text().strip(), "2")
        output = self.output.getvalue()
        self.assertIn("The booted kernel did not start the demo (.; (virtme-ng exited with status 1)); "
                      "booting it once more ...\n", output)
        self.assertIn("the demo, in the booted kernel:\n\nthe narration\n", output)

    def test_twiceIsAFailure(self) -> None:
        self.failFirst(2)
        failure = self.assertRaises(
            self.vmdemo.BootFailure, self.vmdemo.runInBootedKernel, SimpleNamespace(ipv6=False, name=None)
        )
        self.assertEqual(self.boots.read_text().strip(), "2")
        self.assertEqual(failure.what, "the booted kernel did not run the demo; its last words:\n"
                                       "    .\n    (virtme-ng exited with status 1)")
