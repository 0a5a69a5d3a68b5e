"""
A whole gateway on one machine, for integration tests: three network
namespaces joined by veth pairs, with real programs in them.

    client (192.0.2.2, 2001:db8:1::2)
      | c0 -- c1
    gateway (192.0.2.1 / 203.0.113.1, 2001:db8:1::1 / 2001:db8:2::1)
      | s1 -- s0          REDIRECT rule, Squid on loopback, Shifter
    server (203.0.113.7, 2001:db8:2::7)   a TLS web server on port 443

All addresses are from the documentation ranges and exist only inside
namespaces this module creates; everything is torn down by name.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

CLIENT_V4, GATEWAY_V4, GATEWAY_UPLINK_V4, SERVER_V4 = (
    "192.0.2.2",
    "192.0.2.1",
    "203.0.113.1",
    "203.0.113.7",
)
CLIENT_V6, GATEWAY_V6, GATEWAY_UPLINK_V6, SERVER_V6 = (
    "2001:db8:1::2",
    "2001:db8:1::1",
    "2001:db8:2::1",
    "2001:db8:2::7",
)
SHIFTER_PORT = 12345
SQUID_PORT = 3128

_names = itertools.count()


def waitFor(predicate: Callable[[], object], timeout: float = 15.0, what: str = "") -> object:
    """
    Poll C{predicate} until it returns something true, for at most
    C{timeout} seconds.

    @raise AssertionError: naming C{what} on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def insideNamespace(name: str) -> Iterator[None]:
    """
    Run the body with this thread in network namespace C{name}: sockets
    made there stay there after the thread returns home.
    """
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


class Namespace:
    """
    A network namespace, by name, and the processes started in it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """
        Run a command in this namespace to completion, capturing its output.
        """
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *command],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *command: str, logTo: Path, env: dict | None = None) -> subprocess.Popen:
        """
        Start a long-running command in this namespace, its output in C{logTo}.
        """
        with open(logTo, "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.processes.append(process)
        return process

    def connect(self, host: str, port: int, timeout: float = 10) -> socket.socket:
        """
        A TCP connection made from inside this namespace, for the test
        process itself to use.
        """
        with insideNamespace(self.name):
            return socket.create_connection((host, port), timeout=timeout)

    def isListening(self, port: int) -> bool:
        """
        Whether a TCP socket in this namespace listens on C{port}.
        """
        out = self.run("ss", "-Htln", f"sport = :{port}").stdout
        return bool(out.strip())

    def waitListening(self, port: int, timeout: float = 20.0) -> None:
        waitFor(lambda: self.isListening(port), timeout, f"port {port} in {self.name}")

    def destroy(self) -> None:
        for process in self.processes:
            stopProcess(process)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


def stopProcess(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """
    End a process this module started, by its PID: SIGTERM, then SIGKILL.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


class Gateway:
    """
    The client, gateway and server namespaces, linked and routed.

    @ivar directory: where the programs' files and logs go.
    @ivar prefix: the namespaces are named C{prefix-client}, C{prefix-gw}
        and C{prefix-srv}.
    """

    def __init__(self, directory: Path, prefix: str | None = None) -> None:
        self.directory = directory
        prefix = prefix or f"shf{os.getpid()}x{next(_names)}"
        self.prefix = prefix
        self.client = self.gateway = self.server = None
        try:
            self.client = Namespace(prefix + "-client")
            self.gateway = Namespace(prefix + "-gw")
            self.server = Namespace(prefix + "-srv")
            self._link()
        except BaseException:
            self.destroy()
            raise

    def _link(self) -> None:
        client, gateway, server = self.client, self.gateway, self.server
        subprocess.run(
            ["ip", "link", "add", "c0", "netns", client.name, "type", "veth",
             "peer", "name", "c1", "netns", gateway.name],
            check=True,
        )
        subprocess.run(
            ["ip", "link", "add", "s0", "netns", server.name, "type", "veth",
             "peer", "name", "s1", "netns", gateway.name],
            check=True,
        )
        for ns, device, v4, v6 in [
            (client, "c0", CLIENT_V4, CLIENT_V6),
            (gateway, "c1", GATEWAY_V4, GATEWAY_V6),
            (gateway, "s1", GATEWAY_UPLINK_V4, GATEWAY_UPLINK_V6),
            (server, "s0", SERVER_V4, SERVER_V6),
        ]:
            ns.run("ip", "addr", "add", f"{v4}/24", "dev", device)
            ns.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", device, "nodad")
            ns.run("ip", "link", "set", device, "up")
        client.run("ip", "route", "add", "default", "via", GATEWAY_V4)
        client.run("ip", "-6", "route", "add", "default", "via", GATEWAY_V6)
        server.run("ip", "route", "add", "default", "via", GATEWAY_UPLINK_V4)
        server.run("ip", "-6", "route", "add", "default", "via", GATEWAY_UPLINK_V6)
        gateway.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        gateway.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def redirect(self, port: int = 443, toPort: int = SHIFTER_PORT, nft: bool = False) -> None:
        """
        Add the gateway rules a user adds (the README's): REDIRECT what the
        client side sends to C{port} to Shifter, for IPv4 and IPv6, with
        iptables or, if C{nft}, with one nftables table.
        """
        if nft:
            ruleset = (
                "table inet shifter {\n"
                "    chain prerouting {\n"
                "        type nat hook prerouting priority dstnat; policy accept;\n"
                f'        iifname "c1" tcp dport {port} redirect to :{toPort}\n'
                "    }\n"
                "}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", self.gateway.name, "nft", "-f", "-"],
                input=ruleset, text=True, check=True,
            )
            return
        for iptables in ("iptables", "ip6tables"):
            self.gateway.run(
                iptables, "-t", "nat", "-A", "PREROUTING", "-i", "c1", "-p", "tcp",
                "--dport", str(port), "-j", "REDIRECT", "--to-ports", str(toPort),
            )

    def destroy(self) -> None:
        for ns in (self.client, self.gateway, self.server):
            if ns is not None:
                ns.destroy()


def gatewayFor(test) -> Gateway:  # type: ignore[no-untyped-def]
    """
    A L{Gateway} with its files in a new directory of C{test}'s (readable,
    with its parents, by the C{proxy} user Squid runs as), torn down when
    the test ends.
    """
    directory = Path(test.mktemp()).resolve()
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    net = Gateway(directory)
    test.addCleanup(net.destroy)
    return net


class Squid:
    """
    A real Squid in a namespace, with a configuration, logs and PID file of
    its own under C{directory}.
    """

    def __init__(
        self,
        namespace: Namespace,
        directory: Path,
        deny: tuple[str, ...] = (),
        port: int = SQUID_PORT,
        access: str = "http_access allow localhost\n",
        extra: str = "",
    ) -> None:
        """
        @param deny: destination addresses Squid refuses (403).
        @param port: its plain HTTP port, on 127.0.0.1 and ::1.
        @param access: the http_access rules (before the final deny all).
        @param extra: more configuration lines (auth_param, https_port, ...).
        """
        self.namespace = namespace
        self.directory = directory
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        self.accessLog = directory / "access.log"
        self.config = directory / "squid.conf"
        denyLines = "".join(
            f"acl denied_{i} dst {address}\nhttp_access deny denied_{i}\n"
            for i, address in enumerate(deny)
        )
        self.config.write_text(
            f"""\
http_port 127.0.0.1:{port}
http_port [::1]:{port}
pid_filename {directory}/squid.pid
access_log stdio:{self.accessLog} squid
cache_log {directory}/cache.log
cache_store_log none
coredump_dir {directory}
cache deny all
cache_mem 8 MB
shutdown_lifetime 0 seconds
{extra}
acl SSL_ports port 443
http_access deny CONNECT !SSL_ports
{denyLines}{access}http_access deny all
"""
        )
        subprocess.run(["chown", "-R", "proxy:proxy", str(directory)], check=True)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.process = self.namespace.start(
            "squid", "-N", "-f", str(self.config), logTo=self.directory / "squid.out"
        )
        self.namespace.waitListening(self.port, timeout)

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process)
            self.process = None

    def accessLogLines(self) -> list[str]:
        if not self.accessLog.exists():
            return []
        return self.accessLog.read_text().splitlines()

    def waitForLog(self, *fragments: str, timeout: float = 10.0) -> str:
        """
        Wait for an access log line holding all of C{fragments}; return it.
        """

        def find() -> str | None:
            for line in self.accessLogLines():
                if all(fragment in line for fragment in fragments):
                    return line
            return None

        return waitFor(find, timeout, f"Squid access log line with {fragments}")  # type: ignore[return-value]


def makeCertificate(
    directory: Path,
    names: tuple[str, ...] = (f"IP:{SERVER_V4}", f"IP:{SERVER_V6}", "DNS:www.example.test"),
) -> tuple[Path, Path]:
    """
    A throwaway self-signed certificate, by default for the test server's
    addresses and name.
    """
    key, cert = directory / "server.key", directory / "server.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=shifter-test-server",
         "-addext", "subjectAltName=" + ",".join(names)],
        check=True,
        capture_output=True,
    )
    return key, cert


class WebServer:
    """
    A real HTTPS server (twistd web over TLS) on port 443, IPv4 and IPv6,
    serving the files in C{directory / "site"}.
    """

    def __init__(self, namespace: Namespace, directory: Path) -> None:
        self.namespace = namespace
        self.site = directory / "site"
        self.site.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = makeCertificate(directory)
        self.log = directory / "web.log"

    def start(self) -> None:
        self.namespace.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.log}",
            "web", "--listen",
            f"ssl:443:privateKey={self.key}:certKey={self.cert}:interface=\\:\\:",
            "--path", str(self.site),
            logTo=self.log.with_suffix(".out"),
        )
        self.namespace.waitListening(443)


class QuickWebServer(WebServer):
    """
    The same site served by OpenSSL's C{s_server}, which starts at once
    even in a kernel under qemu, where a Python server takes a minute.
    """

    def __init__(self, namespace: Namespace, directory: Path, startTimeout: float = 20.0) -> None:
        super().__init__(namespace, directory)
        self.log = directory / "s_server.out"
        self.startTimeout = startTimeout

    def start(self) -> None:
        self.namespace.start(
            "sh", "-c",
            f'cd "{self.site}" && exec openssl s_server -quiet -accept 443 '
            f'-cert "{self.cert}" -key "{self.key}" -WWW',
            logTo=self.log,
        )
        self.namespace.waitListening(443, self.startTimeout)


class ShifterProcess:
    """
    A real C{twistd shifter} in a namespace, from this source tree.
    """

    def __init__(self, namespace: Namespace, directory: Path, *options: str) -> None:
        self.namespace = namespace
        self.log = directory / "shifter.log"
        self.options = options or (
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:",
            "--proxy", f"127.0.0.1:{SQUID_PORT}",
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        # A restarted Shifter appends to the same log: wait for this run's
        # start-up line, not an earlier one.
        earlier = len(self.logText())
        self.process = self.namespace.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.log}",
            "shifter", *self.options,
            logTo=self.log.with_suffix(".out"), env=env,
        )
        waitFor(
            lambda: self.process.poll() is not None
            or "accepting redirected" in self.logText()[earlier:],
            timeout,
            "Shifter to start",
        )
        assert self.process.poll() is None, f"Shifter exited:\n{self.logText()}"

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process)

    def logText(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def waitForLog(self, *fragments: str, timeout: float = 10.0) -> str:
        """
        Wait for a log line holding all of C{fragments}; return it.
        """

        def find() -> str | None:
            for line in self.logText().splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            return None

        return waitFor(find, timeout, f"Shifter log line with {fragments}")  # type: ignore[return-value]


# A UDP echo server on [::] (IPv4 and IPv6), one port per argument.
_UDP_ECHO = """\
import selectors, socket, sys
selector = selectors.DefaultSelector()
for port in sys.argv[1:]:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", int(port)))
    selector.register(sock, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in selector.select():
        data, peer = key.fileobj.recvfrom(65536)
        key.fileobj.sendto(data, peer)
"""


class UdpEcho:
    """
    A UDP echo server in a namespace, on each of C{ports}, IPv4 and IPv6.
    """

    def __init__(self, namespace: Namespace, directory: Path, *ports: int) -> None:
        self.namespace = namespace
        self.ports = ports
        self.log = directory / "udp-echo.log"

    def start(self) -> None:
        self.namespace.start(sys.executable, "-c", _UDP_ECHO, *map(str, self.ports), logTo=self.log)
        waitFor(lambda: "listening" in (self.log.read_text() if self.log.exists() else ""),
                20, "the UDP echo server to start")


def udpExchange(namespace: Namespace, host: str, port: int, timeout: float = 2.0) -> str:
    """
    Send one datagram from C{namespace} to C{host}:C{port} on a connected
    UDP socket and say what came of it: C{"echoed"}, C{"refused"} (an ICMP
    port-unreachable came back: ECONNREFUSED), or C{"no answer"} within
    C{timeout} seconds.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with insideNamespace(namespace.name):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        payload = os.urandom(16)
        try:
            sock.send(payload)
            answer = sock.recv(65536)
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "no answer"
        return "echoed" if answer == payload else f"answered {answer!r}"
