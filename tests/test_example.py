"""
The embedding example, examples/policy_gateway.py: its policy alone, and the
program end to end on the namespace gateway with two real Squids.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import PROJECT, SERVER_V4, SERVER_V6, SHIFTER_PORT, Squid, waitFor
from tests.test_integration import GatewayTestCase

sys.path.insert(0, str(PROJECT / "examples"))
from policy_gateway import LabAndOfficePolicy  # noqa: E402

from shifter import TunnelRequest, UpstreamProxy  # noqa: E402

EXAMPLE = str(PROJECT / "examples" / "policy_gateway.py")
OFFICE_CLIENT = "192.0.2.200"


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lab = UpstreamProxy("lab:3128", object())  # type: ignore[arg-type]
        self.office = UpstreamProxy("office:3128", object())  # type: ignore[arg-type]
        self.policy = LabAndOfficePolicy(ipaddress.ip_network("192.0.2.0/25"), self.lab, self.office, "203.0.113.66")

    def decide(self, client: str, destination: str):  # type: ignore[no-untyped-def]
        return self.policy.decide(TunnelRequest(
            IPv4Address("TCP", client, 40000), IPv4Address("TCP", destination, 443), None, ()
        ))

    def test_labClient(self) -> None:
        """
        A client in the lab network goes to the lab proxy.
        """
        self.assertEqual(self.decide("192.0.2.2", "203.0.113.7").proxies, [self.lab])

    def test_officeClient(self) -> None:
        """
        Other clients go to the office proxy.
        """
        self.assertEqual(self.decide("192.0.2.200", "203.0.113.7").proxies, [self.office])

    def test_refused(self) -> None:
        """
        The refused destination is refused for everyone.
        """
        for client in ("192.0.2.2", "192.0.2.200"):
            self.assertIn("203.0.113.66", self.decide(client, "203.0.113.66").refuse)


class ExampleEndToEndTests(GatewayTestCase):
    def test_policyGateway(self) -> None:
        """
        Run as a program: the lab client's tunnel goes through the lab
        Squid, the office client's through the office Squid, and the
        refused destination is refused.
        """
        lab = Squid(self.net.gateway, self.directory / "lab", port=3128)
        office = Squid(self.net.gateway, self.directory / "office", port=3130)
        for squid in (lab, office):
            squid.start()
            self.addCleanup(squid.stop)
        self.net.client.run("ip", "addr", "add", f"{OFFICE_CLIENT}/24", "dev", "c0")
        log = self.directory / "example.log"
        self.net.gateway.start(
            sys.executable, EXAMPLE, "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:",
            "--lab", "192.0.2.0/25", "--lab-proxy", "127.0.0.1:3128",
            "--office-proxy", "127.0.0.1:3130", "--refuse", SERVER_V6,
            logTo=log, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        )
        self.net.gateway.waitListening(SHIFTER_PORT)
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        lab.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443")
        result = self.net.client.run(
            "curl", "-sS", "--max-time", "20", "--interface", OFFICE_CLIENT,
            "--cacert", str(self.web.cert), "-o", "/dev/null", f"https://{SERVER_V4}/file.bin",
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        office.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443")
        self.assertNotEqual(self.fetch(f"https://[{SERVER_V6}]/file.bin", timeout=10).returncode, 0)
        waitFor(lambda: "refused by policy" in log.read_text(), 10, "the refusal in the log")
        self.assertEqual(len([l for l in lab.accessLogLines() if "CONNECT" in l]), 1)
        self.assertEqual(len([l for l in office.accessLogLines() if "CONNECT" in l]), 1)
