"""
Shifter's Debian packages, built by C{make deb} (C{contrib/deb/build.py}),
installed into a clean Debian 12 root made from Debian's packages
(C{mmdebstrap}), and used there as an admin would: C{shifter --help},
C{shifter check}, the module built by DKMS, and systemd booted in the root
(C{systemd-nspawn -b}) starting the packaged unit, which reaches READY and
carries a client's tunnel on a gateway built of network namespaces.

These need root, network namespaces, C{mmdebstrap} and C{systemd-nspawn},
and Debian's archive and PyPI (for the root and the packaged environment).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import (
    SERVER_V4,
    SHIFTER_PORT,
    SQUID_PORT,
    Squid,
    WebServer,
    gatewayFor,
    stopProcess,
    waitFor,
)
from tests.support import requireHost

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "contrib" / "deb"))
import build as debbuild  # noqa: E402

VERSION = debbuild.version()


def nspawn(root: Path, *command: str, binds: tuple[str, ...] = (), timeout: float = 600
           ) -> subprocess.CompletedProcess:
    """
    Run C{command} in C{root} as a container (the host's network), its
    standard output and error its own (without nspawn's notice about its
    propagation directory, which it prints as it leaves).
    """
    result = subprocess.run(
        ["systemd-nspawn", "-q", "--pipe", "-D", str(root), "--register=no", "--keep-unit",
         *(f"--bind-ro={b}" for b in binds), *command],
        capture_output=True, text=True, timeout=timeout,
    )
    result.stderr = "".join(
        line for line in result.stderr.splitlines(True)
        if not line.startswith("Attempted to remove disk file system")
    )
    return result


class Packaged:
    """
    The two packages, built once per test run, and a clean root with both
    installed; removed when the run ends.
    """

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="shifter-deb-test-"))
        atexit.register(shutil.rmtree, self.work, True)
        out = self.work / "dist"
        subprocess.run([sys.executable, str(PROJECT / "contrib" / "deb" / "build.py"), "--out", str(out)],
                       check=True, capture_output=True, timeout=1200)
        self.shifterDeb = next(out.glob("shifter_*.deb"))
        self.dkmsDeb = next(out.glob("shifter-dkms_*.deb"))
        self.root = self.work / "root"
        subprocess.run(["mmdebstrap", "--variant=apt", "--include=systemd,systemd-sysv,dbus",
                        "bookworm", str(self.root)], check=True, capture_output=True, timeout=1200)
        # As an admin installs them: the two files, with what they depend on
        # from Debian's archive (and headers, for DKMS to build against).
        install = nspawn(
            self.root, "sh", "-c",
            "apt-get update -q && apt-get install -y -q --no-install-recommends "
            f"/debs/{self.shifterDeb.name} /debs/{self.dkmsDeb.name} linux-headers-amd64",
            binds=(f"{out}:/debs",), timeout=1200,
        )
        self.installLog = install.stdout + install.stderr
        assert install.returncode == 0, self.installLog


_packaged: list[Packaged] = []


class DebianPackageTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireHost(root=True, programs=("dpkg-deb", "mmdebstrap", "systemd-nspawn", "ip", "squid"))
        if not _packaged:
            _packaged.append(Packaged())
        self.packaged = _packaged[0]
        self.work = self.packaged.work
        self.root = self.packaged.root
        self.shifterDeb = self.packaged.shifterDeb
        self.dkmsDeb = self.packaged.dkmsDeb

    def contents(self, deb: Path) -> dict[str, str]:
        """
        The package's paths, each with its C{ls -l}-like line.
        """
        listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], check=True,
                                 capture_output=True, text=True).stdout
        found = {}
        for line in listing.splitlines():
            path = line.split(None, 5)[5]
            found[path.split(" -> ")[0].lstrip(".").rstrip("/") or "/"] = line
        return found

    def field(self, deb: Path, name: str) -> str:
        return subprocess.run(["dpkg-deb", "--field", str(deb), name], check=True,
                              capture_output=True, text=True).stdout.strip()

    def test_shifterPackage(self) -> None:
        """
        The shifter package holds the environment under /opt/shifter, the
        command in /usr/bin, the units, the conffile and the licence, at
        Shifter's version.
        """
        paths = self.contents(self.shifterDeb)
        self.assertEqual(self.field(self.shifterDeb, "Version"), VERSION)
        self.assertIn("-> /opt/shifter/bin/shifter", paths["/usr/bin/shifter"])
        for path in ("/opt/shifter/bin/python3", "/lib/systemd/system/shifter.service",
                     "/lib/systemd/system/shifter.socket", "/etc/shifter/shifter.toml",
                     "/usr/share/doc/shifter/copyright", "/usr/share/man/man8/shifter.8.gz",
                     "/usr/share/man/man5/shifter.toml.5.gz"):
            self.assertIn(path, paths)
        self.assertIn("-> /usr/bin/python3", paths["/opt/shifter/bin/python3"])
        conffiles = subprocess.run(["dpkg-deb", "--info", str(self.shifterDeb), "conffiles"],
                                   check=True, capture_output=True, text=True).stdout
        self.assertIn("/etc/shifter/shifter.toml", conffiles.split())

    def test_dkmsPackage(self) -> None:
        """
        shifter-dkms holds the module's source at the same version, with a
        dkms.conf that says so.
        """
        paths = self.contents(self.dkmsDeb)
        self.assertEqual(self.field(self.dkmsDeb, "Version"), VERSION)
        source = f"/usr/src/shifter-{VERSION}"
        for name in ("dkms.conf", "Kbuild", "shifter_main.c", "include/uapi/linux/shifter.h"):
            self.assertIn(f"{source}/{name}", paths)
        self.assertFalse([p for p in paths if "/tests" in p])

    def test_nothingOfTheBuild(self) -> None:
        """
        No installed file names the directory the package was built in.
        """
        result = subprocess.run(["grep", "-rlI", "shifter-deb-", str(self.root / "opt" / "shifter")],
                                capture_output=True, text=True)
        self.assertEqual(result.stdout, "")

    def test_commands(self) -> None:
        """
        In the clean root: C{shifter --version} names Shifter's version,
        C{shifter --help} explains, and C{shifter check} accepts a good file
        and refuses the shipped one (no proxy yet) with the error and a hint.
        """
        version = nspawn(self.root, "shifter", "--version")
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertIn(f"Shifter {VERSION}", version.stdout)
        helped = nspawn(self.root, "shifter", "--help")
        self.assertEqual(helped.returncode, 0, helped.stderr)
        self.assertIn("run", helped.stdout)
        good = self.work / "good.toml"
        good.write_text('listen = "tcp:12345"\n[[proxy]]\naddress = "127.0.0.1:3128"\n')
        checked = nspawn(self.root, "shifter", "check", "--config", "/cfg/good.toml",
                         binds=(f"{self.work}:/cfg",))
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        shipped = nspawn(self.root, "shifter", "check", "--config", "/etc/shifter/shifter.toml")
        self.assertEqual(shipped.returncode, 1, shipped.stdout + shipped.stderr)
        self.assertNotIn("Traceback", shipped.stderr)
        error, hint = shipped.stderr.strip().splitlines()
        self.assertIn("--proxy", error)
        self.assertIn("--help", hint)

    def test_dkmsBuilt(self) -> None:
        """
        Installing shifter-dkms beside Debian's headers builds and installs
        the module for that kernel.
        """
        status = nspawn(self.root, "dkms", "status")
        self.assertRegex(status.stdout, rf"shifter/{re.escape(VERSION)}, [^,]+, x86_64: installed")
        modules = list((self.root / "lib" / "modules").glob("*/updates/dkms/shifter.ko*"))
        self.assertTrue(modules, self.packaged.installLog[-2000:])

    def test_unitCarriesATunnel(self) -> None:
        """
        systemd booted in the root starts the packaged unit with nothing but
        /etc/shifter/shifter.toml; it reaches READY (active, with its status
        line), and a client behind the gateway reaches a web server through
        it and Squid.
        """
        net = gatewayFor(self)
        net.redirect(443)
        squid = Squid(net.gateway, net.directory / "squid")
        squid.start()
        web = WebServer(net.server, net.directory / "web")
        payload = os.urandom(256 * 1024)
        (web.site / "file.bin").write_bytes(payload)
        web.start()

        root = self.work / "booted"
        if root.exists():
            shutil.rmtree(root)
        subprocess.run(["cp", "-a", str(self.root), str(root)], check=True)
        (root / "etc" / "shifter" / "shifter.toml").write_text(
            f'listen = "tcp6:{SHIFTER_PORT}:interface=\\\\:\\\\:"\n'
            f'[[proxy]]\naddress = "127.0.0.1:{SQUID_PORT}"\n'
        )
        out = self.work / "out"
        out.mkdir(exist_ok=True)
        (root / "etc" / "systemd" / "system" / "shifter-watch.service").write_text(
            "[Unit]\nAfter=shifter.service\n[Service]\nExecStart=/bin/sh -c 'while :; do "
            "systemctl show shifter -p ActiveState -p SubState -p StatusText > /out/state.new; "
            "mv /out/state.new /out/state; journalctl -u shifter --no-pager > /out/journal 2>&1; "
            "sleep 1; done'\n[Install]\nWantedBy=multi-user.target\n"
        )
        subprocess.run(["chroot", str(root), "systemctl", "enable", "shifter.service",
                        "shifter-watch.service"], check=True, capture_output=True)
        container = subprocess.Popen(
            ["systemd-nspawn", "-q", "-b", "-D", str(root), "--register=no", "--keep-unit",
             f"--network-namespace-path=/run/netns/{net.gateway.name}", f"--bind={out}:/out"],
            stdout=open(self.work / "boot.log", "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(stopProcess, container, 60)

        def state() -> str:
            path = out / "state"
            return path.read_text() if path.exists() else ""

        waitFor(lambda: "SubState=running" in state() or container.poll() is not None, 120,
                "the shifter unit to run")
        self.assertIn("ActiveState=active", state(), (out / "journal").read_text()
                      if (out / "journal").exists() else "")
        self.assertIn("StatusText=", state())
        self.assertRegex(state(), r"StatusText=\S")

        fetched = self.work / "fetched"
        result = net.client.run("curl", "-sS", "--max-time", "20", "--cacert", str(web.cert),
                                "-o", str(fetched), f"https://{SERVER_V4}/file.bin",
                                check=False, timeout=40)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(fetched.read_bytes()).digest(),
                         hashlib.sha256(payload).digest())
        squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
        waitFor(lambda: "tunnel " in (out / "journal").read_text(), 10, "the tunnel line in the journal")
