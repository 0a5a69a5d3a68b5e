"""
The Shifter kernel module in real kernels: Debian's 6.1 and 6.12.

For each kernel, the module is built against its installed headers (from a
copy of its sources in a temporary directory), then the kernel boots once
under qemu (virtme-ng, software emulation) with this machine's file system
shared read-only, and C{kernel_module/tests/guest-run.sh} loads the module
there, runs the guest test modules of C{tests.guest} with trial, unloads
the module while it holds entries and checks the kernel log.  The tests
below read that one boot's output; each says what it found when it fails,
and the whole guest output is printed once after the boot.

C{SHIFTER_KERNELS} (for example C{6.12}) limits the kernels to those
series; C{SHIFTER_GUEST_TESTS} names the guest tests to run, for trial
(by default all of C{tests.guest.guest_module} and
C{guest_kmod_resolver}).  The same suite in a debug kernel is
L{tests.kernel_debug}, which only C{make test-kernel-debug} runs.
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
BOOT_TIMEOUT = 20 * 60
DEBUG_BOOT_TIMEOUT = 150 * 60
HOSTFS_TAG = "shifterhostfs"
BUILD_TIMEOUT = 10 * 60

# What a kernel log must not hold after the guest suite.
DMESG_TROUBLE = re.compile(
    r"WARNING|BUG|Oops|Call Trace|general protection|RCU stall|kmemleak: .*leak|"
    r"refcount_t|list_(add|del) corruption|UBSAN|KASAN|possible circular|lockdep|"
    r"suspicious RCU"
)


def _unavailable(reason: str) -> None:
    """
    Skip with C{reason}, or fail under CI, which must run these tests.
    """
    if os.environ.get("CI"):
        raise AssertionError(f"{reason}, which CI must provide")
    raise SkipTest(reason)


# The Debian kernels the module is tested in, by series.
SERIES = ("6.1", "6.12")


def _kernelRelease(series: str | None = None) -> str | None:
    """
    The newest kernel of C{series} (or of any series, by default) in /boot
    that has headers to build the module against.
    """
    def version(release: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", release))

    releases = sorted(
        (
            path.name[len("vmlinuz-"):] for path in Path("/boot").glob("vmlinuz-*")
            if series is None or re.match(re.escape(series) + r"[.-]", path.name[len("vmlinuz-"):])
        ),
        key=version, reverse=True,
    )
    for release in releases:
        if (Path("/lib/modules") / release / "build" / "Makefile").exists():
            return release
    return None


def _wantedSeries() -> tuple[str, ...]:
    wanted = os.environ.get("SHIFTER_KERNELS")
    if not wanted:
        return SERIES
    return tuple(item for item in wanted.replace(",", " ").split())


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


def requireBootTools() -> None:
    """
    Skip (or fail under CI) unless this host can build the module and boot
    a kernel for it.
    """
    requireHost(root=True, programs=("make", "gcc", "qemu-system-x86_64"))
    if _vng() is None:
        requireHost(programs=("vng",))
    busybox = shutil.which("busybox")
    if busybox is None or not _isStatic(busybox):
        _unavailable("needs a static busybox (Debian's busybox-static) for virtme-ng")


def requireBootableKernel(series: str | None = None) -> str:
    """
    Skip (or fail under CI) unless this host can build the module and boot
    a Debian kernel of C{series} (by default, of any) for it; return that
    kernel's release (the newest one).
    """
    if series is not None and series not in _wantedSeries():
        raise SkipTest(f"SHIFTER_KERNELS={os.environ.get('SHIFTER_KERNELS')} leaves out {series}")
    requireBootTools()
    release = _kernelRelease(series)
    if release is None:
        _unavailable(
            f"needs a Debian {series or ''} kernel in /boot (vmlinuz-{series or ''}*) with its "
            f"headers installed (make setup installs them)"
        )
    return release


@dataclass(frozen=True)
class Kernel:
    """
    A kernel to boot: its release, its image (or, for a kernel built here,
    its tree), and the tree to build the module against.
    """

    release: str
    image: str
    kdir: str
    debug: bool = False


def debianKernel(release: str) -> Kernel:
    return Kernel(release, f"/boot/vmlinuz-{release}", f"/lib/modules/{release}/build")


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


_builds: dict[Kernel, Build] = {}
_boots: dict[Kernel, Boot] = {}


def build(kernel: Kernel | str) -> Build:
    """
    Build the module, once for the whole test run, from a copy of its
    sources in a directory of its own: a clean build, and one that another
    test run building in the work tree at the same time cannot change under
    the guest.  A release names a Debian kernel (as the kmod demo asks).
    """
    if isinstance(kernel, str):
        kernel = debianKernel(kernel)
    if kernel not in _builds:
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
            ["make", "-C", str(sources), f"KDIR={kernel.kdir}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=BUILD_TIMEOUT,
        )
        _builds[kernel] = Build(kernel.release, result.returncode, result.stdout, sources / "shifter.ko")
    return _builds[kernel]


def boot(kernel: Kernel, module: Path) -> Boot:
    """
    Boot the kernel once for the whole test run and run the guest suite in
    it.
    """
    if kernel not in _boots:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # The guest mounts this second export of / with caching over the
        # work tree and the Python installation (see guest-run.sh).
        cached = sorted({str(ROOT), sys.prefix, sys.base_prefix})
        churn = os.environ.get("SHIFTER_CHURN_SECONDS", "120" if kernel.debug else "20")
        timeout = DEBUG_BOOT_TIMEOUT if kernel.debug else BOOT_TIMEOUT
        command = [
            _vng() or "vng", "--run", kernel.image,
            "--disable-kvm", "--memory", "3G" if kernel.debug else "2G",
            f"--qemu-opts=-virtfs local,path=/,mount_tag={HOSTFS_TAG},"
            "security_model=none,readonly=on,multidevs=remap",
            "--exec", f"SHIFTER_PYTHON={sys.executable} SHIFTER_MODULE={module}"
            f" SHIFTER_CHURN_SECONDS={churn} SHIFTER_GUEST_SLOW={8 if kernel.debug else 1}"
            f" SHIFTER_GUEST_TESTS='{os.environ.get('SHIFTER_GUEST_TESTS', '')}'"
            f" SHIFTER_HOSTFS_TAG={HOSTFS_TAG}"
            f" SHIFTER_HOSTFS_DIRS='{' '.join(cached)}' sh {GUEST_SCRIPT}",
        ]
        started = time.monotonic()
        returncode, text = _bootOnce(command, env, timeout)
        if "GUEST-KERNEL " not in text:
            # Under software emulation a boot now and then ends before the
            # guest's first words: one more, with the first kept in the log.
            first = (f"[test_kernel] the first boot ended (exit {returncode}) before the guest script began; "
                     f"it said:\n{text}")
            returncode, text = _bootOnce(command, env, timeout)
            text = f"{first}\n[test_kernel] booted once more:\n{text}"
        _boots[kernel] = result = Boot(returncode, text, time.monotonic() - started)
        # Also kept whole in trial's directory, for reading after the run.
        Path(f"guest-{kernel.release}.log").write_text(text)
        sys.stdout.write(
            f"\n===== guest output, {kernel.release} ({result.seconds:.0f} s, exit {returncode}) =====\n"
            f"{text}\n===== end of guest output, {kernel.release} =====\n"
        )
        sys.stdout.flush()
    return _boots[kernel]


def _bootOnce(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """
    Run virtme-ng's C{command}: its exit status (C{None} if it did not
    finish within C{timeout} seconds) and what the guest printed.
    """
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
        output += f"\n[test_kernel] the guest did not finish in {timeout} s\n".encode()
    return returncode, output.decode("utf-8", "replace")


class KernelTestsMixin:
    """
    The module built for one kernel and the guest suite in that kernel
    booted.
    """

    series: str

    def kernel(self) -> Kernel:
        return debianKernel(requireBootableKernel(self.series))

    def test_noWarnings(self) -> None:
        """
        A clean build of the module succeeds and prints no warning.
        """
        result = build(self.kernel())
        self.assertEqual(result.returncode, 0, result.output)
        complaints = [
            line for line in result.output.splitlines()
            if re.search(r"warning|error", line, re.IGNORECASE)
        ]
        self.assertEqual(complaints, [], result.output)
        self.assertTrue(result.module.exists(), result.output)

    def test_noAutoload(self) -> None:
        """
        The module declares no alias for its generic netlink family, so a
        look-up of the family, by anyone, never loads it.
        """
        result = build(self.kernel())
        self.assertEqual(result.returncode, 0, result.output)
        aliases = subprocess.run(
            ["modinfo", "-F", "alias", str(result.module)], capture_output=True, text=True, check=True,
        ).stdout.split()
        self.assertEqual([alias for alias in aliases if "family" in alias], [])

    def test_version(self) -> None:
        """
        The built module's version is the Python package's.
        """
        import shifter

        result = build(self.kernel())
        self.assertEqual(result.returncode, 0, result.output)
        version = subprocess.run(
            ["modinfo", "-F", "version", str(result.module)], capture_output=True, text=True, check=True,
        ).stdout.strip()
        self.assertEqual(version, shifter.__version__)

    def booted(self) -> tuple[Kernel, Boot]:
        kernel = self.kernel()
        built = build(kernel)
        if built.returncode != 0:
            self.fail(f"the module did not build, so no kernel was booted:\n{built.output}")
        return kernel, boot(kernel, built.module)

    def test_booted(self) -> None:
        """
        The kernel booted, ran the guest script to its end with a zero
        status, in time, and it was the kernel the module was built for.
        """
        kernel, booted = self.booted()
        self.assertEqual(booted.marker("GUEST-KERNEL"), kernel.release, booted.tail())
        self.assertTrue(booted.has("INSMOD-OK"), booted.tail())
        self.assertEqual(booted.marker("GUEST-EXIT"), "0", booted.tail())
        self.assertEqual(booted.returncode, 0, booted.tail())

    def test_suitePassed(self) -> None:
        """
        Trial ran the guest suite with no failure, error or skip.
        """
        _, booted = self.booted()
        summaries = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", booted.output, re.M)
        self.assertTrue(summaries, f"no trial summary in the guest output:\n{booted.tail()}")
        verdict, counts = summaries[-1]
        tally = {
            name: int(value)
            for name, value in (item.split("=") for item in counts.split(", "))
        }
        ran = re.findall(r"^Ran (\d+) tests? in", booted.output, re.M)
        report = f"{verdict} ({counts}); ran {ran[-1] if ran else '?'}\n{booted.tail(200)}"
        self.assertEqual(verdict, "PASSED", report)
        self.assertEqual(set(tally), {"successes"}, report)
        self.assertGreater(tally["successes"], 0, report)
        self.assertEqual(ran[-1:], [str(tally["successes"])], report)
        self.assertEqual(booted.marker("TRIAL-EXIT"), "0", report)

    def test_unloadedWithLiveEntries(self) -> None:
        """
        The module unloaded while a namespace recorded and held entries.
        """
        _, booted = self.booted()
        live = booted.marker("LIVE-ENTRIES")
        self.assertIsNotNone(live, booted.tail())
        self.assertTrue(live.isdigit() and int(live) > 0, f"LIVE-ENTRIES {live}")
        self.assertTrue(booted.has("RMMOD-OK"), booted.tail())

    def test_dmesgClean(self) -> None:
        """
        The guest's kernel log, from the module's loading to its last
        unloading, holds no warning, bug, oops, call trace, lockdep or
        RCU complaint.
        """
        _, booted = self.booted()
        log = booted.section("--- dmesg ---", "--- end dmesg ---")
        self.assertIsNotNone(log, booted.tail())
        self.assertIn("shifter: ready", log)
        trouble = [line for line in log.splitlines() if DMESG_TROUBLE.search(line)]
        self.assertEqual(trouble, [], log)
        self.assertTrue(booted.has("DMESG-CLEAN"), booted.tail())


class Debian61Tests(KernelTestsMixin, SynchronousTestCase):
    """
    Debian 12's own kernel, 6.1.
    """

    series = "6.1"


class Debian612Tests(KernelTestsMixin, SynchronousTestCase):
    """
    Debian 12's 6.12 kernel (linux-image-6.12-amd64).
    """

    series = "6.12"
