"""
First-byte latency of each resolver, measured in one run: for each, a fresh
gateway in network namespaces (tests/gateway.py) with the rules that
C{python -m shifter.rules} prints, a real Squid, C{twistd shifter} with the
resolver, and an echo server behind it.  A client makes COUNT connections
one after another and times each from the start of connect() to the first
byte echoed back (through Shifter and Squid), and to connect()'s return.
Prints the medians and what each mode adds over the first one measured.
Reports, never asserts.

    sudo .venv/bin/python bench/resolver_latency.py [COUNT [ROUNDS [MODE,...]]]

MODE is one of sockopt, conntrack, nfqueue, nfqueue-hold-syn (nfqueue with
--hold-syn: the SYN held until Squid has answered CONNECT) and tproxy;
all but nfqueue-hold-syn by default.  For --hold-syn against plain nfqueue:

    sudo .venv/bin/python bench/resolver_latency.py 300 3 nfqueue,nfqueue-hold-syn
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import SERVER_V4, SHIFTER_PORT, SQUID_PORT, Gateway, ShifterProcess, Squid  # noqa: E402
from tests.test_resolvers_e2e import PEER, printedRules  # noqa: E402

_ANY = f"tcp6:{SHIFTER_PORT}:interface=\\:\\:"


@dataclass(frozen=True)
class Mode:
    name: str
    resolver: str
    listen: str = _ANY
    options: tuple[str, ...] = ()  # for the rules command and for Shifter alike


MODES = {
    mode.name: mode
    for mode in [
        Mode("sockopt", "sockopt"),
        Mode("conntrack", "conntrack"),
        Mode("nfqueue", "nfqueue"),
        # As python -m shifter.rules --hold-syn prints Shifter's command line.
        Mode("nfqueue-hold-syn", "nfqueue", f"{_ANY}:backlog=1024", ("--hold-syn",)),
        Mode("tproxy", "tproxy", f"tproxy:{SHIFTER_PORT}:interface=\\:\\:"),
    ]
}
DEFAULT_MODES = ["sockopt", "conntrack", "nfqueue", "tproxy"]


def measure(mode: Mode, count: int, directory: Path) -> list[tuple[float, float]]:
    """
    (connect, first byte) times, in seconds, of C{count} connections.
    """
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    net = Gateway(directory)
    try:
        subprocess.run(["ip", "netns", "exec", net.gateway.name, "sh", "-e"],
                       input=printedRules(mode.resolver, "iptables", *mode.options), text=True, check=True)
        squid = Squid(net.gateway, directory / "squid")
        squid.start()
        net.server.start(sys.executable, PEER, "echo", "443", logTo=directory / "echo.log")
        net.server.waitListening(443)
        shifter = ShifterProcess(net.gateway, directory, "--listen", mode.listen,
                                 "--proxy", f"127.0.0.1:{SQUID_PORT}", "--resolver", mode.resolver,
                                 *mode.options)
        shifter.start()
        net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", "20", timeout=120)  # warm-up
        out = net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", str(count), "split",
                             timeout=600)
        pairs = [pair.split("/") for pair in out.stdout.split()]
        return [(float(connect), float(first)) for connect, first in pairs]
    finally:
        net.destroy()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else DEFAULT_MODES
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {', '.join(unknown)}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="shifter-latency-") as tmp:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        # Rounds, each mode once per round on a fresh gateway, so that a
        # slow spell of the machine does not land on one mode alone.
        for round in range(rounds):
            for name in names:
                samples[name] += measure(MODES[name], count, Path(tmp) / f"{name}-{round}")
        medians = {}
        for name in names:
            connects = [c for c, _ in samples[name]]
            firsts = [f for _, f in samples[name]]
            medians[name] = statistics.median(firsts)
            q = statistics.quantiles(firsts, n=100)
            print(f"{name:17} first byte median {medians[name] * 1e3:7.3f} ms "
                  f"(quartiles {q[24] * 1e3:.3f} / {q[74] * 1e3:.3f}, p99 {q[98] * 1e3:.3f} ms); "
                  f"connect() median {statistics.median(connects) * 1e3:.3f} ms; {len(firsts)} connections")
        base = names[0]
        print(f"added first-byte latency over {base} (median):")
        for name in names:
            print(f"  {name:17} {(medians[name] - medians[base]) * 1e6:+8.1f} us")


if __name__ == "__main__":
    main()
