"""
First-byte latency of NTLM tunnels against plain ones, measured in one run:
for each, a fresh gateway in network namespaces (tests/gateway.py) with
the REDIRECT rules, a real Squid (asking for NTLM through ntlm_fake_auth,
or asking for nothing), C{twistd shifter} and an echo server behind it.  A
client makes COUNT connections one after another and times each from the
start of connect() to the first byte echoed back.  NTLM costs one more
round trip between Shifter and Squid (negotiate, challenge, then
authenticate: tests/test_ntlm_e2e.py counts one 407 per tunnel), plus
the work of Squid's helper and of both sides' NTLM.  Reports, never
asserts.

    sudo .venv/bin/python bench/ntlm_latency.py [COUNT [ROUNDS]]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway import SERVER_V4, SQUID_PORT, Gateway, ShifterProcess, Squid  # noqa: E402
from tests.test_resolvers_e2e import PEER  # noqa: E402

NTLM_SQUID = (
    "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\nauth_param ntlm children 5\n"
    "acl authed proxy_auth REQUIRED\n"
)
MODES = {
    "plain": ("http_access allow localhost\n", ""),
    "ntlm": ("http_access allow localhost authed\n", NTLM_SQUID),
}


def measure(mode: str, count: int, directory: Path) -> list[float]:
    """
    The first-byte times, in seconds, of C{count} connections.
    """
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    net = Gateway(directory)
    try:
        net.redirect(443)
        access, extra = MODES[mode]
        squid = Squid(net.gateway, directory / "squid", access=access, extra=extra)
        squid.start()
        net.server.start(sys.executable, PEER, "echo", "443", logTo=directory / "echo.log")
        net.server.waitListening(443)
        options: tuple[str, ...] = ()
        if mode == "ntlm":
            credentials = directory / "credentials"
            credentials.write_text("CORP\\alice:s3cret\n")
            options = ("--proxy-credentials", str(credentials))
        shifter = ShifterProcess(net.gateway, directory, "--listen", "tcp6:12345:interface=\\:\\:",
                                 "--proxy", f"127.0.0.1:{SQUID_PORT}", *options)
        shifter.start()
        net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", "20", timeout=120)  # warm-up
        out = net.client.run(sys.executable, PEER, "latency", SERVER_V4, "443", str(count), timeout=600)
        return [float(value) for value in out.stdout.split()]
    finally:
        net.destroy()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="shifter-ntlm-latency-") as tmp:
        samples: dict[str, list[float]] = {name: [] for name in MODES}
        # Rounds, each mode once per round on a fresh gateway, so that a
        # slow spell of the machine does not land on one mode alone.
        for round in range(rounds):
            for name in MODES:
                samples[name] += measure(name, count, Path(tmp) / f"{name}-{round}")
        medians = {}
        for name, firsts in samples.items():
            medians[name] = statistics.median(firsts)
            q = statistics.quantiles(firsts, n=100)
            print(f"{name:6} first byte median {medians[name] * 1e3:8.3f} ms "
                  f"(quartiles {q[24] * 1e3:.3f} / {q[74] * 1e3:.3f}, p99 {q[98] * 1e3:.3f} ms); "
                  f"{len(firsts)} connections")
        added = medians["ntlm"] - medians["plain"]
        print(f"NTLM adds {added * 1e3:+.3f} ms to the median")


if __name__ == "__main__":
    main()
