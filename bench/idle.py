"""
Hold many idle tunnels open: open COUNT connections to HOST:PORT (at most
64 being set up at once), send one keep-alive GET on each and wait for the
answer, so every tunnel is known to be open end to end.  Then print
C{open N failed M} and keep them all, idle, until stdin closes or a line
arrives; then close them and exit.  Gives up setting up after SECONDS.

    python3 idle.py HOST PORT COUNT SECONDS

Standard library only: it runs in the client namespace with any python3.
"""

from __future__ import annotations

import errno
import selectors
import socket
import sys
import time

IN_FLIGHT = 64


def main(host: str, port: int, count: int, seconds: float) -> None:
    request = f"GET /index.html HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    deadline = time.monotonic() + seconds
    done: list[socket.socket] = []
    failed: dict[str, int] = {}
    started = 0
    pending = 0

    def fail(sock: socket.socket, reason: str) -> None:
        nonlocal pending
        selector.unregister(sock)
        sock.close()
        pending -= 1
        failed[reason] = failed.get(reason, 0) + 1

    while (started < count or pending) and time.monotonic() < deadline:
        while started < count and pending < IN_FLIGHT:
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                reason = errno.errorcode.get(code, str(code))
                failed[reason] = failed.get(reason, 0) + 1
                started += 1
                continue
            selector.register(sock, selectors.EVENT_WRITE, "connecting")
            started += 1
            pending += 1
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            if key.data == "connecting":
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(sock, errno.errorcode.get(code, str(code)))
                    continue
                sock.send(request)
                selector.modify(sock, selectors.EVENT_READ, b"")
                continue
            try:
                data = sock.recv(4096)
            except OSError as e:
                fail(sock, e.__class__.__name__)
                continue
            if not data:
                fail(sock, "closed")
                continue
            got = key.data + data
            if b"\r\n\r\n" in got:
                if not got.startswith(b"HTTP/1.1 200"):
                    fail(sock, "answer " + got.split(b"\r\n", 1)[0].decode(errors="replace"))
                    continue
                selector.unregister(sock)
                pending -= 1
                done.append(sock)
            else:
                selector.modify(sock, selectors.EVENT_READ, got)
    if pending:
        failed["timeout"] = failed.get("timeout", 0) + pending
    reasons = ",".join(f"{k}={v}" for k, v in sorted(failed.items()))
    print(f"open {len(done)} failed {sum(failed.values())} {reasons}".strip(), flush=True)
    sys.stdin.readline()
    for sock in done:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
