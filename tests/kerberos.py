"""
A real MIT Kerberos realm for tests: a KDC (Debian's C{krb5-kdc}) with a
database, configuration and logs of its own in a test's directory, run in
a network namespace the test made, and keytabs made with C{kadmin.local}.

Programs that use the realm find it through C{KRB5_CONFIG} (L{Realm.env}).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.gateway import Namespace, stopProcess

REALM = "SHIFTER.TEST"
KDC_PORT = 88


class Realm:
    """
    A KDC for L{REALM} listening on C{127.0.0.1:KDC_PORT} in C{namespace}.

    @ivar krb5conf: the client configuration (C{KRB5_CONFIG}).
    """

    def __init__(self, namespace: Namespace, directory: Path, maxLife: str = "10h", kdcPort: int = KDC_PORT) -> None:
        """
        @param kdcPort: the port the KDC listens on (the clients' is always
            L{KDC_PORT}: another port is for something put in between).
        """
        self.namespace = namespace
        self.kdcPort = kdcPort
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.krb5conf = directory / "krb5.conf"
        self.kdcconf = directory / "kdc.conf"
        self.krb5conf.write_text(
            f"""\
[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    kdc_timesync = 0
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{KDC_PORT}
    }}
[domain_realm]
    .shifter.test = {REALM}
"""
        )
        self.kdcconf.write_text(
            f"""\
[kdcdefaults]
    kdc_ports = {kdcPort}
    kdc_tcp_ports = {kdcPort}
[realms]
    {REALM} = {{
        database_name = {directory}/principal
        key_stash_file = {directory}/stash
        acl_file = {directory}/kadm5.acl
        max_life = {maxLife}
        max_renewable_life = 0
    }}
[logging]
    kdc = FILE:{directory}/kdc.log
"""
        )
        (directory / "kadm5.acl").write_text("")
        self.process: subprocess.Popen | None = None
        self.admin("kdb5_util", "create", "-s", "-r", REALM, "-P", "master-" + os.urandom(8).hex())

    def env(self) -> dict[str, str]:
        """
        The environment that points Kerberos programs at this realm.
        """
        return dict(os.environ, KRB5_CONFIG=str(self.krb5conf), KRB5_KDC_PROFILE=str(self.kdcconf))

    def admin(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"{command} failed: {result.stderr}")
        return result.stdout

    def addPrincipal(self, name: str, maxLife: str | None = None) -> None:
        """
        Add C{name} with a random key (as a host or service is added).
        """
        life = ["-maxlife", maxLife] if maxLife else []
        self.admin("kadmin.local", "-r", REALM, "-q", " ".join(["addprinc", "-randkey", *life, name]))

    def keytab(self, path: Path, *names: str) -> Path:
        """
        Write the current keys of C{names} into the keytab C{path}.  (Each
        C{ktadd} makes a new key: an older keytab of the same names then
        holds a key the KDC no longer knows.)
        """
        for name in names:
            self.admin("kadmin.local", "-r", REALM, "-q", f"ktadd -k {path} {name}")
        return path

    def start(self) -> None:
        self.process = self.namespace.start(
            "/usr/bin/env", f"KRB5_CONFIG={self.krb5conf}", f"KRB5_KDC_PROFILE={self.kdcconf}",
            "krb5kdc", "-n", "-r", REALM, logTo=self.directory / "krb5kdc.out",
        )
        self.namespace.waitListening(self.kdcPort)

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process)
            self.process = None
