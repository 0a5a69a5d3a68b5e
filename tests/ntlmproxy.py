"""
A CONNECT proxy that asks for NTLM and checks the answers cryptographically,
for the NTLM tests, run as a real program in the gateway namespace (not
part of Shifter):

    NTLM_USER_FILE=users ntlmproxy.py PORT MODE

It listens on 127.0.0.1:PORT.  A CONNECT without credentials gets a 407
offering NTLM and Basic; one with NTLM's negotiate message gets a 407
holding a challenge from pyspnego's NTLM acceptor, whose HTML body is
sent in two writes a moment apart (so that it has to be read by its
Content-Length); the authenticate message, on the same connection, is
verified against the user file's passwords (NTLMv2): a right one gets a
200 and a real tunnel to the destination, a wrong one a 407.

MODE changes what follows the challenge:

    verify          as above
    close           the body is cut short and the connection closed
    connection-close  the 407 says Connection: close (and the proxy closes)

One line per request on standard output says what it did, with the user
the authenticate message proved.
"""

from __future__ import annotations

import base64
import socket
import sys
import threading
import time

import spnego
from spnego.exceptions import SpnegoError

BODY = b"<html><body>" + b"Proxy authentication required. " * 100 + b"</body></html>"


def readRequest(conn: socket.socket, buffer: bytes) -> tuple[bytes, bytes] | None:
    """
    One request's header block, and what followed it.
    """
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(4096)
        if not chunk or len(buffer) > 16384:
            return None
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head, rest


def authorization(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"proxy-authorization":
            return value.strip()
    return None


def relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def tunnel(conn: socket.socket, head: bytes) -> None:
    authority = head.split(b" ", 2)[1].decode("ascii")
    host, port = authority.rsplit(":", 1)
    upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    upstream.settimeout(None)
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    back = threading.Thread(target=relay, args=(upstream, conn), daemon=True)
    back.start()
    relay(conn, upstream)
    back.join()
    upstream.close()


def handle(conn: socket.socket, mode: str) -> None:
    what: list[str] = []
    context = None
    buffer = b""
    try:
        for _ in range(4):  # requests on this connection, at most
            read = readRequest(conn, buffer)
            if read is None:
                what.append("closed")
                return
            head, buffer = read
            value = authorization(head)
            if value is None:
                what.append("no credentials: 407")
                conn.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                continue
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"ntlm":
                what.append(f"{scheme.decode()} refused")
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            if context is None:
                context = spnego.server(protocol="ntlm")
                challenge = base64.b64encode(context.step(base64.b64decode(token)))
                what.append("negotiate: challenge")
                header = (
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM " + challenge
                    + b"\r\nContent-Type: text/html\r\nContent-Length: %d\r\n" % len(BODY)
                )
                if mode == "connection-close":
                    conn.sendall(header + b"Connection: close\r\n\r\n" + BODY)
                    what.append("Connection: close")
                    return
                conn.sendall(header + b"\r\n" + BODY[:200])
                time.sleep(0.2)
                if mode == "close":
                    what.append("closed after the challenge")
                    return
                conn.sendall(BODY[200:])
                continue
            try:
                context.step(base64.b64decode(token))
            except SpnegoError:
                what.append("authenticate: wrong response: 407")
                conn.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
                return
            what.append(f"authenticate: user {context.client_principal}")
            tunnel(conn, head)
            return
    except OSError as e:
        what.append(f"({e})")
    finally:
        conn.close()
        print("; ".join(what), flush=True)


def main(port: int, mode: str) -> None:
    listener = socket.socket(socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, mode), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
