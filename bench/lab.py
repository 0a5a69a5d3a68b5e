"""
The benchmark's gateway: three network namespaces on veth links, with the
programs under test in them.

    client  198.51.100.2
      | bc0 -- bc1
    gateway 198.51.100.1 / 203.0.113.1   REDIRECT rules, Squid on loopback,
      | bs1 -- bs0                        redsocks and Shifter
    server  203.0.113.9                  iperf3 and nginx

With a proxy round trip (C{proxyRtt}), Squid runs in a fourth namespace,
linked to the gateway, and every packet the gateway itself sends to it
(the redirectors' connections to the proxy, not the traffic Squid's own
connections route through the gateway) waits that long in a delay line
(bench/delayline.py, on NFQUEUE: no netem needed):

    gateway 198.18.0.1 -- bp1 -- bp0 -- proxy 198.18.0.2   Squid

With a server round trip (C{serverRtt}), every packet the gateway sends
toward the server (forwarded, as Squid's and DIRECT's, or its own) waits
that long in a second delay line: the server is somewhere else for every
path alike.

Each redirector has its own destination ports on the server, so one set of
programs serves all of them: the client picks the path by the port it
connects to.  DIRECT's ports are not redirected (the gateway only routes);
the others' are redirected to that redirector's port on the gateway.

Everything is created under names unique to this run and removed by name.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parent.parent

CLIENT, GATEWAY, GATEWAY_UPLINK, SERVER = "198.51.100.2", "198.51.100.1", "203.0.113.1", "203.0.113.9"
SQUID_PORT = 3128
SQUID_TLS_PORT = 3443
GATEWAY_TO_PROXY, PROXY = "198.18.0.1", "198.18.0.2"
DELAY_QUEUE = 9
SERVER_DELAY_QUEUE = 10
# Descriptors for every program that holds tunnels: the client, Squid (two
# per tunnel), the redirector (two per tunnel) and nginx.  As many as we may:
# without CAP_SYS_RESOURCE (some containers) the hard limit we inherited is
# the most.
WANTED_NOFILE = 131072


def _nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, max(hard, WANTED_NOFILE)))
    except (ValueError, OSError):
        return hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(hard, WANTED_NOFILE)


NOFILE = _nofile()


@dataclass(frozen=True)
class Redirector:
    """
    A path from the client to the server.

    @ivar key: the short name used on the command line and in the JSON.
    @ivar listen: the redirector's port on the gateway, or 0 for DIRECT.
    @ivar iperfPort: the server's iperf3 port for this path.
    @ivar httpPort: the server's nginx port for this path.
    """

    key: str
    title: str
    listen: int
    iperfPort: int
    httpPort: int


DIRECT = Redirector("direct", "DIRECT", 0, 5201, 8001)
REDSOCKS = Redirector("redsocks", "redsocks", 12001, 5202, 8002)
SHIFTER = Redirector("shifter", "Shifter", 12002, 5203, 8003)
REDIRECTORS = (DIRECT, REDSOCKS, SHIFTER)


def waitFor(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """
    Poll C{predicate} until it returns something true, at most C{timeout} s.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def raiseNofile() -> None:
    """
    Raise this process's descriptor limit to L{NOFILE} (we are root).
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


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


class Namespace:
    """
    A network namespace, by name, and the long-running processes in it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.inode = os.stat(f"/run/netns/{name}").st_ino
        self.run("ip", "link", "set", "lo", "up")

    def command(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """
        Run a command here to completion; fail with its output if it fails.
        """
        done = subprocess.run(
            self.command(*command), capture_output=True, text=True, timeout=timeout,
            preexec_fn=raiseNofile,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {self.name} failed: {done.stderr.strip()}")
        return done

    def start(self, *command: str, logTo: Path, env: dict | None = None) -> subprocess.Popen:
        """
        Start a long-running program here, with a raised descriptor limit and
        in a session of its own (a Ctrl-C reaches the benchmark, which then
        stops it).  C{ip netns exec} execs the program, so the PID is its own.
        """
        with open(logTo, "ab") as log:
            process = subprocess.Popen(
                self.command(*command), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, preexec_fn=raiseNofile,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def isListening(self, port: int) -> bool:
        out = subprocess.run(
            self.command("ss", "-Htln", f"sport = :{port}"), capture_output=True, text=True
        ).stdout
        return bool(out.strip())

    def waitListening(self, port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[4]} exited with {process.returncode} in {self.name}")
            return self.isListening(port)

        waitFor(ready, timeout, f"port {port} in {self.name}")

    def pids(self) -> list[int]:
        """
        Every process in this namespace (ours: nothing else runs here).
        """
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def destroy(self) -> None:
        for process in reversed(self.processes):
            stopProcess(process)
        # Anything still here was started by one of ours (a worker whose
        # parent went first): end it by PID before the namespace goes.
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return total


def descendants(pids: list[int]) -> list[int]:
    """
    C{pids} and every process descended from them.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


class Lab:
    """
    The client, gateway and server namespaces, the server programs, Squid
    and the redirectors.  L{close} undoes everything and is safe to call
    at any point of L{__init__} or L{start}.
    """

    def __init__(
        self, directory: Path, redirectors: tuple[Redirector, ...], twistd: Path, shifterArgs: tuple[str, ...] = (),
        proxyRtt: float = 0.0, proxyTls: bool = False, serverRtt: float = 0.0,
    ) -> None:
        self.directory = directory
        self.proxyRtt = proxyRtt
        self.serverRtt = serverRtt
        self.proxyTls = proxyTls
        self.squidHost = PROXY if proxyRtt else "127.0.0.1"
        self.redirectors = redirectors
        self.twistd = twistd
        self.shifterArgs = shifterArgs
        self.namespaces: list[Namespace] = []
        self.squid: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.startRss: dict[str, int] = {}
        prefix = f"shbench{os.getpid()}"
        self.client = self._namespace(prefix + "-cli")
        self.gateway = self._namespace(prefix + "-gw")
        self.server = self._namespace(prefix + "-srv")
        self.proxy = self._namespace(prefix + "-prx") if proxyRtt else self.gateway
        self._link()

    def _namespace(self, name: str) -> Namespace:
        ns = Namespace(name)
        self.namespaces.append(ns)
        return ns

    def _link(self) -> None:
        client, gateway, server = self.client, self.gateway, self.server
        for a, aNs, b, bNs in [("bc0", client, "bc1", gateway), ("bs0", server, "bs1", gateway)]:
            subprocess.run(
                ["ip", "link", "add", a, "netns", aNs.name, "type", "veth", "peer", "name", b,
                 "netns", bNs.name],
                check=True,
            )
        for ns, device, address in [
            (client, "bc0", CLIENT), (gateway, "bc1", GATEWAY),
            (gateway, "bs1", GATEWAY_UPLINK), (server, "bs0", SERVER),
        ]:
            ns.run("ip", "addr", "add", f"{address}/24", "dev", device)
            ns.run("ip", "link", "set", device, "up")
        if self.proxyRtt:
            subprocess.run(
                ["ip", "link", "add", "bp0", "netns", self.proxy.name, "type", "veth", "peer", "name", "bp1",
                 "netns", gateway.name],
                check=True,
            )
            for ns, device, address in [(self.proxy, "bp0", PROXY), (gateway, "bp1", GATEWAY_TO_PROXY)]:
                ns.run("ip", "addr", "add", f"{address}/24", "dev", device)
                ns.run("ip", "link", "set", device, "up")
            self.proxy.run("ip", "route", "add", "default", "via", GATEWAY_TO_PROXY)
            # The gateway's own packets to the proxy, and only those, go
            # through the delay line.
            gateway.run(
                "iptables", "-t", "mangle", "-A", "OUTPUT", "-o", "bp1", "-j", "NFQUEUE",
                "--queue-num", str(DELAY_QUEUE), "--queue-bypass",
            )
        if self.serverRtt:
            for chain in ("FORWARD", "OUTPUT"):
                gateway.run(
                    "iptables", "-t", "mangle", "-A", chain, "-o", "bs1", "-j", "NFQUEUE",
                    "--queue-num", str(SERVER_DELAY_QUEUE), "--queue-bypass",
                )
        client.run("ip", "route", "add", "default", "via", GATEWAY)
        server.run("ip", "route", "add", "default", "via", GATEWAY_UPLINK)
        gateway.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns in self.namespaces:
            # Many short connections in a row: room for them all.
            ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")
            ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
            ns.run("sysctl", "-qw", "net.core.somaxconn=8192")
            ns.run("sysctl", "-qw", "net.ipv4.tcp_max_syn_backlog=8192")
            # Long runs must not fill the connection-tracking table ("table
            # full" stalls connections for seconds): loopback traffic is
            # not tracked, and finished connections leave it soon.
            for chain, direction in (("PREROUTING", "-i"), ("OUTPUT", "-o")):
                ns.run("iptables", "-t", "raw", "-A", chain, direction, "lo", "-j", "NOTRACK")
            for name, value in (("tcp_timeout_time_wait", 5), ("tcp_timeout_close_wait", 5),
                                ("tcp_timeout_fin_wait", 5), ("tcp_timeout_close", 2)):
                subprocess.run(ns.command("sysctl", "-qw", f"net.netfilter.nf_conntrack_{name}={value}"),
                               capture_output=True)
        for r in self.redirectors:
            if r.listen:
                gateway.run(
                    "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "bc1", "-p", "tcp",
                    "-m", "multiport", "--dports", f"{r.iperfPort},{r.httpPort}",
                    "-j", "REDIRECT", "--to-ports", str(r.listen),
                )

    # -- programs ---------------------------------------------------------

    def start(self) -> None:
        self._startServer()
        if any(r.listen for r in self.redirectors):
            self._startSquid()
            if self.proxyRtt:
                self._startDelayLine("delayline", DELAY_QUEUE, self.proxyRtt)
        if self.serverRtt:
            self._startDelayLine("serverdelay", SERVER_DELAY_QUEUE, self.serverRtt)
        for r in self.redirectors:
            if r is REDSOCKS:
                self._startRedsocks()
            elif r is SHIFTER:
                self._startShifter()
        time.sleep(0.5)
        # Each redirector's RSS before any traffic: the memory figure's base.
        self.startRss = {r.key: _rss(self.redirectorPids(r)) for r in self.redirectors if r.listen}

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _startServer(self) -> None:
        d = self._dir("nginx")
        (d / "www").mkdir(exist_ok=True)
        (d / "www" / "index.html").write_text("shifter bench\n")
        listens = "".join(f"        listen {SERVER}:{r.httpPort} backlog=8192;\n" for r in REDIRECTORS)
        (d / "nginx.conf").write_text(
            f"""\
daemon off;
worker_processes 2;
worker_rlimit_nofile {NOFILE};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 60000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    default_type text/plain;
    server {{
{listens}        root {d}/www;
    }}
}}
"""
        )
        self.nginx = self.server.start(
            "nginx", "-p", str(d), "-c", str(d / "nginx.conf"), logTo=d / "nginx.out"
        )
        for r in REDIRECTORS:
            process = self.server.start(
                "iperf3", "-s", "-B", SERVER, "-p", str(r.iperfPort),
                logTo=self._dir("iperf3") / f"{r.key}.out",
            )
            self.server.waitListening(r.iperfPort, process)
        self.server.waitListening(REDIRECTORS[0].httpPort, self.nginx)

    def _startSquid(self) -> None:
        d = self._dir("squid")
        ports = " ".join(str(p) for r in REDIRECTORS for p in (r.iperfPort, r.httpPort))
        tls = ""
        if self.proxyTls:
            # Shifter reaches Squid over TLS too (redsocks cannot).
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", str(d / "squid.key"), "-out", str(d / "squid.pem"), "-days", "2",
                 "-subj", "/CN=shifter-bench-proxy", "-addext", f"subjectAltName=IP:{self.squidHost}"],
                check=True, capture_output=True,
            )
            tls = f"https_port {self.squidHost}:{SQUID_TLS_PORT} tls-cert={d}/squid.pem tls-key={d}/squid.key\n"
        (d / "squid.conf").write_text(
            f"""\
http_port {self.squidHost}:{SQUID_PORT}
{tls}pid_filename {d}/squid.pid
access_log none
cache_log {d}/cache.log
cache_store_log none
coredump_dir {d}
cache deny all
cache_mem 8 MB
max_filedescriptors {NOFILE}
shutdown_lifetime 0 seconds
client_persistent_connections off
acl bench_ports port {ports}
http_access deny CONNECT !bench_ports
acl gateway src {GATEWAY_TO_PROXY}
http_access allow localhost
http_access allow gateway
http_access deny all
"""
        )
        subprocess.run(["chown", "-R", "proxy:proxy", str(d)], check=True)
        self.squid = self.proxy.start("squid", "-N", "-f", str(d / "squid.conf"), logTo=d / "squid.out")
        self.proxy.waitListening(SQUID_PORT, self.squid)

    def _startDelayLine(self, name: str, queue: int, ms: float) -> None:
        # Shifter's Python (next to twistd): the delay line uses its netlink codec.
        d = self._dir(name)
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        process = self.gateway.start(
            str(self.twistd.parent / "python"), str(PROJECT / "bench" / "delayline.py"), str(queue), f"{ms:g}",
            logTo=d / "delayline.out", env=env,
        )
        self.processes[name] = process
        waitFor(lambda: "delay line:" in (d / "delayline.out").read_text() or process.poll() is not None,
                10, f"the {name} delay line")
        if process.poll() is not None:
            raise RuntimeError(f"the delay line exited: {(d / 'delayline.out').read_text()}")

    def _startRedsocks(self) -> None:
        d = self._dir("redsocks")
        # Debian's defaults (info logging on, no splice), as a foreground
        # process logging to a file, in http-connect mode to our Squid.
        (d / "redsocks.conf").write_text(
            f"""\
base {{
    log_debug = off;
    log_info = on;
    log = "file:{d}/redsocks.log";
    daemon = off;
    redirector = iptables;
    rlimit_nofile = {NOFILE};
    redsocks_conn_max = 60000;
}}
redsocks {{
    local_ip = 0.0.0.0;
    local_port = {REDSOCKS.listen};
    ip = {self.squidHost};
    port = {SQUID_PORT};
    type = http-connect;
}}
"""
        )
        process = self.gateway.start("redsocks", "-c", str(d / "redsocks.conf"), logTo=d / "redsocks.out")
        self.processes[REDSOCKS.key] = process
        self.gateway.waitListening(REDSOCKS.listen, process)

    def _shifterProxy(self) -> tuple[str, ...]:
        if self.proxyTls:
            ca = self.directory / "squid" / "squid.pem"
            return ("--proxy", f"https://{self.squidHost}:{SQUID_TLS_PORT}", "--proxy-ca", str(ca))
        return ("--proxy", f"{self.squidHost}:{SQUID_PORT}")

    def _startShifter(self) -> None:
        d = self._dir("shifter")
        log = d / "shifter.log"
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        process = self.gateway.start(
            str(self.twistd), "-n", "--pidfile=", f"--logfile={log}", "--reactor=shifter",
            "shifter", "--listen", f"tcp:{SHIFTER.listen}", *self._shifterProxy(),
            # Every connection here comes from the one client host.
            "--max-connections-per-client", "0",
            *self.shifterArgs, logTo=d / "shifter.out", env=env,
        )
        self.processes[SHIFTER.key] = process

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"Shifter exited with {process.returncode}; see {log}")
            text = log.read_text() if log.exists() else ""
            # With --workers, the parent says when all of them accept.
            return "accepting redirected" in text and (
                not any(a.startswith("--workers") for a in self.shifterArgs) or "workers accepting" in text
            )

        waitFor(started, 30, "Shifter to start")

    # -- what the measurements need ---------------------------------------

    def redirectorPids(self, r: Redirector) -> list[int]:
        process = self.processes.get(r.key)
        if process is None:
            return []
        if process.poll() is not None:
            raise RuntimeError(f"{r.title} exited with {process.returncode}")
        return descendants([process.pid])

    def squidPids(self) -> list[int]:
        return descendants([self.squid.pid]) if self.squid else []

    def ourNetns(self) -> set[int]:
        return {ns.inode for ns in self.namespaces}

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.destroy()
        self.namespaces = []


def tools() -> dict[str, str | None]:
    """
    Where each program the benchmark needs is, or None.
    """
    return {p: shutil.which(p) for p in ("ip", "iptables", "ss", "squid", "nginx", "iperf3", "wrk", "redsocks", "cc")}

