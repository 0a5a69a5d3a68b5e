"""
The YNL schemas and spec reader of the kernel's own source, as Debian
ships it in C{linux-source-6.12} (C{/usr/src/linux-source-6.12.tar.xz}):
the family's spec is checked with the kernel's tools, not a copy of them.

The few files needed are unpacked once into a cache beside the tarball's
size, so a test run pays the decompression (about 10 s) at most once.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from types import ModuleType

from twisted.trial.unittest import SkipTest

TARBALL = "/usr/src/linux-source-6.12.tar.xz"
TOP = "linux-source-6.12"
MEMBERS = (f"{TOP}/Documentation/netlink", f"{TOP}/tools/net/ynl/lib/nlspec.py")


def sourceTree() -> str:
    """
    @return: a directory holding the unpacked members of the kernel source.
    @raise SkipTest: when Debian's C{linux-source-6.12} is not installed.
    """
    try:
        size = os.stat(TARBALL).st_size
    except FileNotFoundError:
        raise SkipTest(f"needs Debian's linux-source-6.12 ({TARBALL}); make setup installs it")
    cache = os.path.join(tempfile.gettempdir(), f"shifter-kernel-source-{size}")
    if not os.path.exists(os.path.join(cache, "done")):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(["tar", "-xJf", TARBALL, "-C", cache, *MEMBERS], check=True, timeout=600)
        open(os.path.join(cache, "done"), "w").close()
    return os.path.join(cache, TOP)


def schemaPath(protocol: str) -> str:
    """
    The kernel's JSON schema (as YAML) for specs of C{protocol}.
    """
    return os.path.join(sourceTree(), "Documentation", "netlink", f"{protocol}.yaml")


def nlspec() -> ModuleType:
    """
    The kernel's YNL spec reader, C{tools/net/ynl/lib/nlspec.py}, which
    validates a spec against its schema (with C{jsonschema}) as it loads it.
    """
    path = os.path.join(sourceTree(), "tools", "net", "ynl", "lib", "nlspec.py")
    spec = importlib.util.spec_from_file_location("kernel_nlspec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
