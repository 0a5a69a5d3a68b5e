"""
A scripted CONNECT proxy for the fault tests, run as a real program in the
gateway namespace (not part of Shifter):

    faultproxy.py PORT

It listens on 127.0.0.1:PORT and reads each CONNECT request; what it does
then depends on the port the request asks for (the port the client
connected to, which the gateway redirected to Shifter):

    443   a real tunnel to the destination: answers 200 and relays
    7001  never answers (holds the connection until the peer leaves)
    7002  slowloris: a status line and headers, one byte every 0.5 s, never
          ending
    7003  garbage bytes
    7004  an HTTP/0.9-style status line
    7005  a header block of 20 KiB, more than Shifter's 16 KiB limit
    7006  200, then closes at once
    7007  half a status line, then closes
    7008  200, then a large transfer without end (the test kills this
          program in the middle of it)
    7009  waits 2 s, then 200, then reads to EOF and answers the SHA-256 of
          what it read (early bytes a client sent before the tunnel opened
          must all arrive)
    7010  200 at once, then the same as 7009
    7011  200, then echoes
    7012  waits 0.5 s, then 200 and early=N, N the bytes that came behind
          the request before the answer (--early-data send), then closes

Bytes that come behind the request in the same reads are the tunnel's
first bytes, as a real proxy keeps them (Squid's pre-read client data).

One line per connection on standard output says what it did.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

LARGE_CHUNK = os.urandom(64 * 1024)


def readRequest(conn: socket.socket) -> tuple[str, int, bytes] | None:
    """
    The CONNECT request's host and port, and the bytes read behind it.
    """
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk or len(request) > 16384:
            return None
        request += chunk
    head, leftover = request.split(b"\r\n\r\n", 1)
    line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    method, authority, _ = line.split(" ", 2)
    host, port = authority.rsplit(":", 1)
    return host.strip("[]"), int(port), leftover


def waiting(conn: socket.socket) -> bytes:
    """
    What the peer has sent that can be read now, without waiting.
    """
    data = b""
    while True:
        try:
            chunk = conn.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def drain(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def sinkDigest(conn: socket.socket, first: bytes = b"") -> None:
    digest = hashlib.sha256(first)
    while chunk := conn.recv(65536):
        digest.update(chunk)
    conn.sendall(digest.hexdigest().encode())


OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def handle(conn: socket.socket) -> None:
    what = "?"
    try:
        target = readRequest(conn)
        if target is None:
            what = "no request"
            return
        host, port, leftover = target
        what = f"CONNECT {host}:{port}"
        if port == 443:
            upstream = socket.create_connection((host, port), timeout=10)
            upstream.settimeout(None)
            upstream.sendall(leftover)
            conn.sendall(OK)
            back = threading.Thread(target=relay, args=(upstream, conn), daemon=True)
            back.start()
            relay(conn, upstream)
            back.join()
            upstream.close()
        elif port == 7001:
            drain(conn)
        elif port == 7002:
            answer = b"HTTP/1.1 200 Connection established\r\n" + b"X-Slow: " + b"z" * 10000
            for byte in answer:
                conn.send(bytes([byte]))
                time.sleep(0.5)
        elif port == 7003:
            conn.sendall(b"\x00\xff\x13garbage" + os.urandom(200))
            drain(conn)
        elif port == 7004:
            conn.sendall(b"HTTP/0.9 200 OK\r\n\r\n<html>hello</html>\r\n")
            drain(conn)
        elif port == 7005:
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 20 + b"\r\n")
            drain(conn)
        elif port == 7006:
            conn.sendall(OK)
        elif port == 7007:
            conn.sendall(b"HTTP/1.1 20")
        elif port == 7008:
            conn.sendall(OK)
            while True:
                conn.sendall(LARGE_CHUNK)
        elif port == 7009:
            time.sleep(2)
            conn.sendall(OK)
            sinkDigest(conn, leftover)
        elif port == 7010:
            conn.sendall(OK)
            sinkDigest(conn, leftover)
        elif port == 7011:
            conn.sendall(OK + leftover)
            relay(conn, conn)
        elif port == 7012:
            time.sleep(0.5)
            early = leftover + waiting(conn)
            what += f" early={len(early)}"
            conn.sendall(OK + f"early={len(early)}".encode())
        else:
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    except OSError as e:
        what += f" ({e})"
    finally:
        conn.close()
        print(what, flush=True)


def main(port: int) -> None:
    listener = socket.socket(socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
