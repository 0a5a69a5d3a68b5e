"""
SYN churn across namespaces, for the booted test kernel (run by
C{guest_module.ChurnTests}, and for longer by the debug kernel's run):

    python tests/guest/churn.py --seconds 20 --parallel 3

Keeps C{--parallel} network namespaces alive at a time, and makes twice as
many at least.  Each one redirects
its local connections to C{REMOTE_NET} port 443 to a listener, enables the
module, holds a few real connections, and has a forked child flooding it
with hand-made SYNs from random ports (each one recorded, answered with a
reset).  Round by round, the process looks up each new live connection
(once, as Shifter does: an entry already answered is the first the module
evicts when the flood fills the namespace's room) and checks each answer,
then destroys the oldest namespace while its flood is still running (the
namespace's mount goes first, then the child is killed, so the namespace
is torn down with SYNs in flight) and makes a new one.  Bounded by
C{--seconds}; prints one JSON line of counts at the end, and exits 1 if
any look-up was answered wrongly or failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import sys
import time

from tests.guest.support import (
    LISTEN_PORT,
    LOCAL_V4,
    REMOTE_NET,
    Namespace,
    NetlinkError,
    _setns,
    connect,
    enableIn,
    ipv4Packet,
    listen,
    tcpHeader,
    vethPair,
)

_rounds = itertools.count()


def flood(ns: Namespace) -> int:
    """
    Fork a child that sends SYNs from random ports inside C{ns} until it
    is killed (or ten minutes pass); return its pid.
    """
    pid = os.fork()
    if pid:
        return pid
    try:
        with open(f"/run/netns/{ns.name}") as f:
            _setns(f.fileno())
        rng = random.Random(os.getpid())
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            dst = f"203.0.113.{rng.randrange(1, 255)}"
            segment = tcpHeader(socket.AF_INET, LOCAL_V4, dst, rng.randrange(1024, 65535), 443, 0x02)
            try:
                raw.sendto(ipv4Packet(LOCAL_V4, dst, segment), (dst, 0))
            except OSError:
                pass
    finally:
        os._exit(0)


class Slot:
    """
    One namespace of the churn, its flood and its live connections.
    """

    def __init__(self) -> None:
        self.ns = Namespace()
        self.ns.ip("link", "set", "lo", "up")
        vethPair(self.ns, "sh0", self.ns, "sh1")
        self.ns.addAddress("sh0", LOCAL_V4, 24)
        self.ns.ip("route", "add", REMOTE_NET[socket.AF_INET], "dev", "sh0")
        self.ns.iptables(socket.AF_INET, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                         REMOTE_NET[socket.AF_INET], "--dport", "443",
                         "-j", "REDIRECT", "--to-ports", str(LISTEN_PORT))
        enableIn(self.ns)
        self.kmod = self.ns.module()
        self.server = listen(self.ns, socket.AF_INET)
        self.sockets: list[socket.socket] = [self.server]
        self.live: list[tuple[socket.socket, str]] = []
        for n in range(3):
            remote = f"203.0.113.{next(_rounds) % 250 + 1}"
            self.sockets.append(connect(self.ns, socket.AF_INET, remote, 443))
            accepted, _ = self.server.accept()
            self.sockets.append(accepted)
            self.live.append((accepted, remote))
        self.child = flood(self.ns)

    def lookUp(self, report: dict) -> None:
        live, self.live = self.live, []
        for accepted, remote in live:
            try:
                answer = self.kmod.getAccepted(accepted)
            except NetlinkError as e:
                report["failed"] += 1
                report.setdefault("errors", []).append(f"{remote}: {e} {e.message}")
                continue
            if answer == (remote, 443):
                report["hits"] += 1
            else:
                report["wrong"] += 1

    def destroy(self, report: dict) -> None:
        report["syns"] += self.kmod.stats()["inserts"]
        self.ns.delete()
        self.kmod.close()
        for sock in self.sockets:
            sock.close()
        # The flood holds the namespace's last reference: killed, it lets
        # the namespace go with its last SYNs still in flight.
        os.kill(self.child, signal.SIGKILL)
        os.waitpid(self.child, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--parallel", type=int, default=3)
    options = parser.parse_args()
    report = {"namespaces": 0, "syns": 0, "hits": 0, "wrong": 0, "failed": 0}
    slots: list[Slot] = []
    started = time.monotonic()
    deadline = started + options.seconds
    # At least twice as many namespaces as run at once, so that some are
    # destroyed while others are loaded; never more than ten minutes over.
    least, limit = 2 * options.parallel, deadline + 600
    try:
        while time.monotonic() < limit and (
            time.monotonic() < deadline or report["namespaces"] < least
        ):
            if len(slots) == options.parallel:
                slots.pop(0).destroy(report)
            slots.append(Slot())
            report["namespaces"] += 1
            for slot in slots:
                slot.lookUp(report)
    finally:
        for slot in slots:
            slot.destroy(report)
    print(json.dumps(report))
    sys.exit(1 if report["wrong"] or report["failed"] else 0)


if __name__ == "__main__":
    main()
