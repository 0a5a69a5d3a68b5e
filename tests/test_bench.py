"""
The benchmark (bench/run.py) in its smoke mode: it builds its namespaced
gateway, runs every measurement for a second against DIRECT, redsocks and
Shifter, and reports every figure.  No timing or ratio is asserted: the
numbers only have to exist and make sense as numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import requireHost

PROJECT = Path(__file__).resolve().parent.parent
PATHS = ("direct", "redsocks", "shifter")
# Figures with no meaning for DIRECT (no redirector in the path).
REDIRECTOR_ONLY = {
    "cpu_per_gb_1", "cpu_per_gb_8", "cpu_per_kconn", "idle_tunnels", "rss_with_tunnels",
    "rss_per_tunnel", "fds_per_tunnel", "squid_cpu_per_gb_1", "squid_cpu_per_kconn",
}
TABLE_ROWS = (
    "throughput, 1 stream", "throughput, 8 streams", "new connections per second",
    "connect to first byte, median", "connect to first byte, p99",
    "redirector CPU per GB, 1 stream", "redirector CPU per 1000 connections",
    "redirector RSS per idle tunnel",
)


class SmokeTests(SynchronousTestCase):
    """
    One smoke run, shared by the tests below (it takes about half a minute).
    """

    smoke: subprocess.CompletedProcess | None = None
    output: Path | None = None

    def setUp(self) -> None:
        requireHost(
            root=True,
            programs=("ip", "iptables", "ss", "squid", "nginx", "iperf3", "wrk", "redsocks", "cc", "python3"),
        )
        cls = type(self)
        if cls.smoke is None:
            directory = Path(self.mktemp()).resolve()
            directory.mkdir(parents=True)
            cls.output = directory / "results.json"
            cls.smoke = subprocess.run(
                [sys.executable, str(PROJECT / "bench" / "run.py"), "--smoke", "--output", str(cls.output)],
                capture_output=True, text=True, timeout=150,
            )
        self.assertEqual(
            self.smoke.returncode, 0, f"bench failed:\n{self.smoke.stdout}\n{self.smoke.stderr[-3000:]}"
        )
        self.report = json.loads(self.output.read_text())

    def test_table(self) -> None:
        """
        The printed table has a row for every main figure and a column for
        every path, and the disturbance table follows it.
        """
        out = self.smoke.stdout
        header = next(line for line in out.splitlines() if line.startswith("figure"))
        for title in ("DIRECT", "redsocks", "Shifter", "/DIRECT", "/redsocks"):
            self.assertIn(title, header)
        for row in TABLE_ROWS:
            self.assertIn(row, out)
        self.assertIn("Disturbance", out)
        self.assertIn("others cores", out)

    def test_everyFigureForEveryPath(self) -> None:
        """
        The JSON summary has every figure for every path it applies to, and
        each is a positive, finite number.
        """
        summary = self.report["summary"]
        self.assertEqual(set(summary), set(self.report["figures"]))
        for figure, byPath in summary.items():
            expected = {"redsocks", "shifter"} if figure in REDIRECTOR_ONLY else set(PATHS)
            self.assertEqual(set(byPath), expected, figure)
            for path, stats in byPath.items():
                for value in stats["values"]:
                    self.assertTrue(math.isfinite(value) and value > 0, f"{figure} {path}: {value}")

    def test_rawRecords(self) -> None:
        """
        Every measurement ran for every path without an error, and each
        record keeps the CPU accounting of its window, other users'
        share included.
        """
        records = self.report["records"]
        errors = [r for r in records if "error" in r]
        self.assertEqual(errors, [])
        seen = {(r["measurement"], r["redirector"]) for r in records}
        for kind in ("latency", "cps", "throughput1", "throughput8"):
            for path in PATHS:
                self.assertIn((kind, path), seen)
        for path in ("redsocks", "shifter"):
            self.assertIn(("memory", path), seen)
        for record in records:
            cpu = record["cpu"]
            for key in ("others_cores", "ours_cores", "steal_cores", "redirector_cpu"):
                self.assertTrue(math.isfinite(cpu[key]) and cpu[key] >= 0, f"{key}: {cpu[key]}")
            self.assertIsInstance(record["repeated"], bool)
