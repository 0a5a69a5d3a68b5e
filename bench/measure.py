"""
The measurements, and the CPU accounting around each of them.

Every measurement runs inside a L{Window}: before and after it, the
machine's CPU counters (/proc/stat) and every process's CPU times
(/proc/<pid>/stat) are read.  From the two readings come:

  - the CPU seconds used by the redirector's processes and by Squid;
  - "ours": every process in the benchmark's namespaces, and the benchmark
    itself with the client programs it ran and waited for;
  - "kernel threads" (ksoftirqd, kworkers: mostly moving our packets);
  - "others": the machine's busy time less ours and the kernel threads'
    -- the CPU that other users of the machine took meanwhile;
  - "steal": time the hypervisor gave to other guests.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.lab import NOFILE, SERVER, Lab, Redirector, descendants, raiseNofile

TICK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


def readProcess(pid: int) -> tuple[tuple[int, int], float, bool] | None:
    """
    (identity, CPU seconds used by the process and its reaped children,
    whether it is a kernel thread) for C{pid}, or None if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5).
    flags = int(fields[6])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    start = int(fields[19])
    return (pid, start), (utime + stime + cutime + cstime) / TICK, bool(flags & PF_KTHREAD)


def cpuSeconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        info = readProcess(pid)
        if info is not None:
            total += info[1]
    return total


def rssBytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def fdKinds(pids: list[int]) -> dict[str, int]:
    """
    The processes' descriptors by kind: socket, pipe, anon_inode:[eventpoll]...
    """
    kinds: dict[str, int] = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            kind = target.split(":[", 1)[0] if ":[" in target else ("file" if target.startswith("/") else target)
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def fdCount(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


@dataclass
class Reading:
    time: float
    stat: list[int]
    processes: dict[tuple[int, int], tuple[float, str]]
    redirector: float
    squid: float


class Window:
    """
    CPU accounting over one measurement; see the module docstring.
    """

    def __init__(self, lab: Lab, redirector: Redirector) -> None:
        self.lab = lab
        self.redirector = redirector
        self.ourNetns = lab.ourNetns()

    def read(self) -> Reading:
        with open("/proc/stat") as f:
            stat = [int(x) for x in f.readline().split()[1:]]
        processes = {}
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            info = readProcess(pid)
            if info is None:
                continue
            key, seconds, kthread = info
            if kthread:
                kind = "kthread"
            elif pid == me:
                kind = "ours"
            else:
                try:
                    inode = os.stat(f"/proc/{pid}/ns/net").st_ino
                except OSError:
                    continue
                kind = "ours" if inode in self.ourNetns else "others"
            processes[key] = (seconds, kind)
        return Reading(
            time.monotonic(), stat, processes,
            cpuSeconds(self.lab.redirectorPids(self.redirector)),
            cpuSeconds(self.lab.squidPids()),
        )

    def __enter__(self) -> "Window":
        self.start = self.read()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.end = self.read()

    def account(self) -> dict:
        a, b = self.start, self.end
        wall = b.time - a.time
        # user nice system idle iowait irq softirq steal guest guest_nice
        busy = lambda s: (s[0] + s[1] + s[2] + s[5] + s[6]) / TICK  # noqa: E731
        used = {"ours": 0.0, "kthread": 0.0, "others": 0.0}
        for key, (seconds, kind) in b.processes.items():
            before = a.processes.get(key, (0.0, kind))[0]
            used[kind] += max(0.0, seconds - before)
        machineBusy = busy(b.stat) - busy(a.stat)
        others = max(0.0, machineBusy - used["ours"] - used["kthread"])
        return {
            "wall": wall,
            "redirector_cpu": b.redirector - a.redirector,
            "squid_cpu": b.squid - a.squid,
            "machine_busy_cores": machineBusy / wall,
            "ours_cores": used["ours"] / wall,
            "kthreads_cores": used["kthread"] / wall,
            "others_cores": others / wall,
            "others_processes_cores": used["others"] / wall,
            "steal_cores": (b.stat[7] - a.stat[7]) / TICK / wall,
        }


def quietOthers(lab: Lab, redirector: Redirector, seconds: float = 0.5) -> float:
    """
    The cores other users of the machine are using now, over C{seconds}.
    """
    with Window(lab, redirector) as w:
        time.sleep(seconds)
    return w.account()["others_cores"]


# -- the measurements --------------------------------------------------------


@dataclass
class Settings:
    seconds: float = 3.0
    cpsConnections: int = 32
    latencyCount: int = 2000
    tunnels: int = 10000
    firstbyte: Path = field(default_factory=Path)
    idleScript: Path = field(default_factory=Path)


def throughput(lab: Lab, r: Redirector, s: Settings, streams: int) -> dict:
    """
    iperf3 from the client to the server, C{streams} parallel streams.
    """
    done = subprocess.run(
        lab.client.command(
            "iperf3", "-c", SERVER, "-p", str(r.iperfPort), "-t", f"{s.seconds:g}",
            "-P", str(streams), "-J", "--connect-timeout", "5000",
        ),
        capture_output=True, text=True, timeout=s.seconds + 30,
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 gave no report: {done.stderr.strip() or done.stdout[:300]}") from None
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    return {
        "bits_per_second": received["bits_per_second"],
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
    }


_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(m?s)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def connectionsPerSecond(lab: Lab, r: Redirector, s: Settings) -> dict:
    """
    wrk with one request per connection (C{Connection: close}).
    """
    seconds = max(1, round(s.seconds))
    done = subprocess.run(
        lab.client.command(
            "wrk", "-t", "2", "-c", str(s.cpsConnections), "-d", f"{seconds}s", "--timeout", "5s",
            "-H", "Connection: close", f"http://{SERVER}:{r.httpPort}/index.html",
        ),
        capture_output=True, text=True, timeout=seconds + 30, preexec_fn=raiseNofile,
    )
    match = _WRK_REQUESTS.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout[:300]}")
    requests = int(match.group(1))
    elapsed = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    errors = _WRK_ERRORS.search(done.stdout)
    non2xx = _WRK_NON2XX.search(done.stdout)
    errorCounts = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) if errors else {}
    good = requests - (int(non2xx.group(1)) if non2xx else 0)
    return {
        "connections": good,
        "requests": requests,
        "seconds": elapsed,
        "connections_per_second": good / elapsed,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errorCounts,
    }


def latency(lab: Lab, r: Redirector, s: Settings) -> dict:
    """
    Connect-to-first-byte over many sequential connections (bench/firstbyte.c).
    """
    limit = max(5.0, s.latencyCount * 0.01)
    done = subprocess.run(
        lab.client.command(str(s.firstbyte), SERVER, str(r.httpPort), str(s.latencyCount), f"{limit:g}"),
        capture_output=True, text=True, timeout=limit + 30,
    )
    samples, errors = [], {}
    for line in done.stdout.splitlines():
        if line.startswith("E "):
            errors[line[2:]] = errors.get(line[2:], 0) + 1
        elif line:
            samples.append(int(line) / 1e6)
    if not samples:
        raise RuntimeError(f"no connection answered: {errors or done.stderr.strip()}")
    samples.sort()
    return {
        "connections": len(samples),
        "errors": errors,
        "median_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)],
        "mean_ms": statistics.fmean(samples),
        "min_ms": samples[0],
        "max_ms": samples[-1],
    }


class Holding:
    """
    C{count} idle tunnels through C{r}, held by bench/idle.py in the client
    namespace for as long as the block runs.
    """

    def __init__(self, lab: Lab, r: Redirector, s: Settings, count: int) -> None:
        self.command = lab.client.command(
            "python3", str(s.idleScript), SERVER, str(r.httpPort), str(count), f"{30 + count / 500:g}"
        )

    def __enter__(self) -> "Holding":
        self.holder = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=raiseNofile,
        )
        line = self.holder.stdout.readline().split()
        if len(line) < 4 or line[0] != "open":
            self.__exit__()
            raise RuntimeError(f"idle tunnel holder failed: {self.holder.stderr.read()[-500:]}")
        self.opened, self.failed, self.failures = int(line[1]), int(line[3]), " ".join(line[4:])
        if not self.opened:
            self.__exit__()
            raise RuntimeError(f"no idle tunnel could be opened: {self.failures}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.holder.poll() is None:
            self.holder.stdin.close()
        try:
            self.holder.wait(60)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()


def _waitClosed(pids: list[int], fds: int) -> None:
    deadline = time.monotonic() + 60
    while fdCount(pids) > fds + 16 and time.monotonic() < deadline:
        time.sleep(0.2)


def idleMemory(lab: Lab, r: Redirector, s: Settings) -> dict:
    """
    The redirector's RSS with C{s.tunnels} idle tunnels open through it, or
    as many as the descriptor limit allows it: a probe of a few tunnels
    first finds how many descriptors each takes (two sockets; more for a
    relay that keeps splice pipes per tunnel).
    """
    pids = lab.redirectorPids(r)
    fdsBefore = fdCount(pids)
    rssBefore = rssBytes(pids)
    squidBefore = rssBytes(lab.squidPids())
    probe = min(50, s.tunnels)
    with Holding(lab, r, s, probe) as held:
        time.sleep(0.3)
        fdsPerTunnel = max(2.0, (fdCount(descendants(pids[:1])) - fdsBefore) / held.opened)
    _waitClosed(pids, fdsBefore)
    count = min(s.tunnels, int((NOFILE - 400) / math.ceil(fdsPerTunnel)))
    with Holding(lab, r, s, count) as held:
        time.sleep(1.0)
        pids = descendants(pids[:1])
        rssWith = rssBytes(pids)
        fdsWith = fdCount(pids)
        fdKindsWith = fdKinds(pids)
        squidWith = rssBytes(lab.squidPids())
    _waitClosed(pids, fdsBefore)
    return {
        "tunnels": held.opened,
        "tunnels_wanted": s.tunnels,
        "failed": held.failed,
        "failures": held.failures,
        "rss_before": rssBefore,
        "rss_with": rssWith,
        # Against the RSS at start: the heap a Python process grew during
        # earlier measurements is not given back, so "just before" can be
        # as high as "with".
        "rss_at_start": lab.startRss[r.key],
        "rss_per_tunnel": (rssWith - lab.startRss[r.key]) / held.opened,
        "rss_per_tunnel_marginal": (rssWith - rssBefore) / held.opened,
        "fds_before": fdsBefore,
        "fds_with": fdsWith,
        "fds_per_tunnel": (fdsWith - fdsBefore) / held.opened,
        "fd_kinds_with": fdKindsWith,
        "squid_rss_before": squidBefore,
        "squid_rss_with": squidWith,
    }
