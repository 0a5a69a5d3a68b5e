"""
C{pip install .} gives a working Shifter: the wheel is built, installed
into a new virtual environment with nothing but its own requirements (no
test extras, not this source tree), and that installation runs
C{twistd shifter --help} and carries one tunnel end to end through a real
Squid in namespaces.

Building and installing fetch the build tools and the requirements from the
package index, as C{pip install .} does.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway import SERVER_V4, SHIFTER_PORT, SQUID_PORT, waitFor
from tests.test_integration import GatewayTestCase

PROJECT = Path(__file__).resolve().parent.parent


class Installed:
    """
    The wheel of this tree, installed once for the tests of this module.
    """

    directory: Path | None = None
    error: str | None = None

    @classmethod
    def venv(cls) -> Path:
        if cls.error is not None:
            raise AssertionError(cls.error)
        if cls.directory is None:
            directory = Path(tempfile.mkdtemp(prefix="shifter-wheel-"))
            atexit.register(shutil.rmtree, directory, True)
            try:
                wheels = directory / "wheels"
                run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(PROJECT),
                    cwd=directory)
                [wheel] = wheels.glob("shifter-*.whl")
                venv = directory / "venv"
                run(sys.executable, "-m", "venv", str(venv), cwd=directory)
                run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel), cwd=directory)
            except AssertionError as e:
                cls.error = str(e)
                raise
            cls.directory = venv
        return cls.directory


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    # The installation alone: not this tree, even when the tests are run
    # with it on PYTHONPATH.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run(command, cwd=str(cwd), capture_output=True, text=True, timeout=900, env=environment)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class WheelTests(SynchronousTestCase):
    def test_help(self) -> None:
        """
        The installed twistd finds the shifter plugin and documents its
        options; shifter is the installed one, not this tree.
        """
        venv = Installed.venv()
        outside = Path(self.mktemp()).resolve()
        outside.mkdir()
        result = run(str(venv / "bin" / "twistd"), "shifter", "--help", cwd=outside)
        for option in ("--proxy", "--listen", "--proxy-preemptive-basic", "--max-connections-per-client"):
            self.assertIn(option, result.stdout)
        where = run(str(venv / "bin" / "python"), "-c", "import shifter; print(shifter.__file__)", cwd=outside)
        self.assertTrue(where.stdout.strip().startswith(str(venv)), where.stdout)
        self.assertNotIn("hypothesis", run(str(venv / "bin" / "python"), "-m", "pip", "list", cwd=outside).stdout)


    def test_command(self) -> None:
        """
        The installation has the shifter command (a console script): its
        version, and shifter check of a file with no option beside; the
        licence is in the package's metadata.
        """
        venv = Installed.venv()
        outside = Path(self.mktemp()).resolve()
        outside.mkdir()
        version = run(str(venv / "bin" / "shifter"), "--version", cwd=outside)
        self.assertTrue(version.stdout.startswith("Shifter "), version.stdout)
        config = outside / "shifter.toml"
        config.write_text('[[proxy]]\naddress = "10.0.0.5:3128"\n')
        checked = run(str(venv / "bin" / "shifter"), "check", "--config", str(config), cwd=outside)
        self.assertIn("is good", checked.stdout)
        licence = run(str(venv / "bin" / "python"), "-c",
                      "import importlib.metadata as m; print(m.metadata('shifter')['License'])", cwd=outside)
        self.assertEqual(licence.stdout.strip(), "MIT")


class InstalledTunnelTests(GatewayTestCase):
    def test_tunnel(self) -> None:
        """
        The installed Shifter (TLS support included) carries a client's
        HTTPS download through a real Squid.
        """
        venv = Installed.venv()
        self.squid.start()
        log = self.directory / "installed-shifter.log"
        process = self.net.gateway.start(
            str(venv / "bin" / "twistd"), "-n", "--pidfile=", f"--logfile={log}", "shifter",
            "--listen", f"tcp6:{SHIFTER_PORT}:interface=\\:\\:", "--proxy", f"127.0.0.1:{SQUID_PORT}",
            logTo=self.directory / "installed-shifter.out",
        )
        text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
        waitFor(lambda: "accepting redirected" in text() or process.poll() is not None, 30, "Shifter")
        self.assertIsNone(process.poll(), text())
        self.assertIn(str(venv), text())
        result = self.fetch(f"https://{SERVER_V4}/file.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.body, self.payload)
        self.squid.waitForLog("TCP_TUNNEL/200", f"CONNECT {SERVER_V4}:443 ")
