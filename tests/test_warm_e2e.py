"""
Warm proxy connections end to end: a real C{twistd shifter} with its
default warm connections, a real Squid whose log names the client port of
each request, and curl from the client namespace.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import re

from tests.gateway import SERVER_V4, SQUID_PORT, waitFor
from tests.test_upstream_e2e import SQUID, UpstreamTestCase

# Squid's line: the client's port (Shifter's end of the connection), the
# result and status, the method, the URL.
SQUID_FORMAT = "logformat warm %>a:%>p %Ss/%03>Hs %rm %ru"


class WarmSquidTests(UpstreamTestCase):
    def startBoth(self, *options: str) -> None:
        self.log = self.directory / "squid-warm" / "warm.log"
        self.squidWith(
            "http_access allow localhost\n", extra=f"{SQUID_FORMAT}\naccess_log stdio:{self.log} warm\n",
            name="squid-warm",
        )
        self.startShifter("--proxy", SQUID, *options)

    def squidLines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def idlePorts(self) -> set[int]:
        """
        The gateway's local ports of established connections to Squid
        that carry nothing: Shifter's warm connections, once no tunnel is
        open.
        """
        out = self.net.gateway.run(
            "ss", "-Htn", "state", "established", "dst", "127.0.0.1", "dport", "=", f":{SQUID_PORT}",
        ).stdout
        return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}

    def tunnelPort(self, count: int) -> int:
        """
        The client port of Squid's C{count}th CONNECT line.
        """
        lines = waitFor(
            lambda: [s for s in self.squidLines() if " CONNECT " in s][count - 1:] or None, 10, "Squid's line"
        )
        line = lines[0]  # type: ignore[index]
        self.assertIn("TCP_TUNNEL/200", line)
        return int(re.match(r"\S+:(\d+) ", line).group(1))  # type: ignore[union-attr]

    def test_connectOnWarmConnection(self) -> None:
        """
        By default, once a tunnel has gone through Squid, the next one's
        CONNECT comes on a connection Shifter had open to Squid before
        the client connected.
        """
        self.startBoth()
        first = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(first.returncode, 0, first.stderr)
        firstPort = self.tunnelPort(1)
        waitFor(lambda: self.idlePorts() - {firstPort}, 10, "a warm connection to Squid")
        before = self.idlePorts() - {firstPort}
        second = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertIn(self.tunnelPort(2), before)

    def test_offAndExpiry(self) -> None:
        """
        With --warm-connections off, every CONNECT comes on a connection
        of its own (none is left open to Squid); with a short
        --warm-lifetime, Squid logs each warm connection that ended unused
        as a transaction that ended before any request.
        """
        self.startBoth("--warm-connections", "off")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.tunnelPort(1)
        waitFor(lambda: not self.idlePorts(), 10, "no connection left to Squid")
        self.shifter.stop()
        self.startShifter("--proxy", SQUID, "--warm-lifetime", "1")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        line = waitFor(
            lambda: next((s for s in self.squidLines() if "error:transaction-end-before-headers" in s), None),
            15, "Squid's line for a warm connection closed unused",
        )
        self.assertIn(" NONE_NONE/000 ", line)
        # Idle: after two lifetimes, none is left open.
        waitFor(lambda: not self.idlePorts(), 15, "no warm connection left while idle")
