"""
Upstream proxies as gateways run them, end to end with real Squids: CONNECT
by name (SNI and Host) against a domain rule, basic and digest
authentication, two proxies with one stopped and restarted, and a proxy
behind TLS.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.gateway import (
    PROJECT,
    SERVER_V4,
    SHIFTER_PORT,
    SQUID_PORT,
    VENV_BIN,
    Squid,
    makeCertificate,
    waitFor,
)
from tests.test_integration import GatewayTestCase

NAME = "www.example.test"
TCP_PEER = Path(__file__).resolve().parent / "tcp_peer.py"
ECHO_PORT = 8443
LISTEN = ("--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:")
SQUID = f"127.0.0.1:{SQUID_PORT}"


class UpstreamTestCase(GatewayTestCase):
    def startShifter(self, *options: str) -> None:
        self.shifter.options = LISTEN + options
        self.shifter.start()
        self.addCleanup(self.shifter.stop)

    def squidWith(self, access: str, extra: str = "", name: str = "squid", port: int = SQUID_PORT) -> Squid:
        hosts = self.directory / f"{name}-hosts"
        hosts.write_text(f"{SERVER_V4} {NAME}\n")
        squid = Squid(
            self.net.gateway, self.directory / name, port=port, access=access,
            extra=f"hosts_file {hosts}\n{extra}",
        )
        squid.start()
        self.addCleanup(squid.stop)
        return squid

    def fetchByName(self, path: str = "/file.bin", scheme: str = "https", port: int = 443):  # type: ignore[no-untyped-def]
        """
        Fetch from the server by its name, as a client whose DNS gave it
        the server's address.
        """
        out = self.directory / "by-name.out"
        result = self.net.client.run(
            "curl", "-sS", "--max-time", "20", "--cacert", str(self.web.cert),
            "--resolve", f"{NAME}:{port}:{SERVER_V4}", "-o", str(out), f"{scheme}://{NAME}:{port}{path}",
            check=False, timeout=30,
        )
        result.body = out.read_bytes() if out.exists() else b""  # type: ignore[attr-defined]
        out.unlink(missing_ok=True)
        return result


class ConnectTargetTests(UpstreamTestCase):
    # -n: no reverse look-up of addresses, which would find the name in
    # Squid's hosts file and let an address through.
    domainOnly = f"acl named dstdomain -n {NAME}\nhttp_access allow localhost named\n"

    def test_sniPassesDomainRule(self) -> None:
        """
        With --connect-target sni, Shifter asks for CONNECT by the name in
        the ClientHello, which Squid's dstdomain rule allows.
        """
        squid = self.squidWith(self.domainOnly)
        self.startShifter("--proxy", SQUID, "--connect-target", "sni")
        result = self.fetchByName()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {NAME}:443 ")
        self.shifter.waitForLog(f"-> {SERVER_V4}:443 (CONNECT {NAME}:443, from SNI) via", "closed")

    def test_ipRefusedByDomainRule(self) -> None:
        """
        With --connect-target ip the same rule refuses the address.
        """
        squid = self.squidWith(self.domainOnly)
        self.startShifter("--proxy", SQUID)
        self.assertNotEqual(self.fetchByName().returncode, 0)
        squid.waitForLog("TCP_DENIED/403", f"CONNECT {SERVER_V4}:443 ")
        self.shifter.waitForLog("failed: proxy answered 403")

    def test_hostHeader(self) -> None:
        """
        With --connect-target auto, a plain HTTP request is sent to CONNECT
        by its Host header's name, with the original port.
        """
        self.net.redirect(80)
        self.net.server.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.directory / 'http.log'}",
            "web", "--listen", "tcp:80", "--path", str(self.web.site),
            logTo=self.directory / "http.out",
        )
        self.net.server.waitListening(80)
        squid = self.squidWith(self.domainOnly, extra="acl SSL_ports port 80\n")
        self.startShifter("--proxy", SQUID, "--connect-target", "auto")
        result = self.fetchByName(scheme="http", port=80)
        self.assertEqual(result.returncode, 0, result.stderr)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {NAME}:80 ")
        self.shifter.waitForLog(f"(CONNECT {NAME}:80, from Host header)")

    def test_fallbackToAddress(self) -> None:
        """
        A client that sends no name (TLS without SNI: curl to an address)
        is tunnelled by address, and the log says why.
        """
        squid = self.squidWith("http_access allow localhost\n")
        self.startShifter("--proxy", SQUID, "--connect-target", "sni")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        self.shifter.waitForLog("(CONNECT by address: no SNI")


class AuthenticationTests(UpstreamTestCase):
    authed = "acl authed proxy_auth REQUIRED\nhttp_access allow localhost authed\n"

    def test_basic(self) -> None:
        """
        Credentials in the proxy URL are sent with Basic; Squid logs the
        user; a wrong password is one clear failure line.
        """
        htpasswd = self.directory / "htpasswd"
        hashed = subprocess.run(
            ["openssl", "passwd", "-1", "s3cret"], capture_output=True, text=True, check=True
        ).stdout.strip()
        htpasswd.write_text(f"alice:{hashed}\n")
        squid = self.squidWith(
            self.authed,
            extra=f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {htpasswd}\n"
            "auth_param basic realm shifter-test\n",
        )
        subprocess.run(["chown", "proxy", str(htpasswd)], check=True)
        self.startShifter("--proxy", f"http://alice:s3cret@{SQUID}")
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 alice ")
        self.shifter.stop()
        self.shifter.options = LISTEN + ("--proxy", f"http://alice:wrong@{SQUID}")
        self.shifter.start()
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        line = self.shifter.waitForLog("failed: proxy answered 407")
        self.assertNotIn("wrong", self.shifter.logText())
        self.assertNotIn("s3cret", self.shifter.logText())
        self.assertEqual(self.shifter.logText().count("failed: proxy answered 407"), 1, line)

    def test_digest(self) -> None:
        """
        With a Digest-only Squid, the first connection answers the 407
        challenge and later ones reuse the nonce: one 407 for three fetches.
        The password comes from --proxy-credentials.
        """
        passwords = self.directory / "digest-passwords"
        passwords.write_text("bob:open sesame\n")
        squid = self.squidWith(
            self.authed,
            extra=f"auth_param digest program /usr/lib/squid/digest_file_auth {passwords}\n"
            "auth_param digest realm shifter-test\n",
        )
        subprocess.run(["chown", "proxy", str(passwords)], check=True)
        credentials = self.directory / "credentials"
        credentials.write_text("bob:open sesame\n")
        self.startShifter("--proxy", SQUID, "--proxy-credentials", str(credentials))
        for _ in range(3):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
        waitFor(
            lambda: sum("TCP_TUNNEL/200" in l and " bob " in l for l in squid.accessLogLines()) == 3,
            10, "three authenticated tunnels",
        )
        self.assertEqual(sum("/407 " in line for line in squid.accessLogLines()), 1)


    def test_digestBurst(self) -> None:
        """
        A hundred tunnels opened at once through a Digest-only Squid, twice,
        after one that made a nonce shared, all open: spent nonces are
        renewed and no client is refused.  Squid is strict here (a nonce
        serves ten requests, and its counts must come one after another,
        in order), so that concurrent tunnels do spend nonces.
        """
        passwords = self.directory / "digest-passwords"
        passwords.write_text("bob:open sesame\n")
        squid = self.squidWith(
            self.authed,
            extra=f"auth_param digest program /usr/lib/squid/digest_file_auth {passwords}\n"
            "auth_param digest realm shifter-test\n"
            "auth_param digest children 20 startup=5\n"
            "auth_param digest nonce_max_count 10\n"
            "auth_param digest nonce_strictness on\n"
            f"acl SSL_ports port {ECHO_PORT}\n",
        )
        subprocess.run(["chown", "proxy", str(passwords)], check=True)
        self.net.redirect(ECHO_PORT)
        self.net.server.start(sys.executable, str(TCP_PEER), "echo", str(ECHO_PORT), logTo=self.directory / "echo.log")
        self.net.server.waitListening(ECHO_PORT)
        self.startShifter("--proxy", f"http://bob:open%20sesame@{SQUID}")
        # One tunnel first, so that the burst finds a nonce shared already.
        for count in (1, 100, 100):
            result = self.net.client.run(
                sys.executable, str(TCP_PEER), "burst", SERVER_V4, str(ECHO_PORT), str(count), "60", timeout=120
            )
            self.assertEqual(result.stdout.splitlines()[0], f"ok {count} failed 0", result.stdout)
        waitFor(
            lambda: sum("TCP_TUNNEL/200" in l and " bob " in l for l in squid.accessLogLines()) == 201,
            30, "two hundred and one authenticated tunnels",
        )
        self.assertNotIn("proxy answered 407", self.shifter.logText())
        self.assertNotIn("open sesame", self.shifter.logText())


class SeveralProxiesTests(UpstreamTestCase):
    def test_failoverAndBack(self) -> None:
        """
        With two Squids, stopping the first moves clients to the second at
        once; the first is marked down, probed, and used again once it is
        back.
        """
        first = self.squidWith("http_access allow localhost\n", name="first", port=3128)
        second = self.squidWith("http_access allow localhost\n", name="second", port=3130)
        self.startShifter(
            "--proxy", "127.0.0.1:3128", "--proxy", "127.0.0.1:3130",
            "--proxy-failures", "2", "--proxy-backoff", "1",
        )
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        first.waitForLog("TCP_TUNNEL/200")
        first.stop()
        for _ in range(3):
            result = self.fetch(f"https://{SERVER_V4}/file.bin")
            self.assertEqual(result.returncode, 0, result.stderr)
        waitFor(lambda: sum("TCP_TUNNEL/200" in l for l in second.accessLogLines()) == 3, 10, "3 via second")
        self.shifter.waitForLog("proxy 127.0.0.1:3128 marked down")
        first.start()
        # The probe's CONNECT is refused by Squid's port rule, with no
        # look-up and no connection out (HIER_NONE): that answer is enough.
        self.shifter.waitForLog("proxy 127.0.0.1:3128 answered the probe (403 Forbidden)", timeout=20)
        first.waitForLog("TCP_DENIED/403", "CONNECT 255.255.255.255:9 ", "HIER_NONE/-")
        before = len(first.accessLogLines())
        self.assertEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        waitFor(lambda: len(first.accessLogLines()) > before, 10, "a tunnel via the first again")
        self.shifter.waitForLog("proxy 127.0.0.1:3128 is back up: a tunnel through it opened")


# Probes Squid once, in the gateway's namespace, the way the pool does, and
# prints the status line it got.
_PROBE = """\
import sys
from twisted.internet import task
from shifter.upstream.probe import DEFAULT_PROBE_TARGET, askProxy
from shifter.upstream.proxy import parseProxy

def main(reactor):
    proxy = parseProxy(sys.argv[1], reactor)
    asking = askProxy(proxy, *DEFAULT_PROBE_TARGET, reactor, 2.0, 2.0, statusOnly=True)
    return asking.addCallback(lambda response: print(response.status, response.reason))

task.react(main)
"""


class ProbeTargetTests(UpstreamTestCase):
    """
    The health probe's default target against a real Squid.
    """

    def probe(self) -> str:
        result = self.net.gateway.run(
            "env", f"PYTHONPATH={PROJECT}", str(VENV_BIN / "python"), "-c", _PROBE, SQUID, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_refusedByPortRules(self) -> None:
        """
        Squid's default port rules (Debian's "deny !Safe_ports" first, then
        "deny CONNECT !SSL_ports") refuse the probe target at once, within
        the probe's 2 s, without a look-up or a connection out.
        """
        squid = self.squidWith(
            "acl Safe_ports port 80 21 443 70 210 1025-65535 280 488 591 777\n"
            "http_access deny !Safe_ports\nhttp_access allow localhost\n"
        )
        self.assertEqual(self.probe(), "403 Forbidden")
        squid.waitForLog("TCP_DENIED/403", "CONNECT 255.255.255.255:9 ", "HIER_NONE/-")

    def test_answeredEvenWhenAllowed(self) -> None:
        """
        A Squid that allows CONNECT to any port still answers at once: it
        cannot connect to the broadcast address, so it answers an error
        without waiting, and nothing leaves the gateway.
        """
        squid = self.squidWith("http_access allow localhost\n", extra="http_access allow localhost\n")
        status = self.probe()
        self.assertRegex(status, r"^5\d\d ")
        squid.waitForLog("CONNECT 255.255.255.255:9 ")


class TLSProxyTests(UpstreamTestCase):
    def test_squidBehindTLS(self) -> None:
        """
        --proxy https://... speaks TLS to the proxy, verifying its
        certificate against --proxy-ca.
        """
        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        squid = self.squidWith(
            "http_access allow localhost\n",
            extra=f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n",
        )
        self.net.gateway.waitListening(3443)
        self.startShifter("--proxy", "https://127.0.0.1:3443", "--proxy-ca", str(cert))
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        self.shifter.waitForLog("via https://127.0.0.1:3443 closed")

    def test_bundle(self) -> None:
        """
        A --proxy-ca bundle is trusted whole: the proxy's certificate,
        second in the file after another CA, is verified.
        """
        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        squid = self.squidWith(
            "http_access allow localhost\n",
            extra=f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n",
        )
        self.net.gateway.waitListening(3443)
        bundle = self.directory / "bundle.pem"
        bundle.write_bytes(Path(self.web.cert).read_bytes() + Path(cert).read_bytes())
        self.startShifter("--proxy", "https://127.0.0.1:3443", "--proxy-ca", str(bundle))
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")

    def test_untrustedProxyCertificate(self) -> None:
        """
        A proxy whose certificate the CA file does not vouch for is not
        used: the client is closed and the log says why.
        """
        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        self.squidWith(
            "http_access allow localhost\n",
            extra=f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n",
        )
        self.net.gateway.waitListening(3443)
        self.startShifter("--proxy", "https://127.0.0.1:3443", "--proxy-ca", str(self.web.cert))
        self.assertNotEqual(self.fetch(f"https://{SERVER_V4}/file.bin").returncode, 0)
        self.shifter.waitForLog("via https://127.0.0.1:3443 failed")
