"""
First-byte latency of each resolver, measured in one run: for each, a fresh
gateway in network namespaces (tests/gateway.py) with the rules that
C{python -m shifter.rules} prints, a real Squid, C{twistd shifter} with the
resolver, and an echo server behind it.  A client makes COUNT connections
one after another and times each from the start of connect() to the first
byte echoed back (through Shifter and Squid).  Prints the medians and what
each resolver adds over sockopt.  Reports, never asserts.

    sudo .venv/bin/python bench/resolver_latency.py [COUNT [ROUNDS]]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import SERVER_V4, SHIFTER_PORT, SQUID_PORT, Gateway, ShifterProcess, Squid  # noqa: E402
from tests.test_resolvers_e2e import PEER, printedRules  # noqa: E402

RESOLVERS = [
    ("sockopt", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"),
    ("conntrack", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"),
    ("nfqueue", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"),
    ("tproxy", f"tproxy:{SHIFTER_PORT}:interface=\\:\\:"),
]


def measure(resolver: str, listen: str, count: int, directory: Path) -> list[float]:
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    net = Gateway(directory)
    try:
        subprocess.run(["ip", "netns", "exec", net.gateway.name, "sh", "-e"],
                       input=printedRules(resolver, "iptables"), text=True, check=True)
        squid = Squid(net.gateway, directory / "squid")
        squid.start()
        net.server.start(sys.executable, PEER, "echo", "443", logTo=directory / "echo.log")
        net.server.waitListening(443)
        shifter = ShifterProcess(net.gateway, directory, "--listen", listen,
                                 "--proxy", f"127.0.0.1:{SQUID_PORT}", "--resolver", resolver)
        shifter.start()
        net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", "20", timeout=120)  # warm-up
        out = net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", str(count), timeout=600)
        return [float(t) for t in out.stdout.split()]
    finally:
        net.destroy()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="shifter-latency-") as tmp:
        medians = {}
        samples: dict[str, list[float]] = {resolver: [] for resolver, _ in RESOLVERS}
        # Rounds, each resolver once per round on a fresh gateway, so that a
        # slow spell of the machine does not land on one resolver alone.
        for round in range(rounds):
            for resolver, listen in RESOLVERS:
                samples[resolver] += measure(resolver, listen, count, Path(tmp) / f"{resolver}-{round}")
        for resolver, _ in RESOLVERS:
            times = samples[resolver]
            medians[resolver] = statistics.median(times)
            q = statistics.quantiles(times, n=4)
            print(f"{resolver:10} median {medians[resolver] * 1e3:7.3f} ms  "
                  f"(quartiles {q[0] * 1e3:.3f} / {q[2] * 1e3:.3f} ms, {len(times)} connections)")
        base = medians["sockopt"]
        print("added first-byte latency over sockopt (median):")
        for resolver in medians:
            print(f"  {resolver:10} {(medians[resolver] - base) * 1e6:+8.1f} us")


if __name__ == "__main__":
    main()
