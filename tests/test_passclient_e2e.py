"""
The client's identity reaches a real Squid, end to end: with each
C{--pass-client} mode Squid's access log names the client's address, not
Shifter's, over IPv4 and IPv6; a Squid port that requires the PROXY header
refuses a tunnel sent without one, and Shifter says so in one line.

These need root (namespaces, iptables), Squid, curl and openssl.
"""

from __future__ import annotations

import subprocess

from tests.gateway import (
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    VENV_BIN,
    Squid,
    makeCertificate,
)
from tests.test_upstream_e2e import UpstreamTestCase

# Squid's ports: 3128 plain (X-Forwarded-For honoured from Shifter), 3129
# requiring the PROXY header, on 127.0.0.1 and ::1 alike.  Squid's ACLs
# see the client named by either, so the client network is allowed; plain
# tunnels from Shifter still come from localhost.
PASS_CLIENT_SQUID = """\
http_port 127.0.0.1:3129 require-proxy-header
http_port [::1]:3129 require-proxy-header
proxy_protocol_access allow localhost
follow_x_forwarded_for allow localhost
"""
ACCESS = """\
acl lan src 192.0.2.0/24 2001:db8:1::/64
http_access allow lan
http_access allow localhost
"""
URLS = {4: f"https://{SERVER_V4}/file.bin", 6: f"https://[{SERVER_V6}]/file.bin"}
TARGETS = {4: f"CONNECT {SERVER_V4}:443 ", 6: f"CONNECT [{SERVER_V6}]:443 "}
CLIENTS = {4: CLIENT_V4, 6: CLIENT_V6}


def clientField(line: str) -> str:
    """
    The client address of a line of Squid's native access log (its third
    field).
    """
    return line.split()[2]


class PassClientTestCase(UpstreamTestCase):
    def startSquid(self, extra: str = "") -> Squid:
        return self.squidWith(ACCESS, extra=PASS_CLIENT_SQUID + extra)

    def assertClientLogged(self, squid: Squid, version: int, via: str) -> str:
        """
        Fetch the file over IPv4 or IPv6 and check that Squid's access log
        names the client's address for the tunnel, and that Shifter logged
        the tunnel via C{via}.

        @return: Squid's access log line.
        """
        result = self.fetch(URLS[version])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        line = squid.waitForLog("TCP_TUNNEL/200", TARGETS[version])
        self.assertEqual(clientField(line), CLIENTS[version], line)
        self.shifter.waitForLog(f"tunnel {CLIENTS[version] if version == 4 else '[' + CLIENT_V6 + ']'}:",
                                f"via {via} closed")
        return line


class PassClientModeTests(PassClientTestCase):
    def test_noneShowsShifter(self) -> None:
        """
        Without --pass-client, Squid sees every tunnel come from Shifter on
        127.0.0.1: the behaviour the other modes improve on.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "127.0.0.1:3128")
        result = self.fetch(URLS[4])
        self.assertEqual(result.returncode, 0, result.stderr)
        line = squid.waitForLog("TCP_TUNNEL/200", TARGETS[4])
        self.assertEqual(clientField(line), "127.0.0.1", line)

    def test_forwardedFor(self) -> None:
        """
        --pass-client x-forwarded-for: Squid, following X-Forwarded-For
        from localhost, logs the client's address, IPv4 and IPv6.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "127.0.0.1:3128", "--pass-client", "x-forwarded-for")
        self.assertClientLogged(squid, 4, "127.0.0.1:3128")
        self.assertClientLogged(squid, 6, "127.0.0.1:3128")

    def test_proxyV1(self) -> None:
        """
        --pass-client proxy-v1 to a port that requires the PROXY header:
        Squid logs the client's address, IPv4 and IPv6.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "127.0.0.1:3129", "--pass-client", "proxy-v1")
        self.assertClientLogged(squid, 4, "127.0.0.1:3129")
        self.assertClientLogged(squid, 6, "127.0.0.1:3129")

    def test_proxyV2(self) -> None:
        """
        --pass-client proxy-v2, to Squid over IPv6 loopback: Squid logs the
        client's address, IPv4 and IPv6.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "[::1]:3129", "--pass-client", "proxy-v2")
        self.assertClientLogged(squid, 4, "[::1]:3129")
        self.assertClientLogged(squid, 6, "[::1]:3129")

    def test_proxyURLSetsItsOwnMode(self) -> None:
        """
        A proxy URL's ?pass-client= wins over --pass-client: here the
        global proxy-v1 would be refused by the plain port, and the URL's
        x-forwarded-for is what Squid gets.
        """
        squid = self.startSquid()
        self.startShifter(
            "--pass-client", "proxy-v1", "--proxy", "http://127.0.0.1:3128?pass-client=x-forwarded-for"
        )
        self.assertClientLogged(squid, 4, "127.0.0.1:3128")


class HeaderRequiredTests(PassClientTestCase):
    def test_missingHeaderRefused(self) -> None:
        """
        A tunnel sent without the PROXY header to a port that requires it
        is refused by Squid: the client's connection fails, Shifter logs
        one line that says the proxy may need --pass-client, and no tunnel
        reaches the server.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "127.0.0.1:3129")
        result = self.fetch(URLS[4], timeout=15)
        self.assertNotEqual(result.returncode, 0)
        line = self.shifter.waitForLog(f"tunnel {CLIENT_V4}:", "via 127.0.0.1:3129 failed")
        self.assertIn("PROXY protocol header", line)
        self.assertEqual(self.shifter.logText().count("via 127.0.0.1:3129 failed"), 1)
        self.assertEqual([l for l in squid.accessLogLines() if "TCP_TUNNEL" in l], [])

    def test_unexpectedHeaderRefused(self) -> None:
        """
        A PROXY header sent to a port that does not expect one is refused
        by Squid: the client's connection fails, Shifter logs one line
        that points at --pass-client, and no tunnel reaches the server.
        """
        squid = self.startSquid()
        self.startShifter("--proxy", "127.0.0.1:3128", "--pass-client", "proxy-v2")
        result = self.fetch(URLS[4], timeout=15)
        self.assertNotEqual(result.returncode, 0)
        line = self.shifter.waitForLog(f"tunnel {CLIENT_V4}:", "via 127.0.0.1:3128 failed")
        self.assertIn("PROXY protocol header", line)
        self.assertEqual(self.shifter.logText().count("via 127.0.0.1:3128 failed"), 1)
        self.assertEqual([l for l in squid.accessLogLines() if "TCP_TUNNEL" in l], [])


class TLSProxyTests(PassClientTestCase):
    def proxyCertificate(self):  # type: ignore[no-untyped-def]
        tlsDirectory = self.directory / "proxy-tls"
        tlsDirectory.mkdir()
        key, cert = makeCertificate(tlsDirectory, names=("IP:127.0.0.1",))
        subprocess.run(["chown", "-R", "proxy", str(tlsDirectory)], check=True)
        return key, cert

    def test_forwardedForInsideTLS(self) -> None:
        """
        To Squid's https_port, X-Forwarded-For travels inside TLS; Squid
        logs the client's address, IPv4 and IPv6.
        """
        key, cert = self.proxyCertificate()
        squid = self.startSquid(f"https_port 127.0.0.1:3443 tls-cert={cert} tls-key={key}\n")
        self.net.gateway.waitListening(3443)
        self.startShifter(
            "--proxy", "https://127.0.0.1:3443?pass-client=x-forwarded-for", "--proxy-ca", str(cert)
        )
        self.assertClientLogged(squid, 4, "https://127.0.0.1:3443")
        self.assertClientLogged(squid, 6, "https://127.0.0.1:3443")

    def test_proxyHeaderInsideTLS(self) -> None:
        """
        To a TLS proxy the PROXY header is the first bytes inside TLS: a
        TLS terminator in front of Squid's require-proxy-header port passes
        it on, and Squid logs the client's address, IPv4 and IPv6.
        """
        key, cert = self.proxyCertificate()
        squid = self.startSquid()
        self.net.gateway.start(
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.directory / 'tls-front.log'}",
            "portforward", "--port", f"ssl:3444:privateKey={key}:certKey={cert}:interface=127.0.0.1",
            "--host", "127.0.0.1", "--dest_port", "3129",
            logTo=self.directory / "tls-front.out",
        )
        self.net.gateway.waitListening(3444)
        self.startShifter(
            "--proxy", "https://127.0.0.1:3444", "--pass-client", "proxy-v2",
            "--proxy-ca", str(cert),
        )
        self.assertClientLogged(squid, 4, "https://127.0.0.1:3444")
        self.assertClientLogged(squid, 6, "https://127.0.0.1:3444")
