"""
A tenant for the tenancy test (tests/guest/guest_module.py): becomes
uid 65534, makes a user namespace and a network namespace of its own
(unshare -Urn), enables the module there, opens as many redirected
loopback connections as asked and keeps them open, prints one JSON line
({"uid", "stats"} or {"error"}), and ends when its input closes.
"""

from __future__ import annotations

import ctypes
import encodings.idna  # noqa: F401 (imported as root: uid 65534 may not read the Python installation)
import json
import os
import socket
import subprocess
import sys

from tests.guest.guest_module import CLONE_NEWNET, CLONE_NEWUSER, unshare
from tests.guest.support import ShifterClient

NOBODY = 65534
PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)
LISTEN_PORT = 12345
# The connections, kept open until the test ends.
kept: list[socket.socket] = []
RULESET = f"""
table ip tenant {{
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.0/8 tcp dport 443 redirect to :{LISTEN_PORT}
  }}
}}
"""


def main(count: int) -> dict:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    # Changing uid made the process undumpable, its /proc/self files
    # root's: make it dumpable again to write its own maps.
    if _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    unshare(CLONE_NEWUSER | CLONE_NEWNET)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {NOBODY} 1"), ("gid_map", f"0 {NOBODY} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
    kmod = ShifterClient()
    kmod.enable([443])
    server = socket.create_server(("127.0.0.1", LISTEN_PORT), backlog=count)
    for n in range(count):
        kept.append(socket.create_connection((f"127.0.{n // 250}.{n % 250 + 2}", 443), timeout=10))
        kept.append(server.accept()[0])
    return {"uid": int(open("/proc/self/uid_map").read().split()[1]), "stats": kmod.stats()}


if __name__ == "__main__":
    try:
        report = main(int(sys.argv[1]))
    except Exception as e:
        report = {"error": repr(e)}
    print(json.dumps(report), flush=True)
    sys.stdin.read()
