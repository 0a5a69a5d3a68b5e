"""
The demo with C{--resolver kmod}: Shifter's kernel module in a kernel
booted for the demo.

On the host, L{runInBootedKernel} builds the module against the installed
headers of Debian's kernel, boots that kernel under qemu (software
emulation) with virtme-ng, as tests/test_kernel.py does, and runs
C{demo/guest-demo.sh} there: it loads the module and runs the whole demo
(C{demo.py --resolver kmod}) in the booted kernel, whose narration is
passed through.  This machine's own kernel is left alone.

In the booted kernel, L{moduleAnswer} asks the module what the demo
narrates: its answer for the client's connection and its counters.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.python.failure import Failure

from tests.gateway import PROJECT, insideNamespace

GUEST_SCRIPT = Path(__file__).resolve().parent / "guest-demo.sh"
# Boot (some 25 s under software emulation), then the demo, whose programs
# start many times slower than on the host.
GUEST_TIMEOUT = 10 * 60
BEGIN, EXIT = "DEMO-BEGIN", "DEMO-EXIT"


class BootFailure(Exception):
    """
    The module could not be built or the kernel booted: what went wrong,
    and what to do.
    """

    def __init__(self, what: str, advice: str) -> None:
        super().__init__(what)
        self.what = what
        self.advice = advice


def _bootable() -> tuple[str, str]:
    """
    The kernel release to boot and virtme-ng's command.

    @raise BootFailure: if this machine lacks what booting needs.
    """
    from tests.test_kernel import _isStatic, _kernelRelease, _vng

    release = _kernelRelease()
    if release is None:
        raise BootFailure("no kernel in /boot has its headers installed, so the module cannot be built",
                          "`make setup` installs Debian's kernel image and headers "
                          "(linux-image-amd64, linux-headers-amd64)")
    vng = _vng()
    if vng is None:
        raise BootFailure("virtme-ng (vng), which boots the kernel, is not installed",
                          "`make setup` installs it in .venv")
    for program in ("qemu-system-x86_64", "make", "gcc"):
        if subprocess.run(["which", program], capture_output=True).returncode != 0:
            raise BootFailure(f"this machine lacks {program}", "`make setup` installs it")
    busybox = subprocess.run(["which", "busybox"], capture_output=True, text=True).stdout.strip()
    if not busybox or not _isStatic(busybox):
        raise BootFailure("virtme-ng needs a static busybox, which this machine lacks",
                          "`make setup` installs it (Debian's busybox-static)")
    return release, vng


def _bootCommand(vng: str, release: str, module: Path, arguments: argparse.Namespace) -> list[str]:
    from tests.test_kernel import HOSTFS_TAG

    cached = sorted({str(PROJECT), sys.prefix, sys.base_prefix})
    options = " ".join(["--ipv6"] * arguments.ipv6 + (["--name", arguments.name] if arguments.name else []))
    return [
        vng, "--run", f"/boot/vmlinuz-{release}", "--disable-kvm", "--memory", "2G",
        f"--qemu-opts=-virtfs local,path=/,mount_tag={HOSTFS_TAG},"
        "security_model=none,readonly=on,multidevs=remap",
        "--exec", f"SHIFTER_PYTHON={sys.executable} SHIFTER_MODULE={module}"
        f" SHIFTER_HOSTFS_TAG={HOSTFS_TAG} SHIFTER_HOSTFS_DIRS='{' '.join(cached)}'"
        f" SHIFTER_DEMO_OPTIONS='{options}' sh {GUEST_SCRIPT}",
    ]


def runInBootedKernel(arguments: argparse.Namespace) -> int:
    """
    Build the module, boot Debian's kernel under qemu and run the demo
    there, passing its narration through; return its exit status.

    @raise BootFailure: if the module does not build or the kernel does
        not boot or run the demo.
    """
    from tests.test_kernel import build

    started = time.monotonic()
    release, vng = _bootable()
    family = "IPv6" if arguments.ipv6 else "IPv4"
    print(f"Shifter demo (resolver kmod, {family}): Shifter's kernel module, in Debian's kernel "
          f"{release} booted under qemu for the demo, so this machine's own kernel is left alone. "
          "This takes a minute or two (more on a busy machine).", flush=True)
    print(f"Building the module against the headers of {release} ...", end=" ", flush=True)
    built = build(release)
    if built.returncode != 0 or not built.module.exists():
        print("failed.", flush=True)
        errors = [line for line in built.output.splitlines() if "error" in line.lower()]
        raise BootFailure(
            "the module did not build: " + (errors[0].strip() if errors else built.output.strip()[-300:]),
            f"check that linux-headers-{release} is installed (`make setup`) and that "
            "`make -C kernel_module` builds",
        )
    print(f"built ({time.monotonic() - started:.0f} s).", flush=True)
    print(f"Booting {release} under qemu (software emulation) and loading the module ...", flush=True)
    command = _bootCommand(vng, release, built.module, arguments)
    began, status, said = _runGuest(command, started)
    if not began:
        # Under software emulation a boot now and then ends before the
        # guest's first words, on a busy machine above all: one more.
        print(f"The booted kernel did not start the demo ({'; '.join(said)}); "
              "booting it once more ...", flush=True)
        began, status, said = _runGuest(command, started)
    if not began:
        raise BootFailure(
            "the booted kernel did not run the demo; its last words:\n    " + "\n    ".join(said),
            "if the module failed to load, its build may not match the booted kernel; "
            "`python -m twisted.trial tests.test_kernel` checks both",
        )
    if status is None:
        raise BootFailure("the booted kernel stopped before the demo ended",
                          "run it again; if it stops again, `python -m twisted.trial tests.test_kernel` "
                          "shows whether the module works in that kernel")
    print(f"The booted kernel has shut down ({time.monotonic() - started:.0f} s in all).", flush=True)
    return status


def _runGuest(command: list[str], started: float) -> tuple[bool, int | None, list[str]]:
    """
    Boot the kernel with C{command} and pass the demo's narration through.

    @return: whether the demo began, its exit status (C{None} if it never
        ended), and the last lines the guest said before the demo began,
        with the exit status of virtme-ng.
    @raise BootFailure: if it did not finish within C{GUEST_TIMEOUT}.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd=str(PROJECT), start_new_session=True, text=True, errors="replace",
    )
    before: list[str] = []
    status: int | None = None
    began = False

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(GUEST_TIMEOUT)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(EXIT + " "):
                status = int(line.split()[1])
            elif line == BEGIN:
                began = True
                print(f"Booted and loaded in {time.monotonic() - started:.0f} s; the demo, in the booted kernel:",
                      flush=True)
                print(flush=True)
            elif began:
                print(line, flush=True)
            else:
                before.append(line)
        process.wait()
    except TimeoutError:
        raise BootFailure(f"the booted kernel did not finish the demo in {GUEST_TIMEOUT} s",
                          "this machine may be too busy: qemu emulates the CPU in software; "
                          "try again when it is idle") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    said = [line for line in before if line.strip()][-6:] + [f"(virtme-ng exited with status {process.returncode})"]
    return began, status, said


def moduleAnswer(namespace: str, peer: tuple[str, int], local: tuple[str, int]) -> tuple[str, dict[str, int]]:
    """
    Ask the module, in network namespace C{namespace}, what the kmod
    resolver asks it for the connection accepted from C{peer} on C{local}
    (its original destination), then for its counters, through Shifter's
    own client of the module, in a reactor run for just this.

    @return: the destination as C{host:port}, and the counters.
    @raise Exception: what the module or the client failed with.
    """
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.defer import Deferred

    from shifter.resolvers.kmod import AcceptedConnection, ShifterClient

    def address(host: str, port: int) -> IPv4Address | IPv6Address:
        return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)

    async def ask() -> tuple[str, dict[str, int]]:
        with insideNamespace(namespace):
            connecting = ShifterClient.connect(reactor, timeout=30.0)
        client = await connecting
        try:
            destination = await client.get(
                AcceptedConnection.fromAddresses(address(*peer), address(*local)))
            stats = await client.stats()
        finally:
            client.close()
        host = f"[{destination.host}]" if ":" in destination.host else destination.host
        return f"{host}:{destination.port}", stats

    outcome: list[object] = []
    done = Deferred.fromCoroutine(ask())
    done.addBoth(outcome.append)
    if not outcome:
        done.addBoth(lambda _: reactor.stop())
        reactor.run(installSignalHandlers=False)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[return-value]
