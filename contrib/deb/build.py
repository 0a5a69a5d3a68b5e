#!/usr/bin/env python3
"""
Build Shifter's two Debian packages (make deb):

  shifter_VERSION_ARCH.deb   Shifter in a Python environment of its own
                             under /opt/shifter (Debian 12's Twisted is too
                             old for it), /usr/bin/shifter, the systemd
                             units, the conffile /etc/shifter/shifter.toml
  shifter-dkms_VERSION_all.deb
                             the kernel module's source under
                             /usr/src/shifter-VERSION, built by DKMS for
                             every installed kernel with headers

Why not dh-virtualenv: it wraps the same steps (a venv made with Debian's
python3, the project and its wheels installed into it, the scripts' first
lines pointed at the installed path) in a debhelper build tree of its own;
for one venv and a handful of files dpkg-deb on a staged tree says the same
in one file, and needs nothing Debian does not already have (dpkg-deb).

The environment is made with Debian's /usr/bin/python3 (so the package
runs on the Python a Debian 12 root has, whatever Python built it); its
packages come from PyPI (or a pip index configured as usual).

Standard library only: this runs before any venv exists.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "/opt/shifter"
MAINTAINER = "The Shifter authors <shifter@localhost>"
# The module's minimum kernel (Kbuild and dkms.conf say the same).
KERNEL_MIN = "6.1"
# What goes into /usr/src/shifter-VERSION: what Kbuild builds, no tests.
MODULE_FILES = ("Kbuild", "Makefile", "dkms.conf")
MODULE_DIRS = ("include", "Documentation")


def version() -> str:
    with open(os.path.join(ROOT, "shifter", "__init__.py")) as f:
        match = re.search(r'__version__ = "([^"]+)"', f.read())
    assert match, "no __version__ in shifter/__init__.py"
    return match.group(1)


def run(*argv: str, **kwargs: object) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def installedSize(stage: str) -> int:
    """
    The staged tree's size in KiB, as Installed-Size wants it.
    """
    total = 0
    for top, _, files in os.walk(stage):
        if os.path.relpath(top, stage).split(os.sep)[0] == "DEBIAN":
            continue
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return (total + 1023) // 1024


def relocate(venv: str) -> None:
    """
    Point every file of the environment that names where it was built (the
    scripts' first lines, the activate scripts, pyvenv.cfg) at C{PREFIX}.
    """
    binDir = os.path.join(venv, "bin")
    paths = [os.path.join(binDir, name) for name in os.listdir(binDir)]
    for path in [os.path.join(venv, "pyvenv.cfg"), *paths]:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if venv.encode() in data:
            with open(path, "wb") as f:
                f.write(data.replace(venv.encode(), PREFIX.encode()))


def pruneCaches(tree: str) -> None:
    for top, dirs, _ in os.walk(tree):
        for name in list(dirs):
            if name == "__pycache__":
                shutil.rmtree(os.path.join(top, name))
                dirs.remove(name)


POSTINST = f"""#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # Byte-compile, and refresh Twisted's plugin cache so that
    # twistd finds the shifter plugin without writing into /opt later.
    {PREFIX}/bin/python -m compileall -q {PREFIX}/lib >/dev/null || true
    {PREFIX}/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
"""

PRERM = f"""#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop shifter.service shifter.socket >/dev/null 2>&1 || true
fi
# What postinst generated.
find {PREFIX} -name __pycache__ -type d -prune -exec rm -rf {{}} + 2>/dev/null || true
rm -f {PREFIX}/lib/python3*/site-packages/twisted/plugins/dropin.cache
exit 0
"""

POSTRM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
"""

DKMS_POSTINST = """#!/bin/sh
set -e
NAME=shifter
VERSION={version}
if [ "$1" = configure ]; then
    dkms add -m $NAME -v $VERSION >/dev/null 2>&1 || true
    # Build for every installed kernel that has its headers; a kernel
    # without them is skipped with DKMS's own message.
    for dir in /lib/modules/*; do
        kernel=${{dir##*/}}
        if [ -e "$dir/build" ]; then
            dkms install -m $NAME -v $VERSION -k "$kernel" || \\
                echo "shifter-dkms: the module did not build for $kernel (Linux {kmin} or later needed)" >&2
        else
            echo "shifter-dkms: no headers for $kernel; install linux-headers-$kernel to build the module" >&2
        fi
    done
fi
exit 0
"""

DKMS_PRERM = """#!/bin/sh
set -e
dkms remove -m shifter -v {version} --all >/dev/null 2>&1 || true
exit 0
"""


def debianArch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True,
                          capture_output=True, text=True).stdout.strip()


def buildShifter(out: str, python: str, work: str) -> str:
    v = version()
    arch = debianArch()
    stage = os.path.join(work, "shifter")
    venv = stage + PREFIX
    run(python, "-m", "venv", venv)
    pip = os.path.join(venv, "bin", "pip")
    run(pip, "install", "-q", "--no-compile", "--upgrade", "pip")
    run(pip, "install", "-q", "--no-compile", ROOT)
    relocate(venv)
    pruneCaches(venv)
    if not os.path.exists(os.path.join(venv, "bin", "shifter")):
        raise SystemExit("the shifter console script was not installed (setup.py entry points)")
    os.makedirs(stage + "/usr/bin")
    os.symlink(f"{PREFIX}/bin/shifter", stage + "/usr/bin/shifter")
    units = _mkdir(stage + "/lib/systemd/system")
    for unit in ("shifter.service", "shifter.socket"):
        shutil.copy(os.path.join(ROOT, "contrib", unit), units)
    logrotate = os.path.join(ROOT, "contrib", "shifter.logrotate")
    if os.path.exists(logrotate):
        shutil.copy(logrotate, _mkdir(stage + "/etc/logrotate.d") + "/shifter")
    example = os.path.join(ROOT, "examples", "shifter.toml")
    shutil.copy(example, _mkdir(stage + "/etc/shifter") + "/shifter.toml")
    doc = _mkdir(stage + "/usr/share/doc/shifter")
    shutil.copy(os.path.join(ROOT, "README.md"), doc)
    shutil.copy(os.path.join(ROOT, "LICENSE"), doc + "/copyright")
    # The man pages, compressed as Debian's policy asks (no name or time
    # in the gzip header, so the package builds the same twice).
    man = os.path.join(ROOT, "docs", "man")
    for name in sorted(os.listdir(man)):
        section = name.rsplit(".", 1)[-1]
        with open(os.path.join(man, name), "rb") as source:
            page = source.read()
        target = os.path.join(_mkdir(stage + f"/usr/share/man/man{section}"), name + ".gz")
        with open(target, "wb") as f:
            f.write(gzip.compress(page, 9, mtime=0))
    pyver = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    major, minor = pyver.split(".")
    control = f"""Package: shifter
Version: {v}
Architecture: {arch}
Maintainer: {MAINTAINER}
Installed-Size: {installedSize(stage)}
Depends: python3 (>= {pyver}), python3 (<< {major}.{int(minor) + 1}), libc6, libgssapi-krb5-2
Recommends: iptables | nftables
Suggests: shifter-dkms, squid
Section: net
Priority: optional
Homepage: https://github.com/shifter/shifter
Description: transparent-proxy redirector for Linux gateways
 Shifter receives the TCP connections netfilter redirects from a LAN,
 learns each one's original destination and opens a CONNECT tunnel to it
 through an upstream HTTP proxy, then relays the bytes both ways.
 .
 It runs in a Python environment of its own under {PREFIX}; configure it
 in /etc/shifter/shifter.toml, then: systemctl enable --now shifter
"""
    write(stage + "/DEBIAN/control", control)
    write(stage + "/DEBIAN/conffiles", "/etc/shifter/shifter.toml\n"
          + ("/etc/logrotate.d/shifter\n" if os.path.exists(logrotate) else ""))
    write(stage + "/DEBIAN/postinst", POSTINST, 0o755)
    write(stage + "/DEBIAN/prerm", PRERM, 0o755)
    write(stage + "/DEBIAN/postrm", POSTRM, 0o755)
    target = os.path.join(out, f"shifter_{v}_{arch}.deb")
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, target)
    return target


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def buildDkms(out: str, work: str) -> str:
    v = version()
    stage = os.path.join(work, "shifter-dkms")
    source = _mkdir(stage + f"/usr/src/shifter-{v}")
    module = os.path.join(ROOT, "kernel_module")
    for name in sorted(os.listdir(module)):
        path = os.path.join(module, name)
        if name.endswith((".c", ".h")) or name in MODULE_FILES:
            shutil.copy(path, source)
        elif name in MODULE_DIRS:
            shutil.copytree(path, os.path.join(source, name))
    doc = _mkdir(stage + "/usr/share/doc/shifter-dkms")
    shutil.copy(os.path.join(ROOT, "LICENSE"), doc + "/copyright")
    control = f"""Package: shifter-dkms
Version: {v}
Architecture: all
Maintainer: {MAINTAINER}
Installed-Size: {installedSize(stage)}
Depends: dkms (>= 3)
Recommends: linux-headers-amd64 | linux-headers-generic
Section: kernel
Priority: optional
Description: Shifter's netfilter module (DKMS source)
 The kernel module that records the original destination of redirected
 TCP connections and answers Shifter over generic netlink
 (--resolver kmod).  Linux {KERNEL_MIN} or later; DKMS builds it for every
 installed kernel that has its headers.
"""
    write(stage + "/DEBIAN/control", control)
    write(stage + "/DEBIAN/postinst", DKMS_POSTINST.format(version=v, kmin=KERNEL_MIN), 0o755)
    write(stage + "/DEBIAN/prerm", DKMS_PRERM.format(version=v), 0o755)
    target = os.path.join(out, f"shifter-dkms_{v}_all.deb")
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, target)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "dist"), help="where the .deb files go")
    parser.add_argument("--python", default="/usr/bin/python3",
                        help="the Python the environment is made with (Debian's)")
    options = parser.parse_args(argv)
    os.makedirs(options.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shifter-deb-") as work:
        for built in (buildShifter(options.out, options.python, work), buildDkms(options.out, work)):
            print(built)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
