"""
Shifter's demo: a whole gateway on this machine, in network namespaces.

A client with no proxy settings fetches a page from an HTTPS server.  The
gateway between them runs the rules that C{python -m shifter.rules} prints
for the chosen resolver, applied exactly as printed, and Shifter, started
as those rules say, tunnels the connection through a real Squid.  The demo
narrates each step from what the programs and the kernel report (rule
counters, the conntrack entry, the queue, the sockets, the kernel module's
answers), shows that QUIC is refused, then tears everything down (also
when interrupted).

    python demo/demo.py [--ipv6] [--resolver NAME] [--keep] [--name PREFIX]
    python demo/demo.py --down PREFIX      tear down a demo left running

With C{--resolver kmod} the demo builds the kernel module and runs itself
in Debian's kernel booted under qemu (L{vm}), so this machine's kernel is
left alone.

Needs root, Squid, iptables, conntrack, curl and openssl (C{make setup}
installs them).  Any failure ends the demo with what went wrong and what
to do, and a non-zero status.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import (  # noqa: E402
    CLIENT_V4,
    CLIENT_V6,
    GATEWAY_V4,
    GATEWAY_V6,
    PROJECT,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    SQUID_PORT,
    VENV_BIN,
    Gateway,
    Namespace,
    QuickWebServer,
    ShifterProcess,
    Squid,
    insideNamespace,
    waitFor,
)

RESOLVERS = ("sockopt", "conntrack", "nfqueue", "tproxy", "kmod")
ROLES = ("client", "gw", "srv")
PAGE = "hello.txt"
LAN = "c1"  # the gateway's side of the client's link
FILES_PREFIX = "shifter-demo-"  # then the namespaces' prefix
OTHER_UDP_PORT = 4433
# In the booted kernel under qemu a program takes many times longer to
# start than on the host.
GUEST = os.environ.get("SHIFTER_DEMO_GUEST") == "1"
START_TIMEOUT = 180.0 if GUEST else 20.0


class DemoFailure(Exception):
    """
    The demo cannot go on: what went wrong, and what to do about it.
    """

    def __init__(self, what: str, advice: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.advice = advice


def say(text: str = "", indent: int = 0) -> None:
    print(textwrap.indent(text, " " * indent), flush=True)


def endpoint(host: str, port: int | str) -> str:
    """
    C{host:port}, with an IPv6 address in brackets; an IPv4-mapped IPv6
    address (a dual-stack socket's view of IPv4) shown as IPv4.
    """
    host = host.strip("[]")
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def splitEndpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def interruptOnTerm() -> None:
    """
    Make SIGTERM and SIGHUP end the demo like Ctrl-C does, through the
    clean-up path.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def tearDown(prefix: str) -> None:
    """
    Stop every process in the demo's namespaces and remove them, by name,
    and the demo's files.
    """
    for role in ROLES:
        name = f"{prefix}-{role}"
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for directory in Path(tempfile.gettempdir()).glob(f"{FILES_PREFIX}{prefix}-*"):
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------
# What the kernel reports
# --------------------------------------------------------------------------


@dataclass
class Flow:
    """
    A connection as conntrack lists it.

    @ivar original: (source, destination) of the original direction, as
        the client sent it.
    @ivar reply: (source, destination) of the reply direction, as the
        receiving socket sees the connection.
    """

    line: str
    original: tuple[str, str]
    reply: tuple[str, str]

    @classmethod
    def parse(cls, line: str) -> "Flow":
        values: dict[str, list[str]] = {}
        for token in line.split():
            if "=" in token:
                key, value = token.split("=", 1)
                values.setdefault(key, []).append(value)
        src, dst, sport, dport = (values[key] for key in ("src", "dst", "sport", "dport"))
        return cls(
            " ".join(line.split()),
            (endpoint(src[0], sport[0]), endpoint(dst[0], dport[0])),
            (endpoint(src[1], sport[1]), endpoint(dst[1], dport[1])),
        )


def conntrackEntry(gateway: Namespace, ipv6: bool, client: str, port: int) -> Flow:
    """
    The gateway's conntrack entry of the TCP connection from C{client},
    C{port}.
    """
    out = gateway.run(
        "conntrack", "-L", "-f", "ipv6" if ipv6 else "ipv4", "-p", "tcp",
        "--orig-src", client, "--orig-port-src", str(port), check=False,
    ).stdout
    lines = [line for line in out.splitlines() if "src=" in line]
    if not lines:
        raise DemoFailure(
            f"the gateway has no conntrack entry for the connection from {endpoint(client, port)}",
            "the connection tracking table may have been flushed; run the demo again",
        )
    return Flow.parse(lines[0])


def ruleCounters(gateway: Namespace, iptables: str, table: str, chain: str) -> dict[str, int]:
    """
    Packets matched by the rules of a chain, summed by target.
    """
    out = gateway.run(iptables, "-t", table, "-L", chain, "-v", "-n", "-x", check=False).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines()[2:]:
        fields = line.split()
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2]] = counts.get(fields[2], 0) + int(fields[0])
    return counts


def packets(count: int, what: str = "packet") -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------


class UdpListeners:
    """
    UDP sockets on the server, on [::] (IPv4 and IPv6): what an HTTP/3
    server would listen on.  The demo's own sockets, made in the server's
    namespace.
    """

    def __init__(self, namespace: Namespace, ports: tuple[int, ...]) -> None:
        self.sockets: dict[int, socket.socket] = {}
        with insideNamespace(namespace.name):
            for port in ports:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
                sock.setblocking(False)
                self.sockets[port] = sock

    def received(self, port: int, wait: float) -> bytes | None:
        sock = self.sockets[port]
        readable, _, _ = select.select([sock], [], [], wait)
        return sock.recv(65536) if readable else None

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


def sendDatagram(namespace: Namespace, host: str, port: int, payload: bytes, wait: float) -> str:
    """
    Send one datagram from C{namespace} on a connected UDP socket; return
    C{"refused"} if an ICMP port-unreachable comes back (ECONNREFUSED)
    within C{wait} seconds, else C{"sent"}.
    """
    with insideNamespace(namespace.name):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.connect((host, port))
        sock.send(payload)
        sock.settimeout(wait)
        try:
            sock.recv(65536)
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            pass
        return "sent"


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def rulesCommand(resolver: str) -> list[str]:
    return ["--resolver", resolver, "--lan-interface", LAN, "--ports", "443",
            "--listen-port", str(SHIFTER_PORT)]


def printedRules(resolver: str) -> str:
    """
    What C{python -m shifter.rules} prints for this gateway (the command
    itself, run in this process).
    """
    from shifter.admin.rules import main as rulesMain

    out = io.StringIO()
    rulesMain(rulesCommand(resolver), out)
    return out.getvalue()


def shifterCommand(rules: str) -> list[str]:
    """
    The C{twistd shifter} options that the rules' script says to run
    Shifter with, pointed at the demo's Squid.
    """
    found = re.search(r"^# Run Shifter with: twistd shifter (.*)$", rules, re.M)
    if found is None:
        raise DemoFailure("the printed rules do not say how to run Shifter",
                          "python -m shifter.rules should print a '# Run Shifter with:' line")
    return [f"127.0.0.1:{SQUID_PORT}" if word == "HOST:PORT" else word
            for word in shlex.split(found.group(1))]


class Demo:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.resolver: str = arguments.resolver
        self.ipv6: bool = arguments.ipv6
        self.keep: bool = arguments.keep
        self.name: str | None = arguments.name
        self.server, self.client = (SERVER_V6, CLIENT_V6) if self.ipv6 else (SERVER_V4, CLIENT_V4)
        self.iptables = "ip6tables" if self.ipv6 else "iptables"
        self.url = f"https://{endpoint(self.server, 443).rsplit(':', 1)[0]}/{PAGE}"
        self.steps = 0

    def step(self, text: str) -> None:
        self.steps += 1
        say(f"{self.steps}. {text}")

    # -- the whole run ------------------------------------------------------

    def run(self) -> int:
        prefix = self.name or f"shf{os.getpid()}"
        directory = Path(tempfile.mkdtemp(prefix=f"{FILES_PREFIX}{prefix}-"))
        os.chmod(directory, 0o755)  # Squid runs as the 'proxy' user.
        self.directory = directory
        family = "IPv6" if self.ipv6 else "IPv4"
        say(f"Shifter demo (resolver {self.resolver}, {family}): a gateway in three network namespaces"
            f"{' in the booted kernel' if GUEST else ' on this machine'}.")
        try:
            self.net = Gateway(directory, prefix=prefix)
        except subprocess.CalledProcessError as e:
            shutil.rmtree(directory, ignore_errors=True)
            taken = any(Path(f"/run/netns/{prefix}-{role}").exists() for role in ROLES)
            raise DemoFailure(
                f"cannot build the demo's namespaces: `{' '.join(map(str, e.cmd))}` failed",
                f"a demo left running holds the name {prefix}: `make demo-down NAME={prefix}` "
                "removes it" if taken else "this kernel must offer network namespaces and veth links",
            ) from None
        keep = False
        try:
            self.introduce()
            self.startServers()
            self.applyRules()
            self.startShifter()
            self.fetch()
            self.matched()
            getattr(self, f"saw_{self.resolver}")()
            self.proxied()
            self.quic()
            say()
            if self.keep:
                keep = True
                self.explore()
            return 0
        finally:
            if not keep:
                self.net.destroy()
                tearDown(self.net.prefix)
                shutil.rmtree(directory, ignore_errors=True)
                say("Torn down: the demo's processes are stopped and its namespaces removed.")

    def introduce(self) -> None:
        gateway = GATEWAY_V6 if self.ipv6 else GATEWAY_V4
        say(f"  client   {self.client:<16} no proxy settings at all")
        say(f"  gateway  {gateway:<16} Squid on 127.0.0.1:{SQUID_PORT}, Shifter on port {SHIFTER_PORT}")
        say(f"  server   {self.server:<16} an HTTPS site with a throwaway certificate")
        say(f"  (namespaces {self.net.prefix}-client, -gw, -srv; files in {self.directory})")
        say()

    def startServers(self) -> None:
        self.web = QuickWebServer(self.net.server, self.directory / "web", START_TIMEOUT)
        (self.web.site / PAGE).write_text(f"Hello from {self.server}, through Shifter and Squid.\n")
        self.web.start()
        self.udp = UdpListeners(self.net.server, (443, OTHER_UDP_PORT))
        self.squid = Squid(self.net.gateway, self.directory / "squid")
        self.squid.start(START_TIMEOUT)

    # -- the rules ----------------------------------------------------------

    def applyRules(self) -> None:
        command = "python -m shifter.rules " + " ".join(rulesCommand(self.resolver))
        self.rules = printedRules(self.resolver)
        self.step(f"The gateway's rules, as `{command}` prints them, applied as printed:")
        say(self.rules.rstrip("\n"), 5)
        env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   PYTHONPATH=str(PROJECT))
        result = subprocess.run(
            ["ip", "netns", "exec", self.net.gateway.name, "sh", "-e", "-x"],
            input=self.rules, capture_output=True, text=True, timeout=START_TIMEOUT, env=env,
        )
        if result.returncode != 0:
            traced = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]
            said = [line for line in result.stderr.splitlines() if line and not line.startswith("+ ")]
            advice = {
                "tproxy": "this kernel may lack TPROXY (xt_TPROXY) or policy routing; "
                          "RESOLVER=sockopt needs neither",
                "nfqueue": "this kernel may lack NFQUEUE (nfnetlink_queue); RESOLVER=sockopt does without",
                "kmod": "the kernel module must be loaded for its command to work",
            }.get(self.resolver, "this kernel may lack the netfilter features the rules use "
                                 "(iptables' nat table, REDIRECT)")
            raise DemoFailure(
                f"the printed rules did not apply: `{traced[-1] if traced else 'sh'}` failed"
                f"{': ' + ' '.join(said[-2:]) if said else ''}",
                advice,
            )

    # -- Shifter ------------------------------------------------------------

    def startShifter(self) -> None:
        options = shifterCommand(self.rules)
        self.step("Shifter runs as the rules say, pointed at Squid:")
        say("twistd shifter " + " ".join(shlex.quote(word) for word in options), 5)
        self.shifter = ShifterProcess(self.net.gateway, self.directory, *options)
        try:
            self.shifter.start(START_TIMEOUT)
        except AssertionError:
            log = self.shifter.logText()
            reason = re.search(r"Shifter cannot start: (.*)", log)
            if reason is None:
                reason = re.search(r"^(?:\S+ )?\[[^]]*\] (.*(?:rror|Exception).*)$", log, re.M)
            raise DemoFailure(
                f"Shifter did not start: {reason.group(1) if reason else 'it said nothing (see below)'}",
                self.startAdvice() + ("" if reason else "\n" + log[-1500:]),
            )
        for line in self.shifter.logText().splitlines():
            logger = re.search(r"\[(shifter\.[\w.]+)#\w+\] (.*)", line)
            if logger and not logger.group(1).startswith("shifter.tunnel.downstream"):
                say("-> " + logger.group(2), 5)

    def startAdvice(self) -> str:
        return {
            "kmod": "the module must be loaded and enabled in the gateway's namespace "
                    "(the printed rules do that in the booted kernel)",
            "nfqueue": "another program may hold the queue, or the kernel lacks nfnetlink_queue",
            "conntrack": "the kernel must offer ctnetlink (nf_conntrack_netlink)",
            "tproxy": "the listening socket needs IP_TRANSPARENT, so root or CAP_NET_ADMIN",
        }.get(self.resolver, "run `make setup`, then try again")

    # -- the client ---------------------------------------------------------

    def fetch(self) -> None:
        self.step("The client fetches the page as any unconfigured client would:")
        say(f"curl --cacert server.pem {self.url}", 5)
        fetched = self.net.client.run(
            "curl", "-sS", "--max-time", str(int(START_TIMEOUT)), "--cacert", str(self.web.cert),
            self.url, check=False, timeout=START_TIMEOUT + 30,
        )
        if fetched.returncode != 0:
            failures = [line.split("] ", 1)[-1] for line in self.shifter.logText().splitlines()
                        if "failed" in line or "cannot" in line]
            raise DemoFailure(
                f"the client's request failed: {fetched.stderr.strip() or f'curl exit {fetched.returncode}'}",
                ("Shifter logged: " + failures[-1]) if failures
                else "Shifter logged no tunnel for it: the rules did not send the connection to Shifter",
            )
        say(f"-> {fetched.stdout.strip()}", 5)
        self.tunnel = self.shifter.waitForLog("tunnel ", " closed", timeout=START_TIMEOUT)
        found = re.search(r"tunnel (\S+) -> (\S+) via", self.tunnel)
        assert found is not None, self.tunnel
        self.clientEndpoint, self.destination = found.group(1), found.group(2)
        self.clientPort = splitEndpoint(self.clientEndpoint)[1]

    def matched(self) -> None:
        gateway, ipt = self.net.gateway, self.iptables
        if self.resolver == "nfqueue":
            queued = ruleCounters(gateway, ipt, "mangle", "PREROUTING").get("NFQUEUE", 0)
            redirected = ruleCounters(gateway, ipt, "nat", "PREROUTING").get("REDIRECT", 0)
            self.step(f"The {ipt} rules matched: NFQUEUE queued {packets(queued)} to Shifter "
                      f"(the SYN), and the REDIRECT of marked SYNs matched {packets(redirected)}.")
        elif self.resolver == "tproxy":
            count = ruleCounters(gateway, ipt, "mangle", "PREROUTING").get("TPROXY", 0)
            self.step(f"The {ipt} TPROXY rule matched {packets(count)}: every packet the client sent "
                      "went to Shifter's socket, untranslated.")
        else:
            count = ruleCounters(gateway, ipt, "nat", "PREROUTING").get("REDIRECT", 0)
            self.step(f"The {ipt} REDIRECT rule matched {packets(count)}: the SYN went to Shifter, "
                      "not the server (nat sees only a connection's first packet).")

    # -- what each resolver saw ---------------------------------------------

    def flow(self) -> Flow:
        return conntrackEntry(self.net.gateway, self.ipv6, self.client, self.clientPort)

    def saw_sockopt(self) -> None:
        flow = self.flow()
        self.step("What the resolver saw (sockopt). The REDIRECT rewrote the connection's "
                  "destination; the kernel's conntrack entry keeps the original:")
        say(flow.line, 5)
        say(f"Shifter's accepted socket is {flow.reply[0]} <- {flow.reply[1]} (its own port); "
            f"getsockopt({'IP6T_SO_ORIGINAL_DST' if self.ipv6 else 'SO_ORIGINAL_DST'}) on it "
            f"reads this entry's original destination: {flow.original[1]}", 5)

    def saw_conntrack(self) -> None:
        flow = self.flow()
        self.step(f"What the resolver saw (conntrack). Shifter's accepted socket is "
                  f"{flow.reply[0]} <- {flow.reply[1]}: it asked ctnetlink for the connection "
                  f"with that reply tuple, and the kernel answered with this entry:")
        say(flow.line, 5)
        say(f"original {flow.original[0]} -> {flow.original[1]}, reply {flow.reply[0]} -> "
            f"{flow.reply[1]}: the destination is the original tuple's, {flow.original[1]}", 5)

    def saw_nfqueue(self) -> None:
        from shifter.resolvers.nfqueue import DEFAULT_QUEUE_MARK

        flow = self.flow()
        queue = self.net.gateway.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
        self.step(f"What the resolver saw (nfqueue). Before NAT, the kernel queued the client's "
                  f"SYN, {flow.original[0]} -> {flow.original[1]}, to Shifter:")
        if len(queue) >= 8:
            say(f"/proc/net/netfilter/nfnetlink_queue: queue {queue[0]}, bound by Shifter "
                f"(netlink port {queue[1]}), {packets(int(queue[7]))} queued in all, "
                f"{queue[2]} waiting for a verdict, {queue[5]} dropped", 5)
        say(f"Shifter recorded {flow.original[1]} under the SYN's source {flow.original[0]} and "
            f"gave the verdict ACCEPT with mark {DEFAULT_QUEUE_MARK:#x}, which the nat rule "
            f"redirects; when it accepted the connection from {flow.original[0]}, the record "
            f"answered {flow.original[1]}.", 5)
        if not self.keep:
            self.shifter.stop()
            account = self.shifter.waitForLog("nfqueue ", "packets read", timeout=START_TIMEOUT)
            say("Shifter's own count, logged as it stops:", 5)
            say(account.split("] ", 1)[-1], 7)

    def saw_tproxy(self) -> None:
        self.step("What the resolver saw (tproxy). No NAT: the TPROXY rule hands the client's "
                  "packets, unchanged, to Shifter's transparent socket. With a second connection "
                  "held open, the gateway lists Shifter's accepted socket (ss):")
        held = self.net.client.connect(self.server, 443, timeout=START_TIMEOUT)
        try:
            port = held.getsockname()[1]

            def accepted() -> str:
                return self.net.gateway.run(
                    "ss", "-Htnp", "state", "established", f"( dport = :{port} )").stdout.strip()

            line = str(waitFor(accepted, START_TIMEOUT, "Shifter's accepted socket"))
        finally:
            held.close()
        fields = line.split()
        local, peer = fields[2], fields[3]
        say(" ".join(fields), 5)
        localHost, localPort = splitEndpoint(local)
        peerHost, peerPort = splitEndpoint(peer)
        say(f"local {endpoint(localHost, localPort)}, peer {endpoint(peerHost, peerPort)}: the "
            f"socket's local address is where the client was going, and the resolver reads "
            f"just that (getsockname): no NAT, so no conntrack entry to ask either.", 5)

    def saw_kmod(self) -> None:
        from vmdemo import moduleAnswer

        flow = self.flow()
        try:
            answer, stats = moduleAnswer(self.net.gateway.name, splitEndpoint(flow.reply[1]),
                                         splitEndpoint(flow.reply[0]))
        except Exception as e:
            raise DemoFailure(f"the module did not answer for the client's connection: {e}",
                              "`python -m twisted.trial tests.test_kernel` shows whether the module "
                              "works in this kernel") from None
        self.step("What the resolver saw (kmod). The module recorded the connection in the "
                  "gateway's namespace; Shifter asked it over generic netlink for the one it "
                  f"accepted, {flow.reply[1]} on {flow.reply[0]}. Asked the same again "
                  "(SHIFTER_CMD_GET), it answers:")
        say(f"{self.clientEndpoint} -> {answer}", 5)
        say("and its counters for the gateway's namespace (SHIFTER_CMD_STATS, as `python -m "
            "shifter.kmod stats` prints them; the look-ups include the demo's own):", 5)
        say(", ".join(f"{name} {value}" for name, value in stats.items()), 7)

    # -- the proxy ----------------------------------------------------------

    def proxied(self) -> None:
        connect = self.squid.waitForLog("CONNECT ", timeout=START_TIMEOUT)
        self.step("Squid logged the CONNECT that Shifter sent:")
        say(" ".join(connect.split()), 5)
        self.step("Shifter logged the tunnel:")
        say(self.tunnel.split("] ", 1)[-1], 5)
        traffic = re.search(r"(\d+) bytes up, (\d+) bytes down", self.tunnel)
        if traffic:
            self.step(f"Bytes: {traffic.group(1)} from the client to the server, "
                      f"{traffic.group(2)} back (TLS handshake, request and page).")

    def quic(self) -> None:
        rule = next((line for line in self.rules.splitlines()
                     if line.startswith(f"{self.iptables} ") and "-p udp" in line), None)
        self.step("Browsers try HTTP/3 (QUIC, over UDP) first. The server has UDP sockets open "
                  f"on ports 443 and {OTHER_UDP_PORT}; the client sends a datagram to each:")
        outcome = sendDatagram(self.net.client, self.server, 443, b"QUIC Initial", 3.0)
        arrived = self.udp.received(443, 0.2)
        rejected = ruleCounters(self.net.gateway, self.iptables, "filter", "FORWARD").get("REJECT", 0)
        if outcome != "refused" or arrived is not None:
            raise DemoFailure(
                f"the datagram to {endpoint(self.server, 443)} was "
                f"{'delivered to the server' if arrived is not None else 'not refused'}: "
                "QUIC would go around the proxy",
                f"the printed rules should refuse it ({rule or 'no UDP rule printed'})",
            )
        say(f"{endpoint(self.server, 443):<22} -> refused at once: the gateway answered with an "
            f"ICMP port-unreachable (ECONNREFUSED; its REJECT rule matched {packets(rejected)}), "
            "and the server received nothing", 5)
        sendDatagram(self.net.client, self.server, OTHER_UDP_PORT, b"other", 0.2)
        other = self.udp.received(OTHER_UDP_PORT, 3.0)
        say(f"{endpoint(self.server, OTHER_UDP_PORT):<22} -> "
            f"{'delivered: other UDP is untouched' if other else 'lost on the way'}", 5)
        say("A browser refused this way falls back to TCP at once, and so to Shifter.", 5)
        self.udp.close()

    # -- left running -------------------------------------------------------

    def explore(self) -> None:
        prefix = self.net.prefix
        say("Left running for you to explore, for example:")
        say(f"ip netns exec {prefix}-client curl --cacert {self.web.cert} {self.url}", 2)
        say(f"ip netns exec {prefix}-gw {self.iptables}-save -c", 2)
        say(f"ip netns exec {prefix}-gw conntrack -L", 2)
        say(f"tail -f {self.shifter.log}", 2)
        say(f"tail -f {self.squid.accessLog}", 2)
        say("Tear it down with:")
        say(f"make demo-down NAME={prefix}", 2)


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------

NEEDED = ("ip", "iptables", "ip6tables", "nft", "squid", "curl", "openssl", "conntrack", "ss")


def checkHost(arguments: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise DemoFailure("the demo builds network namespaces and netfilter rules, which needs root",
                          "run it as root, or with sudo (sudo make run)")
    missing = [program for program in NEEDED if shutil.which(program) is None]
    if missing:
        raise DemoFailure(f"this machine lacks {', '.join(missing)}",
                          "`make setup` installs what the demo needs (Debian packages and .venv)")
    if arguments.keep and arguments.resolver == "kmod" and not GUEST:
        raise DemoFailure("RESOLVER=kmod runs in a kernel booted for the demo, which ends with it: "
                          "it cannot be left running",
                          "drop KEEP=1; or explore another resolver with KEEP=1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipv6", action="store_true", help="use IPv6 between client and server")
    parser.add_argument("--resolver", default="sockopt", choices=RESOLVERS,
                        help="Shifter's --resolver (default: sockopt)")
    parser.add_argument("--keep", action="store_true", help="leave the gateway running to explore")
    parser.add_argument("--name", default=None, help="prefix of the namespaces' names")
    parser.add_argument("--down", metavar="PREFIX", help="tear down a demo left running, and exit")
    arguments = parser.parse_args()
    debug = bool(os.environ.get("DEBUG"))
    try:
        if arguments.down:
            checkHost(argparse.Namespace(keep=False, resolver="sockopt"))
            tearDown(arguments.down)
            print(f"Torn down: {arguments.down}-client, -gw, -srv.")
            return 0
        checkHost(arguments)
        interruptOnTerm()
        if arguments.resolver == "kmod" and not GUEST:
            from vmdemo import BootFailure, runInBootedKernel

            try:
                return runInBootedKernel(arguments)
            except BootFailure as failure:
                raise DemoFailure(failure.what, failure.advice) from None
        return Demo(arguments).run()
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except DemoFailure as failure:
        print(f"\nThe demo failed: {failure.what}.", file=sys.stderr)
        if failure.advice:
            print(f"What to do: {failure.advice}.", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"\nThe demo failed unexpectedly: {reason}", file=sys.stderr)
        print("What to do: run it again; if it fails the same way, DEBUG=1 shows where "
              "(make run DEBUG=1).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
