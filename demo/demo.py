"""
Shifter's demo: a whole gateway on this machine, in network namespaces.

A client with no proxy settings fetches a page from an HTTPS server; the
gateway between them redirects the connection to Shifter, which tunnels it
through a real Squid.  The demo narrates each step from what the programs
themselves logged, then tears everything down (also when interrupted).

    python demo/demo.py [--ipv6] [--resolver NAME] [--keep] [--name PREFIX]
    python demo/demo.py --down PREFIX      tear down a demo left running

Needs root, Squid, iptables, curl and openssl (`make setup` installs them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import (  # noqa: E402
    CLIENT_V4,
    CLIENT_V6,
    GATEWAY_V4,
    SERVER_V4,
    SERVER_V6,
    SHIFTER_PORT,
    SQUID_PORT,
    Gateway,
    ShifterProcess,
    Squid,
    WebServer,
)

ROLES = ("client", "gw", "srv")
PAGE = "hello.txt"


def say(text: str = "", indent: int = 0) -> None:
    print(textwrap.indent(text, " " * indent), flush=True)


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
    Stop every process in the demo's namespaces and remove them, by name.
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


def run(arguments: argparse.Namespace) -> int:
    ipv6 = arguments.ipv6
    server, client = (SERVER_V6, CLIENT_V6) if ipv6 else (SERVER_V4, CLIENT_V4)
    url = f"https://[{server}]/{PAGE}" if ipv6 else f"https://{server}/{PAGE}"
    directory = Path(tempfile.mkdtemp(prefix="shifter-demo-"))
    os.chmod(directory, 0o755)  # Squid runs as the 'proxy' user.
    say("Shifter demo: a gateway in three network namespaces on this machine.")
    net = Gateway(directory, prefix=arguments.name)
    keep = False
    try:
        say(f"  client   {client:<16} no proxy settings at all")
        say(f"  gateway  {GATEWAY_V4:<16} Squid on 127.0.0.1:{SQUID_PORT}, Shifter on port {SHIFTER_PORT}")
        say(f"  server   {server:<16} an HTTPS site with a throwaway certificate")
        say(f"  (namespaces {net.prefix}-client, -gw, -srv; files in {directory})")
        say()

        web = WebServer(net.server, directory / "web")
        (web.site / PAGE).write_text(f"Hello from {server}, through Shifter and Squid.\n")
        web.start()
        squid = Squid(net.gateway, directory / "squid")
        squid.start()
        shifter = ShifterProcess(
            net.gateway, directory,
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:",
            "--proxy", f"127.0.0.1:{SQUID_PORT}",
            "--resolver", arguments.resolver,
        )
        shifter.start()

        iptables = "ip6tables" if ipv6 else "iptables"
        rule = [iptables, "-t", "nat", "-A", "PREROUTING", "-i", "c1", "-p", "tcp",
                "--dport", "443", "-j", "REDIRECT", "--to-ports", str(SHIFTER_PORT)]
        net.gateway.run(*rule)
        say("1. The gateway redirects HTTPS arriving from the client's link (c1) to Shifter:")
        say(" ".join(rule), 5)

        say(f"2. The client fetches the page as any unconfigured client would:")
        say(f"curl --cacert server.pem {url}", 5)
        fetched = net.client.run(
            "curl", "-sS", "--max-time", "20", "--cacert", str(web.cert), url, check=False
        )
        if fetched.returncode != 0:
            say(f"curl failed: {fetched.stderr.strip()}", 5)
            say(shifter.logText()[-2000:], 5)
            return 1
        say(f"-> {fetched.stdout.strip()}", 5)

        counters = net.gateway.run(iptables, "-t", "nat", "-L", "PREROUTING", "-v", "-n", "-x").stdout
        packets = re.search(r"^\s*(\d+)\s+\d+\s+REDIRECT", counters, re.M)
        say(f"3. The rule matched {packets.group(1) if packets else '?'} packet(s): the SYN went to Shifter, not the server.")

        tunnel = shifter.waitForLog("tunnel ", " closed")
        started = shifter.waitForLog("accepting redirected connections")
        resolver = re.search(r"\(resolver (\S+),", started)
        destination = re.search(r"-> (\S+) via", tunnel)
        say(
            f"4. Shifter asked the kernel where the connection was going (resolver "
            f"{resolver.group(1) if resolver else '?'}): {destination.group(1) if destination else '?'}"
        )
        connect = squid.waitForLog("CONNECT ")
        say("5. Squid logged the CONNECT that Shifter sent:")
        say(" ".join(connect.split()), 5)
        say("6. Shifter logged the tunnel:")
        say(tunnel.split("] ", 1)[-1], 5)
        traffic = re.search(r"(\d+) bytes up, (\d+) bytes down", tunnel)
        if traffic:
            say(
                f"7. Bytes: {traffic.group(1)} from the client to the server, "
                f"{traffic.group(2)} back (TLS handshake, request and page)."
            )
        say()
        if arguments.keep:
            keep = True
            say("Left running for you to explore, for example:")
            say(f"ip netns exec {net.prefix}-client curl --cacert {web.cert} {url}", 2)
            say(f"tail -f {shifter.log}", 2)
            say(f"tail -f {squid.accessLog}", 2)
            say("Tear it down with:")
            say(f"make demo-down NAME={net.prefix}", 2)
        return 0
    finally:
        if not keep:
            net.destroy()
            tearDown(net.prefix)
            shutil.rmtree(directory, ignore_errors=True)
            say("Torn down: the demo's processes are stopped and its namespaces removed.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipv6", action="store_true", help="use IPv6 between client and server")
    parser.add_argument("--resolver", default="sockopt", help="Shifter's --resolver (default: sockopt)")
    parser.add_argument("--keep", action="store_true", help="leave the gateway running to explore")
    parser.add_argument("--name", default=None, help="prefix of the namespaces' names")
    parser.add_argument("--down", metavar="PREFIX", help="tear down a demo left running, and exit")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("The demo builds network namespaces: run it as root.", file=sys.stderr)
        return 2
    if arguments.down:
        tearDown(arguments.down)
        print(f"Torn down: {arguments.down}-client, -gw, -srv.")
        return 0
    interruptOnTerm()
    try:
        return run(arguments)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
