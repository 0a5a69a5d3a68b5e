"""
What a burst of new connections costs its clients, with Shifter's
listening queue of 1024 (what C{--listen} gets when it names no backlog)
against Twisted's default of 50.

A network namespace of its own holds a real C{twistd shifter} on its
loopback and a client that starts C{--connections} non-blocking
C{connect()}s at once, then waits for each to complete.  A SYN that finds
the listening queue full is dropped and sent again a second later, so the
figures are, for each queue length: the kernel's count of listen queue
overflows (C{TcpExtListenOverflows}, from C{nstat}), and how many
connections took a second or more to be established.  The two queue
lengths alternate, C{--reps} times each.

Shifter refuses these connections (they were not redirected), which is
the cheapest thing it does with a connection: what is measured is how fast
its accept loop empties the queue, not the tunnel.

Reports, never asserts.  Needs root and the project's venv:

    sudo .venv/bin/python bench/burst.py [--connections N] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"
PORT = 15000

# The client, run inside the namespace: N connects at once, then the time
# each took to complete (or None if it never did within the wait).
_CLIENT = """
import json, selectors, socket, sys, time
count, port, wait = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
selector = selectors.DefaultSelector()
started = {}
for _ in range(count):
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    started[sock] = time.monotonic()
    selector.register(sock, selectors.EVENT_WRITE)
took = []
deadline = time.monotonic() + wait
while started and time.monotonic() < deadline:
    for key, _ in selector.select(0.1):
        sock = key.fileobj
        selector.unregister(sock)
        took.append(time.monotonic() - started.pop(sock))
        sock.close()
print(json.dumps({"took": took, "incomplete": len(started)}))
"""


def inside(namespace: str, *command: str, **options) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(["ip", "netns", "exec", namespace, *command], check=True, **options)


def overflows(namespace: str) -> int:
    out = inside(namespace, "nstat", "-z", "TcpExtListenOverflows", capture_output=True, text=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpExtListenOverflows"))


def listening(namespace: str) -> bool:
    return bool(inside(namespace, "ss", "-Hltn", f"sport = :{PORT}", capture_output=True).stdout.strip())


def burst(namespace: str, listen: str, connections: int, directory: Path) -> dict:
    """
    One Shifter listening on C{listen}, one burst against it.
    """
    environment = dict(os.environ, PYTHONPATH=str(PROJECT))
    shifter = subprocess.Popen(
        ["ip", "netns", "exec", namespace, str(TWISTD), "-n", "--pidfile=", f"--logfile={directory / 'shifter.log'}",
         "shifter", "--proxy", "127.0.0.1:9", "--listen", listen, "--max-connections-per-client", "0"],
        env=environment,
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(namespace):
            if time.monotonic() > deadline or shifter.poll() is not None:
                raise SystemExit(f"bench: Shifter did not start; see {directory / 'shifter.log'}")
            time.sleep(0.1)
        overflows(namespace)  # nstat's history now starts here
        result = inside(
            namespace, sys.executable, "-c", _CLIENT, str(connections), str(PORT), "10",
            capture_output=True, text=True,
        )
        figures = json.loads(result.stdout)
        figures["overflows"] = overflows(namespace)
        return figures
    finally:
        shifter.terminate()
        shifter.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="connections per burst (2000)")
    parser.add_argument("--reps", type=int, default=3, help="bursts for each queue length (3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (a network namespace of its own)")
    namespace = f"shburst{os.getpid()}"
    directory = Path(f"/tmp/{namespace}")
    directory.mkdir()
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        inside(namespace, "ip", "link", "set", "lo", "up")
        queues = {
            "50": f"tcp:{PORT}:interface=127.0.0.1:backlog=50",
            "1024 (default)": f"tcp:{PORT}:interface=127.0.0.1",
        }
        results: dict[str, list[dict]] = {name: [] for name in queues}
        for rep in range(args.reps):
            for name, listen in queues.items():
                figures = burst(namespace, listen, args.connections, directory)
                slow = sum(took >= 1.0 for took in figures["took"])
                print(f"[{rep + 1}/{args.reps}] queue {name:>14}: {figures['overflows']:5d} overflows, "
                      f"{slow:4d} of {args.connections} connections took 1 s or more, "
                      f"{figures['incomplete']} incomplete", flush=True)
                results[name].append(figures)
        print(f"\nMedians of {args.reps} bursts of {args.connections} connections (Shifter's log: {directory}):")
        medians = {}
        for name, runs in results.items():
            medians[name] = (
                statistics.median(run["overflows"] for run in runs),
                statistics.median(sum(took >= 1.0 for took in run["took"]) for run in runs),
            )
            print(f"  queue {name:>14}: {medians[name][0]:g} overflows, {medians[name][1]:g} connections delayed 1 s+")
        old, new = medians["50"], medians["1024 (default)"]
        if old[0]:
            print(f"  overflows, 1024 against 50: {new[0] / old[0]:.2f}x")
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    main()
