"""
Negotiate (Kerberos) to a real Squid, end to end: a real MIT KDC in the
gateway's namespace, Squid asking Negotiate through
C{negotiate_kerberos_auth} with the proxy's C{HTTP/} keytab, and Shifter
logging in with the gateway's own keytab.

These need root (namespaces, iptables), Squid with its Kerberos helper
(and ntlm_fake_auth, for the test of the scheme chosen among several),
the MIT KDC and admin programs (Debian's krb5-kdc, krb5-admin-server),
curl and openssl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from tests.gateway import PROJECT, SERVER_V4, Namespace, Squid, makeCertificate, waitFor
from tests.kerberos import KDC_PORT, REALM, Realm
from tests.support import requireHost, socketDirectory
from tests.test_holdsyn_e2e import HoldSynGatewayTestCase
from tests.test_upstream_e2e import ECHO_PORT, NAME, TCP_PEER, UpstreamTestCase

NEGOTIATE_HELPER = "/usr/lib/squid/negotiate_kerberos_auth"
NTLM_FAKE_AUTH = "/usr/lib/squid/ntlm_fake_auth"
SLOW_KDC = Path(__file__).resolve().parent / "slowkdc.py"
PROXY_NAME = "proxy.shifter.test"
GATEWAY_PRINCIPAL = f"host/gw.shifter.test@{REALM}"
PROXY = f"{PROXY_NAME}:3128"


class RealmMixin:
    """
    A realm in the gateway's namespace with the gateway's and the proxy's
    principals, the gateway's keytab (C{self.keytab}), the proxy's name in
    the namespace's hosts file, and C{KRB5_CONFIG} pointing at the realm
    while the test runs.
    """

    maxLife = "10h"
    # Seconds the KDC's answers are held back (by tests/slowkdc.py), if any.
    kdcDelay = 0.0

    def setUpRealm(self, namespace: Namespace, directory: Path) -> str:
        """
        @return: Squid's configuration lines asking for Negotiate.
        """
        requireHost(root=True, programs=("krb5kdc", "kdb5_util", "kadmin.local"))
        if not os.access(NEGOTIATE_HELPER, os.X_OK):
            self.skipTest(f"needs Squid's {NEGOTIATE_HELPER}")  # type: ignore[attr-defined]
        cleanup = self.addCleanup  # type: ignore[attr-defined]
        # The gateway namespace's own hosts file names the proxy.
        hostsDirectory = Path("/etc/netns") / namespace.name
        hostsDirectory.mkdir(parents=True, exist_ok=True)
        cleanup(shutil.rmtree, hostsDirectory, True)
        (hostsDirectory / "hosts").write_text(
            f"127.0.0.1 localhost {PROXY_NAME}\n::1 localhost\n{SERVER_V4} {NAME}\n"
        )
        self.realm = Realm(
            namespace, directory / "realm", maxLife=self.maxLife, kdcPort=KDC_PORT + 1000 if self.kdcDelay else KDC_PORT
        )
        self.realm.addPrincipal(GATEWAY_PRINCIPAL)
        self.realm.addPrincipal(f"HTTP/{PROXY_NAME}@{REALM}")
        self.keytab = self.realm.keytab(directory / "gateway.keytab", GATEWAY_PRINCIPAL)
        httpKeytab = self.realm.keytab(directory / "http.keytab", f"HTTP/{PROXY_NAME}@{REALM}")
        subprocess.run(["chown", "proxy", str(httpKeytab)], check=True)
        self.realm.start()
        cleanup(self.realm.stop)
        if self.kdcDelay:
            self.kdcLog = directory / "slowkdc.log"
            namespace.start(
                sys.executable, str(SLOW_KDC), str(KDC_PORT), str(self.realm.kdcPort), str(self.kdcDelay),
                logTo=self.kdcLog,
            )
            waitFor(lambda: "listening" in self.kdcLog.read_text(), 20, "the slow KDC relay")
        # Shifter (started from this environment) finds the realm here.
        previous = os.environ.get("KRB5_CONFIG")
        os.environ["KRB5_CONFIG"] = str(self.realm.krb5conf)
        cleanup(self._restoreEnvironment, previous)
        return (
            f"auth_param negotiate program /usr/bin/env KRB5_KTNAME={httpKeytab} "
            f"KRB5_CONFIG={self.realm.krb5conf} {NEGOTIATE_HELPER} -s HTTP/{PROXY_NAME}@{REALM}\n"
            "auth_param negotiate children 20 startup=5\n"
            "auth_param negotiate keep_alive on\n"
        )

    @staticmethod
    def _restoreEnvironment(previous: str | None) -> None:
        if previous is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = previous


AUTHENTICATED = "acl authed proxy_auth REQUIRED\nhttp_access allow localhost authed\n"


class NegotiateTestCase(RealmMixin, UpstreamTestCase):
    """
    A realm, and a Squid that asks for Negotiate only.
    """

    def setUp(self) -> None:
        super().setUp()
        negotiate = self.setUpRealm(self.net.gateway, self.directory)
        self.squid = self.squidWith(
            AUTHENTICATED, extra=self.squidExtra() + negotiate + f"acl SSL_ports port {ECHO_PORT}\n"
        )

    def squidExtra(self) -> str:
        """
        More lines for Squid's configuration.
        """
        return ""

    def startNegotiating(self, keytab: Path | None = None, *options: str) -> None:
        self.control = socketDirectory(self) / "control"
        self.startShifter(
            "--proxy-keytab", str(keytab or self.keytab), "--control", f"unix:{self.control}",
            *(options or ("--proxy", PROXY)),
        )

    def ctl(self, *arguments: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "shifter.ctl", "--control", f"unix:{self.control}", *arguments],
            env=dict(os.environ, PYTHONPATH=str(PROJECT)), capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def assertRefusedWith(self, *fragments: str) -> str:
        """
        A fetch fails at once (curl's own error, not its time limit), and
        Shifter's log holds one failure line with C{fragments}.
        """
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertNotEqual(result.returncode, 0)
        self.assertNotEqual(result.returncode, 28, "curl timed out: the connection hung")
        line = self.shifter.waitForLog("failed: proxy answered 407: Negotiate", *fragments)
        failures = [l for l in self.shifter.logText().splitlines() if "failed: proxy answered 407" in l]
        self.assertEqual(len(failures), 1, failures)
        return line


class NegotiateTests(NegotiateTestCase):
    def test_tunnelOpens(self) -> None:
        """
        Shifter logs in before it accepts the first client; a tunnel opens
        through Squid with Negotiate, and Squid's access log names the
        gateway's principal; the next tunnel sends its token with its first
        CONNECT (no second 407).
        """
        self.startNegotiating()
        self.assertIn(f"Kerberos: logged in as {GATEWAY_PRINCIPAL}", self.shifter.logText())
        for _ in range(2):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)
        waitFor(
            lambda: sum("TCP_TUNNEL/200" in l and GATEWAY_PRINCIPAL in l for l in self.squid.accessLogLines()) == 2,
            10, "two tunnels logged with the gateway's principal",
        )
        self.assertEqual(sum("/407 " in l for l in self.squid.accessLogLines()), 1)
        [proxy] = json.loads(self.ctl("proxies", "--json"))["proxies"]
        self.assertEqual(proxy["scheme"], "negotiate")
        self.assertEqual(proxy["kerberos"]["principal"], GATEWAY_PRINCIPAL)
        self.assertEqual(proxy["kerberos"]["service"], f"HTTP/{PROXY_NAME}@{REALM}")
        self.assertGreater(proxy["kerberos"]["expiresIn"], 0)
        self.assertIn("negotiate (ticket 9h", self.ctl("proxies"))

    def test_hundredAtOnce(self) -> None:
        """
        A hundred tunnels opened at once all open, each with a token of its
        own (Squid's replay cache refuses one seen before).
        """
        self.net.redirect(ECHO_PORT)
        self.net.server.start(sys.executable, str(TCP_PEER), "echo", str(ECHO_PORT), logTo=self.directory / "echo.log")
        self.net.server.waitListening(ECHO_PORT)
        self.startNegotiating()
        self.shifter.waitForLog("Kerberos: logged in as")
        for count in (1, 100):
            result = self.net.client.run(
                sys.executable, str(TCP_PEER), "burst", SERVER_V4, str(ECHO_PORT), str(count), "60", timeout=120
            )
            self.assertEqual(result.stdout.splitlines()[0], f"ok {count} failed 0", result.stdout)
        waitFor(
            lambda: sum("TCP_TUNNEL/200" in l and GATEWAY_PRINCIPAL in l for l in self.squid.accessLogLines()) == 101,
            30, "a hundred and one tunnels logged with the gateway's principal",
        )
        self.assertNotIn("proxy answered 407", self.shifter.logText())

    def test_kdcStopped(self) -> None:
        """
        With the KDC stopped, a client is refused at once with one line
        naming Negotiate and the Kerberos library's reason.
        """
        self.realm.stop()
        self.startNegotiating()
        self.shifter.waitForLog("Kerberos: no ticket for the proxy", timeout=30)
        line = self.assertRefusedWith(f"(cannot log in: Cannot contact any KDC for realm '{REALM}')")
        self.assertIn("no Kerberos ticket for HTTP/proxy.shifter.test", line)

    def test_wrongKeytab(self) -> None:
        """
        A keytab whose key the KDC no longer has (the principal's key was
        changed after it was written) gives one clear line.
        """
        stale = self.directory / "stale.keytab"
        shutil.copy(self.keytab, stale)
        self.realm.keytab(self.directory / "fresh.keytab", GATEWAY_PRINCIPAL)  # a new key
        self.startNegotiating(stale)
        self.shifter.waitForLog("Kerberos: no ticket for the proxy", timeout=30)
        self.assertRefusedWith("(cannot log in: Decrypt integrity check failed)")


class HttpsProxyTests(NegotiateTestCase):
    def squidExtra(self) -> str:
        tls = self.directory / "proxy-tls"
        tls.mkdir()
        key, self.cert = makeCertificate(tls, names=(f"DNS:{PROXY_NAME}",))
        subprocess.run(["chown", "-R", "proxy", str(tls)], check=True)
        return f"https_port 127.0.0.1:3443 tls-cert={self.cert} tls-key={key}\n"

    def test_overTLS(self) -> None:
        """
        Negotiate works the same to a proxy reached over TLS: the tunnel
        opens and Squid logs the gateway's principal.
        """
        self.net.gateway.waitListening(3443)
        self.startNegotiating(None, "--proxy", f"https://{PROXY_NAME}:3443", "--proxy-ca", str(self.cert))
        self.shifter.waitForLog("Kerberos: logged in as")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 {GATEWAY_PRINCIPAL} ")
        self.shifter.waitForLog(f"via https://{PROXY_NAME}:3443 closed")


class DoctorTests(NegotiateTestCase):
    def doctor(self, keytab: Path) -> list[str]:
        """
        Run doctor in the gateway namespace with Shifter's proxy options;
        its kerberos and proxy findings.
        """
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", f"KRB5_CONFIG={self.realm.krb5conf}", sys.executable, "-m",
            "shifter.doctor", "--lan-interface", "c1", "--ports", "443", "--check-target", f"{SERVER_V4}:443",
            "--proxy", PROXY, "--proxy-keytab", str(keytab), check=False, timeout=120,
        )
        self.assertEqual(result.stderr, "")
        return [line for line in result.stdout.splitlines() if line.startswith(("error: kerberos", "error: proxy"))]

    def test_goodKeytab(self) -> None:
        """
        With a good keytab doctor logs in and its CONNECT through the
        Negotiate-only Squid opens: no kerberos or proxy finding, and
        Squid logs the gateway's principal.
        """
        self.assertEqual(self.doctor(self.keytab), [])
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 {GATEWAY_PRINCIPAL} ")

    def test_staleKeytab(self) -> None:
        """
        A stale keytab is named, with the library's reason, and so is the
        CONNECT it could not log in for.
        """
        stale = self.directory / "stale.keytab"
        shutil.copy(self.keytab, stale)
        self.realm.keytab(self.directory / "fresh.keytab", GATEWAY_PRINCIPAL)
        findings = self.doctor(stale)
        self.assertEqual(len(findings), 2, findings)
        self.assertTrue(findings[0].startswith(
            f"error: kerberos: {PROXY}: cannot log in: Decrypt integrity check failed: check the keytab"
        ), findings)
        self.assertIn("with 407 Proxy Authentication Required: Negotiate: no Kerberos ticket", findings[1])


class RenewalTests(NegotiateTestCase):
    maxLife = "1m"

    def test_renewed(self) -> None:
        """
        With tickets that last one minute, the helper logs in again before
        they expire, and tunnels still open after the first minute.
        """
        self.startNegotiating()
        firstExpire = time.time() + 60
        self.shifter.waitForLog("Kerberos: logged in as", GATEWAY_PRINCIPAL)
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        kdcLog = self.realm.directory / "kdc.log"

        def logins() -> int:
            return kdcLog.read_text().count("AS_REQ") if kdcLog.exists() else 0

        first = logins()
        waitFor(lambda: logins() > first, 70, "the helper to log in again")
        # Once the first tickets have run out:
        time.sleep(max(0.0, firstExpire + 2 - time.time()))
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("proxy answered 407", self.shifter.logText())


class SlowKdcTests(NegotiateTestCase):
    """
    A KDC whose every answer comes 2 s late, and tickets that last one
    minute.
    """

    maxLife = "1m"
    kdcDelay = 2.0

    def kdcEvents(self, what: str) -> list[float]:
        """
        When the late KDC's relay saw requests (C{"asked"}) or sent
        answers (C{"answered"}).
        """
        lines = self.kdcLog.read_text().splitlines()
        return [float(line.split()[1]) for line in lines if line.startswith(what + " ")]

    def test_tunnelsWhileRenewing(self) -> None:
        """
        While the helper renews the tickets and waits on the late KDC,
        tunnels opened meanwhile by other clients all open: some of them
        began and ended while it was waiting.
        """
        self.net.redirect(ECHO_PORT)
        self.net.server.start(sys.executable, str(TCP_PEER), "echo", str(ECHO_PORT), logTo=self.directory / "echo.log")
        self.net.server.waitListening(ECHO_PORT)
        self.startNegotiating()
        self.assertIn("Kerberos: logged in as", self.shifter.logText())
        started = time.time()
        bursts = []
        deadline = time.monotonic() + 90
        # Tunnels, ten at a time, until the tickets have been renewed.
        while "Kerberos: tickets renewed" not in self.shifter.logText() and time.monotonic() < deadline:
            began = time.time()
            result = self.net.client.run(
                sys.executable, str(TCP_PEER), "burst", SERVER_V4, str(ECHO_PORT), "10", "30", timeout=60
            )
            bursts.append((began, time.time(), result.stdout.splitlines()[0]))
        self.shifter.waitForLog("Kerberos: tickets renewed")
        self.assertEqual({outcome for _, _, outcome in bursts}, {"ok 10 failed 0"})
        # The renewal's talk with the KDC: from its first request to its
        # last answer.
        renewing = ([t for t in self.kdcEvents("asked") if t >= started][0], self.kdcEvents("answered")[-1])
        inside = [b for b in bursts if renewing[0] <= b[0] and b[1] <= renewing[1]]
        last = [b[:2] for b in bursts if b[1] >= renewing[0]][:3]
        self.assertTrue(inside, f"no burst began and ended while the KDC was asked {renewing}; the first after: {last}")
        self.assertNotIn("proxy answered 407", self.shifter.logText())


class HoldSynNegotiateTests(RealmMixin, HoldSynGatewayTestCase):
    """
    With --hold-syn the login happens while the SYN is held: the client's
    connection is accepted once Squid has opened the tunnel for the
    gateway's principal.
    """

    def setUp(self) -> None:
        super().setUp()
        negotiate = self.setUpRealm(self.net.gateway, self.directory)
        self.squid.stop()
        self.squid = Squid(self.net.gateway, self.directory / "negotiate-squid", access=AUTHENTICATED, extra=negotiate)
        self.squid.start()
        self.addCleanup(self.squid.stop)
        self.shifter.options = (
            "--listen", self.listen, "--proxy", PROXY, "--proxy-keytab", str(self.keytab), *self.shifterArguments(),
        )

    def test_heldThenAccepted(self) -> None:
        """
        A fetch through a held SYN opens, and Squid logs the principal.
        """
        self.shifter.start()
        self.shifter.waitForLog("Kerberos: logged in as")
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 {GATEWAY_PRINCIPAL} ")
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 via {PROXY} closed")
        stats = self.stoppedStats()
        self.assertEqual((stats["accepted"], stats["refused"]), (1, 0), stats)


# A Basic helper for Squid that writes down every user and password it is
# asked about, and accepts them all.
RECORDING_BASIC = """\
#!/bin/sh
while read -r line; do
    echo "$line" >> {record}
    echo OK
done
"""


class SchemeChoiceTests(NegotiateTestCase):
    """
    A Squid that offers Basic, NTLM and Negotiate at once, in that order
    (its C{auth_param} lines'): Shifter answers with the strongest scheme
    it can, and never with Basic.  Squid's Basic helper writes down every
    request it is asked to check, so a Basic answer would be seen there.
    """

    def squidExtra(self) -> str:
        if not os.access(NTLM_FAKE_AUTH, os.X_OK):
            self.skipTest(f"needs Squid's {NTLM_FAKE_AUTH}")
        helperDirectory = self.directory / "basic-helper"
        helperDirectory.mkdir()
        self.basicRecord = helperDirectory / "asked"
        helper = helperDirectory / "basic-recording"
        helper.write_text(RECORDING_BASIC.format(record=self.basicRecord))
        helper.chmod(0o755)
        subprocess.run(["chown", "-R", "proxy", str(helperDirectory)], check=True)
        return (
            f"auth_param basic program {helper}\nauth_param basic realm shifter-test\n"
            f"auth_param ntlm program {NTLM_FAKE_AUTH}\nauth_param ntlm children 5\n"
        )

    def credentials(self) -> str:
        path = self.directory / "ntlm-credentials"
        path.write_text("CORP\\alice:s3cret\n")
        return str(path)

    def tunnelUsers(self, count: int) -> list[str]:
        """
        Fetch C{count} times; the users Squid's access log names for the
        tunnels.
        """
        for _ in range(count):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.body, self.payload)

        def users() -> list[str]:
            return [l.split()[7] for l in self.squid.accessLogLines() if "TCP_TUNNEL/200" in l]

        waitFor(lambda: len(users()) == count, 10, f"{count} tunnels logged")
        return users()

    def assertNoBasic(self) -> None:
        """
        Squid offered Basic, and its Basic helper was never asked.
        """
        self.assertEqual(self.offered(), ["Basic", "NTLM", "Negotiate"])
        self.assertFalse(self.basicRecord.exists(), "Squid's Basic helper was asked")
        self.assertNotIn("s3cret", self.shifter.logText())

    def offered(self) -> list[str]:
        """
        The schemes of the C{Proxy-Authenticate} headers of Squid's 407 to
        a CONNECT without credentials, in order.
        """
        with closing(self.net.gateway.connect("127.0.0.1", 3128)) as s:
            s.sendall(f"CONNECT {SERVER_V4}:443 HTTP/1.1\r\nHost: {SERVER_V4}:443\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        head = answer.decode("latin-1").split("\r\n\r\n")[0].splitlines()
        return [l.split(":", 1)[1].split()[0] for l in head if l.lower().startswith("proxy-authenticate:")]

    def test_keytabAndCredentials(self) -> None:
        """
        With the gateway's keytab and a password, Shifter answers with
        Negotiate: Squid logs the gateway's principal for every tunnel.
        """
        self.startNegotiating(None, "--proxy", PROXY, "--proxy-credentials", self.credentials())
        self.shifter.waitForLog("Kerberos: logged in as")
        self.assertEqual(self.tunnelUsers(2), [GATEWAY_PRINCIPAL] * 2)
        self.assertNoBasic()

    def test_credentialsOnly(self) -> None:
        """
        With a password and no keytab, Shifter answers with NTLM, not
        Basic: Squid logs ntlm_fake_auth's C\\a (the first letters of
        CORP\\alice; Basic would log the whole name).
        """
        self.startShifter("--proxy", PROXY, "--proxy-credentials", self.credentials())
        self.assertEqual(self.tunnelUsers(2), ["C\\\\a"] * 2)
        self.assertNoBasic()
