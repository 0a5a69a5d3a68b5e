"""
End-to-end: SOCKS5 upstreams and DIRECT, on the test gateway (the rules
C{python -m shifter.rules} prints, a real Squid, a real TLS server).

  - SOCKS5: a real Dante (Debian's C{dante-server}) runs in the server's
    namespace, as the site's SOCKS server, with a configuration of its
    own; Shifter's only upstream is C{socks5://} to it, with and without
    RFC 1929 username/password (Dante checks system users: the server's
    namespace gets a passwd and shadow file of its own, which C{ip netns
    exec} puts in place of the host's for what runs there).
  - DIRECT: a C{[[rule]]} with C{direct = true} has Shifter connect to
    the server itself, from the gateway's address; Squid never sees it.

Needs root and network namespaces (it says so when it skips).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tests.gateway import (
    CLIENT_V4,
    PROJECT,
    GATEWAY_UPLINK_V4,
    GATEWAY_UPLINK_V6,
    GATEWAY_V4,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    Namespace,
    ShifterProcess,
    stopProcess,
    waitFor,
)
from tests.support import requireHost
from tests.test_gateway_e2e import _BANNER
from tests.test_resolvers_e2e import LAN, ResolverGatewayTestCase

SOCKS_PORT = 1080
SOCKS_USER = "shiftersocks"
SOCKS_PASSWORD = "s0cks-pass"


class Dante:
    """
    A real Dante SOCKS server in a namespace, with a configuration, log and
    PID file of its own under C{directory}.

    It lets clients CONNECT to the test server's port 443 unless C{refuse},
    and refuses everything else by its rules (SOCKS5 reply 2).
    """

    def __init__(
        self, namespace: Namespace, directory: Path, address: str, method: str = "none", refuse: bool = False,
        debug: int = 0,
    ) -> None:
        self.namespace = namespace
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "danted.log"
        self.config = directory / "danted.conf"
        verdict = "block" if refuse else "pass"
        self.config.write_text(
            f"""\
debug: {debug}
logoutput: {self.log}
internal: {address} port = {SOCKS_PORT}
external: {address}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: error connect disconnect
}}
socks {verdict} {{
    from: 0.0.0.0/0 to: {SERVER_V4}/32 port = 443
    command: connect
    log: error connect disconnect
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: error connect
}}
"""
        )

    def start(self) -> None:
        self.process = self.namespace.start(
            "danted", "-f", str(self.config), "-p", str(self.directory / "danted.pid"),
            logTo=self.directory / "danted.out",
        )
        self.namespace.waitListening(SOCKS_PORT)

    def stop(self) -> None:
        stopProcess(self.process)
        waitFor(lambda: not self.namespace.isListening(SOCKS_PORT), 10, "Dante to stop")

    def logText(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def waitForLog(self, *fragments: str, timeout: float = 10.0) -> str:
        def find() -> str | None:
            for line in self.logText().splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            return None

        return waitFor(find, timeout, f"Dante log line with {fragments}")  # type: ignore[return-value]


def systemUser(test, namespace: Namespace, user: str, password: str) -> None:  # type: ignore[no-untyped-def]
    """
    Give what runs in C{namespace} (through C{ip netns exec}, which mounts
    C{/etc/netns/NAME/*} over C{/etc}) the host's users and groups plus
    C{user} with C{password}, without touching the host's own files.
    """
    directory = Path("/etc/netns") / namespace.name
    directory.mkdir(parents=True, exist_ok=True)
    test.addCleanup(shutil.rmtree, directory, True)
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True, check=True,
    ).stdout.strip()
    uid = 64123
    (directory / "passwd").write_text(
        Path("/etc/passwd").read_text() + f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"
    )
    (directory / "group").write_text(Path("/etc/group").read_text() + f"{user}:x:{uid}:\n")
    shadow = directory / "shadow"
    shadow.write_text(Path("/etc/shadow").read_text() + f"{user}:{hashed}:19000:0:99999:7:::\n")
    shadow.chmod(0o640)


class SocksTestCase(ResolverGatewayTestCase):
    """
    The test gateway with Dante in the server's namespace; Shifter's one
    upstream is that SOCKS5 server, given by C{socksURL}.
    """

    method = "none"
    refuse = False

    def setUp(self) -> None:
        requireHost(root=True, programs=("danted",))
        super().setUp()
        if self.method == "username":
            systemUser(self, self.net.server, SOCKS_USER, SOCKS_PASSWORD)
        self.dante = Dante(self.net.server, self.directory / "dante", SERVER_V4, self.method, self.refuse)
        self.dante.start()

    def startShifter(self, url: str, *options: str) -> None:
        self.shifter = ShifterProcess(
            self.net.gateway, self.directory,
            "--listen", self.listen, "--proxy", url, "--resolver", self.resolver, *options,
        )
        self.shifter.start()

    def assertFetched(self) -> None:
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())


class SocksTests(SocksTestCase):
    def test_tunnelThroughDante(self) -> None:
        """
        A client's HTTPS fetch goes through Shifter and Dante to the server,
        intact; Dante logs the CONNECT from the gateway to the server's
        port 443, Shifter's tunnel line names the SOCKS5 upstream, and
        Squid sees nothing.
        """
        url = f"socks5://{SERVER_V4}:{SOCKS_PORT}"
        self.startShifter(url)
        self.assertFetched()
        self.dante.waitForLog("pass", "connect", f"{GATEWAY_UPLINK_V4}.", f"{SERVER_V4}.443")
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via {url} closed")
        self.assertEqual(self.squid.accessLogLines(), [])


    def test_nameSentAsName(self) -> None:
        """
        With C{--connect-target sni}, the name the client asked for goes
        to Dante as a name (address type 3, as Dante's debug log shows the
        request), which Dante resolves from the server namespace's own
        hosts file.
        """
        hosts = Path("/etc/netns") / self.net.server.name
        hosts.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, hosts, True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n{SERVER_V4} www.example.test\n")
        self.dante.stop()
        # Debugging on, for its log to show the request as it came.
        self.dante = Dante(self.net.server, self.directory / "dante-debug", SERVER_V4, debug=2)
        self.dante.start()  # now reading that hosts file
        self.startShifter(f"socks5://{SERVER_V4}:{SOCKS_PORT}", "--connect-target", "sni")
        out = self.directory / "fetched-by-name"
        result = self.net.client.run(
            "curl", "-sS", "--max-time", "20", "--cacert", str(self.web.cert),
            "--connect-to", f"www.example.test:443:{SERVER_V4}:443",
            "-o", str(out), "https://www.example.test/file.bin", check=False, timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(out.read_bytes()).digest(), hashlib.sha256(self.payload).digest())
        self.dante.waitForLog("request received", "ATYP: 3 address: www.example.test.443")
        self.shifter.waitForLog("(CONNECT www.example.test:443, from SNI) via socks5://")


    def test_probedBackUp(self) -> None:
        """
        A SOCKS5 server that stops is marked down; once back, the pool's
        probe (a SOCKS5 CONNECT to the probe target, which Dante's rules
        refuse) finds it answering, and tunnels go through it again.
        """
        url = f"socks5://{SERVER_V4}:{SOCKS_PORT}"
        self.startShifter(url, "--proxy-failures", "1", "--proxy-backoff", "1")
        self.assertFetched()
        self.dante.stop()
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        self.shifter.waitForLog(f"proxy {url} marked down")
        self.dante.start()
        self.shifter.waitForLog(
            f"proxy {url} answered the probe (SOCKS5 server answered 0x02 (connection not allowed by ruleset))",
            timeout=20,
        )
        self.dante.waitForLog("block", "255.255.255.255.9")
        self.assertFetched()
        self.shifter.waitForLog(f"proxy {url} is back up: a tunnel through it opened")


class SocksRefusedTests(SocksTestCase):
    refuse = True

    def test_refusedConnect(self) -> None:
        """
        Dante refusing the CONNECT by its rules gives the client nothing,
        and Shifter one line in SOCKS's words, counted as the proxy's
        refusal.
        """
        self.startShifter(f"socks5://{SERVER_V4}:{SOCKS_PORT}")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog(
            f"-> {SERVER_V4}:443 via socks5://{SERVER_V4}:{SOCKS_PORT} failed: "
            "SOCKS5 server answered 0x02 (connection not allowed by ruleset)"
        )
        self.dante.waitForLog("block", f"{SERVER_V4}.443")


    def test_doctorNamesTheRefusal(self) -> None:
        """
        C{python -m shifter.doctor} asks the SOCKS5 server for its check
        target in SOCKS5 and reports Dante's refusal in SOCKS's words.
        """
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "shifter.doctor",
            "--lan-interface", LAN, "--ports", "443", "--check-target", f"{SERVER_V4}:443",
            "--listen", self.listen, "--proxy", f"socks5://{SERVER_V4}:{SOCKS_PORT}", "--resolver", self.resolver,
            check=False,
        )
        self.assertIn(
            f"socks5://{SERVER_V4}:{SOCKS_PORT} answered CONNECT {SERVER_V4}:443: SOCKS5 server answered 0x02 "
            "(connection not allowed by ruleset): its rules refuse CONNECT from this gateway to that destination",
            result.stdout,
        )


class SocksUsernameTests(SocksTestCase):
    method = "username"

    def test_usernamePassword(self) -> None:
        """
        With the user's name and password in the URL, Dante accepts them
        (RFC 1929) and the tunnel works; Dante logs the user.
        """
        self.startShifter(f"socks5://{SOCKS_USER}:{SOCKS_PASSWORD}@{SERVER_V4}:{SOCKS_PORT}")
        self.assertFetched()
        self.dante.waitForLog("pass", SOCKS_USER, f"{SERVER_V4}.443")

    def test_wrongPassword(self) -> None:
        """
        A wrong password gives one line saying the server refused the
        username and password, and the client nothing.
        """
        self.startShifter(f"socks5://{SOCKS_USER}:wrong@{SERVER_V4}:{SOCKS_PORT}")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog("failed: SOCKS5 server refused the username and password (RFC 1929 status")

    def test_noCredentials(self) -> None:
        """
        Without credentials, a server that wants them gives one line that
        says none are configured.
        """
        self.startShifter(f"socks5://{SERVER_V4}:{SOCKS_PORT}")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.shifter.waitForLog("failed: SOCKS5 server accepts none of the offered methods", "none are configured")


class DirectTests(ResolverGatewayTestCase):
    """
    A rule sends connections DIRECT: Shifter connects to the original
    destination itself.
    """

    def shifterArguments(self) -> tuple[str, ...]:
        config = self.directory / "shifter.toml"
        config.write_text('[[rule]]\ndestination = ["0.0.0.0/0", "::/0"]\ndirect = true\n')
        return (*super().shifterArguments(), "--config", str(config))

    def test_directReachesTheServer(self) -> None:
        """
        The client's fetch reaches the server intact, from the gateway's
        own address; the tunnel line says DIRECT, and Squid never logs it.
        """
        self.shifter.start()
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via DIRECT closed")
        waitFor(lambda: f'"::ffff:{GATEWAY_UPLINK_V4}" - - ' in self.web.log.read_text(), 10,
                "the server to log the gateway as its client")
        self.assertNotIn(f'"::ffff:{CLIENT_V4}"', self.web.log.read_text())
        self.assertEqual(self.squid.accessLogLines(), [])

    def test_directIPv6(self) -> None:
        """
        Over IPv6 too, DIRECT reaches the server from the gateway's own
        address.
        """
        self.shifter.start()
        result = self.fetch(f"https://[{SERVER_V6}]/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.body).digest(), hashlib.sha256(self.payload).digest())
        self.shifter.waitForLog(f"-> [{SERVER_V6}]:443 via DIRECT closed")
        waitFor(lambda: f'"{GATEWAY_UPLINK_V6}" - - ' in self.web.log.read_text(), 10,
                "the server to log the gateway as its client")
        self.assertEqual(self.squid.accessLogLines(), [])

    def test_gatewayAddressRefused(self) -> None:
        """
        Even redirected by a rule that does not leave the gateway's own
        addresses alone, a connection to the gateway's LAN address that a
        rule sends DIRECT is refused: the gateway's service never sees the
        gateway connect to itself.
        """
        bannerLog = self.directory / "banner.log"
        self.net.gateway.start(sys.executable, "-c", _BANNER, logTo=bannerLog)
        waitFor(lambda: bannerLog.exists() and "listening" in bannerLog.read_text(), 20, "the banner service")
        for iptables in ("iptables", "ip6tables"):
            self.net.gateway.run(iptables, "-t", "nat", "-I", "PREROUTING", "-i", "c1", "-p", "tcp",
                                 "--dport", "443", "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT))
        self.shifter.start()
        connection = self.net.client.connect(GATEWAY_V4, 443)
        received = b""
        try:
            while data := connection.recv(4096):
                received += data
        except OSError:
            pass
        finally:
            connection.close()
        self.assertEqual(received, b"")
        self.shifter.waitForLog(f"destination {GATEWAY_V4} is an address of this machine")
        self.assertNotIn("peer ", bannerLog.read_text())
