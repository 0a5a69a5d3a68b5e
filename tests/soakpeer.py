"""
The two ends of the load and soak tests, run as real programs in the test
namespaces (not part of Shifter).  Both are single-threaded, non-blocking
and bounded in count and time.

The exchange on each connection: the client sends a 4-byte length N, then
N bytes; the server echoes every byte as it reads it, and after the N-th
appends the SHA-256 of what it read, then closes.  The client checks the
echo's digest and the server's digest against the digest of what it sent,
so every byte is checked at both ends.

    soakpeer.py server PORT
        serve that exchange on [::]:PORT (IPv4 and IPv6), forever.

    soakpeer.py concurrent HOST PORT COUNT SIZE TIMEOUT
        open COUNT connections, each sending SIZE bytes; once every one has
        had its first echo, print "open COUNT" and wait for a line on
        standard input before letting the rest of the bytes flow; then
        print the result as JSON.

    soakpeer.py serial HOST PORT COUNT SIZE PARALLEL SECONDS
        COUNT connections one after another, PARALLEL at a time, each
        sending SIZE bytes; no new one is started after SECONDS.  Prints
        the result as JSON.

The JSON result: {"ok": connections checked, "failed": connections lost or
wrong, "errors": the first few reasons, "bytes": bytes sent and echoed
(each way), "seconds": the time taken}.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time

POOL = os.urandom(4 * 1024 * 1024)
CHUNK = 64 * 1024


def raiseDescriptorLimit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class ServerConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.header = b""
        self.remaining = -1
        self.digest = hashlib.sha256()
        self.out = bytearray()
        self.finished = False


def server(port: int) -> None:
    raiseDescriptorLimit(65536)
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)

    def close(conn: ServerConnection) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()

    def update(conn: ServerConnection) -> None:
        events = 0
        if len(conn.out) < 1024 * 1024 and not conn.finished:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events == 0:
            close(conn)
        else:
            selector.modify(conn.sock, events, conn)

    while True:
        for key, mask in selector.select():
            if key.data is None:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ, ServerConnection(sock))
                continue
            conn = key.data
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(CHUNK)
                except ConnectionError:
                    close(conn)
                    continue
                if not data:
                    close(conn)
                    continue
                if conn.remaining < 0:
                    conn.header += data
                    if len(conn.header) < 4:
                        continue
                    (conn.remaining,) = struct.unpack("!I", conn.header[:4])
                    data = conn.header[4:]
                data = data[: conn.remaining]
                conn.remaining -= len(data)
                conn.digest.update(data)
                conn.out += data
                if conn.remaining == 0:
                    conn.out += conn.digest.digest()
                    conn.finished = True
            if mask & selectors.EVENT_WRITE and conn.out:
                try:
                    sent = conn.sock.send(conn.out)
                except BlockingIOError:
                    sent = 0
                except ConnectionError:
                    close(conn)
                    continue
                del conn.out[:sent]
            update(conn)


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class ClientConnection:
    def __init__(self, number: int, size: int) -> None:
        offset = (number * 7919) % (len(POOL) - size) if size < len(POOL) else 0
        self.payload = struct.pack("!I", size) + POOL[offset : offset + size]
        self.expected = hashlib.sha256(self.payload[4:]).digest()
        self.size = size
        self.sent = 0
        self.received = 0
        self.echo = hashlib.sha256()
        self.tail = b""  # the last 32 bytes: the server's digest
        self.connected = False
        self.held = False  # sending paused until every connection is open
        self.sock: socket.socket | None = None


class Client:
    def __init__(self, host: str, port: int, size: int) -> None:
        self.address = (host, port)
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.size = size
        self.selector = selectors.DefaultSelector()
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.bytes = 0
        self.open = 0
        self.firstEchoes = 0
        self.holdAfterFirst = False

    def start(self, number: int) -> None:
        conn = ClientConnection(number, self.size)
        sock = conn.sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            self.fail(conn, f"connect: {os.strerror(code)}")
            return
        self.open += 1
        self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def fail(self, conn: ClientConnection, reason: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(reason)
        self.finish(conn)

    def finish(self, conn: ClientConnection) -> None:
        if conn.sock is not None:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None
            self.open -= 1

    def events(self, conn: ClientConnection) -> int:
        events = selectors.EVENT_READ
        if conn.sent < len(conn.payload) and not conn.held:
            events |= selectors.EVENT_WRITE
        return events

    def step(self, conn: ClientConnection, mask: int) -> None:
        sock = conn.sock
        if not conn.connected:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(conn, f"connect: {os.strerror(code)}")
                return
            conn.connected = True
        if mask & selectors.EVENT_WRITE and conn.sent < len(conn.payload) and not conn.held:
            # Before the first echo, only the header and one chunk.
            limit = len(conn.payload) if conn.received else min(len(conn.payload), 4 + 1024)
            try:
                conn.sent += sock.send(conn.payload[conn.sent : limit])
            except BlockingIOError:
                pass
            except OSError as e:
                self.fail(conn, f"send: {e}")
                return
            if conn.sent >= limit and not conn.received:
                conn.held = True  # until the first echo
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                data = None
            except OSError as e:
                self.fail(conn, f"recv: {e}")
                return
            if data == b"":
                self.complete(conn)
                return
            if data:
                first = conn.received == 0
                conn.received += len(data)
                echoed = data[: max(0, conn.size - (conn.received - len(data)))]
                conn.echo.update(echoed)
                conn.tail = (conn.tail + data)[-32:]
                if first:
                    self.firstEchoes += 1
                    conn.held = self.holdAfterFirst
        try:
            self.selector.modify(sock, self.events(conn), conn)
        except (KeyError, ValueError):
            pass

    def complete(self, conn: ClientConnection) -> None:
        if conn.received != conn.size + 32:
            self.fail(conn, f"received {conn.received} bytes, not {conn.size + 32}")
        elif conn.echo.digest() != conn.expected:
            self.fail(conn, "the echo differs from what was sent")
        elif conn.tail != conn.expected:
            self.fail(conn, "the server's digest differs from what was sent")
        else:
            self.ok += 1
            self.bytes += conn.size
            self.finish(conn)

    def poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            self.step(key.data, mask)

    def release(self) -> None:
        self.holdAfterFirst = False
        for key in list(self.selector.get_map().values()):
            conn = key.data
            if conn.received:
                conn.held = False
                self.selector.modify(conn.sock, self.events(conn), conn)

    def abandon(self, why: str) -> None:
        for key in list(self.selector.get_map().values()):
            self.fail(key.data, why)


def concurrent(host: str, port: int, count: int, size: int, timeout: float) -> dict:
    raiseDescriptorLimit(count + 256)
    client = Client(host, port, size)
    client.holdAfterFirst = True
    started = time.monotonic()
    deadline = started + timeout
    number = 0
    # Open the connections a few hundred at a time, so that the listening
    # queues are not flooded with SYNs all at once.
    while client.firstEchoes + client.failed < count:
        if time.monotonic() > deadline:
            client.abandon("no first echo before the deadline")
            break
        while number < count and number - client.firstEchoes - client.failed < 200:
            client.start(number)
            number += 1
        client.poll(0.1)
    print(f"open {client.open}", flush=True)
    sys.stdin.readline()
    client.release()
    while client.open and time.monotonic() < deadline:
        client.poll(0.5)
    if client.open:
        client.abandon("not finished before the deadline")
    return result(client, started)


def serial(host: str, port: int, count: int, size: int, parallel: int, seconds: float) -> dict:
    raiseDescriptorLimit(parallel + 256)
    client = Client(host, port, size)
    started = time.monotonic()
    stopStarting = started + seconds
    deadline = stopStarting + 60
    number = 0
    while True:
        now = time.monotonic()
        while number < count and client.open < parallel and now < stopStarting:
            client.start(number)
            number += 1
        if not client.open and (number >= count or now >= stopStarting):
            break
        if now > deadline:
            client.abandon("not finished before the deadline")
            break
        client.poll(0.5)
    return result(client, started)


def result(client: Client, started: float) -> dict:
    return {
        "ok": client.ok,
        "failed": client.failed,
        "errors": client.errors,
        "bytes": client.bytes,
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "server":
        server(int(argv[1]))
    elif mode == "concurrent":
        host, port, count, size, timeout = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])
        print(json.dumps(concurrent(host, port, count, size, timeout)), flush=True)
    elif mode == "serial":
        host, port, count, size, parallel, seconds = (
            argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), float(argv[6]),
        )
        print(json.dumps(serial(host, port, count, size, parallel, seconds)), flush=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
