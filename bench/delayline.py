"""
A delay line for the benchmark: every packet netfilter queues to NFQUEUE
C{queue} is accepted C{ms} milliseconds after it arrived, in order.  The
kernels this runs on may have no C{netem}; this puts a proxy "somewhere
else" with a rule such as

    iptables -t mangle -A OUTPUT -o bp1 -j NFQUEUE --queue-num 9 --queue-bypass

    python3 bench/delayline.py QUEUE MS

Runs until killed; closing its socket unbinds the queue (the kernel then
lets queued packets through, with --queue-bypass).  One process, one loop.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shifter.kernel.netlink import NETLINK_NETFILTER, encodeMessage, parseAttributes, splitMessages  # noqa: E402
from shifter.resolvers.nfqueue import (  # noqa: E402
    NFQA_CFG_F_FAIL_OPEN,
    NFQNL_CFG_CMD_BIND,
    QUEUE_CONFIG,
    encodeConfig,
    encodeVerdict,
)

NLM_F_REQUEST, NLM_F_ACK = 1, 4
QUEUE_PACKET = (3 << 8) | 0  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET
NFQA_PACKET_HDR = 1
NFGEN_HEADER = 16 + 4  # netlink header, then nfgenmsg


def main(queue: int, delay: float) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    sock.send(encodeMessage(encodeConfig(queue, command=NFQNL_CFG_CMD_BIND), QUEUE_CONFIG,
                            NLM_F_REQUEST | NLM_F_ACK, 1))
    sock.recv(65536)
    config = encodeConfig(queue, copyRange=64, maxLength=65536, flags=(NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN))
    sock.send(encodeMessage(config, QUEUE_CONFIG, NLM_F_REQUEST | NLM_F_ACK, 2))
    sock.setblocking(False)
    print(f"delay line: queue {queue}, {delay * 1000:g} ms", flush=True)
    waiting: deque[tuple[float, int]] = deque()
    while True:
        timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            for _ in range(256):  # bounded per turn
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                for header, message in splitMessages(data):
                    if header.type != QUEUE_PACKET:
                        continue
                    packetHeader = parseAttributes(message, NFGEN_HEADER).get(NFQA_PACKET_HDR)
                    if packetHeader is not None:
                        waiting.append((now + delay, struct.unpack_from("!I", packetHeader)[0]))
        now = time.monotonic()
        last = None
        while waiting and waiting[0][0] <= now:
            last = waiting.popleft()[1]
        if last is not None:
            # Every packet up to this one is due: one batch verdict.
            sock.send(encodeVerdict(queue, last, batch=True))


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]) / 1000)
