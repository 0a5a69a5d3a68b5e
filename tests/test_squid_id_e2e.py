"""
The tunnel id joins Shifter's access log, C{ctl tunnels} and Squid's log,
end to end: a real Squid whose C{logformat} records the C{Shifter-Tunnel}
request header, a real C{twistd shifter} with C{--access-log}, and curl
from the client namespace; and the access log rotated by the shipped
logrotate snippet.

These need root (namespaces, iptables), Squid, curl, openssl and logrotate.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.gateway import PROJECT, SERVER_V4, waitFor
from tests.support import requireHost, socketDirectory
from tests.test_upstream_e2e import SQUID, UpstreamTestCase

ID = r"[a-z2-7]{8}-[a-z2-7]+"
# Squid's line: time, client, result/status, method, URL, the header.
SQUID_FORMAT = "logformat shifterid %ts.%03tu %>a %Ss/%03>Hs %rm %ru %{Shifter-Tunnel}>h"
SHIFTER_FORMAT = "{id} {result} {status} {connect_target}"


class TunnelIdJoinTests(UpstreamTestCase):
    def startBoth(self, access: str = "http_access allow localhost\n", *options: str) -> None:
        self.ids = self.directory / "squid-ids" / "ids.log"
        self.squid = self.squidWith(
            access, extra=f"{SQUID_FORMAT}\naccess_log stdio:{self.ids} shifterid\n", name="squid-ids",
        )
        self.accessLog = self.directory / "shifter-access.log"
        self.startShifter(
            "--proxy", SQUID, "--access-log", str(self.accessLog), "--access-log-format", SHIFTER_FORMAT,
            *options,
        )

    def squidLines(self) -> list[str]:
        return self.ids.read_text().splitlines() if self.ids.exists() else []

    def shifterLines(self, count: int) -> list[str]:
        """
        The first C{count} lines of Shifter's access log, once written
        (within a second of each tunnel's end).
        """
        text = lambda: self.accessLog.read_text() if self.accessLog.exists() else ""  # noqa: E731
        waitFor(lambda: text().count("\n") >= count, 15, f"{count} access-log lines")
        return text().splitlines()[:count]

    def test_idJoinsTheLogs(self) -> None:
        """
        The id in Squid's line for the CONNECT (from the Shifter-Tunnel
        header) is the id in Shifter's access-log line for that tunnel.
        """
        self.startBoth()
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        [line] = self.shifterLines(1)
        tunnelId, outcome, status, target = line.split(" ")
        self.assertRegex(tunnelId, f"^{ID}$")
        self.assertEqual((outcome, status, target), ("ok", "200", f"{SERVER_V4}:443"))
        squidLine = waitFor(
            lambda: next((s for s in self.squidLines() if "TCP_TUNNEL/200" in s), None), 10, "Squid's line"
        )
        self.assertEqual(squidLine.split()[-1], tunnelId, squidLine)
        self.assertIn(f"CONNECT {SERVER_V4}:443 ", squidLine)
        # The service log keeps what concerns the service: the tunnel's
        # line is in the access log only.
        self.assertNotIn(" closed (", self.shifter.logText())

    def test_idInCtlTunnels(self) -> None:
        """
        While the tunnel is open, python -m shifter.ctl tunnels lists it
        under the same id that Squid's line and Shifter's access-log line
        have once it has ended.
        """
        control = socketDirectory(self) / "control"
        self.startBoth("http_access allow localhost\n", "--control", f"unix:{control}")
        client = self.net.client.connect(SERVER_V4, 443)

        def listed() -> list[dict]:
            result = self.net.gateway.run(
                sys.executable, "-m", "shifter.ctl", "--control", f"unix:{control}", "tunnels", "--json",
                check=False,
            )
            return [t for t in json.loads(result.stdout or "{}").get("tunnels", []) if t["state"] == "relaying"]

        [tunnel] = waitFor(listed, 15, "the tunnel listed, relaying")
        self.assertRegex(tunnel["tunnelId"], f"^{ID}$")
        table = self.net.gateway.run(sys.executable, "-m", "shifter.ctl", "--control", f"unix:{control}", "tunnels")
        self.assertEqual(table.stdout.splitlines()[1].split()[-1], tunnel["tunnelId"])
        client.close()
        [line] = self.shifterLines(1)
        self.assertEqual(line.split()[0], tunnel["tunnelId"])
        squidLine = waitFor(
            lambda: next((s for s in self.squidLines() if "TCP_TUNNEL/200" in s), None), 10, "Squid's line"
        )
        self.assertEqual(squidLine.split()[-1], tunnel["tunnelId"], squidLine)

    def test_refusedByProxy(self) -> None:
        """
        A CONNECT Squid refuses carries the id too: its TCP_DENIED line and
        Shifter's proxy-status line share it.
        """
        self.startBoth("http_access deny all\n")
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        [line] = self.shifterLines(1)
        tunnelId, outcome, status, _ = line.split(" ")
        self.assertEqual((outcome, status), ("proxy-status", "403"))
        squidLine = waitFor(
            lambda: next((s for s in self.squidLines() if "TCP_DENIED/403" in s), None), 10, "Squid's line"
        )
        self.assertEqual(squidLine.split()[-1], tunnelId, squidLine)

    def doctorIdLines(self, proxyLog: Path) -> list[str]:
        """
        Run doctor in the gateway with the proxy's access log named; its
        tunnel-id findings.
        """
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "shifter.doctor",
            "--lan-interface", "c1", "--ports", "443", "--check-target", f"{SERVER_V4}:443",
            "--proxy-access-log", str(proxyLog), "--proxy", SQUID, check=False, timeout=60,
        )
        self.assertEqual(result.stderr, "")
        return [line for line in result.stdout.splitlines() if "tunnel-id" in line]

    def test_doctorFindsTheId(self) -> None:
        """
        Doctor's CONNECT carries a tunnel id of its own; with Squid's log
        recording the header, doctor finds it there and says nothing.
        """
        self.startBoth()
        self.assertEqual(self.doctorIdLines(self.ids), [])
        self.assertTrue([line for line in self.squidLines() if re.search(r" doctor-[0-9a-f]{8}-0$", line)],
                        self.squidLines())

    def test_doctorSaysHowToLogIt(self) -> None:
        """
        With a log whose format leaves the header out (Squid's own
        format), doctor says the id is missing and gives the logformat.
        """
        self.startBoth()
        [line] = self.doctorIdLines(self.squid.accessLog)
        self.assertTrue(line.startswith("warning: tunnel-id: the tunnel id doctor sent the proxy (doctor-"), line)
        self.assertIn("%{Shifter-Tunnel}>h", line)
        self.assertIn(f"access_log {self.squid.accessLog} shifter", line)

    def test_noHeader(self) -> None:
        """
        With --tunnel-id-header none, Squid receives no such header (it
        logs -), while Shifter's access log still has the id.
        """
        self.startBoth("http_access allow localhost\n", "--tunnel-id-header", "none")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        [line] = self.shifterLines(1)
        self.assertRegex(line, f"^{ID} ok 200 ")
        squidLine = waitFor(
            lambda: next((s for s in self.squidLines() if "TCP_TUNNEL/200" in s), None), 10, "Squid's line"
        )
        self.assertEqual(squidLine.split()[-1], "-", squidLine)

    def test_logrotate(self) -> None:
        """
        The shipped logrotate snippet, run by logrotate with its path and
        its signal pointed at this Shifter: the rotated file keeps the
        first line, the next tunnel's line goes to a new file.
        """
        requireHost(programs=("logrotate",))
        self.startBoth()
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        [first] = self.shifterLines(1)
        snippet = (PROJECT / "contrib" / "shifter.logrotate").read_text()
        self.assertIn("/var/log/shifter/*.log {", snippet)
        snippet = snippet.replace("/var/log/shifter/*.log", str(self.accessLog))
        snippet = re.sub(r"systemctl kill .*", f"kill -HUP {self.shifter.process.pid}", snippet)
        config = self.directory / "logrotate.conf"
        config.write_text(snippet)
        rotated = subprocess.run(
            ["logrotate", "--force", "--state", str(self.directory / "logrotate.state"), str(config)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        old = Path(f"{self.accessLog}.1")
        self.assertEqual(old.read_text(), first + "\n")
        self.shifter.waitForLog("SIGHUP: reopened")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        [second] = self.shifterLines(1)
        self.assertNotEqual(second.split()[0], first.split()[0])
        self.assertEqual(old.read_text(), first + "\n")
