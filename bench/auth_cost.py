"""
What logging in to the upstream proxy costs Shifter, per tunnel: plain
(Squid asks for nothing), Negotiate (a real MIT KDC and Squid's
C{negotiate_kerberos_auth}, as in tests/test_kerberos_e2e.py) and NTLM
(Squid's C{ntlm_fake_auth}), measured in one run.  Shifter names the proxy
by its host name in all three, as Negotiate needs it (C{proxy.shifter.test}
in the gateway namespace's hosts file); C{address}, plain to the proxy
named by its address, shows what the name itself costs.

For each mode, a fresh gateway in network namespaces (tests/gateway.py)
with the REDIRECT rules, a real Squid, C{twistd shifter} and an echo
server behind it.  After a warm-up (which takes Negotiate's first 407: from
then on each CONNECT carries a token of its own), a client makes COUNT
connections one after another, each timed from the start of connect() to
the first byte echoed back, while the Shifter process's CPU time (user and
system, C{/proc/PID/task/*/schedstat}) is read before and after.  Printed: CPU per 1,000
tunnels and its ratio to plain's, the first-byte median and its
difference to plain's, and the 407s Squid logged per tunnel (NTLM's extra
round trip is one 407 per tunnel; Negotiate's token goes with the first
CONNECT from the second tunnel on).  The ticket helper, a child process that runs at
start and before the tickets expire, is not counted: it does not run per
tunnel.  Reports, never asserts.

    sudo .venv/bin/python bench/auth_cost.py [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import SERVER_V4, SQUID_PORT, Gateway, ShifterProcess, Squid  # noqa: E402
from tests.kerberos import REALM, Realm  # noqa: E402
from tests.test_resolvers_e2e import PEER  # noqa: E402

PROXY_NAME = "proxy.shifter.test"
GATEWAY_PRINCIPAL = f"host/gw.shifter.test@{REALM}"
SERVICE = f"HTTP/{PROXY_NAME}@{REALM}"
AUTHED = "acl authed proxy_auth REQUIRED\n"
MODES = ("plain", "negotiate", "ntlm", "address")


def cpuSeconds(pid: int) -> float:
    """
    The CPU seconds (user and system) process C{pid}'s threads have used
    so far, to the nanosecond: the scheduler's own count
    (C{/proc/PID/task/*/schedstat}), where C{/proc/PID/stat} counts whole
    clock ticks.
    """
    return sum(int(path.read_text().split()[0]) for path in Path(f"/proc/{pid}/task").glob("*/schedstat")) / 1e9


def negotiateSetup(net: Gateway, directory: Path) -> tuple[str, tuple[str, ...]]:
    """
    A realm in the gateway namespace and C{KRB5_CONFIG} pointing at the
    realm (for Shifter, started from this environment); Squid's lines and
    Shifter's options.
    """
    realm = Realm(net.gateway, directory / "realm")
    realm.addPrincipal(GATEWAY_PRINCIPAL)
    realm.addPrincipal(SERVICE)
    keytab = realm.keytab(directory / "gateway.keytab", GATEWAY_PRINCIPAL)
    httpKeytab = realm.keytab(directory / "http.keytab", SERVICE)
    subprocess.run(["chown", "proxy", str(httpKeytab)], check=True)
    realm.start()
    os.environ["KRB5_CONFIG"] = str(realm.krb5conf)
    squid = (
        f"auth_param negotiate program /usr/bin/env KRB5_KTNAME={httpKeytab} "
        f"KRB5_CONFIG={realm.krb5conf} /usr/lib/squid/negotiate_kerberos_auth -s {SERVICE}\n"
        "auth_param negotiate children 20 startup=5\nauth_param negotiate keep_alive on\n" + AUTHED
    )
    return squid, ("--proxy-keytab", str(keytab))


def measure(mode: str, count: int, directory: Path) -> tuple[list[float], float, float]:
    """
    The first-byte times, in seconds, of C{count} sequential tunnels,
    Shifter's CPU seconds for them, and Squid's 407 answers per tunnel
    (warm-up included).
    """
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    net = Gateway(directory)
    previous = os.environ.get("KRB5_CONFIG")
    try:
        net.redirect(443)
        # The gateway namespace's own hosts file names the proxy.
        hosts = Path("/etc/netns") / net.gateway.name
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost {PROXY_NAME}\n::1 localhost\n")
        access = "http_access allow localhost\n"
        extra = ""
        # Named as Negotiate needs it named, in every mode but address.
        options: tuple[str, ...] = ("--proxy", f"{PROXY_NAME}:{SQUID_PORT}")
        if mode == "address":
            options = ("--proxy", f"127.0.0.1:{SQUID_PORT}")
        if mode == "negotiate":
            extra, keytab = negotiateSetup(net, directory)
            options += keytab
        elif mode == "ntlm":
            extra = "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\nauth_param ntlm children 5\n" + AUTHED
            credentials = directory / "credentials"
            credentials.write_text("CORP\\alice:s3cret\n")
            options += ("--proxy-credentials", str(credentials))
        if mode in ("negotiate", "ntlm"):
            access = "http_access allow localhost authed\n"
        squid = Squid(net.gateway, directory / "squid", access=access, extra=extra)
        squid.start()
        net.server.start(sys.executable, PEER, "echo", "443", logTo=directory / "echo.log")
        net.server.waitListening(443)
        shifter = ShifterProcess(net.gateway, directory, "--listen", "tcp6:12345:interface=\\:\\:", *options)
        shifter.start()
        assert shifter.process is not None
        net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", "20", timeout=120)  # warm-up
        before = cpuSeconds(shifter.process.pid)
        out = net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", str(count), timeout=600)
        cpu = cpuSeconds(shifter.process.pid) - before
        lines = squid.accessLogLines()
        tunnels = [l for l in lines if "TCP_TUNNEL/200" in l]
        if mode in ("negotiate", "ntlm"):
            # Every tunnel logged in: none was let through unauthenticated.
            assert all(l.split()[7] != "-" for l in tunnels), "a tunnel without a login"
        refusals = sum("/407 " in l for l in lines) / max(1, len(tunnels))
        return [float(value) for value in out.stdout.split()], cpu, refusals
    finally:
        if previous is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = previous
        net.destroy()
        shutil.rmtree(Path("/etc/netns") / net.gateway.name, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="tunnels per mode and round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each mode once per round (default 3)")
    parser.add_argument("--only", default=",".join(MODES), help="a comma-separated subset of " + ", ".join(MODES))
    arguments = parser.parse_args()
    count = max(1, min(arguments.count, 20000))
    modes = [m for m in MODES if m in arguments.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="shifter-auth-cost-") as tmp:
        firsts: dict[str, list[float]] = {name: [] for name in modes}
        cpus: dict[str, list[float]] = {name: [] for name in modes}
        refusals: dict[str, list[float]] = {name: [] for name in modes}
        # Rounds, each mode once per round on a fresh gateway, so that a
        # slow spell of the machine does not land on one mode alone.
        for round in range(max(1, arguments.rounds)):
            for name in modes:
                times, cpu, perTunnel = measure(name, count, Path(tmp) / f"{name}-{round}")
                refusals[name].append(perTunnel)
                firsts[name] += times
                cpus[name].append(cpu * 1000 / count)
                print(f"round {round} {name:9} CPU {cpu * 1000 / count:6.3f} s per 1,000 tunnels, "
                      f"first byte median {statistics.median(times) * 1e3:.3f} ms", flush=True)
        perThousand = {name: statistics.median(values) for name, values in cpus.items()}
        medians = {name: statistics.median(values) for name, values in firsts.items()}
        print()
        for name in modes:
            ratio = ""
            if "plain" in modes and all(cpus["plain"]):
                rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(cpus[name], cpus["plain"]))
                ratio = f" ({perThousand[name] / perThousand['plain']:.2f}x plain; by round {rounds})"
            added = f" ({(medians[name] - medians['plain']) * 1e3:+.3f} ms)" if "plain" in modes else ""
            print(f"{name:9} CPU {perThousand[name]:6.3f} s per 1,000 tunnels{ratio}; "
                  f"first byte median {medians[name] * 1e3:.3f} ms{added}; "
                  f"407s per tunnel {statistics.mean(refusals[name]):.3f}; "
                  f"{len(firsts[name])} tunnels")


if __name__ == "__main__":
    main()
