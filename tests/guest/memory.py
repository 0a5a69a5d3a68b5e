"""
What a network namespace costs, bare and with the module enabled, for the
memory test (tests/guest/guest_module.py): moves itself into the memory
cgroup named on its command line, makes COUNT bare network namespaces
(holding them by file descriptor), then enables the module in each, and
prints one JSON line: before, after the namespaces and after enabling,
the cgroup's slab, per-CPU and vmalloc memory (memory.stat; its slab
counts kmalloc's large blocks too), and the whole machine's
(/proc/meminfo's Slab, Percpu and VmallocUsed), which also counts what
the kernel allocates without charging a cgroup.  The module's tables and
entries are charged to the memory cgroup of the process that enables a
namespace; a namespace's own allocations to the cgroup of the process
that makes it.  Both figures count what other programs in the guest do
meanwhile: the guest runs nothing else.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from tests.guest.guest_module import CLONE_NEWNET, _check, _libc, unshare
from tests.guest.support import ShifterClient

CGROUP_PARTS = ("slab", "percpu", "vmalloc")
MACHINE_PARTS = ("Slab", "Percpu", "VmallocUsed")


def usage(cgroup: str) -> dict[str, int]:
    """
    The cgroup's and the machine's kernel memory, in bytes, once RCU's
    deferred frees, and the periodic flushes of the kernel's per-CPU
    counters (every one or two seconds), have run.
    """
    time.sleep(3)
    stat = dict(
        (name, int(value)) for name, value in
        (line.split() for line in open(os.path.join(cgroup, "memory.stat")))
    )
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024) for line in open("/proc/meminfo")
    )
    return {
        "cgroup": sum(stat.get(name, 0) for name in CGROUP_PARTS),
        "machine": sum(meminfo[name] for name in MACHINE_PARTS),
    }


def main(cgroup: str, count: int) -> dict:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    gc.disable()
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    before = usage(cgroup)
    namespaces = []
    for _ in range(count):
        unshare(CLONE_NEWNET)
        namespaces.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    _check(_libc.setns(home, CLONE_NEWNET))
    bare = usage(cgroup)
    for fd in namespaces:
        _check(_libc.setns(fd, CLONE_NEWNET))
        kmod = ShifterClient()
        kmod.enable([443])
        kmod.close()
    _check(_libc.setns(home, CLONE_NEWNET))
    enabled = usage(cgroup)
    for fd in namespaces:
        os.close(fd)
    return {"count": count, "before": before, "bare": bare, "enabled": enabled}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
