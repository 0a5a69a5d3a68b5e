"""
NTLM to the upstream proxy, end to end: a real Squid asking for NTLM
(C{ntlm_fake_auth}, which checks the message flow and logs the user, but
no password), the same over Squid's https_port, and a test proxy that
verifies the NTLMv2 responses with pyspnego's acceptor (C{ntlmproxy.py}),
so that a wrong password is refused; a proxy that closes after its
challenge gives one line and no hang.

The same through --hold-syn, where the login happens before the client's
SYN is accepted, and doctor's CONNECT to an NTLM proxy.

These need root (namespaces, iptables, nfnetlink_queue), Squid with
ntlm_fake_auth, curl and openssl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gateway import SERVER_V4, Squid, WebServer, makeCertificate, waitFor
from tests.support import requireHost
from tests.test_doctor_e2e import DoctorTestCase
from tests.test_holdsyn_e2e import HoldSynGatewayTestCase
from tests.test_upstream_e2e import SQUID, UpstreamTestCase

NTLM_PROXY = Path(__file__).resolve().parent / "ntlmproxy.py"
FAKE_AUTH = "/usr/lib/squid/ntlm_fake_auth"
NTLM_PROXY_PORT = 3129
URL = f"https://{SERVER_V4}/file.bin"


class NTLMTestCase(UpstreamTestCase):
    authed = "acl authed proxy_auth REQUIRED\nhttp_access allow localhost authed\n"
    ntlmSquid = f"auth_param ntlm program {FAKE_AUTH}\nauth_param ntlm children 5\n"

    def setUp(self) -> None:
        super().setUp()
        if not os.path.exists(FAKE_AUTH):
            requireHost(programs=(FAKE_AUTH,))

    def credentials(self, line: str = "CORP\\alice:s3cret") -> str:
        path = self.directory / "ntlm-credentials"
        path.write_text(line + "\n")
        return str(path)

    def startTestProxy(self, mode: str, users: str = "CORP:alice:s3cret") -> Path:
        """
        Start C{ntlmproxy.py} in the gateway namespace; return its log.
        """
        userFile = self.directory / "ntlm-users"
        userFile.write_text(users + "\n")
        log = self.directory / f"ntlmproxy-{mode}.log"
        process = self.net.gateway.start(
            sys.executable, str(NTLM_PROXY), str(NTLM_PROXY_PORT), mode, logTo=log,
            env=dict(os.environ, NTLM_USER_FILE=str(userFile)),
        )
        self.addCleanup(process.kill)
        self.net.gateway.waitListening(NTLM_PROXY_PORT)
        return log


def tunnelUsers(lines: list[str]) -> list[str]:
    """
    The user Squid's access log names for each tunnel it opened.
    """
    return [line.split()[7] for line in lines if "TCP_TUNNEL/200" in line and line.split()[7] != "-"]


class SquidNTLMTests(NTLMTestCase):
    def test_squidLogsTheUser(self) -> None:
        """
        Through a Squid that asks for NTLM, tunnels open after the
        negotiate, challenge and authenticate messages, and Squid logs
        the user; from the second tunnel on, the first CONNECT carries the
        negotiate message: one 407 per tunnel.
        """
        squid = self.squidWith(self.authed, extra=self.ntlmSquid)
        self.startShifter("--proxy", SQUID, "--proxy-credentials", self.credentials())
        for _ in range(3):
            result = self.fetch(URL)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)
        waitFor(
            lambda: len(tunnelUsers(squid.accessLogLines())) == 3, 10, "three authenticated tunnels",
        )
        # ntlm_fake_auth reads only the first character of each UTF-16 name
        # in the authenticate message: CORP\alice is logged as C\a.
        self.assertEqual(tunnelUsers(squid.accessLogLines()), ["C\\\\a"] * 3)
        # The first tunnel: one 407 to the bare CONNECT, one with the
        # challenge; each later one: the challenge's only.
        self.assertEqual(sum("/407 " in line for line in squid.accessLogLines()), 4, squid.accessLogLines())
        self.assertNotIn("s3cret", self.shifter.logText())

    def test_ntlmChosenOverBasic(self) -> None:
        """
        A Squid that offers NTLM and Basic is answered with NTLM, and the
        password is never sent with Basic: basic_fake_auth would log the
        whole user name, ntlm_fake_auth logs C\\a.
        """
        squid = self.squidWith(
            self.authed,
            extra=self.ntlmSquid + "auth_param basic program /usr/lib/squid/basic_fake_auth\n"
            "auth_param basic realm shifter-test\n",
        )
        self.startShifter("--proxy", SQUID, "--proxy-credentials", self.credentials())
        for _ in range(2):
            result = self.fetch(URL)
            self.assertEqual(result.returncode, 0, result.stderr)
        waitFor(lambda: len(tunnelUsers(squid.accessLogLines())) == 2, 10, "two authenticated tunnels")
        self.assertEqual(tunnelUsers(squid.accessLogLines()), ["C\\\\a"] * 2)

    def test_squidOverTLS(self) -> None:
        """
        The same NTLM exchange works with a Squid reached over TLS.
        """
        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        squid = self.squidWith(
            self.authed,
            extra=self.ntlmSquid + f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n",
        )
        self.net.gateway.waitListening(3443)
        self.startShifter(
            "--proxy", "https://127.0.0.1:3443", "--proxy-ca", str(cert), "--proxy-credentials", self.credentials()
        )
        result = self.fetch(URL)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 C\\\\a ")


class VerifyingProxyTests(NTLMTestCase):
    def test_rightPasswordVerified(self) -> None:
        """
        A proxy that checks the NTLMv2 response against the password
        accepts Shifter's, read from a systemd credential by name; the
        challenge's 407 body came in two writes and was read by its
        Content-Length on the same connection.
        """
        log = self.startTestProxy("verify")
        credentials = Path(self.credentials())
        # Shifter's environment is this process's: a systemd unit with
        # LoadCredential= sets $CREDENTIALS_DIRECTORY the same way.
        self.patch(os, "environ", dict(os.environ, CREDENTIALS_DIRECTORY=str(credentials.parent)))
        self.startShifter("--proxy", f"127.0.0.1:{NTLM_PROXY_PORT}", "--proxy-credentials", credentials.name)
        result = self.fetch(URL)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        waitFor(lambda: "authenticate: user CORP\\alice" in log.read_text(), 10, "the user verified")
        self.assertIn("negotiate: challenge; authenticate: user CORP\\alice", log.read_text())

    def test_wrongPasswordOneLine(self) -> None:
        """
        A wrong password is refused by the proxy's check: the client's
        connection ends with one line naming NTLM, and no retry.
        """
        log = self.startTestProxy("verify")
        self.startShifter(
            "--proxy", f"127.0.0.1:{NTLM_PROXY_PORT}", "--proxy-credentials", self.credentials("CORP\\alice:wrong")
        )
        result = self.fetch(URL)
        self.assertNotEqual(result.returncode, 0)
        line = self.shifter.waitForLog("failed: proxy answered 407: proxy refused the credentials (NTLM)")
        self.assertEqual(self.shifter.logText().count("failed:"), 1, line)
        self.assertIn("authenticate: wrong response: 407", log.read_text())
        self.assertEqual(log.read_text().count("negotiate: challenge"), 1)
        self.assertNotIn("wrong", self.shifter.logText().replace("wrong response", ""))

    def test_closedAfterChallenge(self) -> None:
        """
        A proxy that closes the connection in the middle of its
        challenge's body ends the client's connection at once with one
        line: no hang until curl's own time limit.
        """
        self.startTestProxy("close")
        self.startShifter("--proxy", f"127.0.0.1:{NTLM_PROXY_PORT}", "--proxy-credentials", self.credentials())
        result = self.fetch(URL, timeout=60)
        self.assertNotIn(result.returncode, (0, 28), result.stderr)  # 28: curl's own timeout
        self.shifter.waitForLog("failed: proxy closed the connection after its NTLM challenge")

    def test_connectionCloseChallenge(self) -> None:
        """
        A challenge whose 407 says Connection: close is not answered on
        another connection: one line says why.
        """
        self.startTestProxy("connection-close")
        self.startShifter("--proxy", f"127.0.0.1:{NTLM_PROXY_PORT}", "--proxy-credentials", self.credentials())
        result = self.fetch(URL, timeout=60)
        self.assertNotIn(result.returncode, (0, 28), result.stderr)
        self.shifter.waitForLog("failed: proxy answered 407 with an NTLM challenge, but it says Connection: close")


class HoldSynNTLMTests(HoldSynGatewayTestCase):
    """
    With --hold-syn, the NTLM login happens while the client's SYN is
    held: the SYN is accepted once Squid has answered the authenticate
    message with 200.
    """

    ruleFormat = "iptables"

    def setUp(self) -> None:
        super().setUp()
        if not os.path.exists(FAKE_AUTH):
            requireHost(programs=(FAKE_AUTH,))
        self.squid.stop()
        self.squid = Squid(
            self.net.gateway, self.directory / "ntlm-squid",
            access=NTLMTestCase.authed, extra=NTLMTestCase.ntlmSquid,
        )
        self.squid.start()
        credentials = self.directory / "ntlm-credentials"
        credentials.write_text("CORP\\alice:s3cret\n")
        self.shifter.options += ("--proxy-credentials", str(credentials))

    def test_loginWhileTheSynIsHeld(self) -> None:
        """
        Two fetches: each SYN is held through NTLM's two rounds, accepted,
        and its connection joined to the tunnel; Squid logs the user.
        """
        self.shifter.start()
        for _ in range(2):
            self.assertTunnelled(URL, f"{SERVER_V4}:443")
        stats = self.stoppedStats()
        self.assertEqual((stats["accepted"], stats["joined"], stats["refused"]), (2, 2, 0), stats)
        waitFor(lambda: len(tunnelUsers(self.squid.accessLogLines())) == 2, 10, "two authenticated tunnels")


class DoctorNTLMTests(DoctorTestCase):
    def test_authenticatedConnect(self) -> None:
        """
        doctor's CONNECT to a proxy that asks for NTLM goes through both
        rounds on one connection: no finding, and Squid logs the tunnel
        with the user.
        """
        squid = Squid(
            self.net.gateway, self.directory / "squid", access=NTLMTestCase.authed, extra=NTLMTestCase.ntlmSquid
        )
        squid.start()
        self.addCleanup(squid.stop)
        web = WebServer(self.net.server, self.directory / "web")
        web.start()
        credentials = self.directory / "ntlm-credentials"
        credentials.write_text("CORP\\alice:s3cret\n")
        self.startShifter("--proxy-credentials", str(credentials))
        self.assertEqual(self.doctor("--proxy-credentials", str(credentials), proxyCheck=True), (0, []))
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 C\\\\a ")
