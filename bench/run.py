"""
Shifter's benchmark: DIRECT, redsocks and Shifter on one gateway built of
network namespaces, measured from the client, interleaved, several times.

    sudo python3 bench/run.py              # the full run, a few minutes
    sudo python3 bench/run.py --smoke      # everything once, a few seconds each
    sudo python3 bench/run.py --only shifter,cps --profile /tmp/prof

Prints a table of medians with ratios to DIRECT and to redsocks, and writes
every raw number to --output (bench/results.json).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lab as labModule  # noqa: E402
from bench import measure  # noqa: E402
from bench.lab import DIRECT, PROJECT, REDIRECTORS, REDSOCKS, SHIFTER, Lab, Redirector  # noqa: E402
from bench.profile import Profiler, summarize  # noqa: E402

HERE = Path(__file__).resolve().parent
MEASUREMENTS = ("memory", "latency", "cps", "throughput1", "throughput8")
APT_PACKAGES = "iproute2 iptables squid nginx-light iperf3 wrk redsocks gcc libc6-dev python3"


def bytesPerGB(value: float) -> float:
    return value / 1e9


# key, label, unit, measurement, value from a record (None: not applicable)
FIGURES = [
    ("throughput_1", "throughput, 1 stream", "Gbit/s", "throughput1",
     lambda rec: rec["result"]["bits_per_second"] / 1e9),
    ("throughput_8", "throughput, 8 streams", "Gbit/s", "throughput8",
     lambda rec: rec["result"]["bits_per_second"] / 1e9),
    ("cps", "new connections per second", "conn/s", "cps",
     lambda rec: rec["result"]["connections_per_second"]),
    ("latency_median", "connect to first byte, median", "ms", "latency",
     lambda rec: rec["result"]["median_ms"]),
    ("latency_p99", "connect to first byte, p99", "ms", "latency",
     lambda rec: rec["result"]["p99_ms"]),
    ("cpu_per_gb_1", "redirector CPU per GB, 1 stream", "CPU s", "throughput1",
     lambda rec: _perUnit(rec, "redirector_cpu", bytesPerGB(rec["result"]["bytes"]))),
    ("cpu_per_gb_8", "redirector CPU per GB, 8 streams", "CPU s", "throughput8",
     lambda rec: _perUnit(rec, "redirector_cpu", bytesPerGB(rec["result"]["bytes"]))),
    ("cpu_per_kconn", "redirector CPU per 1000 connections", "CPU s", "cps",
     lambda rec: _perUnit(rec, "redirector_cpu", rec["result"]["connections"] / 1000)),
    ("idle_tunnels", "idle tunnels held (the descriptor limit allowing)", "", "memory",
     lambda rec: rec["result"]["tunnels"]),
    ("rss_with_tunnels", "redirector RSS with them", "MB", "memory",
     lambda rec: rec["result"]["rss_with"] / 1e6),
    ("rss_per_tunnel", "redirector RSS per idle tunnel", "KB", "memory",
     lambda rec: rec["result"]["rss_per_tunnel"] / 1e3),
    ("fds_per_tunnel", "redirector descriptors per idle tunnel", "", "memory",
     lambda rec: rec["result"]["fds_per_tunnel"]),
    ("squid_cpu_per_gb_1", "Squid CPU per GB, 1 stream", "CPU s", "throughput1",
     lambda rec: _perUnit(rec, "squid_cpu", bytesPerGB(rec["result"]["bytes"]))),
    ("squid_cpu_per_kconn", "Squid CPU per 1000 connections", "CPU s", "cps",
     lambda rec: _perUnit(rec, "squid_cpu", rec["result"]["connections"] / 1000)),
]


def _perUnit(rec: dict, cpu: str, units: float) -> float | None:
    if rec["redirector"] == DIRECT.key and cpu == "redirector_cpu":
        return None
    if rec["redirector"] == DIRECT.key and cpu == "squid_cpu":
        return None
    return rec["cpu"][cpu] / units if units > 0 else None


# -- running -----------------------------------------------------------------


class Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(kind: str, lab: Lab, r: Redirector, settings: measure.Settings) -> dict:
    if kind == "throughput1":
        return measure.throughput(lab, r, settings, 1)
    if kind == "throughput8":
        return measure.throughput(lab, r, settings, 8)
    if kind == "cps":
        return measure.connectionsPerSecond(lab, r, settings)
    if kind == "latency":
        return measure.latency(lab, r, settings)
    if kind == "memory":
        return measure.idleMemory(lab, r, settings)
    raise ValueError(kind)


def measureOnce(lab: Lab, r: Redirector, kind: str, settings: measure.Settings, args, rep: int) -> dict:
    """
    One measurement, repeated (up to --attempts times) while other users of
    the machine took more than --threshold cores during it.  The record
    keeps the accepted attempt and a summary of the discarded ones.
    """
    attempts = []
    for attempt in range(1, args.attempts + 1):
        waited = settle(lab, r, args)
        with measure.Window(lab, r) as window:
            result = run(kind, lab, r, settings)
        cpu = window.account()
        disturbed = kind != "memory" and cpu["others_cores"] > args.threshold
        attempts.append({"attempt": attempt, "settle_wait": waited, "result": result,
                         "cpu": cpu, "disturbed": disturbed})
        if not disturbed:
            break
    chosen = min(attempts, key=lambda a: a["cpu"]["others_cores"])
    return {
        "rep": rep,
        "measurement": kind,
        "redirector": r.key,
        "attempts": len(attempts),
        "repeated": len(attempts) > 1,
        **chosen,
        "discarded": [
            {"attempt": a["attempt"], "others_cores": a["cpu"]["others_cores"],
             "result": a["result"]}
            for a in attempts if a is not chosen
        ],
    }


def settle(lab: Lab, r: Redirector, args) -> float:
    """
    Wait (at most --settle seconds, and at most --settle-budget seconds
    over the whole run) until other users of the machine are below the
    threshold; return how long that took.
    """
    started = time.monotonic()
    limit = min(args.settle, args.settleBudget)
    while time.monotonic() - started < limit:
        if measure.quietOthers(lab, r, 0.5) <= args.threshold:
            break
    waited = time.monotonic() - started
    args.settleBudget = max(0.0, args.settleBudget - waited)
    return waited


def describe(rec: dict) -> str:
    res = rec["result"]
    kind = rec["measurement"]
    if kind.startswith("throughput"):
        text = f"{res['bits_per_second'] / 1e9:.2f} Gbit/s"
    elif kind == "cps":
        text = f"{res['connections_per_second']:.0f} conn/s, errors {res['socket_errors']}"
    elif kind == "latency":
        text = f"median {res['median_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms ({res['connections']} conns)"
    else:
        text = f"{res['tunnels']} tunnels, RSS {res['rss_with'] / 1e6:.1f} MB, failed {res['failed']}"
    cpu = rec["cpu"]
    return (f"{text}; redirector {cpu['redirector_cpu']:.2f} CPU s, others {cpu['others_cores']:.2f} cores"
            + (f", attempts {rec['attempts']}" if rec["repeated"] else ""))


# -- reporting ---------------------------------------------------------------


def summarizeRecords(records: list[dict]) -> dict:
    summary: dict = {}
    for key, label, unit, kind, value in FIGURES:
        for r in REDIRECTORS:
            values = []
            for rec in records:
                if rec["measurement"] == kind and rec["redirector"] == r.key and "result" in rec:
                    v = value(rec)
                    if v is not None and math.isfinite(v):
                        values.append(v)
            if values:
                summary.setdefault(key, {})[r.key] = {
                    "median": statistics.median(values), "min": min(values), "max": max(values),
                    "n": len(values), "values": values,
                }
    return summary


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:,.{min(digits, 4)}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(summary: dict, tunnels: int) -> str:
    rows = [["figure", "unit", "DIRECT", "redsocks", "/DIRECT", "Shifter", "/DIRECT", "/redsocks"]]
    for key, label, unit, kind, _ in FIGURES:
        fig = summary.get(key, {})
        med = {r.key: fig[r.key]["median"] if r.key in fig else None for r in REDIRECTORS}
        if all(v is None for v in med.values()):
            continue
        r_ = (lambda a, b: "-") if key == "idle_tunnels" else ratio
        rows.append([
            label, unit, fmt(med["direct"]), fmt(med["redsocks"]), r_(med["redsocks"], med["direct"]),
            fmt(med["shifter"]), r_(med["shifter"], med["direct"]), r_(med["shifter"], med["redsocks"]),
        ])
    return _render(rows)


def disturbanceTable(records: list[dict]) -> str:
    rows = [["measurement", "path", "runs", "repeated", "still disturbed",
             "others cores med/max", "kthreads med", "steal max"]]
    for kind in MEASUREMENTS:
        for r in REDIRECTORS:
            recs = [rec for rec in records if rec["measurement"] == kind and rec["redirector"] == r.key
                    and "cpu" in rec]
            if not recs:
                continue
            others = [rec["cpu"]["others_cores"] for rec in recs]
            rows.append([
                kind, r.title, str(len(recs)), str(sum(rec["repeated"] for rec in recs)),
                str(sum(rec["disturbed"] for rec in recs)),
                f"{statistics.median(others):.2f} / {max(others):.2f}",
                f"{statistics.median(rec['cpu']['kthreads_cores'] for rec in recs):.2f}",
                f"{max(rec['cpu']['steal_cores'] for rec in recs):.2f}",
            ])
    return _render(rows)


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the command -------------------------------------------------------------


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="everything once, for a second, with tiny counts (for the tests)")
    p.add_argument("--only", default="",
                   help="comma-separated subset: paths (direct, redsocks, shifter) and/or "
                        "measurements (throughput, throughput1, throughput8, cps, latency, memory)")
    p.add_argument("--output", type=Path, default=HERE / "results.json", help="where the raw JSON goes")
    p.add_argument("--reps", type=int, help="repetitions of every measurement (3; smoke 1)")
    p.add_argument("--seconds", type=float, help="length of each throughput and cps run (3; smoke 1)")
    p.add_argument("--tunnels", type=int, help="idle tunnels for the memory figure (10000; smoke 100)")
    p.add_argument("--latency-count", type=int, help="sequential connections per latency run (2000; smoke 50)")
    p.add_argument("--cps-connections", type=int, default=32, help="wrk's concurrent connections (32)")
    p.add_argument("--threshold", type=float, default=0.15,
                   help="other users' CPU, in cores, above which a measurement is repeated (0.15)")
    p.add_argument("--attempts", type=int, help="most attempts of one measurement (3; smoke 1)")
    p.add_argument("--settle", type=float,
                   help="most seconds to wait for a quiet machine before each measurement (15; smoke 0)")
    p.add_argument("--settle-budget", type=float,
                   help="most seconds of such waiting over the whole run (240; smoke 0)")
    p.add_argument("--proxy-rtt", type=float, default=0.0, metavar="MS",
                   help="put Squid in a namespace of its own, this many milliseconds from the gateway "
                        "(a delay line on the gateway-to-proxy hop; 0, the default: Squid on the gateway)")
    p.add_argument("--server-rtt", type=float, default=0.0, metavar="MS",
                   help="put the server this many milliseconds away from the gateway, for every path "
                        "(a delay line on what the gateway sends toward it; 0, the default)")
    p.add_argument("--proxy-tls", action="store_true",
                   help="Shifter reaches Squid at its https_port (redsocks stays on the plain port)")
    p.add_argument("--twistd", type=Path, default=PROJECT / ".venv" / "bin" / "twistd")
    p.add_argument("--shifter-args", default="", metavar="ARGS",
                   help="more options for Shifter, one string: --shifter-args='--workers 2'")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the measurements, profile Shifter with py-spy during a throughput "
                        "and a cps run; flame data and summaries go to DIR")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {"reps": (3, 1), "seconds": (3.0, 1.0), "tunnels": (10000, 100),
                "latency_count": (2000, 50), "attempts": (3, 1), "settle": (15.0, 0.0),
                "settle_budget": (240.0, 0.0)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    args.settleBudget = args.settle_budget
    # Squid and the redirector hold two descriptors per tunnel and keep some
    # in reserve (Squid refuses new clients in its last hundred).
    most = (labModule.NOFILE - 400) // 2
    args.tunnelsWanted = args.tunnels
    if args.tunnels > most:
        print(f"bench: {args.tunnels} idle tunnels need more descriptors than the limit here "
              f"({labModule.NOFILE}) allows; measuring {most}", file=sys.stderr)
        args.tunnels = most
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    paths = {r.key for r in REDIRECTORS}
    kinds = set(MEASUREMENTS) | {"throughput"}
    unknown = [w for w in wanted if w not in paths | kinds]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(sorted(paths | kinds))}")
    args.redirectors = tuple(r for r in REDIRECTORS if r.key in wanted or not paths & set(wanted))
    chosenKinds = {k for w in wanted for k in (("throughput1", "throughput8") if w == "throughput" else (w,))}
    args.measurements = tuple(m for m in MEASUREMENTS if m in chosenKinds or not kinds & set(wanted))
    return args


def checkHost(args) -> None:
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, iptables); run it with sudo")
    missing = [name for name, path in labModule.tools().items() if path is None]
    if "redsocks" in missing and REDSOCKS not in args.redirectors:
        missing.remove("redsocks")
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}; on Debian: apt-get install {APT_PACKAGES}")
    if SHIFTER in args.redirectors and not args.twistd.exists():
        sys.exit(f"bench: no twistd at {args.twistd}; run 'make setup' or pass --twistd")


def main(argv: list[str] | None = None) -> int:
    args = parseArgs(argv)
    checkHost(args)
    labModule.raiseNofile()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    directory = Path(tempfile.mkdtemp(prefix="shifter-bench-"))
    directory.chmod(0o755)  # Squid runs as 'proxy'
    firstbyte = directory / "firstbyte"
    subprocess.run(["cc", "-O2", "-o", str(firstbyte), str(HERE / "firstbyte.c")], check=True)
    settings = measure.Settings(
        seconds=args.seconds, cpsConnections=args.cps_connections, latencyCount=args.latency_count,
        tunnels=args.tunnels, firstbyte=firstbyte, idleScript=HERE / "idle.py",
    )
    started = time.time()
    records: list[dict] = []
    profile: dict = {}
    status = 0
    lab = None
    try:
        lab = Lab(directory, args.redirectors, args.twistd, tuple(args.shifter_args.split()), args.proxy_rtt,
                  args.proxy_tls, args.server_rtt)
        lab.start()
        print(f"bench: namespaces {', '.join(ns.name for ns in lab.namespaces)}; files in {directory}",
              file=sys.stderr)
        for rep in range(args.reps):
            shift = rep % len(args.redirectors)
            order = args.redirectors[shift:] + args.redirectors[:shift]
            for kind in args.measurements:
                for r in order:
                    if kind == "memory" and r is DIRECT:
                        continue
                    try:
                        rec = measureOnce(lab, r, kind, settings, args, rep)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        rec = {"rep": rep, "measurement": kind, "redirector": r.key, "error": str(e)}
                        print(f"[{rep + 1}/{args.reps}] {kind:11} {r.title:8}: FAILED {e}", file=sys.stderr)
                        status = 1
                    else:
                        print(f"[{rep + 1}/{args.reps}] {kind:11} {r.title:8}: {describe(rec)}",
                              file=sys.stderr)
                    records.append(rec)
        if args.profile and SHIFTER in args.redirectors:
            profile = runProfile(lab, settings, args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench: interrupted ({e or 'SIGINT'}); cleaning up", file=sys.stderr)
        status = 130
    finally:
        if lab is not None:
            lab.close()
        if args.keep:
            print(f"bench: kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    summary = summarizeRecords(records)
    report = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": time.time() - started,
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "smoke": args.smoke, "proxy_rtt_ms": args.proxy_rtt, "proxy_tls": args.proxy_tls,
            "server_rtt_ms": args.server_rtt,
            "reps": args.reps, "seconds": args.seconds, "tunnels": args.tunnels,
            "tunnels_wanted": args.tunnelsWanted, "nofile_limit": labModule.NOFILE,
            "latency_count": args.latency_count, "cps_connections": args.cps_connections,
            "threshold_cores": args.threshold, "attempts": args.attempts,
            "redirectors": [r.key for r in args.redirectors], "measurements": list(args.measurements),
            "shifter_args": args.shifter_args,
            "versions": versions(),
            "interrupted": status == 130,
        },
        "figures": {key: {"label": label, "unit": unit, "measurement": kind}
                    for key, label, unit, kind, _ in FIGURES},
        "summary": summary,
        "records": records,
        "profile": profile,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(f"Medians of {args.reps} run(s); {os.cpu_count()} CPUs; ratios are to the DIRECT and redsocks medians.")
    print(table(summary, args.tunnels))
    print()
    print(f"Disturbance: CPU (in cores) used by other processes during each measurement; "
          f"above {args.threshold:g} it was repeated, up to {args.attempts} attempts.")
    print(disturbanceTable(records))
    if profile:
        print()
        print(profile["text"])
    print(f"\nraw numbers: {args.output}")
    return status


def versions() -> dict:
    found = {}
    for package in ("squid", "redsocks", "nginx-light", "iperf3", "wrk"):
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        if done.returncode == 0:
            found[package] = done.stdout
    done = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    found["shifter_commit"] = done.stdout.strip()
    return found


def runProfile(lab: Lab, settings: measure.Settings, args) -> dict:
    """
    Shifter under py-spy during a one-stream throughput run and a cps run.
    """
    args.profile.mkdir(parents=True, exist_ok=True)
    out: dict = {"text": ""}
    texts = []
    for kind in ("throughput1", "cps"):
        raw = args.profile / f"shifter-{kind}.txt"
        with Profiler(lab.redirectorPids(SHIFTER)[0], raw):
            result = run(kind, lab, SHIFTER, settings)
        summary = summarize(raw)
        out[kind] = {"raw": str(raw), "result": result, **summary}
        texts.append(f"Shifter profile during {kind} ({summary['samples']} samples, {raw}):\n"
                     + summary["text"])
        print(texts[-1], file=sys.stderr)
    out["text"] = "\n\n".join(texts)
    (args.profile / "summary.txt").write_text(out["text"] + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
