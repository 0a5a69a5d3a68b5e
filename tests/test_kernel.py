"""
The Shifter kernel module in a real kernel.

The module is built against the installed kernel headers (from a copy of
its sources in a temporary directory), then Debian's
kernel boots once under qemu (virtme-ng, software emulation) with this
machine's file system shared read-only, and
C{kernel_module/tests/guest-run.sh} loads the module there, runs the
guest test modules of C{tests.guest} with trial, unloads the module while it holds
entries and checks the kernel log.  The tests below read that one boot's
output; each says what it found when it fails, and the whole guest output
is printed once after the boot.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import requireHost

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "kernel_module"
GUEST_SCRIPT = MODULE_DIR / "tests" / "guest-run.sh"
BOOT_TIMEOUT = 15 * 60
HOSTFS_TAG = "shifterhostfs"
BUILD_TIMEOUT = 10 * 60

# What a kernel log must not hold after the guest suite.
DMESG_TROUBLE = re.compile(
    r"WARNING|BUG|Oops|Call Trace|general protection|RCU stall|kmemleak|"
    r"refcount_t|list_(add|del) corruption|UBSAN|KASAN"
)


def _unavailable(reason: str) -> None:
    """
    Skip with C{reason}, or fail under CI, which must run these tests.
    """
    if os.environ.get("CI"):
        raise AssertionError(f"{reason}, which CI must provide")
    raise SkipTest(reason)


def _kernelRelease() -> str | None:
    """
    The newest kernel in /boot that has headers to build the module
    against.
    """
    releases = sorted(
        (path.name[len("vmlinuz-"):] for path in Path("/boot").glob("vmlinuz-*")),
        reverse=True,
    )
    for release in releases:
        if (Path("/lib/modules") / release / "build" / "Makefile").exists():
            return release
    return None


def _isStatic(path: str) -> bool:
    """
    Whether the ELF executable at C{path} has no program interpreter.
    """
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def _vng() -> str | None:
    """
    virtme-ng's command, from this Python's environment or the PATH.
    """
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else shutil.which("vng")


def requireBootableKernel() -> str:
    """
    Skip (or fail under CI) unless this host can build the module and boot
    a kernel for it; return that kernel's release.
    """
    requireHost(root=True, programs=("make", "gcc", "qemu-system-x86_64"))
    if _vng() is None:
        requireHost(programs=("vng",))
    busybox = shutil.which("busybox")
    if busybox is None or not _isStatic(busybox):
        _unavailable("needs a static busybox (Debian's busybox-static) for virtme-ng")
    release = _kernelRelease()
    if release is None:
        _unavailable("needs a kernel in /boot (vmlinuz-*) with its headers installed")
    return release


@dataclass
class Build:
    release: str
    returncode: int
    output: str
    module: Path


@dataclass
class Boot:
    returncode: int | None
    output: str
    seconds: float

    def marker(self, name: str) -> str | None:
        """
        The value after the last C{name} marker line, or L{None}.
        """
        found = None
        for line in self.output.splitlines():
            if line.startswith(name + " ") or line == name:
                found = line[len(name):].strip()
        return found

    def has(self, name: str) -> bool:
        return any(line.strip() == name for line in self.output.splitlines())

    def section(self, start: str, end: str) -> str | None:
        text = self.output
        if start not in text or end not in text:
            return None
        return text.split(start, 1)[1].split(end, 1)[0]

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


_build: Build | None = None
_boot: Boot | None = None


def build(release: str) -> Build:
    """
    Build the module, once for the whole test run, from a copy of its
    sources in a directory of its own: a clean build, and one that another
    test run building in the work tree at the same time cannot change under
    the guest.
    """
    global _build
    if _build is None:
        directory = Path(tempfile.mkdtemp(prefix="shifter-kmod-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        sources = directory / "kernel_module"
        shutil.copytree(
            MODULE_DIR, sources,
            ignore=shutil.ignore_patterns(
                "*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd", "*.order",
                "Module.symvers", "tests",
            ),
        )
        result = subprocess.run(
            ["make", "-C", str(sources), f"KDIR=/lib/modules/{release}/build"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=BUILD_TIMEOUT,
        )
        _build = Build(release, result.returncode, result.stdout, sources / "shifter.ko")
    return _build


def boot(release: str, module: Path) -> Boot:
    """
    Boot the kernel once for the whole test run and run the guest suite in
    it.
    """
    global _boot
    if _boot is None:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # The guest mounts this second export of / with caching over the
        # work tree and the Python installation (see guest-run.sh).
        cached = sorted({str(ROOT), sys.prefix, sys.base_prefix})
        command = [
            _vng() or "vng", "--run", f"/boot/vmlinuz-{release}",
            "--disable-kvm", "--memory", "2G",
            f"--qemu-opts=-virtfs local,path=/,mount_tag={HOSTFS_TAG},"
            "security_model=none,readonly=on,multidevs=remap",
            "--exec", f"SHIFTER_PYTHON={sys.executable} SHIFTER_MODULE={module}"
            f" SHIFTER_HOSTFS_TAG={HOSTFS_TAG}"
            f" SHIFTER_HOSTFS_DIRS='{' '.join(cached)}' sh {GUEST_SCRIPT}",
        ]
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=BOOT_TIMEOUT)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            returncode = None
            output += f"\n[test_kernel] the guest did not finish in {BOOT_TIMEOUT} s\n".encode()
        text = output.decode("utf-8", "replace")
        _boot = Boot(returncode, text, time.monotonic() - started)
        sys.stdout.write(
            f"\n===== guest output ({_boot.seconds:.0f} s, exit {returncode}) =====\n"
            f"{text}\n===== end of guest output =====\n"
        )
        sys.stdout.flush()
    return _boot


class BuildTests(SynchronousTestCase):
    """
    The module builds against the installed kernel headers.
    """

    def test_noWarnings(self) -> None:
        """
        A clean build of the module succeeds and prints no warning.
        """
        result = build(requireBootableKernel())
        self.assertEqual(result.returncode, 0, result.output)
        complaints = [
            line for line in result.output.splitlines()
            if re.search(r"warning|error", line, re.IGNORECASE)
        ]
        self.assertEqual(complaints, [], result.output)
        self.assertTrue(result.module.exists(), result.output)


class GuestTests(SynchronousTestCase):
    """
    The guest suite, run in the booted kernel with the module loaded.
    """

    def setUp(self) -> None:
        release = requireBootableKernel()
        built = build(release)
        if built.returncode != 0:
            self.fail(f"the module did not build, so no kernel was booted:\n{built.output}")
        self.release = release
        self.boot = boot(release, built.module)

    def test_booted(self) -> None:
        """
        The kernel booted, ran the guest script to its end with a zero
        status, in time, and it was the kernel the module was built for.
        """
        self.assertEqual(self.boot.marker("GUEST-KERNEL"), self.release, self.boot.tail())
        self.assertTrue(self.boot.has("INSMOD-OK"), self.boot.tail())
        self.assertEqual(self.boot.marker("GUEST-EXIT"), "0", self.boot.tail())
        self.assertEqual(self.boot.returncode, 0, self.boot.tail())

    def test_suitePassed(self) -> None:
        """
        Trial ran the guest suite with no failure, error or skip.
        """
        summaries = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", self.boot.output, re.M)
        self.assertTrue(summaries, f"no trial summary in the guest output:\n{self.boot.tail()}")
        verdict, counts = summaries[-1]
        tally = {
            name: int(value)
            for name, value in (item.split("=") for item in counts.split(", "))
        }
        ran = re.findall(r"^Ran (\d+) tests? in", self.boot.output, re.M)
        report = f"{verdict} ({counts}); ran {ran[-1] if ran else '?'}\n{self.boot.tail(200)}"
        self.assertEqual(verdict, "PASSED", report)
        self.assertEqual(set(tally), {"successes"}, report)
        self.assertGreater(tally["successes"], 0, report)
        self.assertEqual(ran[-1:], [str(tally["successes"])], report)
        self.assertEqual(self.boot.marker("TRIAL-EXIT"), "0", report)

    def test_unloadedWithLiveEntries(self) -> None:
        """
        The module unloaded while a namespace held entries.
        """
        live = self.boot.marker("LIVE-ENTRIES")
        self.assertIsNotNone(live, self.boot.tail())
        self.assertTrue(live.isdigit() and int(live) > 0, f"LIVE-ENTRIES {live}")
        self.assertTrue(self.boot.has("RMMOD-OK"), self.boot.tail())

    def test_dmesgClean(self) -> None:
        """
        The guest's kernel log, from the module's loading to its last
        unloading, holds no warning, bug, oops or call trace.
        """
        log = self.boot.section("--- dmesg ---", "--- end dmesg ---")
        self.assertIsNotNone(log, self.boot.tail())
        self.assertIn("shifter: watching", log)
        trouble = [line for line in log.splitlines() if DMESG_TROUBLE.search(line)]
        self.assertEqual(trouble, [], log)
        self.assertTrue(self.boot.has("DMESG-CLEAN"), self.boot.tail())
